using NativePeft.Runtime;
using System.Numerics;
using static NativePeft.Ops.Reference.RefChecks;

namespace NativePeft.Ops.Reference;

/// <summary>
/// Linear layer, PyTorch layout: <c>y[N, out] = x[N, in] · W[out, in]ᵀ (+ bias[out])</c>.
/// Every output element is one dot product accumulated in double in index order and rounded once, so results do
/// not depend on the thread count: calls with enough work run rows in parallel (each row written by one thread).
/// No allocation beyond the parallel loop's. For speed on float, the CPU path can use <see cref="HostBlas"/>;
/// this is the readable reference the kernels are checked against.
/// </summary>
public static unsafe class LinearRef
{
    /// <summary>
    /// Forward: overwrites <paramref name="y"/> <c>[rows, outFeatures]</c>. <paramref name="bias"/> is
    /// <c>[outFeatures]</c> or empty for none (Llama has none).
    /// </summary>
    public static void Forward<T>(ReadOnlySpan<T> x, ReadOnlySpan<T> weight, ReadOnlySpan<T> bias, Span<T> y,
        int rows, int inFeatures, int outFeatures) where T : unmanaged, IFloatingPointIeee754<T>
    {
        CheckShapes(rows, inFeatures, outFeatures);
        Length(x.Length, (long)rows * inFeatures, nameof(x));
        Length(weight.Length, (long)outFeatures * inFeatures, nameof(weight));
        OptionalLength(bias.Length, outFeatures, nameof(bias));
        Length(y.Length, (long)rows * outFeatures, nameof(y));
        bool hasBias = !bias.IsEmpty;
        fixed (T* px = x, pw = weight, pb = bias, py = y)
        {
            T* xs = px, ws = pw, bs = pb, ys = py; // fixed locals cannot be captured
            RefParallel.For(rows, (long)inFeatures * outFeatures, n =>
            {
                var xr = new ReadOnlySpan<T>(xs + (long)n * inFeatures, inFeatures);
                var yr = new Span<T>(ys + (long)n * outFeatures, outFeatures);
                for (int o = 0; o < outFeatures; o++)
                {
                    var wr = new ReadOnlySpan<T>(ws + (long)o * inFeatures, inFeatures);
                    double sum = hasBias ? D(bs[o]) : 0;
                    for (int i = 0; i < inFeatures; i++) sum += D(xr[i]) * D(wr[i]);
                    yr[o] = R<T>(sum);
                }
            });
        }
    }

    /// <summary>
    /// Backward. When not empty: <paramref name="dx"/> <c>[rows, inFeatures]</c> is OVERWRITTEN with <c>dy · W</c>;
    /// <paramref name="dweight"/> <c>[outFeatures, inFeatures]</c> ACCUMULATES <c>+= dyᵀ · x</c>;
    /// <paramref name="dbias"/> <c>[outFeatures]</c> ACCUMULATES <c>+= Σ_n dy[n, :]</c>. An empty span skips that
    /// gradient (a frozen base weight under LoRA). Each sum is over its index in order, in double, added once.
    /// </summary>
    public static void Backward<T>(ReadOnlySpan<T> dy, ReadOnlySpan<T> x, ReadOnlySpan<T> weight,
        Span<T> dx, Span<T> dweight, Span<T> dbias, int rows, int inFeatures, int outFeatures)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        CheckShapes(rows, inFeatures, outFeatures);
        Length(dy.Length, (long)rows * outFeatures, nameof(dy));
        Length(weight.Length, (long)outFeatures * inFeatures, nameof(weight));
        OptionalLength(dx.Length, (long)rows * inFeatures, nameof(dx));
        OptionalLength(dweight.Length, (long)outFeatures * inFeatures, nameof(dweight));
        OptionalLength(dbias.Length, outFeatures, nameof(dbias));
        if (!dweight.IsEmpty) Length(x.Length, (long)rows * inFeatures, nameof(x));

        fixed (T* pdy = dy, px = x, pw = weight, pdx = dx, pdw = dweight)
        {
            T* dys = pdy, xs = px, ws = pw, dxs = pdx, dws = pdw;
            if (!dx.IsEmpty)
            {
                // dx[n, i] = Σ_o dy[n, o] · W[o, i]
                RefParallel.For(rows, (long)inFeatures * outFeatures, n =>
                {
                    for (int i = 0; i < inFeatures; i++)
                    {
                        double sum = 0;
                        for (int o = 0; o < outFeatures; o++)
                            sum += D(dys[(long)n * outFeatures + o]) * D(ws[(long)o * inFeatures + i]);
                        dxs[(long)n * inFeatures + i] = R<T>(sum);
                    }
                });
            }
            if (!dweight.IsEmpty)
            {
                // dW[o, i] += Σ_n dy[n, o] · x[n, i]   (parallel over o: each row of dW has one writer)
                RefParallel.For(outFeatures, (long)rows * inFeatures, o =>
                {
                    for (int i = 0; i < inFeatures; i++)
                    {
                        double sum = 0;
                        for (int n = 0; n < rows; n++)
                            sum += D(dys[(long)n * outFeatures + o]) * D(xs[(long)n * inFeatures + i]);
                        long at = (long)o * inFeatures + i;
                        dws[at] = R<T>(D(dws[at]) + sum);
                    }
                });
            }
        }
        if (dbias.IsEmpty) return;
        for (int o = 0; o < outFeatures; o++)
        {
            double sum = 0;
            for (int n = 0; n < rows; n++) sum += D(dy[n * outFeatures + o]);
            dbias[o] = R<T>(D(dbias[o]) + sum);
        }
    }

    private static void CheckShapes(int rows, int inFeatures, int outFeatures)
    {
        NonNegative(rows, nameof(rows));
        Positive(inFeatures, nameof(inFeatures));
        Positive(outFeatures, nameof(outFeatures));
    }
}
