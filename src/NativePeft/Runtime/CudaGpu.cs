using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace NativePeft.Runtime;

/// <summary>
/// A CUDA device through our own binding of the driver API (<see cref="CudaDriver"/>) and cuBLAS
/// (<see cref="CudaBlas"/>). Uses the device's primary context and one stream of its own; every kernel
/// launch, copy and cuBLAS call goes on that stream, in order. Kernels are loaded from
/// <c>&lt;AppContext.BaseDirectory&gt;/kernels/</c> (or <c>$NATIVEPEFT_KERNELS</c>) on first use:
/// for every stem, <c>stem.fatbin</c> with cuModuleLoadData, falling back to <c>stem.ptx</c> (JIT,
/// with the JIT error log in the exception) when the fatbin is missing or has no image for this GPU.
/// </summary>
public sealed unsafe class CudaGpu : IGpu
{
    /// <summary>Environment variable naming the kernel directory.</summary>
    public const string KernelDirectoryVariable = KernelLocator.EnvironmentVariable;
    private const int DefaultMaxDynamicShared = 48 * 1024;
    /// <summary>Most kernel arguments a launch takes.</summary>
    public const int MaxArgs = 64;

    private readonly ILogger _logger;
    private readonly int _device;
    private readonly CudaPrimaryContextHandle _context;
    private readonly CudaStreamHandle _stream;
    private readonly object _gate = new();
    private readonly Dictionary<ulong, long> _allocations = new();
    private readonly HashSet<ulong> _managed = new();
    private readonly List<(string Name, CudaModuleHandle Module)> _modules = new();
    private readonly Dictionary<string, IntPtr> _functions = new(StringComparer.Ordinal);
    private readonly HashSet<string> _missingFunctions = new(StringComparer.Ordinal);
    private readonly Dictionary<IntPtr, int> _dynamicSharedSet = new();
    private bool _kernelDirectoryLoaded;
    private System.Runtime.ExceptionServices.ExceptionDispatchInfo? _kernelLoadFailure;
    private CudaBlas? _blas;
    private long _allocatedBytes, _peakAllocatedBytes;
    private bool _disposed;

    public GpuProperties Properties { get; }
    /// <summary>The device ordinal.</summary>
    public int Device => _device;
    /// <summary>Where kernels are loaded from.</summary>
    public string KernelDirectory { get; }
    /// <summary>Bytes currently allocated through Alloc/AllocManaged (as requested).</summary>
    public long AllocatedBytes { get { lock (_gate) return _allocatedBytes; } }
    /// <summary>Highest <see cref="AllocatedBytes"/> since creation or <see cref="ResetPeak"/>.</summary>
    public long PeakAllocatedBytes { get { lock (_gate) return _peakAllocatedBytes; } }
    /// <summary>Largest dynamic shared memory per block a kernel may opt in to.</summary>
    public int MaxSharedMemoryPerBlockOptin { get; }

    private CudaGpu(int device, CudaPrimaryContextHandle context, CudaStreamHandle stream, GpuProperties properties,
        int maxSharedOptin, string kernelDirectory, ILogger logger)
    {
        _device = device;
        _context = context;
        _stream = stream;
        Properties = properties;
        MaxSharedMemoryPerBlockOptin = maxSharedOptin;
        KernelDirectory = kernelDirectory;
        _logger = logger;
    }

    /// <summary>The default kernel directory: $NATIVEPEFT_KERNELS, else &lt;AppContext.BaseDirectory&gt;/kernels.</summary>
    public static string DefaultKernelDirectory() => KernelLocator.Directory;

    /// <summary>
    /// Opens CUDA device <paramref name="deviceOrdinal"/>. Never throws: on failure returns false and a reason,
    /// "CUDA driver library libcuda.so.1 not found", "no CUDA device (cuInit: CUDA_ERROR_NO_DEVICE (100): ...)",
    /// "no CUDA device (cuDeviceGetCount returned 0)", or the failing call's message.
    /// </summary>
    public static bool TryCreate(out CudaGpu? gpu, out string reason, int deviceOrdinal = 0,
        string? kernelDirectory = null, ILogger? logger = null)
    {
        gpu = null;
        try
        {
            if (!NativeLibraries.TryLoadCuda(out _, out _))
            {
                reason = $"CUDA driver library {NativeLibraries.CudaLibraryDisplayName} not found";
                return false;
            }
            var init = CudaDriver.cuInit(0);
            if (init != CuResult.Success)
            {
                reason = $"no CUDA device (cuInit: {Describe(init)})";
                return false;
            }
            var countResult = CudaDriver.cuDeviceGetCount(out int count);
            if (countResult != CuResult.Success)
            {
                reason = $"no CUDA device (cuDeviceGetCount: {Describe(countResult)})";
                return false;
            }
            if (count == 0)
            {
                reason = "no CUDA device (cuDeviceGetCount returned 0)";
                return false;
            }
            if (deviceOrdinal < 0 || deviceOrdinal >= count)
            {
                reason = $"no CUDA device with ordinal {deviceOrdinal} (found {count})";
                return false;
            }
            gpu = Open(deviceOrdinal, kernelDirectory ?? DefaultKernelDirectory(), logger ?? NullLogger.Instance);
            reason = "";
            return true;
        }
        catch (Exception ex)
        {
            // The contract is "never throws": a broken driver install, a resolver conflict (type initializer),
            // a missing entry point all become a reason.
            reason = ex is CudaException ? ex.Message : $"CUDA driver unusable: {ex.GetType().Name}: {ex.Message}";
            gpu = null;
            return false;
        }
    }

    /// <summary>As <see cref="TryCreate"/>, throwing <see cref="InvalidOperationException"/> with the reason.</summary>
    public static CudaGpu Create(int deviceOrdinal = 0, string? kernelDirectory = null, ILogger? logger = null)
    {
        if (!TryCreate(out var gpu, out var reason, deviceOrdinal, kernelDirectory, logger))
            throw new InvalidOperationException(reason);
        return gpu!;
    }

    private static string Describe(CuResult r)
    {
        var text = CudaDriver.ErrorString(r);
        return $"{CudaDriver.ErrorName(r)} ({(int)r})" + (text.Length > 0 ? ": " + text : "");
    }

    private static CudaGpu Open(int ordinal, string kernelDirectory, ILogger logger)
    {
        CudaDriver.Check(CudaDriver.cuDeviceGet(out int dev, ordinal), "cuDeviceGet");
        CudaDriver.Check(CudaDriver.cuDriverGetVersion(out int driverVersion), "cuDriverGetVersion");
        string name = CudaDriver.DeviceName(dev);
        CudaDriver.Check(CudaDriver.cuDeviceTotalMem_v2(out nuint total, dev), "cuDeviceTotalMem_v2");
        int sms = CudaDriver.DeviceAttribute(CuDeviceAttribute.MultiprocessorCount, dev);
        int major = CudaDriver.DeviceAttribute(CuDeviceAttribute.ComputeCapabilityMajor, dev);
        int minor = CudaDriver.DeviceAttribute(CuDeviceAttribute.ComputeCapabilityMinor, dev);
        bool concurrentManaged = CudaDriver.DeviceAttribute(CuDeviceAttribute.ConcurrentManagedAccess, dev) != 0;
        int sharedOptin = CudaDriver.DeviceAttribute(CuDeviceAttribute.MaxSharedMemoryPerBlockOptin, dev);

        var ctx = CudaPrimaryContextHandle.Retain(dev);
        try
        {
            CudaDriver.Check(CudaDriver.cuCtxSetCurrent(ctx.DangerousGetHandle()), "cuCtxSetCurrent");
            // CU_STREAM_DEFAULT (0): a blocking stream, so it is also ordered with legacy-default-stream calls.
            CudaDriver.Check(CudaDriver.cuStreamCreate(out var rawStream, 0), "cuStreamCreate");
            var stream = new CudaStreamHandle(ctx, rawStream);
            var props = new GpuProperties(name, GpuKind.Cuda, (long)total, sms, major, minor, concurrentManaged, driverVersion);
            logger.LogInformation("CUDA device {Ordinal}: {Name}, sm_{Major}{Minor}, {Sms} SMs, {TotalGiB:F1} GiB, driver {Driver}",
                ordinal, name, major, minor, sms, total / (double)(1L << 30), driverVersion);
            return new CudaGpu(dev, ctx, stream, props, sharedOptin, kernelDirectory, logger);
        }
        catch
        {
            ctx.Dispose();
            throw;
        }
    }

    // ---------------------------------------------------------------- context and stream

    /// <summary>Makes this GPU's context current on the calling thread (cheap; done by every call).</summary>
    internal void MakeCurrent()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        CudaDriver.Check(CudaDriver.cuCtxSetCurrent(_context.DangerousGetHandle()), "cuCtxSetCurrent");
    }

    internal IntPtr StreamHandle => _stream.DangerousGetHandle();

    public void Synchronize()
    {
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuStreamSynchronize(StreamHandle), "cuStreamSynchronize");
    }

    // ---------------------------------------------------------------- memory

    public DevicePtr Alloc(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        MakeCurrent();
        var r = CudaDriver.cuMemAlloc_v2(out ulong p, (nuint)Math.Max(bytes, 1));
        if (r != CuResult.Success) throw new CudaException(r, "cuMemAlloc_v2", context: $"{bytes} bytes; {AllocatedBytes} allocated");
        Track(p, bytes, isManaged: false);
        return new DevicePtr(p);
    }

    /// <summary>Managed memory (cuMemAllocManaged, CU_MEM_ATTACH_GLOBAL), as used by the paged optimizers.</summary>
    public DevicePtr AllocManaged(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        MakeCurrent();
        var r = CudaDriver.cuMemAllocManaged(out ulong p, (nuint)Math.Max(bytes, 1), CudaDriver.CU_MEM_ATTACH_GLOBAL);
        if (r != CuResult.Success) throw new CudaException(r, "cuMemAllocManaged", context: $"{bytes} bytes");
        Track(p, bytes, isManaged: true);
        return new DevicePtr(p);
    }

    private void Track(ulong p, long bytes, bool isManaged)
    {
        lock (_gate)
        {
            _allocations.Add(p, bytes);
            if (isManaged) _managed.Add(p);
            _allocatedBytes += bytes;
            if (_allocatedBytes > _peakAllocatedBytes) _peakAllocatedBytes = _allocatedBytes;
        }
    }

    public void Free(DevicePtr ptr)
    {
        if (ptr.IsNull) return;
        MakeCurrent();
        long bytes;
        lock (_gate)
        {
            if (!_allocations.Remove(ptr.Address, out bytes))
                throw new ArgumentException($"{ptr} was not allocated by this CudaGpu (or was already freed)", nameof(ptr));
            _managed.Remove(ptr.Address);
            _allocatedBytes -= bytes;
        }
        CudaDriver.Check(CudaDriver.cuMemFree_v2(ptr.Address), "cuMemFree_v2");
    }

    /// <summary>Makes the peak equal to what is allocated now.</summary>
    public void ResetPeak()
    {
        lock (_gate) _peakAllocatedBytes = _allocatedBytes;
    }

    /// <summary>Page-locked host memory (cuMemAllocHost_v2) for asynchronous copies.</summary>
    public CudaPinnedBuffer AllocPinned(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytes);
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuMemAllocHost_v2(out var p, (nuint)bytes), "cuMemAllocHost_v2");
        return new CudaPinnedBuffer(new CudaHostMemoryHandle(_context, p), bytes);
    }

    /// <summary>Copies host → device on the stream; the source may be reused on return (the driver stages pageable memory).</summary>
    public void CopyToDevice<T>(ReadOnlySpan<T> source, DevicePtr destination) where T : unmanaged
    {
        long bytes = (long)source.Length * sizeof(T);
        if (bytes == 0) return;
        MakeCurrent();
        fixed (T* p = source)
            CudaDriver.Check(CudaDriver.cuMemcpyHtoDAsync_v2(destination.Address, p, (nuint)bytes, StreamHandle), "cuMemcpyHtoDAsync_v2");
    }

    /// <summary>Copies device → host after all earlier work on the stream; complete on return.</summary>
    public void CopyToHost<T>(DevicePtr source, Span<T> destination) where T : unmanaged
    {
        long bytes = (long)destination.Length * sizeof(T);
        if (bytes == 0) return;
        MakeCurrent();
        fixed (T* p = destination)
        {
            CudaDriver.Check(CudaDriver.cuMemcpyDtoHAsync_v2(p, source.Address, (nuint)bytes, StreamHandle), "cuMemcpyDtoHAsync_v2");
            CudaDriver.Check(CudaDriver.cuStreamSynchronize(StreamHandle), "cuStreamSynchronize");
        }
    }

    /// <summary>Asynchronous host → device copy from pinned memory; keep the buffer alive and unchanged until synchronized.</summary>
    public void CopyToDeviceAsync(CudaPinnedBuffer source, long sourceOffset, DevicePtr destination, long bytes)
    {
        CheckRange(source, sourceOffset, bytes);
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuMemcpyHtoDAsync_v2(destination.Address, (byte*)source.Pointer + sourceOffset, (nuint)bytes, StreamHandle),
            "cuMemcpyHtoDAsync_v2");
    }

    /// <summary>Asynchronous device → host copy into pinned memory; valid after <see cref="Synchronize"/>.</summary>
    public void CopyToHostAsync(DevicePtr source, CudaPinnedBuffer destination, long destinationOffset, long bytes)
    {
        CheckRange(destination, destinationOffset, bytes);
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuMemcpyDtoHAsync_v2((byte*)destination.Pointer + destinationOffset, source.Address, (nuint)bytes, StreamHandle),
            "cuMemcpyDtoHAsync_v2");
    }

    private static void CheckRange(CudaPinnedBuffer buffer, long offset, long bytes)
    {
        if (offset < 0 || bytes < 0 || offset + bytes > buffer.Length)
            throw new ArgumentOutOfRangeException(nameof(bytes), $"[{offset}, {offset + bytes}) outside the {buffer.Length}-byte pinned buffer");
    }

    public void CopyDeviceToDevice(DevicePtr source, DevicePtr destination, long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0) return;
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuMemcpyDtoDAsync_v2(destination.Address, source.Address, (nuint)bytes, StreamHandle), "cuMemcpyDtoDAsync_v2");
    }

    /// <summary>
    /// Sets <paramref name="bytes"/> bytes to <paramref name="value"/> (cuMemsetD8_v2, or cuMemsetD32_v2 with the byte
    /// replicated when address and size are 4-byte aligned). Legacy-stream call, ordered with our blocking stream.
    /// </summary>
    public void Memset(DevicePtr ptr, byte value, long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0) return;
        MakeCurrent();
        if ((ptr.Address & 3) == 0 && (bytes & 3) == 0)
            CudaDriver.Check(CudaDriver.cuMemsetD32_v2(ptr.Address, value * 0x01010101u, (nuint)(bytes / 4)), "cuMemsetD32_v2");
        else
            CudaDriver.Check(CudaDriver.cuMemsetD8_v2(ptr.Address, value, (nuint)bytes), "cuMemsetD8_v2");
    }

    /// <summary>Sets <paramref name="count"/> 32-bit words to <paramref name="value"/> (cuMemsetD32_v2; ptr 4-byte aligned).</summary>
    public void MemsetD32(DevicePtr ptr, uint value, long count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        if (count == 0) return;
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuMemsetD32_v2(ptr.Address, value, (nuint)count), "cuMemsetD32_v2");
    }

    /// <summary>
    /// Prefetches managed memory to this device or to the host on the stream (cuMemPrefetchAsync_v2 or the
    /// pre-12.2 cuMemPrefetchAsync, whichever the driver exports). A no-op on devices without
    /// CONCURRENT_MANAGED_ACCESS, where the driver migrates on launch instead.
    /// </summary>
    public void Prefetch(DevicePtr ptr, long bytes, bool toDevice)
    {
        if (!Properties.ConcurrentManagedAccess || bytes <= 0) return;
        MakeCurrent();
        CudaDriver.MemPrefetchAsync(ptr.Address, (nuint)bytes, toDevice ? _device : CudaDriver.CU_DEVICE_CPU, StreamHandle);
    }

    /// <summary>cuMemAdvise(_v2) on managed memory, for this device or the host.</summary>
    public void Advise(DevicePtr ptr, long bytes, CuMemAdvise advice, bool forDevice)
    {
        if (bytes <= 0) return;
        MakeCurrent();
        CudaDriver.MemAdvise(ptr.Address, (nuint)bytes, advice, forDevice ? _device : CudaDriver.CU_DEVICE_CPU);
    }

    public (long Free, long Total) MemoryInfo()
    {
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuMemGetInfo_v2(out nuint free, out nuint total), "cuMemGetInfo_v2");
        return ((long)free, (long)total);
    }

    // ---------------------------------------------------------------- events

    /// <summary>Creates an event and records it on the stream (for timing: <see cref="ElapsedMs"/>).</summary>
    public CudaEvent RecordEvent()
    {
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuEventCreate(out var raw, 0), "cuEventCreate");
        var ev = new CudaEvent(new CudaEventHandle(_context, raw));
        try
        {
            CudaDriver.Check(CudaDriver.cuEventRecord(raw, StreamHandle), "cuEventRecord");
        }
        catch
        {
            ev.Dispose();
            throw;
        }
        return ev;
    }

    /// <summary>Milliseconds between two recorded events; waits for <paramref name="end"/>.</summary>
    public float ElapsedMs(CudaEvent start, CudaEvent end)
    {
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuEventSynchronize(end.Raw), "cuEventSynchronize");
        CudaDriver.Check(CudaDriver.cuEventElapsedTime(out float ms, start.Raw, end.Raw), "cuEventElapsedTime");
        return ms;
    }

    /// <summary>Makes later work on the stream wait for an event (cuStreamWaitEvent).</summary>
    public void WaitEvent(CudaEvent ev)
    {
        MakeCurrent();
        CudaDriver.Check(CudaDriver.cuStreamWaitEvent(StreamHandle, ev.Raw, 0), "cuStreamWaitEvent");
    }

    // ---------------------------------------------------------------- cuBLAS

    public void Gemm(bool transA, bool transB, int m, int n, int k, float alpha, DevicePtr a, DevicePtr b, float beta, DevicePtr c,
        Numerics.DType inputs, Numerics.DType output)
    {
        var t = inputs == Numerics.DType.F32 ? CudaDataType.R32F : CudaDataType.R16BF;
        var tc = output == Numerics.DType.F32 ? CudaDataType.R32F : CudaDataType.R16BF;
        Blas.GemmRowMajor(transA, transB, m, n, k, alpha, a, t, transA ? m : k, b, t, transB ? k : n, beta, c, tc, n);
    }

    /// <summary>cuBLAS on this GPU's stream, created on first use; throws InvalidOperationException when cuBLAS is missing.</summary>
    public CudaBlas Blas
    {
        get
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            lock (_gate) return _blas ??= CudaBlas.Create(this);
        }
    }

    // ---------------------------------------------------------------- kernels

    /// <summary>Names of the loaded modules, e.g. "selftest.fatbin", "lora.ptx".</summary>
    public IReadOnlyList<string> LoadedModules
    {
        get
        {
            EnsureKernelDirectoryLoaded();
            lock (_gate) return _modules.Select(m => m.Name).ToArray();
        }
    }

    private void EnsureKernelDirectoryLoaded()
    {
        lock (_gate)
        {
            _kernelLoadFailure?.Throw();
            if (_kernelDirectoryLoaded) return;
            _kernelDirectoryLoaded = true;
            if (!Directory.Exists(KernelDirectory))
            {
                _logger.LogWarning("kernel directory {Directory} does not exist; no kernels loaded", KernelDirectory);
                return;
            }
            var stems = Directory.EnumerateFiles(KernelDirectory, "*.fatbin")
                .Concat(Directory.EnumerateFiles(KernelDirectory, "*.ptx"))
                .Select(Path.GetFileNameWithoutExtension)
                .OfType<string>()
                .Distinct(StringComparer.Ordinal)
                .Order(StringComparer.Ordinal);
            try
            {
                foreach (var stem in stems) LoadStem(stem);
            }
            catch (Exception ex)
            {
                // Remember it: every later kernel lookup reports the same failure instead of "not found".
                _kernelLoadFailure = System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(ex);
                throw;
            }
        }
    }

    private void LoadStem(string stem)
    {
        MakeCurrent();
        var fatbin = Path.Combine(KernelDirectory, stem + ".fatbin");
        var ptx = Path.Combine(KernelDirectory, stem + ".ptx");
        string? fatbinFailure = null;
        if (File.Exists(fatbin))
        {
            var r = CudaModuleLoader.TryLoadImage(File.ReadAllBytes(fatbin), out var module);
            if (r == CuResult.Success)
            {
                AddModule(stem + ".fatbin", module);
                return;
            }
            fatbinFailure = $"{Path.GetFileName(fatbin)}: {CudaDriver.ErrorName(r)} ({(int)r})";
            _logger.LogInformation("cuModuleLoadData({Fatbin}) returned {Result}; trying PTX", fatbin, CudaDriver.ErrorName(r));
        }
        if (!File.Exists(ptx))
            throw new CudaException(CuResult.NoBinaryForGpu, "cuModuleLoadData", context: $"{fatbinFailure}; no {stem}.ptx to fall back to in {KernelDirectory}");
        LoadPtxModule(stem + ".ptx", File.ReadAllBytes(ptx), fatbinFailure);
    }

    /// <summary>JIT-loads PTX text as a module (tests and tools; the kernel directory is loaded automatically).</summary>
    internal void LoadPtxModule(string name, ReadOnlySpan<byte> ptx, string? previousFailure = null)
    {
        lock (_gate)
        {
            MakeCurrent();
            var r = CudaModuleLoader.TryLoadPtx(ptx, out var module, out var jitLog);
            if (r != CuResult.Success)
                throw new CudaException(r, "cuModuleLoadDataEx", jitLog,
                    $"{name} in {KernelDirectory}" + (previousFailure is null ? "" : $"; fatbin: {previousFailure}"));
            AddModule(name, module);
        }
    }

    private void AddModule(string name, IntPtr module)
    {
        lock (_gate)
        {
            _modules.Add((name, new CudaModuleHandle(_context, module)));
            _missingFunctions.Clear();
        }
        _logger.LogDebug("loaded CUDA module {Module}", name);
    }

    private bool TryGetFunction(string kernel, out IntPtr function)
    {
        EnsureKernelDirectoryLoaded();
        lock (_gate)
        {
            if (_functions.TryGetValue(kernel, out function)) return true;
            if (_missingFunctions.Contains(kernel)) return false;
            MakeCurrent();
            foreach (var (_, module) in _modules)
            {
                var r = CudaDriver.cuModuleGetFunction(out function, module.DangerousGetHandle(), kernel);
                if (r == CuResult.Success)
                {
                    _functions[kernel] = function;
                    return true;
                }
                if (r != CuResult.NotFound) CudaDriver.Check(r, "cuModuleGetFunction", context: kernel);
            }
            _missingFunctions.Add(kernel);
            function = IntPtr.Zero;
            return false;
        }
    }

    public bool HasKernel(string kernel) => TryGetFunction(kernel, out _);

    public void Launch(string kernel, Dim3 grid, Dim3 block, int sharedBytes, params ReadOnlySpan<KernelArg> args)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(sharedBytes);
        if (!TryGetFunction(kernel, out var function))
        {
            string[] loaded;
            lock (_gate) loaded = _modules.Select(m => m.Name).ToArray();
            throw new InvalidOperationException(
                $"kernel '{kernel}' not found in any loaded CUDA module (modules: {(loaded.Length == 0 ? "none" : string.Join(", ", loaded))}; directory {KernelDirectory})");
        }
        if (grid.Count == 0 || block.Count == 0)
            // As the emulator does: a zero dimension is a launcher bug, not "nothing to do" (launchers return early for n = 0).
            throw new ArgumentException($"{kernel}: zero launch dimension (grid {grid.X}x{grid.Y}x{grid.Z}, block {block.X}x{block.Y}x{block.Z})");
        MakeCurrent();
        if (sharedBytes > DefaultMaxDynamicShared)
        {
            lock (_gate)
            {
                if (!_dynamicSharedSet.TryGetValue(function, out int set) || set < sharedBytes)
                {
                    CudaDriver.Check(CudaDriver.cuFuncSetAttribute(function, CuFunctionAttribute.MaxDynamicSharedSizeBytes, sharedBytes),
                        "cuFuncSetAttribute", context: $"{kernel}: {sharedBytes} bytes dynamic shared (device opt-in max {MaxSharedMemoryPerBlockOptin})");
                    _dynamicSharedSet[function] = sharedBytes;
                }
            }
        }

        int n = args.Length;
        if (n > MaxArgs) throw new ArgumentException($"{kernel}: {n} kernel arguments, at most {MaxArgs} supported", nameof(args));
        // Each argument's value at an 8-byte stride, or a struct argument's own address; params[i] points at it
        // (cuLaunchKernel copies them).
        ulong* values = stackalloc ulong[MaxArgs];
        void** pointers = stackalloc void*[MaxArgs];
        for (int i = 0; i < n; i++)
            pointers[i] = args[i].Place(values + i);
        var r = CudaDriver.cuLaunchKernel(function, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z,
            (uint)sharedBytes, StreamHandle, n == 0 ? null : pointers, null);
        if (r != CuResult.Success)
            throw new CudaException(r, "cuLaunchKernel",
                context: $"{kernel} grid ({grid.X},{grid.Y},{grid.Z}) block ({block.X},{block.Y},{block.Z}) shared {sharedBytes} args {n}");
    }

    // ---------------------------------------------------------------- disposal

    public void Dispose()
    {
        if (_disposed) return;
        try
        {
            CudaDriver.cuCtxSetCurrent(_context.DangerousGetHandle());
            CudaDriver.cuStreamSynchronize(StreamHandle);
            _blas?.Dispose();
            _blas = null;
            lock (_gate)
            {
                foreach (var p in _allocations.Keys) CudaDriver.cuMemFree_v2(p);
                _allocations.Clear();
                _managed.Clear();
                _allocatedBytes = 0;
                foreach (var (_, module) in _modules) module.Dispose();
                _modules.Clear();
                _functions.Clear();
            }
            _stream.Dispose();
        }
        finally
        {
            _disposed = true;
            _context.Dispose();
        }
    }
}
