using System.CommandLine;
using System.Globalization;
using Microsoft.Extensions.Logging.Abstractions;
using NativePeft.Data;
using NativePeft.Distributed;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Runtime;
using NativePeft.Planning;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NativePeft.Training;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft train`: LoRA, QLoRA (NF4 double-quant base) or full fine-tuning of a HF Llama folder on a dataset file
/// (any <see cref="DatasetLoader"/> format) or the built-in task, with the <see cref="Trainer"/>. Writes checkpoints,
/// metrics.json and the final adapter (or model) into --out. Every input is checked before --out is created, so bad
/// input leaves nothing behind. Ctrl-C finishes the current step, saves a checkpoint and exits with 130.
/// </summary>
public static class TrainCommand
{
    public const int ExitDiverged = 3;
    public const int ExitInterrupted = 130;

    public static Command Create(TextWriter stdout, TextWriter? stderr = null)
    {
        // Every default is the library's (OptionFlags binds each flag to its FineTuneOptions property).
        var d = new FineTuneOptions();
        var model = new Option<DirectoryInfo>("--model") { Description = "HF Llama checkpoint folder (config.json + safetensors; a tokenizer only for text data), or 'builtin' for the shipped model", Required = true };
        var data = new Option<string>("--data") { Description = "dataset file (pre-tokenized/text/alpaca/chat JSONL, .txt) or 'builtin' for the built-in task (upper: word -> WORD)", Required = true };
        var evalData = new Option<FileInfo?>("--eval-data") { Description = "eval dataset file (same formats) for loss/perplexity; 'builtin' uses its own held-out split" };
        var method = new Option<string>("--method") { Description = "lora (bf16-stored base), qlora (NF4 double-quant base) or full", DefaultValueFactory = _ => d.Method.ToString().ToLowerInvariant() };
        var (rank, alpha, dropout, targets) = LoraOptionGroup(d.Lora.Rank, d.Lora.Alpha, d.Lora.Dropout, string.Join(',', d.Lora.TargetModules));
        var rslora = new Option<bool>("--rslora") { Description = "use_rslora: scale by alpha/sqrt(r)" };
        var lr = new Option<double>("--lr") { Description = "peak learning rate", DefaultValueFactory = _ => d.Lr };
        var schedule = new Option<string>("--schedule") { Description = "constant|linear|cosine (after the warmup)", DefaultValueFactory = _ => d.Schedule.ToString().ToLowerInvariant() };
        var warmup = new Option<int>("--warmup") { Description = "linear warmup steps", DefaultValueFactory = _ => d.WarmupSteps };
        var steps = new Option<int?>("--steps") { Description = "optimizer steps (default: 1 epoch)" };
        var epochs = new Option<double?>("--epochs") { Description = "passes over the data (instead of --steps)" };
        var batch = new Option<int>("--batch") { Description = "rows per micro-batch", DefaultValueFactory = _ => d.BatchSize };
        var gradAccum = new Option<int>("--grad-accum") { Description = "micro-batches per optimizer step (token-weighted)", DefaultValueFactory = _ => d.GradAccum };
        var seq = new Option<int>("--seq") { Description = "sequence length (longer examples are truncated)", DefaultValueFactory = _ => d.SeqLen };
        var pack = PackOption();
        var seed = new Option<int>("--seed") { Description = "seed of data order, LoRA init and dropout", DefaultValueFactory = _ => d.Seed };
        var optim = OptimOption(d.Optimizer);
        var maxGradNorm = new Option<double>("--max-grad-norm") { Description = "global-norm clipping (0 = off)", DefaultValueFactory = _ => d.MaxGradNorm };
        var weightDecay = new Option<double>("--weight-decay") { Description = "AdamW's decoupled weight decay (0 = off)", DefaultValueFactory = _ => d.WeightDecay };
        var evalEvery = new Option<int>("--eval-every") { Description = "evaluate every N steps (0 = at the end only)", DefaultValueFactory = _ => d.EvalEvery };
        var evalBatches = new Option<int>("--eval-batches") { Description = "eval batches per evaluation (0 = all)", DefaultValueFactory = _ => d.EvalBatches };
        var saveEvery = new Option<int>("--save-every") { Description = "write checkpoint-<step>/ every N steps (0 = never)", DefaultValueFactory = _ => d.SaveEvery };
        var resume = new Option<DirectoryInfo?>("--resume") { Description = "continue from a checkpoint-<step> folder" };
        var (device, precision, deviceMemory) = DeviceOption.CreateRun(d.Device, "cpu (the C# reference), or the kernels on auto|cuda|emulator");
        var recompute = new Option<bool>("--recompute") { Description = "gradient checkpointing: keep only each block's input, recompute the block in the backward" };
        var embedding = EmbeddingOption();
        var output = new Option<DirectoryInfo>("--out") { Description = "output folder (new or empty, or the run's own folder with --resume)", Required = true };
        var onBadLine = OnBadLineOption();
        var onNonFinite = new Option<string>("--on-nonfinite")
        {
            Description = "a non-finite loss or gradient norm: stop (name the step) or skip that step's update (stops after 10 consecutive skips)",
            DefaultValueFactory = _ => d.OnNonFinite.ToString().ToLowerInvariant(),
        };
        onNonFinite.AcceptOnlyFromAmong("stop", "skip");
        var nproc = new Option<int?>("--nproc")
        {
            Description = "data-parallel on this node: start N worker processes (one per GPU with --device cuda, CPU ranks with --device cpu) " +
                          "that train the same run as one process with --grad-accum K×N; --batch and --grad-accum are per worker. " +
                          "Workers started by torchrun or srun read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT instead (docs/distributed.md)",
        };
        var cmd = new Command("train", "Fine-tune a Llama checkpoint with LoRA, QLoRA or full fine-tuning")
        {
            model, data, evalData, method, rank, alpha, dropout, targets, rslora, lr, schedule, warmup, steps, epochs, batch, gradAccum,
            seq, pack, seed, optim, maxGradNorm, weightDecay, evalEvery, evalBatches, saveEvery, resume, device, precision, deviceMemory, recompute, embedding, output, onBadLine,
            onNonFinite, nproc,
        };
        cmd.SetAction((parse, cancel) =>
        {
            var env = DistributedEnvironment.ProcessEnvironment();
            if (parse.GetValue(nproc) is int n)
            {
                Launcher.Check(n, parse.GetValue(device)!, env);
                return Task.FromResult(Launcher.Run(n, Launcher.WorkerArguments(parse, nproc), stdout, stderr ?? Console.Error, cancel));
            }
            DistributedOptions? job;
            try { job = DistributedEnvironment.Read(env); }
            catch (DistributedEnvironmentException e) { throw new CliException($"{e.Message} (the data-parallel job's environment, docs/distributed.md)", 2, e); }
            var a = new Args(
                ModelPath(parse, model), parse.GetValue(data)!, parse.GetValue(evalData)?.FullName, parse.GetValue(method)!,
                parse.GetValue(rank), parse.GetValue(alpha), parse.GetValue(dropout), parse.GetValue(targets)!, parse.GetValue(rslora),
                parse.GetValue(lr), parse.GetValue(schedule)!, parse.GetValue(warmup), parse.GetValue(steps), parse.GetValue(epochs),
                parse.GetValue(batch), parse.GetValue(gradAccum), parse.GetValue(seq), parse.GetValue(seed), parse.GetValue(optim)!,
                parse.GetValue(maxGradNorm), parse.GetValue(evalEvery), parse.GetValue(evalBatches), parse.GetValue(saveEvery),
                parse.GetValue(resume)?.FullName, parse.GetValue(device)!, parse.GetValue(output)!.FullName) { Recompute = parse.GetValue(recompute), Embedding = parse.GetValue(embedding)!, Pack = parse.GetValue(pack), Precision = parse.GetValue(precision)!, OnBadLine = ParseOnBadLine(parse.GetValue(onBadLine)!),
                OnNonFinite = parse.GetValue(onNonFinite) == "skip" ? NonFinitePolicy.Skip : NonFinitePolicy.Stop,
                Given = GivenOptions(parse, cmd), DeviceMemory = parse.GetValue(deviceMemory), WeightDecay = parse.GetValue(weightDecay), Distributed = job };
            return Task.FromResult(Run(a, stdout, cancel));
        });
        return cmd;
    }

    /// <summary>--embedding auto|host|device: where the frozen embedding table lives (train, estimate, bench --model).</summary>
    internal static Option<string> EmbeddingOption()
    {
        var option = new Option<string>("--embedding")
        {
            Description = "where the frozen embedding table lives: host (only the batch's rows are sent to the device), device, or auto " +
                          "(host for QLoRA on a GPU when the embedding is not tied to lm_head)",
            DefaultValueFactory = _ => new FineTuneOptions().Embedding,
        };
        option.AcceptOnlyFromAmong("auto", "host", "device");
        return option;
    }

    /// <summary><see cref="FineTune.ResolveEmbeddingOnHost"/> for a command's --embedding value; a refusal becomes
    /// "--embedding …" (exit 2).</summary>
    internal static bool ResolveEmbedding(string setting, FineTuneMethod method, bool tiedEmbedding, bool gpu)
    {
        try { return FineTune.ResolveEmbeddingOnHost(setting, method, tiedEmbedding, gpu); }
        catch (FineTuneException e) { throw new CliException($"--embedding {e.Detail}", 2, e); }
    }

    /// <summary>--rank, --alpha, --dropout, --targets (comma-separated) with the given defaults (train and compare).</summary>
    internal static (Option<int> Rank, Option<double> Alpha, Option<double> Dropout, Option<string> Targets) LoraOptionGroup(
        int rank, double alpha, double dropout, string targets) =>
        (new Option<int>("--rank") { Description = "LoRA r", DefaultValueFactory = _ => rank },
         new Option<double>("--alpha") { Description = "lora_alpha", DefaultValueFactory = _ => alpha },
         new Option<double>("--dropout") { Description = "lora_dropout", DefaultValueFactory = _ => dropout },
         new Option<string>("--targets") { Description = "comma-separated target modules", DefaultValueFactory = _ => targets });

    /// <summary>--pack: several examples per row, each its own document (train and compare).</summary>
    internal static Option<bool> PackOption() => new("--pack")
    {
        Description = "pack several examples into each row; each stays its own document (positions restart, attention and targets never cross a boundary)",
    };

    /// <summary>--optim NAME, one of <see cref="OptimizerFactory.Names"/> (train and compare).</summary>
    internal static Option<string> OptimOption(string defaultValue) =>
        new("--optim") { Description = string.Join('|', OptimizerFactory.Names), DefaultValueFactory = _ => defaultValue };

    /// <summary>--on-bad-line stop|skip: what a JSONL data line that is not valid does (train and compare).</summary>
    internal static Option<string> OnBadLineOption()
    {
        var option = new Option<string>("--on-bad-line")
        {
            Description = "stop: a data line that is not valid JSON (or not the format) stops with file:line; skip: leave it out, report how many",
            DefaultValueFactory = _ => new FineTuneOptions().OnBadLine.ToString().ToLowerInvariant(),
        };
        option.AcceptOnlyFromAmong("stop", "skip");
        return option;
    }

    internal static BadLinePolicy ParseOnBadLine(string value) => value == "skip" ? BadLinePolicy.Skip : BadLinePolicy.Stop;

    /// <summary>The options given on the command line (or by --config), not left at their defaults, by name ("--rank").</summary>
    internal static IReadOnlySet<string> GivenOptions(ParseResult parse, Command command) =>
        command.Options.Where(o => parse.GetResult(o) is { Implicit: false }).Select(o => o.Name).ToHashSet(StringComparer.Ordinal);

    /// <summary>
    /// Refuses an option that was given but would have no effect, naming it and why (train, compare): every option
    /// given is used or refused. <paramref name="unused"/> maps an option name to the reason it is unused in this run.
    /// </summary>
    internal static void RefuseUnused(IReadOnlySet<string> given, IEnumerable<(string Option, string Why)> unused)
    {
        foreach (var (option, why) in unused)
            if (given.Contains(option)) throw new CliException($"{option}: {why}, so it would be ignored; leave it out", 2);
    }

    /// <summary>The LoRA options, unused by full fine-tuning.</summary>
    internal static readonly string[] LoraOptions = ["--rank", "--alpha", "--dropout", "--targets", "--rslora"];

    /// <summary>--model's folder; the shipped built-in model's folder for `--model builtin`.</summary>
    internal static string ModelPath(ParseResult parse, Option<DirectoryInfo> model) =>
        parse.GetResult(model)?.Tokens.FirstOrDefault()?.Value == BuiltinModel.Name ? BuiltinModel.Directory : parse.GetValue(model)!.FullName;

    /// <summary>The parsed options.</summary>
    /// <summary>The loss plot train writes next to metrics.json (the training loss per step, the eval loss points).</summary>
    public const string PlotFileName = "loss.png";

    public sealed record Args(string Model, string Data, string? EvalData, string Method, int Rank, double Alpha, double Dropout,
        string Targets, bool RsLora, double Lr, string Schedule, int Warmup, int? Steps, double? Epochs, int Batch, int GradAccum,
        int Seq, int Seed, string Optim, double MaxGradNorm, int EvalEvery, int EvalBatches, int SaveEvery, string? Resume,
        string Device, string Out)
    {
        public bool Recompute { get; init; }
        public string Embedding { get; init; } = "auto";
        /// <summary>--pack: several examples per row, each its own document (<see cref="BatchMode.Packing"/>).</summary>
        public bool Pack { get; init; }
        public BadLinePolicy OnBadLine { get; init; } = BadLinePolicy.Stop;
        /// <summary>--on-nonfinite stop|skip.</summary>
        public NonFinitePolicy OnNonFinite { get; init; } = NonFinitePolicy.Stop;
        /// <summary>The options given explicitly (<see cref="GivenOptions"/>); empty: none is checked for being unused.</summary>
        public IReadOnlySet<string> Given { get; init; } = new HashSet<string>();
        /// <summary>--precision: auto (bf16 on a GPU device, fp32 on cpu), bf16 or fp32.</summary>
        public string Precision { get; init; } = "auto";
        /// <summary>--device-memory: the run's limit of device memory (a size), null for the device's free memory.</summary>
        public string? DeviceMemory { get; init; }
        /// <summary>--weight-decay: AdamW's decoupled weight decay.</summary>
        public double WeightDecay { get; init; } = new FineTuneOptions().WeightDecay;
        /// <summary>This worker's place in a data-parallel job (<see cref="DistributedEnvironment"/>), null for one process.</summary>
        public DistributedOptions? Distributed { get; init; }
    }

    public static int Run(Args a, TextWriter stdout, CancellationToken externalCancel = default)
    {
        var job = a.Distributed;
        if (job is not null)
        {
            Launcher.OnWorkerStart(job);
            if (job.Rank > 0) stdout = TextWriter.Null; // rank 0 reports; the others' errors reach stderr
        }
        // ---- the options on their own: the command line's choices here (so that the message names the flag), every
        // value in the library (FineTune.ValidateOptions), its refusal named by OptionFlags
        string[] methods = ["lora", "qlora", "full"], schedules = ["constant", "linear", "cosine"];
        if (!methods.Contains(a.Method)) throw new CliException($"--method {a.Method}: expected one of {string.Join(", ", methods)}");
        if (!schedules.Contains(a.Schedule)) throw new CliException($"--schedule {a.Schedule}: expected one of {string.Join(", ", schedules)}");
        if (a.Steps is not null && a.Epochs is not null) throw new CliException("--steps and --epochs: give one of them, not both");
        var targets = a.Targets.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Distinct().ToList();
        var options = new FineTuneOptions
        {
            Model = a.Model, Data = a.Data, EvalData = a.EvalData, OnBadLine = a.OnBadLine,
            Method = a.Method switch { "full" => FineTuneMethod.Full, "qlora" => FineTuneMethod.Qlora, _ => FineTuneMethod.Lora },
            Lora = a.Method == "full"
                ? new LoraSettings { Rank = a.Rank, Alpha = a.Alpha, TargetModules = LoraSettings.KnownTargets }
                : new LoraSettings { Rank = a.Rank, Alpha = a.Alpha, Dropout = a.Dropout, UseRsLora = a.RsLora, TargetModules = targets },
            Device = a.Device, Recompute = a.Recompute, Embedding = a.Embedding, Seed = a.Seed,
            ComputeDType = DeviceOption.ComputeDType(a.Precision, a.Device), DeviceMemory = DeviceOption.Memory(a.DeviceMemory, a.Device),
            Steps = a.Steps, Epochs = a.Epochs, BatchSize = a.Batch, GradAccum = a.GradAccum, SeqLen = a.Seq, Pack = a.Pack,
            Lr = a.Lr, Schedule = LrSchedule.Parse(a.Schedule), WarmupSteps = a.Warmup, MaxGradNorm = a.MaxGradNorm, WeightDecay = a.WeightDecay,
            EvalEvery = a.EvalEvery, EvalBatches = a.EvalBatches, SaveEvery = a.SaveEvery, Optimizer = a.Optim,
            OutputDir = a.Out, ResumeFrom = a.Resume, OnNonFinite = a.OnNonFinite, Distributed = job,
            ExtraConfig = new Dictionary<string, string> { ["model"] = a.Model, ["data"] = a.Data, ["device"] = a.Device, ["method"] = a.Method },
        };
        OptionFlags.Guard(() => FineTune.ValidateOptions(options), "train");

        // ---- options given but unused by this run
        bool builtinData = a.Data == BuiltinTask.DataName;
        var unused = new List<(string, string)>();
        if (a.Method == "full") unused.AddRange(LoraOptions.Select(o => (o, "full fine-tuning trains every weight and has no LoRA adapter")));
        if (builtinData)
        {
            unused.Add(("--eval-data", "the built-in task evaluates on its own held-out split"));
            unused.Add(("--on-bad-line", "the built-in task has no data file"));
        }
        else
        {
            if (a.EvalData is null)
            {
                unused.Add(("--eval-every", "there is no eval data (give --eval-data FILE)"));
                unused.Add(("--eval-batches", "there is no eval data (give --eval-data FILE)"));
            }
            if (DatasetLoader.IsPlainTextFile(a.Data) && (a.EvalData is null || DatasetLoader.IsPlainTextFile(a.EvalData)))
                unused.Add(("--on-bad-line", "plain text (.txt) data has no records to skip"));
        }
        RefuseUnused(a.Given, unused);

        // ---- files
        if (!Directory.Exists(a.Model)) throw new CliException($"--model {a.Model}: folder not found");
        if (!File.Exists(Path.Combine(a.Model, LlamaConfig.FileName)))
            throw new CliException($"--model {a.Model}: no {LlamaConfig.FileName} (not a Hugging Face model folder)");
        if (!builtinData && !File.Exists(a.Data)) throw new CliException($"--data {a.Data}: file not found (or use --data builtin)");
        if (a.EvalData is not null && !File.Exists(a.EvalData)) throw new CliException($"--eval-data {a.EvalData}: file not found");
        if (!builtinData) SizeOptions.DataFile("--data", a.Data);
        if (a.EvalData is not null) SizeOptions.DataFile("--eval-data", a.EvalData);
        // --resume is checked by FineTune.Create once it holds --out: taking the lock restores a checkpoint that a killed
        // run left renamed (OutputFolder.Recover).
        if (File.Exists(a.Out)) throw new CliException($"--out {a.Out}: is a file");
        if (a.Resume is null && job is not { Rank: > 0 } && OutputFolder.HasContent(a.Out)) // rank 0 alone owns --out
            throw new CliException($"--out {a.Out}: the folder exists and is not empty (choose a new one, or --resume a checkpoint)");

        using var run = OptionFlags.Guard(() => FineTune.Create(options, new WarningLogger(stdout)), "train");
        if (run.SkippedLines > 0)
            stdout.WriteLine($"skipped {run.SkippedLines} bad data line(s) (--on-bad-line skip); the first: {run.SkippedMessages[0]}");
        var trainingData = run.Data!;
        var llama = run.Model;
        var ckptConfig = run.Config;
        // Plain output (files, pipes, tests): one line per step and per evaluation. On a terminal a Spectre bar replaces it.
        int lastEvalShown = -1;
        Action<TrainerProgress> sink = p =>
        {
            stdout.WriteLine(StepLine(p));
            if (p.Eval is { } e) { stdout.WriteLine(EvalLine(e)); lastEvalShown = e.Step; }
        };
        var trainer = OptionFlags.Guard(() => run.CreateTrainer(progress: new ActionProgress<TrainerProgress>(p => sink(p))));
        if (job is not null) Launcher.InjectFault(job, () => trainer.Step);
        // Cadences longer than the run would never fire (the final evaluation happens anyway): refused, nothing written yet.
        RefuseUnused(a.Given, [
            .. a.SaveEvery > trainer.TotalSteps ? [("--save-every", $"{a.SaveEvery} is more than the run's {trainer.TotalSteps} steps: no checkpoint would be written")] : Array.Empty<(string, string)>(),
            .. a.EvalEvery > trainer.TotalSteps ? [("--eval-every", $"{a.EvalEvery} is more than the run's {trainer.TotalSteps} steps: only the final evaluation would run")] : Array.Empty<(string, string)>(),
        ]);

        stdout.WriteLine($"train: {a.Method} on {a.Model} ({ckptConfig.NumHiddenLayers} layers, hidden {ckptConfig.HiddenSize}), {trainingData.Train.Count} examples, " +
            $"{trainer.TotalSteps} steps of {a.GradAccum}×{a.Batch}×{a.Seq}{(a.Pack ? " packed" : "")}, {llama.TrainableParameters.Sum(p => p.Param.Count)} trainable parameters, {a.Device}" +
            (job is null ? "" : job.WorldSize == 1
                ? (trainer.CommunicatorBackend is { } one ? $", a job of 1 rank (the data-parallel step over {one})" : ", a job of 1 rank (trains as one process)")
                : $", {job.WorldSize} ranks over {trainer.CommunicatorBackend} (global batch {a.GradAccum}×{a.Batch}×{job.WorldSize} rows)" +
                  (trainer.AllReduceBytes > 0 ? $", all-reduce {Output.Bytes(trainer.AllReduceBytes)} per step" : "")));
        if (a.Resume is not null) stdout.WriteLine($"resumed at step {trainer.Step} from {a.Resume}");

        using var cts = CancellationTokenSource.CreateLinkedTokenSource(externalCancel);
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            e.Cancel = true; // finish the step, save, exit cleanly
            cts.Cancel();
        };
        Console.CancelKeyPress += onCancel;
        TrainResult result;
        try
        {
            bool terminal = ReferenceEquals(stdout, Console.Out) && !Console.IsOutputRedirected;
            result = terminal ? TrainWithBar(trainer, stdout, bar => sink = p =>
            {
                bar(p);
                if (p.Eval is { } e) lastEvalShown = e.Step;
            }, cts.Token) : trainer.Train(cts.Token);
        }
        catch (TrainingDivergedException e)
        {
            throw new CliException(e.Message + (e.LastCheckpoint is null ? "" : $" (resume with --resume {e.LastCheckpoint} and a lower --lr)"), ExitDiverged, e);
        }
        finally { Console.CancelKeyPress -= onCancel; }

        if (result.Cancelled)
        {
            stdout.WriteLine($"interrupted after step {result.Steps}: saved {result.LastCheckpoint}; continue with --resume {result.LastCheckpoint}");
            return ExitInterrupted;
        }
        if (result.FinalEval is { } ev && ev.Step != lastEvalShown) stdout.WriteLine(EvalLine(ev));
        stdout.WriteLine($"wrote {result.FinalOutput}");
        stdout.WriteLine($"metrics: {result.MetricsPath}");
        string plot = Path.Combine(Path.GetFullPath(a.Out), PlotFileName);
        if (WritePlot(plot, trainer)) stdout.WriteLine($"plot:    {plot}");
        if (run.Pool is { } pool) stdout.WriteLine(pool.Describe());
        return 0;
    }

    /// <summary>loss.png; a failed write is one error line with the path and the free space (the adapter is already saved).</summary>
    private static bool WritePlot(string plot, Trainer trainer)
    {
        try { return TrainPlot.Write(plot, trainer.StepHistory, trainer.EvalHistory); }
        catch (Exception e) when (OutputFolder.IsWriteFailure(e)) { throw OutputFolder.WriteFailed(plot, e); }
    }

    internal static string StepLine(TrainerProgress p) => p.SkippedNonFinite is { } what
        ? string.Create(CultureInfo.InvariantCulture, $"step {p.Step}/{p.TotalSteps}  skipped: {what} (--on-nonfinite skip; the update is dropped)  lr {p.Lr:0.000e+00}  eta {Eta(p.Eta)}")
        : p.NoTrainableTokens
        ? string.Create(CultureInfo.InvariantCulture, $"step {p.Step}/{p.TotalSteps}  skipped: no trainable token (every label -100 after truncation to --seq)  lr {p.Lr:0.000e+00}  eta {Eta(p.Eta)}")
        : string.Create(CultureInfo.InvariantCulture, $"step {p.Step}/{p.TotalSteps}  loss {p.Loss:F4}  lr {p.Lr:0.000e+00}  grad_norm {p.GradNorm:F3}  tok/s {p.TokensPerSecond:F0}  ") +
        $"mem {Output.Bytes(p.AllocatedBytes)}  peak {Output.Bytes(p.PeakBytes)}  eta {Eta(p.Eta)}";

    internal static string EvalLine(EvalMetrics e) =>
        string.Create(CultureInfo.InvariantCulture, $"eval @ step {e.Step}: loss {e.Loss:F4}  perplexity {e.Perplexity:F3}") +
        (e.ExactMatch is double x ? string.Create(CultureInfo.InvariantCulture, $"  exact match {x:P1} of {e.ExactMatchCount}") : "");

    private static string Eta(TimeSpan? eta) => eta is { } t ? t.ToString(t.TotalHours >= 1 ? @"h\:mm\:ss" : @"m\:ss", CultureInfo.InvariantCulture) : "?";

    /// <summary>A Spectre progress bar (step, loss, lr, tokens/s, memory, ETA) fed by the trainer's progress callback.</summary>
    private static TrainResult TrainWithBar(Trainer trainer, TextWriter stdout, Action<Action<TrainerProgress>> setSink, CancellationToken ct)
    {
        var console = Output.Console(stdout);
        TrainResult? result = null;
        console.Progress()
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask("training", maxValue: trainer.TotalSteps);
                task.Value = trainer.Step;
                setSink(p =>
                {
                    task.Value = p.Step;
                    task.Description = Markup.Escape(string.Create(CultureInfo.InvariantCulture,
                        $"step {p.Step}/{p.TotalSteps} {(p.SkippedNonFinite is { } what ? $"skipped ({what})" : p.NoTrainableTokens ? "skipped (no trainable token)" : $"loss {p.Loss:F4}")} lr {p.Lr:0.00e+00} tok/s {p.TokensPerSecond:F0} mem {Output.Bytes(p.PeakBytes)}"));
                    if (p.Eval is { } e) console.MarkupLine(Markup.Escape(EvalLine(e)));
                });
                result = trainer.Train(ct);
            });
        return result!;
    }
}
