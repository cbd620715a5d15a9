using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class SwiGluTests
{
    [Test]
    public void KnownValues()
    {
        // silu(z) = z·σ(z): silu(0) = 0, silu(1) = 0.7310585786300049, silu(−1) = −0.2689414213699951,
        // silu(40) = 40 to double precision, silu(−1000) = −0 (no NaN), silu(2) = 1.7615941559557646.
        double[] gate = [0, 1, -1, 40, -1000, 2], up = [5, 2, 1, 1, 3, -0.5];
        var h = new double[6];
        SwiGluRef.Forward<double>(gate, up, h, 2, 3);
        Assert.That(h, Is.EqualTo(new[] { 0, 1.4621171572600098, -0.2689414213699951, 40, 0, -0.8807970779778823 }).Within(1e-15));

        // silu'(z) = σ(z)(1 + z(1 − σ(z))): silu'(0) = 0.5, silu'(1) = 0.7310585786300049·(1 + 0.2689414213699951)
        // = 0.9276705118714869; silu'(40) = 1, silu'(−1000) = 0.
        double[] dh = [1, 1, 1, 1, 1, 2];
        double[] dgate = new double[6], dup = new double[6];
        SwiGluRef.Backward<double>(dh, gate, up, dgate, dup, 2, 3);
        Assert.That(dgate[0], Is.EqualTo(2.5).Within(1e-15));
        Assert.That(dgate[1], Is.EqualTo(2 * 0.9276705118714869).Within(1e-15));
        Assert.That(dgate[3], Is.EqualTo(1).Within(1e-15));
        Assert.That(dgate[4], Is.EqualTo(0));
        Assert.That(dup, Is.EqualTo(new[] { 0, 0.7310585786300049, -0.2689414213699951, 40, 0, 2 * 1.7615941559557646 }).Within(1e-15));
        Assert.That(dgate.Concat(dup).Concat(h), Has.None.NaN);
    }

    [TestCase(1, 1)]
    [TestCase(3, 7)]
    [TestCase(2, 48)]
    public void GradientsMatchFiniteDifferences(int rows, int intermediate)
    {
        double[] gate = GradCheck.RandomNormal(rows * intermediate, 21, 2);
        double[] up = GradCheck.RandomNormal(rows * intermediate, 22);
        double[] dh = GradCheck.RandomNormal(rows * intermediate, 23);
        double Loss()
        {
            var h = new double[rows * intermediate];
            SwiGluRef.Forward<double>(gate, up, h, rows, intermediate);
            return GradCheck.Dot(h, dh);
        }
        double[] dgate = Enumerable.Repeat(9.0, gate.Length).ToArray(), dup = Enumerable.Repeat(9.0, gate.Length).ToArray();
        SwiGluRef.Backward<double>(dh, gate, up, dgate, dup, rows, intermediate);
        GradCheck.Check("dgate", gate, dgate, Loss);
        GradCheck.Check("dup", up, dup, Loss);
    }

    [Test]
    public void FloatMatchesDouble()
    {
        const int rows = 5, intermediate = 77;
        double[] gate = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(rows * intermediate, 24, 4)));
        double[] up = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(rows * intermediate, 25)));
        double[] dh = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(rows * intermediate, 26)));
        double[] h = new double[gate.Length], dg = new double[gate.Length], du = new double[gate.Length];
        float[] hf = new float[gate.Length], dgf = new float[gate.Length], duf = new float[gate.Length];
        SwiGluRef.Forward<double>(gate, up, h, rows, intermediate);
        SwiGluRef.Forward<float>(GradCheck.ToFloat(gate), GradCheck.ToFloat(up), hf, rows, intermediate);
        SwiGluRef.Backward<double>(dh, gate, up, dg, du, rows, intermediate);
        SwiGluRef.Backward<float>(GradCheck.ToFloat(dh), GradCheck.ToFloat(gate), GradCheck.ToFloat(up), dgf, duf, rows, intermediate);
        // Each element is computed in double and rounded once: exactly the rounded double result.
        Assert.That(hf, Is.EqualTo(GradCheck.ToFloat(h)));
        Assert.That(dgf, Is.EqualTo(GradCheck.ToFloat(dg)));
        Assert.That(duf, Is.EqualTo(GradCheck.ToFloat(du)));
    }

    [Test]
    public void InPlaceAndShortSpans()
    {
        double[] gate = GradCheck.RandomNormal(12, 27), up = GradCheck.RandomNormal(12, 28), h = new double[12];
        SwiGluRef.Forward<double>(gate, up, h, 3, 4);
        SwiGluRef.Forward<double>(gate, up, gate, 3, 4);
        Assert.That(gate, Is.EqualTo(h));
        Assert.Throws<ArgumentException>(() => SwiGluRef.Forward<float>(new float[11], new float[12], new float[12], 3, 4));
        Assert.Throws<ArgumentException>(() =>
            SwiGluRef.Backward<float>(new float[12], new float[12], new float[12], new float[12], new float[11], 3, 4));
    }

    [Test]
    public void LargeInputsSameForAnyThreadCountAndCloseToScalarFormula()
    {
        // 3 × 20001 elements: several parallel chunks, the vectorized path (Vector256.Exp) and a scalar tail (count % 4 = 3).
        const int rows = 3, intermediate = 20001;
        int n = rows * intermediate;
        float[] gate = GradCheck.ToFloat(GradCheck.RandomNormal(n, 60, 6)), up = GradCheck.ToFloat(GradCheck.RandomNormal(n, 61));
        float[] dh = GradCheck.ToFloat(GradCheck.RandomNormal(n, 62));
        gate[5] = -1000; gate[6] = 1000; gate[7] = 40; // saturation inside the vector path: no NaN
        (float[] H, float[] Dg, float[] Du) Run(int degree)
        {
            RefParallel.MaxDegreeOverride = degree;
            try
            {
                float[] h = new float[n], dg = new float[n], du = new float[n];
                SwiGluRef.Forward<float>(gate, up, h, rows, intermediate);
                SwiGluRef.Backward<float>(dh, gate, up, dg, du, rows, intermediate);
                return (h, dg, du);
            }
            finally { RefParallel.MaxDegreeOverride = 0; }
        }
        var serial = Run(1);
        foreach (int degree in new[] { 0, 2, 3 })
        {
            var r = Run(degree);
            Assert.That(r.H, Is.EqualTo(serial.H), $"h, {degree} threads");
            Assert.That(r.Dg, Is.EqualTo(serial.Dg), $"dgate, {degree} threads");
            Assert.That(r.Du, Is.EqualTo(serial.Du), $"dup, {degree} threads");
        }
        // The scalar formula in double with Math.Exp, rounded once: the vector exp may differ from it by an ulp of a
        // double, so the float results agree to within one float ulp (relative 2^-23), plus an absolute floor near 0.
        for (int i = 0; i < n; i++)
        {
            double g = gate[i], u = up[i], d = dh[i], s = 1.0 / (1.0 + Math.Exp(-g));
            Assert.That(serial.H[i], Is.EqualTo((float)(g * s * u)).Within(Math.Abs(g * s * u) * 1.2e-7 + 1e-30), $"h[{i}]");
            double dgWant = d * u * s * (1 + g * (1 - s)), duWant = d * g * s;
            Assert.That(serial.Dg[i], Is.EqualTo((float)dgWant).Within(Math.Abs(dgWant) * 1.2e-7 + 1e-30), $"dgate[{i}]");
            Assert.That(serial.Du[i], Is.EqualTo((float)duWant).Within(Math.Abs(duWant) * 1.2e-7 + 1e-30), $"dup[{i}]");
        }
        Assert.That(serial.H.Concat(serial.Dg).Concat(serial.Du), Has.None.NaN);
        Assert.That(serial.H[5], Is.EqualTo(0f).Or.EqualTo(-0f));
        Assert.That(serial.H[6], Is.EqualTo(1000f * up[6]));
    }
}
