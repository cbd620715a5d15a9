using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.Modules;

/// <summary>
/// Packed rows through the whole model on CpuOps in float64 (tiny config, <see cref="ModelTestKit.Tiny"/>): two documents
/// packed into one row with restarting positions must give each document the logits, the loss terms and the gradients
/// it gets in a padded row of its own. Only the order of fp64 sums differs between the two batches, so they agree to
/// about 1e-15 relative; the tolerance is 1e-11 of each tensor's largest magnitude. Dropout is 0 (its masks are drawn
/// per element index, which packing moves).
/// </summary>
public class PackedSequenceModelTests
{
    private static readonly string[] AllTargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    // Document a: 5 tokens, one label ignored; document b: 4 tokens.
    private static readonly int[] IdsA = [3, 7, 1, 10, 4], LabelsA = [3, 7, -100, 10, 4];
    private static readonly int[] IdsB = [9, 2, 5, 8], LabelsB = [9, 2, 5, 8];
    private const int Pad = 0;

    /// <summary>Padding mode: [2, 5], b padded with one token (label -100).</summary>
    private static (int[] Ids, int[] Labels) Separate() =>
        ([.. IdsA, .. IdsB, Pad], [.. LabelsA, .. LabelsB, -100]);

    /// <summary>Packed: [1, 9] = a ++ b with the labels as they are (the model must ignore the target across the boundary).</summary>
    private static (int[] Ids, int[] Labels, int[] Positions) Packed() =>
        ([.. IdsA, .. IdsB], [.. LabelsA, .. LabelsB], [0, 1, 2, 3, 4, 0, 1, 2, 3]);

    private static LlamaModel Create(CpuOps ops, bool full) =>
        LlamaModel.CreateRandom(Tiny, ops, full
            ? new LlamaModelOptions { ComputeDType = DType.F64, FullFineTuning = true }
            : new LlamaModelOptions
            {
                ComputeDType = DType.F64, Seed = 5,
                Lora = new LoraSettings { Rank = 2, Alpha = 3, Dropout = 0, TargetModules = AllTargets },
            }, weightSeed: 11, std: 0.5);

    private static double[] Logits(LlamaModel model, int n)
    {
        var t = model.Ops.Memory.Allocate(DType.F64, n, Tiny.VocabSize);
        try
        {
            model.Logits(t);
            return Get(model.Ops, t);
        }
        finally { model.Ops.Memory.Free(t); }
    }

    private static void AssertClose(double[] got, double[] expected, string what)
    {
        Assert.That(got, Has.Length.EqualTo(expected.Length), what);
        double scale = Math.Max(1e-300, expected.Max(Math.Abs)), worst = 0;
        for (int i = 0; i < got.Length; i++) worst = Math.Max(worst, Math.Abs(got[i] - expected[i]));
        Assert.That(worst, Is.LessThanOrEqualTo(1e-11 * scale), $"{what}: worst difference {worst:E3} (largest magnitude {scale:E3})");
    }

    [TestCase(false)]
    [TestCase(true)]
    public void APackedRowGivesEachDocumentItsOwnLogitsLossAndGradients(bool full)
    {
        using var ops = new CpuOps();
        using var model = Create(ops, full);
        if (!full) RandomizeLoraB(model, seed: 8);
        int V = Tiny.VocabSize;

        var (sIds, sLabels) = Separate();
        model.ZeroGrad();
        double lossSeparate = model.Forward(sIds, sLabels, 2, 5);
        int countSeparate = model.LastTokenCount;
        var logitsSeparate = Logits(model, 10);
        model.Backward();
        var gradsSeparate = model.TrainableParameters.Select(p => Get(ops, p.Grad)).ToList();

        var (pIds, pLabels, pPos) = Packed();
        model.ZeroGrad();
        double lossPacked = model.Forward(pIds, pLabels, 1, 9, pPos);
        int countPacked = model.LastTokenCount;
        var logitsPacked = Logits(model, 9);
        model.Backward();
        var gradsPacked = model.TrainableParameters.Select(p => Get(ops, p.Grad)).ToList();

        // a: targets 7, (ignored), 10, 4; b: 2, 5, 8. The packed row's position 4 (a's last token) would predict b's
        // first label 9: it must not count.
        Assert.That(countSeparate, Is.EqualTo(6));
        Assert.That(countPacked, Is.EqualTo(6), "no target across the document boundary");
        Assert.That(lossPacked, Is.EqualTo(lossSeparate).Within(1e-12 * lossSeparate), "mean loss over the same targets");
        AssertClose(logitsPacked[..(5 * V)], logitsSeparate[..(5 * V)], "logits of document a");
        AssertClose(logitsPacked[(5 * V)..], logitsSeparate[(5 * V)..(9 * V)], "logits of document b");
        for (int i = 0; i < gradsPacked.Count; i++)
            AssertClose(gradsPacked[i], gradsSeparate[i], "gradient of " + model.TrainableParameters[i].Name);
        Assert.That(gradsPacked.Sum(g => g.Sum(Math.Abs)), Is.GreaterThan(0));
    }

    [Test]
    public void WithoutPositionsThePackedRowAttendsAcrossDocuments()
    {
        // Control: the same row without positions (one sequence, positions 0..8) gives document b other logits; and a
        // forward without positions after a packed one of the same shape gives the first one's bits again (the
        // positions buffer is reset).
        using var ops = new CpuOps();
        using var model = Create(ops, full: false);
        RandomizeLoraB(model, seed: 8);
        int V = Tiny.VocabSize;
        var (pIds, pLabels, pPos) = Packed();
        double streamLoss = model.Forward(pIds, pLabels, 1, 9);
        var stream = Logits(model, 9);
        model.Forward(pIds, pLabels, 1, 9, pPos);
        var packed = Logits(model, 9);
        Assert.That(stream[..(5 * V)], Is.EqualTo(packed[..(5 * V)]).Within(1e-12), "document a comes first either way");
        Assert.That(stream[(5 * V)..].Zip(packed[(5 * V)..], (x, y) => Math.Abs(x - y)).Max(), Is.GreaterThan(1e-3), "document b");

        Assert.That(model.Forward(pIds, pLabels, 1, 9), Is.EqualTo(streamLoss));
        Assert.That(Logits(model, 9), Is.EqualTo(stream), "positions are reset after a packed forward");
    }

    [Test]
    public void InvalidPositionsAreRejected()
    {
        using var ops = new CpuOps();
        using var model = Create(ops, full: false);
        var (pIds, pLabels, _) = Packed();
        var ex = Assert.Throws<ArgumentException>(() => model.Forward(pIds, pLabels, 1, 9, [0, 1, 2, 3, 4, 0, 2, 3, 4]));
        Assert.That(ex!.Message, Does.Contain("positions[0, 6]"));
        Assert.Throws<ArgumentException>(() => model.Forward(pIds, pLabels, 1, 9, [1, 2, 3, 4, 5, 6, 7, 8, 9]));
        Assert.Throws<ArgumentException>(() => model.Forward(pIds, pLabels, 1, 9, [0, 1, 2]));
    }

    [Test]
    public void ShiftLabelsIgnoresEveryTargetAcrossABoundary()
    {
        // Hand-computed: row [a0 a1 | b0 b1 b2 | c0], labels 10..15; targets t → labels[t+1] except where t+1 starts a
        // document (t = 1, 4) and at the row's end.
        int[] labels = [10, 11, 12, 13, 14, 15], positions = [0, 1, 0, 1, 2, 0];
        Assert.That(LlamaModel.ShiftLabels(labels, 1, 6, positions), Is.EqualTo(new[] { 11, -100, 13, 14, -100, -100 }));
        Assert.That(LlamaModel.ShiftLabels(labels, 1, 6), Is.EqualTo(new[] { 11, 12, 13, 14, 15, -100 }));
    }
}
