using System.Diagnostics;
using System.Text.RegularExpressions;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// build.ps1 (the Windows script) run by PowerShell 7 on this machine, so it cannot rot unseen: PowerShell is installed
/// as a dotnet tool into a temporary folder (the same NuGet feeds the build uses), then `build.ps1 test` runs the test
/// runner of this build (NATIVEPEFT_SKIP_BUILD: the solution is already built; a small filter; its own results folder)
/// and must end with the suite's summary line; an unknown command must print the usage and exit 2.
/// </summary>
public class BuildPs1Tests
{
    private static string? Script()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "build.ps1");
            if (File.Exists(candidate) && File.Exists(Path.Combine(dir.FullName, "NativePeft.sln"))) return candidate;
        }
        return null;
    }

    private static (int ExitCode, string Output) Run(string exe, IEnumerable<string> args, IReadOnlyDictionary<string, string>? env = null, int seconds = 300)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        if (env is not null) foreach (var (k, v) in env) psi.Environment[k] = v;
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromSeconds(seconds)))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"{exe} {string.Join(' ', args)} did not finish in {seconds} s");
        }
        return (p.ExitCode, stdout.Result + stderr.Result);
    }

    [Test]
    public void BuildPs1RunsTheTestsUnderPowerShell()
    {
        string script = Script() ?? "";
        if (script.Length == 0) Assert.Ignore("not a source checkout: build.ps1 and NativePeft.sln not found");
        using var dir = CliProcess.TempDir();
        var install = Run("dotnet", ["tool", "install", "PowerShell", "--version", "7.6.10", "--tool-path", dir["pwsh"]]);
        if (install.ExitCode != 0) Assert.Ignore("PowerShell could not be installed as a dotnet tool here: " + install.Output.Trim().Split('\n')[^1]);
        string pwsh = Path.Combine(dir["pwsh"], OperatingSystem.IsWindows() ? "pwsh.exe" : "pwsh");

        var usage = Run(pwsh, ["-NoProfile", "-File", script, "no-such-command"]);
        Assert.That(usage.ExitCode, Is.EqualTo(2), usage.Output);
        Assert.That(usage.Output, Does.Contain("usage: .\\build.ps1 run | test | build"));

        var env = new Dictionary<string, string>
        {
            ["NATIVEPEFT_SKIP_BUILD"] = "1", ["NATIVEPEFT_TEST_FILTER"] = "FullyQualifiedName~SmokeTests", ["NATIVEPEFT_TEST_RESULTS"] = dir["results"],
        };
        var test = Run(pwsh, ["-NoProfile", "-File", script, "test"], env);
        Assert.That(test.ExitCode, Is.EqualTo(0), test.Output);
        var summary = Regex.Match(test.Output, @"^(\d+) passed, 0 failed, \d+ skipped\s*$", RegexOptions.Multiline);
        Assert.That(summary.Success, Is.True, "the summary line:\n" + test.Output);
        Assert.That(int.Parse(summary.Groups[1].Value), Is.GreaterThan(0));
        Assert.That(File.Exists(Path.Combine(dir["results"], "tests.trx")), "the TRX it read");
    }
}
