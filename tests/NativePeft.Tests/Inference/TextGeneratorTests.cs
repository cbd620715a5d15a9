using NativePeft.Data;
using NativePeft.Inference;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Modules;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Inference;

/// <summary>
/// <see cref="TextGenerator"/> on the shipped built-in model: greedy with the KV cache gives the same tokens as greedy by
/// repeated full forwards (<see cref="Trainer.GreedyGenerate"/>, the old path), the trainer's exact match is unchanged,
/// sampling is reproducible from the seed, and the limits hold.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class TextGeneratorTests
{
    private static LlamaModel LoadBuiltin(IOps ops, bool qlora = false) =>
        LlamaModel.Load(HfCheckpoint.Open(BuiltinModel.Require()), ops, new LlamaModelOptions
        {
            Seed = 0,
            Lora = new LoraSettings { Rank = 8, Alpha = 16, Dropout = 0.1, TargetModules = LoraSettings.KnownTargets },
            Quantization = qlora ? BaseQuantization.Nf4 : BaseQuantization.None,
            BaseWeightDType = qlora ? null : DType.BF16,
        });

    [Test]
    public void GreedyWithTheCacheEqualsGreedyByFullForwards([Values] bool qlora, [Values] bool randomAdapter)
    {
        using var ops = new CpuOps();
        using var model = LoadBuiltin(ops, qlora);
        if (randomAdapter) ModelTestKit.RandomizeLoraB(model, 3, 0.05);
        model.Dropout.Training = false;
        var tok = ByteTokenizer.Instance;
        var problems = BuiltinTask.Generate(BuiltinModel.TaskOptions).Eval.Take(8).Select(p => p.Prompt)
            .Append("copy: hello\n").Append("the quick brown fox");
        int nonEmpty = 0;
        foreach (var prompt in problems)
        {
            var ids = tok.Encode(prompt, addBos: true);
            var old = Trainer.GreedyGenerate(model, ids, 24, tok.EosId);
            var cached = TextGenerator.Greedy(model, ids, 24, tok.EosId);
            Assert.That(cached, Is.EqualTo(old), $"prompt {prompt.Replace("\n", "\\n")}");
            var viaApi = new TextGenerator(model, tok).Generate(prompt, new GenerationOptions { MaxNewTokens = 24 });
            Assert.That(viaApi.TokenIds, Is.EqualTo(old));
            Assert.That(viaApi.Text, Is.EqualTo(tok.Decode(old)));
            if (old.Length > 0) nonEmpty++;
        }
        Assert.That(nonEmpty, Is.GreaterThan(0), "the comparison must cover generated tokens");
    }

    [Test]
    public void TrainerExactMatchIsUnchangedByTheCache()
    {
        // A short LoRA run so that exact match is neither 0 nor 1, then the trainer's evaluation (KV cache) against the
        // old path (full forwards) over the same problems.
        using var dir = NativePeft.Tests.Cli.CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = LoadBuiltin(ops);
        var data = TrainingData.Builtin(BuiltinTask.Generate(BuiltinModel.TaskOptions), ByteTokenizer.Instance);
        using var trainer = new Trainer(model, data, new TrainerOptions
        {
            Steps = 200, Lr = 3e-3, BatchSize = 16, SeqLen = 24, WarmupSteps = 10, ExactMatchSamples = 60, OutputDir = dir.Path, Seed = 0,
            EvalEvery = 0, SaveEvery = 0,
        });
        trainer.Train();
        var m = trainer.Evaluate();
        model.Dropout.Training = false;
        var tok = ByteTokenizer.Instance;
        int hits = 0;
        foreach (var p in data.ExactMatchProblems!.Take(60))
        {
            var ids = tok.Encode(p.Prompt, tok.BosId is not null);
            var generated = Trainer.GreedyGenerate(model, ids, tok.Encode(p.Answer, false).Length + 1, tok.EosId);
            if (BuiltinTask.ExactMatch(generated, p.Answer, tok)) hits++;
        }
        TestContext.Out.WriteLine($"exact match after 200 steps: {m.ExactMatch:P1} (old path {hits}/60)");
        Assert.That(m.ExactMatchCount, Is.EqualTo(60));
        Assert.That(m.ExactMatch, Is.EqualTo(hits / 60.0));
        Assert.That(hits, Is.GreaterThan(5), "the run must reach some exact matches for the comparison to mean something");
    }

    [Test]
    public void SamplingIsReproducibleFromTheSeed()
    {
        using var ops = new CpuOps();
        using var model = LoadBuiltin(ops);
        var gen = new TextGenerator(model, ByteTokenizer.Instance);
        var o = new GenerationOptions { MaxNewTokens = 20, Temperature = 1.5, TopP = 0.95, Seed = 11, StopAtEos = false };
        var a = gen.Generate("copy: word\n", o);
        var b = gen.Generate("copy: word\n", o);
        Assert.That(b.TokenIds, Is.EqualTo(a.TokenIds));
        Assert.That(a.TokenIds, Has.Length.EqualTo(20));
        var others = Enumerable.Range(12, 4).Select(s => gen.Generate("copy: word\n", o with { Seed = (ulong)s }).TokenIds).ToList();
        Assert.That(others.Any(t => !t.SequenceEqual(a.TokenIds)), Is.True, "other seeds must give other samples at temperature 1.5");
        // top-k 1 at any temperature is greedy.
        var greedy = gen.Generate("copy: word\n", new GenerationOptions { MaxNewTokens = 20 });
        var k1 = gen.Generate("copy: word\n", new GenerationOptions { MaxNewTokens = 20, Temperature = 2, TopK = 1, Seed = 5 });
        Assert.That(k1.TokenIds, Is.EqualTo(greedy.TokenIds));
    }

    [Test]
    public void StreamingLimitsAndStatistics()
    {
        using var ops = new CpuOps();
        using var model = LoadBuiltin(ops);
        var gen = new TextGenerator(model, ByteTokenizer.Instance);
        var streamed = new List<int>();
        var text = new System.Text.StringBuilder();
        var r = gen.Generate("copy: apple\n", new GenerationOptions { MaxNewTokens = 7, StopAtEos = false }, (id, t) => { streamed.Add(id); text.Append(t); });
        Assert.That(r.TokenIds, Has.Length.EqualTo(7));
        Assert.That(streamed, Is.EqualTo(r.TokenIds));
        Assert.That(text.ToString(), Is.EqualTo(r.Text));
        Assert.That(r.PromptTokenIds, Is.EqualTo(ByteTokenizer.Instance.Encode("copy: apple\n", true)));
        Assert.That(r.StoppedAtEos, Is.False);
        Assert.That(r.TokensPerSecond, Is.GreaterThan(0));
        // prompt + max − 1 positions: 2 (K, V) · 4 layers · (13 + 6) · (2 · 32) · 4 bytes.
        Assert.That(r.KvCacheBytes, Is.EqualTo(2L * 4 * (13 + 7 - 1) * 64 * 4));
        Assert.That(gen.Generate("copy: apple\n", new GenerationOptions { MaxNewTokens = 0 }).TokenIds, Is.Empty);

        int context = model.Config.MaxPositionEmbeddings;
        var tooLong = new string('a', context - 10);
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => gen.Generate(tooLong, new GenerationOptions { MaxNewTokens = 64 }));
        Assert.That(e!.Message, Does.Contain($"{context - 10 + 1} tokens").And.Contain($"{context}"));
    }
}
