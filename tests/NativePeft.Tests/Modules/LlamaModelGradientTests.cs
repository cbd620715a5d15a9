using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.Modules;

/// <summary>
/// Whole-model gradient checks in float64 on CpuOps (tiny config, see <see cref="ModelTestKit.Tiny"/>): the analytic
/// gradients of <see cref="LlamaModel.Backward"/> against central finite differences of <see cref="LlamaModel.Forward(ReadOnlySpan{int}, ReadOnlySpan{int}, int, int)"/>.
/// Five-point stencil (f'(θ) ≈ [8(f(θ+h) − f(θ−h)) − (f(θ+2h) − f(θ−2h))] / 12h, truncation O(h⁴)) with
/// h = 1e-4·max(1, |θ|); tolerance |analytic − numeric| ≤ 1e-6·|numeric| + 1e-9. Rounding error ≈ ε·|loss|/h ≈
/// 1e-16·2.4/1e-4 ≈ 3e-12. (A plain central difference at h = 1e-5 was measured off by ~1.3e-6 relative on the LoRA
/// model, whose adapted weights are large: O(h²) truncation, confirmed by it growing 100× at h = 1e-4.) A real
/// mistake (an O(1) wrong term) cannot pass. Dropout masks are fixed by the step (same seed in every f(θ ± h) evaluation).
/// </summary>
public class LlamaModelGradientTests
{
    private static readonly string[] AllTargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static LlamaModel Lora(CpuOps ops, double dropout, bool recompute) =>
        LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions
        {
            ComputeDType = DType.F64, Recompute = recompute, Seed = 5,
            Lora = new LoraSettings { Rank = 2, Alpha = 3, Dropout = dropout, TargetModules = AllTargets },
        }, weightSeed: 11, std: 0.5);

    /// <summary>Analytic gradients of every trainable parameter after one forward+backward.</summary>
    private static Dictionary<string, double[]> Analytic(LlamaModel model)
    {
        var (ids, labels) = TinyBatch();
        model.ZeroGrad();
        double loss = model.Forward(ids, labels, B, T);
        Assert.That(loss, Is.GreaterThan(0));
        Assert.That(model.LastTokenCount, Is.EqualTo(B * (T - 1) - 2), "two labels are -100, the last position of each row has no target");
        model.Backward();
        return model.TrainableParameters.ToDictionary(p => p.Name, p => Get(model.Ops, p.Grad));
    }

    /// <summary>Checks elements of one parameter: all when <paramref name="sample"/> is 0, else that many spread over it.</summary>
    private static int Check(LlamaModel model, string name, Tensor param, double[] analytic, int sample)
    {
        var (ids, labels) = TinyBatch();
        var ops = model.Ops;
        var values = Get(ops, param);
        var indices = sample == 0 || sample >= values.Length
            ? Enumerable.Range(0, values.Length)
            : Enumerable.Range(0, sample).Select(i => (int)((long)i * values.Length / sample + i % 3) % values.Length).Distinct();
        int checkedCount = 0;
        double maxRel = 0;
        foreach (int k in indices)
        {
            double orig = values[k], h = 1e-4 * Math.Max(1, Math.Abs(orig));
            double At(double v)
            {
                values[k] = v;
                Set(ops, param, values);
                return model.Forward(ids, labels, B, T);
            }
            // five-point stencil: truncation O(h⁴)
            double numeric = (8 * (At(orig + h) - At(orig - h)) - (At(orig + 2 * h) - At(orig - 2 * h))) / (12 * h);
            values[k] = orig;
            Set(ops, param, values);
            Assert.That(analytic[k], Is.EqualTo(numeric).Within(1e-6 * Math.Abs(numeric) + 1e-9),
                $"{name}[{k}]: analytic {analytic[k]:R} vs numeric {numeric:R}");
            maxRel = Math.Max(maxRel, Math.Abs(analytic[k] - numeric) / Math.Max(1e-12, Math.Abs(numeric)));
            checkedCount++;
        }
        return checkedCount;
    }

    [TestCase(0.0, false)]
    [TestCase(0.0, true)]
    [TestCase(0.3, false)]
    [TestCase(0.3, true)]
    public void LoraGradientsOfEveryTargetMatchFiniteDifferences(double dropout, bool recompute)
    {
        using var ops = new CpuOps();
        using var model = Lora(ops, dropout, recompute);
        RandomizeLoraB(model, 100);
        model.Dropout.Step = 7;
        Assert.That(model.TrainableParameters, Has.Count.EqualTo(2 * 7 * 2), "lora_A and lora_B of 7 targets in 2 layers");
        var analytic = Analytic(model);
        int nonZero = 0;
        foreach (var (name, param, _) in model.TrainableParameters)
        {
            Check(model, name, param, analytic[name], sample: 0);
            if (analytic[name].Any(v => Math.Abs(v) > 1e-6)) nonZero++;
        }
        Assert.That(nonZero, Is.EqualTo(model.TrainableParameters.Count), "every LoRA tensor receives a gradient");
    }

    [Test]
    public void DropoutChangesTheLossAndEvalTurnsItOff()
    {
        using var ops = new CpuOps();
        using var noDrop = Lora(ops, 0.0, false);
        using var drop = Lora(ops, 0.3, false);
        RandomizeLoraB(noDrop, 100);
        RandomizeLoraB(drop, 100);
        var (ids, labels) = TinyBatch();
        double l0 = noDrop.Forward(ids, labels, B, T);
        drop.Dropout.Step = 1;
        double l1 = drop.Forward(ids, labels, B, T);
        drop.Dropout.Step = 2;
        double l2 = drop.Forward(ids, labels, B, T);
        Assert.That(l1, Is.Not.EqualTo(l0), "dropout 0.3 changes the loss");
        Assert.That(l2, Is.Not.EqualTo(l1), "another step draws other masks");
        drop.Dropout.Training = false;
        Assert.That(drop.Forward(ids, labels, B, T), Is.EqualTo(l0), "eval mode: no dropout, same loss as p = 0");
    }

    [TestCase(0.0)]
    [TestCase(0.3)]
    public void RecomputeGivesIdenticalGradients(double dropout)
    {
        using var ops = new CpuOps();
        using var plain = Lora(ops, dropout, false);
        using var recomputed = Lora(ops, dropout, true);
        RandomizeLoraB(plain, 100);
        RandomizeLoraB(recomputed, 100);
        plain.Dropout.Step = recomputed.Dropout.Step = 3;
        var a = Analytic(plain);
        var b = Analytic(recomputed);
        foreach (var (name, g) in a)
            Assert.That(b[name], Is.EqualTo(g), name + ": bit-identical with and without recompute");
        Assert.That(recomputed.ActivationBytes, Is.LessThan(plain.ActivationBytes), "recompute holds fewer activations");
    }

    [TestCase(false, false)]
    [TestCase(true, false)]
    [TestCase(false, true)]
    public void FullFineTuningGradientsOfEveryParameterKindMatchFiniteDifferences(bool recompute, bool tied)
    {
        using var ops = new CpuOps();
        var config = Tiny with { TieWordEmbeddings = tied };
        using var model = LlamaModel.CreateRandom(config, ops, new LlamaModelOptions
        {
            ComputeDType = DType.F64, FullFineTuning = true, Recompute = recompute,
        }, weightSeed: 3, std: 0.5);
        var names = model.TrainableParameters.Select(p => p.Name).ToList();
        Assert.That(names, Has.Count.EqualTo(config.ExpectedTensors().Count()), "every base tensor is trainable");
        Assert.That(names.Contains("lm_head.weight"), Is.EqualTo(!tied));
        var analytic = Analytic(model);
        int total = 0;
        foreach (var (name, param, _) in model.TrainableParameters)
            total += Check(model, name, param, analytic[name], sample: 5);
        Assert.That(total, Is.GreaterThan(5 * 15));
    }
}
