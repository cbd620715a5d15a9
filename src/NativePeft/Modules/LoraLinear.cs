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
/// gradient [N, max r]; with dropout also dropout(x), its mask and dx of the adapter path [N, max in]; all in the
/// compute dtype. With BF16 compute (fp32 adapters) also the bf16 working copies of one layer's A [max r · max in]
/// and B [max out · max r]. Shared by every layer (each uses it only inside its own Forward / Backward).
/// </summary>
public sealed class LoraScratch
{
    public Tensor? Dropped { get; internal set; }
    public Tensor? Mask { get; internal set; }
    public Tensor? Xa { get; internal set; }
    public Tensor? DXa { get; internal set; }
    public Tensor? DIn { get; internal set; }
    /// <summary>lora_A rounded to the compute dtype (mixed precision only).</summary>
    public Tensor? AWork { get; internal set; }
    /// <summary>lora_B rounded to the compute dtype (mixed precision only).</summary>
    public Tensor? BWork { get; internal set; }

    /// <summary>The per-batch buffers; dropout(x), its mask and the adapter's dx only when some layer has
    /// lora_dropout &gt; 0 (without dropout the adapter's dx = dxa · A is accumulated into the layer's dx by the GEMM).</summary>
    internal void Allocate(TensorArena arena, DType dtype, int tokens, int maxIn, int maxRank, bool dropout)
    {
        if (dropout)
        {
            Dropped = arena.Allocate(dtype, tokens * maxIn);
            Mask = arena.Allocate(DType.U8, tokens * maxIn);
            DIn = arena.Allocate(dtype, tokens * maxIn);
        }
        Xa = arena.Allocate(dtype, tokens * maxRank);
        DXa = arena.Allocate(dtype, tokens * maxRank);
    }

    /// <summary>The working copies of A and B in <paramref name="dtype"/> (when the adapters are kept wider).</summary>
    internal void AllocateWorkingCopies(TensorArena arena, DType dtype, int maxIn, int maxOut, int maxRank)
    {
        AWork = arena.Allocate(dtype, checked(maxRank * maxIn));
        BWork = arena.Allocate(dtype, checked(maxOut * maxRank));
    }

    internal void Clear() => Dropped = Mask = Xa = DXa = DIn = AWork = BWork = null;

    internal static Tensor View(Tensor? t, int rows, int columns, string name) =>
        (t ?? throw new InvalidOperationException($"LoRA scratch {name} is not allocated (the model allocates it for each batch shape)"))
        .Slice(0, rows, columns);
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

    /// <summary>A and B in the dtype of the activations: themselves, or rounded into the scratch's working copies.</summary>
    private (Tensor A, Tensor B) Adapters(DType activations)
    {
        if (LoraA.DType == activations) return (LoraA, LoraB);
        var a = LoraScratch.View(_scratch.AWork, Rank, InFeatures, "A working copy");
        var b = LoraScratch.View(_scratch.BWork, OutFeatures, Rank, "B working copy");
        _ops.Copy(LoraA, a);
        _ops.Copy(LoraB, b);
        return (a, b);
    }

    /// <summary>dropout(x) into the scratch (and its mask), or x itself when dropout is off.</summary>
    private (Tensor Dropped, Tensor? Mask) Drop(Tensor x)
    {
        if (!DropoutOn) return (x, null);
        var dropped = LoraScratch.View(_scratch.Dropped, x.Rows, InFeatures, "dropout(x)");
        var mask = LoraScratch.View(_scratch.Mask, x.Rows, InFeatures, "mask");
        _ops.Dropout(x, mask, DropoutP, _dropout.SeedFor(ModuleIndex), dropped);
        return (dropped, mask);
    }

    public void Forward(Tensor x, Tensor y)
    {
        LinearChecks.Check(this, x, y, nameof(y));
        Base.Forward(x, y);
        if (IsMerged) return;
        var (dropped, _) = Drop(x);
        var (loraA, loraB) = Adapters(x.DType);
        var xa = LoraScratch.View(_scratch.Xa, x.Rows, Rank, "xa");
        _ops.Matmul(dropped, false, loraA, true, xa);
        _ops.Matmul(xa, false, loraB, true, y, Scaling, 1);
    }

    public void Backward(Tensor x, Tensor dy, Tensor dx, bool accumulateDx)
    {
        if (IsMerged) throw new InvalidOperationException("a merged LoRA layer has no backward; unmerge it first");
        LinearChecks.Check(this, x, dy, nameof(dy));
        Base.Backward(x, dy, dx, accumulateDx);
        int n = x.Rows;
        var (dropped, mask) = Drop(x);
        var (loraA, loraB) = Adapters(x.DType);
        var xa = LoraScratch.View(_scratch.Xa, n, Rank, "xa");
        var dxa = LoraScratch.View(_scratch.DXa, n, Rank, "dxa");
        _ops.Matmul(dropped, false, loraA, true, xa);                 // recompute xa [N, r]
        _ops.Matmul(dy, true, xa, false, LoraBGrad, Scaling, 1);      // dB += scaling · dyᵀ · xa
        _ops.Matmul(dy, false, loraB, false, dxa, Scaling, 0);        // dxa = scaling · dy · B
        _ops.Matmul(dxa, true, dropped, false, LoraAGrad, 1, 1);      // dA += dxaᵀ · dropout(x)
        if (mask is null)
        {
            _ops.Matmul(dxa, false, loraA, false, dx, 1, 1);           // dx += dxa · A, in the GEMM (beta = 1)
            return;
        }
        var din = LoraScratch.View(_scratch.DIn, n, InFeatures, "dx");
        _ops.Matmul(dxa, false, loraA, false, din);                   // d dropout(x) = dxa · A
        _ops.DropoutBackward(din, mask, DropoutP, din);
        _ops.Add(dx, din, dx);
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
