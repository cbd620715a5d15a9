using System.Runtime.InteropServices;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// Issue 10, classes 4 and 9: sizes from config.json and from options are bounded with one line naming the field or
/// option (SizeOptions, Limits), before anything is sized from them; --data must be a regular file.
/// </summary>
[Parallelizable(ParallelScope.None)]
public sealed class SizeOptionsCliTests
{
    private static void AssertOneLineError(CliProcess.Result r, params string[] parts)
    {
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        foreach (var part in parts) Assert.That(r.Stderr, Does.Contain(part), r.ToString());
        Assert.That(r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries), Has.Length.EqualTo(1), "one line, no stack trace: " + r.Stderr);
    }

    private const string AbsurdLayers =
        "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128, \"num_hidden_layers\": 200000000, " +
        "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 300, \"max_position_embeddings\": 256}";

    [Test]
    public void EstimateRefusesAnAbsurdLayerCountBeforePlanningAndStaysSmall()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir["config.json"], AbsurdLayers);
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        long before = GC.GetAllocatedBytesForCurrentThread();
        int code = NativePeft.Cli.Program.Run(["estimate", "--model", dir["config.json"]], stdout, stderr);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.That(code, Is.EqualTo(1), stderr.ToString());
        Assert.That(stderr.ToString(), Does.Contain("num_hidden_layers: 200000000 must be in [1, 1024]"));
        // Planning 2e8 layers allocated gigabytes before the bound; the refusal itself needs a few MB.
        Assert.That(allocated, Is.LessThan(256L << 20), $"allocated {allocated} bytes");
    }

    [Test]
    public void EstimateRefusesAWeightWhoseBlockCountWouldOverflow()
    {
        // vocab 2^22 × hidden 2^17 = 2^39 elements: each field within its bound, but the 8-bit optimizer's 256-element
        // blocks of that embedding (2^31) no longer fit an int — the plan crashed with an OverflowException.
        using var dir = new TempDir();
        File.WriteAllText(dir["config.json"],
            "{\"model_type\": \"llama\", \"hidden_size\": 131072, \"intermediate_size\": 1024, \"num_hidden_layers\": 1, " +
            "\"num_attention_heads\": 1024, \"vocab_size\": 4194304, \"max_position_embeddings\": 4096}");
        var r = CliProcess.Run("estimate", "--model", dir["config.json"], "--method", "full", "--optim", "adamw8bit", "--seq", "16");
        AssertOneLineError(r, "vocab_size: makes a 549755813888-element weight with hidden_size 131072, more than the 68719476736 limit");
        Assert.That(r.ExitCode, Is.EqualTo(1));
    }

    [Test]
    public void TrainRefusesAnAbsurdLayerCountNamingTheField()
    {
        using var dir = new TempDir();
        Directory.CreateDirectory(dir["m"]);
        File.WriteAllText(dir["m/config.json"], AbsurdLayers);
        File.WriteAllText(dir["d.jsonl"], "{\"input_ids\": [1, 2, 3]}\n");
        var r = CliProcess.Run("train", "--model", dir["m"], "--data", dir["d.jsonl"], "--device", "cpu", "--steps", "1", "--out", dir["out"]);
        AssertOneLineError(r, "num_hidden_layers: 200000000 must be in [1, 1024]");
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
    }

    [Test]
    public void TrainRefusesASequenceBeyondTheModelsPositionsNamingBothValues()
    {
        using var dir = new TempDir();
        // The built-in model's max_position_embeddings is 256.
        var r = CliProcess.Run("train", "--model", "builtin", "--data", "builtin", "--steps", "1", "--seq", "300", "--out", dir["out"]);
        AssertOneLineError(r, "--seq 300: exceeds the model's max_position_embeddings 256");
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
    }

    [Test]
    public void TrainRefusesAHugeSequenceLength()
    {
        using var dir = new TempDir();
        var r = CliProcess.Run("train", "--model", "builtin", "--data", "builtin", "--steps", "1", "--seq", "2000000000", "--out", dir["out"]);
        AssertOneLineError(r, "--seq 2000000000: must be in [1, 4194304]");
    }

    [Test]
    public void EstimateRefusesASequenceBeyondThePresetsPositions()
    {
        var r = CliProcess.Run("estimate", "--model", "llama3-8b", "--seq", "9000");
        AssertOneLineError(r, "--seq 9000: exceeds the model's max_position_embeddings 8192");
        Assert.That(r.ExitCode, Is.EqualTo(2));
    }

    /// <summary>The default --seq (2048, for the published models) shortens to a model's own context instead of
    /// refusing it; the same length given explicitly is refused.</summary>
    [Test]
    public void EstimatesDefaultSequenceFitsAShortContextModel()
    {
        var r = CliProcess.Run("estimate", "--model", "builtin", "--json");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = System.Text.Json.JsonDocument.Parse(r.Stdout);
        var explicitLength = CliProcess.Run("estimate", "--model", "builtin", "--seq", "256", "--json");
        Assert.That(explicitLength.ExitCode, Is.EqualTo(0), explicitLength.ToString());
        using var same = System.Text.Json.JsonDocument.Parse(explicitLength.Stdout);
        Assert.That(doc.RootElement.GetProperty("total_bytes").GetInt64(), Is.EqualTo(same.RootElement.GetProperty("total_bytes").GetInt64()),
            "the default is the built-in model's 256 positions");
        var given = CliProcess.Run("estimate", "--model", "builtin", "--seq", "2048");
        AssertOneLineError(given, "--seq 2048: exceeds the model's max_position_embeddings 256");
    }

    [TestCase("--batch", "100000", "--batch 100000: must be in [1, 65536]")]
    [TestCase("--rank", "1000000", "--rank 1000000: must be in [1, 8192]")]
    [TestCase("--seq", "2000000000", "--seq 2000000000: must be in [1, 4194304]")]
    public void EstimateBoundsItsSizeOptions(string option, string value, string message)
    {
        var r = CliProcess.Run("estimate", "--model", "llama3-8b", option, value);
        AssertOneLineError(r, message);
        Assert.That(r.ExitCode, Is.EqualTo(2));
    }

    [Test]
    public void GenerateRefusesMaxTokensThatOverflowThePromptLength()
    {
        var r = CliProcess.Run("generate", "--prompt", "upper: cat\n", "--max-tokens", "2147483647");
        AssertOneLineError(r, "--max-tokens 2147483647 = 2147483", "exceed the model's context of 256 tokens");
    }

    [Test]
    public void TrainRefusesACharacterDeviceAsData()
    {
        if (!OperatingSystem.IsLinux()) Assert.Ignore("/dev/zero and statx are Linux's");
        using var dir = new TempDir();
        var r = CliProcess.Run("train", "--model", "builtin", "--data", "/dev/zero", "--steps", "1", "--out", dir["out"]);
        AssertOneLineError(r, "--data /dev/zero: is a character device, not a regular file");
    }

    [Test]
    public void TrainAndEvalRefuseAFifoAsData()
    {
        if (!OperatingSystem.IsLinux()) Assert.Ignore("mkfifo and statx are Linux's");
        using var dir = new TempDir();
        Assert.That(MkFifo(dir["pipe.jsonl"], 0x180), Is.EqualTo(0), "mkfifo");
        var r = CliProcess.Run("train", "--model", "builtin", "--data", dir["pipe.jsonl"], "--steps", "1", "--out", dir["out"]);
        AssertOneLineError(r, $"--data {dir["pipe.jsonl"]}: is a FIFO (named pipe), not a regular file");
        var e = CliProcess.Run("eval", "--model", "builtin", "--data", dir["pipe.jsonl"]);
        AssertOneLineError(e, $"--data {dir["pipe.jsonl"]}: is a FIFO (named pipe), not a regular file");
    }

    [Test]
    public void EvalRefusesASequenceBeyondTheModelsPositions()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir["d.txt"], "upper: cat\nCAT\n");
        var r = CliProcess.Run("eval", "--model", "builtin", "--data", dir["d.txt"], "--seq", "1000");
        AssertOneLineError(r, "--seq 1000: exceeds the model's max_position_embeddings 256");
    }

    [DllImport("libc", EntryPoint = "mkfifo", SetLastError = true)]
    private static extern int MkFifo([MarshalAs(UnmanagedType.LPUTF8Str)] string path, uint mode);
}
