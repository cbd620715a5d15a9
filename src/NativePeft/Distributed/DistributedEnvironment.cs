using System.Collections;
using System.Globalization;

namespace NativePeft.Distributed;

/// <summary>
/// Reads a worker's place in a data-parallel job from the environment that torchrun, the Kubernetes operators and
/// <c>nativepeft train --nproc N</c> set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or that srun sets
/// (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, used only when RANK and WORLD_SIZE are both absent), plus ours:
/// NATIVEPEFT_DIST_BACKEND (auto|nccl|cpu) and NATIVEPEFT_DIST_TIMEOUT (seconds). docs/distributed.md.
/// <para>
/// Rules: no WORLD_SIZE (and no srun variables) is a plain run (null). RANK is required when WORLD_SIZE &gt; 1 (0 for a
/// world of 1). LOCAL_RANK defaults to RANK on one node (LOCAL_WORLD_SIZE absent or equal to WORLD_SIZE); with several
/// nodes it is required. MASTER_ADDR is required when WORLD_SIZE &gt; 1 (srun does not set it: the batch script exports
/// it, docs/distributed.md), 127.0.0.1 for a world of 1; MASTER_PORT defaults to 29500 (torchrun's default).
/// Every bad value is a <see cref="DistributedEnvironmentException"/> naming the variable and its value.
/// </para>
/// </summary>
public static class DistributedEnvironment
{
    public const string Rank = "RANK", WorldSize = "WORLD_SIZE", LocalRank = "LOCAL_RANK", LocalWorldSize = "LOCAL_WORLD_SIZE",
        MasterAddr = "MASTER_ADDR", MasterPort = "MASTER_PORT", Backend = "NATIVEPEFT_DIST_BACKEND", Timeout = "NATIVEPEFT_DIST_TIMEOUT",
        SlurmProcId = "SLURM_PROCID", SlurmNTasks = "SLURM_NTASKS", SlurmLocalId = "SLURM_LOCALID";

    /// <summary>The backends NATIVEPEFT_DIST_BACKEND accepts.</summary>
    public static readonly string[] Backends = ["auto", "nccl", "cpu"];

    /// <summary>The default rendezvous port when MASTER_PORT is absent (torchrun's).</summary>
    public const int DefaultPort = 29500;

    /// <summary><see cref="Read(IReadOnlyDictionary{string, string})"/> of this process's environment.</summary>
    public static DistributedOptions? Read() => Read(ProcessEnvironment());

    /// <summary>This process's environment variables as a dictionary.</summary>
    public static IReadOnlyDictionary<string, string?> ProcessEnvironment()
    {
        var env = new Dictionary<string, string?>(StringComparer.Ordinal);
        foreach (DictionaryEntry e in Environment.GetEnvironmentVariables()) env[(string)e.Key] = (string?)e.Value;
        return env;
    }

    /// <summary>
    /// The job's settings from <paramref name="env"/> (variable → value; a null or absent value is unset), or null when
    /// this is not a worker of a job (no WORLD_SIZE, no srun variables).
    /// </summary>
    /// <exception cref="DistributedEnvironmentException">A missing or bad variable, named with its value.</exception>
    public static DistributedOptions? Read(IReadOnlyDictionary<string, string?> env)
    {
        ArgumentNullException.ThrowIfNull(env);
        string? Get(string name) => env.TryGetValue(name, out var v) && v is not null ? v.Trim() : null;

        string? worldText = Get(WorldSize), rankText = Get(Rank);
        string worldName = WorldSize, rankName = Rank, localName = LocalRank;
        string? localText = Get(LocalRank);
        bool slurm = false;
        if (worldText is null && rankText is null)
        {
            // srun: one task per rank; used only when none of torchrun's variables is there
            if (Get(SlurmNTasks) is null || Get(SlurmProcId) is null) return null;
            slurm = true;
            worldName = SlurmNTasks; rankName = SlurmProcId; localName = SlurmLocalId;
            worldText = Get(SlurmNTasks); rankText = Get(SlurmProcId); localText = Get(SlurmLocalId);
        }
        else if (worldText is null)
            throw new DistributedEnvironmentException(WorldSize, null, $"{Rank}={rankText} is set but {WorldSize} is not (set both, or neither for a single-process run)");

        int world = Integer(worldName, worldText!, min: 1);
        int rank = rankText is null
            ? world == 1 ? 0 : throw new DistributedEnvironmentException(rankName, null, $"not set, but {worldName}={world} (every worker needs its rank, 0 to {world - 1})")
            : Integer(rankName, rankText, min: 0);
        if (rank >= world)
            throw new DistributedEnvironmentException(rankName, rankText, $"must be less than {worldName}={world} (ranks are 0 to {world - 1})");

        int local;
        if (localText is not null)
        {
            local = Integer(localName, localText, min: 0);
            if (local >= world) throw new DistributedEnvironmentException(localName, localText, $"must be less than {worldName}={world} (the rank on this node)");
        }
        else if (!slurm && Get(LocalWorldSize) is { } lws && Integer(LocalWorldSize, lws, min: 1) is var perNode && perNode < world)
            throw new DistributedEnvironmentException(LocalRank, null, $"not set, but {LocalWorldSize}={perNode} < {WorldSize}={world} (several nodes): set it to the rank on this node");
        else local = rank; // one node: the rank is the rank on the node

        string addr;
        if (Get(MasterAddr) is { } a)
        {
            if (a.Length == 0 || Uri.CheckHostName(a) == UriHostNameType.Unknown)
                throw new DistributedEnvironmentException(MasterAddr, a, "not a host name or IP address");
            addr = a;
        }
        else if (world == 1) addr = "127.0.0.1";
        else throw new DistributedEnvironmentException(MasterAddr, null, slurm
            ? $"not set, and srun does not set it ({SlurmNTasks}={world}): export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) in the batch script (docs/distributed.md)"
            : $"not set, but {WorldSize}={world}: the host of rank 0's rendezvous (127.0.0.1 on one node)");

        int port = Get(MasterPort) is { } p ? Integer(MasterPort, p, min: 1, max: 65535) : DefaultPort;

        string backend = Get(Backend) is { } b ? b.ToLowerInvariant() : "auto";
        if (!Backends.Contains(backend))
            throw new DistributedEnvironmentException(Backend, Get(Backend), $"expected one of {string.Join(", ", Backends)}");

        var timeout = new DistributedOptions().Timeout;
        if (Get(Timeout) is { } t)
        {
            if (!double.TryParse(t, NumberStyles.Float, CultureInfo.InvariantCulture, out double seconds) || !double.IsFinite(seconds) || seconds <= 0 || seconds > 7 * 24 * 3600)
                throw new DistributedEnvironmentException(Timeout, t, "expected a number of seconds, more than 0 and at most a week");
            timeout = TimeSpan.FromSeconds(seconds);
        }

        return new DistributedOptions
        {
            Rank = rank, WorldSize = world, LocalRank = local, MasterAddr = addr, MasterPort = port, Backend = backend, Timeout = timeout,
        };
    }

    private static int Integer(string name, string text, int min, int max = int.MaxValue)
    {
        if (!int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int v))
            throw new DistributedEnvironmentException(name, text, "expected a whole number" + (min > 0 ? $" of at least {min}" : " of at least 0"));
        if (v < min || v > max)
            throw new DistributedEnvironmentException(name, text, max == int.MaxValue ? $"must be at least {min}" : $"must be {min} to {max}");
        return v;
    }
}

/// <summary>A missing or bad variable of a data-parallel job's environment (<see cref="DistributedEnvironment"/>).</summary>
public sealed class DistributedEnvironmentException(string variable, string? value, string detail)
    : Exception(value is null ? $"{variable}: {detail}" : $"{variable}={value}: {detail}")
{
    /// <summary>The environment variable at fault.</summary>
    public string Variable { get; } = variable;
    /// <summary>Its value, null when it is not set.</summary>
    public string? Value { get; } = value;
}
