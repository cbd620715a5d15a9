using System.Text.Json;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Tests.Training;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// Issue 10, classes 6 and 7 from the command line: nothing to learn is an error before the first step, a data file not
/// in its extension's format is an error, every option given is used or refused; non-finite weights (adapter, base)
/// and logits are errors naming the tensor or token, `--on-nonfinite skip` drops the updates.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class TrainSemanticsCliTests
{
    private static string WriteModel(TempDir dir)
    {
        HfCheckpoint.Write(dir["model"], TrainingKit.Config, TrainingKit.RandomTensors(), long.MaxValue);
        return dir["model"];
    }

    private static string WriteLines(TempDir dir, string name, IEnumerable<string> lines)
    {
        File.WriteAllLines(dir[name], lines);
        return dir[name];
    }

    /// <summary>8 pre-tokenized lines of byte ids, 12 tokens each.</summary>
    private static string Good(TempDir dir) =>
        WriteLines(dir, "good.jsonl", Enumerable.Range(0, 8).Select(i => "{\"input_ids\": [" + string.Join(", ", Enumerable.Range(97 + i, 12)) + "]}"));

    private static string Masked(TempDir dir) =>
        WriteLines(dir, "masked.jsonl", Enumerable.Range(0, 6).Select(_ => "{\"input_ids\": [100, 101, 102, 103], \"labels\": [-100, -100, -100, -100]}"));

    private static string[] Train(string model, string data, string output, params string[] extra) =>
        ["train", "--model", model, "--data", data, "--out", output, .. extra.Contains("--steps") ? Array.Empty<string>() : ["--steps", "2"],
         "--batch", "2", "--seq", "16", "--rank", "2", .. extra];

    private static void AssertRefused(CliProcess.Result r, params string[] parts)
    {
        Assert.That(r.ExitCode, Is.Not.Zero, r.ToString());
        Assert.That(r.Stderr, Does.StartWith("error: "), r.ToString());
        foreach (var p in parts) Assert.That(r.Stderr, Does.Contain(p), r.ToString());
        Assert.That(r.Stderr, Does.Not.Contain("   at "), "no stack trace");
    }

    // ------------------------------------------------------------------ class 6: nothing to learn, format, unused options

    [Test]
    public void NoTrainableTokenStopsBeforeTheFirstStepNamingTheFileAndWhy()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir);
        var masked = CliProcess.Run(Train(model, Masked(dir), dir["out"]));
        AssertRefused(masked, "--data", dir["masked.jsonl"], "every label is -100, or every row is shorter than 2 tokens");
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
        // Rows of one token predict nothing either.
        string one = WriteLines(dir, "one.jsonl", Enumerable.Range(0, 5).Select(i => $"{{\"input_ids\": [{100 + i}]}}"));
        AssertRefused(CliProcess.Run(Train(model, one, dir["out"])), "--data", one, "shorter than 2 tokens");
        // The eval set too: its loss would be NaN at every evaluation.
        AssertRefused(CliProcess.Run(Train(model, Good(dir), dir["out"], "--eval-data", dir["masked.jsonl"])),
            "--eval-data", dir["masked.jsonl"], "every label is -100");
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
    }

    [Test]
    public void JsonlThatIsNotJsonObjectsIsAFormatErrorNotPlainText()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir);
        string numbers = WriteLines(dir, "numbers.jsonl", Enumerable.Range(0, 20).Select(i => i.ToString()));
        AssertRefused(CliProcess.Run(Train(model, numbers, dir["out"])), $"{numbers}:1", "expected a JSON object", "found a number");
        string strings = WriteLines(dir, "strings.jsonl", ["", "\"hello\"", "\"world\""]);
        AssertRefused(CliProcess.Run(Train(model, strings, dir["out"])), $"{strings}:2", "found a string");
        Assert.That(Directory.Exists(dir["out"]), Is.False);
        // eval reads data the same way.
        AssertRefused(CliProcess.Run("eval", "--model", model, "--data", numbers), $"{numbers}:1", "expected a JSON object");
    }

    [Test]
    public void OptionsGivenButUnusedAreRefusedNamingTheOption()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), good = Good(dir);
        AssertRefused(CliProcess.Run("train", "--model", "builtin", "--data", "builtin", "--eval-data", good, "--out", dir["out"], "--steps", "1"),
            "--eval-data", "held-out split");
        AssertRefused(CliProcess.Run("train", "--model", "builtin", "--data", "builtin", "--on-bad-line", "skip", "--out", dir["out"], "--steps", "1"),
            "--on-bad-line", "no data file");
        AssertRefused(CliProcess.Run(Train(model, good, dir["out"], "--method", "full")), "--rank", "full fine-tuning");
        AssertRefused(CliProcess.Run(Train(model, good, dir["out"], "--eval-every", "1")), "--eval-every", "no eval data");
        AssertRefused(CliProcess.Run(Train(model, good, dir["out"], "--eval-batches", "1")), "--eval-batches", "no eval data");
        AssertRefused(CliProcess.Run(Train(model, good, dir["out"], "--save-every", "3")), "--save-every: 3 is more than the run's 2 steps");
        AssertRefused(CliProcess.Run(Train(model, good, dir["out"], "--eval-data", good, "--eval-every", "5")), "--eval-every: 5 is more than the run's 2 steps");
        File.WriteAllText(dir["text.txt"], "some plain text to train on");
        AssertRefused(CliProcess.Run(Train(model, dir["text.txt"], dir["out"], "--on-bad-line", "skip")), "--on-bad-line", "plain text");
        Assert.That(Directory.Exists(dir["out"]), Is.False);
        AssertRefused(CliProcess.Run("generate", "--model", "builtin", "--prompt", "upper: ab\n", "--seed", "3"), "--seed", "greedy");
        AssertRefused(CliProcess.Run("generate", "--model", "builtin", "--prompt", "upper: ab\n", "--top-k", "3"), "--top-k", "greedy");
        AssertRefused(CliProcess.Run("compare", "--model", "builtin", "--data", "builtin", "--methods", "lora", "--lr-full", "1e-3", "--out", dir["cmp"]),
            "--lr-full", "no full");
        AssertRefused(CliProcess.Run("compare", "--model", "builtin", "--data", "builtin", "--methods", "full", "--rank", "4", "--out", dir["cmp"]),
            "--rank", "only full");
        AssertRefused(CliProcess.Run("compare", "--model", model, "--data", good, "--eval-data", good, "--exact-match-samples", "5", "--out", dir["cmp"]),
            "--exact-match-samples", "built-in task");
        AssertRefused(CliProcess.Run("eval", "--model", model, "--data", good, "--seq", "8"), "--seq", "pre-tokenized");
        Assert.That(Directory.Exists(dir["cmp"]), Is.False);
    }

    // ------------------------------------------------------------------ class 7: non-finite weights and logits

    /// <summary>Rewrites one value of <paramref name="key"/> in a safetensors file (fp32) with SafetensorsWriter.</summary>
    internal static void Poison(string file, string key, int index, float value)
    {
        var tensors = new List<SafetensorsTensor>();
        using (var f = SafetensorsFile.Open(file))
            foreach (var t in f.Tensors)
            {
                var v = f.GetSpan<float>(t.Name).ToArray();
                if (t.Name == key) v[index] = value;
                tensors.Add(SafetensorsTensor.From(t.Name, t.Shape, v));
            }
        SafetensorsWriter.Write(file, tensors, new Dictionary<string, string> { ["format"] = "pt" });
    }

    /// <summary>An adapter of the built-in model (r 2, every projection, lora_B random), saved to <paramref name="dir"/>.</summary>
    private static string BuiltinAdapter(string dir, float bValue = 0.01f, float aValue = float.NaN)
    {
        using var ops = new CpuOps();
        using var ck = HfCheckpoint.Open(BuiltinModel.Directory);
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 2, Alpha = 4, TargetModules = LoraSettings.KnownTargets } });
        foreach (var (name, param, _) in model.TrainableParameters)
        {
            var v = new float[param.Count];
            ops.Download<float>(param, v);
            if (name.Contains("lora_B")) Array.Fill(v, bValue);
            else if (!float.IsNaN(aValue)) Array.Fill(v, aValue);
            ops.Upload<float>(v, param);
        }
        PeftAdapter.Save(dir, model, BuiltinModel.Name);
        return dir;
    }

    [Test]
    public void AnAdapterWithANaNIsRefusedByLoadGenerateAndMergeNamingTheTensor()
    {
        using var dir = CliProcess.TempDir();
        string adapter = BuiltinAdapter(dir["adapter"]);
        const string Key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
        Poison(Path.Combine(adapter, PeftAdapter.WeightsFileName), Key, 5, float.NaN);

        var e = Assert.Throws<PeftAdapterException>(() => PeftAdapter.Load(adapter))!;
        Assert.That(e.Problems, Has.Some.Contains(Key + ": element 5 is NaN"));

        AssertRefused(CliProcess.Run("generate", "--model", "builtin", "--adapter", adapter, "--prompt", "upper: ab\n"), "--adapter", Key, "element 5 is NaN");
        AssertRefused(CliProcess.Run("merge", "--model", BuiltinModel.Directory, "--adapter", adapter, "--out", dir["merged"]), "--adapter", Key, "NaN");
        Assert.That(Directory.Exists(dir["merged"]), Is.False, "merge wrote nothing");
        // +inf and a huge finite value are refused the same way.
        Poison(Path.Combine(adapter, PeftAdapter.WeightsFileName), Key, 5, 1e35f);
        Assert.That(Assert.Throws<PeftAdapterException>(() => PeftAdapter.Load(adapter))!.Problems, Has.Some.Contains(Key + ": element 5 is 1E+35"));
    }

    [Test]
    public void AMergeWhoseResultOverflowsWritesNothing()
    {
        using var dir = CliProcess.TempDir();
        // Finite A and B (1e20 < 1e30), but W + scaling·B·A = 2 · Σ_r 1e20·1e20 = 4e40: beyond fp32.
        string adapter = BuiltinAdapter(dir["adapter"], bValue: 1e20f, aValue: 1e20f);
        Assert.DoesNotThrow(() => PeftAdapter.Load(adapter));
        var r = CliProcess.Run("merge", "--model", BuiltinModel.Directory, "--adapter", adapter, "--out", dir["merged"]);
        AssertRefused(r, "--adapter", "model.layers.0.self_attn.q_proj.weight", "+inf");
        Assert.That(Directory.Exists(dir["merged"]), Is.False, "merge wrote nothing");
    }

    [Test]
    public void AnAdapterWhoseLogitsOverflowStopsGenerateAndEvalSayingWhere()
    {
        using var dir = CliProcess.TempDir();
        string adapter = BuiltinAdapter(dir["adapter"], bValue: 1e20f, aValue: 1e20f);
        // Unmerged, the LoRA path overflows: the logits are not finite. generate and eval say where, not crash or print NaN.
        AssertRefused(CliProcess.Run("generate", "--model", "builtin", "--adapter", adapter, "--prompt", "upper: ab\n"),
            "the logits of new token 0 (position", "--adapter " + adapter);
        AssertRefused(CliProcess.Run("eval", "--model", "builtin", "--adapter", adapter, "--data", Good(dir)),
            "--data", "example 1: the loss is", "not finite", "--adapter " + adapter);
    }

    [Test]
    public void ABaseCheckpointWithANaNIsRefusedNamingTheTensor()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir);
        string shard = Directory.GetFiles(model, "*.safetensors").Single();
        Poison(shard, "model.layers.0.mlp.down_proj.weight", 7, float.PositiveInfinity);
        AssertRefused(CliProcess.Run(Train(model, Good(dir), dir["out"])), "--model", "model.layers.0.mlp.down_proj.weight", "element 7 is +inf");
        Assert.That(Directory.Exists(dir["out"]), Is.False);
        AssertRefused(CliProcess.Run("eval", "--model", model, "--data", dir["good.jsonl"]), "model.layers.0.mlp.down_proj.weight", "element 7 is +inf");
    }

    [Test]
    public void SkipModeDropsNonFiniteStepsAndStopsAfterTenInARow()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), good = Good(dir);
        // lr 1e30: step 1's update blows the weights up, every later step is non-finite.
        var r = CliProcess.Run(Train(model, good, dir["out"], "--steps", "20", "--lr", "1e30", "--max-grad-norm", "0", "--schedule", "constant",
            "--on-nonfinite", "skip"));
        Assert.That(r.ExitCode, Is.EqualTo(3), r.ToString());
        Assert.That(r.Stdout, Does.Match(@"step 2/20  skipped: the (loss|gradient norm) is \S+ \(--on-nonfinite skip"), r.ToString());
        Assert.That(r.Stderr, Does.Match(@"error: step 11: the (loss|gradient norm) is").And.Contain("10 consecutive steps"), r.ToString());
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["out"], Trainer.MetricsFileName)));
        Assert.That(doc.RootElement.GetProperty("skipped_steps").EnumerateArray().Select(e => e.GetInt32()), Is.EqualTo(Enumerable.Range(2, 9)));
        Assert.That(doc.RootElement.GetProperty("config").GetProperty("on_nonfinite").GetString(), Is.EqualTo("skip"));
    }
}
