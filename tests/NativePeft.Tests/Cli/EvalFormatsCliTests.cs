using System.Text.Json;
using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>`nativepeft eval` reads every format `train` reads; empty data files are errors in eval and train.</summary>
[Parallelizable(ParallelScope.None)]
public class EvalFormatsCliTests
{
    private static long Tokens(params string[] args)
    {
        var r = CliProcess.Run(["eval", "--model", "builtin", .. args, "--json"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        Assert.That(double.IsFinite(doc.RootElement.GetProperty("loss").GetDouble()));
        return doc.RootElement.GetProperty("tokens").GetInt64();
    }

    [Test]
    public void EvalReadsAlpacaTextJsonlAndPlainText()
    {
        using var dir = CliProcess.TempDir();
        // Alpaca: the loss is on the response only ("0", "1", "2" and eos: 2 targets each), as in training.
        Assert.That(Tokens("--data", TruncationTests.WriteAlpaca(dir, 0, 3)), Is.EqualTo(6));
        File.WriteAllLines(dir["text.jsonl"], ["{\"text\": \"hello world\"}", "{\"text\": \"more words\"}"]);
        Assert.That(Tokens("--data", dir["text.jsonl"]), Is.GreaterThan(10));
        File.WriteAllText(dir["plain.txt"], "a plain text file, packed into sequences of --seq tokens.");
        Assert.That(Tokens("--data", dir["plain.txt"], "--seq", "16"), Is.GreaterThan(40));
    }

    [Test]
    public void EmptyDataFilesAreErrors()
    {
        using var dir = CliProcess.TempDir();
        File.WriteAllText(dir["empty.jsonl"], "\n");
        var r = CliProcess.Run("eval", "--model", "builtin", "--data", dir["empty.jsonl"]);
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stderr, Does.Contain("--data").And.Contain("empty"), r.ToString());

        string data = TruncationTests.WriteAlpaca(dir, 0, 3);
        r = CliProcess.Run("train", "--model", "builtin", "--data", data, "--eval-data", dir["empty.jsonl"], "--out", dir["out"], "--steps", "1");
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stderr, Does.Contain("--eval-data").And.Contain("empty"), r.ToString());
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
    }
}
