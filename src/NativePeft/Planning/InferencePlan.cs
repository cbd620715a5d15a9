using System.Globalization;
using System.Text;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Quantization;

namespace NativePeft.Planning;

/// <summary>What an <see cref="InferencePlan"/> is for.</summary>
public enum InferenceMode
{
    /// <summary>
    /// Generation with a KV cache (<see cref="LlamaModel.CreateKvCache"/>, <see cref="Inference.TextGenerator"/>): one
    /// sequence, a prefill of the prompt, then one token at a time.
    /// </summary>
    Generate,
    /// <summary>
    /// Evaluation (the loss of <see cref="LlamaModel.Forward(ReadOnlySpan{int}, ReadOnlySpan{int}, int, int)"/> with no
    /// backward): `eval` runs one sequence at a time.
    /// </summary>
    Eval,
}

/// <summary>
/// The inputs of an <see cref="InferencePlan"/>: the model as it is loaded for generation or evaluation (base storage,
/// quantization, adapter, compute dtype), the device, and the shape (generation: prompt tokens and new tokens; eval:
/// the longest sequence).
/// </summary>
public sealed record InferencePlanOptions
{
    public InferenceMode Mode { get; init; } = InferenceMode.Generate;
    /// <summary>Generate: the prompt's tokens (the prefill). The workspace holds max(prompt, min(cache length, 16)) tokens.</summary>
    public int PromptTokens { get; init; } = 1;
    /// <summary>Generate: new tokens at most (--max-tokens). The cache holds max(prompt, prompt + new − 1) tokens (the last token is never fed back).</summary>
    public int MaxNewTokens { get; init; } = 1;
    /// <summary>Eval: the longest sequence (the activations are sized for it; shorter ones reuse the arena).</summary>
    public int Seq { get; init; } = 2048;
    /// <summary>None: the projections are dense; Nf4 or Fp4: 4-bit (quantized on load, or a bitsandbytes checkpoint as stored).</summary>
    public BaseQuantization Quantization { get; init; } = BaseQuantization.None;
    public int Blocksize { get; init; } = 64;
    /// <summary>bitsandbytes' double-quantized absmax kept as stored (otherwise one fp32 absmax per block).</summary>
    public bool DoubleQuant { get; init; } = true;
    /// <summary>F32 or BF16 on the GPU ops, F32 or F64 on the CPU.</summary>
    public DType ComputeDType { get; init; } = DType.F32;
    /// <summary>The dense projections' storage (BF16 for a bf16 checkpoint); null = the compute dtype. Narrower than the compute dtype adds the widening scratch.</summary>
    public DType? BaseWeightDType { get; init; }
    /// <summary>The adapter's r, or null for none.</summary>
    public int? LoraRank { get; init; }
    /// <summary>The adapter's target_modules (short names).</summary>
    public IReadOnlyList<string> LoraTargets { get; init; } = LoraSettings.KnownTargets;
    /// <summary>The adapter's lora_dropout: above 0 an eval forward also allocates dropout(x) and its mask (unused in eval).</summary>
    public double LoraDropout { get; init; }
    public PlanDevice Device { get; init; } = PlanDevice.Gpu;
    /// <summary>Eval: vocabulary rows per chunk of the fused cross-entropy.</summary>
    public int CrossEntropyChunk { get; init; } = 8192;

    /// <summary>Generate: the KV cache's tokens, as <see cref="Inference.TextGenerator"/> makes it.</summary>
    public int MaxLength => Math.Max(PromptTokens, PromptTokens + MaxNewTokens - 1);

    /// <summary>
    /// The inputs of the model's tensor table (<see cref="ModelLayout"/>) for these options (validated first): a frozen
    /// model (no full fine-tuning, no recompute) with the adapter, if any, on every target.
    /// </summary>
    public ModelLayoutOptions ToLayoutOptions()
    {
        Validate();
        bool q4 = Quantization != BaseQuantization.None;
        return new ModelLayoutOptions
        {
            ComputeDType = ComputeDType,
            LoraRank = LoraRank ?? 0,
            LoraTargets = LoraRank is null ? [] : LoraTargets,
            FourBit = q4,
            Blocksize = Blocksize,
            DoubleQuant = DoubleQuant,
            BaseWeightDType = q4 ? null : BaseWeightDType,
        };
    }

    /// <summary>Throws ArgumentException naming the option for a value the plan cannot describe.</summary>
    public void Validate()
    {
        if (!Enum.IsDefined(Mode)) throw new ArgumentException($"mode {Mode} is not generate or eval", nameof(Mode));
        if (PromptTokens <= 0) throw new ArgumentOutOfRangeException(nameof(PromptTokens), PromptTokens, "prompt tokens must be positive");
        if (MaxNewTokens <= 0) throw new ArgumentOutOfRangeException(nameof(MaxNewTokens), MaxNewTokens, "max new tokens must be positive");
        if ((long)PromptTokens + MaxNewTokens > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(MaxNewTokens), "prompt + new tokens is too large");
        if (Seq <= 0) throw new ArgumentOutOfRangeException(nameof(Seq), Seq, $"seq {Seq} must be positive");
        PlanOptions.ValidateCompute(ComputeDType, BaseWeightDType, Device, CrossEntropyChunk);
        if (LoraRank is { } r) new LoraSettings { Rank = r, TargetModules = LoraTargets }.Validate();
        if (Quantization != BaseQuantization.None) Quant4Bit.ValidateBlocksize(Blocksize);
    }
}

/// <summary>
/// Exact device bytes of generation (with a KV cache) or evaluation (a forward with no backward), by category,
/// computed from the config alone — tensor by tensor as <see cref="LlamaModel"/>, <see cref="LlamaKvCache"/> and the
/// ops allocate them (each at least one byte, rounded up to <see cref="Alignment"/>). The model's and the cache's
/// tensors are the sums of <see cref="ModelLayout"/>'s table, the one they allocate from; the ops' transient
/// workspaces are terms of this plan:
/// <list type="bullet">
/// <item><b>Base weights</b>: embed_tokens [V, C], lm_head unless tied and the 2L + 1 norms in the compute dtype; the 7L
/// projections dense (compute dtype or <see cref="InferencePlanOptions.BaseWeightDType"/>) or 4-bit packed ⌈n/2⌉ bytes.</item>
/// <item><b>Quantization state</b>: as in <see cref="MemoryPlan"/> (double-quantized absmax as stored, or fp32 per block).</item>
/// <item><b>Adapters</b>: lora_A [r, in] and lora_B [out, r] per targeted projection (fp32 with BF16 compute) — and
/// their gradients (<see cref="AdapterGradientBytes"/>): <see cref="LlamaModel"/> allocates them with every LoRA layer,
/// inference or not.</item>
/// <item><b>KV cache</b> (generate): per layer K and V [max length, Hkv·D] in the compute dtype
/// (<see cref="LlamaKvCache.BytesFor"/>).</item>
/// <item><b>Activations</b> (eval): what <see cref="LlamaModel.Forward(ReadOnlySpan{int}, ReadOnlySpan{int}, int, int)"/>
/// allocates for one sequence of <see cref="InferencePlanOptions.Seq"/> tokens: the whole training set, backward buffers
/// included (the model sizes one arena per batch shape whether or not a backward follows), every block's saved tensors
/// (no recompute), and the LoRA scratch when there is an adapter.</item>
/// <item><b>Workspaces</b>: the dequantization/widening scratch (4-bit or narrower base), the RoPE tables
/// [max(T, 64), D/2] (fp32 with BF16 compute), and — generate — the cache's forward workspace for
/// n = max(prompt, min(max length, 16)) tokens: ids and positions, x0, x1, normed, h [n, C], q and attention out [n, Hq·D],
/// gate, up, silu·up [n, I], rstd [n] and one row of logits [V] (both fp32 with BF16 compute), with an adapter xa
/// [n · max r] and with BF16 compute the bf16 working copies of A [max r · max in] and B [max out · max r];
/// — eval on a GPU — the cross-entropy forward's fp32 [4, N] and chunk logits [N, min(chunk, V)].</item>
/// </list>
/// <see cref="TotalBytes"/> equals the measured <see cref="Ops.TensorMemory.PeakAllocatedBytes"/> (tests: CPU F32,
/// emulator F32 and BF16, no adapter, LoRA on a bf16 base, QLoRA NF4 with double quantization). The memory pool's arenas
/// (<see cref="PlannedPools"/>): persistent = weights, quantization state, adapters
/// and their gradients, dequantization scratch; rope tables; transient = KV cache and the forward workspace (generate) or
/// activations and the op workspace (eval).
/// </summary>
public sealed class InferencePlan
{
    public LlamaConfig Config { get; }
    public InferencePlanOptions Options { get; }
    /// <summary>1: requested bytes; a power of two: every tensor rounded up to it (<see cref="Aligned"/>).</summary>
    public int Alignment { get; }

    public long BaseWeightBytes { get; private set; }
    public long QuantizationStateBytes { get; private set; }
    public long AdapterBytes { get; private set; }
    /// <summary>The LoRA gradients the model allocates (unused by inference).</summary>
    public long AdapterGradientBytes { get; private set; }
    public long DequantScratchBytes { get; private set; }
    public long RopeTableBytes { get; private set; }
    /// <summary>Generate: K and V of every layer.</summary>
    public long KvCacheBytes { get; private set; }
    /// <summary>Generate: the cache's forward workspace (prefill and decode share it).</summary>
    public long ForwardWorkspaceBytes { get; private set; }
    /// <summary>Eval: the forward's activations (equals <see cref="LlamaModel.ActivationBytes"/>).</summary>
    public long ActivationBytes { get; private set; }
    /// <summary>Eval on a GPU: the cross-entropy forward's workspace (allocated and freed inside the op).</summary>
    public long TransientWorkspaceBytes { get; private set; }
    public long TotalParameterCount { get; private set; }

    /// <summary>Equals <see cref="LlamaModel.ParameterBytes"/>.</summary>
    public long ParameterBytes => BaseWeightBytes + QuantizationStateBytes + AdapterBytes + AdapterGradientBytes + DequantScratchBytes;
    public long WorkspaceBytes => DequantScratchBytes + RopeTableBytes + ForwardWorkspaceBytes + TransientWorkspaceBytes;
    public long TotalBytes => ParameterBytes + RopeTableBytes + KvCacheBytes + ForwardWorkspaceBytes + ActivationBytes + TransientWorkspaceBytes;

    /// <summary>The pool's persistent arena: weights, quantization state, adapters and their gradients, dequantization scratch.</summary>
    public long PersistentArenaBytes => ParameterBytes;
    public long RopeArenaBytes => RopeTableBytes;
    /// <summary>The pool's transient arena: KV cache + forward workspace (generate), activations + op workspace (eval).</summary>
    public long TransientArenaBytes => KvCacheBytes + ForwardWorkspaceBytes + ActivationBytes + TransientWorkspaceBytes;

    private InferencePlan(LlamaConfig config, InferencePlanOptions options, int alignment)
    {
        Config = config;
        Options = options;
        Alignment = alignment;
    }

    public static InferencePlan Compute(LlamaConfig config, InferencePlanOptions options)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(options);
        config.Validate();
        options.Validate();
        var plan = new InferencePlan(config, options, 1);
        plan.Fill();
        return plan;
    }

    /// <summary>This plan with every tensor rounded up to <paramref name="alignment"/> (a power of two).</summary>
    public InferencePlan Aligned(int alignment)
    {
        if (alignment < 1 || (alignment & (alignment - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(alignment), alignment, "must be a power of two");
        if (alignment == Alignment) return this;
        var plan = new InferencePlan(Config, Options, alignment);
        plan.Fill();
        return plan;
    }

    public InferencePlan With(Func<InferencePlanOptions, InferencePlanOptions> change) => Compute(Config, change(Options));

    private long Bytes(DType dtype, long count) => MemoryPlan.TensorBytes(dtype, count, Alignment);

    private void Fill()
    {
        var o = Options;
        var c = Config;
        DType d = o.ComputeDType;
        long V = c.VocabSize;
        long rank = o.LoraRank ?? 0;
        if (o.LoraRank is not null)
            foreach (var (shortName, _, outF, inF) in ModelLayout.Projections(c))
                if (o.LoraTargets.Contains(shortName) && rank > Math.Min(outF, inF))
                    throw new ArgumentOutOfRangeException(nameof(InferencePlanOptions.LoraRank), rank,
                        $"r (LoRA rank) {rank} is larger than min(in, out) = {Math.Min(outF, inF)} of {shortName} [{outF}, {inF}]");

        // The model's tensors: the layout table LlamaModel and LlamaKvCache allocate from (ModelLayout), summed by category.
        var layout = o.ToLayoutOptions();
        var parameters = ModelLayout.Parameters(c, layout);
        BaseWeightBytes = parameters.SumBytes(TensorCategory.BaseWeights, Alignment);
        QuantizationStateBytes = parameters.SumBytes(TensorCategory.QuantizationState, Alignment);
        AdapterBytes = parameters.SumBytes(TensorCategory.Adapters, Alignment);
        AdapterGradientBytes = parameters.SumBytes(TensorCategory.Gradients, Alignment); // ga, gb: allocated with every LoRA layer
        DequantScratchBytes = parameters.SumBytes(TensorCategory.DequantScratch, Alignment);
        TotalParameterCount = c.ParameterCount();

        if (o.Mode == InferenceMode.Generate)
        {
            int maxLength = o.MaxLength;
            KvCacheBytes = ModelLayout.KvCache(c, layout, maxLength).SumBytes(alignment: Alignment);
            // LlamaKvCache.Workspace: max(prompt, min(max length, 16)) tokens, one row of logits (the prefill and decode
            // keep only the last position's).
            int n = Math.Max(o.PromptTokens, Math.Min(maxLength, 16));
            ForwardWorkspaceBytes = ModelLayout.CacheWorkspace(c, layout, n, 1).SumBytes(alignment: Alignment);
            RopeTableBytes = ModelLayout.RopeTables(c, layout, maxLength).SumBytes(alignment: Alignment);
        }
        else
        {
            long N = o.Seq;
            // The model's activations for B = 1, T = N, without recompute.
            ActivationBytes = ModelLayout.Activations(c, layout, 1, o.Seq).SumBytes(alignment: Alignment);
            RopeTableBytes = ModelLayout.RopeTables(c, layout, o.Seq).SumBytes(alignment: Alignment);
            if (o.Device == PlanDevice.Gpu)
                TransientWorkspaceBytes = Bytes(DType.F32, 4 * N) + Bytes(d, N * Math.Min(o.CrossEntropyChunk, V));
            // The forward's LoRA ops, dropout off (evaluation).
            if (AdapterBytes > 0)
                TransientWorkspaceBytes = Math.Max(TransientWorkspaceBytes,
                    LoraPlan.TransientBytes(Bytes, o.Device, d, N, LoraPlan.Groups(c, o.LoraTargets.ToList(), (int)rank), 0, backward: false));
        }
    }

    // ------------------------------------------------------------------------------------------ fit

    public bool Fits(long deviceBytes) => TotalBytes <= deviceBytes;

    /// <summary>
    /// The options a user can switch to, each with its plan: --quantize nf4 (a dense base), --max-tokens M/2 (generate,
    /// M &gt; 1), then both.
    /// </summary>
    public IReadOnlyList<(string Flags, InferencePlan Plan)> Alternatives()
    {
        var list = new List<(string, InferencePlan)>();
        var o = Options;
        if (o.Quantization == BaseQuantization.None)
            list.Add(("--quantize nf4", With(x => x with { Quantization = BaseQuantization.Nf4, Blocksize = 64, DoubleQuant = true, BaseWeightDType = null })));
        if (o.Mode == InferenceMode.Generate && o.MaxNewTokens > 1)
            list.Add(($"--max-tokens {o.MaxNewTokens / 2}", With(x => x with { MaxNewTokens = x.MaxNewTokens / 2 })));
        if (list.Count > 1)
            list.Add((string.Join(' ', list.Select(a => a.Item1)),
                With(x => x with { Quantization = BaseQuantization.Nf4, Blocksize = 64, DoubleQuant = true, BaseWeightDType = null, MaxNewTokens = Math.Max(1, x.MaxNewTokens / 2) })));
        return list;
    }

    /// <summary>null when the plan fits; otherwise one line with the total and the alternatives that would fit (or that none does).</summary>
    public string? DoesNotFitMessage(long deviceBytes) => DoesNotFitMessage(deviceBytes, $"the device's free memory ({MemoryPlan.FormatBytes(deviceBytes)})");

    /// <summary>As <see cref="DoesNotFitMessage(long)"/> with what <paramref name="deviceBytes"/> is, in words ("the memory limit (…)").</summary>
    public string? DoesNotFitMessage(long deviceBytes, string budget) =>
        Fits(deviceBytes) ? null : PlanFit.Message(TotalBytes, Alternatives().Select(a => (a.Flags, a.Plan.TotalBytes)), deviceBytes, budget);

    /// <summary>What the pool's error names: the shape the plan was made for.</summary>
    public string ShapeDescription => Options.Mode == InferenceMode.Generate
        ? $"generation of up to {Options.MaxLength} cached tokens, prompt {Options.PromptTokens}"
        : $"evaluation of sequences up to {Options.Seq} tokens";

    // ------------------------------------------------------------------------------------------ output

    /// <summary>(category, key, bytes) in display order, the total last; the rows that do not apply to the mode are left out.</summary>
    public IReadOnlyList<(string Category, string Key, long Bytes)> Rows()
    {
        var rows = new List<(string, string, long)>
        {
            ("base weights", "base_weights", BaseWeightBytes),
            ("quantization state", "quantization_state", QuantizationStateBytes),
            ("adapters", "adapters", AdapterBytes),
            ("adapter gradients (allocated by the model)", "adapter_gradients", AdapterGradientBytes),
        };
        if (Options.Mode == InferenceMode.Generate) rows.Add(("KV cache", "kv_cache", KvCacheBytes));
        else rows.Add(("activations", "activations", ActivationBytes));
        rows.Add(("workspaces", "workspaces", WorkspaceBytes));
        rows.Add(("total (device)", "total", TotalBytes));
        return rows;
    }

    public string ToTable() => PlanText.Table(Rows());

    /// <summary>JSON: the options, every category and its parts in bytes, the pool's arenas ("pool_*") and "total_bytes".</summary>
    public string ToJson()
    {
        var o = Options;
        var json = new PlanText();
        var inv = CultureInfo.InvariantCulture;
        json.Field("mode", PlanText.Str(o.Mode == InferenceMode.Generate ? "generate" : "eval"));
        if (o.Mode == InferenceMode.Generate)
        {
            json.Field("max_length", o.MaxLength);
            json.Field("prompt_tokens", o.PromptTokens);
            json.Field("max_new_tokens", o.MaxNewTokens);
        }
        else json.Field("seq", o.Seq);
        json.Field("quantization", PlanText.Lower(o.Quantization));
        json.Field("rank", o.LoraRank?.ToString(inv) ?? "null");
        json.Field("targets", o.LoraRank is null ? "[]" : "[" + string.Join(", ", o.LoraTargets.Select(PlanText.Str)) + "]");
        json.Field("compute_dtype", PlanText.Lower(o.ComputeDType));
        json.Field("device", PlanText.Lower(o.Device));
        json.Field("total_parameters", TotalParameterCount);
        json.Field("base_weights_bytes", BaseWeightBytes);
        json.Field("quantization_state_bytes", QuantizationStateBytes);
        json.Field("adapters_bytes", AdapterBytes);
        json.Field("adapter_gradients_bytes", AdapterGradientBytes);
        json.Field("kv_cache_bytes", KvCacheBytes);
        json.Field("activations_bytes", ActivationBytes);
        json.Field("workspaces_bytes", WorkspaceBytes);
        json.Field("dequant_scratch_bytes", DequantScratchBytes);
        json.Field("rope_table_bytes", RopeTableBytes);
        json.Field("forward_workspace_bytes", ForwardWorkspaceBytes);
        json.Field("transient_workspace_bytes", TransientWorkspaceBytes);
        json.Field("parameter_bytes", ParameterBytes);
        int alignment = o.Device == PlanDevice.Gpu ? Ops.DevicePool.GpuAlignment : Ops.DevicePool.HostAlignment;
        var aligned = Aligned(alignment);
        json.Pool(alignment, aligned.PersistentArenaBytes, aligned.RopeArenaBytes, aligned.TransientArenaBytes);
        return json.Finish(TotalBytes);
    }

    public override string ToString() => ToTable();
}
