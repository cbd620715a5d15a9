using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// Merging LoRA into a bf16-stored base (LoRA's default frozen base) on the CPU reference: W + scaling·B·A is computed
/// in fp32 from the fp32 adapters, as PEFT merges, and rounded once to bf16 — checked against the same sum in float64
/// rounded to the nearest bf16. Rounding B and A to bf16 first (the earlier behaviour) misses that nearest value for a
/// large share of the elements.
/// </summary>
public class LoraMergeBf16BaseTests
{
    private static readonly LoraSettings Lora = new() { Rank = 4, Alpha = 8, TargetModules = LoraSettings.KnownTargets };

    private static double[] Bf16(IOps ops, Tensor t)
    {
        Assert.That(t.DType, Is.EqualTo(DType.BF16), "LoRA's frozen base is stored in bf16");
        var raw = new BFloat16[t.Count];
        ops.Download<BFloat16>(t, raw);
        return raw.Select(v => (double)v.ToSingle()).ToArray();
    }

    [Test]
    public void MergeRoundsTheFp32SumOnceAndKeepsTheLoss()
    {
        using var ops = new CpuOps();
        var config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 64, HeadDim = 16 };
        using var model = LlamaModel.CreateRandom(config, ops, new LlamaModelOptions { Lora = Lora, BaseWeightDType = DType.BF16 }, weightSeed: 7, std: 0.3);
        model.Dropout.Training = false;
        var (ids, labels) = ModelTestKit.TinyBatch();
        double baseOnly = model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
        ModelTestKit.RandomizeLoraB(model, 11);
        double adapted = model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);

        // The float64 reference per adapted weight: nearest bf16 of W + s·B·A.
        var expected = model.LoraLayers.Select(l =>
        {
            var w = Bf16(ops, ((Linear)l.Base).Weight);
            var a = ModelTestKit.Get(ops, l.LoraA);
            var b = ModelTestKit.Get(ops, l.LoraB);
            var e = new float[w.Length];
            for (int o = 0; o < l.OutFeatures; o++)
                for (int i = 0; i < l.InFeatures; i++)
                {
                    double d = 0;
                    for (int k = 0; k < l.Rank; k++) d += b[o * l.Rank + k] * a[k * l.InFeatures + i];
                    e[o * l.InFeatures + i] = ((BFloat16)(w[o * l.InFeatures + i] + l.Scaling * d)).ToSingle();
                }
            return e;
        }).ToList();

        model.MergeAdapters();
        long total = 0, nearest = 0;
        for (int n = 0; n < expected.Count; n++)
        {
            var l = model.LoraLayers[n];
            var merged = Bf16(ops, ((Linear)l.Base).Weight);
            for (int i = 0; i < merged.Length; i++)
            {
                total++;
                if (merged[i] == expected[n][i]) nearest++;
                else Assert.That(Math.Abs(merged[i] - expected[n][i]), Is.LessThanOrEqualTo(Math.Abs(expected[n][i]) * Math.Pow(2, -7)),
                    $"adapter {l.ModuleIndex} [{i}]: at most one bf16 step from the nearest (fp32 vs float64 sums)");
            }
        }
        TestContext.Out.WriteLine($"{nearest} of {total} merged weights are the nearest bf16 of the float64 sum");
        Assert.That(nearest, Is.GreaterThanOrEqualTo(total * 99 / 100), "rounded once, from an fp32 sum");

        double mergedLoss = model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
        model.UnmergeAdapters();
        double unmerged = model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
        TestContext.Out.WriteLine($"loss: base {baseOnly:R}, adapter {adapted:R}, merged {mergedLoss:R}, unmerged {unmerged:R}");
        Assert.That(Math.Abs(adapted - baseOnly), Is.GreaterThan(0.05 * adapted), "the adapter matters (5x the tolerance below)");
        // One bf16 rounding per weight (2⁻⁹ relative) on this deliberately large adapter (std-0.3 weights, B at 0.5)
        // moves the loss by about 1e-3 relative (measured 1.1e-3 merged); 1e-2 bounds it with room, while a merge that
        // dropped or doubled B·A moves it by far more.
        Assert.That(mergedLoss, Is.EqualTo(adapted).Within(1e-2 * adapted), "the merged model's loss: the adapter's, up to one bf16 rounding per weight");
        Assert.That(unmerged, Is.EqualTo(adapted).Within(1e-2 * adapted), "unmerged: the base back up to one more rounding");
    }
}
