using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;

namespace NativePeft.Modules;

/// <summary>
/// Dropout state shared by the LoRA layers of one model: whether dropout is on (training) and the seed of the
/// current step. Layer k's mask at a step is drawn with seed <see cref="SeedFor"/>(k), a hash of (model seed, k, step),
/// so a forward and the recomputed forward of the same step (gradient checkpointing, finite differences) draw the
/// same mask, and the mask needs no storage.
/// </summary>
public sealed class DropoutContext
{
    public bool Training { get; set; } = true;
    public ulong Seed { get; set; }
    /// <summary>The step the masks are drawn for; set by the caller (the trainer) before each forward.</summary>
    public long Step { get; set; }

    public ulong SeedFor(int moduleIndex) =>
        SeedHash.SplitMix64(SeedHash.SplitMix64(SeedHash.SplitMix64(Seed) ^ (ulong)moduleIndex) ^ (ulong)Step);
}

/// <summary>
/// Workspace of the LoRA layers of one model, sized for the current number of tokens N: xa = dropout(x)·Aᵀ and its
/// gradient for the adapters of one group ([N, r] each, back to back: Σ r ≤ the model's largest group), in the compute
/// dtype. With BF16 compute (fp32 adapters) also the bf16 working copies of a group's A (back to back, [Σ r, max in])
/// and of one B [max out · max r]. Shared by every layer (each group uses it only inside its own forward / backward).
/// </summary>
public sealed class LoraScratch
{
    public Tensor? Xa { get; internal set; }
    public Tensor? DXa { get; internal set; }
    /// <summary>lora_A rounded to the compute dtype (mixed precision only).</summary>
    public Tensor? AWork { get; internal set; }
    /// <summary>lora_B rounded to the compute dtype (mixed precision only).</summary>
    public Tensor? BWork { get; internal set; }

    // The model allocates the per-batch buffers from its layout (ModelLayout.Activations, "lora.*"): xa and dxa for
    // the adapters of one group (LoraLinear.ForwardGroup: q, k, v read the same input, so do gate and up), [N, Σ r]
    // back to back, Σ r the largest of a group; with wider adapters the bf16 working copies of a group's A
    // ([Σ r, max in]) and of one B ([max out, max r]). dropout(x), its mask and the adapter's dx are never stored: the
    // ops redraw the mask (IOps.LoraDown, IOps.LoraBackwardInput).

    internal void Clear() => Xa = DXa = AWork = BWork = null;

    /// <summary>[rows, columns] of <paramref name="t"/> from element <paramref name="offset"/> on.</summary>
    internal static Tensor ViewAt(Tensor? t, long offset, int rows, int columns, string name) =>
        (t ?? throw new InvalidOperationException($"LoRA scratch {name} is not allocated (the model allocates it for each batch shape)"))
        .Slice(offset, rows, columns);

    internal static Tensor View(Tensor? t, int rows, int columns, string name) => ViewAt(t, 0, rows, columns, name);
}

/// <summary>
/// PEFT's lora.Linear over a frozen base layer (<see cref="Linear"/> or <see cref="Linear4bit"/>):
/// y = base(x) + scaling · (dropout(x) · Aᵀ) · Bᵀ with A [r, in] (Kaiming-uniform a = √5) and B [out, r] (zeros).
/// Stores no activations: the backward recomputes dropout(x) (same counter-based mask) and xa = dropout(x)·Aᵀ from
/// the forward's input, one [N, in]×[in, r] GEMM. Gradients dA, dB accumulate.
/// <para>
/// Mixed precision (BF16 activations, fp32 A and B as PEFT keeps adapters): each Forward / Backward rounds A and B
/// into bf16 working copies in the shared scratch (r·(in + out) elements, negligible next to the activations) and runs
/// the adapter GEMMs as bf16 × bf16 with fp32 accumulation — what torch autocast does with PEFT's fp32 lora_A/lora_B.
/// xa and dxa are bf16 [N, r]; dA and dB accumulate in fp32 straight from the bf16 GEMM operands (fp32 output), so
/// the gradients and the optimizer see fp32 and the adapters are never rounded themselves. Casting x to fp32 instead
/// would need fp32 [N, in] and [N, out] buffers (as large as the bf16 activations saved) for no gain in the output, which
/// is rounded to bf16 anyway.
/// </para>
/// </summary>
public sealed class LoraLinear : ILinearLayer
{
    private readonly IOps _ops;
    private readonly LoraScratch _scratch;
    private readonly DropoutContext _dropout;

    public ILinearLayer Base { get; }
    /// <summary>lora_A [r, in].</summary>
    public Tensor LoraA { get; }
    /// <summary>lora_B [out, r].</summary>
    public Tensor LoraB { get; }
    public Tensor LoraAGrad { get; }
    public Tensor LoraBGrad { get; }
    public int Rank => LoraA.Rows;
    public double Scaling { get; }
    public double DropoutP { get; }
    /// <summary>Index of this layer among the model's LoRA layers (the dropout seed's input).</summary>
    public int ModuleIndex { get; }
    /// <summary>True while B·A is merged into the base weight (forward then skips the adapter path).</summary>
    public bool IsMerged { get; private set; }
    public int InFeatures => Base.InFeatures;
    public int OutFeatures => Base.OutFeatures;

    public LoraLinear(IOps ops, ILinearLayer baseLayer, Tensor loraA, Tensor loraB, Tensor loraAGrad, Tensor loraBGrad,
        double scaling, double dropoutP, int moduleIndex, LoraScratch scratch, DropoutContext dropout)
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(baseLayer);
        int r = loraA.Rows;
        loraA.Expect(nameof(loraA), r, baseLayer.InFeatures);
        loraB.Expect(nameof(loraB), baseLayer.OutFeatures, r);
        loraAGrad.Expect(nameof(loraAGrad), r, baseLayer.InFeatures);
        loraBGrad.Expect(nameof(loraBGrad), baseLayer.OutFeatures, r);
        if (dropoutP is < 0 or >= 1) throw new ArgumentOutOfRangeException(nameof(dropoutP), dropoutP, "lora_dropout must be in [0, 1)");
        _ops = ops;
        Base = baseLayer;
        LoraA = loraA;
        LoraB = loraB;
        LoraAGrad = loraAGrad;
        LoraBGrad = loraBGrad;
        Scaling = scaling;
        DropoutP = dropoutP;
        ModuleIndex = moduleIndex;
        _scratch = scratch ?? throw new ArgumentNullException(nameof(scratch));
        _dropout = dropout ?? throw new ArgumentNullException(nameof(dropout));
    }

    private bool DropoutOn => _dropout.Training && DropoutP > 0;
    /// <summary>The dropout probability of this step's forward/backward (0 when dropout is off).</summary>
    private double StepDropout => DropoutOn ? DropoutP : 0;
    private ulong Seed => _dropout.SeedFor(ModuleIndex);

    /// <summary>y = base(x) + scaling · dropout(x)·Aᵀ·Bᵀ. Without dropout (inference, evaluation, p = 0) as two plain
    /// GEMMs (no workspace: generation's plan has none for LoRA); with dropout as a group of one
    /// (<see cref="ForwardGroup"/>).</summary>
    public void Forward(Tensor x, Tensor y)
    {
        LinearChecks.Check(this, x, y, nameof(y));
        if (StepDropout > 0 && !IsMerged)
        {
            ForwardGroup([this], x, [y]);
            return;
        }
        Base.Forward(x, y);
        if (IsMerged) return;
        var (a, xa, _) = GroupBuffers([this], x);
        _ops.Matmul(x, false, a[0], true, xa[0]);
        _ops.Matmul(xa[0], false, WorkingB(x.DType), true, y, Scaling, 1);
    }

    public void Backward(Tensor x, Tensor dy, Tensor dx, bool accumulateDx) => BackwardGroup([this], x, [dy], dx, accumulateDx);

    /// <summary>
    /// y_i = layers[i](x) for linear layers that read the same input (q, k, v; gate, up; or one alone), with the LoRA
    /// adapters among them fused: each base layer's forward, then one <see cref="IOps.LoraDown"/> for every adapter
    /// (x read once; dropout redrawn from its counter-based mask, nothing stored), then y_i += scaling · xa_i·B_iᵀ in the
    /// GEMM (beta = 1). Layers that are not LoRA (or are merged) run their own forward.
    /// </summary>
    public static void ForwardGroup(ReadOnlySpan<ILinearLayer> layers, Tensor x, ReadOnlySpan<Tensor> ys)
    {
        if (layers.Length != ys.Length) throw new ArgumentException($"{layers.Length} layers, {ys.Length} outputs", nameof(ys));
        var lora = new List<(LoraLinear Layer, Tensor Y)>(layers.Length);
        for (int i = 0; i < layers.Length; i++)
        {
            if (layers[i] is LoraLinear l && !l.IsMerged)
            {
                LinearChecks.Check(l, x, ys[i], nameof(ys));
                l.Base.Forward(x, ys[i]);
                lora.Add((l, ys[i]));
            }
            else if (layers[i] is LoraLinear merged) merged.Base.Forward(x, ys[i]);   // B·A is in the base weight
            else layers[i].Forward(x, ys[i]);
        }
        if (lora.Count == 0) return;
        var first = lora[0].Layer;
        var ops = first._ops;
        var (a, xa, _) = first.GroupBuffers(lora.Select(t => t.Layer).ToList(), x);
        ops.LoraDown(x, lora.Select((t, g) => new LoraDownArgs(a[g], t.Layer.StepDropout, t.Layer.Seed, xa[g])).ToList());
        for (int g = 0; g < lora.Count; g++)
        {
            var (l, y) = lora[g];
            ops.Matmul(xa[g], false, l.WorkingB(x.DType), true, y, l.Scaling, 1);
        }
    }

    /// <summary>
    /// The backward of <see cref="ForwardGroup"/> given dy_i: each base layer's dx (the first overwrites dx unless
    /// <paramref name="accumulateDx"/>, the others add), xa recomputed by <see cref="IOps.LoraDown"/>, then per adapter
    /// dB += scaling · dyᵀ·xa and dxa = scaling · dy·B, then one <see cref="IOps.LoraBackwardInput"/> for the group:
    /// dA += dxaᵀ·dropout(x) and dx += Σ mask ∘ (dxa·A) / (1 − p), reading x and dx once.
    /// </summary>
    public static void BackwardGroup(ReadOnlySpan<ILinearLayer> layers, Tensor x, ReadOnlySpan<Tensor> dys, Tensor dx, bool accumulateDx)
    {
        if (layers.Length != dys.Length) throw new ArgumentException($"{layers.Length} layers, {dys.Length} gradients", nameof(dys));
        var lora = new List<(LoraLinear Layer, Tensor Dy)>(layers.Length);
        for (int i = 0; i < layers.Length; i++)
        {
            bool accumulate = accumulateDx || i > 0;
            if (layers[i] is LoraLinear l)
            {
                if (l.IsMerged) throw new InvalidOperationException("a merged LoRA layer has no backward; unmerge it first");
                LinearChecks.Check(l, x, dys[i], nameof(dys));
                l.Base.Backward(x, dys[i], dx, accumulate);
                lora.Add((l, dys[i]));
            }
            else layers[i].Backward(x, dys[i], dx, accumulate);
        }
        if (lora.Count == 0) return;
        var first = lora[0].Layer;
        var ops = first._ops;
        var (a, xa, dxa) = first.GroupBuffers(lora.Select(t => t.Layer).ToList(), x, gradients: true);
        ops.LoraDown(x, lora.Select((t, g) => new LoraDownArgs(a[g], t.Layer.StepDropout, t.Layer.Seed, xa[g])).ToList()); // recompute xa
        for (int g = 0; g < lora.Count; g++)
        {
            var (l, dy) = lora[g];
            ops.Matmul(dy, true, xa[g], false, l.LoraBGrad, l.Scaling, 1);             // dB += scaling · dyᵀ · xa
            ops.Matmul(dy, false, l.WorkingB(x.DType), false, dxa[g], l.Scaling, 0);  // dxa = scaling · dy · B
        }
        ops.LoraBackwardInput(x, lora.Select((t, g) => new LoraBackwardArgs(a[g], dxa[g], t.Layer.StepDropout, t.Layer.Seed, t.Layer.LoraAGrad)).ToList(), dx);
    }

    /// <summary>
    /// The group's A in the activations' dtype (themselves, or rounded into the scratch's working copies, back to back),
    /// and its xa and (with <paramref name="gradients"/>) dxa [N, r] views (back to back in the scratch).
    /// </summary>
    private (Tensor[] A, Tensor[] Xa, Tensor[] DXa) GroupBuffers(List<LoraLinear> group, Tensor x, bool gradients = false)
    {
        int n = x.Rows;
        var a = new Tensor[group.Count];
        var xa = new Tensor[group.Count];
        var dxa = new Tensor[group.Count];
        long rankOffset = 0;
        for (int g = 0; g < group.Count; g++)
        {
            var l = group[g];
            if (l._scratch != _scratch) throw new ArgumentException("the layers of a group share one model's LoRA scratch", nameof(group));
            if (l.LoraA.DType == x.DType) a[g] = l.LoraA;
            else
            {
                a[g] = LoraScratch.ViewAt(_scratch.AWork, rankOffset * l.InFeatures, l.Rank, l.InFeatures, "A working copy");
                _ops.Copy(l.LoraA, a[g]);
            }
            xa[g] = LoraScratch.ViewAt(_scratch.Xa, rankOffset * n, n, l.Rank, "xa");
            if (gradients) dxa[g] = LoraScratch.ViewAt(_scratch.DXa, rankOffset * n, n, l.Rank, "dxa");
            rankOffset += l.Rank;
        }
        return (a, xa, dxa);
    }

    /// <summary>lora_B in the activations' dtype: itself, or rounded into the scratch's working copy (valid until the
    /// next call).</summary>
    private Tensor WorkingB(DType activations)
    {
        if (LoraB.DType == activations) return LoraB;
        var b = LoraScratch.View(_scratch.BWork, OutFeatures, Rank, "B working copy");
        _ops.Copy(LoraB, b);
        return b;
    }

    /// <summary>W += scaling · B·A into a full-precision base; the forward then skips the adapter.</summary>
    public void Merge()
    {
        if (IsMerged) throw new InvalidOperationException("already merged");
        MergeInto(BaseWeight(), Scaling);
        IsMerged = true;
    }

    /// <summary>W −= scaling · B·A (undoes <see cref="Merge"/>; exactly for a base in the adapters' dtype, up to one
    /// rounding per element for a narrower base).</summary>
    public void Unmerge()
    {
        if (!IsMerged) throw new InvalidOperationException("not merged");
        MergeInto(BaseWeight(), -Scaling);
        IsMerged = false;
    }

    /// <summary>
    /// W += scale · B·A computed in the adapters' dtype (fp32, as PEFT merges): a narrower base (bf16) is widened into a
    /// temporary, B·A added there, and the sum rounded once into W.
    /// </summary>
    private void MergeInto(Tensor weight, double scale)
    {
        if (weight.DType == LoraA.DType)
        {
            _ops.Matmul(LoraB, false, LoraA, false, weight, scale, 1);
            return;
        }
        var wide = _ops.Memory.Allocate(LoraA.DType, OutFeatures, InFeatures);
        try
        {
            _ops.Copy(weight, wide);
            _ops.Matmul(LoraB, false, LoraA, false, wide, scale, 1);
            _ops.Copy(wide, weight);
        }
        finally { _ops.Memory.Free(wide); }
    }

    private Tensor BaseWeight() => Base is Linear l
        ? l.Weight
        : throw new InvalidOperationException($"cannot merge into a {Base.GetType().Name} base (a 4-bit base has no full-precision weight to merge into)");

    /// <summary>PEFT's init: A Kaiming-uniform (a = √5, <see cref="LoraRef.InitA{T}"/>) from <paramref name="rng"/>, B zeros.</summary>
    public void Initialize(Random rng)
    {
        int count = checked((int)LoraA.Count);
        if (LoraA.DType == DType.F64)
        {
            var a = new double[count];
            LoraRef.InitA<double>(a, Rank, InFeatures, rng);
            _ops.Upload<double>(a, LoraA);
        }
        else
        {
            var a = new float[count];
            LoraRef.InitA<float>(a, Rank, InFeatures, rng);
            _ops.Upload<float>(a, LoraA);
        }
        _ops.Fill(LoraB, 0);
    }
}
