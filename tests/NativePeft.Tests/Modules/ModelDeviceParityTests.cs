using NativePeft.IO;
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
        var reference = Run(cpuOps, options with { ComputeDType = DType.F64 });
        var cpu = Run(cpuOps, options);
        var gpu = Run(_gpu, options);
        Assert.That(gpu.Loss, Is.EqualTo(cpu.Loss).Within(1e-5 * Math.Abs(cpu.Loss)), "loss");
        AssertClose(gpu.Logits, cpu.Logits, 1e-4, "logits");
        Assert.That(gpu.Grads.Keys, Is.EquivalentTo(cpu.Grads.Keys));
        double worstCpu = 0, worstGpu = 0;
        foreach (var (name, g) in reference.Grads)
        {
            worstCpu = Math.Max(worstCpu, ElementwiseUnits(cpu.Grads[name], g));
            worstGpu = Math.Max(worstGpu, ElementwiseUnits(gpu.Grads[name], g));
        }
        TestContext.Out.WriteLine($"worst gradient element error in units of u32·(|g| + rms): cpu {worstCpu:F1}, {device} {worstGpu:F1}");
        foreach (var (name, g) in reference.Grads)
        {
            AssertElementwise(cpu.Grads[name], g, "cpu " + name);
            AssertElementwise(gpu.Grads[name], g, device + " " + name);
        }
    }

    /// <summary>The loss, logits and gradients of the tiny model with <paramref name="options"/> on <paramref name="ops"/>.</summary>
    private static (double Loss, double[] Logits, Dictionary<string, double[]> Grads) Run(IOps ops, LlamaModelOptions options, Action<LlamaModel>? alter = null)
    {
        var (ids, labels) = ModelTestKit.TinyBatch();
        var config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 64, HeadDim = 16 };
        using var model = LlamaModel.CreateRandom(config, ops, options, weightSeed: 7, std: 0.3);
        if (options.Lora is not null) ModelTestKit.RandomizeLoraB(model, 11);
        alter?.Invoke(model);
        double loss = model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
        var logits = ops.Memory.Allocate(options.ComputeDType == DType.F64 ? DType.F64 : DType.F32, ModelTestKit.B * ModelTestKit.T, config.VocabSize);
        try
        {
            model.Logits(logits);
            model.ZeroGrad();
            model.Backward();
            return (loss, ModelTestKit.Get(ops, logits), model.TrainableParameters.ToDictionary(p => p.Name, p => ModelTestKit.Get(ops, p.Grad)));
        }
        finally { ops.Memory.Free(logits); }
    }

    /// <summary>fp32's unit roundoff, 2⁻²⁴.</summary>
    private const double U32 = 1.0 / (1 << 24);

    /// <summary>
    /// The elementwise gradient bound, in units of u32·(|g₆₄[i]| + rms(g₆₄)): each element within GradUnits of them.
    /// GradUnits = 1024 (≈ 6e-5 relative), derived: a gradient element of this model is the end of a chain of about 30
    /// dependent fp32 ops forward and backward (2 blocks × (norm, 3–4 GEMMs, attention's two GEMMs and softmax, SwiGLU),
    /// the vocabulary-wide cross-entropy), each summing up to n = 64 terms (γₙ ≈ n·u per GEMM, a softmax or norm a few u),
    /// so a first-order bound is Σ n·u·κ over the chain with κ the amplification of each stage; with std-0.3 weights κ is
    /// O(1) per stage, giving at most 30·64 ≈ 2000 u of the gradient's scale, and half of that as the bound since the
    /// errors of a chain add at random rather than all in one direction (measured worst: 60–214 units). The rms term stands for the cancellations that
    /// leave an element far below the terms that made it (its error is that of the terms, not of the result). The
    /// F64 run is the truth; the CPU reference in fp32 must meet the same bound (measured 59–214 units on the CPU and
    /// the emulator), and a wrong model must not: the control test shows a 1e-4 change of lora_alpha (≈ 56000 units) and
    /// a 1 % change of RoPE's theta breaking it.
    /// The old bound (1e-3 of each tensor's largest element, 16777 u of the max) left small elements unconstrained.
    /// </summary>
    private const double GradUnits = 1024;

    /// <summary>max over the elements of |got − reference| / (u32·(|reference| + rms(reference))).</summary>
    private static double ElementwiseUnits(double[] got, double[] reference)
    {
        double rms = Math.Sqrt(reference.Sum(x => x * x) / Math.Max(1, reference.Length)), worst = 0;
        for (int i = 0; i < reference.Length; i++)
            worst = Math.Max(worst, Math.Abs(got[i] - reference[i]) / (U32 * (Math.Abs(reference[i]) + rms) + 1e-300));
        return worst;
    }

    private static void AssertElementwise(double[] got, double[] reference, string what)
    {
        double units = ElementwiseUnits(got, reference);
        Assert.That(units, Is.LessThanOrEqualTo(GradUnits), $"{what}: worst element {units:F0} units of u32·(|g| + rms) (bound {GradUnits})");
    }

    /// <summary>
    /// The negative control of <see cref="GradUnits"/>: a model that differs from the reference by a small wiring or
    /// setting error — lora_alpha 1e-4 larger (every adapter gradient and the downstream activations scaled), or RoPE's
    /// theta 1 % larger (every rotation angle off a little) — must exceed the bound on some gradient, on the fp32 CPU path and
    /// on the device.
    /// </summary>
    [TestCase("alpha")]
    [TestCase("rope-theta")]
    public void ASlightlyWrongModelBreaksTheGradientBound(string defect)
    {
        using var cpuOps = new CpuOps();
        var lora = new LoraSettings { Rank = 2, Alpha = 4, TargetModules = LoraSettings.KnownTargets };
        var options = new LlamaModelOptions { Lora = lora };
        var reference = Run(cpuOps, options with { ComputeDType = DType.F64 });
        var wrong = defect == "alpha" ? options with { Lora = lora with { Alpha = 4 * (1 + 1e-4) } } : options;
        var config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 64, HeadDim = 16 };
        foreach (IOps ops in new IOps[] { cpuOps, _gpu })
        {
            var got = defect == "alpha" ? Run(ops, wrong) : RunWithConfig(ops, wrong, config with { RopeTheta = config.RopeTheta * 1.01 });
            double worst = reference.Grads.Max(kv => ElementwiseUnits(got.Grads[kv.Key], kv.Value));
            TestContext.Out.WriteLine($"{defect} on {(ops == cpuOps ? "cpu" : device)}: worst {worst:F0} units");
            Assert.That(worst, Is.GreaterThan(GradUnits), $"{defect}: the bound must catch it");
        }
    }

    private static (double Loss, double[] Logits, Dictionary<string, double[]> Grads) RunWithConfig(IOps ops, LlamaModelOptions options, LlamaConfig config)
    {
        var (ids, labels) = ModelTestKit.TinyBatch();
        using var model = LlamaModel.CreateRandom(config, ops, options, weightSeed: 7, std: 0.3);
        if (options.Lora is not null) ModelTestKit.RandomizeLoraB(model, 11);
        model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
        model.ZeroGrad();
        model.Backward();
        return (0, [], model.TrainableParameters.ToDictionary(p => p.Name, p => ModelTestKit.Get(ops, p.Grad)));
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
