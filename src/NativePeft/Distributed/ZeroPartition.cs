namespace NativePeft.Distributed;

/// <summary>
/// ZeRO-1's partition of the trainable tensors across ranks (full fine-tuning, docs/distributed.md): each rank keeps
/// the optimizer state of the tensors it owns. Deterministic and balanced by bytes: the largest tensor first (ties by
/// position), each to the rank with the fewest bytes so far (ties to the lower rank). The trainer and the memory plan
/// use the same rule, so the plan's largest shard is the one a rank allocates.
/// </summary>
public static class ZeroPartition
{
    /// <summary>The owner rank of each tensor of <paramref name="bytes"/> (its size in bytes).</summary>
    public static int[] Owners(IReadOnlyList<long> bytes, int worldSize)
    {
        ArgumentNullException.ThrowIfNull(bytes);
        ArgumentOutOfRangeException.ThrowIfLessThan(worldSize, 1);
        var owner = new int[bytes.Count];
        var load = new long[worldSize];
        foreach (int i in Enumerable.Range(0, bytes.Count).OrderByDescending(i => bytes[i]).ThenBy(i => i))
        {
            int best = 0;
            for (int r = 1; r < worldSize; r++)
                if (load[r] < load[best]) best = r;
            owner[i] = best;
            load[best] += bytes[i];
        }
        return owner;
    }
}
