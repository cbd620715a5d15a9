using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;

namespace NativePeft.Planning;

/// <summary>
/// The <see cref="DevicePool"/> factories that size a pool from a plan (static extension members, called as
/// <c>DevicePool.ForGpu(gpu, plan)</c> with <c>using NativePeft.Planning</c>): they live here, next to the plans, so
/// that Ops does not depend on Planning. The arenas are the plan's with every tensor rounded up to the pool's alignment
/// (<see cref="MemoryPlan.Aligned"/>, <see cref="InferencePlan.Aligned"/>):
/// <list type="bullet">
/// <item><b>persistent</b> (<see cref="MemoryPlan.PersistentArenaBytes"/>): base weights, quantization state,
/// adapters, gradients, dequantization scratch, device optimizer state and the 8-bit maps;</item>
/// <item><b>rope tables</b> (<see cref="MemoryPlan.RopeArenaBytes"/> for a sequence of B·T);</item>
/// <item><b>transient</b> (<see cref="MemoryPlan.TransientArenaBytes"/>): activations and op workspaces; with an
/// inference plan the KV cache and the forward's workspace (generate) or eval's activations.</item>
/// </list>
/// </summary>
public static class PlannedPools
{
    extension(DevicePool)
    {
        /// <summary>
        /// A pool of device memory of <paramref name="gpu"/> (256-byte alignment) sized from <paramref name="plan"/>, and big
        /// enough for the other batch shapes in <paramref name="alsoFits"/> (evaluation, generation: B=1 and the longest
        /// prompt + answer), whose activations replace the training ones.
        /// </summary>
        public static DevicePool ForGpu(IGpu gpu, MemoryPlan plan, params IReadOnlyList<(int Batch, int Seq)> alsoFits)
        {
            ArgumentNullException.ThrowIfNull(gpu);
            ArgumentNullException.ThrowIfNull(plan);
            return DevicePool.OnGpu(gpu, Reservations(plan, DevicePool.GpuAlignment, alsoFits), plan.TotalBytes, Shape(plan), Unaligned(plan));
        }

        /// <summary>
        /// A pool of device memory of <paramref name="gpu"/> (256-byte alignment) sized from an inference plan (generation
        /// with a KV cache, or evaluation): the aligned plan's persistent, rope-table and transient arenas.
        /// </summary>
        public static DevicePool ForGpu(IGpu gpu, InferencePlan plan)
        {
            ArgumentNullException.ThrowIfNull(gpu);
            ArgumentNullException.ThrowIfNull(plan);
            return DevicePool.OnGpu(gpu, Reservations(plan, DevicePool.GpuAlignment), plan.TotalBytes, plan.ShapeDescription, Unaligned(plan));
        }

        /// <summary>A pool of host memory (64-byte alignment) for <see cref="CpuOps"/>, sized from an inference plan for <see cref="PlanDevice.Cpu"/>.</summary>
        public static DevicePool ForHost(InferencePlan plan)
        {
            ArgumentNullException.ThrowIfNull(plan);
            return DevicePool.OnHost(Reservations(plan, DevicePool.HostAlignment), plan.TotalBytes, plan.ShapeDescription, Unaligned(plan));
        }

        /// <summary>A pool of host memory (64-byte alignment) for <see cref="CpuOps"/>, sized from a plan for <see cref="PlanDevice.Cpu"/>.</summary>
        public static DevicePool ForHost(MemoryPlan plan, params IReadOnlyList<(int Batch, int Seq)> alsoFits)
        {
            ArgumentNullException.ThrowIfNull(plan);
            return DevicePool.OnHost(Reservations(plan, DevicePool.HostAlignment, alsoFits), plan.TotalBytes, Shape(plan), Unaligned(plan));
        }

        /// <summary>The arena sizes for an inference plan at <paramref name="alignment"/>: the aligned plan's persistent, rope-table and transient bytes.</summary>
        public static (long Persistent, long RopeTables, long Transient) Reservations(InferencePlan plan, int alignment)
        {
            ArgumentNullException.ThrowIfNull(plan);
            var aligned = plan.Aligned(alignment);
            return (aligned.PersistentArenaBytes, aligned.RopeArenaBytes, aligned.TransientArenaBytes);
        }

        /// <summary>
        /// The arena sizes for <paramref name="plan"/> at <paramref name="alignment"/>: the aligned plan's
        /// <see cref="MemoryPlan.PersistentArenaBytes"/> and <see cref="MemoryPlan.TransientArenaBytes"/>, and its
        /// <see cref="MemoryPlan.RopeArenaBytes"/> for one sequence of B·T tokens (equal to the plan's when B = 1 or
        /// B·T ≤ 64); each other shape (B, T) of <paramref name="alsoFits"/> raises the
        /// RoPE arena to its tables and the transient arena to its activations plus the larger of its op workspaces and
        /// the F32 logits [B·T, vocab] that greedy generation reads.
        /// </summary>
        public static (long Persistent, long RopeTables, long Transient) Reservations(MemoryPlan plan, int alignment, IReadOnlyList<(int Batch, int Seq)>? alsoFits = null)
        {
            ArgumentNullException.ThrowIfNull(plan);
            var aligned = plan.Aligned(alignment);
            // The RoPE tables for a sequence of B·T: an evaluation with no more tokens than training (B = 1, T = B·T)
            // fits the transient arena (activations and workspaces depend on B·T alone), and so it fits here too.
            long rope = plan.Options.Batch == 1 ? aligned.RopeArenaBytes
                : plan.With(o => o with { Batch = 1, Seq = o.Batch * o.Seq }).Aligned(alignment).RopeArenaBytes;
            long transient = aligned.TransientArenaBytes;
            foreach (var (b, t) in alsoFits ?? [])
            {
                var other = plan.With(o => o with { Batch = b, Seq = t }).Aligned(alignment);
                rope = Math.Max(rope, other.RopeArenaBytes);
                long logits = MemoryPlan.TensorBytes(DType.F32, (long)b * t * plan.Config.VocabSize, alignment);
                transient = Math.Max(transient, other.ActivationBytes + Math.Max(other.TransientWorkspaceBytes, logits));
            }
            return (aligned.PersistentArenaBytes, rope, transient);
        }
    }

    extension(DevicePool pool)
    {
        /// <summary>The training plan the arenas were sized from (requested bytes, alignment 1); null for an <see cref="Planning.InferencePlan"/>.</summary>
        public MemoryPlan? Plan => pool.SizedFrom as MemoryPlan;

        /// <summary>The inference plan (generate, eval) the arenas were sized from (requested bytes, alignment 1); null for a training plan.</summary>
        public InferencePlan? InferencePlan => pool.SizedFrom as InferencePlan;
    }

    private static string Shape(MemoryPlan plan) => $"batch {plan.Options.Batch}, seq {plan.Options.Seq}";

    private static MemoryPlan Unaligned(MemoryPlan plan) => plan.Alignment == 1 ? plan : plan.Aligned(1);

    private static InferencePlan Unaligned(InferencePlan plan) => plan.Alignment == 1 ? plan : plan.Aligned(1);
}
