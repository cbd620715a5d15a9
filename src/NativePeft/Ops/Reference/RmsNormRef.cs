using System.Runtime.CompilerServices;
using System.Numerics;
using System.Numerics.Tensors;
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
    public static unsafe void Forward<T>(ReadOnlySpan<T> x, ReadOnlySpan<T> weight, Span<T> y, Span<T> rstd,
        int rows, int cols, double eps) where T : unmanaged, IFloatingPointIeee754<T>
    {
        NonNegative(rows, nameof(rows));
        Positive(cols, nameof(cols));
        Length(x.Length, (long)rows * cols, nameof(x));
        Length(weight.Length, cols, nameof(weight));
        Length(y.Length, (long)rows * cols, nameof(y));
        Length(rstd.Length, rows, nameof(rstd));
        fixed (T* px = x, pw = weight, py = y, pr = rstd)
        {
            nint xa = (nint)px, wa = (nint)pw, ya = (nint)py, ra = (nint)pr;
            RefParallel.For(rows, 4L * cols, n => ForwardRow((T*)xa + (long)n * cols, (T*)wa, (T*)ya + (long)n * cols, (T*)ra + n, cols, eps));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static unsafe void ForwardRow<T>(T* xr, T* weight, T* yr, T* rstd, int cols, double eps) where T : unmanaged, IFloatingPointIeee754<T>
    {
        double sumSquares = 0;
        for (int c = 0; c < cols; c++) sumSquares += D(xr[c]) * D(xr[c]);
        T r = R<T>(1.0 / Math.Sqrt(sumSquares / cols + eps));
        *rstd = r;
        // y = w · (x · r) in T, elementwise (TensorPrimitives: the same IEEE products, vectorized).
        var ys = new Span<T>(yr, cols);
        TensorPrimitives.Multiply(new ReadOnlySpan<T>(xr, cols), r, ys);
        TensorPrimitives.Multiply(new ReadOnlySpan<T>(weight, cols), ys, ys);
    }

    /// <summary>
    /// Backward. Given <paramref name="dy"/> <c>[rows, cols]</c>, the forward's <paramref name="x"/> and
    /// <paramref name="rstd"/>, overwrites <paramref name="dx"/> <c>[rows, cols]</c> with
    /// <c>dx[c] = rstd·w[c]·dy[c] − rstd³/cols · x[c] · Σ_j w[j]·dy[j]·x[j]</c> (dx may alias dy exactly) and, when
    /// <paramref name="dweight"/> is not empty, ACCUMULATES <c>dweight[c] += Σ_n dy[n,c]·x[n,c]·rstd[n]</c>
    /// (summed over rows in order in double, added once). Allocates one double[cols] when dweight is given.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static unsafe void Backward<T>(ReadOnlySpan<T> dy, ReadOnlySpan<T> x, ReadOnlySpan<T> weight, ReadOnlySpan<T> rstd,
        Span<T> dx, Span<T> dweight, int rows, int cols) where T : unmanaged, IFloatingPointIeee754<T>
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
        fixed (T* pdy = dy, px = x, pw = weight, pr = rstd, pdx = dx)
        fixed (double* pdw = dwSum)
        {
            // dweight first (rows in order, before dx may overwrite dy), then dx row by row (rows are independent).
            // Columns are independent lanes: four at a time gives the scalar loop's values.
            if (dwSum != null)
                for (int n = 0; n < rows; n++)
                {
                    T* dyr = pdy + (long)n * cols, xr = px + (long)n * cols;
                    double r = D(pr[n]);
                    int c = 0;
                    if (Vector256.IsHardwareAccelerated)
                    {
                        var rv = Vector256.Create(r);
                        for (; c <= cols - Lanes; c += Lanes)
                            (Vector256.Load(pdw + c) + Load(dyr + c) * Load(xr + c) * rv).Store(pdw + c);
                    }
                    for (; c < cols; c++) pdw[c] += D(dyr[c]) * D(xr[c]) * r;
                }
            nint dya = (nint)pdy, xa = (nint)px, wa = (nint)pw, ra = (nint)pr, dxa = (nint)pdx;
            RefParallel.For(rows, 6L * cols, n => BackwardRow((T*)dya + (long)n * cols, (T*)xa + (long)n * cols, (T*)wa,
                D(((T*)ra)[n]), (T*)dxa + (long)n * cols, cols));
        }
        if (dwSum != null)
            for (int c = 0; c < cols; c++) dweight[c] = R<T>(D(dweight[c]) + dwSum[c]);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static unsafe void BackwardRow<T>(T* dyr, T* xr, T* weight, double r, T* dxr, int cols) where T : unmanaged, IFloatingPointIeee754<T>
    {
        double dot = 0; // Σ_j w[j]·dy[j]·x[j], in order
        for (int c = 0; c < cols; c++) dot += D(weight[c]) * D(dyr[c]) * D(xr[c]);
        double k = r * r * r * dot / cols;
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            Vector256<double> rv = Vector256.Create(r), kv = Vector256.Create(k);
            for (; i <= cols - Lanes; i += Lanes)
                Store(dxr + i, rv * Load(weight + i) * Load(dyr + i) - kv * Load(xr + i));
        }
        for (; i < cols; i++) dxr[i] = R<T>(r * D(weight[i]) * D(dyr[i]) - k * D(xr[i]));
    }
}
