using System.Reflection;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Planning;
using NativePeft.Tests.Cli;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Training;

/// <summary>The embedding API (<see cref="FineTune"/>) and the docs/embedding.md sample.</summary>
[Parallelizable(ParallelScope.None)]
public class FineTuneTests
{
    /// <summary>The source checkout above the test assembly, or null (the self-contained GPU bundle has none).</summary>
    private static string? RepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "NativePeft.sln"))) return dir.FullName;
        return null;
    }

    [Test]
    public void TheDocsShowTheSampleFileWordForWord()
    {
        string root = RepoRoot() ?? throw new IgnoreException("not in a source checkout (no NativePeft.sln above the tests): docs/ and samples/ are not here");
        string doc = File.ReadAllText(Path.Combine(root, "docs", "embedding.md")).ReplaceLineEndings("\n");
        const string open = "```csharp\n";
        int start = doc.IndexOf(open, StringComparison.Ordinal) + open.Length;
        int end = doc.IndexOf("```", start, StringComparison.Ordinal);
        string shown = doc[start..end];
        string program = File.ReadAllText(Path.Combine(root, "samples", "NativePeft.Sample", "Program.cs")).ReplaceLineEndings("\n");
        Assert.That(shown, Is.EqualTo(program), "docs/embedding.md shows samples/NativePeft.Sample/Program.cs word for word");
        Assert.That(program.Split('\n').Count(l => l.Trim().Length > 0 && !l.TrimStart().StartsWith("//", StringComparison.Ordinal)), Is.LessThan(40), "a few lines");
    }

    [Test]
    public void TheSampleFineTunesAndItsAdapterLowersTheLoss()
    {

        // Run the sample's own entry point (the compiled Program.cs) for 40 steps.
        using var dir = CliProcess.TempDir();
        var entry = Assembly.Load("NativePeft.Sample").EntryPoint!;
        object? rc = entry.Invoke(null, [new[] { dir["run"], "40" }]);
        Assert.That(rc, Is.EqualTo(0));
        string adapterDir = Path.Combine(dir["run"], "my-adapter");
        Assert.That(File.Exists(Path.Combine(adapterDir, "adapter_config.json")) && File.Exists(Path.Combine(adapterDir, "adapter_model.safetensors")));

        // The adapter, loaded onto a fresh QLoRA base, gives the sample's final eval loss, far below the base's.
        var adapter = PeftAdapter.Load(adapterDir);
        Assert.That(adapter.Config.R, Is.EqualTo(16));
        using var run = FineTune.Create(new FineTuneOptions { Model = "builtin", Data = "builtin", Method = FineTuneMethod.Qlora, Steps = 1, BatchSize = 16, SeqLen = 24 });
        double baseLoss = run.Evaluate().Loss;
        adapter.ApplyTo(run.Model);
        double tuned = run.Evaluate().Loss;
        using var metrics = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir["run"], "metrics.json")));
        double sampleFinal = metrics.RootElement.GetProperty("eval").EnumerateArray().Last().GetProperty("loss").GetDouble();
        Assert.That(tuned, Is.EqualTo(sampleFinal).Within(1e-9 * sampleFinal), "the saved adapter reproduces the run's final eval loss");
        Assert.That(tuned, Is.LessThan(baseLoss * 0.5), $"base {baseLoss}, with the adapter {tuned}");
    }

    private sealed class ListLogger : ILogger
    {
        public List<string> Lines { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Lines.Add(formatter(state, exception));
    }

    [Test]
    public void TrainLogsToTheHostsLoggerAndReportsItsNumbers()
    {
        var logger = new ListLogger();
        using var dir = CliProcess.TempDir();
        using var run = FineTune.Create(new FineTuneOptions { Data = "builtin", Method = FineTuneMethod.Lora, Steps = 2, BatchSize = 4, SeqLen = 24, OutputDir = dir["o"] }, logger);
        var result = run.Train();
        Assert.That(result.Steps, Is.EqualTo(2));
        Assert.That(logger.Lines.Count(l => l.StartsWith("step ", StringComparison.Ordinal)), Is.EqualTo(2), string.Join("\n", logger.Lines));
        Assert.That(logger.Lines, Has.Some.StartsWith("step 2/2"));
        Assert.That(Directory.Exists(Path.Combine(dir["o"], "adapter")));
        // LoRA r 16 on seven projections of 4 layers: r · (in + out) each (hidden 128, q 128, k/v 64, intermediate 352)
        long perLayer = 16L * ((128 + 128) + (128 + 64) * 2 + (128 + 128) + (128 + 352) * 2 + (352 + 128));
        Assert.That(run.TrainableParameterCount, Is.EqualTo(4 * perLayer));
        Assert.That(run.TotalParameterCount, Is.EqualTo(804_736 + 4 * perLayer));
        Assert.That(run.PeakAllocatedBytes, Is.GreaterThan(run.BaseWeightBytes));
    }

    private static FineTuneException Throws(Action action) => Assert.Throws<FineTuneException>(() => action())!;

    [Test]
    public void OptionErrorsNameTheOption()
    {
        var ok = new FineTuneOptions { Data = "builtin", Steps = 1 };
        Assert.DoesNotThrow(() => FineTune.ValidateOptions(ok));
        Assert.That(Throws(() => FineTune.ValidateOptions(ok with { Lora = new LoraSettings { Rank = 0 } })).Option, Is.EqualTo("Rank"));
        Assert.That(Throws(() => FineTune.ValidateOptions(ok with { Epochs = 1 })).Option, Is.EqualTo("Steps"));
        Assert.That(Throws(() => FineTune.ValidateOptions(ok with { Device = "tpu" })).Option, Is.EqualTo("Device"));
        Assert.That(Throws(() => FineTune.ValidateOptions(ok with { Optimizer = "sgd" })).Option, Is.EqualTo("Optimizer"));
        Assert.That(Throws(() => FineTune.ValidateOptions(ok with { SeqLen = 1 })).Option, Is.EqualTo("SeqLen"));
        var targets = Throws(() => FineTune.ValidateOptions(ok with { Lora = new LoraSettings { TargetModules = ["q_proj", "qq_proj"] } }));
        Assert.That(targets.Option, Is.EqualTo("TargetModules"));
        Assert.That(targets.Message, Does.Contain("qq_proj"));
        Assert.DoesNotThrow(() => FineTune.ValidateOptions(ok with { Method = FineTuneMethod.Full, Lora = new LoraSettings { Rank = 0 } }), "full FT ignores LoRA settings");
    }

    [Test]
    public void FileErrorsNameTheFileAndWriteNothing()
    {
        using var dir = CliProcess.TempDir();
        var ok = new FineTuneOptions { Data = "builtin", Steps = 1, OutputDir = dir["out"] };
        var missing = Throws(() => FineTune.Create(ok with { Model = dir["nope"] }).Dispose());
        Assert.That((missing.Option, missing.Detail), Is.EqualTo(("Model", $"{dir["nope"]}: folder not found")));
        Directory.CreateDirectory(dir["empty"]);
        var empty = Throws(() => FineTune.Create(ok with { Model = dir["empty"] }).Dispose());
        Assert.That(empty.Message, Does.Contain("config.json"));
        Assert.That(Throws(() => FineTune.Create(ok with { Data = dir["x.jsonl"] }).Dispose()).Option, Is.EqualTo("Data"));

        var lines = Enumerable.Range(0, 5).Select(i => "{\"instruction\": \"say " + i + "\", \"output\": \"" + i + "\"}").ToList();
        lines[3] = "{\"instruction\": 5}";
        File.WriteAllLines(dir["a.jsonl"], lines);
        var bad = Throws(() => FineTune.Create(ok with { Data = dir["a.jsonl"] }).Dispose());
        Assert.That(bad.Option, Is.EqualTo("Data"));
        Assert.That(bad.Detail, Does.Contain("a.jsonl:4"));
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written on bad input");

        // SeqLen 160: the Alpaca template alone is over 128 byte tokens (at 128 every response would be cut off).
        using var skip = FineTune.Create(ok with { Data = dir["a.jsonl"], OnBadLine = BadLinePolicy.Skip, SeqLen = 160 });
        Assert.That(skip.SkippedLines, Is.EqualTo(1));
        Assert.That(skip.SkippedMessages.Single(), Does.Contain("a.jsonl:4"));
        Assert.That(skip.Data!.Train, Has.Count.EqualTo(4));
        // Create only takes the folder's lock (the run holds the folder until Dispose); Train writes the results.
        Assert.That(Directory.GetFileSystemEntries(dir["out"]).Select(Path.GetFileName), Is.EqualTo(new[] { OutputLock.FileName }));
        skip.Dispose();
        Assert.That(Directory.Exists(dir["out"]), Is.False, "the lock and the folder it created go with Dispose");
    }
}
