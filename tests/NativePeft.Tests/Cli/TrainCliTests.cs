using System.Text.Json;
using NativePeft.IO;
using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>`nativepeft train` end to end on a tiny checkpoint written here (hidden 32, 2 layers, byte vocabulary), run as a process.</summary>
[Parallelizable(ParallelScope.None)]
public class TrainCliTests
{
    internal static string WriteModel(TempDir dir)
    {
        HfCheckpoint.Write(dir["model"], TrainingKit.Config, TrainingKit.RandomTensors(), long.MaxValue);
        return dir["model"];
    }

    /// <summary>12 pre-tokenized lines of byte ids, 8..30 tokens each.</summary>
    internal static string WriteData(TempDir dir, string? badLine3 = null)
    {
        var rng = new Random(2);
        var lines = Enumerable.Range(0, 12).Select(_ =>
            "{\"input_ids\": [" + string.Join(", ", Enumerable.Range(0, rng.Next(8, 31)).Select(_ => rng.Next(97, 123))) + "]}").ToList();
        if (badLine3 is not null) lines[2] = badLine3;
        File.WriteAllLines(dir["data.jsonl"], lines);
        return dir["data.jsonl"];
    }

    /// <summary>train with small defaults; <paramref name="extra"/> adds options or overrides a default (an option followed by its value, or a flag).</summary>
    internal static string[] Args(string model, string data, string output, params string[] extra)
    {
        var defaults = new Dictionary<string, string> { ["--rank"] = "4", ["--alpha"] = "8", ["--batch"] = "2", ["--seq"] = "32", ["--lr"] = "1e-2" };
        if (extra.Contains("full")) { defaults.Remove("--rank"); defaults.Remove("--alpha"); } // full fine-tuning refuses the LoRA options
        var args = new List<string> { "train", "--model", model, "--data", data, "--out", output };
        for (int i = 0; i < extra.Length; i++)
        {
            bool hasValue = i + 1 < extra.Length && !extra[i + 1].StartsWith("--", StringComparison.Ordinal);
            if (hasValue) { defaults.Remove(extra[i]); args.Add(extra[i]); args.Add(extra[++i]); }
            else args.Add(extra[i]);
        }
        foreach (var (k, v) in defaults) { args.Add(k); args.Add(v); }
        return args.ToArray();
    }

    private static double[] Losses(string outDir)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "metrics.json")));
        return doc.RootElement.GetProperty("steps").EnumerateArray().Select(s => s.GetProperty("loss").GetDouble()).ToArray();
    }

    [Test]
    public void LoraTrainsWritesALoadableAdapterAndResumes()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir);
        var r = CliProcess.Run(Args(model, data, dir["out"], "--steps", "4", "--save-every", "2", "--grad-accum", "2", "--dropout", "0.1"));
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("step 1/4").And.Contain("step 4/4").And.Contain("tok/s"));

        var adapter = PeftAdapter.Load(Path.Combine(dir["out"], "adapter"));
        Assert.That(adapter.Config.R, Is.EqualTo(4));
        Assert.That(adapter.Config.TargetModules, Has.Count.EqualTo(7));
        Assert.That(adapter.Modules, Has.Count.EqualTo(7 * 2));
        Assert.That(adapter.Modules.Any(m => m.B.Any(v => v != 0)), "lora_B moved away from zero");
        Assert.That(Directory.Exists(Path.Combine(dir["out"], "checkpoint-2")) && Directory.Exists(Path.Combine(dir["out"], "checkpoint-4")));
        var losses = Losses(dir["out"]);
        Assert.That(losses, Has.Length.EqualTo(4));
        Assert.That(losses, Has.All.GreaterThan(0));

        var resumed = CliProcess.Run(Args(model, data, dir["out2"], "--steps", "4", "--save-every", "2", "--grad-accum", "2", "--dropout", "0.1",
            "--resume", Path.Combine(dir["out"], "checkpoint-2")));
        Assert.That(resumed.ExitCode, Is.EqualTo(0), resumed.ToString());
        Assert.That(resumed.Stdout, Does.Contain("resumed at step 2").And.Not.Contain("step 1/4"));
        Assert.That(Losses(dir["out2"]), Is.EqualTo(losses), "resumed run's steps 3–4 equal the uninterrupted run's");
    }

    [Test]
    public void RecomputeGivesTheSameLossesAndTheEmulatorTheCpusWithinFp32()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir);
        var plain = CliProcess.Run(Args(model, data, dir["plain"], "--steps", "3", "--dropout", "0.1"));
        var recompute = CliProcess.Run(Args(model, data, dir["recompute"], "--steps", "3", "--dropout", "0.1", "--recompute"));
        var emulated = CliProcess.Run(Args(model, data, dir["emulated"], "--steps", "3", "--dropout", "0.1", "--device", "emulator", "--precision", "fp32"));
        foreach (var r in new[] { plain, recompute, emulated }) Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(Losses(dir["recompute"]), Is.EqualTo(Losses(dir["plain"])), "gradient checkpointing recomputes the same values, bit for bit");
        var cpu = Losses(dir["plain"]);
        var emu = Losses(dir["emulated"]);
        for (int i = 0; i < cpu.Length; i++)
            Assert.That(emu[i], Is.EqualTo(cpu[i]).Within(1e-4 * cpu[i]), $"step {i + 1}: the kernels on the emulator vs the CPU reference");
    }

    [Test]
    public void QloraFullAndBuiltin()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir);
        var q = CliProcess.Run(Args(model, data, dir["q"], "--method", "qlora", "--steps", "2", "--optim", "paged-adamw8bit"));
        Assert.That(q.ExitCode, Is.EqualTo(0), q.ToString());
        Assert.That(PeftAdapter.Load(Path.Combine(dir["q"], "adapter")).Modules, Has.Count.EqualTo(14));

        var f = CliProcess.Run(Args(model, data, dir["f"], "--method", "full", "--steps", "2", "--lr", "1e-3"));
        Assert.That(f.ExitCode, Is.EqualTo(0), f.ToString());
        using (var ck = HfCheckpoint.Open(Path.Combine(dir["f"], "model")))
            Assert.That(ck.Config.HiddenSize, Is.EqualTo(32));

        var b = CliProcess.Run(["train", "--model", model, "--data", "builtin", "--rank", "4", "--batch", "4", "--seq", "32", "--steps", "2",
            "--eval-every", "2", "--eval-batches", "2", "--out", dir["b"]]);
        Assert.That(b.ExitCode, Is.EqualTo(0), b.ToString());
        Assert.That(b.Stdout, Does.Contain("exact match"));
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["b"], "metrics.json")));
        var eval = doc.RootElement.GetProperty("eval").EnumerateArray().Single();
        Assert.That(eval.GetProperty("exact_match").GetDouble(), Is.InRange(0, 1));
        Assert.That(doc.RootElement.GetProperty("config").GetProperty("data").GetString(), Is.EqualTo("builtin"));

        // the loss plot, as compare writes one: a PNG of the plot's size, named on the output
        string plot = Path.Combine(dir["b"], "loss.png");
        Assert.That(b.Stdout, Does.Contain("plot:    " + plot));
        byte[] png = File.ReadAllBytes(plot);
        Assert.That(png[..8], Is.EqualTo(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }), "PNG signature");
        int width = (png[16] << 24) | (png[17] << 16) | (png[18] << 8) | png[19], height = (png[20] << 24) | (png[21] << 16) | (png[22] << 8) | png[23];
        Assert.That((width, height), Is.EqualTo((900, 560)), "the IHDR size");
    }

    [Test]
    public void PackTrainsTheBuiltinModelOnFullerRows()
    {
        // --pack: several built-in problems per 64-token row (each its own document); the same 2 steps padded carry one
        // problem (16 to 20 tokens) per row, so the packed steps see about three times the tokens.
        using var dir = CliProcess.TempDir();
        string[] Common(string output) =>
            ["train", "--model", "builtin", "--data", "builtin", "--rank", "4", "--batch", "4", "--seq", "64", "--steps", "2",
             "--dropout", "0", "--out", output];
        var packed = CliProcess.Run([.. Common(dir["packed"]), "--pack"]);
        Assert.That(packed.ExitCode, Is.EqualTo(0), packed.ToString());
        Assert.That(packed.Stdout, Does.Contain("×64 packed"));
        var padded = CliProcess.Run(Common(dir["padded"]));
        Assert.That(padded.ExitCode, Is.EqualTo(0), padded.ToString());

        using var p = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["packed"], "metrics.json")));
        using var q = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["padded"], "metrics.json")));
        Assert.That(p.RootElement.GetProperty("config").GetProperty("batch_mode").GetString(), Is.EqualTo("packing"));
        Assert.That(q.RootElement.GetProperty("config").GetProperty("batch_mode").GetString(), Is.EqualTo("padding"));
        long Tokens(JsonDocument d) => d.RootElement.GetProperty("steps").EnumerateArray().Sum(s => s.GetProperty("tokens").GetInt64());
        Assert.That(Tokens(p), Is.GreaterThan(2 * Tokens(q)));
        Assert.That(Losses(dir["packed"]), Has.All.Matches<double>(double.IsFinite));
        Assert.That(Directory.Exists(Path.Combine(dir["packed"], "adapter")), Is.True);
    }

    private static void AssertFails(TempDir dir, string[] args, params string[] messageParts)
    {
        var r = CliProcess.Run(args);
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        foreach (var part in messageParts) Assert.That(r.Stderr, Does.Contain(part), r.ToString());
        Assert.That(r.Stderr.Trim().Split('\n'), Has.Length.LessThanOrEqualTo(2), "one clear message, no stack trace");
        Assert.That(Directory.Exists(dir["out"]), Is.False, "no partial output folder");
    }

    [Test]
    public void BadInputGivesOneMessageAndNoOutputFolder()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir);
        Directory.CreateDirectory(dir["empty"]);
        AssertFails(dir, Args(dir["empty"], data, dir["out"], "--steps", "1"), "--model", "config.json");
        AssertFails(dir, Args(model, dir["missing.jsonl"], dir["out"], "--steps", "1"), "--data", "missing.jsonl");
        AssertFails(dir, Args(model, data, dir["out"], "--steps", "1", "--targets", "q_proj,qq_proj"), "--targets", "qq_proj");
        AssertFails(dir, Args(model, data, dir["out"], "--steps", "1", "--rank", "0"), "--rank 0");
        AssertFails(dir, Args(model, data, dir["out"], "--steps", "1", "--rank", "64"), "--rank 64");
        AssertFails(dir, Args(model, data, dir["out"], "--steps", "1", "--method", "dora"), "--method dora");
        AssertFails(dir, Args(model, data, dir["out"], "--steps", "1", "--optim", "sgd"), "--optim sgd");
        string bad = WriteData(dir, badLine3: "{\"input_ids\": [1, 2, \"x\"]}");
        AssertFails(dir, Args(model, bad, dir["out"], "--steps", "1"), "data.jsonl:3");
    }

    [Test]
    public void DivergenceNamesTheStepAndExitsNonZero()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir);
        var r = CliProcess.Run(Args(model, data, dir["out"], "--steps", "6", "--lr", "1e30", "--max-grad-norm", "0", "--schedule", "constant"));
        Assert.That(r.ExitCode, Is.EqualTo(3), r.ToString());
        Assert.That(r.Stderr, Does.Match(@"error: step \d: the (loss|gradient norm) is"));
    }
}
