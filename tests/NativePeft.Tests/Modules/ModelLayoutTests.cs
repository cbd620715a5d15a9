using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// The model against its layout table (<see cref="ModelLayout"/>): a tiny model is built on CpuOps and on GpuOps over
/// the emulator for every way of holding its weights, runs a forward and a backward (and a KV cache a prefill), and the
/// tensors it holds must be the table's — no tensor the table does not list (by name, dtype, shape, arena), every
/// listed tensor allocated, in the table's order — and the allocator's own count of bytes in use (which sees every
/// allocation, named or not) must equal the table's sum.
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulator")]
[Parallelizable(ParallelScope.None)]
public class ModelLayoutTests(string device)
{
    /// <summary>2 layers, hidden 64, GQA (4 heads, 2 kv heads), intermediate 96, vocab 300.</summary>
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 64, IntermediateSize = 96, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
        NumHiddenLayers = 2, VocabSize = 300, MaxPositionEmbeddings = 128, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    private const int B = 2, T = 5;

    private static readonly LoraSettings Lora = new() { Rank = 4, Alpha = 8, TargetModules = LoraSettings.KnownTargets };

    public static IEnumerable<TestCaseData> Models()
    {
        TestCaseData Case(string name, LlamaModelOptions o, bool tied = false) => new TestCaseData(o, tied).SetArgDisplayNames(name);
        foreach (var dtype in new[] { DType.F32, DType.BF16 })
        {
            string d = dtype == DType.F32 ? "-f32" : "-bf16";
            yield return Case("full" + d, new LlamaModelOptions { ComputeDType = dtype, FullFineTuning = true });
            yield return Case("full-recompute-tied" + d, new LlamaModelOptions { ComputeDType = dtype, FullFineTuning = true, Recompute = true }, tied: true);
            yield return Case("lora" + d, new LlamaModelOptions { ComputeDType = dtype, Lora = Lora });
            yield return Case("lora-bf16base" + d, new LlamaModelOptions { ComputeDType = dtype, Lora = Lora, BaseWeightDType = DType.BF16 });
            yield return Case("qlora-nf4-dq-recompute" + d, new LlamaModelOptions
            {
                ComputeDType = dtype, Lora = Lora, Quantization = BaseQuantization.Nf4, DoubleQuant = true, Recompute = true,
            });
            yield return Case("qlora-fp4-qv-embedding-host" + d, new LlamaModelOptions
            {
                ComputeDType = dtype, Lora = Lora with { TargetModules = ["q_proj", "v_proj"] }, Quantization = BaseQuantization.Fp4,
                DoubleQuant = false, EmbeddingOnHost = true,
            });
        }
        yield return Case("no-adapter-frozen-f32", new LlamaModelOptions());
    }

    private IOps CreateOps(LlamaModelOptions options)
    {
        if (device == "cpu")
        {
            if (options.ComputeDType == DType.BF16) Assert.Ignore("BF16 compute runs on the GPU ops only");
            return new CpuOps();
        }
        return new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
    }

    private static LlamaConfig ConfigFor(bool tied) => tied ? Config with { TieWordEmbeddings = true } : Config;

    private static (int[] Ids, int[] Labels) Batch()
    {
        var rng = new Random(5);
        var ids = new int[B * T];
        for (int i = 0; i < ids.Length; i++) ids[i] = rng.Next(Config.VocabSize);
        return (ids, (int[])ids.Clone());
    }

    /// <summary>(name, category, arena, dtype, shape) as one comparable string.</summary>
    private static string Key(TensorSpec t) => $"{t.Name} {t.Category} {t.Region} {t.DType} [{string.Join(",", t.Shape)}]";

    /// <summary>The table for the model's options: parameters, RoPE tables for T, activations for (B, T).</summary>
    private static List<TensorSpec> Table(LlamaModel model) =>
    [
        .. ModelLayout.Parameters(model.Config, model.LayoutOptions),
        .. ModelLayout.RopeTables(model.Config, model.LayoutOptions, T),
        .. ModelLayout.Activations(model.Config, model.LayoutOptions, B, T),
    ];

    private static LlamaModel Trained(LlamaConfig config, IOps ops, LlamaModelOptions options)
    {
        var model = LlamaModel.CreateRandom(config, ops, options);
        var (ids, labels) = Batch();
        model.Forward(ids, labels, B, T);
        if (model.TrainableParameters.Count > 0) model.Backward();
        return model;
    }

    [TestCaseSource(nameof(Models))]
    public void ModelAllocatesNoTensorTheTableDoesNotList(LlamaModelOptions options, bool tied)
    {
        using var ops = CreateOps(options);
        using var model = Trained(ConfigFor(tied), ops, options);
        var table = Table(model).Select(Key).ToHashSet();
        var unlisted = model.AllocatedTensors.Select(Key).Where(k => !table.Contains(k)).ToList();
        Assert.That(unlisted, Is.Empty, "tensors the model allocated that its layout table does not list");
        // The allocator counts every allocation, whoever makes it and whatever it is called: what the model holds after a
        // step (the ops' workspaces are freed inside each op) is exactly the table.
        long tableBytes = Table(model).Sum(t => t.Bytes());
        Assert.That(ops.Memory.AllocatedBytes, Is.EqualTo(tableBytes), "bytes in use after forward + backward vs the table's sum");
        Assert.That(model.ParameterBytes, Is.EqualTo(ModelLayout.Parameters(model.Config, model.LayoutOptions).SumBytes()));
        Assert.That(model.ActivationBytes, Is.EqualTo(ModelLayout.Activations(model.Config, model.LayoutOptions, B, T).SumBytes()));
    }

    [TestCaseSource(nameof(Models))]
    public void ModelAllocatesEveryTableEntryInOrder(LlamaModelOptions options, bool tied)
    {
        using var ops = CreateOps(options);
        using var model = Trained(ConfigFor(tied), ops, options);
        var allocated = model.AllocatedTensors.Select(Key).ToList();
        var missing = Table(model).Select(Key).Where(k => !allocated.Contains(k)).ToList();
        Assert.That(missing, Is.Empty, "tensors of the layout table the model did not allocate");
        // Parameters, RoPE tables, activations: each arena in the table's order (the pool fills them in this order).
        Assert.That(allocated, Is.EqualTo(Table(model).Select(Key).ToList()));
    }

    [Test]
    public void TableMatchesHandCountedTensorsOfALoraModel()
    {
        // Independent count: 2 layers × (2 norms + 7 projections, each with A, B and their gradients) + embed, norm,
        // lm_head; activations 3 ids + 3 hidden + 2 × 13 block tensors + 3 + 9 backward buffers + xa, dxa.
        var options = ModelLayoutOptions.For(new LlamaModelOptions { Lora = Lora });
        var parameters = ModelLayout.Parameters(Config, options);
        Assert.That(parameters, Has.Count.EqualTo(3 + 2 * (2 + 7 * 5)));
        Assert.That(ModelLayout.Activations(Config, options, B, T), Has.Count.EqualTo(3 + 3 + 2 * 13 + 3 + 9 + 2));
        // q_proj's adapter: A [4, 64] and B [64, 4] in F32, 1024 bytes each; the embedding 300 × 64 × 4 bytes.
        var a = parameters.Single(t => t.Name == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
        Assert.That((a.Category, a.DType, a.Bytes()), Is.EqualTo((TensorCategory.Adapters, DType.F32, 1024L)));
        Assert.That(parameters.Single(t => t.Name == "model.embed_tokens.weight").Bytes(), Is.EqualTo(300L * 64 * 4));
        // xa of the q, k, v group: N × (3 · 4) elements; the 256-byte alignment rounds 10 · 12 · 4 = 480 bytes to 512.
        var xa = ModelLayout.Activations(Config, options, B, T).Single(t => t.Name == "lora.xa");
        Assert.That((xa.Count, xa.Bytes(), xa.Bytes(256)), Is.EqualTo((120L, 480L, 512L)));
    }

    [TestCase(5, 9)]
    [TestCase(20, 3)]
    public void KvCacheAllocatesItsTable(int prompt, int newTokens)
    {
        var options = new LlamaModelOptions { Lora = Lora, BaseWeightDType = DType.BF16 };
        using var ops = CreateOps(options);
        using var model = LlamaModel.CreateRandom(Config, ops, options);
        long before = ops.Memory.AllocatedBytes;
        int maxLength = prompt + newTokens;
        using var cache = model.CreateKvCache(maxLength);
        long ropeBytes = ops.Memory.AllocatedBytes - before - cache.CacheBytes;
        var tokens = Enumerable.Range(1, prompt).ToArray();
        cache.Forward(tokens, new double[Config.VocabSize]);
        int capacity = Math.Max(prompt, Math.Min(maxLength, 16));
        var table = ModelLayout.KvCache(Config, model.LayoutOptions, maxLength)
            .Concat(ModelLayout.CacheWorkspace(Config, model.LayoutOptions, capacity, 1)).Select(Key).ToList();
        Assert.That(cache.AllocatedTensors.Select(Key).ToList(), Is.EqualTo(table));
        Assert.That(ropeBytes, Is.EqualTo(ModelLayout.RopeTables(Config, model.LayoutOptions, maxLength).SumBytes()));
        Assert.That(ops.Memory.AllocatedBytes - before - ropeBytes,
            Is.EqualTo(ModelLayout.KvCache(Config, model.LayoutOptions, maxLength).SumBytes()
                       + ModelLayout.CacheWorkspace(Config, model.LayoutOptions, capacity, 1).SumBytes()));
    }
}
