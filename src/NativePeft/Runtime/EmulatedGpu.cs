using System.Collections.Frozen;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace NativePeft.Runtime;

/// <summary>A kernel launch on the emulator failed (unknown kernel, bad configuration, a fault in the kernel).</summary>
public sealed class EmulatorException : Exception
{
    public EmulatorException(string message) : base(message) { }
    public EmulatorException(string message, Exception inner) : base(message, inner) { }

    /// <summary>The kernel whose launch failed, when the failure is about a launch.</summary>
    public string? KernelName { get; init; }
}

/// <summary>
/// The emulator's race-finding checks (kernels/emu/emu_runtime.cpp, <c>emu_set_checks</c>). Each changes a
/// legal schedule into one that exposes a class of bugs the default schedule hides; none changes the
/// results of a correct kernel.
/// </summary>
[Flags]
public enum EmulatorChecks
{
    None = 0,
    /// <summary>The threads of a block start, and resume after every barrier, in a random order (per block,
    /// from the seed): a read of shared memory that another warp writes without a barrier between gives a
    /// different result.</summary>
    ShuffleThreads = 1,
    /// <summary>cp.async copies land at the wait that covers them, and their destination holds 0xFF bytes
    /// (NaN for bf16 and fp32) from the issue until then: a read before the wait shows.</summary>
    DeferAsyncCopies = 2,
    /// <summary>A shuffle from a lane that supplied no value returns all ones (not the reader's own value);
    /// ldmatrix row addresses must lie in the launch's dynamic shared memory.</summary>
    StrictCollectives = 4,
    All = ShuffleThreads | DeferAsyncCopies | StrictCollectives,
}

/// <summary>
/// The GPU emulated on the CPU: memory is host memory (64-byte aligned; a DevicePtr is the host
/// address) and kernels are the real kernels/*.cu compiled as C++ into libnativepeft_emu, launched by
/// name. Launches are synchronous. Allocations are tracked against a budget (default: the machine's
/// physical memory) so memory plans can be checked: <see cref="AllocatedBytes"/>, <see cref="PeakAllocatedBytes"/>.
/// </summary>
public sealed unsafe class EmulatedGpu : IGpu
{
    private const int Alignment = 64;

    private readonly EmuNative _native;
    private readonly FrozenSet<string> _kernels;
    private readonly Dictionary<string, int[]> _parameterSizes = new(StringComparer.Ordinal);
    private readonly Dictionary<ulong, long> _allocations = new();
    private readonly object _lock = new();
    private readonly long _budget;
    private long _allocated;
    private long _peak;
    private bool _disposed;
    private static int s_open;

    /// <summary>Emulated devices created in this process and not yet disposed (the soak test counts them: a run that
    /// forgets its device holds its memory until the process ends).</summary>
    public static int OpenCount => Volatile.Read(ref s_open);

    private EmulatedGpu(EmuNative native, long memoryBudgetBytes, int workerThreads)
    {
        _native = native;
        Interlocked.Increment(ref s_open);
        if (workerThreads > 0) native.SetWorkerThreads(workerThreads);
        _kernels = native.KernelNames().ToFrozenSet(StringComparer.Ordinal);
        _budget = memoryBudgetBytes > 0 ? memoryBudgetBytes : GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
        int threads = native.WorkerThreads();
        Properties = new GpuProperties(
            Name: $"NativePeft CPU emulator ({threads} worker threads)",
            Kind: GpuKind.Emulated,
            TotalMemoryBytes: _budget,
            MultiprocessorCount: threads,
            ComputeCapabilityMajor: 8,
            ComputeCapabilityMinor: 0,
            ConcurrentManagedAccess: true,
            DriverVersion: 0);
    }

    /// <summary>
    /// Loads the emulator library. memoryBudgetBytes: the emulated device's total memory (0: physical
    /// memory). workerThreads: OS threads that run blocks, process-wide (0: leave as is, which defaults
    /// to the hardware concurrency).
    /// </summary>
    public static bool TryCreate(out EmulatedGpu? gpu, out string reason, long memoryBudgetBytes = 0, int workerThreads = 0)
    {
        gpu = null;
        if (!EmuNative.TryLoad(out EmuNative? native, out reason)) return false;
        gpu = new EmulatedGpu(native!, memoryBudgetBytes, workerThreads);
        return true;
    }

    /// <summary>As <see cref="TryCreate"/>, throwing with the reason when the library is missing.</summary>
    public static EmulatedGpu Create(long memoryBudgetBytes = 0, int workerThreads = 0)
    {
        if (!TryCreate(out EmulatedGpu? gpu, out string reason, memoryBudgetBytes, workerThreads))
            throw new EmulatorException(reason);
        return gpu!;
    }

    public GpuProperties Properties { get; }

    /// <summary>Path of the loaded emulator library.</summary>
    public string LibraryPath => _native.LibraryPath;

    /// <summary>The names of all kernels the emulator library registers.</summary>
    public IReadOnlyCollection<string> KernelNames => _kernels;

    /// <summary>Bytes currently allocated (requested sizes).</summary>
    public long AllocatedBytes { get { lock (_lock) return _allocated; } }

    /// <summary>Highest <see cref="AllocatedBytes"/> since creation or the last <see cref="ResetPeak"/>.</summary>
    public long PeakAllocatedBytes { get { lock (_lock) return _peak; } }

    public void ResetPeak()
    {
        lock (_lock) _peak = _allocated;
    }

    public DevicePtr Alloc(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (bytes > _budget - _allocated)
                throw new OutOfMemoryException(
                    $"emulated device out of memory: requested {bytes} bytes, {_allocated} in use, budget {_budget}");
            void* p = NativeMemory.AlignedAlloc((nuint)Math.Max(bytes, 1), Alignment);
            _allocations.Add((ulong)p, bytes);
            _allocated += bytes;
            if (_allocated > _peak) _peak = _allocated;
            return new DevicePtr((ulong)p);
        }
    }

    public DevicePtr AllocManaged(long bytes) => Alloc(bytes);

    public void Free(DevicePtr ptr)
    {
        if (ptr.IsNull) return;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (!_allocations.Remove(ptr.Address, out long bytes))
                throw new ArgumentException($"Free of {ptr}, which is not an allocation of this device", nameof(ptr));
            _allocated -= bytes;
            NativeMemory.AlignedFree((void*)ptr.Address);
        }
    }

    public void CopyToDevice<T>(ReadOnlySpan<T> source, DevicePtr destination) where T : unmanaged
    {
        long bytes = (long)source.Length * sizeof(T);
        if (bytes == 0) return;
        CheckPointer(destination);
        fixed (T* s = source) Buffer.MemoryCopy(s, (void*)destination.Address, bytes, bytes);
    }

    public void CopyToHost<T>(DevicePtr source, Span<T> destination) where T : unmanaged
    {
        long bytes = (long)destination.Length * sizeof(T);
        if (bytes == 0) return;
        CheckPointer(source);
        fixed (T* d = destination) Buffer.MemoryCopy((void*)source.Address, d, bytes, bytes);
    }

    public void CopyDeviceToDevice(DevicePtr source, DevicePtr destination, long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0) return;
        CheckPointer(source);
        CheckPointer(destination);
        Buffer.MemoryCopy((void*)source.Address, (void*)destination.Address, bytes, bytes);
    }

    public void Memset(DevicePtr ptr, byte value, long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0) return;
        CheckPointer(ptr);
        NativeMemory.Fill((void*)ptr.Address, (nuint)bytes, value);
    }

    public void Prefetch(DevicePtr ptr, long bytes, bool toDevice) { }

    public void Gemm(bool transA, bool transB, int m, int n, int k, float alpha, DevicePtr a, DevicePtr b, float beta, DevicePtr c,
        Numerics.DType inputs, Numerics.DType output)
    {
        CheckPointer(a); CheckPointer(b); CheckPointer(c);
        long aCount = (long)m * k, bCount = (long)k * n, cCount = (long)m * n;
        if (inputs == Numerics.DType.F32)
        {
            HostBlas.Sgemm(transA, transB, m, n, k, alpha, Host<float>(a, aCount), Host<float>(b, bCount), beta, Host<float>(c, cCount));
            return;
        }
        // BF16: widen A and B exactly to fp32, sgemm (fp32 accumulation, as cuBLAS with CUBLAS_COMPUTE_32F), and round C
        // once to bf16 (nearest even) when C is BF16.
        var fa = Widen(a, aCount);
        var fb = Widen(b, bCount);
        if (output == Numerics.DType.F32)
            HostBlas.Sgemm(transA, transB, m, n, k, alpha, fa, fb, beta, Host<float>(c, cCount));
        else
        {
            var fc = beta == 0 ? new float[cCount] : Widen(c, cCount);
            HostBlas.Sgemm(transA, transB, m, n, k, alpha, fa, fb, beta, fc);
            Numerics.BFloat16.FromSingle(fc, Host<Numerics.BFloat16>(c, cCount));
        }
    }

    /// <summary>The emulated device memory (host memory) at p as a span of count elements.</summary>
    private static Span<T> Host<T>(DevicePtr p, long count) where T : unmanaged => new((void*)p.Address, checked((int)count));

    private static float[] Widen(DevicePtr p, long count)
    {
        var f = new float[count];
        Numerics.BFloat16.ToSingle(Host<Numerics.BFloat16>(p, count), f);
        return f;
    }

    public void Launch(string kernel, Dim3 grid, Dim3 block, int sharedBytes, params ReadOnlySpan<KernelArg> args)
    {
        ArgumentNullException.ThrowIfNull(kernel);
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (sharedBytes < 0)
            throw new EmulatorException($"{kernel}: negative sharedBytes {sharedBytes}") { KernelName = kernel };
        int[]? sizes = ParameterSizes(kernel);
        if (sizes is null)
            throw new EmulatorException($"unknown kernel '{kernel}' (not in {_native.LibraryPath})") { KernelName = kernel };
        if (sizes.Length != args.Length)
            throw new EmulatorException($"{kernel} takes {sizes.Length} parameters, {args.Length} given") { KernelName = kernel };
        for (int i = 0; i < args.Length; i++)
        {
            // A 4-byte argument may fill a 1- or 2-byte parameter (its low bytes, little-endian); a struct argument's
            // size is its C# mirror's, which must equal the kernel's sizeof.
            bool fits = sizes[i] == args[i].Size || (!args[i].ByAddress && args[i].Size == 4 && sizes[i] < 4);
            if (!fits)
                throw new EmulatorException(
                    $"{kernel}: parameter {i} is {sizes[i]} bytes, the argument is {args[i].Size} bytes") { KernelName = kernel };
        }

        int n = args.Length;
        ulong* values = stackalloc ulong[Math.Max(n, 1)];
        void** pointers = stackalloc void*[Math.Max(n, 1)];
        for (int i = 0; i < n; i++)
            pointers[i] = args[i].Place(values + i);  // 8-byte slots (a 4-byte value in the low bytes), or the struct's address
        int rc = _native.Launch(kernel, grid, block, (uint)sharedBytes, pointers);
        if (rc != 0)
            throw new EmulatorException($"launch of {kernel} (grid {grid.X}x{grid.Y}x{grid.Z}, block {block.X}x{block.Y}x{block.Z}, "
                                        + $"{sharedBytes} B shared) failed: {_native.LastError()}") { KernelName = kernel };
    }

    public bool HasKernel(string kernel) => _kernels.Contains(kernel);

    /// <summary>
    /// The race-finding checks of the launches that follow, for the whole process (the emulator library is
    /// loaded once): set them around a test, and back to <see cref="EmulatorChecks.None"/> after it.
    /// </summary>
    public void SetChecks(EmulatorChecks checks, ulong seed = 0) => _native.SetChecks((int)checks, seed);

    /// <summary>The checks in force.</summary>
    public EmulatorChecks Checks => (EmulatorChecks)_native.Checks();

    /// <summary>
    /// The process's default checks: <c>NATIVEPEFT_EMU_CHECKS</c> (all | none | the flags as a number) when the emulator
    /// library loaded; <c>./build.sh test</c> sets it to all, so every kernel of the test suite runs under the checks.
    /// </summary>
    public EmulatorChecks DefaultChecks => (EmulatorChecks)_native.DefaultChecks();

    public void Synchronize() => ObjectDisposedException.ThrowIf(_disposed, this);

    public (long Free, long Total) MemoryInfo()
    {
        lock (_lock) return (_budget - _allocated, _budget);
    }

    /// <summary>Frees every allocation still live.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            Interlocked.Decrement(ref s_open);
            foreach (ulong p in _allocations.Keys) NativeMemory.AlignedFree((void*)p);
            _allocations.Clear();
            _allocated = 0;
        }
    }

    /// <summary>The parameter sizes in bytes the emulator registered for <paramref name="kernel"/> (null: unknown kernel).</summary>
    internal int[]? ParameterSizes(string kernel)
    {
        lock (_parameterSizes)
        {
            if (_parameterSizes.TryGetValue(kernel, out int[]? s)) return s;
            if (!_kernels.Contains(kernel)) return null;
            s = _native.KernelParameterSizes(kernel);
            if (s is not null) _parameterSizes[kernel] = s;
            return s;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void CheckPointer(DevicePtr p)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (p.IsNull) throw new ArgumentException("null device pointer");
    }
}
