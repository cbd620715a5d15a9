using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>`nativepeft train` on Alpaca data whose prompts are longer than --seq (the built-in model, default --seq 128).</summary>
[Parallelizable(ParallelScope.None)]
public class TruncationCliTests
{
    [Test]
    public void EveryPromptLongerThanSeqStopsNamingTheSeqThatFits()
    {
        using var dir = CliProcess.TempDir();
        string data = TruncationTests.WriteAlpaca(dir, 3, 0);
        var r = CliProcess.Run("train", "--model", "builtin", "--data", data, "--out", dir["out"], "--steps", "2", "--batch", "1");
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stdout + r.Stderr, Does.Contain("--seq 128: ").And.Contain("a sequence length of"));
        Assert.That(r.Stdout, Does.Not.Contain("loss NaN"));
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
    }

    [Test]
    public void SomePromptsLongerThanSeqAreWarnedAndTheirStepsSkippedNotNaN()
    {
        using var dir = CliProcess.TempDir();
        string data = TruncationTests.WriteAlpaca(dir, 2, 2);
        var r = CliProcess.Run("train", "--model", "builtin", "--data", data, "--out", dir["out"], "--batch", "1", "--rank", "4", "--seq", "200");
        Assert.That(r.ExitCode, Is.Zero, r.ToString());
        int warning = r.Stdout.IndexOf("warning: 2 of 4 training examples", StringComparison.Ordinal);
        Assert.That(warning, Is.GreaterThanOrEqualTo(0), r.ToString());
        Assert.That(warning, Is.LessThan(r.Stdout.IndexOf("step 1/4", StringComparison.Ordinal)), "reported before the first step");
        Assert.That(r.Stdout, Does.Not.Contain("NaN"));
        Assert.That(r.Stdout, Does.Contain("skipped: no trainable token"));
    }
}
