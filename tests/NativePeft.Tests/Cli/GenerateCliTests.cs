using System.Text.Json;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Tests.Modules;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft generate` end to end, in-process: a LoRA adapter trained by `train` on the built-in model and task makes
/// `generate` produce the uppercase of held-out words, which the base alone does not; sampling options, --json, --config;
/// and the bad inputs (one "error:" line naming the option, non-zero exit, nothing on stdout).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class GenerateCliTests
{
    private TempDir _dir = null!;
    private string _adapter = null!;

    [OneTimeSetUp]
    public void TrainAdapter()
    {
        _dir = CliProcess.TempDir();
        var r = Run("train", "--model", "builtin", "--data", "builtin", "--method", "lora", "--steps", "300", "--lr", "3e-3",
            "--batch", "16", "--seq", "24", "--warmup", "15", "--dropout", "0", "--out", _dir["train"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        _adapter = Path.Combine(_dir["train"], "adapter");
        Assert.That(File.Exists(Path.Combine(_adapter, PeftLoraConfig.FileName)), Is.True);
    }

    [OneTimeTearDown]
    public void Cleanup() => _dir?.Dispose();

    private static CliProcess.Result Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = NativePeft.Cli.Program.Run(args, stdout, stderr);
        return new CliProcess.Result(code, stdout.ToString(), stderr.ToString());
    }

    private static JsonElement Json(CliProcess.Result r)
    {
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        return JsonDocument.Parse(r.Stdout).RootElement.Clone();
    }

    private static IReadOnlyList<BuiltinProblem> HeldOut(int n) => BuiltinTask.Generate(BuiltinModel.TaskOptions).Eval.Take(n).ToList();

    [Test]
    public void TheAdapterMakesTheBuiltinModelUppercaseHeldOutWords()
    {
        int withAdapter = 0, without = 0;
        foreach (var p in HeldOut(6))
        {
            Assert.That(BuiltinTask.IsHeldOut(p.Word), Is.True);
            var tuned = Json(Run("generate", "--adapter", _adapter, "--prompt", p.Prompt, "--json"));
            var plain = Json(Run("generate", "--prompt", p.Prompt, "--json"));
            TestContext.Out.WriteLine($"{p.Word}: base \"{plain.GetProperty("completion").GetString()}\", adapter \"{tuned.GetProperty("completion").GetString()}\"");
            if (tuned.GetProperty("completion").GetString() == p.Answer) withAdapter++;
            if (plain.GetProperty("completion").GetString() == p.Answer) without++;
            Assert.That(tuned.GetProperty("prompt").GetString(), Is.EqualTo(p.Prompt));
            Assert.That(tuned.GetProperty("prompt_tokens").GetInt32(), Is.EqualTo(ByteTokenizer.Instance.Encode(p.Prompt, true).Length));
            var ids = tuned.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            Assert.That(ByteTokenizer.Instance.Decode(ids), Is.EqualTo(tuned.GetProperty("completion").GetString()));
            Assert.That(tuned.GetProperty("new_tokens").GetInt32(), Is.EqualTo(ids.Length));
        }
        Assert.That(withAdapter, Is.GreaterThanOrEqualTo(4), "with the adapter most held-out words come out in capitals");
        Assert.That(without, Is.EqualTo(0), "the base model does not do the task");
    }

    [Test]
    public void PlainOutputStreamsTheCompletionAndAStatsLine()
    {
        var p = HeldOut(1)[0];
        var json = Json(Run("generate", "--adapter", _adapter, "--prompt", p.Prompt, "--json"));
        var r = Run("generate", "--adapter", _adapter, "--prompt", p.Prompt);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        var lines = r.Stdout.Split('\n');
        Assert.That(lines[0], Is.EqualTo(json.GetProperty("completion").GetString()));
        Assert.That(lines[1], Does.StartWith($"-- {json.GetProperty("prompt_tokens").GetInt32()} prompt tokens, {json.GetProperty("new_tokens").GetInt32()} new tokens")
            .And.Contain("tokens/s").And.Contain("KV cache"));
        Assert.That(r.Stderr, Is.Empty);
    }

    [Test]
    public void SamplingIsReproducibleAndMaxTokensIsHonoured()
    {
        string[] common = ["generate", "--prompt", "the", "--temperature", "2", "--top-p", "0.98", "--top-k", "100", "--max-tokens", "12", "--json"];
        var a = Json(Run([.. common, "--seed", "7"]));
        var b = Json(Run([.. common, "--seed", "7"]));
        Assert.That(b.GetProperty("token_ids").GetRawText(), Is.EqualTo(a.GetProperty("token_ids").GetRawText()));
        Assert.That(a.GetProperty("new_tokens").GetInt32(), Is.LessThanOrEqualTo(12));
        var seeds = Enumerable.Range(8, 4).Select(s => Json(Run([.. common, "--seed", s.ToString()])).GetProperty("token_ids").GetRawText());
        Assert.That(seeds.Any(t => t != a.GetProperty("token_ids").GetRawText()), Is.True, "other seeds sample other tokens");
        var three = Json(Run("generate", "--prompt", "the quick brown fox jumps", "--max-tokens", "3", "--json"));
        Assert.That(three.GetProperty("new_tokens").GetInt32(), Is.LessThanOrEqualTo(3));
    }

    [Test]
    public void Nf4BaseEmulatorAndConfigFile()
    {
        var p = HeldOut(1)[0];
        var cpu = Json(Run("generate", "--adapter", _adapter, "--prompt", p.Prompt, "--json"));
        var emu = Json(Run("generate", "--adapter", _adapter, "--prompt", p.Prompt, "--device", "emulator", "--precision", "fp32", "--json"));
        Assert.That(emu.GetProperty("token_ids").GetRawText(), Is.EqualTo(cpu.GetProperty("token_ids").GetRawText()), "greedy on the emulator = the CPU");
        // Mixed precision (the default on a GPU device): bf16 roundings, but the adapter still writes the word in capitals.
        var bf16 = Json(Run("generate", "--adapter", _adapter, "--prompt", p.Prompt, "--device", "emulator", "--json"));
        Assert.That(bf16.GetProperty("completion").GetString(), Is.EqualTo(p.Answer), "bf16 greedy on the emulator");
        var nf4 = Json(Run("generate", "--adapter", _adapter, "--prompt", p.Prompt, "--quantize", "nf4", "--max-tokens", "8", "--json"));
        Assert.That(nf4.GetProperty("new_tokens").GetInt32(), Is.InRange(0, 8));
        string config = _dir["gen.yaml"];
        File.WriteAllText(config, $"adapter: '{_adapter}'\nprompt: \"{p.Prompt.Replace("\n", "\\n")}\"\nmax_tokens: 10\njson: true\n");
        var fromFile = Json(Run("generate", "--config", config));
        Assert.That(fromFile.GetProperty("token_ids").GetRawText(), Is.EqualTo(cpu.GetProperty("token_ids").GetRawText()));
    }

    // ------------------------------------------------------------------------------------------ bad input

    private static void AssertError(CliProcess.Result r, params string[] fragments)
    {
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Is.Empty, "nothing on stdout");
        Assert.That(r.Stderr, Does.StartWith("error: "), r.ToString());
        foreach (var f in fragments) Assert.That(r.Stderr, Does.Contain(f), r.ToString());
    }

    [Test]
    public void PromptLongerThanTheContextIsOneClearError()
    {
        // 200 letters + bos = 201 tokens; + 64 (default --max-tokens) = 265 > 256.
        AssertError(Run("generate", "--prompt", new string('a', 200)), "error: --prompt: 201 tokens", "--max-tokens 64", "256", "max_position_embeddings", "--max-tokens 55 or less");
        AssertError(Run("generate", "--prompt", new string('a', 300), "--max-tokens", "1"), "301 tokens", "256", "shorten the prompt");
        Assert.That(Run("generate", "--prompt", new string('a', 200), "--max-tokens", "55", "--json").ExitCode, Is.EqualTo(0), "exactly the context fits");
    }

    [Test]
    public void AdapterFolderWithoutConfigIsRejected()
    {
        string empty = _dir["empty-adapter"];
        Directory.CreateDirectory(empty);
        AssertError(Run("generate", "--adapter", empty, "--prompt", "upper: abc\n"), $"--adapter {empty}", "adapter_config.json");
        AssertError(Run("generate", "--adapter", _dir["no-such-folder"], "--prompt", "upper: abc\n"), "--adapter", "does not exist");
    }

    [Test]
    public void AdapterTrainedOnAnotherBaseIsRejected()
    {
        // A LoRA adapter of a model with hidden 32 (the built-in has 128): same targets, r and alpha as `train` writes.
        var trained = PeftAdapter.Load(_adapter);
        var other = ModelTestKit.Tiny with { HiddenSize = 32, IntermediateSize = 48, HeadDim = 8, NumAttentionHeads = 4, NumKeyValueHeads = 2, VocabSize = 259, NumHiddenLayers = 4 };
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandom(other, ops, new LlamaModelOptions { Lora = trained.Config.ToLoraSettings() });
        string foreign = _dir["foreign-adapter"];
        PeftAdapter.Save(foreign, model, "some/other-model");
        AssertError(Run("generate", "--adapter", foreign, "--prompt", "upper: abc\n"),
            $"--adapter {foreign} does not fit --model builtin", "another base model", "q_proj.lora_A.weight: the adapter has [16, 32], the model expects [16, 128]");
        // A config whose r disagrees with the tensors (r 4, tensors of rank 16): rejected, naming --adapter and r.
        var config = File.ReadAllText(Path.Combine(_adapter, PeftLoraConfig.FileName));
        Assert.That(config, Does.Match("\"r\": 16\\b"));
        string wrongRank = _dir["wrong-rank"];
        Directory.CreateDirectory(wrongRank);
        File.Copy(Path.Combine(_adapter, PeftAdapter.WeightsFileName), Path.Combine(wrongRank, PeftAdapter.WeightsFileName));
        File.WriteAllText(Path.Combine(wrongRank, PeftLoraConfig.FileName), System.Text.RegularExpressions.Regex.Replace(config, "\"r\": 16\\b", "\"r\": 4"));
        AssertError(Run("generate", "--adapter", wrongRank, "--prompt", "upper: abc\n"), $"--adapter {wrongRank}", "28 problems", "adapter_config.json says r = 4", "… and 25 more");
        Assert.That(Run("generate", "--adapter", wrongRank, "--prompt", "x").Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries), Has.Length.EqualTo(5),
            "the summary, three problems, and how many more");
    }

    [TestCase("--temperature", "-0.5", "--temperature -0.5: must be a finite number >= 0")]
    [TestCase("--top-p", "0", "--top-p 0: must be in (0, 1]")]
    [TestCase("--top-p", "1.5", "--top-p 1.5: must be in (0, 1]")]
    [TestCase("--top-k", "-1", "--top-k -1: must be >= 0")]
    [TestCase("--max-tokens", "0", "--max-tokens 0: must be at least 1")]
    [TestCase("--quantize", "int8", "'int8' not recognized")]
    [TestCase("--device", "tpu", "'tpu' not recognized")]
    public void BadOptionValuesAreOneClearError(string option, string value, string message) =>
        AssertError(Run("generate", "--prompt", "upper: abc\n", option, value), message);

    [Test]
    public void MissingPromptAndModelAreErrors()
    {
        AssertError(Run("generate"), "--prompt");
        AssertError(Run("generate", "--prompt", "x", "--model", _dir["no-model"]), "--model", "folder not found");
    }
}
