using System.Text.RegularExpressions;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Kernels;

/// <summary>
/// The two builds of kernels/*.cu agree: every entry point nvcc put in the PTX is registered in the emulator
/// library and the other way round, so a kernel cannot exist on one device only.
/// </summary>
public class KernelBuildTests
{
    internal static string RepoKernelsDir()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "NativePeft.sln")))
                return Path.Combine(dir.FullName, "kernels");
        return "";
    }

    private static HashSet<string> PtxEntries()
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var m in KernelLocator.Modules().Where(m => m.PtxPath is not null))
            foreach (Match match in Regex.Matches(File.ReadAllText(m.PtxPath!), @"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)"))
                names.Add(match.Groups[1].Value);
        return names;
    }

    [Test]
    public void EveryCuFileHasAPtxWhenNvccWasAvailable()
    {
        var sources = Directory.Exists(RepoKernelsDir())
            ? Directory.GetFiles(RepoKernelsDir(), "*.cu").Select(Path.GetFileNameWithoutExtension).ToHashSet()
            : [];
        var ptx = KernelLocator.Modules().Where(m => m.PtxPath is not null).Select(m => m.Name).ToHashSet();
        if (ptx.Count == 0 && Environment.GetEnvironmentVariable("NATIVEPEFT_REQUIRE_PTX") != "1")
            Assert.Ignore("no PTX built (nvcc unavailable at build time)");
        if (sources.Count == 0)
            Assert.Ignore("not run from a source checkout (kernels/*.cu not found): nothing to compare the PTX with");
        Assert.That(ptx, Is.SupersetOf(sources!), "a kernels/*.cu file has no PTX in " + KernelLocator.Directory);
    }

    [Test]
    public void PtxEntryPointsEqualEmulatorRegistry()
    {
        var ptx = PtxEntries();
        if (ptx.Count == 0 && Environment.GetEnvironmentVariable("NATIVEPEFT_REQUIRE_PTX") != "1")
            Assert.Ignore("no PTX built (nvcc unavailable at build time)");
        using var emu = EmulatedGpu.Create();
        var registered = emu.KernelNames.ToHashSet(StringComparer.Ordinal);
        Assert.Multiple(() =>
        {
            Assert.That(ptx.Except(registered), Is.Empty, "in the PTX but not registered in the emulator (NP_KERNEL)");
            Assert.That(registered.Except(ptx), Is.Empty, "registered in the emulator but not in any PTX");
        });
    }
}
