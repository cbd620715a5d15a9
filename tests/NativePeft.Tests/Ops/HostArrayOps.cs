using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Runtime;
using static NativePeft.Ops.KernelLaunch;

namespace NativePeft.Tests.Ops;

/// <summary>
/// Host-array wrappers of the kernel launchers for the tests: copy the inputs to the device, launch the
/// device-pointer method, synchronize, copy the outputs back and free. They validate lengths, ids and positions on
/// the host first (an out-of-range id or position would otherwise trap in the kernel). T is float or BFloat16.
/// They were public overloads of <see cref="GpuTransformerOps"/>, <see cref="GpuAttentionOps"/> and
/// <see cref="GpuQuantOps"/> used only by tests (issue 11, item 6); the quantize / dequantize host overloads that
/// the checkpoint conversion uses stay in the library.
/// </summary>
internal static class HostArrayOps
{
    /// <summary>The DType of a host element type of the transformer and attention ops: float → F32, BFloat16 → BF16.</summary>
    public static DType DTypeOf<T>() where T : unmanaged =>
        KernelLaunch.DTypeOf<T>(allowF16: false, "transformer ops take float or BFloat16 values");

    private static int RowsOf(int length, int width, string name)
    {
        if (width <= 0)
            throw new ArgumentException("the row width must be positive", name);
        if (length % width != 0)
            throw new ArgumentException($"{name} has {length} elements, not a multiple of the row width {width}", name);
        return length / width;
    }

    private static void CheckIds(ReadOnlySpan<int> ids, int vocab)
    {
        for (int n = 0; n < ids.Length; n++)
        {
            if ((uint)ids[n] >= (uint)vocab)
                throw new ArgumentOutOfRangeException(nameof(ids), ids[n], $"ids[{n}] = {ids[n]} is outside [0, {vocab})");
        }
    }

    // ------------------------------------------------------------------------------------------
    // GpuTransformerOps
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// RMSNorm forward on host arrays: hidden = w.Length, rows = x.Length / hidden; y like x; rstd has rows
    /// entries, or is empty to skip it.
    /// </summary>
    public static void RmsNormForward<T>(this GpuTransformerOps ops, ReadOnlySpan<T> x, ReadOnlySpan<T> w, Span<T> y,
                                         Span<float> rstd, float eps) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        int hidden = w.Length;
        int rows = RowsOf(x.Length, hidden, nameof(x));
        CheckLength(y.Length, x.Length, nameof(y));
        if (!rstd.IsEmpty)
            CheckLength(rstd.Length, rows, nameof(rstd));
        if (rows == 0)
            return;
        IGpu gpu = ops.Gpu;
        using var dX = DeviceBuffer.Upload(gpu, x);
        using var dW = DeviceBuffer.Upload(gpu, w);
        using var dY = new DeviceBuffer(gpu, (long)x.Length * dtype.ElementSize());
        using var dR = new DeviceBuffer(gpu, (long)rows * sizeof(float));
        ops.RmsNormForward(dtype, dX.Ptr, dW.Ptr, dY.Ptr, rstd.IsEmpty ? DevicePtr.Null : dR.Ptr, rows, hidden, eps);
        gpu.Synchronize();
        dY.Download(y);
        if (!rstd.IsEmpty)
            dR.Download(rstd);
    }

    /// <summary>
    /// RMSNorm backward on host arrays: dx (overwritten) like x, dw fp32 [hidden] accumulated (+=); dw empty skips it.
    /// </summary>
    public static void RmsNormBackward<T>(this GpuTransformerOps ops, ReadOnlySpan<T> x, ReadOnlySpan<T> w, ReadOnlySpan<T> dy,
                                          ReadOnlySpan<float> rstd, Span<T> dx, Span<float> dw) where T : unmanaged
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
        IGpu gpu = ops.Gpu;
        using var dX = DeviceBuffer.Upload(gpu, x);
        using var dW = DeviceBuffer.Upload(gpu, w);
        using var dDy = DeviceBuffer.Upload(gpu, dy);
        using var dR = DeviceBuffer.Upload(gpu, rstd);
        using var dDx = new DeviceBuffer(gpu, (long)x.Length * dtype.ElementSize());
        using var dDw = new DeviceBuffer(gpu, (long)hidden * sizeof(float));
        if (!dw.IsEmpty)
            gpu.CopyToDevice<float>(dw, dDw.Ptr);
        ops.RmsNormBackward(dtype, dX.Ptr, dW.Ptr, dDy.Ptr, dR.Ptr, dDx.Ptr, dw.IsEmpty ? DevicePtr.Null : dDw.Ptr, rows, hidden);
        gpu.Synchronize();
        dDx.Download(dx);
        if (!dw.IsEmpty)
            dDw.Download(dw);
    }

    /// <summary>
    /// RoPE forward in place on a contiguous host x [tokens, heads, headDim] (tokens = positions.Length); cos, sin
    /// fp32 [maxPositions, headDim / 2]. Throws <see cref="ArgumentOutOfRangeException"/> naming the token when a
    /// position is outside [0, maxPositions).
    /// </summary>
    public static void RopeForward<T>(this GpuTransformerOps ops, Span<T> x, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin,
                                      ReadOnlySpan<int> positions, int heads, int headDim) where T : unmanaged =>
        RopeHost(ops, false, x, cos, sin, positions, heads, headDim);

    /// <summary>RoPE backward (dy → dx in place) on host arrays; arguments as <see cref="RopeForward{T}"/>.</summary>
    public static void RopeBackward<T>(this GpuTransformerOps ops, Span<T> dx, ReadOnlySpan<float> cos, ReadOnlySpan<float> sin,
                                       ReadOnlySpan<int> positions, int heads, int headDim) where T : unmanaged =>
        RopeHost(ops, true, dx, cos, sin, positions, heads, headDim);

    private static void RopeHost<T>(GpuTransformerOps ops, bool backward, Span<T> x, ReadOnlySpan<float> cos,
                                    ReadOnlySpan<float> sin, ReadOnlySpan<int> positions, int heads, int headDim)
        where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        int tokens = positions.Length;
        long rowStride = 0;
        GpuTransformerOps.ValidateRopeShape(tokens, heads, headDim, 1, ref rowStride);
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
        IGpu gpu = ops.Gpu;
        using var dX = DeviceBuffer.Upload<T>(gpu, x);
        using var dCos = DeviceBuffer.Upload(gpu, cos);
        using var dSin = DeviceBuffer.Upload(gpu, sin);
        using var dPos = DeviceBuffer.Upload(gpu, positions);
        if (backward)
            ops.RopeBackward(dtype, dX.Ptr, dCos.Ptr, dSin.Ptr, dPos.Ptr, tokens, heads, headDim, maxPositions);
        else
            ops.RopeForward(dtype, dX.Ptr, dCos.Ptr, dSin.Ptr, dPos.Ptr, tokens, heads, headDim, maxPositions);
        gpu.Synchronize();
        dX.Download(x);
    }

    /// <summary>SwiGLU forward on host arrays: h = silu(g) * u, all of the same length.</summary>
    public static void SwiGluForward<T>(this GpuTransformerOps ops, ReadOnlySpan<T> g, ReadOnlySpan<T> u, Span<T> h)
        where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckLength(u.Length, g.Length, nameof(u));
        CheckLength(h.Length, g.Length, nameof(h));
        if (g.IsEmpty)
            return;
        IGpu gpu = ops.Gpu;
        using var dG = DeviceBuffer.Upload(gpu, g);
        using var dU = DeviceBuffer.Upload(gpu, u);
        using var dH = new DeviceBuffer(gpu, (long)g.Length * dtype.ElementSize());
        ops.SwiGluForward(dtype, dG.Ptr, dU.Ptr, dH.Ptr, g.Length);
        gpu.Synchronize();
        dH.Download(h);
    }

    /// <summary>SwiGLU backward on host arrays: dg, du (overwritten) from g, u, dh, all of the same length.</summary>
    public static void SwiGluBackward<T>(this GpuTransformerOps ops, ReadOnlySpan<T> g, ReadOnlySpan<T> u, ReadOnlySpan<T> dh,
                                         Span<T> dg, Span<T> du) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckLength(u.Length, g.Length, nameof(u));
        CheckLength(dh.Length, g.Length, nameof(dh));
        CheckLength(dg.Length, g.Length, nameof(dg));
        CheckLength(du.Length, g.Length, nameof(du));
        if (g.IsEmpty)
            return;
        long bytes = (long)g.Length * dtype.ElementSize();
        IGpu gpu = ops.Gpu;
        using var dG = DeviceBuffer.Upload(gpu, g);
        using var dU = DeviceBuffer.Upload(gpu, u);
        using var dDh = DeviceBuffer.Upload(gpu, dh);
        using var dDg = new DeviceBuffer(gpu, bytes);
        using var dDu = new DeviceBuffer(gpu, bytes);
        ops.SwiGluBackward(dtype, dG.Ptr, dU.Ptr, dDh.Ptr, dDg.Ptr, dDu.Ptr, g.Length);
        gpu.Synchronize();
        dDg.Download(dg);
        dDu.Download(du);
    }

    /// <summary>
    /// Embedding forward on host arrays: table [vocab, hidden] (vocab = table.Length / hidden), output [ids.Length,
    /// hidden]. Throws <see cref="ArgumentOutOfRangeException"/> naming the position and the id when an id is
    /// outside [0, vocab).
    /// </summary>
    public static void EmbeddingForward<T>(this GpuTransformerOps ops, ReadOnlySpan<int> ids, ReadOnlySpan<T> table, int hidden,
                                           Span<T> output) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckPositive(hidden, nameof(hidden));
        int vocab = RowsOf(table.Length, hidden, nameof(table));
        CheckPositive(vocab, nameof(table));
        CheckLength(output.Length, (long)ids.Length * hidden, nameof(output));
        CheckIds(ids, vocab);
        if (ids.IsEmpty)
            return;
        IGpu gpu = ops.Gpu;
        using var dIds = DeviceBuffer.Upload(gpu, ids);
        using var dTable = DeviceBuffer.Upload(gpu, table);
        using var dOut = new DeviceBuffer(gpu, (long)output.Length * dtype.ElementSize());
        ops.EmbeddingForward(dtype, dIds.Ptr, dTable.Ptr, dOut.Ptr, ids.Length, hidden, vocab);
        gpu.Synchronize();
        dOut.Download(output);
    }

    /// <summary>
    /// Embedding backward on host arrays: dtable fp32 [vocab, hidden] += dout [ids.Length, hidden] scattered by ids,
    /// in token order. Ids are validated as in the forward.
    /// </summary>
    public static void EmbeddingBackward<T>(this GpuTransformerOps ops, ReadOnlySpan<int> ids, ReadOnlySpan<T> dout, int hidden,
                                            Span<float> dtable) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        CheckPositive(hidden, nameof(hidden));
        int vocab = RowsOf(dtable.Length, hidden, nameof(dtable));
        CheckPositive(vocab, nameof(dtable));
        CheckLength(dout.Length, (long)ids.Length * hidden, nameof(dout));
        CheckIds(ids, vocab);
        if (ids.IsEmpty)
            return;
        IGpu gpu = ops.Gpu;
        using var dIds = DeviceBuffer.Upload(gpu, ids);
        using var dDout = DeviceBuffer.Upload(gpu, dout);
        using var dTable = DeviceBuffer.Upload<float>(gpu, dtable);
        ops.EmbeddingBackward(dtype, dIds.Ptr, dDout.Ptr, dTable.Ptr, ids.Length, hidden, vocab);
        gpu.Synchronize();
        dTable.Download(dtable);
    }

    // ------------------------------------------------------------------------------------------
    // GpuAttentionOps
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// Forward on host arrays: q, output [batch, seqLen, headsQ, headDim], k, v [batch, seqLen, headsKv, headDim];
    /// lse [batch, headsQ, seqLen], or empty to skip it; positions [batch, seqLen] inside packed documents, or empty
    /// (causal; checked with <see cref="NativePeft.Ops.Reference.AttentionRef.ValidatePositions"/>).
    /// </summary>
    public static void Forward<T>(this GpuAttentionOps ops, ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v,
                                  Span<T> output, Span<float> lse, int batch, int seqLen, int headsQ, int headsKv,
                                  int headDim, ReadOnlySpan<int> positions = default) where T : unmanaged
    {
        GpuAttentionOps.ValidateShape(batch, seqLen, headsQ, headsKv, headDim);
        if (!positions.IsEmpty) NativePeft.Ops.Reference.AttentionRef.ValidatePositions(positions, batch, seqLen);
        ForwardOnHost(ops, q, k, v, output, lse, positions, batch, seqLen, seqLen, headsQ, headsKv, headDim, cached: false);
    }

    /// <summary>
    /// The cached (decoding) forward on host arrays: q, output [batch, queryLen, headsQ, headDim], k, v [batch, keyLen,
    /// headsKv, headDim]; lse [batch, headsQ, queryLen], or empty to skip it.
    /// </summary>
    public static void ForwardCached<T>(this GpuAttentionOps ops, ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v,
                                        Span<T> output, Span<float> lse, int batch, int queryLen, int keyLen, int headsQ,
                                        int headsKv, int headDim) where T : unmanaged
    {
        GpuAttentionOps.ValidateShape(batch, keyLen, headsQ, headsKv, headDim);
        if (queryLen < 1 || queryLen > keyLen)
            throw new ArgumentOutOfRangeException(nameof(queryLen), queryLen, $"queryLen must be in [1, keyLen = {keyLen}]");
        ForwardOnHost(ops, q, k, v, output, lse, default, batch, queryLen, keyLen, headsQ, headsKv, headDim, cached: true);
    }

    /// <summary>The host-array forward of both kernels: check the lengths, copy in, launch, copy out.</summary>
    private static void ForwardOnHost<T>(GpuAttentionOps ops, ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v,
                                         Span<T> output, Span<float> lse, ReadOnlySpan<int> positions, int batch, int queryLen,
                                         int keyLen, int headsQ, int headsKv, int headDim, bool cached) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        long qn = (long)batch * queryLen * headsQ * headDim, kvn = (long)batch * keyLen * headsKv * headDim;
        long ln = (long)batch * headsQ * queryLen;
        CheckLength(q.Length, qn, nameof(q)); CheckLength(k.Length, kvn, nameof(k)); CheckLength(v.Length, kvn, nameof(v));
        CheckLength(output.Length, qn, nameof(output));
        if (!lse.IsEmpty) CheckLength(lse.Length, ln, nameof(lse));
        if (qn == 0)
            return;
        IGpu gpu = ops.Gpu;
        using var dQ = DeviceBuffer.Upload(gpu, q);
        using var dK = DeviceBuffer.Upload(gpu, k);
        using var dV = DeviceBuffer.Upload(gpu, v);
        using var dO = new DeviceBuffer(gpu, qn * dtype.ElementSize());
        using var dL = new DeviceBuffer(gpu, ln * sizeof(float));
        using var dP = positions.IsEmpty ? null : DeviceBuffer.Upload(gpu, positions);
        var lsePtr = lse.IsEmpty ? DevicePtr.Null : dL.Ptr;
        if (cached) ops.ForwardCached(dtype, dQ.Ptr, dK.Ptr, dV.Ptr, dO.Ptr, lsePtr, batch, queryLen, keyLen, headsQ, headsKv, headDim);
        else ops.Forward(dtype, dQ.Ptr, dK.Ptr, dV.Ptr, dO.Ptr, lsePtr, batch, queryLen, headsQ, headsKv, headDim, dP?.Ptr ?? DevicePtr.Null);
        gpu.Synchronize();
        dO.Download(output);
        if (!lse.IsEmpty)
            dL.Download(lse);
    }

    /// <summary>
    /// Backward on host arrays: dq like q, dk and dv like k (all overwritten) from dout (like q), q, k, v, the forward's
    /// output (like q) and lse [batch, headsQ, seqLen]; positions as for the forward (empty: causal).
    /// </summary>
    public static void Backward<T>(this GpuAttentionOps ops, ReadOnlySpan<T> dout, ReadOnlySpan<T> q, ReadOnlySpan<T> k,
                                   ReadOnlySpan<T> v, ReadOnlySpan<T> output, ReadOnlySpan<float> lse, Span<T> dq, Span<T> dk,
                                   Span<T> dv, int batch, int seqLen, int headsQ, int headsKv, int headDim,
                                   ReadOnlySpan<int> positions = default) where T : unmanaged
    {
        DType dtype = DTypeOf<T>();
        GpuAttentionOps.ValidateShape(batch, seqLen, headsQ, headsKv, headDim);
        if (!positions.IsEmpty) NativePeft.Ops.Reference.AttentionRef.ValidatePositions(positions, batch, seqLen);
        long qn = (long)batch * seqLen * headsQ * headDim, kvn = (long)batch * seqLen * headsKv * headDim;
        long ln = (long)batch * headsQ * seqLen;
        CheckLength(dout.Length, qn, nameof(dout)); CheckLength(q.Length, qn, nameof(q));
        CheckLength(k.Length, kvn, nameof(k)); CheckLength(v.Length, kvn, nameof(v));
        CheckLength(output.Length, qn, nameof(output)); CheckLength(lse.Length, ln, nameof(lse));
        CheckLength(dq.Length, qn, nameof(dq)); CheckLength(dk.Length, kvn, nameof(dk)); CheckLength(dv.Length, kvn, nameof(dv));
        if (qn == 0)
            return;
        int es = dtype.ElementSize();
        IGpu gpu = ops.Gpu;
        using var dDo = DeviceBuffer.Upload(gpu, dout);
        using var dQ = DeviceBuffer.Upload(gpu, q);
        using var dK = DeviceBuffer.Upload(gpu, k);
        using var dV = DeviceBuffer.Upload(gpu, v);
        using var dO = DeviceBuffer.Upload(gpu, output);
        using var dL = DeviceBuffer.Upload(gpu, lse);
        using var dDq = new DeviceBuffer(gpu, qn * es);
        using var dDk = new DeviceBuffer(gpu, kvn * es);
        using var dDv = new DeviceBuffer(gpu, kvn * es);
        using var work = new DeviceBuffer(gpu, GpuAttentionOps.BackwardWorkspaceBytes(batch, seqLen, headsQ));
        using var dP = positions.IsEmpty ? null : DeviceBuffer.Upload(gpu, positions);
        ops.Backward(dtype, dDo.Ptr, dQ.Ptr, dK.Ptr, dV.Ptr, dO.Ptr, dL.Ptr, dDq.Ptr, dDk.Ptr, dDv.Ptr, work.Ptr,
            batch, seqLen, headsQ, headsKv, headDim, dP?.Ptr ?? DevicePtr.Null);
        gpu.Synchronize();
        dDq.Download(dq);
        dDk.Download(dk);
        dDv.Download(dv);
    }

    // ------------------------------------------------------------------------------------------
    // GpuQuantOps
    // ------------------------------------------------------------------------------------------

    /// <summary>y = W x for one token with a host 4-bit weight [y.Length, x.Length].</summary>
    public static void Gemv4bit<T>(this GpuQuantOps ops, QuantType quantType, ReadOnlySpan<T> x, ReadOnlySpan<byte> packedW,
                                   ReadOnlySpan<float> absmax, int blocksize, Span<T> y) where T : unmanaged
    {
        GpuQuantOps.ValidateBlocksize(blocksize);
        DType dtype = GpuQuantOps.DTypeOf<T>();
        int inFeatures = x.Length, outFeatures = y.Length;
        long n = (long)inFeatures * outFeatures;
        if (packedW.Length < GpuQuantOps.PackedBytes(n))
            throw new ArgumentException($"packedW holds {packedW.Length} bytes, {GpuQuantOps.PackedBytes(n)} needed", nameof(packedW));
        if (absmax.Length < GpuQuantOps.AbsmaxCount(n, blocksize))
            throw new ArgumentException($"absmax holds {absmax.Length} values, {GpuQuantOps.AbsmaxCount(n, blocksize)} needed", nameof(absmax));
        if (outFeatures == 0)
            return;
        if (inFeatures == 0)
        {
            y.Clear();
            return;
        }
        IGpu gpu = ops.Gpu;
        using var dx = DeviceBuffer.Upload(gpu, x);
        using var dW = DeviceBuffer.Upload(gpu, packedW[..(int)GpuQuantOps.PackedBytes(n)]);
        using var dAbsmax = DeviceBuffer.Upload(gpu, absmax[..(int)GpuQuantOps.AbsmaxCount(n, blocksize)]);
        using var dy = new DeviceBuffer(gpu, (long)outFeatures * dtype.ElementSize());
        ops.Gemv4bit(quantType, dtype, dx.Ptr, dW.Ptr, dAbsmax.Ptr, dy.Ptr, outFeatures, inFeatures, blocksize);
        gpu.Synchronize();
        dy.Download(y);
    }
}
