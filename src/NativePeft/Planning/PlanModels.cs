using NativePeft.IO;
using NativePeft.Numerics;

namespace NativePeft.Planning;

/// <summary>
/// The model configs a plan can be made for by name: <see cref="LlamaConfig.Preset"/>'s published configs plus
/// "llama-65b" (the original LLaMA-65B the QLoRA paper fine-tuned on one 48 GB GPU), or a config.json path.
/// </summary>
public static class PlanModels
{
    /// <summary>LLaMA-65B (Touvron et al. 2023): hidden 8192, intermediate 22016, 80 layers, 64 heads (no GQA), vocab 32000.</summary>
    public static LlamaConfig Llama65B { get; } = new()
    {
        HiddenSize = 8192, IntermediateSize = 22016, NumHiddenLayers = 80, NumAttentionHeads = 64, NumKeyValueHeads = 64,
        HeadDim = 128, VocabSize = 32000, MaxPositionEmbeddings = 2048, RmsNormEps = 1e-6, RopeTheta = 10000.0,
        TorchDtype = DType.F16, BosTokenId = 1, EosTokenIds = [2],
    };

    /// <summary>Every preset name.</summary>
    public static IReadOnlyList<string> Names { get; } = [.. LlamaConfig.PresetNames, "llama-65b"];

    /// <summary>
    /// A preset by name (case-insensitive), "builtin" (the shipped model), or the config.json at <paramref name="nameOrPath"/> (a file, or a folder
    /// holding config.json). Throws ArgumentException for an unknown name that is not a path, and
    /// <see cref="LlamaConfigException"/> / FileNotFoundException for a bad or missing config.json.
    /// </summary>
    public static LlamaConfig Resolve(string nameOrPath)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(nameOrPath);
        string lower = nameOrPath.ToLowerInvariant();
        if (lower == "llama-65b") return Llama65B;
        if (lower == Training.BuiltinModel.Name) nameOrPath = Training.BuiltinModel.Directory; // the shipped model train and compare default to
        if (LlamaConfig.PresetNames.Contains(lower)) return LlamaConfig.Preset(lower);
        bool looksLikePath = nameOrPath.Contains('/') || nameOrPath.Contains('\\') || nameOrPath.EndsWith(".json", StringComparison.OrdinalIgnoreCase)
                             || File.Exists(nameOrPath) || Directory.Exists(nameOrPath);
        if (!looksLikePath)
            throw new ArgumentException($"unknown model \"{nameOrPath}\": expected one of {string.Join(", ", Names)}, {Training.BuiltinModel.Name}, or a path to config.json", nameof(nameOrPath));
        string file = Directory.Exists(nameOrPath) ? Path.Combine(nameOrPath, LlamaConfig.FileName) : nameOrPath;
        if (!File.Exists(file)) throw new FileNotFoundException($"{file}: config.json not found", file);
        return LlamaConfig.Load(file);
    }
}
