using NativePeft.Distributed;
using NUnit.Framework;

namespace NativePeft.Tests.Distributed;

/// <summary>
/// <see cref="DistributedEnvironment.Read(IReadOnlyDictionary{string, string})"/>: torchrun's variables, srun's as
/// the fallback, our two, and an error naming the variable and its value for each bad one.
/// </summary>
public class DistributedEnvironmentTests
{
    private static DistributedOptions? Read(params (string Name, string? Value)[] vars) =>
        DistributedEnvironment.Read(vars.ToDictionary(v => v.Name, v => v.Value));

    private static DistributedEnvironmentException Error(params (string, string?)[] vars) =>
        Assert.Throws<DistributedEnvironmentException>(() => Read(vars))!;

    [Test]
    public void NoWorldSizeIsAPlainRun()
    {
        Assert.That(Read(), Is.Null);
        Assert.That(Read(("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234"), ("LOCAL_RANK", "0")), Is.Null, "MASTER_* alone make no job");
        Assert.That(Read(("WORLD_SIZE", null)), Is.Null, "a null value is unset");
    }

    [Test]
    public void TorchrunsVariablesAreRead()
    {
        var o = Read(("RANK", "9"), ("WORLD_SIZE", "16"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node-a.cluster"), ("MASTER_PORT", "29400"), ("NATIVEPEFT_DIST_BACKEND", "nccl"), ("NATIVEPEFT_DIST_TIMEOUT", "90"))!;
        Assert.Multiple(() =>
        {
            Assert.That(o.Rank, Is.EqualTo(9));
            Assert.That(o.WorldSize, Is.EqualTo(16));
            Assert.That(o.LocalRank, Is.EqualTo(1));
            Assert.That(o.MasterAddr, Is.EqualTo("node-a.cluster"));
            Assert.That(o.MasterPort, Is.EqualTo(29400));
            Assert.That(o.Backend, Is.EqualTo("nccl"));
            Assert.That(o.Timeout, Is.EqualTo(TimeSpan.FromSeconds(90)));
            Assert.That(o.IsDistributed, Is.True);
        });
    }

    [Test]
    public void DefaultsOnOneNode()
    {
        var o = Read(("RANK", "3"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "127.0.0.1"))!;
        Assert.Multiple(() =>
        {
            Assert.That(o.LocalRank, Is.EqualTo(3), "LOCAL_RANK defaults to RANK on one node");
            Assert.That(o.MasterPort, Is.EqualTo(29500), "torchrun's default port");
            Assert.That(o.Backend, Is.EqualTo("auto"));
            Assert.That(o.Timeout, Is.EqualTo(TimeSpan.FromMinutes(10)));
        });
        var sameNode = Read(("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4"), ("MASTER_ADDR", "::1"))!;
        Assert.That(sameNode.LocalRank, Is.EqualTo(2), "LOCAL_WORLD_SIZE = WORLD_SIZE is one node");
        Assert.That(sameNode.MasterAddr, Is.EqualTo("::1"));
        var one = Read(("WORLD_SIZE", "1"))!;
        Assert.That((one.Rank, one.WorldSize, one.LocalRank, one.MasterAddr, one.IsDistributed), Is.EqualTo((0, 1, 0, "127.0.0.1", false)),
            "a world of 1 needs no RANK or MASTER_ADDR");
        Assert.That(Read(("WORLD_SIZE", " 2 "), ("RANK", "1 "), ("MASTER_ADDR", "h"), ("NATIVEPEFT_DIST_BACKEND", "CPU"))!.Backend, Is.EqualTo("cpu"),
            "values are trimmed; the backend is case-insensitive");
    }

    [Test]
    public void SrunsVariablesAreTheFallback()
    {
        var o = Read(("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "gpu-node-01"), ("MASTER_PORT", "12345"))!;
        Assert.That((o.Rank, o.WorldSize, o.LocalRank, o.MasterAddr, o.MasterPort), Is.EqualTo((5, 8, 1, "gpu-node-01", 12345)));
        var torchrunWins = Read(("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"))!;
        Assert.That((torchrunWins.Rank, torchrunWins.WorldSize), Is.EqualTo((0, 2)), "RANK/WORLD_SIZE take precedence over srun's");
        Assert.That(Read(("SLURM_NTASKS", "8")), Is.Null, "no SLURM_PROCID: not an srun task");
        var single = Read(("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"))!;
        Assert.That(single.WorldSize, Is.EqualTo(1), "a one-task allocation is a world of 1, no MASTER_ADDR needed");
        var e = Error(("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"));
        Assert.That(e.Variable, Is.EqualTo("MASTER_ADDR"));
        Assert.That(e.Message, Does.Contain("srun does not set it").And.Contain("scontrol show hostnames"), "says how to set it");
        Assert.That(Error(("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4"), ("MASTER_ADDR", "h")).Message,
            Is.EqualTo("SLURM_PROCID=4: must be less than SLURM_NTASKS=4 (ranks are 0 to 3)"), "errors name srun's variables");
    }

    [TestCase("WORLD_SIZE", "two", "WORLD_SIZE=two: expected a whole number of at least 1")]
    [TestCase("WORLD_SIZE", "0", "WORLD_SIZE=0: must be at least 1")]
    [TestCase("WORLD_SIZE", "-2", "WORLD_SIZE=-2: expected a whole number of at least 1")]
    [TestCase("RANK", "1.5", "RANK=1.5: expected a whole number of at least 0")]
    [TestCase("RANK", "2", "RANK=2: must be less than WORLD_SIZE=2 (ranks are 0 to 1)")]
    [TestCase("LOCAL_RANK", "x", "LOCAL_RANK=x: expected a whole number of at least 0")]
    [TestCase("LOCAL_RANK", "2", "LOCAL_RANK=2: must be less than WORLD_SIZE=2 (the rank on this node)")]
    [TestCase("MASTER_PORT", "0", "MASTER_PORT=0: must be 1 to 65535")]
    [TestCase("MASTER_PORT", "70000", "MASTER_PORT=70000: must be 1 to 65535")]
    [TestCase("MASTER_PORT", "http", "MASTER_PORT=http: expected a whole number of at least 1")]
    [TestCase("MASTER_ADDR", "bad host!", "MASTER_ADDR=bad host!: not a host name or IP address")]
    [TestCase("NATIVEPEFT_DIST_BACKEND", "gloo", "NATIVEPEFT_DIST_BACKEND=gloo: expected one of auto, nccl, cpu")]
    [TestCase("NATIVEPEFT_DIST_TIMEOUT", "10m", "NATIVEPEFT_DIST_TIMEOUT=10m: expected a number of seconds, more than 0 and at most a week")]
    [TestCase("NATIVEPEFT_DIST_TIMEOUT", "0", "NATIVEPEFT_DIST_TIMEOUT=0: expected a number of seconds, more than 0 and at most a week")]
    public void EachBadValueIsAnErrorNamingTheVariableAndTheValue(string name, string value, string message)
    {
        var vars = new Dictionary<string, string?> { ["RANK"] = "1", ["WORLD_SIZE"] = "2", ["MASTER_ADDR"] = "127.0.0.1", [name] = value };
        var e = Assert.Throws<DistributedEnvironmentException>(() => DistributedEnvironment.Read(vars))!;
        Assert.That(e.Message, Is.EqualTo(message));
        Assert.That((e.Variable, e.Value), Is.EqualTo((name, value)));
    }

    [Test]
    public void MissingVariablesAreNamed()
    {
        Assert.That(Error(("RANK", "0")).Message, Does.StartWith("WORLD_SIZE: ").And.Contain("RANK=0 is set"));
        Assert.That(Error(("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")).Message, Does.StartWith("RANK: not set, but WORLD_SIZE=2"));
        Assert.That(Error(("WORLD_SIZE", "2"), ("RANK", "0")).Message, Does.StartWith("MASTER_ADDR: not set, but WORLD_SIZE=2"));
        var e = Error(("WORLD_SIZE", "16"), ("RANK", "9"), ("LOCAL_WORLD_SIZE", "8"), ("MASTER_ADDR", "h"));
        Assert.That(e.Variable, Is.EqualTo("LOCAL_RANK"), "several nodes: the rank on the node cannot be guessed");
        Assert.That(e.Message, Does.Contain("LOCAL_WORLD_SIZE=8 < WORLD_SIZE=16"));
    }
}
