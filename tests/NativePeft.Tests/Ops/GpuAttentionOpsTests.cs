using System.Diagnostics;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// kernels/attention.cu through <see cref="GpuAttentionOps"/> on every device: the emulator always (a missing
/// libnativepeft_emu is a failure), CUDA when a device exists (ignored otherwise).
/// <para>
/// Oracle: <see cref="AttentionRef"/> in float64 over exactly the (widened) values the kernels see. The backward is
/// checked on its own: its inputs are the kernel's forward output (already rounded to the dtype) and the kernel's
/// fp32 lse, given to both the kernel and the reference, so the comparison measures the backward's rounding only.
/// A float64 loop in this file recomputes every reference value (it must agree with AttentionRef to 1e-10·mag) and
/// the first-order a-priori error bound of the kernel's fp32 arithmetic for each output element, with
/// u = 2^-24, es = (D+2)·u·scale·Σ_d|q_d k_d| (the error of one fp32 score), nk / nkt the keys / key tiles a query
/// row sums over, and p the exact probabilities:
/// <list type="bullet">
/// <item>out[i,d]: (2·es_max/u + 2·R + 2·nk + 6·nkt + 10)·u·Σ_j p_j|v_jd|, R = max_j |s_j − max_j s_j| (the rounding
/// of the exp arguments; the max itself cancels in out = o/l); 6 per tile: the exp (2 ulp on CUDA) and product of
/// each rescaling of o and l.</item>
/// <item>lse[i]: es_max + u·(R + nk + 3·nkt + 4 + 2·|log l| + |lse|).</item>
/// <item>backward, with P = exp(s − lse), the relative error of the kernel's P, eP = es + u·|s − lse| + 3u; of
/// dP = dout·v and delta = dout·out, (D+1)·u·Σ|·|; dS = P·(dP − delta) gets e_dS = P·(eP·|dP − delta| + e_dP + e_delta)
/// + u·|dS|; then dq[i,d] ≤ scale·Σ_j e_dS|k_jd| + (n+2)·u·scale·Σ_j|dS·k_jd| with n the additions of the fp32 sum
/// (16 per key tile), and dk, dv alike over the group's query heads and rows.</item>
/// </list>
/// fp32 outputs must be within that bound (+1e-37 for underflow); bf16 outputs within 1 bf16 ulp of the float64
/// reference rounded to bf16, or (only possible where the fp32 bound exceeds half a bf16 ulp: cancellation) within the
/// bound plus half an ulp. The worst measured error is printed as a fraction of the bound and in u·mag.
/// </para>
/// </summary>
public sealed class GpuAttentionOpsTests(string device) : DeviceFixture<GpuAttentionOps>(device)
{
    private const double U = 1.0 / (1 << 24);
    private const double AbsSlack = 1e-37;
    private const int Batch = 2;

    // The fp32-arithmetic kernels for every shape; the tensor-core path has its own tests (AttentionTc*Tests).
    protected override GpuAttentionOps CreateOps(IGpu gpu) => new(gpu, tensorCores: false);

    protected override IEnumerable<string> RequiredKernels =>
        from op in new[] { "forward", "backward_preprocess", "backward_dkdv", "backward_dq" }
        from t in new[] { "f32", "bf16" }
        select $"attention_{op}_{t}";

    private static readonly DType[] DTypes = [DType.F32, DType.BF16];

    /// <summary>
    /// (T, Hq, Hkv, D), batch 2: every T of {1, 7, 33, 130} with every head layout of {(4,2), (4,4), (8,1)}, the head
    /// dims 32, 64, 72, 128 spread over them (plus an odd D = 7, which the kernels also take), small enough that the
    /// whole file runs in seconds on the emulator.
    /// </summary>
    private static readonly (int T, int Hq, int Hkv, int D)[] Shapes =
    [
        (1, 4, 2, 32), (1, 4, 4, 64), (1, 8, 1, 128),
        (7, 4, 2, 72), (7, 4, 4, 128), (7, 8, 1, 32),
        (33, 4, 2, 128), (33, 4, 4, 32), (33, 8, 1, 72), (33, 4, 2, 7),
        (130, 4, 2, 64), (130, 4, 4, 72), (130, 8, 1, 32),
    ];

    // ------------------------------------------------------------------------------------------
    // Inputs, device buffers
    // ------------------------------------------------------------------------------------------

    private sealed record Problem(int T, int Hq, int Hkv, int D, float[] Q, float[] K, float[] V, float[] Dout)
    {
        public int QLen => Batch * T * Hq * D;
        public int KvLen => Batch * T * Hkv * D;
        public int LseLen => Batch * Hq * T;
    }

    private static Problem MakeProblem((int T, int Hq, int Hkv, int D) s, DType dtype, int seed)
    {
        int qn = Batch * s.T * s.Hq * s.D, kvn = Batch * s.T * s.Hkv * s.D;
        // q at 1.5σ: scores of a few units, so the softmax is neither flat nor one-hot.
        return new Problem(s.T, s.Hq, s.Hkv, s.D,
            Representable(Normal(qn, seed, 1.5), dtype), Representable(Normal(kvn, seed + 1), dtype),
            Representable(Normal(kvn, seed + 2), dtype), Representable(Normal(qn, seed + 3), dtype));
    }

    /// <summary>The kernels' forward: out (values of dtype) and lse (fp32).</summary>
    private (float[] Out, float[] Lse) RunForward(Problem p, DType dtype)
    {
        DevicePtr q = Upload(p.Q, dtype), k = Upload(p.K, dtype), v = Upload(p.V, dtype);
        DevicePtr o = Alloc((long)p.QLen * dtype.ElementSize()), l = Alloc((long)p.LseLen * sizeof(float));
        Ops.Forward(dtype, q, k, v, o, l, Batch, p.T, p.Hq, p.Hkv, p.D);
        Gpu.Synchronize();
        return (Download(o, p.QLen, dtype), Download(l, p.LseLen, DType.F32));
    }

    /// <summary>The kernels' backward from the given out (values of dtype) and lse: dq, dk, dv.</summary>
    private (float[] Dq, float[] Dk, float[] Dv) RunBackward(Problem p, DType dtype, float[] output, float[] lse)
    {
        DevicePtr q = Upload(p.Q, dtype), k = Upload(p.K, dtype), v = Upload(p.V, dtype), dout = Upload(p.Dout, dtype);
        DevicePtr o = Upload(output, dtype), l = Upload(lse, DType.F32);
        DevicePtr dq = Alloc((long)p.QLen * dtype.ElementSize()), dk = Alloc((long)p.KvLen * dtype.ElementSize());
        DevicePtr dv = Alloc((long)p.KvLen * dtype.ElementSize());
        DevicePtr work = Alloc(GpuAttentionOps.BackwardWorkspaceBytes(Batch, p.T, p.Hq));
        // Poison the outputs: they must be overwritten everywhere.
        Gpu.Memset(dq, 0x7f, (long)p.QLen * dtype.ElementSize());
        Gpu.Memset(dk, 0x7f, (long)p.KvLen * dtype.ElementSize());
        Gpu.Memset(dv, 0x7f, (long)p.KvLen * dtype.ElementSize());
        Ops.Backward(dtype, dout, q, k, v, o, l, dq, dk, dv, work, Batch, p.T, p.Hq, p.Hkv, p.D);
        Gpu.Synchronize();
        return (Download(dq, p.QLen, dtype), Download(dk, p.KvLen, dtype), Download(dv, p.KvLen, dtype));
    }

    // ------------------------------------------------------------------------------------------
    // float64 loops: reference values (cross-checked against AttentionRef), magnitudes, error bounds
    // ------------------------------------------------------------------------------------------

    private sealed record ForwardOracle(double[] Out, double[] Lse, double[] OutBound, double[] LseBound, double[] OutMag);

    private static ForwardOracle Forward64(Problem p)
    {
        int T = p.T, Hq = p.Hq, Hkv = p.Hkv, Dh = p.D, group = Hq / Hkv;
        double scale = 1.0 / Math.Sqrt(Dh);
        var output = new double[p.QLen];
        var outBound = new double[p.QLen];
        var outMag = new double[p.QLen];
        var lse = new double[p.LseLen];
        var lseBound = new double[p.LseLen];
        var s = new double[T];
        var es = new double[T];
        for (int b = 0; b < Batch; b++)
        for (int h = 0; h < Hq; h++)
        {
            int g = h / group;
            for (int i = 0; i < T; i++)
            {
                int qo = ((b * T + i) * Hq + h) * Dh;
                double m = double.NegativeInfinity, esMax = 0;
                for (int j = 0; j <= i; j++)
                {
                    int ko = ((b * T + j) * Hkv + g) * Dh;
                    double dot = 0, dotAbs = 0;
                    for (int d = 0; d < Dh; d++)
                    {
                        double t = (double)p.Q[qo + d] * p.K[ko + d];
                        dot += t;
                        dotAbs += Math.Abs(t);
                    }
                    s[j] = scale * dot;
                    es[j] = (Dh + 2) * U * scale * dotAbs;
                    m = Math.Max(m, s[j]);
                    esMax = Math.Max(esMax, es[j]);
                }
                double l = 0, range = 0;
                for (int j = 0; j <= i; j++)
                {
                    l += Math.Exp(s[j] - m);
                    range = Math.Max(range, Math.Abs(s[j] - m));
                }
                int nk = i + 1, nkt = i / GpuAttentionOps.ForwardKeyTile + 1;
                double kOut = 2 * esMax / U + 2 * range + 2 * nk + 6 * nkt + 10;
                for (int d = 0; d < Dh; d++)
                {
                    double acc = 0, mag = 0;
                    for (int j = 0; j <= i; j++)
                    {
                        double pj = Math.Exp(s[j] - m) / l, vj = p.V[((b * T + j) * Hkv + g) * Dh + d];
                        acc += pj * vj;
                        mag += pj * Math.Abs(vj);
                    }
                    output[qo + d] = acc;
                    outMag[qo + d] = mag;
                    outBound[qo + d] = kOut * U * mag;
                }
                int li = (b * Hq + h) * T + i;
                lse[li] = m + Math.Log(l);
                lseBound[li] = esMax + U * (range + nk + 3 * nkt + 4 + 2 * Math.Abs(Math.Log(l)) + Math.Abs(lse[li]));
            }
        }
        return new ForwardOracle(output, lse, outBound, lseBound, outMag);
    }

    private sealed record BackwardOracle(double[] Dq, double[] Dk, double[] Dv, double[] DqBound, double[] DkBound, double[] DvBound,
                                         double[] DqMag, double[] DkMag, double[] DvMag);

    private static BackwardOracle Backward64(Problem p, float[] output, float[] lse)
    {
        int T = p.T, Hq = p.Hq, Hkv = p.Hkv, Dh = p.D, group = Hq / Hkv, tile = GpuAttentionOps.BackwardTile;
        double scale = 1.0 / Math.Sqrt(Dh);
        var dq = new double[p.QLen]; var dk = new double[p.KvLen]; var dv = new double[p.KvLen];
        var dqB = new double[p.QLen]; var dkB = new double[p.KvLen]; var dvB = new double[p.KvLen];
        var dqM = new double[p.QLen]; var dkM = new double[p.KvLen]; var dvM = new double[p.KvLen];
        // Error terms are first accumulated without the summation factor, which is applied at the end:
        // *_e = Σ (propagated input errors), *_M = Σ |terms|.
        var dqE = new double[p.QLen]; var dkE = new double[p.KvLen]; var dvE = new double[p.KvLen];
        int nqt = (T + tile - 1) / tile;
        for (int b = 0; b < Batch; b++)
        for (int h = 0; h < Hq; h++)
        {
            int g = h / group;
            for (int i = 0; i < T; i++)
            {
                int qo = ((b * T + i) * Hq + h) * Dh;
                double lseI = lse[(b * Hq + h) * T + i];
                double delta = 0, deltaAbs = 0;
                for (int d = 0; d < Dh; d++)
                {
                    double t = (double)p.Dout[qo + d] * output[qo + d];
                    delta += t;
                    deltaAbs += Math.Abs(t);
                }
                double eDelta = (Dh + 1) * U * deltaAbs;
                for (int j = 0; j <= i; j++)
                {
                    int ko = ((b * T + j) * Hkv + g) * Dh;
                    double dot = 0, dotAbs = 0, dp = 0, dpAbs = 0;
                    for (int d = 0; d < Dh; d++)
                    {
                        double t = (double)p.Q[qo + d] * p.K[ko + d];
                        dot += t;
                        dotAbs += Math.Abs(t);
                        double w = (double)p.Dout[qo + d] * p.V[ko + d];
                        dp += w;
                        dpAbs += Math.Abs(w);
                    }
                    double s = scale * dot, P = Math.Exp(s - lseI);
                    double eP = (Dh + 2) * U * scale * dotAbs + U * Math.Abs(s - lseI) + 3 * U;
                    double x = dp - delta, dS = P * x;
                    double eDs = P * (eP * Math.Abs(x) + (Dh + 1) * U * dpAbs + eDelta) + U * Math.Abs(dS);
                    for (int d = 0; d < Dh; d++)
                    {
                        double kd = p.K[ko + d], qd = p.Q[qo + d], od = p.Dout[qo + d];
                        dq[qo + d] += scale * dS * kd;
                        dqM[qo + d] += scale * Math.Abs(dS * kd);
                        dqE[qo + d] += scale * eDs * Math.Abs(kd);
                        dk[ko + d] += scale * dS * qd;
                        dkM[ko + d] += scale * Math.Abs(dS * qd);
                        dkE[ko + d] += scale * eDs * Math.Abs(qd);
                        dv[ko + d] += P * od;
                        dvM[ko + d] += Math.Abs(P * od);
                        dvE[ko + d] += P * eP * Math.Abs(od);
                    }
                }
                int nDq = (i / tile + 1) * tile;
                for (int d = 0; d < Dh; d++)
                    dqB[qo + d] = dqE[qo + d] + (nDq + 2) * U * dqM[qo + d];
            }
        }
        for (int b = 0; b < Batch; b++)
        for (int j = 0; j < T; j++)
        {
            int nKv = group * (nqt - j / tile) * tile;
            for (int g = 0; g < Hkv; g++)
            for (int d = 0; d < Dh; d++)
            {
                int e = ((b * T + j) * Hkv + g) * Dh + d;
                dkB[e] = dkE[e] + (nKv + 2) * U * dkM[e];
                dvB[e] = dvE[e] + (nKv + 2) * U * dvM[e];
            }
        }
        return new BackwardOracle(dq, dk, dv, dqB, dkB, dvB, dqM, dkM, dvM);
    }

    /// <summary>The reference (AttentionRef, float64) and this file's float64 loop agree to 1e-10·mag.</summary>
    private static void AssertOraclesAgree(double[] reference, double[] local, double[] mag, string what)
    {
        Assert.That(reference, Has.Length.EqualTo(local.Length), what);
        for (int i = 0; i < local.Length; i++)
        {
            if (!(Math.Abs(reference[i] - local[i]) <= 1e-10 * (mag[i] + Math.Abs(local[i])) + 1e-300))
                Assert.Fail($"{what}[{i}]: AttentionRef {reference[i]:R} vs local float64 loop {local[i]:R}");
        }
    }

    private static double HalfBf16Ulp(double x)
    {
        double a = Math.Abs(x);
        if (a < 1e-38) return Math.Pow(2, -134);
        int e = (int)Math.Floor(Math.Log2(a));
        return Math.Pow(2, e - 8);  // ulp = 2^(e-7)
    }

    /// <summary>
    /// fp32: |got − ref| ≤ bound + 1e-37. bf16: ≤ 1 ulp from the rounded reference, or ≤ bound + half an ulp.
    /// Prints the worst error relative to the bound and in u·mag (fp32) or in bf16 ulps.
    /// </summary>
    private static void AssertClose(float[] got, double[] expected, double[] bound, double[] mag, DType dtype, string what)
    {
        Assert.That(got, Has.Length.EqualTo(expected.Length), what);
        double worstOfBound = 0, worstUMag = 0;
        int worstUlps = 0, beyondOneUlp = 0, bad = -1;
        string detail = "";
        for (int i = 0; i < got.Length; i++)
        {
            double err = Math.Abs(got[i] - expected[i]);
            bool ok;
            if (dtype == DType.BF16)
            {
                float rounded = BFloat16.FromSingle((float)expected[i]).ToSingle();
                int ulps = float.IsFinite(got[i]) ? Math.Abs(Bf16Key(got[i]) - Bf16Key(rounded)) : int.MaxValue;
                worstUlps = Math.Max(worstUlps, ulps);
                double allowed = bound[i] + HalfBf16Ulp(expected[i]) + AbsSlack;
                if (ulps > 1)
                {
                    beyondOneUlp++;
                    worstOfBound = Math.Max(worstOfBound, err / allowed);
                }
                ok = ulps <= 1 || err <= allowed;
                if (!ok && bad < 0)
                {
                    bad = i;
                    detail = $"bf16 {got[i]:R} vs rounded reference {rounded:R} (float64 {expected[i]:R}): {ulps} ulps, bound {bound[i]:E3}";
                }
            }
            else
            {
                ok = err <= bound[i] + AbsSlack && float.IsFinite(got[i]);
                if (bound[i] > 0) worstOfBound = Math.Max(worstOfBound, err / bound[i]);
                if (mag[i] > 0 && err > AbsSlack) worstUMag = Math.Max(worstUMag, err / (U * mag[i]));
                if (!ok && bad < 0)
                    bad = i;
                if (!ok && detail.Length == 0)
                    detail = $"{got[i]:R} vs {expected[i]:R}: error {err:E3} > bound {bound[i]:E3} (mag {mag[i]:E3})";
            }
        }
        TestContext.Out.WriteLine(dtype == DType.F32
            ? $"{what} [F32]: worst error {worstOfBound:F4} of the bound, {worstUMag:F1} u*mag"
            : $"{what} [BF16]: worst {worstUlps} bf16 ulps from the rounded reference; {beyondOneUlp} of {got.Length} elements "
              + $"beyond 1 ulp, their worst error {worstOfBound:F3} of (bound + half an ulp)");
        Assert.That(bad, Is.EqualTo(-1), $"{what}[{bad}]: {detail}");
    }

    // ------------------------------------------------------------------------------------------
    // Parity
    // ------------------------------------------------------------------------------------------

    [Test]
    public void ForwardAndBackwardMatchFloat64Reference([ValueSource(nameof(DTypes))] DType dtype,
                                                        [ValueSource(nameof(Shapes))] (int T, int Hq, int Hkv, int D) shape)
    {
        Problem p = MakeProblem(shape, dtype, seed: 1000 + shape.T * 7 + shape.D + shape.Hq * 3 + shape.Hkv);

        // Forward
        (float[] output, float[] lse) = RunForward(p, dtype);
        ForwardOracle f = Forward64(p);
        var outRef = new double[p.QLen];
        var lseRef = new double[p.LseLen];
        AttentionRef.Forward<double>(ToDouble(p.Q), ToDouble(p.K), ToDouble(p.V), outRef, lseRef, Batch, p.T, p.Hq, p.Hkv, p.D);
        AssertOraclesAgree(outRef, f.Out, f.OutMag, "out oracles");
        AssertOraclesAgree(lseRef, f.Lse, f.Lse.Select(Math.Abs).ToArray(), "lse oracles");
        AssertClose(output, outRef, f.OutBound, f.OutMag, dtype, "out");
        AssertClose(lse, lseRef, f.LseBound, lseRef.Select(x => Math.Abs(x) + 1).ToArray(), DType.F32, "lse");

        // Backward, from the kernel's out and lse
        (float[] dq, float[] dk, float[] dv) = RunBackward(p, dtype, output, lse);
        BackwardOracle o = Backward64(p, output, lse);
        var dqRef = new double[p.QLen];
        var dkRef = new double[p.KvLen];
        var dvRef = new double[p.KvLen];
        AttentionRef.Backward<double>(ToDouble(p.Dout), ToDouble(p.Q), ToDouble(p.K), ToDouble(p.V), ToDouble(output), ToDouble(lse), dqRef, dkRef, dvRef,
            Batch, p.T, p.Hq, p.Hkv, p.D);
        AssertOraclesAgree(dqRef, o.Dq, o.DqMag, "dq oracles");
        AssertOraclesAgree(dkRef, o.Dk, o.DkMag, "dk oracles");
        AssertOraclesAgree(dvRef, o.Dv, o.DvMag, "dv oracles");
        AssertClose(dq, dqRef, o.DqBound, o.DqMag, dtype, "dq");
        AssertClose(dk, dkRef, o.DkBound, o.DkMag, dtype, "dk");
        AssertClose(dv, dvRef, o.DvBound, o.DvMag, dtype, "dv");
    }

    [Test]
    public void SingleTokenAttendsToItself([ValueSource(nameof(DTypes))] DType dtype)
    {
        // T = 1: P = 1, so out = v of the matching kv head exactly, and dv = the fp32 sum over the group's two query
        // heads of dout, rounded once (0 + 1·a + 1·b = fl(a + b)) — up to the backward's recomputation of P: it recomputes
        // the score (k·q, in another order than the forward's q·k; on CUDA with FMA contraction) and P = exp(s' − lse)
        // is 1 within eP = (D+2)·u·scale·Σ|q k| + 2u (the score's a-priori error and the exp's), which the H200 showed
        // (dv 0.579458058 vs 0.579458117, one ulp). fp32: |dv − (a+b)| ≤ eP·(|a|+|b|) + u·|a+b|; bf16: that, rounded.
        Problem p = MakeProblem((1, 4, 2, 32), dtype, seed: 5);
        (float[] output, float[] lse) = RunForward(p, dtype);
        for (int b = 0; b < Batch; b++)
        for (int h = 0; h < 4; h++)
        for (int d = 0; d < 32; d++)
            Assert.That(output[(b * 4 + h) * 32 + d], Is.EqualTo(p.V[(b * 2 + h / 2) * 32 + d]), $"out[{b},0,{h},{d}]");
        (_, _, float[] dv) = RunBackward(p, dtype, output, lse);
        for (int b = 0; b < Batch; b++)
        for (int g = 0; g < 2; g++)
        for (int d = 0; d < 32; d++)
        {
            float a0 = p.Dout[(b * 4 + 2 * g) * 32 + d], a1 = p.Dout[(b * 4 + 2 * g + 1) * 32 + d];
            float sum = a0 + a1;
            double eP = 0;
            for (int hh = 0; hh < 2; hh++)
            {
                double mag = 0;
                for (int e = 0; e < 32; e++)
                    mag += Math.Abs((double)p.Q[(b * 4 + 2 * g + hh) * 32 + e] * p.K[(b * 2 + g) * 32 + e]);
                eP = Math.Max(eP, 34 * U * GpuAttentionOps.Scale(32) * mag + 2 * U);
            }
            double tol = eP * (Math.Abs(a0) + Math.Abs(a1)) + U * Math.Abs(sum);
            float got = dv[(b * 2 + g) * 32 + d];
            if (dtype == DType.F32)
            {
                Assert.That(got, Is.EqualTo(sum).Within(tol), $"dv[{b},0,{g},{d}]");
            }
            else
            {
                // The bf16 rounding of a value within tol of the sum: one of the bf16 values bracketing [sum − tol, sum + tol].
                float lo = BFloat16.FromSingle((float)(sum - tol)).ToSingle(), hi = BFloat16.FromSingle((float)(sum + tol)).ToSingle();
                Assert.That(got, Is.InRange(Math.Min(lo, hi), Math.Max(lo, hi)), $"dv[{b},0,{g},{d}]");
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Causality, determinism
    // ------------------------------------------------------------------------------------------

    [Test]
    public void FutureKeysDoNotChangeEarlierRows([ValueSource(nameof(DTypes))] DType dtype)
    {
        const int cut = 20;
        Problem p = MakeProblem((33, 4, 2, 32), dtype, seed: 77);
        (float[] out1, float[] lse1) = RunForward(p, dtype);
        (float[] dq1, _, _) = RunBackward(p, dtype, out1, lse1);

        // New k and v at positions >= cut (every batch entry, every kv head).
        float[] k2 = (float[])p.K.Clone(), v2 = (float[])p.V.Clone();
        float[] noise = Representable(Normal(p.KvLen, seed: 78, scale: 3), dtype);
        int kvRow = p.Hkv * p.D;
        for (int b = 0; b < Batch; b++)
        for (int t = cut; t < p.T; t++)
        for (int e = 0; e < kvRow; e++)
        {
            int x = (b * p.T + t) * kvRow + e;
            k2[x] = noise[x];
            v2[x] = -noise[x];
        }
        Problem p2 = p with { K = k2, V = v2 };
        (float[] out2, float[] lse2) = RunForward(p2, dtype);
        (float[] dq2, _, _) = RunBackward(p2, dtype, out2, lse2);

        int qRow = p.Hq * p.D;
        bool laterRowsChanged = false;
        for (int b = 0; b < Batch; b++)
        for (int t = 0; t < p.T; t++)
        for (int e = 0; e < qRow; e++)
        {
            int x = (b * p.T + t) * qRow + e;
            if (t < cut)
            {
                Assert.That(BitConverter.SingleToUInt32Bits(out2[x]), Is.EqualTo(BitConverter.SingleToUInt32Bits(out1[x])), $"out[{b},{t}] changed");
                Assert.That(BitConverter.SingleToUInt32Bits(dq2[x]), Is.EqualTo(BitConverter.SingleToUInt32Bits(dq1[x])), $"dq[{b},{t}] changed");
            }
            else
            {
                laterRowsChanged |= out2[x] != out1[x];
            }
        }
        for (int b = 0; b < Batch; b++)
        for (int h = 0; h < p.Hq; h++)
        for (int t = 0; t < cut; t++)
            Assert.That(lse2[(b * p.Hq + h) * p.T + t], Is.EqualTo(lse1[(b * p.Hq + h) * p.T + t]), $"lse[{b},{h},{t}] changed");
        Assert.That(laterRowsChanged, Is.True, "rows at or after the cut see the new keys");
    }

    [Test]
    public void GradientOfOneQueryRowReachesOnlyEarlierKeys([ValueSource(nameof(DTypes))] DType dtype)
    {
        // dout zero except at query row t0: dq is zero except row t0, and dk, dv are exactly zero at keys s > t0
        // (query t0 never saw them), nonzero at s <= t0.
        const int t0 = 17;
        Problem p0 = MakeProblem((33, 8, 1, 64), dtype, seed: 91);
        float[] dout = new float[p0.QLen];
        int qRow = p0.Hq * p0.D, kvRow = p0.Hkv * p0.D;
        for (int b = 0; b < Batch; b++)
            Array.Copy(p0.Dout, (b * p0.T + t0) * qRow, dout, (b * p0.T + t0) * qRow, qRow);
        Problem p = p0 with { Dout = dout };
        (float[] output, float[] lse) = RunForward(p, dtype);
        (float[] dq, float[] dk, float[] dv) = RunBackward(p, dtype, output, lse);
        for (int b = 0; b < Batch; b++)
        {
            for (int t = 0; t < p.T; t++)
            {
                var dqRow = dq.AsSpan((b * p.T + t) * qRow, qRow).ToArray();
                var dkRow = dk.AsSpan((b * p.T + t) * kvRow, kvRow).ToArray();
                var dvRow = dv.AsSpan((b * p.T + t) * kvRow, kvRow).ToArray();
                if (t != t0) Assert.That(dqRow, Is.All.EqualTo(0f), $"dq[{b},{t}]");
                else Assert.That(dqRow.Any(x => x != 0f), Is.True, $"dq[{b},{t0}] is nonzero");
                if (t > t0)
                {
                    Assert.That(dkRow, Is.All.EqualTo(0f), $"dk[{b},{t}] (a key after the only query with a gradient)");
                    Assert.That(dvRow, Is.All.EqualTo(0f), $"dv[{b},{t}]");
                }
                else
                {
                    Assert.That(dvRow.Any(x => x != 0f), Is.True, $"dv[{b},{t}] is nonzero");
                }
            }
        }
    }

    [Test]
    public void RunsAreBitIdentical([ValueSource(nameof(DTypes))] DType dtype)
    {
        Problem p = MakeProblem((130, 8, 2, 64), dtype, seed: 3);
        (float[] o1, float[] l1) = RunForward(p, dtype);
        (float[] dq1, float[] dk1, float[] dv1) = RunBackward(p, dtype, o1, l1);
        (float[] o2, float[] l2) = RunForward(p, dtype);
        (float[] dq2, float[] dk2, float[] dv2) = RunBackward(p, dtype, o2, l2);
        AssertBitsEqual(o2, o1, "out");
        AssertBitsEqual(l2, l1, "lse");
        AssertBitsEqual(dq2, dq1, "dq");
        AssertBitsEqual(dk2, dk1, "dk");
        AssertBitsEqual(dv2, dv1, "dv");
    }

    // ------------------------------------------------------------------------------------------
    // Host-array overloads, validation
    // ------------------------------------------------------------------------------------------

    [Test]
    public void HostArrayOverloadsEqualDevicePointerPath()
    {
        Problem p = MakeProblem((33, 4, 2, 64), DType.BF16, seed: 12);
        (float[] outDev, float[] lseDev) = RunForward(p, DType.BF16);
        (float[] dqDev, float[] dkDev, float[] dvDev) = RunBackward(p, DType.BF16, outDev, lseDev);

        static BFloat16[] B(float[] x) { var r = new BFloat16[x.Length]; BFloat16.FromSingle(x, r); return r; }
        static float[] F(BFloat16[] x) { var r = new float[x.Length]; BFloat16.ToSingle(x, r); return r; }
        var output = new BFloat16[p.QLen];
        var lse = new float[p.LseLen];
        Ops.Forward<BFloat16>(B(p.Q), B(p.K), B(p.V), output, lse, Batch, p.T, p.Hq, p.Hkv, p.D);
        AssertBitsEqual(F(output), outDev, "out");
        AssertBitsEqual(lse, lseDev, "lse");
        var dq = new BFloat16[p.QLen];
        var dk = new BFloat16[p.KvLen];
        var dv = new BFloat16[p.KvLen];
        Ops.Backward<BFloat16>(B(p.Dout), B(p.Q), B(p.K), B(p.V), output, lse, dq, dk, dv, Batch, p.T, p.Hq, p.Hkv, p.D);
        AssertBitsEqual(F(dq), dqDev, "dq");
        AssertBitsEqual(F(dk), dkDev, "dk");
        AssertBitsEqual(F(dv), dvDev, "dv");

        // lse is optional in the forward (inference): out is the same.
        var out2 = new BFloat16[p.QLen];
        Ops.Forward<BFloat16>(B(p.Q), B(p.K), B(p.V), out2, Span<float>.Empty, Batch, p.T, p.Hq, p.Hkv, p.D);
        AssertBitsEqual(F(out2), outDev, "out without lse");
    }

    [Test]
    public void InvalidShapesThrow()
    {
        DevicePtr x = Alloc(1024);
        Assert.Multiple(() =>
        {
            Assert.Throws<ArgumentOutOfRangeException>(() => Ops.Forward(DType.F32, x, x, x, x, x, 1, 4, 4, 2, GpuAttentionOps.MaxHeadDim + 1));
            Assert.Throws<ArgumentOutOfRangeException>(() => Ops.Forward(DType.F32, x, x, x, x, x, 1, 4, 4, 2, 0));
            Assert.Throws<ArgumentException>(() => Ops.Forward(DType.F32, x, x, x, x, x, 1, 4, 6, 4, 32));
            Assert.Throws<ArgumentException>(() => Ops.Forward(DType.F16, x, x, x, x, x, 1, 4, 4, 2, 32));
            Assert.Throws<ArgumentException>(() => Ops.Forward(DType.F32, DevicePtr.Null, x, x, x, x, 1, 4, 4, 2, 32));
            Assert.Throws<ArgumentException>(() => Ops.Backward(DType.F32, x, x, x, x, x, x, x, x, x, DevicePtr.Null, 1, 4, 4, 2, 32));
            Assert.Throws<ArgumentException>(() => Ops.Backward(DType.F32, x, x, x, x, x, x, x, x, DevicePtr.Null, x, 1, 4, 4, 2, 32));
            Assert.Throws<ArgumentException>(() => Ops.Forward<float>(new float[10], new float[10], new float[10], new float[10],
                Span<float>.Empty, 1, 1, 1, 1, 8));
        });
        // Empty problems launch nothing (null pointers are fine then).
        Ops.Forward(DType.F32, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, 0, 4, 4, 2, 32);
        Ops.Backward(DType.BF16, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null,
            DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, 2, 0, 4, 2, 32);
    }

    [Test]
    public void SharedMemoryFitsWithoutOptIn()
    {
        // 48 KB is the most dynamic shared memory a CUDA launch gets without cudaFuncSetAttribute.
        Assert.That(GpuAttentionOps.ForwardSharedBytes(GpuAttentionOps.MaxHeadDim), Is.LessThanOrEqualTo(48 * 1024));
        Assert.That(GpuAttentionOps.BackwardDkDvSharedBytes(GpuAttentionOps.MaxHeadDim), Is.LessThanOrEqualTo(48 * 1024));
        Assert.That(GpuAttentionOps.BackwardDqSharedBytes(GpuAttentionOps.MaxHeadDim), Is.LessThanOrEqualTo(48 * 1024));
    }

    // ------------------------------------------------------------------------------------------
    // Timing
    // ------------------------------------------------------------------------------------------

    [Test, Explicit("timing, ~seconds on the emulator")]
    public void ForwardBackwardTimingT256([ValueSource(nameof(DTypes))] DType dtype)
    {
        const int b = 1, t = 256, hq = 8, hkv = 2, d = 64;
        int qn = b * t * hq * d, kvn = b * t * hkv * d, es = dtype.ElementSize();
        DevicePtr q = Upload(Normal(qn, 1), dtype), k = Upload(Normal(kvn, 2), dtype), v = Upload(Normal(kvn, 3), dtype);
        DevicePtr dout = Upload(Normal(qn, 4), dtype);
        DevicePtr o = Alloc((long)qn * es), l = Alloc((long)b * hq * t * sizeof(float));
        DevicePtr dq = Alloc((long)qn * es), dk = Alloc((long)kvn * es), dv = Alloc((long)kvn * es);
        DevicePtr work = Alloc(GpuAttentionOps.BackwardWorkspaceBytes(b, t, hq));
        double bestF = double.MaxValue, bestB = double.MaxValue;
        for (int rep = 0; rep < 3; rep++)
        {
            var sw = Stopwatch.StartNew();
            Ops.Forward(dtype, q, k, v, o, l, b, t, hq, hkv, d);
            Gpu.Synchronize();
            double fwd = sw.Elapsed.TotalMilliseconds;
            sw.Restart();
            Ops.Backward(dtype, dout, q, k, v, o, l, dq, dk, dv, work, b, t, hq, hkv, d);
            Gpu.Synchronize();
            double bwd = sw.Elapsed.TotalMilliseconds;
            bestF = Math.Min(bestF, fwd);
            bestB = Math.Min(bestB, bwd);
        }
        TestContext.Out.WriteLine($"{Device} {dtype} B=1 T=256 Hq=8 Hkv=2 D=64: forward {bestF:F2} ms, backward {bestB:F2} ms (best of 3)");
        Assert.That(Download(o, qn, dtype).All(float.IsFinite), Is.True);
    }
}
