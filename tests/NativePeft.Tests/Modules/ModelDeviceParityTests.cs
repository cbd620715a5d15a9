using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// The same tiny model, weights and batch on CpuOps and on GpuOps (the emulator always, CUDA when present), in F32:
/// loss, logits and every trainable gradient agree — the kernels and the references run the same model.
/// </summary>
[TestFixture("emulator")]
[TestFixture("cuda")]
public class ModelDeviceParityTests(string device)
{
    private GpuOps _gpu = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _gpu = TestGpus.CreateOps(device);
    }

    [OneTimeTearDown]
    public void TearDown() => _gpu?.Dispose();

    public static IEnumerable<TestCaseData> Cases()
    {
        var lora = new LoraSettings { Rank = 2, Alpha = 4, TargetModules = LoraSettings.KnownTargets };
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora }).SetArgDisplayNames("lora");
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora with { Dropout = 0.3 }, Recompute = true }).SetArgDisplayNames("lora-dropout-recompute");
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora, Quantization = BaseQuantization.Nf4, Blocksize = 32 }).SetArgDisplayNames("qlora-nf4");
        yield return new TestCaseData(new LlamaModelOptions { FullFineTuning = true }).SetArgDisplayNames("full");
    }

    [TestCaseSource(nameof(Cases))]
    public void LossLogitsAndGradientsMatchTheCpu(LlamaModelOptions options)
    {
        using var cpuOps = new CpuOps();
        var (ids, labels) = ModelTestKit.TinyBatch();
        var config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 64, HeadDim = 16 };
        var results = new List<(double Loss, double[] Logits, Dictionary<string, double[]> Grads)>();
        foreach (IOps ops in new IOps[] { cpuOps, _gpu })
        {
            var model = LlamaModel.CreateRandom(config, ops, options, weightSeed: 7, std: 0.3);
            if (options.Lora is not null) ModelTestKit.RandomizeLoraB(model, 11);
            double loss = model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
            var logits = ops.Memory.Allocate(DType.F32, ModelTestKit.B * ModelTestKit.T, config.VocabSize);
            model.Logits(logits);
            model.ZeroGrad();
            model.Backward();
            results.Add((loss, ModelTestKit.Get(ops, logits), model.TrainableParameters.ToDictionary(p => p.Name, p => ModelTestKit.Get(ops, p.Grad))));
        }
        var (cpu, gpu) = (results[0], results[1]);
        Assert.That(gpu.Loss, Is.EqualTo(cpu.Loss).Within(1e-5 * Math.Abs(cpu.Loss)), "loss");
        AssertClose(gpu.Logits, cpu.Logits, 1e-4, "logits");
        Assert.That(gpu.Grads.Keys, Is.EquivalentTo(cpu.Grads.Keys));
        foreach (var (name, g) in cpu.Grads)
            AssertClose(gpu.Grads[name], g, 1e-3, name);
    }

    [Test]
    public void APackedRowMatchesTheCpu()
    {
        // Two documents (5 and 4 tokens) packed into one row with restarting positions: the kernels' document mask
        // against the CPU reference's, through the whole model (LoRA, fp32).
        using var cpuOps = new CpuOps();
        int[] ids = [3, 7, 1, 10, 4, 9, 2, 5, 8], labels = [3, 7, -100, 10, 4, 9, 2, 5, 8], positions = [0, 1, 2, 3, 4, 0, 1, 2, 3];
        var config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 64, HeadDim = 16 };
        var options = new LlamaModelOptions { Lora = new LoraSettings { Rank = 2, Alpha = 4, TargetModules = LoraSettings.KnownTargets } };
        var results = new List<(double Loss, double[] Logits, Dictionary<string, double[]> Grads)>();
        foreach (IOps ops in new IOps[] { cpuOps, _gpu })
        {
            var model = LlamaModel.CreateRandom(config, ops, options, weightSeed: 7, std: 0.3);
            ModelTestKit.RandomizeLoraB(model, 11);
            double loss = model.Forward(ids, labels, 1, 9, positions);
            Assert.That(model.LastTokenCount, Is.EqualTo(6), "a's 3 targets and b's 3: none across the boundary");
            var logits = ops.Memory.Allocate(DType.F32, 9, config.VocabSize);
            model.Logits(logits);
            model.ZeroGrad();
            model.Backward();
            results.Add((loss, ModelTestKit.Get(ops, logits), model.TrainableParameters.ToDictionary(p => p.Name, p => ModelTestKit.Get(ops, p.Grad))));
        }
        var (cpu, gpu) = (results[0], results[1]);
        Assert.That(gpu.Loss, Is.EqualTo(cpu.Loss).Within(1e-5 * Math.Abs(cpu.Loss)), "loss");
        AssertClose(gpu.Logits, cpu.Logits, 1e-4, "logits");
        foreach (var (name, g) in cpu.Grads)
            AssertClose(gpu.Grads[name], g, 1e-3, name);
    }

    /// <summary>|gpu − cpu| ≤ tol · max|cpu| per tensor: fp32 with a different summation order (cuBLAS/BLAS, kernel reductions).</summary>
    private static void AssertClose(double[] got, double[] expected, double tol, string what)
    {
        double scale = Math.Max(1e-12, expected.Max(Math.Abs));
        for (int i = 0; i < expected.Length; i++)
            Assert.That(Math.Abs(got[i] - expected[i]), Is.LessThanOrEqualTo(tol * scale), $"{what}[{i}]: gpu {got[i]} cpu {expected[i]}");
    }
}
