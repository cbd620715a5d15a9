using System.Globalization;
using System.Text;
using System.Text.Json;
using NativePeft.Numerics;

namespace NativePeft.IO;

/// <summary>A config.json that cannot be used; the message names the file and the field.</summary>
public sealed class LlamaConfigException : Exception
{
    /// <summary>The file (or source name) the config came from.</summary>
    public string FilePath { get; }
    public string? Field { get; }

    public LlamaConfigException(string source, string? field, string problem, Exception? inner = null)
        : base(field is null ? $"{source}: {problem}" : $"{source}: {field}: {problem}", inner)
    {
        FilePath = source;
        Field = field;
    }
}

/// <summary>
/// Llama 3 RoPE frequency scaling (<c>rope_type: "llama3"</c>): wavelengths longer than
/// original_max_position_embeddings / low_freq_factor are divided by factor, shorter than
/// original / high_freq_factor are kept, and in between interpolated (docs/ops-contract.md "RoPE").
/// </summary>
public sealed record Llama3RopeScaling(double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositionEmbeddings);

/// <summary>
/// The fields of a Hugging Face Llama config.json that NativePeft uses (field names as HF writes them in
/// <see cref="ToJson"/>). Defaults are transformers' LlamaConfig defaults. Build with <see cref="Load"/>,
/// <see cref="Parse"/> or <see cref="Preset"/>; an instance built by hand is checked by <see cref="Validate"/>.
/// </summary>
public sealed record LlamaConfig
{
    public string ModelType { get; init; } = "llama";
    public int HiddenSize { get; init; }
    public int IntermediateSize { get; init; }
    public int NumHiddenLayers { get; init; }
    public int NumAttentionHeads { get; init; }
    /// <summary>Key/value heads (grouped-query attention); HF's default when absent is <see cref="NumAttentionHeads"/>.</summary>
    public int NumKeyValueHeads { get; init; }
    /// <summary>Per-head dimension; HF's default when absent is hidden_size / num_attention_heads.</summary>
    public int HeadDim { get; init; }
    public int VocabSize { get; init; }
    public int MaxPositionEmbeddings { get; init; } = 2048;
    public double RmsNormEps { get; init; } = 1e-6;
    public double RopeTheta { get; init; } = 10000.0;
    /// <summary>Null for plain RoPE (absent, null, or rope_type "default").</summary>
    public Llama3RopeScaling? RopeScaling { get; init; }
    public bool TieWordEmbeddings { get; init; }
    /// <summary>Always false: biases are rejected when parsing (the model has no bias path).</summary>
    public bool AttentionBias { get; init; }
    /// <summary>Always false: biases are rejected when parsing.</summary>
    public bool MlpBias { get; init; }
    public string HiddenAct { get; init; } = "silu";
    /// <summary>torch_dtype (or the newer "dtype"): the dtype the weights were saved in; null when absent.</summary>
    public DType? TorchDtype { get; init; }
    public int? BosTokenId { get; init; }
    /// <summary>eos_token_id: one id or a list of ids in the file; null when absent.</summary>
    public IReadOnlyList<int>? EosTokenIds { get; init; }

    /// <summary>Number of query heads times head_dim: the output size of q_proj and the input size of o_proj.</summary>
    public int QueryDim => NumAttentionHeads * HeadDim;
    /// <summary>Output size of k_proj and v_proj.</summary>
    public int KeyValueDim => NumKeyValueHeads * HeadDim;

    public const string FileName = "config.json";

    // ---------------------------------------------------------------- parsing

    /// <summary>Reads and validates a config.json; errors are <see cref="LlamaConfigException"/> naming the file and field.</summary>
    public static LlamaConfig Load(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        string full = Path.GetFullPath(path);
        byte[] bytes = TextInput.ReadFile(full, Limits.MaxJsonFileBytes, (problem, inner) => new LlamaConfigException(full, null, problem, inner));
        return ParseUtf8(bytes, full);
    }

    /// <summary>Parses and validates config.json text; <paramref name="sourceName"/> names it in errors.</summary>
    public static LlamaConfig Parse(string json, string sourceName)
    {
        ArgumentNullException.ThrowIfNull(json);
        ArgumentNullException.ThrowIfNull(sourceName);
        byte[] bytes;
        try { bytes = TextInput.StrictUtf8.GetBytes(json); }
        catch (EncoderFallbackException e) { throw new LlamaConfigException(sourceName, null, $"not valid Unicode text: {e.Message}", e); }
        return ParseUtf8(bytes, sourceName);
    }

    /// <summary>Parses and validates config.json bytes (UTF-8, checked strictly: <see cref="TextInput"/>).</summary>
    public static LlamaConfig ParseUtf8(ReadOnlyMemory<byte> utf8, string sourceName)
    {
        ArgumentNullException.ThrowIfNull(sourceName);
        // Python's json module reads NaN/Infinity; HF configs do not contain them, so plain JSON is enough.
        JsonDocument doc = TextInput.ParseJson(utf8, (problem, inner) => new LlamaConfigException(sourceName, null, problem, inner),
            new JsonDocumentOptions { AllowTrailingCommas = false, CommentHandling = JsonCommentHandling.Disallow });
        using (doc)
        {
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new LlamaConfigException(sourceName, null, $"must be a JSON object, got {root.ValueKind}");
            var r = new Reader(sourceName, root);

            string modelType = r.String("model_type") ?? throw r.Bad("model_type", "missing (expected \"llama\")");
            if (modelType != "llama")
                throw r.Bad("model_type", $"\"{modelType}\" is not supported; only \"llama\" is");
            string hiddenAct = r.String("hidden_act") ?? "silu";
            if (hiddenAct != "silu")
                throw r.Bad("hidden_act", $"\"{hiddenAct}\" is not supported; Llama uses \"silu\"");
            if (r.Bool("attention_bias") == true)
                throw r.Bad("attention_bias", "true is not supported (NativePeft's Llama has no projection biases)");
            if (r.Bool("mlp_bias") == true)
                throw r.Bad("mlp_bias", "true is not supported (NativePeft's Llama has no projection biases)");

            int hidden = r.RequiredInt("hidden_size");
            int heads = r.RequiredInt("num_attention_heads");
            int? kvHeads = r.Int("num_key_value_heads");
            int? headDim = r.Int("head_dim");
            double? ropeTheta = r.Double("rope_theta");
            Llama3RopeScaling? scaling = ParseRopeScaling(r, root, "rope_scaling", out _);
            if (root.TryGetProperty("rope_parameters", out JsonElement rp) && rp.ValueKind != JsonValueKind.Null)
            {
                // transformers ≥ 5 writes {"rope_type": …, "rope_theta": …, <scaling fields>} instead of rope_theta/rope_scaling.
                Llama3RopeScaling? s2 = ParseRopeScaling(r, root, "rope_parameters", out double? theta2);
                if (theta2 is { } t2)
                {
                    if (ropeTheta is { } t1 && t1 != t2)
                        throw r.Bad("rope_parameters.rope_theta", $"{Num(t2)} disagrees with rope_theta {Num(t1)}");
                    ropeTheta = t2;
                }
                if (s2 is not null)
                {
                    if (scaling is not null && scaling != s2)
                        throw r.Bad("rope_parameters", "disagrees with rope_scaling");
                    scaling = s2;
                }
            }

            DType? dtype = null;
            string? dtypeField = root.TryGetProperty("torch_dtype", out _) ? "torch_dtype" : root.TryGetProperty("dtype", out _) ? "dtype" : null;
            if (dtypeField is not null && r.String(dtypeField) is { } dtypeName)
            {
                if (!DTypes.TryParseTorchName(dtypeName, out DType d) || d is not (DType.F32 or DType.BF16 or DType.F16))
                    throw r.Bad(dtypeField, $"\"{dtypeName}\" is not float32, bfloat16 or float16");
                dtype = d;
            }

            var config = new LlamaConfig
            {
                ModelType = modelType,
                HiddenSize = hidden,
                IntermediateSize = r.RequiredInt("intermediate_size"),
                NumHiddenLayers = r.RequiredInt("num_hidden_layers"),
                NumAttentionHeads = heads,
                NumKeyValueHeads = kvHeads ?? heads,
                HeadDim = headDim ?? (heads > 0 && hidden % heads == 0 ? hidden / heads : 0),
                VocabSize = r.RequiredInt("vocab_size"),
                MaxPositionEmbeddings = r.Int("max_position_embeddings") ?? 2048,
                RmsNormEps = r.Double("rms_norm_eps") ?? 1e-6,
                RopeTheta = ropeTheta ?? 10000.0,
                RopeScaling = scaling,
                TieWordEmbeddings = r.Bool("tie_word_embeddings") ?? false,
                HiddenAct = hiddenAct,
                TorchDtype = dtype,
                BosTokenId = r.Int("bos_token_id"),
                EosTokenIds = r.IntOrIntList("eos_token_id"),
            };
            // Report the implicit head_dim precisely: hidden not divisible by heads without an explicit head_dim.
            if (headDim is null && heads > 0 && hidden > 0 && hidden % heads != 0)
                throw r.Bad("num_attention_heads", $"{heads} does not divide hidden_size {hidden} and no head_dim is given");
            config.Validate(sourceName);
            return config;
        }
    }

    private static Llama3RopeScaling? ParseRopeScaling(Reader r, JsonElement root, string field, out double? ropeTheta)
    {
        ropeTheta = null;
        if (!root.TryGetProperty(field, out JsonElement e) || e.ValueKind == JsonValueKind.Null)
            return null;
        if (e.ValueKind != JsonValueKind.Object)
            throw r.Bad(field, $"must be an object or null, got {e.ValueKind}");
        var sub = new Reader(r.Source, e, field + ".");
        ropeTheta = sub.Double("rope_theta");
        // transformers reads "rope_type" and, for old files, "type".
        string typeField = e.TryGetProperty("rope_type", out _) ? "rope_type" : "type";
        string ropeType = sub.String(typeField) ?? throw r.Bad(field + ".rope_type", "missing");
        switch (ropeType)
        {
            case "default":
                return null;
            case "llama3":
                var s = new Llama3RopeScaling(
                    sub.RequiredDouble("factor"),
                    sub.RequiredDouble("low_freq_factor"),
                    sub.RequiredDouble("high_freq_factor"),
                    sub.RequiredInt("original_max_position_embeddings"));
                if (!(s.Factor >= 1))
                    throw r.Bad(field + ".factor", $"{Num(s.Factor)} must be at least 1");
                if (!(s.LowFreqFactor > 0) || !(s.HighFreqFactor > s.LowFreqFactor))
                    throw r.Bad(field + ".high_freq_factor",
                        $"low_freq_factor {Num(s.LowFreqFactor)} and high_freq_factor {Num(s.HighFreqFactor)} must satisfy 0 < low < high");
                if (s.OriginalMaxPositionEmbeddings <= 0)
                    throw r.Bad(field + ".original_max_position_embeddings", $"{s.OriginalMaxPositionEmbeddings} must be positive");
                return s;
            default:
                throw r.Bad(field + "." + typeField, $"\"{ropeType}\" is not supported; only \"default\" and \"llama3\" are");
        }
    }

    /// <summary>
    /// Checks sizes are positive, num_key_value_heads divides num_attention_heads, head_dim is even (RoPE rotates
    /// pairs), rms_norm_eps and rope_theta are positive, and the unsupported options are off.
    /// </summary>
    public void Validate(string sourceName = "LlamaConfig")
    {
        void Positive(string field, long v)
        {
            if (v <= 0) throw new LlamaConfigException(sourceName, field, $"{v} must be positive");
        }
        if (ModelType != "llama")
            throw new LlamaConfigException(sourceName, "model_type", $"\"{ModelType}\" is not supported; only \"llama\" is");
        if (HiddenAct != "silu")
            throw new LlamaConfigException(sourceName, "hidden_act", $"\"{HiddenAct}\" is not supported; Llama uses \"silu\"");
        if (AttentionBias)
            throw new LlamaConfigException(sourceName, "attention_bias", "true is not supported");
        if (MlpBias)
            throw new LlamaConfigException(sourceName, "mlp_bias", "true is not supported");
        Positive("hidden_size", HiddenSize);
        Positive("intermediate_size", IntermediateSize);
        Positive("num_hidden_layers", NumHiddenLayers);
        Positive("num_attention_heads", NumAttentionHeads);
        Positive("num_key_value_heads", NumKeyValueHeads);
        Positive("head_dim", HeadDim);
        Positive("vocab_size", VocabSize);
        Positive("max_position_embeddings", MaxPositionEmbeddings);
        // Bounded before anything is sized from them (docs/reliability.md "Bounds").
        void Bounded(string field, long v, long max)
        {
            if (Limits.OutOfRange(v, max) is { } problem) throw new LlamaConfigException(sourceName, field, problem);
        }
        Bounded("hidden_size", HiddenSize, Limits.MaxHiddenSize);
        Bounded("intermediate_size", IntermediateSize, Limits.MaxIntermediateSize);
        Bounded("num_hidden_layers", NumHiddenLayers, Limits.MaxLayers);
        Bounded("num_attention_heads", NumAttentionHeads, Limits.MaxHeads);
        Bounded("num_key_value_heads", NumKeyValueHeads, Limits.MaxHeads);
        Bounded("head_dim", HeadDim, Limits.MaxHeadDim);
        Bounded("vocab_size", VocabSize, Limits.MaxVocabSize);
        Bounded("max_position_embeddings", MaxPositionEmbeddings, Limits.MaxPositions);
        if (RopeScaling is { } rs)
            Bounded("rope_scaling.original_max_position_embeddings", rs.OriginalMaxPositionEmbeddings, Limits.MaxPositions);
        if (NumKeyValueHeads > NumAttentionHeads || NumAttentionHeads % NumKeyValueHeads != 0)
            throw new LlamaConfigException(sourceName, "num_key_value_heads",
                $"{NumKeyValueHeads} does not divide num_attention_heads {NumAttentionHeads}");
        if (HeadDim % 2 != 0)
            throw new LlamaConfigException(sourceName, "head_dim", $"{HeadDim} must be even (RoPE rotates pairs)");
        if ((long)NumAttentionHeads * HeadDim > Limits.MaxHiddenSize)
            throw new LlamaConfigException(sourceName, "head_dim", $"{HeadDim} × {NumAttentionHeads} heads = {(long)HeadDim * NumAttentionHeads} is more than {Limits.MaxHiddenSize}");
        foreach (var (field, elements) in new[]
                 {
                     ("vocab_size", (long)VocabSize * HiddenSize), ("intermediate_size", (long)IntermediateSize * HiddenSize),
                     ("num_attention_heads", (long)QueryDim * HiddenSize),
                 })
        {
            if (elements > Limits.MaxTensorElements)
                throw new LlamaConfigException(sourceName, field,
                    $"makes a {elements}-element weight with hidden_size {HiddenSize}, more than the {Limits.MaxTensorElements} limit");
        }
        long parameters;
        try { parameters = ParameterCount(); }
        catch (OverflowException) { parameters = long.MaxValue; }
        if (parameters > Limits.MaxParameters)
            throw new LlamaConfigException(sourceName, "num_hidden_layers",
                $"the config describes {parameters} parameters, more than the {Limits.MaxParameters} limit (hidden_size {HiddenSize}, intermediate_size {IntermediateSize}, {NumHiddenLayers} layers, vocab_size {VocabSize})");
        if (!(RmsNormEps > 0) || double.IsInfinity(RmsNormEps))
            throw new LlamaConfigException(sourceName, "rms_norm_eps", $"{Num(RmsNormEps)} must be a positive number");
        if (!(RopeTheta > 0) || double.IsInfinity(RopeTheta))
            throw new LlamaConfigException(sourceName, "rope_theta", $"{Num(RopeTheta)} must be a positive number");
        if (BosTokenId is { } bos && (bos < 0 || bos >= VocabSize))
            throw new LlamaConfigException(sourceName, "bos_token_id", $"{bos} is outside the vocabulary [0, {VocabSize})");
        if (EosTokenIds is { } eos)
        {
            foreach (int id in eos)
            {
                if (id < 0 || id >= VocabSize)
                    throw new LlamaConfigException(sourceName, "eos_token_id", $"{id} is outside the vocabulary [0, {VocabSize})");
            }
        }
    }

    // ---------------------------------------------------------------- presets

    /// <summary>Names accepted by <see cref="Preset"/>.</summary>
    public static IReadOnlyList<string> PresetNames { get; } = ["llama3-8b", "llama3.1-8b", "llama3-70b", "llama3.1-70b", "llama2-7b"];

    /// <summary>
    /// The published configs: "llama3-8b" (Meta-Llama-3-8B), "llama3.1-8b" (Llama-3.1-8B, with llama3 rope scaling),
    /// "llama3-70b", "llama3.1-70b", "llama2-7b" (Llama-2-7b-hf).
    /// </summary>
    public static LlamaConfig Preset(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        var llama3Scaling = new Llama3RopeScaling(8.0, 1.0, 4.0, 8192);
        var llama3_8b = new LlamaConfig
        {
            HiddenSize = 4096, IntermediateSize = 14336, NumHiddenLayers = 32, NumAttentionHeads = 32,
            NumKeyValueHeads = 8, HeadDim = 128, VocabSize = 128256, MaxPositionEmbeddings = 8192,
            RmsNormEps = 1e-5, RopeTheta = 500000.0, TorchDtype = DType.BF16, BosTokenId = 128000, EosTokenIds = [128001],
        };
        var llama3_70b = llama3_8b with { HiddenSize = 8192, IntermediateSize = 28672, NumHiddenLayers = 80, NumAttentionHeads = 64 };
        return name.ToLowerInvariant() switch
        {
            "llama3-8b" => llama3_8b,
            "llama3.1-8b" => llama3_8b with { MaxPositionEmbeddings = 131072, RopeScaling = llama3Scaling },
            "llama3-70b" => llama3_70b,
            "llama3.1-70b" => llama3_70b with { MaxPositionEmbeddings = 131072, RopeScaling = llama3Scaling },
            "llama2-7b" => new LlamaConfig
            {
                HiddenSize = 4096, IntermediateSize = 11008, NumHiddenLayers = 32, NumAttentionHeads = 32,
                NumKeyValueHeads = 32, HeadDim = 128, VocabSize = 32000, MaxPositionEmbeddings = 4096,
                RmsNormEps = 1e-5, RopeTheta = 10000.0, TorchDtype = DType.F16, BosTokenId = 1, EosTokenIds = [2],
            },
            _ => throw new ArgumentException($"unknown preset \"{name}\"; known: {string.Join(", ", PresetNames)}", nameof(name)),
        };
    }

    // ---------------------------------------------------------------- tensors

    /// <summary>Tensor names of decoder layer <paramref name="layer"/> with their shapes (Linear weights are [out, in]).</summary>
    public IEnumerable<(string Name, long[] Shape)> LayerTensors(int layer)
    {
        string p = $"model.layers.{layer}.";
        yield return (p + "input_layernorm.weight", [HiddenSize]);
        yield return (p + "self_attn.q_proj.weight", [QueryDim, HiddenSize]);
        yield return (p + "self_attn.k_proj.weight", [KeyValueDim, HiddenSize]);
        yield return (p + "self_attn.v_proj.weight", [KeyValueDim, HiddenSize]);
        yield return (p + "self_attn.o_proj.weight", [HiddenSize, QueryDim]);
        yield return (p + "post_attention_layernorm.weight", [HiddenSize]);
        yield return (p + "mlp.gate_proj.weight", [IntermediateSize, HiddenSize]);
        yield return (p + "mlp.up_proj.weight", [IntermediateSize, HiddenSize]);
        yield return (p + "mlp.down_proj.weight", [HiddenSize, IntermediateSize]);
    }

    /// <summary>Every tensor of a HF Llama checkpoint with its shape; lm_head.weight only when not tied.</summary>
    public IEnumerable<(string Name, long[] Shape)> ExpectedTensors()
    {
        yield return ("model.embed_tokens.weight", [VocabSize, HiddenSize]);
        for (int i = 0; i < NumHiddenLayers; i++)
        {
            foreach (var t in LayerTensors(i))
                yield return t;
        }
        yield return ("model.norm.weight", [HiddenSize]);
        if (!TieWordEmbeddings)
            yield return ("lm_head.weight", [VocabSize, HiddenSize]);
    }

    /// <summary>Total parameters: embeddings, per layer q/k/v/o (GQA), gate/up/down and two norms, the final norm, lm_head unless tied.</summary>
    public long ParameterCount()
    {
        long total = 0;
        foreach (var (_, shape) in ExpectedTensors())
            total = checked(total + DTypes.ElementCount(shape));
        return total;
    }

    // ---------------------------------------------------------------- writing

    /// <summary>
    /// config.json text as transformers writes it (json.dumps(indent=2, sort_keys=True) + "\n"), with
    /// architectures ["LlamaForCausalLM"], rope_theta/rope_scaling in the classic form, and the fields above.
    /// </summary>
    public string ToJson()
    {
        var fields = new SortedDictionary<string, string>(StringComparer.Ordinal)
        {
            ["architectures"] = "[\n    \"LlamaForCausalLM\"\n  ]",
            ["attention_bias"] = Bool(AttentionBias),
            ["attention_dropout"] = "0.0",
            ["head_dim"] = Int(HeadDim),
            ["hidden_act"] = PythonJson.String(HiddenAct),
            ["hidden_size"] = Int(HiddenSize),
            ["intermediate_size"] = Int(IntermediateSize),
            ["max_position_embeddings"] = Int(MaxPositionEmbeddings),
            ["mlp_bias"] = Bool(MlpBias),
            ["model_type"] = PythonJson.String(ModelType),
            ["num_attention_heads"] = Int(NumAttentionHeads),
            ["num_hidden_layers"] = Int(NumHiddenLayers),
            ["num_key_value_heads"] = Int(NumKeyValueHeads),
            ["rms_norm_eps"] = PythonJson.FloatRepr(RmsNormEps),
            ["rope_scaling"] = RopeScaling is { } s
                ? "{\n    \"factor\": " + PythonJson.FloatRepr(s.Factor)
                  + ",\n    \"high_freq_factor\": " + PythonJson.FloatRepr(s.HighFreqFactor)
                  + ",\n    \"low_freq_factor\": " + PythonJson.FloatRepr(s.LowFreqFactor)
                  + ",\n    \"original_max_position_embeddings\": " + Int(s.OriginalMaxPositionEmbeddings)
                  + ",\n    \"rope_type\": \"llama3\"\n  }"
                : "null",
            ["rope_theta"] = PythonJson.FloatRepr(RopeTheta),
            ["tie_word_embeddings"] = Bool(TieWordEmbeddings),
            ["use_cache"] = "true",
            ["vocab_size"] = Int(VocabSize),
        };
        if (TorchDtype is { } d) fields["torch_dtype"] = PythonJson.String(d.TorchName());
        if (BosTokenId is { } bos) fields["bos_token_id"] = Int(bos);
        if (EosTokenIds is { } eos)
        {
            fields["eos_token_id"] = eos.Count == 1
                ? Int(eos[0])
                : "[\n" + string.Join(",\n", eos.Select(e => "    " + Int(e))) + "\n  ]";
        }
        var sb = new StringBuilder("{\n");
        int k = 0;
        foreach (var kv in fields)
        {
            sb.Append("  ").Append(PythonJson.String(kv.Key)).Append(": ").Append(kv.Value);
            sb.Append(++k < fields.Count ? ",\n" : "\n");
        }
        return sb.Append("}\n").ToString();
    }

    /// <summary>Writes <see cref="ToJson"/> to <paramref name="path"/> atomically (temporary file, then rename).</summary>
    public void Save(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        string full = Path.GetFullPath(path);
        Validate(full);
        OutputFolder.WriteAllTextAtomic(full, ToJson());
    }

    // ---------------------------------------------------------------- equality (EosTokenIds by value)

    public bool Equals(LlamaConfig? other) =>
        other is not null
        && ModelType == other.ModelType && HiddenSize == other.HiddenSize && IntermediateSize == other.IntermediateSize
        && NumHiddenLayers == other.NumHiddenLayers && NumAttentionHeads == other.NumAttentionHeads
        && NumKeyValueHeads == other.NumKeyValueHeads && HeadDim == other.HeadDim && VocabSize == other.VocabSize
        && MaxPositionEmbeddings == other.MaxPositionEmbeddings && RmsNormEps.Equals(other.RmsNormEps)
        && RopeTheta.Equals(other.RopeTheta) && Equals(RopeScaling, other.RopeScaling)
        && TieWordEmbeddings == other.TieWordEmbeddings && AttentionBias == other.AttentionBias && MlpBias == other.MlpBias
        && HiddenAct == other.HiddenAct && TorchDtype == other.TorchDtype && BosTokenId == other.BosTokenId
        && (EosTokenIds is null ? other.EosTokenIds is null : other.EosTokenIds is not null && EosTokenIds.SequenceEqual(other.EosTokenIds));

    public override int GetHashCode() =>
        HashCode.Combine(HiddenSize, IntermediateSize, NumHiddenLayers, NumAttentionHeads, NumKeyValueHeads, HeadDim, VocabSize, RopeScaling);

    private static string Int(long v) => v.ToString(CultureInfo.InvariantCulture);
    private static string Bool(bool v) => v ? "true" : "false";
    private static string Num(double v) => v.ToString("R", CultureInfo.InvariantCulture);

    /// <summary>Typed access to the fields of a JSON object, with errors naming the source and field.</summary>
    private sealed class Reader(string source, JsonElement obj, string prefix = "")
    {
        public string Source => source;

        public LlamaConfigException Bad(string field, string problem) => new(source, field, problem);

        private JsonElement? Get(string name) =>
            obj.TryGetProperty(name, out JsonElement v) && v.ValueKind != JsonValueKind.Null ? v : null;

        public string? String(string name)
        {
            if (Get(name) is not { } v) return null;
            return v.ValueKind == JsonValueKind.String ? v.GetString() : throw Bad(prefix + name, $"must be a string, got {v}");
        }

        public bool? Bool(string name)
        {
            if (Get(name) is not { } v) return null;
            return v.ValueKind switch
            {
                JsonValueKind.True => true,
                JsonValueKind.False => false,
                _ => throw Bad(prefix + name, $"must be true or false, got {v}"),
            };
        }

        public int? Int(string name)
        {
            if (Get(name) is not { } v) return null;
            if (v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out int i)) return i;
            // 4096.0 is accepted as an integer (Python would not write it, but hand-edited files may).
            if (v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out double d) && d == Math.Floor(d) && Math.Abs(d) <= int.MaxValue)
                return (int)d;
            if (v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out double big) && big == Math.Floor(big))
                throw Bad(prefix + name, $"{v} is out of range (an integer of at most {int.MaxValue}; see the bounds in docs/reliability.md)");
            throw Bad(prefix + name, $"must be an integer, got {v}");
        }

        public int RequiredInt(string name) => Int(name) ?? throw Bad(prefix + name, "missing");

        public double? Double(string name)
        {
            if (Get(name) is not { } v) return null;
            return v.ValueKind == JsonValueKind.Number ? v.GetDouble() : throw Bad(prefix + name, $"must be a number, got {v}");
        }

        public double RequiredDouble(string name) => Double(name) ?? throw Bad(prefix + name, "missing");

        public IReadOnlyList<int>? IntOrIntList(string name)
        {
            if (Get(name) is not { } v) return null;
            if (v.ValueKind == JsonValueKind.Array)
            {
                var list = new List<int>();
                foreach (JsonElement e in v.EnumerateArray())
                {
                    if (e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out int i))
                        throw Bad(prefix + name, $"entry {e} is not an integer");
                    list.Add(i);
                }
                return list;
            }
            return [Int(name)!.Value];
        }
    }
}
