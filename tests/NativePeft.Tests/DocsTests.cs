using System.Text;
using System.Text.RegularExpressions;
using NUnit.Framework;

namespace NativePeft.Tests;

/// <summary>
/// The specification lives in the repository: every docs/ file that source, tests, build files or docs cite exists,
/// nothing cites a folder a clone does not have (a notes folder, the shared folder next to the checkout) or an absolute
/// path of a build machine, and every relative markdown link of README.md and docs/*.md points to an existing file.
/// Runs only from a source checkout (the folder with NativePeft.sln above the test assembly); the GPU bundle has no
/// sources, so there it is ignored.
/// </summary>
public class DocsTests
{
    private static readonly string[] SkippedFolders = ["bin", "obj", "build", ".git"];

    // Built from pieces so that this file's own text does not match them.
    private static readonly Regex DocsCitation = new(@"(?<![A-Za-z0-9_./-])" + "docs" + @"/([A-Za-z0-9_.-]+\.md)\b");
    private static readonly Regex OutsideCitation = new(
        @"(?<![A-Za-z0-9_-])" + "no" + @"tes/[A-Za-z0-9_.-]+"           // a notes folder the repository does not have
        + @"|(\.\./)+" + "sha" + @"red/"                               // the folder beside the checkout
        + @"|(?<![A-Za-z0-9_-])" + "sha" + @"red/(reference|DESIGN)"   // ... cited without the ../
        + @"|(?<![A-Za-z0-9_.~-])/" + "wo" + @"rk/"                    // absolute paths of the build machines
        + @"|(?<![A-Za-z0-9_.~-])/" + "ho" + @"me/");
    private static readonly Regex MarkdownLink = new(@"\[[^\]\n]*\]\(([^)\s]+)(\s+""[^""]*"")?\)");

    private static string? RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "NativePeft.sln")))
                return dir.FullName;
        return null;
    }

    private static string Root() =>
        RepoRoot() ?? throw new IgnoreException("not in a source checkout (no NativePeft.sln above the tests): no sources to scan");

    private static IEnumerable<string> Files(string root, string folder, params string[] extensions)
    {
        var start = Path.Combine(root, folder);
        if (!Directory.Exists(start)) yield break;
        var pending = new Stack<string>([start]);
        while (pending.Count > 0)
        {
            var dir = pending.Pop();
            foreach (var sub in Directory.GetDirectories(dir))
                if (!SkippedFolders.Contains(Path.GetFileName(sub)))
                    pending.Push(sub);
            foreach (var file in Directory.GetFiles(dir))
                if (extensions.Any(e => file.EndsWith(e, StringComparison.Ordinal)))
                    yield return file;
        }
    }

    /// <summary>Source, build and documentation files the scan covers, as repository-relative paths.</summary>
    private static List<string> ScannedFiles(string root)
    {
        var files = new List<string>();
        files.AddRange(Files(root, "src", ".cs"));
        files.AddRange(Files(root, "samples", ".cs"));
        files.AddRange(Files(root, "kernels", ".cu", ".cuh", ".cpp", ".h"));
        files.AddRange(Files(root, "tests", ".cs", ".py"));
        files.AddRange(Files(root, "cmake", ".cmake"));
        files.AddRange(Files(root, "docs", ".md"));
        foreach (var name in new[] { "build.sh", "build.ps1", "CMakeLists.txt", "README.md" })
            if (File.Exists(Path.Combine(root, name)))
                files.Add(Path.Combine(root, name));
        var self = Path.Combine("tests", "NativePeft.Tests", "DocsTests.cs");
        return files.Select(f => Path.GetRelativePath(root, f))
            .Where(f => f != self)
            .OrderBy(f => f, StringComparer.Ordinal)
            .ToList();
    }

    private static IEnumerable<(int Line, string Text)> Lines(string path)
    {
        int n = 0;
        foreach (var line in File.ReadLines(path))
            yield return (++n, line);
    }

    [Test]
    public void ScanCoversTheSourcesAndTheDocs()
    {
        var root = Root();
        var files = ScannedFiles(root);
        Assert.That(files, Has.Member("README.md"));
        Assert.That(files, Has.Member(Path.Combine("kernels", "common.cuh")));
        Assert.That(files, Has.Member(Path.Combine("src", "NativePeft", "Ops", "IOps.cs")));
        Assert.That(files, Has.Member(Path.Combine("docs", "design.md")));
        Assert.That(files.Any(f => f.Split(Path.DirectorySeparatorChar).Any(SkippedFolders.Contains)), Is.False);
    }

    [Test]
    public void EveryCitedDocsFileExists()
    {
        var root = Root();
        var missing = new StringBuilder();
        foreach (var file in ScannedFiles(root))
            foreach (var (line, text) in Lines(Path.Combine(root, file)))
                foreach (Match m in DocsCitation.Matches(text))
                    if (!File.Exists(Path.Combine(root, "docs", m.Groups[1].Value)))
                        missing.AppendLine($"{file}:{line}: cites docs/{m.Groups[1].Value}, which does not exist");
        Assert.That(missing.ToString(), Is.Empty);
    }

    [Test]
    public void NothingCitesFilesOutsideTheRepository()
    {
        var root = Root();
        var found = new StringBuilder();
        foreach (var file in ScannedFiles(root))
            foreach (var (line, text) in Lines(Path.Combine(root, file)))
                foreach (Match m in OutsideCitation.Matches(text))
                    found.AppendLine($"{file}:{line}: cites '{m.Value}', outside the repository: {text.Trim()}");
        Assert.That(found.ToString(), Is.Empty);
    }

    [Test]
    public void EveryRelativeMarkdownLinkPointsToAFile()
    {
        var root = Root();
        var docs = new List<string> { "README.md" };
        docs.AddRange(Files(root, "docs", ".md").Select(f => Path.GetRelativePath(root, f)));
        var broken = new StringBuilder();
        int links = 0;
        foreach (var doc in docs)
        {
            var dir = Path.GetDirectoryName(Path.Combine(root, doc))!;
            bool fenced = false;
            foreach (var (line, raw) in Lines(Path.Combine(root, doc)))
            {
                if (raw.TrimStart().StartsWith("```", StringComparison.Ordinal)) { fenced = !fenced; continue; }
                if (fenced) continue;
                var text = Regex.Replace(raw, "`[^`]*`", "``"); // code spans are not links
                foreach (Match m in MarkdownLink.Matches(text))
                {
                    var target = m.Groups[1].Value;
                    if (target.StartsWith('#') || Regex.IsMatch(target, "^[A-Za-z][A-Za-z0-9+.-]*:")) continue; // anchor, URL
                    var path = Uri.UnescapeDataString(target.Split('#')[0]);
                    links++;
                    if (!File.Exists(Path.Combine(dir, path)) && !Directory.Exists(Path.Combine(dir, path)))
                        broken.AppendLine($"{doc}:{line}: link to '{target}', which does not exist");
                }
            }
        }
        Assert.That(broken.ToString(), Is.Empty);
        Assert.That(links, Is.GreaterThan(0), "the scan found no relative links at all: the link pattern is broken");
    }
}
