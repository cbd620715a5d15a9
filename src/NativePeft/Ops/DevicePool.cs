using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using NativePeft.Numerics;
using NativePeft.Runtime;

namespace NativePeft.Ops;

/// <summary>One arena of a <see cref="DevicePool"/>, as it stands.</summary>
/// <param name="Region">What it holds.</param>
/// <param name="ReservedBytes">Its size: one device allocation made up front from the memory plan.</param>
/// <param name="InUseBytes">Bytes of live tensors now, each rounded up to the pool's alignment.</param>
/// <param name="PeakInUseBytes">The most <see cref="InUseBytes"/> has been.</param>
/// <param name="HighWaterBytes">The highest offset any tensor has reached: above <see cref="PeakInUseBytes"/> by what fragmentation cost.</param>
/// <param name="LargestFreeBytes">The largest contiguous free block now.</param>
public sealed record PoolArenaInfo(MemoryRegion Region, long ReservedBytes, long InUseBytes, long PeakInUseBytes, long HighWaterBytes, long LargestFreeBytes)
{
    public string Name => DevicePool.ArenaName(Region);
}

/// <summary>
/// The memory pool: a <see cref="TensorMemory"/> that reserves its arenas with one device (or host) allocation each,
/// up front, and sub-allocates tensors from them. The factories that size a pool from a memory plan (training) or an
/// inference plan (generation with a KV cache, evaluation) live with the plans, in Planning (<c>DevicePool.ForGpu</c>,
/// <c>DevicePool.ForHost</c>, <c>DevicePool.Reservations</c>: static extension members of <c>Planning.PlannedPools</c>),
/// so that Ops does not depend on Planning. Every tensor is rounded up to <see cref="Alignment"/>; the arenas:
/// <list type="bullet">
/// <item><b>persistent</b>: base weights, quantization state, adapters, gradients, dequantization scratch, device
/// optimizer state and the 8-bit maps — allocated once;</item>
/// <item><b>rope tables</b>: the RoPE cos/sin tables, reallocated whole when a longer sequence comes;</item>
/// <item><b>transient</b>: activations (freed and reallocated when the batch shape changes), a KV cache and its
/// workspace, and op workspaces (freed inside the op).</item>
/// </list>
/// Every arena is an address-ordered first-fit free list with coalescing (allocated in order and freed in reverse,
/// as the model does, it behaves as a bump allocator). The owner routes a tensor with <see cref="MemoryRegion"/>.
/// Paged optimizer state is CUDA managed memory outside the pool (the plan's paged row).
/// <see cref="TensorMemory.PeakAllocatedBytes"/> counts requested bytes, as every allocator does, so it equals the
/// plan's total (<see cref="PlanTotalBytes"/>); <see cref="Arenas"/> shows what alignment and fragmentation add.
/// A request that does not fit its arena throws an <see cref="OutOfMemoryException"/> naming the arena, its size,
/// the request and the plan's total.
/// </summary>
public sealed unsafe class DevicePool : TensorMemory
{
    /// <summary>The GPU pool's alignment: what cudaMalloc gives.</summary>
    public const int GpuAlignment = 256;
    /// <summary>The host pool's alignment (as <see cref="HostTensorMemory"/>).</summary>
    public const int HostAlignment = 64;

    private readonly object _poolLock = new();
    private readonly PoolArena[] _arenas;
    private readonly Action<DevicePtr> _release;
    private readonly Action<DevicePtr, long> _zero;
    private bool _disposed;

    /// <summary>The plan the arenas were sized from (a Planning.MemoryPlan or InferencePlan at alignment 1), for the planning layer's accessors.</summary>
    internal object SizedFrom { get; }
    /// <summary>The plan's total (requested bytes): what <see cref="TensorMemory.PeakAllocatedBytes"/> reaches.</summary>
    public long PlanTotalBytes { get; }
    private readonly string _shape;
    public int Alignment { get; }

    /// <summary>
    /// A pool of the arena sizes <paramref name="sizes"/> (bytes, already rounded to <paramref name="alignment"/>),
    /// reserved with <paramref name="reserve"/>; <paramref name="planTotal"/> and <paramref name="shape"/> (the plan's
    /// total and the shape it was made for) go into the error of a request that does not fit.
    /// </summary>
    private DevicePool((long Persistent, long RopeTables, long Transient) sizes, long planTotal, string shape, int alignment,
        object sizedFrom, Func<long, DevicePtr> reserve, Action<DevicePtr> release, Action<DevicePtr, long> zero)
    {
        SizedFrom = sizedFrom;
        PlanTotalBytes = planTotal;
        _shape = shape;
        Alignment = alignment;
        _release = release;
        _zero = zero;
        var (persistent, rope, transient) = sizes;
        _arenas = new PoolArena[3];
        try
        {
            Reserve(MemoryRegion.Persistent, persistent);
            Reserve(MemoryRegion.RopeTables, rope);
            Reserve(MemoryRegion.Transient, transient);
        }
        catch
        {
            foreach (var a in _arenas) if (a is not null) release(a.Allocation);
            throw;
        }

        void Reserve(MemoryRegion region, long bytes)
        {
            DevicePtr Get(long n)
            {
                try { return reserve(n); }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    throw new OutOfMemoryException(
                        $"memory pool: reserving the {ArenaName(region)} arena of {Describe(bytes)} failed (plan total {Describe(PlanTotalBytes)}): {e.Message}", e);
                }
            }
            // cudaMalloc returns 256-byte aligned memory; a backing that aligns less (the emulator's host memory) gets
            // alignment - 1 bytes more and the arena starts at the first aligned address.
            long size = Math.Max(bytes, alignment);
            DevicePtr p = Get(size), start = p;
            if (p.Address % (ulong)alignment != 0)
            {
                release(p);
                p = Get(size + alignment - 1);
                start = new DevicePtr((p.Address + (ulong)alignment - 1) & ~((ulong)alignment - 1));
            }
            _arenas[(int)region] = new PoolArena(region, p, start, bytes);
        }
    }

    /// <summary>A pool of device memory of <paramref name="gpu"/> (256-byte alignment, what cudaMalloc gives).</summary>
    internal static DevicePool OnGpu(IGpu gpu, (long Persistent, long RopeTables, long Transient) sizes, long planTotal, string shape, object sizedFrom)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        return new DevicePool(sizes, planTotal, shape, GpuAlignment, sizedFrom, gpu.Alloc, gpu.Free, (p, n) => gpu.Memset(p, 0, n));
    }

    /// <summary>A pool of host memory (64-byte alignment) for <see cref="CpuOps"/>.</summary>
    internal static DevicePool OnHost((long Persistent, long RopeTables, long Transient) sizes, long planTotal, string shape, object sizedFrom) =>
        new(sizes, planTotal, shape, HostAlignment, sizedFrom, HostReserve, HostRelease, HostZero);

    private static DevicePtr HostReserve(long bytes)
    {
        void* p = NativeMemory.AlignedAlloc((nuint)bytes, HostAlignment);
        if (p == null) throw new OutOfMemoryException($"host allocation of {bytes} bytes failed");
        return new DevicePtr((ulong)p);
    }

    private static void HostRelease(DevicePtr p) => NativeMemory.AlignedFree((void*)p.Address);

    private static void HostZero(DevicePtr p, long n) => NativeMemory.Clear((void*)p.Address, (nuint)n);

    internal static string ArenaName(MemoryRegion region) => region switch
    {
        MemoryRegion.Persistent => "persistent (weights, quantization state, adapters, gradients, optimizer state)",
        MemoryRegion.RopeTables => "rope tables",
        _ => "transient (activations, op workspaces)",
    };

    private static string Describe(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes} bytes ({FormatBytes(bytes)})");

    /// <summary>Every arena (persistent, rope tables, transient): reserved, in use, peak, high-water mark, largest free block.</summary>
    public IReadOnlyList<PoolArenaInfo> Arenas
    {
        get { lock (_poolLock) return [.. new[] { MemoryRegion.Persistent, MemoryRegion.RopeTables, MemoryRegion.Transient }.Select(r => _arenas[(int)r].Info())]; }
    }

    public PoolArenaInfo Arena(MemoryRegion region)
    {
        lock (_poolLock) return _arenas[(int)region].Info();
    }

    /// <summary>Total bytes reserved (the pool's device footprint).</summary>
    public long ReservedBytes => _arenas.Sum(a => a.Size);

    /// <summary>
    /// One line: the peak (requested bytes) against the plan's total, then per arena its high-water mark against its
    /// reservation (a high-water mark above the peak in use is fragmentation).
    /// </summary>
    public string Describe()
    {
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"memory pool: peak {FormatBytes(PeakAllocatedBytes)} of the plan's {FormatBytes(PlanTotalBytes)}");
        foreach (var a in Arenas)
        {
            string name = a.Region switch { MemoryRegion.Persistent => "persistent", MemoryRegion.RopeTables => "rope tables", _ => "transient" };
            sb.Append(CultureInfo.InvariantCulture,
                $"; {name} {FormatBytes(a.HighWaterBytes)} high-water of {FormatBytes(a.ReservedBytes)} reserved");
        }
        return sb.ToString();
    }

    protected override DevicePtr AllocateBytes(long bytes, MemoryRegion region)
    {
        if (!Enum.IsDefined(region)) throw new ArgumentOutOfRangeException(nameof(region), region, "unknown memory region");
        long size = AlignedBytes(DType.U8, bytes, Alignment);
        DevicePtr p;
        lock (_poolLock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var arena = _arenas[(int)region];
            if (!arena.TryAllocate(size, out long offset))
                throw new OutOfMemoryException(
                    $"memory pool: a request of {Describe(bytes)} does not fit the {arena.Name} arena of {Describe(arena.Size)} " +
                    $"({arena.InUse} bytes in use, largest free block {arena.LargestFree()} bytes); the memory plan's total is " +
                    $"{Describe(PlanTotalBytes)} ({_shape}): this run needs more than the plan it was sized for" +
                    (region == MemoryRegion.Transient
                        ? " (generating with a model sized for training: call LlamaModel.ReleaseActivations() first, as the trainer's evaluation does)"
                        : ""));
            p = arena.Base.Offset(offset);
        }
        try { _zero(p, bytes); }
        catch
        {
            FreeBytes(p); // a failed zero-fill (a device fault) must not leak the block
            throw;
        }
        return p;
    }

    protected override void FreeBytes(DevicePtr ptr)
    {
        lock (_poolLock)
        {
            foreach (var a in _arenas)
                if (a.Contains(ptr)) { a.Free((long)(ptr.Address - a.Base.Address)); return; }
        }
        throw new InvalidOperationException($"memory pool: {ptr} is not in any arena");
    }

    public override void Dispose()
    {
        if (_disposed) return;
        base.Dispose();
        lock (_poolLock)
        {
            _disposed = true;
            foreach (var a in _arenas) _release(a.Allocation);
        }
    }

    /// <summary>An address-ordered first-fit free list with coalescing over one reservation.</summary>
    private sealed class PoolArena(MemoryRegion region, DevicePtr allocation, DevicePtr basePtr, long size)
    {
        /// <summary>What the backing returned (released on dispose); <see cref="Base"/> is its first aligned address.</summary>
        public DevicePtr Allocation { get; } = allocation;
        private readonly List<(long Offset, long Size)> _free = size > 0 ? [(0, size)] : [];
        private readonly Dictionary<long, long> _used = [];

        public MemoryRegion Region { get; } = region;
        public string Name => ArenaName(Region);
        public DevicePtr Base { get; } = basePtr;
        public long Size { get; } = size;
        public long InUse { get; private set; }
        public long PeakInUse { get; private set; }
        public long HighWater { get; private set; }

        public bool Contains(DevicePtr p) => p.Address >= Base.Address && p.Address < Base.Address + (ulong)Math.Max(Size, 1);

        public long LargestFree() => _free.Count == 0 ? 0 : _free.Max(f => f.Size);

        public bool TryAllocate(long size, out long offset)
        {
            for (int i = 0; i < _free.Count; i++)
            {
                var f = _free[i];
                if (f.Size < size) continue;
                offset = f.Offset;
                if (f.Size == size) _free.RemoveAt(i);
                else _free[i] = (f.Offset + size, f.Size - size);
                _used[offset] = size;
                InUse += size;
                PeakInUse = Math.Max(PeakInUse, InUse);
                HighWater = Math.Max(HighWater, offset + size);
                return true;
            }
            offset = -1;
            return false;
        }

        public void Free(long offset)
        {
            if (!_used.Remove(offset, out long size))
                throw new InvalidOperationException($"memory pool: offset {offset} of the {Name} arena is not allocated");
            InUse -= size;
            // Insert in address order, then merge with the free neighbours.
            int i = 0;
            while (i < _free.Count && _free[i].Offset < offset) i++;
            _free.Insert(i, (offset, size));
            if (i + 1 < _free.Count && _free[i].Offset + _free[i].Size == _free[i + 1].Offset)
            {
                _free[i] = (_free[i].Offset, _free[i].Size + _free[i + 1].Size);
                _free.RemoveAt(i + 1);
            }
            if (i > 0 && _free[i - 1].Offset + _free[i - 1].Size == _free[i].Offset)
            {
                _free[i - 1] = (_free[i - 1].Offset, _free[i - 1].Size + _free[i].Size);
                _free.RemoveAt(i);
            }
        }

        public PoolArenaInfo Info() => new(Region, Size, InUse, PeakInUse, HighWater, LargestFree());
    }
}
