using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>`nativepeft pretrain` (<see cref="Pretrain"/>): determinism from the seed, a loadable HF folder, the corpus.</summary>
[Parallelizable(ParallelScope.None)]
public class PretrainTests
{
    /// <summary>A very small model and a few steps: enough to check determinism and the output folder.</summary>
    private static PretrainOptions Tiny(int seed) => new()
    {
        Seed = seed, Steps = 6, Layers = 2, Hidden = 32, Heads = 4, KvHeads = 2, Intermediate = 64, SeqLen = 32, BatchSize = 4,
        CorpusLines = 200, EvalLines = 16,
    };

    private static Dictionary<string, byte[]> Weights(string dir)
    {
        using var ck = HfCheckpoint.Open(dir);
        return ck.TensorNames.ToDictionary(n => n, n => ck.GetBytes(n).ToArray());
    }

    [Test]
    public void SameSeedGivesIdenticalWeightsAndADifferentSeedDiffers()
    {
        using var dir = CliProcess.TempDir();
        var a = Pretrain.Run(Tiny(0), dir["a"]);
        Pretrain.Run(Tiny(0), dir["b"]);
        Pretrain.Run(Tiny(1), dir["c"]);
        var wa = Weights(dir["a"]);
        var wb = Weights(dir["b"]);
        var wc = Weights(dir["c"]);
        Assert.That(wa.Keys, Is.EquivalentTo(wb.Keys));
        foreach (var (name, bytes) in wa)
            Assert.That(wb[name], Is.EqualTo(bytes), name);
        Assert.That(wa.Any(kv => !kv.Value.SequenceEqual(wc[kv.Key])), Is.True, "a different seed gave the same weights");
        Assert.That(a.Steps, Is.EqualTo(6));
        Assert.That(double.IsFinite(a.FinalLoss), Is.True);
        Assert.That(a.EvalLoss, Is.Not.Null);
    }

    [Test]
    public void WritesALoadableBf16FolderWithTheByteTokenizerAndMetrics()
    {
        using var dir = CliProcess.TempDir();
        var r = Pretrain.Run(Tiny(3), dir["m"]);
        Assert.That(File.Exists(Path.Combine(dir["m"], "tokenizer_config.json")), Is.True);
        Assert.That(File.Exists(Path.Combine(dir["m"], Pretrain.MetricsFileName)), Is.True);
        Assert.That(Directory.EnumerateDirectories(dir["m"]), Is.Empty, "the trainer's work folder was left behind");
        Assert.That(TokenizerLoader.FromFolder(dir["m"]), Is.SameAs(ByteTokenizer.Instance));
        using var ck = HfCheckpoint.Open(dir["m"]);
        Assert.That(ck.Config, Is.EqualTo(Tiny(3).Config()));
        Assert.That(ck.TensorNames.Select(n => ck.GetInfo(n).DType).Distinct(), Is.EqualTo(new[] { Numerics.DType.BF16 }));
        Assert.That(r.Parameters, Is.EqualTo(ck.Config.ParameterCount()));
        using var ops = new CpuOps();
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions());
        var ids = ByteTokenizer.Instance.Encode("copy: abc\nabc", addBos: true);
        double loss = model.Forward(ids, ids, 1, ids.Length);
        Assert.That(double.IsFinite(loss), Is.True);
        Assert.Throws<IOException>(() => Pretrain.Run(Tiny(3), dir["m"]), "writing over a checkpoint");
    }

    [Test]
    public void CorpusHasOnlyCopyLinesInBothCasesAndNeverTheTask()
    {
        var corpus = Pretrain.Corpus(0, 2000, copyShare: 1.0, capitalCopyShare: 0.5);
        Assert.That(corpus.All(l => l.StartsWith("copy: ", StringComparison.Ordinal)), Is.True);
        int capitals = corpus.Count(l => l[6] is >= 'A' and <= 'Z');
        Assert.That(capitals, Is.InRange(corpus.Count * 4 / 10, corpus.Count * 6 / 10));
        foreach (var line in corpus)
        {
            var parts = line["copy: ".Length..].Split('\n');
            Assert.That(parts, Has.Length.EqualTo(2));
            Assert.That(parts[1], Is.EqualTo(parts[0]), "a copy line must copy exactly (never change case or order)");
            Assert.That(line, Does.Not.Contain("upper:").And.Not.Contain("reverse:"));
        }
        // the default share keeps the words too
        var mixed = Pretrain.Corpus(0, 2000, copyShare: 0.8);
        double share = mixed.Count(l => l.StartsWith("copy: ", StringComparison.Ordinal)) / (double)mixed.Count;
        Assert.That(share, Is.EqualTo(0.8).Within(0.01));
    }

    [Test]
    public void BadOptionsNameTheOption()
    {
        var e = Assert.Throws<OptionException>(() => Pretrain.Run(Tiny(0) with { Hidden = 30 }, Path.GetTempPath()));
        Assert.That(e!.Option, Is.EqualTo(nameof(PretrainOptions.Hidden)));
        Assert.That(e.ParamName, Is.EqualTo(nameof(PretrainOptions.Hidden)));
        var e2 = Assert.Throws<OptionException>(() => Pretrain.Run(Tiny(0) with { Steps = 0 }, Path.GetTempPath()));
        Assert.That(e2!.Option, Is.EqualTo(nameof(PretrainOptions.Steps)));
        Assert.That(e2.Detail, Is.EqualTo("0: must be positive"));
    }
}

/// <summary>`nativepeft pretrain` as a user runs it.</summary>
[Parallelizable(ParallelScope.None)]
public class PretrainCliTests
{
    [Test]
    public void PretrainWritesAModelThatTrainAccepts()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run("pretrain", "--out", dir["m"], "--steps", "4", "--layers", "1", "--hidden", "32", "--heads", "4",
            "--kv-heads", "2", "--intermediate", "64", "--seq", "32", "--batch", "4", "--corpus-lines", "100");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("step 4/4").And.Contain("wrote"));
        var t = CliProcess.Run("train", "--model", dir["m"], "--data", "builtin", "--steps", "1", "--rank", "4", "--batch", "4", "--seq", "24",
            "--out", dir["t"]);
        Assert.That(t.ExitCode, Is.EqualTo(0), t.ToString());

        var bad = CliProcess.Run("pretrain", "--out", dir["bad"], "--hidden", "30");
        Assert.That(bad.ExitCode, Is.Not.EqualTo(0));
        Assert.That(bad.Stderr, Does.Contain("--hidden"));
        Assert.That(Directory.Exists(dir["bad"]), Is.False);
    }
}
