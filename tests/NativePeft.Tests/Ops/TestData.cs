using NativePeft.Numerics;

namespace NativePeft.Tests.Ops;

/// <summary>Host inputs of the kernel-launcher tests.</summary>
internal static class TestData
{
    /// <summary>n Normal(0, scale²) floats from a seeded generator (Box–Muller), reproducible.</summary>
    public static float[] Normal(int n, int seed, double scale = 1.0)
    {
        var rng = new Random(seed);
        var x = new float[n];
        for (int i = 0; i < n; i++)
        {
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            x[i] = (float)(scale * Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2.0 * Math.PI * u2));
        }
        return x;
    }

    /// <summary>The values exactly representable in dtype (bf16: rounded RNE), as floats.</summary>
    public static float[] Representable(float[] x, DType dtype)
    {
        if (dtype == DType.F32) return x;
        var r = new float[x.Length];
        for (int i = 0; i < x.Length; i++) r[i] = BFloat16.FromSingle(x[i]).ToSingle();
        return r;
    }
}
