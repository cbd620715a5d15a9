namespace NativePeft.Distributed;

/// <summary>
/// Where this process stands in a data-parallel job: the same variables torchrun, Slurm (through its launch scripts)
/// and the Kubernetes operators set — RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT — so a job started by any
/// of them needs no launcher of ours (docs/distributed.md). <c>nativepeft train --nproc N</c> sets them for its workers.
/// </summary>
public sealed record DistributedOptions
{
    /// <summary>This process's rank, 0 ≤ Rank &lt; WorldSize (RANK).</summary>
    public int Rank { get; init; }
    /// <summary>Ranks in the job (WORLD_SIZE); 1 is a plain single-process run.</summary>
    public int WorldSize { get; init; } = 1;
    /// <summary>Rank on this node (LOCAL_RANK): the CUDA device ordinal with <c>--device cuda</c>.</summary>
    public int LocalRank { get; init; }
    /// <summary>Host of rank 0's rendezvous (MASTER_ADDR). The CPU backend accepts only a loopback address.</summary>
    public string MasterAddr { get; init; } = "127.0.0.1";
    /// <summary>Port of rank 0's rendezvous (MASTER_PORT).</summary>
    public int MasterPort { get; init; } = 29500;
    /// <summary>"auto" (NCCL on CUDA devices, else cpu), "nccl" or "cpu".</summary>
    public string Backend { get; init; } = "auto";
    /// <summary>How long a rank waits for the others (rendezvous, a collective) before the job fails with a message.</summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromMinutes(10);

    public bool IsDistributed => WorldSize > 1;
}
