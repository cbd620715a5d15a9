using NativePeft.Distributed;
using NativePeft.Planning;
using NativePeft.Tests.Cli;
using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Distributed;

/// <summary>The memory plan of a data-parallel rank (<see cref="PlanOptions.WorldSize"/>) and estimate --nproc.</summary>
public class DataParallelPlanTests
{
    // TrainingKit.Config, full fine-tuning: embed 259·32 = 8288, lm_head 8288, per layer q 1024, k 512, v 512, o 1024,
    // gate/up/down 2048 each, two norms of 32; the final norm 32. Σ = 2·8288 + 2·(1024+512+512+1024+3·2048+64) + 32 = 35168.
    private const long Elements = 35168;

    private static PlanOptions Full(int worldSize) => new()
    {
        Method = FineTuneMethod.Full, Device = PlanDevice.Cpu, Batch = 1, Seq = TrainingKit.Seq, WorldSize = worldSize,
    };

    [Test]
    public void FullFineTuningOnTwoRanksCountsTheLargestOptimizerShard()
    {
        var one = MemoryPlan.Compute(TrainingKit.Config, Full(1));
        var two = MemoryPlan.Compute(TrainingKit.Config, Full(2));
        Assert.That(one.TrainableParameterCount, Is.EqualTo(Elements));
        Assert.That(one.OptimizerStateBytes, Is.EqualTo(8 * Elements), "AdamW: m and v, fp32");
        // By hand, largest first to the lighter rank: embed → 0, lm_head → 1, the six 2048s alternate, the four 1024s,
        // the four 512s, then the five 32-element norms 0,1,0,1,0: rank 0 holds 17600 elements, rank 1 17568.
        Assert.That(two.OptimizerStateBytes, Is.EqualTo(8 * 17600));
        Assert.That(two.GradientBytes, Is.EqualTo(one.GradientBytes), "gradients stay whole on every rank (ZeRO-1)");
        Assert.That(two.AllReduceBytes, Is.EqualTo(4 * Elements));
        Assert.That(two.RingTrafficBytesPerRank, Is.EqualTo(4 * Elements), "2(N−1)/N = 1 for N = 2");
        Assert.That(MemoryPlan.Compute(TrainingKit.Config, Full(4)).RingTrafficBytesPerRank, Is.EqualTo(6 * Elements), "2·3/4 = 1.5");
        Assert.That(one.AllReduceBytes, Is.Zero);
        Assert.That(ZeroPartition.Owners([8, 8, 4, 4, 2], 2), Is.EqualTo(new[] { 0, 1, 0, 1, 0 }));
    }

    [Test]
    public void LoraKeepsTheWholeOptimizerStateOnEveryRank()
    {
        var o = new PlanOptions { Method = FineTuneMethod.Lora, Rank = 4, Device = PlanDevice.Cpu, Batch = 1, Seq = TrainingKit.Seq };
        var one = MemoryPlan.Compute(TrainingKit.Config, o);
        var two = MemoryPlan.Compute(TrainingKit.Config, o with { WorldSize = 2 });
        Assert.That(two.OptimizerStateBytes, Is.EqualTo(one.OptimizerStateBytes));
        Assert.That(two.AllReduceBytes, Is.EqualTo(4 * one.TrainableParameterCount));
    }

    [Test]
    public void EstimateNprocPrintsThePerGpuPlanAndTheAllReduceVolume()
    {
        var r = CliProcess.Run("estimate", "--model", "builtin", "--method", "full", "--nproc", "2", "--json");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.Stderr);
        Assert.That(r.Stdout, Does.Contain("\"world_size\": 2").And.Contain("\"all_reduce_bytes_per_step\""));
        var bad = CliProcess.Run("estimate", "--model", "builtin", "--nproc", "0");
        Assert.That(bad.ExitCode, Is.EqualTo(2));
        Assert.That(bad.Stderr, Does.Contain("--nproc 0"));
    }
}
