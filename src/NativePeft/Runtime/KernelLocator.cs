namespace NativePeft.Runtime;

/// <summary>
/// Where the built kernels live: the PTX and fatbin files CudaGpu loads and the emulator library
/// EmulatedGpu loads. NATIVEPEFT_KERNELS overrides; otherwise the kernels/ folder next to the assemblies,
/// where the build copies build/kernels/, and where a project referencing the NativePeft package gets the package's
/// kernels/ on build and publish (its buildTransitive/NativePeft.targets; docs/packaging.md).
/// </summary>
public static class KernelLocator
{
    public const string EnvironmentVariable = "NATIVEPEFT_KERNELS";

    public static string Directory
    {
        get
        {
            var env = Environment.GetEnvironmentVariable(EnvironmentVariable);
            return string.IsNullOrEmpty(env) ? Path.Combine(AppContext.BaseDirectory, "kernels") : Path.GetFullPath(env);
        }
    }

    public static string EmulatorLibraryPath => Path.Combine(Directory,
        OperatingSystem.IsWindows() ? "nativepeft_emu.dll" : OperatingSystem.IsMacOS() ? "libnativepeft_emu.dylib" : "libnativepeft_emu.so");

    /// <summary>The kernel modules found: one per kernels/*.cu, with the PTX and fatbin paths (null when absent).</summary>
    public static IReadOnlyList<KernelModuleFiles> Modules()
    {
        var dir = Directory;
        if (!System.IO.Directory.Exists(dir)) return [];
        return System.IO.Directory.EnumerateFiles(dir)
            .Where(f => f.EndsWith(".ptx", StringComparison.Ordinal) || f.EndsWith(".fatbin", StringComparison.Ordinal))
            .GroupBy(f => Path.GetFileNameWithoutExtension(f), StringComparer.Ordinal)
            .OrderBy(g => g.Key, StringComparer.Ordinal)
            .Select(g => new KernelModuleFiles(g.Key,
                g.FirstOrDefault(f => f.EndsWith(".ptx", StringComparison.Ordinal)),
                g.FirstOrDefault(f => f.EndsWith(".fatbin", StringComparison.Ordinal))))
            .ToList();
    }
}

/// <summary>One compiled kernels/*.cu: its PTX (compute_80) and its fatbin (sm_80, sm_90 + PTX).</summary>
public sealed record KernelModuleFiles(string Name, string? PtxPath, string? FatbinPath);
