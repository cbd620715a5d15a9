using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace NativePeft.Runtime;

/// <summary>cublasStatus_t.</summary>
public enum CublasStatus
{
    Success = 0,
    NotInitialized = 1,
    AllocFailed = 3,
    InvalidValue = 7,
    ArchMismatch = 8,
    MappingError = 11,
    ExecutionFailed = 13,
    InternalError = 14,
    NotSupported = 15,
    LicenseError = 16,
}

/// <summary>cudaDataType_t values for the element types we use.</summary>
public enum CudaDataType
{
    R32F = 0,
    R16F = 2,
    R16BF = 14,
}

/// <summary>cublasOperation_t.</summary>
internal enum CublasOperation
{
    N = 0,
    T = 1,
}

/// <summary>cublasComputeType_t values we use.</summary>
public enum CublasComputeType
{
    Compute32F = 68,
    Compute32FFastTf32 = 77,
}

/// <summary>cublasMath_t.</summary>
public enum CublasMath
{
    Default = 0,
    Pedantic = 2,
    Tf32TensorOp = 3,
    DisallowReducedPrecisionReduction = 16,
}

/// <summary>A cuBLAS call that did not return CUBLAS_STATUS_SUCCESS: "cublasGemmEx failed: CUBLAS_STATUS_INVALID_VALUE (7): ...".</summary>
public sealed class CublasException : Exception
{
    public string Function { get; }
    public CublasStatus Status { get; }

    public CublasException(CublasStatus status, string function, string? context = null)
        : base(FormatMessage(status, function, context))
    {
        Function = function;
        Status = status;
    }

    internal static string FormatMessage(CublasStatus status, string function, string? context)
    {
        var message = $"{function} failed: {CuBlas.StatusName(status)} ({(int)status})";
        var text = CuBlas.StatusString(status);
        if (!string.IsNullOrEmpty(text) && text != CuBlas.StatusName(status)) message += ": " + text;
        if (!string.IsNullOrEmpty(context)) message += " (" + context + ")";
        return message;
    }
}

/// <summary>
/// Our binding of cuBLAS (libcublas.so.13/.12/.11, cublas64_13/12/11.dll; first found). Column-major,
/// as cuBLAS itself: see <see cref="CudaBlas"/> for row-major helpers.
/// </summary>
internal static unsafe partial class CuBlas
{
    private const string Lib = NativeLibraries.Cublas;

    static CuBlas() => NativeLibraries.EnsureInstalled();

    public const int GemmDefault = -1;

    public static void Check(CublasStatus status, string function, string? context = null)
    {
        if (status != CublasStatus.Success) throw new CublasException(status, function, context);
    }

    public static bool TryLoad(out string reason) => NativeLibraries.TryLoadCublas(out _, out reason);

    // libraryPropertyType: MAJOR_VERSION 0, MINOR_VERSION 1, PATCH_LEVEL 2
    [LibraryImport(Lib)] private static partial CublasStatus cublasGetProperty(int type, out int value);

    /// <summary>"13.1.0": the loaded cuBLAS's version (cublasGetProperty), or null when it is not loadable.</summary>
    public static string? Version()
    {
        if (!TryLoad(out _)) return null;
        try
        {
            if (cublasGetProperty(0, out int major) != CublasStatus.Success || cublasGetProperty(1, out int minor) != CublasStatus.Success
                || cublasGetProperty(2, out int patch) != CublasStatus.Success) return null;
            return $"{major}.{minor}.{patch}";
        }
        catch (EntryPointNotFoundException) { return null; }
    }

    [LibraryImport(Lib)] public static partial CublasStatus cublasCreate_v2(out IntPtr handle);
    [LibraryImport(Lib)] public static partial CublasStatus cublasDestroy_v2(IntPtr handle);
    [LibraryImport(Lib)] public static partial CublasStatus cublasSetStream_v2(IntPtr handle, IntPtr stream);
    [LibraryImport(Lib)] public static partial CublasStatus cublasSetWorkspace_v2(IntPtr handle, void* workspace, nuint workspaceSizeInBytes);
    [LibraryImport(Lib)] public static partial CublasStatus cublasSetMathMode(IntPtr handle, CublasMath mode);
    [LibraryImport(Lib)] public static partial IntPtr cublasGetStatusString(CublasStatus status);

    [LibraryImport(Lib)]
    public static partial CublasStatus cublasGemmEx(IntPtr handle, CublasOperation transa, CublasOperation transb,
        int m, int n, int k, void* alpha,
        ulong a, CudaDataType aType, int lda,
        ulong b, CudaDataType bType, int ldb,
        void* beta, ulong c, CudaDataType cType, int ldc,
        CublasComputeType computeType, int algo);

    // Called only by the tests' wrapper (tests/NativePeft.Tests/Cuda/CudaBlasBatched.cs); the binding stays here
    // because this assembly's resolver (NativeLibraries) is the one that finds cuBLAS.
    [LibraryImport(Lib)]
    public static partial CublasStatus cublasGemmStridedBatchedEx(IntPtr handle, CublasOperation transa, CublasOperation transb,
        int m, int n, int k, void* alpha,
        ulong a, CudaDataType aType, int lda, long strideA,
        ulong b, CudaDataType bType, int ldb, long strideB,
        void* beta, ulong c, CudaDataType cType, int ldc, long strideC,
        int batchCount, CublasComputeType computeType, int algo);

    /// <summary>"CUBLAS_STATUS_INVALID_VALUE" from the enum member name.</summary>
    public static string StatusName(CublasStatus status)
    {
        if (!Enum.IsDefined(status)) return $"CUBLAS_STATUS_{(int)status}";
        var name = status.ToString();
        var sb = new System.Text.StringBuilder("CUBLAS_STATUS_");
        for (int i = 0; i < name.Length; i++)
        {
            char ch = name[i];
            if (i > 0 && char.IsUpper(ch) && char.IsLower(name[i - 1])) sb.Append('_');
            sb.Append(char.ToUpperInvariant(ch));
        }
        return sb.ToString();
    }

    /// <summary>cublasGetStatusString when cuBLAS is loadable, else "".</summary>
    public static string StatusString(CublasStatus status)
    {
        if (!TryLoad(out _)) return "";
        try
        {
            var p = cublasGetStatusString(status);
            return p == IntPtr.Zero ? "" : Marshal.PtrToStringUTF8(p) ?? "";
        }
        catch (EntryPointNotFoundException) { return ""; }
    }
}

/// <summary>A cublasHandle_t (cublasDestroy_v2 on release).</summary>
internal sealed class CublasHandle : SafeHandleZeroOrMinusOneIsInvalid
{
    public CublasHandle(IntPtr handle) : base(ownsHandle: true) => SetHandle(handle);
    protected override bool ReleaseHandle() => CuBlas.cublasDestroy_v2(handle) == CublasStatus.Success;
}
