using NativePeft.Runtime;

namespace NativePeft.Optim;

/// <summary>
/// Launcher of kernels/optim.cu on an <see cref="IGpu"/> (the same calls on CudaGpu and EmulatedGpu). The methods
/// validate and launch on the device's stream without synchronizing. (Clipping's sum of squares is
/// <see cref="Ops.IOps.SumOfSquares"/>: elementwise.cu's kernels.)
/// </summary>
public sealed class GpuOptimKernels
{
    /// <summary>Threads per block of every kernel in optim.cu.</summary>
    public const int ThreadsPerBlock = 256;

    private readonly IGpu _gpu;
    private readonly int _maxGridBlocks;

    public GpuOptimKernels(IGpu gpu)
    {
        _gpu = gpu ?? throw new ArgumentNullException(nameof(gpu));
        _maxGridBlocks = Math.Max(1, gpu.Properties.MultiprocessorCount) * 16;
    }

    public IGpu Gpu => _gpu;

    private static void CheckPtr(DevicePtr p, string name)
    {
        if (p.IsNull) throw new ArgumentException($"{name} is a null device pointer", name);
    }

    private int Grid(long units) => (int)Math.Clamp(units, 1, _maxGridBlocks);

    /// <summary>adamw_f32: one AdamW step on n fp32 elements (p, m, v in place; g read).</summary>
    public unsafe void AdamWF32(DevicePtr p, DevicePtr g, DevicePtr m, DevicePtr v, long n, in AdamWStepScalars s)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(n);
        if (n == 0) return;
        CheckPtr(p, nameof(p)); CheckPtr(g, nameof(g)); CheckPtr(m, nameof(m)); CheckPtr(v, nameof(v));
        fixed (AdamWStepScalars* scalars = &s)  // the kernel's AdamWScalars, by value
            _gpu.Launch("adamw_f32", Grid(((n + 3) / 4 + ThreadsPerBlock - 1) / ThreadsPerBlock), ThreadsPerBlock, 0, // 4 elements a thread
                p, g, m, v, n, KernelArg.Struct(scalars));
    }

    /// <summary>
    /// adamw8bit_blockwise: one AdamW step with m (state1, u8, signed map) and v (state2, u8, unsigned map) quantized
    /// in blocks of 256 with fp32 absmax1/absmax2 [ceil(n/256)]; the maps are 256 fp32 values on the device.
    /// </summary>
    public unsafe void AdamW8BitBlockwise(DevicePtr p, DevicePtr g, DevicePtr state1, DevicePtr state2, DevicePtr absmax1,
        DevicePtr absmax2, DevicePtr signedMap, DevicePtr unsignedMap, long n, in AdamWStepScalars s)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(n);
        if (n == 0) return;
        CheckPtr(p, nameof(p)); CheckPtr(g, nameof(g)); CheckPtr(state1, nameof(state1)); CheckPtr(state2, nameof(state2));
        CheckPtr(absmax1, nameof(absmax1)); CheckPtr(absmax2, nameof(absmax2));
        CheckPtr(signedMap, nameof(signedMap)); CheckPtr(unsignedMap, nameof(unsignedMap));
        fixed (AdamWStepScalars* scalars = &s)
            _gpu.Launch("adamw8bit_blockwise", Grid(AdamWMath.Blocks(n)), ThreadsPerBlock, 0,
                p, g, state1, state2, absmax1, absmax2, signedMap, unsignedMap, n, KernelArg.Struct(scalars));
    }
}
