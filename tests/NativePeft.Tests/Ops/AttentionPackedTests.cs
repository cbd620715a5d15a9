using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// Packed sequences in every training attention kernel (kernels/attention.cu, attention_tc.cu, attention_tc_bwd.cu)
/// through <see cref="GpuAttentionOps"/> with a positions buffer, on the emulator and, when present, a CUDA device.
/// <para>
/// Layout: batch 2, T = 140, row 0 holds documents of 5, 64, 1 and 70 tokens (starts 0, 5, 69, 70: inside 16- and
/// 64-key tiles and across their boundaries), row 1 documents of 64, 7, 57 and 12 (starts 0, 64, 71, 128). Each
/// document is also run alone (batch 1, T = its length) through the same kernel.
/// </para>
/// <para>
/// What must hold, and why:
/// <list type="bullet">
/// <item>fp32-arithmetic kernels (f32 and bf16 storage): a row's sums run over the same keys in the same order as for the
/// document alone, so dq, dk, dv (given the same out, lse, delta) are bit-identical for every document, and the forward
/// for documents that start at a multiple of its 16-key tile. Other documents see their keys grouped into other tiles by
/// the online softmax: f32 outputs must then meet the a-priori fp32 bound of GpuAttentionOpsTests against a float64
/// softmax over the document only (u = 2^-24, es_max the worst fp32 score error, R the spread of the scores, nk / nkt the
/// keys / 16-key tiles a row sums over): out (2·es_max/u + 2R + 2nk + 6nkt + 10)·u·Σp|v|, lse es_max + u·(R + nk + 3nkt +
/// 4 + 2|log l| + |lse|); bf16 outputs, roundings of fp32 values that close, must be within 1 bf16 ulp of the alone run.</item>
/// <item>tensor-core kernels (bf16, D 64 and 128): bit-identical to the document alone for documents that start at a
/// multiple of 64 (the same MMAs on the same operands; the other rows' keys enter only as exact zeros), and every
/// document within the bf16-operand bounds of AttentionTcForwardTests / AttentionTcBackwardTests against the float64
/// reference restricted to the document; on the emulator the same bits again under all race checks.</item>
/// </list>
/// </para>
/// </summary>
public sealed class AttentionPackedTests(string device) : DeviceFixture<GpuAttentionOps>(device)
{
    private const int B = 2, T = 140;
    private const double U32 = 1.0 / (1 << 24);
    private const double U16 = 1.0 / 256;
    private static readonly int[][] DocumentLengths = [[5, 64, 1, 70], [64, 7, 57, 12]];

    private GpuAttentionOps? _tc;

    /// <summary>The fp32-arithmetic kernels for every shape.</summary>
    protected override GpuAttentionOps CreateOps(IGpu gpu) => new(gpu, tensorCores: false);

    private GpuAttentionOps Tc => _tc ??= new GpuAttentionOps(Gpu, tensorCores: true);

    protected override IEnumerable<string> RequiredKernels =>
        ["attention_forward_f32", "attention_backward_dkdv_bf16", "attention_backward_dq_f32",
         "attention_fwd_tc_packed_d64_bf16", "attention_fwd_tc_packed_d128_bf16", "attention_bwd_dkdv_tc_d128_bf16",
         "attention_bwd_dq_tc_d64_bf16"];

    // ------------------------------------------------------------------------------------------
    // Layout and problems
    // ------------------------------------------------------------------------------------------

    /// <summary>(batch row, start, length) of every document.</summary>
    private static IEnumerable<(int Row, int Start, int Len)> Documents()
    {
        for (int b = 0; b < B; b++)
        {
            int start = 0;
            foreach (int n in DocumentLengths[b]) { yield return (b, start, n); start += n; }
        }
    }

    /// <summary>Positions [B, T]: 0, 1, … inside each document.</summary>
    private static int[] Positions()
    {
        var pos = new int[B * T];
        foreach (var (row, start, len) in Documents())
            for (int i = 0; i < len; i++) pos[row * T + start + i] = i;
        return pos;
    }

    private sealed record Problem(DType DType, int Hq, int Hkv, int D, float[] Q, float[] K, float[] V, float[] Dout);

    private static Problem Make(DType dtype, int hq, int hkv, int d, int seed) =>
        new(dtype, hq, hkv, d,
            Representable(Normal(B * T * hq * d, seed, 1.5), dtype), Representable(Normal(B * T * hkv * d, seed + 1), dtype),
            Representable(Normal(B * T * hkv * d, seed + 2), dtype), Representable(Normal(B * T * hq * d, seed + 3), dtype));

    /// <summary>Rows start .. start + len − 1 of batch row <paramref name="row"/> of a [B, T, H, D] array, as [1, len, H, D].</summary>
    private static float[] Rows(float[] a, int row, int start, int len, int heads, int d)
    {
        int w = heads * d;
        var r = new float[len * w];
        Array.Copy(a, ((long)row * T + start) * w, r, 0, (long)len * w);
        return r;
    }

    /// <summary>The same rows of a [B, H, T] array (lse), as [1, H, len].</summary>
    private static float[] LseRows(float[] a, int row, int start, int len, int heads)
    {
        var r = new float[heads * len];
        for (int h = 0; h < heads; h++) Array.Copy(a, ((long)row * heads + h) * T + start, r, (long)h * len, len);
        return r;
    }

    // ------------------------------------------------------------------------------------------
    // Device runs
    // ------------------------------------------------------------------------------------------

    private (float[] Out, float[] Lse) Forward(GpuAttentionOps ops, Problem p, float[] q, float[] k, float[] v, int batch, int t, int[]? pos)
    {
        int qn = batch * t * p.Hq * p.D, ln = batch * p.Hq * t;
        DevicePtr dq = Upload(q, p.DType), dk = Upload(k, p.DType), dv = Upload(v, p.DType);
        DevicePtr o = Alloc((long)qn * p.DType.ElementSize()), l = Alloc(ln * 4L);
        Gpu.Memset(o, 0x7f, (long)qn * p.DType.ElementSize());
        Gpu.Memset(l, 0x7f, ln * 4L);
        ops.Forward(p.DType, dq, dk, dv, o, l, batch, t, p.Hq, p.Hkv, p.D, pos is null ? DevicePtr.Null : Upload(pos));
        Gpu.Synchronize();
        return (Download(o, qn, p.DType), Download(l, ln, DType.F32));
    }

    private (float[] Dq, float[] Dk, float[] Dv) Backward(GpuAttentionOps ops, Problem p, float[] dout, float[] q, float[] k, float[] v,
                                                          float[] out_, float[] lse, int batch, int t, int[]? pos)
    {
        int qn = batch * t * p.Hq * p.D, kn = batch * t * p.Hkv * p.D, es = p.DType.ElementSize();
        DevicePtr ddo = Upload(dout, p.DType), dq_ = Upload(q, p.DType), dk_ = Upload(k, p.DType), dv_ = Upload(v, p.DType);
        DevicePtr o = Upload(out_, p.DType), l = Upload(lse);
        DevicePtr dq = Alloc((long)qn * es), dk = Alloc((long)kn * es), dv = Alloc((long)kn * es);
        Gpu.Memset(dq, 0x7f, (long)qn * es);  // poison: every element must be written
        Gpu.Memset(dk, 0x7f, (long)kn * es);
        Gpu.Memset(dv, 0x7f, (long)kn * es);
        DevicePtr work = Alloc(GpuAttentionOps.BackwardWorkspaceBytes(batch, t, p.Hq));
        ops.Backward(p.DType, ddo, dq_, dk_, dv_, o, l, dq, dk, dv, work, batch, t, p.Hq, p.Hkv, p.D,
            pos is null ? DevicePtr.Null : Upload(pos));
        Gpu.Synchronize();
        return (Download(dq, qn, p.DType), Download(dk, kn, p.DType), Download(dv, kn, p.DType));
    }

    /// <summary>Equal values (±0 alike), element by element.</summary>
    private static void AssertExact(float[] got, float[] expected, string what)
    {
        Assert.That(got, Has.Length.EqualTo(expected.Length), what);
        for (int i = 0; i < got.Length; i++)
            if (!(got[i] == expected[i]))
                Assert.Fail($"{what}[{i}]: packed {got[i]:R} != alone {expected[i]:R}");
    }

    // ------------------------------------------------------------------------------------------
    // float64 reference over each row's document
    // ------------------------------------------------------------------------------------------

    /// <summary>The float64 forward restricted to documents, and the error bounds of both kernel families.</summary>
    private sealed class ForwardReference
    {
        public required double[] Out, Lse, BoundF32Out, BoundF32Lse, BoundTcOut, BoundTcLse;
    }

    private static ForwardReference ReferenceForward(Problem p, int[] pos)
    {
        int Dh = p.D, group = p.Hq / p.Hkv;
        double scale = GpuAttentionOps.Scale(Dh);
        var r = new ForwardReference
        {
            Out = new double[p.Q.Length], Lse = new double[B * p.Hq * T], BoundF32Out = new double[p.Q.Length],
            BoundF32Lse = new double[B * p.Hq * T], BoundTcOut = new double[p.Q.Length], BoundTcLse = new double[B * p.Hq * T],
        };
        var s = new double[T];
        for (int b = 0; b < B; b++)
            for (int h = 0; h < p.Hq; h++)
                for (int i = 0; i < T; i++)
                {
                    int hk = h / group, start = i - pos[b * T + i], nk = i - start + 1, nkt = i / 16 - start / 16 + 1;
                    long qBase = (((long)b * T + i) * p.Hq + h) * Dh;
                    double mx = double.NegativeInfinity, esMax = 0;
                    for (int j = start; j <= i; j++)
                    {
                        long kBase = (((long)b * T + j) * p.Hkv + hk) * Dh;
                        double dot = 0, mag = 0;
                        for (int d = 0; d < Dh; d++)
                        {
                            dot += (double)p.Q[qBase + d] * p.K[kBase + d];
                            mag += Math.Abs((double)p.Q[qBase + d] * p.K[kBase + d]);
                        }
                        s[j] = dot * scale;
                        mx = Math.Max(mx, s[j]);
                        esMax = Math.Max(esMax, (Dh + 2) * U32 * scale * mag);
                    }
                    double l = 0, spread = 0;
                    for (int j = start; j <= i; j++)
                    {
                        l += Math.Exp(s[j] - mx);
                        spread = Math.Max(spread, Math.Abs(s[j] - mx));
                    }
                    double lse = mx + Math.Log(l);
                    int li = (b * p.Hq + h) * T + i;
                    r.Lse[li] = lse;
                    r.BoundF32Lse[li] = esMax + U32 * (spread + nk + 3 * nkt + 4 + 2 * Math.Abs(Math.Log(l)) + Math.Abs(lse));
                    r.BoundTcLse[li] = esMax + Math.Pow(2, -18) * (1 + Math.Abs(lse));
                    for (int d = 0; d < Dh; d++)
                    {
                        double num = 0, a = 0;
                        for (int j = start; j <= i; j++)
                        {
                            double pj = Math.Exp(s[j] - mx) / l;
                            double vj = p.V[(((long)b * T + j) * p.Hkv + hk) * Dh + d];
                            num += pj * vj;
                            a += pj * Math.Abs(vj);
                        }
                        r.Out[qBase + d] = num;
                        r.BoundF32Out[qBase + d] = (2 * esMax / U32 + 2 * spread + 2 * nk + 6 * nkt + 10) * U32 * a + 1e-37;
                        r.BoundTcOut[qBase + d] = U16 * a + U16 * Math.Abs(num) + 2 * esMax * a + Math.Pow(2, -16) * a + 1e-30;
                    }
                }
        return r;
    }

    /// <summary>Worst |got − ref| / bound over the whole batch.</summary>
    private static double Worst(float[] got, double[] reference, double[] bound)
    {
        double w = 0;
        for (int i = 0; i < got.Length; i++)
            w = Math.Max(w, float.IsFinite(got[i]) ? Math.Abs(got[i] - reference[i]) / bound[i] : double.PositiveInfinity);
        return w;
    }

    /// <summary>
    /// The float64 gradients restricted to documents from the given out and lse, and the tensor-core bound
    /// (AttentionTcBackwardTests): (dq, bound, dk, bound, dv, bound).
    /// </summary>
    private static (double[] Dq, double[] BDq, double[] Dk, double[] BDk, double[] Dv, double[] BDv) ReferenceBackward(
        Problem p, float[] out_, float[] lse, int[] pos)
    {
        int Dh = p.D, group = p.Hq / p.Hkv;
        double scale = GpuAttentionOps.Scale(Dh);
        var dq = new double[p.Q.Length]; var bDq = new double[p.Q.Length];
        var dk = new double[p.K.Length]; var bDk = new double[p.K.Length];
        var dv = new double[p.K.Length]; var bDv = new double[p.K.Length];
        for (int b = 0; b < B; b++)
            for (int h = 0; h < p.Hq; h++)
            {
                int hk = h / group;
                for (int i = 0; i < T; i++)
                {
                    int qi = ((b * T + i) * p.Hq + h) * Dh, start = i - pos[b * T + i];
                    double lseI = lse[(b * p.Hq + h) * T + i];
                    double delta = 0, deltaMag = 0;
                    for (int d = 0; d < Dh; d++)
                    {
                        delta += (double)p.Dout[qi + d] * out_[qi + d];
                        deltaMag += Math.Abs((double)p.Dout[qi + d] * out_[qi + d]);
                    }
                    for (int j = start; j <= i; j++)
                    {
                        int kj = ((b * T + j) * p.Hkv + hk) * Dh;
                        double dot = 0, mag = 0, dp = 0, dpMag = 0;
                        for (int d = 0; d < Dh; d++)
                        {
                            dot += (double)p.Q[qi + d] * p.K[kj + d];
                            mag += Math.Abs((double)p.Q[qi + d] * p.K[kj + d]);
                            dp += (double)p.Dout[qi + d] * p.V[kj + d];
                            dpMag += Math.Abs((double)p.Dout[qi + d] * p.V[kj + d]);
                        }
                        double s = dot * scale, P = Math.Exp(s - lseI), ds = P * (dp - delta);
                        double eP = (Dh + 2) * U32 * scale * mag + Math.Pow(2, -21) * (1 + Math.Abs(s) + Math.Abs(lseI));
                        double eDs = P * (eP * Math.Abs(dp - delta) + (Dh + 1) * U32 * (dpMag + deltaMag));
                        double wDs = U16 * Math.Abs(ds) + eDs + Math.Pow(2, -16) * Math.Abs(ds);
                        for (int d = 0; d < Dh; d++)
                        {
                            double kd = p.K[kj + d], qd = p.Q[qi + d], od = p.Dout[qi + d];
                            dq[qi + d] += scale * ds * kd;
                            bDq[qi + d] += scale * wDs * Math.Abs(kd);
                            dk[kj + d] += scale * ds * qd;
                            bDk[kj + d] += scale * wDs * Math.Abs(qd);
                            dv[kj + d] += P * od;
                            bDv[kj + d] += (U16 + eP + Math.Pow(2, -16)) * P * Math.Abs(od);
                        }
                    }
                }
            }
        for (int i = 0; i < bDq.Length; i++) bDq[i] += U16 * Math.Abs(dq[i]) + 1e-30;
        for (int i = 0; i < bDk.Length; i++) { bDk[i] += U16 * Math.Abs(dk[i]) + 1e-30; bDv[i] += U16 * Math.Abs(dv[i]) + 1e-30; }
        return (dq, bDq, dk, bDk, dv, bDv);
    }

    // ------------------------------------------------------------------------------------------
    // fp32-arithmetic kernels
    // ------------------------------------------------------------------------------------------

    [TestCase(DType.F32, 4, 2, 32)]
    [TestCase(DType.F32, 4, 4, 7)]
    [TestCase(DType.BF16, 8, 2, 64)]
    public void Fp32Kernels_EachPackedDocumentEqualsTheDocumentAlone(DType dtype, int hq, int hkv, int d)
    {
        Problem p = Make(dtype, hq, hkv, d, seed: 11 * d + hq);
        int[] pos = Positions();
        var (out_, lse) = Forward(Ops, p, p.Q, p.K, p.V, B, T, pos);
        var reference = ReferenceForward(p, pos);
        double worstLse = Worst(lse, reference.Lse, reference.BoundF32Lse);
        TestContext.Out.WriteLine($"{Device} {dtype} D={d}: lse worst {worstLse:F3} of the fp32 bound");
        Assert.That(worstLse, Is.LessThanOrEqualTo(1.0), "packed lse vs the float64 softmax over each document");
        if (dtype == DType.F32)
        {
            double worstOut = Worst(out_, reference.Out, reference.BoundF32Out);
            TestContext.Out.WriteLine($"{Device} {dtype} D={d}: out worst {worstOut:F3} of the fp32 bound");
            Assert.That(worstOut, Is.LessThanOrEqualTo(1.0), "packed out vs the float64 softmax over each document");
        }

        var (dq, dk, dv) = Backward(Ops, p, p.Dout, p.Q, p.K, p.V, out_, lse, B, T, pos);
        foreach (var (row, start, len) in Documents())
        {
            string doc = $"document at ({row}, {start}), {len} tokens";
            var (outA, lseA) = Forward(Ops, p, Rows(p.Q, row, start, len, hq, d), Rows(p.K, row, start, len, hkv, d),
                Rows(p.V, row, start, len, hkv, d), 1, len, null);
            float[] outP = Rows(out_, row, start, len, hq, d), lseP = LseRows(lse, row, start, len, hq);
            if (start % GpuAttentionOps.ForwardKeyTile == 0)
            {
                AssertExact(outP, outA, $"out of the {doc}");
                AssertExact(lseP, lseA, $"lse of the {doc}");
            }
            else if (dtype == DType.BF16)
            {
                for (int i = 0; i < outP.Length; i++)
                    Assert.That(Math.Abs(Bf16Key(outP[i]) - Bf16Key(outA[i])), Is.LessThanOrEqualTo(1),
                        $"out of the {doc}, element {i}: {outP[i]:R} vs alone {outA[i]:R}");
            }

            // The backward from the same out and lse: bit-identical for every document.
            var (dqA, dkA, dvA) = Backward(Ops, p, Rows(p.Dout, row, start, len, hq, d), Rows(p.Q, row, start, len, hq, d),
                Rows(p.K, row, start, len, hkv, d), Rows(p.V, row, start, len, hkv, d), outP, lseP, 1, len, null);
            AssertExact(Rows(dq, row, start, len, hq, d), dqA, $"dq of the {doc}");
            AssertExact(Rows(dk, row, start, len, hkv, d), dkA, $"dk of the {doc}");
            AssertExact(Rows(dv, row, start, len, hkv, d), dvA, $"dv of the {doc}");
        }
    }

    [Test]
    public void Fp32Kernels_WithoutPositions_AttendAcrossDocuments()
    {
        // Control: the same inputs without positions (plain causal) give the later documents other outputs, so the
        // equality above is the mask's doing.
        Problem p = Make(DType.F32, 4, 2, 32, seed: 5);
        var (packed, _) = Forward(Ops, p, p.Q, p.K, p.V, B, T, Positions());
        var (causal, _) = Forward(Ops, p, p.Q, p.K, p.V, B, T, null);
        Assert.That(Rows(causal, 0, 0, 5, 4, 32), Is.EqualTo(Rows(packed, 0, 0, 5, 4, 32)), "the first document sees the same keys");
        Assert.That(Rows(causal, 0, 70, 70, 4, 32), Is.Not.EqualTo(Rows(packed, 0, 70, 70, 4, 32)), "the last document");
    }

    // ------------------------------------------------------------------------------------------
    // Tensor-core kernels
    // ------------------------------------------------------------------------------------------

    [TestCase(64, 4, 2)]
    [TestCase(128, 4, 1)]
    public void TensorCoreKernels_PackedDocumentsMatchTheReferenceAndTheDocumentAlone(int d, int hq, int hkv)
    {
        Problem p = Make(DType.BF16, hq, hkv, d, seed: 70 + d);
        int[] pos = Positions();
        DevicePtr probe = Alloc(16);
        Assert.That(Tc.UsesTensorCores(DType.BF16, d, probe), Is.True);

        // Forward: every document within the bf16-operand bound; 64-aligned documents bit-identical to alone.
        var (out_, lse) = Forward(Tc, p, p.Q, p.K, p.V, B, T, pos);
        var reference = ReferenceForward(p, pos);
        double wo = Worst(out_, reference.Out, reference.BoundTcOut), wl = Worst(lse, reference.Lse, reference.BoundTcLse);
        TestContext.Out.WriteLine($"{Device} TC D={d}: forward worst out {wo:F3}, lse {wl:F3} of the bound");
        Assert.Multiple(() =>
        {
            Assert.That(wo, Is.LessThanOrEqualTo(1.0), "packed out");
            Assert.That(wl, Is.LessThanOrEqualTo(1.0), "packed lse");
        });

        // Backward from a float64 forward (out rounded to bf16, lse to fp32), as AttentionTcBackwardTests.
        float[] outIn = reference.Out.Select(x => BFloat16.FromSingle((float)x).ToSingle()).ToArray();
        float[] lseIn = reference.Lse.Select(x => (float)x).ToArray();
        var (dq, dk, dv) = Backward(Tc, p, p.Dout, p.Q, p.K, p.V, outIn, lseIn, B, T, pos);
        var g = ReferenceBackward(p, outIn, lseIn, pos);
        double wq = Worst(dq, g.Dq, g.BDq), wk = Worst(dk, g.Dk, g.BDk), wv = Worst(dv, g.Dv, g.BDv);
        TestContext.Out.WriteLine($"{Device} TC D={d}: backward worst dq {wq:F3}, dk {wk:F3}, dv {wv:F3} of the bound");
        Assert.Multiple(() =>
        {
            Assert.That(wq, Is.LessThanOrEqualTo(1.0), "packed dq");
            Assert.That(wk, Is.LessThanOrEqualTo(1.0), "packed dk");
            Assert.That(wv, Is.LessThanOrEqualTo(1.0), "packed dv");
        });

        int aligned = 0;
        foreach (var (row, start, len) in Documents().Where(x => x.Start % GpuAttentionOps.TcBackwardTile == 0))
        {
            aligned++;
            string doc = $"document at ({row}, {start}), {len} tokens";
            float[] q = Rows(p.Q, row, start, len, hq, d), k = Rows(p.K, row, start, len, hkv, d), v = Rows(p.V, row, start, len, hkv, d);
            var (outA, lseA) = Forward(Tc, p, q, k, v, 1, len, null);
            AssertExact(Rows(out_, row, start, len, hq, d), outA, $"out of the {doc}");
            AssertExact(LseRows(lse, row, start, len, hq), lseA, $"lse of the {doc}");
            var (dqA, dkA, dvA) = Backward(Tc, p, Rows(p.Dout, row, start, len, hq, d), q, k, v,
                Rows(outIn, row, start, len, hq, d), LseRows(lseIn, row, start, len, hq), 1, len, null);
            AssertExact(Rows(dq, row, start, len, hq, d), dqA, $"dq of the {doc}");
            AssertExact(Rows(dk, row, start, len, hkv, d), dkA, $"dk of the {doc}");
            AssertExact(Rows(dv, row, start, len, hkv, d), dvA, $"dv of the {doc}");
        }
        Assert.That(aligned, Is.EqualTo(4));

        if (Gpu is EmulatedGpu emu)
        {
            emu.SetChecks(EmulatorChecks.All, seed: (ulong)d);
            try
            {
                var (o2, l2) = Forward(Tc, p, p.Q, p.K, p.V, B, T, pos);
                AssertBitsEqual(o2, out_, "out under the race checks");
                AssertBitsEqual(l2, lse, "lse under the race checks");
                var (dq2, dk2, dv2) = Backward(Tc, p, p.Dout, p.Q, p.K, p.V, outIn, lseIn, B, T, pos);
                AssertBitsEqual(dq2, dq, "dq under the race checks");
                AssertBitsEqual(dk2, dk, "dk under the race checks");
                AssertBitsEqual(dv2, dv, "dv under the race checks");
            }
            finally
            {
                emu.SetChecks(EmulatorChecks.None);
            }
        }
    }

    [Test]
    public void TensorCoreKernels_WithTheMaskDroppedFromTheReference_FailTheBound()
    {
        // Negative control of the bounds: a causal reference (positions all running) must not be met by the packed
        // kernels' output.
        Problem p = Make(DType.BF16, 4, 2, 64, seed: 3);
        var (out_, _) = Forward(Tc, p, p.Q, p.K, p.V, B, T, Positions());
        var causal = ReferenceForward(p, Enumerable.Range(0, B * T).Select(i => i % T).ToArray());
        Assert.That(Worst(out_, causal.Out, causal.BoundTcOut), Is.GreaterThan(1.0));
    }
}
