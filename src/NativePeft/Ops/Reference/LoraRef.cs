using System.Numerics;
using static NativePeft.Ops.Reference.RefChecks;

namespace NativePeft.Ops.Reference;

/// <summary>
/// LoRA (PEFT <c>lora.Linear</c>): <c>y = base(x) + scaling · ((dropout(x) · Aᵀ) · Bᵀ)</c> with
/// <c>A[rank, in]</c>, <c>B[out, rank]</c>, <c>x[N, in]</c>, <c>y[N, out]</c>, all row-major.
/// <para>
/// Dropout is given as a byte mask <c>[N, in]</c> (nonzero keep, 0 drop); kept values are scaled by <c>1/(1−p)</c>.
/// An empty mask means no dropout (p = 0, or eval mode). The forward saves <c>xa = dropout(x)·Aᵀ [N, rank]</c>
/// (what PEFT's autograd keeps) for the backward. Sums are in double, rounded once.
/// </para>
/// Initialization (PEFT's default <c>init_lora_weights=True</c>): A Kaiming-uniform with a = √5, i.e.
/// <c>U(−1/√in, 1/√in)</c>, B zeros, so the adapter starts as the identity.
/// </summary>
public static class LoraRef
{
    /// <summary>PEFT's scaling: <c>alpha / rank</c>, or <c>alpha / √rank</c> with rsLoRA (<c>use_rslora</c>).</summary>
    public static double Scaling(double alpha, int rank, bool useRsLora = false)
    {
        Positive(rank, nameof(rank));
        return useRsLora ? alpha / Math.Sqrt(rank) : alpha / rank;
    }

    /// <summary>
    /// Kaiming-uniform (a = √5) init of <paramref name="loraA"/> <c>[rank, inFeatures]</c>: gain = √(2/(1+a²)) = √(1/3),
    /// bound = gain·√(3/fan_in) = 1/√inFeatures; element k (row-major) = <c>(2u_k − 1)·bound</c> with u_k the k-th
    /// <see cref="Random.NextDouble"/> of <paramref name="rng"/>, rounded to T. Same distribution as torch's
    /// <c>kaiming_uniform_</c>, not the same numbers (different generator); a seeded <c>new Random(seed)</c> gives
    /// the same values on every run and platform.
    /// </summary>
    public static void InitA<T>(Span<T> loraA, int rank, int inFeatures, Random rng) where T : unmanaged, IFloatingPointIeee754<T>
    {
        Positive(rank, nameof(rank));
        Positive(inFeatures, nameof(inFeatures));
        Length(loraA.Length, (long)rank * inFeatures, nameof(loraA));
        ArgumentNullException.ThrowIfNull(rng);
        double bound = KaimingUniformBound(inFeatures);
        for (int k = 0; k < rank * inFeatures; k++)
            loraA[k] = R<T>((2 * rng.NextDouble() - 1) * bound);
    }

    /// <summary>torch <c>kaiming_uniform_(w, a=√5)</c>'s bound for <c>fan_in</c>: √(2/(1+5))·√(3/fan_in) = 1/√fan_in.</summary>
    public static double KaimingUniformBound(int fanIn)
    {
        Positive(fanIn, nameof(fanIn));
        double a = Math.Sqrt(5), gain = Math.Sqrt(2 / (1 + a * a));
        return gain * Math.Sqrt(3.0 / fanIn);
    }

    /// <summary>B starts at zero, so <c>B·A = 0</c> and the adapted layer equals the base layer.</summary>
    public static void InitB<T>(Span<T> loraB) where T : unmanaged, IFloatingPointIeee754<T> => loraB.Clear();

    /// <summary>
    /// Fills a dropout mask: element k is 0 (drop) when the k-th <see cref="Random.NextDouble"/> is &lt; p, else 1 (keep).
    /// </summary>
    public static void DropoutMask(Span<byte> mask, double p, Random rng)
    {
        CheckP(p);
        ArgumentNullException.ThrowIfNull(rng);
        for (int k = 0; k < mask.Length; k++) mask[k] = rng.NextDouble() < p ? (byte)0 : (byte)1;
    }

    /// <summary>
    /// Forward of the adapter. Overwrites <paramref name="xa"/> <c>[rows, rank]</c> with <c>dropout(x)·Aᵀ</c> and
    /// ACCUMULATES <c>y[rows, outFeatures] += scaling · xa·Bᵀ</c> on top of the base layer's output (call the base
    /// first, e.g. <see cref="LinearRef.Forward{T}"/>). <paramref name="dropoutMask"/> is <c>[rows, inFeatures]</c> or
    /// empty (no dropout; <paramref name="dropoutP"/> is then ignored). No allocation.
    /// </summary>
    public static void Forward<T>(ReadOnlySpan<T> x, ReadOnlySpan<T> loraA, ReadOnlySpan<T> loraB,
        ReadOnlySpan<byte> dropoutMask, double dropoutP, double scaling, Span<T> xa, Span<T> y,
        int rows, int inFeatures, int outFeatures, int rank) where T : unmanaged, IFloatingPointIeee754<T>
    {
        CheckShapes(rows, inFeatures, outFeatures, rank, loraA.Length, loraB.Length);
        Length(x.Length, (long)rows * inFeatures, nameof(x));
        Length(xa.Length, (long)rows * rank, nameof(xa));
        Length(y.Length, (long)rows * outFeatures, nameof(y));
        double keepScale = KeepScale(dropoutMask, dropoutP, (long)rows * inFeatures);

        for (int n = 0; n < rows; n++)
        {
            var xr = x.Slice(n * inFeatures, inFeatures);
            var xar = xa.Slice(n * rank, rank);
            for (int r = 0; r < rank; r++)
            {
                var ar = loraA.Slice(r * inFeatures, inFeatures);
                double sum = 0;
                for (int i = 0; i < inFeatures; i++)
                {
                    double keep = Keep(dropoutMask, n * inFeatures + i, keepScale);
                    sum += keep * D(xr[i]) * D(ar[i]);
                }
                xar[r] = R<T>(sum);
            }
            var yr = y.Slice(n * outFeatures, outFeatures);
            for (int o = 0; o < outFeatures; o++)
            {
                double sum = 0;
                for (int r = 0; r < rank; r++) sum += D(xar[r]) * D(loraB[o * rank + r]);
                yr[o] = R<T>(D(yr[o]) + scaling * sum);
            }
        }
    }

    /// <summary>
    /// Backward of the adapter, from <paramref name="dy"/> <c>[rows, outFeatures]</c>, the forward's inputs and its
    /// saved <paramref name="xa"/>. With <c>g = scaling · dy·B [rows, rank]</c> (held in a double[rows·rank], the one
    /// allocation): <paramref name="dA"/> <c>[rank, in]</c> ACCUMULATES <c>+= gᵀ·dropout(x)</c>;
    /// <paramref name="dB"/> <c>[out, rank]</c> ACCUMULATES <c>+= scaling · dyᵀ·xa</c>; <paramref name="dx"/>
    /// <c>[rows, in]</c> ACCUMULATES <c>+= dropout'(g·A)</c> (mask·1/(1−p)) onto the base layer's dx.
    /// An empty dA, dB or dx is skipped.
    /// </summary>
    public static void Backward<T>(ReadOnlySpan<T> dy, ReadOnlySpan<T> x, ReadOnlySpan<T> loraA, ReadOnlySpan<T> loraB,
        ReadOnlySpan<byte> dropoutMask, double dropoutP, double scaling, ReadOnlySpan<T> xa,
        Span<T> dx, Span<T> dA, Span<T> dB, int rows, int inFeatures, int outFeatures, int rank)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        CheckShapes(rows, inFeatures, outFeatures, rank, loraA.Length, loraB.Length);
        Length(dy.Length, (long)rows * outFeatures, nameof(dy));
        Length(x.Length, (long)rows * inFeatures, nameof(x));
        Length(xa.Length, (long)rows * rank, nameof(xa));
        OptionalLength(dx.Length, (long)rows * inFeatures, nameof(dx));
        OptionalLength(dA.Length, (long)rank * inFeatures, nameof(dA));
        OptionalLength(dB.Length, (long)outFeatures * rank, nameof(dB));
        double keepScale = KeepScale(dropoutMask, dropoutP, (long)rows * inFeatures);

        // g[n, r] = scaling · Σ_o dy[n, o] · B[o, r]
        var g = new double[(long)rows * rank];
        for (int n = 0; n < rows; n++)
            for (int r = 0; r < rank; r++)
            {
                double sum = 0;
                for (int o = 0; o < outFeatures; o++) sum += D(dy[n * outFeatures + o]) * D(loraB[o * rank + r]);
                g[n * rank + r] = scaling * sum;
            }

        // dB[o, r] += scaling · Σ_n dy[n, o] · xa[n, r]
        if (!dB.IsEmpty)
            for (int o = 0; o < outFeatures; o++)
                for (int r = 0; r < rank; r++)
                {
                    double sum = 0;
                    for (int n = 0; n < rows; n++) sum += D(dy[n * outFeatures + o]) * D(xa[n * rank + r]);
                    dB[o * rank + r] = R<T>(D(dB[o * rank + r]) + scaling * sum);
                }

        // dA[r, i] += Σ_n g[n, r] · dropout(x)[n, i]
        if (!dA.IsEmpty)
            for (int r = 0; r < rank; r++)
                for (int i = 0; i < inFeatures; i++)
                {
                    double sum = 0;
                    for (int n = 0; n < rows; n++) sum += g[n * rank + r] * Keep(dropoutMask, n * inFeatures + i, keepScale) * D(x[n * inFeatures + i]);
                    dA[r * inFeatures + i] = R<T>(D(dA[r * inFeatures + i]) + sum);
                }

        // dx[n, i] += keep(n, i) · Σ_r g[n, r] · A[r, i]
        if (!dx.IsEmpty)
            for (int n = 0; n < rows; n++)
                for (int i = 0; i < inFeatures; i++)
                {
                    double sum = 0;
                    for (int r = 0; r < rank; r++) sum += g[n * rank + r] * D(loraA[r * inFeatures + i]);
                    dx[n * inFeatures + i] = R<T>(D(dx[n * inFeatures + i]) + Keep(dropoutMask, n * inFeatures + i, keepScale) * sum);
                }
    }

    /// <summary>
    /// Merges the adapter into the base weight: <c>W[out, in] += scaling · B·A</c> (each element's sum in double,
    /// added once). <see cref="Unmerge{T}"/> subtracts it again; for float, merge then unmerge restores W to within
    /// one rounding of each step (not always bit for bit).
    /// </summary>
    public static void Merge<T>(Span<T> weight, ReadOnlySpan<T> loraA, ReadOnlySpan<T> loraB, double scaling,
        int inFeatures, int outFeatures, int rank) where T : unmanaged, IFloatingPointIeee754<T>
        => AddDelta(weight, loraA, loraB, scaling, inFeatures, outFeatures, rank);

    /// <summary>Unmerges: <c>W[out, in] −= scaling · B·A</c>. See <see cref="Merge{T}"/>.</summary>
    public static void Unmerge<T>(Span<T> weight, ReadOnlySpan<T> loraA, ReadOnlySpan<T> loraB, double scaling,
        int inFeatures, int outFeatures, int rank) where T : unmanaged, IFloatingPointIeee754<T>
        => AddDelta(weight, loraA, loraB, -scaling, inFeatures, outFeatures, rank);

    private static void AddDelta<T>(Span<T> weight, ReadOnlySpan<T> loraA, ReadOnlySpan<T> loraB, double scaling,
        int inFeatures, int outFeatures, int rank) where T : unmanaged, IFloatingPointIeee754<T>
    {
        CheckShapes(0, inFeatures, outFeatures, rank, loraA.Length, loraB.Length);
        Length(weight.Length, (long)outFeatures * inFeatures, nameof(weight));
        for (int o = 0; o < outFeatures; o++)
            for (int i = 0; i < inFeatures; i++)
            {
                double sum = 0;
                for (int r = 0; r < rank; r++) sum += D(loraB[o * rank + r]) * D(loraA[r * inFeatures + i]);
                weight[o * inFeatures + i] = R<T>(D(weight[o * inFeatures + i]) + scaling * sum);
            }
    }

    /// <summary>The dropout factor of element k: 1 without a mask, else 1/(1−p) kept or 0 dropped.</summary>
    private static double Keep(ReadOnlySpan<byte> mask, int k, double keepScale)
        => mask.IsEmpty ? 1.0 : mask[k] != 0 ? keepScale : 0.0;

    private static void CheckShapes(int rows, int inFeatures, int outFeatures, int rank, int aLength, int bLength)
    {
        NonNegative(rows, nameof(rows));
        Positive(inFeatures, nameof(inFeatures));
        Positive(outFeatures, nameof(outFeatures));
        Positive(rank, nameof(rank));
        Length(aLength, (long)rank * inFeatures, "loraA");
        Length(bLength, (long)outFeatures * rank, "loraB");
    }

    private static void CheckP(double p)
    {
        if (!(p >= 0 && p < 1)) throw new ArgumentOutOfRangeException(nameof(p), p, "dropout p must be in [0, 1)");
    }

    /// <summary>1/(1−p) for kept elements when a mask is given (validated), 1 otherwise.</summary>
    private static double KeepScale(ReadOnlySpan<byte> mask, double p, long elements)
    {
        if (mask.IsEmpty) return 1.0;
        CheckP(p);
        Length(mask.Length, elements, "dropoutMask");
        return 1.0 / (1.0 - p);
    }
}
