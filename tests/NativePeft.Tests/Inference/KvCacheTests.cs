using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Modules;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Inference;

/// <summary>
/// <see cref="LlamaKvCache"/>: the logits of every cached step (a prefill of several tokens, then one token at a time)
/// equal the full forward's logits (<see cref="LlamaModel.Forward(ReadOnlySpan{int}, ReadOnlySpan{int}, int, int)"/> +
/// <see cref="LlamaModel.Logits"/>, the training path) at that position, on a tiny GQA model with LoRA (nonzero B), with
/// an NF4 base and with a BF16-stored base, on the CPU in F64 and F32 and on the emulator (vs the CPU).
/// </summary>
public class KvCacheTests
{
    private static readonly LlamaConfig Config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 48, HeadDim = 8, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 23 };
    private static readonly int[] Sequence = [3, 7, 1, 10, 4, 0, 9, 2, 5, 8, 22, 13, 6, 17, 11, 19, 12];
    private const int Prefill = 5;

    private static LoraSettings Lora(double dropout = 0) => new() { Rank = 3, Alpha = 6, Dropout = dropout, TargetModules = LoraSettings.KnownTargets };

    public static IEnumerable<TestCaseData> Options()
    {
        yield return new TestCaseData(new LlamaModelOptions { Lora = Lora(), ComputeDType = DType.F64 }, 1e-12).SetArgDisplayNames("lora-f64");
        yield return new TestCaseData(new LlamaModelOptions { Lora = Lora() }, 1e-5).SetArgDisplayNames("lora-f32");
        yield return new TestCaseData(new LlamaModelOptions { Lora = Lora(), Quantization = BaseQuantization.Nf4, Blocksize = 32 }, 1e-5).SetArgDisplayNames("qlora-nf4-f32");
        yield return new TestCaseData(new LlamaModelOptions { Lora = Lora(), BaseWeightDType = DType.BF16 }, 1e-5).SetArgDisplayNames("lora-bf16-base");
        yield return new TestCaseData(new LlamaModelOptions { ComputeDType = DType.F64 }, 1e-12).SetArgDisplayNames("no-lora-f64");
    }

    /// <summary>The full forward's logits [T, V] of the sequence (dropout off), through the training path.</summary>
    internal static double[] FullLogits(LlamaModel model, int[] ids)
    {
        bool training = model.Dropout.Training;
        model.Dropout.Training = false;
        try
        {
            model.Forward(ids, ids, 1, ids.Length);
            var logits = model.Ops.Memory.Allocate(model.StatisticsDType, ids.Length, model.Config.VocabSize); // fp32 logits from a BF16 model
            try
            {
                model.Logits(logits);
                return ModelTestKit.Get(model.Ops, logits);
            }
            finally { model.Ops.Memory.Free(logits); }
        }
        finally { model.Dropout.Training = training; }
    }

    /// <summary>The cached logits [T, V]: the first <see cref="Prefill"/> tokens in one forward (every position), then one by one.</summary>
    internal static double[] CachedLogits(LlamaModel model, int[] ids, int prefill = Prefill)
    {
        int V = model.Config.VocabSize;
        var all = new double[ids.Length * V];
        using var cache = model.CreateKvCache(ids.Length);
        cache.Forward(ids.AsSpan(0, prefill), all.AsSpan(0, prefill * V), allPositions: true);
        Assert.That(cache.Length, Is.EqualTo(prefill));
        for (int t = prefill; t < ids.Length; t++)
        {
            cache.Forward(ids.AsSpan(t, 1), all.AsSpan(t * V, V));
            Assert.That(cache.Length, Is.EqualTo(t + 1));
        }
        return all;
    }

    internal static void AssertClose(double[] actual, double[] expected, double relative, string what)
    {
        double mag = expected.Max(Math.Abs);
        Assert.That(actual.Length, Is.EqualTo(expected.Length));
        double worst = 0;
        for (int i = 0; i < actual.Length; i++) worst = Math.Max(worst, Math.Abs(actual[i] - expected[i]));
        Assert.That(worst, Is.LessThanOrEqualTo(relative * mag), $"{what}: max |Δ| {worst:E3} vs max |logit| {mag:E3}");
    }

    [TestCaseSource(nameof(Options))]
    public void EveryCachedStepEqualsTheFullForwardOnTheCpu(LlamaModelOptions options, double relative)
    {
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandom(Config, ops, options, weightSeed: 3, std: 0.3);
        if (options.Lora is not null) ModelTestKit.RandomizeLoraB(model, 5);
        var full = FullLogits(model, Sequence);
        var cached = CachedLogits(model, Sequence);
        AssertClose(cached, full, relative, "cached vs full logits");
        // The adapter path is live: without it the logits differ (a test of LoRA being applied in the cached forward).
        if (options.Lora is not null)
        {
            foreach (var l in model.LoraLayers) ops.Fill(l.LoraB, 0);
            var plain = CachedLogits(model, Sequence);
            Assert.That(plain.Zip(cached, (a, b) => Math.Abs(a - b)).Max(), Is.GreaterThan(1e-3), "LoRA must change the logits");
        }
    }

    [Test]
    public void DropoutIsOffInTheCacheAndTrainingStateIsLeftAlone()
    {
        // LoRA dropout 0.3 with the model in training mode: the cache must use no dropout (= the full forward in eval),
        // leave Dropout.Training on, and leave the training batch's activations intact (the backward after a cached
        // generation gives the same gradients as without it).
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandom(Config, ops, new LlamaModelOptions { Lora = Lora(0.3), ComputeDType = DType.F64 }, weightSeed: 3, std: 0.3);
        ModelTestKit.RandomizeLoraB(model, 5);
        var full = FullLogits(model, Sequence);
        Assert.That(model.Dropout.Training, Is.True);

        var (ids, labels) = ModelTestKit.TinyBatch();
        model.ZeroGrad();
        model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
        model.Backward();
        var reference = model.TrainableParameters.Select(p => ModelTestKit.Get(ops, p.Grad)).ToList();

        model.ZeroGrad();
        model.Forward(ids, labels, ModelTestKit.B, ModelTestKit.T);
        var cached = CachedLogits(model, Sequence);   // between the forward and its backward
        Assert.That(model.Dropout.Training, Is.True, "the cache restores the dropout setting");
        model.Backward();
        var grads = model.TrainableParameters.Select(p => ModelTestKit.Get(ops, p.Grad)).ToList();
        AssertClose(cached, full, 1e-12, "cached logits with dropout configured");
        for (int i = 0; i < grads.Count; i++)
            Assert.That(grads[i], Is.EqualTo(reference[i]), $"gradient {model.TrainableParameters[i].Name}");
    }

    [Test]
    public void CacheBytesAreTheKAndVTensorsAndAreFreedOnDispose()
    {
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandom(Config, ops, new LlamaModelOptions { ComputeDType = DType.F64 });
        model.CreateKvCache(1).Dispose(); // the model's RoPE tables (kept by the model, not the cache)
        long before = ops.Memory.AllocatedBytes;
        using (var cache = model.CreateKvCache(20))
        {
            // 2 (K, V) · 2 layers · 20 positions · (2 kv heads · 8) · 8 bytes
            Assert.That(cache.CacheBytes, Is.EqualTo(2L * 2 * 20 * 16 * 8));
            Assert.That(LlamaKvCache.BytesFor(Config, 20, DType.F64), Is.EqualTo(cache.CacheBytes));
            Assert.That(ops.Memory.AllocatedBytes - before, Is.EqualTo(cache.CacheBytes));
            cache.Forward([1, 2, 3], new double[Config.VocabSize]);
            Assert.That(ops.Memory.AllocatedBytes - before, Is.EqualTo(cache.CacheBytes + cache.WorkspaceBytes));
        }
        Assert.That(ops.Memory.AllocatedBytes, Is.EqualTo(before));
    }

    [Test]
    public void OverflowAndBadIdsAreRejected()
    {
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandom(Config, ops, new LlamaModelOptions());
        Assert.Throws<ArgumentOutOfRangeException>(() => model.CreateKvCache(Config.MaxPositionEmbeddings + 1));
        using var cache = model.CreateKvCache(4);
        var logits = new double[Config.VocabSize];
        Assert.Throws<ArgumentOutOfRangeException>(() => cache.Forward([1, 2, 3, 4, 5], logits));
        Assert.Throws<ArgumentOutOfRangeException>(() => cache.Forward([Config.VocabSize], logits));
        cache.Forward([1, 2, 3, 4], logits);
        Assert.Throws<ArgumentOutOfRangeException>(() => cache.Forward([1], logits));
        cache.Reset();
        var again = new double[Config.VocabSize];
        cache.Forward([1, 2, 3, 4], again);
        Assert.That(again, Is.EqualTo(logits), "after Reset the same prompt gives the same logits");
    }
}

/// <summary>The KV cache on GpuOps (emulator always, CUDA when present) against the CPU full forward, F32.</summary>
[TestFixture("emulator")]
[TestFixture("cuda")]
public class KvCacheDeviceTests(string device)
{
    private GpuOps _gpu = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _gpu = TestGpus.CreateOps(device);
    }

    [OneTimeTearDown]
    public void TearDown() => _gpu?.Dispose();

    public static IEnumerable<TestCaseData> Options()
    {
        var lora = new LoraSettings { Rank = 3, Alpha = 6, TargetModules = LoraSettings.KnownTargets };
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora }).SetArgDisplayNames("lora");
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora, Quantization = BaseQuantization.Nf4, Blocksize = 32 }).SetArgDisplayNames("qlora-nf4");
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora, BaseWeightDType = DType.BF16 }).SetArgDisplayNames("lora-bf16-base");
    }

    [TestCaseSource(nameof(Options))]
    public void CachedStepsOnTheDeviceMatchTheCpuFullForward(LlamaModelOptions options)
    {
        var config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 48, HeadDim = 8, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 23 };
        int[] ids = [3, 7, 1, 10, 4, 0, 9, 2, 5, 8, 22, 13, 6, 17, 11, 19, 12];
        using var cpuOps = new CpuOps();
        using var cpu = LlamaModel.CreateRandom(config, cpuOps, options, weightSeed: 3, std: 0.3);
        ModelTestKit.RandomizeLoraB(cpu, 5);
        using var dev = LlamaModel.CreateRandom(config, _gpu, options, weightSeed: 3, std: 0.3);
        ModelTestKit.RandomizeLoraB(dev, 5);
        var full = KvCacheTests.FullLogits(cpu, ids);
        var cached = KvCacheTests.CachedLogits(dev, ids);
        KvCacheTests.AssertClose(cached, full, 1e-4, $"{device} cached vs CPU full logits");
        // And against the device's own full forward (same kernels: tighter).
        KvCacheTests.AssertClose(cached, KvCacheTests.FullLogits(dev, ids), 1e-5, $"{device} cached vs {device} full logits");
    }

    public static IEnumerable<TestCaseData> Bf16Options()
    {
        var lora = new LoraSettings { Rank = 3, Alpha = 6, TargetModules = LoraSettings.KnownTargets };
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora, ComputeDType = DType.BF16 }).SetArgDisplayNames("lora-bf16");
        yield return new TestCaseData(new LlamaModelOptions { Lora = lora, ComputeDType = DType.BF16, Quantization = BaseQuantization.Nf4, Blocksize = 32 }).SetArgDisplayNames("qlora-nf4-bf16");
    }

    /// <summary>
    /// Mixed precision (bf16 activations and K/V, fp32 adapters, fp32 logits): the cached steps against the device's own
    /// BF16 full forward within 0.02 of the largest logit (the same roundings but for the attention's summation order and
    /// the one-row GEMMs), and against the CPU's F64 full forward within 0.1 (measured 0.055 and 0.080: bf16 rounds at
    /// 2⁻⁸ relative per op, and this std-0.3 model with random lora_B amplifies it more than Bf16ComputeParityTests'
    /// model, whose bound is 0.05; the device's BF16 full forward deviates from F64 by the same amount).
    /// </summary>
    [TestCaseSource(nameof(Bf16Options))]
    public void Bf16CachedStepsMatchTheFullForward(LlamaModelOptions options)
    {
        var config = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 48, HeadDim = 8, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 23 };
        int[] ids = [3, 7, 1, 10, 4, 0, 9, 2, 5, 8, 22, 13, 6, 17, 11, 19, 12];
        using var cpuOps = new CpuOps();
        using var cpu = LlamaModel.CreateRandom(config, cpuOps, options with { ComputeDType = DType.F64 }, weightSeed: 3, std: 0.3);
        ModelTestKit.RandomizeLoraB(cpu, 5);
        using var dev = LlamaModel.CreateRandom(config, _gpu, options, weightSeed: 3, std: 0.3);
        ModelTestKit.RandomizeLoraB(dev, 5);
        var cached = KvCacheTests.CachedLogits(dev, ids);
        KvCacheTests.AssertClose(cached, KvCacheTests.FullLogits(dev, ids), 0.02, $"{device} bf16 cached vs {device} bf16 full logits");
        KvCacheTests.AssertClose(cached, KvCacheTests.FullLogits(cpu, ids), 0.1, $"{device} bf16 cached vs CPU f64 full logits");
    }
}
