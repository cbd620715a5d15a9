using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using static NativePeft.Ops.Reference.RefChecks;
using static NativePeft.Ops.Reference.RefVector;

namespace NativePeft.Ops.Reference;

/// <summary>
/// RMSNorm (HF LlamaRMSNorm): <c>rstd[n] = 1 / sqrt(mean_c(x[n,c]²) + eps)</c>, <c>y[n,c] = w[c] · (x[n,c] · rstd[n])</c>.
/// The sum of squares is accumulated in double for float and double and <c>rstd</c> is rounded to <c>T</c> once;
/// the two products are then done in <c>T</c>, as HF does in fp32 (for float, HF accumulates the mean in fp32, so
/// the two differ by a few ulps at most).
/// </summary>
public static class RmsNormRef
{
    /// <summary>
    /// Forward. <paramref name="x"/> and <paramref name="y"/> are <c>[rows, cols]</c> row-major (y may alias x exactly),
    /// <paramref name="weight"/> is <c>[cols]</c>; <paramref name="rstd"/> <c>[rows]</c> receives the reciprocal RMS per
    /// row for <see cref="Backward{T}"/>. No allocation.
    /// </summary>
    public static void Forward<T>(ReadOnlySpan<T> x, ReadOnlySpan<T> weight, Span<T> y, Span<T> rstd,
        int rows, int cols, double eps) where T : unmanaged, IFloatingPointIeee754<T>
    {
        NonNegative(rows, nameof(rows));
        Positive(cols, nameof(cols));
        Length(x.Length, (long)rows * cols, nameof(x));
        Length(weight.Length, cols, nameof(weight));
        Length(y.Length, (long)rows * cols, nameof(y));
        Length(rstd.Length, rows, nameof(rstd));
        for (int n = 0; n < rows; n++)
        {
            var xr = x.Slice(n * cols, cols);
            var yr = y.Slice(n * cols, cols);
            double sumSquares = 0;
            for (int c = 0; c < cols; c++) sumSquares += D(xr[c]) * D(xr[c]);
            T r = R<T>(1.0 / Math.Sqrt(sumSquares / cols + eps));
            rstd[n] = r;
            for (int c = 0; c < cols; c++) yr[c] = weight[c] * (xr[c] * r);
        }
    }

    /// <summary>
    /// Backward. Given <paramref name="dy"/> <c>[rows, cols]</c>, the forward's <paramref name="x"/> and
    /// <paramref name="rstd"/>, overwrites <paramref name="dx"/> <c>[rows, cols]</c> with
    /// <c>dx[c] = rstd·w[c]·dy[c] − rstd³/cols · x[c] · Σ_j w[j]·dy[j]·x[j]</c> (dx may alias dy exactly) and, when
    /// <paramref name="dweight"/> is not empty, ACCUMULATES <c>dweight[c] += Σ_n dy[n,c]·x[n,c]·rstd[n]</c>
    /// (summed over rows in order in double, added once). Allocates one double[cols] when dweight is given. With
    /// <paramref name="accumulate"/>, dx += the gradient instead (the sum in double, rounded once; dx apart from dy).
    /// </summary>
    public static void Backward<T>(ReadOnlySpan<T> dy, ReadOnlySpan<T> x, ReadOnlySpan<T> weight, ReadOnlySpan<T> rstd,
        Span<T> dx, Span<T> dweight, int rows, int cols, bool accumulate = false) where T : unmanaged, IFloatingPointIeee754<T>
    {
        NonNegative(rows, nameof(rows));
        Positive(cols, nameof(cols));
        Length(dy.Length, (long)rows * cols, nameof(dy));
        Length(x.Length, (long)rows * cols, nameof(x));
        Length(weight.Length, cols, nameof(weight));
        Length(rstd.Length, rows, nameof(rstd));
        Length(dx.Length, (long)rows * cols, nameof(dx));
        OptionalLength(dweight.Length, cols, nameof(dweight));

        double[]? dwSum = dweight.IsEmpty ? null : new double[cols];
        for (int n = 0; n < rows; n++)
        {
            var dyr = dy.Slice(n * cols, cols);
            var xr = x.Slice(n * cols, cols);
            var dxr = dx.Slice(n * cols, cols);
            double r = D(rstd[n]);
            double dot = 0; // Σ_j w[j]·dy[j]·x[j]
            for (int c = 0; c < cols; c++) dot += D(weight[c]) * D(dyr[c]) * D(xr[c]);
            if (dwSum != null) AccumulateWeightGrad(dwSum, dyr, xr, r);
            double k = r * r * r * dot / cols;
            if (accumulate)
                for (int c = 0; c < cols; c++) dxr[c] = R<T>(D(dxr[c]) + (r * D(weight[c]) * D(dyr[c]) - k * D(xr[c])));
            else
                for (int c = 0; c < cols; c++) dxr[c] = R<T>(r * D(weight[c]) * D(dyr[c]) - k * D(xr[c]));
        }
        if (dwSum != null)
            for (int c = 0; c < cols; c++) dweight[c] = R<T>(D(dweight[c]) + dwSum[c]);
    }

    /// <summary>
    /// dwSum[c] += dy[c]·x[c]·r for every column, in double: columns are independent lanes, so four at a time gives the
    /// scalar loop's values exactly.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static unsafe void AccumulateWeightGrad<T>(double[] dwSum, ReadOnlySpan<T> dy, ReadOnlySpan<T> x, double r)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        int c = 0, cols = dwSum.Length;
        fixed (double* pdw = dwSum)
        fixed (T* pdy = dy, px = x)
        {
            if (Vector256.IsHardwareAccelerated)
            {
                var rv = Vector256.Create(r);
                for (; c <= cols - Lanes; c += Lanes)
                    (Vector256.Load(pdw + c) + Load(pdy + c) * Load(px + c) * rv).Store(pdw + c);
            }
            for (; c < cols; c++) pdw[c] += D(pdy[c]) * D(px[c]) * r;
        }
    }
}
