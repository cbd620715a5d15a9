using NativePeft.Numerics;
using NativePeft.Runtime;
using static NativePeft.Ops.KernelLaunch;

namespace NativePeft.Ops;

/// <summary>
/// The elementwise and row-wise transformer ops of GpuOps: launches kernels/rmsnorm.cu, rope.cu, swiglu.cu and
/// embedding.cu on an <see cref="IGpu"/> (the real device or the emulator). Semantics: docs/ops-contract.md;
/// the CPU references are NativePeft.Ops.Reference.{RmsNormRef, RopeRef, SwiGluRef, EmbeddingRef}.
/// <para>
/// Element types: activations and weights in <see cref="DType.F32"/> or <see cref="DType.BF16"/> (one dtype per
/// call for x, w, y, dy, dx, g, u, h, table, out), all math and reductions in fp32, rstd in fp32, ids and
/// positions int32, the weight gradients dw and dtable in fp32 and accumulated (+=).
/// </para>
/// <para>
/// The device-pointer methods only validate and launch (no synchronization, no copies); ids and positions live on
/// the device and are not checked there on the host: an out-of-range id or position traps in the kernel
/// (a device-side assert, which on CUDA poisons the context). Host-array wrappers (copy in, launch, copy out), which
/// validate ids and positions first, live in the test project (tests/NativePeft.Tests/Ops/HostArrayOps.cs).
/// </para>
/// <para>
/// Every result is deterministic: reductions have a fixed order that depends only on the sizes (not on the
/// device or the scheduling), and the embedding backward uses no atomics (its result is bit-identical to the
/// serial fp32 loop over tokens).
/// </para>
/// </summary>
public sealed class GpuTransformerOps
{
    /// <summary>Most threads per block of any kernel here (row kernels use fewer for narrow rows).</summary>
    public const int MaxThreadsPerBlock = 256;

    /// <summary>Columns per block of rmsnorm_backward_dw (block (32, 16)).</summary>
    public const int DwColumnsPerBlock = 32;

    /// <summary>Rows summed in parallel per column by rmsnorm_backward_dw (blockDim.y).</summary>
    public const int DwRowLanes = 16;

    private const int MaxGridY = 65535;
    private const int MaxVocabPartitions = 256;

    private readonly IGpu _gpu;
    private readonly int _maxGridBlocks;
    private readonly int _multiprocessors;

    /// <param name="gpu">The device the kernels run on; its kernel image must contain the four kernel files.</param>
    public GpuTransformerOps(IGpu gpu)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        _gpu = gpu;
        _multiprocessors = Math.Max(1, gpu.Properties.MultiprocessorCount);
        _maxGridBlocks = KernelLaunch.MaxGridStrideBlocks(gpu);
    }

    public IGpu Gpu => _gpu;

    // ------------------------------------------------------------------------------------------
    // Names, launch shapes, validation
    // ------------------------------------------------------------------------------------------

    /// <summary>The kernel name suffix for an element type: "f32" or "bf16".</summary>
    public static string DTypeSuffix(DType dtype) =>
        KernelLaunch.DTypeSuffix(dtype, allowF16: false, "transformer ops take F32 or BF16 values");

    /// <summary>
    /// Threads per block of the one-block-per-row kernels (RMSNorm, RoPE, embedding): min(256, 32 * ceil(width / 32)),
    /// at least 32. The RMSNorm reduction order depends on it, and so only on the row width.
    /// </summary>
    public static int RowBlockThreads(long width)
    {
        long warps = Math.Max(1, (width + 31) / 32);
        return (int)Math.Min(MaxThreadsPerBlock, warps * 32);
    }

    private int GridStride(long work, long perBlock) => KernelLaunch.GridBlocks(work, perBlock, _maxGridBlocks);

    /// <summary>
    /// Vocabulary partitions (grid.y) of embedding_backward: enough blocks to fill the device about four times,
    /// at most min(vocab, 256). Every block scans all ids, so more partitions cost more id reads; the result does
    /// not depend on the choice.
    /// </summary>
    internal int EmbeddingVocabPartitions(int hidden, int vocab)
    {
        int columnTiles = (int)((hidden + RowBlockThreads(hidden) - 1) / RowBlockThreads(hidden));
        long target = 4L * _multiprocessors;
        long g = (target + columnTiles - 1) / columnTiles;
        return (int)Math.Clamp(g, 1, Math.Min(vocab, MaxVocabPartitions));
    }

    // ------------------------------------------------------------------------------------------
    // RMSNorm
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// RMSNorm forward over <paramref name="rows"/> rows of <paramref name="hidden"/>: x, y [rows, hidden] and
    /// w [hidden] of <paramref name="dtype"/>; rstd[rows] fp32 = 1/sqrt(mean(x²) + eps) is written unless
    /// <paramref name="rstd"/> is null (inference). y may alias x. rows = 0 launches nothing.
    /// </summary>
    public void RmsNormForward(DType dtype, DevicePtr x, DevicePtr w, DevicePtr y, DevicePtr rstd, int rows, int hidden, float eps)
    {
        string kernel = $"rmsnorm_forward_{DTypeSuffix(dtype)}";
        CheckCount(rows, nameof(rows));
        CheckPositive(hidden, nameof(hidden));
        if (!(eps >= 0.0f) || float.IsInfinity(eps))
            throw new ArgumentOutOfRangeException(nameof(eps), eps, "eps must be finite and non-negative");
        if (rows == 0)
            return;
        CheckPtr(x, nameof(x)); CheckPtr(w, nameof(w)); CheckPtr(y, nameof(y));
        _gpu.Launch(kernel, rows, RowBlockThreads(hidden), 0, x, w, y, rstd, rows, hidden, eps);
    }

    /// <summary>
    /// RMSNorm backward: dx[rows, hidden] (overwritten, dtype; may alias dy) from x, w, dy and the forward's rstd;
    /// and dw[hidden] fp32 += sum over rows of dy * x * rstd. Either output may be null to skip it
    /// (two kernels: rmsnorm_backward for dx, rmsnorm_backward_dw for dw; dw is launched first, so dx may
    /// alias dy). With <paramref name="accumulate"/> dx += the gradient (summed in fp32, rounded once); dx must then
    /// not alias dy or x.
    /// </summary>
    public void RmsNormBackward(DType dtype, DevicePtr x, DevicePtr w, DevicePtr dy, DevicePtr rstd, DevicePtr dx, DevicePtr dw,
                                int rows, int hidden, bool accumulate = false)
    {
        string suffix = DTypeSuffix(dtype);
        CheckCount(rows, nameof(rows));
        CheckPositive(hidden, nameof(hidden));
        if (rows == 0)
            return;
        CheckPtr(x, nameof(x)); CheckPtr(dy, nameof(dy)); CheckPtr(rstd, nameof(rstd));
        if (!dw.IsNull)
        {
            int grid = (hidden + DwColumnsPerBlock - 1) / DwColumnsPerBlock;
            _gpu.Launch($"rmsnorm_backward_dw_{suffix}", grid, new Dim3(DwColumnsPerBlock, DwRowLanes), 0,
                x, dy, rstd, dw, rows, hidden);
        }
        if (!dx.IsNull)
        {
            CheckPtr(w, nameof(w));
            if (accumulate && (dx == dy || dx == x))
                throw new ArgumentException("dx: accumulating into dx needs a buffer apart from dy and x", nameof(dx));
            _gpu.Launch($"rmsnorm_backward_{suffix}", rows, RowBlockThreads(hidden), 0, x, w, dy, rstd, dx, rows, hidden, accumulate ? 1 : 0);
        }
    }

    // ------------------------------------------------------------------------------------------
    // RoPE
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// Rotary embedding in place (HF rotate_half layout) on x: <paramref name="tokens"/> rows (B*T) of
    /// <paramref name="heads"/> heads of <paramref name="headDim"/> (even) values; row n starts at element
    /// n * rowStride (0 means heads * headDim: a contiguous [B, T, H, D] tensor; larger strides rotate q or k inside
    /// a fused projection output). cos, sin: fp32 tables [maxPositions, headDim / 2]; positions: int32 [tokens],
    /// each in [0, maxPositions) (not checked here: the kernel traps).
    /// </summary>
    public void RopeForward(DType dtype, DevicePtr x, DevicePtr cos, DevicePtr sin, DevicePtr positions,
                            int tokens, int heads, int headDim, int maxPositions, long rowStride = 0) =>
        Rope("rope_forward", dtype, x, cos, sin, positions, tokens, heads, headDim, maxPositions, rowStride);

    /// <summary>The RoPE backward: dy → dx in place, the same rotation with the angle negated. Arguments as <see cref="RopeForward"/>.</summary>
    public void RopeBackward(DType dtype, DevicePtr dx, DevicePtr cos, DevicePtr sin, DevicePtr positions,
                             int tokens, int heads, int headDim, int maxPositions, long rowStride = 0) =>
        Rope("rope_backward", dtype, dx, cos, sin, positions, tokens, heads, headDim, maxPositions, rowStride);

    private void Rope(string op, DType dtype, DevicePtr x, DevicePtr cos, DevicePtr sin, DevicePtr positions,
                      int tokens, int heads, int headDim, int maxPositions, long rowStride)
    {
        string kernel = $"{op}_{DTypeSuffix(dtype)}";
        ValidateRopeShape(tokens, heads, headDim, maxPositions, ref rowStride);
        if (tokens == 0)
            return;
        CheckPtr(x, nameof(x)); CheckPtr(cos, nameof(cos)); CheckPtr(sin, nameof(sin)); CheckPtr(positions, nameof(positions));
        long pairs = (long)heads * (headDim / 2);
        _gpu.Launch(kernel, tokens, RowBlockThreads(pairs), 0, x, cos, sin, positions, tokens, heads, headDim, maxPositions, rowStride);
    }

    internal static void ValidateRopeShape(int tokens, int heads, int headDim, int maxPositions, ref long rowStride)
    {
        CheckCount(tokens, nameof(tokens));
        CheckPositive(heads, nameof(heads));
        CheckPositive(headDim, nameof(headDim));
        if (headDim % 2 != 0)
            throw new ArgumentException($"headDim must be even for rotate_half RoPE, got {headDim}", nameof(headDim));
        CheckPositive(maxPositions, nameof(maxPositions));
        long width = (long)heads * headDim;
        if (width > int.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(heads), $"heads * headDim = {width} exceeds int.MaxValue");
        if (rowStride == 0)
            rowStride = width;
        if (rowStride < width)
            throw new ArgumentOutOfRangeException(nameof(rowStride), rowStride, $"rowStride must be at least heads * headDim = {width}");
    }

    // ------------------------------------------------------------------------------------------
    // SwiGLU
    // ------------------------------------------------------------------------------------------

    /// <summary>h[n] = silu(g[n]) * u[n] over n elements (N * intermediate) of dtype; h may alias g or u.</summary>
    public void SwiGluForward(DType dtype, DevicePtr g, DevicePtr u, DevicePtr h, long n)
    {
        string kernel = $"swiglu_forward_{DTypeSuffix(dtype)}";
        CheckCount(n, nameof(n));
        if (n == 0)
            return;
        CheckPtr(g, nameof(g)); CheckPtr(u, nameof(u)); CheckPtr(h, nameof(h));
        _gpu.Launch(kernel, GridStride(KernelLaunch.CeilDiv(n, 8), MaxThreadsPerBlock), MaxThreadsPerBlock, 0, g, u, h, n); // 8 elements a thread
    }

    /// <summary>
    /// SwiGLU backward: dg = dh * u * silu'(g), du = dh * silu(g) (both overwritten, dtype); dg may alias g and du
    /// may alias u (in place).
    /// </summary>
    public void SwiGluBackward(DType dtype, DevicePtr g, DevicePtr u, DevicePtr dh, DevicePtr dg, DevicePtr du, long n)
    {
        string kernel = $"swiglu_backward_{DTypeSuffix(dtype)}";
        CheckCount(n, nameof(n));
        if (n == 0)
            return;
        CheckPtr(g, nameof(g)); CheckPtr(u, nameof(u)); CheckPtr(dh, nameof(dh)); CheckPtr(dg, nameof(dg)); CheckPtr(du, nameof(du));
        _gpu.Launch(kernel, GridStride(KernelLaunch.CeilDiv(n, 8), MaxThreadsPerBlock), MaxThreadsPerBlock, 0, g, u, dh, dg, du, n);
    }

    // ------------------------------------------------------------------------------------------
    // Embedding
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// out[n, :] = table[ids[n], :] for n &lt; tokens: ids int32 [tokens] in [0, vocab) (not checked here: the
    /// kernel traps), table [vocab, hidden] and out [tokens, hidden] of dtype.
    /// </summary>
    public void EmbeddingForward(DType dtype, DevicePtr ids, DevicePtr table, DevicePtr output, int tokens, int hidden, int vocab)
    {
        string kernel = $"embedding_forward_{DTypeSuffix(dtype)}";
        CheckCount(tokens, nameof(tokens));
        CheckPositive(hidden, nameof(hidden));
        CheckPositive(vocab, nameof(vocab));
        if (tokens == 0)
            return;
        CheckPtr(ids, nameof(ids)); CheckPtr(table, nameof(table)); CheckPtr(output, nameof(output));
        _gpu.Launch(kernel, tokens, RowBlockThreads(hidden), 0, ids, table, output, tokens, hidden, vocab);
    }

    /// <summary>
    /// dtable[ids[n], :] += dout[n, :] in token order, dtable fp32 [vocab, hidden], dout [tokens, hidden] of dtype.
    /// Deterministic, no atomics: bit-identical to the serial fp32 loop.
    /// </summary>
    public void EmbeddingBackward(DType dtype, DevicePtr ids, DevicePtr dout, DevicePtr dtable, int tokens, int hidden, int vocab) =>
        EmbeddingBackward(dtype, ids, dout, dtable, tokens, hidden, vocab, vocabPartitions: 0);

    /// <summary>As the public overload, with an explicit number of vocabulary partitions (0: automatic).</summary>
    internal void EmbeddingBackward(DType dtype, DevicePtr ids, DevicePtr dout, DevicePtr dtable, int tokens, int hidden, int vocab,
                                    int vocabPartitions)
    {
        string kernel = $"embedding_backward_{DTypeSuffix(dtype)}";
        CheckCount(tokens, nameof(tokens));
        CheckPositive(hidden, nameof(hidden));
        CheckPositive(vocab, nameof(vocab));
        if (vocabPartitions < 0 || vocabPartitions > Math.Min(vocab, MaxGridY))
            throw new ArgumentOutOfRangeException(nameof(vocabPartitions), vocabPartitions, $"must be in [0, min(vocab, {MaxGridY})]");
        if (tokens == 0)
            return;
        CheckPtr(ids, nameof(ids)); CheckPtr(dout, nameof(dout)); CheckPtr(dtable, nameof(dtable));
        int threads = RowBlockThreads(hidden);
        int columnTiles = (hidden + threads - 1) / threads;
        int g = vocabPartitions > 0 ? vocabPartitions : EmbeddingVocabPartitions(hidden, vocab);
        _gpu.Launch(kernel, new Dim3((uint)columnTiles, (uint)g), threads, 0, ids, dout, dtable, tokens, hidden, vocab);
    }
}
