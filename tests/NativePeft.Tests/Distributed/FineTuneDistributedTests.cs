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
        // NCCL needs a CUDA device: refused before any rank waits for the others (a world of 1 and of 2 alike).
        foreach (int world in new[] { 1, 2 })
        {
            var nccl = Throws(ok with { Distributed = new DistributedOptions { WorldSize = world, Backend = "nccl" } });
            Assert.That((nccl.Option, nccl.Detail), Is.EqualTo(("Distributed",
                "Backend nccl: needs Device cuda (or auto on a machine with a CUDA device), not cpu; the cpu backend serves cpu and emulator ranks")));
        }
    }

    /// <summary>
    /// One GPU checks the training path through NCCL: a 1-rank job with Backend "nccl" runs the data-parallel step over
    /// a 1-rank NCCL communicator (premultiplied bucket all-reduces on NCCL's stream); its losses equal the plain run's
    /// to rounding (the premultiply n/L is applied to the gradient in fp32 instead of in the optimizer's scale).
    /// </summary>
    [Test]
    public void OneRankOverNcclTrainsThePlainRunOnACudaDevice()
    {
        using (var probe = NativePeft.Tests.Ops.TestGpus.TryCreateCuda(out string reason))
            if (probe is null) Assert.Ignore("no CUDA device: " + reason);
        using var dir = CliProcess.TempDir();
        var cuda = Options(dir["plain"], accum: 2) with { Device = "cuda" };
        double[] plain;
        using (var run = FineTune.Create(cuda))
        {
            run.Train();
            Assert.That(run.Trainer!.CommunicatorBackend, Is.Null, "no job: the plain step");
            plain = run.Trainer!.StepHistory.Select(s => s.Loss).ToArray();
        }
        var job = CommTestRanks.Options(0, 1, CommTestRanks.FreePort(), 30) with { Backend = "nccl" };
        using var nccl = FineTune.Create(cuda with { OutputDir = dir["nccl"], Distributed = job });
        nccl.Train();
        Assert.That(nccl.Trainer!.CommunicatorBackend, Is.EqualTo("nccl"), "the data-parallel step over NCCL");
        var losses = nccl.Trainer!.StepHistory.Select(s => s.Loss).ToArray();
        Assert.That(losses, Has.Length.EqualTo(plain.Length));
        for (int k = 0; k < plain.Length; k++) Assert.That(losses[k], Is.EqualTo(plain[k]).Within(1e-3 * Math.Abs(plain[k])), $"step {k + 1}");
    }
}
