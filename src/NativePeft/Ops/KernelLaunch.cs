using NativePeft.Numerics;
using NativePeft.Runtime;

namespace NativePeft.Ops;

/// <summary>
/// What the kernel launchers (<see cref="GpuQuantOps"/>, <see cref="GpuTransformerOps"/>, <see cref="GpuAttentionOps"/>,
/// <see cref="GpuLossOps"/>, <see cref="GpuElementwiseOps"/>) share: kernel-name suffixes of element types, grid sizes,
/// and the argument checks whose messages callers and tests rely on.
/// </summary>
internal static class KernelLaunch
{
    /// <summary>Resident blocks per multiprocessor a grid-stride kernel gets at most (two waves of 8 blocks of 256 threads).</summary>
    public const int GridStrideBlocksPerMultiprocessor = 16;

    /// <summary>The grid cap of the grid-stride kernels on <paramref name="gpu"/>: 16 blocks per multiprocessor (at least 16).</summary>
    public static int MaxGridStrideBlocks(IGpu gpu) =>
        Math.Max(1, gpu.Properties.MultiprocessorCount) * GridStrideBlocksPerMultiprocessor;

    /// <summary>ceil(work / perBlock) for work ≥ 0, perBlock &gt; 0.</summary>
    public static long CeilDiv(long work, long perBlock) => (work + perBlock - 1) / perBlock;

    /// <summary>Blocks of a grid-stride launch: ceil(work / perBlock) clamped to [1, maxBlocks].</summary>
    public static int GridBlocks(long work, long perBlock, int maxBlocks) =>
        (int)Math.Clamp(CeilDiv(work, perBlock), 1, maxBlocks);

    /// <summary>
    /// The kernel name suffix of an element type: "f32", "bf16", and "f16" where <paramref name="allowF16"/>.
    /// Any other type throws an <see cref="ArgumentException"/> on "dtype" with "<paramref name="accepted"/>, got {dtype}".
    /// </summary>
    public static string DTypeSuffix(DType dtype, bool allowF16, string accepted) => dtype switch
    {
        DType.F32 => "f32",
        DType.BF16 => "bf16",
        DType.F16 when allowF16 => "f16",
        _ => throw new ArgumentException($"{accepted}, got {dtype}", nameof(dtype)),
    };

    /// <summary>
    /// The DType of a host element type: float → F32, <see cref="BFloat16"/> → BF16, and <see cref="Half"/> → F16 where
    /// <paramref name="allowF16"/>. Any other type throws an <see cref="ArgumentException"/> on "T" with
    /// "<paramref name="accepted"/>, got {type name}".
    /// </summary>
    public static DType DTypeOf<T>(bool allowF16, string accepted) where T : unmanaged
    {
        if (typeof(T) == typeof(float)) return DType.F32;
        if (typeof(T) == typeof(BFloat16)) return DType.BF16;
        if (allowF16 && typeof(T) == typeof(Half)) return DType.F16;
        throw new ArgumentException($"{accepted}, got {typeof(T).Name}", nameof(T));
    }

    /// <summary>Throws an <see cref="ArgumentException"/> naming <paramref name="name"/> for a null device pointer.</summary>
    public static void CheckPtr(DevicePtr p, string name)
    {
        if (p.IsNull)
            throw new ArgumentException($"{name} is a null device pointer", name);
    }

    /// <summary>Throws an <see cref="ArgumentOutOfRangeException"/> naming <paramref name="name"/> when n &lt; 0.</summary>
    public static void CheckCount(long n, string name)
    {
        if (n < 0)
            throw new ArgumentOutOfRangeException(name, n, $"{name} must not be negative");
    }

    /// <summary>Throws an <see cref="ArgumentOutOfRangeException"/> naming <paramref name="name"/> when n ≤ 0.</summary>
    public static void CheckPositive(long n, string name)
    {
        if (n <= 0)
            throw new ArgumentOutOfRangeException(name, n, $"{name} must be positive");
    }

    /// <summary>Throws an <see cref="ArgumentException"/> naming <paramref name="name"/> unless a host array has the expected length.</summary>
    public static void CheckLength(int actual, long expected, string name)
    {
        if (actual != expected)
            throw new ArgumentException($"{name} has {actual} elements, {expected} expected", name);
    }
}

/// <summary>
/// A temporary device allocation of the host-array overloads (at least 1 byte, so an empty one is still a valid
/// pointer), freed on Dispose.
/// </summary>
internal sealed class DeviceBuffer : IDisposable
{
    private readonly IGpu _gpu;
    private bool _disposed;

    public DeviceBuffer(IGpu gpu, long bytes)
    {
        _gpu = gpu;
        Ptr = gpu.Alloc(Math.Max(bytes, 1));
    }

    public DevicePtr Ptr { get; }

    /// <summary>Allocates room for <paramref name="values"/> and copies them in.</summary>
    public static DeviceBuffer Upload<T>(IGpu gpu, ReadOnlySpan<T> values) where T : unmanaged
    {
        var buffer = new DeviceBuffer(gpu, (long)values.Length * System.Runtime.CompilerServices.Unsafe.SizeOf<T>());
        try
        {
            gpu.CopyToDevice(values, buffer.Ptr);
        }
        catch
        {
            buffer.Dispose();
            throw;
        }
        return buffer;
    }

    /// <summary>Copies <paramref name="values"/> from the start of the buffer (the caller synchronizes first).</summary>
    public void Download<T>(Span<T> values) where T : unmanaged => _gpu.CopyToHost(Ptr, values);

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        _gpu.Free(Ptr);
    }
}
