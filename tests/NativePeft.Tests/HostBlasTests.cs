using NativePeft.Runtime;
using NativePeft.Ops;
using NUnit.Framework;

namespace NativePeft.Tests;

public class HostBlasTests
{
    [Test]
    public void BlasIsInstalledByTheBuild() =>
        Assert.That(HostBlas.IsAvailable, Is.True, HostBlas.Description);

    [TestCase(false, false)]
    [TestCase(true, false)]
    [TestCase(false, true)]
    [TestCase(true, true)]
    public void SgemmMatchesFloat64Reference(bool transA, bool transB)
    {
        const int m = 13, n = 7, k = 29;
        var rng = new Random(1);
        float[] a = Enumerable.Range(0, m * k).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        float[] b = Enumerable.Range(0, k * n).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        float[] c = Enumerable.Range(0, m * n).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        var expected = new double[m * n];
        for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
        {
            double s = 0;
            for (int p = 0; p < k; p++)
                s += (double)(transA ? a[p * m + i] : a[i * k + p]) * (transB ? b[j * k + p] : b[p * n + j]);
            expected[i * n + j] = 0.5 * s + 2.0 * c[i * n + j];
        }
        HostBlas.Sgemm(transA, transB, m, n, k, 0.5f, a, b, 2.0f, c);
        for (int i = 0; i < m * n; i++)
            Assert.That(c[i], Is.EqualTo(expected[i]).Within(1e-5), $"C[{i}]");
    }
}
