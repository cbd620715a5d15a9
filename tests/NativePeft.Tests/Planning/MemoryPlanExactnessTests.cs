using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NativePeft.Planning;
using NativePeft.Quantization;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Planning;

/// <summary>
/// The plan against what the code really allocates: a tiny model is built from <see cref="PlanOptions.ToModelOptions"/>
/// on CpuOps and on GpuOps over the emulator (and CUDA where present), trained two steps (forward, backward, clipping, optimizer step), and
/// every measured number must equal the plan to the byte: model.ParameterBytes, model.ActivationBytes, the optimizer's
/// StateBytes / PagedStateBytes, the pool's peak after the first step (FirstStepPeakBytes) and after the second (TotalBytes).
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulator")]
[TestFixture("cuda")]
[Parallelizable(ParallelScope.None)]
public class MemoryPlanExactnessTests(string device)
{
    /// <summary>
    /// hidden 64, intermediate 128 (gate/up/down have 8192 elements: 8-bit optimizer state), 4 heads, 2 kv heads,
    /// 2 layers, vocab 1600 (embed 102400 elements: paged state), llama3 rope scaling.
    /// </summary>
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 64, IntermediateSize = 128, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
        NumHiddenLayers = 2, VocabSize = 1600, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
        RopeScaling = new Llama3RopeScaling(8, 1, 4, 16),
    };

    private const int B = 2, T = 5;

    public static IEnumerable<TestCaseData> Cases()
    {
        var baseOptions = new PlanOptions { Batch = B, Seq = T, Rank = 4, Alpha = 8, CrossEntropyChunk = 512 };
        TestCaseData Case(string name, PlanOptions o) => new TestCaseData(o).SetArgDisplayNames(name);
        foreach (bool recompute in new[] { false, true })
        {
            string r = recompute ? "-recompute" : "";
            var b = baseOptions with { Recompute = recompute };
            yield return Case("full-adamw" + r, b with { Method = FineTuneMethod.Full });
            yield return Case("full-paged-adamw8bit" + r, b with { Method = FineTuneMethod.Full, Optimizer = "paged-adamw8bit" });
            yield return Case("lora-f32base" + r, b with { Method = FineTuneMethod.Lora, BaseWeightDType = DType.F32 });
            yield return Case("lora-bf16base-paged-adamw-dropout" + r, b with { Method = FineTuneMethod.Lora, Optimizer = "paged-adamw", Dropout = 0.1 });
            yield return Case("qlora-nf4-dq" + r, b with { Method = FineTuneMethod.Qlora });
            yield return Case("qlora-nf4-dq-embedding-host" + r, b with { Method = FineTuneMethod.Qlora, EmbeddingOnHost = true });
            yield return Case("qlora-fp4-qv-adamw8bit-dropout" + r, b with
            {
                Method = FineTuneMethod.Qlora, QuantType = QuantType.Fp4, DoubleQuant = false, Targets = ["q_proj", "v_proj"], Optimizer = "adamw8bit",
                Dropout = 0.05,
            });
        }
        yield return Case("full-noclip-chunk-above-vocab", baseOptions with { Method = FineTuneMethod.Full, ClipGradients = false, CrossEntropyChunk = 100_000 });
        yield return Case("lora-batch1-seq40", baseOptions with { Method = FineTuneMethod.Lora, Batch = 1, Seq = 40, Rank = 8, Targets = ["down_proj"] });
    }

    private IOps CreateOps()
    {
        if (device == "cpu") return new CpuOps();
        if (device == "emulator") return new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
        var cuda = TestGpus.TryCreateCuda(out string reason);
        if (cuda is null) Assert.Ignore("no CUDA device: " + reason);
        return new GpuOps(cuda!, ownsGpu: true);
    }

    private PlanDevice Device => device == "cpu" ? PlanDevice.Cpu : PlanDevice.Gpu;

    private static (int[] Ids, int[] Labels) Batch(LlamaConfig config, int batch, int seq)
    {
        var rng = new Random(17);
        var ids = new int[batch * seq];
        for (int i = 0; i < ids.Length; i++) ids[i] = rng.Next(config.VocabSize);
        var labels = (int[])ids.Clone();
        labels[1] = -100;
        return (ids, labels);
    }

    [Test]
    public void EmbeddingOnHostMovesTheTableOutOfTheDeviceTotal()
    {
        // embed_tokens [1600, 64] in the compute dtype (fp32 here): 1600·64·4 = 409600 bytes leave the device plan and
        // appear as host memory; nothing else changes.
        var device = MemoryPlan.Compute(Config, new PlanOptions { Batch = B, Seq = T, Method = FineTuneMethod.Qlora, Device = Device });
        var host = MemoryPlan.Compute(Config, device.Options with { EmbeddingOnHost = true });
        Assert.That(device.TotalBytes - host.TotalBytes, Is.EqualTo(1600 * 64 * 4));
        Assert.That(device.BaseWeightBytes - host.BaseWeightBytes, Is.EqualTo(1600 * 64 * 4));
        Assert.That(host.HostEmbeddingBytes, Is.EqualTo(1600 * 64 * 4));
        Assert.That(device.HostEmbeddingBytes, Is.Zero);
        Assert.That(host.ActivationBytes, Is.EqualTo(device.ActivationBytes));
        Assert.Throws<ArgumentException>(() => MemoryPlan.Compute(Config with { TieWordEmbeddings = true }, host.Options), "tied: the device needs the table");
        Assert.Throws<ArgumentException>(() => MemoryPlan.Compute(Config, host.Options with { Method = FineTuneMethod.Full }), "full fine-tuning trains it");
    }

    [Test]
    public void LoraDropoutStoresNothingItsTemporariesAreTransient()
    {
        // dropout(x) and its mask are never kept: the LoRA ops redraw the mask (IOps.LoraDown / LoraBackwardInput). With
        // fp32 activations (the unfused ops) an adapter's call holds dropout(x) [N, in] fp32 and its U8 mask for its
        // duration: N = 2·5 tokens, largest in = 128 (down_proj's intermediate size): 10·128·(4 + 1) = 6400 bytes.
        var off = MemoryPlan.Compute(Config, new PlanOptions { Batch = B, Seq = T, Rank = 4, Device = Device });
        var on = MemoryPlan.Compute(Config, off.Options with { Dropout = 0.05 });
        Assert.That(on.ActivationBytes, Is.EqualTo(off.ActivationBytes));
        Assert.That(on.LoraScratchBytes, Is.EqualTo(off.LoraScratchBytes));
        Assert.That(on.TransientWorkspaceBytes, Is.GreaterThanOrEqualTo(B * T * 128 * (4 + 1)));
        if (Device == PlanDevice.Cpu)
        {
            Assert.That(on.TransientWorkspaceBytes, Is.EqualTo(B * T * 128 * (4 + 1)), "the CPU's only transient");
            Assert.That(off.TransientWorkspaceBytes, Is.Zero, "nothing without dropout");
        }
        // the scratch: xa and dxa of the widest group, q, k, v: [10, 3·4] fp32 each = 2·10·12·4 bytes
        Assert.That(off.LoraScratchBytes, Is.EqualTo(2 * B * T * 3 * 4 * 4));
    }

    public static IEnumerable<TestCaseData> Bf16Cases()
    {
        var b = new PlanOptions { Batch = B, Seq = T, Rank = 4, Alpha = 8, CrossEntropyChunk = 512, ComputeDType = DType.BF16 };
        TestCaseData Case(string name, PlanOptions o) => new TestCaseData(o).SetArgDisplayNames(name);
        yield return Case("bf16-lora-dropout", b with { Method = FineTuneMethod.Lora, Dropout = 0.1 });
        yield return Case("bf16-qlora-recompute", b with { Method = FineTuneMethod.Qlora, Recompute = true });
        // r = 32 on q, k, v: the backward needs two launches (Σ padded ranks ≤ 64 each)
        yield return Case("bf16-qlora-rank32-qkv-dropout", b with { Method = FineTuneMethod.Qlora, Rank = 32, Targets = ["q_proj", "k_proj", "v_proj"], Dropout = 0.05 });
    }

    /// <summary>BF16 activations run the fused LoRA kernels (GpuLoraOps) with their fp32 workspaces: the plan holds them too.</summary>
    [TestCaseSource(nameof(Bf16Cases))]
    public void MeasuredBytesEqualThePlanWithTheFusedLoraKernels(PlanOptions options)
    {
        if (Device == PlanDevice.Cpu) Assert.Ignore("BF16 activations run on the GPU ops only");
        using var ops = CreateOps();
        AssertMeasuredBytesEqualThePlan(ops, Config, options with { Device = Device });
        Assert.That(MemoryPlan.Compute(Config, options with { Device = Device }).TransientWorkspaceBytes, Is.GreaterThan(0));
    }

    [TestCaseSource(nameof(Cases))]
    public void MeasuredBytesEqualThePlan(PlanOptions options)
    {
        options = options with { Device = Device };
        using var ops = CreateOps();
        AssertMeasuredBytesEqualThePlan(ops, Config, options);
    }

    /// <summary>
    /// Builds the model <paramref name="options"/> describe on <paramref name="ops"/>, trains it two steps and checks every
    /// measured number against the plan to the byte: parameters, activations, optimizer state, the pool's peaks.
    /// </summary>
    internal static void AssertMeasuredBytesEqualThePlan(IOps ops, LlamaConfig config, PlanOptions options)
    {
        var plan = MemoryPlan.Compute(config, options);
        using var model = LlamaModel.CreateRandom(config, ops, options.ToModelOptions(seed: 3), weightSeed: 5, std: 0.05);
        Assert.That(model.ComputeDType, Is.EqualTo(options.ComputeDType));
        Assert.That(model.ParameterBytes, Is.EqualTo(plan.ParameterBytes), "parameters + gradients + dequantization scratch");
        using var optimizer = OptimizerFactory.Create(options.Optimizer, ops);
        var (ids, labels) = Batch(config, options.Batch, options.Seq);

        void Step()
        {
            model.ZeroGrad();
            double loss = model.Forward(ids, labels, options.Batch, options.Seq);
            Assert.That(double.IsFinite(loss), Is.True);
            Assert.That(model.ActivationBytes, Is.EqualTo(plan.ActivationBytes), "activations after a forward");
            model.Backward();
            double scale = 1.0;
            if (options.ClipGradients)
                scale = GradientClipping.ClipCoefficient(GradientClipping.GlobalNorm(ops, model.TrainableParameters.Select(p => p.Grad)), 1.0);
            optimizer.Step(model.TrainableParameters, 1e-3, scale);
        }

        Step();
        Assert.Multiple(() =>
        {
            Assert.That(optimizer.StateBytes, Is.EqualTo(plan.OptimizerStateBytes + plan.PagedOptimizerStateBytes), "optimizer state");
            Assert.That(optimizer.PagedStateBytes, Is.EqualTo(plan.PagedOptimizerStateBytes), "paged optimizer state");
            Assert.That(ops.Memory.PeakAllocatedBytes, Is.EqualTo(plan.FirstStepPeakBytes), "pool peak over the first step");
            Assert.That(ops.Memory.AllocatedBytes, Is.EqualTo(plan.TotalBytes - plan.TransientWorkspaceBytes), "pool in use between steps");
        });
        Step();
        Assert.That(ops.Memory.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes), "pool peak in a steady step");
    }

    [Test]
    public void TheCasesExerciseEveryCategory()
    {
        var plans = Cases().Select(c => MemoryPlan.Compute(Config, ((PlanOptions)c.Arguments[0]!) with { Device = Device })).ToList();
        Assert.Multiple(() =>
        {
            Assert.That(plans.Any(p => p.QuantizationStateBytes > 0), "quantization state");
            Assert.That(plans.Any(p => p.DequantScratchBytes > 0), "dequantization scratch");
            Assert.That(plans.Any(p => p.LoraScratchBytes > 0), "LoRA scratch");
            Assert.That(plans.Any(p => p.OptimizerStateBytes > 0 && p.Options.EightBitOptimizer && p.Options.Method == FineTuneMethod.Full), "8-bit state");
            if (Device == PlanDevice.Gpu)
            {
                Assert.That(plans.Any(p => p.PagedOptimizerStateBytes > 0), "paged state");
                Assert.That(plans.Any(p => p.OptimizerMapBytes > 0), "8-bit maps");
                Assert.That(plans.Any(p => p.TransientWorkspaceBytes > p.OptimizerStateBytes + p.OptimizerMapBytes), "first-step peak set by a workspace");
                Assert.That(plans.Any(p => p.TransientWorkspaceBytes < p.OptimizerStateBytes), "first-step peak set by the optimizer");
            }
            else
            {
                Assert.That(plans.All(p => p.PagedOptimizerStateBytes == 0), "the CPU has no managed memory");
                // on the CPU the only transient memory is the LoRA ops' dropout(x) and mask, while dropout is on
                Assert.That(plans.All(p => (p.TransientWorkspaceBytes > 0) == (p.Options.Method != FineTuneMethod.Full && p.Options.Dropout > 0)),
                    "CPU transients: LoRA dropout only");
            }
        });
    }
}
