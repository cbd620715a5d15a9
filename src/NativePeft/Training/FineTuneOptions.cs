using NativePeft.Data;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Planning;

namespace NativePeft.Training;

/// <summary>
/// Everything <see cref="FineTune.Create(FineTuneOptions, Microsoft.Extensions.Logging.ILogger?)"/> needs: the base
/// model, the method (full | LoRA | QLoRA), the LoRA settings, the device, the data and the trainer's settings. The
/// defaults are PEFT's and the CLI's (<c>nativepeft train</c>): LoRA r 16, alpha 32, dropout 0.05 on all seven
/// projections, AdamW lr 2e-4 with a cosine schedule, batch 4 × seq 128, fp32 compute on the CPU.
/// </summary>
public sealed record FineTuneOptions
{
    /// <summary>A Hugging Face Llama folder (config.json, safetensors; tokenizer.json or tokenizer.model only for text data), or "builtin" for the shipped model.</summary>
    public string Model { get; init; } = BuiltinModel.Name;
    /// <summary>Training data: a dataset file (any <see cref="DatasetLoader"/> format) or "builtin" for the built-in task;
    /// null to pass the data to <see cref="FineTune.Train(TrainingData, CancellationToken)"/> later.</summary>
    public string? Data { get; init; }
    /// <summary>Eval data file (same formats) for loss and perplexity; the built-in task brings its own held-out split.</summary>
    public string? EvalData { get; init; }
    /// <summary>What a JSONL line that is not valid (or not the format) does: stop with file:line (default) or be skipped and counted.</summary>
    public BadLinePolicy OnBadLine { get; init; } = BadLinePolicy.Stop;
    public FineTuneMethod Method { get; init; } = FineTuneMethod.Lora;
    /// <summary>r, lora_alpha, lora_dropout, target_modules, use_rslora (ignored with <see cref="FineTuneMethod.Full"/>).</summary>
    public LoraSettings Lora { get; init; } = new() { Rank = 16, Alpha = 32, Dropout = 0.05, TargetModules = LoraSettings.KnownTargets };
    /// <summary>cpu (the C# reference ops), or the kernels on auto (CUDA when present, else the emulator) | cuda | emulator.</summary>
    public string Device { get; init; } = "cpu";
    /// <summary>
    /// The dtype the model computes in: null (auto) = BF16 mixed precision on a GPU device (bf16 activations and frozen
    /// weights, fp32 accumulation, fp32 LoRA, gradients and optimizer state) and F32 on the CPU; or F32 anywhere, BF16 on
    /// a GPU device, F64 on the CPU (gradient checks).
    /// </summary>
    public DType? ComputeDType { get; init; }
    /// <summary>
    /// At most this many bytes of device memory for the run (null: the device's free memory): the memory plan is checked
    /// against the smaller of the two before anything is loaded, and the pool it sizes never grows. For sharing a GPU
    /// with other jobs, and to see the out-of-memory message (the plan's total, what was free, the options that would
    /// fit) without a full device. Not for the CPU device (no pool).
    /// </summary>
    public long? DeviceMemory { get; init; }

    /// <summary><see cref="ComputeDType"/> with auto resolved for <see cref="Device"/>.</summary>
    public DType ResolvedComputeDType => ComputeDType ?? (Device == "cpu" ? DType.F32 : DType.BF16);
    /// <summary>Gradient checkpointing: keep only each block's input, recompute the block in the backward.</summary>
    public bool Recompute { get; init; }
    /// <summary>
    /// Where the frozen embedding table lives: "device", "host" (<see cref="Modules.LlamaModelOptions.EmbeddingOnHost"/>:
    /// only the batch's rows are sent), or "auto" = host for QLoRA on a GPU device when the embedding is not tied to
    /// lm_head (the method chosen to save memory), device otherwise (<see cref="FineTune.ResolveEmbeddingOnHost"/>).
    /// </summary>
    public string Embedding { get; init; } = "auto";
    /// <summary>Seeds the LoRA init, the dropout masks and the data order.</summary>
    public int Seed { get; init; }

    /// <summary>Optimizer steps; null with <see cref="Epochs"/> null means one epoch.</summary>
    public int? Steps { get; init; }
    public double? Epochs { get; init; }
    public int BatchSize { get; init; } = 4;
    public int GradAccum { get; init; } = 1;
    public int SeqLen { get; init; } = 128;
    /// <summary>
    /// Pack several training examples into each row (<see cref="BatchMode.Packing"/>: each stays a document of its own —
    /// positions restart, attention and targets never cross a boundary); false: one example per padded row. Evaluation
    /// batches stay padded.
    /// </summary>
    public bool Pack { get; init; }
    public double Lr { get; init; } = 2e-4;
    public LrScheduleKind Schedule { get; init; } = LrScheduleKind.Cosine;
    public int WarmupSteps { get; init; }
    public double MaxGradNorm { get; init; } = 1.0;
    /// <summary>AdamW's decoupled weight decay (torch.optim.AdamW's weight_decay, 0.01 as its default), applied to the trained weights.</summary>
    public double WeightDecay { get; init; } = 0.01;
    /// <summary>adamw | paged-adamw | adamw8bit | paged-adamw8bit.</summary>
    public string Optimizer { get; init; } = "adamw";
    public int EvalEvery { get; init; }
    public int EvalBatches { get; init; }
    /// <summary>Built-in-task problems per evaluation for exact match (0 = all).</summary>
    public int ExactMatchSamples { get; init; } = 50;
    public int SaveEvery { get; init; }
    /// <summary>A non-finite loss or gradient norm: stop (default) or skip that step's update (<see cref="NonFinitePolicy"/>).</summary>
    public NonFinitePolicy OnNonFinite { get; init; } = NonFinitePolicy.Stop;
    /// <summary>A checkpoint-&lt;step&gt; folder to continue from.</summary>
    public string? ResumeFrom { get; init; }
    /// <summary>Where checkpoints, metrics.json and the final adapter (or model) go; a new temporary folder when null.</summary>
    public string? OutputDir { get; init; }
    /// <summary>
    /// Data-parallel training (docs/distributed.md): this process's rank in a job of <see cref="NativePeft.Distributed.DistributedOptions.WorldSize"/>
    /// ranks, usually read from the environment torchrun, Slurm or <c>nativepeft train --nproc N</c> set. Null (or a world
    /// of 1): one process.
    /// </summary>
    public Distributed.DistributedOptions? Distributed { get; init; }
    /// <summary>Extra entries for metrics.json's "config".</summary>
    public IReadOnlyDictionary<string, string>? ExtraConfig { get; init; }

    /// <summary>The model folder: <see cref="BuiltinModel.Directory"/> for "builtin", else <see cref="Model"/> as a full path.</summary>
    public string ModelDirectory => Model == BuiltinModel.Name ? BuiltinModel.Directory : Path.GetFullPath(Model);
}

/// <summary>
/// Bad <see cref="FineTuneOptions"/> or input files: <see cref="OptionException.Option"/> names the option (a property of
/// <see cref="FineTuneOptions"/> or of its <see cref="LoraSettings"/>), <see cref="OptionException.Detail"/> says what is
/// wrong with its value ("/data/x.jsonl: file not found").
/// </summary>
public sealed class FineTuneException(string option, string detail, Exception? inner = null) : OptionException(option, detail, inner);
