using NativePeft.Distributed;
using NativePeft.Planning;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Distributed;

/// <summary>The embedding API with <see cref="FineTuneOptions.Distributed"/>: ranks as threads over the TcpCommunicator.</summary>
public class FineTuneDistributedTests
{
    private static FineTuneOptions Options(string outDir, int accum) => new()
    {
        Model = "builtin", Data = "builtin", Method = FineTuneMethod.Lora, Steps = 3, BatchSize = 4, GradAccum = accum, SeqLen = 24,
        ExactMatchSamples = 2, EvalBatches = 1, OutputDir = outDir,
    };

    [Test]
    public void TwoRanksThroughFineTuneTrainTheOneRankRunAndOnlyRankZeroWrites()
    {
        using var dir = CliProcess.TempDir();
        double[] one;
        using (var run = FineTune.Create(Options(dir["one"], accum: 2)))
        {
            run.Train();
            one = run.Trainer!.StepHistory.Select(s => s.Loss).ToArray();
        }
        int port = CommTestRanks.FreePort();
        var two = CommTestRanks.Run(2, r =>
        {
            using var run = FineTune.Create(Options(dir["two"], accum: 1) with { Distributed = CommTestRanks.Options(r, 2, port, 30) });
            var result = run.Train();
            return (Losses: run.Trainer!.StepHistory.Select(s => s.Loss).ToArray(), result.FinalOutput);
        });
        foreach (var (losses, output) in two)
        {
            Assert.That(losses, Has.Length.EqualTo(one.Length));
            for (int k = 0; k < one.Length; k++) Assert.That(losses[k], Is.EqualTo(one[k]).Within(1e-7 * Math.Abs(one[k])), $"step {k + 1}");
            Assert.That(output, Is.EqualTo(Path.Combine(dir["two"], "adapter")));
        }
        Assert.That(File.Exists(Path.Combine(dir["two"], "adapter", "adapter_model.safetensors")));
    }

    [Test]
    public void BadDistributedSettingsNameTheOption()
    {
        using var dir = CliProcess.TempDir();
        FineTuneException Throws(FineTuneOptions o) => Assert.Throws<FineTuneException>(() => FineTune.Create(o).Dispose())!;
        var ok = Options(dir["out"], 1);
        Assert.That(Throws(ok with { OutputDir = null, Distributed = new DistributedOptions { WorldSize = 2 } }).Option, Is.EqualTo("OutputDir"));
        var e = Throws(ok with { Distributed = new DistributedOptions { WorldSize = 2, Rank = 2 } });
        Assert.That(e.Option, Is.EqualTo("Distributed"));
        Assert.That(e.Message, Does.Contain("Rank 2"));
        Assert.That(Throws(ok with { Distributed = new DistributedOptions { WorldSize = 2, Backend = "mpi" } }).Message, Does.Contain("Backend mpi"));
        Assert.That(Throws(ok with { Distributed = new DistributedOptions { WorldSize = 2, Backend = "nccl" } }).Message, Does.Contain("nccl"));
    }
}
