using System.Diagnostics;
using NativePeft.Distributed;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Tests.Cli;
using NativePeft.Tests.Training;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Distributed;

/// <summary>
/// Data-parallel training (docs/distributed.md, "Data-parallel training"): ranks as threads of this process, each with
/// its own CpuOps and model, against the 1-rank run with grad-accum K·N as the reference.
/// </summary>
public class DataParallelTests
{
    /// <summary>
    /// Agreement with the 1-rank run. The only difference is the order of the fp32 gradient sums (one rank accumulates
    /// all K·N micro-batches in sequence, rescaling as it goes; N ranks each accumulate theirs, then the all-reduce sums
    /// the premultiplied rank sums) and of the fp64 loss sum. Measured on this model (4 steps, lr 1e-2, dropout 0.1,
    /// TcpCommunicator, 2 and 4 ranks, ZeRO-1, resumes): losses within 1.7e-8 relative, weights within 6e-8 absolute
    /// (a few fp32 ulps of weights ~0.1). The tolerances leave a margin of about 6× and 17×; a wrong premultiply, a lost bucket or a
    /// micro-batch trained twice moves the losses by 1e-4 or more (seen while developing).
    /// </summary>
    private const double LossTolerance = 1e-7, WeightTolerance = 1e-6;

    private sealed record RankResult(double[] Losses, float[][] Params, long OptimizerStateBytes, long AllocatedBytes);

    private static TrainingData Data() => TrainingKit.Data(train: 48, eval: 0) with { Eval = null, ExactMatchProblems = null };

    private static TrainerOptions Options(string outDir, int steps, int accum, int saveEvery = 0) => new()
    {
        Steps = steps, BatchSize = 2, GradAccum = accum, SeqLen = TrainingKit.Seq, Lr = 1e-2, Schedule = LrScheduleKind.Cosine,
        WarmupSteps = 1, MaxGradNorm = 1.0, OutputDir = outDir, Seed = 11, SaveEvery = saveEvery,
        GradientBucketBytes = 2048, // several buckets on the tiny model: single tensors and flat groups
    };

    private static LlamaModel Model(IOps ops, bool full) => full
        ? LlamaModel.CreateRandom(TrainingKit.Config, ops, new LlamaModelOptions { FullFineTuning = true }, 3, 0.1)
        : TrainingKit.LoraModel(ops, dropout: 0.1);

    /// <summary>
    /// Runs <paramref name="body"/> for <paramref name="n"/> ranks, each on its own thread with its own
    /// <see cref="TcpCommunicator"/> (127.0.0.1, a free port); rethrows the ranks' failures.
    /// </summary>
    internal static T[] RunRanks<T>(int n, Func<ICommunicator, T> body, double timeoutSeconds = 30)
    {
        int port = CommTestRanks.FreePort();
        return CommTestRanks.Run(n, r =>
        {
            using var comm = new TcpCommunicator(CommTestRanks.Options(r, n, port, timeoutSeconds));
            return body(comm);
        });
    }

    private static RankResult TrainRank(ICommunicator? comm, string outDir, int steps, int accum, bool full = false,
        int saveEvery = 0, string? resumeFrom = null)
    {
        using var ops = new CpuOps();
        using var model = Model(ops, full);
        using var trainer = new Trainer(model, Data(), Options(outDir, steps, accum, saveEvery), communicator: comm);
        if (resumeFrom is not null) trainer.Resume(resumeFrom);
        trainer.Train();
        return new RankResult(trainer.StepHistory.Select(s => s.Loss).ToArray(),
            model.TrainableParameters.Select(p => TrainingKit.Values(ops, p.Param)).ToArray(),
            trainer.Optimizer.StateBytes, ops.Memory.AllocatedBytes);
    }

    private static void AssertAgree(RankResult expected, RankResult actual, string what, int firstStep = 0)
    {
        Assert.That(actual.Losses, Has.Length.EqualTo(expected.Losses.Length), what);
        double worstLoss = 0, worstWeight = 0;
        for (int k = firstStep; k < expected.Losses.Length; k++)
        {
            Assert.That(actual.Losses[k], Is.EqualTo(expected.Losses[k]).Within(LossTolerance * Math.Abs(expected.Losses[k])),
                $"{what}: step {k + 1}");
            worstLoss = Math.Max(worstLoss, Math.Abs(actual.Losses[k] - expected.Losses[k]) / Math.Abs(expected.Losses[k]));
        }
        for (int i = 0; i < expected.Params.Length; i++)
            for (int j = 0; j < expected.Params[i].Length; j++)
            {
                double d = Math.Abs(actual.Params[i][j] - expected.Params[i][j]);
                worstWeight = Math.Max(worstWeight, d);
                if (d > WeightTolerance)
                    Assert.Fail($"{what}: parameter {i} element {j}: {actual.Params[i][j]:R} vs the 1-rank run's {expected.Params[i][j]:R}");
            }
        TestContext.Out.WriteLine($"{what}: largest loss difference {worstLoss:E2} (relative), largest weight difference {worstWeight:E2}");
    }

    [Test]
    public void LoraOnTwoAndFourRanksTrainsTheOneRankRun()
    {
        using var dir = CliProcess.TempDir();
        // Global micro-batches per step: 4 = grad-accum × ranks.
        var one = TrainRank(null, dir["one"], 4, accum: 4);
        var viaComm = RunRanks(1, c => TrainRank(c, dir["one-comm"], 4, accum: 4));
        Assert.That(viaComm[0].Losses, Is.EqualTo(one.Losses), "a world of 1 is the plain path, bit for bit");
        var two = RunRanks(2, c => TrainRank(c, dir["two"], 4, accum: 2));
        var four = RunRanks(4, c => TrainRank(c, dir["four"], 4, accum: 1));
        for (int r = 0; r < 2; r++) AssertAgree(one, two[r], $"2 ranks, rank {r}");
        for (int r = 0; r < 4; r++) AssertAgree(one, four[r], $"4 ranks, rank {r}");
        for (int r = 1; r < 4; r++)
            for (int i = 0; i < four[0].Params.Length; i++)
                Assert.That(four[r].Params[i], Is.EqualTo(four[0].Params[i]), $"rank {r} parameter {i}: every rank holds the same bits");
        // Only rank 0 wrote; the adapter it wrote is the trained one.
        Assert.That(Directory.Exists(Path.Combine(dir["four"], "adapter")));
        Assert.That(Directory.GetDirectories(dir["four"]).Select(Path.GetFileName), Is.EquivalentTo(new[] { "adapter" }));
        Assert.That(File.ReadAllText(Path.Combine(dir["four"], Trainer.MetricsFileName)), Does.Contain("\"world_size\": 4"));
    }

    [Test]
    public void ResumeFromATwoRankCheckpointOnOneAndFourRanksContinuesTheRun()
    {
        using var dir = CliProcess.TempDir();
        var two = RunRanks(2, c => TrainRank(c, dir["two"], 4, accum: 2, saveEvery: 2));
        string ckpt = Path.Combine(dir["two"], "checkpoint-2");
        Assert.That(File.ReadAllText(Path.Combine(ckpt, Trainer.StateFileName)), Does.Contain("\"world_size\": 2").And.Contain("\"global_batch\": 8"));
        var one = TrainRank(null, dir["one"], 4, accum: 4, resumeFrom: ckpt);
        Assert.That(one.Losses.Take(2), Is.EqualTo(two[0].Losses.Take(2)), "steps 1–2 come from the checkpoint");
        AssertAgree(two[0], one, "resumed on 1 rank", firstStep: 2);
        var four = RunRanks(4, c => TrainRank(c, dir["four"], 4, accum: 1, resumeFrom: ckpt));
        AssertAgree(two[0], four[0], "resumed on 4 ranks", firstStep: 2);
    }

    [Test]
    public void AChangedGlobalBatchOnResumeIsRefusedNamingTheSettings()
    {
        using var dir = CliProcess.TempDir();
        RunRanks(2, c => TrainRank(c, dir["two"], 2, accum: 1, saveEvery: 2));
        string ckpt = Path.Combine(dir["two"], "checkpoint-2");
        var e = Assert.Throws<InvalidDataException>(() => TrainRank(null, dir["one"], 4, accum: 1, resumeFrom: ckpt))!;
        TestContext.Out.WriteLine(e.Message);
        Assert.That(e.Message, Does.Contain(Trainer.StateFileName));
        Assert.That(e.Message, Does.Contain("grad_accum × ranks 1 × 2 -> 1 × 1 (global batch 4 -> 2 rows)"));
        // The same global batch on 1 rank (grad-accum 2) is accepted.
        Assert.DoesNotThrow(() => TrainRank(null, dir["one-ok"], 3, accum: 2, resumeFrom: ckpt));
    }

    [Test]
    public void FullFineTuningWithZero1OnTwoRanksTrainsTheOneRankRunWithHalfTheOptimizerState()
    {
        using var dir = CliProcess.TempDir();
        var one = TrainRank(null, dir["one"], 3, accum: 2, full: true, saveEvery: 3);
        var two = RunRanks(2, c => TrainRank(c, dir["two"], 3, accum: 1, full: true, saveEvery: 3));
        for (int r = 0; r < 2; r++) AssertAgree(one, two[r], $"ZeRO-1, rank {r}");
        // AdamW keeps 2 fp32 moments per parameter: the 1-rank state is 8 bytes per trainable element.
        long elements = 0;
        using (var ops = new CpuOps())
        using (var model = Model(ops, true)) elements = model.TrainableParameters.Sum(p => p.Param.Count);
        Assert.That(one.OptimizerStateBytes, Is.EqualTo(elements * 8));
        Assert.That(two[0].OptimizerStateBytes + two[1].OptimizerStateBytes, Is.EqualTo(one.OptimizerStateBytes), "the shards partition the state");
        foreach (var r in two)
            Assert.That((double)r.OptimizerStateBytes / one.OptimizerStateBytes, Is.InRange(0.4, 0.6), "each rank keeps about half");
        // Measured on the ops' memory: a rank holds less than the 1-rank run by about its missing half of the state.
        foreach (var r in two)
            Assert.That(r.AllocatedBytes, Is.LessThan(one.AllocatedBytes - one.OptimizerStateBytes * 0.4));
        // The checkpoint holds the whole state, gathered to rank 0, in the 1-rank format: the same tensors by name.
        using var a = NativePeft.IO.SafetensorsFile.Open(Path.Combine(dir["one"], "checkpoint-3", Trainer.OptimizerFileName));
        using var b = NativePeft.IO.SafetensorsFile.Open(Path.Combine(dir["two"], "checkpoint-3", Trainer.OptimizerFileName));
        Assert.That(b.Tensors.Select(t => t.Name), Is.EqualTo(a.Tensors.Select(t => t.Name)));
    }

    [Test]
    public void ARankThatFailsMidStepEndsTheOthersWithItsMessage()
    {
        using var dir = CliProcess.TempDir();
        var clock = Stopwatch.StartNew();
        var errors = new Exception?[3];
        RunRanks(3, c =>
        {
            try
            {
                using var ops = new CpuOps();
                using var model = Model(ops, false);
                using var trainer = new Trainer(model, Data(), Options(dir["out"], 5, 1), communicator: c);
                if (c.Rank == 1)
                    trainer.AfterBackward = step => { if (step == 2) throw new IOException("disk on fire"); };
                trainer.Train();
            }
            catch (Exception e) { errors[c.Rank] = e; }
            return 0;
        }, timeoutSeconds: 60);
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(30)), "bounded: the others do not wait for a timeout");
        Assert.That(errors[1], Is.TypeOf<IOException>());
        foreach (int r in new[] { 0, 2 })
        {
            Assert.That(errors[r], Is.TypeOf<CommunicatorException>(), $"rank {r}");
            Assert.That(errors[r]!.Message, Does.Contain("rank 1: disk on fire"), $"rank {r}");
        }
    }
}
