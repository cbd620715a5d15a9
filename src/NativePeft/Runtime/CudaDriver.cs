using System.Runtime.InteropServices;
using System.Text;

namespace NativePeft.Runtime;

/// <summary>
/// Our binding of the CUDA driver API (libcuda.so.1 / nvcuda.dll), exact exported symbols.
/// Handles are raw: CUcontext, CUmodule, CUfunction, CUstream, CUevent are <see cref="IntPtr"/>;
/// CUdeviceptr is <see cref="ulong"/>; CUdevice is <see cref="int"/>; size_t is <see cref="nuint"/>.
/// Every failing call goes through <see cref="Check"/>, which throws a <see cref="CudaException"/> naming it.
/// cuMemAdvise / cuMemPrefetchAsync changed signature in CUDA 12.2/13 (CUmemLocation, the <c>_v2</c>
/// symbols); which one the driver exports is decided at run time, see <see cref="MemPrefetchAsync"/>.
/// </summary>
internal static unsafe partial class CudaDriver
{
    private const string Lib = NativeLibraries.Cuda;

    static CudaDriver() => NativeLibraries.EnsureInstalled();

    /// <summary>Throws a <see cref="CudaException"/> naming <paramref name="function"/> unless success.</summary>
    public static void Check(CuResult result, string function, string? jitLog = null, string? context = null)
    {
        if (result != CuResult.Success) throw new CudaException(result, function, jitLog, context);
    }

    /// <summary>True when libcuda can be loaded (it may still have no device).</summary>
    public static bool IsLibraryAvailable => NativeLibraries.TryLoadCuda(out _, out _);

    // ---- initialization, devices, contexts ----
    [LibraryImport(Lib)] public static partial CuResult cuInit(uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuDriverGetVersion(out int driverVersion);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceGet(out int device, int ordinal);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceGetCount(out int count);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceGetName(byte* name, int len, int device);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceGetAttribute(out int value, CuDeviceAttribute attribute, int device);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceTotalMem_v2(out nuint bytes, int device);
    [LibraryImport(Lib)] public static partial CuResult cuDevicePrimaryCtxRetain(out IntPtr context, int device);
    [LibraryImport(Lib)] public static partial CuResult cuDevicePrimaryCtxRelease_v2(int device);
    [LibraryImport(Lib)] public static partial CuResult cuCtxSetCurrent(IntPtr context);

    // ---- memory ----
    [LibraryImport(Lib)] public static partial CuResult cuMemAlloc_v2(out ulong dptr, nuint bytesize);
    [LibraryImport(Lib)] public static partial CuResult cuMemFree_v2(ulong dptr);
    [LibraryImport(Lib)] public static partial CuResult cuMemGetInfo_v2(out nuint free, out nuint total);
    [LibraryImport(Lib)] public static partial CuResult cuMemAllocHost_v2(out IntPtr pointer, nuint bytesize);
    [LibraryImport(Lib)] public static partial CuResult cuMemFreeHost(IntPtr pointer);
    [LibraryImport(Lib)] public static partial CuResult cuMemAllocManaged(out ulong dptr, nuint bytesize, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuMemcpyHtoDAsync_v2(ulong dstDevice, void* srcHost, nuint byteCount, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuMemcpyDtoHAsync_v2(void* dstHost, ulong srcDevice, nuint byteCount, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuMemcpyDtoDAsync_v2(ulong dstDevice, ulong srcDevice, nuint byteCount, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuMemsetD8_v2(ulong dstDevice, byte value, nuint count);
    [LibraryImport(Lib)] public static partial CuResult cuMemsetD32_v2(ulong dstDevice, uint value, nuint count);

    public const uint CU_MEM_ATTACH_GLOBAL = 1;
    /// <summary>CU_DEVICE_CPU: the host as a prefetch/advise target of the pre-12.2 entry points.</summary>
    public const int CU_DEVICE_CPU = -1;

    // ---- modules, functions, launch ----
    [LibraryImport(Lib)] public static partial CuResult cuModuleLoadData(out IntPtr module, void* image);
    [LibraryImport(Lib)] public static partial CuResult cuModuleLoadDataEx(out IntPtr module, void* image, uint numOptions, CuJitOption* options, void** optionValues);
    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    public static partial CuResult cuModuleGetFunction(out IntPtr function, IntPtr module, string name);
    [LibraryImport(Lib)] public static partial CuResult cuModuleUnload(IntPtr module);
    [LibraryImport(Lib)]
    public static partial CuResult cuLaunchKernel(IntPtr function,
        uint gridDimX, uint gridDimY, uint gridDimZ, uint blockDimX, uint blockDimY, uint blockDimZ,
        uint sharedMemBytes, IntPtr stream, void** kernelParams, void** extra);
    [LibraryImport(Lib)] public static partial CuResult cuFuncSetAttribute(IntPtr function, CuFunctionAttribute attribute, int value);

    // ---- streams and events ----
    [LibraryImport(Lib)] public static partial CuResult cuStreamCreate(out IntPtr stream, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuStreamDestroy_v2(IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuStreamSynchronize(IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuStreamWaitEvent(IntPtr stream, IntPtr @event, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuEventCreate(out IntPtr @event, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuEventRecord(IntPtr @event, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuEventSynchronize(IntPtr @event);
    [LibraryImport(Lib)] public static partial CuResult cuEventElapsedTime(out float milliseconds, IntPtr start, IntPtr end);
    [LibraryImport(Lib)] public static partial CuResult cuEventDestroy_v2(IntPtr @event);

    // ---- errors ----
    [LibraryImport(Lib)] public static partial CuResult cuGetErrorName(CuResult error, out IntPtr name);
    [LibraryImport(Lib)] public static partial CuResult cuGetErrorString(CuResult error, out IntPtr text);

    // ---- cuMemAdvise / cuMemPrefetchAsync: pick the exported variant at run time ----
    private static readonly object ExportGate = new();
    private static bool s_exportsResolved;
    private static delegate* unmanaged<ulong, nuint, CuMemLocation, uint, IntPtr, CuResult> s_prefetchV2;
    private static delegate* unmanaged<ulong, nuint, int, IntPtr, CuResult> s_prefetchLegacy;
    private static delegate* unmanaged<ulong, nuint, CuMemAdvise, CuMemLocation, CuResult> s_adviseV2;
    private static delegate* unmanaged<ulong, nuint, CuMemAdvise, int, CuResult> s_adviseLegacy;

    private static void ResolveExports()
    {
        if (s_exportsResolved) return;
        lock (ExportGate)
        {
            if (s_exportsResolved) return;
            if (NativeLibraries.TryLoadCuda(out var handle, out _))
            {
                if (NativeLibrary.TryGetExport(handle, "cuMemPrefetchAsync_v2", out var p))
                    s_prefetchV2 = (delegate* unmanaged<ulong, nuint, CuMemLocation, uint, IntPtr, CuResult>)p;
                if (NativeLibrary.TryGetExport(handle, "cuMemPrefetchAsync", out p))
                    s_prefetchLegacy = (delegate* unmanaged<ulong, nuint, int, IntPtr, CuResult>)p;
                if (NativeLibrary.TryGetExport(handle, "cuMemAdvise_v2", out p))
                    s_adviseV2 = (delegate* unmanaged<ulong, nuint, CuMemAdvise, CuMemLocation, CuResult>)p;
                if (NativeLibrary.TryGetExport(handle, "cuMemAdvise", out p))
                    s_adviseLegacy = (delegate* unmanaged<ulong, nuint, CuMemAdvise, int, CuResult>)p;
            }
            s_exportsResolved = true;
        }
    }

    /// <summary>Which prefetch entry point the driver offers: "cuMemPrefetchAsync_v2", "cuMemPrefetchAsync" or null.</summary>
    public static string? PrefetchEntryPoint
    {
        get
        {
            ResolveExports();
            return s_prefetchV2 != null ? "cuMemPrefetchAsync_v2" : s_prefetchLegacy != null ? "cuMemPrefetchAsync" : null;
        }
    }

    /// <summary>Which advise entry point the driver offers: "cuMemAdvise_v2", "cuMemAdvise" or null.</summary>
    public static string? AdviseEntryPoint
    {
        get
        {
            ResolveExports();
            return s_adviseV2 != null ? "cuMemAdvise_v2" : s_adviseLegacy != null ? "cuMemAdvise" : null;
        }
    }

    /// <summary>
    /// Prefetches managed memory to <paramref name="device"/>, or to the host when device is
    /// <see cref="CU_DEVICE_CPU"/>; through cuMemPrefetchAsync_v2 (CUmemLocation) when exported, else the
    /// pre-12.2 cuMemPrefetchAsync. Throws CudaException on failure.
    /// </summary>
    public static void MemPrefetchAsync(ulong devPtr, nuint count, int device, IntPtr stream)
    {
        ResolveExports();
        if (s_prefetchV2 != null)
        {
            var location = device == CU_DEVICE_CPU ? CuMemLocation.ForHost() : CuMemLocation.ForDevice(device);
            Check(s_prefetchV2(devPtr, count, location, 0, stream), "cuMemPrefetchAsync_v2");
        }
        else if (s_prefetchLegacy != null)
        {
            Check(s_prefetchLegacy(devPtr, count, device, stream), "cuMemPrefetchAsync");
        }
        else
        {
            throw new CudaException(CuResult.NotSupported, "cuMemPrefetchAsync");
        }
    }

    /// <summary>cuMemAdvise(_v2) for a device, or the host when device is <see cref="CU_DEVICE_CPU"/>.</summary>
    public static void MemAdvise(ulong devPtr, nuint count, CuMemAdvise advice, int device)
    {
        ResolveExports();
        if (s_adviseV2 != null)
        {
            var location = device == CU_DEVICE_CPU ? CuMemLocation.ForHost() : CuMemLocation.ForDevice(device);
            Check(s_adviseV2(devPtr, count, advice, location), "cuMemAdvise_v2");
        }
        else if (s_adviseLegacy != null)
        {
            Check(s_adviseLegacy(devPtr, count, advice, device), "cuMemAdvise");
        }
        else
        {
            throw new CudaException(CuResult.NotSupported, "cuMemAdvise");
        }
    }

    // ---- error text ----

    /// <summary>
    /// "CUDA_ERROR_INVALID_PTX": from cuGetErrorName when the driver is loadable and knows the code,
    /// else derived from the <see cref="CuResult"/> member name.
    /// </summary>
    public static string ErrorName(CuResult result)
    {
        if (IsLibraryAvailable)
        {
            try
            {
                if (cuGetErrorName(result, out var p) == CuResult.Success && p != IntPtr.Zero)
                    return Marshal.PtrToStringUTF8(p) ?? EnumErrorName(result);
            }
            catch (EntryPointNotFoundException) { }
        }
        return EnumErrorName(result);
    }

    /// <summary>The driver's description of a result, or "" when the driver is not loadable or does not know it.</summary>
    public static string ErrorString(CuResult result)
    {
        if (IsLibraryAvailable)
        {
            try
            {
                if (cuGetErrorString(result, out var p) == CuResult.Success && p != IntPtr.Zero)
                    return Marshal.PtrToStringUTF8(p) ?? "";
            }
            catch (EntryPointNotFoundException) { }
        }
        return "";
    }

    /// <summary>The cuda.h name of a result derived from our enum: Success → CUDA_SUCCESS, InvalidPtx → CUDA_ERROR_INVALID_PTX.</summary>
    public static string EnumErrorName(CuResult result)
    {
        if (result == CuResult.Success) return "CUDA_SUCCESS";
        if (!Enum.IsDefined(result)) return $"CUDA_ERROR_{(int)result}";
        var name = result.ToString();
        var sb = new StringBuilder("CUDA_ERROR_", 11 + name.Length + 8);
        for (int i = 0; i < name.Length; i++)
        {
            char c = name[i];
            if (i > 0 && char.IsUpper(c) && (char.IsLower(name[i - 1]) || char.IsDigit(name[i - 1]))) sb.Append('_');
            sb.Append(char.ToUpperInvariant(c));
        }
        return sb.ToString();
    }

    /// <summary>cuDeviceGetName as a string.</summary>
    public static string DeviceName(int device)
    {
        byte* buffer = stackalloc byte[256];
        Check(cuDeviceGetName(buffer, 256, device), "cuDeviceGetName");
        return Marshal.PtrToStringUTF8((IntPtr)buffer) ?? "";
    }

    public static int DeviceAttribute(CuDeviceAttribute attribute, int device)
    {
        Check(cuDeviceGetAttribute(out int value, attribute, device), "cuDeviceGetAttribute");
        return value;
    }
}
