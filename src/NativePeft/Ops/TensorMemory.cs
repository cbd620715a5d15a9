using System.Globalization;
using System.Runtime.InteropServices;
using NativePeft.Numerics;
using NativePeft.Runtime;

namespace NativePeft.Ops;

/// <summary>
/// Which arena of a <see cref="DevicePool"/> a tensor comes from; the plain allocators ignore it.
/// </summary>
public enum MemoryRegion
{
    /// <summary>Allocated per batch shape or inside an op and freed again: activations, op workspaces, logits (the default).</summary>
    Transient,
    /// <summary>Allocated once and kept: base weights, quantization state, adapters, gradients, dequantization scratch, optimizer state and maps.</summary>
    Persistent,
    /// <summary>The RoPE cos/sin tables, reallocated (both at once) when a longer sequence comes.</summary>
    RopeTables,
}

/// <summary>
/// Where an <see cref="IOps"/>'s tensors live. Whole tensors are allocated zero-filled and freed by the caller; the
/// allocator counts bytes in use and the peak, which the memory plan (training issue) is checked against.
/// </summary>
public abstract class TensorMemory : IDisposable
{
    private readonly object _lock = new();
    private readonly Dictionary<ulong, long> _live = [];
    private long _allocated, _peak;

    public long AllocatedBytes { get { lock (_lock) return _allocated; } }
    public long PeakAllocatedBytes { get { lock (_lock) return _peak; } }
    public void ResetPeak() { lock (_lock) _peak = _allocated; }

    /// <summary>The bytes one tensor of <paramref name="count"/> elements occupies: at least 1, rounded up to <paramref name="alignment"/>.</summary>
    public static long AlignedBytes(DType dtype, long count, int alignment = 1)
    {
        long bytes = Math.Max(1, checked(count * dtype.ElementSize()));
        return alignment <= 1 ? bytes : checked((bytes + alignment - 1) / alignment * alignment);
    }

    /// <summary>Bytes as GiB / MiB / KiB (binary units) with two decimals, or bytes.</summary>
    public static string FormatBytes(long bytes) => bytes switch
    {
        >= 1L << 30 => (bytes / (double)(1L << 30)).ToString("0.00", CultureInfo.InvariantCulture) + " GiB",
        >= 1L << 20 => (bytes / (double)(1L << 20)).ToString("0.00", CultureInfo.InvariantCulture) + " MiB",
        >= 1L << 10 => (bytes / 1024.0).ToString("0.0", CultureInfo.InvariantCulture) + " KiB",
        _ => bytes.ToString(CultureInfo.InvariantCulture) + " B",
    };

    /// <summary>A zero-filled tensor (transient).</summary>
    public Tensor Allocate(DType dtype, params int[] shape) => Allocate(MemoryRegion.Transient, dtype, shape);

    /// <summary>A zero-filled tensor from <paramref name="region"/> (see <see cref="MemoryRegion"/>).</summary>
    public Tensor Allocate(MemoryRegion region, DType dtype, params int[] shape)
    {
        var probe = new Tensor(DevicePtr.Null, dtype, shape);
        long bytes = Math.Max(probe.Bytes, 1);
        var ptr = AllocateBytes(bytes, region);
        lock (_lock)
        {
            _live[ptr.Address] = bytes;
            _allocated += bytes;
            _peak = Math.Max(_peak, _allocated);
        }
        return new Tensor(ptr, dtype, shape);
    }

    public void Free(Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        long bytes;
        lock (_lock)
        {
            if (!_live.Remove(tensor.Data.Address, out bytes))
                throw new InvalidOperationException($"{tensor} was not allocated here (or was freed already)");
            _allocated -= bytes;
        }
        FreeBytes(tensor.Data);
    }

    protected abstract DevicePtr AllocateBytes(long bytes, MemoryRegion region);
    protected abstract void FreeBytes(DevicePtr ptr);

    public virtual void Dispose()
    {
        lock (_lock)
        {
            foreach (var address in _live.Keys) FreeBytes(new DevicePtr(address));
            _live.Clear();
            _allocated = 0;
        }
        GC.SuppressFinalize(this);
    }
}

/// <summary>Host memory (64-byte aligned, zero-filled) for <see cref="CpuOps"/>.</summary>
public sealed unsafe class HostTensorMemory : TensorMemory
{
    protected override DevicePtr AllocateBytes(long bytes, MemoryRegion region)
    {
        void* p = NativeMemory.AlignedAlloc((nuint)bytes, 64);
        if (p == null) throw new OutOfMemoryException($"host allocation of {bytes} bytes failed");
        NativeMemory.Clear(p, (nuint)bytes);
        return new DevicePtr((ulong)p);
    }

    protected override void FreeBytes(DevicePtr ptr) => NativeMemory.AlignedFree((void*)ptr.Address);
}

/// <summary>Device memory of an <see cref="IGpu"/> (zero-filled) for <see cref="GpuOps"/>.</summary>
public sealed class GpuTensorMemory(IGpu gpu) : TensorMemory
{
    protected override DevicePtr AllocateBytes(long bytes, MemoryRegion region)
    {
        var p = gpu.Alloc(bytes);
        gpu.Memset(p, 0, bytes);
        return p;
    }

    protected override void FreeBytes(DevicePtr ptr) => gpu.Free(ptr);
}
