using System.Text.Json;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft bench --model`: a bad option is one error line naming the option and what it expects (exit 2), and one
/// real run of a cut Llama-3.2-1B shape on the CPU reference writes a JSON report with every figure (speed itself is
/// never asserted: only that the figures are consistent with each other and with the shape).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class BenchModelCliTests
{
    private static void AssertOneLineError(CliProcess.Result r, params string[] parts)
    {
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Is.Empty, r.ToString());
        foreach (var part in parts) Assert.That(r.Stderr, Does.Contain(part), r.ToString());
        Assert.That(r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries), Has.Length.EqualTo(1), "one line, no stack trace: " + r.Stderr);
    }

    [Test]
    public void AnUnknownModelListsTheValidNames()
    {
        var r = CliProcess.Run("bench", "--model", "llama3-13b", "--device", "cpu");
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        foreach (var name in new[] { "tiny", "small", "llama3-1b", "llama3-3b", "llama3-8b", "llama3-70b" })
            Assert.That(r.Stderr, Does.Contain(name), r.ToString());
        Assert.That(r.Stderr, Does.Contain("llama3-13b"), r.ToString());
    }

    [TestCase("0", "--layers 0: expected 1 to 16 (the layers of llama3-1b)")]
    [TestCase("17", "--layers 17: expected 1 to 16 (the layers of llama3-1b)")]
    public void LayersOutOfRange(string layers, string message)
    {
        var r = CliProcess.Run("bench", "--model", "llama3-1b", "--layers", layers, "--device", "cpu");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        AssertOneLineError(r, message);
    }

    [Test]
    public void SeveralBatchSizesWithModelAreRefused()
    {
        var r = CliProcess.Run("bench", "--model", "tiny", "--batch", "1", "2", "--device", "cpu");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        AssertOneLineError(r, "--batch 1 2: one value with --model");
    }

    [Test]
    public void SeveralSequenceLengthsWithModelAreRefused()
    {
        var r = CliProcess.Run("bench", "--model", "tiny", "--seq", "64", "128", "--device", "cpu");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        AssertOneLineError(r, "--seq 64 128: one value with --model");
    }

    [Test]
    public void ASequenceBeyondTheModelsPositionsIsRefused()
    {
        var r = CliProcess.Run("bench", "--model", "tiny", "--seq", "4096", "--device", "cpu");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        AssertOneLineError(r, "--seq 4096: expected 2 to 1024");
    }

    [Test]
    public void AnUnknownMethodListsTheMethods()
    {
        var r = CliProcess.Run("bench", "--model", "tiny", "--method", "dora", "--device", "cpu");
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        foreach (var part in new[] { "dora", "full", "lora", "qlora" }) Assert.That(r.Stderr, Does.Contain(part), r.ToString());
    }

    [TestCase("--layers", "2")]
    [TestCase("--rank", "8")]
    [TestCase("--method", "lora")]
    [TestCase("--steps", "2")]
    public void ModelOptionsWithoutModelAreRefused(string option, string value)
    {
        var r = CliProcess.Run("bench", "--device", "cpu", option, value);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        AssertOneLineError(r, $"{option}: only with --model");
    }

    [Test]
    public void ACutLlama3ShapeRunsOnTheCpuAndReportsEveryFigure()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run("bench", "--model", "llama3-1b", "--layers", "1", "--seq", "8", "--batch", "1", "--method", "lora",
            "--steps", "1", "--device", "cpu", "--json", dir["bench.json"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("FLOP convention: full: 6 × linear params × tokens"), "the convention is printed");
        Assert.That(r.Stdout, Does.Contain("unknown peak"), "no MFU on the CPU");

        using var doc = JsonDocument.Parse(File.ReadAllText(dir["bench.json"]));
        var root = doc.RootElement;
        Assert.Multiple(() =>
        {
            Assert.That(root.GetProperty("model").GetString(), Is.EqualTo("llama3-1b"));
            Assert.That(root.GetProperty("device_kind").GetString(), Is.EqualTo("cpu"));
            Assert.That(root.GetProperty("layers").GetInt32(), Is.EqualTo(1));
            Assert.That((root.GetProperty("batch").GetInt32(), root.GetProperty("seq").GetInt32()), Is.EqualTo((1, 8)));
            Assert.That((root.GetProperty("rank").GetInt32(), root.GetProperty("alpha").GetInt32()), Is.EqualTo((16, 32)));
            Assert.That(root.GetProperty("targets").GetArrayLength(), Is.EqualTo(7));
            Assert.That(root.GetProperty("flop_convention").GetString(), Does.Contain("4 × linear params × tokens"));
            Assert.That(root.GetProperty("step").GetString(), Does.Contain("AdamW"));
            Assert.That(root.GetProperty("peak_tflops").ValueKind, Is.EqualTo(JsonValueKind.Null));
        });
        // One layer of Llama-3.2-1B by hand: the tied embedding 128256·2048 = 262,668,288; per layer q and o 2048², k and v
        // 512·2048, gate/up/down 8192·2048, two norms 2048: 60,821,504; the final norm 2048.
        long parameters = 262_668_288L + 60_821_504L + 2_048L;
        Assert.That(root.GetProperty("parameters").GetInt64(), Is.EqualTo(parameters));
        var rows = root.GetProperty("rows").EnumerateArray().ToList();
        Assert.That(rows.Select(x => x.GetProperty("method_id").GetString()), Is.EqualTo(new[] { "lora" }));
        var row = rows[0];
        double ms = row.GetProperty("ms_per_step").GetDouble(), tokensPerSecond = row.GetProperty("tokens_per_second").GetDouble();
        Assert.Multiple(() =>
        {
            Assert.That(ms, Is.GreaterThan(0));
            Assert.That(tokensPerSecond, Is.GreaterThan(0));
            Assert.That(tokensPerSecond, Is.EqualTo(8 / (ms * 1e-3)).Within(1e-6).Percent);
            Assert.That(row.GetProperty("timed_steps").GetInt32(), Is.EqualTo(1));
            // The frozen base: the embedding in fp32 (CPU compute) and the projections stored bf16; at least those bytes.
            long baseBytes = 4L * 262_668_288 + 2L * (60_821_504 - 2 * 2048);
            Assert.That(row.GetProperty("parameter_bytes").GetInt64(), Is.GreaterThanOrEqualTo(baseBytes));
            Assert.That(row.GetProperty("peak_bytes").GetInt64(), Is.GreaterThanOrEqualTo(row.GetProperty("parameter_bytes").GetInt64()));
            Assert.That(row.GetProperty("plan_bytes").GetInt64(), Is.EqualTo(row.GetProperty("peak_bytes").GetInt64()), "the plan is the CPU pool's peak");
            Assert.That(row.GetProperty("driver_peak_bytes").ValueKind, Is.EqualTo(JsonValueKind.Null), "no CUDA driver");
            Assert.That(row.GetProperty("mfu").ValueKind, Is.EqualTo(JsonValueKind.Null));
            double loss = row.GetProperty("loss").GetDouble();
            Assert.That(loss, Is.EqualTo(Math.Log(128256)).Within(1.0), "random weights of std 0.02: the loss is near ln V");
            // 4 · linear · tokens: linear = one layer's 7 projections (60,817,408) + lm_head 262,668,288; LoRA r=16 on one
            // layer: 16·(4096 + 2560 + 2560 + 4096 + 3·10240) = 704,512; attention 3.5 · 2·2·1·8²·32·64/2.
            double flops = 4.0 * (60_817_408 + 262_668_288) * 8 + 6.0 * 704_512 * 8 + 3.5 * (2.0 * 2 * 1 * 64 * 32 * 64 / 2);
            Assert.That(row.GetProperty("flops_per_step").GetDouble(), Is.EqualTo(flops));
            Assert.That(row.GetProperty("tflops").GetDouble(), Is.EqualTo(flops / (ms * 1e-3) / 1e12).Within(1e-6).Percent);
            Assert.That(row.GetProperty("profile_ms").EnumerateObject().Select(p => p.Name), Does.Contain("Matmul").And.Contain("clip + AdamW update"));
        });
    }

    [Test]
    public void QloraWithTheEmbeddingOnTheHostAndPagedAdamWRunsInsideItsPlan()
    {
        // The emulator runs the kernels in a pool sized from the plan: the pool's peak equals the plan with the table in
        // host memory and paged AdamW, and the table (2048 · 256 bf16 = 1 MiB) is not in the device figures.
        using var dir = CliProcess.TempDir();
        string[] common = ["bench", "--model", "tiny", "--layers", "1", "--seq", "32", "--batch", "1", "--method", "qlora", "--steps", "1",
            "--device", "emulator", "--optim", "paged-adamw"];
        var host = CliProcess.Run([.. common, "--embedding", "host", "--json", dir["host.json"]]);
        Assert.That(host.ExitCode, Is.EqualTo(0), host.ToString());
        var device = CliProcess.Run([.. common, "--embedding", "device", "--json", dir["device.json"]]);
        Assert.That(device.ExitCode, Is.EqualTo(0), device.ToString());
        JsonElement Row(string file) => JsonDocument.Parse(File.ReadAllText(dir[file])).RootElement.GetProperty("rows")[0].Clone();
        using var hostDoc = JsonDocument.Parse(File.ReadAllText(dir["host.json"]));
        Assert.That(hostDoc.RootElement.GetProperty("optimizer").GetString(), Is.EqualTo("paged-adamw"));
        Assert.That(hostDoc.RootElement.GetProperty("embedding_on_host").GetProperty("qlora").GetBoolean(), Is.True);
        var (h, d) = (Row("host.json"), Row("device.json"));
        Assert.That(h.GetProperty("plan_bytes").GetInt64(), Is.EqualTo(h.GetProperty("peak_bytes").GetInt64()), "host: plan = pool peak");
        Assert.That(d.GetProperty("plan_bytes").GetInt64(), Is.EqualTo(d.GetProperty("peak_bytes").GetInt64()), "device: plan = pool peak");
        Assert.That(d.GetProperty("peak_bytes").GetInt64() - h.GetProperty("peak_bytes").GetInt64(), Is.EqualTo(2048L * 256 * 2), "the table left the device");

        var full = CliProcess.Run("bench", "--model", "tiny", "--method", "full", "--embedding", "host", "--device", "cpu");
        Assert.That(full.ExitCode, Is.EqualTo(2), full.ToString());
        Assert.That(full.Stderr, Does.Contain("--embedding host: full fine-tuning"));
    }
}
