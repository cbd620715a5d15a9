using System.Globalization;
using System.Text;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Optim;
using NativePeft.Quantization;

namespace NativePeft.Planning;

/// <summary>
/// Exact device bytes, by category, of fine-tuning a Llama model with a method, LoRA shape, batch shape, recompute
/// setting and optimizer — computed from the config alone (no weights, no device). The model's own tensors (base
/// weights, quantization state, adapters, gradients, dequantization scratch, activations, LoRA scratch, RoPE tables)
/// are the sums of <see cref="ModelLayout"/>'s table, the one the model allocates from; the optimizer state and the
/// ops' transient workspaces are terms of this plan.
/// <para>
/// What each category counts, tensor by tensor as <see cref="LlamaModel"/>, the ops and the optimizers allocate them
/// (every tensor at least one byte, as <see cref="Ops.TensorMemory"/> does):
/// </para>
/// <list type="bullet">
/// <item><b>Base weights</b>: embed_tokens [V, C], lm_head [V, C] unless tied, the 2L + 1 RMSNorm weights [C] (all in the
/// compute dtype), and the 7L projections: compute dtype (full, or lora on an unwidened base), BF16 (lora's default
/// frozen base) or 4-bit packed, ⌈n/2⌉ bytes (qlora). Full fine-tuning with BF16 compute adds each tensor's fp32
/// master weight (the optimizer updates it; the bf16 working copy is refreshed from it after each step).</item>
/// <item><b>Quantization state</b> (qlora): per projection bitsandbytes' double-quantized absmax as the loader keeps
/// it (1 byte per block + fp32 per 256 blocks + the fp32 256-entry map + the fp32 offset), or without double
/// quantization fp32 absmax, one per block.</item>
/// <item><b>Adapters</b>: lora_A [r, in] and lora_B [out, r] per targeted projection (compute dtype; fp32 with BF16
/// compute, as PEFT keeps adapters and as the optimizers require).</item>
/// <item><b>Gradients</b>: one per trainable tensor, in its dtype (fp32 with BF16 compute).</item>
/// <item><b>Optimizer states</b>: <see cref="AdamWOptimizer.StateBytesFor"/> per trainable tensor; on a GPU the paged
/// optimizers put m and v of tensors ≥ 1e5 elements in managed memory: that part is the <b>paged</b> row and is not in
/// the device total.</item>
/// <item><b>Activations</b>: what the model keeps for one batch shape (B·T = N tokens): ids, labels, positions;
/// L + 1 hidden states [N, C] (the block inputs and the last output); the saved tensors of every block — or, with
/// recompute, of one block, recomputed inside its backward — (n1, q, k, v, attention out, lse, h, n2, gate, up,
/// silu·up and two rstd); the final norm's output and rstd, the lse of the loss; the backward's gradient buffers
/// (residual, two [N, C] temporaries, d attention out, dq, dk, dv, and dgate, dup, d(silu·up) [N, I]); and with LoRA
/// the shared adapter scratch (dropout(x) and its U8 mask [N, max in], xa and dxa [N, max r], dx [N, max in]; with
/// BF16 compute also the bf16 working copies of one layer's A [max r · max in] and B [max out · max r], which the
/// adapter GEMMs use: bf16 × bf16 with fp32 accumulation, dA and dB written in fp32).</item>
/// <item><b>Workspaces</b>: the shared dequantization/widening scratch (the largest projection in the compute dtype,
/// with a 4-bit or BF16-stored base), the RoPE cos/sin tables [max(T, 64), D/2] (fp32 with BF16 compute), the 8-bit
/// optimizers' two 256-entry maps (GPU), and the largest transient op workspace (GPU): the cross-entropy's chunk logits
/// [N, min(chunk, V)] plus four fp32 rows in the forward (in the backward with bf16 activations and more than one chunk,
/// plus the fp32 [N, C] sum of dhidden), attention backward's fp32 [B, H, T], clipping's 1025 fp64.</item>
/// </list>
/// <para>
/// <see cref="TotalBytes"/> is the pool's peak in a steady training step (every category at once, plus the largest
/// transient workspace); the first step peaks lower (<see cref="FirstStepPeakBytes"/>) because optimizer state is
/// created at its end, after the transient workspaces are gone. For the configurations the code runs (F32 compute on
/// CpuOps and GpuOps; BF16 compute with full/lora/qlora on GpuOps) these equal the measured
/// <see cref="Ops.TensorMemory.PeakAllocatedBytes"/> to the byte (tests).
/// <see cref="Aligned"/> gives the same plan with every tensor rounded up to the pool's alignment: the arena sizes
/// of <see cref="Ops.DevicePool"/> (<see cref="PersistentArenaBytes"/>, <see cref="RopeArenaBytes"/>,
/// <see cref="TransientArenaBytes"/>). Not counted: the CUDA context and cuBLAS' own workspace, which a real GPU
/// adds on top (typically a few hundred MB).
/// </para>
/// </summary>
public sealed class MemoryPlan
{
    public LlamaConfig Config { get; }
    public PlanOptions Options { get; }

    public long BaseWeightBytes { get; private set; }
    public long QuantizationStateBytes { get; private set; }
    public long AdapterBytes { get; private set; }
    public long GradientBytes { get; private set; }
    /// <summary>Optimizer state in the device pool.</summary>
    public long OptimizerStateBytes { get; private set; }
    /// <summary>Optimizer state in managed (paged) memory, outside the device pool and not in <see cref="TotalBytes"/>.</summary>
    public long PagedOptimizerStateBytes { get; private set; }
    /// <summary>The embedding table in host memory (<see cref="PlanOptions.EmbeddingOnHost"/>), not in <see cref="TotalBytes"/>.</summary>
    public long HostEmbeddingBytes { get; private set; }
    /// <summary>Equals <see cref="LlamaModel.ActivationBytes"/> after a Forward of this batch shape.</summary>
    public long ActivationBytes { get; private set; }
    /// <summary><see cref="DequantScratchBytes"/> + <see cref="RopeTableBytes"/> + <see cref="OptimizerMapBytes"/> + <see cref="TransientWorkspaceBytes"/>.</summary>
    public long WorkspaceBytes => DequantScratchBytes + RopeTableBytes + OptimizerMapBytes + TransientWorkspaceBytes;

    public long DequantScratchBytes { get; private set; }
    public long RopeTableBytes { get; private set; }
    public long OptimizerMapBytes { get; private set; }
    /// <summary>The largest workspace an op allocates and frees within the step (on the CPU only the LoRA ops' dropout temporaries).</summary>
    public long TransientWorkspaceBytes { get; private set; }
    /// <summary>Of <see cref="ActivationBytes"/>, the LoRA layers' shared scratch.</summary>
    public long LoraScratchBytes { get; private set; }

    /// <summary>Equals <see cref="LlamaModel.ParameterBytes"/>: base, quantization state, adapters, gradients, dequantization scratch.</summary>
    public long ParameterBytes => BaseWeightBytes + QuantizationStateBytes + AdapterBytes + GradientBytes + DequantScratchBytes + GradientBucketBufferBytes;

    /// <summary>Data-parallel (<see cref="PlanOptions.WorldSize"/> &gt; 1): the all-reduce buckets' flat buffers (an upper bound); 0 otherwise.</summary>
    public long GradientBucketBufferBytes { get; private set; }
    /// <summary>Data-parallel: the fp32 gradient bytes every rank all-reduces per optimizer step; 0 for one rank.</summary>
    public long AllReduceBytes { get; private set; }
    /// <summary>
    /// Data-parallel: the bytes a rank sends (and receives) per step in a ring all-reduce of <see cref="AllReduceBytes"/>,
    /// 2(N−1)/N × bytes (reduce-scatter, then all-gather; NCCL's ring). The cpu backend's star through rank 0 moves more
    /// through rank 0 (docs/distributed.md).
    /// </summary>
    public long RingTrafficBytesPerRank => Options.WorldSize > 1 ? (long)Math.Ceiling(2.0 * (Options.WorldSize - 1) / Options.WorldSize * AllReduceBytes) : 0;

    /// <summary>The device pool's peak in a steady training step (forward, backward, clipping, optimizer step).</summary>
    public long TotalBytes => ParameterBytes + ActivationBytes + OptimizerStateBytes + RopeTableBytes + OptimizerMapBytes + TransientWorkspaceBytes;

    /// <summary>The pool's peak over the first step: optimizer state (and maps) appear only in its last phase.</summary>
    public long FirstStepPeakBytes => ParameterBytes + ActivationBytes + RopeTableBytes + Math.Max(TransientWorkspaceBytes, OptimizerStateBytes + OptimizerMapBytes);

    public long TrainableParameterCount { get; private set; }
    public long TotalParameterCount { get; private set; }

    /// <summary>
    /// 1: every category counts the bytes requested (what <see cref="Ops.TensorMemory.PeakAllocatedBytes"/> reports).
    /// Larger (a power of two): every tensor is rounded up to this many bytes, so each category is what the tensors
    /// occupy in a pool that aligns them (<see cref="Aligned"/>).
    /// </summary>
    public int Alignment { get; }

    private MemoryPlan(LlamaConfig config, PlanOptions options, int alignment)
    {
        Config = config;
        Options = options;
        Alignment = alignment;
    }

    /// <summary>The bytes one tensor of <paramref name="count"/> elements occupies: at least 1, rounded up to <paramref name="alignment"/>.</summary>
    public static long TensorBytes(DType dtype, long count, int alignment = 1) => Ops.TensorMemory.AlignedBytes(dtype, count, alignment);

    private long Bytes(DType dtype, long count) => TensorBytes(dtype, count, Alignment);

    /// <summary>
    /// This plan with every tensor rounded up to <paramref name="alignment"/> bytes (a power of two): the sizes of the
    /// arenas of a <see cref="Ops.DevicePool"/> that aligns its sub-allocations so (<see cref="PersistentArenaBytes"/>,
    /// <see cref="RopeArenaBytes"/>, <see cref="TransientArenaBytes"/>).
    /// </summary>
    public MemoryPlan Aligned(int alignment)
    {
        if (alignment < 1 || (alignment & (alignment - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(alignment), alignment, "must be a power of two");
        if (alignment == Alignment) return this;
        var plan = new MemoryPlan(Config, Options, alignment);
        plan.Fill();
        return plan;
    }

    /// <summary>
    /// What lives for the whole run (the persistent arena of <see cref="Ops.DevicePool"/>): <see cref="ParameterBytes"/>
    /// (base weights, quantization state, adapters, gradients, dequantization scratch), device optimizer state and the
    /// 8-bit maps.
    /// </summary>
    public long PersistentArenaBytes => ParameterBytes + OptimizerStateBytes + OptimizerMapBytes;

    /// <summary>The RoPE cos/sin tables (their own arena: they are reallocated when a longer sequence comes).</summary>
    public long RopeArenaBytes => RopeTableBytes;

    /// <summary>What is allocated per batch shape or per op (the transient arena): activations and the largest op workspace.</summary>
    public long TransientArenaBytes => ActivationBytes + TransientWorkspaceBytes;

    /// <summary>The plan for <paramref name="config"/> and <paramref name="options"/> (both validated).</summary>
    public static MemoryPlan Compute(LlamaConfig config, PlanOptions options)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(options);
        config.Validate();
        options.Validate();
        var plan = new MemoryPlan(config, options, 1);
        plan.Fill();
        return plan;
    }

    private void Fill()
    {
        var o = Options;
        var c = Config;
        DType d = o.ComputeDType;
        bool lora = o.Method != FineTuneMethod.Full;
        long V = c.VocabSize, C = c.HiddenSize;
        if (o.EmbeddingOnHost)
        {
            if (c.TieWordEmbeddings)
                throw new ArgumentException("EmbeddingOnHost: the model ties lm_head to the embedding table (tie_word_embeddings), which the device needs", nameof(PlanOptions.EmbeddingOnHost));
            HostEmbeddingBytes = TensorBytes(d, V * C); // host memory: the pool's alignment does not apply
        }
        if (lora)
            foreach (var (shortName, _, outF, inF) in ModelLayout.Projections(c))
                if (o.Targets.Contains(shortName) && o.Rank > Math.Min(outF, inF))
                    throw new ArgumentOutOfRangeException(nameof(PlanOptions.Rank), o.Rank,
                        $"r (LoRA rank) {o.Rank} is larger than min(in, out) = {Math.Min(outF, inF)} of {shortName} [{outF}, {inF}]");

        // The model's tensors: the layout table LlamaModel allocates from (ModelLayout), summed by category.
        var layout = o.ToLayoutOptions();
        var parameters = ModelLayout.Parameters(c, layout);
        BaseWeightBytes = parameters.SumBytes(TensorCategory.BaseWeights, Alignment);
        QuantizationStateBytes = parameters.SumBytes(TensorCategory.QuantizationState, Alignment);
        AdapterBytes = parameters.SumBytes(TensorCategory.Adapters, Alignment);
        GradientBytes = parameters.SumBytes(TensorCategory.Gradients, Alignment);
        DequantScratchBytes = parameters.SumBytes(TensorCategory.DequantScratch, Alignment);
        // What the optimizer trains: one tensor per gradient.
        var trainable = parameters.Where(t => t.Category == TensorCategory.Gradients).Select(t => t.Count).ToList();
        TrainableParameterCount = trainable.Sum();
        TotalParameterCount = c.ParameterCount();

        // Optimizer: per trainable tensor, as AdamWOptimizer creates it on its first step.
        bool eightBit = o.EightBitOptimizer, managed = o.PagedOptimizer && o.Device == PlanDevice.Gpu;
        // Data-parallel full fine-tuning (ZeRO-1): a rank keeps only its shard's state; the plan counts the largest shard.
        var owners = !lora && o.WorldSize > 1 ? Distributed.ZeroPartition.Owners(trainable.Select(n => n * 4).ToList(), o.WorldSize) : null;
        var shardState = new long[o.WorldSize];
        var shardPaged = new long[o.WorldSize];
        for (int i = 0; i < trainable.Count; i++)
        {
            long n = trainable[i];
            // Per tensor, as AdamWOptimizer allocates them (= StateBytesFor / PagedStateBytesFor at alignment 1):
            // m and v (F32, or U8 with an F32 absmax per 256-block each when quantized); m and v are paged when large.
            bool quantized = eightBit && n >= AdamWMath.Min8BitSize;
            long mv = quantized ? Bytes(DType.U8, n) : Bytes(DType.F32, n);
            long absmax = quantized ? 2 * Bytes(DType.F32, AdamWMath.Blocks(n)) : 0;
            long p = managed && n >= AdamWOptimizer.PagedMinElements ? 2 * mv : 0;
            int shard = owners?[i] ?? 0;
            shardState[shard] += 2 * mv + absmax - p;
            shardPaged[shard] += p;
        }
        int largest = Array.IndexOf(shardState, shardState.Max());
        OptimizerStateBytes = shardState[largest];
        PagedOptimizerStateBytes = shardPaged[largest];
        // Data-parallel: the flat buffers of the all-reduce buckets that group several gradients (GradientReducer); a
        // gradient of at least the bucket size is reduced in place. Bounded by the gradients smaller than a bucket.
        // (Each small gradient's bytes rounded up to the alignment: at least what the fewer, larger flat buffers take.)
        GradientBucketBufferBytes = o.WorldSize > 1 ? trainable.Where(n => n * 4 < o.GradientBucketBytes).Sum(n => Bytes(DType.F32, n)) : 0;
        AllReduceBytes = o.WorldSize > 1 ? trainable.Sum(n => n * 4) : 0;
        OptimizerMapBytes = o.Device == PlanDevice.Gpu && eightBit && trainable.Any(n => n >= AdamWMath.Min8BitSize) ? Bytes(DType.F32, 512) : 0;

        // Activations and the LoRA scratch (one arena per batch shape), and the RoPE tables (a separate arena of the model).
        long B = o.Batch, T = o.Seq, N = B * T;
        var activations = ModelLayout.Activations(c, layout, o.Batch, o.Seq);
        LoraScratchBytes = activations.SumBytes(TensorCategory.LoraScratch, Alignment);
        ActivationBytes = activations.SumBytes(alignment: Alignment);
        RopeTableBytes = ModelLayout.RopeTables(c, layout, o.Seq).SumBytes(alignment: Alignment);
        var loraGroups = lora ? LoraPlan.Groups(c, o.Targets.ToList(), o.Rank) : [];

        // Transient workspaces of GpuOps (allocated from the pool and freed inside the op).
        if (o.Device == PlanDevice.Gpu)
        {
            long chunk = Math.Min(o.CrossEntropyChunk, V);
            long ceForward = Bytes(DType.F32, 4 * N) + Bytes(d, N * chunk);
            // With bf16 activations over more than one chunk, dhidden is summed in an fp32 [N, C] buffer and rounded once.
            long ceBackward = Bytes(d, N * chunk) + (d == DType.BF16 && V > chunk ? Bytes(DType.F32, N * c.HiddenSize) : 0);
            long attention = Bytes(DType.F32, B * c.NumAttentionHeads * T);
            long clip = o.ClipGradients ? Bytes(DType.F64, Ops.GpuElementwiseOps.MaxSumSquaresBlocks + 1) : 0;
            TransientWorkspaceBytes = Math.Max(Math.Max(ceForward, ceBackward), Math.Max(attention, clip));
        }
        // The LoRA ops' workspaces (the fused kernels' partial sums; unfused, dropout(x) and its mask) on either device.
        if (lora)
            TransientWorkspaceBytes = Math.Max(TransientWorkspaceBytes,
                LoraPlan.TransientBytes(Bytes, o.Device, d, N, loraGroups, o.Dropout, backward: true));
    }

    // ------------------------------------------------------------------------------------------ fit

    /// <summary>Whether the plan's total fits in <paramref name="deviceBytes"/>.</summary>
    public bool Fits(long deviceBytes) => TotalBytes <= deviceBytes;

    /// <summary>This plan with other options (same config).</summary>
    public MemoryPlan With(Func<PlanOptions, PlanOptions> change) => Compute(Config, change(Options));

    /// <summary>
    /// The alternatives a user can switch to, each with its plan: --method qlora, --recompute, --batch 1, --seq T/2,
    /// --optim paged-adamw8bit (those that differ from the current options), then all of them together.
    /// </summary>
    public IReadOnlyList<(string Flags, MemoryPlan Plan)> Alternatives()
    {
        var list = new List<(string, MemoryPlan)>();
        var o = Options;
        if (o.Method != FineTuneMethod.Qlora) list.Add(("--method qlora", With(x => x with { Method = FineTuneMethod.Qlora })));
        if (!o.Recompute) list.Add(("--recompute", With(x => x with { Recompute = true })));
        if (o.Batch > 1) list.Add(("--batch 1", With(x => x with { Batch = 1 })));
        if (o.Seq > 1) list.Add(($"--seq {o.Seq / 2}", With(x => x with { Seq = x.Seq / 2 })));
        if (o.Optimizer != "paged-adamw8bit") list.Add(("--optim paged-adamw8bit", With(x => x with { Optimizer = "paged-adamw8bit" })));
        if (list.Count > 1)
        {
            var all = o with
            {
                Method = FineTuneMethod.Qlora, Recompute = true, Batch = 1, Seq = Math.Max(1, o.Seq / 2), Optimizer = "paged-adamw8bit",
            };
            list.Add((string.Join(' ', list.Select(a => a.Item1)), Compute(Config, all)));
        }
        return list;
    }

    /// <summary>
    /// null when the plan fits; otherwise "exceeds the device's memory (D): plan total X; options that would make it
    /// fit: --method qlora (Y), --recompute (Z), …" with the totals of the alternatives that fit (or, when none does,
    /// every alternative's total and the statement that none fits).
    /// </summary>
    public string? DoesNotFitMessage(long deviceBytes) => DoesNotFitMessage(deviceBytes, $"the device's memory ({FormatBytes(deviceBytes)})");

    /// <summary>As <see cref="DoesNotFitMessage(long)"/> with what <paramref name="deviceBytes"/> is, in words ("the memory limit (…)").</summary>
    public string? DoesNotFitMessage(long deviceBytes, string budget) =>
        Fits(deviceBytes) ? null : PlanFit.Message(TotalBytes, Alternatives().Select(a => (a.Flags, a.Plan.TotalBytes)), deviceBytes, budget);

    // ------------------------------------------------------------------------------------------ output

    /// <summary>(category, bytes) in display order, the total last; the paged and host rows are outside the total.</summary>
    public IReadOnlyList<(string Category, string Key, long Bytes)> Rows() =>
    [
        ("base weights", "base_weights", BaseWeightBytes),
        ("quantization state", "quantization_state", QuantizationStateBytes),
        ("adapters", "adapters", AdapterBytes),
        ("gradients", "gradients", GradientBytes),
        .. (Options.WorldSize > 1 ? new[] { ("gradient all-reduce buckets", "gradient_buckets", GradientBucketBufferBytes) } : []),
        ("optimizer states (device)", "optimizer_states", OptimizerStateBytes),
        ("optimizer states (paged, host-backed)", "optimizer_states_paged", PagedOptimizerStateBytes),
        ("embedding table (host)", "embedding_host", HostEmbeddingBytes),
        ("activations", "activations", ActivationBytes),
        ("workspaces", "workspaces", WorkspaceBytes),
        ("total (device)", "total", TotalBytes),
    ];

    /// <summary>A plain-text table: category, bytes, human-readable size.</summary>
    public string ToTable() => PlanText.Table(Rows());

    /// <summary>
    /// JSON: the options, every category in bytes ("base_weights_bytes", …, "workspaces_bytes"), its parts, the
    /// parameter counts, the memory pool's arena reservations ("pool_*") and "total_bytes".
    /// </summary>
    public string ToJson()
    {
        var o = Options;
        var json = new PlanText();
        var inv = CultureInfo.InvariantCulture;
        json.Field("method", PlanText.Lower(o.Method));
        json.Field("rank", o.Method == FineTuneMethod.Full ? "null" : o.Rank.ToString(inv));
        json.Field("targets", o.Method == FineTuneMethod.Full ? "[]" : "[" + string.Join(", ", o.Targets.Select(PlanText.Str)) + "]");
        json.Field("batch", o.Batch);
        json.Field("seq", o.Seq);
        json.Field("recompute", o.Recompute);
        json.Field("embedding_on_host", o.EmbeddingOnHost);
        json.Field("optimizer", PlanText.Str(o.Optimizer));
        json.Field("compute_dtype", PlanText.Lower(o.ComputeDType));
        json.Field("device", PlanText.Lower(o.Device));
        if (o.WorldSize > 1)
        {
            json.Field("world_size", o.WorldSize);
            json.Field("all_reduce_bytes_per_step", AllReduceBytes);
            json.Field("ring_traffic_bytes_per_rank_per_step", RingTrafficBytesPerRank);
        }
        json.Field("total_parameters", TotalParameterCount);
        json.Field("trainable_parameters", TrainableParameterCount);
        foreach (var (_, key, bytes) in Rows())
            if (key != "total") json.Field(key + "_bytes", bytes);
        json.Field("dequant_scratch_bytes", DequantScratchBytes);
        json.Field("rope_table_bytes", RopeTableBytes);
        json.Field("optimizer_map_bytes", OptimizerMapBytes);
        json.Field("transient_workspace_bytes", TransientWorkspaceBytes);
        json.Field("lora_scratch_bytes", LoraScratchBytes);
        json.Field("parameter_bytes", ParameterBytes);
        json.Field("first_step_peak_bytes", FirstStepPeakBytes);
        // What Ops.DevicePool reserves for this plan (every tensor rounded up to its alignment).
        int alignment = o.Device == PlanDevice.Gpu ? Ops.DevicePool.GpuAlignment : Ops.DevicePool.HostAlignment;
        var (persistent, ropeTables, transient) = Ops.DevicePool.Reservations(this, alignment);
        json.Pool(alignment, persistent, ropeTables, transient);
        return json.Finish(TotalBytes);
    }

    public override string ToString() => ToTable();

    /// <summary>Bytes as GiB / MiB / KiB (binary units) with two decimals, or bytes.</summary>
    public static string FormatBytes(long bytes) => Ops.TensorMemory.FormatBytes(bytes);
}
