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
/// As <see cref="MemoryPlanExactnessTests"/>, for BF16 compute (mixed precision) on GpuOps: the model built from
/// <see cref="PlanOptions.ToModelOptions"/> with ComputeDType BF16 is trained two steps and every measured number must
/// equal the plan to the byte (parameters, activations incl. the LoRA scratch with its bf16 A/B working copies,
/// optimizer state, the pool's peaks). The 4-bit cases use the default layout, bitsandbytes' double-quantized absmax, which
/// the loader keeps on the device as it is.
/// </summary>
[TestFixture("emulator")]
[TestFixture("cuda")]
[Parallelizable(ParallelScope.None)]
public class MemoryPlanBf16ExactnessTests(string device)
{
    /// <summary>The config of <see cref="MemoryPlanExactnessTests"/> (8-bit and paged optimizer state both occur).</summary>
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 64, IntermediateSize = 128, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
        NumHiddenLayers = 2, VocabSize = 1600, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
        RopeScaling = new Llama3RopeScaling(8, 1, 4, 16),
    };

    private const int B = 2, T = 5;

    public static IEnumerable<TestCaseData> Cases()
    {
        var baseOptions = new PlanOptions
        {
            Batch = B, Seq = T, Rank = 4, Alpha = 8, CrossEntropyChunk = 512, ComputeDType = DType.BF16,
        };
        TestCaseData Case(string name, PlanOptions o) => new TestCaseData(o).SetArgDisplayNames(name);
        foreach (bool recompute in new[] { false, true })
        {
            string r = recompute ? "-recompute" : "";
            var b = baseOptions with { Recompute = recompute };
            yield return Case("full-adamw" + r, b with { Method = FineTuneMethod.Full });
            yield return Case("full-paged-adamw8bit" + r, b with { Method = FineTuneMethod.Full, Optimizer = "paged-adamw8bit" });
            yield return Case("lora-bf16base-adamw" + r, b with { Method = FineTuneMethod.Lora });
            yield return Case("lora-bf16base-paged-adamw8bit" + r, b with { Method = FineTuneMethod.Lora, Optimizer = "paged-adamw8bit" });
            yield return Case("qlora-nf4-dq-adamw" + r, b with { Method = FineTuneMethod.Qlora });
            yield return Case("qlora-fp4-qv-adamw8bit" + r, b with
            {
                Method = FineTuneMethod.Qlora, QuantType = QuantType.Fp4, DoubleQuant = false, Targets = ["q_proj", "v_proj"], Optimizer = "adamw8bit",
            });
        }
        yield return Case("lora-batch1-seq40-down", baseOptions with { Method = FineTuneMethod.Lora, Batch = 1, Seq = 40, Rank = 8, Targets = ["down_proj"] });
        yield return Case("qlora-noclip-chunk-above-vocab", baseOptions with { Method = FineTuneMethod.Qlora, ClipGradients = false, CrossEntropyChunk = 100_000 });
    }

    private GpuOps CreateOps()
    {
        if (device == "emulator") return new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
        var cuda = TestGpus.TryCreateCuda(out string reason);
        if (cuda is null) Assert.Ignore("no CUDA device: " + reason);
        return new GpuOps(cuda!, ownsGpu: true);
    }

    private static (int[] Ids, int[] Labels) Batch(int batch, int seq)
    {
        var rng = new Random(17);
        var ids = new int[batch * seq];
        for (int i = 0; i < ids.Length; i++) ids[i] = rng.Next(Config.VocabSize);
        var labels = (int[])ids.Clone();
        labels[1] = -100;
        return (ids, labels);
    }

    [TestCaseSource(nameof(Cases))]
    public void MeasuredBytesEqualThePlan(PlanOptions options)
    {
        var plan = MemoryPlan.Compute(Config, options);
        using var ops = CreateOps();
        var modelOptions = options.ToModelOptions(seed: 3);
        Assert.That(modelOptions.ComputeDType, Is.EqualTo(DType.BF16));
        using var model = LlamaModel.CreateRandom(Config, ops, modelOptions, weightSeed: 5, std: 0.05);
        Assert.That(model.ParameterBytes, Is.EqualTo(plan.ParameterBytes), "parameters + gradients + dequantization scratch");
        using var optimizer = OptimizerFactory.Create(options.Optimizer, ops);
        var (ids, labels) = Batch(options.Batch, options.Seq);

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
    public void Bf16HalvesTheActivationsOfTheF32Plan()
    {
        // Not a tautology: the two plans differ only in dtype, and the measured test above ties the BF16 plan to the
        // allocator. Every [N, ·] activation halves; the fp32 rstd/lse, the ids and the LoRA working copies do not,
        // so the ratio is a little above 1/2.
        var bf16 = MemoryPlan.Compute(Config, new PlanOptions { Batch = 4, Seq = 32, Rank = 4, ComputeDType = DType.BF16, Method = FineTuneMethod.Lora });
        var f32 = MemoryPlan.Compute(Config, bf16.Options with { ComputeDType = DType.F32 });
        double ratio = bf16.ActivationBytes / (double)f32.ActivationBytes;
        Assert.That(ratio, Is.InRange(0.5, 0.56));
        Assert.That(bf16.AdapterBytes, Is.EqualTo(f32.AdapterBytes), "fp32 adapters either way");
    }
}
