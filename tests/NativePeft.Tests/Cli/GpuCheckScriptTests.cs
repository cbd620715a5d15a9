using System.Diagnostics;
using System.Text.RegularExpressions;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// build.sh's gpu-check runner, which only a GPU machine runs for real: its self-test (fake sections that pass, fail,
/// skip, sleep past their limit, and come after the budget) and its plan (every limit within the 8-minute budget).
/// Runs from the repository (build.sh five folders up) or from an unpacked bundle (build.sh next to the tests).
/// </summary>
public class GpuCheckScriptTests
{
    private static string BuildScript()
    {
        if (OperatingSystem.IsWindows()) Assert.Ignore("build.sh is bash: Linux only (build.ps1 has no gpu-check)");
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "build.sh");
            if (File.Exists(candidate)) return candidate;
        }
        Assert.Ignore("build.sh not found above " + AppContext.BaseDirectory);
        return "";
    }

    private static (int ExitCode, string Output) Bash(string script, params string[] args)
    {
        var psi = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
            WorkingDirectory = Path.GetDirectoryName(script)! };
        psi.ArgumentList.Add(script);
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(90)))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"bash {script} {string.Join(' ', args)} did not finish in 90 s");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    [Test]
    public void TheRunnerTimesOutFailsAndSkipsSectionsAndStillWritesTheSummary()
    {
        var (rc, output) = Bash(BuildScript(), "gpu-check-selftest");
        Assert.That(rc, Is.EqualTo(0), output);
        Assert.That(output, Does.Contain("gpu-check self-test: passed"), output);
        Assert.That(output, Does.Contain("| fake-sleep | timed out |"), output);
    }

    [Test]
    public void GpuProfileNamesKernelsThatExist()
    {
        // gpu-profile's Nsight Compute filters must match kernels of this build (a renamed kernel would profile nothing).
        var (rc, output) = Bash(BuildScript(), "gpu-profile", "--dry-run");
        Assert.That(rc, Is.EqualTo(0), output);
        var list = Regex.Match(output, @"--steps 1: (.+) \(the rest of the budget");
        Assert.That(list.Success, Is.True, output);
        var names = list.Groups[1].Value.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        Assert.That(names, Has.Length.GreaterThanOrEqualTo(6));
        var dir = NativePeft.Runtime.KernelLocator.Directory;
        var reports = Directory.Exists(dir) ? Directory.GetFiles(dir, "*.sm90.txt").Select(File.ReadAllText).ToList() : [];
        if (reports.Count == 0) Assert.Ignore($"no SASS reports in {dir} (nvcc unavailable at build time)");
        var kernels = reports.SelectMany(r => r.Split('\n')).Where(l => l.Length > 0 && !l.StartsWith('#')).Select(l => l.Split(' ')[0]).ToList();
        foreach (var name in names)
            Assert.That(kernels.Any(k => Regex.IsMatch(k, name)), $"no kernel of this build matches '{name}'");
    }

    [Test]
    public void ThePlansLimitsFitTheEightMinuteBudget()
    {
        var (rc, output) = Bash(BuildScript(), "gpu-check", "--dry-run");
        Assert.That(rc, Is.EqualTo(0), output);
        var sum = Regex.Match(output, @"limits add up to (\d+) s");
        Assert.That(sum.Success, Is.True, output);
        Assert.That(int.Parse(sum.Groups[1].Value), Is.LessThanOrEqualTo(480), output);
        var limits = Regex.Matches(output, @"^  (\S+) +(\d+) s  ", RegexOptions.Multiline).Select(m => (m.Groups[1].Value, int.Parse(m.Groups[2].Value))).ToList();
        Assert.That(limits.Select(l => l.Item1), Is.SupersetOf(new[] { "tests", "kernel-bench", "attention", "attention-sdpa", "llama8b", "compare", "nccl", "peft", "oracle" }), output);
        Assert.That(limits.Sum(l => l.Item2), Is.EqualTo(int.Parse(sum.Groups[1].Value)), output);
        Assert.That(limits.Sum(l => l.Item2), Is.LessThanOrEqualTo(460), "20 s of the budget left for kill grace and the summary");
    }

    [Test]
    public void TheBundleCarriesThePeerScriptsTheSectionsRun()
    {
        string script = File.ReadAllText(BuildScript());
        foreach (var peer in new[] { "attn_peer.py", "train_peer.py", "gen_model_oracle.py", "compare_adapters.py" })
        {
            Assert.That(script, Does.Contain($"cp \"$ROOT/tests/reference/{peer}\" \"$stage/{peer}\""), peer + " is copied into the bundle");
            Assert.That(script, Does.Contain($"python3 ./{peer}"), peer + " is run by a section");
        }
    }
}
