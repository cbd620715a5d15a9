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
}
