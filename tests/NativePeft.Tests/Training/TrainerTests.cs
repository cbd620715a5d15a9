using System.Text.Json;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

public class LrScheduleTests
{
    // warmup 10, total 110: after warmup p = (step − 10) / 100
    [TestCase(LrScheduleKind.Constant, 0, 0.0)]
    [TestCase(LrScheduleKind.Constant, 5, 0.5)]
    [TestCase(LrScheduleKind.Constant, 10, 1.0)]
    [TestCase(LrScheduleKind.Constant, 109, 1.0)]
    [TestCase(LrScheduleKind.Linear, 0, 0.0)]
    [TestCase(LrScheduleKind.Linear, 3, 0.3)]
    [TestCase(LrScheduleKind.Linear, 10, 1.0)]
    [TestCase(LrScheduleKind.Linear, 35, 0.75)]
    [TestCase(LrScheduleKind.Linear, 60, 0.5)]
    [TestCase(LrScheduleKind.Linear, 110, 0.0)]
    [TestCase(LrScheduleKind.Cosine, 7, 0.7)]
    [TestCase(LrScheduleKind.Cosine, 10, 1.0)]
    [TestCase(LrScheduleKind.Cosine, 35, 0.85355339059327373)]  // ½(1 + cos(π/4))
    [TestCase(LrScheduleKind.Cosine, 60, 0.5)]                  // ½(1 + cos(π/2))
    [TestCase(LrScheduleKind.Cosine, 85, 0.14644660940672627)]  // ½(1 + cos(3π/4))
    [TestCase(LrScheduleKind.Cosine, 110, 0.0)]
    public void FactorByHand(LrScheduleKind kind, int step, double expected) =>
        Assert.That(LrSchedule.Factor(kind, step, 10, 110), Is.EqualTo(expected).Within(1e-15));

    [Test]
    public void NoWarmupStartsAtTheBaseRate()
    {
        Assert.That(LrSchedule.LearningRate(LrScheduleKind.Cosine, 2e-4, 0, 0, 100), Is.EqualTo(2e-4));
        Assert.That(LrSchedule.LearningRate(LrScheduleKind.Linear, 2e-4, 50, 0, 100), Is.EqualTo(1e-4).Within(1e-18));
        Assert.That(LrSchedule.Parse("COSINE"), Is.EqualTo(LrScheduleKind.Cosine));
        Assert.Throws<ArgumentException>(() => LrSchedule.Parse("step"));
    }

    [Test]
    public void TrainerUsesTheScheduleOfTheStepsTaken()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), new TrainerOptions
        {
            Steps = 4, BatchSize = 4, SeqLen = TrainingKit.Seq, Lr = 0.01, Schedule = LrScheduleKind.Linear, WarmupSteps = 2, OutputDir = dir["out"],
        });
        trainer.Train();
        // step k uses λ(k − 1): 0, 0.5, 1, then (4 − 3)/(4 − 2) = 0.5
        Assert.That(trainer.StepHistory.Select(s => s.Lr), Is.EqualTo(new[] { 0.0, 0.005, 0.01, 0.005 }).Within(1e-15));
    }
}

public class TrainerTests
{
    private static TrainerOptions Options(string outDir, int steps, int batch = 4, int accum = 1) => new()
    {
        Steps = steps, BatchSize = batch, GradAccum = accum, SeqLen = TrainingKit.Seq, Lr = 1e-2, Schedule = LrScheduleKind.Constant,
        MaxGradNorm = 1.0, OutputDir = outDir, Seed = 11, ExactMatchSamples = 4,
    };

    [Test]
    public void GradientAccumulationEqualsOneBigBatch()
    {
        using var dir = CliProcess.TempDir();
        // no shuffle: one batch of 8 holds the same examples as micro-batches 4 + 4 (of different token counts)
        var data = TrainingKit.Data(train: 32);
        var results = new List<(double[] Losses, float[][] Params)>();
        foreach (var (batch, accum) in new[] { (8, 1), (4, 2), (2, 4) })
        {
            using var ops = new CpuOps();
            using var model = TrainingKit.LoraModel(ops);
            using var trainer = new Trainer(model, data, Options(dir[$"o{batch}"], 3, batch, accum) with { Shuffle = false, MaxGradNorm = 0 });
            trainer.Train();
            results.Add((trainer.StepHistory.Select(s => s.Loss).ToArray(),
                model.TrainableParameters.Select(p => TrainingKit.Values(ops, p.Param)).ToArray()));
        }
        // the micro-batches really have different token counts, so mean-of-means would differ from the big batch
        var ex = data.Train.Take(8).Select(e => e.Labels.Skip(1).Count(l => l != -100)).ToArray();
        Assert.That(ex.Take(4).Sum(), Is.Not.EqualTo(ex.Skip(4).Sum()));
        for (int k = 1; k < results.Count; k++)
        {
            Assert.That(results[k].Losses, Is.EqualTo(results[0].Losses).Within(2e-6), $"losses, run {k}");
            for (int p = 0; p < results[0].Params.Length; p++)
                Assert.That(results[k].Params[p], Is.EqualTo(results[0].Params[p]).Within(2e-5), $"parameter {p}, run {k}");
        }
        Assert.That(results[0].Losses[2], Is.LessThan(results[0].Losses[0]), "the three steps trained something");
    }

    [Test]
    public void TrainingLowersTheLoss()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        // a base with larger weights (std 0.3): its random lm_head can express peaked distributions, so LoRA has room to learn
        using var model = TrainingKit.LoraModel(ops, dropout: 0.05, std: 0.3);
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["out"], 30, batch: 8) with { Lr = 2e-2 });
        var before = trainer.Evaluate();
        var result = trainer.Train();
        var losses = trainer.StepHistory.Select(s => s.Loss).ToArray();
        TestContext.Out.WriteLine("losses: " + string.Join(" ", losses.Select(l => l.ToString("F3"))));
        TestContext.Out.WriteLine($"eval: {result.FinalEval}");
        double first = losses.Take(3).Average(), last = losses.TakeLast(5).Average();
        Assert.That(last, Is.LessThan(first - 1.0), $"mean loss of the first 3 steps {first:F3}, of the last 5 {last:F3}");
        Assert.That(result.FinalEval!.Loss, Is.LessThan(before.Loss - 1.0), $"eval loss before {before.Loss:F3}, after {result.FinalEval.Loss:F3}");
        Assert.That(before.Step, Is.EqualTo(0));
        Assert.That(result.FinalEval.ExactMatchCount, Is.EqualTo(4));
    }

    [Test]
    public void ResumeReproducesTheUninterruptedRunBitForBit([Values("adamw", "adamw8bit")] string optimizer)
    {
        using var dir = CliProcess.TempDir();
        var data = TrainingKit.Data();
        TrainerOptions O(string outDir) => Options(outDir, 6, batch: 4, accum: 2) with
        {
            SaveEvery = 3, Optimizer = optimizer, Schedule = LrScheduleKind.Cosine, WarmupSteps = 2, EvalEvery = 2,
        };
        double[] full;
        float[][] fullParams;
        using (var ops = new CpuOps())
        using (var model = TrainingKit.LoraModel(ops, dropout: 0.1))
        using (var trainer = new Trainer(model, data, O(dir["a"])))
        {
            trainer.Train();
            full = trainer.StepHistory.Select(s => s.Loss).ToArray();
            fullParams = model.TrainableParameters.Select(p => TrainingKit.Values(ops, p.Param)).ToArray();
            Assert.That(Directory.Exists(Path.Combine(dir["a"], "checkpoint-3")));
            Assert.That(Directory.Exists(Path.Combine(dir["a"], "checkpoint-6")));
        }
        using (var ops = new CpuOps())
        using (var model = TrainingKit.LoraModel(ops, dropout: 0.1, seed: 7))
        using (var trainer = new Trainer(model, data, O(dir["b"])))
        {
            trainer.Resume(Path.Combine(dir["a"], "checkpoint-3"));
            Assert.That(trainer.Step, Is.EqualTo(3));
            trainer.Train();
            var resumed = trainer.StepHistory.Select(s => s.Loss).ToArray();
            Assert.That(resumed, Has.Length.EqualTo(6));
            for (int k = 3; k < 6; k++)
                Assert.That(BitConverter.DoubleToInt64Bits(resumed[k]), Is.EqualTo(BitConverter.DoubleToInt64Bits(full[k])),
                    $"step {k + 1}: resumed {resumed[k]:R}, uninterrupted {full[k]:R}");
            Assert.That(resumed.Take(3), Is.EqualTo(full.Take(3)), "steps 1–3 restored from the checkpoint's state");
            var p = model.TrainableParameters.Select(t => TrainingKit.Values(ops, t.Param)).ToArray();
            for (int i = 0; i < p.Length; i++) Assert.That(p[i], Is.EqualTo(fullParams[i]), $"parameter {i} after step 6");
        }
    }

    [Test]
    public void FullFineTuningCheckpointsAndResumes()
    {
        using var dir = CliProcess.TempDir();
        var data = TrainingKit.Data();
        LlamaModel Full(CpuOps ops) => LlamaModel.CreateRandom(TrainingKit.Config, ops, new LlamaModelOptions { FullFineTuning = true }, 3, 0.1);
        double[] full;
        using (var ops = new CpuOps())
        using (var model = Full(ops))
        using (var trainer = new Trainer(model, data, Options(dir["a"], 4) with { SaveEvery = 2, Lr = 1e-3 }))
        {
            var r = trainer.Train();
            full = trainer.StepHistory.Select(s => s.Loss).ToArray();
            Assert.That(File.Exists(Path.Combine(dir["a"], "checkpoint-2", Trainer.FullModelFileName)));
            Assert.That(r.FinalOutput, Is.EqualTo(Path.Combine(dir["a"], "model")));
            using var ck = HfCheckpoint.Open(r.FinalOutput!);
            using var reloaded = LlamaModel.Load(ck, ops, new LlamaModelOptions());
            Assert.That(TrainingKit.Values(ops, reloaded.EmbedTokens), Is.EqualTo(TrainingKit.Values(ops, model.EmbedTokens)));
        }
        using (var ops = new CpuOps())
        using (var model = Full(ops))
        using (var trainer = new Trainer(model, data, Options(dir["b"], 4) with { SaveEvery = 2, Lr = 1e-3 }))
        {
            trainer.Resume(Path.Combine(dir["a"], "checkpoint-2"));
            trainer.Train();
            Assert.That(trainer.StepHistory.Select(s => s.Loss), Is.EqualTo(full), "bit for bit");
        }
    }

    [Test]
    public void HugeLearningRateStopsWithTheStepNamed()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["out"], 10) with { Lr = 1e30, MaxGradNorm = 0 });
        var e = Assert.Throws<TrainingDivergedException>(() => trainer.Train())!;
        TestContext.Out.WriteLine(e.Message);
        Assert.That(e.Step, Is.GreaterThan(1).And.LessThanOrEqualTo(10));
        Assert.That(e.Message, Does.StartWith($"step {e.Step}: "));
        Assert.That(e.Message, Does.Contain("No checkpoint"));
        Assert.That(trainer.Step, Is.EqualTo(e.Step - 1), "the diverged step's update is not applied");
    }

    [Test]
    public void InjectedNaNStopsAtThatStepAndNamesTheLastCheckpoint()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["out"], 6) with { SaveEvery = 2 });
        trainer.AfterBackward = step =>
        {
            if (step == 3) ops.Upload<float>([float.NaN], model.TrainableParameters[5].Grad.Slice(0, 1));
        };
        var e = Assert.Throws<TrainingDivergedException>(() => trainer.Train())!;
        string ckpt = Path.Combine(dir["out"], "checkpoint-2");
        Assert.That(e.Step, Is.EqualTo(3));
        Assert.That(e.What, Is.EqualTo("the gradient norm"));
        Assert.That(e.LastCheckpoint, Is.EqualTo(ckpt));
        Assert.That(e.Message, Does.Contain("step 3").And.Contain(ckpt));
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["out"], Trainer.MetricsFileName)));
        Assert.That(doc.RootElement.GetProperty("steps").GetArrayLength(), Is.EqualTo(2), "metrics.json has the two good steps");
    }

    [Test]
    public void MetricsJsonAndTheFinalAdapter()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        var progress = new List<TrainerProgress>();
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["out"], 4) with { EvalEvery = 2, EvalBatches = 1 },
            progress: new SyncProgress<TrainerProgress>(progress.Add));
        var result = trainer.Train();

        using var doc = JsonDocument.Parse(File.ReadAllText(result.MetricsPath));
        var root = doc.RootElement;
        var steps = root.GetProperty("steps").EnumerateArray().ToList();
        Assert.That(steps.Select(s => s.GetProperty("step").GetInt32()), Is.EqualTo(new[] { 1, 2, 3, 4 }));
        for (int i = 0; i < 4; i++)
        {
            Assert.That(steps[i].GetProperty("loss").GetDouble(), Is.EqualTo(trainer.StepHistory[i].Loss), "round trip");
            Assert.That(steps[i].GetProperty("lr").GetDouble(), Is.EqualTo(1e-2));
            Assert.That(steps[i].GetProperty("tokens_per_s").GetDouble(), Is.GreaterThan(0));
            Assert.That(steps[i].GetProperty("peak_bytes").GetInt64(), Is.GreaterThanOrEqualTo(model.ParameterBytes));
            Assert.That(steps[i].GetProperty("grad_norm").GetDouble(), Is.GreaterThan(0));
        }
        var evals = root.GetProperty("eval").EnumerateArray().ToList();
        Assert.That(evals.Select(e => e.GetProperty("step").GetInt32()), Is.EqualTo(new[] { 2, 4 }));
        foreach (var e in evals)
        {
            Assert.That(e.GetProperty("perplexity").GetDouble(), Is.EqualTo(Math.Exp(e.GetProperty("loss").GetDouble())).Within(1e-9).Percent);
            Assert.That(e.GetProperty("exact_match").GetDouble(), Is.InRange(0, 1));
            Assert.That(e.GetProperty("exact_match_count").GetInt32(), Is.EqualTo(4));
        }
        var config = root.GetProperty("config");
        Assert.That(config.GetProperty("batch").GetInt32(), Is.EqualTo(4));
        Assert.That(config.GetProperty("lora").GetProperty("r").GetInt32(), Is.EqualTo(4));
        Assert.That(config.GetProperty("optimizer").GetString(), Is.EqualTo("adamw"));

        Assert.That(progress.Select(p => p.Step), Is.EqualTo(new[] { 1, 2, 3, 4 }));
        Assert.That(progress[1].Eval, Is.Not.Null);
        Assert.That(progress[0].Eval, Is.Null);

        // the final adapter reloads into a fresh model to the same loss, bit for bit
        var adapter = PeftAdapter.Load(result.FinalOutput!);
        using var fresh = TrainingKit.LoraModel(ops, seed: 12345);
        adapter.ApplyTo(fresh);
        var (ids, labels) = (trainer.Data.Eval![0].InputIds, trainer.Data.Eval![0].Labels);
        model.Dropout.Training = fresh.Dropout.Training = false;
        Assert.That(fresh.Forward(ids, labels, 1, ids.Length), Is.EqualTo(model.Forward(ids, labels, 1, ids.Length)));
    }

    [Test]
    public void EvaluateWeighsBatchesByTokensAndGreedyGenerationAgreesWithTheLogits()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        var data = TrainingKit.Data(eval: 5);
        using var trainer = new Trainer(model, data, Options(dir["out"], 1) with { BatchSize = 2 });
        var m = trainer.Evaluate();
        model.Dropout.Training = false;
        double sum = 0;
        long n = 0;
        foreach (var e in data.Eval!)
        {
            sum += model.Forward(e.InputIds, e.Labels, 1, e.InputIds.Length) * model.LastTokenCount;
            n += model.LastTokenCount;
        }
        Assert.That(m.Tokens, Is.EqualTo(n));
        Assert.That(m.Loss, Is.EqualTo(sum / n).Within(1e-5));

        // greedy: every generated token is the argmax of the model's logits at the position before it
        var prompt = ByteTokenizer.Instance.Encode("reverse: abc\n", true);
        var gen = Trainer.GreedyGenerate(model, prompt, 4, null);
        Assert.That(gen, Has.Length.EqualTo(4));
        var all = prompt.Concat(gen).ToArray();
        model.Forward(all, Enumerable.Repeat(-100, all.Length).ToArray(), 1, all.Length);
        var logits = ops.Memory.Allocate(Numerics.DType.F32, all.Length, TrainingKit.Config.VocabSize);
        try
        {
            model.Logits(logits);
            var v = TrainingKit.Values(ops, logits);
            int V = TrainingKit.Config.VocabSize;
            for (int k = 0; k < gen.Length; k++)
            {
                int row = prompt.Length - 1 + k;
                var span = v.AsSpan(row * V, V);
                int arg = 0;
                for (int j = 1; j < V; j++) if (span[j] > span[arg]) arg = j;
                Assert.That(gen[k], Is.EqualTo(arg), $"token {k}");
            }
        }
        finally { ops.Memory.Free(logits); }
    }

    [Test]
    public void CancellationSavesACheckpointOfTheCurrentStep()
    {
        using var dir = CliProcess.TempDir();
        using var ops = new CpuOps();
        using var model = TrainingKit.LoraModel(ops);
        using var cts = new CancellationTokenSource();
        using var trainer = new Trainer(model, TrainingKit.Data(), Options(dir["out"], 10),
            progress: new SyncProgress<TrainerProgress>(p => { if (p.Step == 2) cts.Cancel(); }));
        var r = trainer.Train(cts.Token);
        Assert.That(r.Cancelled);
        Assert.That(r.Steps, Is.EqualTo(2));
        Assert.That(r.LastCheckpoint, Is.EqualTo(Path.Combine(dir["out"], "checkpoint-2")));
        Assert.That(File.Exists(Path.Combine(r.LastCheckpoint!, Trainer.StateFileName)));
        Assert.That(Directory.EnumerateFileSystemEntries(dir["out"]).Select(Path.GetFileName), Is.EquivalentTo(new[] { "checkpoint-2", "metrics.json" }),
            "no temporary folder left behind");
    }
}

/// <summary>Reports on the calling thread.</summary>
internal sealed class SyncProgress<T>(Action<T> report) : IProgress<T>
{
    public void Report(T value) => report(value);
}
