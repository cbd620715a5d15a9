using Microsoft.Win32.SafeHandles;

namespace NativePeft.Runtime;

/// <summary>A retained primary context of one device; released (cuDevicePrimaryCtxRelease_v2) last.</summary>
internal sealed class CudaPrimaryContextHandle : SafeHandleZeroOrMinusOneIsInvalid
{
    public int Device { get; }

    private CudaPrimaryContextHandle(IntPtr context, int device) : base(ownsHandle: true)
    {
        SetHandle(context);
        Device = device;
    }

    public static CudaPrimaryContextHandle Retain(int device)
    {
        CudaDriver.Check(CudaDriver.cuDevicePrimaryCtxRetain(out var context, device), "cuDevicePrimaryCtxRetain");
        return new CudaPrimaryContextHandle(context, device);
    }

    protected override bool ReleaseHandle() =>
        CudaDriver.cuDevicePrimaryCtxRelease_v2(Device) == CuResult.Success;
}

/// <summary>
/// A handle that lives inside a context (module, stream, event, pinned host memory). It holds a
/// reference on the context handle, so the context is released only after every child is destroyed,
/// whatever order Dispose or the finalizer runs them in.
/// </summary>
internal abstract class CudaContextChildHandle : SafeHandleZeroOrMinusOneIsInvalid
{
    private CudaPrimaryContextHandle? _context;

    protected CudaContextChildHandle() : base(ownsHandle: true) { }

    /// <summary>Takes ownership of <paramref name="value"/> and a reference on <paramref name="owner"/>.</summary>
    protected void Attach(CudaPrimaryContextHandle owner, IntPtr value)
    {
        bool added = false;
        owner.DangerousAddRef(ref added);
        _context = owner;
        SetHandle(value);
    }

    protected sealed override bool ReleaseHandle()
    {
        try
        {
            // Destroy calls need the owning context current on this thread (it may be the finalizer thread).
            if (_context is not null) CudaDriver.cuCtxSetCurrent(_context.DangerousGetHandle());
            return Destroy(handle) == CuResult.Success;
        }
        finally
        {
            _context?.DangerousRelease();
        }
    }

    protected abstract CuResult Destroy(IntPtr value);
}

internal sealed class CudaModuleHandle : CudaContextChildHandle
{
    public CudaModuleHandle(CudaPrimaryContextHandle context, IntPtr module) => Attach(context, module);
    protected override CuResult Destroy(IntPtr value) => CudaDriver.cuModuleUnload(value);
}

internal sealed class CudaStreamHandle : CudaContextChildHandle
{
    public CudaStreamHandle(CudaPrimaryContextHandle context, IntPtr stream) => Attach(context, stream);
    protected override CuResult Destroy(IntPtr value) => CudaDriver.cuStreamDestroy_v2(value);
}

internal sealed class CudaEventHandle : CudaContextChildHandle
{
    public CudaEventHandle(CudaPrimaryContextHandle context, IntPtr @event) => Attach(context, @event);
    protected override CuResult Destroy(IntPtr value) => CudaDriver.cuEventDestroy_v2(value);
}

internal sealed class CudaHostMemoryHandle : CudaContextChildHandle
{
    public CudaHostMemoryHandle(CudaPrimaryContextHandle context, IntPtr pointer) => Attach(context, pointer);
    protected override CuResult Destroy(IntPtr value) => CudaDriver.cuMemFreeHost(value);
}

/// <summary>A CUDA event (timing enabled) recorded on a <see cref="CudaGpu"/>'s stream; see <see cref="CudaGpu.RecordEvent"/>.</summary>
public sealed class CudaEvent : IDisposable
{
    internal CudaEventHandle Handle { get; }

    internal CudaEvent(CudaEventHandle handle) => Handle = handle;

    internal IntPtr Raw
    {
        get
        {
            ObjectDisposedException.ThrowIf(Handle.IsClosed, this);
            return Handle.DangerousGetHandle();
        }
    }

    /// <summary>Blocks until the work recorded before this event has completed.</summary>
    public void Synchronize() => CudaDriver.Check(CudaDriver.cuEventSynchronize(Raw), "cuEventSynchronize");

    public void Dispose() => Handle.Dispose();
}

/// <summary>
/// Page-locked host memory from cuMemAllocHost_v2: the staging buffer for asynchronous copies.
/// Owned by the caller; dispose before the <see cref="CudaGpu"/> that made it (or let the finalizer do it).
/// </summary>
public sealed unsafe class CudaPinnedBuffer : IDisposable
{
    private readonly CudaHostMemoryHandle _handle;

    public long Length { get; }

    internal CudaPinnedBuffer(CudaHostMemoryHandle handle, long length)
    {
        _handle = handle;
        Length = length;
    }

    /// <summary>The host address of the buffer.</summary>
    public IntPtr Pointer
    {
        get
        {
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return _handle.DangerousGetHandle();
        }
    }

    /// <summary>The buffer as a span of T (length limited to int.MaxValue elements).</summary>
    public Span<T> AsSpan<T>() where T : unmanaged =>
        new((void*)Pointer, checked((int)(Length / sizeof(T))));

    public void Dispose() => _handle.Dispose();
}
