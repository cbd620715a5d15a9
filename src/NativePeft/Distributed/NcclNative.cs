using System.Runtime.InteropServices;
using NativePeft.Runtime;

namespace NativePeft.Distributed;

/// <summary>
/// Where libnccl.so.2 comes from: $NATIVEPEFT_NCCL (a path to the file) first, then <see cref="LibraryProbe"/>'s
/// search as for cuBLAS (the loader's own: LD_LIBRARY_PATH, RUNPATH, ldconfig, the system folders; then CUDA_HOME /
/// CUDA_PATH, /usr/local/cuda*/lib64, the ldconfig cache, and the nvidia/*/lib folders of pip wheels, which hold
/// PyTorch's nvidia/nccl/lib). What was tried is kept for `nativepeft info` and the error message.
/// </summary>
public static class NcclLibrary
{
    /// <summary>The file probed.</summary>
    public const string SoName = "libnccl.so.2";
    /// <summary>The variable naming the file to use before any search.</summary>
    public const string PathVariable = "NATIVEPEFT_NCCL";
    internal const string Name = "nccl";

    private static readonly object Gate = new();
    private static (IntPtr Handle, LibraryProbeReport Report)? _system;

    /// <summary>The candidates in the order tried on the machine <paramref name="env"/> describes.</summary>
    public static IReadOnlyList<LibraryCandidate> Candidates(ProbeEnvironment env)
    {
        ArgumentNullException.ThrowIfNull(env);
        var result = new List<LibraryCandidate>();
        if (env.GetVariable(PathVariable) is { Length: > 0 } path)
        {
            string full = Path.GetFullPath(path);
            result.Add(new LibraryCandidate(PathVariable, Path.GetFileName(full), Path.GetDirectoryName(full)));
        }
        result.AddRange(LibraryProbe.Candidates([SoName], env));
        return result;
    }

    /// <summary>Tries the candidates of <paramref name="env"/> in order (<paramref name="load"/>: the real loader unless a test passes another).</summary>
    public static (IntPtr Handle, LibraryProbeReport Report) Probe(ProbeEnvironment env, Func<string, (IntPtr Handle, string? Error)>? load = null) =>
        LibraryProbe.Load(SoName, Candidates(env), _ => null, load ?? LibraryProbe.NativeLoad, env.FileExists, NativeLibrary.Free, LibraryProbe.MappedFile);

    /// <summary>Probes this machine (once) and reports what was tried.</summary>
    public static LibraryProbeReport Report() => LoadSystem().Report;

    /// <summary>Loads libnccl.so.2 (once); false with <see cref="MissingMessage"/> when nothing loaded.</summary>
    public static bool TryLoad(out IntPtr handle, out string reason)
    {
        var (h, report) = LoadSystem();
        handle = h;
        reason = h == IntPtr.Zero ? MissingMessage(report) : "";
        return h != IntPtr.Zero;
    }

    /// <summary>The error when NCCL is absent: every place looked in, in order, and how to provide it.</summary>
    public static string MissingMessage(LibraryProbeReport report)
    {
        ArgumentNullException.ThrowIfNull(report);
        return $"NCCL ({SoName}) was not found; looked in, in order: {string.Join("; ", report.Lines())}. Install NCCL " +
            $"(pip install nvidia-nccl-cu12, or the libnccl2 package) or set {PathVariable} to the path of {SoName}";
    }

    /// <summary>The loaded NCCL's version ("2.27.3"), or null when it is not there.</summary>
    public static string? Version()
    {
        if (!TryLoad(out _, out _)) return null;
        return NcclNative.ncclGetVersion(out int code) == NcclNative.Result.Success ? VersionText(code) : null;
    }

    /// <summary>ncclGetVersion's code as text: major·10000 + minor·100 + patch since 2.9 (major·1000 + minor·100 + patch before).</summary>
    public static string VersionText(int code) => code >= 10000
        ? $"{code / 10000}.{code % 10000 / 100}.{code % 100}"
        : $"{code / 1000}.{code % 1000 / 100}.{code % 100}";

    internal static void EnsureRegistered() => NativeLibraries.Register(Name, () => TryLoad(out var h, out _) ? h : IntPtr.Zero);

    private static (IntPtr Handle, LibraryProbeReport Report) LoadSystem()
    {
        lock (Gate) return _system ??= Probe(ProbeEnvironment.System);
    }
}

/// <summary>Our binding of the NCCL calls the communicator uses (nccl.h of NCCL 2.x; exact exported symbols).</summary>
internal static unsafe partial class NcclNative
{
    private const string Lib = NcclLibrary.Name;

    static NcclNative() => NcclLibrary.EnsureRegistered();

    public enum Result
    {
        Success = 0, UnhandledCudaError = 1, SystemError = 2, InternalError = 3, InvalidArgument = 4, InvalidUsage = 5,
        RemoteError = 6, InProgress = 7,
    }

    public enum DataType
    {
        Int8 = 0, Uint8 = 1, Int32 = 2, Uint32 = 3, Int64 = 4, Uint64 = 5, Float16 = 6, Float32 = 7, Float64 = 8, Bfloat16 = 9,
    }

    /// <summary>ncclRedOp_t: the built-in operations; ncclRedOpCreatePreMulSum returns others.</summary>
    public const int Sum = 0;
    /// <summary>ncclScalarHostImmediate: the premultiplier is read from host memory when the call is enqueued.</summary>
    public const int ScalarHostImmediate = 1;

    /// <summary>ncclUniqueId: 128 opaque bytes, passed by value to ncclCommInitRank.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct UniqueId
    {
        public const int Size = 128;
        public fixed byte Internal[Size];
    }

    [LibraryImport(Lib)] public static partial Result ncclGetVersion(out int version);
    [LibraryImport(Lib)] public static partial Result ncclGetUniqueId(out UniqueId uniqueId);
    [LibraryImport(Lib)] public static partial Result ncclCommInitRank(out IntPtr comm, int nranks, UniqueId commId, int rank);
    [LibraryImport(Lib)] public static partial Result ncclAllReduce(IntPtr sendbuff, IntPtr recvbuff, nuint count, DataType datatype, int op, IntPtr comm, IntPtr stream);
    [LibraryImport(Lib)] public static partial Result ncclReduceScatter(IntPtr sendbuff, IntPtr recvbuff, nuint recvcount, DataType datatype, int op, IntPtr comm, IntPtr stream);
    [LibraryImport(Lib)] public static partial Result ncclAllGather(IntPtr sendbuff, IntPtr recvbuff, nuint sendcount, DataType datatype, IntPtr comm, IntPtr stream);
    [LibraryImport(Lib)] public static partial Result ncclBroadcast(IntPtr sendbuff, IntPtr recvbuff, nuint count, DataType datatype, int root, IntPtr comm, IntPtr stream);
    [LibraryImport(Lib)] public static partial Result ncclGroupStart();
    [LibraryImport(Lib)] public static partial Result ncclGroupEnd();
    [LibraryImport(Lib)] public static partial Result ncclCommAbort(IntPtr comm);
    [LibraryImport(Lib)] public static partial Result ncclCommDestroy(IntPtr comm);
    [LibraryImport(Lib)] public static partial Result ncclCommGetAsyncError(IntPtr comm, out Result asyncError);
    [LibraryImport(Lib)] public static partial IntPtr ncclGetErrorString(Result result);
    [LibraryImport(Lib)] public static partial Result ncclRedOpCreatePreMulSum(out int op, void* scalar, DataType datatype, int residence, IntPtr comm);
    [LibraryImport(Lib)] public static partial Result ncclRedOpDestroy(int op, IntPtr comm);

    /// <summary>NCCL's text for a result.</summary>
    public static string ErrorString(Result result) => Marshal.PtrToStringUTF8(ncclGetErrorString(result)) ?? result.ToString();

    /// <summary>Throws a <see cref="CommunicatorException"/> naming <paramref name="function"/> unless success.</summary>
    public static void Check(Result result, string function, int rank)
    {
        if (result != Result.Success) throw new CommunicatorException($"rank {rank}: {function} failed: {result} ({ErrorString(result)})");
    }
}
