using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Planning;

/// <summary>
/// The LoRA memory the model and the ops allocate, for the plans (<see cref="MemoryPlan"/>, <see cref="InferencePlan"/>):
/// the adapters of a block run in groups that share an input (<see cref="LlamaModel.LoraGroups"/>), the scratch holds
/// one group's xa and dxa (<see cref="LoraScratch"/>), and the ops take transient workspaces: the fused kernels' fp32
/// partial sums (<see cref="GpuLoraOps"/>), or on the unfused path (CPU, fp32, shapes the kernels do not take)
/// dropout(x) and its mask while dropout is on.
/// </summary>
public static class LoraPlan
{
    /// <summary>Per group of one block (<see cref="LlamaModel.LoraGroups"/>): its input width and the ranks of its adapters
    /// (targets only; groups without one are left out).</summary>
    public static IReadOnlyList<(long In, int[] Ranks)> Groups(LlamaConfig c, IReadOnlyCollection<string> targets, int rank)
    {
        long InputOf(string name) => name switch
        {
            "o_proj" => c.QueryDim,
            "down_proj" => c.IntermediateSize,
            _ => c.HiddenSize,
        };
        return LlamaModel.LoraGroups
            .Select(g => (In: InputOf(g[0]), Ranks: g.Where(targets.Contains).Select(_ => rank).ToArray()))
            .Where(g => g.Ranks.Length > 0)
            .ToList();
    }

    /// <summary>The LoRA scratch's width: the largest Σ r of a group (<see cref="LlamaModel.LoraGroupRank"/>).</summary>
    public static long GroupRank(IReadOnlyList<(long In, int[] Ranks)> groups) => groups.Select(g => (long)g.Ranks.Sum()).DefaultIfEmpty(0).Max();

    /// <summary>
    /// The largest transient workspace the LoRA ops take in a step: <see cref="IOps.LoraDown"/> (the forward, and the
    /// backward's recompute) and, with <paramref name="backward"/>, <see cref="IOps.LoraBackwardInput"/>, at lora_dropout
    /// <paramref name="dropout"/> (0 when dropout is off: evaluation). <paramref name="bytes"/> sizes one tensor as the
    /// plan's pool does (its alignment).
    /// </summary>
    public static long TransientBytes(Func<DType, long, long> bytes, PlanDevice device, DType d, long n,
        IReadOnlyList<(long In, int[] Ranks)> groups, double dropout, bool backward)
    {
        long max = 0;
        foreach (var (inF, ranks) in groups)
        {
            // The unfused path per adapter: dropout(x) and its U8 mask [N, in] while dropout is on (the backward reuses
            // the dropout(x) buffer for the adapter's dx); nothing without dropout (the GEMMs write xa and add into dx).
            long unfused = dropout > 0 ? bytes(d, n * inF) + bytes(DType.U8, n * inF) : 0;
            bool fused = device == PlanDevice.Gpu && d == DType.BF16 && inF % 8 == 0 && n > 0;
            if (!fused)
            {
                max = Math.Max(max, unfused);
                continue;
            }
            // GpuOps.LoraDown / LoraBackwardInput: one fp32 workspace for the widest launch of the group, held while
            // the launches run (an adapter too wide for a launch runs unfused meanwhile).
            long Fused(int maxPadded, Func<int, long> workspace)
            {
                var runs = GpuLoraOps.Launches(ranks, maxPadded);
                long ws = runs.Where(r => r.Count > 0)
                    .Select(r => workspace(Enumerable.Range(r.Start, r.Count).Sum(g => GpuLoraOps.PaddedRank(ranks[g]))))
                    .DefaultIfEmpty(0).Max();
                long held = ws == 0 ? 0 : bytes(DType.F32, ws / sizeof(float));
                return held + (runs.Any(r => r.Count == 0) ? unfused : 0);
            }
            max = Math.Max(max, Fused(GpuLoraOps.DownMaxPaddedRank, w => GpuLoraOps.DownWorkspaceBytes(checked((int)n), checked((int)inF), w)));
            if (backward)
                max = Math.Max(max, Fused(GpuLoraOps.BackwardMaxPaddedRank, w => GpuLoraOps.BackwardWorkspaceBytes(checked((int)n), checked((int)inF), w)));
        }
        return max;
    }
}
