using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// kernels/cross_entropy.cu through <see cref="GpuLossOps"/>, on the emulator always and on CUDA when present: the
/// test plays the caller, computing each logits chunk z = hidden · W[v0 : v0+c]ᵀ on the host (a float64 loop, rounded
/// to fp32, and to bf16 for the bf16 kernels), uploading it into a [rows, ldz] buffer whose padding columns are NaN
/// (so reading past the chunk shows), running the kernels chunk after chunk, and reading dz back per chunk.
/// <para>
/// Oracles: <see cref="CrossEntropyRef"/> in float64 (T = double, its own chunked logits), and a float64 loop over
/// exactly the logits the kernels saw (which isolates the kernels' own fp32 error from the rounding of the logits).
/// Bounds, with u = 2⁻²⁴, K = number of chunks, s = ceil(c / threads) + log2(threads) (the serial and tree depth of
/// one chunk's sum), and M_n = max |z[n, :]|:
/// <list type="bullet">
/// <item>lse and per-row loss vs the float64 loop over the kernels' logits: |Δ| ≤ A_n := (4K + s + 8)·u·(|lse_n| + M_n + 1)
/// (each chunk: one rounding of the rescale, of the exp, and of the add, each ≤ 2 ulp on CUDA's expf; then log).</item>
/// <item>mean loss: within max_n A_n of the float64 loop; host row-order sum and the device's <c>cross_entropy_loss_sum</c>
/// agree to 1e-12 relative.</item>
/// <item>dz vs the float64 loop: |Δ| ≤ scale·(p·(A_n + u·M_n + 6u) + 2u·[label]), plus, for bf16 dz, half a bf16 ulp of
/// the value (at most 2⁻⁸·|dz|).</item>
/// <item>vs CrossEntropyRef (logits from hidden and W in float64): the same bounds, with the logits' own rounding added
/// to A_n: u·M_n for fp32 logits, 2⁻⁸·M_n (bf16 unit roundoff) for bf16 logits — so lse within A_n + 2⁻⁸·M_n and the
/// loss within A_n + 2·2⁻⁸·M_n for bf16; dhidden = Σ_v dz·W (float64) within Σ_v |W[v, c]|·(bound of dz[n, v]).</item>
/// </list>
/// </para>
/// </summary>
public sealed class GpuLossOpsTests(string device) : DeviceFixture<GpuLossOps>(device)
{
    private const double U = 1.0 / (1 << 24);
    private const double Bf16Half = 1.0 / 256;  // bf16 unit roundoff: half an ulp is at most 2⁻⁸ of the value
    private const int Hidden = 12;
    private const int Pad = 3;                  // ldz = c + Pad

    protected override GpuLossOps CreateOps(IGpu gpu) => new(gpu);

    protected override IEnumerable<string> RequiredKernels =>
        ["cross_entropy_init", "cross_entropy_chunk_forward_f32", "cross_entropy_chunk_backward_bf16",
         "cross_entropy_finish", "cross_entropy_loss_sum"];

    /// <summary>Labels: every 4th row (n % 4 == 3) ignored, row 0 → V−1, row 1 → 0, the rest random.</summary>
    private static int[] Labels(int rows, int vocab, int seed)
    {
        var rng = new Random(seed);
        var labels = new int[rows];
        for (int n = 0; n < rows; n++)
            labels[n] = n % 4 == 3 ? CrossEntropyRef.IgnoreIndex : n == 0 ? vocab - 1 : n == 1 ? 0 : rng.Next(vocab);
        return labels;
    }

    /// <summary>What the caller of the kernels holds after running them over every chunk.</summary>
    private sealed record DeviceRun(float[] Lse, float[] LossPerRow, double DeviceSum, double DeviceCount, float[] Dz, double[] ZSeen);

    /// <summary>
    /// Plays the caller: host logits per chunk (float64 dot → fp32 → bf16 when dtype is BF16), uploaded into a NaN-padded
    /// [rows, c + Pad] buffer, forward over all chunks, finish, loss sum, then backward over all chunks with
    /// scale = dloss / count; returns the kernels' outputs, the full dz [rows, V] (as floats) and the logits they saw.
    /// </summary>
    private DeviceRun Run(DType dtype, float[] hidden, float[] weight, int[] labels, int rows, int vocab, int chunk, double dloss)
    {
        int es = dtype.ElementSize();
        int maxC = Math.Min(chunk, vocab);
        long ldzMax = maxC + Pad;
        DevicePtr z = Alloc(rows * ldzMax * es);
        DevicePtr dLabels = Alloc(rows * sizeof(int));
        DevicePtr runMax = Alloc(rows * 4), runSum = Alloc(rows * 4), labelLogit = Alloc(rows * 4);
        DevicePtr lse = Alloc(rows * 4), loss = Alloc(rows * 4), sum = Alloc(16);
        Gpu.CopyToDevice<int>(labels, dLabels);

        var zSeen = new double[(long)rows * vocab];
        Ops.Init(runMax, runSum, labelLogit, rows);
        for (int v0 = 0; v0 < vocab; v0 += chunk)
        {
            int c = Math.Min(chunk, vocab - v0);
            UploadChunk(dtype, z, hidden, weight, rows, vocab, v0, c, zSeen);
            Ops.ChunkForward(dtype, z, rows, c, c + Pad, v0, dLabels, runMax, runSum, labelLogit);
        }
        Ops.Finish(runMax, runSum, labelLogit, dLabels, rows, vocab, lse, loss);
        Ops.LossSum(loss, dLabels, rows, sum);
        Gpu.Synchronize();
        var lseHost = new float[rows];
        var lossHost = new float[rows];
        var sumHost = new double[2];
        Gpu.CopyToHost(lse, lseHost.AsSpan());
        Gpu.CopyToHost(loss, lossHost.AsSpan());
        Gpu.CopyToHost(sum, sumHost.AsSpan());

        int count = CrossEntropyRef.CountTokens(labels);
        float scale = GpuLossOps.BackwardScale(dloss, count);
        var dz = new float[(long)rows * vocab];
        for (int v0 = 0; v0 < vocab; v0 += chunk)
        {
            int c = Math.Min(chunk, vocab - v0);
            UploadChunk(dtype, z, hidden, weight, rows, vocab, v0, c, null);
            Ops.ChunkBackward(dtype, z, rows, c, c + Pad, v0, dLabels, lse, scale);
            Gpu.Synchronize();
            float[] chunkDz = Download(z, rows * (c + Pad), dtype);
            for (int n = 0; n < rows; n++)
            {
                for (int j = 0; j < c; j++) dz[(long)n * vocab + v0 + j] = chunkDz[n * (c + Pad) + j];
                for (int j = c; j < c + Pad; j++)
                    Assert.That(float.IsNaN(chunkDz[n * (c + Pad) + j]), $"backward wrote the padding of row {n} (v0 {v0})");
            }
        }
        return new DeviceRun(lseHost, lossHost, sumHost[0], sumHost[1], dz, zSeen);
    }

    private void UploadChunk(DType dtype, DevicePtr z, float[] hidden, float[] weight, int rows, int vocab, int v0, int c, double[]? zSeen)
    {
        int ldz = c + Pad;
        var buf = new float[rows * ldz];
        for (int n = 0; n < rows; n++)
        {
            for (int j = 0; j < c; j++)
            {
                double s = 0;
                for (int d = 0; d < Hidden; d++) s += (double)hidden[n * Hidden + d] * weight[(v0 + j) * Hidden + d];
                float f = (float)s;
                if (dtype == DType.BF16) f = BFloat16.FromSingle(f).ToSingle();
                buf[n * ldz + j] = f;
                if (zSeen is not null) zSeen[(long)n * vocab + v0 + j] = f;
            }
            for (int j = c; j < ldz; j++) buf[n * ldz + j] = float.NaN;
        }
        Gpu.Synchronize();  // the previous kernel may still read the buffer
        Write(z, buf, dtype);
    }

    /// <summary>float64 log-sum-exp of each row of z [rows, vocab].</summary>
    private static double[] Lse64(double[] z, int rows, int vocab)
    {
        var lse = new double[rows];
        for (int n = 0; n < rows; n++)
        {
            double m = double.NegativeInfinity, s = 0;
            for (int v = 0; v < vocab; v++) m = Math.Max(m, z[(long)n * vocab + v]);
            for (int v = 0; v < vocab; v++) s += Math.Exp(z[(long)n * vocab + v] - m);
            lse[n] = m + Math.Log(s);
        }
        return lse;
    }

    private static double MaxAbsRow(double[] z, int n, int vocab)
    {
        double m = 0;
        for (int v = 0; v < vocab; v++) m = Math.Max(m, Math.Abs(z[(long)n * vocab + v]));
        return m;
    }

    public static IEnumerable<TestCaseData> Cases()
    {
        foreach (DType dtype in new[] { DType.F32, DType.BF16 })
            foreach (int rows in new[] { 1, 5, 300 })
                foreach (int vocab in new[] { 3, 50, 1000 })
                    foreach (int chunk in new[] { 1, 7, vocab }.Distinct())
                        yield return new TestCaseData(dtype, rows, vocab, chunk).SetArgDisplayNames($"{dtype}", $"N{rows}", $"V{vocab}", $"chunk{chunk}");
    }

    [TestCaseSource(nameof(Cases))]
    public void ChunkedCrossEntropyMatchesFloat64Reference(DType dtype, int rows, int vocab, int chunk)
    {
        int seed = rows * 7919 + vocab * 31 + chunk;
        float[] hidden = Normal(rows * Hidden, seed, 1.0);
        float[] weight = Normal(vocab * Hidden, seed + 1, 0.7);  // logits of std ~2.4: a peaked, realistic softmax
        if (dtype == DType.BF16)
        {
            // bf16 models hold bf16 activations and weights: use representable ones (the logits are rounded again).
            for (int i = 0; i < hidden.Length; i++) hidden[i] = BFloat16.FromSingle(hidden[i]).ToSingle();
            for (int i = 0; i < weight.Length; i++) weight[i] = BFloat16.FromSingle(weight[i]).ToSingle();
        }
        int[] labels = Labels(rows, vocab, seed + 2);
        const double dloss = 1.5;
        DeviceRun run = Run(dtype, hidden, weight, labels, rows, vocab, chunk, dloss);

        // Oracle 1: CrossEntropyRef in float64 (chunked, its own logits).
        var lseRef = new double[rows];
        (double lossRef, int count) = CrossEntropyRef.Forward<double>(ToDouble(hidden), ToDouble(weight), labels, lseRef, rows, Hidden, vocab, chunk);
        var dhRef = new double[rows * Hidden];
        CrossEntropyRef.Backward<double>(ToDouble(hidden), ToDouble(weight), labels, lseRef, dloss, dhRef, Span<double>.Empty, rows, Hidden, vocab, chunk);
        Assert.That(count, Is.EqualTo(labels.Count(l => l != CrossEntropyRef.IgnoreIndex)));

        // Oracle 2: float64 over exactly the logits the kernels saw.
        double[] zs = run.ZSeen;
        double[] lseSeen = Lse64(zs, rows, vocab);

        int threads = GpuLossOps.ChunkBlockThreads(Math.Min(chunk, vocab));
        int chunks = (vocab + chunk - 1) / chunk;
        double s = Math.Ceiling((double)Math.Min(chunk, vocab) / threads) + Math.Log2(threads);
        double k = 4 * chunks + s + 8;
        double logitRounding = dtype == DType.F32 ? U : Bf16Half;
        double scale = count == 0 ? 0 : dloss / count;

        double worstLse = 0, worstDz = 0, maxA = 0, lossSeen = 0;
        for (int n = 0; n < rows; n++)
        {
            double m = MaxAbsRow(zs, n, vocab);
            double a = k * U * (Math.Abs(lseSeen[n]) + m + 1);
            maxA = Math.Max(maxA, a);
            // lse: vs the logits seen, and vs the reference's own logits
            double errSeen = Math.Abs(run.Lse[n] - lseSeen[n]);
            worstLse = Math.Max(worstLse, errSeen / (U * (Math.Abs(lseSeen[n]) + m + 1)));
            Assert.That(errSeen, Is.LessThanOrEqualTo(a), $"lse[{n}] {run.Lse[n]:R} vs float64 over the kernel's logits {lseSeen[n]:R}");
            Assert.That(Math.Abs(run.Lse[n] - lseRef[n]), Is.LessThanOrEqualTo(a + logitRounding * m + 1e-12),
                $"lse[{n}] {run.Lse[n]:R} vs CrossEntropyRef {lseRef[n]:R}");
            // per-row loss
            int label = labels[n];
            if (label == CrossEntropyRef.IgnoreIndex)
            {
                Assert.That(run.LossPerRow[n], Is.EqualTo(0f), $"ignored row {n} has loss 0");
            }
            else
            {
                double rowSeen = lseSeen[n] - zs[(long)n * vocab + label];
                lossSeen += rowSeen;
                Assert.That(Math.Abs(run.LossPerRow[n] - rowSeen), Is.LessThanOrEqualTo(a + U * Math.Abs(rowSeen)),
                    $"loss_per_row[{n}] {run.LossPerRow[n]:R} vs float64 {rowSeen:R}");
            }
            // dz, element by element
            for (int v = 0; v < vocab; v++)
            {
                double z = zs[(long)n * vocab + v];
                double p = label == CrossEntropyRef.IgnoreIndex ? 0 : Math.Exp(z - lseSeen[n]);
                double onehot = v == label ? 1 : 0;
                double want = label == CrossEntropyRef.IgnoreIndex ? 0 : scale * (p - onehot);
                double tol = scale * (p * (a + U * m + 6 * U) + 2 * U * onehot);
                if (dtype == DType.BF16) tol += Bf16Half * Math.Abs(want);
                double err = Math.Abs(run.Dz[(long)n * vocab + v] - want);
                if (tol > 0) worstDz = Math.Max(worstDz, err / tol);
                if (!(err <= tol + 1e-300))
                    Assert.Fail($"dz[{n}, {v}] = {run.Dz[(long)n * vocab + v]:R}, float64 {want:R}: error {err:E3} > {tol:E3}");
            }
        }
        double lossSeenMean = count == 0 ? 0 : lossSeen / count;

        // mean loss: host reduction (row order, as the reference), device reduction, and the references
        (double hostLoss, int hostCount) = GpuLossOps.MeanLoss(run.LossPerRow, labels);
        Assert.That(hostCount, Is.EqualTo(count));
        Assert.That(run.DeviceCount, Is.EqualTo((double)count), "cross_entropy_loss_sum count");
        double absSum = run.LossPerRow.Sum(v => Math.Abs((double)v));
        Assert.That(Math.Abs(run.DeviceSum - hostLoss * count), Is.LessThanOrEqualTo(1e-12 * absSum + 1e-300), "device loss sum vs host row-order sum");
        Assert.That(Math.Abs(hostLoss - lossSeenMean), Is.LessThanOrEqualTo(maxA + U * Math.Abs(lossSeenMean)), "mean loss vs float64 over the kernel's logits");
        Assert.That(Math.Abs(hostLoss - lossRef), Is.LessThanOrEqualTo(maxA + 2 * logitRounding * MaxAbs(zs) + U * Math.Abs(lossRef)),
            $"mean loss {hostLoss:R} vs CrossEntropyRef {lossRef:R}");

        // dhidden = dz · W in float64 from the kernels' dz, vs CrossEntropyRef's backward (float64)
        double worstDh = 0;
        for (int n = 0; n < rows; n++)
        {
            double m = MaxAbsRow(zs, n, vocab);
            double a = k * U * (Math.Abs(lseSeen[n]) + m + 1) + 2 * logitRounding * m;
            for (int c = 0; c < Hidden; c++)
            {
                double got = 0, mag = 0;
                for (int v = 0; v < vocab; v++)
                {
                    double w = weight[v * Hidden + c];
                    got += run.Dz[(long)n * vocab + v] * w;
                    if (labels[n] == CrossEntropyRef.IgnoreIndex) continue;
                    double p = Math.Exp(zs[(long)n * vocab + v] - lseSeen[n]) * (1 + a);
                    double onehot = v == labels[n] ? 1 : 0;
                    double tolV = scale * (p * (a + U * m + 6 * U) + 2 * U * onehot);
                    if (dtype == DType.BF16) tolV += Bf16Half * scale * (p + onehot);
                    mag += Math.Abs(w) * tolV;
                }
                double err = Math.Abs(got - dhRef[n * Hidden + c]);
                if (mag > 0) worstDh = Math.Max(worstDh, err / mag);
                Assert.That(err, Is.LessThanOrEqualTo(mag + 1e-15 * scale), $"dhidden[{n}, {c}] {got:R} vs CrossEntropyRef {dhRef[n * Hidden + c]:R}");
            }
        }
        TestContext.Out.WriteLine($"{dtype} N={rows} V={vocab} chunk={chunk}: loss {hostLoss:R} (ref {lossRef:R}); worst lse {worstLse:F2} u·(|lse|+M+1) (bound {k}); " +
                                  $"worst dz {worstDz:F3} of bound; worst dhidden {worstDh:F3} of bound");
    }

    private static double MaxAbs(double[] z) => z.Length == 0 ? 0 : z.Max(Math.Abs);

    [Test]
    public void AllIgnoredGivesZeroLossAndZeroGradient([Values(DType.F32, DType.BF16)] DType dtype)
    {
        const int rows = 6, vocab = 20, chunk = 7;
        float[] hidden = Normal(rows * Hidden, 1, 1.0), weight = Normal(vocab * Hidden, 2, 0.7);
        int[] labels = Enumerable.Repeat(CrossEntropyRef.IgnoreIndex, rows).ToArray();
        DeviceRun run = Run(dtype, hidden, weight, labels, rows, vocab, chunk, dloss: 1.0);
        Assert.That(run.LossPerRow, Is.All.EqualTo(0f));
        Assert.That(run.DeviceSum, Is.EqualTo(0.0));
        Assert.That(run.DeviceCount, Is.EqualTo(0.0));
        Assert.That(GpuLossOps.MeanLoss(run.LossPerRow, labels), Is.EqualTo((0.0, 0)));
        Assert.That(run.Dz, Is.All.EqualTo(0f), "dz of ignored rows is 0");
        double[] lseSeen = Lse64(run.ZSeen, rows, vocab);
        for (int n = 0; n < rows; n++)
            Assert.That(run.Lse[n], Is.EqualTo(lseSeen[n]).Within(64 * U * (Math.Abs(lseSeen[n]) + 10)), $"lse[{n}] is still computed");
    }

    [Test]
    public void HandComputedUniformLogits()
    {
        // hidden = 0: every logit is 0, so lse = log V, loss = log V, dz = scale·(1/V − onehot).
        const int rows = 3, vocab = 5, chunk = 2;
        float[] hidden = new float[rows * Hidden], weight = Normal(vocab * Hidden, 3, 1.0);
        int[] labels = [4, CrossEntropyRef.IgnoreIndex, 1];
        DeviceRun run = Run(DType.F32, hidden, weight, labels, rows, vocab, chunk, dloss: 2.0);
        double logV = Math.Log(vocab);
        Assert.That(run.Lse, Is.All.EqualTo(logV).Within(4 * U * logV));
        Assert.That(run.LossPerRow[0], Is.EqualTo(logV).Within(4 * U * logV));
        Assert.That(run.LossPerRow[1], Is.EqualTo(0f));
        Assert.That(run.DeviceSum / run.DeviceCount, Is.EqualTo(logV).Within(4 * U * logV));
        // scale = 2 / 2 = 1
        Assert.That(run.Dz[0 * vocab + 4], Is.EqualTo(0.2 - 1).Within(8 * U));
        Assert.That(run.Dz[0 * vocab + 0], Is.EqualTo(0.2).Within(8 * U));
        Assert.That(run.Dz.Skip(vocab).Take(vocab), Is.All.EqualTo(0f));
        Assert.That(run.Dz[2 * vocab + 1], Is.EqualTo(0.2 - 1).Within(8 * U));
    }

    [Test]
    public void InvalidLabelPoisonsOnlyItsRow()
    {
        const int rows = 3, vocab = 4, chunk = 4;
        float[] hidden = Normal(rows * Hidden, 4, 1.0), weight = Normal(vocab * Hidden, 5, 1.0);
        int[] labels = [1, vocab, 2];  // row 1: label == V is out of range
        DeviceRun run = Run(DType.F32, hidden, weight, labels, rows, vocab, chunk, dloss: 1.0);
        Assert.That(float.IsNaN(run.LossPerRow[1]), "out-of-range label gives a NaN loss");
        Assert.That(float.IsFinite(run.LossPerRow[0]) && float.IsFinite(run.LossPerRow[2]), "other rows unaffected");
        Assert.That(() => GpuLossOps.ValidateLabels(labels, vocab),
            Throws.TypeOf<ArgumentOutOfRangeException>().With.Message.Contains("position 1"));
        Assert.That(() => GpuLossOps.ValidateLabels([0, -100, 3], vocab), Throws.Nothing);
    }

    [Test]
    public void Deterministic([Values(DType.F32, DType.BF16)] DType dtype)
    {
        const int rows = 37, vocab = 700, chunk = 300;
        float[] hidden = Normal(rows * Hidden, 6, 1.0), weight = Normal(vocab * Hidden, 7, 0.7);
        int[] labels = Labels(rows, vocab, 8);
        DeviceRun a = Run(dtype, hidden, weight, labels, rows, vocab, chunk, 1.0);
        DeviceRun b = Run(dtype, hidden, weight, labels, rows, vocab, chunk, 1.0);
        Assert.That(b.Lse, Is.EqualTo(a.Lse).AsCollection);
        Assert.That(b.LossPerRow, Is.EqualTo(a.LossPerRow).AsCollection);
        Assert.That(b.DeviceSum, Is.EqualTo(a.DeviceSum));
        Assert.That(b.Dz, Is.EqualTo(a.Dz).AsCollection);
    }

    [Test]
    public void Validation()
    {
        DevicePtr p = Alloc(64);
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.ChunkForward(DType.F32, p, 1, 4, 3, 0, p, p, p, p), "ldz < chunk");
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.ChunkForward(DType.F32, p, 1, 0, 3, 0, p, p, p, p), "chunk 0");
        Assert.Throws<ArgumentException>(() => Ops.ChunkForward(DType.F16, p, 1, 4, 4, 0, p, p, p, p), "F16");
        Assert.Throws<ArgumentException>(() => Ops.ChunkBackward(DType.F32, DevicePtr.Null, 1, 4, 4, 0, p, p, 1f), "null z");
        Assert.That(GpuLossOps.ChunkBlockThreads(1), Is.EqualTo(32));
        Assert.That(GpuLossOps.ChunkBlockThreads(33), Is.EqualTo(64));
        Assert.That(GpuLossOps.ChunkBlockThreads(100000), Is.EqualTo(256));
        Assert.That(GpuLossOps.BackwardScale(3.0, 0), Is.EqualTo(0f));
    }
}
