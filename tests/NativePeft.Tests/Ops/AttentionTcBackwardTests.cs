using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// The tensor-core backward (kernels/attention_tc_bwd.cu) through <see cref="GpuAttentionOps.Backward"/> on the
/// emulator and, when present, a CUDA device; on the emulator each case also runs under all race-finding checks and
/// must give the same bits.
/// <para>
/// Inputs: bf16 q, k, v, dout; out (rounded to bf16) and lse (fp32) from a float64 forward, given to the kernels and
/// to the float64 reference alike, so the comparison measures the backward only. Reference: P = exp(scale·q·k − lse),
/// delta = Σ_d dout·out, dP = dout·v, dS = P·(dP − delta), dv = Σ P·dout, dk = scale·Σ dS·q, dq = scale·Σ dS·k.
/// </para>
/// <para>
/// Error bound per element, u = 2^-8 (bf16 unit roundoff): the kernels round P and dS to bf16 as MMA operands (each
/// within u of itself) and the outputs to bf16 once (u·|x|); in fp32 they compute P with relative error
/// eP = es + 2^-21·(1 + |scale·q·k| + |lse|) (es: the fp32 score's error (D + 2)·2^-24·scale·Σ|q_d k_d|, plus the
/// rounding of the exp2 argument), dP and delta with (D + 1)·2^-24·Σ|·|, so dS carries
/// e_dS = P·(eP·|dP − delta| + e_dP + e_delta). Bounds: dv ≤ u·Σ P|dout| + Σ eP·P|dout| + u|dv| + 2^-16·Σ P|dout|;
/// dk ≤ scale·(u·Σ|dS||q| + Σ e_dS|q|) + u|dk| + 2^-16·scale·Σ|dS q|; dq alike with k.
/// </para>
/// </summary>
public sealed class AttentionTcBackwardTests(string device) : DeviceFixture<GpuAttentionOps>(device)
{
    private const int Batch = 2;
    private const double U = 1.0 / 256;
    private static readonly double U32 = Math.Pow(2, -24);

    protected override GpuAttentionOps CreateOps(IGpu gpu) => new(gpu, tensorCores: true);

    protected override IEnumerable<string> RequiredKernels =>
        ["attention_bwd_dkdv_tc_d64_bf16", "attention_bwd_dq_tc_d64_bf16", "attention_bwd_dkdv_tc_d128_bf16", "attention_bwd_dq_tc_d128_bf16"];

    /// <summary>(T, Hq, Hkv, D): T = 1, tile multiples and not (32, 64), GQA groups of 1, 4 and 8.</summary>
    private static readonly (int T, int Hq, int Hkv, int D)[] Shapes =
    [
        (1, 4, 4, 64), (7, 8, 1, 128), (33, 4, 1, 64), (64, 8, 2, 128), (65, 4, 4, 128), (130, 8, 1, 64), (200, 4, 2, 128),
    ];

    private sealed record Problem(int T, int Hq, int Hkv, int D, float[] Q, float[] K, float[] V, float[] Dout,
                                  float[] Out, float[] Lse);

    private static int Qi(Problem p, int b, int t, int h) => ((b * p.T + t) * p.Hq + h) * p.D;
    private static int Ki(Problem p, int b, int t, int h) => ((b * p.T + t) * p.Hkv + h) * p.D;

    private static Problem Make((int T, int Hq, int Hkv, int D) s, int seed)
    {
        int qn = Batch * s.T * s.Hq * s.D, kn = Batch * s.T * s.Hkv * s.D;
        var p = new Problem(s.T, s.Hq, s.Hkv, s.D,
            Representable(Normal(qn, seed, 1.5), DType.BF16), Representable(Normal(kn, seed + 1), DType.BF16),
            Representable(Normal(kn, seed + 2), DType.BF16), Representable(Normal(qn, seed + 3), DType.BF16),
            new float[qn], new float[Batch * s.Hq * s.T]);
        // float64 forward: out rounded to bf16, lse to fp32.
        double scale = GpuAttentionOps.Scale(p.D);
        var sc = new double[p.T];
        for (int b = 0; b < Batch; b++)
            for (int h = 0; h < p.Hq; h++)
                for (int i = 0; i < p.T; i++)
                {
                    int hk = h / (p.Hq / p.Hkv);
                    double mx = double.NegativeInfinity;
                    for (int j = 0; j <= i; j++)
                    {
                        double dot = 0;
                        for (int d = 0; d < p.D; d++) dot += (double)p.Q[Qi(p, b, i, h) + d] * p.K[Ki(p, b, j, hk) + d];
                        sc[j] = dot * scale;
                        mx = Math.Max(mx, sc[j]);
                    }
                    double l = 0;
                    for (int j = 0; j <= i; j++) l += Math.Exp(sc[j] - mx);
                    p.Lse[(b * p.Hq + h) * p.T + i] = (float)(mx + Math.Log(l));
                    for (int d = 0; d < p.D; d++)
                    {
                        double o = 0;
                        for (int j = 0; j <= i; j++) o += Math.Exp(sc[j] - mx) / l * p.V[Ki(p, b, j, hk) + d];
                        p.Out[Qi(p, b, i, h) + d] = BFloat16.FromSingle((float)o).ToSingle();
                    }
                }
        return p;
    }

    private (float[] Dq, float[] Dk, float[] Dv) Run(Problem p)
    {
        DevicePtr q = Upload(p.Q, DType.BF16), k = Upload(p.K, DType.BF16), v = Upload(p.V, DType.BF16);
        DevicePtr dout = Upload(p.Dout, DType.BF16), o = Upload(p.Out, DType.BF16), l = Upload(p.Lse, DType.F32);
        int qn = p.Q.Length, kn = p.K.Length;
        DevicePtr dq = Alloc(qn * 2L), dk = Alloc(kn * 2L), dv = Alloc(kn * 2L);
        DevicePtr work = Alloc(GpuAttentionOps.BackwardWorkspaceBytes(Batch, p.T, p.Hq));
        Gpu.Memset(dq, 0x7f, qn * 2L);  // poison: every element must be written
        Gpu.Memset(dk, 0x7f, kn * 2L);
        Gpu.Memset(dv, 0x7f, kn * 2L);
        Assert.That(Ops.UsesTensorCores(DType.BF16, p.D, q, k, v, dout, o, dq, dk, dv), Is.True);
        Ops.Backward(DType.BF16, dout, q, k, v, o, l, dq, dk, dv, work, Batch, p.T, p.Hq, p.Hkv, p.D);
        Gpu.Synchronize();
        return (Download(dq, qn, DType.BF16), Download(dk, kn, DType.BF16), Download(dv, kn, DType.BF16));
    }

    /// <summary>Worst error of dq, dk, dv as fractions of their bounds; <paramref name="doutFactor"/> plants a defect.</summary>
    private static (double Dq, double Dk, double Dv) WorstError(Problem p, float[] dq, float[] dk, float[] dv, double doutFactor = 1)
    {
        int T = p.T, Dh = p.D, group = p.Hq / p.Hkv;
        double scale = GpuAttentionOps.Scale(Dh);
        var refDq = new double[dq.Length]; var bDq = new double[dq.Length];
        var refDk = new double[dk.Length]; var bDk = new double[dk.Length];
        var refDv = new double[dv.Length]; var bDv = new double[dv.Length];
        for (int b = 0; b < Batch; b++)
            for (int h = 0; h < p.Hq; h++)
            {
                int hk = h / group;
                for (int i = 0; i < T; i++)
                {
                    int qi = Qi(p, b, i, h);
                    double lse = p.Lse[(b * p.Hq + h) * T + i];
                    double delta = 0, deltaMag = 0;
                    for (int d = 0; d < Dh; d++)
                    {
                        delta += doutFactor * p.Dout[qi + d] * p.Out[qi + d];
                        deltaMag += Math.Abs((double)p.Dout[qi + d] * p.Out[qi + d]);
                    }
                    for (int j = 0; j <= i; j++)
                    {
                        int kj = Ki(p, b, j, hk);
                        double dot = 0, mag = 0, dp = 0, dpMag = 0;
                        for (int d = 0; d < Dh; d++)
                        {
                            dot += (double)p.Q[qi + d] * p.K[kj + d];
                            mag += Math.Abs((double)p.Q[qi + d] * p.K[kj + d]);
                            dp += doutFactor * p.Dout[qi + d] * p.V[kj + d];
                            dpMag += Math.Abs((double)p.Dout[qi + d] * p.V[kj + d]);
                        }
                        double s = dot * scale;
                        double P = Math.Exp(s - lse);
                        double ds = P * (dp - delta);
                        double eP = (Dh + 2) * U32 * scale * mag + Math.Pow(2, -21) * (1 + Math.Abs(s) + Math.Abs(lse));
                        double eDs = P * (eP * Math.Abs(dp - delta) + (Dh + 1) * U32 * (dpMag + deltaMag));
                        for (int d = 0; d < Dh; d++)
                        {
                            double kd = p.K[kj + d], qd = p.Q[qi + d], od = doutFactor * p.Dout[qi + d];
                            refDq[qi + d] += scale * ds * kd;
                            bDq[qi + d] += scale * (U * Math.Abs(ds) + eDs + Math.Pow(2, -16) * Math.Abs(ds)) * Math.Abs(kd);
                            refDk[kj + d] += scale * ds * qd;
                            bDk[kj + d] += scale * (U * Math.Abs(ds) + eDs + Math.Pow(2, -16) * Math.Abs(ds)) * Math.Abs(qd);
                            refDv[kj + d] += P * od;
                            bDv[kj + d] += (U + eP + Math.Pow(2, -16)) * P * Math.Abs(od);
                        }
                    }
                }
            }
        static double Worst(float[] got, double[] reference, double[] bound)
        {
            double w = 0;
            for (int i = 0; i < got.Length; i++)
                w = Math.Max(w, Math.Abs(got[i] - reference[i]) / (bound[i] + U * Math.Abs(reference[i]) + 1e-30));
            return w;
        }
        return (Worst(dq, refDq, bDq), Worst(dk, refDk, bDk), Worst(dv, refDv, bDv));
    }

    private static IEnumerable<int> ShapeIndices() => Enumerable.Range(0, Shapes.Length);

    [TestCaseSource(nameof(ShapeIndices))]
    public void Backward_MatchesTheFloat64Gradients_WithinTheBf16OperandBound(int shape)
    {
        Problem p = Make(Shapes[shape], seed: 60 + shape);
        var (dq, dk, dv) = Run(p);
        var (wq, wk, wv) = WorstError(p, dq, dk, dv);
        TestContext.Out.WriteLine($"{Device} {Shapes[shape]}: worst error of the bound: dq {wq:F3}, dk {wk:F3}, dv {wv:F3}");
        Assert.Multiple(() =>
        {
            Assert.That(wq, Is.LessThanOrEqualTo(1.0), "dq");
            Assert.That(wk, Is.LessThanOrEqualTo(1.0), "dk");
            Assert.That(wv, Is.LessThanOrEqualTo(1.0), "dv");
        });
        var again = UnderOtherSchedule((ulong)(shape + 1), () => Tuple.Create(Run(p)));
        if (again is not null)
        {
            AssertBitsEqual(again.Item1.Dq, dq, "dq under another schedule of the race checks");
            AssertBitsEqual(again.Item1.Dk, dk, "dk under another schedule of the race checks");
            AssertBitsEqual(again.Item1.Dv, dv, "dv under another schedule of the race checks");
        }
    }

    [Test]
    public void Backward_WithAPlantedDefect_FailsTheBound()
    {
        // Negative control: a reference whose dout is 2 % too large must not be met by the kernels' gradients.
        Problem p = Make(Shapes[4], seed: 9);
        var (dq, dk, dv) = Run(p);
        var (wq, wk, wv) = WorstError(p, dq, dk, dv, doutFactor: 1.02);
        Assert.Multiple(() =>
        {
            Assert.That(wv, Is.GreaterThan(1.0), "dv");
            Assert.That(Math.Max(wq, wk), Is.GreaterThan(1.0), "dq/dk");
        });
    }

    /// <summary>f(q, k, v) = Σ dout ∘ attention(q, k, v) in float64 (causal GQA, the kernels' layouts).</summary>
    private static double Objective(Problem p, double[] q, double[] k, double[] v)
    {
        double scale = GpuAttentionOps.Scale(p.D), f = 0;
        var sc = new double[p.T];
        for (int b = 0; b < Batch; b++)
            for (int h = 0; h < p.Hq; h++)
                for (int i = 0; i < p.T; i++)
                {
                    int hk = h / (p.Hq / p.Hkv);
                    double mx = double.NegativeInfinity, l = 0;
                    for (int j = 0; j <= i; j++)
                    {
                        double dot = 0;
                        for (int d = 0; d < p.D; d++) dot += q[Qi(p, b, i, h) + d] * k[Ki(p, b, j, hk) + d];
                        sc[j] = dot * scale;
                        mx = Math.Max(mx, sc[j]);
                    }
                    for (int j = 0; j <= i; j++) l += Math.Exp(sc[j] - mx);
                    for (int d = 0; d < p.D; d++)
                    {
                        double o = 0;
                        for (int j = 0; j <= i; j++) o += Math.Exp(sc[j] - mx) / l * v[Ki(p, b, j, hk) + d];
                        f += p.Dout[Qi(p, b, i, h) + d] * o;
                    }
                }
        return f;
    }

    [Test]
    public void TheReferenceGradientsAreTheFiniteDifferenceGradients()
    {
        // The oracle of the tests above (P = exp(s − lse), dS = P(dP − delta), ...) against central differences of the
        // float64 forward, on a tiny GQA shape: 24 random elements each of q, k and v. The reference here takes out and
        // lse exact (float64), so the two may differ only by the differences' truncation (h² terms, h = 1e-4).
        Problem p = Make((5, 4, 1, 64), seed: 21);
        double[] q = ToDouble(p.Q), k = ToDouble(p.K), v = ToDouble(p.V);
        // Exact out and lse for the analytic gradients.
        double scale = GpuAttentionOps.Scale(p.D);
        var gq = new double[q.Length]; var gk = new double[k.Length]; var gv = new double[v.Length];
        var sc = new double[p.T];
        for (int b = 0; b < Batch; b++)
            for (int h = 0; h < p.Hq; h++)
                for (int i = 0; i < p.T; i++)
                {
                    int hk = h / (p.Hq / p.Hkv), qi = Qi(p, b, i, h);
                    double mx = double.NegativeInfinity, l = 0;
                    for (int j = 0; j <= i; j++)
                    {
                        double dot = 0;
                        for (int d = 0; d < p.D; d++) dot += q[qi + d] * k[Ki(p, b, j, hk) + d];
                        sc[j] = dot * scale;
                        mx = Math.Max(mx, sc[j]);
                    }
                    for (int j = 0; j <= i; j++) l += Math.Exp(sc[j] - mx);
                    double lse = mx + Math.Log(l), delta = 0;
                    for (int d = 0; d < p.D; d++)
                    {
                        double o = 0;
                        for (int j = 0; j <= i; j++) o += Math.Exp(sc[j] - lse) * v[Ki(p, b, j, hk) + d];
                        delta += p.Dout[qi + d] * o;
                    }
                    for (int j = 0; j <= i; j++)
                    {
                        int kj = Ki(p, b, j, hk);
                        double P = Math.Exp(sc[j] - lse), dp = 0;
                        for (int d = 0; d < p.D; d++) dp += p.Dout[qi + d] * v[kj + d];
                        double ds = P * (dp - delta);
                        for (int d = 0; d < p.D; d++)
                        {
                            gq[qi + d] += scale * ds * k[kj + d];
                            gk[kj + d] += scale * ds * q[qi + d];
                            gv[kj + d] += P * p.Dout[qi + d];
                        }
                    }
                }
        var rng = new Random(3);
        const double H = 1e-4;
        foreach (var (x, g, name) in new[] { (q, gq, "dq"), (k, gk, "dk"), (v, gv, "dv") })
            for (int n = 0; n < 24; n++)
            {
                int e = rng.Next(x.Length);
                double keep = x[e];
                x[e] = keep + H;
                double fp = Objective(p, q, k, v);
                x[e] = keep - H;
                double fm = Objective(p, q, k, v);
                x[e] = keep;
                double fd = (fp - fm) / (2 * H);
                Assert.That(g[e], Is.EqualTo(fd).Within(1e-6 * (1 + Math.Abs(fd))), $"{name}[{e}]");
            }
    }

    [Test]
    public void Backward_IsBitIdenticalRunToRun()
    {
        Problem p = Make(Shapes[5], seed: 4);
        var (dq1, dk1, dv1) = Run(p);
        var (dq2, dk2, dv2) = Run(p);
        AssertBitsEqual(dq2, dq1, "dq");
        AssertBitsEqual(dk2, dk1, "dk");
        AssertBitsEqual(dv2, dv1, "dv");
    }
}
