using NativePeft.Inference;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Planning;
using NativePeft.Runtime;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Planning;

/// <summary>
/// The <see cref="InferencePlan"/> against the allocator: a tiny model with no adapter, LoRA on a bf16 base and QLoRA
/// (NF4, double quantization) generates with a KV cache and evaluates a sequence on the CPU (F32), the emulator (F32 and
/// BF16) and CUDA (where present). The allocator's peak (the plain host/device memory, then the pool) must equal the plan
/// to the byte, and each part (parameters, KV cache, the cache's workspace, eval's activations) what the model reports;
/// the pool's arenas are the aligned plan, filled exactly; the pool changes no output; and a generation longer than
/// planned fails with the pool's message.
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulator")]
[TestFixture("cuda")]
[Parallelizable(ParallelScope.None)]
public class InferencePlanExactnessTests(string device)
{
    /// <summary>2 layers, hidden 64, GQA (4 heads, 2 kv heads), vocab 1600; 128 positions so a long generation grows the RoPE tables past 64 rows.</summary>
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 64, IntermediateSize = 128, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
        NumHiddenLayers = 2, VocabSize = 1600, MaxPositionEmbeddings = 128, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    private static readonly LoraSettings Lora = new() { Rank = 4, Alpha = 8, TargetModules = LoraSettings.KnownTargets };

    public static IEnumerable<TestCaseData> Models()
    {
        foreach (var dtype in new[] { DType.F32, DType.BF16 })
        {
            string d = dtype == DType.F32 ? "f32" : "bf16";
            yield return new TestCaseData(new LlamaModelOptions { ComputeDType = dtype }).SetArgDisplayNames("no-adapter-" + d);
            yield return new TestCaseData(new LlamaModelOptions { ComputeDType = dtype, Lora = Lora, BaseWeightDType = DType.BF16 }).SetArgDisplayNames("lora-bf16base-" + d);
            yield return new TestCaseData(new LlamaModelOptions { ComputeDType = dtype, Lora = Lora, Quantization = BaseQuantization.Nf4, DoubleQuant = true })
                .SetArgDisplayNames("qlora-nf4-dq-" + d);
        }
    }

    /// <summary>(prompt, new tokens): a short cache (workspace of 16 tokens), a prompt longer than 16, a cache past 64 RoPE rows.</summary>
    private static readonly (int Prompt, int New)[] Shapes = [(5, 9), (20, 11), (30, 60)];

    private PlanDevice Device => device == "cpu" ? PlanDevice.Cpu : PlanDevice.Gpu;
    private int Alignment => device == "cpu" ? DevicePool.HostAlignment : DevicePool.GpuAlignment;

    private void SkipUnsupported(LlamaModelOptions options)
    {
        if (device == "cpu" && options.ComputeDType == DType.BF16) Assert.Ignore("BF16 compute runs on GPU devices only (the CPU reference is fp32)");
    }

    private IGpu OpenGpu()
    {
        if (device == "emulator") return TestGpus.CreateEmulated();
        var cuda = TestGpus.TryCreateCuda(out string reason);
        if (cuda is null) Assert.Ignore("no CUDA device: " + reason);
        return cuda!;
    }

    /// <summary>The plain allocator (HostTensorMemory / GpuTensorMemory), or a pool sized from <paramref name="plan"/>.</summary>
    private (IOps Ops, DevicePool? Pool) Create(InferencePlan? plan)
    {
        if (device == "cpu")
        {
            if (plan is null) return (new CpuOps(), null);
            var hostPool = DevicePool.ForHost(plan);
            return (new CpuOps(hostPool), hostPool);
        }
        var gpu = OpenGpu();
        var pool = plan is null ? null : DevicePool.ForGpu(gpu, plan);
        return (new GpuOps(gpu, ownsGpu: true, memory: pool), pool);
    }

    private static int[] Prompt(int n)
    {
        var rng = new Random(n);
        return Enumerable.Range(0, n).Select(_ => rng.Next(Config.VocabSize)).ToArray();
    }

    private InferencePlan GenerationPlan(LlamaModelOptions options, int prompt, int maxNew) =>
        DevicePlanning.Inference(Config, options, new InferencePlanOptions { Mode = InferenceMode.Generate, PromptTokens = prompt, MaxNewTokens = maxNew, Device = Device });

    private static LlamaModel Model(IOps ops, LlamaModelOptions options)
    {
        var model = LlamaModel.CreateRandom(Config, ops, options with { Seed = 3 }, weightSeed: 5, std: 0.05);
        // LoRA B starts at zero (PEFT's init): give it values so the adapter changes the outputs.
        var rng = new Random(11);
        foreach (var (_, param, _) in model.TrainableParameters)
        {
            var values = Enumerable.Range(0, checked((int)param.Count)).Select(_ => (float)(rng.NextDouble() - 0.5) * 0.1f).ToArray();
            ops.Upload<float>(values, param);
        }
        return model;
    }

    [TestCaseSource(nameof(Models))]
    public void GenerationPeakIsThePlanOnTheAllocatorAndThePool(LlamaModelOptions options)
    {
        SkipUnsupported(options);
        foreach (var (p, m) in Shapes)
        {
            var plan = GenerationPlan(options, p, m);
            var prompt = Prompt(p);
            var generation = new GenerationOptions { MaxNewTokens = m, StopAtEos = false };

            // The plain allocator: every part as the model reports it, and the peak.
            int[] plainTokens;
            {
                var (ops, _) = Create(null);
                using var _ops = ops;
                using var model = Model(ops, options);
                Assert.That(model.ParameterBytes, Is.EqualTo(plan.ParameterBytes), $"parameters ({p}, {m})");
                using (var cache = model.CreateKvCache(plan.Options.MaxLength))
                {
                    cache.Forward(prompt, new double[Config.VocabSize]);
                    cache.Forward(prompt[..1], new double[Config.VocabSize]);
                    Assert.That(cache.CacheBytes, Is.EqualTo(plan.KvCacheBytes), $"KV cache ({p}, {m})");
                    Assert.That(LlamaKvCache.BytesFor(Config, plan.Options.MaxLength, options.ComputeDType), Is.EqualTo(plan.KvCacheBytes));
                    Assert.That(cache.WorkspaceBytes, Is.EqualTo(plan.ForwardWorkspaceBytes), $"the cache's workspace ({p}, {m})");
                }
                ops.Memory.ResetPeak();
                var result = new TextGenerator(model).Generate(prompt, generation);
                plainTokens = result.TokenIds;
                Assert.That(plainTokens, Has.Length.EqualTo(m));
                Assert.That(ops.Memory.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes), $"the allocator's peak ({p}, {m})");
            }

            // The pool: reservations = the aligned plan, filled exactly; the same tokens.
            {
                var (ops, pool) = Create(plan);
                using var _ops = ops;
                var aligned = plan.Aligned(Alignment);
                Assert.Multiple(() =>
                {
                    Assert.That(pool!.Arena(MemoryRegion.Persistent).ReservedBytes, Is.EqualTo(aligned.PersistentArenaBytes));
                    Assert.That(pool.Arena(MemoryRegion.RopeTables).ReservedBytes, Is.EqualTo(aligned.RopeArenaBytes));
                    Assert.That(pool.Arena(MemoryRegion.Transient).ReservedBytes, Is.EqualTo(aligned.TransientArenaBytes));
                    Assert.That(plan.PersistentArenaBytes + plan.RopeArenaBytes + plan.TransientArenaBytes, Is.EqualTo(plan.TotalBytes));
                    Assert.That(pool.InferencePlan, Is.Not.Null);
                    Assert.That(pool.PlanTotalBytes, Is.EqualTo(plan.TotalBytes));
                });
                using var model = Model(ops, options);
                var result = new TextGenerator(model).Generate(prompt, generation);
                Assert.That(result.TokenIds, Is.EqualTo(plainTokens), "the pool changes no output");
                Assert.That(pool!.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes), $"the pool's peak ({p}, {m})");
                foreach (var a in pool.Arenas)
                {
                    Assert.That(a.PeakInUseBytes, Is.EqualTo(a.ReservedBytes), $"{a.Name}: filled exactly ({p}, {m})");
                    Assert.That(a.HighWaterBytes, Is.EqualTo(a.ReservedBytes), $"{a.Name}: no fragmentation ({p}, {m})");
                }
            }
        }
    }

    [TestCaseSource(nameof(Models))]
    public void EvalPeakIsThePlanOnTheAllocatorAndThePool(LlamaModelOptions options)
    {
        SkipUnsupported(options);
        const int T = 70; // past the 64 RoPE rows
        var plan = DevicePlanning.Inference(Config, options, new InferencePlanOptions { Mode = InferenceMode.Eval, Seq = T, CrossEntropyChunk = 512, Device = Device });
        Assert.That(plan.Options.CrossEntropyChunk, Is.EqualTo(options.CrossEntropyChunk), "the plan takes the model's chunk");
        var ids = Prompt(T);
        double Evaluate(LlamaModel model)
        {
            model.Dropout.Training = false;
            double shorter = model.Forward(ids.AsSpan(0, 9), ids.AsSpan(0, 9), 1, 9); // a shorter sequence first, as eval's lines come
            Assert.That(double.IsFinite(shorter), Is.True);
            return model.Forward(ids, ids, 1, T);
        }
        double plainLoss;
        {
            var (ops, _) = Create(null);
            using var _ops = ops;
            using var model = Model(ops, options);
            ops.Memory.ResetPeak();
            plainLoss = Evaluate(model);
            Assert.That(model.ParameterBytes, Is.EqualTo(plan.ParameterBytes), "parameters");
            Assert.That(model.ActivationBytes, Is.EqualTo(plan.ActivationBytes), "activations of the forward");
            Assert.That(ops.Memory.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes), "the allocator's peak");
        }
        {
            var (ops, pool) = Create(plan);
            using var _ops = ops;
            var aligned = plan.Aligned(Alignment);
            Assert.That(pool!.Arena(MemoryRegion.Transient).ReservedBytes, Is.EqualTo(aligned.TransientArenaBytes));
            Assert.That(pool.Arena(MemoryRegion.Persistent).ReservedBytes, Is.EqualTo(aligned.PersistentArenaBytes));
            Assert.That(pool.Arena(MemoryRegion.RopeTables).ReservedBytes, Is.EqualTo(aligned.RopeArenaBytes));
            using var model = Model(ops, options);
            Assert.That(Evaluate(model), Is.EqualTo(plainLoss), "the pool changes no output");
            Assert.That(pool.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes), "the pool's peak");
            foreach (var a in pool.Arenas) Assert.That(a.PeakInUseBytes, Is.EqualTo(a.ReservedBytes), $"{a.Name}: filled exactly");
        }
    }

    [Test]
    public void AGenerationLongerThanPlannedFailsWithThePoolsMessage()
    {
        var options = new LlamaModelOptions { Lora = Lora, Quantization = BaseQuantization.Nf4 };
        var plan = GenerationPlan(options, 5, 9);
        var (ops, pool) = Create(plan);
        using var _ops = ops;
        using var model = Model(ops, options);
        var prompt = Prompt(5);
        Assert.That(new TextGenerator(model).Generate(prompt, new GenerationOptions { MaxNewTokens = 9, StopAtEos = false }).TokenIds, Has.Length.EqualTo(9));
        var e = Assert.Throws<OutOfMemoryException>(() => new TextGenerator(model).Generate(prompt, new GenerationOptions { MaxNewTokens = 12, StopAtEos = false }))!;
        Assert.That(e.Message, Does.Contain("transient").And.Contain($"total is {plan.TotalBytes} bytes")
            .And.Contain("generation of up to 13 cached tokens, prompt 5").And.Contain("needs more than the plan"));
        Assert.That(pool!.AllocatedBytes, Is.EqualTo(plan.PersistentArenaBytes + plan.RopeArenaBytes), "the failed cache released what it had allocated");
        // What was planned still runs.
        Assert.That(new TextGenerator(model).Generate(prompt, new GenerationOptions { MaxNewTokens = 9, StopAtEos = false }).TokenIds, Has.Length.EqualTo(9));
        Assert.That(pool.PeakAllocatedBytes, Is.EqualTo(plan.TotalBytes));
    }
}
