using System.Text.Json;
using NativePeft.Cli;
using NativePeft.IO;
using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// train, eval, compare and generate on a model folder with config.json and weights but no tokenizer files
/// (vocab_size 300, above the byte tokenizer's 259): pre-tokenized data needs no tokenizer, text does.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class NoTokenizerCliTests
{
    private static (int Exit, string Stdout, string Stderr) InProcess(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int exit = Program.Run(args, stdout, stderr);
        return (exit, stdout.ToString(), stderr.ToString());
    }

    [Test]
    public void TrainAndEvalTakePreTokenizedIdsUpToTheModelsVocabSize()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"]);
        string data = NoTokenizerKit.WriteData(dir["data.jsonl"]);
        var r = CliProcess.Run("train", "--model", model, "--data", data, "--out", dir["out"], "--steps", "2", "--batch", "2", "--seq", "16", "--rank", "4", "--alpha", "8");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("step 2/2"));
        var adapter = PeftAdapter.Load(Path.Combine(dir["out"], "adapter"));
        Assert.That(adapter.Config.R, Is.EqualTo(4));

        // eval with the adapter just trained on the same folder: it runs (the loss is a number, every id counted)
        long tokens = File.ReadAllLines(data).Sum(l => l.Split(',').Length - 1);
        var ev = CliProcess.Run("eval", "--model", model, "--adapter", Path.Combine(dir["out"], "adapter"), "--data", data, "--json");
        Assert.That(ev.ExitCode, Is.EqualTo(0), ev.ToString());
        using (var doc = JsonDocument.Parse(ev.Stdout))
        {
            Assert.That(doc.RootElement.GetProperty("tokens").GetInt64(), Is.EqualTo(tokens));
            Assert.That(doc.RootElement.GetProperty("loss").GetDouble(), Is.GreaterThan(0).And.LessThan(20));
        }

        // a zero model's eval loss is ln(300) whatever the ids (hand-computed: all logits 0)
        string zero = NoTokenizerKit.WriteModel(dir["zero"], zero: true);
        var z = CliProcess.Run("eval", "--model", zero, "--data", data, "--json");
        Assert.That(z.ExitCode, Is.EqualTo(0), z.ToString());
        using (var doc = JsonDocument.Parse(z.Stdout))
            Assert.That(doc.RootElement.GetProperty("loss").GetDouble(), Is.EqualTo(Math.Log(300)).Within(1e-5));
    }

    [Test]
    public void AnIdEqualToVocabSizeFailsNamingTheFileLineAndId()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"]);
        string bad = NoTokenizerKit.WriteData(dir["bad.jsonl"], badLine: 2);

        var r = CliProcess.Run("train", "--model", model, "--data", bad, "--out", dir["out"], "--steps", "2", "--batch", "2", "--seq", "16");
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        Assert.That(r.Stderr, Does.Contain("--data").And.Contain("bad.jsonl:2:").And.Contain("= 300 is outside the vocabulary [0, 300)"), r.ToString());
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing half-written");

        var ev = CliProcess.Run("eval", "--model", model, "--data", bad);
        Assert.That(ev.ExitCode, Is.EqualTo(1), ev.ToString());
        Assert.That(ev.Stderr, Does.Contain("bad.jsonl").And.Contain("line 2").And.Contain("= 300 is outside the vocabulary [0, 300)"), ev.ToString());

        string good = NoTokenizerKit.WriteData(dir["good.jsonl"]);
        var c = InProcess("compare", "--model", model, "--data", good, "--eval-data", bad, "--methods", "lora", "--steps", "2", "--batch", "2", "--seq", "16", "--out", dir["cmp"]);
        Assert.That(c.Exit, Is.EqualTo(1), c.Stdout + c.Stderr);
        Assert.That(c.Stderr, Does.Contain("--eval-data").And.Contain("bad.jsonl:2:").And.Contain("= 300 "), c.Stderr);
        Assert.That(Directory.Exists(dir["cmp"]), Is.False, "nothing half-written");
    }

    [Test]
    public void CompareRunsOnPreTokenizedDataWithoutATokenizer()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"]);
        var r = InProcess("compare", "--model", model, "--data", NoTokenizerKit.WriteData(dir["train.jsonl"]), "--eval-data", NoTokenizerKit.WriteData(dir["eval.jsonl"], 4),
            "--methods", "lora,qlora", "--steps", "2", "--batch", "2", "--seq", "16", "--out", dir["cmp"]);
        Assert.That(r.Exit, Is.EqualTo(0), r.Stdout + r.Stderr);
        Assert.That(r.Stdout, Does.Contain("vocab 300"));
        Assert.That(File.Exists(Path.Combine(dir["cmp"], "report.md")));
        Assert.That(File.Exists(Path.Combine(dir["cmp"], "qlora", "adapter", "adapter_model.safetensors")));
    }

    [Test]
    public void TextNeedsATokenizerAndTheMessageNamesTheMissingFiles()
    {
        using var dir = CliProcess.TempDir();
        string model = NoTokenizerKit.WriteModel(dir["model"]);
        File.WriteAllLines(dir["text.jsonl"], ["{\"text\": \"hello world\"}", "{\"text\": \"bye\"}"]);

        var t = CliProcess.Run("train", "--model", model, "--data", dir["text.jsonl"], "--out", dir["out"], "--steps", "1");
        Assert.That(t.ExitCode, Is.EqualTo(1), t.ToString());
        Assert.That(t.Stderr, Does.Contain($"--model {model}").And.Contain("tokenizer.json or tokenizer.model").And.Contain("text.jsonl"), t.ToString());
        Assert.That(Directory.Exists(dir["out"]), Is.False);

        var g = InProcess("generate", "--model", model, "--prompt", "hi", "--max-tokens", "2");
        Assert.That(g.Exit, Is.EqualTo(1), g.Stdout + g.Stderr);
        Assert.That(g.Stderr, Does.Contain("generate").And.Contain("tokenizer.json or tokenizer.model").And.Contain(model).And.Not.Contain("pre-tokenized"), g.Stderr);
        Assert.That(g.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1), "one line, no stack trace");
    }
}
