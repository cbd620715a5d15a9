using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using NativePeft.Runtime;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.Kernels;

/// <summary>
/// Static proof that the tensor-core kernels were built as such: in the sm_90 SASS of every kernel whose name
/// contains <c>_tc_</c> there are HMMA (mma.sync) and LDSM (ldmatrix) instructions, no local-memory traffic
/// (STL/LDL) and ptxas reported 0 bytes of spill stores and loads. The figures come from the
/// <c>&lt;stem&gt;.sm90.txt</c> reports the kernel build writes from each fatbin (cmake/NativePeftSassReport.cmake,
/// cuobjdump and ptxas -v) and copies next to the PTX. Two controls show the check can fail: the parser flags a
/// hand-written report with a spill, and the report script counts the STL/LDL of hand-written SASS.
/// </summary>
public class KernelSassTests
{
    private const string ReportSuffix = ".sm90.txt";
    private const string TensorCoreMarker = "_tc_";

    private static bool RequireReports => Environment.GetEnvironmentVariable("NATIVEPEFT_REQUIRE_PTX") == "1";

    private static string[] ReportFiles()
    {
        var dir = KernelLocator.Directory;
        return Directory.Exists(dir)
            ? Directory.GetFiles(dir, "*" + ReportSuffix).OrderBy(f => f, StringComparer.Ordinal).ToArray()
            : [];
    }

    private static string[] ReportsOrIgnore()
    {
        var files = ReportFiles();
        if (files.Length == 0)
        {
            var reason = $"no SASS reports (*{ReportSuffix}) in {KernelLocator.Directory}: nvcc or cuobjdump unavailable at build time";
            if (RequireReports) Assert.Fail(reason + " (NATIVEPEFT_REQUIRE_PTX=1)");
            Assert.Ignore(reason);
        }
        return files;
    }

    private static string ModuleName(string reportPath) => Path.GetFileName(reportPath)[..^ReportSuffix.Length];

    [Test]
    public void TensorCoreKernelsUseMmaAndLdmatrixAndDoNotSpill()
    {
        var kernels = ReportsOrIgnore()
            .SelectMany(f => SassReport.Parse(ModuleName(f), File.ReadAllText(f)))
            .Where(k => k.Kernel.Contains(TensorCoreMarker, StringComparison.Ordinal))
            .ToList();
        Assert.That(kernels, Is.Not.Empty,
            $"SASS reports exist but none lists a kernel whose name contains '{TensorCoreMarker}': nothing was checked");

        TestContext.Out.WriteLine("sm_90 static profile (nvcc/ptxas, cuobjdump):");
        TestContext.Out.WriteLine($"{"module",-18} {"kernel",-40} {"regs",4} {"spill st/ld",11} {"HMMA",5} {"LDSM",5} {"LDGSTS",6} {"STL",4} {"LDL",4}");
        foreach (var k in kernels)
            TestContext.Out.WriteLine($"{k.Module,-18} {k.Kernel,-40} {Show(k.Get("registers")),4} " +
                                      $"{Show(k.Get("spill_stores")) + "/" + Show(k.Get("spill_loads")),11} {Show(k.Get("HMMA")),5} " +
                                      $"{Show(k.Get("LDSM")),5} {Show(k.Get("LDGSTS")),6} {Show(k.Get("STL")),4} {Show(k.Get("LDL")),4}");

        var violations = kernels.SelectMany(SassReport.TensorCoreViolations).ToList();
        Assert.That(violations, Is.Empty, "tensor-core kernels whose sm_90 SASS is not the fast path");
    }

    /// <summary>
    /// The fused LoRA kernels (kernels/lora.cu) are in the reports, and on the fast path: HMMA, LDSM and cp.async
    /// (LDGSTS), no local memory, no spills (a renamed or dropped kernel fails here rather than escaping the
    /// <c>_tc_</c> check above).
    /// </summary>
    [TestCase("lora_down_tc_bf16")]
    [TestCase("lora_bwd_input_tc_bf16")]
    public void LoraKernelsUseMmaLdmatrixAndCpAsyncAndDoNotSpill(string kernel)
    {
        var report = ReportsOrIgnore().FirstOrDefault(f => ModuleName(f) == "lora");
        Assert.That(report, Is.Not.Null, $"no lora{ReportSuffix} among the SASS reports");
        var k = SassReport.Parse("lora", File.ReadAllText(report!)).SingleOrDefault(x => x.Kernel == kernel);
        Assert.That(k, Is.Not.Null, $"{kernel} is not in lora{ReportSuffix}");
        TestContext.Out.WriteLine($"{kernel}: {k!.Get("registers")} registers, spill {k.Get("spill_stores")}/{k.Get("spill_loads")} bytes, " +
                                  $"HMMA {k.Get("HMMA")}, LDSM {k.Get("LDSM")}, LDGSTS {k.Get("LDGSTS")}");
        Assert.Multiple(() =>
        {
            Assert.That(SassReport.TensorCoreViolations(k).ToList(), Is.Empty);
            Assert.That(k.Get("LDGSTS"), Is.GreaterThan(0), "cp.async");
        });
    }

    private static string Show(long? v) => v?.ToString(CultureInfo.InvariantCulture) ?? "-";

    /// <summary>The reports are current and complete: one per fatbin, listing exactly the PTX's entry points.</summary>
    [Test]
    public void EveryFatbinHasAReportListingItsEntryPoints()
    {
        ReportsOrIgnore();
        Assert.Multiple(() =>
        {
            foreach (var m in KernelLocator.Modules().Where(m => m.FatbinPath is not null))
            {
                var report = Path.Combine(KernelLocator.Directory, m.Name + ReportSuffix);
                Assert.That(File.Exists(report), Is.True, $"{m.Name}.fatbin has no {m.Name}{ReportSuffix}");
                if (!File.Exists(report)) continue;
                var listed = SassReport.Parse(m.Name, File.ReadAllText(report)).Select(k => k.Kernel).ToHashSet(StringComparer.Ordinal);
                if (m.PtxPath is null) continue;
                var entries = Regex.Matches(File.ReadAllText(m.PtxPath), @"\.entry\s+([A-Za-z_$][A-Za-z0-9_$]*)")
                    .Select(x => x.Groups[1].Value).ToHashSet(StringComparer.Ordinal);
                Assert.That(listed, Is.EquivalentTo(entries), $"kernels in {m.Name}{ReportSuffix} vs .entry in {m.Name}.ptx");
            }
        });
    }

    // --- negative controls: the check can fail -------------------------------------------------------------

    private const string HandWrittenReport = """
        # NativePeft static kernel profile: toy.fatbin, sm_90
        kernel registers stack local spill_stores spill_loads instructions HMMA LDSM LDGSTS STL LDL BAR
        toy_tc_clean 128 0 0 0 0 900 64 36 16 0 0 3
        toy_tc_spills 255 16 0 16 8 1000 64 36 16 2 1 3
        toy_tc_scalar 40 0 0 0 0 300 0 0 0 0 0 1
        toy_tc_no_ptxas 128 0 0 - - 900 64 36 16 0 0 3
        plain_kernel 255 16 0 16 8 1000 0 0 0 2 1 3
        """;

    [Test]
    public void ParserFlagsSpillsAndMissingTensorCoreInstructions()
    {
        var kernels = SassReport.Parse("toy", HandWrittenReport).ToDictionary(k => k.Kernel);
        Assert.That(kernels.Keys, Is.EquivalentTo(new[] { "toy_tc_clean", "toy_tc_spills", "toy_tc_scalar", "toy_tc_no_ptxas", "plain_kernel" }));
        Assert.That(kernels["toy_tc_spills"].Get("STL"), Is.EqualTo(2));
        Assert.That(kernels["toy_tc_spills"].Get("spill_loads"), Is.EqualTo(8));
        Assert.That(kernels["toy_tc_no_ptxas"].Get("spill_stores"), Is.Null);

        Assert.Multiple(() =>
        {
            Assert.That(SassReport.TensorCoreViolations(kernels["toy_tc_clean"]), Is.Empty);
            var spills = SassReport.TensorCoreViolations(kernels["toy_tc_spills"]);
            Assert.That(spills, Has.Some.Contains("2 STL"));
            Assert.That(spills, Has.Some.Contains("1 LDL"));
            Assert.That(spills, Has.Some.Contains("16 bytes of spill stores"));
            Assert.That(spills, Has.Some.Contains("8 bytes of spill loads"));
            var scalar = SassReport.TensorCoreViolations(kernels["toy_tc_scalar"]);
            Assert.That(scalar, Has.Some.Contains("no HMMA"));
            Assert.That(scalar, Has.Some.Contains("no LDSM"));
            Assert.That(SassReport.TensorCoreViolations(kernels["toy_tc_no_ptxas"]), Has.Some.Contains("spill_stores unknown"));
        });
        Assert.Throws<FormatException>(() => SassReport.Parse("bad", "kernel registers HMMA\nk 1\n"));
        Assert.Throws<FormatException>(() => SassReport.Parse("bad", "k 1 2\n"));
    }

    /// <summary>The memory-bound kernels whose main path moves 16 bytes per access (LDG/STG .128, npvec in
    /// kernels/common.cuh): the training step's elementwise ops and AdamW; the dequantize kernels read 8 packed bytes
    /// (LDG.E.64) and store 16; the one-token 4-bit GEMV loads 16 bytes and stores one value per row.</summary>
    private static readonly (string Module, string Kernel, bool Loads128, bool Stores128)[] VectorizedKernels =
    [
        ("swiglu", "swiglu_forward_bf16", true, true), ("swiglu", "swiglu_backward_bf16", true, true),
        ("rmsnorm", "rmsnorm_forward_bf16", true, true), ("rmsnorm", "rmsnorm_backward_bf16", true, true),
        ("rope", "rope_forward_bf16", true, true), ("rope", "rope_backward_bf16", true, true),
        ("elementwise", "add_bf16", true, true),
        ("nf4", "dequantize_4bit_nf4_bf16", false, true), ("nf4", "dequantize_4bit_dq_nf4_bf16", false, true),
        ("nf4", "linear_4bit_gemv_nf4_bf16", true, false), ("optim", "adamw_f32", true, true),
        ("nf4", "quantize_4bit_nf4_bf16", true, false),
    ];

    [Test]
    public void MemoryBoundKernelsMoveSixteenBytesPerAccess()
    {
        var reports = ReportsOrIgnore().ToDictionary(ModuleName, f => SassReport.Parse(ModuleName(f), File.ReadAllText(f)));
        var problems = new List<string>();
        foreach (var (module, kernel, loads128, stores128) in VectorizedKernels)
        {
            var k = reports.TryGetValue(module, out var list) ? list.FirstOrDefault(p => p.Kernel == kernel) : null;
            if (k is null) { problems.Add($"{module}/{kernel}: not in the SASS reports"); continue; }
            TestContext.Out.WriteLine($"{module}/{kernel}: LDG.128 {Show(k.Get("LDG128"))}, STG.128 {Show(k.Get("STG128"))}, registers {Show(k.Get("registers"))}");
            if (stores128 && k.Get("STG128") is not > 0) problems.Add($"{module}/{kernel}: no 16-byte global store (STG.E.128)");
            if (loads128 && k.Get("LDG128") is not > 0) problems.Add($"{module}/{kernel}: no 16-byte global load (LDG.E.128)");
            if (k.Get("STL") is not 0 || k.Get("LDL") is not 0) problems.Add($"{module}/{kernel}: local memory traffic");
        }
        Assert.That(problems, Is.Empty);
    }

    // Hand-written cuobjdump -sass / -res-usage and ptxas -v output: one kernel spills (predicated STL, LDL,
    // ptxas 24/8 bytes), one is clean; the sm_80 figures and a device function's spills must not be taken.
    private const string HandWrittenSass = """

        Fatbin elf code:
        ================
        arch = sm_90
        code version = [1,7]

        	code for sm_90
        		Function : toy_tc_spills
        	.headerflags    @"EF_CUDA_SM90 EF_CUDA_PTX_SM(EF_CUDA_SM90)"
                /*0000*/                   LDC R1, c[0x0][0x28] ;                                     /* 0x00000a00ff017b82 */
                                                                                                      /* 0x000e640000000800 */
                /*0010*/                   LDSM.16.M88.4 R24, [R14+UR9] ;                             /* 0x000000090e18783b */
                                                                                                      /* 0x000fe20008000200 */
                /*0020*/                   HMMA.16816.F32.BF16 R32, R24, R28, R32 ;                   /* 0x0000001c1820723c */
                                                                                                      /* 0x000fe20000041820 */
                /*0030*/               @P0 STL [R1+0x10], R32 ;                                       /* 0x0000102001000387 */
                                                                                                      /* 0x0001e80000100800 */
                /*0040*/                   STL.64 [R1+0x18], R34 ;                                    /* 0x0000182201007387 */
                                                                                                      /* 0x0001e80000100a00 */
                /*0050*/                   LDL R40, [R1+0x10] ;                                       /* 0x0000100001287983 */
                                                                                                      /* 0x000ea80000100800 */
                /*0060*/                   BAR.SYNC 0x0 ;                                             /* 0x0000000000007b1d */
                                                                                                      /* 0x000fec0000010000 */
                /*0070*/                   EXIT ;                                                     /* 0x000000000000794d */
                                                                                                      /* 0x000fea0003800000 */
                ..........


        		Function : toy_tc_clean
        	.headerflags    @"EF_CUDA_SM90 EF_CUDA_PTX_SM(EF_CUDA_SM90)"
                /*0000*/                   LDGSTS.E.BYPASS.128 [R133+0x2000], desc[UR4][R2.64] ;      /* 0x0200000002857fae */
                                                                                                      /* 0x0003e2000b901c44 */
                /*0010*/                   LDSM.16.MT88.4 R24, [R14+UR9] ;                            /* 0x000000090e18783b */
                                                                                                      /* 0x000fe20008004200 */
                /*0020*/              @!P1 HMMA.16816.F32.BF16 R32, R24, R28, R32 ;                   /* 0x0000001c1820723c */
                                                                                                      /* 0x000fe20000041820 */
                /*0030*/                   HMMA.16816.F32.BF16 R36, R24, R30, R36 ;                   /* 0x0000001e1824723c */
                                                                                                      /* 0x000fe20000041824 */
                /*0040*/                   LDS R40, [R1+0x10] ;                                       /* 0x0000100001287984 */
                                                                                                      /* 0x000ea80000000800 */
                /*0044*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;                  /* 0x0000000402047981 */
                                                                                                      /* 0x000ea8000c1e9d00 */
                /*0046*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;                           /* 0x0000000402097981 */
                                                                                                      /* 0x000ea8000c1e1500 */
                /*0048*/                   STG.E.128 desc[UR4][R6.64], R8 ;                           /* 0x0000000806007986 */
                                                                                                      /* 0x000fe2000c101d04 */
                /*0050*/                   EXIT ;                                                     /* 0x000000000000794d */
                                                                                                      /* 0x000fea0003800000 */
                ..........

        """;

    private const string HandWrittenResUsage = """

        Fatbin elf code:
        ================
        arch = sm_90

        Resource usage:
         Common:
          GLOBAL:0
         Function toy_tc_spills:
          REG:255 STACK:24 SHARED:1024 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
         Function toy_tc_clean:
          REG:168 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
        """;

    private const string HandWrittenPtxasLog = """
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function 'toy_tc_clean' for 'sm_80'
        ptxas info    : Function properties for toy_tc_clean
            40 bytes stack frame, 40 bytes spill stores, 40 bytes spill loads
        ptxas info    : Used 255 registers, 416 bytes cmem[0]
        ptxas info    : Compiling entry function 'toy_tc_spills' for 'sm_90'
        ptxas info    : Function properties for toy_tc_spills
            24 bytes stack frame, 24 bytes spill stores, 8 bytes spill loads
        ptxas info    : Used 255 registers
        ptxas info    : Compiling entry function 'toy_tc_clean' for 'sm_90'
        ptxas info    : Function properties for __internal_helper
            32 bytes stack frame, 32 bytes spill stores, 32 bytes spill loads
        ptxas info    : Function properties for toy_tc_clean
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 168 registers
        """;

    [Test]
    public void ReportScriptCountsSpillsInHandWrittenSass()
    {
        var script = RepoFile("cmake", "NativePeftSassReport.cmake");
        if (script is null) Assert.Ignore("not run from a source checkout: cmake/NativePeftSassReport.cmake not found");
        var cmake = FindOnPath(OperatingSystem.IsWindows() ? "cmake.exe" : "cmake");
        if (cmake is null)
        {
            if (RequireReports) Assert.Fail("cmake not on PATH (NATIVEPEFT_REQUIRE_PTX=1)");
            Assert.Ignore("cmake not on PATH: the report script cannot be run");
        }

        using var tmp = new TempDir();
        File.WriteAllText(tmp["toy.sass.txt"], HandWrittenSass);
        File.WriteAllText(tmp["toy.res.txt"], HandWrittenResUsage);
        File.WriteAllText(tmp["toy.ptxas.log"], HandWrittenPtxasLog);
        var psi = new ProcessStartInfo(cmake!) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { $"-DSASS_FILE={tmp["toy.sass.txt"]}", $"-DRES_FILE={tmp["toy.res.txt"]}", "-DARCH=90",
                                  $"-DPTXAS_LOG={tmp["toy.ptxas.log"]}", $"-DOUT={tmp["toy.sm90.txt"]}", "-P", script! })
            psi.ArgumentList.Add(a);
        using (var p = Process.Start(psi)!)
        {
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            Assert.That(p.WaitForExit(TimeSpan.FromMinutes(1)), Is.True, "cmake -P did not finish");
            Assert.That(p.ExitCode, Is.Zero, $"cmake -P {script}: {stdout.Result}{stderr.Result}");
        }

        var text = File.ReadAllText(tmp["toy.sm90.txt"]);
        TestContext.Out.WriteLine(text);
        var kernels = SassReport.Parse("toy", text).ToDictionary(k => k.Kernel);
        Assert.That(kernels.Keys, Is.EquivalentTo(new[] { "toy_tc_spills", "toy_tc_clean" }));
        var spills = kernels["toy_tc_spills"];
        var clean = kernels["toy_tc_clean"];
        Assert.Multiple(() =>
        {
            Assert.That(Figures(spills), Is.EqualTo(new long?[] { 255, 24, 0, 24, 8, 8, 1, 1, 0, 2, 1, 1, 0, 0 }), "toy_tc_spills");
            // LDGSTS.E.BYPASS.128 (cp.async) and LDG.E.U16 are not 16-byte global loads; LDG.E.128.CONSTANT is
            Assert.That(Figures(clean), Is.EqualTo(new long?[] { 168, 0, 0, 0, 0, 9, 2, 1, 1, 0, 0, 0, 1, 1 }), "toy_tc_clean");
            Assert.That(SassReport.TensorCoreViolations(spills), Has.Some.Contains("2 STL"));
            Assert.That(SassReport.TensorCoreViolations(spills), Has.Some.Contains("24 bytes of spill stores"));
            Assert.That(SassReport.TensorCoreViolations(clean), Is.Empty);
        });
    }

    private static long?[] Figures(KernelProfile k) =>
        new[] { "registers", "stack", "local", "spill_stores", "spill_loads", "instructions", "HMMA", "LDSM", "LDGSTS", "STL", "LDL", "BAR", "LDG128", "STG128" }
            .Select(k.Get).ToArray();

    private static string? RepoFile(params string[] parts)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "NativePeft.sln")))
            {
                var path = Path.Combine([dir.FullName, .. parts]);
                return File.Exists(path) ? path : null;
            }
        return null;
    }

    private static string? FindOnPath(string exe) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Select(d => Path.Combine(d, exe)).FirstOrDefault(File.Exists);
}

/// <summary>One kernel's line of a <c>&lt;stem&gt;.sm90.txt</c> report; a figure is null where the report has "-".</summary>
internal sealed record KernelProfile(string Module, string Kernel, IReadOnlyDictionary<string, long?> Figures)
{
    public long? Get(string column) =>
        Figures.TryGetValue(column, out var v) ? v : throw new KeyNotFoundException($"{Module}: the report has no column '{column}'");
}

/// <summary>Reads the reports cmake/NativePeftSassReport.cmake writes and checks the tensor-core kernels' figures.</summary>
internal static class SassReport
{
    /// <summary>'#' lines are comments; the first other line names the columns (the first is "kernel"); then one line per kernel.</summary>
    public static IReadOnlyList<KernelProfile> Parse(string module, string text)
    {
        string[]? columns = null;
        var kernels = new List<KernelProfile>();
        foreach (var raw in text.Split('\n'))
        {
            var line = raw.Trim();
            if (line.Length == 0 || line.StartsWith('#')) continue;
            var fields = line.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            if (columns is null)
            {
                if (fields[0] != "kernel") throw new FormatException($"{module}: expected the column line 'kernel ...', got '{line}'");
                columns = fields;
                continue;
            }
            if (fields.Length != columns.Length)
                throw new FormatException($"{module}: {fields.Length} fields for {columns.Length} columns in '{line}'");
            var figures = new Dictionary<string, long?>(StringComparer.Ordinal);
            for (var i = 1; i < fields.Length; i++)
                figures[columns[i]] = fields[i] == "-" ? null
                    : long.TryParse(fields[i], NumberStyles.None, CultureInfo.InvariantCulture, out var v) ? v
                    : throw new FormatException($"{module}: '{fields[i]}' is not a count ({columns[i]} of {fields[0]})");
            kernels.Add(new KernelProfile(module, fields[0], figures));
        }
        return kernels;
    }

    /// <summary>Why a tensor-core kernel's SASS is not the fast path; empty when it is.</summary>
    public static IEnumerable<string> TensorCoreViolations(KernelProfile k)
    {
        var name = $"{k.Module}/{k.Kernel}";
        foreach (var (op, what) in new[] { ("HMMA", "mma.sync"), ("LDSM", "ldmatrix") })
            if (k.Get(op) is not > 0) yield return $"{name}: no {op} ({what}) in the sm_90 SASS";
        foreach (var op in new[] { "STL", "LDL" })
            if (k.Get(op) is var n and not 0) yield return $"{name}: {Count(n)} {op} (local memory) in the sm_90 SASS";
        foreach (var col in new[] { "spill_stores", "spill_loads" })
            if (k.Get(col) is not { } bytes) yield return $"{name}: {col} unknown (no ptxas -v figures)";
            else if (bytes != 0) yield return $"{name}: ptxas reports {bytes} bytes of {col.Replace('_', ' ')}";
    }

    private static string Count(long? n) => n?.ToString(CultureInfo.InvariantCulture) ?? "unknown";
}
