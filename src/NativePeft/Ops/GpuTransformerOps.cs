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
/// (a device-side assert, which on CUDA poisons the context). The host-array overloads validate them first, copy
/// in, launch, copy out and free; they are meant for tests and one-off use.
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

    /// <summary>The DType of a host element type: float → F32, <see cref="BFloat16"/> → BF16.</summary>
    public static DType DTypeOf<T>() where T : unmanaged =>
        KernelLaunch.DTypeOf<T>(allowF16: false, "transformer ops take float or BFloat16 values");

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

    private static void ValidateRopeShape(int tokens, int heads, int headDim, int maxPositions, ref long rowStride)
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

    // ------------------------------------------------------------------------------------------
    // Host-array convenience (copy in, launch, copy out, free). T is float or BFloat16.
    // ------------------------------------------------------------------------------------------

    private static int RowsOf(int length, int width, string name)
    {
        if (width <= 0)
            throw new ArgumentException("the row width must be positive", name);
        if (length % width != 0)
            throw new ArgumentException($"{name} has {length} elements, not a multiple of the row width {width}", name);
        return length / width;
    }

    /// <summary>
    /// RMSNorm forward on host arrays: hidden = w.Length, rows = x.Length / hidden; y like x; rstd has rows
    /// entries, or is empty to skip it.
    /// </summary>
    public void RmsNormForward<T>(ReadOnlySpan<T> x, ReadOnlySpan<T> w, Span<T> y, Span<float> rstd, float eps) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        int hidden = w.Length;
        int rows = RowsOf(x.Length, hidden, nameof(x));
        CheckLength(y.Length, x.Length, nameof(y));
        if (!rstd.IsEmpty)
            CheckLength(rstd.Length, rows, nameof(rstd));
        if (rows == 0)
            return;
        using var dX = DeviceBuffer.Upload(_gpu, x);
        using var dW = DeviceBuffer.Upload(_gpu, w);
        using var dY = new DeviceBuffer(_gpu, (long)x.Length * dtype.ElementSize());
        using var dR = new DeviceBuffer(_gpu, (long)rows * sizeof(float));
        RmsNormForward(dtype, dX.Ptr, dW.Ptr, dY.Ptr, rstd.IsEmpty ? DevicePtr.Null : dR.Ptr, rows, hidden, eps);
        _gpu.Synchronize();
        dY.Download(y);
        if (!rstd.IsEmpty)
            dR.Download(rstd);
    }

    /// <summary>
    /// RMSNorm backward on host arrays: dx (overwritten) like x, dw fp32 [hidden] accumulated (+=); dw empty skips it.
    /// </summary>
    public void RmsNormBackward<T>(ReadOnlySpan<T> x, ReadOnlySpan<T> w, ReadOnlySpan<T> dy, ReadOnlySpan<float> rstd,
                                   Span<T> dx, Span<float> dw) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        int hidden = w.Length;
        int rows = RowsOf(x.Length, hidden, nameof(x));
        CheckLength(dy.Length, x.Length, nameof(dy));
        CheckLength(dx.Length, x.Length, nameof(dx));
        CheckLength(rstd.Length, rows, nameof(rstd));
        if (!dw.IsEmpty)
            CheckLength(dw.Length, hidden, nameof(dw));
        if (rows == 0)
            return;
        using var dX = DeviceBuffer.Upload(_gpu, x);
        using var dW = DeviceBuffer.Upload(_gpu, w);
        using var dDy = DeviceBuffer.Upload(_gpu, dy);
        using var dR = DeviceBuffer.Upload(_gpu, rstd);
        using var dDx = new DeviceBuffer(_gpu, (long)x.Length * dtype.ElementSize());
        using var dDw = new DeviceBuffer(_gpu, (long)hidden * sizeof(float));
        if (!dw.IsEmpty)
            _gpu.CopyToDevice<float>(dw, dDw.Ptr);
        RmsNormBackward(dtype, dX.Ptr, dW.Ptr, dDy.Ptr, dR.Ptr, dDx.Ptr, dw.IsEmpty ? DevicePtr.Null : dDw.Ptr, rows, hidden);
        _gpu.Synchronize();
        dDx.Download(dx);
        if (!dw.IsEmpty)
            dDw.Download(dw);
    }

    /// <summary>
    /// RoPE forward in place on a contiguous host x [tokens, heads, headDim] (tokens = positions.Length); cos, sin
    /// fp32 [maxPositions, headDim / 2]. Throws <see cref="ArgumentOutOfRangeException"/> naming the token when a
    /// position is outside [0, maxPositions).
    /// </summary>
    public void RopeForward<T>(Span<T> x, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, ReadOnlySpan<int> positions,
                               int heads, int headDim) where T : unmanaged =>
        RopeHost(false, x, cos, sin, positions, heads, headDim);

    /// <summary>RoPE backward (dy → dx in place) on host arrays; arguments as <see cref="RopeForward{T}"/>.</summary>
    public void RopeBackward<T>(Span<T> dx, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, ReadOnlySpan<int> positions,
                                int heads, int headDim) where T : unmanaged =>
        RopeHost(true, dx, cos, sin, positions, heads, headDim);

    private void RopeHost<T>(bool backward, Span<T> x, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin,
                             ReadOnlySpan<int> positions, int heads, int headDim) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        int tokens = positions.Length;
        long rowStride = 0;
        ValidateRopeShape(tokens, heads, headDim, 1, ref rowStride);
        int half = headDim / 2;
        CheckLength(x.Length, (long)tokens * heads * headDim, nameof(x));
        if (cos.Length == 0 || cos.Length % half != 0)
            throw new ArgumentException($"cos has {cos.Length} values, not a positive multiple of headDim / 2 = {half}", nameof(cos));
        CheckLength(sin.Length, cos.Length, nameof(sin));
        int maxPositions = cos.Length / half;
        for (int n = 0; n < tokens; n++)
        {
            if ((uint)positions[n] >= (uint)maxPositions)
                throw new ArgumentOutOfRangeException(nameof(positions), positions[n],
                    $"positions[{n}] = {positions[n]} is outside [0, {maxPositions})");
        }
        if (tokens == 0)
            return;
        using var dX = DeviceBuffer.Upload<T>(_gpu, x);
        using var dCos = DeviceBuffer.Upload(_gpu, cos);
        using var dSin = DeviceBuffer.Upload(_gpu, sin);
        using var dPos = DeviceBuffer.Upload(_gpu, positions);
        if (backward)
            RopeBackward(dtype, dX.Ptr, dCos.Ptr, dSin.Ptr, dPos.Ptr, tokens, heads, headDim, maxPositions);
        else
            RopeForward(dtype, dX.Ptr, dCos.Ptr, dSin.Ptr, dPos.Ptr, tokens, heads, headDim, maxPositions);
        _gpu.Synchronize();
        dX.Download(x);
    }

    /// <summary>SwiGLU forward on host arrays: h = silu(g) * u, all of the same length.</summary>
    public void SwiGluForward<T>(ReadOnlySpan<T> g, ReadOnlySpan<T> u, Span<T> h) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckLength(u.Length, g.Length, nameof(u));
        CheckLength(h.Length, g.Length, nameof(h));
        if (g.IsEmpty)
            return;
        using var dG = DeviceBuffer.Upload(_gpu, g);
        using var dU = DeviceBuffer.Upload(_gpu, u);
        using var dH = new DeviceBuffer(_gpu, (long)g.Length * dtype.ElementSize());
        SwiGluForward(dtype, dG.Ptr, dU.Ptr, dH.Ptr, g.Length);
        _gpu.Synchronize();
        dH.Download(h);
    }

    /// <summary>SwiGLU backward on host arrays: dg, du (overwritten) from g, u, dh, all of the same length.</summary>
    public void SwiGluBackward<T>(ReadOnlySpan<T> g, ReadOnlySpan<T> u, ReadOnlySpan<T> dh, Span<T> dg, Span<T> du) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckLength(u.Length, g.Length, nameof(u));
        CheckLength(dh.Length, g.Length, nameof(dh));
        CheckLength(dg.Length, g.Length, nameof(dg));
        CheckLength(du.Length, g.Length, nameof(du));
        if (g.IsEmpty)
            return;
        long bytes = (long)g.Length * dtype.ElementSize();
        using var dG = DeviceBuffer.Upload(_gpu, g);
        using var dU = DeviceBuffer.Upload(_gpu, u);
        using var dDh = DeviceBuffer.Upload(_gpu, dh);
        using var dDg = new DeviceBuffer(_gpu, bytes);
        using var dDu = new DeviceBuffer(_gpu, bytes);
        SwiGluBackward(dtype, dG.Ptr, dU.Ptr, dDh.Ptr, dDg.Ptr, dDu.Ptr, g.Length);
        _gpu.Synchronize();
        dDg.Download(dg);
        dDu.Download(du);
    }

    private static void CheckIds(ReadOnlySpan<int> ids, int vocab)
    {
        for (int n = 0; n < ids.Length; n++)
        {
            if ((uint)ids[n] >= (uint)vocab)
                throw new ArgumentOutOfRangeException(nameof(ids), ids[n], $"ids[{n}] = {ids[n]} is outside [0, {vocab})");
        }
    }

    /// <summary>
    /// Embedding forward on host arrays: table [vocab, hidden] (vocab = table.Length / hidden), output [ids.Length,
    /// hidden]. Throws <see cref="ArgumentOutOfRangeException"/> naming the position and the id when an id is
    /// outside [0, vocab).
    /// </summary>
    public void EmbeddingForward<T>(ReadOnlySpan<int> ids, ReadOnlySpan<T> table, int hidden, Span<T> output) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckPositive(hidden, nameof(hidden));
        int vocab = RowsOf(table.Length, hidden, nameof(table));
        CheckPositive(vocab, nameof(table));
        CheckLength(output.Length, (long)ids.Length * hidden, nameof(output));
        CheckIds(ids, vocab);
        if (ids.IsEmpty)
            return;
        using var dIds = DeviceBuffer.Upload(_gpu, ids);
        using var dTable = DeviceBuffer.Upload(_gpu, table);
        using var dOut = new DeviceBuffer(_gpu, (long)output.Length * dtype.ElementSize());
        EmbeddingForward(dtype, dIds.Ptr, dTable.Ptr, dOut.Ptr, ids.Length, hidden, vocab);
        _gpu.Synchronize();
        dOut.Download(output);
    }

    /// <summary>
    /// Embedding backward on host arrays: dtable fp32 [vocab, hidden] += dout [ids.Length, hidden] scattered by ids,
    /// in token order. Ids are validated as in <see cref="EmbeddingForward{T}(ReadOnlySpan{int}, ReadOnlySpan{T}, int, Span{T})"/>.
    /// </summary>
    public void EmbeddingBackward<T>(ReadOnlySpan<int> ids, ReadOnlySpan<T> dout, int hidden, Span<float> dtable) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckPositive(hidden, nameof(hidden));
        int vocab = RowsOf(dtable.Length, hidden, nameof(dtable));
        CheckPositive(vocab, nameof(dtable));
        CheckLength(dout.Length, (long)ids.Length * hidden, nameof(dout));
        CheckIds(ids, vocab);
        if (ids.IsEmpty)
            return;
        using var dIds = DeviceBuffer.Upload(_gpu, ids);
        using var dDout = DeviceBuffer.Upload(_gpu, dout);
        using var dTable = DeviceBuffer.Upload<float>(_gpu, dtable);
        EmbeddingBackward(dtype, dIds.Ptr, dDout.Ptr, dTable.Ptr, ids.Length, hidden, vocab);
        _gpu.Synchronize();
        dTable.Download(dtable);
    }
}
