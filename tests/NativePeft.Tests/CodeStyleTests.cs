using System.Text.RegularExpressions;
using NativePeft.Tests.Cli;
using NativePeft.Tests.Packaging;
using NUnit.Framework;

namespace NativePeft.Tests;

/// <summary>
/// The build applies the code style of .editorconfig (issue 11, item 6): Directory.Build.props sets
/// EnforceCodeStyleInBuild and the naming rules (IDE1006) are errors. The real check builds a scratch project that
/// carries the repository's .editorconfig and Directory.Build.props, with one field of each kind named for and against
/// the rules, and expects exactly the four named against them to fail the build. Runs only from a source checkout with
/// the .NET SDK on PATH (the GPU bundle has neither).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class CodeStyleTests
{
    private static string Root() =>
        PackageTests.RepoRoot() ?? throw new IgnoreException("not in a source checkout (no NativePeft.sln above the tests): no .editorconfig");

    /// <summary>The key = value pairs of one [section] of an .editorconfig.</summary>
    private static Dictionary<string, string> Section(string editorconfig, string section)
    {
        var values = new Dictionary<string, string>(StringComparer.Ordinal);
        bool inside = false;
        foreach (var raw in editorconfig.ReplaceLineEndings("\n").Split('\n'))
        {
            string line = raw.Trim();
            if (line.Length == 0 || line[0] is '#' or ';') continue;
            if (line[0] == '[') { inside = line == "[" + section + "]"; continue; }
            int eq = line.IndexOf('=');
            if (inside && eq > 0) values[line[..eq].Trim()] = line[(eq + 1)..].Trim();
        }
        return values;
    }

    [Test]
    public void TheBuildEnforcesTheNamingRulesAsErrors()
    {
        string root = Root();
        string props = File.ReadAllText(Path.Combine(root, "Directory.Build.props"));
        Assert.That(props, Does.Match(@"<EnforceCodeStyleInBuild>\s*true\s*</EnforceCodeStyleInBuild>"),
            "Directory.Build.props: EnforceCodeStyleInBuild must be true, or the build ignores .editorconfig's style rules");

        string editorconfig = File.ReadAllText(Path.Combine(root, ".editorconfig"));
        Assert.That(editorconfig, Does.Match(@"(?m)^root\s*=\s*true\s*$"), ".editorconfig: root = true");
        var cs = Section(editorconfig, "*.cs");
        Assert.That(cs.GetValueOrDefault("dotnet_diagnostic.IDE1006.severity"), Is.EqualTo("error"), "[*.cs] dotnet_diagnostic.IDE1006.severity");
        Assert.That(cs.GetValueOrDefault("max_line_length"), Is.EqualTo("120"), "[*.cs] max_line_length");
        var rules = new Dictionary<string, (string Symbols, string Prefix, string Capitalization)>
        {
            ["const_fields_pascal"] = ("const_fields", "", "pascal_case"),
            ["private_static_readonly_fields_pascal"] = ("private_static_readonly_fields", "", "pascal_case"),
            ["private_static_fields_s_camel"] = ("private_static_fields", "s_", "camel_case"),
            ["private_fields_underscore_camel"] = ("private_fields", "_", "camel_case"),
        };
        foreach (var (rule, (symbols, prefix, capitalization)) in rules)
        {
            Assert.That(cs.GetValueOrDefault($"dotnet_naming_rule.{rule}.severity"), Is.EqualTo("error"), $"{rule}: severity");
            Assert.That(cs.GetValueOrDefault($"dotnet_naming_rule.{rule}.symbols"), Is.EqualTo(symbols), $"{rule}: symbols");
            string style = cs.GetValueOrDefault($"dotnet_naming_rule.{rule}.style") ?? "";
            Assert.That(cs.GetValueOrDefault($"dotnet_naming_style.{style}.capitalization"), Is.EqualTo(capitalization), $"{rule}: style {style}");
            Assert.That(cs.GetValueOrDefault($"dotnet_naming_style.{style}.required_prefix") ?? "", Is.EqualTo(prefix), $"{rule}: prefix of {style}");
        }
    }

    [Test]
    public void AFieldNamedAgainstTheRulesFailsTheBuild()
    {
        string root = Root();
        string dotnet = PackageTests.FindDotnet() ?? throw new IgnoreException("no dotnet on PATH (the .NET SDK builds the scratch project)");
        using var dir = CliProcess.TempDir();
        File.Copy(Path.Combine(root, ".editorconfig"), dir[".editorconfig"]);
        File.Copy(Path.Combine(root, "Directory.Build.props"), dir["Directory.Build.props"]);
        File.WriteAllText(dir["Scratch.csproj"], """
            <Project Sdk="Microsoft.NET.Sdk">
              <PropertyGroup>
                <OutputType>Library</OutputType>
              </PropertyGroup>
            </Project>
            """);
        // One field per rule named for it and one against it; the comment gives the line the build must flag.
        string[] fields =
        [
            "public const int MaxSize = 4;",
            "private const int max_count = 4;                  // const, not PascalCase",
            "private static readonly int[] Table = [1, 2];",
            "private static readonly int[] s_table = [1, 2];   // static readonly with s_",
            "private static int s_calls;",
            "private static int calls;                         // static without s_",
            "private int _count;",
            "private int count;                                // instance without _",
        ];
        const int firstFieldLine = 5;
        string code = "namespace Scratch;\n\npublic sealed class Fields\n{\n"
            + string.Concat(fields.Select(f => "    " + f + "\n"))
            + "\n    public int Sum() => MaxSize + max_count + Table[0] + s_table[0] + s_calls++ + calls++ + _count++ + count++;\n}\n";
        File.WriteAllText(dir["Fields.cs"], code);

        var r = PackageTests.Run(dotnet, dir.Path, "build", "-nologo", "-p:NuGetAudit=false");
        if (r.ExitCode != 0 && Regex.IsMatch(r.Stdout + r.Stderr, @"NU1301|NU1801|Unable to load the service index"))
            Assert.Ignore("restoring the scratch project needed the network:\n" + r);

        var flagged = Regex.Matches(r.Stdout + r.Stderr, @"Fields\.cs\((\d+),\d+\): error IDE1006\b")
            .Select(m => int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture)).Distinct().Order().ToArray();
        int[] expected = fields.Select((f, i) => (f, i)).Where(x => x.f.Contains("//", StringComparison.Ordinal))
            .Select(x => firstFieldLine + x.i).ToArray();
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), "a field named against the rules must fail the build\n" + r);
        Assert.That(flagged, Is.EqualTo(expected), "the lines IDE1006 flags as errors: exactly the four fields named against the rules\n" + r);
    }
}
