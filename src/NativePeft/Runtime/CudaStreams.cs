using System.Runtime.InteropServices;

namespace NativePeft.Runtime;

/// <summary>
/// The CUDA driver's stream and event calls for work on a second stream (the NCCL communicator's): a stream of its
/// own, events recorded on one stream and waited for on another. Handles are raw CUstream / CUevent
/// (<see cref="IntPtr"/>); failures go through <see cref="CudaDriver.Check"/>.
/// </summary>
internal static partial class CudaStreams
{
    private const string Lib = NativeLibraries.Cuda;

    /// <summary>CU_STREAM_NON_BLOCKING: no implicit synchronization with the legacy default stream.</summary>
    public const uint StreamNonBlocking = 1;
    /// <summary>CU_EVENT_DISABLE_TIMING: the cheap events used for ordering only.</summary>
    public const uint EventDisableTiming = 2;

    static CudaStreams() => NativeLibraries.EnsureInstalled();

    [LibraryImport(Lib)] public static partial CuResult cuStreamCreate(out IntPtr stream, uint flags);
    [LibraryImport(Lib, EntryPoint = "cuStreamDestroy_v2")] public static partial CuResult cuStreamDestroy(IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuEventCreate(out IntPtr evt, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuEventRecord(IntPtr evt, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuStreamWaitEvent(IntPtr stream, IntPtr evt, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuEventSynchronize(IntPtr evt);
    /// <summary>Success when the event's work finished, NotReady while it runs.</summary>
    [LibraryImport(Lib)] public static partial CuResult cuEventQuery(IntPtr evt);
    [LibraryImport(Lib, EntryPoint = "cuEventDestroy_v2")] public static partial CuResult cuEventDestroy(IntPtr evt);

    /// <summary>A new non-blocking stream (the caller's context must be current).</summary>
    public static IntPtr CreateStream()
    {
        CudaDriver.Check(cuStreamCreate(out var stream, StreamNonBlocking), "cuStreamCreate");
        return stream;
    }

    /// <summary>A new event without timing.</summary>
    public static IntPtr CreateEvent()
    {
        CudaDriver.Check(cuEventCreate(out var evt, EventDisableTiming), "cuEventCreate");
        return evt;
    }

    /// <summary>Makes <paramref name="waiter"/>'s later work wait for what <paramref name="producer"/> has enqueued so far, through <paramref name="evt"/>.</summary>
    public static void Order(IntPtr producer, IntPtr waiter, IntPtr evt)
    {
        CudaDriver.Check(cuEventRecord(evt, producer), "cuEventRecord");
        CudaDriver.Check(cuStreamWaitEvent(waiter, evt, 0), "cuStreamWaitEvent");
    }
}
