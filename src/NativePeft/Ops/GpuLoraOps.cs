using NativePeft.Runtime;
using static NativePeft.Ops.KernelLaunch;

namespace NativePeft.Ops;

/// <summary>
/// One adapter of a <see cref="GpuLoraOps"/> launch, as device pointers: A [r, in] bf16; Data: xa [N, r] bf16 (the
/// forward's output) or dxa [N, r] bf16 (the backward's input); DA [r, in] fp32 (backward only; accumulated).
/// </summary>
public readonly record struct LoraKernelAdapter(DevicePtr A, DevicePtr Data, DevicePtr DA, int Rank, double DropoutP, ulong Seed);

/// <summary>
/// The tensor-core LoRA kernels of kernels/lora.cu on an <see cref="IGpu"/> (design: docs/lora-kernels.md), for up to
/// <see cref="MaxAdaptersPerLaunch"/> adapters that share one input x [N, in] (bf16):
/// <list type="bullet">
/// <item><see cref="Down"/>: xa_g = dropout_g(x) · A_gᵀ, x read once for all of them (lora_down_tc_bf16; with few row
/// tiles the features are split over <see cref="DownSplits"/> CTAs, whose fp32 partials lora_down_reduce_bf16 sums in
/// order).</item>
/// <item><see cref="BackwardInput"/>: dx += Σ_g dropout_g'(dxa_g · A_g) (dx read and written once) and
/// dA_g += dxa_gᵀ · dropout_g(x) (lora_bwd_input_tc_bf16: fp32 partial sums per split of <see cref="SplitRows"/> rows
/// into a workspace; lora_da_reduce_f32: their sum in split order, added to dA_g).</item>
/// </list>
/// Dropout is redrawn from the counter-based generator of the Dropout op (element index into x, the adapter's seed:
/// <see cref="GpuElementwiseOps.DropoutMaskHost"/>), never stored. Deterministic: no atomics, fixed summation orders
/// that depend on the shapes only. Requirements (<see cref="Supports"/>): in a multiple of 8, every pointer 16-byte
/// aligned, Σ padded ranks ≤ <see cref="DownMaxPaddedRank"/> (forward) / <see cref="BackwardMaxPaddedRank"/>
/// (backward) per launch; <see cref="GpuOps"/> splits larger groups into several launches and takes the unfused path
/// for what the kernels do not support. The methods only validate and launch (no synchronization).
/// </summary>
public sealed class GpuLoraOps
{
    public const int ThreadsPerBlock = 128;
    /// <summary>Rows of x per CTA (4 warps × 16).</summary>
    public const int RowTile = 64;
    /// <summary>Input features per tile.</summary>
    public const int FeatureTile = 64;
    /// <summary>Adapters one launch takes (the kernels' argument slots).</summary>
    public const int MaxAdaptersPerLaunch = 3;
    /// <summary>Σ padded ranks (each rank rounded up to 16) of one forward launch: 64 fp32 accumulators per lane.</summary>
    public const int DownMaxPaddedRank = 128;
    /// <summary>Σ padded ranks of one backward launch (its dA accumulators live in registers across the split).</summary>
    public const int BackwardMaxPaddedRank = 64;
    /// <summary>Rows of x whose dA contributions one backward CTA sums before they go to the workspace.</summary>
    public const int SplitRows = 256;
    /// <summary>Dynamic shared memory of the backward: A, x (double-buffered), dxa and dropout(x) tiles (5 × 8 KB) and a
    /// mask tile [64][72] bytes: 44.5 KB, under the 48 KB that needs no opt-in.</summary>
    public const int BackwardSharedBytes = 5 * RowTile * FeatureTile * 2 + RowTile * 72;
    private const int ReduceThreads = 256;
    /// <summary>CTAs the forward aims at by splitting the features (enough to fill an H100's 132 SMs twice); a function
    /// of the shape only, so the summation order is the same on every device.</summary>
    public const int DownTargetBlocks = 256;

    private readonly IGpu _gpu;
    private readonly int _maxGridBlocks;

    /// <param name="gpu">The device; its kernel image must contain kernels/lora.cu.</param>
    public GpuLoraOps(IGpu gpu)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        _gpu = gpu;
        _maxGridBlocks = MaxGridStrideBlocks(gpu);
    }

    public IGpu Gpu => _gpu;

    /// <summary>A rank rounded up to a multiple of 16 (one m16 / k16 step of the MMA).</summary>
    public static int PaddedRank(int rank) => (rank + 15) / 16 * 16;

    /// <summary>Dynamic shared memory of the forward: double-buffered x [64][64] and stacked A [Σ padded ranks][64] bf16.</summary>
    public static int DownSharedBytes(int paddedRanks) => 2 * (RowTile + paddedRanks) * FeatureTile * 2;

    /// <summary>
    /// The forward's split of the 64-feature tiles: (splits, tiles per split). One split when ⌈N/64⌉ row tiles reach
    /// <see cref="DownTargetBlocks"/>; otherwise up to ⌈<see cref="DownTargetBlocks"/> / row tiles⌉ splits of equal
    /// tile counts (none empty).
    /// </summary>
    public static (int Splits, int TilesPerSplit) DownSplits(int rows, int inFeatures)
    {
        int rowTiles = (int)Math.Max(1, CeilDiv(rows, RowTile)), kTiles = (int)Math.Max(1, CeilDiv(inFeatures, FeatureTile));
        int want = Math.Clamp((int)CeilDiv(DownTargetBlocks, rowTiles), 1, kTiles);
        int perSplit = (int)CeilDiv(kTiles, want);
        return ((int)CeilDiv(kTiles, perSplit), perSplit);
    }

    /// <summary>Bytes of the fp32 workspace of <see cref="Down"/>: [splits][N][Σ padded ranks] when it splits, else 0.</summary>
    public static long DownWorkspaceBytes(int rows, int inFeatures, int paddedRanks)
    {
        int splits = DownSplits(rows, inFeatures).Splits;
        return splits == 1 ? 0 : (long)splits * rows * paddedRanks * sizeof(float);
    }

    /// <summary>Splits (CTA rows of the backward's grid, and partial dA planes of its workspace) for N rows.</summary>
    public static int Splits(int rows) => (int)CeilDiv(rows, SplitRows);

    /// <summary>Bytes of the fp32 workspace of <see cref="BackwardInput"/>: [splits][Σ padded ranks][in].</summary>
    public static long BackwardWorkspaceBytes(int rows, int inFeatures, int paddedRanks) =>
        (long)Splits(rows) * paddedRanks * inFeatures * sizeof(float);

    /// <summary>Whether the kernels take x [N, in] with these pointers: in a multiple of 8, every pointer 16-byte aligned.</summary>
    public static bool Supports(int inFeatures, params ReadOnlySpan<DevicePtr> pointers)
    {
        if (inFeatures <= 0 || inFeatures % 8 != 0) return false;
        foreach (DevicePtr p in pointers)
            if (!p.IsNull && p.Address % 16 != 0) return false;
        return true;
    }

    /// <summary>
    /// Consecutive runs of adapters (start, count) that fit one launch: at most <see cref="MaxAdaptersPerLaunch"/>, padded
    /// ranks summing to at most <paramref name="maxPaddedRank"/>. An adapter too wide for any launch is a run of its own
    /// with count 0 (the caller takes another path for it).
    /// </summary>
    public static List<(int Start, int Count)> Launches(IReadOnlyList<int> ranks, int maxPaddedRank)
    {
        var runs = new List<(int, int)>();
        int start = 0, count = 0, width = 0;
        for (int g = 0; g < ranks.Count; g++)
        {
            int w = PaddedRank(ranks[g]);
            if (count > 0 && (count == MaxAdaptersPerLaunch || width + w > maxPaddedRank))
            {
                runs.Add((start, count));
                count = 0; width = 0;
            }
            if (w > maxPaddedRank)
            {
                runs.Add((g, 0));
                continue;
            }
            if (count == 0) start = g;
            count++;
            width += w;
        }
        if (count > 0) runs.Add((start, count));
        return runs;
    }

    private static void Validate(DevicePtr x, int rows, int inFeatures, ReadOnlySpan<LoraKernelAdapter> adapters, int maxPaddedRank,
        bool backward, out int paddedRanks)
    {
        CheckCount(rows, nameof(rows));
        CheckPositive(inFeatures, nameof(inFeatures));
        if (inFeatures % 8 != 0)
            throw new ArgumentException($"inFeatures ({inFeatures}) must be a multiple of 8 (16-byte rows for cp.async)", nameof(inFeatures));
        if (adapters.Length is < 1 or > MaxAdaptersPerLaunch)
            throw new ArgumentException($"1 to {MaxAdaptersPerLaunch} adapters per launch, got {adapters.Length}", nameof(adapters));
        CheckPtr(x, nameof(x));
        paddedRanks = 0;
        for (int g = 0; g < adapters.Length; g++)
        {
            var a = adapters[g];
            string name = $"adapters[{g}]";
            if (a.Rank < 1) throw new ArgumentOutOfRangeException(nameof(adapters), a.Rank, $"{name}.Rank must be positive");
            if (!(a.DropoutP >= 0 && a.DropoutP < 1))
                throw new ArgumentOutOfRangeException(nameof(adapters), a.DropoutP, $"{name}.DropoutP must be in [0, 1)");
            CheckPtr(a.A, name + ".A");
            CheckPtr(a.Data, name + (backward ? ".Data (dxa)" : ".Data (xa)"));
            if (backward) CheckPtr(a.DA, name + ".DA");
            if (!Supports(inFeatures, a.A))
                throw new ArgumentException($"{name}.A is not 16-byte aligned", nameof(adapters));
            paddedRanks += PaddedRank(a.Rank);
        }
        if (paddedRanks > maxPaddedRank)
            throw new ArgumentException($"the adapters' padded ranks sum to {paddedRanks}, more than one launch takes ({maxPaddedRank})", nameof(adapters));
        if (!Supports(inFeatures, x))
            throw new ArgumentException("x is not 16-byte aligned", nameof(x));
    }

    private static LoraKernelAdapter Slot(ReadOnlySpan<LoraKernelAdapter> adapters, int g) =>
        g < adapters.Length ? adapters[g] : new LoraKernelAdapter(DevicePtr.Null, DevicePtr.Null, DevicePtr.Null, 0, 0, 0);

    private static uint Threshold(LoraKernelAdapter a) => a.Rank == 0 ? 0 : GpuElementwiseOps.DropThreshold(a.DropoutP);
    private static float KeepScale(LoraKernelAdapter a) => a.Rank == 0 ? 1 : GpuElementwiseOps.KeepScale(a.DropoutP);

    /// <summary>The parameter struct of lora_down_tc_bf16 (dx null, data = xa) and lora_bwd_input_tc_bf16 (data = dxa).</summary>
    private static LoraTcParams TcParams(DevicePtr x, DevicePtr dx, int rows, int inFeatures, int split, int count,
        LoraKernelAdapter a0, LoraKernelAdapter a1, LoraKernelAdapter a2, DevicePtr ws) => new()
    {
        X = x, Dx = dx, A0 = a0.A, A1 = a1.A, A2 = a2.A, Data0 = a0.Data, Data1 = a1.Data, Data2 = a2.Data, Ws = ws,
        Seed0 = a0.Seed, Seed1 = a1.Seed, Seed2 = a2.Seed,
        N = rows, In = inFeatures, Split = split, Count = count, R0 = a0.Rank, R1 = a1.Rank, R2 = a2.Rank,
        Thr0 = Threshold(a0), Thr1 = Threshold(a1), Thr2 = Threshold(a2),
        Scale0 = KeepScale(a0), Scale1 = KeepScale(a1), Scale2 = KeepScale(a2),
    };

    /// <summary>
    /// xa_g [N, r_g] = dropout_g(x) · A_gᵀ for each adapter (Data = xa, overwritten); x [N, in] bf16.
    /// <paramref name="workspace"/>: at least <see cref="DownWorkspaceBytes"/> bytes (overwritten; may be null when that
    /// is 0). Nothing is launched for N = 0. Launches: lora_down_tc_bf16, grid (ceil(N/64), <see cref="DownSplits"/>),
    /// block 128, <see cref="DownSharedBytes"/>; with more than one split lora_down_reduce_bf16, grid-stride, block 256.
    /// </summary>
    public void Down(DevicePtr x, int rows, int inFeatures, ReadOnlySpan<LoraKernelAdapter> adapters, DevicePtr workspace)
    {
        Validate(x, rows, inFeatures, adapters, DownMaxPaddedRank, backward: false, out int padded);
        if (rows == 0) return;
        var (splits, perSplit) = DownSplits(rows, inFeatures);
        if (splits > 1) CheckPtr(workspace, nameof(workspace));
        DevicePtr ws = splits > 1 ? workspace : DevicePtr.Null;
        LoraKernelAdapter a0 = Slot(adapters, 0), a1 = Slot(adapters, 1), a2 = Slot(adapters, 2);
        _gpu.LaunchWithParams("lora_down_tc_bf16", new Dim3((uint)CeilDiv(rows, RowTile), (uint)splits), ThreadsPerBlock,
            DownSharedBytes(padded), TcParams(x, DevicePtr.Null, rows, inFeatures, perSplit, adapters.Length, a0, a1, a2, ws));
        if (splits == 1) return;
        _gpu.LaunchWithParams("lora_down_reduce_bf16", GridBlocks((long)rows * padded, ReduceThreads, _maxGridBlocks), ReduceThreads, 0,
            new LoraReduceParams
            {
                Ws = ws, Dst0 = a0.Data, Dst1 = a1.Data, Dst2 = a2.Data, Splits = splits, N = rows, R = padded,
                Count = adapters.Length, R0 = a0.Rank, R1 = a1.Rank, R2 = a2.Rank,
            });
    }

    /// <summary>
    /// dx [N, in] bf16 += Σ_g dropout_g'(dxa_g · A_g) and DA_g [r_g, in] fp32 += dxa_gᵀ · dropout_g(x) (Data = dxa_g).
    /// <paramref name="workspace"/>: at least <see cref="BackwardWorkspaceBytes"/> bytes (overwritten). Nothing is
    /// launched for N = 0. Launches: lora_bwd_input_tc_bf16, grid (ceil(in/64), <see cref="Splits"/>), block 128,
    /// <see cref="BackwardSharedBytes"/>; lora_da_reduce_f32, grid-stride, block 256.
    /// </summary>
    public void BackwardInput(DevicePtr x, DevicePtr dx, int rows, int inFeatures, ReadOnlySpan<LoraKernelAdapter> adapters,
        DevicePtr workspace)
    {
        Validate(x, rows, inFeatures, adapters, BackwardMaxPaddedRank, backward: true, out int padded);
        CheckPtr(dx, nameof(dx));
        if (!Supports(inFeatures, dx)) throw new ArgumentException("dx is not 16-byte aligned", nameof(dx));
        if (rows == 0) return;
        CheckPtr(workspace, nameof(workspace));
        int splits = Splits(rows);
        LoraKernelAdapter a0 = Slot(adapters, 0), a1 = Slot(adapters, 1), a2 = Slot(adapters, 2);
        _gpu.LaunchWithParams("lora_bwd_input_tc_bf16", new Dim3((uint)CeilDiv(inFeatures, FeatureTile), (uint)splits),
            ThreadsPerBlock, BackwardSharedBytes, TcParams(x, dx, rows, inFeatures, SplitRows, adapters.Length, a0, a1, a2, workspace));
        long elements = (long)padded * inFeatures;
        _gpu.LaunchWithParams("lora_da_reduce_f32", GridBlocks(elements, ReduceThreads, _maxGridBlocks), ReduceThreads, 0,
            new LoraReduceParams
            {
                Ws = workspace, Dst0 = a0.DA, Dst1 = a1.DA, Dst2 = a2.DA, Splits = splits, R = padded, In = inFeatures,
                Count = adapters.Length, R0 = a0.Rank, R1 = a1.Rank, R2 = a2.Rank,
            });
    }
}
