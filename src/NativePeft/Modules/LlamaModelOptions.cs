using NativePeft.Numerics;
using NativePeft.Ops.Reference;

namespace NativePeft.Modules;

/// <summary>How the frozen base's linear weights are stored.</summary>
public enum BaseQuantization
{
    /// <summary>Full precision, in the compute dtype.</summary>
    None,
    /// <summary>NormalFloat4 (bitsandbytes), quantized on load.</summary>
    Nf4,
    /// <summary>FP4 E2M1 (bitsandbytes), quantized on load.</summary>
    Fp4,
}

/// <summary>LoRA settings in PEFT's words (r, lora_alpha, lora_dropout, use_rslora, target_modules).</summary>
public sealed record LoraSettings
{
    /// <summary>The projections LoRA can target.</summary>
    public static IReadOnlyList<string> KnownTargets { get; } = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>r: the rank, 1 ≤ r ≤ min(in, out) of every targeted layer.</summary>
    public int Rank { get; init; } = 8;
    /// <summary>lora_alpha.</summary>
    public double Alpha { get; init; } = 16;
    /// <summary>lora_dropout, in [0, 1).</summary>
    public double Dropout { get; init; }
    /// <summary>use_rslora: scaling alpha/√r instead of alpha/r.</summary>
    public bool UseRsLora { get; init; }
    /// <summary>target_modules: any subset of <see cref="KnownTargets"/> (PEFT's default for Llama: q_proj, v_proj).</summary>
    public IReadOnlyList<string> TargetModules { get; init; } = ["q_proj", "v_proj"];

    public double Scaling => LoraRef.Scaling(Alpha, Rank, UseRsLora);

    /// <summary>Throws ArgumentException naming the option for an unknown target, r ≤ 0, a bad dropout or alpha.</summary>
    public void Validate()
    {
        if (TargetModules is null || TargetModules.Count == 0)
            throw new ArgumentException("target_modules: at least one of " + string.Join(", ", KnownTargets) + " is needed", nameof(TargetModules));
        foreach (var t in TargetModules)
        {
            if (!KnownTargets.Contains(t))
                throw new ArgumentException($"target_modules: unknown module \"{t}\"; known: {string.Join(", ", KnownTargets)}", nameof(TargetModules));
        }
        if (Rank <= 0)
            throw new ArgumentOutOfRangeException(nameof(Rank), Rank, $"r (LoRA rank) {Rank} must be positive");
        if (Dropout is < 0 or >= 1 || double.IsNaN(Dropout))
            throw new ArgumentOutOfRangeException(nameof(Dropout), Dropout, $"lora_dropout {Dropout} must be in [0, 1)");
        if (!double.IsFinite(Alpha))
            throw new ArgumentOutOfRangeException(nameof(Alpha), Alpha, "lora_alpha must be a finite number");
    }

    /// <summary>
    /// Why this rank does not fit <paramref name="config"/>'s targeted projections (r larger than min(in, out) of one), or
    /// null: <see cref="Training.ModelSession"/> checks it before planning or loading, so that the refusal names the rank
    /// (or the adapter it came from) instead of surfacing from <see cref="LlamaModel.Load"/> as an argument error.
    /// </summary>
    public string? RankProblem(IO.LlamaConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        foreach (var (shortName, path) in LlamaDecoderLayer.Projections)
        {
            if (!TargetModules.Contains(shortName)) continue;
            var shape = config.LayerTensors(0).First(t => t.Name.EndsWith(path + ".weight", StringComparison.Ordinal)).Shape;
            long max = Math.Min(shape[0], shape[1]);
            if (Rank > max) return $"r (LoRA rank) {Rank} is larger than min(in, out) = {max} of {path} [{shape[0]}, {shape[1]}]";
        }
        return null;
    }
}

/// <summary>How <see cref="LlamaModel"/> builds a model.</summary>
public sealed record LlamaModelOptions
{
    /// <summary>
    /// F32, BF16 (mixed precision on the GPU ops: activations, frozen weights, embeddings and norms in bf16 with fp32
    /// accumulation; rstd/lse, the RoPE tables, LoRA A/B, their gradients and the optimizer states in fp32), or F64 on
    /// the CPU for gradient checks. With F32/F64 parameters, LoRA, gradients and activations all use it. Full fine-tuning
    /// with BF16 trains fp32 master weights (fp32 gradients) and computes with bf16 working copies refreshed after each
    /// step (<see cref="LlamaModel.RefreshWorkingWeights"/>). The CPU ops reject BF16.
    /// </summary>
    public DType ComputeDType { get; init; } = DType.F32;
    /// <summary>Quantize the base's linear weights on load (embeddings, norms and lm_head stay full precision, as bitsandbytes does).
    /// A checkpoint already in bitsandbytes 4-bit is loaded as it is, whatever this says.</summary>
    public BaseQuantization Quantization { get; init; } = BaseQuantization.None;
    /// <summary>
    /// How a frozen full-precision base stores its linear weights: null = the compute dtype, or BF16 (half the memory;
    /// each layer's weight is widened into the shared scratch for its GEMMs, as a 4-bit one is dequantized). Only for a
    /// frozen base (not with full fine-tuning); embeddings, norms and lm_head stay in the compute dtype.
    /// </summary>
    public DType? BaseWeightDType { get; init; }
    public int Blocksize { get; init; } = 64;
    public bool DoubleQuant { get; init; } = true;
    /// <summary>LoRA adapters on a frozen base; null for none.</summary>
    public LoraSettings? Lora { get; init; }
    /// <summary>Train every base parameter (not with LoRA, not with a 4-bit base).</summary>
    public bool FullFineTuning { get; init; }
    /// <summary>Gradient checkpointing: keep only each block's input, recompute the block inside its backward.</summary>
    public bool Recompute { get; init; }
    /// <summary>Seeds LoRA's init (per layer) and the dropout masks.</summary>
    public int Seed { get; init; }
    /// <summary>Vocabulary rows per chunk of the fused LM-head cross-entropy.</summary>
    public int CrossEntropyChunk { get; init; } = 8192;
    /// <summary>
    /// Keep the frozen embedding table (embed_tokens, [V, C]) in host memory and send the device only the batch's rows
    /// ([N, C] per forward): 1 GiB less device memory for Llama-3-8B at the cost of one host gather and copy per forward.
    /// Lossless (the rows are the same values). Not with full fine-tuning (the table is trained) nor with
    /// tie_word_embeddings (lm_head is the same table, needed on the device).
    /// </summary>
    public bool EmbeddingOnHost { get; init; }

    public void Validate()
    {
        if (ComputeDType is not (DType.F32 or DType.BF16 or DType.F64))
            throw new ArgumentException($"ComputeDType: {ComputeDType} is not supported (F32, BF16 on the GPU ops, or F64 on the CPU)", nameof(ComputeDType));
        if (Lora is not null && FullFineTuning)
            throw new ArgumentException("FullFineTuning and Lora are exclusive: choose one", nameof(FullFineTuning));
        if (FullFineTuning && Quantization != BaseQuantization.None)
            throw new ArgumentException("FullFineTuning needs a full-precision base (Quantization = None)", nameof(FullFineTuning));
        if (BaseWeightDType is { } b && b != ComputeDType)
        {
            if (b != DType.BF16)
                throw new ArgumentException($"BaseWeightDType: {b} is not supported (BF16, or the compute dtype)", nameof(BaseWeightDType));
            if (FullFineTuning)
                throw new ArgumentException("BaseWeightDType BF16 is for a frozen base: full fine-tuning keeps fp32 master weights", nameof(BaseWeightDType));
        }
        if (CrossEntropyChunk <= 0)
            throw new ArgumentOutOfRangeException(nameof(CrossEntropyChunk), CrossEntropyChunk, "must be positive");
        if (EmbeddingOnHost && FullFineTuning)
            throw new ArgumentException("EmbeddingOnHost is for a frozen embedding: full fine-tuning trains it on the device", nameof(EmbeddingOnHost));
        Lora?.Validate();
    }
}
