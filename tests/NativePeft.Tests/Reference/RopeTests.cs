using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class RopeTests
{
    [Test]
    public void PlainInverseFrequencies()
    {
        // 1 / theta^(2i/D): D = 8, theta = 10000 → 1, 10000^-1/4 = 0.1, 10000^-1/2 = 0.01, 10000^-3/4 = 0.001
        double[] invFreq = RopeRef.InverseFrequencies(8, 10000);
        Assert.That(invFreq, Is.EqualTo(new[] { 1, 0.1, 0.01, 0.001 }).Within(1e-15));
        Assert.That(RopeRef.InverseFrequencies<float>(8, 10000), Is.EqualTo(new[] { 1f, 0.1f, 0.01f, 0.001f }));
    }

    [Test]
    public void Llama3ScalingInEachRegime()
    {
        // Llama 3.1: D 128, theta 500000, factor 8, low 1, high 4, original 8192 (docs/ops-contract.md "RoPE").
        // wavelen = 2π·500000^(2i/128): < 8192/4 = 2048 for i ≤ 28 (high frequency: unchanged),
        // > 8192/1 for i ≥ 35 (low frequency: inv_freq/8), in between for i = 29..34 (smoothed).
        double[] scaled = RopeRef.InverseFrequencies(128, 500000, RopeScaling.Llama31);
        static double Plain(int i) => 1.0 / Math.Pow(500000, 2.0 * i / 128);
        static double Wavelen(int i) => 2 * Math.PI / Plain(i);

        foreach (int i in new[] { 0, 10, 28 })
        {
            Assert.That(Wavelen(i), Is.LessThan(2048), $"i {i} is high frequency");
            Assert.That(scaled[i], Is.EqualTo(Plain(i)).Within(1e-15 * Plain(i)), $"unchanged at {i}");
        }
        foreach (int i in new[] { 35, 50, 63 })
        {
            Assert.That(Wavelen(i), Is.GreaterThan(8192), $"i {i} is low frequency");
            Assert.That(scaled[i], Is.EqualTo(Plain(i) / 8).Within(1e-15 * Plain(i)), $"divided by factor at {i}");
        }
        foreach (int i in new[] { 29, 31, 34 })
        {
            Assert.That(Wavelen(i), Is.InRange(2048, 8192), $"i {i} is medium");
            double smooth = (8192 / Wavelen(i) - 1) / (4 - 1);
            Assert.That(smooth, Is.InRange(0.0, 1.0));
            double expected = (1 - smooth) * Plain(i) / 8 + smooth * Plain(i);
            Assert.That(scaled[i], Is.EqualTo(expected).Within(1e-14 * Plain(i)), $"smoothed at {i}");
        }
        // i = 0: 1/500000^0 = 1 exactly; i = 63: 500000^(-126/128) / 8.
        Assert.That(scaled[0], Is.EqualTo(1.0));
        Assert.That(scaled[63], Is.EqualTo(Math.Pow(500000, -126.0 / 128) / 8).Within(1e-22));
    }

    [Test]
    public void PositionZeroIsTheIdentity()
    {
        const int tokens = 3, heads = 2, dim = 10;
        double[] x = GradCheck.RandomNormal(tokens * heads * dim, 11);
        float[] xf = GradCheck.ToFloat(x);
        int[] positions = new int[tokens];
        var y = new double[x.Length];
        var yf = new float[x.Length];
        RopeRef.Forward<double>(x, positions, RopeRef.InverseFrequencies<double>(dim, 10000), y, tokens, heads, dim);
        RopeRef.Forward<float>(xf, positions, RopeRef.InverseFrequencies<float>(dim, 10000), yf, tokens, heads, dim);
        Assert.That(y, Is.EqualTo(x));
        Assert.That(yf, Is.EqualTo(xf));
    }

    [Test]
    public void NinetyDegreesSwapsTheHalves()
    {
        // angle = 1 · π/2 for every pair: out[i] = −x[i+h], out[i+h] = x[i]  (rotate_half).
        const int dim = 4;
        double[] x = [1, 2, 3, 4], y = new double[4], invFreq = [Math.PI / 2, Math.PI / 2];
        RopeRef.Forward<double>(x, [1], invFreq, y, 1, 1, dim);
        Assert.That(y, Is.EqualTo(new double[] { -3, -4, 1, 2 }).Within(1e-15));

        float[] xf = [1, 2, 3, 4], yf = new float[4], invFreqF = [MathF.PI / 2, MathF.PI / 2];
        RopeRef.Forward<float>(xf, [1], invFreqF, yf, 1, 1, dim);
        Assert.That(yf, Is.EqualTo(new float[] { -3, -4, 1, 2 }).Within(1e-6));

        // Two tokens at positions 1 and 2 and two heads: 180° negates.
        double[] x2 = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8], y2 = new double[16];
        RopeRef.Forward<double>(x2, [1, 2], invFreq, y2, 2, 2, dim);
        Assert.That(y2, Is.EqualTo(new double[] { -3, -4, 1, 2, -7, -8, 5, 6, -1, -2, -3, -4, -5, -6, -7, -8 }).Within(1e-15));
    }

    [TestCase(1, 1, 2)]
    [TestCase(3, 2, 6)]
    [TestCase(4, 3, 10)]
    [TestCase(5, 1, 16)]
    public void BackwardMatchesFiniteDifferences(int tokens, int heads, int dim)
    {
        double[] invFreq = RopeRef.InverseFrequencies(dim, 500000, new RopeScaling(8, 1, 4, 64));
        int[] positions = Enumerable.Range(0, tokens).Select(t => t * 37 % 101 + t).ToArray();
        double[] x = GradCheck.RandomNormal(tokens * heads * dim, 12);
        double[] dy = GradCheck.RandomNormal(x.Length, 13);
        double Loss()
        {
            var y = new double[x.Length];
            RopeRef.Forward<double>(x, positions, invFreq, y, tokens, heads, dim);
            return GradCheck.Dot(y, dy);
        }
        var dx = Enumerable.Repeat(-7.0, x.Length).ToArray();
        RopeRef.Backward<double>(dy, positions, invFreq, dx, tokens, heads, dim);
        GradCheck.Check("dx", x, dx, Loss);

        // The rotation is orthogonal: backward(forward(x)) = x.
        var y = new double[x.Length];
        RopeRef.Forward<double>(x, positions, invFreq, y, tokens, heads, dim);
        RopeRef.Backward<double>(y, positions, invFreq, y, tokens, heads, dim);
        GradCheck.AssertClose(y, x, 1e-14, 1e-14, "backward(forward(x))");
    }

    [Test]
    public void TablesGiveBitIdenticalResults()
    {
        const int tokens = 6, heads = 3, dim = 12, maxPos = 50;
        float[] invFreq = RopeRef.InverseFrequencies<float>(dim, 10000, null);
        int[] positions = [0, 5, 49, 17, 17, 1];
        float[] cos = new float[maxPos * dim / 2], sin = new float[maxPos * dim / 2];
        RopeRef.Tables<float>(maxPos, invFreq, cos, sin);

        // Per-position tables equal the rows of the 0..maxPos−1 tables.
        float[] cosP = new float[tokens * dim / 2], sinP = new float[tokens * dim / 2];
        RopeRef.Tables<float>(positions, invFreq, cosP, sinP);
        for (int t = 0; t < tokens; t++)
        {
            Assert.That(cosP.AsSpan(t * dim / 2, dim / 2).ToArray(), Is.EqualTo(cos.AsSpan(positions[t] * dim / 2, dim / 2).ToArray()));
            Assert.That(sinP.AsSpan(t * dim / 2, dim / 2).ToArray(), Is.EqualTo(sin.AsSpan(positions[t] * dim / 2, dim / 2).ToArray()));
        }
        Assert.That(cos[5 * dim / 2 + 1], Is.EqualTo((float)Math.Cos(5 * (double)invFreq[1])));

        float[] x = GradCheck.ToFloat(GradCheck.RandomNormal(tokens * heads * dim, 14));
        float[] a = new float[x.Length], b = new float[x.Length];
        RopeRef.Forward<float>(x, positions, invFreq, a, tokens, heads, dim);
        RopeRef.ForwardFromTables<float>(x, positions, cos, sin, b, tokens, heads, dim);
        Assert.That(b, Is.EqualTo(a));
        RopeRef.Backward<float>(x, positions, invFreq, a, tokens, heads, dim);
        RopeRef.BackwardFromTables<float>(x, positions, cos, sin, b, tokens, heads, dim);
        Assert.That(b, Is.EqualTo(a));
    }

    [Test]
    public void FloatMatchesDouble()
    {
        const int tokens = 7, heads = 4, dim = 14;
        int[] positions = [0, 1, 2, 50, 51, 400, 2047];
        double[] x = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(tokens * heads * dim, 15)));
        float[] xf = GradCheck.ToFloat(x);
        float[] invFreqF = RopeRef.InverseFrequencies<float>(dim, 500000, RopeScaling.Llama31);
        // The double run uses the same (float-valued) inv_freq, so the angles agree; what remains is the float
        // rounding of cos, sin (one each) and of the result: ≤ ~3 roundings of the pair's magnitude.
        double[] invFreq = GradCheck.ToDouble(invFreqF);
        var y = new double[x.Length];
        var yf = new float[x.Length];
        RopeRef.Forward<double>(x, positions, invFreq, y, tokens, heads, dim);
        RopeRef.Forward<float>(xf, positions, invFreqF, yf, tokens, heads, dim);
        GradCheck.AssertFloatMatchesDouble(yf, y, 4, 4, "y");
    }

    [Test]
    public void MatchesHuggingFaceInTorch()
    {
        var oracle = OpsOracle.Load("ops_rope.bin");
        int[] shape = oracle.Shape("x"); // [B, T, H, D]
        int tokens = shape[0] * shape[1], heads = shape[2], dim = shape[3];
        double[] config = oracle.F64("config"); // theta, factor, low, high, original
        var scaling = new RopeScaling(config[1], config[2], config[3], (int)config[4]);
        int[] positions = oracle.I32("positions");
        float[] xf = oracle.F32("x");

        // inv_freq: double vs torch float64 (same formula), float vs HF's fp32 pipeline (pow and llama3 rule in fp32).
        double[] invFreq = RopeRef.InverseFrequencies(dim, config[0], scaling);
        GradCheck.AssertClose(invFreq, oracle.F64("inv_freq_f64"), 1e-14, 0, "inv_freq double vs torch float64");
        float[] invFreqF = RopeRef.InverseFrequencies<float>(dim, config[0], scaling);
        GradCheck.AssertClose(invFreqF, GradCheck.ToDouble(oracle.F32("inv_freq_f32")), 8 * GradCheck.U, 0, "inv_freq float vs HF fp32");

        var y = new double[xf.Length];
        RopeRef.Forward<double>(GradCheck.ToDouble(xf), positions, invFreq, y, tokens, heads, dim);
        GradCheck.AssertClose(y, oracle.F64("y_f64"), 1e-12, 1e-12, "y double vs torch float64 rotate_half");

        // float vs HF fp32: HF rounds the angle pos·inv_freq to fp32 (error ≤ pos·|inv_freq|·2^-24 ≤ pos·6e-8 rad,
        // inv_freq ≤ 1) and its inv_freq may differ by a few ulps (relative 5e-7 → pos·5e-7 rad); |x| ≤ 4.
        // Tolerance per token: 1e-5 + 4·pos·6e-7.
        var yf = new float[xf.Length];
        RopeRef.Forward<float>(xf, positions, invFreqF, yf, tokens, heads, dim);
        float[] hf = oracle.F32("y_f32");
        int rowLength = heads * dim;
        double worstAtLargePos = 0;
        for (int t = 0; t < tokens; t++)
        {
            double tolerance = 1e-5 + 4 * positions[t] * 6e-7;
            GradCheck.AssertClose(yf.AsSpan(t * rowLength, rowLength), GradCheck.ToDouble(hf.AsSpan(t * rowLength, rowLength)),
                0, tolerance, $"y float vs HF fp32 at token {t} (position {positions[t]})");
            if (positions[t] == 0)
                Assert.That(yf.AsSpan(t * rowLength, rowLength).ToArray(), Is.EqualTo(hf.AsSpan(t * rowLength, rowLength).ToArray()));
            for (int k = 0; k < rowLength; k++)
                worstAtLargePos = Math.Max(worstAtLargePos, Math.Abs(yf[t * rowLength + k] - hf[t * rowLength + k]));
        }
        TestContext.Out.WriteLine($"largest |ours − HF fp32| over all positions: {worstAtLargePos:E2}");
    }

    [Test]
    public void InvalidArgumentsThrow()
    {
        Assert.Throws<ArgumentException>(() => RopeRef.InverseFrequencies(7, 10000));
        Assert.Throws<ArgumentException>(() => RopeRef.InverseFrequencies(8, 10000, new RopeScaling(8, 4, 1, 8192)));
        Assert.Throws<ArgumentException>(() =>
            RopeRef.Forward<float>(new float[6], [0], new float[3], new float[6], 1, 1, 5));
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() =>
            RopeRef.ForwardFromTables<float>(new float[8], [0, 3], new float[6], new float[6], new float[8], 2, 1, 4));
        Assert.That(ex!.Message, Does.Contain("position 3 at token 1"));
    }
}
