using NUnit.Framework;

namespace NativePeft.Tests.Reference;

/// <summary>
/// What the attention and cross-entropy tests share beyond <see cref="GradCheck"/> (whose finite differences and
/// float/double copies they use): their comparison of analytic and numeric gradients (tolerance relative to the larger
/// of the two), uniform random inputs, the worst relative error, and the reader of the torch oracle files.
/// </summary>
internal static class AttnGradCheck
{
    /// <summary>
    /// Asserts |analytic − numeric| ≤ rtol · max(|analytic|, |numeric|) + atol element-wise, and reports the
    /// worst element. Defaults: rtol 1e-6, atol 1e-9 (central differences with h = 1e-5 in double are good to
    /// ~1e-10 here: truncation ~h², rounding ~1e-16/h).
    /// </summary>
    public static void AssertClose(ReadOnlySpan<double> analytic, ReadOnlySpan<double> numeric, string what,
        double rtol = 1e-6, double atol = 1e-9)
    {
        Assert.That(analytic.Length, Is.EqualTo(numeric.Length), what + ": length");
        int worst = -1;
        double worstExcess = double.NegativeInfinity;
        for (int i = 0; i < analytic.Length; i++)
        {
            double a = analytic[i], n = numeric[i];
            double excess = Math.Abs(a - n) - (rtol * Math.Max(Math.Abs(a), Math.Abs(n)) + atol);
            if (double.IsNaN(a) || double.IsNaN(n)) excess = double.PositiveInfinity;
            if (excess > worstExcess) { worstExcess = excess; worst = i; }
        }
        if (worst >= 0)
            Assert.That(worstExcess, Is.LessThanOrEqualTo(0),
                $"{what}[{worst}]: analytic {analytic[worst]:R} vs finite difference {numeric[worst]:R}");
    }

    /// <summary>Uniform values in [-scale, scale).</summary>
    public static double[] Random(Random rng, int n, double scale = 1)
    {
        var a = new double[n];
        for (int i = 0; i < n; i++) a[i] = (rng.NextDouble() * 2 - 1) * scale;
        return a;
    }

    /// <summary>Largest |a − b| / (|b| + floor) over the elements.</summary>
    public static double MaxRelative(ReadOnlySpan<float> a, ReadOnlySpan<double> b, double floor)
    {
        double worst = 0;
        for (int i = 0; i < a.Length; i++) worst = Math.Max(worst, Math.Abs(a[i] - b[i]) / (Math.Abs(b[i]) + floor));
        return worst;
    }
}

/// <summary>
/// The records written by tests/reference/gen_attn_ce.py: int32 name length, ASCII name, int32 dtype
/// (0 float32, 1 float64, 2 int32), int32 ndim, int32 dims, little-endian data; repeated to end of file.
/// </summary>
internal sealed class TorchRecords
{
    private readonly Dictionary<string, (int[] Dims, Array Data)> _records = new();

    public TorchRecords(string fileName)
    {
        string path = Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", fileName);
        using var reader = new BinaryReader(File.OpenRead(path));
        while (reader.BaseStream.Position < reader.BaseStream.Length)
        {
            string name = System.Text.Encoding.ASCII.GetString(reader.ReadBytes(reader.ReadInt32()));
            int dtype = reader.ReadInt32(), ndim = reader.ReadInt32();
            var dims = new int[ndim];
            for (int i = 0; i < ndim; i++) dims[i] = reader.ReadInt32();
            int count = dims.Aggregate(1, (a, b) => a * b);
            Array data = dtype switch
            {
                0 => Enumerable.Range(0, count).Select(_ => reader.ReadSingle()).ToArray(),
                1 => Enumerable.Range(0, count).Select(_ => reader.ReadDouble()).ToArray(),
                2 => Enumerable.Range(0, count).Select(_ => reader.ReadInt32()).ToArray(),
                _ => throw new InvalidDataException($"{fileName}: record {name} has dtype {dtype}"),
            };
            _records.Add(name, (dims, data));
        }
    }

    public int[] Dims(string name) => _records[name].Dims;
    public float[] F32(string name) => (float[])_records[name].Data;
    public double[] F64(string name) => (double[])_records[name].Data;
    public int[] I32(string name) => (int[])_records[name].Data;
}
