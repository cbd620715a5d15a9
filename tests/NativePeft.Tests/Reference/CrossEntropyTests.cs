using NativePeft.Runtime;
using System.Diagnostics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class CrossEntropyTests
{
    private const int Ignore = CrossEntropyRef.IgnoreIndex;

    private static int[] RandomLabels(Random rng, int n, int vocab, double ignoredFraction)
    {
        var labels = new int[n];
        for (int i = 0; i < n; i++) labels[i] = rng.NextDouble() < ignoredFraction ? Ignore : rng.Next(vocab);
        return labels;
    }

    /// <summary>Naive float64: the full [N, V] logits, log-softmax per row, mean over counted tokens.</summary>
    private static (double Loss, int Count, double[] Lse) Naive(double[] hidden, double[] weight, int[] labels, int n, int c, int vocab)
    {
        var lse = new double[n];
        double total = 0;
        int count = 0;
        for (int i = 0; i < n; i++)
        {
            var logits = new double[vocab];
            for (int v = 0; v < vocab; v++)
            for (int d = 0; d < c; d++)
                logits[v] += hidden[i * c + d] * weight[v * c + d];
            double max = logits.Max();
            lse[i] = max + Math.Log(logits.Sum(z => Math.Exp(z - max)));
            if (labels[i] == Ignore) continue;
            total += -(logits[labels[i]] - lse[i]); // −log_softmax[label]
            count++;
        }
        return (count == 0 ? 0 : total / count, count, lse);
    }

    private static (double Loss, int Count, double[] Lse, double[] DHidden, double[] DWeight) Run(
        double[] hidden, double[] weight, int[] labels, int n, int c, int vocab, int chunk, double dloss = 1, int threads = -1)
    {
        var lse = new double[n];
        var (loss, count) = CrossEntropyRef.Forward<double>(hidden, weight, labels, lse, n, c, vocab, chunk, threads);
        var dhidden = new double[n * c];
        var dweight = new double[vocab * c];
        CrossEntropyRef.Backward<double>(hidden, weight, labels, lse, dloss, dhidden, dweight, n, c, vocab, chunk, threads);
        return (loss, count, lse, dhidden, dweight);
    }

    [TestCase(7, 5, 9, 4)]
    [TestCase(7, 5, 9, 1)]
    [TestCase(5, 6, 13, 13)]
    [TestCase(4, 3, 6, 100)]
    public void GradientsMatchCentralDifferences(int n, int c, int vocab, int chunk)
    {
        var rng = new Random(n * 31 + vocab + chunk);
        double[] hidden = AttnGradCheck.Random(rng, n * c, 1.5), weight = AttnGradCheck.Random(rng, vocab * c, 1.0);
        int[] labels = RandomLabels(rng, n, vocab, 0.3);
        labels[0] = Ignore;
        labels[1] = vocab - 1;
        const double dloss = 0.7;
        double Objective() => dloss * CrossEntropyRef.Forward<double>(hidden, weight, labels, Span<double>.Empty, n, c, vocab, chunk).Loss;

        var (_, count, _, dhidden, dweight) = Run(hidden, weight, labels, n, c, vocab, chunk, dloss);
        Assert.That(count, Is.EqualTo(labels.Count(l => l != Ignore)));
        AttnGradCheck.AssertClose(dhidden, GradCheck.Numeric(hidden, Objective), "dhidden");
        AttnGradCheck.AssertClose(dweight, GradCheck.Numeric(weight, Objective), "dweight");
        for (int d = 0; d < c; d++) Assert.That(dhidden[d], Is.EqualTo(0), "ignored row 0 has no gradient");
    }

    [TestCase(6, 4, 10, 3)]
    [TestCase(300, 6, 17, 5)] // more rows than one RowBlock
    [TestCase(3, 8, 1, 1)]    // V = 1: loss 0
    public void ForwardMatchesNaiveLogSoftmax(int n, int c, int vocab, int chunk)
    {
        var rng = new Random(n + c + vocab);
        double[] hidden = AttnGradCheck.Random(rng, n * c, 3), weight = AttnGradCheck.Random(rng, vocab * c, 2);
        int[] labels = RandomLabels(rng, n, vocab, 0.25);
        labels[^1] = 0;
        var lse = new double[n];
        var (loss, count) = CrossEntropyRef.Forward<double>(hidden, weight, labels, lse, n, c, vocab, chunk);
        var expected = Naive(hidden, weight, labels, n, c, vocab);
        Assert.That(count, Is.EqualTo(expected.Count));
        Assert.That(loss, Is.EqualTo(expected.Loss).Within(1e-12));
        Assert.That(lse, Is.EqualTo(expected.Lse).Within(1e-12));
        if (vocab == 1) Assert.That(loss, Is.EqualTo(0).Within(1e-15));
    }

    [Test]
    public void ChunkSizeChangesNothingButRounding()
    {
        const int n = 9, c = 7, vocab = 23;
        var rng = new Random(42);
        double[] hidden = AttnGradCheck.Random(rng, n * c, 2), weight = AttnGradCheck.Random(rng, vocab * c, 2);
        int[] labels = RandomLabels(rng, n, vocab, 0.3);
        labels[2] = Ignore;
        var reference = Run(hidden, weight, labels, n, c, vocab, vocab);
        foreach (int chunk in new[] { 1, 3, vocab, vocab + 5 })
        {
            var r = Run(hidden, weight, labels, n, c, vocab, chunk);
            Assert.That(r.Loss, Is.EqualTo(reference.Loss).Within(1e-12), $"loss, chunk {chunk}");
            Assert.That(r.Count, Is.EqualTo(reference.Count));
            Assert.That(r.Lse, Is.EqualTo(reference.Lse).Within(1e-12), $"lse, chunk {chunk}");
            Assert.That(r.DHidden, Is.EqualTo(reference.DHidden).Within(1e-12), $"dhidden, chunk {chunk}");
            Assert.That(r.DWeight, Is.EqualTo(reference.DWeight).Within(1e-12), $"dweight, chunk {chunk}");
        }
    }

    [Test]
    public void AllIgnoredGivesZeroLossAndZeroGradients()
    {
        const int n = 4, c = 3, vocab = 5;
        var rng = new Random(8);
        double[] hidden = AttnGradCheck.Random(rng, n * c), weight = AttnGradCheck.Random(rng, vocab * c);
        int[] labels = Enumerable.Repeat(Ignore, n).ToArray();
        var lse = new double[n];
        var (loss, count) = CrossEntropyRef.Forward<double>(hidden, weight, labels, lse, n, c, vocab, 2);
        Assert.That(loss, Is.EqualTo(0));
        Assert.That(count, Is.EqualTo(0));
        double[] dhidden = Enumerable.Repeat(5.0, n * c).ToArray();
        double[] dweight = Enumerable.Range(0, vocab * c).Select(i => (double)i).ToArray();
        CrossEntropyRef.Backward<double>(hidden, weight, labels, lse, 1.0, dhidden, dweight, n, c, vocab, 2);
        Assert.That(dhidden, Is.All.EqualTo(0), "dhidden is overwritten with zeros");
        Assert.That(dweight, Is.EqualTo(Enumerable.Range(0, vocab * c).Select(i => (double)i)), "dweight unchanged (+= 0)");

        float[] lseF = new float[n];
        var (lossF, countF) = CrossEntropyRef.Forward<float>(GradCheck.ToFloat(hidden), GradCheck.ToFloat(weight), labels, lseF, n, c, vocab, 2);
        Assert.That((lossF, countF), Is.EqualTo((0.0, 0)));
    }

    [Test]
    public void HandComputedCase()
    {
        // C = 2, V = 3, one token: hidden = (1, −1), W rows (1,0), (0,1), (1,1) → logits (1, −1, 0); label 2.
        // lse = log(e + 1/e + 1); loss = lse − 0 = 1.4076059644443804 (python: math.log(math.e + math.exp(-1) + 1)).
        // p = softmax = (e, 1/e, 1)/(e + 1/e + 1); g = p − onehot(2) = (p0, p1, p2 − 1);
        // dhidden = Σ g_v W_v = (p0 + p2 − 1, p1 + p2 − 1) = (−p1, −p0); dW_v = g_v · hidden = (g_v, −g_v).
        double[] hidden = [1, -1], weight = [1, 0, 0, 1, 1, 1];
        int[] labels = [2];
        double sum = Math.E + 1 / Math.E + 1;
        double p0 = Math.E / sum, p1 = 1 / Math.E / sum, p2 = 1 / sum;
        foreach (int chunk in new[] { 1, 2, 3 })
        {
            var r = Run(hidden, weight, labels, 1, 2, 3, chunk);
            Assert.That(r.Loss, Is.EqualTo(1.4076059644443804).Within(1e-15));
            Assert.That(r.Count, Is.EqualTo(1));
            Assert.That(r.Lse[0], Is.EqualTo(1.4076059644443804).Within(1e-15));
            Assert.That(r.DHidden, Is.EqualTo(new[] { -p1, -p0 }).Within(1e-14));
            Assert.That(r.DWeight, Is.EqualTo(new[] { p0, -p0, p1, -p1, p2 - 1, 1 - p2 }).Within(1e-14));
        }
    }

    [Test]
    public void WeightGradientAccumulatesAndIsOptional()
    {
        const int n = 5, c = 4, vocab = 7;
        var rng = new Random(12);
        double[] hidden = AttnGradCheck.Random(rng, n * c), weight = AttnGradCheck.Random(rng, vocab * c);
        int[] labels = [1, 6, Ignore, 0, 3];
        var once = Run(hidden, weight, labels, n, c, vocab, 3);
        var dweight = (double[])once.DWeight.Clone();
        var dhidden = new double[n * c];
        CrossEntropyRef.Backward<double>(hidden, weight, labels, once.Lse, 1.0, dhidden, dweight, n, c, vocab, 3);
        Assert.That(dweight, Is.EqualTo(once.DWeight.Select(x => 2 * x)).Within(1e-15), "dweight += on a second call");
        var dhiddenOnly = new double[n * c];
        CrossEntropyRef.Backward<double>(hidden, weight, labels, once.Lse, 1.0, dhiddenOnly, Span<double>.Empty, n, c, vocab, 3);
        Assert.That(dhiddenOnly, Is.EqualTo(once.DHidden), "no dweight span: dhidden unchanged");
    }

    [Test]
    public void MatchesTorchOracle()
    {
        var data = new TorchRecords("attn_ce_crossentropy.bin");
        int[] shape = data.I32("shape");
        int n = shape[0], c = shape[1], vocab = shape[2];
        float[] hidden = data.F32("hidden"), weight = data.F32("weight");
        int[] labels = data.I32("labels");
        Assert.That(labels, Does.Contain(Ignore));

        foreach (int chunk in new[] { 4, vocab })
        {
            // float64: torch's float64 run on the same float32-valued inputs.
            var r = Run(GradCheck.ToDouble(hidden), GradCheck.ToDouble(weight), labels, n, c, vocab, chunk);
            Assert.That(r.Loss, Is.EqualTo(data.F64("loss_f64")[0]).Within(1e-12), "loss f64");
            Assert.That(r.DHidden, Is.EqualTo(data.F64("dhidden_f64")).Within(1e-12), "dhidden f64");
            Assert.That(r.DWeight, Is.EqualTo(data.F64("dweight_f64")).Within(1e-12), "dweight f64");

            // float32 (Sgemm chunks): torch's float32 run; values O(1), both sides in float32: 1e-5 absolute.
            var lse = new float[n];
            var (loss, count) = CrossEntropyRef.Forward<float>(hidden, weight, labels, lse, n, c, vocab, chunk);
            var dhidden = new float[n * c];
            var dweight = new float[vocab * c];
            CrossEntropyRef.Backward<float>(hidden, weight, labels, lse, 1f, dhidden, dweight, n, c, vocab, chunk);
            Assert.That(count, Is.EqualTo(labels.Count(l => l != Ignore)));
            Assert.That(loss, Is.EqualTo(data.F32("loss")[0]).Within(1e-5), "loss f32");
            Assert.That(dhidden, Is.EqualTo(data.F32("dhidden")).Within(1e-5), "dhidden f32");
            Assert.That(dweight, Is.EqualTo(data.F32("dweight")).Within(1e-5), "dweight f32");
        }
    }

    [Test]
    public void FloatPathAgreesWithDoublePathWithinFloatRounding()
    {
        const int n = 300, c = 48, vocab = 257, chunk = 64;
        Assume.That(HostBlas.IsAvailable, HostBlas.Description); // the float path under test is the Sgemm one
        var rng = new Random(99);
        float[] hf = GradCheck.ToFloat(AttnGradCheck.Random(rng, n * c, 1)), wf = GradCheck.ToFloat(AttnGradCheck.Random(rng, vocab * c, 0.5));
        int[] labels = RandomLabels(rng, n, vocab, 0.2);
        var d = Run(GradCheck.ToDouble(hf), GradCheck.ToDouble(wf), labels, n, c, vocab, chunk);

        var lse = new float[n];
        var (loss, count) = CrossEntropyRef.Forward<float>(hf, wf, labels, lse, n, c, vocab, chunk);
        var dhidden = new float[n * c];
        var dweight = new float[vocab * c];
        CrossEntropyRef.Backward<float>(hf, wf, labels, lse, 1f, dhidden, dweight, n, c, vocab, chunk);
        Assert.That(count, Is.EqualTo(d.Count));
        // Float epsilon 1.2e-7; logits are dot products of 48 terms, lse sums 257 exps: ~1e-6 relative.
        Assert.That(Math.Abs(loss - d.Loss) / d.Loss, Is.LessThan(1e-5), "loss");
        Assert.That(AttnGradCheck.MaxRelative(lse, d.Lse, 0.1), Is.LessThan(1e-5), "lse");
        // Gradients are ~1/count in size: compare relative to their largest magnitude.
        double gh = d.DHidden.Max(Math.Abs), gw = d.DWeight.Max(Math.Abs);
        Assert.That(AttnGradCheck.MaxRelative(dhidden, d.DHidden, gh) , Is.LessThan(1e-5), "dhidden");
        Assert.That(AttnGradCheck.MaxRelative(dweight, d.DWeight, gw), Is.LessThan(1e-5), "dweight");
    }

    [TestCase(typeof(float))]
    [TestCase(typeof(double))]
    public void ResultsAreIdenticalForAnyDegreeOfParallelism(Type type)
    {
        const int n = 300, c = 24, vocab = 101, chunk = 32;
        var rng = new Random(5);
        double[] hidden = AttnGradCheck.Random(rng, n * c), weight = AttnGradCheck.Random(rng, vocab * c);
        int[] labels = RandomLabels(rng, n, vocab, 0.2);
        if (type == typeof(double))
        {
            var seq = Run(hidden, weight, labels, n, c, vocab, chunk, threads: 1);
            foreach (int threads in new[] { 2, 3, -1 })
            {
                var par = Run(hidden, weight, labels, n, c, vocab, chunk, threads: threads);
                Assert.That(par.Loss, Is.EqualTo(seq.Loss));
                Assert.That(par.Lse, Is.EqualTo(seq.Lse));
                Assert.That(par.DHidden, Is.EqualTo(seq.DHidden));
                Assert.That(par.DWeight, Is.EqualTo(seq.DWeight));
            }
            return;
        }
        float[] hf = GradCheck.ToFloat(hidden), wf = GradCheck.ToFloat(weight);
        (double, float[], float[], float[]) RunF(int threads)
        {
            var lse = new float[n];
            var (loss, _) = CrossEntropyRef.Forward<float>(hf, wf, labels, lse, n, c, vocab, chunk, threads);
            var dh = new float[n * c];
            var dw = new float[vocab * c];
            CrossEntropyRef.Backward<float>(hf, wf, labels, lse, 1f, dh, dw, n, c, vocab, chunk, threads);
            return (loss, lse, dh, dw);
        }
        var s = RunF(1);
        foreach (int threads in new[] { 2, 3, -1 })
        {
            var p = RunF(threads);
            Assert.That(p.Item1, Is.EqualTo(s.Item1));
            Assert.That(p.Item2, Is.EqualTo(s.Item2));
            Assert.That(p.Item3, Is.EqualTo(s.Item3));
            Assert.That(p.Item4, Is.EqualTo(s.Item4));
        }
    }

    [Test]
    public void RejectsLabelsOutsideTheVocabulary()
    {
        double[] hidden = new double[3 * 2], weight = new double[4 * 2];
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() =>
            CrossEntropyRef.Forward<double>(hidden, weight, [0, Ignore, 4], Span<double>.Empty, 3, 2, 4, 2));
        Assert.That(ex!.Message, Does.Contain("position 2").And.Contain("4"));
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            CrossEntropyRef.Forward<double>(hidden, weight, [-1, 0, 0], Span<double>.Empty, 3, 2, 4, 2));
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            CrossEntropyRef.Backward<double>(hidden, weight, [0, 0, -5], new double[3], 1.0, new double[6], Span<double>.Empty, 3, 2, 4, 2));
    }

    [Test, Explicit("timing: prints the float forward + backward time")]
    public void TimeFloatForwardBackward()
    {
        const int n = 512, c = 512, vocab = 32000, chunk = 4096;
        var rng = new Random(3);
        float[] hidden = GradCheck.ToFloat(AttnGradCheck.Random(rng, n * c, 1));
        float[] weight = GradCheck.ToFloat(AttnGradCheck.Random(rng, vocab * c, 0.05));
        int[] labels = RandomLabels(rng, n, vocab, 0.1);
        var lse = new float[n];
        var dhidden = new float[n * c];
        var dweight = new float[vocab * c];
        for (int rep = 0; rep < 3; rep++)
        {
            var sw = Stopwatch.StartNew();
            var (loss, _) = CrossEntropyRef.Forward<float>(hidden, weight, labels, lse, n, c, vocab, chunk);
            double fwd = sw.Elapsed.TotalMilliseconds;
            sw.Restart();
            CrossEntropyRef.Backward<float>(hidden, weight, labels, lse, 1f, dhidden, Span<float>.Empty, n, c, vocab, chunk);
            double bwd = sw.Elapsed.TotalMilliseconds;
            sw.Restart();
            CrossEntropyRef.Backward<float>(hidden, weight, labels, lse, 1f, dhidden, dweight, n, c, vocab, chunk);
            double bwdW = sw.Elapsed.TotalMilliseconds;
            TestContext.Out.WriteLine($"cross-entropy float N=512 C=512 V=32000 chunk=4096 ({Environment.ProcessorCount} cpus, {HostBlas.Description}): " +
                $"forward {fwd:F1} ms, backward dhidden {bwd:F1} ms, backward dhidden+dW {bwdW:F1} ms (loss {loss:F4})");
        }
        Assert.That(dhidden.All(float.IsFinite), Is.True);
    }
}
