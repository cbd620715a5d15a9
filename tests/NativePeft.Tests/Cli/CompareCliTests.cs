using System.Buffers.Binary;
using System.Text.Json;
using NativePeft.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>`nativepeft compare` end to end, in-process (Program.Run), on the built-in model and task.</summary>
[Parallelizable(ParallelScope.None)]
public class CompareCliTests
{
    private static (int Exit, string Stdout, string Stderr) Cli(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int exit = Program.Run(args, stdout, stderr);
        return (exit, stdout.ToString(), stderr.ToString());
    }

    /// <summary>Parameter counts of the built-in model from its config.json alone (not from the code under test).</summary>
    private static (long Linear, long Other, long PerLayerLoraR1, long QloraLinearBytes) CountFromConfig()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(BuiltinModel.Directory, "config.json")));
        var c = doc.RootElement;
        long H = c.GetProperty("hidden_size").GetInt64(), I = c.GetProperty("intermediate_size").GetInt64(), V = c.GetProperty("vocab_size").GetInt64();
        long L = c.GetProperty("num_hidden_layers").GetInt64(), heads = c.GetProperty("num_attention_heads").GetInt64();
        long kv = c.GetProperty("num_key_value_heads").GetInt64(), hd = c.GetProperty("head_dim").GetInt64();
        Assert.That(c.GetProperty("tie_word_embeddings").GetBoolean(), Is.False);
        // q, k, v, o, gate, up, down as (in, out)
        (long In, long Out)[] proj = [(H, heads * hd), (H, kv * hd), (H, kv * hd), (heads * hd, H), (H, I), (H, I), (I, H)];
        long linear = L * proj.Sum(p => p.In * p.Out);
        long other = V * H /* embed_tokens */ + V * H /* lm_head */ + L * 2 * H /* two norms */ + H /* final norm */;
        long loraR1 = proj.Sum(p => p.In + p.Out); // A is [r, in], B is [out, r]
        // QLoRA's device bytes per projection of n weights (docs/quant-contract.md, bitsandbytes' double quant at blocksize 64): the
        // packed codes n/2, one U8 absmax code per block of 64, an fp32 nested absmax per 256 blocks, the fp32 256-entry
        // nested code and the fp32 offset.
        long qlora = L * proj.Sum(p =>
        {
            long n = p.In * p.Out, blocks = (n + 63) / 64;
            return (n + 1) / 2 + blocks + (blocks + 255) / 256 * 4 + 256 * 4 + 4;
        });
        return (linear, other, L * loraR1, qlora);
    }

    [Test]
    public void CompareWritesReportMetricsAndPlotWhoseNumbersAgree()
    {
        using var dir = CliProcess.TempDir();
        string outDir = dir["cmp"];
        var r = Cli("compare", "--steps", "150", "--lr", "3e-3", "--warmup", "15", "--exact-match-samples", "50", "--out", outDir);
        Assert.That(r.Exit, Is.EqualTo(0), r.Stdout + r.Stderr);
        Assert.That(r.Stdout, Does.Contain("LoRA    step 150/150").And.Contain("QLoRA   step 15/150"), "progress lines while training");
        foreach (var f in new[] { "report.md", "metrics.json", "compare.png" })
        {
            Assert.That(File.Exists(Path.Combine(outDir, f)), f);
            Assert.That(r.Stdout, Does.Contain(Path.Combine(outDir, f)), "says where " + f + " is");
        }

        // compare.png is a PNG of the stated size: signature, then the IHDR chunk with width and height (big-endian).
        byte[] png = File.ReadAllBytes(Path.Combine(outDir, "compare.png"));
        Assert.That(png[..8], Is.EqualTo(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }));
        Assert.That(System.Text.Encoding.ASCII.GetString(png, 12, 4), Is.EqualTo("IHDR"));
        Assert.That(BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(16)), Is.EqualTo(1400));
        Assert.That(BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(20)), Is.EqualTo(560));
        Assert.That(png.Length, Is.GreaterThan(10_000), "a drawn plot, not an empty image");

        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "metrics.json")));
        var root = doc.RootElement;
        var methods = root.GetProperty("methods").EnumerateArray().ToDictionary(m => m.GetProperty("method").GetString()!);
        Assert.That(methods.Keys, Is.EquivalentTo(new[] { "full", "lora", "qlora" }));
        foreach (var (name, m) in methods)
        {
            var steps = m.GetProperty("steps").EnumerateArray().ToList();
            Assert.That(steps.Select(s => s.GetProperty("step").GetInt32()), Is.EqualTo(Enumerable.Range(1, 150)), name);
            Assert.That(steps.All(s => s.GetProperty("loss").GetDouble() > 0 && s.GetProperty("tokens_per_second").GetDouble() > 0
                && s.GetProperty("pool_peak_bytes").GetInt64() > 0 && s.TryGetProperty("lr", out _)), name);
            if (OperatingSystem.IsLinux())
                Assert.That(steps.All(s => s.GetProperty("rss_bytes").ValueKind == JsonValueKind.Number && s.GetProperty("rss_bytes").GetInt64() > 0), name + ": RSS after every step");
            // warmup 15 then cosine to 0 (transformers' schedule): step 1 has lr 0, step 16 the peak: --lr 3e-3 for LoRA
            // and QLoRA, half of it for full fine-tuning (its default --lr-full, docs/compare.md "The defaults")
            Assert.That(steps[0].GetProperty("lr").GetDouble(), Is.EqualTo(0));
            Assert.That(steps[15].GetProperty("lr").GetDouble(), Is.EqualTo(name == "full" ? 1.5e-3 : 3e-3).Within(1e-12), name);
            Assert.That(m.GetProperty("lr").GetDouble(), Is.EqualTo(name == "full" ? 1.5e-3 : 3e-3).Within(1e-12), name);
            double before = m.GetProperty("eval_before").GetProperty("loss").GetDouble(), after = m.GetProperty("eval_after").GetProperty("loss").GetDouble();
            Assert.That(after, Is.LessThan(before * 0.5), name + ": fine-tuning lowers the eval loss");
            // the adapter (or model) size is what is on disk
            string path = m.GetProperty("adapter_path").GetString()!;
            long onDisk = Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories).Sum(f => new FileInfo(f).Length);
            Assert.That(m.GetProperty("adapter_bytes").GetInt64(), Is.EqualTo(onDisk), name);
            Assert.That(m.GetProperty("pool_peak_bytes").GetInt64(), Is.GreaterThanOrEqualTo(m.GetProperty("base_weight_bytes").GetInt64()), name);
        }
        Assert.That(root.GetProperty("settings").GetProperty("lr_full").GetDouble(), Is.EqualTo(1.5e-3).Within(1e-12), "full FT's own default rate");
        Assert.That(r.Stdout, Does.Contain("lr 0.003 (full FT 0.0015)"), "the settings line names both rates");
        var lora = methods["lora"];
        Assert.That(lora.GetProperty("eval_after").GetProperty("exact_match").GetDouble(),
            Is.GreaterThan(lora.GetProperty("eval_before").GetProperty("exact_match").GetDouble()), "LoRA's exact match rises");
        Assert.That(lora.GetProperty("relative_speed").GetDouble(), Is.EqualTo(1.0), "LoRA is the speed reference");

        // Base-weight bytes from the config alone: full = fp32 everything; LoRA = bf16 linear + fp32 rest;
        // QLoRA = 4-bit linear with its double-quantized absmax + fp32 rest.
        var (linear, other, loraR1, qloraLinear) = CountFromConfig();
        long fullBytes = 4 * (linear + other), loraBytes = 2 * linear + 4 * other, qloraBytes = qloraLinear + 4 * other;
        Assert.That(methods["full"].GetProperty("base_weight_bytes").GetInt64(), Is.EqualTo(fullBytes));
        Assert.That(lora.GetProperty("base_weight_bytes").GetInt64(), Is.EqualTo(loraBytes));
        Assert.That(methods["qlora"].GetProperty("base_weight_bytes").GetInt64(), Is.EqualTo(qloraBytes));
        Assert.That(qloraBytes, Is.LessThan(loraBytes).And.LessThan(fullBytes));
        Assert.That(loraBytes, Is.LessThan(fullBytes));
        Assert.That(root.GetProperty("base").GetProperty("parameters").GetInt64(), Is.EqualTo(linear + other));
        Assert.That(linear + other, Is.EqualTo(804_736), "docs/builtin-model.md's count");
        Assert.That(lora.GetProperty("trainable_parameters").GetInt64(), Is.EqualTo(16 * loraR1), "r 16 on all seven projections");
        Assert.That(methods["full"].GetProperty("trainable_parameters").GetInt64(), Is.EqualTo(linear + other));
        Assert.That(lora.GetProperty("trainable_share").GetDouble(), Is.EqualTo(16.0 * loraR1 / (linear + other + 16 * loraR1)).Within(1e-12));

        // The printed table and report.md show the numbers of metrics.json.
        string report = File.ReadAllText(Path.Combine(outDir, "report.md"));
        foreach (var (name, m) in methods)
        {
            string label = name switch { "full" => "full FT", "lora" => "LoRA", _ => "QLoRA" };
            var row = report.Split('\n').Single(l => l.StartsWith($"| {label} |", StringComparison.Ordinal)).Split('|').Select(c => c.Trim()).ToArray();
            Assert.That(row[5], Is.EqualTo(m.GetProperty("tokens_per_second").GetDouble().ToString("F0", System.Globalization.CultureInfo.InvariantCulture)), name + " tokens/s");
            Assert.That(row[8], Is.EqualTo(m.GetProperty("eval_after").GetProperty("loss").GetDouble().ToString("F4", System.Globalization.CultureInfo.InvariantCulture)), name + " eval loss");
            Assert.That(row[10], Is.EqualTo(m.GetProperty("trainable_parameters").GetInt64().ToString("N0", System.Globalization.CultureInfo.InvariantCulture)), name + " trainable");
            Assert.That(r.Stdout, Does.Contain(row[8]).And.Contain(row[10]));
        }
        Assert.That(report, Does.Contain("model name").Or.Contain("logical cores"), "names the machine");
    }

    [Test]
    public void BadInputGivesOneMessageAndLeavesNoOutputFolder()
    {
        using var dir = CliProcess.TempDir();
        string outDir = dir["out"];
        void Fails(string[] args, params string[] parts)
        {
            var r = Cli(args);
            Assert.That(r.Exit, Is.Not.EqualTo(0), r.Stdout + r.Stderr);
            foreach (var p in parts) Assert.That(r.Stderr, Does.Contain(p), r.Stderr);
            Assert.That(r.Stderr.Trim().Split('\n'), Has.Length.LessThanOrEqualTo(2), "one clear message");
            Assert.That(Directory.Exists(outDir), Is.False, "no output folder");
        }
        Fails(["compare", "--methods", "full,dora", "--out", outDir], "--methods dora");
        Fails(["compare", "--bogus", "--out", outDir], "--bogus");
        Directory.CreateDirectory(dir["empty-model"]);
        Fails(["compare", "--model", dir["empty-model"], "--out", outDir], "--model", "config.json");
        Fails(["compare", "--rank", "0", "--out", outDir], "--rank 0");
        Fails(["compare", "--data", dir["missing.jsonl"], "--out", outDir], "--data", "missing.jsonl");

        // a data line that is not valid JSON: stop names file and line; skip leaves it out and says so
        var lines = Enumerable.Range(0, 8).Select(i => "{\"input_ids\": [256, " + string.Join(", ", Enumerable.Range(97 + i, 10)) + ", 257]}").ToList();
        lines[2] = "{\"input_ids\": [1, 2,";
        File.WriteAllLines(dir["data.jsonl"], lines);
        File.WriteAllLines(dir["eval.jsonl"], lines.Where((_, i) => i != 2));
        Fails(["compare", "--data", dir["data.jsonl"], "--eval-data", dir["eval.jsonl"], "--out", outDir], "data.jsonl:3", "invalid JSON");
        var skip = Cli("compare", "--data", dir["data.jsonl"], "--eval-data", dir["eval.jsonl"], "--on-bad-line", "skip", "--methods", "lora",
            "--steps", "2", "--batch", "2", "--out", outDir);
        Assert.That(skip.Exit, Is.EqualTo(0), skip.Stdout + skip.Stderr);
        Assert.That(skip.Stdout, Does.Contain("skipped 1 bad data line").And.Contain("data.jsonl:3"));
        Assert.That(File.Exists(Path.Combine(outDir, "report.md")));

        // a non-empty --out: refused, its content untouched, nothing added
        Fails2(["compare", "--out", outDir]);
        void Fails2(string[] args)
        {
            var before = Directory.EnumerateFileSystemEntries(outDir, "*", SearchOption.AllDirectories).Order().ToList();
            var r = Cli(args);
            Assert.That(r.Exit, Is.Not.EqualTo(0));
            Assert.That(r.Stderr, Does.Contain("--out").And.Contain("not empty"));
            Assert.That(Directory.EnumerateFileSystemEntries(outDir, "*", SearchOption.AllDirectories).Order().ToList(), Is.EqualTo(before));
        }
    }

    [Test]
    public void TheDefaultsAreTheMeasuredOnesAndFullFineTuningRunsAtHalfOfLrUnlessLrFullIsGiven()
    {
        // docs/compare.md "The defaults": 500 steps, warmup 30, lr 2e-3 (full FT 1e-3) learned the task on 29 of 30
        // runs of seeds 0-9, where 300 steps, warmup 15 and lr 3e-3 for all left 10 of 22 between 0 % and 90 %
        var d = new NativePeft.Cli.Commands.CompareCommand.Args();
        Assert.That((d.Steps, d.Warmup, d.Lr, d.FullLr), Is.EqualTo((500, 30, 2e-3, 1e-3)));
        Assert.That(new NativePeft.Cli.Commands.CompareCommand.Args { Lr = 6e-4 }.FullLr, Is.EqualTo(3e-4).Within(1e-18));
        Assert.That(new NativePeft.Cli.Commands.CompareCommand.Args { Lr = 6e-4, LrFull = 5e-3 }.FullLr, Is.EqualTo(5e-3));
    }

    /// <summary>
    /// compare's defaults learn the built-in task whatever the seed (issue 14 item 2). With the former defaults (300 steps,
    /// warmup 15, lr 3e-3 for every method) seed 1 ended at full FT / LoRA / QLoRA 59 / 1 / 1 % exact match and seed 2
    /// at 79 / 77 / 80 % on this machine's CPU (and full FT at seed 0 at 59 % on the emulator in bf16, 66 % on an H200);
    /// with today's, 100 % for every method on both (and on seeds 0-9 but QLoRA at seed 8, 71 %: docs/compare.md "The
    /// defaults"). 95 % leaves room for another machine's BLAS; the failing runs were 15 points or more below it.
    /// </summary>
    [TestCase(1)]
    [TestCase(2)]
    public void EveryMethodLearnsTheTaskWithTheDefaultsOnSeedsThatFailedBefore(int seed)
    {
        using var dir = CliProcess.TempDir();
        int exit = NativePeft.Cli.Commands.CompareCommand.Run(
            new NativePeft.Cli.Commands.CompareCommand.Args { Seed = seed, Out = dir["out"] }, new StringWriter());
        Assert.That(exit, Is.EqualTo(0));
        using var metrics = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["out"], "metrics.json")));
        foreach (var m in metrics.RootElement.GetProperty("methods").EnumerateArray())
            Assert.That(m.GetProperty("eval_after").GetProperty("exact_match").GetDouble(), Is.GreaterThanOrEqualTo(0.95),
                $"{m.GetProperty("method").GetString()}, seed {seed}");
    }

    [Test]
    public void PackRunsEveryMethodOnPackedRowsAndSaysSo()
    {
        using var dir = CliProcess.TempDir();
        string outDir = dir["out"];
        var r = Cli("compare", "--methods", "lora,qlora", "--steps", "2", "--batch", "4", "--seq", "64", "--pack", "--exact-match-samples", "1",
            "--out", outDir);
        Assert.That(r.Exit, Is.EqualTo(0), r.Stdout + r.Stderr);
        Assert.That(r.Stdout, Does.Contain("x seq 64 packed"));
        Assert.That(File.ReadAllText(Path.Combine(outDir, "report.md")), Does.Contain("seq 64 (packed rows)"));
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "metrics.json")));
        Assert.That(doc.RootElement.GetProperty("settings").GetProperty("pack").GetBoolean(), Is.True);
        using var lora = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "lora", "metrics.json")));
        Assert.That(lora.RootElement.GetProperty("config").GetProperty("batch_mode").GetString(), Is.EqualTo("packing"));
    }

    [Test]
    public void AnInterruptedCompareRemovesItsOutputFolder()
    {
        using var dir = CliProcess.TempDir();
        using var cts = new CancellationTokenSource();
        cts.Cancel();
        var e = Assert.Throws<CliException>(() =>
            NativePeft.Cli.Commands.CompareCommand.Run(new NativePeft.Cli.Commands.CompareCommand.Args { Steps = 2, Out = dir["out"] }, new StringWriter(), cts.Token))!;
        Assert.That(e.ExitCode, Is.EqualTo(130));
        Assert.That(e.Message, Does.Contain("interrupted"));
        Assert.That(Directory.Exists(dir["out"]), Is.False, "the folder it created is gone");
    }

    /// <summary>A writer that cancels when a line contains <paramref name="trigger"/> (Ctrl-C while that is printed).</summary>
    private sealed class CancelOnLine(CancellationTokenSource cts, string trigger) : StringWriter
    {
        public override void WriteLine(string? value)
        {
            base.WriteLine(value);
            if (value is not null && value.Contains(trigger, StringComparison.Ordinal)) cts.Cancel();
        }
    }

    [Test]
    public void CtrlCAfterAMethodFinishedKeepsItsReport()
    {
        // Interrupted during QLoRA's steps: LoRA's folder and a report of LoRA stay, QLoRA's partial folder goes.
        using var dir = CliProcess.TempDir();
        using var cts = new CancellationTokenSource();
        var output = new CancelOnLine(cts, "  QLoRA   step");
        var e = Assert.Throws<CliException>(() => NativePeft.Cli.Commands.CompareCommand.Run(
            new NativePeft.Cli.Commands.CompareCommand.Args { Methods = "lora,qlora", Steps = 20, ExactMatchSamples = 2, Out = dir["out"] }, output, cts.Token))!;
        Assert.That(e.ExitCode, Is.EqualTo(130), e.Message);
        Assert.That(e.Message, Does.Contain("interrupted during QLoRA").And.Contain("kept the report of LoRA"));
        Assert.That(Directory.Exists(Path.Combine(dir["out"], "lora", "adapter")), "the finished method's adapter stays");
        Assert.That(Directory.Exists(Path.Combine(dir["out"], "qlora")), Is.False, "the interrupted method's folder is gone");
        using var metrics = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["out"], "metrics.json")));
        var methods = metrics.RootElement.GetProperty("methods").EnumerateArray().Select(m => m.GetProperty("method").GetString()).ToList();
        Assert.That(methods, Is.EqualTo(new[] { "lora" }), "the report covers the finished method");
        Assert.That(File.Exists(Path.Combine(dir["out"], "report.md")));
        Assert.That(output.ToString(), Does.Contain("the report below covers the finished method(s): LoRA"));
    }

    [Test]
    public void TrainSkipsBadLinesWhenAskedAndNamesTheLineOtherwise()
    {
        using var dir = CliProcess.TempDir();
        var lines = Enumerable.Range(0, 6).Select(i => "{\"text\": \"copy: word" + i + "\"}").ToList();
        lines.Insert(4, "not json");
        File.WriteAllLines(dir["t.jsonl"], lines);
        string[] common = ["train", "--model", "builtin", "--data", dir["t.jsonl"], "--steps", "1", "--batch", "2", "--seq", "16"];
        var stop = Cli([.. common, "--out", dir["a"]]);
        Assert.That(stop.Exit, Is.Not.EqualTo(0));
        Assert.That(stop.Stderr, Does.Contain("t.jsonl:5"));
        Assert.That(Directory.Exists(dir["a"]), Is.False);
        var skip = Cli([.. common, "--on-bad-line", "skip", "--out", dir["b"]]);
        Assert.That(skip.Exit, Is.EqualTo(0), skip.Stdout + skip.Stderr);
        Assert.That(skip.Stdout, Does.Contain("skipped 1 bad data line").And.Contain("t.jsonl:5"));
        Assert.That(Directory.Exists(Path.Combine(dir["b"], "adapter")));
    }
}
