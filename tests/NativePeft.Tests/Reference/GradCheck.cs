using System.Buffers.Binary;
using NUnit.Framework;
using System.Text;

namespace NativePeft.Tests.Reference;

/// <summary>
/// Gradient checks for the reference ops, in double: central finite differences of a scalar loss against the
/// analytic gradient. The usual pattern: pick a random upstream gradient g, define <c>loss(θ) = ⟨forward(θ), g⟩</c>,
/// so the op's backward called with dy = g must return ∂loss/∂θ for every input and weight θ.
/// <para>
/// Step: <c>h = step · max(1, |θ_k|)</c> (default step 1e-5). For smooth ops the central difference is off by
/// O(h²·f''') ≈ 1e-10 plus rounding O(ε·|loss|/h) ≈ 1e-10 for |loss| ~ 10, so the default tolerance
/// <c>|analytic − numeric| ≤ 1e-6·|numeric| + 1e-8</c> has two orders of margin and still catches any real mistake
/// (a wrong term is off by O(1)).
/// </para>
/// </summary>
internal static class GradCheck
{
    public const double DefaultStep = 1e-5, DefaultRtol = 1e-6, DefaultAtol = 1e-8;

    /// <summary>fp32 unit roundoff 2^-24 (half an ulp of 1).</summary>
    public const double U = 5.9604644775390625E-08;

    /// <summary>Normal(0, scale²) values from a seeded generator (Box–Muller), reproducible.</summary>
    public static double[] RandomNormal(int count, int seed, double scale = 1.0)
    {
        var rng = new Random(seed);
        var values = new double[count];
        for (int k = 0; k < count; k++)
        {
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            values[k] = scale * Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2);
        }
        return values;
    }

    /// <summary>Float copies (each value rounded) of double data, for float-vs-double comparisons.</summary>
    public static float[] ToFloat(ReadOnlySpan<double> values)
    {
        var result = new float[values.Length];
        for (int k = 0; k < values.Length; k++) result[k] = (float)values[k];
        return result;
    }

    /// <summary>Double copies of float data.</summary>
    public static double[] ToDouble(ReadOnlySpan<float> values)
    {
        var result = new double[values.Length];
        for (int k = 0; k < values.Length; k++) result[k] = values[k];
        return result;
    }

    public static double Dot(ReadOnlySpan<double> a, ReadOnlySpan<double> b)
    {
        Assert.That(a.Length, Is.EqualTo(b.Length), "Dot: lengths differ");
        double sum = 0;
        for (int k = 0; k < a.Length; k++) sum += a[k] * b[k];
        return sum;
    }

    /// <summary>
    /// ∂loss/∂param[k] for every k by central differences; <paramref name="param"/> is perturbed in place (the
    /// loss must read it) and restored exactly.
    /// </summary>
    public static double[] Numeric(double[] param, Func<double> loss, double step = DefaultStep)
    {
        var gradient = new double[param.Length];
        for (int k = 0; k < param.Length; k++)
        {
            double saved = param[k], h = step * Math.Max(1.0, Math.Abs(saved));
            param[k] = saved + h;
            double plus = loss();
            param[k] = saved - h;
            double minus = loss();
            param[k] = saved;
            gradient[k] = (plus - minus) / (2 * h);
        }
        return gradient;
    }

    /// <summary>
    /// Checks <paramref name="analytic"/> (the backward's gradient of <paramref name="param"/>) against central
    /// differences of <paramref name="loss"/>.
    /// </summary>
    public static void Check(string what, double[] param, ReadOnlySpan<double> analytic, Func<double> loss,
        double rtol = DefaultRtol, double atol = DefaultAtol, double step = DefaultStep)
    {
        Assert.That(analytic.Length, Is.EqualTo(param.Length), $"{what}: gradient length");
        double[] numeric = Numeric(param, loss, step);
        AssertClose(analytic, numeric, rtol, atol, what + " (analytic vs finite differences)");
        // Guard against a vacuous check (an all-zero gradient matches an all-zero numeric one).
        Assert.That(numeric.Max(Math.Abs), Is.GreaterThan(100 * atol), $"{what}: numeric gradient is ~0, the check proves nothing");
    }

    /// <summary>Asserts <c>|actual[k] − expected[k]| ≤ rtol·|expected[k]| + atol</c> for all k, reporting the worst k.</summary>
    public static void AssertClose(ReadOnlySpan<double> actual, ReadOnlySpan<double> expected, double rtol, double atol, string what)
    {
        Assert.That(actual.Length, Is.EqualTo(expected.Length), $"{what}: length");
        int worst = -1;
        double worstExcess = 0;
        for (int k = 0; k < actual.Length; k++)
        {
            double error = Math.Abs(actual[k] - expected[k]), allowed = rtol * Math.Abs(expected[k]) + atol;
            if (!(error <= allowed) && (worst < 0 || error - allowed > worstExcess || double.IsNaN(error)))
            {
                worst = k;
                worstExcess = error - allowed;
            }
        }
        if (worst >= 0)
            Assert.Fail($"{what}: element {worst}: {actual[worst]:R} vs expected {expected[worst]:R} " +
                        $"(|diff| {Math.Abs(actual[worst] - expected[worst]):E3} > {rtol:E1}·|expected| + {atol:E1})");
    }

    public static void AssertClose(ReadOnlySpan<float> actual, ReadOnlySpan<double> expected, double rtol, double atol, string what)
        => AssertClose(ToDouble(actual), expected, rtol, atol, what);

    /// <summary>
    /// Float vs double agreement within fp32 rounding: each float result may differ from the double one by a few
    /// units of fp32 roundoff relative to <paramref name="scale"/> (the magnitude of the terms that were summed).
    /// </summary>
    public static void AssertFloatMatchesDouble(ReadOnlySpan<float> actual, ReadOnlySpan<double> expected, double ulps,
        double scale, string what)
        => AssertClose(ToDouble(actual), expected, ulps * GradCheck.U, ulps * GradCheck.U * scale, what + " (float vs double)");
}

/// <summary>
/// Reads the torch oracle files written by tests/reference/gen_ops_*.py (format in gen_ops_reference.py):
/// "NPOR", u32 count, records of u16 name length, name, u8 dtype (0 f32, 1 f64, 2 i32, 3 u8), u8 ndim, u32 dims, data.
/// </summary>
internal sealed class OpsOracle
{
    private readonly Dictionary<string, (int DType, int[] Shape, byte[] Data)> _tensors = new();

    private OpsOracle() { }

    public static OpsOracle Load(string fileName)
    {
        string path = Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", fileName);
        var bytes = File.ReadAllBytes(path);
        Assert.That(Encoding.ASCII.GetString(bytes, 0, 4), Is.EqualTo("NPOR"), $"{fileName}: magic");
        var oracle = new OpsOracle();
        int count = BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan(4)), at = 8;
        for (int t = 0; t < count; t++)
        {
            int nameLength = BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(at));
            string name = Encoding.UTF8.GetString(bytes, at + 2, nameLength);
            at += 2 + nameLength;
            int dtype = bytes[at], ndim = bytes[at + 1];
            at += 2;
            var shape = new int[ndim];
            long elements = 1;
            for (int d = 0; d < ndim; d++, at += 4)
                elements *= shape[d] = BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan(at));
            int size = (int)elements * dtype switch { 0 => 4, 1 => 8, 2 => 4, 3 => 1, _ => throw new InvalidDataException($"dtype {dtype}") };
            oracle._tensors[name] = (dtype, shape, bytes.AsSpan(at, size).ToArray());
            at += size;
        }
        Assert.That(at, Is.EqualTo(bytes.Length), $"{fileName}: trailing bytes");
        return oracle;
    }

    public int[] Shape(string name) => Get(name, -1).Shape;

    public float[] F32(string name) => Cast<float>(name, 0);
    public double[] F64(string name) => Cast<double>(name, 1);
    public int[] I32(string name) => Cast<int>(name, 2);
    public byte[] U8(string name) => Get(name, 3).Data;

    private T[] Cast<T>(string name, int dtype) where T : unmanaged
        => System.Runtime.InteropServices.MemoryMarshal.Cast<byte, T>(Get(name, dtype).Data).ToArray();

    private (int DType, int[] Shape, byte[] Data) Get(string name, int dtype)
    {
        Assert.That(_tensors.TryGetValue(name, out var tensor), Is.True, $"oracle has no tensor '{name}'");
        if (dtype >= 0) Assert.That(tensor.DType, Is.EqualTo(dtype), $"oracle tensor '{name}' dtype");
        return tensor;
    }
}
