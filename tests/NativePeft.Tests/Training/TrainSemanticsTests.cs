using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using NativePeft.Data;
using NativePeft.Inference;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>
/// Issue 10, classes 6–8 in the library: the format of a file by its extension, non-finite logits in generation,
/// --on-nonfinite skip, and resume refusing a checkpoint of another run (every trajectory setting, the base model,
/// the data) or a trainer_state.json with a bad field.
/// </summary>
public class TrainSemanticsTests
{
    private static TrainerOptions Options(string outDir, int steps) => new()
    {
        Steps = steps, BatchSize = 4, SeqLen = TrainingKit.Seq, Lr = 1e-2, Schedule = LrScheduleKind.Constant,
        MaxGradNorm = 1.0, OutputDir = outDir, Seed = 11, ExactMatchSamples = 2,
    };

    // ------------------------------------------------------------------ class 6

    [TestCase("7\n8\n", 1, "found a number")]
    [TestCase("\n\"text\"\n", 2, "found a string")]
    [TestCase("true\n", 1, "found a boolean")]
    public void AJsonlFileOfNonObjectsIsAFormatError(string content, int line, string found)
    {
        using var dir = CliProcess.TempDir();
        File.WriteAllText(dir["d.jsonl"], content);
        var e = Assert.Throws<DataFormatException>(() => DatasetLoader.DetectFormat(dir["d.jsonl"]))!;
        Assert.That(e.FilePath, Is.EqualTo(dir["d.jsonl"]));
        Assert.That(e.Message, Does.Contain($"d.jsonl:{line}").And.Contain("expected a JSON object with one of input_ids, instruction, messages, text").And.Contain(found));
        // A .txt file is plain text whatever it holds.
        File.WriteAllText(dir["d.txt"], content);
        Assert.That(DatasetLoader.DetectFormat(dir["d.txt"]), Is.EqualTo(DataFormat.PlainText));
    }

    [Test]
    public void EvalDataBesideTheBuiltinTaskIsRefused()
    {
        using var dir = CliProcess.TempDir();
        File.WriteAllText(dir["e.jsonl"], "{\"input_ids\": [1, 2, 3]}\n");
        var e = Assert.Throws<FineTuneException>(() => FineTune.ValidateOptions(new FineTuneOptions { Data = "builtin", EvalData = dir["e.jsonl"] }))!;
        Assert.That(e.Option, Is.EqualTo(nameof(FineTuneOptions.EvalData)));
        Assert.That(e.Detail, Does.Contain("held-out split"));
        Assert.Throws<FineTuneException>(() => FineTune.LoadData("builtin", dir["e.jsonl"], ByteTokenizer.Instance, 259, 32));
    }

    // ------------------------------------------------------------------ class 7

    [Test]
    public void NonFiniteLogitsStopGenerationNamingTheToken()
    {
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        var norm = model.BaseParameters().Single(p => p.Name == "model.norm.weight").Dense!;
        var values = TrainingKit.Values(ops, norm);
        values[3] = float.NaN;
        ops.Upload<float>(values, norm);
        var e = Assert.Throws<NonFiniteValuesException>(() => new TextGenerator(model).Generate([10, 11, 12], new GenerationOptions { MaxNewTokens = 4 }))!;
        Assert.That(e.Where, Is.EqualTo("the logits of new token 0 (position 2)"));
        Assert.That(e.Detail, Does.StartWith("element 0 is NaN"));
        Assert.Throws<NonFiniteValuesException>(() => TextGenerator.Greedy(model, [10, 11], 3, null));
    }

    [TestCase(float.NaN, "element 2 is NaN")]
    [TestCase(float.NegativeInfinity, "element 2 is -inf")]
    [TestCase(-2e30f, "element 2 is -2E+30 (beyond ±1e30)")]
    public void FiniteFindsTheFirstBadValueOfEachDType(float bad, string description)
    {
        float[] f = [1, -1e30f, bad, float.NaN];
        Assert.That(Finite.FirstBad(f), Is.EqualTo(2));
        Assert.That(Finite.Describe(2, f[2]), Is.EqualTo(description));
        Assert.That(Finite.FirstBad(new float[] { 1, -1e30f, 0 }), Is.EqualTo(-1), "1e30 itself is accepted");
        var b = new BFloat16[40000];
        b[33333] = (BFloat16)bad;
        Assert.That(Finite.FirstBad(b), Is.EqualTo(33333), "BF16, past the first chunk");
        Assert.That(Finite.FirstBad(new Half[] { (Half)1, Half.NaN }), Is.EqualTo(1));
    }

    [Test]
    public void SkipModeDropsTheUpdateOfANonFiniteStepAndGoesOn()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        var progress = new List<TrainerProgress>();
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["out"], 6) with { OnNonFinite = NonFinitePolicy.Skip },
            progress: new SyncProgress<TrainerProgress>(progress.Add));
        float[][]? before3 = null, before4 = null;
        float[][] Snapshot() => model.TrainableParameters.Select(p => TrainingKit.Values(ops, p.Param)).ToArray();
        trainer.AfterBackward = step =>
        {
            if (step == 3)
            {
                before3 = Snapshot();
                ops.Upload<float>([float.NaN], model.TrainableParameters[5].Grad.Slice(0, 1));
            }
            if (step == 4) before4 = Snapshot();
        };
        var result = trainer.Train();
        Assert.That(result.Steps, Is.EqualTo(6));
        Assert.That(trainer.SkippedSteps, Is.EqualTo(new[] { 3 }));
        Assert.That(trainer.StepHistory.Select(s => s.Step), Is.EqualTo(new[] { 1, 2, 4, 5, 6 }));
        Assert.That(before4, Is.EqualTo(before3), "step 3 changed no weight");
        Assert.That(progress.Single(p => p.Step == 3).SkippedNonFinite, Is.EqualTo("the gradient norm is NaN"));
        Assert.That(model.TrainableParameters.SelectMany(p => TrainingKit.Values(ops, p.Param)).All(float.IsFinite));
        using var doc = JsonDocument.Parse(File.ReadAllText(result.MetricsPath));
        Assert.That(doc.RootElement.GetProperty("skipped_steps").EnumerateArray().Select(e => e.GetInt32()), Is.EqualTo(new[] { 3 }));
    }

    [Test]
    public void SkipModeStopsAfterTheConsecutiveLimitNamingTheStep()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["out"], 10) with { OnNonFinite = NonFinitePolicy.Skip, MaxConsecutiveSkips = 3 });
        trainer.AfterBackward = step =>
        {
            if (step >= 2) ops.Upload<float>([float.PositiveInfinity], model.TrainableParameters[0].Grad.Slice(0, 1));
        };
        var e = Assert.Throws<TrainingDivergedException>(() => trainer.Train())!;
        Assert.That(e.Step, Is.EqualTo(4));
        Assert.That(e.ConsecutiveSkips, Is.EqualTo(3));
        Assert.That(e.Message, Does.StartWith("step 4: the gradient norm is").And.Contain("3 consecutive steps"));
        Assert.That(trainer.SkippedSteps, Is.EqualTo(new[] { 2, 3 }));
    }

    // ------------------------------------------------------------------ class 8

    /// <summary>Trains 2 steps and saves checkpoint-2 with <see cref="Options"/> on the LoRA kit model; returns the folder.</summary>
    private static string Checkpoint(TempDir dir)
    {
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["run"], 2) with { SaveEvery = 2 });
        trainer.Train();
        return Path.Combine(dir["run"], "checkpoint-2");
    }

    private static readonly (string Name, Func<TrainerOptions, TrainerOptions> Change, string Expected)[] OptionChanges =
    [
        ("seed", o => o with { Seed = 12 }, "seed 11 -> 12"),
        ("lr", o => o with { Lr = 2e-2 }, "lr 0.01 -> 0.02"),
        ("schedule", o => o with { Schedule = LrScheduleKind.Cosine }, "schedule constant -> cosine"),
        ("warmup", o => o with { WarmupSteps = 1 }, "warmup 0 -> 1"),
        ("batch", o => o with { BatchSize = 2 }, "batch 4 -> 2"),
        ("grad_accum", o => o with { GradAccum = 2 }, "grad_accum 1 -> 2"),
        ("seq", o => o with { SeqLen = 24 }, "seq 32 -> 24"),
        ("packing", o => o with { BatchMode = BatchMode.Packing }, "batch_mode padding -> packing"),
        ("shuffle", o => o with { Shuffle = false }, "shuffle true -> false"),
        ("optimizer", o => o with { Optimizer = "adamw8bit" }, "optimizer adamw -> adamw8bit"),
        ("weight decay", o => o with { WeightDecay = 0 }, "weight_decay 0.01 -> 0"),
        ("clipping", o => o with { MaxGradNorm = 0.5 }, "max_grad_norm 1 -> 0.5"),
    ];

    private static IEnumerable<TestCaseData> OptionChangeCases() => OptionChanges.Select((c, i) => new TestCaseData(i).SetArgDisplayNames(c.Name));

    [TestCaseSource(nameof(OptionChangeCases))]
    public void ResumeRefusesEachChangedTrainingSettingNamingIt(int index)
    {
        var (_, change, expected) = OptionChanges[index];
        using var dir = CliProcess.TempDir();
        string ckpt = Checkpoint(dir);
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), change(Options(dir["again"], 4)));
        var e = Assert.Throws<InvalidDataException>(() => trainer.Resume(ckpt))!;
        Assert.That(e.Message, Does.Contain("trained with other settings").And.Contain(expected));
        Assert.That(trainer.Step, Is.Zero, "nothing restored");
    }

    [Test]
    public void ResumeRefusesAnotherBaseModelLoraShapeOrDataNamingThem()
    {
        using var dir = CliProcess.TempDir();
        string ckpt = Checkpoint(dir);
        using var ops = new CpuOps();
        // Another base: one more layer (a different config and tensor list).
        using (var other = LlamaModel.CreateRandom(TrainingKit.Config with { NumHiddenLayers = 3 }, ops, new LlamaModelOptions { Lora = TrainingKit.Lora(), Seed = 7 }, weightSeed: 3, std: 0.1))
        using (var trainer = new Trainer(other, TrainingKit.Data(), Options(dir["a"], 4)))
            Assert.That(Assert.Throws<InvalidDataException>(() => trainer.Resume(ckpt))!.Message, Does.Match("base_model sha256:[0-9a-f]{64} -> sha256:[0-9a-f]{64}"));
        // Another LoRA shape: alpha and dropout.
        using (var other = LlamaModel.CreateRandom(TrainingKit.Config, ops, new LlamaModelOptions { Lora = TrainingKit.Lora(dropout: 0.1) with { Alpha = 4 }, Seed = 7 }, weightSeed: 3, std: 0.1))
        using (var trainer = new Trainer(other, TrainingKit.Data(), Options(dir["b"], 4)))
            Assert.That(Assert.Throws<InvalidDataException>(() => trainer.Resume(ckpt))!.Message, Does.Contain("lora_alpha 8 -> 4").And.Contain("lora_dropout 0 -> 0.1"));
        // Other data: the same task with more examples.
        using (var model = TrainingKit.LoraModel(ops))
        using (var trainer = new Trainer(model, TrainingKit.Data(train: 48), Options(dir["c"], 4)))
            Assert.That(Assert.Throws<InvalidDataException>(() => trainer.Resume(ckpt))!.Message, Does.Match(@"train_data sha256:[0-9a-f]{64} \(64 examples\) -> sha256:[0-9a-f]{64} \(48 examples\)"));
        // The same run resumes.
        using (var model = TrainingKit.LoraModel(ops))
        using (var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["d"], 4)))
        {
            trainer.Resume(ckpt);
            Assert.That(trainer.Step, Is.EqualTo(2));
        }
    }

    [Test]
    public void ACheckpointWithoutRecordedSettingsResumesWithAWarning()
    {
        using var dir = CliProcess.TempDir();
        string ckpt = Checkpoint(dir);
        string state = Path.Combine(ckpt, Trainer.StateFileName);
        var json = JsonNode.Parse(File.ReadAllText(state))!.AsObject();
        json.Remove("settings");
        json.Remove("skipped_steps");
        File.WriteAllText(state, json.ToJsonString());
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        var logger = new ListLogger();
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["again"], 4) with { Seed = 12 }, logger);
        trainer.Resume(ckpt);
        Assert.That(trainer.Step, Is.EqualTo(2));
        Assert.That(logger.Messages, Has.Some.Contains("records no run settings").And.Contains("seed"));
    }

    [TestCase("step", "-1", "field \"step\" is -1, below 0")]
    [TestCase("step", "2.5", "field \"step\" is 2.5, expected an integer")]
    [TestCase("step", "\"2\"", "field \"step\" is \"2\", expected an integer")]
    [TestCase("step", "99999999999", "field \"step\" is 99999999999, above 2")]
    [TestCase("step", null, "field \"step\" is missing")]
    [TestCase("total_steps", "0", "field \"total_steps\" is 0, below 1")]
    [TestCase("optimizer", "7", "field \"optimizer\" is 7, expected a string")]
    [TestCase("method", "\"dora\"", "field \"method\" \"dora\" is not full, lora or qlora")]
    [TestCase("tokens_seen", "-5", "field \"tokens_seen\" is -5, below 0")]
    [TestCase("dropout_seed", "-1", "field \"dropout_seed\" is -1, expected an integer >= 0")]
    [TestCase("data_position", "[]", "field \"data_position\" is array, expected an object")]
    [TestCase("steps", "{}", "field \"steps\" is object, expected an array")]
    [TestCase("skipped_steps", "[0]", "field \"skipped_steps[0]\" is 0, below 1")]
    [TestCase("settings", "{\"seed\": [1]}", "field \"settings.seed\" is Array, expected a number, string or boolean")]
    public void ABadTrainerStateFieldIsAFormatErrorNamingIt(string field, string? value, string expected)
    {
        using var dir = CliProcess.TempDir();
        string ckpt = Checkpoint(dir);
        string state = Path.Combine(ckpt, Trainer.StateFileName);
        var json = JsonNode.Parse(File.ReadAllText(state))!.AsObject();
        if (value is null) json.Remove(field);
        else json[field] = JsonNode.Parse(value);
        File.WriteAllText(state, json.ToJsonString());
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["again"], 4));
        var e = Assert.Throws<InvalidDataException>(() => trainer.Resume(ckpt))!;
        Assert.That(e.Message, Is.EqualTo($"{state}: {expected}"));
    }

    /// <summary>A NaN in a checkpoint's optimizer state (an fp32 moment) is refused on resume naming the file, tensor and
    /// element, before any step (it would make every later update NaN).</summary>
    [Test]
    public void ANonFiniteOptimizerStateIsRefusedOnResumeNamingTheTensor()
    {
        using var dir = CliProcess.TempDir();
        string ckpt = Checkpoint(dir);
        string path = Path.Combine(ckpt, Trainer.OptimizerFileName);
        List<SafetensorsTensor> tensors;
        string victim;
        using (var file = SafetensorsFile.Open(path))
        {
            victim = file.Tensors.First(t => t.DType == DType.F32 && t.Shape.Aggregate(1L, (a, b) => a * b) > 3).Name;
            tensors = file.Tensors.Select(t => new SafetensorsTensor(t.Name, t.DType, t.Shape, file.GetMemory(t.Name).ToArray())).ToList();
        }
        var bytes = tensors.Single(t => t.Name == victim).Data.ToArray();
        BitConverter.TryWriteBytes(bytes.AsSpan(3 * 4), float.NaN);
        tensors = tensors.Select(t => t.Name == victim ? new SafetensorsTensor(t.Name, t.DType, t.Shape, bytes) : t).ToList();
        SafetensorsWriter.Write(path, tensors, new Dictionary<string, string> { ["optimizer"] = "adamw" });
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["again"], 4));
        var e = Assert.Throws<InvalidDataException>(() => trainer.Resume(ckpt))!;
        Assert.That(e.Message, Does.StartWith($"{path}: {victim}: ").And.Contain("element 3 is NaN").And.EndWith("the optimizer state is not finite"));
    }

    /// <summary>
    /// --eval-batches N counts the eval batches that have something to predict: with the first batch fully masked,
    /// one eval batch is the second batch (a finite loss over its tokens), not the masked one (which gave NaN).
    /// </summary>
    [Test]
    public void EvalBatchesSkipBatchesWithoutTargets()
    {
        var data = TrainingKit.Data();
        var eval = data.Eval!;
        Assert.That(eval.Count, Is.GreaterThanOrEqualTo(8));
        // The first batch (4 rows) fully masked, the second as it is.
        var masked = eval.Take(4).Select(e => new TrainingExample(e.InputIds, [.. e.Labels.Select(_ => TrainingExample.IgnoreIndex)]))
            .Concat(eval.Skip(4).Take(4)).ToList();
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, data with { Eval = masked, ExactMatchProblems = null }, Options(dir["e"], 1) with { EvalBatches = 1 });
        var e = trainer.Evaluate();
        Assert.That(double.IsFinite(e.Loss), Is.True, "one batch with targets was evaluated");
        // The same as evaluating the second batch alone.
        using var model2 = TrainingKit.LoraModel(ops);
        using var alone = new Trainer(model2, data with { Eval = eval.Skip(4).Take(4).ToList(), ExactMatchProblems = null }, Options(dir["f"], 1));
        var expected = alone.Evaluate();
        Assert.That(e.Loss, Is.EqualTo(expected.Loss));
        Assert.That(e.Tokens, Is.EqualTo(expected.Tokens));
    }

    private sealed class ListLogger : ILogger<Trainer>
    {
        public List<string> Messages { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Messages.Add(formatter(state, exception));
    }
}
