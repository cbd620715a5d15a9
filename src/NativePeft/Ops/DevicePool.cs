using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using NativePeft.Numerics;
using NativePeft.Planning;
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
/// up front, sized from a <see cref="MemoryPlan"/> (training) or an <see cref="Planning.InferencePlan"/> (generation with a
/// KV cache, evaluation) with every tensor rounded up to <see cref="Alignment"/> (<see cref="MemoryPlan.Aligned"/>), and
/// sub-allocates tensors from them (an inference plan: persistent = weights, quantization state, adapters; transient = the
/// KV cache and the forward's workspace, or eval's activations):
/// <list type="bullet">
/// <item><b>persistent</b> (<see cref="MemoryPlan.PersistentArenaBytes"/>): base weights, quantization state,
/// adapters, gradients, dequantization scratch, device optimizer state and the 8-bit maps — allocated once;</item>
/// <item><b>rope tables</b> (<see cref="MemoryPlan.RopeArenaBytes"/> for a sequence of B·T): the RoPE cos/sin tables,
/// reallocated whole when a longer sequence comes;</item>
/// <item><b>transient</b> (<see cref="MemoryPlan.TransientArenaBytes"/>): activations (freed and reallocated when the
/// batch shape changes) and op workspaces (freed inside the op).</item>
/// </list>
/// Every arena is an address-ordered first-fit free list with coalescing (allocated in order and freed in reverse,
/// as the model does, it behaves as a bump allocator). The owner routes a tensor with <see cref="MemoryRegion"/>.
/// Paged optimizer state is CUDA managed memory outside the pool (the plan's paged row).
/// <see cref="TensorMemory.PeakAllocatedBytes"/> counts requested bytes, as every allocator does, so it equals
/// <see cref="MemoryPlan.TotalBytes"/>; <see cref="Arenas"/> shows what alignment and fragmentation add.
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

    /// <summary>The training plan the arenas were sized from (requested bytes, alignment 1); null for an <see cref="InferencePlan"/>.</summary>
    public MemoryPlan? Plan { get; }
    /// <summary>The inference plan (generate, eval) the arenas were sized from (requested bytes, alignment 1); null for a training plan.</summary>
    public InferencePlan? InferencePlan { get; }
    /// <summary>The plan's total (requested bytes): what <see cref="TensorMemory.PeakAllocatedBytes"/> reaches.</summary>
    public long PlanTotalBytes { get; }
    private readonly string _shape;
    public int Alignment { get; }

    private DevicePool(MemoryPlan plan, int alignment, IReadOnlyList<(int Batch, int Seq)> alsoFits,
        Func<long, DevicePtr> reserve, Action<DevicePtr> release, Action<DevicePtr, long> zero)
        : this(Reservations(plan ?? throw new ArgumentNullException(nameof(plan)), alignment, alsoFits), plan.TotalBytes,
            $"batch {plan.Options.Batch}, seq {plan.Options.Seq}", alignment, reserve, release, zero)
    {
        Plan = plan.Alignment == 1 ? plan : plan.Aligned(1);
    }

    private DevicePool(InferencePlan plan, int alignment, Func<long, DevicePtr> reserve, Action<DevicePtr> release, Action<DevicePtr, long> zero)
        : this(Reservations(plan ?? throw new ArgumentNullException(nameof(plan)), alignment), plan.TotalBytes, plan.ShapeDescription,
            alignment, reserve, release, zero)
    {
        InferencePlan = plan.Alignment == 1 ? plan : plan.Aligned(1);
    }

    private DevicePool((long Persistent, long RopeTables, long Transient) sizes, long planTotal, string shape, int alignment,
        Func<long, DevicePtr> reserve, Action<DevicePtr> release, Action<DevicePtr, long> zero)
    {
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

    /// <summary>
    /// A pool of device memory of <paramref name="gpu"/> (256-byte alignment) sized from <paramref name="plan"/>, and big
    /// enough for the other batch shapes in <paramref name="alsoFits"/> (evaluation, generation: B=1 and the longest
    /// prompt + answer), whose activations replace the training ones.
    /// </summary>
    public static DevicePool ForGpu(IGpu gpu, MemoryPlan plan, params IReadOnlyList<(int Batch, int Seq)> alsoFits)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        return new DevicePool(plan, GpuAlignment, alsoFits, gpu.Alloc, gpu.Free, (p, n) => gpu.Memset(p, 0, n));
    }

    /// <summary>
    /// A pool of device memory of <paramref name="gpu"/> (256-byte alignment) sized from an inference plan (generation
    /// with a KV cache, or evaluation): the aligned plan's persistent, rope-table and transient arenas.
    /// </summary>
    public static DevicePool ForGpu(IGpu gpu, InferencePlan plan)
    {
        ArgumentNullException.ThrowIfNull(gpu);
        return new DevicePool(plan, GpuAlignment, gpu.Alloc, gpu.Free, (p, n) => gpu.Memset(p, 0, n));
    }

    /// <summary>A pool of host memory (64-byte alignment) for <see cref="CpuOps"/>, sized from an inference plan for <see cref="PlanDevice.Cpu"/>.</summary>
    public static DevicePool ForHost(InferencePlan plan) => new(plan, HostAlignment, HostReserve, HostRelease, HostZero);

    private static DevicePtr HostReserve(long bytes)
    {
        void* p = NativeMemory.AlignedAlloc((nuint)bytes, HostAlignment);
        if (p == null) throw new OutOfMemoryException($"host allocation of {bytes} bytes failed");
        return new DevicePtr((ulong)p);
    }

    private static void HostRelease(DevicePtr p) => NativeMemory.AlignedFree((void*)p.Address);

    private static void HostZero(DevicePtr p, long n) => NativeMemory.Clear((void*)p.Address, (nuint)n);

    /// <summary>The arena sizes for an inference plan at <paramref name="alignment"/>: the aligned plan's persistent, rope-table and transient bytes.</summary>
    public static (long Persistent, long RopeTables, long Transient) Reservations(InferencePlan plan, int alignment)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var aligned = plan.Aligned(alignment);
        return (aligned.PersistentArenaBytes, aligned.RopeArenaBytes, aligned.TransientArenaBytes);
    }

    /// <summary>A pool of host memory (64-byte alignment) for <see cref="CpuOps"/>, sized from a plan for <see cref="PlanDevice.Cpu"/>.</summary>
    public static DevicePool ForHost(MemoryPlan plan, params IReadOnlyList<(int Batch, int Seq)> alsoFits) =>
        new(plan, HostAlignment, alsoFits, HostReserve, HostRelease, HostZero);

    /// <summary>
    /// The arena sizes for <paramref name="plan"/> at <paramref name="alignment"/>: the aligned plan's
    /// <see cref="MemoryPlan.PersistentArenaBytes"/> and <see cref="MemoryPlan.TransientArenaBytes"/>, and its
    /// <see cref="MemoryPlan.RopeArenaBytes"/> for one sequence of B·T tokens (equal to the plan's when B = 1 or
    /// B·T ≤ 64); each other shape (B, T) of <paramref name="alsoFits"/> raises the
    /// RoPE arena to its tables and the transient arena to its activations plus the larger of its op workspaces and
    /// the F32 logits [B·T, vocab] that greedy generation reads.
    /// </summary>
    public static (long Persistent, long RopeTables, long Transient) Reservations(MemoryPlan plan, int alignment, IReadOnlyList<(int Batch, int Seq)>? alsoFits = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var aligned = plan.Aligned(alignment);
        // The RoPE tables for a sequence of B·T: an evaluation with no more tokens than training (B = 1, T = B·T)
        // fits the transient arena (activations and workspaces depend on B·T alone), and so it fits here too.
        long rope = plan.Options.Batch == 1 ? aligned.RopeArenaBytes
            : plan.With(o => o with { Batch = 1, Seq = o.Batch * o.Seq }).Aligned(alignment).RopeArenaBytes;
        long transient = aligned.TransientArenaBytes;
        foreach (var (b, t) in alsoFits ?? [])
        {
            var other = plan.With(o => o with { Batch = b, Seq = t }).Aligned(alignment);
            rope = Math.Max(rope, other.RopeArenaBytes);
            long logits = MemoryPlan.TensorBytes(DType.F32, (long)b * t * plan.Config.VocabSize, alignment);
            transient = Math.Max(transient, other.ActivationBytes + Math.Max(other.TransientWorkspaceBytes, logits));
        }
        return (aligned.PersistentArenaBytes, rope, transient);
    }

    internal static string ArenaName(MemoryRegion region) => region switch
    {
        MemoryRegion.Persistent => "persistent (weights, quantization state, adapters, gradients, optimizer state)",
        MemoryRegion.RopeTables => "rope tables",
        _ => "transient (activations, op workspaces)",
    };

    private static string Describe(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes} bytes ({MemoryPlan.FormatBytes(bytes)})");

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
        sb.Append(CultureInfo.InvariantCulture, $"memory pool: peak {MemoryPlan.FormatBytes(PeakAllocatedBytes)} of the plan's {MemoryPlan.FormatBytes(PlanTotalBytes)}");
        foreach (var a in Arenas)
        {
            string name = a.Region switch { MemoryRegion.Persistent => "persistent", MemoryRegion.RopeTables => "rope tables", _ => "transient" };
            sb.Append(CultureInfo.InvariantCulture,
                $"; {name} {MemoryPlan.FormatBytes(a.HighWaterBytes)} high-water of {MemoryPlan.FormatBytes(a.ReservedBytes)} reserved");
        }
        return sb.ToString();
    }

    protected override DevicePtr AllocateBytes(long bytes, MemoryRegion region)
    {
        if (!Enum.IsDefined(region)) throw new ArgumentOutOfRangeException(nameof(region), region, "unknown memory region");
        long size = MemoryPlan.TensorBytes(DType.U8, bytes, Alignment);
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
