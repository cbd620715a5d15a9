using System.Diagnostics;
using System.Text.Json;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>
/// End to end on the SHIPPED built-in model (builtin-model/ next to the assemblies) and the built-in task
/// (<see cref="BuiltinModel.TaskOptions"/>: upper: w → W), on the CPU. Numbers measured when the model was made are in
/// docs/builtin-model.md; the thresholds here leave wide margins below them (the runs are deterministic on the CPU).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class BuiltinEndToEndTests
{
    /// <summary>Exact match of the base before fine-tuning must be at most this (measured: 0 of 100).</summary>
    public const double MaxExactMatchBefore = 0.02;
    /// <summary>Exact match after <see cref="Steps"/> LoRA steps must be at least this (measured: see docs).</summary>
    public const double MinExactMatchAfter = 0.6;
    /// <summary>|QLoRA final eval loss − LoRA final eval loss| must be at most this (nats per answer token).</summary>
    public const double QloraLossMargin = 0.15;
    public const int Steps = 300;
    public const int ExactMatchSamples = 100;

    private static TrainingData Data() => TrainingData.Builtin(BuiltinTask.Generate(BuiltinModel.TaskOptions), ByteTokenizer.Instance);

    private static LlamaModelOptions ModelOptions(bool qlora) => new()
    {
        Seed = 0,
        Lora = new LoraSettings { Rank = 16, Alpha = 32, Dropout = 0, TargetModules = LoraSettings.KnownTargets },
        Quantization = qlora ? BaseQuantization.Nf4 : BaseQuantization.None,
        BaseWeightDType = qlora ? null : DType.BF16,
    };

    private static TrainerOptions TrainerOptions(string output) => new()
    {
        Steps = Steps, Lr = 3e-3, BatchSize = 16, SeqLen = 24, WarmupSteps = 15, Schedule = LrScheduleKind.Cosine,
        ExactMatchSamples = ExactMatchSamples, OutputDir = output, Seed = 0,
    };

    private sealed record Run(EvalMetrics Before, EvalMetrics After, string Adapter, double Seconds);

    private static Run FineTune(bool qlora, string output)
    {
        var clock = Stopwatch.StartNew();
        using var ck = HfCheckpoint.Open(BuiltinModel.Require());
        using var ops = new CpuOps();
        using var model = LlamaModel.Load(ck, ops, ModelOptions(qlora));
        using var trainer = new Trainer(model, Data(), TrainerOptions(output));
        var before = trainer.Evaluate();
        var result = trainer.Train();
        var after = result.FinalEval!;
        TestContext.Out.WriteLine($"{(qlora ? "qlora" : "lora")}: eval loss {before.Loss:F4} -> {after.Loss:F4}, exact match " +
            $"{before.ExactMatch:P1} -> {after.ExactMatch:P1} of {after.ExactMatchCount}, {clock.Elapsed.TotalSeconds:F1} s");
        return new Run(before, after, result.FinalOutput!, clock.Elapsed.TotalSeconds);
    }

    [Test]
    public void ShippedModelIsSmallBf16AndUsesTheByteTokenizer()
    {
        string dir = BuiltinModel.Require();
        using var ck = HfCheckpoint.Open(dir);
        Assert.That(ck.Config.VocabSize, Is.EqualTo(ByteTokenizer.Size));
        Assert.That(ck.Config.ParameterCount(), Is.LessThan(5_000_000));
        Assert.That(ck.TensorNames.All(n => ck.GetInfo(n).DType == DType.BF16), Is.True);
        Assert.That(new FileInfo(Path.Combine(dir, HfCheckpoint.SingleFileName)).Length, Is.LessThan(10L << 20));
        Assert.That(TokenizerLoader.FromFolder(dir), Is.SameAs(ByteTokenizer.Instance));
    }

    [Test]
    public void LoraAndQloraLearnTheBuiltinTaskAndTheAdapterReloads()
    {
        using var dir = CliProcess.TempDir();
        var lora = FineTune(qlora: false, dir["lora"]);
        Assert.That(lora.Before.ExactMatch, Is.LessThanOrEqualTo(MaxExactMatchBefore), "the base must not already do the task");
        Assert.That(lora.After.ExactMatch, Is.GreaterThanOrEqualTo(MinExactMatchAfter));
        Assert.That(lora.After.Loss, Is.LessThan(lora.Before.Loss * 0.1), "eval loss must fall well below its start");

        var qlora = FineTune(qlora: true, dir["qlora"]);
        Assert.That(qlora.Before.ExactMatch, Is.LessThanOrEqualTo(MaxExactMatchBefore));
        Assert.That(qlora.After.ExactMatch, Is.GreaterThanOrEqualTo(MinExactMatchAfter));
        Assert.That(qlora.After.Loss, Is.LessThan(qlora.Before.Loss * 0.1));
        Assert.That(Math.Abs(qlora.After.Loss - lora.After.Loss), Is.LessThanOrEqualTo(QloraLossMargin),
            $"QLoRA {qlora.After.Loss:F4} vs LoRA {lora.After.Loss:F4}");

        // The saved adapter, loaded onto a fresh copy of the base, gives the same eval loss bit for bit.
        using var ck = HfCheckpoint.Open(BuiltinModel.Require());
        using var ops = new CpuOps();
        using var model = LlamaModel.Load(ck, ops, ModelOptions(qlora: false));
        PeftAdapter.Load(lora.Adapter).ApplyTo(model);
        using var trainer = new Trainer(model, Data(), TrainerOptions(dir["reload"]) with { ExactMatchSamples = 20 });
        var reloaded = trainer.Evaluate();
        Assert.That(reloaded.Loss, Is.EqualTo(lora.After.Loss));
    }

    [Test]
    public void CliTrainsTheBuiltinModelOnTheBuiltinTask()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run("train", "--model", "builtin", "--data", "builtin", "--method", "lora", "--steps", "300", "--lr", "3e-3",
            "--batch", "16", "--seq", "24", "--warmup", "15", "--dropout", "0", "--out", dir["out"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("exact match"));
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["out"], "metrics.json")));
        var eval = doc.RootElement.GetProperty("eval").EnumerateArray().Last();
        Assert.That(eval.GetProperty("exact_match").GetDouble(), Is.GreaterThanOrEqualTo(MinExactMatchAfter), r.Stdout);
        Assert.That(PeftAdapter.Load(Path.Combine(dir["out"], "adapter")).Modules, Has.Count.EqualTo(4 * 7));
    }
}
