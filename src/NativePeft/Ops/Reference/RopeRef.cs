using System.Numerics;
using static NativePeft.Ops.Reference.RefChecks;

namespace NativePeft.Ops.Reference;

/// <summary>
/// Llama 3 <c>rope_scaling</c> (<c>rope_type: "llama3"</c>): see docs/ops-contract.md "RoPE".
/// </summary>
/// <param name="Factor">factor (8 for Llama 3.1)</param>
/// <param name="LowFreqFactor">low_freq_factor (1)</param>
/// <param name="HighFreqFactor">high_freq_factor (4)</param>
/// <param name="OriginalMaxPositionEmbeddings">original_max_position_embeddings (8192)</param>
public sealed record RopeScaling(double Factor, double LowFreqFactor, double HighFreqFactor, int OriginalMaxPositionEmbeddings)
{
    /// <summary>Llama 3.1 8B/70B's values.</summary>
    public static RopeScaling Llama31 { get; } = new(8, 1, 4, 8192);
}

/// <summary>
/// Rotary position embedding, HF <c>rotate_half</c> convention (the two halves of a head, NOT interleaved pairs):
/// with <c>h = D/2</c> and <c>angle = pos · inv_freq[i]</c>, for <c>i &lt; h</c>:
/// <c>out[i] = x[i]·cos − x[i+h]·sin</c>, <c>out[i+h] = x[i+h]·cos + x[i]·sin</c>.
/// The backward is the same rotation by <c>−angle</c>.
/// <para>
/// Precision: the angle, cos and sin are computed in double from the <c>T</c>-valued inv_freq (as HF stores
/// inv_freq in fp32) and rounded to <c>T</c> (exactly what <see cref="Tables{T}(ReadOnlySpan{int}, ReadOnlySpan{T}, Span{T}, Span{T})"/>
/// stores); the rotation is then done in double from those <c>T</c> values and rounded once. So the invFreq and
/// table forms agree bit for bit. HF computes the angle in fp32, which loses ~|angle|·6e-8 rad at large positions.
/// </para>
/// Layout: <c>x[tokens, heads, D]</c> row-major, i.e. <c>[B, T, H, D]</c> with <c>tokens = B·T</c>;
/// <c>positions[tokens]</c>. Queries and keys (different head counts) are separate calls.
/// </summary>
public static class RopeRef
{
    /// <summary>
    /// <c>inv_freq[i] = 1 / theta^(2i/D)</c> for <c>i &lt; D/2</c>, in double, then the Llama 3 rule when
    /// <paramref name="llama3"/> is given: with <c>wavelen = 2π/inv_freq</c>, <c>old = original_max_position_embeddings</c>:
    /// <c>wavelen &gt; old/low</c> → <c>inv_freq/factor</c>; <c>wavelen &lt; old/high</c> → unchanged; otherwise
    /// <c>(1−s)·inv_freq/factor + s·inv_freq</c> with <c>s = (old/wavelen − low)/(high − low)</c>.
    /// </summary>
    public static double[] InverseFrequencies(int headDim, double theta, RopeScaling? llama3 = null)
    {
        Positive(headDim, nameof(headDim));
        if (headDim % 2 != 0) throw new ArgumentException($"headDim {headDim} must be even", nameof(headDim));
        if (!(theta > 0)) throw new ArgumentOutOfRangeException(nameof(theta), theta, "theta must be positive");
        var invFreq = new double[headDim / 2];
        for (int i = 0; i < invFreq.Length; i++)
            invFreq[i] = 1.0 / Math.Pow(theta, 2.0 * i / headDim);
        if (llama3 is null) return invFreq;

        double factor = llama3.Factor, low = llama3.LowFreqFactor, high = llama3.HighFreqFactor;
        double old = llama3.OriginalMaxPositionEmbeddings;
        if (!(factor > 0) || !(high > low) || !(old > 0))
            throw new ArgumentException($"invalid llama3 rope_scaling {llama3}", nameof(llama3));
        double lowFreqWavelen = old / low, highFreqWavelen = old / high;
        for (int i = 0; i < invFreq.Length; i++)
        {
            double f = invFreq[i], wavelen = 2 * Math.PI / f;
            if (wavelen > lowFreqWavelen)
                invFreq[i] = f / factor;
            else if (wavelen >= highFreqWavelen) // HF: medium band = neither high (< old/high) nor low (> old/low)
            {
                double smooth = (old / wavelen - low) / (high - low);
                invFreq[i] = (1 - smooth) * f / factor + smooth * f;
            }
        }
        return invFreq;
    }

    /// <summary><see cref="InverseFrequencies(int, double, RopeScaling?)"/> rounded to <typeparamref name="T"/>.</summary>
    public static T[] InverseFrequencies<T>(int headDim, double theta, RopeScaling? llama3 = null)
        where T : unmanaged, IFloatingPointIeee754<T>
        => Array.ConvertAll(InverseFrequencies(headDim, theta, llama3), R<T>);

    /// <summary>
    /// cos/sin tables for the given positions: <c>cos[p, i] = cos(positions[p] · invFreq[i])</c>, likewise sin,
    /// both <c>[positions.Length, D/2]</c> with <c>D/2 = invFreq.Length</c>.
    /// </summary>
    public static void Tables<T>(ReadOnlySpan<int> positions, ReadOnlySpan<T> invFreq, Span<T> cos, Span<T> sin)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        int half = invFreq.Length;
        Positive(half, nameof(invFreq));
        Length(cos.Length, (long)positions.Length * half, nameof(cos));
        Length(sin.Length, (long)positions.Length * half, nameof(sin));
        for (int p = 0; p < positions.Length; p++)
            for (int i = 0; i < half; i++)
                (cos[p * half + i], sin[p * half + i]) = CosSin(positions[p], invFreq[i]);
    }

    /// <summary>Tables for positions <c>0 .. maxPositions−1</c> (row p is position p): <c>cos, sin [maxPositions, D/2]</c>.</summary>
    public static void Tables<T>(int maxPositions, ReadOnlySpan<T> invFreq, Span<T> cos, Span<T> sin)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        NonNegative(maxPositions, nameof(maxPositions));
        int half = invFreq.Length;
        Positive(half, nameof(invFreq));
        Length(cos.Length, (long)maxPositions * half, nameof(cos));
        Length(sin.Length, (long)maxPositions * half, nameof(sin));
        for (int p = 0; p < maxPositions; p++)
            for (int i = 0; i < half; i++)
                (cos[p * half + i], sin[p * half + i]) = CosSin(p, invFreq[i]);
    }

    /// <summary>
    /// Forward: rotates <paramref name="x"/> <c>[tokens, heads, headDim]</c> into <paramref name="y"/> (same layout;
    /// y may alias x exactly) by <c>positions[token] · invFreq[i]</c>, <c>invFreq[headDim/2]</c>. No allocation.
    /// </summary>
    public static void Forward<T>(ReadOnlySpan<T> x, ReadOnlySpan<int> positions, ReadOnlySpan<T> invFreq, Span<T> y,
        int tokens, int heads, int headDim) where T : unmanaged, IFloatingPointIeee754<T>
        => Rotate(x, positions, invFreq, default, default, y, tokens, heads, headDim, inverse: false);

    /// <summary>Backward: <paramref name="dx"/> = <paramref name="dy"/> rotated by −angle (overwritten; may alias dy exactly).</summary>
    public static void Backward<T>(ReadOnlySpan<T> dy, ReadOnlySpan<int> positions, ReadOnlySpan<T> invFreq, Span<T> dx,
        int tokens, int heads, int headDim) where T : unmanaged, IFloatingPointIeee754<T>
        => Rotate(dy, positions, invFreq, default, default, dx, tokens, heads, headDim, inverse: true);

    /// <summary>
    /// Forward from tables (what the kernels take): <paramref name="cos"/>/<paramref name="sin"/> are
    /// <c>[P, headDim/2]</c> and token n uses row <c>positions[n]</c> (0 ≤ positions[n] &lt; P).
    /// </summary>
    public static void ForwardFromTables<T>(ReadOnlySpan<T> x, ReadOnlySpan<int> positions, ReadOnlySpan<T> cos,
        ReadOnlySpan<T> sin, Span<T> y, int tokens, int heads, int headDim) where T : unmanaged, IFloatingPointIeee754<T>
        => Rotate(x, positions, default, cos, sin, y, tokens, heads, headDim, inverse: false);

    /// <summary>Backward from tables: see <see cref="ForwardFromTables{T}"/> and <see cref="Backward{T}"/>.</summary>
    public static void BackwardFromTables<T>(ReadOnlySpan<T> dy, ReadOnlySpan<int> positions, ReadOnlySpan<T> cos,
        ReadOnlySpan<T> sin, Span<T> dx, int tokens, int heads, int headDim) where T : unmanaged, IFloatingPointIeee754<T>
        => Rotate(dy, positions, default, cos, sin, dx, tokens, heads, headDim, inverse: true);

    private static (T Cos, T Sin) CosSin<T>(int position, T invFreq) where T : unmanaged, IFloatingPointIeee754<T>
    {
        double angle = position * D(invFreq);
        return (R<T>(Math.Cos(angle)), R<T>(Math.Sin(angle)));
    }

    /// <summary>Either invFreq (tables empty) or cos/sin tables.</summary>
    private static void Rotate<T>(ReadOnlySpan<T> x, ReadOnlySpan<int> positions, ReadOnlySpan<T> invFreq,
        ReadOnlySpan<T> cosTable, ReadOnlySpan<T> sinTable, Span<T> y, int tokens, int heads, int headDim, bool inverse)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        NonNegative(tokens, nameof(tokens));
        Positive(heads, nameof(heads));
        Positive(headDim, nameof(headDim));
        if (headDim % 2 != 0) throw new ArgumentException($"headDim {headDim} must be even", nameof(headDim));
        int half = headDim / 2, rowLength = heads * headDim;
        Length(x.Length, (long)tokens * rowLength, nameof(x));
        Length(y.Length, (long)tokens * rowLength, nameof(y));
        Length(positions.Length, tokens, nameof(positions));
        bool fromTables = invFreq.IsEmpty;
        int tableRows = 0;
        if (fromTables)
        {
            tableRows = cosTable.Length / half;
            if (cosTable.Length != sinTable.Length || cosTable.Length % half != 0)
                throw new ArgumentException($"cos ({cosTable.Length}) and sin ({sinTable.Length}) must both be [P, {half}]");
        }
        else Length(invFreq.Length, half, nameof(invFreq));

        for (int n = 0; n < tokens; n++)
        {
            int pos = positions[n];
            if (fromTables && (uint)pos >= (uint)tableRows)
                throw new ArgumentOutOfRangeException(nameof(positions), pos,
                    $"position {pos} at token {n} is outside the {tableRows}-row cos/sin tables");
            var xr = x.Slice(n * rowLength, rowLength);
            var yr = y.Slice(n * rowLength, rowLength);
            for (int i = 0; i < half; i++)
            {
                var (cosT, sinT) = fromTables
                    ? (cosTable[pos * half + i], sinTable[pos * half + i])
                    : CosSin(pos, invFreq[i]);
                double c = D(cosT), s = inverse ? -D(sinT) : D(sinT);
                for (int h = 0; h < heads; h++)
                {
                    int lo = h * headDim + i, hi = lo + half;
                    double a = D(xr[lo]), b = D(xr[hi]);
                    yr[lo] = R<T>(a * c - b * s);
                    yr[hi] = R<T>(b * c + a * s);
                }
            }
        }
    }
}
