using NativePeft.Numerics;
using NativePeft.Runtime;
using static NativePeft.Ops.KernelLaunch;

namespace NativePeft.Ops;

/// <summary>
/// The small elementwise kernels of a training step (kernels/elementwise.cu) on an <see cref="IGpu"/>: fill, casts
/// between fp32 and bf16, add, axpy, scale, dropout masks and their application, and the global sum of squares used by
/// gradient-norm clipping.
/// <para>
/// Element types: <see cref="DType.F32"/> or <see cref="DType.BF16"/> where a method takes a dtype; every bf16 value is
/// widened to fp32, the operation done in fp32 (one IEEE operation, or one fmaf for axpy) and rounded to nearest even
/// once, so results are bit-identical on CUDA, on the emulator and in plain C# float arithmetic. Counts are 64-bit.
/// The device-pointer methods only validate and launch (no synchronization); <see cref="SumSquares(DevicePtr, long)"/>
/// synchronizes and reads back one double.
/// </para>
/// <para>
/// Dropout masks come from a counter-based generator (Philox-4x32-10) and depend only on (seed, element index,
/// p): <see cref="DropoutMaskHost"/> computes the same bytes on the CPU, so a CPU path can reproduce any device mask.
/// </para>
/// </summary>
public sealed class GpuElementwiseOps
{
    /// <summary>Threads per block of every kernel in elementwise.cu.</summary>
    public const int ThreadsPerBlock = 256;

    /// <summary>Most pass-1 blocks (= partial sums) of <see cref="SumSquaresPartial"/>.</summary>
    public const int MaxSumSquaresBlocks = 1024;

    /// <summary>Elements per thread below which <see cref="SumSquaresBlocks"/> adds blocks.</summary>
    private const long SumSquaresElementsPerThread = 16;

    private readonly IGpu _gpu;
    private readonly int _maxGridBlocks;

    /// <param name="gpu">The device the kernels run on; its kernel image must contain elementwise.cu.</param>
    public GpuElementwiseOps(IGpu gpu)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        _gpu = gpu;
        _maxGridBlocks = KernelLaunch.MaxGridStrideBlocks(gpu);
    }

    public IGpu Gpu => _gpu;

    private static string Suffix(DType dtype) =>
        KernelLaunch.DTypeSuffix(dtype, allowF16: false, "elementwise ops take F32 or BF16 values");

    /// <summary>n / 256 + 1 blocks (= ceil((n + 1) / 256)), at most the grid-stride cap.</summary>
    private int Grid(long n) => KernelLaunch.GridBlocks(n + 1, ThreadsPerBlock, _maxGridBlocks);

    private void LaunchGridStride(string kernel, long n, params ReadOnlySpan<KernelArg> args) =>
        _gpu.Launch(kernel, Grid(n), ThreadsPerBlock, 0, args);

    // ------------------------------------------------------------------------------------------
    // Fill, casts, add, axpy, scale
    // ------------------------------------------------------------------------------------------

    /// <summary>y[i] = value for i &lt; n (bf16: value rounded to nearest even, as <see cref="BFloat16.FromSingle(float)"/>).</summary>
    public void Fill(DType dtype, DevicePtr y, long n, float value)
    {
        string kernel = $"fill_{Suffix(dtype)}";
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(y, nameof(y));
        LaunchGridStride(kernel, n, y, n, value);
    }

    /// <summary>y (bf16) = x (fp32) rounded to nearest even; NaN stays NaN. Bit-identical to <see cref="BFloat16.FromSingle(float)"/>.</summary>
    public void CastF32ToBf16(DevicePtr x, DevicePtr y, long n)
    {
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(x, nameof(x)); CheckPtr(y, nameof(y));
        LaunchGridStride("cast_f32_to_bf16", n, x, y, n);
    }

    /// <summary>y (fp32) = x (bf16), exact.</summary>
    public void CastBf16ToF32(DevicePtr x, DevicePtr y, long n)
    {
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(x, nameof(x)); CheckPtr(y, nameof(y));
        LaunchGridStride("cast_bf16_to_f32", n, x, y, n);
    }

    /// <summary>c = a + b elementwise (fp32 add, one rounding to dtype); c may alias a or b.</summary>
    public void Add(DType dtype, DevicePtr a, DevicePtr b, DevicePtr c, long n)
    {
        string kernel = $"add_{Suffix(dtype)}";
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(a, nameof(a)); CheckPtr(b, nameof(b)); CheckPtr(c, nameof(c));
        _gpu.Launch(kernel, Grid(KernelLaunch.CeilDiv(n, 8)), ThreadsPerBlock, 0, a, b, c, n); // 8 elements a thread (16-byte accesses)
    }

    /// <summary>y (fp32) += alpha · x (fp32), as one fused multiply-add per element (<see cref="MathF.FusedMultiplyAdd"/>).</summary>
    public void Axpy(float alpha, DevicePtr x, DevicePtr y, long n)
    {
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(x, nameof(x)); CheckPtr(y, nameof(y));
        LaunchGridStride("axpy_f32", n, alpha, x, y, n);
    }

    /// <summary>y = alpha · x elementwise (fp32 product, one rounding to dtype); y may alias x.</summary>
    public void Scale(DType dtype, DevicePtr x, DevicePtr y, long n, float alpha)
    {
        string kernel = $"scale_{Suffix(dtype)}";
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(x, nameof(x)); CheckPtr(y, nameof(y));
        LaunchGridStride(kernel, n, x, y, n, alpha);
    }

    // ------------------------------------------------------------------------------------------
    // Dropout
    // ------------------------------------------------------------------------------------------

    private static void CheckP(double p)
    {
        if (!(p >= 0 && p < 1)) throw new ArgumentOutOfRangeException(nameof(p), p, "dropout p must be in [0, 1)");
    }

    /// <summary>
    /// The 32-bit drop threshold of probability p: round(p · 2³²), capped at 2³² − 1. An element is dropped when its
    /// 32-bit random word is below it, so the drop probability is threshold / 2³² (p within 2⁻³³; p = 0 never drops).
    /// </summary>
    public static uint DropThreshold(double p)
    {
        CheckP(p);
        double t = Math.Round(p * 4294967296.0, MidpointRounding.ToEven);
        return t >= uint.MaxValue ? uint.MaxValue : (uint)t;
    }

    /// <summary>The keep scale 1/(1−p) as the kernels use it (rounded once to fp32).</summary>
    public static float KeepScale(double p)
    {
        CheckP(p);
        return (float)(1.0 / (1.0 - p));
    }

    /// <summary>
    /// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11; the Random123 reference): the four 32-bit output words for
    /// counter (c0, c1, c2, c3) and key (k0, k1). Matches Random123's known-answer vectors.
    /// </summary>
    public static (uint X0, uint X1, uint X2, uint X3) Philox4x32x10(uint c0, uint c1, uint c2, uint c3, uint k0, uint k1)
    {
        const uint M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
        uint x0 = c0, x1 = c1, x2 = c2, x3 = c3;
        for (int round = 0; round < 10; round++)
        {
            if (round > 0) { k0 += W0; k1 += W1; }
            ulong p0 = (ulong)M0 * x0, p1 = (ulong)M1 * x2;
            uint y0 = (uint)(p1 >> 32) ^ x1 ^ k0, y2 = (uint)(p0 >> 32) ^ x3 ^ k1;
            x0 = y0; x1 = (uint)p1; x2 = y2; x3 = (uint)p0;
        }
        return (x0, x1, x2, x3);
    }

    /// <summary>
    /// The random word of dropout element e (a 64-bit counter) under seed: word (e mod 4) of
    /// Philox-4x32-10(counter = (lo(e/4), hi(e/4), 0, 0), key = (lo(seed), hi(seed))).
    /// </summary>
    public static uint DropoutWord(ulong seed, ulong e)
    {
        ulong block = e >> 2;
        var (x0, x1, x2, x3) = Philox4x32x10((uint)block, (uint)(block >> 32), 0, 0, (uint)seed, (uint)(seed >> 32));
        return (e & 3) switch { 0 => x0, 1 => x1, 2 => x2, _ => x3 };
    }

    /// <summary>
    /// The C# twin of the dropout_mask kernel: mask[i] = 1 (keep) when DropoutWord(seed, offset + i) ≥
    /// DropThreshold(p), else 0 (drop). Bit for bit what <see cref="DropoutMask"/> writes on any device.
    /// </summary>
    public static void DropoutMaskHost(Span<byte> mask, ulong seed, ulong offset, double p)
    {
        uint threshold = DropThreshold(p);
        for (int i = 0; i < mask.Length; i++)
            mask[i] = DropoutWord(seed, offset + (ulong)i) >= threshold ? (byte)1 : (byte)0;
    }

    /// <summary>
    /// mask[i] (uint8) = 1 keep / 0 drop for element offset + i of the stream of seed, keep probability 1 − p
    /// (see <see cref="DropoutMaskHost"/>). Successive tensors of one step take disjoint offsets.
    /// </summary>
    public void DropoutMask(DevicePtr mask, long n, ulong seed, ulong offset, double p)
    {
        uint threshold = DropThreshold(p);
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(mask, nameof(mask));
        LaunchGridStride("dropout_mask", n, mask, n, seed, offset, threshold);
    }

    /// <summary>y = mask ? x · (float)(1/(1−p)) : 0 elementwise (fp32 product, one rounding to dtype); y may alias x.</summary>
    public void ApplyMaskScale(DType dtype, DevicePtr x, DevicePtr mask, DevicePtr y, long n, double p)
    {
        string kernel = $"apply_mask_scale_{Suffix(dtype)}";
        float scale = KeepScale(p);
        CheckCount(n, nameof(n));
        if (n == 0) return;
        CheckPtr(x, nameof(x)); CheckPtr(mask, nameof(mask)); CheckPtr(y, nameof(y));
        LaunchGridStride(kernel, n, x, mask, y, n, scale);
    }

    // ------------------------------------------------------------------------------------------
    // Sum of squares (gradient-norm clipping)
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// Pass-1 blocks (and partial sums) for n elements: ceil(n / (256 · 16)) clamped to [1, 1024]. A function of n
    /// alone, so the summation order, and so the result, is the same on every device.
    /// </summary>
    public static int SumSquaresBlocks(long n)
    {
        CheckCount(n, nameof(n));
        long perBlock = ThreadsPerBlock * SumSquaresElementsPerThread;
        return (int)Math.Clamp(n / perBlock + (n % perBlock != 0 ? 1 : 0), 1, MaxSumSquaresBlocks);
    }

    /// <summary>
    /// Pass 1: writes <see cref="SumSquaresBlocks"/>(n) doubles at partials, each the sum of x[i]² (x fp32; each square
    /// exact in double) over a fixed slice. Several tensors can write consecutive slices of one partials buffer and
    /// be reduced together by <see cref="ReduceSum"/>. Returns the number of partials written.
    /// </summary>
    public int SumSquaresPartial(DevicePtr x, long n, DevicePtr partials)
    {
        int blocks = SumSquaresBlocks(n);
        CheckPtr(partials, nameof(partials));
        if (n > 0) CheckPtr(x, nameof(x));
        _gpu.Launch("sum_squares_f32", blocks, ThreadsPerBlock, 0, x, n, partials);
        return blocks;
    }

    /// <summary>Pass 2: out[0] (double) += the sum of partials[0..count) in a fixed order (one block): several tensors
    /// accumulate into one output, zeroed by the caller.</summary>
    public void ReduceSum(DevicePtr partials, int count, DevicePtr output)
    {
        CheckCount(count, nameof(count));
        CheckPtr(output, nameof(output));
        if (count > 0) CheckPtr(partials, nameof(partials));
        _gpu.Launch("reduce_sum_f64", 1, ThreadsPerBlock, 0, partials, count, output);
    }

    /// <summary>
    /// Σ x² in double over several fp32 device tensors, deterministic (gradient clipping's global norm): output[0] (one
    /// double) zeroed, then per tensor in order pass 1 into <paramref name="partials"/> (≥ <see cref="MaxSumSquaresBlocks"/>
    /// doubles) and pass 2 adding into output[0]; one synchronizing read.
    /// </summary>
    public double SumSquares(IEnumerable<(DevicePtr X, long N)> tensors, DevicePtr partials, DevicePtr output)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        CheckPtr(partials, nameof(partials));
        CheckPtr(output, nameof(output));
        _gpu.Memset(output, 0, sizeof(double));
        foreach (var (x, n) in tensors)
        {
            CheckCount(n, nameof(tensors));
            if (n == 0) continue;
            ReduceSum(partials, SumSquaresPartial(x, n, partials), output);
        }
        _gpu.Synchronize();
        Span<double> result = stackalloc double[1];
        _gpu.CopyToHost(output, result);
        return result[0];
    }

    /// <summary>Σ x[i]² over one fp32 device tensor, in double, deterministic (both passes, then a synchronizing read).</summary>
    public double SumSquares(DevicePtr x, long n)
    {
        CheckCount(n, nameof(n));
        int blocks = SumSquaresBlocks(n);
        DevicePtr partials = _gpu.Alloc((long)(blocks + 1) * sizeof(double));
        try { return SumSquares([(x, n)], partials, partials.Offset((long)blocks * sizeof(double))); }
        finally { _gpu.Free(partials); }
    }
}
