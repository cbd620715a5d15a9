using System.Runtime.InteropServices;
using System.Text;

namespace NativePeft.Runtime;

/// <summary>CUresult: the status every CUDA driver call returns (values as in cuda.h).</summary>
public enum CuResult
{
    Success = 0,
    InvalidValue = 1,
    OutOfMemory = 2,
    NotInitialized = 3,
    Deinitialized = 4,
    ProfilerDisabled = 5,
    ProfilerNotInitialized = 6,
    ProfilerAlreadyStarted = 7,
    ProfilerAlreadyStopped = 8,
    StubLibrary = 34,
    DeviceUnavailable = 46,
    NoDevice = 100,
    InvalidDevice = 101,
    DeviceNotLicensed = 102,
    InvalidImage = 200,
    InvalidContext = 201,
    ContextAlreadyCurrent = 202,
    MapFailed = 205,
    UnmapFailed = 206,
    ArrayIsMapped = 207,
    AlreadyMapped = 208,
    NoBinaryForGpu = 209,
    AlreadyAcquired = 210,
    NotMapped = 211,
    NotMappedAsArray = 212,
    NotMappedAsPointer = 213,
    EccUncorrectable = 214,
    UnsupportedLimit = 215,
    ContextAlreadyInUse = 216,
    PeerAccessUnsupported = 217,
    InvalidPtx = 218,
    InvalidGraphicsContext = 219,
    NvlinkUncorrectable = 220,
    JitCompilerNotFound = 221,
    UnsupportedPtxVersion = 222,
    JitCompilationDisabled = 223,
    UnsupportedExecAffinity = 224,
    InvalidSource = 300,
    FileNotFound = 301,
    SharedObjectSymbolNotFound = 302,
    SharedObjectInitFailed = 303,
    OperatingSystem = 304,
    InvalidHandle = 400,
    IllegalState = 401,
    NotFound = 500,
    NotReady = 600,
    IllegalAddress = 700,
    LaunchOutOfResources = 701,
    LaunchTimeout = 702,
    LaunchIncompatibleTexturing = 703,
    PeerAccessAlreadyEnabled = 704,
    PeerAccessNotEnabled = 705,
    PrimaryContextActive = 708,
    ContextIsDestroyed = 709,
    Assert = 710,
    TooManyPeers = 711,
    HostMemoryAlreadyRegistered = 712,
    HostMemoryNotRegistered = 713,
    HardwareStackError = 714,
    IllegalInstruction = 715,
    MisalignedAddress = 716,
    InvalidAddressSpace = 717,
    InvalidPc = 718,
    LaunchFailed = 719,
    CooperativeLaunchTooLarge = 720,
    NotPermitted = 800,
    NotSupported = 801,
    SystemNotReady = 802,
    SystemDriverMismatch = 803,
    CompatNotSupportedOnDevice = 804,
    Unknown = 999,
}

/// <summary>CUdevice_attribute values we query.</summary>
internal enum CuDeviceAttribute
{
    MaxThreadsPerBlock = 1,
    MaxSharedMemoryPerBlock = 8,
    WarpSize = 10,
    MultiprocessorCount = 16,
    ComputeCapabilityMajor = 75,
    ComputeCapabilityMinor = 76,
    ManagedMemory = 83,
    ConcurrentManagedAccess = 89,
    MaxSharedMemoryPerBlockOptin = 97,
}

/// <summary>CUfunction_attribute values we set.</summary>
internal enum CuFunctionAttribute
{
    MaxDynamicSharedSizeBytes = 8,
}

/// <summary>CUjit_option values we pass to cuModuleLoadDataEx.</summary>
internal enum CuJitOption
{
    InfoLogBuffer = 3,
    InfoLogBufferSizeBytes = 4,
    ErrorLogBuffer = 5,
    ErrorLogBufferSizeBytes = 6,
}

/// <summary>CUmem_advise.</summary>
public enum CuMemAdvise
{
    SetReadMostly = 1,
    UnsetReadMostly = 2,
    SetPreferredLocation = 3,
    UnsetPreferredLocation = 4,
    SetAccessedBy = 5,
    UnsetAccessedBy = 6,
}

/// <summary>CUmemLocationType (CUDA 12.2+).</summary>
internal enum CuMemLocationType
{
    Invalid = 0,
    Device = 1,
    Host = 2,
    HostNuma = 3,
    HostNumaCurrent = 4,
}

/// <summary>CUmemLocation, passed by value to the _v2 advise/prefetch entry points.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct CuMemLocation
{
    public CuMemLocationType Type;
    public int Id;

    public static CuMemLocation ForDevice(int device) => new() { Type = CuMemLocationType.Device, Id = device };
    public static CuMemLocation ForHost() => new() { Type = CuMemLocationType.Host, Id = 0 };
}

/// <summary>
/// A CUDA driver call that did not return CUDA_SUCCESS. The message reads
/// "cuModuleLoadData failed: CUDA_ERROR_INVALID_PTX (218): a PTX JIT compilation failed [JIT log: ...]".
/// </summary>
public sealed class CudaException : Exception
{
    /// <summary>The driver entry point that failed, e.g. "cuMemAlloc_v2".</summary>
    public string Function { get; }
    public CuResult Result { get; }
    /// <summary>The JIT error log when a module load failed, else null.</summary>
    public string? JitLog { get; }

    public CudaException(CuResult result, string function, string? jitLog = null, string? context = null)
        : base(FormatMessage(result, function, jitLog, context))
    {
        Function = function;
        Result = result;
        JitLog = string.IsNullOrWhiteSpace(jitLog) ? null : jitLog.Trim();
    }

    internal static string FormatMessage(CuResult result, string function, string? jitLog, string? context = null)
    {
        var sb = new StringBuilder();
        sb.Append(function).Append(" failed: ").Append(CudaDriver.ErrorName(result))
          .Append(" (").Append((int)result).Append(')');
        var text = CudaDriver.ErrorString(result);
        if (!string.IsNullOrEmpty(text)) sb.Append(": ").Append(text);
        if (!string.IsNullOrWhiteSpace(jitLog)) sb.Append(" [JIT log: ").Append(jitLog.Trim()).Append(']');
        if (!string.IsNullOrWhiteSpace(context)) sb.Append(" (").Append(context).Append(')');
        return sb.ToString();
    }
}
