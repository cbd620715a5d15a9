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
}
