using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// The tensor-core forward (kernels/attention_tc.cu: mma.sync, ldmatrix, cp.async) through
/// <see cref="GpuAttentionOps"/> on the emulator and, when present, a CUDA device; on the emulator every case also runs
/// under all race-finding checks (shuffled thread order, deferred poisoned cp.async, poisoned shared memory, strict
/// collectives) with two seeds and must give the same bits.
/// <para>
/// Oracle: a float64 softmax loop over the bf16 inputs. Error bound per output element, with u = 2^-8 (bf16 unit
/// roundoff), p_j the exact probabilities and A = Σ_j p_j·|v_jd|: P is rounded to bf16 as the MMA operand (each p_j
/// within u·p_j), so the numerator moves by at most u·A, and l is exact fp32 (its relative error is fp32's); the
/// output is rounded to bf16 once (u·|out|); fp32 score and accumulation errors add 2·es_max·A + 2^-16·A, with es the
/// a-priori error of one fp32 score ((D + 2)·2^-24·scale·Σ_d|q_d k_d|) amplified by exp. Bound: u·A + u·|out| +
/// 2·es_max·A + 2^-16·A. lse (fp32 sums of fp32 p, no bf16 operand): es_max + 2^-18·(1 + |lse|).
/// </para>
/// </summary>
public sealed class AttentionTcForwardTests(string device) : DeviceFixture<GpuAttentionOps>(device)
{
    internal const int Batch = 2;
    private const double U = 1.0 / 256;

    protected override GpuAttentionOps CreateOps(IGpu gpu) => new(gpu, tensorCores: true);

    protected override IEnumerable<string> RequiredKernels => ["attention_fwd_tc_d64_bf16", "attention_fwd_tc_d128_bf16"];

    /// <summary>(Tq, Tk, Hq, Hkv, D): T = 1, tile multiples and not, GQA groups of 1, 4 and 8, and queries at an offset.</summary>
    private static readonly (int Tq, int Tk, int Hq, int Hkv, int D)[] Shapes =
    [
        (1, 1, 4, 4, 64), (7, 7, 8, 1, 128), (64, 64, 4, 1, 64), (65, 65, 8, 2, 128),
        (130, 130, 4, 4, 64), (200, 200, 8, 8, 128), (1, 130, 8, 2, 128), (5, 70, 4, 1, 64), (70, 135, 4, 2, 64),
    ];

    internal sealed record Problem(int Tq, int Tk, int Hq, int Hkv, int D, float[] Q, float[] K, float[] V);

    internal static Problem Make((int Tq, int Tk, int Hq, int Hkv, int D) s, int seed) =>
        new(s.Tq, s.Tk, s.Hq, s.Hkv, s.D,
            Representable(Normal(Batch * s.Tq * s.Hq * s.D, seed, 1.5), DType.BF16),
            Representable(Normal(Batch * s.Tk * s.Hkv * s.D, seed + 1), DType.BF16),
            Representable(Normal(Batch * s.Tk * s.Hkv * s.D, seed + 2), DType.BF16));

    private (float[] Out, float[] Lse) Run(Problem p)
    {
        DevicePtr q = Upload(p.Q, DType.BF16), k = Upload(p.K, DType.BF16), v = Upload(p.V, DType.BF16);
        int qn = Batch * p.Tq * p.Hq * p.D, ln = Batch * p.Hq * p.Tq;
        DevicePtr o = Alloc(qn * 2L), l = Alloc(ln * 4L);
        Gpu.Memset(o, 0x7f, qn * 2L);
        Assert.That(Ops.UsesTensorCores(DType.BF16, p.D, q, k, v, o), Is.True);
        if (p.Tq == p.Tk) Ops.Forward(DType.BF16, q, k, v, o, l, Batch, p.Tq, p.Hq, p.Hkv, p.D);
        else Ops.ForwardCached(DType.BF16, q, k, v, o, l, Batch, p.Tq, p.Tk, p.Hq, p.Hkv, p.D);
        Gpu.Synchronize();
        return (Download(o, qn, DType.BF16), Download(l, ln, DType.F32));
    }

    /// <summary>Worst error of out and lse as fractions of their bounds (float64 reference, see the class remarks).</summary>
    internal static (double Out, double Lse) WorstError(Problem p, float[] out_, float[] lse)
    {
        int Dh = p.D, group = p.Hq / p.Hkv, off = p.Tk - p.Tq;
        double scale = GpuAttentionOps.Scale(Dh);
        double worstOut = 0, worstLse = 0;
        var s = new double[p.Tk];
        var es = new double[p.Tk];
        for (int b = 0; b < Batch; b++)
            for (int h = 0; h < p.Hq; h++)
                for (int i = 0; i < p.Tq; i++)
                {
                    int hk = h / group, n = i + off + 1;
                    long qBase = (((long)b * p.Tq + i) * p.Hq + h) * Dh;
                    double mx = double.NegativeInfinity, esMax = 0;
                    for (int j = 0; j < n; j++)
                    {
                        long kBase = (((long)b * p.Tk + j) * p.Hkv + hk) * Dh;
                        double dot = 0, mag = 0;
                        for (int d = 0; d < Dh; d++)
                        {
                            dot += (double)p.Q[qBase + d] * p.K[kBase + d];
                            mag += Math.Abs((double)p.Q[qBase + d] * p.K[kBase + d]);
                        }
                        s[j] = dot * scale;
                        es[j] = (Dh + 2) * Math.Pow(2, -24) * scale * mag;
                        mx = Math.Max(mx, s[j]);
                        esMax = Math.Max(esMax, es[j]);
                    }
                    double l = 0;
                    for (int j = 0; j < n; j++) l += Math.Exp(s[j] - mx);
                    double lseRef = mx + Math.Log(l);
                    double lseGot = lse[((long)b * p.Hq + h) * p.Tq + i];
                    worstLse = Math.Max(worstLse, Math.Abs(lseGot - lseRef) / (esMax + Math.Pow(2, -18) * (1 + Math.Abs(lseRef))));
                    for (int d = 0; d < Dh; d++)
                    {
                        double num = 0, a = 0;
                        for (int j = 0; j < n; j++)
                        {
                            double pj = Math.Exp(s[j] - mx) / l;
                            double vj = p.V[(((long)b * p.Tk + j) * p.Hkv + hk) * Dh + d];
                            num += pj * vj;
                            a += pj * Math.Abs(vj);
                        }
                        double bound = U * a + U * Math.Abs(num) + 2 * esMax * a + Math.Pow(2, -16) * a + 1e-30;
                        worstOut = Math.Max(worstOut, Math.Abs(out_[qBase + d] - num) / bound);
                    }
                }
        return (worstOut, worstLse);
    }

    private static IEnumerable<int> ShapeIndices() => Enumerable.Range(0, Shapes.Length);

    [TestCaseSource(nameof(ShapeIndices))]
    public void Forward_MatchesTheFloat64Softmax_WithinTheBf16POperandBound(int shape)
    {
        Problem p = Make(Shapes[shape], seed: 40 + shape);
        var (out_, lse) = Run(p);
        Assert.That(out_.Any(float.IsNaN), Is.False, "NaN in the output");
        var (wo, wl) = WorstError(p, out_, lse);
        TestContext.Out.WriteLine($"{Device} {Shapes[shape]}: worst out error {wo:F3} of its bound, lse {wl:F3}");
        Assert.Multiple(() =>
        {
            Assert.That(wo, Is.LessThanOrEqualTo(1.0), "out");
            Assert.That(wl, Is.LessThanOrEqualTo(1.0), "lse");
        });
        foreach (ulong seed in new ulong[] { 1, 2 })
        {
            // Another schedule of the race checks (the fixture runs every launch under them): the same bits.
            var again = UnderOtherSchedule(seed, () => Tuple.Create(Run(p)));
            if (again is null) break;
            AssertBitsEqual(again.Item1.Out, out_, $"out under the race checks (seed {seed})");
            AssertBitsEqual(again.Item1.Lse, lse, $"lse under the race checks (seed {seed})");
        }
    }

    [Test]
    public void Forward_WithAWrongScale_FailsTheBound()
    {
        // Negative control of the bound: keys scaled by 1.02 (a 2 % error in the softmax scale) must not pass.
        Problem p = Make(Shapes[5], seed: 7);
        var (out_, lse) = Run(p);
        Problem wrong = p with { K = Representable(p.K.Select(x => x * 1.02f).ToArray(), DType.BF16) };
        var (wo, _) = WorstError(wrong, out_, lse);
        Assert.That(wo, Is.GreaterThan(1.0));
    }

    [Test]
    public void Forward_IsBitIdenticalRunToRun()
    {
        Problem p = Make(Shapes[3], seed: 3);
        var (o1, l1) = Run(p);
        var (o2, l2) = Run(p);
        AssertBitsEqual(o2, o1, "out");
        AssertBitsEqual(l2, l1, "lse");
    }
}
