using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>
/// GpuOps is wired to the right kernels with the right shapes: every IOps op on the device against CpuOps (the
/// references) in F32, on the same random inputs. (Each kernel's own accuracy is tested against the references in
/// float64 by its launcher's tests; these bounds only need to catch a wrong argument or a wrong kernel.)
/// </summary>
[TestFixture("emulator")]
[TestFixture("cuda")]
public class GpuOpsTests(string device)
{
    private GpuOps _gpu = null!;
    private CpuOps _cpu = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        var gpu = device == "emulator" ? TestGpus.CreateEmulated() : TestGpus.TryCreateCuda(out var reason) ?? Ignore(reason);
        _gpu = new GpuOps(gpu, ownsGpu: true);
        _cpu = new CpuOps();
    }

    private static NativePeft.Runtime.IGpu Ignore(string reason)
    {
        Assert.Ignore("no CUDA device: " + reason);
        return null!;
    }

    [OneTimeTearDown]
    public void TearDown() { _gpu?.Dispose(); _cpu?.Dispose(); }

    private sealed record Pair(Tensor G, Tensor C);

    private Pair Rand(int seed, double scale, params int[] shape)
    {
        var r = new Random(seed);
        var p = new Pair(_gpu.Memory.Allocate(DType.F32, shape), _cpu.Memory.Allocate(DType.F32, shape));
        var v = Enumerable.Range(0, (int)p.C.Count).Select(_ => (float)((r.NextDouble() * 2 - 1) * scale)).ToArray();
        _gpu.Upload<float>(v, p.G); _cpu.Upload<float>(v, p.C);
        return p;
    }

    private Pair Ints(int[] values)
    {
        var p = new Pair(_gpu.Memory.Allocate(DType.I32, values.Length), _cpu.Memory.Allocate(DType.I32, values.Length));
        _gpu.Upload<int>(values, p.G); _cpu.Upload<int>(values, p.C);
        return p;
    }

    private Pair Zeros(DType dtype, params int[] shape) => new(_gpu.Memory.Allocate(dtype, shape), _cpu.Memory.Allocate(dtype, shape));

    private void AssertClose(Pair p, double tol, string what)
    {
        var g = new float[p.C.Count]; var c = new float[p.C.Count];
        _gpu.Download<float>(p.G, g); _cpu.Download<float>(p.C, c);
        double scale = Math.Max(1e-6, c.Max(x => Math.Abs((double)x)));
        for (int i = 0; i < c.Length; i++)
            Assert.That(Math.Abs(g[i] - c[i]), Is.LessThanOrEqualTo(tol * scale), $"{what}[{i}]: gpu {g[i]} cpu {c[i]}");
    }

    private const double Tol = 1e-5;

    [Test]
    public void ElementwiseCopyAndMatmul()
    {
        var a = Rand(1, 1, 6, 5); var b = Rand(2, 1, 6, 5); var c = Zeros(DType.F32, 6, 5);
        _gpu.Add(a.G, b.G, c.G); _cpu.Add(a.C, b.C, c.C); AssertClose(c, Tol, "add");
        _gpu.Axpy(0.5, a.G, c.G); _cpu.Axpy(0.5, a.C, c.C); AssertClose(c, Tol, "axpy");
        _gpu.Scale(c.G, -3); _cpu.Scale(c.C, -3); AssertClose(c, Tol, "scale");
        var m = Zeros(DType.F32, 5, 5);
        _gpu.Matmul(a.G, true, b.G, false, m.G, 2, 0); _cpu.Matmul(a.C, true, b.C, false, m.C, 2, 0); AssertClose(m, Tol, "aᵀb");
        var n = Zeros(DType.F32, 6, 6);
        _gpu.Matmul(a.G, false, b.G, true, n.G); _cpu.Matmul(a.C, false, b.C, true, n.C); AssertClose(n, Tol, "abᵀ");
        var h = Zeros(DType.BF16, 6, 5); var back = Zeros(DType.F32, 6, 5);
        _gpu.Copy(a.G, h.G); _gpu.Copy(h.G, back.G); _cpu.Copy(a.C, h.C); _cpu.Copy(h.C, back.C);
        AssertClose(back, 0, "f32 → bf16 → f32");
        _gpu.Fill(c.G, 1.25); _cpu.Fill(c.C, 1.25); AssertClose(c, 0, "fill");
    }

    [Test]
    public void DropoutMasksAreTheSameOnBothDevices()
    {
        var x = Rand(3, 1, 40, 25); var y = Zeros(DType.F32, 40, 25); var mask = Zeros(DType.U8, 1000);
        _gpu.Dropout(x.G, mask.G, 0.3, 1234, y.G); _cpu.Dropout(x.C, mask.C, 0.3, 1234, y.C);
        var mg = new byte[1000]; var mc = new byte[1000];
        _gpu.Download<byte>(mask.G, mg); _cpu.Download<byte>(mask.C, mc);
        Assert.That(mg, Is.EqualTo(mc));
        Assert.That(mc.Count(b => b == 1), Is.InRange(700 - 75, 700 + 75), "keep fraction 0.7 (5σ)");
        AssertClose(y, Tol, "dropout");
        _gpu.DropoutBackward(x.G, mask.G, 0.3, y.G); _cpu.DropoutBackward(x.C, mask.C, 0.3, y.C);
        AssertClose(y, Tol, "dropout backward");
    }

    [Test]
    public void Dequantize4bitRows()
    {
        const int rows = 8, cols = 128;
        var w = Enumerable.Range(0, rows * cols).Select(i => (float)Math.Sin(i * 0.37)).ToArray();
        var q = Quantized4BitTensor.Quantize<float>(w, [rows, cols], QuantType.Nf4, 64, false, DType.F32);
        QuantizedWeight Upload(IOps ops)
        {
            var packed = ops.Memory.Allocate(DType.U8, q.Packed.Length);
            var absmax = ops.Memory.Allocate(DType.F32, q.State.Absmax!.Length);
            ops.Upload<byte>(q.Packed, packed); ops.Upload<float>(q.State.Absmax, absmax);
            return new QuantizedWeight { Packed = packed, Absmax = absmax, QuantType = QuantType.Nf4, Blocksize = 64, Rows = rows, Columns = cols };
        }
        var outp = Zeros(DType.F32, 3, cols);
        _gpu.Dequantize4bit(Upload(_gpu), 2, outp.G); _cpu.Dequantize4bit(Upload(_cpu), 2, outp.C);
        AssertClose(outp, 0, "dequantize rows 2..4");
    }

    [Test]
    public void NormRopeSwiGluEmbedding()
    {
        const int n = 6, c = 8, heads = 2, d = 4, v = 10;
        var x = Rand(4, 1, n, c); var w = Rand(5, 1, c); var y = Zeros(DType.F32, n, c); var rstd = Zeros(DType.F32, n);
        _gpu.RmsNormForward(x.G, w.G, y.G, rstd.G, 1e-5); _cpu.RmsNormForward(x.C, w.C, y.C, rstd.C, 1e-5);
        AssertClose(y, Tol, "rmsnorm y"); AssertClose(rstd, Tol, "rmsnorm rstd");
        var dy = Rand(6, 1, n, c); var dx = Zeros(DType.F32, n, c); var dw = Zeros(DType.F32, c);
        _gpu.RmsNormBackward(dy.G, x.G, w.G, rstd.G, dx.G, dw.G); _cpu.RmsNormBackward(dy.C, x.C, w.C, rstd.C, dx.C, dw.C);
        AssertClose(dx, Tol, "rmsnorm dx"); AssertClose(dw, Tol, "rmsnorm dw");

        var pos = Ints([0, 1, 2, 3, 4, 5]);
        var inv = NativePeft.Ops.Reference.RopeRef.InverseFrequencies<float>(d, 10000.0);
        var cosv = new float[8 * d / 2]; var sinv = new float[8 * d / 2];
        NativePeft.Ops.Reference.RopeRef.Tables<float>(8, inv, cosv, sinv);
        var cos = Zeros(DType.F32, 8, d / 2); var sin = Zeros(DType.F32, 8, d / 2);
        foreach (var (t, vals) in new[] { (cos, cosv), (sin, sinv) }) { _gpu.Upload<float>(vals, t.G); _cpu.Upload<float>(vals, t.C); }
        _gpu.RopeForward(y.G, pos.G, cos.G, sin.G, heads, d); _cpu.RopeForward(y.C, pos.C, cos.C, sin.C, heads, d);
        AssertClose(y, Tol, "rope");
        _gpu.RopeBackward(y.G, pos.G, cos.G, sin.G, heads, d); _cpu.RopeBackward(y.C, pos.C, cos.C, sin.C, heads, d);
        AssertClose(y, Tol, "rope backward");

        var g = Rand(7, 3, n, c); var u = Rand(8, 1, n, c); var h = Zeros(DType.F32, n, c);
        _gpu.SwiGluForward(g.G, u.G, h.G); _cpu.SwiGluForward(g.C, u.C, h.C); AssertClose(h, Tol, "swiglu");
        var dg = Zeros(DType.F32, n, c); var du = Zeros(DType.F32, n, c);
        _gpu.SwiGluBackward(dy.G, g.G, u.G, dg.G, du.G); _cpu.SwiGluBackward(dy.C, g.C, u.C, dg.C, du.C);
        AssertClose(dg, Tol, "swiglu dg"); AssertClose(du, Tol, "swiglu du");

        var ids = Ints([3, 0, 9, 3, 3, 7]); var table = Rand(9, 1, v, c); var e = Zeros(DType.F32, n, c);
        _gpu.EmbeddingForward(ids.G, table.G, e.G); _cpu.EmbeddingForward(ids.C, table.C, e.C); AssertClose(e, 0, "embedding");
        var dt = Zeros(DType.F32, v, c);
        _gpu.EmbeddingBackward(ids.G, dy.G, dt.G); _cpu.EmbeddingBackward(ids.C, dy.C, dt.C); AssertClose(dt, Tol, "embedding backward");
    }

    [Test]
    public void AttentionAndCrossEntropy()
    {
        const int b = 2, t = 5, hq = 4, hkv = 2, d = 8, c = 16, v = 37;
        var q = Rand(10, 1, b * t, hq * d); var k = Rand(11, 1, b * t, hkv * d); var vv = Rand(12, 1, b * t, hkv * d);
        var o = Zeros(DType.F32, b * t, hq * d); var lse = Zeros(DType.F32, b, hq, t);
        _gpu.AttentionForward(q.G, k.G, vv.G, o.G, lse.G, b, t, hq, hkv, d); _cpu.AttentionForward(q.C, k.C, vv.C, o.C, lse.C, b, t, hq, hkv, d);
        AssertClose(o, Tol, "attention out"); AssertClose(lse, Tol, "attention lse");
        var dout = Rand(13, 1, b * t, hq * d);
        var dq = Zeros(DType.F32, b * t, hq * d); var dk = Zeros(DType.F32, b * t, hkv * d); var dv = Zeros(DType.F32, b * t, hkv * d);
        _gpu.AttentionBackward(dout.G, q.G, k.G, vv.G, o.G, lse.G, dq.G, dk.G, dv.G, b, t, hq, hkv, d);
        _cpu.AttentionBackward(dout.C, q.C, k.C, vv.C, o.C, lse.C, dq.C, dk.C, dv.C, b, t, hq, hkv, d);
        AssertClose(dq, Tol, "dq"); AssertClose(dk, Tol, "dk"); AssertClose(dv, Tol, "dv");

        var hidden = Rand(14, 1, b * t, c); var w = Rand(15, 0.5, v, c);
        var labels = Ints([1, 5, -100, 36, 0, 2, 2, -100, 30, 9]);
        var lse2 = Zeros(DType.F32, b * t);
        var lg = _gpu.CrossEntropyForward(hidden.G, w.G, labels.G, lse2.G, 8);
        var lc = _cpu.CrossEntropyForward(hidden.C, w.C, labels.C, lse2.C, 8);
        Assert.That(lg.Count, Is.EqualTo(8)); Assert.That(lc.Count, Is.EqualTo(8));
        Assert.That(lg.Loss, Is.EqualTo(lc.Loss).Within(1e-5 * lc.Loss));
        AssertClose(lse2, Tol, "ce lse");
        var dh = Zeros(DType.F32, b * t, c); var dw = Zeros(DType.F32, v, c);
        _gpu.CrossEntropyBackward(hidden.G, w.G, labels.G, lse2.G, 1.0, dh.G, dw.G, 8);
        _cpu.CrossEntropyBackward(hidden.C, w.C, labels.C, lse2.C, 1.0, dh.C, dw.C, 8);
        AssertClose(dh, Tol, "ce dhidden"); AssertClose(dw, Tol, "ce dW");
    }
}
