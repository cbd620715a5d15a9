using NativePeft.Numerics;
using NativePeft.Runtime;
using static NativePeft.Ops.KernelLaunch;

namespace NativePeft.Ops;

/// <summary>
/// Cross-entropy over a vocabulary processed in chunks (kernels/cross_entropy.cu) on an <see cref="IGpu"/>, the
/// device half of the fused LM-head loss of docs/ops-contract.md "Cross-entropy"; the CPU reference is
/// <see cref="Reference.CrossEntropyRef"/>.
/// <para>
/// The caller owns the GEMMs. Forward: <see cref="Init"/>, then for v0 = 0, chunk, 2·chunk, … (increasing, covering
/// [0, vocab)): compute z[rows, c] = hidden · W[v0 : v0+c]ᵀ (row stride ldz ≥ c) and call <see cref="ChunkForward"/>;
/// then <see cref="Finish"/> writes lse[rows] and loss_per_row[rows] (0 for ignored rows), and the loss is
/// Σ loss_per_row / count: either on the host (copy loss_per_row, sum in double in row order, divide by the
/// number of labels that are not -100 — exactly what CrossEntropyRef does), or on the device with
/// <see cref="LossSum"/> (one block, fixed order; sum and count as two doubles).
/// Backward: for each chunk recompute z, call <see cref="ChunkBackward"/> with scale = dloss / count (z becomes dz in
/// place), then dhidden += dz · W_chunk and, for a trained LM head, dW_chunk += dzᵀ · hidden.
/// </para>
/// <para>
/// Types: z in <see cref="DType.F32"/> or <see cref="DType.BF16"/>; running_max, running_sum, label_logit, lse and
/// loss_per_row fp32 [rows]; labels int32 [rows] (-100 = ignored). All math is fp32. Deterministic: the only
/// reduction whose order matters (the sum of exponentials within a chunk row) has a launch shape chosen from the
/// chunk width alone. The device-pointer methods only validate and launch; a label outside [0, vocab) other than
/// -100 is not checked on the host there and makes that row's loss NaN.
/// </para>
/// </summary>
public sealed class GpuLossOps
{
    /// <summary>Label of a position without a loss.</summary>
    public const int IgnoreIndex = -100;

    /// <summary>Threads per block of the per-row kernels (fewer for narrow chunks) and of the 1-D kernels.</summary>
    public const int ThreadsPerBlock = 256;

    private readonly IGpu _gpu;

    /// <param name="gpu">The device the kernels run on; its kernel image must contain cross_entropy.cu.</param>
    public GpuLossOps(IGpu gpu)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        _gpu = gpu;
    }

    public IGpu Gpu => _gpu;

    private static string Suffix(DType dtype) =>
        KernelLaunch.DTypeSuffix(dtype, allowF16: false, "cross-entropy logits are F32 or BF16");

    /// <summary>Threads per block of the chunk kernels: min(256, 32 · ceil(chunk / 32)); fixes the reduction order.</summary>
    public static int ChunkBlockThreads(int chunk) => (int)Math.Min(ThreadsPerBlock, Math.Max(1, (chunk + 31L) / 32) * 32);

    private static int Blocks1D(int rows) => (int)KernelLaunch.CeilDiv(rows, ThreadsPerBlock);

    private static void CheckChunk(int rows, int chunk, long ldz, int v0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(chunk);
        ArgumentOutOfRangeException.ThrowIfNegative(v0);
        if (ldz < chunk) throw new ArgumentOutOfRangeException(nameof(ldz), ldz, $"ldz must be at least chunk = {chunk}");
    }

    /// <summary>running_max = −∞, running_sum = 0, label_logit = 0 for rows rows (before the first chunk).</summary>
    public void Init(DevicePtr runningMax, DevicePtr runningSum, DevicePtr labelLogit, int rows)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        if (rows == 0) return;
        CheckPtr(runningMax, nameof(runningMax)); CheckPtr(runningSum, nameof(runningSum)); CheckPtr(labelLogit, nameof(labelLogit));
        _gpu.Launch("cross_entropy_init", Blocks1D(rows), ThreadsPerBlock, 0, runningMax, runningSum, labelLogit, rows);
    }

    /// <summary>
    /// Folds one logits chunk z[rows, chunk] (row stride ldz elements, vocabulary columns v0 .. v0+chunk−1) into the
    /// online log-sum-exp state, and records z[n, labels[n] − v0] into labelLogit[n] when the label is in the chunk.
    /// Launch: grid rows, block <see cref="ChunkBlockThreads"/>(chunk).
    /// </summary>
    public void ChunkForward(DType dtype, DevicePtr z, int rows, int chunk, long ldz, int v0, DevicePtr labels,
                             DevicePtr runningMax, DevicePtr runningSum, DevicePtr labelLogit)
    {
        string kernel = $"cross_entropy_chunk_forward_{Suffix(dtype)}";
        CheckChunk(rows, chunk, ldz, v0);
        if (rows == 0) return;
        CheckPtr(z, nameof(z)); CheckPtr(labels, nameof(labels));
        CheckPtr(runningMax, nameof(runningMax)); CheckPtr(runningSum, nameof(runningSum)); CheckPtr(labelLogit, nameof(labelLogit));
        _gpu.Launch(kernel, rows, ChunkBlockThreads(chunk), 0, z, rows, chunk, ldz, v0, labels, runningMax, runningSum, labelLogit);
    }

    /// <summary>
    /// After the last chunk: lse[n] = running_max + log(running_sum) for every row, lossPerRow[n] = lse − z[label] (0 for
    /// label −100, NaN for a label outside [0, vocab)). Launch: grid ceil(rows/256), block 256.
    /// </summary>
    public void Finish(DevicePtr runningMax, DevicePtr runningSum, DevicePtr labelLogit, DevicePtr labels, int rows, int vocab,
                       DevicePtr lse, DevicePtr lossPerRow)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(vocab);
        if (rows == 0) return;
        CheckPtr(runningMax, nameof(runningMax)); CheckPtr(runningSum, nameof(runningSum)); CheckPtr(labelLogit, nameof(labelLogit));
        CheckPtr(labels, nameof(labels)); CheckPtr(lse, nameof(lse)); CheckPtr(lossPerRow, nameof(lossPerRow));
        _gpu.Launch("cross_entropy_finish", Blocks1D(rows), ThreadsPerBlock, 0,
                    runningMax, runningSum, labelLogit, labels, rows, vocab, lse, lossPerRow);
    }

    /// <summary>
    /// output[0] (double) = Σ lossPerRow, output[1] (double) = number of labels ≠ −100, on the device in a fixed order
    /// (one block of 256 threads). The mean loss is output[0] / output[1] (0 when the count is 0).
    /// </summary>
    public void LossSum(DevicePtr lossPerRow, DevicePtr labels, int rows, DevicePtr output)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        CheckPtr(output, nameof(output));
        if (rows > 0) { CheckPtr(lossPerRow, nameof(lossPerRow)); CheckPtr(labels, nameof(labels)); }
        _gpu.Launch("cross_entropy_loss_sum", 1, ThreadsPerBlock, 0, lossPerRow, labels, rows, output);
    }

    /// <summary>
    /// In place on one logits chunk (as in <see cref="ChunkForward"/>): z[n, j] ← scale · (exp(z[n, j] − lse[n]) −
    /// [v0 + j == labels[n]]), and 0 on rows labelled −100. scale = dloss / count (see <see cref="BackwardScale"/>).
    /// Launch: grid rows, block <see cref="ChunkBlockThreads"/>(chunk).
    /// </summary>
    public void ChunkBackward(DType dtype, DevicePtr z, int rows, int chunk, long ldz, int v0, DevicePtr labels, DevicePtr lse, float scale)
    {
        string kernel = $"cross_entropy_chunk_backward_{Suffix(dtype)}";
        CheckChunk(rows, chunk, ldz, v0);
        if (rows == 0) return;
        CheckPtr(z, nameof(z)); CheckPtr(labels, nameof(labels)); CheckPtr(lse, nameof(lse));
        _gpu.Launch(kernel, rows, ChunkBlockThreads(chunk), 0, z, rows, chunk, ldz, v0, labels, lse, scale);
    }

    /// <summary>dloss / count as the backward kernel takes it (0 when no label counts).</summary>
    public static float BackwardScale(double dloss, int count) => count == 0 ? 0f : (float)(dloss / count);

    /// <summary>
    /// The host reduction of the loss: Σ lossPerRow in double in row order / count (count = labels ≠ −100), and the
    /// count; (0, 0) when every label is ignored. The same order as <see cref="Reference.CrossEntropyRef.Forward{T}"/>.
    /// </summary>
    public static (double Loss, int Count) MeanLoss(ReadOnlySpan<float> lossPerRow, ReadOnlySpan<int> labels)
    {
        if (labels.Length != lossPerRow.Length)
            throw new ArgumentException($"labels has {labels.Length} elements, lossPerRow {lossPerRow.Length}", nameof(labels));
        double total = 0;
        int count = 0;
        for (int n = 0; n < labels.Length; n++)
        {
            if (labels[n] == IgnoreIndex) continue;
            total += lossPerRow[n];
            count++;
        }
        return count == 0 ? (0, 0) : (total / count, count);
    }

    /// <summary>Throws <see cref="ArgumentOutOfRangeException"/> naming the position for a label not in [0, vocab) and not −100.</summary>
    public static void ValidateLabels(ReadOnlySpan<int> labels, int vocab)
    {
        for (int n = 0; n < labels.Length; n++)
        {
            int label = labels[n];
            if (label != IgnoreIndex && (uint)label >= (uint)vocab)
                throw new ArgumentOutOfRangeException(nameof(labels), label, $"label at position {n} is {label}: not in [0, {vocab}) and not {IgnoreIndex}");
        }
    }
}
