using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>
/// Attention for queries at an offset (decoding with a KV cache): <see cref="AttentionRef.ForwardCached{T}"/>,
/// <see cref="CpuOps.AttentionForwardCached"/> and the attention_forward_cached kernels. The oracle is the full causal
/// forward over the whole sequence: query row i of a cached call at keyLen must equal row keyLen − queryLen + i of it.
/// On the CPU (same operations in the same order) and in the kernel (the same per-row arithmetic over the same key
/// tiles) that equality is exact; the full forward itself is checked against independent references in
/// CpuOpsTests / GpuAttentionOpsTests. A plain float64 softmax loop here is a second, independent oracle.
/// </summary>
public class AttentionCachedReferenceTests
{
    /// <summary>(T, Hq, Hkv, D) and the query lengths tried at the end of each sequence.</summary>
    private static readonly (int T, int Hq, int Hkv, int D)[] Shapes = [(1, 2, 1, 4), (9, 4, 2, 8), (40, 4, 4, 16), (70, 8, 2, 32)];

    internal static float[] Random(int n, int seed, double scale)
    {
        var rng = new Random(seed);
        var r = new float[n];
        for (int i = 0; i < n; i++) r[i] = (float)((rng.NextDouble() * 2 - 1) * scale);
        return r;
    }

    /// <summary>Rows [first, first + count) of every batch entry of x [B, T, width] as [B, count, width].</summary>
    internal static T[] Rows<T>(T[] x, int batch, int seqLen, int width, int first, int count)
    {
        var r = new T[batch * count * width];
        for (int b = 0; b < batch; b++)
            Array.Copy(x, ((long)b * seqLen + first) * width, r, (long)b * count * width, (long)count * width);
        return r;
    }

    [Test]
    public void CachedRowsEqualTheFullForwardBitForBit([Values] bool f64)
    {
        const int B = 2;
        foreach (var (T, Hq, Hkv, D) in Shapes)
        {
            var q = Random(B * T * Hq * D, T, 1.5);
            var k = Random(B * T * Hkv * D, T + 1, 1.0);
            var v = Random(B * T * Hkv * D, T + 2, 1.0);
            foreach (int keyLen in new[] { 1, T / 2 + 1, T })
            foreach (int queryLen in new[] { 1, Math.Max(1, keyLen / 3), keyLen })
            {
                if (queryLen > keyLen) continue;
                var kk = Rows(k, B, T, Hkv * D, 0, keyLen);
                var vv = Rows(v, B, T, Hkv * D, 0, keyLen);
                var qFull = Rows(q, B, T, Hq * D, 0, keyLen);
                var qNew = Rows(qFull, B, keyLen, Hq * D, keyLen - queryLen, queryLen);
                if (f64) Check<double>(qFull, qNew, kk, vv);
                else Check<float>(qFull, qNew, kk, vv);

                void Check<TE>(float[] qf, float[] qn, float[] kf, float[] vf) where TE : unmanaged, System.Numerics.IFloatingPointIeee754<TE>
                {
                    TE[] C(float[] a) => Array.ConvertAll(a, x => TE.CreateChecked(x));
                    var full = new TE[qf.Length];
                    var fullLse = new TE[B * Hq * keyLen];
                    AttentionRef.Forward<TE>(C(qf), C(kf), C(vf), full, fullLse, B, keyLen, Hq, Hkv, D);
                    var cached = new TE[qn.Length];
                    var lse = new TE[B * Hq * queryLen];
                    AttentionRef.ForwardCached<TE>(C(qn), C(kf), C(vf), cached, lse, B, queryLen, keyLen, Hq, Hkv, D);
                    var expected = Rows(full, B, keyLen, Hq * D, keyLen - queryLen, queryLen);
                    Assert.That(cached, Is.EqualTo(expected), $"T {T} keyLen {keyLen} queryLen {queryLen}: output");
                    for (int b = 0; b < B; b++)
                    for (int h = 0; h < Hq; h++)
                    for (int i = 0; i < queryLen; i++)
                        Assert.That(lse[(b * Hq + h) * queryLen + i], Is.EqualTo(fullLse[(b * Hq + h) * keyLen + keyLen - queryLen + i]), "lse");
                    // Without lse: the same output.
                    var noLse = new TE[qn.Length];
                    AttentionRef.ForwardCached<TE>(C(qn), C(kf), C(vf), noLse, default, B, queryLen, keyLen, Hq, Hkv, D);
                    Assert.That(noLse, Is.EqualTo(cached));
                }
            }
        }
    }

    [Test]
    public void CachedRowsMatchAPlainSoftmax()
    {
        // B 1, Hq 4, Hkv 2 (GQA), D 8, keyLen 11, queryLen 3: a direct float64 softmax(q·k/√D)·v per row.
        const int Hq = 4, Hkv = 2, D = 8, Tk = 11, Tq = 3;
        var q = Array.ConvertAll(Random(Tq * Hq * D, 5, 1.5), x => (double)x);
        var k = Array.ConvertAll(Random(Tk * Hkv * D, 6, 1.0), x => (double)x);
        var v = Array.ConvertAll(Random(Tk * Hkv * D, 7, 1.0), x => (double)x);
        var output = new double[q.Length];
        using var ops = new CpuOps();
        var tq = ops.Memory.Allocate(DType.F64, Tq, Hq * D);
        var tk = ops.Memory.Allocate(DType.F64, Tk, Hkv * D);
        var tv = ops.Memory.Allocate(DType.F64, Tk, Hkv * D);
        var to = ops.Memory.Allocate(DType.F64, Tq, Hq * D);
        ops.Upload<double>(q, tq); ops.Upload<double>(k, tk); ops.Upload<double>(v, tv);
        ops.AttentionForwardCached(tq, tk, tv, to, null, 1, Tq, Tk, Hq, Hkv, D);
        ops.Download<double>(to, output);
        for (int i = 0; i < Tq; i++)
        for (int h = 0; h < Hq; h++)
        {
            int g = h / (Hq / Hkv), last = Tk - Tq + i;
            var s = new double[last + 1];
            for (int j = 0; j <= last; j++)
            {
                double dot = 0;
                for (int d = 0; d < D; d++) dot += q[(i * Hq + h) * D + d] * k[(j * Hkv + g) * D + d];
                s[j] = dot / Math.Sqrt(D);
            }
            double max = s.Max(), sum = s.Sum(x => Math.Exp(x - max));
            for (int d = 0; d < D; d++)
            {
                double o = 0;
                for (int j = 0; j <= last; j++) o += Math.Exp(s[j] - max) / sum * v[(j * Hkv + g) * D + d];
                Assert.That(output[(i * Hq + h) * D + d], Is.EqualTo(o).Within(1e-13), $"row {i} head {h} d {d}");
            }
        }
    }

    [Test]
    public void RejectsMoreQueriesThanKeys()
    {
        var a = new float[64];
        Assert.Throws<ArgumentOutOfRangeException>(() => AttentionRef.ForwardCached<float>(a, a, a, a, default, 1, 3, 2, 2, 1, 4));
    }
}

/// <summary>The attention_forward_cached kernels (emulator always, CUDA when present) against the full-forward kernel and the CPU reference.</summary>
public sealed class AttentionCachedKernelTests(string device) : DeviceFixture<GpuAttentionOps>(device)
{
    protected override GpuAttentionOps CreateOps(IGpu gpu) => new(gpu);

    protected override IEnumerable<string> RequiredKernels =>
        ["attention_forward_f32", "attention_forward_bf16", "attention_forward_cached_f32", "attention_forward_cached_bf16"];

    private static readonly (int T, int Hq, int Hkv, int D)[] Shapes = [(1, 4, 2, 32), (20, 4, 2, 16), (45, 8, 1, 32), (70, 4, 4, 64)];

    [Test]
    public void CachedRowsEqualTheFullForwardKernelBitForBit([Values("F32", "BF16")] string dtypeName)
    {
        var dtype = Enum.Parse<DType>(dtypeName);
        const int B = 2;
        foreach (var (T, Hq, Hkv, D) in Shapes)
        {
            var q = AttentionCachedReferenceTests.Random(B * T * Hq * D, T, 1.5);
            var k = AttentionCachedReferenceTests.Random(B * T * Hkv * D, T + 1, 1.0);
            var v = AttentionCachedReferenceTests.Random(B * T * Hkv * D, T + 2, 1.0);
            var full = Download(Run(q, k, v, T, T, T, Hq, Hkv, D, dtype, out var fullLse, cached: false), B * T * Hq * D, dtype);
            var fullLseHost = Download<float>(fullLse, B * Hq * T);
            foreach (int queryLen in new[] { 1, 3, 33, T }.Where(x => x <= T).Distinct())
            {
                var qNew = AttentionCachedReferenceTests.Rows(q, B, T, Hq * D, T - queryLen, queryLen);
                var cached = Download(Run(qNew, k, v, queryLen, T, T, Hq, Hkv, D, dtype, out var lse), B * queryLen * Hq * D, dtype);
                var lseHost = Download<float>(lse, B * Hq * queryLen);
                Assert.That(cached, Is.EqualTo(AttentionCachedReferenceTests.Rows(full, B, T, Hq * D, T - queryLen, queryLen)),
                    $"{dtype} T {T} queryLen {queryLen}");
                for (int b = 0; b < B; b++)
                for (int h = 0; h < Hq; h++)
                for (int i = 0; i < queryLen; i++)
                    Assert.That(lseHost[(b * Hq + h) * queryLen + i], Is.EqualTo(fullLseHost[(b * Hq + h) * T + T - queryLen + i]), "lse");
            }
        }
    }

    [Test]
    public void CachedKernelMatchesTheCpuReference()
    {
        // F32 kernel vs AttentionRef.ForwardCached in float64 on the same values; keyLen 37 of a [B, 37] cache, 1 and 5 queries.
        const int B = 2, Tk = 37, Hq = 4, Hkv = 2, D = 32;
        var k = AttentionCachedReferenceTests.Random(B * Tk * Hkv * D, 3, 1.0);
        var v = AttentionCachedReferenceTests.Random(B * Tk * Hkv * D, 4, 1.0);
        foreach (int Tq in new[] { 1, 5 })
        {
            var q = AttentionCachedReferenceTests.Random(B * Tq * Hq * D, 5 + Tq, 1.5);
            var got = Download(Run(q, k, v, Tq, Tk, Tk, Hq, Hkv, D, DType.F32, out _), B * Tq * Hq * D, DType.F32);
            var expected = new double[got.Length];
            AttentionRef.ForwardCached<double>(Array.ConvertAll(q, x => (double)x), Array.ConvertAll(k, x => (double)x),
                Array.ConvertAll(v, x => (double)x), expected, default, B, Tq, Tk, Hq, Hkv, D);
            for (int i = 0; i < got.Length; i++)
                Assert.That(got[i], Is.EqualTo(expected[i]).Within(2e-5 * (1 + Math.Abs(expected[i]))), $"Tq {Tq} element {i}");
        }
    }

    [Test]
    public void HostOverloadAgreesWithTheDevicePointerPath()
    {
        const int Tq = 2, Tk = 9, Hq = 2, Hkv = 1, D = 8;
        var q = AttentionCachedReferenceTests.Random(Tq * Hq * D, 1, 1.5);
        var k = AttentionCachedReferenceTests.Random(Tk * Hkv * D, 2, 1.0);
        var v = AttentionCachedReferenceTests.Random(Tk * Hkv * D, 3, 1.0);
        var o = new float[q.Length];
        var lse = new float[Hq * Tq];
        Ops.ForwardCached<float>(q, k, v, o, lse, 1, Tq, Tk, Hq, Hkv, D);
        var viaPtr = Download(Run(q, k, v, Tq, Tk, Tk, Hq, Hkv, D, DType.F32, out var l2, batch: 1), o.Length, DType.F32);
        Assert.That(o, Is.EqualTo(viaPtr));
        Assert.That(lse, Is.EqualTo(Download<float>(l2, Hq * Tq)));
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.ForwardCached<float>(q, k, v, o, lse, 1, Tk + 1, Tk, Hq, Hkv, D));
    }

    /// <summary>Uploads, launches attention_forward over T (not cached) or attention_forward_cached (Tq, Tk), returns the output pointer.</summary>
    private DevicePtr Run(float[] q, float[] k, float[] v, int Tq, int Tk, int T, int Hq, int Hkv, int D, DType dtype, out DevicePtr lse,
        int batch = 2, bool cached = true)
    {
        var dq = Upload(q, dtype);
        var dk = Upload(k, dtype);
        var dv = Upload(v, dtype);
        var output = Alloc((long)batch * Tq * Hq * D * dtype.ElementSize());
        lse = Alloc((long)batch * Hq * Tq * sizeof(float));
        if (!cached)
            Ops.Forward(dtype, dq, dk, dv, output, lse, batch, T, Hq, Hkv, D);
        else
            Ops.ForwardCached(dtype, dq, dk, dv, output, lse, batch, Tq, Tk, Hq, Hkv, D);
        Gpu.Synchronize();
        return output;
    }
}
