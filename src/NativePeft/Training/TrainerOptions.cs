using NativePeft.Data;

namespace NativePeft.Training;

/// <summary>The learning-rate schedules (transformers' get_scheduler names: constant_with_warmup, linear, cosine).</summary>
public enum LrScheduleKind
{
    /// <summary>Linear warmup, then the base rate (transformers' constant_with_warmup).</summary>
    Constant,
    /// <summary>Linear warmup, then linear decay to 0 at the last step (get_linear_schedule_with_warmup).</summary>
    Linear,
    /// <summary>Linear warmup, then half a cosine down to 0 at the last step (get_cosine_schedule_with_warmup, num_cycles 0.5).</summary>
    Cosine,
}

/// <summary>
/// The multiplier of the base learning rate, as transformers' LambdaLR schedules compute it. <c>step</c> is the
/// number of optimizer steps already taken (0 for the first update: HF calls scheduler.step() after
/// optimizer.step(), so the first update uses λ(0), which is 0 with a warmup).
/// <list type="bullet">
/// <item>warmup (step &lt; warmup): step / max(1, warmup)</item>
/// <item>constant: 1</item>
/// <item>linear: max(0, (total − step) / max(1, total − warmup))</item>
/// <item>cosine: p = (step − warmup) / max(1, total − warmup); max(0, ½ (1 + cos(π · p)))</item>
/// </list>
/// </summary>
public static class LrSchedule
{
    public static double Factor(LrScheduleKind kind, int step, int warmupSteps, int totalSteps)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(step);
        ArgumentOutOfRangeException.ThrowIfNegative(warmupSteps);
        if (step < warmupSteps) return (double)step / Math.Max(1, warmupSteps);
        return kind switch
        {
            LrScheduleKind.Constant => 1.0,
            LrScheduleKind.Linear => Math.Max(0.0, (double)(totalSteps - step) / Math.Max(1, totalSteps - warmupSteps)),
            LrScheduleKind.Cosine => Math.Max(0.0, 0.5 * (1.0 + Math.Cos(Math.PI * ((double)(step - warmupSteps) / Math.Max(1, totalSteps - warmupSteps))))),
            _ => throw new ArgumentOutOfRangeException(nameof(kind)),
        };
    }

    /// <summary>The learning rate of the update after <paramref name="step"/> updates: baseLr · <see cref="Factor"/>.</summary>
    public static double LearningRate(LrScheduleKind kind, double baseLr, int step, int warmupSteps, int totalSteps) =>
        baseLr * Factor(kind, step, warmupSteps, totalSteps);

    /// <summary>Parses constant | linear | cosine (case-insensitive).</summary>
    public static LrScheduleKind Parse(string name) => name?.ToLowerInvariant() switch
    {
        "constant" => LrScheduleKind.Constant,
        "linear" => LrScheduleKind.Linear,
        "cosine" => LrScheduleKind.Cosine,
        _ => throw new ArgumentException($"unknown schedule '{name}': expected constant, linear or cosine", nameof(name)),
    };

    public static string Name(LrScheduleKind kind) => kind.ToString().ToLowerInvariant();
}

/// <summary>What a non-finite loss or gradient norm does (--on-nonfinite).</summary>
public enum NonFinitePolicy
{
    /// <summary>Stop with a <see cref="TrainingDivergedException"/> naming the step (the update is not applied).</summary>
    Stop,
    /// <summary>Drop that step's update (zero gradients, optimizer untouched) and go on; stop after
    /// <see cref="TrainerOptions.MaxConsecutiveSkips"/> consecutive skipped steps.</summary>
    Skip,
}

/// <summary>Settings of a <see cref="Trainer"/> run.</summary>
public sealed record TrainerOptions
{
    /// <summary>Optimizer steps to run; exactly one of <see cref="Steps"/> and <see cref="Epochs"/> is set.</summary>
    public int? Steps { get; init; }
    /// <summary>Passes over the training examples (fractional allowed): steps = ceil(epochs · batches per epoch / grad-accum).</summary>
    public double? Epochs { get; init; }
    /// <summary>Rows per micro-batch.</summary>
    public int BatchSize { get; init; } = 8;
    /// <summary>Micro-batches per optimizer step.</summary>
    public int GradAccum { get; init; } = 1;
    /// <summary>Row length; longer examples are truncated.</summary>
    public int SeqLen { get; init; } = 128;
    public double Lr { get; init; } = 2e-4;
    public LrScheduleKind Schedule { get; init; } = LrScheduleKind.Cosine;
    public int WarmupSteps { get; init; }
    /// <summary>Global-norm clipping threshold; 0 = no clipping (the norm is still computed and logged).</summary>
    public double MaxGradNorm { get; init; } = 1.0;
    /// <summary>Evaluate every N optimizer steps (0 = only at the end, when there is eval data).</summary>
    public int EvalEvery { get; init; }
    /// <summary>Eval batches per evaluation (0 = the whole eval set).</summary>
    public int EvalBatches { get; init; }
    /// <summary>Built-in-task problems generated per evaluation for exact match (0 = all of them).</summary>
    public int ExactMatchSamples { get; init; } = 50;
    /// <summary>Write checkpoint-&lt;step&gt;/ every N optimizer steps (0 = never, except on cancellation).</summary>
    public int SaveEvery { get; init; }
    /// <summary>Seeds the data order (the model's own seed governs LoRA init and dropout masks).</summary>
    public int Seed { get; init; }
    /// <summary>adamw | paged-adamw | adamw8bit | paged-adamw8bit.</summary>
    public string Optimizer { get; init; } = "adamw";
    public double WeightDecay { get; init; } = 0.01;
    /// <summary>Shuffle the training examples each epoch (a permutation from <see cref="Seed"/> and the epoch).</summary>
    public bool Shuffle { get; init; } = true;
    public BatchMode BatchMode { get; init; } = BatchMode.Padding;
    /// <summary>A non-finite loss or gradient norm: stop (default) or skip the step's update.</summary>
    public NonFinitePolicy OnNonFinite { get; init; } = NonFinitePolicy.Stop;
    /// <summary>With <see cref="NonFinitePolicy.Skip"/>: this many consecutive skipped steps stop training.</summary>
    public int MaxConsecutiveSkips { get; init; } = 10;
    /// <summary>
    /// Data-parallel training: the size of a gradient all-reduce bucket (docs/distributed.md). Buckets are reduced while
    /// the backward goes on; fewer, larger ones cost fewer collectives, smaller ones start earlier. Default 25 MiB.
    /// </summary>
    public long GradientBucketBytes { get; init; } = 25L << 20;
    /// <summary>Where checkpoints, metrics.json and the final adapter (or model) go.</summary>
    public required string OutputDir { get; init; }
    /// <summary>base_model_name_or_path written into adapter_config.json.</summary>
    public string? BaseModelNameOrPath { get; init; }
    /// <summary>Extra entries for metrics.json's "config" (e.g. the CLI's model and data paths).</summary>
    public IReadOnlyDictionary<string, string>? ExtraConfig { get; init; }

    /// <summary>Throws ArgumentException naming the option for an inconsistent or out-of-range setting.</summary>
    public void Validate()
    {
        if (Steps is null == Epochs is null) throw new ArgumentException("set exactly one of steps and epochs", nameof(Steps));
        if (Steps is int s && s <= 0) throw new ArgumentOutOfRangeException(nameof(Steps), s, "steps must be positive");
        if (Epochs is double e && !(e > 0 && double.IsFinite(e))) throw new ArgumentOutOfRangeException(nameof(Epochs), e, "epochs must be positive");
        if (BatchSize <= 0) throw new ArgumentOutOfRangeException(nameof(BatchSize), BatchSize, "batch must be positive");
        if (GradAccum <= 0) throw new ArgumentOutOfRangeException(nameof(GradAccum), GradAccum, "grad-accum must be positive");
        if (SeqLen < 2) throw new ArgumentOutOfRangeException(nameof(SeqLen), SeqLen, "seq must be at least 2");
        if (!(Lr >= 0) || !double.IsFinite(Lr)) throw new ArgumentOutOfRangeException(nameof(Lr), Lr, "lr must be a finite number >= 0");
        if (WarmupSteps < 0) throw new ArgumentOutOfRangeException(nameof(WarmupSteps), WarmupSteps, "warmup must be >= 0");
        if (!(MaxGradNorm >= 0)) throw new ArgumentOutOfRangeException(nameof(MaxGradNorm), MaxGradNorm, "max-grad-norm must be >= 0 (0 = off)");
        if (EvalEvery < 0) throw new ArgumentOutOfRangeException(nameof(EvalEvery), EvalEvery, "eval-every must be >= 0");
        if (EvalBatches < 0) throw new ArgumentOutOfRangeException(nameof(EvalBatches), EvalBatches, "eval batches must be >= 0");
        if (ExactMatchSamples < 0) throw new ArgumentOutOfRangeException(nameof(ExactMatchSamples), ExactMatchSamples, "must be >= 0");
        if (SaveEvery < 0) throw new ArgumentOutOfRangeException(nameof(SaveEvery), SaveEvery, "save-every must be >= 0");
        if (!Enum.IsDefined(OnNonFinite)) throw new ArgumentOutOfRangeException(nameof(OnNonFinite), OnNonFinite, "expected Stop or Skip");
        if (GradientBucketBytes <= 0) throw new ArgumentOutOfRangeException(nameof(GradientBucketBytes), GradientBucketBytes, "the gradient bucket size must be positive");
        if (MaxConsecutiveSkips < 1) throw new ArgumentOutOfRangeException(nameof(MaxConsecutiveSkips), MaxConsecutiveSkips, "must be at least 1");
        if (!Optim.OptimizerFactory.Names.Contains(Optimizer?.ToLowerInvariant()))
            throw new ArgumentException($"unknown optimizer '{Optimizer}': expected one of {string.Join(", ", Optim.OptimizerFactory.Names)}", nameof(Optimizer));
        if (string.IsNullOrWhiteSpace(OutputDir)) throw new ArgumentException("an output folder is needed", nameof(OutputDir));
    }
}

/// <summary>
/// What a <see cref="Trainer"/> trains and evaluates on: the training examples, optional eval examples (loss and
/// perplexity), and optional built-in-task problems for exact match by greedy generation, with the tokenizer.
/// </summary>
public sealed record TrainingData(IReadOnlyList<TrainingExample> Train, ITokenizer Tokenizer)
{
    public IReadOnlyList<TrainingExample>? Eval { get; init; }
    public IReadOnlyList<BuiltinProblem>? ExactMatchProblems { get; init; }

    /// <summary>The built-in task: its train split, and its held-out split for both eval loss and exact match.</summary>
    public static TrainingData Builtin(BuiltinTask task, ITokenizer tokenizer) =>
        new(task.TrainDataset(tokenizer).Examples, tokenizer)
        {
            Eval = task.EvalDataset(tokenizer).Examples,
            ExactMatchProblems = task.Eval,
        };
}

/// <summary>One optimizer step's numbers (as logged and written to metrics.json).</summary>
public sealed record StepMetrics(int Step, double Loss, double Lr, double TokensPerSecond, long PeakBytes, double GradNorm, long Tokens, double Seconds);

/// <summary>One evaluation: token-weighted mean loss, perplexity, and exact match on the built-in task (null otherwise).</summary>
public sealed record EvalMetrics(int Step, double Loss, double Perplexity, long Tokens, double? ExactMatch, int ExactMatchCount);

/// <summary>What the progress callback gets after every optimizer step and evaluation.</summary>
public sealed record TrainerProgress(int Step, int TotalSteps, double Loss, double Lr, double TokensPerSecond, double GradNorm,
    long AllocatedBytes, long PeakBytes, TimeSpan Elapsed, TimeSpan? Eta, EvalMetrics? Eval)
{
    /// <summary>The step's micro-batches had no trainable token (every label -100, e.g. cut off by truncation): no loss
    /// (<see cref="Loss"/> is NaN), no update.</summary>
    public bool NoTrainableTokens { get; init; }
    /// <summary>The step's update was dropped (<see cref="NonFinitePolicy.Skip"/>): what was not finite ("the loss is NaN"); null otherwise.</summary>
    public string? SkippedNonFinite { get; init; }
}

/// <summary>How a <see cref="Trainer.Train"/> call ended.</summary>
public sealed record TrainResult(int Steps, int TotalSteps, bool Cancelled, double? FinalLoss, EvalMetrics? FinalEval,
    string? LastCheckpoint, string MetricsPath, string? FinalOutput);

/// <summary>
/// Training stopped at <see cref="Step"/> because the loss or the gradient norm was not finite (the update of that
/// step was not applied). <see cref="LastCheckpoint"/> is the newest checkpoint written, or null.
/// </summary>
public sealed class TrainingDivergedException(int step, string what, double value, string? lastCheckpoint)
    : Exception($"step {step}: {what} is {value} (not finite); training stopped before applying that update. " +
                (lastCheckpoint is null ? "No checkpoint was written before it." : $"Last good checkpoint: {lastCheckpoint}"))
{
    public int Step { get; } = step;
    /// <summary>With <see cref="NonFinitePolicy.Skip"/>: the consecutive non-finite steps that stopped training (0 with Stop).</summary>
    public int ConsecutiveSkips { get; init; }
    public override string Message => ConsecutiveSkips > 0
        ? base.Message + $" {ConsecutiveSkips} consecutive steps had a non-finite value (skipping stops after {ConsecutiveSkips})."
        : base.Message;
    public string What { get; } = what;
    public double Value { get; } = value;
    public string? LastCheckpoint { get; } = lastCheckpoint;
}
