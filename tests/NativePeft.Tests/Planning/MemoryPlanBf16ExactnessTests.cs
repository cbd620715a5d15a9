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
            yield return Case("lora-bf16base-paged-adamw8bit-dropout" + r, b with { Method = FineTuneMethod.Lora, Optimizer = "paged-adamw8bit", Dropout = 0.1 });
            yield return Case("qlora-nf4-dq-adamw" + r, b with { Method = FineTuneMethod.Qlora });
            yield return Case("qlora-fp4-qv-adamw8bit" + r, b with
            {
                Method = FineTuneMethod.Qlora, QuantType = QuantType.Fp4, DoubleQuant = false, Targets = ["q_proj", "v_proj"], Optimizer = "adamw8bit",
            });
        }
        yield return Case("lora-batch1-seq40-down", baseOptions with { Method = FineTuneMethod.Lora, Batch = 1, Seq = 40, Rank = 8, Targets = ["down_proj"] });
        yield return Case("qlora-noclip-chunk-above-vocab", baseOptions with { Method = FineTuneMethod.Qlora, ClipGradients = false, CrossEntropyChunk = 100_000 });
    }

    [TestCaseSource(nameof(Cases))]
    public void MeasuredBytesEqualThePlan(PlanOptions options)
    {
        Assert.That(options.ComputeDType, Is.EqualTo(DType.BF16));
        using var ops = TestGpus.CreateOps(device);
        MemoryPlanExactnessTests.AssertMeasuredBytesEqualThePlan(ops, Config, options);
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
