using NativePeft.Numerics;
using NativePeft.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>
/// GpuOps.Matmul with BF16 operands (cuBLAS GemmEx on CUDA; on the emulator the host BLAS on exactly widened copies):
/// C in BF16 (one rounding of the fp32-accumulated result) or in F32 (mixed precision, e.g. an fp32 weight gradient
/// from bf16 activations), every transpose, alpha and beta — against a float64 product of the same bf16 values.
/// </summary>
[TestFixture("emulator")]
[TestFixture("cuda")]
public class GpuBf16MatmulTests(string device)
{
    private GpuOps _gpu = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _gpu = TestGpus.CreateOps(device);
    }

    [OneTimeTearDown]
    public void TearDown() => _gpu?.Dispose();

    private static BFloat16[] RandomBf16(int n, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => BFloat16.FromSingle((float)(rng.NextDouble() * 2 - 1))).ToArray();
    }

    [Test]
    public void Bf16OperandsWithBf16OrF32OutputMatchAFloat64Product(
        [Values(false, true)] bool transA, [Values(false, true)] bool transB, [Values(DType.BF16, DType.F32)] DType cType)
    {
        const int m = 13, n = 9, k = 70;
        const double alpha = 0.75, beta = 0.5;
        var a = RandomBf16(m * k, 1);
        var b = RandomBf16(k * n, 2);
        var c0 = RandomBf16(m * n, 3);
        var ta = _gpu.Memory.Allocate(DType.BF16, transA ? k : m, transA ? m : k);
        var tb = _gpu.Memory.Allocate(DType.BF16, transB ? n : k, transB ? k : n);
        var tc = _gpu.Memory.Allocate(cType, m, n);
        try
        {
            _gpu.Upload<BFloat16>(a, ta);
            _gpu.Upload<BFloat16>(b, tb);
            if (cType == DType.BF16) _gpu.Upload<BFloat16>(c0, tc);
            else _gpu.Upload<float>(c0.Select(v => v.ToSingle()).ToArray(), tc);
            _gpu.Matmul(ta, transA, tb, transB, tc, alpha, beta);

            double[] got = cType == DType.BF16 ? Download<BFloat16>(tc).Select(v => (double)v.ToSingle()).ToArray()
                                                : Download<float>(tc).Select(v => (double)v).ToArray();
            double worst = 0;
            for (int i = 0; i < m; i++)
            {
                for (int j = 0; j < n; j++)
                {
                    double sum = 0, abs = 0;
                    for (int p = 0; p < k; p++)
                    {
                        double x = a[transA ? p * m + i : i * k + p].ToSingle(), y = b[transB ? j * k + p : p * n + j].ToSingle();
                        sum += x * y;
                        abs += Math.Abs(x * y);
                    }
                    double expected = alpha * sum + beta * c0[i * n + j].ToSingle();
                    // fp32 accumulation: ≤ k·2⁻²⁴·Σ|xy| (a loose bound); a BF16 C adds one rounding, ≤ 2⁻⁸·|c| (8-bit significand, nearest even).
                    double bound = k * Math.Pow(2, -24) * (alpha * abs + beta) + (cType == DType.BF16 ? Math.Pow(2, -8) * (Math.Abs(expected) + k * Math.Pow(2, -24) * (alpha * abs + beta)) : 0);
                    double err = Math.Abs(got[i * n + j] - expected);
                    worst = Math.Max(worst, err / Math.Max(bound, 1e-30));
                    Assert.That(err, Is.LessThanOrEqualTo(bound), $"C[{i}, {j}]");
                }
            }
            TestContext.Out.WriteLine($"worst error / bound {worst:F3}");
        }
        finally
        {
            _gpu.Memory.Free(tc); _gpu.Memory.Free(tb); _gpu.Memory.Free(ta);
        }
    }

    private T[] Download<T>(Tensor t) where T : unmanaged
    {
        var v = new T[t.Count];
        _gpu.Download<T>(t, v);
        return v;
    }

    [Test]
    public void AnOutputDtypeThatIsNeitherTheInputsNorF32IsRejected()
    {
        var a = _gpu.Memory.Allocate(DType.F32, 2, 3);
        var b = _gpu.Memory.Allocate(DType.F32, 3, 2);
        var c = _gpu.Memory.Allocate(DType.BF16, 2, 2);
        var bb = _gpu.Memory.Allocate(DType.BF16, 3, 2);
        try
        {
            Assert.That(() => _gpu.Matmul(a, false, b, false, c), Throws.ArgumentException.With.Message.Contains("C is BF16 with F32 inputs"));
            Assert.That(() => _gpu.Matmul(a, false, bb, false, c), Throws.ArgumentException.With.Message.Contains("mixed dtypes"));
        }
        finally
        {
            _gpu.Memory.Free(bb); _gpu.Memory.Free(c); _gpu.Memory.Free(b); _gpu.Memory.Free(a);
        }
    }
}
