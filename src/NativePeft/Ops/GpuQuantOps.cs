using NativePeft.Numerics;
using NativePeft.Quantization;
using NativePeft.Runtime;
using static NativePeft.Ops.KernelLaunch;

namespace NativePeft.Ops;

/// <summary>
/// The 4-bit quantization ops of GpuOps: launches the kernels of kernels/nf4.cu on an <see cref="IGpu"/>
/// (the real device or the emulator). Semantics: docs/quant-contract.md, bit-compatible with bitsandbytes
/// and with the CPU reference in <see cref="NativePeft.Quantization"/>.
/// <para>
/// The device-pointer methods only launch (no synchronization, no copies); the host-array overloads of quantize,
/// dequantize and the double quantization copy in, launch, copy out and free, for one-off conversions
/// (<c>NativePeft.Conversion.CheckpointQuantizer</c>, the CLI's quantize and dequantize) and tests. The host-array
/// GEMV, used only by tests, lives in the test project (tests/NativePeft.Tests/Ops/HostArrayOps.cs).
/// </para>
/// </summary>
public sealed class GpuQuantOps
{
    /// <summary>Threads per block of every kernel in nf4.cu.</summary>
    public const int ThreadsPerBlock = 256;

    /// <summary>Blocksize of the double quantization of absmax (bitsandbytes' nested blocksize).</summary>
    public const int NestedBlocksize = 256;

    private readonly IGpu _gpu;
    private readonly int _maxGridBlocks;

    /// <param name="gpu">The device the kernels run on; its kernel image must contain nf4.cu.</param>
    public GpuQuantOps(IGpu gpu)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        _gpu = gpu;
        _maxGridBlocks = KernelLaunch.MaxGridStrideBlocks(gpu);
    }

    public IGpu Gpu => _gpu;

    // ------------------------------------------------------------------------------------------
    // Sizes and validation
    // ------------------------------------------------------------------------------------------

    /// <summary>Throws an <see cref="ArgumentException"/> naming "blocksize" unless it is a power of two in [32, 4096].</summary>
    public static void ValidateBlocksize(int blocksize) => Quant4Bit.ValidateBlocksize(blocksize);

    /// <summary>Number of absmax entries: ceil(n / blocksize).</summary>
    public static long AbsmaxCount(long n, int blocksize) => Quant4Bit.BlockCount(n, blocksize);

    /// <summary>Bytes of the packed 4-bit tensor: (n + 1) / 2.</summary>
    public static long PackedBytes(long n) => Quant4Bit.PackedLength(n);

    /// <summary>Number of nested_absmax entries for nblocks absmax values: ceil(nblocks / 256).</summary>
    public static long NestedAbsmaxCount(long nblocks) => (nblocks + NestedBlocksize - 1) / NestedBlocksize;

    /// <summary>The double-quantization offset: mean of absmax, summed in double, rounded once to fp32.</summary>
    public static float DoubleQuantOffset(ReadOnlySpan<float> absmax)
    {
        if (absmax.IsEmpty)
            return 0.0f;
        double sum = 0.0;
        for (int i = 0; i < absmax.Length; i++)
            sum += absmax[i];
        return (float)(sum / absmax.Length);
    }

    /// <summary>The kernel name suffix for an element type: "f32", "bf16", "f16".</summary>
    public static string DTypeSuffix(DType dtype) =>
        KernelLaunch.DTypeSuffix(dtype, allowF16: true, "4-bit ops take F32, BF16 or F16 values");

    private static string QuantSuffix(QuantType quantType) => quantType switch
    {
        QuantType.Nf4 => "nf4",
        QuantType.Fp4 => "fp4",
        _ => throw new ArgumentException($"unknown quant_type {quantType}", nameof(quantType)),
    };

    private static string KernelName(string op, QuantType quantType, DType dtype) =>
        $"{op}_{QuantSuffix(quantType)}_{DTypeSuffix(dtype)}";

    private int Grid(long work, long perBlock) => KernelLaunch.GridBlocks(work, perBlock, _maxGridBlocks);

    /// <summary>Warp tasks of quantize_4bit: a warp handles 32 / min(32, blocksize / 8) quant blocks.</summary>
    internal static long QuantizeWarpTasks(long n, int blocksize)
    {
        int lanesPerBlock = Math.Min(32, blocksize / 8);
        int blocksPerWarp = 32 / lanesPerBlock;
        long nblocks = AbsmaxCount(n, blocksize);
        return (nblocks + blocksPerWarp - 1) / blocksPerWarp;
    }

    // ------------------------------------------------------------------------------------------
    // Device-pointer launches
    // ------------------------------------------------------------------------------------------

    /// <summary>Checks the blocksize and the element count <paramref name="n"/>, then names the kernel of <paramref name="op"/>.</summary>
    private static string CheckedKernel(string op, QuantType quantType, DType dtype, long n, int blocksize)
    {
        ValidateBlocksize(blocksize);
        CheckCount(n, nameof(n));
        return KernelName(op, quantType, dtype);
    }

    /// <summary>
    /// Blockwise 4-bit quantization of n elements of <paramref name="inputDtype"/> at <paramref name="x"/>:
    /// writes ceil(n / blocksize) fp32 <paramref name="absmax"/> and (n + 1) / 2 bytes <paramref name="packed"/>.
    /// n = 0 launches nothing.
    /// </summary>
    public void Quantize4bit(QuantType quantType, DType inputDtype, DevicePtr x, long n, int blocksize,
                             DevicePtr absmax, DevicePtr packed)
    {
        string kernel = CheckedKernel("quantize_4bit", quantType, inputDtype, n, blocksize);
        if (n == 0)
            return;
        long tasks = QuantizeWarpTasks(n, blocksize);
        _gpu.Launch(kernel, Grid(tasks, ThreadsPerBlock / 32), ThreadsPerBlock, 0,
            x, absmax, packed, n, blocksize);
    }

    /// <summary>
    /// out[i] = code[nibble i] * absmax[i / blocksize] in fp32, rounded (RNE) to <paramref name="outputDtype"/>.
    /// n = 0 launches nothing.
    /// </summary>
    public void Dequantize4bit(QuantType quantType, DType outputDtype, DevicePtr packed, DevicePtr absmax, long n,
                               int blocksize, DevicePtr output)
    {
        string kernel = CheckedKernel("dequantize_4bit", quantType, outputDtype, n, blocksize);
        if (n == 0)
            return;
        _gpu.Launch(kernel, Grid(KernelLaunch.CeilDiv(n, 16), ThreadsPerBlock), ThreadsPerBlock, 0, // 16 elements a thread
            packed, absmax, output, n, blocksize);
    }

    /// <summary>
    /// <see cref="Dequantize4bit(QuantType, DType, DevicePtr, DevicePtr, long, int, DevicePtr)"/> reading bitsandbytes'
    /// double-quantized absmax as stored (kernel dequantize_4bit_dq): for the element of block b (counted from
    /// <paramref name="firstBlock"/>, the block of packed[0] in the whole weight) absmax = code256[qabsmax[b]] ·
    /// nestedAbsmax[b / 256] + *offset, fp32 multiply then add — bit-identical to
    /// <see cref="DequantizeAbsmaxDoubleQuant(DevicePtr, DevicePtr, DevicePtr, float, DevicePtr, long)"/> followed by
    /// Dequantize4bit. qabsmax, nestedAbsmax: the whole weight's; offset: one fp32 on the device. n = 0 launches nothing.
    /// </summary>
    public void Dequantize4bitDoubleQuant(QuantType quantType, DType outputDtype, DevicePtr packed, DevicePtr qabsmax, DevicePtr code256,
                                          DevicePtr nestedAbsmax, DevicePtr offset, long firstBlock, long n, int blocksize, DevicePtr output)
    {
        string kernel = CheckedKernel("dequantize_4bit_dq", quantType, outputDtype, n, blocksize);
        CheckCount(firstBlock, nameof(firstBlock));
        if (n == 0)
            return;
        _gpu.Launch(kernel, Grid(KernelLaunch.CeilDiv(n, 16), ThreadsPerBlock), ThreadsPerBlock, 0, // 16 elements a thread
            packed, qabsmax, code256, nestedAbsmax, offset, output, n, blocksize, firstBlock);
    }

    /// <summary>
    /// Double quantization of <paramref name="nblocks"/> fp32 absmax values with nested blocksize 256:
    /// qabsmax[i] = nearest code of (absmax[i] - offset) / nested_absmax[i / 256] in the signed dynamic map
    /// <paramref name="code256"/> (256 fp32 on the device). The offset is computed on the host, see
    /// <see cref="DoubleQuantOffset"/>.
    /// </summary>
    public void QuantizeAbsmaxDoubleQuant(DevicePtr absmax, long nblocks, float offset, DevicePtr code256,
                                          DevicePtr qabsmax, DevicePtr nestedAbsmax)
    {
        CheckCount(nblocks, nameof(nblocks));
        if (nblocks == 0)
            return;
        _gpu.Launch("quantize_absmax_dq", Grid(NestedAbsmaxCount(nblocks), 1), NestedBlocksize, 0,
            absmax, nblocks, offset, code256, qabsmax, nestedAbsmax);
    }

    /// <summary>
    /// Double quantization reading absmax back to the host for the offset; returns the offset
    /// (stored as nested_offset in bitsandbytes' quant state).
    /// </summary>
    public float QuantizeAbsmaxDoubleQuant(DevicePtr absmax, long nblocks, DevicePtr code256, DevicePtr qabsmax,
                                           DevicePtr nestedAbsmax)
    {
        CheckCount(nblocks, nameof(nblocks));
        if (nblocks == 0)
            return 0.0f;
        var host = new float[checked((int)nblocks)];
        _gpu.CopyToHost<float>(absmax, host);
        float offset = DoubleQuantOffset(host);
        QuantizeAbsmaxDoubleQuant(absmax, nblocks, offset, code256, qabsmax, nestedAbsmax);
        return offset;
    }

    /// <summary>absmax[i] = code256[qabsmax[i]] * nested_absmax[i / 256] + offset (fp32 multiply, then add).</summary>
    public void DequantizeAbsmaxDoubleQuant(DevicePtr qabsmax, DevicePtr code256, DevicePtr nestedAbsmax, float offset,
                                            DevicePtr absmax, long nblocks)
    {
        CheckCount(nblocks, nameof(nblocks));
        if (nblocks == 0)
            return;
        _gpu.Launch("dequantize_absmax_dq", Grid(nblocks, ThreadsPerBlock), ThreadsPerBlock, 0,
            qabsmax, code256, nestedAbsmax, offset, absmax, nblocks);
    }

    /// <summary>
    /// One token through a 4-bit weight: y[o] = sum_k W[o, k] * x[k], W [outFeatures, inFeatures] row-major
    /// 4-bit with absmax per block of the flattened tensor; fp32 weights and accumulation, y rounded to dtype.
    /// </summary>
    public void Gemv4bit(QuantType quantType, DType dtype, DevicePtr x, DevicePtr packedW, DevicePtr absmax, DevicePtr y,
                         int outFeatures, int inFeatures, int blocksize)
    {
        ValidateBlocksize(blocksize);
        CheckCount(outFeatures, nameof(outFeatures));
        CheckCount(inFeatures, nameof(inFeatures));
        string kernel = KernelName("gemv_4bit", quantType, dtype);
        if (outFeatures == 0)
            return;
        _gpu.Launch(kernel, Grid(outFeatures, ThreadsPerBlock / 32), ThreadsPerBlock, 0,
            x, packedW, absmax, y, outFeatures, inFeatures, blocksize);
    }

    /// <summary>
    /// The model's one-token 4-bit linear layer (kernel linear_4bit_gemv): y[o] = Σ_k T(code · absmax) · x[k], each weight
    /// rounded to <paramref name="dtype"/> as the dequantize kernels round it, fp32 products and sum, y rounded to dtype.
    /// absmax: the fp32 absmax, or null with the double-quantized state (qabsmax, code256, nestedAbsmax, offset: the
    /// whole weight's, as <see cref="Dequantize4bitDoubleQuant"/> takes them). dtype F32 or BF16.
    /// </summary>
    public void Linear4bitGemv(QuantType quantType, DType dtype, DevicePtr x, DevicePtr packedW, DevicePtr absmax,
                               DevicePtr qabsmax, DevicePtr code256, DevicePtr nestedAbsmax, DevicePtr offset, DevicePtr y,
                               int outFeatures, int inFeatures, int blocksize)
    {
        ValidateBlocksize(blocksize);
        CheckCount(outFeatures, nameof(outFeatures));
        CheckCount(inFeatures, nameof(inFeatures));
        if (dtype is not (DType.F32 or DType.BF16))
            throw new ArgumentException($"dtype: linear_4bit_gemv takes F32 or BF16, got {dtype}", nameof(dtype));
        if (absmax.IsNull && (qabsmax.IsNull || code256.IsNull || nestedAbsmax.IsNull || offset.IsNull))
            throw new ArgumentException("absmax: null needs the double-quantized state (qabsmax, code256, nestedAbsmax, offset)", nameof(absmax));
        string kernel = KernelName("linear_4bit_gemv", quantType, dtype);
        if (outFeatures == 0)
            return;
        _gpu.Launch(kernel, Grid(outFeatures, ThreadsPerBlock / 32), ThreadsPerBlock, 0,
            x, packedW, absmax, qabsmax, code256, nestedAbsmax, offset, y, outFeatures, inFeatures, blocksize);
    }

    // ------------------------------------------------------------------------------------------
    // Host-array convenience (copy in, launch, copy out, free)
    // ------------------------------------------------------------------------------------------

    /// <summary>The DType of a host element type: float → F32, <see cref="BFloat16"/> → BF16, <see cref="Half"/> → F16.</summary>
    public static DType DTypeOf<T>() where T : unmanaged =>
        KernelLaunch.DTypeOf<T>(allowF16: true, "4-bit ops take float, BFloat16 or Half values");

    /// <summary>Quantizes host values; returns the packed bytes ((n + 1) / 2) and absmax (ceil(n / blocksize)).</summary>
    public (byte[] Packed, float[] Absmax) Quantize4bit<T>(QuantType quantType, ReadOnlySpan<T> x, int blocksize)
        where T : unmanaged
    {
        ValidateBlocksize(blocksize);
        DType dtype = DTypeOf<T>();
        long n = x.Length;
        var packed = new byte[PackedBytes(n)];
        var absmax = new float[AbsmaxCount(n, blocksize)];
        if (n == 0)
            return (packed, absmax);
        using var dx = DeviceBuffer.Upload(_gpu, x);
        using var dAbsmax = new DeviceBuffer(_gpu, absmax.Length * sizeof(float));
        using var dPacked = new DeviceBuffer(_gpu, packed.Length);
        Quantize4bit(quantType, dtype, dx.Ptr, n, blocksize, dAbsmax.Ptr, dPacked.Ptr);
        _gpu.Synchronize();
        dPacked.Download<byte>(packed);
        dAbsmax.Download<float>(absmax);
        return (packed, absmax);
    }

    /// <summary>Dequantizes host data into <paramref name="output"/> (its length is n).</summary>
    public void Dequantize4bit<T>(QuantType quantType, ReadOnlySpan<byte> packed, ReadOnlySpan<float> absmax,
                                  int blocksize, Span<T> output) where T : unmanaged
    {
        ValidateBlocksize(blocksize);
        DType dtype = DTypeOf<T>();
        long n = output.Length;
        if (packed.Length < PackedBytes(n))
            throw new ArgumentException($"packed holds {packed.Length} bytes, {PackedBytes(n)} needed", nameof(packed));
        if (absmax.Length < AbsmaxCount(n, blocksize))
            throw new ArgumentException($"absmax holds {absmax.Length} values, {AbsmaxCount(n, blocksize)} needed", nameof(absmax));
        if (n == 0)
            return;
        using var dPacked = DeviceBuffer.Upload(_gpu, packed[..(int)PackedBytes(n)]);
        using var dAbsmax = DeviceBuffer.Upload(_gpu, absmax[..(int)AbsmaxCount(n, blocksize)]);
        using var dOut = new DeviceBuffer(_gpu, n * dtype.ElementSize());
        Dequantize4bit(quantType, dtype, dPacked.Ptr, dAbsmax.Ptr, n, blocksize, dOut.Ptr);
        _gpu.Synchronize();
        dOut.Download(output);
    }

    /// <summary>
    /// Double-quantizes host absmax on the device with the signed dynamic map (or <paramref name="code256"/>),
    /// offset = mean computed on the host; the result is the CPU reference's state type.
    /// </summary>
    public DoubleQuantState QuantizeAbsmaxDoubleQuant(ReadOnlySpan<float> absmax, float[]? code256 = null)
    {
        float[] map = code256 ?? DynamicMap.Signed.ToArray();
        CheckCode256(map);
        long nblocks = absmax.Length;
        var q = new byte[nblocks];
        var nested = new float[NestedAbsmaxCount(nblocks)];
        float offset = DoubleQuantOffset(absmax);
        if (nblocks > 0)
        {
            using var dAbsmax = DeviceBuffer.Upload(_gpu, absmax);
            using var dCode = DeviceBuffer.Upload<float>(_gpu, map);
            using var dQ = new DeviceBuffer(_gpu, nblocks);
            using var dNested = new DeviceBuffer(_gpu, nested.Length * sizeof(float));
            QuantizeAbsmaxDoubleQuant(dAbsmax.Ptr, nblocks, offset, dCode.Ptr, dQ.Ptr, dNested.Ptr);
            _gpu.Synchronize();
            dQ.Download<byte>(q);
            dNested.Download<float>(nested);
        }
        return new DoubleQuantState
        {
            QuantizedAbsmax = q,
            NestedAbsmax = nested,
            Offset = offset,
            NestedBlockSize = NestedBlocksize,
            NestedQuantMap = map,
        };
    }

    /// <summary>Decodes double-quantized absmax on the device into <paramref name="absmax"/> (length = state.Count).</summary>
    public void DequantizeAbsmaxDoubleQuant(DoubleQuantState state, Span<float> absmax)
    {
        ArgumentNullException.ThrowIfNull(state);
        state.Validate();
        if (state.NestedBlockSize != NestedBlocksize)
            throw new ArgumentException($"the kernels use nested blocksize {NestedBlocksize}, the state has {state.NestedBlockSize}", nameof(state));
        long nblocks = state.Count;
        if (absmax.Length != nblocks)
            throw new ArgumentException($"absmax has {absmax.Length} entries, the state encodes {nblocks}", nameof(absmax));
        if (nblocks == 0)
            return;
        using var dQ = DeviceBuffer.Upload<byte>(_gpu, state.QuantizedAbsmax);
        using var dCode = DeviceBuffer.Upload<float>(_gpu, state.NestedQuantMap);
        using var dNested = DeviceBuffer.Upload<float>(_gpu, state.NestedAbsmax);
        using var dAbsmax = new DeviceBuffer(_gpu, nblocks * sizeof(float));
        DequantizeAbsmaxDoubleQuant(dQ.Ptr, dCode.Ptr, dNested.Ptr, state.Offset, dAbsmax.Ptr, nblocks);
        _gpu.Synchronize();
        dAbsmax.Download(absmax);
    }

    private static void CheckCode256(ReadOnlySpan<float> code256)
    {
        if (code256.Length != 256)
            throw new ArgumentException($"code256 must hold the 256 values of the dynamic map, got {code256.Length}", nameof(code256));
    }
}
