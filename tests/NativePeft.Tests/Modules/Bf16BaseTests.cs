using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.Modules;

/// <summary>A frozen base stored in BF16 (half the bytes), widened per GEMM: the LoRA model on top of it.</summary>
public class Bf16BaseTests
{
    private static readonly LoraSettings Lora = new() { Rank = 2, Alpha = 4, TargetModules = LoraSettings.KnownTargets };

    private static (double Loss, long Bytes, Dictionary<string, double[]> Grads) Run(IOps ops, DType compute, DType? baseDType)
    {
        using var model = LlamaModel.CreateRandom(Tiny with { HiddenSize = 32, IntermediateSize = 64, HeadDim = 16 }, ops,
            new LlamaModelOptions { ComputeDType = compute, BaseWeightDType = baseDType, Lora = Lora }, weightSeed: 3, std: 0.3);
        RandomizeLoraB(model, 5);
        var (ids, labels) = TinyBatch();
        double loss = model.Forward(ids, labels, B, T);
        model.ZeroGrad();
        model.Backward();
        return (loss, model.ParameterBytes, model.TrainableParameters.ToDictionary(p => p.Name, p => Get(ops, p.Grad)));
    }

    [Test]
    public void Bf16BaseHalvesTheProjectionBytesAndChangesTheLossByRoundingOnly()
    {
        using var ops = new CpuOps();
        var f32 = Run(ops, DType.F32, null);
        var bf16 = Run(ops, DType.F32, DType.BF16);
        // 2 layers × (q, k, v, o: 4·32·32 with 1 kv head of 16: q 32x32, k 16x32, v 16x32, o 32x32) + (gate, up, down: 3·64·32)
        long projections = 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32);
        long scratch = 64 * 32 * 4; // the largest layer, widened to F32
        Assert.That(f32.Bytes - bf16.Bytes, Is.EqualTo(projections * 2 - scratch), "2 bytes saved per projection weight, one layer of scratch added");
        Assert.That(bf16.Loss, Is.Not.EqualTo(f32.Loss), "the weights were rounded to bf16");
        Assert.That(bf16.Loss, Is.EqualTo(f32.Loss).Within(0.02 * f32.Loss), "bf16 rounding (2^-9 relative) moves the loss little");
    }

    [Test]
    public void Bf16BaseOnTheEmulatorEqualsTheCpu()
    {
        using var cpu = new CpuOps();
        using var gpu = new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
        var c = Run(cpu, DType.F32, DType.BF16);
        var g = Run(gpu, DType.F32, DType.BF16);
        Assert.That(g.Loss, Is.EqualTo(c.Loss).Within(1e-5 * c.Loss));
        foreach (var (name, grad) in c.Grads)
        {
            double scale = Math.Max(1e-12, grad.Max(Math.Abs));
            for (int i = 0; i < grad.Length; i++)
                Assert.That(Math.Abs(g.Grads[name][i] - grad[i]), Is.LessThanOrEqualTo(1e-3 * scale), $"{name}[{i}]");
        }
    }

    [Test]
    public void Bf16BaseIsOnlyForAFrozenBase()
    {
        var options = new LlamaModelOptions { BaseWeightDType = DType.BF16, FullFineTuning = true };
        Assert.That(options.Validate, Throws.ArgumentException.With.Message.Contains("BaseWeightDType"));
        Assert.That(new LlamaModelOptions { BaseWeightDType = DType.F16 }.Validate, Throws.ArgumentException.With.Message.Contains("F16"));
    }
}
