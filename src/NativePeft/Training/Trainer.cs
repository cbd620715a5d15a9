using System.Diagnostics;
using System.Globalization;
using NativePeft.Data;
using NativePeft.Distributed;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NativePeft.Runtime;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace NativePeft.Training;

/// <summary>
/// The training loop over a <see cref="LlamaModel"/> with LoRA (or full fine-tuning): micro-batches from a seeded
/// <see cref="Batcher"/>, gradient accumulation, a warmup + constant/linear/cosine learning-rate schedule, global-norm
/// clipping, AdamW (any <see cref="OptimizerFactory"/> form), evaluation, checkpoints and exact resume.
/// <para>
/// <b>Gradient accumulation is token-weighted</b>: the step's loss is Σᵢ nᵢ·Lᵢ / Σᵢ nᵢ over its K micro-batches (Lᵢ the
/// mean loss of micro-batch i over its nᵢ labelled target positions, <see cref="LlamaModel.LastTokenCount"/>), so K
/// micro-batches of B rows give the same loss and gradient as one batch of K·B rows. (HF's Trainer averages the K
/// means instead unless the model reports num_items_in_batch.) The model's backward adds d(Lᵢ) to the gradients;
/// before micro-batch i's backward the accumulated gradients are rescaled by n₍ᵢ₋₁₎/nᵢ, so after the last one they
/// hold Σ nᵢ dLᵢ / n_K, and the optimizer gets gradScale = n_K / Σ nᵢ (times the clip coefficient). With K = 1 no
/// rescaling happens at all.
/// </para>
/// <para>
/// Step numbers are 1-based in logs, metrics and checkpoint names (checkpoint-3 holds the state after 3 updates).
/// The update of step k (1-based) uses lr · λ(k−1) (<see cref="LrSchedule"/>, as HF). Dropout masks of micro-batch m of
/// step k are drawn for <see cref="DropoutContext.Step"/> = (k−1)·K + m, so a run is deterministic on the CPU for a
/// fixed seed and a resumed run draws the same masks.
/// </para>
/// <para>
/// A non-finite loss or gradient norm stops training with a <see cref="TrainingDivergedException"/> naming the step
/// and the last checkpoint; that step's update is not applied and metrics.json is written first. With
/// <see cref="TrainerOptions.OnNonFinite"/> = <see cref="NonFinitePolicy.Skip"/> the step's update is dropped instead
/// (<see cref="SkipStep"/>) and training stops at the <see cref="TrainerOptions.MaxConsecutiveSkips"/>-th consecutive one.
/// </para>
/// </summary>
public sealed partial class Trainer : IDisposable
{
    public const string MetricsFileName = "metrics.json";
    public const string StateFileName = "trainer_state.json";
    public const string OptimizerFileName = "optimizer.safetensors";
    public const string FullModelFileName = "model.safetensors";
    public const string CheckpointPrefix = "checkpoint-";

    private readonly LlamaModel _model;
    private readonly TrainingData _data;
    private readonly ILogger _logger;
    private readonly IProgress<TrainerProgress>? _progress;
    private readonly Batcher _batcher;
    private readonly IOptimizer _optimizer;
    private readonly List<StepMetrics> _steps = [];
    private readonly List<EvalMetrics> _evals = [];
    private readonly bool _full;
    private int _step;
    private long _tokensSeen;
    private double _secondsTrained;
    private int _lastSavedStep = -1;
    private bool _disposed;
    private readonly List<int> _skippedSteps = [];
    private int _consecutiveSkips;
    private string? _lastSkipped;

    /// <summary>Test hook: called after the backward passes of a step (1-based step), before the gradient norm.</summary>
    internal Action<int>? AfterBackward { get; set; }

    public TrainerOptions Options { get; }
    public LlamaModel Model => _model;
    public IOptimizer Optimizer => _optimizer;
    /// <summary>Optimizer steps done so far.</summary>
    public int Step => _step;
    public int TotalSteps { get; }
    public IReadOnlyList<StepMetrics> StepHistory => _steps;
    public IReadOnlyList<EvalMetrics> EvalHistory => _evals;
    /// <summary>Steps whose update was dropped for a non-finite loss or gradient norm (<see cref="NonFinitePolicy.Skip"/>).</summary>
    public IReadOnlyList<int> SkippedSteps => _skippedSteps;
    /// <summary>The newest checkpoint folder written (or resumed from), or null.</summary>
    public string? LastCheckpoint { get; private set; }
    public string OutputDir { get; }
    public string MetricsPath => Path.Combine(OutputDir, MetricsFileName);

    /// <param name="model">The model to train (its own <see cref="IOps"/>).</param>
    /// <param name="data">Training and evaluation data.</param>
    /// <param name="options">The run's settings.</param>
    /// <param name="logger">Where steps, evaluations and checkpoints are logged (rank 0 only in a data-parallel run).</param>
    /// <param name="progress">Called after every step (rank 0 only in a data-parallel run).</param>
    /// <param name="communicator">
    /// Data-parallel training (docs/distributed.md): this rank's group. Every rank constructs its trainer with the same
    /// model, data and options; a world of N ranks trains the run one rank would train with grad-accum K·N. Null or a
    /// world of 1: one process (the plain code path).
    /// </param>
    public Trainer(LlamaModel model, TrainingData data, TrainerOptions options, ILogger<Trainer>? logger = null,
        IProgress<TrainerProgress>? progress = null, ICommunicator? communicator = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (model.TrainableParameters.Count == 0)
            throw new ArgumentException("the model has nothing to train: build it with LoRA or full fine-tuning", nameof(model));
        if (model.TrainableParameters.Any(p => p.Param.DType != DType.F32))
            throw new ArgumentException($"training needs fp32 trainable parameters (the optimizers are fp32); this model computes in {model.ComputeDType}", nameof(model));
        if (model.LoraLayers.Any(l => l.IsMerged))
            throw new ArgumentException("the model's adapters are merged; unmerge them before training", nameof(model));
        if (data.Train.Count == 0) throw new ArgumentException("no training examples", nameof(data));
        _model = model;
        _data = data;
        Options = options;
        _logger = logger ?? (ILogger)NullLogger.Instance;
        _progress = progress;
        _full = model.Options.FullFineTuning;
        // A world of 1 is the plain step, except over NCCL: a 1-rank NCCL job runs the data-parallel step, so that one GPU
        // checks the path (gpu-check's nccl section; the result equals the plain run's to rounding).
        if (communicator is { WorldSize: > 1 } or { Backend: "nccl" })
        {
            _comm = communicator;
            if (_comm.Rank != 0)
            {
                _logger = new RankLogger(_logger, _comm.Rank);
                _progress = null;
            }
        }
        OutputDir = Path.GetFullPath(options.OutputDir);
        _batcher = Batcher.For(data.Train, new BatcherOptions
        {
            BatchSize = options.BatchSize, SeqLen = options.SeqLen, Mode = options.BatchMode, Shuffle = options.Shuffle,
            Seed = (ulong)(uint)options.Seed,
        }, data.Tokenizer);
        TotalSteps = options.Steps ?? StepsForEpochs(options.Epochs!.Value);
        _optimizer = OptimizerFactory.Create(options.Optimizer, model.Ops, new AdamWOptions { Lr = options.Lr, WeightDecay = options.WeightDecay });
        if (_comm is not null) InitDistributed();
    }

    private int StepsForEpochs(double epochs)
    {
        // Padding: ceil(n / B) batches per epoch. Packing: count them by running a throw-away batcher for one epoch.
        int batches;
        if (Options.BatchMode == BatchMode.Padding) batches = (_data.Train.Count + Options.BatchSize - 1) / Options.BatchSize;
        else
        {
            var probe = Batcher.For(_data.Train, _batcher.Options with { Shuffle = false }, _data.Tokenizer);
            batches = 0;
            for (int seen = 0; seen < _data.Train.Count; batches++) seen += probe.Next().Examples;
        }
        return Math.Max(1, (int)Math.Ceiling(epochs * batches / GlobalGradAccum));
    }

    /// <summary>The learning rate of update number <paramref name="step"/> (1-based).</summary>
    public double LearningRateAt(int step) =>
        LrSchedule.LearningRate(Options.Schedule, Options.Lr, step - 1, Options.WarmupSteps, TotalSteps);

    // ------------------------------------------------------------------------------------------ the loop

    /// <summary>
    /// Runs optimizer steps from <see cref="Step"/> + 1 to <see cref="TotalSteps"/>, evaluating and saving as the options
    /// say, then evaluates (when there is eval data and the last step was not just evaluated), writes metrics.json and the
    /// final adapter (&lt;out&gt;/adapter) or, with full fine-tuning, the model (&lt;out&gt;/model). Cancellation is checked
    /// between steps: it saves a checkpoint of the current step and returns with <see cref="TrainResult.Cancelled"/>.
    /// </summary>
    public TrainResult Train(CancellationToken cancellationToken = default)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_comm is null) return TrainLoop(cancellationToken);
        try
        {
            return TrainLoop(cancellationToken);
        }
        catch (Exception e) when (e is not TrainingDivergedException)
        {
            // Every rank stops: the others' pending and next collectives end with this rank's message.
            _comm.Abort(e.Message);
            throw;
        }
    }

    private TrainResult TrainLoop(CancellationToken cancellationToken)
    {
        // An output folder that cannot be written fails now, not after the last step.
        if (IsRoot) OutputFolder.CheckWritable(OutputDir);
        var ops = _model.Ops;
        var clock = Stopwatch.StartNew();
        double secondsAtStart = _secondsTrained;
        int stepsAtStart = _step;
        _model.Dropout.Training = true;
        while (_step < TotalSteps)
        {
            if (Cancelled(cancellationToken))
            {
                string? ckpt = _lastSavedStep == _step ? LastCheckpoint : SaveCheckpoint();
                WriteMetrics();
                LogCancelled(_logger, _step, ckpt ?? "(none)");
                return new TrainResult(_step, TotalSteps, true, _steps.LastOrDefault()?.Loss, _evals.LastOrDefault(), ckpt, MetricsPath, null);
            }
            _lastSkipped = null;
            var m = TrainStep();
            _secondsTrained += m.Seconds;
            if (Options.EvalEvery > 0 && _step % Options.EvalEvery == 0 && HasEvalData) Evaluate();
            if (Options.SaveEvery > 0 && _step % Options.SaveEvery == 0) SaveCheckpoint();
            double done = _secondsTrained - secondsAtStart;
            int stepsDone = _step - stepsAtStart;
            TimeSpan? eta = stepsDone > 0 ? TimeSpan.FromSeconds(done / stepsDone * (TotalSteps - _step)) : null;
            _progress?.Report(new TrainerProgress(_step, TotalSteps, m.Loss, m.Lr, m.TokensPerSecond, m.GradNorm,
                ops.Memory.AllocatedBytes, m.PeakBytes, clock.Elapsed, eta, _evals.Count > 0 && _evals[^1].Step == _step ? _evals[^1] : null)
            { NoTrainableTokens = _lastSkipped is null && double.IsNaN(m.Loss), SkippedNonFinite = _lastSkipped });
        }
        if (HasEvalData && (_evals.Count == 0 || _evals[^1].Step != _step)) Evaluate();
        WriteMetrics();
        string final = SaveFinal();
        LogFinished(_logger, _step, final);
        return new TrainResult(_step, TotalSteps, false, _steps.LastOrDefault()?.Loss, _evals.LastOrDefault(), LastCheckpoint, MetricsPath, final);
    }

    private bool HasEvalData => _data.Eval is { Count: > 0 } || _data.ExactMatchProblems is { Count: > 0 };

    /// <summary>One optimizer step (forward/backward over K micro-batches, norm, clip, update); returns its metrics.</summary>
    private StepMetrics TrainStep()
    {
        if (_comm is not null) return DistributedTrainStep();
        var ops = _model.Ops;
        var clock = Stopwatch.StartNew();
        using var range = Nvtx.Range("train step");
        ops.Memory.ResetPeak();
        int stepNumber = _step + 1;
        int K = Options.GradAccum;
        _model.ZeroGrad();
        double weightedLoss = 0;
        long labelled = 0, tokens = 0;
        int previousCount = 0;
        var grads = _model.TrainableParameters.Select(p => p.Grad).ToList();
        (string What, double Value)? nonFinite = null;
        for (int micro = 0; micro < K; micro++)
        {
            var batch = _batcher.Next();
            tokens += batch.Tokens;
            if (nonFinite is not null) continue; // a skipped step still consumes its micro-batches (the data moves on)
            _model.Dropout.Step = (long)_step * K + micro;
            double loss = _model.Forward(batch.InputIds, batch.Labels, batch.Rows, batch.SeqLen, batch.Positions);
            int n = _model.LastTokenCount;
            if (n == 0) continue; // nothing to learn from this micro-batch: no loss, no gradient
            if (!double.IsFinite(loss))
            {
                nonFinite = NonFinite(stepNumber, "the loss", loss);
                continue;
            }
            if (previousCount > 0 && previousCount != n)
                foreach (var g in grads) ops.Scale(g, (double)previousCount / n);
            _model.Backward();
            previousCount = n;
            weightedLoss += loss * n;
            labelled += n;
        }
        if (nonFinite is null) AfterBackward?.Invoke(stepNumber);
        double lr = LearningRateAt(stepNumber);
        if (nonFinite is { } skip) return SkipStep(stepNumber, skip.What, skip.Value, lr, tokens, clock);
        if (labelled == 0)
        {
            // Every micro-batch was fully masked: no update, but the schedule and the data move on.
            LogEmptyStep(_logger, stepNumber);
            _step = stepNumber;
            var empty = new StepMetrics(stepNumber, double.NaN, lr, 0, ops.Memory.PeakAllocatedBytes, 0, tokens, clock.Elapsed.TotalSeconds);
            return empty;
        }
        double stepLoss = weightedLoss / labelled;
        if (!double.IsFinite(stepLoss))
            return SkipStep(stepNumber, "the loss", NonFinite(stepNumber, "the loss", stepLoss).Value, lr, tokens, clock);
        return Update(stepNumber, stepLoss, (double)previousCount / labelled, grads, lr, tokens, clock);
    }

    /// <summary>
    /// The end of a step whose gradients are accumulated (times <paramref name="gradScale"/> they are the step's mean
    /// gradient): the global norm, clipping, the optimizer update, the metrics.
    /// </summary>
    private StepMetrics Update(int stepNumber, double stepLoss, double gradScale, List<Tensor> grads, double lr, long tokens, Stopwatch clock)
    {
        var ops = _model.Ops;
        double gradNorm;
        using (Nvtx.Range("gradient norm")) gradNorm = GradientClipping.GlobalNorm(ops, grads) * gradScale;
        if (!double.IsFinite(gradNorm))
            return SkipStep(stepNumber, "the gradient norm", NonFinite(stepNumber, "the gradient norm", gradNorm).Value, lr, tokens, clock);
        double clip = Options.MaxGradNorm > 0 ? GradientClipping.ClipCoefficient(gradNorm, Options.MaxGradNorm) : 1.0;
        using (Nvtx.Range("optimizer step"))
        {
            if (_owned is null) _optimizer.Step(_model.TrainableParameters, lr, gradScale * clip);
            else StepShard(lr, gradScale * clip);
            _model.RefreshWorkingWeights();
        }
        _step = stepNumber;
        _tokensSeen += tokens;
        _consecutiveSkips = 0;
        double seconds = clock.Elapsed.TotalSeconds;
        var m = new StepMetrics(stepNumber, stepLoss, lr, seconds > 0 ? tokens / seconds : 0, ops.Memory.PeakAllocatedBytes, gradNorm, tokens, seconds);
        _steps.Add(m);
        LogStep(_logger, stepNumber, TotalSteps, stepLoss, lr, gradNorm, m.TokensPerSecond, ops.Memory.AllocatedBytes, m.PeakBytes);
        return m;
    }

    /// <summary>
    /// A non-finite loss or gradient norm at <paramref name="step"/>: with <see cref="NonFinitePolicy.Stop"/> training
    /// stops (<see cref="TrainingDivergedException"/>); with <see cref="NonFinitePolicy.Skip"/> it returns what was not
    /// finite, and the caller drops the step (<see cref="SkipStep"/>).
    /// </summary>
    private (string What, double Value) NonFinite(int step, string what, double value)
    {
        if (Options.OnNonFinite == NonFinitePolicy.Stop) Diverge(step, what, value, 0);
        return (what, value);
    }

    /// <summary>
    /// --on-nonfinite skip: the step's update is dropped: the gradients are zeroed, the optimizer (its moments and its
    /// step count) is untouched, the weights are unchanged. The step still counts: its data is consumed and the
    /// learning-rate schedule moves on (as a step without trainable tokens), so a resumed run sees the same data.
    /// Skipped steps are logged, listed in metrics.json ("skipped_steps") and in trainer_state.json; the
    /// <see cref="TrainerOptions.MaxConsecutiveSkips"/>-th consecutive one stops training.
    /// </summary>
    private StepMetrics SkipStep(int stepNumber, string what, double value, double lr, long tokens, Stopwatch clock)
    {
        _model.ZeroGrad();
        _consecutiveSkips++;
        if (_consecutiveSkips >= Options.MaxConsecutiveSkips) Diverge(stepNumber, what, value, _consecutiveSkips);
        _skippedSteps.Add(stepNumber);
        LogSkipped(_logger, stepNumber, what, value, _consecutiveSkips, Options.MaxConsecutiveSkips);
        _step = stepNumber;
        _tokensSeen += tokens;
        _lastSkipped = $"{what} is {value.ToString(CultureInfo.InvariantCulture)}";
        return new StepMetrics(stepNumber, double.NaN, lr, 0, _model.Ops.Memory.PeakAllocatedBytes, double.NaN, tokens, clock.Elapsed.TotalSeconds);
    }

    private void Diverge(int step, string what, double value, int consecutive)
    {
        LogDiverged(_logger, step, what, value, LastCheckpoint ?? "(none)");
        try { WriteMetrics(); }
        catch (OutputFolderException) { }
        throw new TrainingDivergedException(step, what, value, LastCheckpoint) { ConsecutiveSkips = consecutive };
    }

    // ------------------------------------------------------------------------------------------ evaluation

    /// <summary>
    /// Evaluates at the current step: the token-weighted mean loss over the eval examples (the first
    /// <see cref="TrainerOptions.EvalBatches"/> batches of B rows in order, all when 0) and its perplexity; on the
    /// built-in task also exact match over the first <see cref="TrainerOptions.ExactMatchSamples"/> held-out problems by
    /// greedy decoding with a KV cache (<see cref="Inference.TextGenerator.Greedy"/>, the same tokens as <see cref="GreedyGenerate"/>). Dropout is off while evaluating. Appended to <see cref="EvalHistory"/>.
    /// </summary>
    public EvalMetrics Evaluate()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        bool training = _model.Dropout.Training;
        _model.Dropout.Training = false;
        try
        {
            double sum = 0;
            long count = 0;
            if (_data.Eval is { Count: > 0 } eval)
            {
                int padId = _data.Tokenizer.PadId ?? _data.Tokenizer.EosId ?? 0;
                int batches = 0;
                foreach (var batch in Batcher.Sequential(eval, Options.BatchSize, Options.SeqLen, padId))
                {
                    if (Options.EvalBatches > 0 && batches >= Options.EvalBatches) break;
                    double loss = _model.Forward(batch.InputIds, batch.Labels, batch.Rows, batch.SeqLen);
                    int n = _model.LastTokenCount;
                    if (n == 0) continue; // nothing to predict: does not count toward EvalBatches (no NaN eval loss)
                    batches++;
                    sum += loss * n;
                    count += n;
                }
            }
            double mean = count > 0 ? sum / count : double.NaN;
            double? exact = null;
            int exactCount = 0;
            if (_data.ExactMatchProblems is { Count: > 0 } problems)
            {
                int take = Options.ExactMatchSamples == 0 ? problems.Count : Math.Min(problems.Count, Options.ExactMatchSamples);
                int hits = 0;
                // The KV cache and its workspace take the training activations' place (the next step reallocates them),
                // so generation fits the transient arena of a pool sized from the plan (DevicePool's alsoFits).
                _model.ReleaseActivations();
                for (int i = 0; i < take; i++)
                {
                    var p = problems[i];
                    var prompt = _data.Tokenizer.Encode(p.Prompt, _data.Tokenizer.BosId is not null);
                    int maxNew = _data.Tokenizer.Encode(p.Answer, false).Length + 1;
                    var generated = Inference.TextGenerator.Greedy(_model, prompt, maxNew, _data.Tokenizer.EosId);
                    if (BuiltinTask.ExactMatch(generated, p.Answer, _data.Tokenizer)) hits++;
                }
                exactCount = take;
                exact = take > 0 ? (double)hits / take : null;
            }
            var m = new EvalMetrics(_step, mean, count > 0 ? Math.Exp(mean) : double.NaN, count, exact, exactCount);
            _evals.Add(m);
            LogEval(_logger, _step, mean, m.Perplexity, exact ?? double.NaN, exactCount);
            return m;
        }
        finally { _model.Dropout.Training = training; }
    }

    /// <summary>
    /// Greedy decoding, deliberately simple: for each new token one full forward over the whole sequence so far
    /// (batch 1, no KV cache), the logits of the last position via <see cref="LlamaModel.Logits"/>, argmax (first
    /// maximum on ties). Stops after eos (not included in the result) or <paramref name="maxNewTokens"/>. O(n²) in the
    /// length — fine for the built-in task's short answers, not for long generations. Uses the model's current dropout
    /// setting (turn it off for evaluation).
    /// </summary>
    public static int[] GreedyGenerate(LlamaModel model, IReadOnlyList<int> prompt, int maxNewTokens, int? eosId)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(prompt);
        if (prompt.Count == 0) throw new ArgumentException("an empty prompt", nameof(prompt));
        var ids = new List<int>(prompt);
        var generated = new List<int>();
        int V = model.Config.VocabSize;
        for (int k = 0; k < maxNewTokens; k++)
        {
            int T = ids.Count;
            var labels = new int[T];
            Array.Fill(labels, TrainingExample.IgnoreIndex);
            model.Forward(ids.ToArray(), labels, 1, T);
            var logits = model.Ops.Memory.Allocate(DType.F32, T, V);
            var last = new float[V];
            try
            {
                model.Logits(logits);
                model.Ops.Download<float>(logits.RowSlice(T - 1, 1), last);
            }
            finally { model.Ops.Memory.Free(logits); }
            int best = 0;
            for (int v = 1; v < V; v++) if (last[v] > last[best]) best = v;
            if (best == eosId) break;
            generated.Add(best);
            ids.Add(best);
        }
        return generated.ToArray();
    }

    // ------------------------------------------------------------------------------------------ checkpoints

    /// <summary>
    /// Writes &lt;out&gt;/checkpoint-&lt;step&gt;/ atomically (a hidden temporary folder, then a rename): the PEFT adapter
    /// (adapter_config.json, adapter_model.safetensors) or, with full fine-tuning, model.safetensors with every trainable
    /// tensor (fp32, HF names); optimizer.safetensors (<see cref="IOptimizer.SaveState"/>); trainer_state.json (step,
    /// seeds, data position, schedule, dropout step, metrics so far). An existing folder of the same step is replaced.
    /// Also rewrites metrics.json. Returns the folder.
    /// </summary>
    public string SaveCheckpoint()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        string final = Path.Combine(OutputDir, CheckpointPrefix + _step.ToString(CultureInfo.InvariantCulture));
        // Data-parallel: ZeRO-1's optimizer shards are gathered to rank 0 (a collective), rank 0 writes, the others wait.
        var optimizerState = OptimizerStateForCheckpoint();
        if (IsRoot) SaveFolder(final, temp =>
        {
            if (_full)
            {
                Directory.CreateDirectory(temp);
                SafetensorsWriter.Write(Path.Combine(temp, FullModelFileName), TrainableTensors(), new Dictionary<string, string> { ["format"] = "pt" });
            }
            else PeftAdapter.Save(temp, _model, Options.BaseModelNameOrPath);
            SafetensorsWriter.Write(Path.Combine(temp, OptimizerFileName), optimizerState!,
                new Dictionary<string, string> { ["optimizer"] = _optimizer.Name });
            OutputFolder.WriteAllTextAtomic(Path.Combine(temp, StateFileName), TrainerStateJson.Write(this));
        });
        LastCheckpoint = final;
        _lastSavedStep = _step;
        WriteMetrics();
        _comm?.Barrier();
        LogSaved(_logger, _step, final);
        return final;
    }

    private List<SafetensorsTensor> TrainableTensors()
    {
        var list = new List<SafetensorsTensor>();
        foreach (var (name, param, _) in _model.TrainableParameters)
        {
            var values = new float[param.Count];
            _model.Ops.Download<float>(param, values);
            list.Add(SafetensorsTensor.From(name, param.Shape.Select(d => (long)d).ToArray(), values));
        }
        return list;
    }

    /// <summary>
    /// Restores a checkpoint written by <see cref="SaveCheckpoint"/> (of a run with the same model, data and options):
    /// the trainable weights, the optimizer state, the data position, the step, the dropout seed and the metrics so
    /// far. The next <see cref="Train"/> continues with step k + 1; on the CPU its losses equal an uninterrupted run's
    /// bit for bit. Throws <see cref="InvalidDataException"/> naming the file for a missing or inconsistent part.
    /// </summary>
    public void Resume(string checkpointDir)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(checkpointDir);
        string dir = Path.GetFullPath(checkpointDir);
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"{dir}: no such checkpoint folder");
        string statePath = Path.Combine(dir, StateFileName);
        if (!File.Exists(statePath)) throw new InvalidDataException($"{statePath}: missing (not a checkpoint folder?)");
        var state = TrainerStateJson.Read(statePath);
        CheckSameRun(state, statePath);
        if (state.Step > TotalSteps)
            throw new InvalidDataException($"{statePath}: the checkpoint is at step {state.Step}, past this run's {TotalSteps} steps");

        if (_full)
        {
            string path = Path.Combine(dir, FullModelFileName);
            using var file = SafetensorsFile.Open(path);
            foreach (var (name, param, _) in _model.TrainableParameters)
            {
                if (!file.Contains(name)) throw new InvalidDataException($"{path}: no tensor {name}");
                var info = file.GetInfo(name);
                if (info.DType != DType.F32 || info.ElementCount != param.Count)
                    throw new InvalidDataException($"{path}: {name} is {info.DType} [{string.Join(", ", info.Shape)}], expected F32 [{param.ShapeText}]");
                var values = file.GetSpan<float>(name);
                if (Finite.FirstBad(values) is long bad and >= 0)
                    throw new InvalidDataException($"{path}: {name}: {Finite.Describe(bad, values[(int)bad])}: the checkpoint's weights are not finite");
                _model.Ops.Upload<float>(values, param);
            }
            _model.RefreshWorkingWeights();
        }
        else PeftAdapter.Load(dir).ApplyTo(_model);

        string optPath = Path.Combine(dir, OptimizerFileName);
        if (!File.Exists(optPath)) throw new InvalidDataException($"{optPath}: missing");
        using (var file = SafetensorsFile.Open(optPath))
        {
            // The fp32 states (m, v, 8-bit absmax) are checked like the weights: a NaN moment would poison every update.
            foreach (var t in file.Tensors)
            {
                if (t.DType != DType.F32) continue;
                var values = file.GetSpan<float>(t.Name);
                if (Finite.FirstBad(values) is long bad and >= 0)
                    throw new InvalidDataException($"{optPath}: {t.Name}: {Finite.Describe(bad, values[(int)bad])}: the optimizer state is not finite");
            }
            _optimizer.LoadState(file.Tensors.Where(t => KeepsStateOf(t.Name))
                .Select(t => new SafetensorsTensor(t.Name, t.DType, t.Shape, file.GetMemory(t.Name))).ToList());
        }

        _batcher.Restore(state.Data);
        _model.Dropout.Seed = state.DropoutSeed;
        _step = state.Step;
        _tokensSeen = state.TokensSeen;
        _secondsTrained = state.Seconds;
        _steps.Clear();
        _steps.AddRange(state.Steps);
        _evals.Clear();
        _evals.AddRange(state.Evals);
        _skippedSteps.Clear();
        _skippedSteps.AddRange(state.SkippedSteps);
        _consecutiveSkips = 0;
        for (int k = _step; _skippedSteps.Contains(k); k--) _consecutiveSkips++;
        LastCheckpoint = dir;
        _lastSavedStep = _step;
        LogResumed(_logger, _step, dir);
    }

    /// <summary>
    /// Refuses a checkpoint of another run: every trajectory setting recorded in trainer_state.json
    /// (<see cref="TrainerStateJson.Settings"/>: base model identity, method, seed, schedule, batch shape, optimizer,
    /// LoRA shape, training data …) must equal this run's; the message names each one that differs, old → new. A
    /// checkpoint written before the settings were recorded is checked on what it has (method, lr, schedule, warmup,
    /// optimizer) and resumed with a warning that the rest could not be checked. Batch and grad-accum are compared as
    /// the global batch (<see cref="GlobalBatchChanges"/>), so a data-parallel checkpoint resumes on another number of ranks.
    /// </summary>
    private void CheckSameRun(TrainerState state, string statePath)
    {
        var changed = new List<string>();
        string method = TrainerStateJson.MethodName(this);
        if (state.Settings is { } saved)
        {
            var current = TrainerStateJson.Settings(this).ToDictionary(x => x.Name, x => TrainerStateJson.SettingText(x.Value));
            changed.AddRange(GlobalBatchChanges(state, saved));
            foreach (var (name, value) in current)
            {
                if (name is "batch" or "grad_accum") continue; // compared as the global batch, above
                if (!saved.TryGetValue(name, out var old)) changed.Add($"{name} (not recorded) -> {TrainerStateJson.SettingDisplay(value)}");
                else if (old != value) changed.Add($"{name} {TrainerStateJson.SettingDisplay(old)} -> {TrainerStateJson.SettingDisplay(value)}");
            }
            foreach (var name in saved.Keys.Where(k => !current.ContainsKey(k)))
                changed.Add($"{name} {TrainerStateJson.SettingDisplay(saved[name])} -> (not used by this run)");
        }
        else
        {
            if (state.FullFineTuning != _full || (state.Method is { } m && m != method))
                changed.Add($"method {state.Method ?? (state.FullFineTuning ? "full" : "lora")} -> {method}");
            if (state.Lr is double lr && lr != Options.Lr) changed.Add(string.Create(CultureInfo.InvariantCulture, $"lr {lr} -> {Options.Lr}"));
            if (state.Schedule is { } kind && kind != LrSchedule.Name(Options.Schedule)) changed.Add($"schedule {kind} -> {LrSchedule.Name(Options.Schedule)}");
            if (state.WarmupSteps is int w && w != Options.WarmupSteps) changed.Add($"warmup {w} -> {Options.WarmupSteps}");
            if (!string.Equals(state.Optimizer, _optimizer.Name, StringComparison.Ordinal)) changed.Add($"optimizer {state.Optimizer} -> {_optimizer.Name}");
            if (changed.Count == 0) LogUncheckedResume(_logger, statePath);
        }
        if (changed.Count > 0)
            throw new InvalidDataException($"{statePath}: the checkpoint was trained with other settings ({string.Join(", ", changed)}); resume with the checkpoint's settings, or start a new run");
    }

    // ------------------------------------------------------------------------------------------ outputs

    /// <summary>Writes metrics.json atomically: {"steps": [...], "eval": [...], "config": {...}}.</summary>
    public void WriteMetrics()
    {
        if (!IsRoot) return; // data-parallel: rank 0 writes
        try
        {
            Directory.CreateDirectory(OutputDir);
            OutputFolder.WriteAllTextAtomic(MetricsPath, TrainerStateJson.Metrics(this));
        }
        catch (Exception e) when (OutputFolder.IsWriteFailure(e))
        {
            throw OutputFolder.WriteFailed(MetricsPath, e, LastCheckpoint, mentionKept: true);
        }
    }

    /// <summary>
    /// Writes a folder of the run (a checkpoint, the final adapter or model) under a temporary name with
    /// <paramref name="write"/>, then puts it in place with <see cref="OutputFolder.Replace"/> (an older copy of the same
    /// name stays complete until the new one is in). A write that fails removes only the temporary folder and becomes an
    /// <see cref="OutputFolderException"/> naming the folder, the free space and the last good checkpoint, which is kept.
    /// </summary>
    private void SaveFolder(string final, Action<string> write)
    {
        string temp = OutputFolder.TempPathFor(final);
        try
        {
            OutputFolder.BeforeWrite(temp);
            write(temp);
            OutputFolder.Replace(temp, final);
        }
        catch (Exception e)
        {
            try { if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true); }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
            if (OutputFolder.IsWriteFailure(e)) throw OutputFolder.WriteFailed(final, e, LastCheckpoint, mentionKept: true);
            throw;
        }
    }

    /// <summary>&lt;out&gt;/adapter (LoRA) or &lt;out&gt;/model (full fine-tuning, a HF checkpoint), replacing an older one.</summary>
    private string SaveFinal()
    {
        string name = _full ? "model" : "adapter";
        string final = Path.Combine(OutputDir, name);
        if (IsRoot) SaveFolder(final, temp =>
        {
            if (_full)
            {
                var tensors = _model.BaseParameters().Select(p =>
                {
                    var t = p.Dense ?? throw new InvalidOperationException($"{p.Name}: not dense");
                    var values = new float[t.Count];
                    _model.Ops.Download<float>(t, values);
                    return SafetensorsTensor.From(p.Name, t.Shape.Select(d => (long)d).ToArray(), values);
                }).ToList();
                HfCheckpoint.Write(temp, _model.Config, tensors, long.MaxValue);
            }
            else PeftAdapter.Save(temp, _model, Options.BaseModelNameOrPath);
        });
        _comm?.Barrier();
        return final;
    }

    internal Batcher Batcher => _batcher;
    internal long TokensSeen => _tokensSeen;
    internal double SecondsTrained => _secondsTrained;
    internal TrainingData Data => _data;
    private string? _dataIdentity;
    /// <summary><see cref="TrainerStateJson.DataIdentity"/> of the training examples (computed once).</summary>
    internal string DataIdentity => _dataIdentity ??= TrainerStateJson.DataIdentity(_data.Train);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _reducer?.Dispose();
        _optimizer.Dispose();
    }

    // ------------------------------------------------------------------------------------------ log events

    [LoggerMessage(EventId = 1, Level = LogLevel.Information,
        Message = "step {Step}/{TotalSteps} loss {Loss:F4} lr {Lr:E3} grad_norm {GradNorm:F4} tokens/s {TokensPerSecond:F0} memory {AllocatedBytes} B peak {PeakBytes} B")]
    private static partial void LogStep(ILogger logger, int step, int totalSteps, double loss, double lr, double gradNorm, double tokensPerSecond, long allocatedBytes, long peakBytes);

    [LoggerMessage(EventId = 2, Level = LogLevel.Information,
        Message = "eval at step {Step}: loss {Loss:F4} perplexity {Perplexity:F3} exact match {ExactMatch:F3} over {ExactMatchCount} problems")]
    private static partial void LogEval(ILogger logger, int step, double loss, double perplexity, double exactMatch, int exactMatchCount);

    [LoggerMessage(EventId = 3, Level = LogLevel.Information, Message = "saved checkpoint of step {Step} to {Path}")]
    private static partial void LogSaved(ILogger logger, int step, string path);

    [LoggerMessage(EventId = 4, Level = LogLevel.Information, Message = "resumed at step {Step} from {Path}")]
    private static partial void LogResumed(ILogger logger, int step, string path);

    [LoggerMessage(EventId = 5, Level = LogLevel.Error, Message = "step {Step}: {What} is {Value}; stopping. Last good checkpoint: {Checkpoint}")]
    private static partial void LogDiverged(ILogger logger, int step, string what, double value, string checkpoint);

    [LoggerMessage(EventId = 6, Level = LogLevel.Warning, Message = "cancelled after step {Step}; checkpoint {Checkpoint}")]
    private static partial void LogCancelled(ILogger logger, int step, string checkpoint);

    [LoggerMessage(EventId = 7, Level = LogLevel.Warning, Message = "step {Step}: no labelled token in any micro-batch; no update")]
    private static partial void LogEmptyStep(ILogger logger, int step);

    [LoggerMessage(EventId = 9, Level = LogLevel.Warning,
        Message = "step {Step}: {What} is {Value}; update skipped (--on-nonfinite skip: {Consecutive} consecutive, training stops at {Max})")]
    private static partial void LogSkipped(ILogger logger, int step, string what, double value, int consecutive, int max);

    [LoggerMessage(EventId = 10, Level = LogLevel.Warning,
        Message = "{Path} records no run settings (an older checkpoint): only its method, schedule and optimizer were checked; the base model, seed, batch shape, LoRA shape and data were not")]
    private static partial void LogUncheckedResume(ILogger logger, string path);

    [LoggerMessage(EventId = 8, Level = LogLevel.Information, Message = "finished {Step} steps; wrote {Output}")]
    private static partial void LogFinished(ILogger logger, int step, string output);
}
