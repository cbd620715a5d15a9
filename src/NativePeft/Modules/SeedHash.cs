namespace NativePeft.Modules;

/// <summary>Derives independent seeds (per layer, per step, per tensor name) from one model seed.</summary>
internal static class SeedHash
{
    /// <summary>SplitMix64's finalizer: a bijective 64-bit mix.</summary>
    public static ulong SplitMix64(ulong x)
    {
        x += 0x9E3779B97F4A7C15UL;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }
}
