using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;
using NativePeft.Cli.Commands;
using NativePeft.Modules;
using NativePeft.Planning;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// tests/reference/train_peer.py, the peer of `bench --model`, where no GPU, torch or transformers is needed: its
/// shapes and FLOP convention agree with ours (--dry-run), and it reads the JSON `bench --model --json FILE` writes
/// (--compare). Skipped where python3 is not installed.
/// </summary>
public class TrainPeerScriptTests
{
    private static string Script()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            foreach (var candidate in new[] { Path.Combine(dir.FullName, "tests", "reference", "train_peer.py"), Path.Combine(dir.FullName, "train_peer.py") })
                if (File.Exists(candidate)) return candidate;
        }
        Assert.Ignore("train_peer.py not found above " + AppContext.BaseDirectory);
        return "";
    }

    private static (int ExitCode, string Output) Python(params string[] args)
    {
        var psi = new ProcessStartInfo("python3") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.Environment["PYTHONDONTWRITEBYTECODE"] = "1";
        psi.ArgumentList.Add(Script());
        foreach (var a in args) psi.ArgumentList.Add(a);
        Process p;
        try { p = Process.Start(psi)!; }
        catch (System.ComponentModel.Win32Exception) { Assert.Ignore("python3 not found"); return (0, ""); }
        using (p)
        {
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(TimeSpan.FromSeconds(60)))
            {
                p.Kill(entireProcessTree: true);
                Assert.Fail("train_peer.py did not finish in 60 s");
            }
            return (p.ExitCode, stdout.Result + stderr.Result);
        }
    }

    [TestCase("llama3-1b", null)]
    [TestCase("llama3-8b", null)]
    [TestCase("llama3-70b", 2)]
    [TestCase("tiny", null)]
    public void DryRunHasOurParameterCountAndFlops(string model, int? layers)
    {
        var args = new List<string> { "--dry-run", "--model", model, "--batch", "2", "--seq", "512", "--rank", "8" };
        if (layers is { } n) args.AddRange(["--layers", n.ToString(CultureInfo.InvariantCulture)]);
        var (rc, output) = Python([.. args]);
        Assert.That(rc, Is.EqualTo(0), output);
        var config = ModelBench.Shape(model).Config;
        if (layers is { } l) config = config with { NumHiddenLayers = l };
        Assert.That(output, Does.Contain($"({config.NumHiddenLayers} layers, {config.ParameterCount().ToString("N0", CultureInfo.InvariantCulture)} parameters)"), output);
        var flops = Regex.Match(output, @"^lora: (\d+) FLOP per step", RegexOptions.Multiline);
        Assert.That(flops.Success, Is.True, output);
        Assert.That(double.Parse(flops.Groups[1].Value, CultureInfo.InvariantCulture),
            Is.EqualTo(TrainingFlops.PerStep(config, 2, 512, 8, LoraSettings.KnownTargets)).Within(1e-12).Percent, output);
    }

    [Test]
    public void ABadLayerCountNamesTheOption()
    {
        var (rc, output) = Python("--dry-run", "--model", "llama3-1b", "--layers", "17");
        Assert.That(rc, Is.EqualTo(2), output);
        Assert.That(output, Does.Contain("--layers 17: expected 1 to 16 (the layers of llama3-1b)"), output);
    }

    [Test]
    public void CompareReadsOurJsonAndPrintsOursOverPeer()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run("bench", "--model", "tiny", "--layers", "1", "--batch", "1", "--seq", "16", "--method", "lora", "--steps", "1",
            "--device", "cpu", "--json", dir["ours.json"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var ours = JsonDocument.Parse(File.ReadAllText(dir["ours.json"]));
        var row = ours.RootElement.GetProperty("rows")[0];
        double tokens = row.GetProperty("tokens_per_second").GetDouble();
        long peak = row.GetProperty("peak_bytes").GetInt64();
        // A peer half as fast with four times the peak memory: ours/peer is 2 for tokens/s and 0.25 for the peak.
        File.WriteAllText(dir["peer.json"], JsonSerializer.Serialize(new
        {
            implementation = "test", device = "cpu",
            rows = new[] { new { method_id = "lora", ms_per_step = 2 * row.GetProperty("ms_per_step").GetDouble(), tokens_per_second = tokens / 2, peak_bytes = 4 * peak } },
        }));
        var (rc, output) = Python("--compare", dir["ours.json"], dir["peer.json"]);
        Assert.That(rc, Is.EqualTo(0), output);
        Assert.That(output, Does.Contain("headline: tiny x1 layers 1x16: lora tokens/s ours/peer 2.00"), output);
        Assert.That(output, Does.Contain("peak 0.25"), output);
    }
}
