using Microsoft.Extensions.Logging;
using NativePeft.Data;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>Examples whose trainable tokens truncation cuts off (an Alpaca prompt longer than the sequence length).</summary>
[Parallelizable(ParallelScope.None)]
public class TruncationTests
{
    /// <summary>Alpaca records on the built-in model (byte tokens): <paramref name="longOnes"/> with a prompt of ~380 tokens, then <paramref name="shortOnes"/> of ~145 (the template alone is over 128).</summary>
    internal static string WriteAlpaca(TempDir dir, int longOnes, int shortOnes, int words = 40)
    {
        string longInstruction = string.Join(' ', Enumerable.Repeat("spell", words));
        var lines = Enumerable.Range(0, longOnes).Select(i => "{\"instruction\": \"" + longInstruction + " " + i + "\", \"input\": \"\", \"output\": \"ok\"}")
            .Concat(Enumerable.Range(0, shortOnes).Select(i => "{\"instruction\": \"say " + i + "\", \"input\": \"\", \"output\": \"" + i + "\"}"));
        File.WriteAllLines(dir["alpaca.jsonl"], lines);
        return dir["alpaca.jsonl"];
    }

    private sealed class ListLogger : ILogger
    {
        public List<(LogLevel Level, string Text)> Lines { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Lines.Add((logLevel, formatter(state, exception)));
    }

    [Test]
    public void TheReportFindsTheLengthThatKeepsTheFirstTarget()
    {
        int M = TrainingExample.IgnoreIndex;
        var examples = new[]
        {
            new TrainingExample([1, 2, 3, 4, 5], [M, M, M, M, 5]),  // first target at 4: needs 5
            new TrainingExample([1, 2, 3], [1, 2, 3]),              // at 1: needs 2 (label 0 is never a target)
            new TrainingExample([1, 2], [M, M]),                    // none
        };
        var r = TruncationReport.Check(examples, 4);
        Assert.That((r.CutOff, r.WithoutTargets, r.Trainable, r.SeqLenForAll), Is.EqualTo((1, 1, 1, 5)));
        Assert.That(TruncationReport.Check(examples, 5).CutOff, Is.Zero);
    }

    [Test]
    public void AllTargetsCutOffIsAnErrorNamingSeqLenAndTheLengthThatFits()
    {
        using var dir = CliProcess.TempDir();
        // 15 words: the prompt passes 128 tokens, and the length that fits stays within the built-in model's 256 positions.
        var options = new FineTuneOptions { Data = WriteAlpaca(dir, 3, 0, words: 15), Steps = 2, BatchSize = 1, OutputDir = dir["out"] };
        var e = Assert.Throws<FineTuneException>(() => FineTune.Create(options).Dispose())!;
        Assert.That(e.Option, Is.EqualTo("SeqLen"));
        Assert.That(e.Detail, Does.StartWith("128: ").And.Contain("a sequence length of"));
        int fits = int.Parse(e.Detail.Split("a sequence length of ")[1].Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        Assert.That(fits, Is.GreaterThan(128));
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
        using var ok = FineTune.Create(options with { SeqLen = fits });
        Assert.That(ok.Truncation!.CutOff, Is.Zero, "the length named keeps every example's first trainable token");
    }

    [Test]
    public void SomeCutOffIsWarnedAndAnEmptyStepIsNotANaNLoss()
    {
        using var dir = CliProcess.TempDir();
        var logger = new ListLogger();
        using var run = FineTune.Create(new FineTuneOptions { Data = WriteAlpaca(dir, 2, 2), Steps = 4, BatchSize = 1, SeqLen = 200, OutputDir = dir["out"] }, logger);
        Assert.That(run.Truncation!.CutOff, Is.EqualTo(2));
        Assert.That(logger.Lines.Where(l => l.Level == LogLevel.Warning).Select(l => l.Text), Has.Some.Contains("2 of 4 training examples"));
        var reports = new List<TrainerProgress>();
        run.CreateTrainer(progress: new SyncProgress(reports.Add));
        run.Train();
        Assert.That(reports, Has.Count.EqualTo(4));
        Assert.That(reports.Count(p => p.NoTrainableTokens), Is.EqualTo(2), "one epoch at batch 1: the two cut-off examples give empty steps");
        Assert.That(reports.Where(p => !p.NoTrainableTokens).Select(p => p.Loss), Has.All.Matches<double>(double.IsFinite));
    }

    private sealed class SyncProgress(Action<TrainerProgress> action) : IProgress<TrainerProgress>
    {
        public void Report(TrainerProgress value) => action(value);
    }
}
