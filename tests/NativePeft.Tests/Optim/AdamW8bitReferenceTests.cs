using NativePeft.Optim;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Optim;

/// <summary>
/// The blockwise 8-bit AdamW step against a float64 reference written here from its definition (bitsandbytes'
/// blockwise 8-bit Adam: dequantize each state with its block's absmax, update, re-quantize each block with the new
/// absmax = max |state| to the nearest code of the dynamic map: signed for m, unsigned for v), with the AdamW update
/// this library documents (torch.optim.AdamW, decay first). The code under test is <see cref="AdamWMath.Step8Bit"/>,
/// which <see cref="AdamW8bitTests.CpuTwinEqualsKernelBitForBit"/> shows bit-identical to the adamw8bit_blockwise
/// kernel on the emulator and CUDA. Compared each step from the same state: the state bytes exactly (except where the
/// float64 value lies within fp32 rounding of the midpoint between two codes: either code is then right), absmax and
/// the parameters within fp32 rounding. The map itself (DynamicMap) is checked against bitsandbytes' file elsewhere.
/// A planted defect (β1 = 0.8 in the reference) must fail the same comparison.
/// </summary>
public sealed class AdamW8bitReferenceTests
{
    private const int N = 1000;  // 3 full blocks of 256 and a partial one of 232; block 1's gradients are zero at step 1

    private sealed record Reference(double[] P, byte[] Qm, byte[] Qv, double[] AbsM, double[] AbsV, bool[] AmbiguousM, bool[] AmbiguousV);

    /// <summary>Nearest code of <paramref name="map"/> to x (ties: the lower code, bitsandbytes' midpoint rule), and whether
    /// x lies within <paramref name="tol"/> of a midpoint (then either neighbour is a correct fp32 result).</summary>
    private static (byte Code, bool Ambiguous) Nearest(ReadOnlySpan<float> map, double x, double tol)
    {
        int best = 0;
        double bestD = double.MaxValue, second = double.MaxValue;
        for (int k = 0; k < map.Length; k++)
        {
            double d = Math.Abs(map[k] - x);
            if (d < bestD) { second = bestD; bestD = d; best = k; }
            else if (d < second) second = d;
        }
        return ((byte)best, second - bestD <= tol);
    }

    private static Reference Step(float[] p, float[] g, byte[] qm, byte[] qv, float[] absM, float[] absV, AdamWOptions o, double lr, long t, double beta1)
    {
        var signed = DynamicMap.Signed;
        var unsigned = DynamicMap.Unsigned;
        int blocks = (N + 255) / 256;
        var r = new Reference(new double[N], new byte[N], new byte[N], new double[blocks], new double[blocks], new bool[N], new bool[N]);
        double bc1 = 1 - Math.Pow(beta1, t), bc2 = 1 - Math.Pow(o.Beta2, t);
        for (int b = 0; b < blocks; b++)
        {
            int start = b * 256, len = Math.Min(256, N - start);
            var m = new double[len];
            var v = new double[len];
            for (int j = 0; j < len; j++)
            {
                int i = start + j;
                double mi = signed[qm[i]] * (double)absM[b], vi = unsigned[qv[i]] * (double)absV[b], gi = g[i];
                m[j] = beta1 * mi + (1 - beta1) * gi;
                v[j] = o.Beta2 * vi + (1 - o.Beta2) * gi * gi;
                double decayed = p[i] * (1 - lr * o.WeightDecay);
                r.P[i] = decayed - lr / bc1 * m[j] / (Math.Sqrt(v[j]) / Math.Sqrt(bc2) + o.Eps);
            }
            double am = m.Max(Math.Abs), av = v.Max(Math.Abs);
            r.AbsM[b] = am;
            r.AbsV[b] = av;
            for (int j = 0; j < len; j++)
            {
                int i = start + j;
                // fp32 carries m, v, the absmax and 1/absmax: a few units of 2^-24 of x
                (r.Qm[i], r.AmbiguousM[i]) = am == 0 ? ((byte)DynamicMap.SignedZeroIndex, false) : Nearest(signed, m[j] / am, 8e-7 * Math.Abs(m[j] / am) + 1e-12);
                (r.Qv[i], r.AmbiguousV[i]) = av == 0 ? ((byte)AdamWMath.UnsignedZeroIndex, false) : Nearest(unsigned, v[j] / av, 8e-7 * Math.Abs(v[j] / av) + 1e-12);
            }
        }
        return r;
    }

    /// <summary>Runs 6 steps; returns the worst mismatch counts of state bytes (outside the ambiguous cases).</summary>
    private static (int Mismatches, int Ambiguous, double WorstP, double WorstAbs) Run(double referenceBeta1)
    {
        var o = new AdamWOptions();
        var rng = new Random(7);
        float[] p = Enumerable.Range(0, N).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
        byte[] qm = Enumerable.Repeat((byte)DynamicMap.SignedZeroIndex, N).ToArray();
        byte[] qv = new byte[N];
        int blocks = (N + 255) / 256;
        float[] absM = new float[blocks], absV = new float[blocks];
        int mismatches = 0, ambiguous = 0;
        double worstP = 0, worstAbs = 0;
        for (long t = 1; t <= 6; t++)
        {
            double lr = 1e-2 / t;
            float[] g = Enumerable.Range(0, N).Select(i => t == 1 && i is >= 256 and < 512 ? 0f : (float)((rng.NextDouble() * 2 - 1) * Math.Pow(10, rng.Next(-3, 1)))).ToArray();
            var want = Step(p, g, qm, qv, absM, absV, o, lr, t, referenceBeta1);
            AdamWMath.Step8Bit(p, g, qm, qv, absM, absV, AdamWStepScalars.For(o, lr, t));
            for (int i = 0; i < N; i++)
            {
                foreach (var (got, exp, amb) in new[] { (qm[i], want.Qm[i], want.AmbiguousM[i]), (qv[i], want.Qv[i], want.AmbiguousV[i]) })
                {
                    if (got == exp) continue;
                    if (amb && Math.Abs(got - exp) == 1) ambiguous++;
                    else mismatches++;
                }
                // p: fp32 rounding of the decayed p and of the step (each a few ulps)
                double tolP = 8 * Math.Abs(want.P[i]) * Math.Pow(2, -24) + 1e-6 * lr;
                worstP = Math.Max(worstP, Math.Abs(p[i] - want.P[i]) / tolP);
            }
            for (int b = 0; b < blocks; b++)
            {
                worstAbs = Math.Max(worstAbs, Math.Abs(absM[b] - want.AbsM[b]) / (4 * Math.Pow(2, -24) * want.AbsM[b] + 1e-30));
                worstAbs = Math.Max(worstAbs, Math.Abs(absV[b] - want.AbsV[b]) / (4 * Math.Pow(2, -24) * want.AbsV[b] + 1e-30));
            }
        }
        return (mismatches, ambiguous, worstP, worstAbs);
    }

    [Test]
    public void SixStepsMatchTheFloat64ReferenceStateByteForStateByte()
    {
        var (mismatches, ambiguous, worstP, worstAbs) = Run(new AdamWOptions().Beta1);
        TestContext.Out.WriteLine($"6 steps x {N} elements x 2 states: {mismatches} mismatches, {ambiguous} midpoint cases; worst p {worstP:F3} of its bound, worst absmax {worstAbs:F3}");
        Assert.That(mismatches, Is.Zero, "state bytes equal the float64 reference's nearest codes");
        Assert.That(ambiguous, Is.LessThanOrEqualTo(6), "midpoint cases are rare (each is either code within fp32 rounding)");
        Assert.That(worstP, Is.LessThanOrEqualTo(1.0), "parameters within fp32 rounding of the float64 update");
        Assert.That(worstAbs, Is.LessThanOrEqualTo(1.0), "absmax within 4 fp32 ulps");
    }

    [Test]
    public void APlantedDefectInTheReferenceFails()
    {
        // β1 = 0.8 instead of 0.9: the comparison above must see it (in the state bytes and the parameters).
        var (mismatches, _, worstP, _) = Run(0.8);
        Assert.That(mismatches, Is.GreaterThan(100));
        Assert.That(worstP, Is.GreaterThan(1.0));
    }
}
