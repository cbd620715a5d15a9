using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;
using NativePeft.Runtime;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.Packaging;

/// <summary>
/// What a C# user installs (docs/packaging.md): the NativePeft package referenced from a new console project that
/// compiles the README's C# snippet word for word, builds, publishes and runs it (the kernels, the emulator library and
/// the built-in model land next to its assemblies); and the NativePeft.Cli .NET tool installed into a tool folder and
/// run as `nativepeft`. The packages are made from the build the tests run from (`dotnet pack --no-build`) into a
/// temporary feed; restore reads only that feed and the global packages folder, never the network.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class PackageTests
{
    private const string SnippetOpen = "<!-- csharp-snippet -->";
    private const string SnippetClose = "<!-- /csharp-snippet -->";

    private TempDir? _dir;
    private string _root = "";
    private string _feed = "";
    private string _version = "";

    /// <summary>The source checkout above the test assembly, or null (the self-contained GPU bundle has none).</summary>
    internal static string? RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "NativePeft.sln"))) return dir.FullName;
        return null;
    }

    /// <summary>The README's C# snippet, between its markers.</summary>
    internal static string ReadmeSnippet(string root)
    {
        string readme = File.ReadAllText(Path.Combine(root, "README.md")).ReplaceLineEndings("\n");
        int open = readme.IndexOf(SnippetOpen, StringComparison.Ordinal);
        int close = readme.IndexOf(SnippetClose, StringComparison.Ordinal);
        Assert.That(open >= 0 && close > open, $"README.md marks its C# snippet with {SnippetOpen} ... {SnippetClose}");
        var m = Regex.Match(readme[(open + SnippetOpen.Length)..close], "^\\s*```csharp\\n(?<code>.*?)```\\s*$", RegexOptions.Singleline);
        Assert.That(m.Success, "between the markers: one ```csharp block");
        return m.Groups["code"].Value;
    }

    [OneTimeSetUp]
    public void PackTheBuild()
    {
        _root = RepoRoot() ?? throw new IgnoreException("not in a source checkout (no NativePeft.sln above the tests): nothing to pack");
        // bin/<Configuration>/net10.0/: pack the same configuration's build of the library and the CLI
        var tfmDir = new DirectoryInfo(AppContext.BaseDirectory.TrimEnd(Path.DirectorySeparatorChar));
        string config = tfmDir.Parent!.Name, tfm = tfmDir.Name;
        foreach (var (project, dll) in new[] { ("src/NativePeft/NativePeft.csproj", "NativePeft.dll"), ("src/NativePeft.Cli/NativePeft.Cli.csproj", "NativePeft.Cli.dll") })
            if (!File.Exists(Path.Combine(_root, Path.GetDirectoryName(project)!, "bin", config, tfm, dll)))
                Assert.Ignore($"{project} is not built in {config} (run ./build.sh build)");
        if (FindDotnet() is null) Assert.Ignore("no dotnet on PATH (the .NET SDK packs, restores and builds the consumer)");

        _dir = CliProcess.TempDir();
        _feed = _dir["feed"];
        foreach (var project in new[] { "src/NativePeft/NativePeft.csproj", "src/NativePeft.Cli/NativePeft.Cli.csproj" })
        {
            var r = Dotnet(_root, "pack", Path.Combine(_root, project), "-c", config, "--no-build", "-o", _feed, "-nologo");
            Assert.That(r.ExitCode, Is.EqualTo(0), $"dotnet pack {project}\n{r}");
        }
        string lib = Directory.GetFiles(_feed, "NativePeft.*.nupkg").Select(Path.GetFileName).Single(f => !f!.StartsWith("NativePeft.Cli.", StringComparison.Ordinal))!;
        _version = lib["NativePeft.".Length..^".nupkg".Length];
        Assert.That(File.Exists(Path.Combine(_feed, $"NativePeft.Cli.{_version}.nupkg")), "both packages have one version");
    }

    [OneTimeTearDown]
    public void RemoveTheFeed() => _dir?.Dispose();

    /// <summary>
    /// What the packages must carry: the kernel modules (PTX and fatbin) of the build they are packed from
    /// (build/kernels/) and whether it has the emulator library.
    /// </summary>
    private (int Modules, bool Emulator) Expected()
    {
        string dir = Path.Combine(_root, "build", "kernels");
        var files = Directory.Exists(dir) ? Directory.GetFiles(dir).Select(Path.GetFileName).ToHashSet() : [];
        int modules = files.Where(f => f!.EndsWith(".ptx", StringComparison.Ordinal))
            .Count(f => files.Contains(Path.GetFileNameWithoutExtension(f) + ".fatbin"));
        return (modules, files.Contains(Path.GetFileName(KernelLocator.EmulatorLibraryPath)));
    }

    [Test]
    public void TheLibraryPackageRunsTheReadmeSnippetInANewProject()
    {
        var (modules, emulator) = Expected();
        string app = _dir!["app"];
        Directory.CreateDirectory(app);
        WriteNugetConfig(app, includeGlobalPackages: true);
        File.WriteAllText(Path.Combine(app, "App.csproj"), $"""
            <Project Sdk="Microsoft.NET.Sdk">
              <PropertyGroup>
                <OutputType>Exe</OutputType>
                <TargetFramework>net10.0</TargetFramework>
                <ImplicitUsings>enable</ImplicitUsings>
                <Nullable>enable</Nullable>
                <!-- a folder of its own: the package under test never enters the global packages folder -->
                <RestorePackagesPath>packages</RestorePackagesPath>
              </PropertyGroup>
              <ItemGroup>
                <PackageReference Include="NativePeft" Version="{_version}" />
              </ItemGroup>
            </Project>
            """);
        File.WriteAllText(Path.Combine(app, "Program.cs"), ReadmeSnippet(_root));
        // What the app found, printed before the snippet runs (a module initializer: Program.cs is the snippet alone).
        File.WriteAllText(Path.Combine(app, "PackageCheck.cs"), """
            using System.Runtime.CompilerServices;
            using System.Runtime.InteropServices;
            using NativePeft.Runtime;
            using NativePeft.Training;

            static class PackageCheck
            {
            #pragma warning disable CA2255
                [ModuleInitializer]
            #pragma warning restore CA2255
                internal static void Report()
                {
                    string emu = KernelLocator.EmulatorLibraryPath;
                    Console.WriteLine($"kernel directory: {KernelLocator.Directory}");
                    Console.WriteLine($"kernel modules: {KernelLocator.Modules().Count(m => m.PtxPath is not null && m.FatbinPath is not null)} with PTX and fatbin");
                    Console.WriteLine($"emulator library: {File.Exists(emu)} loads {File.Exists(emu) && NativeLibrary.TryLoad(emu, out _)}");
                    Console.WriteLine($"built-in model: {File.Exists(Path.Combine(BuiltinModel.Directory, "config.json"))}");
                }
            }
            """);

        var build = Dotnet(app, "build", "-c", "Release", "-nologo");
        IgnoreIfOffline(build);
        Assert.That(build.ExitCode, Is.EqualTo(0), "the README snippet builds against the package\n" + build);
        string bin = Path.Combine(app, "bin", "Release", "net10.0");
        Assert.That(File.Exists(Path.Combine(app, "packages", "nativepeft", _version, "lib", "net10.0", "NativePeft.xml")),
            "the XML documentation comes with the assembly (IntelliSense reads it from the package)");

        string work = _dir["run"];
        Directory.CreateDirectory(work);
        var run = Run(Path.Combine(bin, OperatingSystem.IsWindows() ? "App.exe" : "App"), work);
        Assert.That(run.ExitCode, Is.EqualTo(0), run.ToString());
        Assert.That(run.Stdout, Does.Contain(Path.Combine("bin", "Release", "net10.0", "kernels")), "kernels/ next to the app's assemblies\n" + run);
        Assert.That(run.Stdout, Does.Contain($"kernel modules: {modules} with PTX and fatbin"), "every kernel module of the build\n" + run);
        if (emulator) Assert.That(run.Stdout, Does.Contain("emulator library: True loads True"), run.ToString());
        Assert.That(run.Stdout, Does.Contain("built-in model: True"), run.ToString());

        // The snippet's fine-tune: a finite final loss far below the first step's, and the adapter it saved.
        var loss = Regex.Match(run.Stdout, @"final loss (?<v>\S+)");
        Assert.That(loss.Success, run.ToString());
        double final = double.Parse(loss.Groups["v"].Value, CultureInfo.InvariantCulture);
        using var metrics = JsonDocument.Parse(File.ReadAllText(Path.Combine(work, "out", "metrics.json")));
        double first = metrics.RootElement.GetProperty("steps")[0].GetProperty("loss").GetDouble();
        Assert.That(double.IsFinite(final) && final < first * 0.5, $"first step's loss {first}, final {final}");
        Assert.That(File.Exists(Path.Combine(work, "out", "my-adapter", "adapter_config.json"))
            && File.Exists(Path.Combine(work, "out", "my-adapter", "adapter_model.safetensors")), "the PEFT adapter the snippet saved");

        // Publishing carries the same files.
        var publish = Dotnet(app, "publish", "-c", "Release", "--no-build", "-o", "pub", "-nologo");
        Assert.That(publish.ExitCode, Is.EqualTo(0), publish.ToString());
        string pub = Path.Combine(app, "pub");
        Assert.That(Directory.GetFiles(Path.Combine(pub, "kernels"), "*.ptx").Length, Is.EqualTo(modules), "published kernels/");
        if (emulator) Assert.That(File.Exists(Path.Combine(pub, "kernels", Path.GetFileName(KernelLocator.EmulatorLibraryPath))), "published emulator library");
        Assert.That(File.Exists(Path.Combine(pub, "builtin-model", "model.safetensors")), "published built-in model");
    }

    [Test]
    public void TheToolPackageInstallsTheNativepeftCommand()
    {
        var (modules, emulator) = Expected();
        string config = _dir!["tool-nuget"];
        Directory.CreateDirectory(config);
        WriteNugetConfig(config, includeGlobalPackages: false); // a tool package carries everything it needs
        string tools = _dir["tools"];
        var install = Dotnet(_dir.Path, "tool", "install", "--tool-path", tools, "--configfile", Path.Combine(config, "nuget.config"),
            "NativePeft.Cli", "--version", _version);
        IgnoreIfOffline(install);
        Assert.That(install.ExitCode, Is.EqualTo(0), install.ToString());
        string exe = Path.Combine(tools, OperatingSystem.IsWindows() ? "nativepeft.exe" : "nativepeft");
        Assert.That(File.Exists(exe), $"the command nativepeft in {tools}");

        var help = Run(exe, _dir.Path, "--help");
        Assert.That(help.ExitCode, Is.EqualTo(0), help.ToString());
        Assert.That(help.Stdout.ReplaceLineEndings("\n"), Does.Contain("Usage:\n  nativepeft [command] [options]"), help.ToString());
        Assert.That(help.Stdout, Does.Not.Contain("NativePeft.Cli"), help.ToString());

        // info: the kernels and the emulator from the tool's own folder (the table may wrap a path: compare without spaces)
        var info = Run(exe, _dir.Path, "info");
        Assert.That(info.ExitCode, Is.EqualTo(0), info.ToString());
        string flat = Regex.Replace(info.Stdout, @"[\s│|]", "");
        string store = Regex.Replace(Path.Combine(tools, ".store"), @"\s", "");
        Assert.That(Regex.Matches(flat, @"\(ptx\+fatbin\)").Count, Is.EqualTo(modules), "every kernel module, from the package\n" + info);
        if (modules > 0) Assert.That(flat, Does.Contain(store).And.Contain("/kernels"), info.ToString());
        if (emulator) Assert.That(info.Stdout, Does.Contain("NativePeft CPU emulator"), info.ToString());

        // the built-in model came with it: generate runs on it
        var generate = Run(exe, _dir.Path, "generate", "--prompt", "upper: ab\n", "--max-tokens", "4");
        Assert.That(generate.ExitCode, Is.EqualTo(0), generate.ToString());
    }

    private void WriteNugetConfig(string dir, bool includeGlobalPackages)
    {
        string global = Environment.GetEnvironmentVariable("NUGET_PACKAGES") is { Length: > 0 } p ? p
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        File.WriteAllText(Path.Combine(dir, "nuget.config"), $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources>
                <clear />
                <add key="nativepeft" value="{_feed}" />
            {(includeGlobalPackages ? $"    <add key=\"global-packages\" value=\"{global}\" />\n" : "")}  </packageSources>
            </configuration>
            """);
    }

    /// <summary>A restore that needed the network (a dependency missing from the global packages folder) is a skip, not a failure.</summary>
    private static void IgnoreIfOffline(CliProcess.Result r)
    {
        if (r.ExitCode != 0 && Regex.IsMatch(r.Stdout + r.Stderr, @"NU1301|NU1801|Unable to load the service index"))
            Assert.Ignore("restore needed the network (a package is missing from the local feed and the global packages folder):\n" + r);
    }

    internal static string? FindDotnet()
    {
        foreach (var d in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            string f = Path.Combine(d, OperatingSystem.IsWindows() ? "dotnet.exe" : "dotnet");
            if (File.Exists(f)) return f;
        }
        return null;
    }

    private static CliProcess.Result Dotnet(string workingDirectory, params string[] args) => Run(FindDotnet()!, workingDirectory, args);

    /// <summary>Runs a program in a clean environment: no NATIVEPEFT_KERNELS (the packaged kernels must be found on their own), no MSBuild variables of a parent build.</summary>
    internal static CliProcess.Result Run(string exe, string workingDirectory, params string[] args)
    {
        var psi = new ProcessStartInfo(exe)
        {
            WorkingDirectory = workingDirectory,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var name in psi.Environment.Keys.ToList())
            if (name.StartsWith("MSBuild", StringComparison.OrdinalIgnoreCase) || name.StartsWith("NATIVEPEFT_", StringComparison.Ordinal)
                || name == "DOTNET_HOST_PATH")
                psi.Environment.Remove(name);
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_NOLOGO"] = "1";
        psi.Environment["DOTNET_SKIP_FIRST_TIME_EXPERIENCE"] = "1";
        psi.Environment["DOTNET_CLI_WORKLOAD_UPDATE_NOTIFY_DISABLE"] = "1";
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start " + exe);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(3)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{exe} {string.Join(' ', args)} did not finish in 3 minutes");
        }
        return new CliProcess.Result(p.ExitCode, stdout.Result, stderr.Result);
    }
}
