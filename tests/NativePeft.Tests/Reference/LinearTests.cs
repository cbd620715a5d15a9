using NativePeft.Runtime;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class LinearTests
{
    [Test]
    public void ByHand()
    {
        // x [1, 2] = [1, 2]; W [3, 2] = [[1, 0], [0, 1], [1, 1]]; b = [0.5, 0, −1] → y = [1.5, 2, 2]
        double[] x = [1, 2], w = [1, 0, 0, 1, 1, 1], b = [0.5, 0, -1], y = new double[3];
        LinearRef.Forward<double>(x, w, b, y, 1, 2, 3);
        Assert.That(y, Is.EqualTo(new double[] { 1.5, 2, 2 }));
        LinearRef.Forward<double>(x, w, ReadOnlySpan<double>.Empty, y, 1, 2, 3);
        Assert.That(y, Is.EqualTo(new double[] { 1, 2, 3 }));

        // dy = [1, 10, 100]: dx = dy·W = [101, 110]; dW += dyᵀ·x = [[1, 2], [10, 20], [100, 200]]; db += dy
        double[] dy = [1, 10, 100], dx = [7, 7], dw = new double[6], db = [1, 1, 1];
        LinearRef.Backward<double>(dy, x, w, dx, dw, db, 1, 2, 3);
        Assert.That(dx, Is.EqualTo(new double[] { 101, 110 }));
        Assert.That(dw, Is.EqualTo(new double[] { 1, 2, 10, 20, 100, 200 }));
        Assert.That(db, Is.EqualTo(new double[] { 2, 11, 101 }));
    }

    [TestCase(1, 1, 1)]
    [TestCase(3, 5, 7)]
    [TestCase(4, 12, 6)]
    public void GradientsMatchFiniteDifferences(int rows, int inFeatures, int outFeatures)
    {
        double[] x = GradCheck.RandomNormal(rows * inFeatures, 41);
        double[] w = GradCheck.RandomNormal(outFeatures * inFeatures, 42, 0.5);
        double[] b = GradCheck.RandomNormal(outFeatures, 43);
        double[] dy = GradCheck.RandomNormal(rows * outFeatures, 44);
        double Loss()
        {
            var y = new double[rows * outFeatures];
            LinearRef.Forward<double>(x, w, b, y, rows, inFeatures, outFeatures);
            return GradCheck.Dot(y, dy);
        }
        double[] dx = Enumerable.Repeat(5.0, x.Length).ToArray();
        double[] dwStart = GradCheck.RandomNormal(w.Length, 45), dw = (double[])dwStart.Clone();
        double[] dbStart = GradCheck.RandomNormal(b.Length, 46), db = (double[])dbStart.Clone();
        LinearRef.Backward<double>(dy, x, w, dx, dw, db, rows, inFeatures, outFeatures);
        GradCheck.Check("dx", x, dx, Loss);
        GradCheck.Check("dW", w, dw.Select((v, k) => v - dwStart[k]).ToArray(), Loss);
        GradCheck.Check("db", b, db.Select((v, k) => v - dbStart[k]).ToArray(), Loss);

        // Empty spans skip those gradients; dx alone is unchanged.
        var dxOnly = new double[x.Length];
        LinearRef.Backward<double>(dy, ReadOnlySpan<double>.Empty, w, dxOnly, Span<double>.Empty, Span<double>.Empty,
            rows, inFeatures, outFeatures);
        Assert.That(dxOnly, Is.EqualTo(dx));
    }

    [Test]
    public void FloatMatchesDoubleAndHostBlas()
    {
        const int rows = 9, inFeatures = 70, outFeatures = 33;
        float[] xf = GradCheck.ToFloat(GradCheck.RandomNormal(rows * inFeatures, 47));
        float[] wf = GradCheck.ToFloat(GradCheck.RandomNormal(outFeatures * inFeatures, 48));
        float[] dyf = GradCheck.ToFloat(GradCheck.RandomNormal(rows * outFeatures, 49));
        var yf = new float[rows * outFeatures];
        var y = new double[rows * outFeatures];
        LinearRef.Forward<float>(xf, wf, ReadOnlySpan<float>.Empty, yf, rows, inFeatures, outFeatures);
        LinearRef.Forward<double>(GradCheck.ToDouble(xf), GradCheck.ToDouble(wf), ReadOnlySpan<double>.Empty, y, rows, inFeatures, outFeatures);
        // Sums in double, rounded once: the float result is the rounded double result.
        Assert.That(yf, Is.EqualTo(GradCheck.ToFloat(y)));

        float[] dxf = new float[xf.Length], dwf = new float[wf.Length];
        double[] dx = new double[xf.Length], dw = new double[wf.Length];
        LinearRef.Backward<float>(dyf, xf, wf, dxf, dwf, Span<float>.Empty, rows, inFeatures, outFeatures);
        LinearRef.Backward<double>(GradCheck.ToDouble(dyf), GradCheck.ToDouble(xf), GradCheck.ToDouble(wf), dx, dw,
            Span<double>.Empty, rows, inFeatures, outFeatures);
        Assert.That(dxf, Is.EqualTo(GradCheck.ToFloat(dx)));
        Assert.That(dwf, Is.EqualTo(GradCheck.ToFloat(dw)));

        if (!HostBlas.IsAvailable) Assert.Ignore("no host BLAS: " + HostBlas.Description);
        // sgemm accumulates in float: within √in·|terms| fp32 roundings (|x·w| ~ 1, in = 70).
        var blas = new float[yf.Length];
        HostBlas.Sgemm(false, true, rows, outFeatures, inFeatures, 1f, xf, wf, 0f, blas);
        GradCheck.AssertFloatMatchesDouble(blas, y, 2 * inFeatures, 1, "sgemm vs reference");
    }

    [Test]
    public void SameResultsForAnyThreadCount()
    {
        // Big enough for the parallel path (rows·in·out ≥ RefParallel.MinParallelWork).
        const int rows = 64, inFeatures = 96, outFeatures = 80;
        float[] x = GradCheck.ToFloat(GradCheck.RandomNormal(rows * inFeatures, 50));
        float[] w = GradCheck.ToFloat(GradCheck.RandomNormal(outFeatures * inFeatures, 51));
        float[] dy = GradCheck.ToFloat(GradCheck.RandomNormal(rows * outFeatures, 52));
        Assert.That((long)rows * inFeatures * outFeatures, Is.GreaterThanOrEqualTo(RefParallel.MinParallelWork));

        (float[] Y, float[] Dx, float[] Dw) Run(int degree)
        {
            RefParallel.MaxDegreeOverride = degree;
            try
            {
                float[] y = new float[rows * outFeatures], dx = new float[x.Length], dw = new float[w.Length];
                LinearRef.Forward<float>(x, w, ReadOnlySpan<float>.Empty, y, rows, inFeatures, outFeatures);
                LinearRef.Backward<float>(dy, x, w, dx, dw, Span<float>.Empty, rows, inFeatures, outFeatures);
                return (y, dx, dw);
            }
            finally { RefParallel.MaxDegreeOverride = 0; }
        }
        var serial = Run(1);
        foreach (int degree in new[] { 0, 2, 3, 8 })
        {
            var parallel = Run(degree);
            Assert.That(parallel.Y, Is.EqualTo(serial.Y), $"y, degree {degree}");
            Assert.That(parallel.Dx, Is.EqualTo(serial.Dx), $"dx, degree {degree}");
            Assert.That(parallel.Dw, Is.EqualTo(serial.Dw), $"dW, degree {degree}");
        }
    }

    [Test]
    public void ShortSpansThrow()
    {
        Assert.Throws<ArgumentException>(() =>
            LinearRef.Forward<float>(new float[5], new float[6], ReadOnlySpan<float>.Empty, new float[6], 2, 3, 2));
        Assert.Throws<ArgumentException>(() =>
            LinearRef.Forward<float>(new float[6], new float[6], new float[1], new float[4], 2, 3, 2));
        Assert.Throws<ArgumentException>(() =>
            LinearRef.Backward<float>(new float[4], new float[6], new float[6], new float[6], new float[5], Span<float>.Empty, 2, 3, 2));
    }
}
