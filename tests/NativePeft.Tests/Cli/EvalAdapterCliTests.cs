using System.Text;
using System.Text.Json;
using NativePeft.IO;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft eval --adapter DIR`: the adapter a `train` run wrote, applied unmerged, gives the loss of the checkpoint
/// `merge --dtype fp32` writes from the same adapter (two independent paths: the LoRA forward vs W + scaling·B·A
/// exported and reloaded), and differs from the base's loss; an adapter from another base is one clear error.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class EvalAdapterCliTests
{
    private TempDir _dir = null!;
    private string _adapter = null!, _data = null!;

    [OneTimeSetUp]
    public void TrainAdapter()
    {
        _dir = CliProcess.TempDir();
        var r = CliProcess.Run("train", "--model", "builtin", "--data", "builtin", "--method", "lora", "--steps", "20", "--lr", "3e-3",
            "--batch", "8", "--seq", "24", "--dropout", "0", "--targets", "q_proj,v_proj,down_proj", "--out", _dir["train"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        _adapter = Path.Combine(_dir["train"], "adapter");
        // Pre-tokenized lines of the byte-level built-in model: the UTF-8 bytes are the token ids.
        _data = _dir["eval.jsonl"];
        File.WriteAllLines(_data, new[] { "upper: table\nTABLE", "upper: quiet\nQUIET", "upper: ox\nOX" }
            .Select(t => "{\"input_ids\": [" + string.Join(", ", Encoding.UTF8.GetBytes(t)) + "]}"));
    }

    [OneTimeTearDown]
    public void Cleanup() => _dir?.Dispose();

    private static double Loss(params string[] args)
    {
        var r = CliProcess.Run(["eval", .. args, "--json"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        Assert.That(doc.RootElement.GetProperty("tokens").GetInt64(), Is.EqualTo(17 + 17 + 11), "every predicted token");
        return doc.RootElement.GetProperty("loss").GetDouble();
    }

    [Test]
    public void TheAdapterGivesTheMergedCheckpointsLoss()
    {
        double plain = Loss("--model", "builtin", "--data", _data);
        double adapted = Loss("--model", "builtin", "--adapter", _adapter, "--data", _data);
        var merge = CliProcess.Run("merge", "--model", "builtin", "--adapter", _adapter, "--dtype", "fp32", "--out", _dir["merged"]);
        Assert.That(merge.ExitCode, Is.EqualTo(0), merge.ToString());
        double merged = Loss("--model", _dir["merged"], "--data", _data);
        Assert.That(adapted, Is.EqualTo(merged).Within(1e-5 * Math.Abs(merged)), "unmerged LoRA forward = merged weights");
        Assert.That(Math.Abs(adapted - plain), Is.GreaterThan(0.1), "the trained adapter changes the loss");
        // And on the emulator's kernels (fp32): the same adapter, the same loss.
        double emulated = Loss("--model", "builtin", "--adapter", _adapter, "--data", _data, "--device", "emulator", "--precision", "fp32");
        Assert.That(emulated, Is.EqualTo(adapted).Within(1e-5 * Math.Abs(adapted)));
    }

    [Test]
    public void AnAdapterOfAnotherShapeIsOneClearError()
    {
        // The adapter's config says r = 4 while its tensors are r = 16: the loader names both.
        string bad = _dir["bad-adapter"];
        Directory.CreateDirectory(bad);
        foreach (var f in Directory.GetFiles(_adapter)) File.Copy(f, Path.Combine(bad, Path.GetFileName(f)));
        string config = Path.Combine(bad, PeftLoraConfig.FileName);
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"r\": 16", "\"r\": 4"));
        var r = CliProcess.Run("eval", "--model", "builtin", "--adapter", bad, "--data", _data);
        Assert.That(r.ExitCode, Is.Not.EqualTo(0));
        Assert.That(r.Stdout, Is.Empty);
        Assert.That(r.Stderr, Does.StartWith("error: --adapter " + bad));
        var missing = CliProcess.Run("eval", "--model", "builtin", "--adapter", _dir["nowhere"], "--data", _data);
        Assert.That(missing.ExitCode, Is.Not.EqualTo(0));
        Assert.That(missing.Stderr, Does.StartWith("error: --adapter "));
    }
}
