using System.Diagnostics;
using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class AttentionTests
{
    private sealed record Case(int B, int T, int Hq, int Hkv, int D)
    {
        public int QLength => B * T * Hq * D;
        public int KvLength => B * T * Hkv * D;
        public int LseLength => B * Hq * T;
    }

    private static (double[] Out, double[] Lse) Forward(Case c, double[] q, double[] k, double[] v, int threads = -1, int[]? positions = null)
    {
        var output = new double[c.QLength];
        var lse = new double[c.LseLength];
        AttentionRef.Forward<double>(q, k, v, output, lse, positions, c.B, c.T, c.Hq, c.Hkv, c.D, threads);
        return (output, lse);
    }

    /// <summary>
    /// The simple float64 reference: materializes the masked T×T scores of each (b, h), softmax with the max
    /// subtracted, then P·V. Head h reads kv head h / (Hq/Hkv). With positions (packed documents) the scores before
    /// t − positions[t] are masked too.
    /// </summary>
    private static (double[] Out, double[] Lse) Naive(Case c, double[] q, double[] k, double[] v, int[]? positions = null)
    {
        var output = new double[c.QLength];
        var lse = new double[c.LseLength];
        double scale = 1 / Math.Sqrt(c.D);
        int group = c.Hq / c.Hkv;
        for (int b = 0; b < c.B; b++)
        for (int h = 0; h < c.Hq; h++)
        {
            int g = h / group;
            var scores = new double[c.T, c.T];
            for (int t = 0; t < c.T; t++)
            for (int s = 0; s < c.T; s++)
            {
                if (s > t || (positions is not null && s < t - positions[b * c.T + t])) { scores[t, s] = double.NegativeInfinity; continue; }
                double dot = 0;
                for (int d = 0; d < c.D; d++)
                    dot += q[((b * c.T + t) * c.Hq + h) * c.D + d] * k[((b * c.T + s) * c.Hkv + g) * c.D + d];
                scores[t, s] = dot * scale;
            }
            for (int t = 0; t < c.T; t++)
            {
                double max = double.NegativeInfinity;
                for (int s = 0; s < c.T; s++) max = Math.Max(max, scores[t, s]);
                double sum = 0;
                for (int s = 0; s < c.T; s++) sum += Math.Exp(scores[t, s] - max);
                lse[(b * c.Hq + h) * c.T + t] = max + Math.Log(sum);
                for (int d = 0; d < c.D; d++)
                {
                    double acc = 0;
                    for (int s = 0; s < c.T; s++)
                        acc += Math.Exp(scores[t, s] - max) / sum * v[((b * c.T + s) * c.Hkv + g) * c.D + d];
                    output[((b * c.T + t) * c.Hq + h) * c.D + d] = acc;
                }
            }
        }
        return (output, lse);
    }

    private static (double[] Q, double[] K, double[] V) RandomInputs(Case c, int seed, double scale = 1.5)
    {
        var rng = new Random(seed);
        return (AttnGradCheck.Random(rng, c.QLength, scale), AttnGradCheck.Random(rng, c.KvLength, scale),
            AttnGradCheck.Random(rng, c.KvLength, scale));
    }

    [TestCase(2, 7, 4, 2, 4)]
    [TestCase(2, 6, 4, 2, 6)]
    [TestCase(2, 7, 3, 3, 5)] // Hq == Hkv
    [TestCase(2, 5, 4, 4, 4)] // Hq == Hkv
    [TestCase(2, 4, 4, 1, 4)] // one kv head for all
    [TestCase(2, 1, 2, 1, 4)] // a single position: out = v, dq = dk = 0
    public void GradientsMatchCentralDifferences(int b, int t, int hq, int hkv, int d)
    {
        var c = new Case(b, t, hq, hkv, d);
        var (q, k, v) = RandomInputs(c, 100 + t * d + hq);
        var dout = AttnGradCheck.Random(new Random(7), c.QLength);
        // Objective L = Σ dout ∘ out, so dL/d(out) = dout.
        double Objective()
        {
            var (o, _) = Forward(c, q, k, v);
            double sum = 0;
            for (int i = 0; i < o.Length; i++) sum += dout[i] * o[i];
            return sum;
        }
        var (output, lse) = Forward(c, q, k, v);
        double[] dq = new double[c.QLength], dk = new double[c.KvLength], dv = new double[c.KvLength];
        AttentionRef.Backward<double>(dout, q, k, v, output, lse, dq, dk, dv, c.B, c.T, c.Hq, c.Hkv, c.D);

        AttnGradCheck.AssertClose(dq, GradCheck.Numeric(q, Objective), "dq");
        AttnGradCheck.AssertClose(dk, GradCheck.Numeric(k, Objective), "dk");
        AttnGradCheck.AssertClose(dv, GradCheck.Numeric(v, Objective), "dv");
        Assert.That(dq.Concat(dk).Concat(dv).Any(x => Math.Abs(x) > 1e-3) || t == 1, Is.True, "gradients are not all ~0");
    }

    [Test]
    public void BackwardOverwritesItsOutputs()
    {
        var c = new Case(2, 5, 4, 2, 4);
        var (q, k, v) = RandomInputs(c, 3);
        var dout = AttnGradCheck.Random(new Random(4), c.QLength);
        var (output, lse) = Forward(c, q, k, v);
        double[] dq = new double[c.QLength], dk = new double[c.KvLength], dv = new double[c.KvLength];
        AttentionRef.Backward<double>(dout, q, k, v, output, lse, dq, dk, dv, c.B, c.T, c.Hq, c.Hkv, c.D);
        double[] dq2 = Enumerable.Repeat(9.0, c.QLength).ToArray(), dk2 = Enumerable.Repeat(9.0, c.KvLength).ToArray(),
            dv2 = Enumerable.Repeat(-9.0, c.KvLength).ToArray();
        AttentionRef.Backward<double>(dout, q, k, v, output, lse, dq2, dk2, dv2, c.B, c.T, c.Hq, c.Hkv, c.D);
        Assert.That(dq2, Is.EqualTo(dq));
        Assert.That(dk2, Is.EqualTo(dk));
        Assert.That(dv2, Is.EqualTo(dv));
    }

    [TestCase(2, 7, 4, 2, 4)]
    [TestCase(2, 7, 2, 2, 6)]
    [TestCase(1, 1, 2, 1, 5)]
    [TestCase(3, 16, 8, 2, 8)]
    public void ForwardMatchesNaiveMaterializedScores(int b, int t, int hq, int hkv, int d)
    {
        var c = new Case(b, t, hq, hkv, d);
        var (q, k, v) = RandomInputs(c, 11 * t + d, scale: 3); // large scores: the online max matters
        var (output, lse) = Forward(c, q, k, v);
        var (expectedOut, expectedLse) = Naive(c, q, k, v);
        Assert.That(output, Is.EqualTo(expectedOut).Within(1e-12));
        Assert.That(lse, Is.EqualTo(expectedLse).Within(1e-12));
    }

    /// <summary>Packed rows: documents of 3, 1, 4 tokens (row 0) and 5, 3 (row 1).</summary>
    private static readonly int[] PackedPositions = [0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2];

    [TestCase(4, 2, 4)]
    [TestCase(3, 3, 5)]
    public void PackedForwardMatchesNaiveScoresMaskedToEachDocument(int hq, int hkv, int d)
    {
        var c = new Case(2, 8, hq, hkv, d);
        var (q, k, v) = RandomInputs(c, 31 + d, scale: 3);
        var (output, lse) = Forward(c, q, k, v, positions: PackedPositions);
        var (expectedOut, expectedLse) = Naive(c, q, k, v, PackedPositions);
        Assert.That(output, Is.EqualTo(expectedOut).Within(1e-12));
        Assert.That(lse, Is.EqualTo(expectedLse).Within(1e-12));
        // Control: the causal result differs in the later documents.
        Assert.That(Forward(c, q, k, v).Out, Is.Not.EqualTo(expectedOut).Within(1e-6));
    }

    [TestCase(4, 2, 4)]
    [TestCase(2, 1, 3)]
    public void PackedGradientsMatchCentralDifferences(int hq, int hkv, int d)
    {
        var c = new Case(2, 8, hq, hkv, d);
        var (q, k, v) = RandomInputs(c, 57 + d);
        var dout = AttnGradCheck.Random(new Random(9), c.QLength);
        double Objective()
        {
            var (o, _) = Forward(c, q, k, v, positions: PackedPositions);
            double sum = 0;
            for (int i = 0; i < o.Length; i++) sum += dout[i] * o[i];
            return sum;
        }
        var (output, lse) = Forward(c, q, k, v, positions: PackedPositions);
        double[] dq = new double[c.QLength], dk = new double[c.KvLength], dv = new double[c.KvLength];
        AttentionRef.Backward<double>(dout, q, k, v, output, lse, dq, dk, dv, PackedPositions, c.B, c.T, c.Hq, c.Hkv, c.D);
        AttnGradCheck.AssertClose(dq, GradCheck.Numeric(q, Objective), "dq");
        AttnGradCheck.AssertClose(dk, GradCheck.Numeric(k, Objective), "dk");
        AttnGradCheck.AssertClose(dv, GradCheck.Numeric(v, Objective), "dv");
        // The single-token document (row 0, t = 3) sees only itself: out = v, dq = 0.
        int g = 0;
        for (int dd = 0; dd < d; dd++)
        {
            Assert.That(output[((0 * c.T + 3) * c.Hq + 0) * d + dd], Is.EqualTo(v[((0 * c.T + 3) * c.Hkv + g) * d + dd]).Within(1e-14));
            Assert.That(dq[((0 * c.T + 3) * c.Hq + 0) * d + dd], Is.EqualTo(0).Within(1e-14));
        }
    }

    [Test]
    public void ValidatePositionsRejectsRowsThatDoNotStartADocumentAndJumps()
    {
        AttentionRef.ValidatePositions(PackedPositions, 2, 8);
        AttentionRef.ValidatePositions(new int[6], 2, 3);  // every token its own document
        Assert.That(Assert.Throws<ArgumentException>(() => AttentionRef.ValidatePositions([0, 1, 2, 1], 1, 4))!.Message,
            Does.Contain("positions[0, 3] = 1"));
        Assert.That(Assert.Throws<ArgumentException>(() => AttentionRef.ValidatePositions([0, 1, 1, 2], 2, 2))!.Message,
            Does.Contain("positions[1, 0] = 1"));
        Assert.Throws<ArgumentException>(() => AttentionRef.ValidatePositions([0, 1, 2], 1, 4));
        Assert.Throws<ArgumentException>(() => AttentionRef.ValidatePositions([0, -1], 1, 2));
    }

    [Test]
    public void FirstPositionAttendsOnlyToItself()
    {
        var c = new Case(1, 4, 2, 1, 3);
        var (q, k, v) = RandomInputs(c, 5);
        var (output, lse) = Forward(c, q, k, v);
        for (int h = 0; h < c.Hq; h++)
        {
            for (int d = 0; d < c.D; d++) Assert.That(output[h * c.D + d], Is.EqualTo(v[d]), $"out[0,{h},{d}] = v[0,0,{d}]");
            double score = 0;
            for (int d = 0; d < c.D; d++) score += q[h * c.D + d] * k[d];
            Assert.That(lse[h * c.T], Is.EqualTo(score / Math.Sqrt(c.D)).Within(1e-15), "lse of one key = its scaled score");
        }
    }

    [Test]
    public void CausalFutureKeysAndValuesDoNotChangeEarlierRows()
    {
        var c = new Case(2, 7, 4, 2, 5);
        var (q, k, v) = RandomInputs(c, 21);
        var (output, lse) = Forward(c, q, k, v);
        for (int t = 0; t < c.T - 1; t++)
        {
            double[] k2 = (double[])k.Clone(), v2 = (double[])v.Clone();
            var rng = new Random(t);
            for (int b = 0; b < c.B; b++)
            for (int s = t + 1; s < c.T; s++)
            for (int i = 0; i < c.Hkv * c.D; i++)
            {
                k2[(b * c.T + s) * c.Hkv * c.D + i] += rng.NextDouble() * 4 - 2;
                v2[(b * c.T + s) * c.Hkv * c.D + i] += rng.NextDouble() * 4 - 2;
            }
            var (output2, lse2) = Forward(c, q, k2, v2);
            bool laterChanged = false;
            for (int b = 0; b < c.B; b++)
            for (int h = 0; h < c.Hq; h++)
            for (int u = 0; u < c.T; u++)
            {
                int row = (b * c.T + u) * c.Hq + h;
                var before = output.AsSpan(row * c.D, c.D).ToArray();
                var after = output2.AsSpan(row * c.D, c.D).ToArray();
                if (u <= t)
                {
                    Assert.That(after, Is.EqualTo(before), $"out[{b},{u},{h}] changed when keys > {t} changed");
                    Assert.That(lse2[(b * c.Hq + h) * c.T + u], Is.EqualTo(lse[(b * c.Hq + h) * c.T + u]));
                }
                else if (!after.SequenceEqual(before)) laterChanged = true;
            }
            Assert.That(laterChanged, Is.True, "rows after t do see the changed keys");
        }
    }

    [Test]
    public void MatchesTorchOracle()
    {
        var data = new TorchRecords("attn_ce_attention.bin");
        int[] shape = data.I32("shape");
        var c = new Case(shape[0], shape[1], shape[2], shape[3], shape[4]);
        Assert.That(data.Dims("q"), Is.EqualTo(new[] { c.B, c.T, c.Hq, c.D }));
        Assert.That(data.Dims("lse"), Is.EqualTo(new[] { c.B, c.Hq, c.T }));
        float[] q = data.F32("q"), k = data.F32("k"), v = data.F32("v"), dout = data.F32("dout");

        // float64: torch's float64 run on the same (float32-valued) inputs, to ~1e-12.
        double[] qd = GradCheck.ToDouble(q), kd = GradCheck.ToDouble(k), vd = GradCheck.ToDouble(v), doutd = GradCheck.ToDouble(dout);
        var (outD, lseD) = Forward(c, qd, kd, vd);
        double[] dqD = new double[c.QLength], dkD = new double[c.KvLength], dvD = new double[c.KvLength];
        AttentionRef.Backward<double>(doutd, qd, kd, vd, outD, lseD, dqD, dkD, dvD, c.B, c.T, c.Hq, c.Hkv, c.D);
        Assert.That(outD, Is.EqualTo(data.F64("out_f64")).Within(1e-12), "out f64");
        Assert.That(lseD, Is.EqualTo(data.F64("lse_f64")).Within(1e-12), "lse f64");
        Assert.That(dqD, Is.EqualTo(data.F64("dq_f64")).Within(1e-12), "dq f64");
        Assert.That(dkD, Is.EqualTo(data.F64("dk_f64")).Within(1e-12), "dk f64");
        Assert.That(dvD, Is.EqualTo(data.F64("dv_f64")).Within(1e-12), "dv f64");

        // float32: torch's float32 run; both sides round in float32, values are O(1): 1e-5 absolute.
        float[] outF = new float[c.QLength], lseF = new float[c.LseLength];
        AttentionRef.Forward<float>(q, k, v, outF, lseF, c.B, c.T, c.Hq, c.Hkv, c.D);
        float[] dqF = new float[c.QLength], dkF = new float[c.KvLength], dvF = new float[c.KvLength];
        AttentionRef.Backward<float>(dout, q, k, v, outF, lseF, dqF, dkF, dvF, c.B, c.T, c.Hq, c.Hkv, c.D);
        const float tol = 1e-5f;
        Assert.That(outF, Is.EqualTo(data.F32("out")).Within(tol), "out f32");
        Assert.That(lseF, Is.EqualTo(data.F32("lse")).Within(tol), "lse f32");
        Assert.That(dqF, Is.EqualTo(data.F32("dq")).Within(tol), "dq f32");
        Assert.That(dkF, Is.EqualTo(data.F32("dk")).Within(tol), "dk f32");
        Assert.That(dvF, Is.EqualTo(data.F32("dv")).Within(tol), "dv f32");
    }

    [Test]
    public void FloatPathAgreesWithDoublePathWithinFloatRounding()
    {
        var c = new Case(2, 40, 8, 2, 32);
        var (q, k, v) = RandomInputs(c, 77);
        var dout = AttnGradCheck.Random(new Random(78), c.QLength);
        // Round the inputs to float first, so the only difference is the arithmetic.
        float[] qf = GradCheck.ToFloat(q), kf = GradCheck.ToFloat(k), vf = GradCheck.ToFloat(v), doutf = GradCheck.ToFloat(dout);
        double[] qd = GradCheck.ToDouble(qf), kd = GradCheck.ToDouble(kf), vd = GradCheck.ToDouble(vf), doutd = GradCheck.ToDouble(doutf);

        var (outD, lseD) = Forward(c, qd, kd, vd);
        double[] dqD = new double[c.QLength], dkD = new double[c.KvLength], dvD = new double[c.KvLength];
        AttentionRef.Backward<double>(doutd, qd, kd, vd, outD, lseD, dqD, dkD, dvD, c.B, c.T, c.Hq, c.Hkv, c.D);

        float[] outF = new float[c.QLength], lseF = new float[c.LseLength];
        AttentionRef.Forward<float>(qf, kf, vf, outF, lseF, c.B, c.T, c.Hq, c.Hkv, c.D);
        float[] dqF = new float[c.QLength], dkF = new float[c.KvLength], dvF = new float[c.KvLength];
        AttentionRef.Backward<float>(doutf, qf, kf, vf, outF, lseF, dqF, dkF, dvF, c.B, c.T, c.Hq, c.Hkv, c.D);

        // Float epsilon is 1.2e-7; dot products of 32 terms and sums of up to 40 keys: ~1e-6 relative to the
        // values' magnitude (floor 0.1 for values near zero).
        Assert.Multiple(() =>
        {
            Assert.That(AttnGradCheck.MaxRelative(outF, outD, 0.1), Is.LessThan(1e-5), "out");
            Assert.That(AttnGradCheck.MaxRelative(lseF, lseD, 0.1), Is.LessThan(1e-5), "lse");
            Assert.That(AttnGradCheck.MaxRelative(dqF, dqD, 0.1), Is.LessThan(1e-5), "dq");
            Assert.That(AttnGradCheck.MaxRelative(dkF, dkD, 0.1), Is.LessThan(1e-5), "dk");
            Assert.That(AttnGradCheck.MaxRelative(dvF, dvD, 0.1), Is.LessThan(1e-5), "dv");
        });
    }

    [Test]
    public void ResultsAreIdenticalForAnyDegreeOfParallelism()
    {
        var c = new Case(2, 33, 8, 2, 16);
        var (q, k, v) = RandomInputs(c, 9);
        float[] qf = GradCheck.ToFloat(q), kf = GradCheck.ToFloat(k), vf = GradCheck.ToFloat(v);
        float[] dout = GradCheck.ToFloat(AttnGradCheck.Random(new Random(10), c.QLength));
        float[][] Run(int threads)
        {
            float[] o = new float[c.QLength], l = new float[c.LseLength];
            AttentionRef.Forward<float>(qf, kf, vf, o, l, c.B, c.T, c.Hq, c.Hkv, c.D, threads);
            float[] dq = new float[c.QLength], dk = new float[c.KvLength], dv = new float[c.KvLength];
            AttentionRef.Backward<float>(dout, qf, kf, vf, o, l, dq, dk, dv, c.B, c.T, c.Hq, c.Hkv, c.D, threads);
            return [o, l, dq, dk, dv];
        }
        var sequential = Run(1);
        foreach (int threads in new[] { 2, 3, -1 })
        {
            var parallel = Run(threads);
            for (int i = 0; i < sequential.Length; i++)
                Assert.That(parallel[i], Is.EqualTo(sequential[i]), $"output {i} with {threads} threads");
        }
    }

    [Test]
    public void RejectsBadShapes()
    {
        var q = new double[2 * 3 * 3 * 4];
        var kv = new double[2 * 3 * 2 * 4];
        var o = new double[q.Length];
        var lse = new double[2 * 3 * 3];
        var ex = Assert.Throws<ArgumentException>(() => AttentionRef.Forward<double>(q, kv, kv, o, lse, 2, 3, 3, 2, 4));
        Assert.That(ex!.Message, Does.Contain("multiple"));
        var q4 = new double[2 * 3 * 4 * 4];
        ex = Assert.Throws<ArgumentException>(() => AttentionRef.Forward<double>(q4, kv, kv, new double[q4.Length], new double[5], 2, 3, 4, 2, 4));
        Assert.That(ex!.ParamName, Is.EqualTo("lse"));
    }

    [Test, Explicit("timing: prints the float forward + backward time")]
    public void TimeFloatForwardBackward()
    {
        var c = new Case(1, 512, 8, 2, 64);
        var (q, k, v) = RandomInputs(c, 1, 1);
        float[] qf = GradCheck.ToFloat(q), kf = GradCheck.ToFloat(k), vf = GradCheck.ToFloat(v);
        float[] dout = GradCheck.ToFloat(AttnGradCheck.Random(new Random(2), c.QLength));
        float[] o = new float[c.QLength], l = new float[c.LseLength];
        float[] dq = new float[c.QLength], dk = new float[c.KvLength], dv = new float[c.KvLength];
        for (int rep = 0; rep < 3; rep++)
        {
            var sw = Stopwatch.StartNew();
            AttentionRef.Forward<float>(qf, kf, vf, o, l, c.B, c.T, c.Hq, c.Hkv, c.D);
            double fwd = sw.Elapsed.TotalMilliseconds;
            sw.Restart();
            AttentionRef.Backward<float>(dout, qf, kf, vf, o, l, dq, dk, dv, c.B, c.T, c.Hq, c.Hkv, c.D);
            double bwd = sw.Elapsed.TotalMilliseconds;
            TestContext.Out.WriteLine($"attention float B=1 T=512 Hq=8 Hkv=2 D=64 ({Environment.ProcessorCount} cpus): forward {fwd:F1} ms, backward {bwd:F1} ms");
        }
        Assert.That(o.All(float.IsFinite) && dq.All(float.IsFinite), Is.True);
    }
}
