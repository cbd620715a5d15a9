using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;

namespace NativePeft.Runtime;

/// <summary>
/// What <see cref="LibraryProbe"/> reads from the machine: environment variables, files, folders and the ldconfig
/// cache. <see cref="System"/> is the real machine; tests pass a fake one rooted in a temporary folder.
/// </summary>
public sealed class ProbeEnvironment
{
    /// <summary>An environment variable, or null.</summary>
    public Func<string, string?> GetVariable { get; init; } = Environment.GetEnvironmentVariable;
    public Func<string, bool> FileExists { get; init; } = File.Exists;
    /// <summary>The full paths of a folder's subfolders (none when the folder is missing or unreadable).</summary>
    public Func<string, IEnumerable<string>> ListDirectories { get; init; } = SubDirectories;
    /// <summary>The text of <c>ldconfig -p</c>, or null when ldconfig is not there or fails.</summary>
    public Func<string?> LdconfigCache { get; init; } = RunLdconfig;
    /// <summary>Where the fixed paths (/usr/local/cuda…, /usr/lib/python3…) start: "/" on the real machine.</summary>
    public string Root { get; init; } = "/";
    /// <summary>Whether to start with the loader's own search by bare file name (LD_LIBRARY_PATH, RUNPATH, ldconfig, /lib…).</summary>
    public bool IncludeDefaultLoader { get; init; } = true;

    /// <summary>The real machine.</summary>
    public static ProbeEnvironment System { get; } = new();

    private static IEnumerable<string> SubDirectories(string dir)
    {
        try { return Directory.Exists(dir) ? Directory.GetDirectories(dir) : []; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return []; }
    }

    private static string? RunLdconfig()
    {
        foreach (var exe in new[] { "/sbin/ldconfig", "/usr/sbin/ldconfig", "/usr/bin/ldconfig", "ldconfig" })
        {
            if (exe.StartsWith('/') && !File.Exists(exe)) continue;
            try
            {
                var psi = new ProcessStartInfo(exe, "-p") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
                using var p = Process.Start(psi);
                if (p is null) continue;
                var output = p.StandardOutput.ReadToEndAsync();
                _ = p.StandardError.ReadToEndAsync();
                if (!p.WaitForExit(5000))
                {
                    try { p.Kill(); } catch (InvalidOperationException) { }
                    return null;
                }
                return p.ExitCode == 0 ? output.Result : null;
            }
            catch (Exception e) when (e is global::System.ComponentModel.Win32Exception or IOException or InvalidOperationException) { }
        }
        return null;
    }
}

/// <summary>A place to try: a file in a folder, or (Directory null) a bare file name for the loader's own search.</summary>
public sealed record LibraryCandidate(string Source, string FileName, string? Directory)
{
    /// <summary>What is passed to the loader: the full path, or the bare file name.</summary>
    public string Path => Directory is null ? FileName : System.IO.Path.Combine(Directory, FileName);
}

public enum ProbeOutcome
{
    /// <summary>Loaded: the library is used from here.</summary>
    Loaded,
    /// <summary>No such file there.</summary>
    Missing,
    /// <summary>The file is there (or the loader was asked by name) but did not load: the loader's message says why.</summary>
    Failed,
}

/// <summary>One candidate tried: what happened, and the loader's message when it failed (for a bare name that loaded,
/// the file the loader picked, when known).</summary>
public sealed record ProbeAttempt(LibraryCandidate Candidate, ProbeOutcome Outcome, string? Message = null);

/// <summary>Every candidate tried for a library, in order, up to the one that loaded (if any).</summary>
public sealed record LibraryProbeReport(string Library, IReadOnlyList<ProbeAttempt> Attempts)
{
    public ProbeAttempt? Loaded => Attempts.FirstOrDefault(a => a.Outcome == ProbeOutcome.Loaded);

    /// <summary>One line for errors: where it came from, or why nothing loaded.</summary>
    public string Summary
    {
        get
        {
            if (Loaded is { } ok) return $"{ok.Message ?? ok.Candidate.Path} ({ok.Candidate.Source})";
            var byLoader = Attempts.FirstOrDefault(a => a.Candidate.Directory is null && a.Outcome == ProbeOutcome.Failed);
            int folders = Attempts.Where(a => a.Candidate.Directory is not null).Select(a => a.Candidate.Directory).Distinct().Count();
            string text = folders == 0
                ? $"{Library} not found" + (byLoader is null ? "" : $" ({byLoader.Message})")
                : $"{Library} not found by the loader (LD_LIBRARY_PATH, ldconfig, system folders) nor in {folders} other folders " +
                  "(CUDA_HOME/CUDA_PATH, /usr/local/cuda*, the ldconfig cache, pip's nvidia/*/lib; `nativepeft info` lists them)";
            var failed = Attempts.Where(a => a.Outcome == ProbeOutcome.Failed && a.Candidate.Directory is not null).ToList();
            return failed.Count == 0 ? text : text + "; present but not loadable: " + string.Join("; ", failed.Select(a => $"{a.Candidate.Path}: {a.Message}"));
        }
    }

    /// <summary>The report as lines, a folder per line: what was loaded, what failed and why, where nothing was.</summary>
    public IEnumerable<string> Lines()
    {
        foreach (var group in Attempts.GroupBy(a => (a.Candidate.Source, a.Candidate.Directory)))
        {
            string where = group.Key.Directory is null ? group.Key.Source : $"{group.Key.Source}: {group.Key.Directory}";
            var missing = group.Where(a => a.Outcome == ProbeOutcome.Missing).Select(a => a.Candidate.FileName).ToList();
            foreach (var a in group.Where(a => a.Outcome != ProbeOutcome.Missing))
                yield return a.Outcome == ProbeOutcome.Loaded
                    ? $"{where}: loaded {a.Candidate.FileName}" + (a.Message is { } file && file != a.Candidate.Path ? $" ({file})" : "")
                    : $"{where}: {a.Candidate.FileName} failed: {a.Message}";
            if (missing.Count > 0) yield return $"{where}: no {string.Join(", ", missing)}";
        }
    }
}

/// <summary>
/// Finds the CUDA libraries that the default loader may not see (cuBLAS from a toolkit in /usr/local/cuda or from
/// PyTorch's pip wheels). <see cref="Candidates"/> is a pure function of a <see cref="ProbeEnvironment"/>: the bare
/// names first (the loader's search: LD_LIBRARY_PATH, RUNPATH, ldconfig, the system folders), then, in order,
/// $CUDA_HOME and $CUDA_PATH (lib64, lib, targets/*/lib), /usr/local/cuda/lib64, /usr/local/cuda-*/lib64 newest
/// version first, the paths of the ldconfig cache (<c>ldconfig -p</c>), and the nvidia/*/lib folders of pip wheels in
/// the site-packages of $VIRTUAL_ENV, $CONDA_PREFIX, a virtual environment whose bin/ is on $PATH, ~/.local,
/// /usr/local/lib/python3*/dist-packages and /usr/lib/python3/dist-packages. Within a folder the newest soname comes
/// first. <see cref="Load"/> tries them in order and records why each one was passed over.
/// </summary>
public static class LibraryProbe
{
    /// <summary>The folders to search after the loader's own search, in order, with where each came from.</summary>
    public static IReadOnlyList<(string Source, string Directory)> SearchDirectories(ProbeEnvironment env)
    {
        ArgumentNullException.ThrowIfNull(env);
        var result = new List<(string, string)>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        void Add(string source, string dir)
        {
            string full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(dir));
            if (seen.Add(full)) result.Add((source, full));
        }
        string R(string path) => Path.Combine(env.Root, path.TrimStart('/'));

        foreach (var variable in new[] { "CUDA_HOME", "CUDA_PATH" })
        {
            if (env.GetVariable(variable) is not { Length: > 0 } home) continue;
            Add(variable, Path.Combine(home, "lib64"));
            Add(variable, Path.Combine(home, "lib"));
            foreach (var target in env.ListDirectories(Path.Combine(home, "targets")).Order(StringComparer.Ordinal))
                Add(variable, Path.Combine(target, "lib"));
        }
        Add("/usr/local/cuda", R("/usr/local/cuda/lib64"));
        var versioned = env.ListDirectories(R("/usr/local"))
            .Select(d => (Dir: d, Name: Path.GetFileName(Path.TrimEndingDirectorySeparator(d))))
            .Where(d => d.Name.StartsWith("cuda-", StringComparison.Ordinal))
            .OrderByDescending(d => ParseVersion(d.Name["cuda-".Length..]))
            .ThenByDescending(d => d.Name, StringComparer.Ordinal);
        foreach (var (dir, name) in versioned) Add("/usr/local/" + name, Path.Combine(dir, "lib64"));
        foreach (var (source, sitePackages) in SitePackages(env))
            foreach (var lib in env.ListDirectories(Path.Combine(sitePackages, "nvidia")).OrderDescending(StringComparer.Ordinal))
                Add(source, Path.Combine(lib, "lib"));
        return result;
    }

    /// <summary>
    /// The candidates for a library known by <paramref name="sonames"/> (newest first), in the order they are tried.
    /// The ldconfig cache's entries come after the CUDA folders and before the pip wheels.
    /// </summary>
    public static IReadOnlyList<LibraryCandidate> Candidates(IReadOnlyList<string> sonames, ProbeEnvironment env)
    {
        ArgumentNullException.ThrowIfNull(sonames);
        ArgumentNullException.ThrowIfNull(env);
        var result = new List<LibraryCandidate>();
        if (env.IncludeDefaultLoader)
            foreach (var s in sonames) result.Add(new LibraryCandidate("default loader (LD_LIBRARY_PATH, ldconfig, system folders)", s, null));
        var dirs = SearchDirectories(env);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        void AddDir(string source, string dir)
        {
            foreach (var s in sonames)
            {
                var c = new LibraryCandidate(source, s, dir);
                if (seen.Add(c.Path)) result.Add(c);
            }
        }
        int firstPip = dirs.ToList().FindIndex(d => d.Source.StartsWith("pip", StringComparison.Ordinal));
        if (firstPip < 0) firstPip = dirs.Count;
        foreach (var (source, dir) in dirs.Take(firstPip)) AddDir(source, dir);
        foreach (var s in sonames)
            foreach (var path in LdconfigPaths(env.LdconfigCache(), s))
            {
                var c = new LibraryCandidate("ldconfig cache", s, Path.GetDirectoryName(path));
                if (seen.Add(c.Path)) result.Add(c);
            }
        foreach (var (source, dir) in dirs.Skip(firstPip)) AddDir(source, dir);
        return result;
    }

    /// <summary>The paths <c>ldconfig -p</c> lists for <paramref name="soname"/> ("\tlibx.so.1 (libc6,x86-64) => /path/libx.so.1").</summary>
    public static IEnumerable<string> LdconfigPaths(string? ldconfigOutput, string soname)
    {
        if (string.IsNullOrEmpty(ldconfigOutput)) yield break;
        foreach (var raw in ldconfigOutput.Split('\n'))
        {
            string line = raw.Trim();
            int arrow = line.IndexOf("=>", StringComparison.Ordinal);
            if (arrow < 0) continue;
            int space = line.IndexOf(' ');
            string name = space < 0 ? line : line[..space];
            if (name != soname) continue;
            string path = line[(arrow + 2)..].Trim();
            // 32-bit entries ("(libc6)" without x86-64 / AArch64 / …) would not load into a 64-bit process.
            string flags = line[space..arrow];
            if (Environment.Is64BitProcess && !flags.Contains("64", StringComparison.Ordinal)) continue;
            if (path.Length > 0) yield return path;
        }
    }

    /// <summary>The site-packages folders (with where each came from) whose nvidia/*/lib may hold pip's CUDA libraries.</summary>
    public static IReadOnlyList<(string Source, string Directory)> SitePackages(ProbeEnvironment env)
    {
        var result = new List<(string, string)>();
        string R(string path) => Path.Combine(env.Root, path.TrimStart('/'));
        void Pythons(string source, string libDir, string subfolder)
        {
            foreach (var py in env.ListDirectories(libDir)
                         .Where(d => Path.GetFileName(Path.TrimEndingDirectorySeparator(d)).StartsWith("python3", StringComparison.Ordinal))
                         .OrderByDescending(d => ParseVersion(Path.GetFileName(Path.TrimEndingDirectorySeparator(d))["python".Length..])))
                result.Add((source, Path.Combine(py, subfolder)));
        }
        if (env.GetVariable("VIRTUAL_ENV") is { Length: > 0 } venv) Pythons("pip (VIRTUAL_ENV)", Path.Combine(venv, "lib"), "site-packages");
        if (env.GetVariable("CONDA_PREFIX") is { Length: > 0 } conda) Pythons("pip (CONDA_PREFIX)", Path.Combine(conda, "lib"), "site-packages");
        // A virtual environment whose bin/ is on PATH (python3 there is the one a user would run), without starting it.
        foreach (var bin in (env.GetVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            string trimmed = Path.TrimEndingDirectorySeparator(bin);
            if (Path.GetFileName(trimmed) != "bin" || Path.GetDirectoryName(trimmed) is not { } prefix) continue;
            if (env.FileExists(Path.Combine(prefix, "pyvenv.cfg"))) Pythons("pip (venv on PATH)", Path.Combine(prefix, "lib"), "site-packages");
        }
        if (env.GetVariable("HOME") is { Length: > 0 } home) Pythons("pip (~/.local)", Path.Combine(home, ".local", "lib"), "site-packages");
        Pythons("pip (/usr/local)", R("/usr/local/lib"), "dist-packages");
        Pythons("pip (/usr/local)", R("/usr/local/lib"), "site-packages");
        result.Add(("pip (/usr/lib/python3)", R("/usr/lib/python3/dist-packages")));
        return result;
    }

    /// <summary>
    /// Tries <paramref name="candidates"/> in order until one loads. A candidate in a folder that lacks the file is
    /// Missing (no load is tried). Before a file, its <paramref name="companion"/> in the same folder (libcublasLt next
    /// to libcublas) is loaded when it is there, so that the loader finds it by soname; when the companion fails, so
    /// does the candidate, with the companion's message. <paramref name="load"/> returns a handle or the loader's message.
    /// </summary>
    public static (IntPtr Handle, LibraryProbeReport Report) Load(string library, IReadOnlyList<LibraryCandidate> candidates,
        Func<string, string?> companion, Func<string, (IntPtr Handle, string? Error)> load, Func<string, bool> fileExists,
        Action<IntPtr>? free = null, Func<string, string?>? loadedFile = null)
    {
        var attempts = new List<ProbeAttempt>();
        foreach (var c in candidates)
        {
            if (c.Directory is not null && !fileExists(c.Path))
            {
                attempts.Add(new ProbeAttempt(c, ProbeOutcome.Missing));
                continue;
            }
            IntPtr companionHandle = IntPtr.Zero;
            if (c.Directory is not null && companion(c.FileName) is { } other && fileExists(Path.Combine(c.Directory, other)))
            {
                var (h, error) = load(Path.Combine(c.Directory, other));
                if (h == IntPtr.Zero)
                {
                    attempts.Add(new ProbeAttempt(c, ProbeOutcome.Failed, $"{other} next to it did not load: {error}"));
                    continue;
                }
                companionHandle = h;
            }
            var (handle, message) = load(c.Path);
            if (handle != IntPtr.Zero)
            {
                attempts.Add(new ProbeAttempt(c, ProbeOutcome.Loaded, c.Directory is null ? loadedFile?.Invoke(c.FileName) : null));
                return (handle, new LibraryProbeReport(library, attempts));
            }
            if (companionHandle != IntPtr.Zero) free?.Invoke(companionHandle);
            attempts.Add(new ProbeAttempt(c, ProbeOutcome.Failed, message));
        }
        return (IntPtr.Zero, new LibraryProbeReport(library, attempts));
    }

    /// <summary>The real loader: a handle, or the loader's own message (dlerror's text, without .NET's advice).</summary>
    public static (IntPtr Handle, string? Error) NativeLoad(string path)
    {
        try { return (NativeLibrary.Load(path), null); }
        catch (DllNotFoundException e) { return (IntPtr.Zero, LoaderMessage(e.Message)); }
        catch (BadImageFormatException e) { return (IntPtr.Zero, LoaderMessage(e.Message)); }
    }

    /// <summary>The file a loaded library was mapped from (Linux /proc/self/maps: the first path whose file name
    /// starts with <paramref name="fileName"/>, e.g. libcublas.so.12 → …/libcublas.so.12.8.4.1; else with its stem,
    /// libcuda.so.1 → …/libcuda.so.580.95.05), or null.</summary>
    public static string? MappedFile(string fileName)
    {
        try
        {
            if (!File.Exists("/proc/self/maps")) return null;
            var paths = File.ReadLines("/proc/self/maps").Select(l => l.IndexOf('/') is int slash and >= 0 ? l[slash..].Trim() : null)
                .OfType<string>().Distinct().ToList();
            int so = fileName.IndexOf(".so.", StringComparison.Ordinal);
            foreach (var prefix in so < 0 ? [fileName] : new[] { fileName, fileName[..(so + 4)] })
                if (paths.FirstOrDefault(p => Path.GetFileName(p).StartsWith(prefix, StringComparison.Ordinal)) is { } path) return path;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        return null;
    }

    /// <summary>
    /// .NET's DllNotFoundException text is "Unable to load shared library 'X' or one of its dependencies. In order to
    /// help diagnose loading problems, … LD_DEBUG environment variable: \n&lt;dlerror lines&gt;": keep the dlerror lines.
    /// </summary>
    internal static string LoaderMessage(string message)
    {
        var lines = message.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var detail = lines.Skip(1).Where(l => l.Length > 0).Distinct().ToList();
        return detail.Count > 0 ? string.Join("; ", detail) : message.Trim();
    }

    private static Version ParseVersion(string text)
    {
        var parts = text.Split('.');
        var numbers = new List<int>();
        foreach (var p in parts)
        {
            if (!int.TryParse(p, NumberStyles.None, CultureInfo.InvariantCulture, out int n)) break;
            numbers.Add(n);
        }
        return numbers.Count switch
        {
            0 => new Version(0, 0),
            1 => new Version(numbers[0], 0),
            2 => new Version(numbers[0], numbers[1]),
            _ => new Version(numbers[0], numbers[1], numbers[2]),
        };
    }
}

/// <summary>The CUDA libraries as this process found them (loaded on first use): for `nativepeft info` and hosts.</summary>
public static class CudaLibraries
{
    /// <summary>Probes (once) and reports the CUDA driver library: the loader's own search.</summary>
    public static LibraryProbeReport Driver()
    {
        NativeLibraries.TryLoadCuda(out _, out _);
        return NativeLibraries.Report(NativeLibraries.Cuda)!;
    }

    /// <summary>Probes (once) and reports cuBLAS (<see cref="LibraryProbe"/>).</summary>
    public static LibraryProbeReport Cublas()
    {
        NativeLibraries.TryLoadCublas(out _, out _);
        return NativeLibraries.Report(NativeLibraries.Cublas)!;
    }

    /// <summary>The loaded cuBLAS's version ("13.1.0"), or null.</summary>
    public static string? CublasVersion() => CuBlas.Version();
}
