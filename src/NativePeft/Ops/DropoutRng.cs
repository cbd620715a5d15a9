namespace NativePeft.Ops;

/// <summary>
/// The dropout masks' generator: element i of a mask drawn with seed s is kept when
/// u(s, i) = (SplitMix64(s ⊕ SplitMix64(i)) >> 40) · 2⁻²⁴ ≥ p. Counter-based, so any device computes the same mask
/// for the same (seed, index) without state; the CUDA kernel computes the same function.
/// </summary>
public static class DropoutRng
{
    public static ulong SplitMix64(ulong x)
    {
        x += 0x9E3779B97F4A7C15UL;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }

    /// <summary>The uniform in [0, 1) with 24 bits for element <paramref name="index"/>.</summary>
    public static float Uniform(ulong seed, ulong index) => (SplitMix64(seed ^ SplitMix64(index)) >> 40) * (1f / (1 << 24));

    public static void Mask(ulong seed, double p, Span<byte> mask)
    {
        float threshold = (float)p;
        for (int i = 0; i < mask.Length; i++)
            mask[i] = Uniform(seed, (ulong)i) >= threshold ? (byte)1 : (byte)0;
    }
}
