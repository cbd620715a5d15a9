using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>CpuOps: the Tensor-level wrapper over the references — shapes, dtypes, and the parts it adds itself.</summary>
public class CpuOpsTests
{
    private static double[] Rand(int n, int seed)
    {
        var r = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => r.NextDouble() * 2 - 1).ToArray();
    }

    [TestCase(false, false)]
    [TestCase(true, false)]
    [TestCase(false, true)]
    [TestCase(true, true)]
    public void MatmulAgreesInF32AndF64WithAHandLoop(bool ta, bool tb)
    {
        using var ops = new CpuOps();
        const int m = 5, n = 3, k = 7;
        double[] a = Rand(m * k, 1), b = Rand(k * n, 2), c0 = Rand(m * n, 3);
        var expected = new double[m * n];
        for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
        {
            double s = 0;
            for (int p = 0; p < k; p++) s += (ta ? a[p * m + i] : a[i * k + p]) * (tb ? b[j * k + p] : b[p * n + j]);
            expected[i * n + j] = 0.5 * s - 2 * c0[i * n + j];
        }
        foreach (var dtype in new[] { DType.F64, DType.F32 })
        {
            var A = ops.Memory.Allocate(dtype, ta ? [k, m] : [m, k]);
            var B = ops.Memory.Allocate(dtype, tb ? [n, k] : [k, n]);
            var C = ops.Memory.Allocate(dtype, m, n);
            Upload(ops, A, a); Upload(ops, B, b); Upload(ops, C, c0);
            ops.Matmul(A, ta, B, tb, C, 0.5, -2);
            var got = new double[m * n];
            var tmp = ops.Memory.Allocate(DType.F64, m, n);
            ops.Copy(C, tmp);
            ops.Download<double>(tmp, got);
            for (int i = 0; i < got.Length; i++)
                Assert.That(got[i], Is.EqualTo(expected[i]).Within(dtype == DType.F64 ? 1e-13 : 1e-5), $"{dtype} C[{i}]");
            foreach (var t in new[] { A, B, C, tmp }) ops.Memory.Free(t);
        }
        Assert.That(ops.Memory.AllocatedBytes, Is.EqualTo(0));
    }

    private static void Upload(CpuOps ops, Tensor t, double[] values)
    {
        var f64 = ops.Memory.Allocate(DType.F64, values.Length);
        ops.Upload<double>(values, f64);
        ops.Copy(f64, t);
        ops.Memory.Free(f64);
    }

    [Test]
    public void MatmulRejectsMismatchedShapesNamingThem()
    {
        using var ops = new CpuOps();
        var a = ops.Memory.Allocate(DType.F32, 2, 3);
        var b = ops.Memory.Allocate(DType.F32, 4, 5);
        var c = ops.Memory.Allocate(DType.F32, 2, 5);
        Assert.That(() => ops.Matmul(a, false, b, false, c), Throws.ArgumentException.With.Message.Contains("inner dimensions"));
    }

    [Test]
    public void CopyConvertsToBf16WithRoundToNearestEven()
    {
        using var ops = new CpuOps();
        // 1 + 2^-8 is halfway between two bf16 values (1 and 1 + 2^-7): ties to even → 1.0; 1 + 3·2^-8 → 1 + 2^-6.
        float[] values = [1f + 1f / 256, 1f + 3f / 256, -2.5f];
        var f = ops.Memory.Allocate(DType.F32, 3);
        var h = ops.Memory.Allocate(DType.BF16, 3);
        ops.Upload<float>(values, f);
        ops.Copy(f, h);
        var got = new BFloat16[3];
        ops.Download<BFloat16>(h, got);
        Assert.That(got.Select(x => x.ToSingle()), Is.EqualTo(new[] { 1f, 1f + 1f / 64, -2.5f }));
    }

    [Test]
    public void CopyWidensBf16ExactlyIncludingTheTailAndSpecials()
    {
        using var ops = new CpuOps();
        // 8-wide vector body plus a tail of 3; the bit patterns include ±0, ±inf, a NaN, a subnormal and the extremes.
        ushort[] bits = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F80, 0xC020, 0x7F7F, 0xFF7F, 0x4049];
        var h = ops.Memory.Allocate(DType.BF16, bits.Length);
        var f = ops.Memory.Allocate(DType.F32, bits.Length);
        ops.Upload<BFloat16>(System.Runtime.InteropServices.MemoryMarshal.Cast<ushort, BFloat16>(bits).ToArray(), h);
        ops.Copy(h, f);
        var got = new float[bits.Length];
        ops.Download<float>(f, got);
        // bf16 is the high half of an fp32: the float's bits are the bf16 bits shifted left by 16.
        Assert.That(got.Select(BitConverter.SingleToUInt32Bits), Is.EqualTo(bits.Select(b => (uint)b << 16)));
        Assert.That(got[6], Is.EqualTo(1f));
        Assert.That(got[7], Is.EqualTo(-2.5f));
    }

    [Test]
    public void ElementwiseAddAxpyScaleMatchAScalarLoopBitForBit()
    {
        using var ops = new CpuOps();
        const int n = 37; // vector body and a tail
        float[] a = Rand(n, 70).Select(x => (float)x).ToArray(), b = Rand(n, 71).Select(x => (float)(x * 1e3)).ToArray();
        var ta = ops.Memory.Allocate(DType.F32, n); var tb = ops.Memory.Allocate(DType.F32, n); var tc = ops.Memory.Allocate(DType.F32, n);
        ops.Upload<float>(a, ta); ops.Upload<float>(b, tb);
        ops.Add(ta, tb, tc);
        var got = new float[n];
        ops.Download<float>(tc, got);
        Assert.That(got, Is.EqualTo(a.Zip(b, (x, y) => x + y)));
        ops.Axpy(0.3, ta, tb);                      // b += 0.3f · a, multiply then add (not fused)
        ops.Download<float>(tb, got);
        Assert.That(got, Is.EqualTo(a.Zip(b, (x, y) => y + 0.3f * x)));
        ops.Scale(ta, -1.7);
        ops.Download<float>(ta, got);
        Assert.That(got, Is.EqualTo(a.Select(x => x * -1.7f)));
    }

    [TestCase(1)]
    [TestCase(7)]
    [TestCase(3 * 16 * 1024 + 5)] // several parallel chunks and a partial Philox block at the end
    public void DropoutMaskIsTheKernelsPhiloxStreamForAnyThreadCount(int n)
    {
        const ulong seed = 0x1234_5678_9ABCUL;
        var want = new byte[n];
        GpuElementwiseOps.DropoutMaskHost(want, seed, 0, 0.3); // element by element, as documented for the kernel
        foreach (int degree in new[] { 1, 0, 3 })
        {
            NativePeft.Ops.Reference.RefParallel.MaxDegreeOverride = degree;
            try
            {
                var got = new byte[n];
                CpuOps.DropoutMask(got, seed, 0.3);
                Assert.That(got, Is.EqualTo(want), $"{degree} threads");
            }
            finally { NativePeft.Ops.Reference.RefParallel.MaxDegreeOverride = 0; }
        }
        // Through the op: the mask it writes, and y = x · (float)(1/(1 − p)) where kept.
        using var ops = new CpuOps();
        var x = ops.Memory.Allocate(DType.F32, n); var mask = ops.Memory.Allocate(DType.U8, n); var y = ops.Memory.Allocate(DType.F32, n);
        float[] xs = Rand(n, 90).Select(v => (float)v).ToArray();
        ops.Upload<float>(xs, x);
        ops.Dropout(x, mask, 0.3, seed, y);
        var m = new byte[n]; var ys = new float[n];
        ops.Download<byte>(mask, m); ops.Download<float>(y, ys);
        Assert.That(m, Is.EqualTo(want));
        float k = (float)(1 / (1 - 0.3));
        Assert.That(ys, Is.EqualTo(xs.Select((v, i) => want[i] != 0 ? v * k : 0f)));
    }

    [Test]
    public void DequantizeRowRangeEqualsTheSameRowsOfTheWholeWeight()
    {
        using var ops = new CpuOps();
        const int rows = 6, cols = 64;
        var w = Rand(rows * cols, 4).Select(x => (float)x).ToArray();
        var q = Quantized4BitTensor.Quantize<float>(w, [rows, cols], QuantType.Nf4, 64, doubleQuant: false, DType.F32);
        var packed = ops.Memory.Allocate(DType.U8, q.Packed.Length);
        var absmax = ops.Memory.Allocate(DType.F32, q.State.Absmax!.Length);
        ops.Upload<byte>(q.Packed, packed);
        ops.Upload<float>(q.State.Absmax, absmax);
        var qw = new QuantizedWeight { Packed = packed, Absmax = absmax, QuantType = QuantType.Nf4, Blocksize = 64, Rows = rows, Columns = cols };
        var all = q.DequantizeToSingle();
        var part = ops.Memory.Allocate(DType.F32, 2, cols);
        ops.Dequantize4bit(qw, 3, part);
        var got = new float[2 * cols];
        ops.Download<float>(part, got);
        Assert.That(got, Is.EqualTo(all.AsSpan(3 * cols, 2 * cols).ToArray()));
        Assert.That(() => ops.Dequantize4bit(qw, 5, part), Throws.ArgumentException);
    }

    [Test]
    public void MemoryCountsBytesAndPeak()
    {
        using var ops = new CpuOps();
        var a = ops.Memory.Allocate(DType.F32, 10, 10);
        var b = ops.Memory.Allocate(DType.BF16, 8);
        Assert.That(ops.Memory.AllocatedBytes, Is.EqualTo(416));
        ops.Memory.Free(a);
        Assert.That(ops.Memory.AllocatedBytes, Is.EqualTo(16));
        Assert.That(ops.Memory.PeakAllocatedBytes, Is.EqualTo(416));
        Assert.That(() => ops.Memory.Free(a), Throws.InvalidOperationException);
        ops.Memory.Free(b);
    }
}
