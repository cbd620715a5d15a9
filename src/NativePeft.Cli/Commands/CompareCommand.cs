using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Logging.Abstractions;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Optim;
using NativePeft.Planning;
using NativePeft.Training;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft compare`: fine-tunes one model on one dataset with each method (full, LoRA, QLoRA) from the same seed
/// and measures what the LoRA-vs-QLoRA articles claim: base-weight bytes, peak memory (the ops' memory pool and the
/// process's peak RSS), tokens/s and time per step, speed relative to LoRA, final eval loss, exact match on the
/// built-in task, trainable parameters and their share, and the adapter file size. Prints the table and writes
/// report.md, metrics.json and compare.png into --out (docs/compare.md). Every input is checked before --out is
/// created; a run that fails midway removes what it wrote.
/// </summary>
public static class CompareCommand
{
    public const string ReportFileName = "report.md";
    public const string MetricsFileName = "metrics.json";
    public const string PlotFileName = "compare.png";
    public const string DefaultOut = "out/compare";
    public static readonly string[] MethodNames = ["full", "lora", "qlora"];
    /// <summary>Full fine-tuning's default learning rate is --lr divided by this (lower than LoRA's, as practitioners use).</summary>
    public const double FullLrDivisor = 2;

    /// <summary>The parsed options (the defaults are the command's).</summary>
    public sealed record Args
    {
        public string Model { get; init; } = BuiltinModel.Name;
        public string Data { get; init; } = BuiltinTask.DataName;
        public string? EvalData { get; init; }
        /// <summary>The options given explicitly (<see cref="TrainCommand.GivenOptions"/>); each must be used by the run.</summary>
        public IReadOnlySet<string> Given { get; init; } = new HashSet<string>();
        public string Methods { get; init; } = "full,lora,qlora";
        public int Rank { get; init; } = 16;
        public double Alpha { get; init; } = 32;
        public double Dropout { get; init; }
        public string Targets { get; init; } = string.Join(',', LoraSettings.KnownTargets);
        public int Steps { get; init; } = 500;
        public double Lr { get; init; } = 2e-3;
        /// <summary>--lr-full: full fine-tuning's peak learning rate; null for <see cref="Lr"/> / <see cref="FullLrDivisor"/>.</summary>
        public double? LrFull { get; init; }
        /// <summary>The peak learning rate full fine-tuning runs with: --lr-full, or half of --lr (docs/compare.md
        /// "The defaults": at 3e-3 full FT on the built-in task ended anywhere from 59 % to 100 % exact match across
        /// seeds, at 1e-3 at 100 % on every seed, on the CPU in fp32 and on the emulator in bf16).</summary>
        public double FullLr => LrFull ?? Lr / FullLrDivisor;
        public int Warmup { get; init; } = 30;
        public int Batch { get; init; } = 16;
        public int Seq { get; init; } = 24;
        /// <summary>--pack: several examples per row, each its own document (<see cref="BatchMode.Packing"/>).</summary>
        public bool Pack { get; init; }
        public int Seed { get; init; }
        public string Optim { get; init; } = "adamw";
        public int ExactMatchSamples { get; init; } = 100;
        public string Device { get; init; } = "cpu";
        /// <summary>--precision: auto (bf16 on a GPU device, fp32 on cpu), bf16 or fp32.</summary>
        public string Precision { get; init; } = "auto";
        /// <summary>--device-memory: each method's limit of device memory (a size), null for the device's free memory.</summary>
        public string? DeviceMemory { get; init; }
        public string Out { get; init; } = DefaultOut;
        public BadLinePolicy OnBadLine { get; init; } = BadLinePolicy.Stop;
        /// <summary>The command line, for the report.</summary>
        public string CommandLine { get; init; } = "nativepeft compare";
    }

    public static Command Create(TextWriter stdout)
    {
        var d = new Args();
        var model = new Option<string>("--model") { Description = "HF Llama checkpoint folder, or 'builtin' (the shipped 0.8M-parameter model)", DefaultValueFactory = _ => d.Model };
        var data = new Option<string>("--data") { Description = "dataset file (pre-tokenized/text/alpaca/chat JSONL, .txt) or 'builtin' (upper: word -> WORD)", DefaultValueFactory = _ => d.Data };
        var evalData = new Option<string?>("--eval-data") { Description = "eval dataset file for the eval loss (the built-in task has its own held-out split)" };
        var methods = new Option<string>("--methods") { Description = "comma-separated: full, lora, qlora", DefaultValueFactory = _ => d.Methods };
        var (rank, alpha, dropout, targets) = TrainCommand.LoraOptionGroup(d.Rank, d.Alpha, d.Dropout, d.Targets);
        var steps = new Option<int>("--steps") { Description = "optimizer steps of each method", DefaultValueFactory = _ => d.Steps };
        var lr = new Option<double>("--lr") { Description = "peak learning rate of LoRA and QLoRA (full fine-tuning: --lr-full, by default half of it)", DefaultValueFactory = _ => d.Lr };
        var lrFull = new Option<double?>("--lr-full") { Description = "peak learning rate of full fine-tuning (default: half of --lr)" };
        var warmup = new Option<int>("--warmup") { Description = "linear warmup steps, then cosine to 0", DefaultValueFactory = _ => d.Warmup };
        var batch = new Option<int>("--batch") { Description = "rows per step", DefaultValueFactory = _ => d.Batch };
        var seq = new Option<int>("--seq") { Description = "sequence length", DefaultValueFactory = _ => d.Seq };
        var pack = TrainCommand.PackOption();
        var seed = new Option<int>("--seed") { Description = "seed of data order, LoRA init and dropout (the same for every method)", DefaultValueFactory = _ => d.Seed };
        var optim = TrainCommand.OptimOption(d.Optim);
        var exact = new Option<int>("--exact-match-samples") { Description = "held-out built-in problems for exact match (0 = all 200)", DefaultValueFactory = _ => d.ExactMatchSamples };
        var (device, precision, deviceMemory) = DeviceOption.CreateRun("cpu", "cpu (the C# reference), or the kernels on auto (CUDA when present, else the emulator) | cuda | emulator");
        var output = new Option<string>("--out") { Description = "output folder (new or empty) for report.md, metrics.json, compare.png", DefaultValueFactory = _ => d.Out };
        var onBadLine = TrainCommand.OnBadLineOption();
        var cmd = new Command("compare", "Fine-tune the same model on the same data with full, LoRA and QLoRA and print the measured table")
        {
            model, data, evalData, methods, rank, alpha, dropout, targets, steps, lr, lrFull, warmup, batch, seq, pack, seed, optim, exact, device, precision, deviceMemory, output, onBadLine,
        };
        cmd.SetAction((parse, cancel) =>
        {
            var a = new Args
            {
                Model = parse.GetValue(model)!, Data = parse.GetValue(data)!, EvalData = parse.GetValue(evalData), Methods = parse.GetValue(methods)!,
                Rank = parse.GetValue(rank), Alpha = parse.GetValue(alpha), Dropout = parse.GetValue(dropout), Targets = parse.GetValue(targets)!,
                Steps = parse.GetValue(steps), Lr = parse.GetValue(lr), LrFull = parse.GetValue(lrFull), Warmup = parse.GetValue(warmup),
                Batch = parse.GetValue(batch), Seq = parse.GetValue(seq), Pack = parse.GetValue(pack), Seed = parse.GetValue(seed), Optim = parse.GetValue(optim)!,
                ExactMatchSamples = parse.GetValue(exact), Device = parse.GetValue(device)!, Precision = parse.GetValue(precision)!, DeviceMemory = parse.GetValue(deviceMemory), Out = parse.GetValue(output)!,
                OnBadLine = TrainCommand.ParseOnBadLine(parse.GetValue(onBadLine)!),
                Given = TrainCommand.GivenOptions(parse, cmd),
                CommandLine = "nativepeft " + string.Join(' ', parse.Tokens.Select(t => t.Value.Contains(' ') ? $"\"{t.Value}\"" : t.Value)),
            };
            return Task.FromResult(Run(a, stdout, cancel));
        });
        return cmd;
    }

    /// <summary>One optimizer step as compare records it: the trainer's numbers and the process RSS after the step.</summary>
    public sealed record StepRecord(StepMetrics Metrics, long? RssBytes);

    /// <summary>One method's measurements.</summary>
    public sealed record MethodResult(string Method, double Lr, long BaseWeightBytes, long PoolPeakBytes, long? PeakRssBytes,
        double TokensPerSecond, double MsPerStep, double TrainSeconds, EvalMetrics Before, EvalMetrics? After, long TrainableParameters,
        long TotalParameters, long AdapterBytes, string AdapterPath, IReadOnlyList<StepRecord> Steps)
    {
        public double? RelativeSpeed { get; set; }
        public double TrainableShare => TotalParameters > 0 ? (double)TrainableParameters / TotalParameters : 0;
    }

    /// <summary>The base model before any fine-tuning (loaded as the first requested LoRA method loads it, adapter at zero).</summary>
    public sealed record BaseResult(long BaseWeightBytes, long Parameters, EvalMetrics Eval);

    public static int Run(Args a, TextWriter stdout, CancellationToken externalCancel = default)
    {
        // Ctrl-C: finish the current step, remove the output folder, exit 130.
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(externalCancel);
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            e.Cancel = true;
            cts.Cancel();
        };
        Console.CancelKeyPress += onCancel;
        try { return RunCore(a, stdout, cts.Token); }
        finally { Console.CancelKeyPress -= onCancel; }
    }

    private static int RunCore(Args a, TextWriter stdout, CancellationToken cancel)
    {
        // ---- every option and input file is checked before --out exists
        var methods = ParseMethods(a.Methods);
        var targets = a.Targets.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Distinct().ToList();
        if (a.ExactMatchSamples < 0) throw new CliException($"--exact-match-samples {a.ExactMatchSamples}: must be >= 0");
        if (a.LrFull is double lf && (!(lf >= 0) || !double.IsFinite(lf))) throw new CliException($"--lr-full {lf}: must be a finite number >= 0");
        var unused = new List<(string, string)>();
        if (!methods.Contains(FineTuneMethod.Full)) unused.Add(("--lr-full", "--methods has no full"));
        if (methods.All(m => m == FineTuneMethod.Full)) unused.AddRange(TrainCommand.LoraOptions.Select(o => (o, "--methods has only full, which has no LoRA adapter")));
        if (a.Data == BuiltinTask.DataName) unused.Add(("--on-bad-line", "the built-in task has no data file"));
        else if (DatasetLoader.IsPlainTextFile(a.Data) && (a.EvalData is null || DatasetLoader.IsPlainTextFile(a.EvalData)))
            unused.Add(("--on-bad-line", "plain text (.txt) data has no records to skip"));
        else unused.Add(("--exact-match-samples", "exact match is measured on the built-in task only (--data builtin)"));
        TrainCommand.RefuseUnused(a.Given, unused);
        string outDir = Path.GetFullPath(a.Out);
        if (File.Exists(outDir)) throw new CliException($"--out {a.Out}: is a file");
        if (OutputFolder.HasContent(outDir))
            throw new CliException($"--out {a.Out}: the folder exists and is not empty (choose a new one, or remove it)");
        string modelArg = a.Model == BuiltinModel.Name ? BuiltinModel.Name : Path.GetFullPath(a.Model);
        string data = a.Data == BuiltinTask.DataName ? a.Data : Path.GetFullPath(a.Data);
        var common = new FineTuneOptions
        {
            Model = modelArg, Data = data, EvalData = a.EvalData is null ? null : Path.GetFullPath(a.EvalData), OnBadLine = a.OnBadLine,
            Lora = new LoraSettings { Rank = a.Rank, Alpha = a.Alpha, Dropout = a.Dropout, TargetModules = targets },
            Device = a.Device, ComputeDType = DeviceOption.ComputeDType(a.Precision, a.Device), DeviceMemory = DeviceOption.Memory(a.DeviceMemory, a.Device), Seed = a.Seed, Steps = a.Steps, BatchSize = a.Batch, SeqLen = a.Seq, Pack = a.Pack, Lr = a.Lr, Schedule = LrScheduleKind.Cosine,
            WarmupSteps = a.Warmup, Optimizer = a.Optim, ExactMatchSamples = a.ExactMatchSamples,
        };
        foreach (var m in methods) OptionFlags.Guard(() => { FineTune.ValidateOptions(Options(common, m, a)); return 0; });
        if (common.Model == BuiltinModel.Name && !File.Exists(Path.Combine(BuiltinModel.Directory, IO.LlamaConfig.FileName)))
            OptionFlags.Guard<int>(() => throw new FineTuneException(nameof(FineTuneOptions.Model), $"builtin: {BuiltinModel.Directory} is missing (rebuild the CLI)"));
        // --out is this run's from here on (another run into it is refused); a folder it creates goes again if nothing is written.
        using var outputLock = OutputLocking.Folder(outDir, stdout);
        if (OutputFolder.HasContent(outDir))
            throw new CliException($"--out {a.Out}: the folder exists and is not empty (choose a new one, or remove it)");

        // The base model, evaluated before any fine-tuning; opening it checks the model folder and loads (checks) the data.
        var machine = Machine(a.Device);
        stdout.WriteLine($"compare: {string.Join(", ", methods.Select(Label))} on {(modelArg == BuiltinModel.Name ? "the built-in model" : modelArg)}, " +
            $"data {a.Data}, {a.Steps} steps each, {machine.Cpu} ({machine.Cores} cores), device {a.Device}");
        BaseResult baseResult;
        string modelDescription;
        // Through a LoRA (or QLoRA) run when one is requested: lora_B starts at zero, so its outputs are the base's exactly,
        // and the device pool is sized for that method, not for full fine-tuning's masters, gradients and optimizer state.
        var baseMethod = methods.Contains(FineTuneMethod.Lora) ? FineTuneMethod.Lora : methods.Contains(FineTuneMethod.Qlora) ? FineTuneMethod.Qlora : FineTuneMethod.Full;
        using (var baseRun = OptionFlags.Guard(() => FineTune.Create(Options(common, baseMethod, a) with { Steps = 1 }, NullLogger.Instance)))
        {
            if (baseRun.SkippedLines > 0)
                stdout.WriteLine($"skipped {baseRun.SkippedLines} bad data line(s) (--on-bad-line skip); the first: {baseRun.SkippedMessages[0]}");
            if (!HasEval(baseRun.Data!))
                throw new CliException($"--data {a.Data}: compare needs eval data for the eval loss: give --eval-data FILE (or use --data builtin)");
            if (a.Device != "cpu") machine = machine with { Device = $"{a.Device} ({baseRun.DeviceName})" };
            var c = baseRun.Config;
            modelDescription = $"{(modelArg == BuiltinModel.Name ? "builtin" : modelArg)}: {c.NumHiddenLayers} layers, hidden {c.HiddenSize}, " +
                $"intermediate {c.IntermediateSize}, {c.NumAttentionHeads}/{c.NumKeyValueHeads} heads, vocab {c.VocabSize}, {baseRun.BaseParameterCount:N0} parameters";
            var ev = baseRun.Evaluate();
            baseResult = new BaseResult(baseRun.BaseWeightBytes, baseRun.BaseParameterCount, ev);
            stdout.WriteLine($"base model: {EvalText(ev)}");
        }

        // ---- the runs; the output folder is removed again when one fails. Interrupted (Ctrl-C) after a method finished:
        // the unfinished method's folder goes, the finished ones stay with a report of them.
        Directory.CreateDirectory(outDir);
        var results = new List<MethodResult>();
        void WriteReport()
        {
            var reference = results.FirstOrDefault(r => r.Method == "lora") ?? results[0];
            foreach (var r in results) r.RelativeSpeed = reference.TokensPerSecond > 0 ? r.TokensPerSecond / reference.TokensPerSecond : null;

            var report = new Report(a, machine, modelDescription, baseResult, results, reference.Method);
            try
            {
                OutputFolder.WriteAllTextAtomic(Path.Combine(outDir, MetricsFileName), report.Json());
                ComparePlot.Write(Path.Combine(outDir, PlotFileName), results);
                OutputFolder.WriteAllTextAtomic(Path.Combine(outDir, ReportFileName), report.Markdown());
            }
            catch (Exception e) when (OutputFolder.IsWriteFailure(e)) { throw OutputFolder.WriteFailed(outDir, e); }

            var console = Output.Console(stdout);
            console.WriteLine();
            console.Write(report.Table());
            foreach (var note in report.Notes()) console.WriteLine(note);
            console.WriteLine();
            stdout.WriteLine($"report:  {Path.Combine(outDir, ReportFileName)}");
            stdout.WriteLine($"metrics: {Path.Combine(outDir, MetricsFileName)}");
            stdout.WriteLine($"plot:    {Path.Combine(outDir, PlotFileName)}");
        }
        FineTuneMethod? running = null;
        try
        {
            foreach (var m in methods)
            {
                cancel.ThrowIfCancellationRequested();
                running = m;
                results.Add(RunMethod(common, m, a, outDir, stdout, cancel));
                running = null;
            }
            WriteReport();
            return 0;
        }
        catch (OperationCanceledException e) when (results.Count > 0)
        {
            string unfinished = running is { } u ? Label(u) : "the next method";
            if (running is { } r)
                try { Directory.Delete(Path.Combine(outDir, Name(r)), recursive: true); }
                catch (DirectoryNotFoundException) { }
            stdout.WriteLine($"compare: interrupted during {unfinished}; the report below covers the finished method(s): " +
                string.Join(", ", results.Select(x => Label(x.Method))));
            WriteReport();
            throw new CliException($"compare: interrupted during {unfinished}; kept the report of {string.Join(", ", results.Select(x => Label(x.Method)))} in {outDir}",
                TrainCommand.ExitInterrupted, e);
        }
        catch (Exception e)
        {
            outputLock.RemoveContents();
            if (e is not OutputFolderException && OutputFolder.IsWriteFailure(e)) throw OutputFolder.WriteFailed(outDir, e);
            if (e is OutputFolderException) throw;
            if (e is OperationCanceledException) throw new CliException("compare: interrupted; removed " + outDir, TrainCommand.ExitInterrupted, e);
            if (e is TrainingDivergedException d) throw new CliException($"compare: {d.Message} (try a lower --lr{(d.Message.Contains("full", StringComparison.Ordinal) ? "-full" : "")}); removed {outDir}", TrainCommand.ExitDiverged, e);
            throw;
        }
    }

    private static bool HasEval(TrainingData d) => d.Eval is { Count: > 0 } || d.ExactMatchProblems is { Count: > 0 };

    internal static List<FineTuneMethod> ParseMethods(string text)
    {
        var list = new List<FineTuneMethod>();
        var names = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (names.Length == 0) throw new CliException($"--methods \"{text}\": name at least one of {string.Join(", ", MethodNames)}");
        foreach (var n in names)
        {
            var m = n.ToLowerInvariant() switch
            {
                "full" => FineTuneMethod.Full,
                "lora" => FineTuneMethod.Lora,
                "qlora" => FineTuneMethod.Qlora,
                _ => throw new CliException($"--methods {n}: unknown method; expected a comma-separated list of {string.Join(", ", MethodNames)}"),
            };
            if (!list.Contains(m)) list.Add(m);
        }
        return list;
    }

    internal static string Name(FineTuneMethod m) => m switch { FineTuneMethod.Full => "full", FineTuneMethod.Qlora => "qlora", _ => "lora" };

    internal static string Label(string method) => method switch { "full" => "full FT", "qlora" => "QLoRA", "lora" => "LoRA", _ => method };
    private static string Label(FineTuneMethod m) => Label(Name(m));

    private static FineTuneOptions Options(FineTuneOptions common, FineTuneMethod m, Args a) => common with
    {
        Method = m,
        Lr = m == FineTuneMethod.Full ? a.FullLr : a.Lr,
        ExtraConfig = new Dictionary<string, string> { ["model"] = a.Model, ["data"] = a.Data, ["device"] = a.Device, ["method"] = Name(m), ["command"] = "compare" },
    };

    private static MethodResult RunMethod(FineTuneOptions common, FineTuneMethod method, Args a, string outDir, TextWriter stdout, CancellationToken cancel)
    {
        string name = Name(method);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        ProcessMemory.ResetPeak();
        var options = Options(common, method, a) with { OutputDir = Path.Combine(outDir, name) };
        using var run = OptionFlags.Guard(() => FineTune.Create(options, NullLogger.Instance));
        var rss = new Dictionary<int, long?>();
        int every = Math.Max(1, a.Steps / 10);
        var trainer = run.CreateTrainer(progress: new ActionProgress<TrainerProgress>(p =>
        {
            rss[p.Step] = ProcessMemory.RssBytes();
            if (p.Step % every == 0 || p.Step == p.TotalSteps)
                stdout.WriteLine($"  {Label(name),-7} " + TrainCommand.StepLine(p));
        }));
        var before = run.Evaluate();
        long poolPeak = run.PeakAllocatedBytes;
        var clock = Stopwatch.StartNew();
        var result = trainer.Train(cancel);
        if (result.Cancelled) throw new OperationCanceledException(cancel);
        double seconds = clock.Elapsed.TotalSeconds;
        poolPeak = Math.Max(poolPeak, Math.Max(run.PeakAllocatedBytes, trainer.StepHistory.Select(s => s.PeakBytes).DefaultIfEmpty(0).Max()));
        // tokens/s and ms/step leave out step 1 (JIT, first allocations) when there are more steps.
        var timed = trainer.StepHistory.Count > 1 ? trainer.StepHistory.Skip(1).ToList() : trainer.StepHistory.ToList();
        double stepSeconds = timed.Sum(s => s.Seconds);
        double tokensPerSecond = stepSeconds > 0 ? timed.Sum(s => (double)s.Tokens) / stepSeconds : 0;
        double msPerStep = timed.Count > 0 ? stepSeconds / timed.Count * 1000 : 0;
        string final = result.FinalOutput!;
        long adapterBytes = Directory.EnumerateFiles(final, "*", SearchOption.AllDirectories).Sum(f => new FileInfo(f).Length);
        var r = new MethodResult(name, options.Lr, run.BaseWeightBytes, poolPeak, ProcessMemory.PeakRssBytes(), tokensPerSecond, msPerStep, seconds,
            before, result.FinalEval, run.TrainableParameterCount, run.TotalParameterCount, adapterBytes, final,
            trainer.StepHistory.Select(s => new StepRecord(s, rss.GetValueOrDefault(s.Step))).ToList());
        stdout.WriteLine($"  {Label(name),-7} done in {seconds:F1} s: before {EvalText(before)}; after {(result.FinalEval is { } e ? EvalText(e) : "-")}");
        return r;
    }

    internal static string EvalText(EvalMetrics e) =>
        string.Create(CultureInfo.InvariantCulture, $"eval loss {e.Loss:F4}") +
        (e.ExactMatch is double x ? string.Create(CultureInfo.InvariantCulture, $", exact match {x:P1} of {e.ExactMatchCount}") : "");

    // ------------------------------------------------------------------------------------------ machine

    public sealed record MachineInfo(string Cpu, int Cores, string Os, string Runtime, string Device);

    internal static MachineInfo Machine(string device)
    {
        string cpu = "unknown CPU";
        try
        {
            if (File.Exists("/proc/cpuinfo"))
                cpu = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? cpu;
        }
        catch (IOException) { }
        return new MachineInfo(cpu, Environment.ProcessorCount, RuntimeInformation.OSDescription, RuntimeInformation.FrameworkDescription, device);
    }
}

/// <summary>The process's resident memory (Linux /proc): the peak since the last reset, which writes 5 to clear_refs.</summary>
internal static class ProcessMemory
{
    public static void ResetPeak()
    {
        try { if (File.Exists("/proc/self/clear_refs")) File.WriteAllText("/proc/self/clear_refs", "5"); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }

    /// <summary>VmHWM in bytes, or null where /proc is not there.</summary>
    public static long? PeakRssBytes() => Read("VmHWM:");

    public static long? RssBytes() => Read("VmRSS:");

    private static long? Read(string key)
    {
        try
        {
            if (!File.Exists("/proc/self/status")) return null;
            var line = File.ReadLines("/proc/self/status").FirstOrDefault(l => l.StartsWith(key, StringComparison.Ordinal));
            if (line is null) return null;
            var parts = line[key.Length..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries);
            return long.Parse(parts[0], CultureInfo.InvariantCulture) * 1024;
        }
        catch (IOException) { return null; }
    }
}
