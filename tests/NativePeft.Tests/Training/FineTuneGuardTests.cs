using NativePeft.Planning;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>The library guards what the CLI guards: an earlier run's output folder, a resume with another method.</summary>
[Parallelizable(ParallelScope.None)]
public class FineTuneGuardTests
{
    private static FineTuneOptions Small(string outDir) =>
        new() { Data = "builtin", Method = FineTuneMethod.Qlora, Steps = 2, SaveEvery = 2, BatchSize = 4, SeqLen = 24, OutputDir = outDir };

    [Test]
    public void AnOutputDirWithAnEarlierRunIsRefusedBeforeTraining()
    {
        using var dir = CliProcess.TempDir();
        using (var first = FineTune.Create(Small(dir["out"]))) first.Train();
        string metrics = Path.Combine(dir["out"], Trainer.MetricsFileName);
        string before = File.ReadAllText(metrics);
        var e = Assert.Throws<FineTuneException>(() => FineTune.Create(Small(dir["out"])).Dispose())!;
        Assert.That(e.Option, Is.EqualTo("OutputDir"));
        Assert.That(e.Detail, Does.Contain("exists and is not empty"));
        Assert.That(File.ReadAllText(metrics), Is.EqualTo(before), "the earlier run's metrics are untouched");
    }

    [Test]
    public void ResumeRefusesAnotherMethodAndNamesWhatChanged()
    {
        using var dir = CliProcess.TempDir();
        using (var first = FineTune.Create(Small(dir["q"]))) first.Train();
        string ckpt = Path.Combine(dir["q"], "checkpoint-2");
        using var lora = FineTune.Create(Small(dir["l"]) with { Method = FineTuneMethod.Lora, Steps = 4, Lr = 1e-3, ResumeFrom = ckpt });
        var e = Assert.Throws<FineTuneException>(() => lora.Train())!;
        Assert.That(e.Option, Is.EqualTo("ResumeFrom"));
        Assert.That(e.Detail, Does.Contain("method qlora -> lora").And.Contain("lr 0.0002 -> 0.001"));

        using var same = FineTune.Create(Small(dir["q2"]) with { Steps = 4, ResumeFrom = ckpt });
        Assert.That(same.Train().Steps, Is.EqualTo(4), "the checkpoint's own method resumes");
    }
}
