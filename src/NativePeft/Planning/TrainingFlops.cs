using NativePeft.IO;
using NativePeft.Modules;

namespace NativePeft.Planning;

/// <summary>
/// The FLOPs of one training step (forward + backward) by the convention `bench --model` reports MFU with, and the
/// dense bf16 peaks of known devices. The convention counts only GEMMs and attention (no norms, activations, loss or
/// optimizer), with N = batch · seq tokens and the linear layers being the 7 projections of every block plus the lm_head
/// (counted whether or not it is tied to the embedding; the embedding lookup is no GEMM):
/// <list type="bullet">
/// <item>full fine-tuning: 6 × linear parameters × N (forward, input gradient, weight gradient);</item>
/// <item>LoRA and QLoRA: 4 × linear parameters × N (the frozen base's forward and input-gradient GEMMs, no weight
/// gradient) + 6 × LoRA parameters × N (r · (in + out) per targeted projection);</item>
/// <item>plus attention, causal: forward 2 · 2 · B · T² · Hq · D / 2 per layer (QKᵀ and PV over half the square),
/// backward 2.5 × the forward.</item>
/// </list>
/// </summary>
public static class TrainingFlops
{
    /// <summary>The convention in one line, as printed beside the figures.</summary>
    public const string Convention =
        "full: 6 × linear params × tokens; LoRA/QLoRA: 4 × linear params × tokens (frozen base: forward + input-gradient GEMMs) " +
        "+ 6 × LoRA params × tokens; linear = the 7 projections per layer + lm_head; plus causal attention per layer: " +
        "forward 2·2·B·T²·Hq·D/2, backward 2.5 × forward";

    /// <summary>Parameters of the GEMMs: the 7 projections of every layer and the lm_head [V, C] (tied or not).</summary>
    public static long LinearParameters(LlamaConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        long perLayer = config.LayerTensors(0).Where(t => t.Shape.Length == 2).Sum(t => t.Shape[0] * t.Shape[1]);
        return perLayer * config.NumHiddenLayers + (long)config.VocabSize * config.HiddenSize;
    }

    /// <summary>LoRA A and B parameters: r · (in + out) per targeted projection of every layer.</summary>
    public static long LoraParameters(LlamaConfig config, int rank, IEnumerable<string> targets)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(targets);
        var set = targets.ToHashSet(StringComparer.Ordinal);
        var shapes = config.LayerTensors(0).ToDictionary(t => t.Name, t => t.Shape);
        long perLayer = 0;
        foreach (var (shortName, path) in LlamaDecoderLayer.Projections)
        {
            if (!set.Contains(shortName)) continue;
            var shape = shapes["model.layers.0." + path + ".weight"];
            perLayer += (long)rank * (shape[0] + shape[1]);
        }
        return perLayer * config.NumHiddenLayers;
    }

    /// <summary>Causal attention of all layers, forward and backward: 3.5 × 2·2·B·T²·Hq·D/2 per layer.</summary>
    public static double Attention(LlamaConfig config, int batch, int seq)
    {
        ArgumentNullException.ThrowIfNull(config);
        double forward = 2.0 * 2.0 * batch * (double)seq * seq * config.NumAttentionHeads * config.HeadDim / 2;
        return (forward + 2.5 * forward) * config.NumHiddenLayers;
    }

    /// <summary>
    /// FLOPs of one training step: full fine-tuning when <paramref name="rank"/> is null, else LoRA/QLoRA of that rank
    /// on <paramref name="targets"/> (see the class summary).
    /// </summary>
    public static double PerStep(LlamaConfig config, int batch, int seq, int? rank, IEnumerable<string>? targets = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        double tokens = (double)batch * seq;
        double linear = LinearParameters(config);
        double gemms = rank is { } r
            ? 4.0 * linear * tokens + 6.0 * LoraParameters(config, r, targets ?? LoraSettings.KnownTargets) * tokens
            : 6.0 * linear * tokens;
        return gemms + Attention(config, batch, seq);
    }

    /// <summary>
    /// Dense bf16 peaks (TFLOP/s, no sparsity) by a substring of the device name, most specific first: H100 PCIe 756,
    /// H200 and H100 SXM 989.4, A100 312, L40S 362; the H100 NVL has no figure here (null), so that it does not pass
    /// for an SXM part.
    /// </summary>
    public static IReadOnlyList<(string NameContains, double? Tflops)> KnownPeaks { get; } =
    [
        ("H100 PCIe", 756), ("H100 NVL", null), ("H200", 989.4), ("H100", 989.4), ("A100", 312), ("L40S", 362),
    ];

    /// <summary>The dense bf16 peak of a device by its name (TFLOP/s), or null when unknown (CPU, emulator, another GPU).</summary>
    public static double? PeakTflops(string? deviceName)
    {
        if (string.IsNullOrEmpty(deviceName)) return null;
        foreach (var (key, tflops) in KnownPeaks)
            if (deviceName.Contains(key, StringComparison.OrdinalIgnoreCase)) return tflops;
        return null;
    }
}
