using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Planning;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>
/// A model folder with config.json and weights but no tokenizer files, and vocab_size 300 (above the byte tokenizer's
/// 259, so neither the byte tokenizer nor its id range can stand in): what the first GPU run tripped over.
/// </summary>
internal static class NoTokenizerKit
{
    public const int Vocab = 300;

    public static LlamaConfig Config { get; } = TrainingKit.Config with { VocabSize = Vocab };

    /// <summary>config.json + model.safetensors: random weights, or every weight zero but the norms (ones).</summary>
    public static string WriteModel(string dir, bool zero = false, int? eosTokenId = null)
    {
        var config = Config with { EosTokenIds = eosTokenId is int e ? [e] : null };
        var rng = new Random(11);
        var tensors = config.ExpectedTensors().Select(t =>
        {
            int n = (int)t.Shape.Aggregate(1L, (a, b) => a * b);
            bool norm = t.Name.EndsWith("norm.weight", StringComparison.Ordinal);
            var v = new float[n];
            for (int i = 0; i < n; i++) v[i] = norm ? 1f : zero ? 0f : (float)(0.1 * (rng.NextDouble() * 2 - 1));
            return SafetensorsTensor.From(t.Name, t.Shape, v);
        }).ToList();
        HfCheckpoint.Write(dir, config, tensors, long.MaxValue);
        Assert.That(Directory.EnumerateFiles(dir).Select(Path.GetFileName), Has.None.StartsWith("tokenizer"), "no tokenizer files");
        return dir;
    }

    /// <summary>
    /// <paramref name="lines"/> pre-tokenized lines of 6..14 ids; every line holds vocab − 1 = 299 and ids above 259;
    /// <paramref name="badLine"/> (1-based) gets the id <paramref name="badId"/> in the middle.
    /// </summary>
    public static string WriteData(string path, int lines = 8, int? badLine = null, int badId = Vocab)
    {
        var rng = new Random(path.Length);
        File.WriteAllLines(path, Enumerable.Range(1, lines).Select(line =>
        {
            var ids = Enumerable.Range(0, rng.Next(6, 15)).Select(_ => rng.Next(200, Vocab)).ToList();
            ids[0] = Vocab - 1;
            if (line == badLine) ids[ids.Count / 2] = badId;
            return "{\"input_ids\": [" + string.Join(", ", ids) + "]}";
        }));
        return path;
    }
}

/// <summary>The embedding API (<see cref="FineTune"/>) on a model folder without a tokenizer.</summary>
[Parallelizable(ParallelScope.None)]
public class NoTokenizerTests
{
    private static FineTuneOptions Options(string model, string data, string? evalData, string output, FineTuneMethod method = FineTuneMethod.Lora) => new()
    {
        Model = model, Data = data, EvalData = evalData, Method = method, Lora = TrainingKit.Lora(),
        Steps = 3, BatchSize = 2, SeqLen = 16, Lr = 1e-2, OutputDir = output,
    };

    [Test]
    public void PreTokenizedDataTrainsWithIdsUpToTheModelsVocabSize()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"]);
        using var run = FineTune.Create(Options(model, NoTokenizerKit.WriteData(dir["train.jsonl"]), NoTokenizerKit.WriteData(dir["eval.jsonl"], 4), dir["out"]));

        Assert.That(run.Tokenizer, Is.InstanceOf<IdsOnlyTokenizer>());
        Assert.That(run.Tokenizer.VocabSize, Is.EqualTo(300), "config.json's vocab_size");
        Assert.That(run.Data!.Train.SelectMany(e => e.InputIds).Max(), Is.EqualTo(299));
        Assert.That(run.Data.Train.SelectMany(e => e.InputIds).Count(id => id >= ByteTokenizer.Size), Is.GreaterThan(8), "ids above the byte tokenizer's 259");
        var result = run.Train();
        Assert.That(result.Steps, Is.EqualTo(3));
        Assert.That(result.FinalLoss, Is.GreaterThan(0).And.LessThan(20));
        Assert.That(result.FinalEval!.Tokens, Is.GreaterThan(0));
        Assert.That(File.Exists(Path.Combine(result.FinalOutput!, "adapter_model.safetensors")));
    }

    [Test]
    public void EvalLossOfAZeroModelIsLnOfTheModelsVocabSize()
    {
        // Every weight zero but the norms: the logits are all 0, so every predicted token costs ln(300) whatever the id.
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"], zero: true);
        string data = NoTokenizerKit.WriteData(dir["data.jsonl"]);
        using var run = FineTune.Create(Options(model, data, data, dir["out"], FineTuneMethod.Full));
        var eval = run.Evaluate();
        long expectedTokens = File.ReadAllLines(data).Sum(l => l.Split(',').Length - 1); // every line predicts len − 1 ids
        Assert.That(eval.Tokens, Is.EqualTo(expectedTokens));
        Assert.That(eval.Loss, Is.EqualTo(Math.Log(300)).Within(1e-5));
    }

    [Test]
    public void AnIdEqualToVocabSizeNamesTheFileLineAndIdAndWritesNothing()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"]);
        string good = NoTokenizerKit.WriteData(dir["good.jsonl"]);
        string bad = NoTokenizerKit.WriteData(dir["bad.jsonl"], badLine: 3);

        var e = Assert.Throws<FineTuneException>(() => FineTune.Create(Options(model, bad, null, dir["out"])))!;
        Assert.That(e.Option, Is.EqualTo(nameof(FineTuneOptions.Data)));
        Assert.That(e.Detail, Does.Contain("bad.jsonl:3:").And.Contain("= 300 ").And.Contain("[0, 300)"), e.Detail);

        e = Assert.Throws<FineTuneException>(() => FineTune.Create(Options(model, good, bad, dir["out"])))!;
        Assert.That(e.Option, Is.EqualTo(nameof(FineTuneOptions.EvalData)));
        Assert.That(e.Detail, Does.Contain("bad.jsonl:3:").And.Contain("= 300 "), e.Detail);
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");

        // labels are checked against the same bound
        File.WriteAllLines(dir["labels.jsonl"], ["{\"input_ids\": [299, 1], \"labels\": [-100, 1]}", "{\"input_ids\": [299, 1], \"labels\": [-100, 300]}"]);
        e = Assert.Throws<FineTuneException>(() => FineTune.Create(Options(model, dir["labels.jsonl"], null, dir["out"])))!;
        Assert.That(e.Detail, Does.Contain("labels.jsonl:2:").And.Contain("labels[1] = 300"), e.Detail);
    }

    [Test]
    public void TextDataWithoutATokenizerNamesTheMissingFiles()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"]);
        File.WriteAllLines(dir["text.jsonl"], ["{\"text\": \"hello\"}"]);
        File.WriteAllText(dir["plain.txt"], "hello");
        foreach (var data in new[] { dir["text.jsonl"], dir["plain.txt"], BuiltinTask.DataName })
        {
            var e = Assert.Throws<FineTuneException>(() => FineTune.Create(Options(model, data, null, dir["out"])))!;
            Assert.That(e.Option, Is.EqualTo(nameof(FineTuneOptions.Model)), data);
            Assert.That(e.Detail, Does.Contain(model).And.Contain("tokenizer.json").And.Contain("tokenizer.model")
                .And.Contain(data == BuiltinTask.DataName ? "built-in task" : data).And.Contain("pre-tokenized"), e.Detail);
        }
        // pre-tokenized training data with a text eval file: the eval file is named
        var ev = Assert.Throws<FineTuneException>(() => FineTune.Create(Options(model, NoTokenizerKit.WriteData(dir["d.jsonl"]), dir["text.jsonl"], dir["out"])))!;
        Assert.That(ev.Option, Is.EqualTo(nameof(FineTuneOptions.Model)));
        Assert.That(ev.Detail, Does.Contain("text.jsonl"));
        Assert.That(Directory.Exists(dir["out"]), Is.False);
    }

    [Test]
    public void TheIdsOnlyTokenizerTakesItsSpecialIdsFromTheJsonFilesAndRefusesText()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"], eosTokenId: 297);
        File.WriteAllText(Path.Combine(model, "tokenizer_config.json"), "{\"bos_token\": \"<s>\", \"pad_token_id\": 298}");
        var tok = TokenizerLoader.ForModel(model, 300);
        Assert.That(tok, Is.InstanceOf<IdsOnlyTokenizer>());
        Assert.That((tok.VocabSize, tok.BosId, tok.EosId, tok.PadId), Is.EqualTo((300, (int?)null, (int?)297, (int?)298)),
            "eos from config.json, pad from tokenizer_config.json; a token name without a vocabulary is no id");
        var enc = Assert.Throws<FileNotFoundException>(() => tok.Encode("hi", false))!;
        Assert.That(enc.Message, Does.Contain("tokenizer.json").And.Contain("reading text"));
        Assert.Throws<FileNotFoundException>(() => tok.Decode([1, 2]));
        Assert.Throws<FileNotFoundException>(() => TokenizerLoader.FromFolder(model), "FromFolder still wants the files");
    }
}
