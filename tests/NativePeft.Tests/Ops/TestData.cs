using NativePeft.Numerics;
using NUnit.Framework;

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

    /// <summary>Double copies of float data.</summary>
    public static double[] ToDouble(float[] a) => a.Select(v => (double)v).ToArray();

    /// <summary>
    /// A bf16 value's position on the bf16 number line (sign-magnitude of its bits as a signed integer): two bf16
    /// values are |Bf16Key(a) − Bf16Key(b)| ulps apart (across zero, ±0 count as one point).
    /// </summary>
    public static int Bf16Key(float v)
    {
        ushort b = BFloat16.FromSingle(v).RawValue;  // v is a bf16 value here, so this is exact
        int m = b & 0x7FFF;
        return (b & 0x8000) != 0 ? -m : m;
    }

    /// <summary>Asserts that every float has the same bits as the expected one; reports the first difference.</summary>
    public static void AssertBitsEqual(float[] got, float[] expected, string what)
    {
        Assert.That(got, Has.Length.EqualTo(expected.Length), what);
        for (int i = 0; i < got.Length; i++)
        {
            if (BitConverter.SingleToUInt32Bits(got[i]) != BitConverter.SingleToUInt32Bits(expected[i]))
                Assert.Fail($"{what}[{i}]: {got[i]:R} (0x{BitConverter.SingleToUInt32Bits(got[i]):x8}) != " +
                            $"{expected[i]:R} (0x{BitConverter.SingleToUInt32Bits(expected[i]):x8})");
        }
    }

    /// <summary>Asserts that every bf16 value has the same bits as the expected one; reports the first difference.</summary>
    public static void AssertBitsEqual(BFloat16[] got, BFloat16[] expected, string what)
    {
        Assert.That(got, Has.Length.EqualTo(expected.Length), what);
        for (int i = 0; i < got.Length; i++)
        {
            if (got[i].RawValue != expected[i].RawValue)
                Assert.Fail($"{what}[{i}]: 0x{got[i].RawValue:x4} != 0x{expected[i].RawValue:x4}");
        }
    }
}
