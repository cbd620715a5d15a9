using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Modules;

/// <summary>
/// A linear layer without bias, y [N, out] = x [N, in] · Wᵀ, with an explicit backward. The caller keeps the
/// forward's input x and passes it to <see cref="Backward"/> (the layer itself stores no activations).
/// </summary>
public interface ILinearLayer
{
    int InFeatures { get; }
    int OutFeatures { get; }

    /// <summary>y [N, out] (overwritten) from x [N, in].</summary>
    void Forward(Tensor x, Tensor y);

    /// <summary>
    /// From dy [N, out] and the forward's input x [N, in]: dx [N, in] = dy · W (overwritten, or added to when
    /// <paramref name="accumulateDx"/>); the gradients of the layer's trainable parameters accumulate (+=).
    /// </summary>
    void Backward(Tensor x, Tensor dy, Tensor dx, bool accumulateDx);
}

internal static class LinearChecks
{
    public static void Check(ILinearLayer layer, Tensor x, Tensor y, string yName)
    {
        if (x.Columns != layer.InFeatures)
            throw new ArgumentException($"x: expected {layer.InFeatures} columns, got [{x.ShapeText}]", nameof(x));
        if (y.Columns != layer.OutFeatures || y.Rows != x.Rows)
            throw new ArgumentException($"{yName}: expected [{x.Rows}, {layer.OutFeatures}], got [{y.ShapeText}]", yName);
    }
}

/// <summary>
/// A full-precision linear layer: weight [out, in] in the compute dtype, trainable when it has a gradient tensor
/// (full fine-tuning: dW += dyᵀ · x; with BF16 compute the weight is the bf16 working copy and dW the fp32 gradient of
/// its master, written by a bf16 × bf16 GEMM with fp32 output), frozen otherwise. A frozen weight may be stored narrower (BF16) than the compute
/// dtype: its GEMMs then use the weight widened into the model's shared scratch.
/// </summary>
public sealed class Linear : ILinearLayer
{
    private readonly IOps _ops;
    private readonly DequantScratch? _scratch;

    public Tensor Weight { get; }
    /// <summary>dW [out, in] (accumulated by <see cref="Backward"/>), or null for a frozen weight.</summary>
    public Tensor? WeightGrad { get; }
    public int InFeatures => Weight.Columns;
    public int OutFeatures => Weight.Rows;

    /// <param name="scratch">Where a weight stored in another dtype than the compute dtype is widened (null otherwise).</param>
    public Linear(IOps ops, Tensor weight, Tensor? weightGrad = null, DequantScratch? scratch = null)
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(weight);
        if (weight.Rank != 2) throw new ArgumentException($"weight must be [out, in], got [{weight.ShapeText}]", nameof(weight));
        weightGrad?.Expect(nameof(weightGrad), weight.Rows, weight.Columns);
        if (weightGrad is not null && weightGrad.DType != weight.DType && !(weight.DType == DType.BF16 && weightGrad.DType == DType.F32))
            throw new ArgumentException($"a trainable weight is kept in its gradient's dtype ({weightGrad.DType}), or is the BF16 working copy of an F32 master; got {weight.DType}", nameof(weight));
        if (scratch is not null && scratch.Buffer.Count < weight.Count)
            throw new ArgumentException($"the scratch ({scratch.Buffer.Count} elements) is smaller than the [{weight.ShapeText}] weight", nameof(scratch));
        _ops = ops;
        Weight = weight;
        WeightGrad = weightGrad;
        _scratch = scratch;
    }

    /// <summary>The weight in the dtype of <paramref name="x"/>: itself, or widened into the scratch.</summary>
    private Tensor WeightFor(Tensor x)
    {
        if (Weight.DType == x.DType) return Weight;
        if (_scratch is null)
            throw new InvalidOperationException($"the {Weight.DType} weight [{Weight.ShapeText}] needs a scratch to run with {x.DType} activations");
        var w = _scratch.View(Weight.Rows, Weight.Columns);
        _ops.Copy(Weight, w);
        return w;
    }

    public void Forward(Tensor x, Tensor y)
    {
        LinearChecks.Check(this, x, y, nameof(y));
        _ops.Matmul(x, false, WeightFor(x), true, y);
    }

    public void Backward(Tensor x, Tensor dy, Tensor dx, bool accumulateDx)
    {
        LinearChecks.Check(this, x, dy, nameof(dy));
        LinearChecks.Check(this, dx, dy, nameof(dy));
        _ops.Matmul(dy, false, WeightFor(dy), false, dx, 1, accumulateDx ? 1 : 0);
        if (WeightGrad is not null) _ops.Matmul(dy, true, x, false, WeightGrad, 1, 1);
    }
}

/// <summary>
/// The one scratch tensor every 4-bit (or BF16-stored) layer of a model dequantizes (widens) its weight into, sized for
/// the largest layer (out·in elements, compute dtype). So the full-precision copy of a 4-bit model never exceeds one layer.
/// </summary>
public sealed class DequantScratch(Tensor buffer)
{
    public Tensor Buffer { get; } = buffer;

    /// <summary>The first rows·columns elements as a [rows, columns] matrix.</summary>
    public Tensor View(int rows, int columns) => Buffer.Slice(0, rows, columns);
}

/// <summary>
/// A frozen 4-bit (NF4/FP4, bitsandbytes layout) linear layer. Forward dequantizes the whole weight into the shared
/// <see cref="DequantScratch"/> and computes x · Wᵀ; backward dequantizes again and computes dx = dy · W. No weight
/// gradient (the base is frozen; LoRA trains on top of it).
/// </summary>
public sealed class Linear4bit : ILinearLayer
{
    private readonly IOps _ops;
    private readonly DequantScratch _scratch;

    public QuantizedWeight Weight { get; }
    public int InFeatures => Weight.Columns;
    public int OutFeatures => Weight.Rows;

    public Linear4bit(IOps ops, QuantizedWeight weight, DequantScratch scratch)
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(weight);
        ArgumentNullException.ThrowIfNull(scratch);
        if ((long)weight.Rows * weight.Columns > scratch.Buffer.Count)
            throw new ArgumentException($"the dequantization scratch ({scratch.Buffer.Count} elements) is smaller than the [{weight.Rows}, {weight.Columns}] weight", nameof(scratch));
        _ops = ops;
        Weight = weight;
        _scratch = scratch;
    }

    /// <summary>The weight dequantized into the shared scratch (valid until the next 4-bit layer uses it).</summary>
    public Tensor Dequantize()
    {
        var w = _scratch.View(Weight.Rows, Weight.Columns);
        _ops.Dequantize4bit(Weight, 0, w);
        return w;
    }

    /// <summary>y = x · Wᵀ: one token (a decode step) reads the 4-bit weight once where the ops can
    /// (<see cref="IOps.TryGemv4bit"/>); otherwise the weight is dequantized into the scratch and multiplied.</summary>
    public void Forward(Tensor x, Tensor y)
    {
        LinearChecks.Check(this, x, y, nameof(y));
        if (x.Rows == 1 && _ops.TryGemv4bit(x, Weight, y)) return;
        _ops.Matmul(x, false, Dequantize(), true, y);
    }

    public void Backward(Tensor x, Tensor dy, Tensor dx, bool accumulateDx)
    {
        LinearChecks.Check(this, x, dy, nameof(dy));
        LinearChecks.Check(this, dx, dy, nameof(dy));
        _ops.Matmul(dy, false, Dequantize(), false, dx, 1, accumulateDx ? 1 : 0);
    }
}
