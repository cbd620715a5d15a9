using NativePeft.Numerics;
using NativePeft.Runtime;
using static NativePeft.Ops.KernelLaunch;

namespace NativePeft.Ops;

/// <summary>
/// Causal grouped-query attention on an <see cref="IGpu"/> (the real device or the emulator): launches the kernels of
/// kernels/attention.cu. Semantics: docs/ops-contract.md "Causal attention"; the CPU reference is
/// <see cref="Reference.AttentionRef"/>.
/// <para>
/// Layouts (row-major): q, output, dout, dq [B, T, Hq, D]; k, v, dk, dv [B, T, Hkv, D]; lse [B, Hq, T] fp32 (the
/// natural-log log-sum-exp of the scaled scores, written by the forward and read by the backward). Query head h
/// reads kv head h / (Hq / Hkv); scale = 1/sqrt(D); query t attends to keys s &lt;= t.
/// </para>
/// <para>
/// Packed sequences: <see cref="Forward(DType, DevicePtr, DevicePtr, DevicePtr, DevicePtr, DevicePtr, int, int, int, int, int, DevicePtr)"/>
/// and <see cref="O:NativePeft.Ops.GpuAttentionOps.Backward"/>
/// take an optional positions pointer, I32 [B, T]: each token's position inside its document (0 at a document start,
/// +1 per token; <see cref="Reference.AttentionRef.ValidatePositions"/> states the rule, the kernels do not check it).
/// Query t then sees keys s with t − positions[t] ≤ s ≤ t, so no row attends across a document boundary; null is plain
/// causal attention, with the same launches and bits as before. The cached (decoding) forward has no positions.
/// </para>
/// <para>
/// Element types: q, k, v, output, dout, dq, dk, dv in <see cref="DType.F32"/> or <see cref="DType.BF16"/> (one
/// dtype per call); all math in fp32 (online softmax, scores never stored in global memory), every output
/// rounded once. Head dimension 1..<see cref="MaxHeadDim"/>.
/// </para>
/// <para>
/// Deterministic: no atomics, every sum has a fixed order that depends only on the shapes, so results are
/// bit-identical from run to run. The backward runs three kernels (delta = rowsum(dout ∘ out) into a caller's fp32
/// workspace, then dk/dv per key tile over the group's query heads, then dq per query tile); dq, dk, dv are
/// overwritten.
/// </para>
/// <para>
/// The methods only validate and launch (no synchronization, no copies). Host-array wrappers (copy in, launch, copy
/// out) live in the test project (tests/NativePeft.Tests/Ops/HostArrayOps.cs).
/// </para>
/// </summary>
public sealed class GpuAttentionOps
{
    /// <summary>The largest head dimension the kernels take (compile-time ATTN_MAX_HEAD_DIM).</summary>
    public const int MaxHeadDim = 128;

    /// <summary>Threads per block of every attention kernel.</summary>
    public const int ThreadsPerBlock = 128;

    /// <summary>Query rows per block of attention_forward.</summary>
    public const int ForwardQueryTile = 32;

    /// <summary>Keys per shared-memory tile of attention_forward.</summary>
    public const int ForwardKeyTile = 16;

    /// <summary>Rows (queries or keys) per tile of the backward kernels.</summary>
    public const int BackwardTile = 16;

    private const int MaxGridYZ = 65535;
    private const int RowsPerPreprocessBlock = ThreadsPerBlock / 32;

    /// <summary>Query rows per block of the tensor-core forward (4 warps of 16 rows).</summary>
    public const int TcQueryTile = 64;

    /// <summary>Keys per shared-memory tile of the tensor-core forward.</summary>
    public const int TcKeyTile = 64;

    private readonly IGpu _gpu;

    /// <param name="gpu">The device the kernels run on; its kernel image must contain kernels/attention.cu and
    /// kernels/attention_tc.cu.</param>
    /// <param name="tensorCores">Run bf16 attention with head dimension 64 or 128 on the tensor-core kernels
    /// (kernels/attention_tc*.cu: mma.sync, ldmatrix, cp.async; P and dS rounded to bf16 as MMA operands). false: the
    /// fp32-arithmetic kernels of kernels/attention.cu for every shape (what f32 and other head dims always use).</param>
    public GpuAttentionOps(IGpu gpu, bool tensorCores = true)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        _gpu = gpu;
        TensorCores = tensorCores;
    }

    public IGpu Gpu => _gpu;

    /// <summary>Whether bf16 attention at head dimension 64 or 128 runs on the tensor-core kernels.</summary>
    public bool TensorCores { get; }

    /// <summary>
    /// Whether a call with these operands takes the tensor-core path: <see cref="TensorCores"/>, bf16, head dimension
    /// 64 or 128, and every pointer 16-byte aligned (the kernels move 16-byte chunks with cp.async).
    /// </summary>
    public bool UsesTensorCores(DType dtype, int headDim, params ReadOnlySpan<DevicePtr> pointers)
    {
        if (!TensorCores || dtype != DType.BF16 || headDim is not (64 or 128))
            return false;
        foreach (DevicePtr p in pointers)
            if (!p.IsNull && p.Address % 16 != 0)
                return false;
        return true;
    }

    /// <summary>Dynamic shared memory of the tensor-core forward: Q [64][D] and double-buffered K, V [2][64][D] bf16
    /// (80 KB at D = 128: the launcher opts in above 48 KB).</summary>
    public static int TcForwardSharedBytes(int headDim) => (TcQueryTile + 4 * TcKeyTile) * headDim * 2;

    /// <summary>Keys per block of the tensor-core dk/dv kernel, and queries per block of its dq kernel.</summary>
    public const int TcBackwardTile = 64;

    /// <summary>
    /// Dynamic shared memory of attention_bwd_dkdv_tc: K, V [64][D] and double-buffered Q, dout [2][32][D] bf16, lse and
    /// delta [2][32] fp32, document starts [2][32] int32 (above 48 KB at D = 128: the launcher opts in).
    /// </summary>
    public static int TcBackwardDkDvSharedBytes(int headDim) => (2 * 64 + 4 * 32) * headDim * 2 + 6 * 32 * sizeof(float);

    /// <summary>Dynamic shared memory of attention_bwd_dq_tc: Q, dout, V [64][D] and double-buffered K [2][64][D] bf16.</summary>
    public static int TcBackwardDqSharedBytes(int headDim) => 5 * 64 * headDim * 2;

    // ------------------------------------------------------------------------------------------
    // Launch shapes
    // ------------------------------------------------------------------------------------------

    /// <summary>Dynamic shared memory of attention_forward: Q [32][D+1], K, V [16][D+1], P [32][17] floats.</summary>
    public static int ForwardSharedBytes(int headDim) =>
        ((ForwardQueryTile + 2 * ForwardKeyTile) * (headDim + 1) + ForwardQueryTile * (ForwardKeyTile + 1)) * sizeof(float);

    /// <summary>
    /// Dynamic shared memory of attention_backward_dkdv: K, V, Q, dout [16][D+1], P, dS [16][17], lse, delta [16] floats,
    /// document starts [16] int32.
    /// </summary>
    public static int BackwardDkDvSharedBytes(int headDim) =>
        (4 * BackwardTile * (headDim + 1) + 2 * BackwardTile * (BackwardTile + 1) + 3 * BackwardTile) * sizeof(float);

    /// <summary>Dynamic shared memory of attention_backward_dq: Q, dout, K, V [16][D+1], dS [16][17] floats.</summary>
    public static int BackwardDqSharedBytes(int headDim) =>
        (4 * BackwardTile * (headDim + 1) + BackwardTile * (BackwardTile + 1)) * sizeof(float);

    /// <summary>Bytes of the fp32 workspace <see cref="Backward"/> needs: delta [B, Hq, T].</summary>
    public static long BackwardWorkspaceBytes(int batch, int seqLen, int headsQ) => (long)batch * headsQ * seqLen * sizeof(float);

    /// <summary>The softmax scale the kernels get: 1/sqrt(D) rounded once to fp32.</summary>
    public static float Scale(int headDim) => (float)(1.0 / Math.Sqrt(headDim));

    internal static void ValidateShape(int batch, int seqLen, int headsQ, int headsKv, int headDim)
    {
        if (batch < 0 || batch > MaxGridYZ)
            throw new ArgumentOutOfRangeException(nameof(batch), batch, $"batch must be in [0, {MaxGridYZ}]");
        ArgumentOutOfRangeException.ThrowIfNegative(seqLen);
        if (headsQ <= 0 || headsQ > MaxGridYZ)
            throw new ArgumentOutOfRangeException(nameof(headsQ), headsQ, $"headsQ must be in [1, {MaxGridYZ}]");
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(headsKv);
        if (headsQ % headsKv != 0)
            throw new ArgumentException($"headsQ ({headsQ}) is not a multiple of headsKv ({headsKv})", nameof(headsKv));
        if (headDim < 1 || headDim > MaxHeadDim)
            throw new ArgumentOutOfRangeException(nameof(headDim), headDim, $"headDim must be in [1, {MaxHeadDim}]");
        long rows = (long)batch * seqLen * headsQ;
        if ((rows + RowsPerPreprocessBlock - 1) / RowsPerPreprocessBlock > int.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(seqLen), $"batch * seqLen * headsQ = {rows} is too large");
    }

    // ------------------------------------------------------------------------------------------
    // Device pointers
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// Forward: output [B, T, Hq, D] (dtype) and lse [B, Hq, T] fp32 (null: not written, for inference) from q, k, v;
    /// <paramref name="positions"/>: null (causal) or I32 [B, T] positions inside packed documents (see the class remarks).
    /// Nothing is launched when batch or seqLen is 0. Launch: attention_forward_{dtype}, grid (ceil(T/32), Hq, B),
    /// block 128, <see cref="ForwardSharedBytes"/>.
    /// </summary>
    public void Forward(DType dtype, DevicePtr q, DevicePtr k, DevicePtr v, DevicePtr output, DevicePtr lse,
                        int batch, int seqLen, int headsQ, int headsKv, int headDim, DevicePtr positions = default)
    {
        string suffix = GpuTransformerOps.DTypeSuffix(dtype);
        ValidateShape(batch, seqLen, headsQ, headsKv, headDim);
        if (batch == 0 || seqLen == 0)
            return;
        CheckPtr(q, nameof(q)); CheckPtr(k, nameof(k)); CheckPtr(v, nameof(v)); CheckPtr(output, nameof(output));
        if (UsesTensorCores(dtype, headDim, q, k, v, output))
        {
            LaunchTcForward(q, k, v, output, lse, positions, batch, seqLen, seqLen, headsQ, headsKv, headDim);
            return;
        }
        int tiles = (seqLen + ForwardQueryTile - 1) / ForwardQueryTile;
        var p = new AttnParams
        {
            Q = q, K = k, V = v, Out = output, Lse = lse, Positions = positions,
            B = batch, Tq = seqLen, Tk = seqLen, Hq = headsQ, Hkv = headsKv, D = headDim, Scale = Scale(headDim),
        };
        _gpu.LaunchWithParams($"attention_forward_{suffix}", new Dim3((uint)tiles, (uint)headsQ, (uint)batch), ThreadsPerBlock,
            ForwardSharedBytes(headDim), p);
    }

    /// <summary>
    /// Forward for queries at an offset (decoding with a KV cache): output [B, Tq, Hq, D] (dtype) and lse [B, Hq, Tq] fp32
    /// (null: not written) from q [B, Tq, Hq, D] at absolute positions [Tk − Tq, Tk) and k, v [B, Tk, Hkv, D]; query i
    /// attends to keys j ≤ Tk − Tq + i. 1 ≤ Tq ≤ Tk (nothing is launched when batch is 0). Launch:
    /// attention_forward_cached_{dtype}, grid (ceil(Tq/32), Hq, B), block 128, <see cref="ForwardSharedBytes"/>; the
    /// arithmetic of <see cref="O:NativePeft.Ops.GpuAttentionOps.Forward"/>.
    /// </summary>
    public void ForwardCached(DType dtype, DevicePtr q, DevicePtr k, DevicePtr v, DevicePtr output, DevicePtr lse,
                              int batch, int queryLen, int keyLen, int headsQ, int headsKv, int headDim,
                              DevicePtr workspace = default, long workspaceBytes = 0)
    {
        string suffix = GpuTransformerOps.DTypeSuffix(dtype);
        ValidateShape(batch, keyLen, headsQ, headsKv, headDim);
        if (queryLen < 1 || queryLen > keyLen)
            throw new ArgumentOutOfRangeException(nameof(queryLen), queryLen, $"queryLen must be in [1, keyLen = {keyLen}]");
        if (batch == 0)
            return;
        CheckPtr(q, nameof(q)); CheckPtr(k, nameof(k)); CheckPtr(v, nameof(v)); CheckPtr(output, nameof(output));
        if (UsesTensorCores(dtype, headDim, q, k, v, output))
        {
            int splits = DecodeSplits(batch, queryLen, keyLen, headsQ, headsKv, headDim, workspace, workspaceBytes);
            if (splits >= 1)
                LaunchDecode(q, k, v, output, lse, batch, queryLen, keyLen, headsQ, headsKv, headDim, splits, workspace);
            else
                LaunchTcForward(q, k, v, output, lse, DevicePtr.Null, batch, queryLen, keyLen, headsQ, headsKv, headDim);
            return;
        }
        int tiles = (queryLen + ForwardQueryTile - 1) / ForwardQueryTile;
        var p = new AttnParams
        {
            Q = q, K = k, V = v, Out = output, Lse = lse,
            B = batch, Tq = queryLen, Tk = keyLen, Hq = headsQ, Hkv = headsKv, D = headDim, Scale = Scale(headDim),
        };
        _gpu.LaunchWithParams($"attention_forward_cached_{suffix}", new Dim3((uint)tiles, (uint)headsQ, (uint)batch), ThreadsPerBlock,
            ForwardSharedBytes(headDim), p);
    }

    /// <summary>Rows of the split-KV decode's mma tile: the query heads of a kv group times the new queries fit in it.</summary>
    public const int DecodeRows = 16;

    /// <summary>Keys per tile of the split-KV decode (a split's chunk is a multiple of it).</summary>
    public const int DecodeKeyTile = 64;

    /// <summary>Bytes of the split-KV decode's partial results per split: O [B, Hkv, 16, D] and lse [B, Hkv, 16] fp32.</summary>
    public static long DecodeWorkspaceBytesPerSplit(int batch, int headsKv, int headDim) =>
        (long)batch * headsKv * DecodeRows * (headDim + 1) * sizeof(float);

    /// <summary>Dynamic shared memory of attention_decode_tc: Q [16][D] and double-buffered K, V [2][64][D] bf16.</summary>
    public static int DecodeSharedBytes(int headDim) => (DecodeRows + 4 * DecodeKeyTile) * headDim * 2;

    /// <summary>
    /// How many key splits a cached forward runs the decode kernel with (flash-decoding), or 0 for the 64-query-tile
    /// forward kernel. The decode kernel runs whenever the group's query rows fit one mma tile ((Hq/Hkv)·queryLen ≤ 16)
    /// and the workspace holds a split: it reads K and V once per kv head (the forward kernel once per query head,
    /// with 1 useful row of 64). Splits: enough for two CTAs per multiprocessor, each at least one key tile, as many
    /// as the workspace holds — 1 when the batch's kv heads alone fill the GPU.
    /// <paramref name="forceSplits"/> &gt; 0 overrides the heuristic (tests), still bounded by the tiles and the workspace.
    /// </summary>
    public int DecodeSplits(int batch, int queryLen, int keyLen, int headsQ, int headsKv, int headDim,
                            DevicePtr workspace, long workspaceBytes, int forceSplits = 0)
    {
        if (workspace.IsNull || batch == 0 || headsQ / headsKv * queryLen > DecodeRows)
            return 0;
        int tiles = (keyLen + DecodeKeyTile - 1) / DecodeKeyTile;
        long fit = workspaceBytes / DecodeWorkspaceBytesPerSplit(batch, headsKv, headDim);
        int wanted = forceSplits > 0 ? forceSplits
            : (int)Math.Ceiling(2.0 * Math.Max(1, _gpu.Properties.MultiprocessorCount) / ((long)batch * headsKv));
        int splits = (int)Math.Min(Math.Min(Math.Max(wanted, 1), tiles), fit);
        if (splits < 1)
            return 0;
        // Equal chunks of whole tiles; the last split is never empty.
        int chunkTiles = (tiles + splits - 1) / splits;
        return (tiles + chunkTiles - 1) / chunkTiles;
    }

    /// <summary>
    /// Split-KV decode: attention_decode_tc_d{64,128}_bf16 over <paramref name="splits"/> key chunks (grid (splits, Hkv,
    /// B), block 128, <see cref="DecodeSharedBytes"/>), partials in the workspace, then attention_decode_combine_bf16
    /// (grid ((Hq/Hkv)·Tq, Hkv, B), block 128).
    /// </summary>
    private void LaunchDecode(DevicePtr q, DevicePtr k, DevicePtr v, DevicePtr output, DevicePtr lse,
                              int batch, int queryLen, int keyLen, int headsQ, int headsKv, int headDim, int splits, DevicePtr workspace)
    {
        int tiles = (keyLen + DecodeKeyTile - 1) / DecodeKeyTile;
        int chunk = (tiles + splits - 1) / splits * DecodeKeyTile;
        long oBytes = (long)batch * headsKv * splits * DecodeRows * headDim * sizeof(float);
        DevicePtr oPart = workspace, lsePart = workspace.Offset(oBytes);
        var p = new AttnDecodeParams
        {
            Q = q, K = k, V = v, OPart = oPart, LsePart = lsePart, Out = output, Lse = lse,
            B = batch, Tq = queryLen, Tk = keyLen, Hq = headsQ, Hkv = headsKv, Chunk = chunk, Splits = splits, D = headDim,
            Scale = Scale(headDim),
        };
        _gpu.LaunchWithParams($"attention_decode_tc_d{headDim}_bf16", new Dim3((uint)splits, (uint)headsKv, (uint)batch), ThreadsPerBlock,
            DecodeSharedBytes(headDim), p);
        _gpu.LaunchWithParams("attention_decode_combine_bf16", new Dim3((uint)(headsQ / headsKv * queryLen), (uint)headsKv, (uint)batch),
            ThreadsPerBlock, 0, p);
    }

    /// <summary>
    /// <see cref="ForwardCached(DType, DevicePtr, DevicePtr, DevicePtr, DevicePtr, DevicePtr, int, int, int, int, int, int, DevicePtr, long)"/>
    /// on the split-KV decode with a given number of splits (tests and benchmarks): bf16, head dim 64 or 128,
    /// (Hq/Hkv)·queryLen ≤ 16, and a workspace of at least splits · <see cref="DecodeWorkspaceBytesPerSplit"/> bytes.
    /// Returns the splits it ran with (the key tiles may allow fewer).
    /// </summary>
    public int ForwardDecode(DevicePtr q, DevicePtr k, DevicePtr v, DevicePtr output, DevicePtr lse, int batch, int queryLen,
                             int keyLen, int headsQ, int headsKv, int headDim, DevicePtr workspace, long workspaceBytes, int splits)
    {
        ValidateShape(batch, keyLen, headsQ, headsKv, headDim);
        if (!UsesTensorCores(DType.BF16, headDim, q, k, v, output))
            throw new ArgumentException($"the split-KV decode takes bf16 with head dim 64 or 128 and 16-byte aligned operands (head dim {headDim})", nameof(headDim));
        if (queryLen < 1 || queryLen > keyLen || headsQ / headsKv * queryLen > DecodeRows)
            throw new ArgumentOutOfRangeException(nameof(queryLen), queryLen, $"(Hq/Hkv)·queryLen must be at most {DecodeRows} and queryLen in [1, keyLen]");
        ArgumentOutOfRangeException.ThrowIfLessThan(splits, 1);
        int tiles = (keyLen + DecodeKeyTile - 1) / DecodeKeyTile;
        int chunkTiles = (tiles + Math.Min(splits, tiles) - 1) / Math.Min(splits, tiles);
        int n = (tiles + chunkTiles - 1) / chunkTiles;
        if (workspace.IsNull || workspaceBytes < n * DecodeWorkspaceBytesPerSplit(batch, headsKv, headDim))
            throw new ArgumentException($"the workspace must hold {n} splits ({n * DecodeWorkspaceBytesPerSplit(batch, headsKv, headDim)} bytes)", nameof(workspaceBytes));
        LaunchDecode(q, k, v, output, lse, batch, queryLen, keyLen, headsQ, headsKv, headDim, n, workspace);
        return n;
    }

    /// <summary>
    /// The tensor-core forward, attention_fwd_tc_d{64,128}_bf16 (or, with positions, attention_fwd_tc_packed_d{64,128}_bf16
    /// with queryLen = keyLen): grid (ceil(Tq/64), Hq, B), block 128, <see cref="TcForwardSharedBytes"/>; queries at
    /// absolute positions [Tk − Tq, Tk).
    /// </summary>
    private void LaunchTcForward(DevicePtr q, DevicePtr k, DevicePtr v, DevicePtr output, DevicePtr lse, DevicePtr positions,
                                 int batch, int queryLen, int keyLen, int headsQ, int headsKv, int headDim)
    {
        int tiles = (queryLen + TcQueryTile - 1) / TcQueryTile;
        var grid = new Dim3((uint)tiles, (uint)headsQ, (uint)batch);
        var p = new AttnTcParams
        {
            Q = q, K = k, V = v, Out = output, Lse = lse, Positions = positions,
            B = batch, Tq = queryLen, Tk = keyLen, Hq = headsQ, Hkv = headsKv, Scale = Scale(headDim),
        };
        string kernel = positions.IsNull ? $"attention_fwd_tc_d{headDim}_bf16" : $"attention_fwd_tc_packed_d{headDim}_bf16";
        _gpu.LaunchWithParams(kernel, grid, ThreadsPerBlock, TcForwardSharedBytes(headDim), p);
    }

    /// <summary>
    /// Backward: dq [B, T, Hq, D], dk, dv [B, T, Hkv, D] (dtype, all overwritten) from dout, q, k, v, the forward's
    /// output and lse. <paramref name="workspace"/>: at least <see cref="BackwardWorkspaceBytes"/> bytes of device
    /// memory (fp32 delta = rowsum(dout ∘ output)), free again when the launches have completed. Any of dq, or both
    /// dk and dv, may be null to skip them. <paramref name="positions"/>: null or the forward's I32 [B, T] positions inside
    /// packed documents. Launches attention_backward_preprocess (grid ceil(B·T·Hq/4), block 128),
    /// attention_backward_dkdv (grid (ceil(T/16), Hkv, B), block 128, <see cref="BackwardDkDvSharedBytes"/>) and
    /// attention_backward_dq (grid (ceil(T/16), Hq, B), block 128, <see cref="BackwardDqSharedBytes"/>).
    /// </summary>
    public void Backward(DType dtype, DevicePtr dout, DevicePtr q, DevicePtr k, DevicePtr v, DevicePtr output, DevicePtr lse,
                         DevicePtr dq, DevicePtr dk, DevicePtr dv, DevicePtr workspace,
                         int batch, int seqLen, int headsQ, int headsKv, int headDim, DevicePtr positions = default)
    {
        string suffix = GpuTransformerOps.DTypeSuffix(dtype);
        ValidateShape(batch, seqLen, headsQ, headsKv, headDim);
        if (batch == 0 || seqLen == 0)
            return;
        CheckPtr(dout, nameof(dout)); CheckPtr(q, nameof(q)); CheckPtr(k, nameof(k)); CheckPtr(v, nameof(v));
        CheckPtr(output, nameof(output)); CheckPtr(lse, nameof(lse)); CheckPtr(workspace, nameof(workspace));
        if (dk.IsNull != dv.IsNull)
            throw new ArgumentException("dk and dv are computed together: pass both or neither", dk.IsNull ? nameof(dk) : nameof(dv));
        float scale = Scale(headDim);
        long rows = (long)batch * seqLen * headsQ;
        int preBlocks = (int)((rows + RowsPerPreprocessBlock - 1) / RowsPerPreprocessBlock);
        _gpu.LaunchWithParams($"attention_backward_preprocess_{suffix}", preBlocks, ThreadsPerBlock, 0,
            new AttnParams { Dout = dout, Out = output, Delta = workspace, B = batch, Tq = seqLen, Tk = seqLen, Hq = headsQ, D = headDim });
        if (UsesTensorCores(dtype, headDim, dout, q, k, v, output, dq, dk, dv))
        {
            uint tcTiles = (uint)((seqLen + TcBackwardTile - 1) / TcBackwardTile);
            var p = new AttnTcParams
            {
                Q = q, K = k, V = v, Lse = lse, Positions = positions, Dout = dout, Delta = workspace, Dq = dq, Dk = dk, Dv = dv,
                B = batch, Tq = seqLen, Tk = seqLen, Hq = headsQ, Hkv = headsKv, Scale = scale,
            };
            if (!dk.IsNull)
                _gpu.LaunchWithParams($"attention_bwd_dkdv_tc_d{headDim}_bf16", new Dim3(tcTiles, (uint)headsKv, (uint)batch),
                    ThreadsPerBlock, TcBackwardDkDvSharedBytes(headDim), p);
            if (!dq.IsNull)
                _gpu.LaunchWithParams($"attention_bwd_dq_tc_d{headDim}_bf16", new Dim3(tcTiles, (uint)headsQ, (uint)batch),
                    ThreadsPerBlock, TcBackwardDqSharedBytes(headDim), p);
            return;
        }
        uint tiles = (uint)((seqLen + BackwardTile - 1) / BackwardTile);
        var bp = new AttnParams
        {
            Q = q, K = k, V = v, Lse = lse, Positions = positions, Dout = dout, Delta = workspace, Dq = dq, Dk = dk, Dv = dv,
            B = batch, Tq = seqLen, Tk = seqLen, Hq = headsQ, Hkv = headsKv, D = headDim, Scale = scale,
        };
        if (!dk.IsNull)
        {
            _gpu.LaunchWithParams($"attention_backward_dkdv_{suffix}", new Dim3(tiles, (uint)headsKv, (uint)batch), ThreadsPerBlock,
                BackwardDkDvSharedBytes(headDim), bp);
        }
        if (!dq.IsNull)
        {
            _gpu.LaunchWithParams($"attention_backward_dq_{suffix}", new Dim3(tiles, (uint)headsQ, (uint)batch), ThreadsPerBlock,
                BackwardDqSharedBytes(headDim), bp);
        }
    }
}
