using System.Globalization;
using System.Text;
using System.Text.Json;
using NativePeft.Modules;
using NativePeft.Ops.Reference;

namespace NativePeft.IO;

/// <summary>
/// A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) that cannot be read, written or applied.
/// The message names the file (or folder) and every field or tensor key at fault; <see cref="Problems"/> lists them.
/// </summary>
public sealed class PeftAdapterException : Exception
{
    public string Path { get; }
    public IReadOnlyList<string> Problems { get; }

    public PeftAdapterException(string path, string problem, Exception? inner = null)
        : base($"{path}: {problem}", inner)
    {
        Path = path;
        Problems = [problem];
    }

    public PeftAdapterException(string path, string summary, IReadOnlyList<string> problems)
        : base(Format(path, summary, problems))
    {
        Path = path;
        Problems = problems;
    }

    private static string Format(string path, string summary, IReadOnlyList<string> problems)
    {
        var sb = new StringBuilder($"{path}: {summary} ({problems.Count} problem{(problems.Count == 1 ? "" : "s")}):");
        foreach (string p in problems.Take(40)) sb.Append("\n  - ").Append(p);
        if (problems.Count > 40) sb.Append("\n  … and ").Append(problems.Count - 40).Append(" more");
        return sb.ToString();
    }
}

/// <summary>
/// The LoRA subset of PEFT's LoraConfig as adapter_config.json holds it (field names in PEFT's words). Missing fields
/// take PEFT's defaults (r 8, lora_alpha 8, lora_dropout 0, bias "none", target_modules Llama's default q_proj/v_proj,
/// …). Settings that change what the tensors mean and that NativePeft does not implement (DoRA, bias ≠ "none",
/// fan_in_fan_out, rank/alpha patterns, layers_to_transform, modules_to_save, regex target_modules, …) are refused on
/// <see cref="Parse"/> with a "not supported" message naming the field.
/// </summary>
public sealed record PeftLoraConfig
{
    public const string FileName = "adapter_config.json";

    /// <summary>
    /// peft_version written by <see cref="ToJson"/>: the adapter is in the LoRA format of PEFT 0.18 (the first release
    /// that writes peft_version, PR #2782). PEFT ≥ 0.14 ignores config keys it does not know (with a warning), so any
    /// PEFT from 0.14 on loads our files; older releases reject the peft_version key itself.
    /// </summary>
    public const string WrittenPeftVersion = "0.18.0";

    /// <summary>PEFT's default target_modules for Llama (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]).</summary>
    public static IReadOnlyList<string> LlamaDefaultTargets { get; } = ["q_proj", "v_proj"];

    public string PeftType { get; init; } = "LORA";
    public string? TaskType { get; init; } = "CAUSAL_LM";
    public string? BaseModelNameOrPath { get; init; }
    public string? Revision { get; init; }
    public int R { get; init; } = 8;
    public double LoraAlpha { get; init; } = 8;
    public double LoraDropout { get; init; }
    /// <summary>Short projection names (q_proj … down_proj), sorted ordinally, no duplicates.</summary>
    public IReadOnlyList<string> TargetModules { get; init; } = LlamaDefaultTargets;
    public string Bias { get; init; } = "none";
    public bool FanInFanOut { get; init; }
    public bool UseRslora { get; init; }
    public bool UseDora { get; init; }
    /// <summary>init_lora_weights as JSON text: true, false or a quoted init name ("gaussian"); it only describes the init.</summary>
    public string InitLoraWeights { get; init; } = "true";
    public bool InferenceMode { get; init; } = true;
    public string? PeftVersion { get; init; } = WrittenPeftVersion;
    /// <summary>Keys of adapter_config.json this reader does not know (ignored, as PEFT ≥ 0.14 ignores them).</summary>
    public IReadOnlyList<string> UnknownFields { get; init; } = [];

    /// <summary>lora_alpha / r, or lora_alpha / √r with use_rslora (PEFT's scaling).</summary>
    public double Scaling => LoraRef.Scaling(LoraAlpha, R, UseRslora);

    /// <summary>The model-side settings (r, lora_alpha, lora_dropout, use_rslora, target_modules) for building a matching model.</summary>
    public LoraSettings ToLoraSettings() => new()
    {
        Rank = R, Alpha = LoraAlpha, Dropout = LoraDropout, UseRsLora = UseRslora, TargetModules = TargetModules.ToArray(),
    };

    /// <summary>The config PEFT would save for a model trained with <paramref name="settings"/>.</summary>
    public static PeftLoraConfig From(LoraSettings settings, string? baseModelNameOrPath)
    {
        ArgumentNullException.ThrowIfNull(settings);
        settings.Validate();
        return new PeftLoraConfig
        {
            BaseModelNameOrPath = baseModelNameOrPath, R = settings.Rank, LoraAlpha = settings.Alpha, LoraDropout = settings.Dropout,
            UseRslora = settings.UseRsLora, TargetModules = settings.TargetModules.Distinct().Order(StringComparer.Ordinal).ToArray(),
        };
    }

    // ---------------------------------------------------------------- writing

    /// <summary>
    /// adapter_config.json as PEFT writes it: json.dumps(to_dict(), indent=2, sort_keys=True), no trailing newline.
    /// target_modules (a set in PEFT, so in arbitrary order) is written sorted. lora_alpha is an integer when it is one.
    /// </summary>
    public string ToJson()
    {
        static string Str(string? s) => s is null ? "null" : PythonJson.String(s);
        static string Bool(bool b) => b ? "true" : "false";
        string alpha = LoraAlpha == Math.Floor(LoraAlpha) && Math.Abs(LoraAlpha) < 1e15
            ? ((long)LoraAlpha).ToString(CultureInfo.InvariantCulture)
            : PythonJson.FloatRepr(LoraAlpha);
        var targets = TargetModules.Distinct().Order(StringComparer.Ordinal).ToList();
        var fields = new SortedDictionary<string, string>(StringComparer.Ordinal)
        {
            ["alpha_pattern"] = "{}",
            ["auto_mapping"] = "null",
            ["base_model_name_or_path"] = Str(BaseModelNameOrPath),
            ["bias"] = Str(Bias),
            ["fan_in_fan_out"] = Bool(FanInFanOut),
            ["inference_mode"] = Bool(InferenceMode),
            ["init_lora_weights"] = InitLoraWeights,
            ["layers_pattern"] = "null",
            ["layers_to_transform"] = "null",
            ["lora_alpha"] = alpha,
            ["lora_dropout"] = PythonJson.FloatRepr(LoraDropout),
            ["modules_to_save"] = "null",
            ["peft_type"] = Str(PeftType),
            ["peft_version"] = Str(PeftVersion),
            ["r"] = R.ToString(CultureInfo.InvariantCulture),
            ["rank_pattern"] = "{}",
            ["revision"] = Str(Revision),
            ["target_modules"] = targets.Count == 0 ? "[]" : "[\n" + string.Join(",\n", targets.Select(t => "    " + PythonJson.String(t))) + "\n  ]",
            ["task_type"] = Str(TaskType),
            ["use_dora"] = Bool(UseDora),
            ["use_rslora"] = Bool(UseRslora),
        };
        var sb = new StringBuilder("{\n");
        int k = 0;
        foreach (var (key, value) in fields)
            sb.Append("  ").Append(PythonJson.String(key)).Append(": ").Append(value).Append(++k < fields.Count ? ",\n" : "\n");
        return sb.Append('}').ToString();
    }

    // ---------------------------------------------------------------- reading

    private static readonly HashSet<string> KnownFields =
    [
        "peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha", "lora_dropout", "target_modules",
        "bias", "fan_in_fan_out", "use_rslora", "use_dora", "init_lora_weights", "modules_to_save", "inference_mode",
        "peft_version", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "auto_mapping",
        "lora_bias", "layer_replication", "exclude_modules", "use_qalora", "trainable_token_indices", "megatron_config",
        "megatron_core", "loftq_config", "eva_config", "corda_config",
    ];

    /// <summary>
    /// Parses adapter_config.json text. Throws <see cref="PeftAdapterException"/> naming <paramref name="source"/> and
    /// the field for invalid JSON, a wrong type or value, peft_type other than "LORA", and every setting NativePeft does
    /// not support (all problems at once).
    /// </summary>
    public static PeftLoraConfig Parse(string json, string source)
    {
        ArgumentNullException.ThrowIfNull(json);
        byte[] bytes;
        try { bytes = TextInput.StrictUtf8.GetBytes(json); }
        catch (EncoderFallbackException e) { throw new PeftAdapterException(source, $"not valid Unicode text: {e.Message}", e); }
        return ParseUtf8(bytes, source);
    }

    /// <summary>Parses adapter_config.json bytes (UTF-8, checked strictly: <see cref="TextInput"/>) as <see cref="Parse"/> does.</summary>
    public static PeftLoraConfig ParseUtf8(ReadOnlyMemory<byte> utf8, string source)
    {
        JsonDocument doc = TextInput.ParseJson(utf8, (problem, inner) => new PeftAdapterException(source, problem, inner));
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new PeftAdapterException(source, $"must be a JSON object, got {root.ValueKind}");
            var problems = new List<string>();
            JsonElement? Get(string name) =>
                root.TryGetProperty(name, out var e) && e.ValueKind != JsonValueKind.Null ? e : null;
            string? Str(string name)
            {
                if (Get(name) is not { } e) return null;
                if (e.ValueKind == JsonValueKind.String) return e.GetString();
                problems.Add($"{name}: expected a string, got {e.GetRawText()}");
                return null;
            }
            bool Bool(string name, bool dflt)
            {
                if (Get(name) is not { } e) return dflt;
                if (e.ValueKind is JsonValueKind.True or JsonValueKind.False) return e.GetBoolean();
                problems.Add($"{name}: expected true or false, got {e.GetRawText()}");
                return dflt;
            }
            double Num(string name, double dflt)
            {
                if (Get(name) is not { } e) return dflt;
                if (e.ValueKind == JsonValueKind.Number && e.TryGetDouble(out double d) && double.IsFinite(d)) return d;
                problems.Add($"{name}: expected a number, got {e.GetRawText()}");
                return dflt;
            }
            void NotSupported(string name, string why) => problems.Add($"{name}: {why} is not supported by NativePeft");
            bool Empty(JsonElement e) => e.ValueKind switch
            {
                JsonValueKind.Object => !e.EnumerateObject().Any(),
                JsonValueKind.Array => e.GetArrayLength() == 0,
                JsonValueKind.String => e.GetString()!.Length == 0,
                JsonValueKind.False => true,
                _ => false,
            };

            string? peftType = Str("peft_type");
            if (Get("peft_type") is null) problems.Add("peft_type: missing (PEFT requires it; a LoRA adapter has \"LORA\")");
            else if (peftType is not null && peftType != "LORA")
                problems.Add($"peft_type: \"{peftType}\" is not a LoRA adapter; only \"LORA\" is supported");

            string? taskType = Str("task_type");
            if (taskType is not null and not "CAUSAL_LM")
                NotSupported("task_type", $"\"{taskType}\" (only CAUSAL_LM, a causal language model)");

            int r = 8;
            if (Get("r") is { } re)
            {
                if (re.ValueKind != JsonValueKind.Number || !re.TryGetInt32(out int rv) || rv <= 0)
                    problems.Add($"r: expected a positive integer, got {re.GetRawText()}");
                else if (Limits.OutOfRange(rv, Limits.MaxLoraRank) is { } bound) problems.Add($"r: {bound}");
                else r = rv;
            }
            double alpha = Num("lora_alpha", 8);
            double dropout = Num("lora_dropout", 0);
            if (dropout is < 0 or >= 1) problems.Add($"lora_dropout: {dropout.ToString(CultureInfo.InvariantCulture)} is not in [0, 1)");

            IReadOnlyList<string> targets = LlamaDefaultTargets;
            if (Get("target_modules") is { } tm)
            {
                if (tm.ValueKind == JsonValueKind.String)
                {
                    string s = tm.GetString()!;
                    if (s == "all-linear") targets = LoraSettings.KnownTargets;
                    else NotSupported("target_modules", $"the regular expression \"{s}\" (give a list of module names, or \"all-linear\")");
                }
                else if (tm.ValueKind == JsonValueKind.Array)
                {
                    var list = new SortedSet<string>(StringComparer.Ordinal);
                    foreach (var t in tm.EnumerateArray())
                    {
                        string? name = t.ValueKind == JsonValueKind.String ? t.GetString() : null;
                        string? shortName = name is null ? null : ShortTarget(name);
                        if (shortName is null)
                            problems.Add($"target_modules: {t.GetRawText()} is not a Llama projection ({string.Join(", ", LoraSettings.KnownTargets)})");
                        else list.Add(shortName);
                    }
                    if (list.Count == 0 && tm.GetArrayLength() == 0) problems.Add("target_modules: is empty");
                    targets = list.ToArray();
                }
                else problems.Add($"target_modules: expected a list of module names, got {tm.GetRawText()}");
            }

            string bias = Str("bias") ?? "none";
            if (bias != "none") NotSupported("bias", $"\"{bias}\" (only \"none\": a Llama has no linear biases to train)");
            bool fanInFanOut = Bool("fan_in_fan_out", false);
            if (fanInFanOut) NotSupported("fan_in_fan_out", "true (Conv1D-style transposed weights)");
            bool useRslora = Bool("use_rslora", false);
            bool useDora = Bool("use_dora", false);
            if (useDora) NotSupported("use_dora", "true (DoRA, weight-decomposed LoRA)");
            string init = "true";
            if (Get("init_lora_weights") is { } il)
            {
                if (il.ValueKind is JsonValueKind.True or JsonValueKind.False) init = il.GetRawText();
                else if (il.ValueKind == JsonValueKind.String)
                {
                    string s = il.GetString()!;
                    if (s.StartsWith("pissa", StringComparison.Ordinal) || s is "olora" or "corda" or "loftq")
                        NotSupported("init_lora_weights", $"\"{s}\" (these inits change the base weights, which the adapter then depends on)");
                    init = PythonJson.String(s);
                }
                else problems.Add($"init_lora_weights: expected true, false or an init name, got {il.GetRawText()}");
            }
            if (Get("modules_to_save") is { } mts && !Empty(mts))
                NotSupported("modules_to_save", mts.GetRawText() + " (fully trained extra modules)");
            if (Get("layers_to_transform") is { } ltt)
                NotSupported("layers_to_transform", ltt.GetRawText() + " (LoRA on a subset of layers)");
            foreach (string p in new[] { "rank_pattern", "alpha_pattern" })
            {
                if (Get(p) is not { } pe) continue;
                if (pe.ValueKind != JsonValueKind.Object) problems.Add($"{p}: expected an object, got {pe.GetRawText()}");
                else if (!Empty(pe)) NotSupported(p, $"a non-empty {p} {pe.GetRawText()} (per-module r / lora_alpha)");
            }
            if (Bool("lora_bias", false)) NotSupported("lora_bias", "true (a bias on lora_B)");
            if (Bool("use_qalora", false)) NotSupported("use_qalora", "true");
            foreach (string p in new[] { "layer_replication", "exclude_modules", "trainable_token_indices" })
                if (Get(p) is { } pe && !Empty(pe)) NotSupported(p, pe.GetRawText());

            var config = new PeftLoraConfig
            {
                PeftType = peftType ?? "LORA", TaskType = taskType, BaseModelNameOrPath = Str("base_model_name_or_path"),
                Revision = Str("revision"), R = r, LoraAlpha = alpha, LoraDropout = dropout, TargetModules = targets, Bias = bias,
                FanInFanOut = fanInFanOut, UseRslora = useRslora, UseDora = useDora, InitLoraWeights = init,
                InferenceMode = Bool("inference_mode", false), PeftVersion = Str("peft_version"),
                UnknownFields = root.EnumerateObject().Select(p => p.Name).Where(n => !KnownFields.Contains(n)).Order(StringComparer.Ordinal).ToArray(),
            };
            if (problems.Count > 0)
                throw new PeftAdapterException(source, "the adapter config is invalid or uses what NativePeft does not support", problems);
            return config;
        }
    }

    /// <summary>"q_proj", or a dotted suffix PEFT would match ("self_attn.q_proj"), to the short name; null otherwise.</summary>
    private static string? ShortTarget(string name)
    {
        foreach (var (shortName, path) in LlamaDecoderLayer.Projections)
            if (name == shortName || name == path) return shortName;
        return null;
    }
}
