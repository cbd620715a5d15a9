using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>`nativepeft train --resume` with another --method than the checkpoint's.</summary>
[Parallelizable(ParallelScope.None)]
public class ResumeMethodCliTests
{
    [Test]
    public void ResumeRefusesAnotherMethodNamingWhatChanged()
    {
        using var dir = CliProcess.TempDir();
        string[] common = ["train", "--model", "builtin", "--data", "builtin", "--seq", "24", "--batch", "4", "--rank", "4", "--save-every", "2"];
        var first = CliProcess.Run([.. common, "--method", "qlora", "--steps", "2", "--out", dir["q"]]);
        Assert.That(first.ExitCode, Is.Zero, first.ToString());
        var r = CliProcess.Run([.. common, "--method", "lora", "--steps", "4", "--resume", Path.Combine(dir["q"], "checkpoint-2"), "--out", dir["l"]]);
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stderr, Does.Contain("--resume").And.Contain("method qlora -> lora"), r.ToString());
    }

    /// <summary>Another --seed (and --batch) than the checkpoint's: refused, naming both (the seed used to be ignored
    /// while metrics.json recorded the new one).</summary>
    [Test]
    public void ResumeRefusesAnotherSeedAndBatchNamingThem()
    {
        using var dir = CliProcess.TempDir();
        string[] common = ["train", "--model", "builtin", "--data", "builtin", "--seq", "24", "--rank", "4", "--save-every", "2", "--steps", "3"];
        var first = CliProcess.Run([.. common, "--batch", "4", "--seed", "1", "--out", dir["a"]]);
        Assert.That(first.ExitCode, Is.Zero, first.ToString());
        var r = CliProcess.Run([.. common, "--batch", "2", "--seed", "2", "--resume", Path.Combine(dir["a"], "checkpoint-2"), "--out", dir["b"]]);
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stderr, Does.StartWith("error: --resume").And.Contain("seed 1 -> 2").And.Contain("batch 4 -> 2"), r.ToString());
        Assert.That(Directory.Exists(dir["b"]), Is.False, "nothing written");
    }
}
