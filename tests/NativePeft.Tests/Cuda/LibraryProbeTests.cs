using NativePeft.Runtime;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.Cuda;

/// <summary>
/// Where cuBLAS is looked for (<see cref="LibraryProbe"/>), on a fake machine rooted in a temporary folder: empty
/// files named like the libraries, so that the order is checked without a GPU and a real dlopen of each fails.
/// </summary>
public class LibraryProbeTests
{
    private static readonly string[] Sonames = ["libcublas.so.13", "libcublas.so.12", "libcublas.so.11"];

    private static string Touch(string root, string relative)
    {
        string path = Path.Combine(root, relative);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllBytes(path, []);
        return path;
    }

    private static ProbeEnvironment Fake(string root, Dictionary<string, string> vars, string? ldconfig = null) => new()
    {
        Root = root,
        GetVariable = v => vars.GetValueOrDefault(v),
        LdconfigCache = () => ldconfig,
        IncludeDefaultLoader = false,
    };

    [Test]
    public void CandidatesComeInTheDocumentedOrder()
    {
        if (OperatingSystem.IsWindows()) Assert.Ignore("the Linux search");
        using var dir = CliProcess.TempDir();
        string root = dir["root"];
        foreach (var d in new[] { "usr/local/cuda-11.8/lib64", "usr/local/cuda-12.10/lib64", "usr/local/cuda-12.4/lib64", "usr/local/cuda/lib64", "opt/cuda/targets/x86_64-linux/lib" })
            Directory.CreateDirectory(Path.Combine(root, d));
        Touch(root, "venv/lib/python3.12/site-packages/nvidia/cublas/lib/libcublas.so.12");
        Touch(root, "venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcublas.so.13");
        Directory.CreateDirectory(Path.Combine(root, "home/u/.local/lib/python3.11/site-packages/nvidia/cublas/lib"));
        Directory.CreateDirectory(Path.Combine(root, "usr/local/lib/python3.10/dist-packages/nvidia/cublas/lib"));
        Directory.CreateDirectory(Path.Combine(root, "pathvenv/bin"));
        Touch(root, "pathvenv/pyvenv.cfg");
        Directory.CreateDirectory(Path.Combine(root, "pathvenv/lib/python3.12/site-packages/nvidia/cu13/lib"));
        string ldconfig =
            "3 libs found in cache `/etc/ld.so.cache'\n" +
            $"\tlibcublas.so.12 (libc6,x86-64) => {root}/usr/lib/x86_64-linux-gnu/libcublas.so.12\n" +
            $"\tlibcublas.so.12 (libc6) => {root}/usr/lib/i386-linux-gnu/libcublas.so.12\n" +
            $"\tlibcublas.so (libc6,x86-64) => {root}/usr/lib/x86_64-linux-gnu/libcublas.so\n";
        var env = Fake(root, new()
        {
            ["CUDA_HOME"] = Path.Combine(root, "opt/cuda"),
            ["VIRTUAL_ENV"] = Path.Combine(root, "venv"),
            ["HOME"] = Path.Combine(root, "home/u"),
            ["PATH"] = "/usr/bin:" + Path.Combine(root, "pathvenv/bin"),
        }, ldconfig);

        var dirs = LibraryProbe.SearchDirectories(env).Select(d => (d.Source, Path.GetRelativePath(root, d.Directory))).ToList();
        (string, string)[] expected =
        [
            ("CUDA_HOME", "opt/cuda/lib64"),
            ("CUDA_HOME", "opt/cuda/lib"),
            ("CUDA_HOME", "opt/cuda/targets/x86_64-linux/lib"),
            ("/usr/local/cuda", "usr/local/cuda/lib64"),
            ("/usr/local/cuda-12.10", "usr/local/cuda-12.10/lib64"), // 12.10 is newer than 12.4: versions, not strings
            ("/usr/local/cuda-12.4", "usr/local/cuda-12.4/lib64"),
            ("/usr/local/cuda-11.8", "usr/local/cuda-11.8/lib64"),
            ("pip (VIRTUAL_ENV)", "venv/lib/python3.12/site-packages/nvidia/cublas/lib"),
            ("pip (VIRTUAL_ENV)", "venv/lib/python3.12/site-packages/nvidia/cu13/lib"),
            ("pip (venv on PATH)", "pathvenv/lib/python3.12/site-packages/nvidia/cu13/lib"),
            ("pip (~/.local)", "home/u/.local/lib/python3.11/site-packages/nvidia/cublas/lib"),
            ("pip (/usr/local)", "usr/local/lib/python3.10/dist-packages/nvidia/cublas/lib"),
        ];
        Assert.That(dirs, Is.EqualTo(expected));

        var candidates = LibraryProbe.Candidates(Sonames, env);
        // every folder with the three sonames, newest first; the ldconfig cache's 64-bit entry for .12 between the
        // CUDA folders and the pip folders (its 32-bit entry and the unversioned libcublas.so are left out)
        Assert.That(candidates, Has.Count.EqualTo(expected.Length * 3 + 1));
        Assert.That(candidates.Take(3).Select(c => c.FileName), Is.EqualTo(Sonames));
        int ld = candidates.ToList().FindIndex(c => c.Source == "ldconfig cache");
        Assert.That(ld, Is.EqualTo(7 * 3), "after the 7 CUDA folders");
        Assert.That(candidates[ld].Path, Is.EqualTo($"{root}/usr/lib/x86_64-linux-gnu/libcublas.so.12"));
        Assert.That(candidates[ld + 1].Source, Is.EqualTo("pip (VIRTUAL_ENV)"));

        var withLoader = LibraryProbe.Candidates(Sonames, new ProbeEnvironment { Root = root, GetVariable = _ => null, LdconfigCache = () => null });
        Assert.That(withLoader.Take(3).Select(c => (c.Path, c.Directory)), Is.EqualTo(Sonames.Select(s => (s, (string?)null))),
            "first the loader's own search by bare name (LD_LIBRARY_PATH)");
    }

    [Test]
    public void CudaPathAndMissingFoldersAreHandled()
    {
        if (OperatingSystem.IsWindows()) Assert.Ignore("the Linux search");
        using var dir = CliProcess.TempDir();
        string root = dir["root"];
        Directory.CreateDirectory(Path.Combine(root, "usr/lib/python3/dist-packages/nvidia/cublas/lib"));
        // CUDA_HOME and CUDA_PATH naming the same folder: searched once; no /usr/local/cuda-*; no ldconfig
        var env = Fake(root, new() { ["CUDA_HOME"] = Path.Combine(root, "cuda"), ["CUDA_PATH"] = Path.Combine(root, "cuda") + "/" });
        var dirs = LibraryProbe.SearchDirectories(env).Select(d => (d.Source, Path.GetRelativePath(root, d.Directory))).ToList();
        Assert.That(dirs, Is.EqualTo(new[]
        {
            ("CUDA_HOME", "cuda/lib64"), ("CUDA_HOME", "cuda/lib"), ("/usr/local/cuda", "usr/local/cuda/lib64"),
            ("pip (/usr/lib/python3)", "usr/lib/python3/dist-packages/nvidia/cublas/lib"),
        }.Select(d => (d.Item1, d.Item2))));
        Assert.That(LibraryProbe.LdconfigPaths(null, "libcublas.so.12"), Is.Empty);
        Assert.That(LibraryProbe.LdconfigPaths("garbage\nwithout arrows\n", "libcublas.so.12"), Is.Empty);
    }

    [Test]
    public void LoadRecordsWhatWasFoundWhereAndWhyItWasRejected()
    {
        if (OperatingSystem.IsWindows()) Assert.Ignore("the Linux search");
        using var dir = CliProcess.TempDir();
        string root = dir["root"];
        // /usr/local/cuda has an empty libcublas.so.13 (dlopen fails: not an ELF file); the pip wheel has an empty
        // libcublasLt.so.12 next to an empty libcublas.so.12 (the companion fails first)
        string cuda13 = Touch(root, "usr/local/cuda/lib64/libcublas.so.13");
        Touch(root, "venv/lib/python3.12/site-packages/nvidia/cublas/lib/libcublas.so.12");
        Touch(root, "venv/lib/python3.12/site-packages/nvidia/cublas/lib/libcublasLt.so.12");
        var env = Fake(root, new() { ["VIRTUAL_ENV"] = Path.Combine(root, "venv") });
        var candidates = LibraryProbe.Candidates(Sonames, env);

        var (handle, report) = LibraryProbe.Load("libcublas", candidates, NativeLibraries.CublasCompanion, LibraryProbe.NativeLoad, File.Exists);
        Assert.That(handle, Is.EqualTo(IntPtr.Zero));
        Assert.That(report.Loaded, Is.Null);
        Assert.That(report.Attempts, Has.Count.EqualTo(candidates.Count), "every candidate tried or found missing");
        var failed = report.Attempts.Where(a => a.Outcome == ProbeOutcome.Failed).ToList();
        Assert.That(failed.Select(a => a.Candidate.Path), Is.EqualTo(new[] { cuda13, Path.Combine(root, "venv/lib/python3.12/site-packages/nvidia/cublas/lib/libcublas.so.12") }));
        Assert.That(failed[0].Message, Does.Contain(cuda13).And.Contain("file too short").Or.Contain("invalid ELF header"), "the loader's own message");
        Assert.That(failed[0].Message, Does.Not.Contain("In order to help diagnose"), ".NET's advice left out");
        Assert.That(failed[1].Message, Does.StartWith("libcublasLt.so.12 next to it did not load: ").And.Contain("libcublasLt.so.12"));
        Assert.That(report.Attempts.Count(a => a.Outcome == ProbeOutcome.Missing), Is.EqualTo(candidates.Count - 2));

        var lines = report.Lines().ToList();
        Assert.That(lines, Has.Some.EqualTo($"/usr/local/cuda: {Path.Combine(root, "usr/local/cuda/lib64")}: no libcublas.so.12, libcublas.so.11"));
        Assert.That(lines, Has.Some.StartWith($"/usr/local/cuda: {Path.Combine(root, "usr/local/cuda/lib64")}: libcublas.so.13 failed: "));
        Assert.That(report.Summary, Does.Contain("not found").And.Contain("present but not loadable").And.Contain(cuda13));

        // a loader that accepts the pip wheel's file: the probe stops there, after loading libcublasLt from the same folder
        var loaded = new List<string>();
        var (h2, r2) = LibraryProbe.Load("libcublas", candidates, NativeLibraries.CublasCompanion,
            p => { loaded.Add(p); return p.Contains("venv", StringComparison.Ordinal) ? (new IntPtr(1), null) : (IntPtr.Zero, "nope"); }, File.Exists);
        Assert.That(h2, Is.EqualTo(new IntPtr(1)));
        Assert.That(r2.Loaded!.Candidate.Source, Is.EqualTo("pip (VIRTUAL_ENV)"));
        Assert.That(loaded.Select(Path.GetFileName), Is.EqualTo(new[] { "libcublas.so.13", "libcublasLt.so.12", "libcublas.so.12" }));
        Assert.That(r2.Attempts.Last().Outcome, Is.EqualTo(ProbeOutcome.Loaded));
        Assert.That(r2.Summary, Does.Contain("libcublas.so.12 (pip (VIRTUAL_ENV))"));
    }

    [Test]
    public void InfoPrintsTheSearchOfThisMachine()
    {
        // The same environment as the child process: the same report, line for line, under the table.
        var report = CudaLibraries.Cublas();
        var r = CliProcess.Run("info");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("library search, in order:"));
        var lines = report.Lines().ToList();
        Assert.That(lines, Is.Not.Empty);
        foreach (var line in lines) Assert.That(r.Stdout, Does.Contain("  cuBLAS: " + line), r.Stdout);
        foreach (var line in CudaLibraries.Driver().Lines()) Assert.That(r.Stdout, Does.Contain("  CUDA driver: " + line), r.Stdout);
        Assert.That(r.Stdout, Does.Contain(report.Loaded is null ? "unavailable" : "version "), "the cuBLAS row of the table");
        if (report.Loaded is { Candidate.Directory: null } byName && OperatingSystem.IsLinux())
            Assert.That(byName.Message, Does.StartWith("/").And.Contain(byName.Candidate.FileName), "the file the loader picked, from /proc/self/maps");
    }

    [Test]
    public void TheLoadersMessageIsKeptWithoutDotNetsAdvice()
    {
        const string net = "Unable to load shared library '/x/libcublas.so.13' or one of its dependencies. In order to help diagnose loading problems, " +
            "consider using a tool like strace. If you're using glibc, consider setting the LD_DEBUG environment variable: \n/x/libcublas.so.13: file too short\n";
        Assert.That(LibraryProbe.LoaderMessage(net), Is.EqualTo("/x/libcublas.so.13: file too short"));
        Assert.That(LibraryProbe.LoaderMessage("plain"), Is.EqualTo("plain"));
    }
}
