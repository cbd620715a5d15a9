using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class RmsNormTests
{
    [Test]
    public void ThreeFourByHand()
    {
        // mean(9, 16) = 12.5, rstd = 1/sqrt(12.5) = 0.28284271247461906; y = w · x · rstd
        double[] x = [3, 4], w = [2, 0.5], y = new double[2], rstd = new double[1];
        RmsNormRef.Forward<double>(x, w, y, rstd, 1, 2, eps: 0);
        Assert.That(rstd[0], Is.EqualTo(0.28284271247461906).Within(1e-16));
        Assert.That(y, Is.EqualTo(new[] { 2 * 0.848528137423857, 0.5 * 1.131370849898476 }).Within(1e-15));

        float[] xf = [3, 4], wf = [1, 1], yf = new float[2], rf = new float[1];
        RmsNormRef.Forward<float>(xf, wf, yf, rf, 1, 2, eps: 0);
        Assert.That(yf, Is.EqualTo(new[] { 0.848528137f, 1.13137085f }).Within(1e-7));

        // eps enters under the root: mean 12.5 + eps 0.5 = 13 → rstd = 1/sqrt(13)
        RmsNormRef.Forward<double>(x, w, y, rstd, 1, 2, eps: 0.5);
        Assert.That(rstd[0], Is.EqualTo(1 / Math.Sqrt(13)).Within(1e-16));
    }

    [Test]
    public void ZeroRowGivesZerosNotNaN()
    {
        double[] x = new double[4], w = [1, 2, 3, 4], y = new double[4], rstd = new double[1];
        RmsNormRef.Forward<double>(x, w, y, rstd, 1, 4, eps: 1e-5);
        Assert.That(rstd[0], Is.EqualTo(1 / Math.Sqrt(1e-5)).Within(1e-9));
        Assert.That(y, Is.All.EqualTo(0.0));
    }

    [TestCase(1, 1)]
    [TestCase(3, 7)]
    [TestCase(4, 24)]
    [TestCase(2, 33)]
    public void GradientsMatchFiniteDifferences(int rows, int cols)
    {
        const double eps = 1e-5;
        double[] x = GradCheck.RandomNormal(rows * cols, 1, scale: 1.5);
        double[] w = GradCheck.RandomNormal(cols, 2, 0.3).Select(v => 1 + v).ToArray();
        double[] dy = GradCheck.RandomNormal(rows * cols, 3);
        double Loss()
        {
            var y = new double[rows * cols];
            RmsNormRef.Forward<double>(x, w, y, new double[rows], rows, cols, eps);
            return GradCheck.Dot(y, dy);
        }

        var yOut = new double[rows * cols];
        var rstd = new double[rows];
        RmsNormRef.Forward<double>(x, w, yOut, rstd, rows, cols, eps);
        var dx = Enumerable.Repeat(123.0, rows * cols).ToArray(); // overwritten
        var dwStart = GradCheck.RandomNormal(cols, 4);
        var dw = (double[])dwStart.Clone();                       // accumulated
        RmsNormRef.Backward<double>(dy, x, w, rstd, dx, dw, rows, cols);

        GradCheck.Check("dx", x, dx, Loss);
        GradCheck.Check("dw", w, dw.Select((v, c) => v - dwStart[c]).ToArray(), Loss);

        // Skipping dweight leaves dx the same.
        var dxOnly = new double[rows * cols];
        RmsNormRef.Backward<double>(dy, x, w, rstd, dxOnly, Span<double>.Empty, rows, cols);
        Assert.That(dxOnly, Is.EqualTo(dx));
    }

    [Test]
    public void FloatMatchesDouble()
    {
        const int rows = 8, cols = 96;
        double[] x = GradCheck.RandomNormal(rows * cols, 5, 3), w = GradCheck.RandomNormal(cols, 6);
        double[] dy = GradCheck.RandomNormal(rows * cols, 7);
        // Double run on the float-rounded inputs: the only difference left is the float path's own rounding.
        float[] xf = GradCheck.ToFloat(x), wf = GradCheck.ToFloat(w), dyf = GradCheck.ToFloat(dy);
        x = GradCheck.ToDouble(xf); w = GradCheck.ToDouble(wf); dy = GradCheck.ToDouble(dyf);

        double[] y = new double[rows * cols], rstd = new double[rows], dx = new double[rows * cols], dw = new double[cols];
        float[] yf = new float[rows * cols], rstdf = new float[rows], dxf = new float[rows * cols], dwf = new float[cols];
        RmsNormRef.Forward<double>(x, w, y, rstd, rows, cols, 1e-5);
        RmsNormRef.Forward<float>(xf, wf, yf, rstdf, rows, cols, 1e-5);
        RmsNormRef.Backward<double>(dy, x, w, rstd, dx, dw, rows, cols);
        RmsNormRef.Backward<float>(dyf, xf, wf, rstdf, dxf, dwf, rows, cols);

        // y = w·(x·rstd): rstd rounded once, two float products → ≤ 3 roundings of |y|.
        GradCheck.AssertClose(yf, y, 4 * GradCheck.U, 1e-30, "y");
        GradCheck.AssertFloatMatchesDouble(rstdf, rstd, 1, 0, "rstd");
        // dx: float rstd (one rounding) enters up to cubed; terms of size ~|w·dy·rstd| ~ 3.
        GradCheck.AssertFloatMatchesDouble(dxf, dx, 8, 3, "dx");
        GradCheck.AssertFloatMatchesDouble(dwf, dw, 4, 3 * Math.Sqrt(rows), "dw");
    }

    [Test]
    public void InPlaceGivesTheSameResult()
    {
        double[] x = GradCheck.RandomNormal(3 * 10, 8), w = GradCheck.RandomNormal(10, 9);
        double[] y = new double[30], rstd = new double[3];
        RmsNormRef.Forward<double>(x, w, y, rstd, 3, 10, 1e-6);
        RmsNormRef.Forward<double>(x, w, x, rstd, 3, 10, 1e-6);
        Assert.That(x, Is.EqualTo(y));
    }

    [Test]
    public void MatchesHuggingFaceInTorch()
    {
        var oracle = OpsOracle.Load("ops_rmsnorm.bin");
        int rows = oracle.Shape("x")[0], cols = oracle.Shape("x")[1];
        double eps = oracle.F64("eps")[0];
        float[] xf = oracle.F32("x"), wf = oracle.F32("w"), dyf = oracle.F32("dy");

        // float vs torch's fp32 LlamaRMSNorm (which sums squares in fp32): a few fp32 roundings of |y| (~3).
        float[] yf = new float[rows * cols], rstdf = new float[rows];
        RmsNormRef.Forward<float>(xf, wf, yf, rstdf, rows, cols, eps);
        GradCheck.AssertClose(yf, GradCheck.ToDouble(oracle.F32("y_f32")), 4 * GradCheck.U, 4 * GradCheck.U, "y float vs torch fp32");

        // double vs torch float64 forward and autograd.
        double[] x = GradCheck.ToDouble(xf), w = GradCheck.ToDouble(wf), dy = GradCheck.ToDouble(dyf);
        double[] y = new double[rows * cols], rstd = new double[rows], dx = new double[rows * cols], dw = new double[cols];
        RmsNormRef.Forward<double>(x, w, y, rstd, rows, cols, eps);
        RmsNormRef.Backward<double>(dy, x, w, rstd, dx, dw, rows, cols);
        GradCheck.AssertClose(y, oracle.F64("y_f64"), 1e-13, 1e-14, "y double vs torch float64");
        GradCheck.AssertClose(dx, oracle.F64("dx_f64"), 1e-12, 1e-13, "dx double vs torch autograd");
        GradCheck.AssertClose(dw, oracle.F64("dw_f64"), 1e-12, 1e-13, "dw double vs torch autograd");
    }

    [Test]
    public void ShortSpansThrow()
    {
        Assert.Throws<ArgumentException>(() =>
            RmsNormRef.Forward<float>(new float[7], new float[4], new float[8], new float[2], 2, 4, 1e-5));
        Assert.Throws<ArgumentException>(() =>
            RmsNormRef.Forward<float>(new float[8], new float[3], new float[8], new float[2], 2, 4, 1e-5));
        Assert.Throws<ArgumentException>(() =>
            RmsNormRef.Backward<float>(new float[8], new float[8], new float[4], new float[2], new float[8], new float[3], 2, 4));
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            RmsNormRef.Forward<float>(new float[8], new float[4], new float[8], new float[2], 2, 0, 1e-5));
    }

    [Test]
    public void SameResultsForAnyThreadCount()
    {
        // Big enough for the parallel rows (rows · cols · 4 ≥ RefParallel.MinParallelWork); cols = 130: a vector tail of 2.
        const int rows = 600, cols = 130;
        Assert.That(4L * rows * cols, Is.GreaterThanOrEqualTo(RefParallel.MinParallelWork));
        float[] x = GradCheck.ToFloat(GradCheck.RandomNormal(rows * cols, 80));
        float[] w = GradCheck.ToFloat(GradCheck.RandomNormal(cols, 81));
        float[] dy = GradCheck.ToFloat(GradCheck.RandomNormal(rows * cols, 82));
        (float[] Y, float[] Rstd, float[] Dx, float[] Dw) Run(int degree)
        {
            RefParallel.MaxDegreeOverride = degree;
            try
            {
                float[] y = new float[x.Length], rstd = new float[rows], dw = Enumerable.Repeat(0.5f, cols).ToArray();
                RmsNormRef.Forward<float>(x, w, y, rstd, rows, cols, 1e-5);
                float[] dx = (float[])dy.Clone();  // dx aliases dy
                RmsNormRef.Backward<float>(dx, x, w, rstd, dx, dw, rows, cols);
                return (y, rstd, dx, dw);
            }
            finally { RefParallel.MaxDegreeOverride = 0; }
        }
        var serial = Run(1);
        foreach (int degree in new[] { 0, 2, 3 })
        {
            var r = Run(degree);
            Assert.That(r.Y, Is.EqualTo(serial.Y), $"y, {degree} threads");
            Assert.That(r.Rstd, Is.EqualTo(serial.Rstd), $"rstd, {degree} threads");
            Assert.That(r.Dx, Is.EqualTo(serial.Dx), $"dx, {degree} threads");
            Assert.That(r.Dw, Is.EqualTo(serial.Dw), $"dweight, {degree} threads");
        }
        // The documented formulas in double, rounded once (dx, dweight) — the float path computes them in double too.
        for (int n = 0; n < rows; n += 97)
        {
            double r = serial.Rstd[n], dot = 0;
            for (int c = 0; c < cols; c++) dot += (double)w[c] * dy[n * cols + c] * x[n * cols + c];
            double k = r * r * r * dot / cols;
            for (int c = 0; c < cols; c++)
            {
                Assert.That(serial.Y[n * cols + c], Is.EqualTo(w[c] * (x[n * cols + c] * serial.Rstd[n])), $"y[{n},{c}]");
                Assert.That(serial.Dx[n * cols + c], Is.EqualTo((float)(r * w[c] * dy[n * cols + c] - k * x[n * cols + c])), $"dx[{n},{c}]");
            }
        }
        for (int c = 0; c < cols; c++)
        {
            double sum = 0;
            for (int n = 0; n < rows; n++) sum += (double)dy[n * cols + c] * x[n * cols + c] * serial.Rstd[n];
            Assert.That(serial.Dw[c], Is.EqualTo((float)(0.5 + sum)), $"dweight[{c}]");
        }
    }
}
