using System.Reflection;
using System.Runtime.InteropServices;

namespace NativePeft.Runtime;

/// <summary>
/// The one <see cref="NativeLibrary.SetDllImportResolver"/> of this assembly (a second call would throw),
/// mapping the logical names used in <c>[LibraryImport]</c> to real files:
/// <list type="bullet">
/// <item><c>"cuda"</c> → libcuda.so.1 (Linux) / nvcuda.dll (Windows), through the loader's own search (the driver
/// installs it where the loader looks)</item>
/// <item><c>"cublas"</c> → libcublas.so.13, .12, .11 (Linux) / cublas64_13, 12, 11.dll (Windows), first found; on
/// Linux also where the loader does not look (<see cref="LibraryProbe"/>: CUDA_HOME, /usr/local/cuda*, the ldconfig
/// cache, pip's nvidia/*/lib), with libcublasLt from the same folder</item>
/// </list>
/// What each probe tried is kept (<see cref="Report"/>) for `nativepeft info` and the error messages.
/// Other code that needs a resolver for another library name registers a loader with
/// <see cref="Register"/> instead of installing its own resolver.
/// </summary>
internal static class NativeLibraries
{
    public const string Cuda = "cuda";
    public const string Cublas = "cublas";

    private static readonly object Gate = new();
    private static readonly Dictionary<string, Func<IntPtr>> Loaders = new(StringComparer.Ordinal);
    private static readonly Dictionary<string, (IntPtr Handle, LibraryProbeReport Report)> Loaded = new(StringComparer.Ordinal);

    static NativeLibraries()
    {
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);
    }

    /// <summary>Makes sure the resolver is installed (runs the static constructor).</summary>
    public static void EnsureInstalled() { }

    /// <summary>File names probed for the CUDA driver, in order.</summary>
    public static IReadOnlyList<string> CudaCandidates =>
        OperatingSystem.IsWindows() ? ["nvcuda.dll"] : ["libcuda.so.1", "libcuda.so"];

    /// <summary>File names probed for cuBLAS, in order.</summary>
    public static IReadOnlyList<string> CublasCandidates =>
        OperatingSystem.IsWindows()
            ? ["cublas64_13.dll", "cublas64_12.dll", "cublas64_11.dll"]
            : ["libcublas.so.13", "libcublas.so.12", "libcublas.so.11"];

    /// <summary>The file name we report when the driver is missing.</summary>
    public static string CudaLibraryDisplayName => CudaCandidates[0];

    /// <summary>Adds a loader for another logical library name (returns IntPtr.Zero when not found).</summary>
    public static void Register(string libraryName, Func<IntPtr> loader)
    {
        lock (Gate) Loaders[libraryName] = loader;
    }

    /// <summary>The companion of a cuBLAS file name: libcublasLt of the same major version (null for other names).</summary>
    public static string? CublasCompanion(string fileName) =>
        fileName.StartsWith("libcublas.so.", StringComparison.Ordinal) ? "libcublasLt.so." + fileName["libcublas.so.".Length..]
        : fileName.StartsWith("cublas64_", StringComparison.Ordinal) ? "cublasLt64_" + fileName["cublas64_".Length..]
        : null;

    /// <summary>Loads (once) the CUDA driver library (the loader's own search).</summary>
    public static bool TryLoadCuda(out IntPtr handle, out string reason) =>
        TryLoad(Cuda, () => CudaCandidates.Select(n => new LibraryCandidate("default loader", n, null)).ToList(), out handle, out reason);

    /// <summary>Loads (once) cuBLAS, newest major version first: the loader's search, then <see cref="LibraryProbe"/>'s folders.</summary>
    public static bool TryLoadCublas(out IntPtr handle, out string reason) =>
        TryLoad(Cublas, () => OperatingSystem.IsWindows()
            ? CublasCandidates.Select(n => new LibraryCandidate("default loader", n, null)).ToList()
            : LibraryProbe.Candidates(CublasCandidates, ProbeEnvironment.System), out handle, out reason);

    /// <summary>The path (or file name) a library was loaded from, if loaded.</summary>
    public static string? LoadedFrom(string libraryName)
    {
        lock (Gate) return Loaded.TryGetValue(libraryName, out var e) && e.Report.Loaded is { } ok ? ok.Message ?? ok.Candidate.Path : null;
    }

    /// <summary>What the probe of <paramref name="libraryName"/> tried (null before the first load attempt).</summary>
    public static LibraryProbeReport? Report(string libraryName)
    {
        lock (Gate) return Loaded.TryGetValue(libraryName, out var e) ? e.Report : null;
    }

    private static bool TryLoad(string key, Func<IReadOnlyList<LibraryCandidate>> candidates, out IntPtr handle, out string reason)
    {
        EnsureInstalled();
        lock (Gate)
        {
            if (!Loaded.TryGetValue(key, out var entry))
            {
                var names = key == Cuda ? CudaCandidates : CublasCandidates;
                var (h, report) = LibraryProbe.Load(names.Count == 1 ? names[0] : string.Join(", ", names), candidates(),
                    key == Cublas ? CublasCompanion : _ => null, LibraryProbe.NativeLoad, File.Exists, NativeLibrary.Free, LibraryProbe.MappedFile);
                entry = (h, report);
                Loaded[key] = entry;
            }
            handle = entry.Handle;
            reason = handle == IntPtr.Zero ? entry.Report.Summary : "";
            return handle != IntPtr.Zero;
        }
    }

    private static IntPtr Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath)
    {
        switch (libraryName)
        {
            case Cuda:
                return TryLoadCuda(out var cuda, out _) ? cuda : IntPtr.Zero;
            case Cublas:
                return TryLoadCublas(out var cublas, out _) ? cublas : IntPtr.Zero;
        }
        Func<IntPtr>? loader;
        lock (Gate) Loaders.TryGetValue(libraryName, out loader);
        return loader?.Invoke() ?? IntPtr.Zero;
    }
}
