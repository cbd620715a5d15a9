using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Optim;
using NativePeft.Quantization;

namespace NativePeft.Planning;

/// <summary>What is trained: every base parameter, LoRA on a 16-bit base, or LoRA on a 4-bit base.</summary>
public enum FineTuneMethod
{
    Full,
    Lora,
    Qlora,
}

/// <summary>Which ops the plan is for; it decides where workspaces and paged optimizer state live.</summary>
public enum PlanDevice
{
    /// <summary>
    /// <see cref="Ops.GpuOps"/> (CUDA or the emulator): the cross-entropy chunk logits, attention backward's row sums
    /// and gradient clipping's partial sums come from the pool; paged optimizer state is managed memory outside it.
    /// </summary>
    Gpu,
    /// <summary>
    /// <see cref="Ops.CpuOps"/>: the references use managed arrays for their workspace (not the pool); paged optimizer
    /// state is plain pool memory (there is no managed memory).
    /// </summary>
    Cpu,
}

/// <summary>How a 4-bit weight's absmax is held on the device.</summary>
public enum AbsmaxLayout
{
    /// <summary>One fp32 absmax per block: a 4-bit base without double quantization.</summary>
    DecodedF32,
    /// <summary>
    /// bitsandbytes' double quantization kept as stored: one byte per block, one fp32 nested absmax per 256 blocks,
    /// the 256-entry fp32 nested map and the fp32 offset per tensor (≈ 0.127 bits per parameter at blocksize 64).
    /// </summary>
    DoubleQuantized,
}

/// <summary>
/// The inputs of a <see cref="MemoryPlan"/>: method, LoRA shape, batch shape, recompute, optimizer, dtypes, device.
/// The defaults are a LoRA r=16 (alpha 32) on all seven projections, batch 1, sequence 2048, no recompute, AdamW,
/// F32 compute on a GPU (what the code runs today).
/// </summary>
public sealed record PlanOptions
{
    public FineTuneMethod Method { get; init; } = FineTuneMethod.Lora;
    /// <summary>r, for lora and qlora.</summary>
    public int Rank { get; init; } = 16;
    /// <summary>lora_alpha (no effect on memory; carried to <see cref="ToModelOptions"/>).</summary>
    public double Alpha { get; init; } = 32;
    /// <summary>target_modules (short names, <see cref="LoraSettings.KnownTargets"/>).</summary>
    public IReadOnlyList<string> Targets { get; init; } = LoraSettings.KnownTargets;
    /// <summary>lora_dropout: above 0 the LoRA layers keep dropout(x) and its mask [N, max in] per batch.</summary>
    public double Dropout { get; init; }
    public int Batch { get; init; } = 1;
    public int Seq { get; init; } = 2048;
    /// <summary>Gradient checkpointing: keep only block inputs, recompute one block at a time in the backward.</summary>
    public bool Recompute { get; init; }
    /// <summary>The frozen embedding table in host memory (<see cref="Modules.LlamaModelOptions.EmbeddingOnHost"/>).</summary>
    public bool EmbeddingOnHost { get; init; }
    /// <summary>adamw, paged-adamw, adamw8bit or paged-adamw8bit (<see cref="OptimizerFactory.Names"/>).</summary>
    public string Optimizer { get; init; } = "adamw";
    /// <summary>
    /// Activations, the dequantization scratch, embeddings, norms and lm_head are in this dtype. F32 or BF16 on the GPU
    /// ops (BF16: mixed precision, the published figures' setup), F32 or F64 on the CPU.
    /// </summary>
    public DType ComputeDType { get; init; } = DType.F32;
    /// <summary>
    /// The frozen projections' storage dtype for lora: null = BF16 (the published LoRA setup: a bf16 base); or the
    /// compute dtype (no widening scratch). Ignored for full (compute dtype) and qlora (4-bit).
    /// </summary>
    public DType? BaseWeightDType { get; init; }
    /// <summary>NF4 or FP4 for qlora.</summary>
    public QuantType QuantType { get; init; } = QuantType.Nf4;
    public int Blocksize { get; init; } = 64;
    public bool DoubleQuant { get; init; } = true;
    /// <summary>null: <see cref="AbsmaxLayout.DoubleQuantized"/> when <see cref="DoubleQuant"/> (the loader keeps
    /// bitsandbytes' layout and the dequantize kernels read it), <see cref="AbsmaxLayout.DecodedF32"/> otherwise.</summary>
    public AbsmaxLayout? Absmax { get; init; }
    /// <summary>Vocabulary rows per chunk of the fused cross-entropy (<see cref="LlamaModelOptions.CrossEntropyChunk"/>).</summary>
    public int CrossEntropyChunk { get; init; } = 8192;
    public PlanDevice Device { get; init; } = PlanDevice.Gpu;
    /// <summary>Global-norm gradient clipping runs each step (its fp64 partial sums are a GPU workspace).</summary>
    public bool ClipGradients { get; init; } = true;
    /// <summary>
    /// Ranks of a data-parallel run (docs/distributed.md): the plan is one rank's. With full fine-tuning the optimizer
    /// state is sharded (ZeRO-1: the largest shard is counted); the gradient all-reduce needs bucket buffers.
    /// </summary>
    public int WorldSize { get; init; } = 1;
    /// <summary>Data-parallel gradient bucket size (<see cref="Training.TrainerOptions.GradientBucketBytes"/>).</summary>
    public long GradientBucketBytes { get; init; } = 25L << 20;

    /// <summary>The storage of the frozen projections with lora (resolved default).</summary>
    public DType LoraBaseDType => BaseWeightDType ?? DType.BF16;

    /// <summary>The absmax layout (resolved default).</summary>
    public AbsmaxLayout ResolvedAbsmax => Absmax ?? (DoubleQuant ? AbsmaxLayout.DoubleQuantized : AbsmaxLayout.DecodedF32);

    public bool EightBitOptimizer => Optimizer.Contains("8bit", StringComparison.Ordinal);
    public bool PagedOptimizer => Optimizer.StartsWith("paged-", StringComparison.Ordinal);

    /// <summary>
    /// The checks a training and an inference plan share: the compute dtype (F32, BF16 on the GPU, F64 on the CPU), the
    /// base weights' dtype (BF16 or the compute dtype) and a positive cross-entropy chunk; ArgumentException naming the option.
    /// </summary>
    internal static void ValidateCompute(DType computeDType, DType? baseWeightDType, PlanDevice device, int crossEntropyChunk)
    {
        if (computeDType is not (DType.F32 or DType.BF16 or DType.F64))
            throw new ArgumentException($"compute dtype {computeDType} is not supported (F32, BF16, or F64 on the CPU)", nameof(ComputeDType));
        if (computeDType == DType.F64 && device != PlanDevice.Cpu)
            throw new ArgumentException("compute dtype F64 exists on the CPU only", nameof(ComputeDType));
        if (computeDType == DType.BF16 && device != PlanDevice.Gpu)
            throw new ArgumentException("compute dtype BF16 is planned for the GPU only", nameof(ComputeDType));
        if (baseWeightDType is { } b && b != DType.BF16 && b != computeDType)
            throw new ArgumentException($"base weight dtype {b} is not supported (BF16 or the compute dtype)", nameof(BaseWeightDType));
        if (crossEntropyChunk <= 0) throw new ArgumentOutOfRangeException(nameof(CrossEntropyChunk), crossEntropyChunk, "must be positive");
    }

    /// <summary>Throws ArgumentException naming the option for a value the plan cannot describe.</summary>
    public void Validate()
    {
        if (!Enum.IsDefined(Method)) throw new ArgumentException($"method: {Method} is not one of full, lora, qlora", nameof(Method));
        if (EmbeddingOnHost && Method == FineTuneMethod.Full)
            throw new ArgumentException("EmbeddingOnHost is for a frozen embedding: full fine-tuning trains it on the device", nameof(EmbeddingOnHost));
        if (Batch <= 0) throw new ArgumentOutOfRangeException(nameof(Batch), Batch, $"batch {Batch} must be positive");
        if (WorldSize < 1) throw new ArgumentOutOfRangeException(nameof(WorldSize), WorldSize, $"nproc {WorldSize} must be at least 1");
        if (GradientBucketBytes <= 0) throw new ArgumentOutOfRangeException(nameof(GradientBucketBytes), GradientBucketBytes, "the gradient bucket size must be positive");
        if (Seq <= 0) throw new ArgumentOutOfRangeException(nameof(Seq), Seq, $"seq {Seq} must be positive");
        if ((long)Batch * Seq > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(Seq), $"batch·seq = {(long)Batch * Seq} tokens is too large");
        if (!OptimizerFactory.Names.Contains(Optimizer))
            throw new ArgumentException($"optimizer '{Optimizer}' is unknown: expected one of {string.Join(", ", OptimizerFactory.Names)}", nameof(Optimizer));
        ValidateCompute(ComputeDType, BaseWeightDType, Device, CrossEntropyChunk);
        if (Method != FineTuneMethod.Full)
        {
            new LoraSettings { Rank = Rank, Alpha = Alpha, Dropout = Dropout, TargetModules = Targets }.Validate();
        }
        if (Method == FineTuneMethod.Qlora)
        {
            Quant4Bit.ValidateBlocksize(Blocksize);
            if (QuantType is not (QuantType.Nf4 or QuantType.Fp4))
                throw new ArgumentException($"quant type {QuantType} is not a 4-bit type", nameof(QuantType));
        }
    }

    /// <summary>The inputs of the model's tensor table (<see cref="ModelLayout"/>) for these options (validated first).</summary>
    public ModelLayoutOptions ToLayoutOptions()
    {
        Validate();
        bool lora = Method != FineTuneMethod.Full;
        return new ModelLayoutOptions
        {
            ComputeDType = ComputeDType,
            FullFineTuning = Method == FineTuneMethod.Full,
            LoraRank = lora ? Rank : 0,
            LoraTargets = lora ? Targets : [],
            FourBit = Method == FineTuneMethod.Qlora,
            Blocksize = Blocksize,
            DoubleQuant = ResolvedAbsmax == AbsmaxLayout.DoubleQuantized && DoubleQuant,
            // lora's frozen base: stored narrower than the compute dtype (BF16 by default) is widened per GEMM.
            BaseWeightDType = Method == FineTuneMethod.Lora && LoraBaseDType != ComputeDType ? LoraBaseDType : null,
            EmbeddingOnHost = EmbeddingOnHost,
            Recompute = Recompute,
        };
    }

    /// <summary>
    /// The <see cref="LlamaModelOptions"/> that build the model this plan describes (F32/F64, or BF16 on the GPU ops;
    /// the loader keeps a double-quantized absmax as it is, so <see cref="AbsmaxLayout.DecodedF32"/> needs DoubleQuant off).
    /// </summary>
    public LlamaModelOptions ToModelOptions(int seed = 0)
    {
        Validate();
        if (Method == FineTuneMethod.Qlora && DoubleQuant && ResolvedAbsmax == AbsmaxLayout.DecodedF32)
            throw new NotSupportedException("the loader keeps a double-quantized absmax as it is: the DecodedF32 layout needs DoubleQuant = false");
        var lora = Method == FineTuneMethod.Full ? null : new LoraSettings { Rank = Rank, Alpha = Alpha, Dropout = Dropout, TargetModules = Targets };
        return new LlamaModelOptions
        {
            ComputeDType = ComputeDType,
            FullFineTuning = Method == FineTuneMethod.Full,
            Lora = lora,
            Quantization = Method != FineTuneMethod.Qlora ? BaseQuantization.None : QuantType == QuantType.Fp4 ? BaseQuantization.Fp4 : BaseQuantization.Nf4,
            Blocksize = Blocksize,
            DoubleQuant = DoubleQuant,
            BaseWeightDType = Method == FineTuneMethod.Lora && LoraBaseDType != ComputeDType ? LoraBaseDType : null,
            Recompute = Recompute,
            EmbeddingOnHost = EmbeddingOnHost,
            CrossEntropyChunk = CrossEntropyChunk,
            Seed = seed,
        };
    }

    /// <summary>
    /// The setup of the published figures (issue 5, the LoRA-vs-QLoRA article): BF16 compute on a GPU, a bf16 base
    /// for lora and NF4 with double quantization for qlora, r=16 on all seven projections, batch 1, sequence 2048,
    /// gradient checkpointing, AdamW.
    /// </summary>
    public static PlanOptions Published(FineTuneMethod method) => new()
    {
        Method = method, Rank = 16, Alpha = 32, Dropout = 0.05, Targets = LoraSettings.KnownTargets, Batch = 1, Seq = 2048, Recompute = true,
        Optimizer = "adamw", ComputeDType = DType.BF16, Device = PlanDevice.Gpu,
    };
}
