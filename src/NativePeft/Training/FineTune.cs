using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using NativePeft.Data;
using NativePeft.Distributed;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NativePeft.Planning;
using NativePeft.Runtime;

namespace NativePeft.Training;

/// <summary>
/// A fine-tune in a few lines, without the CLI (docs/embedding.md):
/// <code>
/// using var run = FineTune.Create(new FineTuneOptions { Model = "builtin", Data = "builtin", Method = FineTuneMethod.Qlora }, logger);
/// run.Train();
/// run.SaveAdapter("my-adapter");
/// </code>
/// <see cref="Create(FineTuneOptions, ILogger?)"/> checks the options, opens the checkpoint and its tokenizer (an
/// <see cref="IdsOnlyTokenizer"/> when the folder has none: pre-tokenized data needs no tokenizer), loads the data
/// (when <see cref="FineTuneOptions.Data"/> is set), opens the device and builds the <see cref="LlamaModel"/>: LoRA on a
/// BF16-stored frozen base, QLoRA on an NF4 base with double-quantized absmax (blocksize 64), or full fine-tuning of
/// every fp32 weight. Bad options and bad files throw a <see cref="FineTuneException"/> naming the option and what is
/// wrong, before anything is written (beyond <see cref="FineTuneOptions.OutputDir"/>'s <see cref="OutputLock"/>, held until
/// <see cref="Dispose"/> and removed with a folder it created on failure). <see cref="Train(CancellationToken)"/> runs the <see cref="Trainer"/>.
/// </summary>
public sealed partial class FineTune : IDisposable
{
    private readonly ModelSession _session;
    private readonly IOps _ops;
    private readonly LlamaModel _model;
    private readonly ILogger<Trainer> _logger;
    private readonly string? _tempOutput;
    private OutputLock? _outputLock;
    private ICommunicator? _comm;
    private Trainer? _trainer;
    private bool _disposed;

    public FineTuneOptions Options { get; }
    /// <summary>The model folder actually used (the built-in model's folder for "builtin").</summary>
    public string ModelDirectory { get; }
    public LlamaConfig Config => _session.Config;
    /// <summary>The model folder's tokenizer, or an <see cref="IdsOnlyTokenizer"/> when it has no tokenizer files.</summary>
    public ITokenizer Tokenizer { get; }
    public LlamaModel Model => _model;
    public IOps Ops => _ops;
    /// <summary>The device the ops run on ("cpu", or the GPU's name), for reports.</summary>
    public string DeviceName { get; }
    /// <summary>The data loaded from <see cref="FineTuneOptions.Data"/> (or given to Train), or null.</summary>
    public TrainingData? Data { get; private set; }
    /// <summary>Bad lines left out of the data files with <see cref="BadLinePolicy.Skip"/>, and the first few messages.</summary>
    public int SkippedLines { get; private set; }
    public IReadOnlyList<string> SkippedMessages { get; private set; } = [];
    /// <summary>What truncation to <see cref="FineTuneOptions.SeqLen"/> leaves of the training examples' trainable tokens
    /// (labels ≠ -100); examples that lose all of them are logged as a warning before the first step.</summary>
    public TruncationReport? Truncation { get; private set; }
    /// <summary>The trainer, once <see cref="Train(CancellationToken)"/>, <see cref="Evaluate"/> or <see cref="CreateTrainer"/> made it.</summary>
    public Trainer? Trainer => _trainer;
    /// <summary>Where checkpoints, metrics.json and the final adapter go.</summary>
    public string OutputDir { get; }

    /// <summary>Bytes of the frozen (or, with full fine-tuning, trained) base weights as they sit in device memory:
    /// dense tensors at their stored dtype, 4-bit weights as packed codes plus their (double-quantized) absmax.</summary>
    public long BaseWeightBytes => _model.BaseParameters().Sum(p => p.Dense?.Bytes ?? p.Quantized!.Bytes);
    /// <summary>Elements of every base weight (a 4-bit weight counts rows × columns).</summary>
    public long BaseParameterCount => _model.BaseParameters().Sum(p => p.Dense?.Count ?? (long)p.Quantized!.Rows * p.Quantized.Columns);
    /// <summary>Elements trained: LoRA A and B, or every base weight.</summary>
    public long TrainableParameterCount => _model.TrainableParameters.Sum(p => p.Param.Count);
    /// <summary>PEFT's "all params": the base plus the adapters.</summary>
    public long TotalParameterCount => BaseParameterCount + (_model.Options.FullFineTuning ? 0 : TrainableParameterCount);
    /// <summary>Bytes the memory pool (host for cpu, device otherwise) holds now, and its peak since the last reset.</summary>
    public long AllocatedBytes => _ops.Memory.AllocatedBytes;
    public long PeakAllocatedBytes => _ops.Memory.PeakAllocatedBytes;
    /// <summary>On a GPU device, the memory pool sized up front from the run's <see cref="MemoryPlan"/>; null on the CPU.</summary>
    public DevicePool? Pool => _ops.Memory as DevicePool;
    /// <summary>The memory plan the pool was sized from (GPU devices), or null.</summary>
    public MemoryPlan? Plan { get; private set; }

    private FineTune(FineTuneOptions options, string modelDir, ModelSession session, ITokenizer tokenizer, LlamaModel model,
        string deviceName, ILogger<Trainer> logger, string outputDir, string? tempOutput)
    {
        Options = options;
        ModelDirectory = modelDir;
        _session = session;
        Tokenizer = tokenizer;
        _ops = session.Ops!;
        _model = model;
        DeviceName = deviceName;
        _logger = logger;
        OutputDir = outputDir;
        _tempOutput = tempOutput;
    }

    /// <summary>Creates the run; log events of the trainer go to <paramref name="logger"/> (the host's, or none).</summary>
    public static FineTune Create(FineTuneOptions options, ILogger? logger = null) =>
        Create(options, logger is null ? NullLogger<Trainer>.Instance : logger as ILogger<Trainer> ?? new ForwardingLogger<Trainer>(logger));

    /// <summary>Creates the run with a logger from the host's factory.</summary>
    public static FineTune Create(FineTuneOptions options, ILoggerFactory loggerFactory)
    {
        ArgumentNullException.ThrowIfNull(loggerFactory);
        return Create(options, loggerFactory.CreateLogger<Trainer>());
    }

    private static FineTune Create(FineTuneOptions o, ILogger<Trainer> logger)
    {
        ArgumentNullException.ThrowIfNull(o);
        ValidateOptions(o);
        // Data-parallel: join the group first, so that a failure of any rank while setting up ends the others too.
        var comm = CreateCommunicator(o);
        try
        {
            var run = Create(o, logger, comm);
            run._comm ??= comm; // the NCCL communicator when Create made one over this bootstrap
            return run;
        }
        catch (Exception e)
        {
            comm?.Abort(e.Message);
            comm?.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The group of <see cref="FineTuneOptions.Distributed"/>, joined over TCP before the device is opened (so that a rank
    /// failing to set up ends the others), or null for one process. It is the "cpu" backend's communicator, or the
    /// bootstrap that <see cref="Create(FineTuneOptions, ILogger{Trainer}, ICommunicator?)"/> turns into the NCCL one
    /// once the CUDA ops exist (<see cref="UsesNccl"/>). A world of 1 is the plain run, unless Backend "nccl" is asked
    /// for explicitly: then the one rank trains through a 1-rank NCCL communicator (how one GPU checks that path).
    /// </summary>
    private static ICommunicator? CreateCommunicator(FineTuneOptions o)
    {
        if (o.Distributed is not { } d) return null;
        bool nccl = UsesNccl(o);
        if (!d.IsDistributed && !(nccl && Backend(d) == "nccl")) return null;
        try { return new TcpCommunicator(d, bindAnyAddress: nccl, jobCheck: nccl ? "nccl" : ""); }
        catch (Exception e) when (e is ArgumentException or CommunicatorException or System.Net.Sockets.SocketException or IOException)
        {
            throw new FineTuneException(nameof(o.Distributed), $"rank {d.Rank} of {d.WorldSize} at {d.MasterAddr}:{d.MasterPort}: {e.Message}", e);
        }
    }

    private static string Backend(DistributedOptions d) => (d.Backend ?? "auto").Trim().ToLowerInvariant();

    /// <summary>
    /// Whether the job's gradients travel over NCCL: Backend "nccl", or "auto" on a CUDA device (Device "cuda", or "auto"
    /// where a CUDA device is present); else the "cpu" backend (<see cref="TcpCommunicator"/>, loopback only).
    /// </summary>
    private static bool UsesNccl(FineTuneOptions o)
    {
        if (o.Distributed is not { } d) return false;
        return Backend(d) switch
        {
            "nccl" => true,
            "auto" => o.Device == "cuda" || (o.Device == "auto" && CudaDevices.TryCount(out int n, out _) && n > 0),
            _ => false,
        };
    }

    private static FineTune Create(FineTuneOptions o, ILogger<Trainer> logger, ICommunicator? comm)
    {
        string modelDir = o.ModelDirectory;
        if (!Directory.Exists(modelDir)) throw new FineTuneException(nameof(o.Model), $"{modelDir}: folder not found");
        if (!File.Exists(Path.Combine(modelDir, LlamaConfig.FileName)))
            throw new FineTuneException(nameof(o.Model), $"{modelDir}: no {LlamaConfig.FileName} (not a Hugging Face model folder)");
        bool builtinData = o.Data == BuiltinTask.DataName;
        if (o.Data is not null && !builtinData && !File.Exists(o.Data))
            throw new FineTuneException(nameof(o.Data), $"{o.Data}: file not found (or use builtin)");
        if (o.EvalData is not null && !File.Exists(o.EvalData)) throw new FineTuneException(nameof(o.EvalData), $"{o.EvalData}: file not found");
        if (o.OutputDir is not null && File.Exists(o.OutputDir)) throw new FineTuneException(nameof(o.OutputDir), $"{o.OutputDir}: is a file");
        // Before the resume check: taking the lock restores a checkpoint that a run killed while replacing it left renamed.
        // Data-parallel: rank 0 alone owns the output folder (it writes; the others only read a checkpoint to resume).
        var outputLock = comm is null || comm.Rank == 0 ? LockOutput(o, logger) : null;
        if (o.ResumeFrom is not null && !File.Exists(Path.Combine(o.ResumeFrom, Trainer.StateFileName)))
        {
            outputLock?.Dispose();
            throw new FineTuneException(nameof(o.ResumeFrom), $"{o.ResumeFrom}: not a checkpoint folder (no {Trainer.StateFileName})");
        }

        CheckDataFiles(o);

        ModelSession? session = null;
        try
        {
            // A folder without tokenizer files gets the ids-only stand-in: pre-tokenized data needs no tokenizer.
            session = AsOption(() => ModelSession.Open(modelDir, withTokenizer: true));
            var ckpt = session.Checkpoint;
            var tokenizer = session.Tokenizer!;

            (TrainingData Data, int Skipped, IReadOnlyList<string> Messages)? data =
                o.Data is null ? null : LoadData(o.Data, o.EvalData, tokenizer, ckpt.Config.VocabSize, o.SeqLen, o.OnBadLine, ChatTemplateOf(modelDir));
            CheckSequenceLength(o, ckpt.Config);
            TruncationReport? truncation = data is { } loaded ? CheckTrainable(loaded.Data, o.SeqLen, logger, o.Data, o.EvalData) : null;

            var modelOptions = ModelOptions(o) with { EmbeddingOnHost = ResolveEmbeddingOnHost(o.Embedding, o.Method, ckpt.Config.TieWordEmbeddings, o.Device != "cpu") };
            AsOption(() => session.OpenDevice(o.Device, o.DeviceMemory, o.Distributed?.LocalRank ?? 0));
            // The device memory pool, sized from the plan (and for the built-in task's greedy generation: B=1, prompt + answer);
            // before the first step, with the options that would fit, when the plan exceeds the free device memory
            // (or DeviceMemory) or the device refuses the pool.
            int generation = session.Gpu is null ? 0 : data?.Data.ExactMatchProblems?.Select(p => tokenizer.Encode(p.Prompt, tokenizer.BosId is not null).Length
                + tokenizer.Encode(p.Answer, false).Length + 1).DefaultIfEmpty(0).Max() ?? 0;
            var plan = AsOption(() => session.PlanTraining(modelOptions with { Lora = o.Lora }, o.BatchSize, o.SeqLen, o.Optimizer,
                generation > 0 ? [(1, generation)] : [], worldSize: o.Distributed?.WorldSize ?? 1));
            var model = AsOption(() => session.LoadModel(modelOptions));

            string? temp = o.OutputDir is null ? Directory.CreateTempSubdirectory("nativepeft-finetune-").FullName : null;
            var run = new FineTune(o, modelDir, session, tokenizer, model, session.DeviceName, logger, Path.GetFullPath(o.OutputDir ?? temp!), temp);
            // NCCL needs the CUDA ops; the group joined over TCP becomes its bootstrap (unique id, host collectives, aborts).
            if (comm is TcpCommunicator bootstrap && UsesNccl(o))
            {
                if (session.Ops?.Device?.Properties.Kind != GpuKind.Cuda)
                    throw new FineTuneException(nameof(o.Distributed), $"the nccl backend needs a CUDA device, and this run is on {session.DeviceName}; use Backend cpu (NATIVEPEFT_DIST_BACKEND=cpu)");
                try { run._comm = new NcclCommunicator(o.Distributed!, session.Ops, bootstrap); }
                catch (Exception e) when (e is InvalidOperationException or ArgumentException or CommunicatorException or CudaException)
                {
                    throw new FineTuneException(nameof(o.Distributed), $"nccl: {e.Message}", e);
                }
            }
            run._outputLock = outputLock;
            if (data is { } d) run.SetData(d.Data, d.Skipped, d.Messages);
            run.Truncation = truncation;
            run.Plan = plan;
            return run;
        }
        catch
        {
            session?.Dispose(); // the model, the ops, the pool, the device and the checkpoint
            outputLock?.Dispose();
            throw;
        }
    }

    /// <summary>A <see cref="ModelSession"/> step; its refusal becomes the <see cref="FineTuneException"/> for the same option.</summary>
    private static T AsOption<T>(Func<T> step)
    {
        try { return step(); }
        catch (OptionException e) when (e is not FineTuneException) { throw new FineTuneException(e.Option, e.Detail, e); }
    }

    private static void AsOption(Action step) => AsOption(() => { step(); return 0; });

    /// <summary>
    /// Takes <see cref="FineTuneOptions.OutputDir"/>'s <see cref="OutputLock"/> for the whole run (released by
    /// <see cref="Dispose"/>; it also proves the folder writable and cleans up a killed run's leftovers, logged as
    /// warnings), then refuses a folder that holds an earlier run (as the CLI's --out) unless resuming. Null without an
    /// output folder (the run's own temporary one).
    /// </summary>
    private static OutputLock? LockOutput(FineTuneOptions o, ILogger logger)
    {
        if (o.OutputDir is null) return null;
        var outputLock = OutputLock.Acquire(o.OutputDir);
        foreach (var note in outputLock.Notes) LogOutputNote(logger, note);
        // An earlier run's adapter, checkpoints and metrics are not overwritten.
        if (o.ResumeFrom is null && OutputFolder.HasContent(o.OutputDir))
        {
            outputLock.Dispose();
            throw new FineTuneException(nameof(o.OutputDir), $"{o.OutputDir}: the folder exists and is not empty (choose a new one, or resume a checkpoint with ResumeFrom)");
        }
        return outputLock;
    }

    [LoggerMessage(EventId = 30, Level = LogLevel.Warning, Message = "{Note}")]
    private static partial void LogOutputNote(ILogger logger, string note);

    /// <summary>The <see cref="LlamaModelOptions"/> a method stands for: LoRA = BF16-stored frozen base, QLoRA = NF4 with
    /// double-quantized absmax, full = every weight trained in the compute dtype.</summary>
    public static LlamaModelOptions ModelOptions(FineTuneOptions o) => new()
    {
        Seed = o.Seed,
        ComputeDType = o.ResolvedComputeDType,
        Lora = o.Method == FineTuneMethod.Full ? null : o.Lora,
        FullFineTuning = o.Method == FineTuneMethod.Full,
        Quantization = o.Method == FineTuneMethod.Qlora ? BaseQuantization.Nf4 : BaseQuantization.None,
        DoubleQuant = true,
        BaseWeightDType = o.Method == FineTuneMethod.Lora ? DType.BF16 : null,
        Recompute = o.Recompute,
    };

    /// <summary>
    /// The embedding placement of <see cref="FineTuneOptions.Embedding"/>: "host" (refused for full fine-tuning and a tied
    /// embedding), "device", or "auto" = host for QLoRA on a GPU device with an untied embedding.
    /// </summary>
    public static bool ResolveEmbeddingOnHost(string setting, FineTuneMethod method, bool tiedEmbedding, bool gpu) => setting switch
    {
        "device" => false,
        "auto" => method == FineTuneMethod.Qlora && !tiedEmbedding && gpu,
        "host" when method == FineTuneMethod.Full =>
            throw new FineTuneException("Embedding", "host: full fine-tuning trains the embedding table on the device (use device or auto)"),
        "host" when tiedEmbedding =>
            throw new FineTuneException("Embedding", "host: this model ties lm_head to the embedding table (tie_word_embeddings), which the device needs for the loss (use device or auto)"),
        "host" => true,
        _ => throw new FineTuneException("Embedding", $"{setting}: expected auto, host or device"),
    };

    /// <summary>Throws <see cref="FineTuneException"/> for an option out of range (no file is touched).</summary>
    /// <summary>
    /// Data and EvalData must be regular files (a character device or a FIFO would be read forever or block): checked
    /// before anything is read from them (docs/reliability.md).
    /// </summary>
    private static void CheckDataFiles(FineTuneOptions o)
    {
        if (o.Data is not null && o.Data != BuiltinTask.DataName && TextInput.FileProblem(o.Data, long.MaxValue) is { } data)
            throw new FineTuneException(nameof(o.Data), $"{o.Data}: {data}");
        if (o.EvalData is not null && TextInput.FileProblem(o.EvalData, long.MaxValue) is { } eval)
            throw new FineTuneException(nameof(o.EvalData), $"{o.EvalData}: {eval}");
    }

    /// <summary>
    /// SeqLen must not exceed the model's max_position_embeddings (nor <see cref="Limits.MaxSequenceLength"/>): checked
    /// once the data is read (its errors come first) and before anything is sized from SeqLen.
    /// </summary>
    private static void CheckSequenceLength(FineTuneOptions o, LlamaConfig config)
    {
        if (Limits.SequenceProblem(o.SeqLen, config.MaxPositionEmbeddings) is { } problem)
            throw new FineTuneException(nameof(o.SeqLen), problem);
    }

    public static void ValidateOptions(FineTuneOptions o)
    {
        ArgumentNullException.ThrowIfNull(o);
        if (string.IsNullOrWhiteSpace(o.Model)) throw new FineTuneException(nameof(o.Model), "\"\": name a model folder or builtin");
        if (!Enum.IsDefined(o.Method)) throw new FineTuneException(nameof(o.Method), $"{o.Method}: expected Full, Lora or Qlora");
        if (o.Device is not ("cpu" or "auto" or "cuda" or "emulator")) throw new FineTuneException(nameof(o.Device), $"{o.Device}: expected cpu, auto, cuda or emulator");
        if (o.DeviceMemory is { } dm)
        {
            if (dm <= 0) throw new FineTuneException(nameof(o.DeviceMemory), $"{dm}: must be a positive number of bytes");
            if (o.Device == "cpu") throw new FineTuneException(nameof(o.DeviceMemory), "is a limit of a GPU device's memory; Device cpu has no device pool");
        }
        if (o.Steps is not null && o.Epochs is not null) throw new FineTuneException(nameof(o.Steps), "and Epochs: give one of them, not both");
        if (o.Steps is <= 0) throw new FineTuneException(nameof(o.Steps), $"{o.Steps}: must be positive");
        if (o.Epochs is double ep && !(ep > 0 && double.IsFinite(ep))) throw new FineTuneException(nameof(o.Epochs), $"{ep}: must be positive");
        if (o.BatchSize <= 0) throw new FineTuneException(nameof(o.BatchSize), $"{o.BatchSize}: must be positive");
        if (Limits.OptionOutOfRange(o.BatchSize, Limits.MaxBatchSize) is { } batch) throw new FineTuneException(nameof(o.BatchSize), batch);
        if (o.SeqLen > Limits.MaxSequenceLength) throw new FineTuneException(nameof(o.SeqLen), Limits.OptionOutOfRange(o.SeqLen, Limits.MaxSequenceLength)!);
        if ((long)o.BatchSize * o.SeqLen > Limits.MaxTokensPerBatch)
            throw new FineTuneException(nameof(o.BatchSize), $"{o.BatchSize}: × SeqLen {o.SeqLen} = {(long)o.BatchSize * o.SeqLen} tokens per micro-batch, more than {Limits.MaxTokensPerBatch}");
        if (o.GradAccum <= 0) throw new FineTuneException(nameof(o.GradAccum), $"{o.GradAccum}: must be positive");
        if (o.SeqLen < 2) throw new FineTuneException(nameof(o.SeqLen), $"{o.SeqLen}: must be at least 2");
        if (!(o.Lr >= 0) || !double.IsFinite(o.Lr)) throw new FineTuneException(nameof(o.Lr), $"{o.Lr}: must be a finite number >= 0");
        if (o.WarmupSteps < 0) throw new FineTuneException(nameof(o.WarmupSteps), $"{o.WarmupSteps}: must be >= 0");
        if (!(o.MaxGradNorm >= 0)) throw new FineTuneException(nameof(o.MaxGradNorm), $"{o.MaxGradNorm}: must be >= 0 (0 = off)");
        if (!(o.WeightDecay >= 0) || !double.IsFinite(o.WeightDecay)) throw new FineTuneException(nameof(o.WeightDecay), $"{o.WeightDecay}: must be a finite number >= 0 (0 = off)");
        if (!OptimizerFactory.Names.Contains(o.Optimizer)) throw new FineTuneException(nameof(o.Optimizer), $"{o.Optimizer}: expected one of {string.Join(", ", OptimizerFactory.Names)}");
        if (o.EvalEvery < 0) throw new FineTuneException(nameof(o.EvalEvery), $"{o.EvalEvery}: must be >= 0");
        if (o.EvalBatches < 0) throw new FineTuneException(nameof(o.EvalBatches), $"{o.EvalBatches}: must be >= 0");
        if (o.ExactMatchSamples < 0) throw new FineTuneException(nameof(o.ExactMatchSamples), $"{o.ExactMatchSamples}: must be >= 0");
        if (o.SaveEvery < 0) throw new FineTuneException(nameof(o.SaveEvery), $"{o.SaveEvery}: must be >= 0");
        RefuseEvalDataWithBuiltin(o.Data, o.EvalData);
        if (!Enum.IsDefined(o.OnNonFinite)) throw new FineTuneException(nameof(o.OnNonFinite), $"{o.OnNonFinite}: expected Stop or Skip");
        if (o.ComputeDType is { } cd)
        {
            if (cd is not (DType.F32 or DType.F64 or DType.BF16))
                throw new FineTuneException(nameof(o.ComputeDType), $"{cd}: expected F32, BF16 (GPU devices) or F64 (the CPU)");
            if (cd == DType.BF16 && o.Device == "cpu")
                throw new FineTuneException(nameof(o.ComputeDType), "BF16: the CPU reference computes in F32 (or F64); BF16 mixed precision runs on cuda, emulator or auto");
            if (cd == DType.F64 && o.Device != "cpu")
                throw new FineTuneException(nameof(o.ComputeDType), $"F64: only on the CPU (Device {o.Device} computes in F32 or BF16)");
        }
        if (o.Method != FineTuneMethod.Full)
        {
            var l = o.Lora ?? throw new FineTuneException(nameof(o.Lora), "null: LoRA and QLoRA need LoRA settings");
            if (l.Rank <= 0) throw new FineTuneException("Rank", $"{l.Rank}: the LoRA rank must be positive");
            if (Limits.OptionOutOfRange(l.Rank, Limits.MaxLoraRank) is { } rank) throw new FineTuneException("Rank", rank);
            if (l.Dropout is < 0 or >= 1 || double.IsNaN(l.Dropout)) throw new FineTuneException("Dropout", $"{l.Dropout}: must be in [0, 1)");
            if (!double.IsFinite(l.Alpha)) throw new FineTuneException("Alpha", $"{l.Alpha}: must be a finite number");
            if (l.TargetModules is null || l.TargetModules.Count == 0)
                throw new FineTuneException("TargetModules", $": name at least one of {string.Join(", ", LoraSettings.KnownTargets)}");
            foreach (var t in l.TargetModules)
                if (!LoraSettings.KnownTargets.Contains(t))
                    throw new FineTuneException("TargetModules", $": unknown module \"{t}\"; known: {string.Join(", ", LoraSettings.KnownTargets)}");
        }
        if (o.Distributed is { } dist)
        {
            if (dist.WorldSize < 1) throw new FineTuneException(nameof(o.Distributed), $"WorldSize {dist.WorldSize}: must be at least 1");
            if (dist.Rank < 0 || dist.Rank >= dist.WorldSize)
                throw new FineTuneException(nameof(o.Distributed), $"Rank {dist.Rank}: must be in 0..{dist.WorldSize - 1} (WorldSize {dist.WorldSize})");
            if (dist.LocalRank < 0) throw new FineTuneException(nameof(o.Distributed), $"LocalRank {dist.LocalRank}: must be >= 0");
            if (dist.Backend is not ("auto" or "cpu" or "nccl"))
                throw new FineTuneException(nameof(o.Distributed), $"Backend {dist.Backend}: expected auto, cpu or nccl");
            if (dist.Backend == "nccl" && o.Device is "cpu" or "emulator")
                throw new FineTuneException(nameof(o.Distributed), $"Backend nccl: needs Device cuda (or auto on a machine with a CUDA device), not {o.Device}; the cpu backend serves cpu and emulator ranks");
            if (dist.IsDistributed && o.OutputDir is null)
                throw new FineTuneException(nameof(o.OutputDir), "null: the ranks of a data-parallel run need one shared output folder (rank 0 writes it)");
        }
    }

    /// <summary>The built-in task brings its own held-out split: an eval file beside it would be silently unused, so it is refused.</summary>
    private static void RefuseEvalDataWithBuiltin(string? data, string? evalData)
    {
        if (data == BuiltinTask.DataName && evalData is not null)
            throw new FineTuneException(nameof(FineTuneOptions.EvalData),
                $"{evalData}: not used with the built-in task, which evaluates on its own held-out split (give a dataset file as the data, or leave the eval data out)");
    }

    /// <summary>The model folder's chat template (or the default); a tokenizer_config.json we cannot read is an error for Model.</summary>
    private static ChatTemplate ChatTemplateOf(string modelDir)
    {
        try { return ChatTemplate.ForModel(modelDir); }
        catch (InvalidDataException e) { throw new FineTuneException(nameof(FineTuneOptions.Model), $"{modelDir}: {e.Message}", e); }
    }

    /// <summary>
    /// Loads a dataset ("builtin" = the built-in task with its held-out split for eval loss and exact match; else a file
    /// in any <see cref="DatasetLoader"/> format, with an optional eval file) and checks every token id against the
    /// model's vocabulary (<paramref name="vocabSize"/>, config.json's vocab_size). Errors are <see cref="FineTuneException"/>s
    /// for Data or EvalData with file:line (and the id); text data with an <see cref="IdsOnlyTokenizer"/> is an error for
    /// Model naming the missing tokenizer files. Chat data is rendered with <paramref name="chatTemplate"/> (null: the
    /// default template); a template we cannot read is an error for Model.
    /// </summary>
    public static (TrainingData Data, int SkippedLines, IReadOnlyList<string> SkippedMessages) LoadData(string data, string? evalData,
        ITokenizer tokenizer, int vocabSize, int seqLen, BadLinePolicy onBadLine = BadLinePolicy.Stop, ChatTemplate? chatTemplate = null)
    {
        TrainingData result;
        int skipped = 0;
        var messages = new List<string>();
        RefuseEvalDataWithBuiltin(data, evalData);
        try
        {
            if (data != BuiltinTask.DataName && IsBlank(data)) throw new FineTuneException(nameof(FineTuneOptions.Data), $"{data}: the file is empty (no examples)");
            if (evalData is not null && IsBlank(evalData)) throw new FineTuneException(nameof(FineTuneOptions.EvalData), $"{evalData}: the file is empty (no examples)");
            if (tokenizer is IdsOnlyTokenizer ids)
            {
                // Only pre-tokenized data can do without a tokenizer: say so before reading anything else.
                foreach (var file in new[] { data, evalData })
                {
                    if (file is null) continue;
                    if (file == BuiltinTask.DataName) throw new FineTuneException(nameof(FineTuneOptions.Model), ids.MissingMessage("the built-in task (text)"));
                    var format = DatasetLoader.DetectFormat(file);
                    if (format != DataFormat.PreTokenized)
                        throw new FineTuneException(nameof(FineTuneOptions.Model), ids.MissingMessage($"{file} ({DatasetLoader.TextFormatName(format)})"));
                }
            }
            if (data == BuiltinTask.DataName)
            {
                if (tokenizer.EosId is null) throw new FineTuneException(nameof(FineTuneOptions.Data), "builtin: the tokenizer has no eos token");
                result = TrainingData.Builtin(BuiltinTask.Generate(BuiltinModel.TaskOptions), tokenizer);
            }
            else
            {
                var train = DatasetLoader.Load(data, DataFormat.Auto, tokenizer, seqLen, onBadLine, vocabSize, chatTemplate);
                skipped += train.SkippedLines;
                messages.AddRange(train.SkippedMessages);
                if (train.Count == 0) throw new FineTuneException(nameof(FineTuneOptions.Data), $"{data}: no examples");
                IReadOnlyList<TrainingExample>? eval = null;
                if (evalData is not null)
                {
                    var e = DatasetLoader.Load(evalData, DataFormat.Auto, tokenizer, seqLen, onBadLine, vocabSize, chatTemplate);
                    if (e.Count == 0) throw new FineTuneException(nameof(FineTuneOptions.EvalData), $"{evalData}: no examples");
                    skipped += e.SkippedLines;
                    messages.AddRange(e.SkippedMessages);
                    eval = e.Examples;
                }
                result = new TrainingData(train.Examples, tokenizer) { Eval = eval };
            }
        }
        catch (DataFormatException e)
        {
            throw new FineTuneException(e.FilePath == evalData ? nameof(FineTuneOptions.EvalData) : nameof(FineTuneOptions.Data), e.Message, e);
        }
        catch (IOException e) { throw new FineTuneException(nameof(FineTuneOptions.Data), $"{data}: {e.Message}", e); }
        catch (NativePeft.Data.Jinja.JinjaException e) { throw new FineTuneException(nameof(FineTuneOptions.Model), e.Message, e); }
        foreach (var ex in result.Train.Concat(result.Eval ?? []))
            foreach (int id in ex.InputIds)
                if (id < 0 || id >= vocabSize)
                    throw new FineTuneException(nameof(FineTuneOptions.Data), $"{data}: token id {id} is outside the model's vocabulary [0, {vocabSize})");
        return (result, skipped, messages);
    }

    /// <summary>
    /// Checks that truncation to <paramref name="seqLen"/> leaves some training example a trainable token (a label ≠ -100
    /// at a position ≥ 1 inside the first seqLen tokens): when none is left, a <see cref="FineTuneException"/> for SeqLen
    /// naming the length that would fit; when some examples lose all of theirs, a warning with their count.
    /// </summary>
    public static TruncationReport CheckTrainable(TrainingData data, int seqLen, ILogger? logger = null, string? trainFile = null, string? evalFile = null)
    {
        ArgumentNullException.ThrowIfNull(data);
        // The eval set too: with no target in it, every evaluation would report a NaN loss.
        if (data.Eval is { Count: > 0 } eval && TruncationReport.Check(eval, seqLen) is { Trainable: 0 } er)
            throw new FineTuneException(nameof(FineTuneOptions.EvalData), $"{evalFile ?? "the eval data"}: {NothingToLearn(er, seqLen)}");
        var report = TruncationReport.Check(data.Train, seqLen);
        if (report.Trainable == 0)
        {
            if (report.CutOff == 0)
                throw new FineTuneException(nameof(FineTuneOptions.Data), $"{trainFile ?? "the training data"}: {NothingToLearn(report, seqLen)}");
            throw new FineTuneException(nameof(FineTuneOptions.SeqLen),
                $"{seqLen}: every training example's trainable tokens (labels != -100) lie past the first {seqLen} tokens " +
                $"({report.CutOff} cut off{(report.WithoutTargets > 0 ? $", {report.WithoutTargets} without any" : "")}), so nothing would be trained; {report.FitHint}");
        }
        if (report.CutOff > 0)
            LogCutOff(logger ?? NullLogger.Instance, report.CutOff, report.Examples, seqLen, report.FitHint);
        return report;
    }

    /// <summary>Why a set of examples has no trainable token (a report with Trainable = 0).</summary>
    private static string NothingToLearn(TruncationReport r, int seqLen) => r.CutOff == 0
        ? $"none of its {r.Examples} example(s) has a trainable token (every label is -100, or every row is shorter than 2 tokens), so there is nothing to learn"
        : $"none of its {r.Examples} example(s) keeps a trainable token within a sequence length of {seqLen} ({r.CutOff} cut off by truncation); {r.FitHint}";

    [LoggerMessage(EventId = 20, Level = LogLevel.Warning,
        Message = "{CutOff} of {Examples} training examples lose every trainable token (labels != -100) to truncation at a sequence length of {SeqLen} and train nothing; {Hint}")]
    private static partial void LogCutOff(ILogger logger, int cutOff, int examples, int seqLen, string hint);

    private static bool IsBlank(string path)
    {
        if (!File.Exists(path)) return false; // the loader names the missing file
        using var reader = new StreamReader(path);
        int c;
        while ((c = reader.Read()) >= 0) if (!char.IsWhiteSpace((char)c)) return false;
        return true;
    }

    private void SetData(TrainingData data, int skipped, IReadOnlyList<string> messages)
    {
        Data = data;
        SkippedLines = skipped;
        SkippedMessages = messages;
    }

    /// <summary>The <see cref="TrainerOptions"/> of this run.</summary>
    public TrainerOptions TrainerOptions => new()
    {
        Steps = Options.Steps, Epochs = Options.Steps is null ? Options.Epochs ?? 1 : null, BatchSize = Options.BatchSize, GradAccum = Options.GradAccum,
        SeqLen = Options.SeqLen, BatchMode = Options.Pack ? BatchMode.Packing : BatchMode.Padding, Lr = Options.Lr, Schedule = Options.Schedule, WarmupSteps = Options.WarmupSteps, MaxGradNorm = Options.MaxGradNorm, WeightDecay = Options.WeightDecay,
        EvalEvery = Options.EvalEvery, EvalBatches = Options.EvalBatches, ExactMatchSamples = Options.ExactMatchSamples, SaveEvery = Options.SaveEvery,
        Seed = Options.Seed, Optimizer = Options.Optimizer, OnNonFinite = Options.OnNonFinite, OutputDir = OutputDir, BaseModelNameOrPath = Options.Model == BuiltinModel.Name ? BuiltinModel.Name : ModelDirectory,
        ExtraConfig = Options.ExtraConfig,
    };

    /// <summary>
    /// Makes the <see cref="Trainer"/> (once) over <paramref name="data"/> (or the loaded data), resuming from
    /// <see cref="FineTuneOptions.ResumeFrom"/> when set; <paramref name="progress"/> gets every step and evaluation.
    /// </summary>
    public Trainer CreateTrainer(TrainingData? data = null, IProgress<TrainerProgress>? progress = null)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_trainer is not null)
        {
            if (data is not null && !ReferenceEquals(data, Data)) throw new InvalidOperationException("this run already has its trainer and data");
            if (progress is not null) throw new InvalidOperationException("this run already has its trainer: pass the progress callback to the first CreateTrainer call (before Evaluate or Train)");
            return _trainer;
        }
        if (data is not null && !ReferenceEquals(data, Data))
        {
            Truncation = CheckTrainable(data, Options.SeqLen, _logger, Options.Data, Options.EvalData);
            SetData(data, 0, []);
        }
        var d = Data ?? throw new InvalidOperationException("no data: set FineTuneOptions.Data or pass the data to Train");
        try
        {
            _trainer = new Trainer(_model, d, TrainerOptions, _logger, progress, _comm);
            if (Options.ResumeFrom is not null)
            {
                try { _trainer.Resume(Options.ResumeFrom); }
                catch (Exception e) when (e is InvalidDataException or IOException or PeftAdapterException or ArgumentException or SafetensorsException)
                {
                    throw new FineTuneException(nameof(Options.ResumeFrom), $"{Options.ResumeFrom}: {e.Message}", e);
                }
            }
        }
        catch (Exception e)
        {
            // A rank that cannot start (a bad checkpoint, …) stops the others before their first collective waits for it.
            _comm?.Abort(e.Message);
            _trainer?.Dispose();
            _trainer = null;
            throw;
        }
        return _trainer;
    }

    /// <summary>Trains on the loaded data (<see cref="FineTuneOptions.Data"/>) to the end; see <see cref="Trainer.Train"/>.</summary>
    public TrainResult Train(CancellationToken cancellationToken = default) => CreateTrainer().Train(cancellationToken);

    /// <summary>Trains on <paramref name="data"/>.</summary>
    public TrainResult Train(TrainingData data, CancellationToken cancellationToken = default) => CreateTrainer(data).Train(cancellationToken);

    /// <summary>Trains on a dataset file or "builtin" (loaded with the run's seq length and bad-line policy).</summary>
    public TrainResult Train(string dataset, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(dataset);
        if (dataset != BuiltinTask.DataName && !File.Exists(dataset)) throw new FineTuneException(nameof(FineTuneOptions.Data), $"{dataset}: file not found (or use builtin)");
        var (data, skipped, messages) = LoadData(dataset, Options.EvalData, Tokenizer, Config.VocabSize, Options.SeqLen, Options.OnBadLine,
            ChatTemplateOf(ModelDirectory));
        var trainer = CreateTrainer(data);
        SkippedLines = skipped;
        SkippedMessages = messages;
        return trainer.Train(cancellationToken);
    }

    /// <summary>Evaluates now (eval loss, perplexity, exact match on the built-in task); see <see cref="Trainer.Evaluate"/>.</summary>
    public EvalMetrics Evaluate() => CreateTrainer().Evaluate();

    /// <summary>
    /// Writes the PEFT adapter (adapter_config.json + adapter_model.safetensors) into <paramref name="dir"/>; with full
    /// fine-tuning, the whole model as a HF checkpoint. Returns the folder.
    /// </summary>
    public string SaveAdapter(string dir)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentException.ThrowIfNullOrWhiteSpace(dir);
        string full = Path.GetFullPath(dir);
        string baseName = Options.Model == BuiltinModel.Name ? BuiltinModel.Name : ModelDirectory;
        if (!_model.Options.FullFineTuning)
        {
            PeftAdapter.Save(full, _model, baseName);
            return full;
        }
        var tensors = _model.BaseParameters().Select(p =>
        {
            var t = p.Dense!;
            var values = new float[t.Count];
            _ops.Download<float>(t, values);
            return SafetensorsTensor.From(p.Name, t.Shape.Select(x => (long)x).ToArray(), values);
        }).ToList();
        HfCheckpoint.Write(full, Config, tensors, long.MaxValue);
        return full;
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _trainer?.Dispose();
        _session.Dispose(); // the model, the ops (with the pool and the device), the checkpoint
        _comm?.Dispose();
        _outputLock?.Dispose();
        if (_tempOutput is not null)
        {
            try { Directory.Delete(_tempOutput, recursive: true); }
            catch (IOException) { }
        }
    }

    /// <summary>Passes a plain <see cref="ILogger"/> where an <see cref="ILogger{T}"/> is wanted.</summary>
    private sealed class ForwardingLogger<T>(ILogger inner) : ILogger<T>
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => inner.BeginScope(state);
        public bool IsEnabled(LogLevel logLevel) => inner.IsEnabled(logLevel);
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            inner.Log(logLevel, eventId, state, exception, formatter);
    }
}
