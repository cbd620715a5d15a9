using System.Diagnostics;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace NativePeft.Training;

/// <summary>
/// Settings of <see cref="Pretrain.Run"/>: the built-in model's architecture (Llama, byte vocabulary of
/// <see cref="ByteTokenizer.Size"/>) and its full training from random initialization on
/// <see cref="BuiltinTask.PretrainCorpus"/>. The defaults are the shipped model's (docs/builtin-model.md).
/// </summary>
public sealed record PretrainOptions
{
    /// <summary>Seeds the random initialization, the corpus and the data order.</summary>
    public int Seed { get; init; }
    public int Steps { get; init; } = 1500;
    public int Layers { get; init; } = 4;
    public int Hidden { get; init; } = 128;
    public int Heads { get; init; } = 4;
    public int KvHeads { get; init; } = 2;
    public int Intermediate { get; init; } = 352;
    /// <summary>Packed row length.</summary>
    public int SeqLen { get; init; } = 64;
    public int BatchSize { get; init; } = 16;
    /// <summary>Peak learning rate (linear warmup, then cosine to 0).</summary>
    public double Lr { get; init; } = 3e-3;
    /// <summary>Warmup steps; null = 5% of <see cref="Steps"/>.</summary>
    public int? WarmupSteps { get; init; }
    /// <summary>Corpus lines (documents) generated for training.</summary>
    public int CorpusLines { get; init; } = 40000;
    /// <summary>
    /// Share of <c>copy:</c> lines in the training corpus: <see cref="BuiltinTask.PretrainCorpus"/> draws about half
    /// copy lines and half runs of random words; word lines are dropped (in order) until copy lines make up this share.
    /// The random words carry nothing to learn beyond letter statistics, and copying (an induction head) is what the
    /// fine-tuning task builds on. 0.5 or less keeps the corpus as generated.
    /// </summary>
    public double CopyShare { get; init; } = 1.0;
    /// <summary>
    /// Share of copy lines whose word is written in capitals (<c>copy: ABC\nABC</c>), so the model knows the capital
    /// letters' embeddings and lm_head rows and copies them — but never sees a lowercase word turned into capitals
    /// (the <see cref="BuiltinTaskKind.Uppercase"/> task). 0 keeps the corpus lowercase.
    /// </summary>
    public double CapitalCopyShare { get; init; } = 0.5;
    /// <summary>Held-out corpus lines (another seed) for the final eval loss.</summary>
    public int EvalLines { get; init; } = 256;
    /// <summary>Initialization std of every linear and embedding weight (HF's initializer_range).</summary>
    public double InitStd { get; init; } = 0.02;
    public int MaxPositionEmbeddings { get; init; } = 256;

    /// <summary>The config.json of the model these options build.</summary>
    public LlamaConfig Config() => new()
    {
        HiddenSize = Hidden, IntermediateSize = Intermediate, NumHiddenLayers = Layers, NumAttentionHeads = Heads,
        NumKeyValueHeads = KvHeads, HeadDim = Heads > 0 ? Hidden / Heads : 0, VocabSize = ByteTokenizer.Size,
        MaxPositionEmbeddings = MaxPositionEmbeddings, RmsNormEps = 1e-5, RopeTheta = 10000, TieWordEmbeddings = false,
        TorchDtype = DType.BF16, BosTokenId = ByteTokenizer.Bos, EosTokenIds = [ByteTokenizer.Eos],
    };

    /// <summary>Throws an <see cref="OptionException"/> naming the option (its property) for an out-of-range or inconsistent setting.</summary>
    public void Validate()
    {
        var inv = System.Globalization.CultureInfo.InvariantCulture;
        void Positive(string name, double v)
        {
            if (!(v > 0)) throw new OptionException(name, $"{v.ToString(inv)}: must be positive");
        }
        Positive(nameof(Steps), Steps);
        Positive(nameof(Layers), Layers);
        Positive(nameof(Hidden), Hidden);
        Positive(nameof(Heads), Heads);
        Positive(nameof(KvHeads), KvHeads);
        Positive(nameof(Intermediate), Intermediate);
        Positive(nameof(BatchSize), BatchSize);
        Positive(nameof(CorpusLines), CorpusLines);
        Positive(nameof(InitStd), InitStd);
        if (!double.IsFinite(Lr) || !(Lr > 0)) throw new OptionException(nameof(Lr), $"{Lr.ToString(inv)}: must be a positive number");
        if (SeqLen < 8) throw new OptionException(nameof(SeqLen), $"{SeqLen}: must be at least 8");
        if (SeqLen > MaxPositionEmbeddings)
            throw new OptionException(nameof(SeqLen), $"{SeqLen}: must be at most max_position_embeddings {MaxPositionEmbeddings}");
        if (Hidden % Heads != 0) throw new OptionException(nameof(Hidden), $"{Hidden}: is not a multiple of the attention heads ({Heads})");
        if ((Hidden / Heads) % 2 != 0) throw new OptionException(nameof(Heads), $"{Heads}: head_dim {Hidden / Heads} (hidden / heads) must be even");
        if (Heads % KvHeads != 0) throw new OptionException(nameof(KvHeads), $"{KvHeads}: does not divide the attention heads ({Heads})");
        if (WarmupSteps is < 0) throw new OptionException(nameof(WarmupSteps), $"{WarmupSteps}: must be >= 0");
        if (!(CopyShare >= 0 && CopyShare <= 1)) throw new OptionException(nameof(CopyShare), $"{CopyShare.ToString(inv)}: must be in [0, 1]");
        if (!(CapitalCopyShare >= 0 && CapitalCopyShare <= 1)) throw new OptionException(nameof(CapitalCopyShare), $"{CapitalCopyShare.ToString(inv)}: must be in [0, 1]");
        if (EvalLines < 0) throw new OptionException(nameof(EvalLines), $"{EvalLines}: must be >= 0");
        Config().Validate("pretrain options");
    }
}

/// <summary>What <see cref="Pretrain.Run"/> produced.</summary>
public sealed record PretrainResult(string OutputDir, LlamaConfig Config, long Parameters, int Steps, double FinalLoss,
    double? EvalLoss, double Seconds, string MetricsPath);

/// <summary>
/// <c>nativepeft pretrain</c>: the built-in base model. Full training (AdamW, weight decay 0.01, clipping at 1.0,
/// warmup + cosine) of a Llama-architecture model with the byte vocabulary from random initialization
/// (N(0, std²), <see cref="LlamaModel.CreateRandom"/>) on <see cref="BuiltinTask.PretrainCorpus"/> — words and
/// <c>copy: w\nw</c> lines, each document bos + text + eos, concatenated into rows of <see cref="PretrainOptions.SeqLen"/>
/// (<see cref="BatchMode.Concatenation"/>: attention runs across the documents of a row, as when the shipped model was
/// trained).
/// The corpus teaches the <c>op: word\n</c> format and copying but never reversal or capitals, so the base cannot do
/// the built-in task before fine-tuning. Deterministic on the CPU for a fixed seed (same weights bit for bit).
/// The output folder gets config.json, model.safetensors (BF16), tokenizer_config.json (the byte tokenizer) and
/// metrics.json (every step, the final eval).
/// </summary>
public static partial class Pretrain
{
    public const string MetricsFileName = "metrics.json";

    /// <summary>
    /// The pretraining documents: <paramref name="lines"/> lines of <see cref="BuiltinTask.PretrainCorpus"/>, word lines
    /// dropped in order until copy lines make up <paramref name="copyShare"/> of what is left (see
    /// <see cref="PretrainOptions.CopyShare"/>).
    /// </summary>
    public static List<string> Corpus(ulong seed, int lines, double copyShare, double capitalCopyShare = 0)
    {
        var all = BuiltinTask.PretrainCorpus(seed, lines);
        if (capitalCopyShare > 0)
        {
            // Line i's copy word is capitalized when a hash of (seed, i) falls under the share: independent of the word.
            ulong threshold = capitalCopyShare >= 1 ? ulong.MaxValue : (ulong)(capitalCopyShare * 18446744073709551615.0);
            for (int i = 0; i < all.Count; i++)
            {
                if (!IsCopy(all[i])) continue;
                ulong h = SeedHash.SplitMix64(SeedHash.SplitMix64(seed ^ 0xCA97_CA97UL) ^ (ulong)i);
                if (h <= threshold) all[i] = all[i].ToUpperInvariant().Replace("COPY: ", "copy: ", StringComparison.Ordinal);
            }
        }
        if (!(copyShare > 0.5)) return all;
        int copies = all.Count(IsCopy);
        int wordsKept = copyShare >= 1 ? 0 : (int)Math.Round(copies * (1 - copyShare) / copyShare);
        var kept = new List<string>(copies + wordsKept);
        foreach (var line in all)
        {
            if (IsCopy(line)) kept.Add(line);
            else if (wordsKept > 0) { kept.Add(line); wordsKept--; }
        }
        return kept;
    }

    private static bool IsCopy(string line) => line.StartsWith("copy: ", StringComparison.Ordinal);

    /// <summary>The pretraining examples: each document as bos + UTF-8 bytes + eos, labels = ids.</summary>
    public static List<TrainingExample> Examples(ulong seed, int lines, double copyShare, double capitalCopyShare = 0)
    {
        var tok = ByteTokenizer.Instance;
        return Corpus(seed, lines, copyShare, capitalCopyShare).Select(line =>
        {
            var body = tok.Encode(line, addBos: true);
            var ids = new int[body.Length + 1];
            body.CopyTo(ids, 0);
            ids[^1] = ByteTokenizer.Eos;
            return TrainingExample.CausalLm(ids);
        }).ToList();
    }

    /// <summary>
    /// Trains and writes the model into <paramref name="outputDir"/> (created; must not already hold a checkpoint).
    /// Everything is computed on <paramref name="ops"/> (a new <see cref="CpuOps"/> when null).
    /// </summary>
    public static PretrainResult Run(PretrainOptions options, string outputDir, ILogger? logger = null,
        IProgress<TrainerProgress>? progress = null, IOps? ops = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(outputDir);
        options.Validate();
        logger ??= NullLogger.Instance;
        string output = Path.GetFullPath(outputDir);
        if (File.Exists(Path.Combine(output, LlamaConfig.FileName)) || File.Exists(Path.Combine(output, HfCheckpoint.SingleFileName)))
            throw new IOException($"{output} already holds a checkpoint; write to a new folder");
        // The folder is this run's until it returns (and proven writable before the first step).
        using var outputLock = OutputLock.Acquire(output);
        foreach (var note in outputLock.Notes) LogOutputNote(logger, note);

        var clock = Stopwatch.StartNew();
        var config = options.Config();
        ulong seed = (ulong)(uint)options.Seed;
        var tok = ByteTokenizer.Instance;
        var data = new TrainingData(Examples(seed, options.CorpusLines, options.CopyShare, options.CapitalCopyShare), tok)
        {
            Eval = options.EvalLines > 0 ? Examples(seed ^ 0xE7A1_0000_0000_0001UL, options.EvalLines, options.CopyShare, options.CapitalCopyShare) : null,
        };
        bool ownsOps = ops is null;
        ops ??= new CpuOps();
        string work = OutputFolder.TempPathFor(Path.Combine(output, "pretrain"));
        try
        {
            using var model = LlamaModel.CreateRandom(config, ops,
                new LlamaModelOptions { FullFineTuning = true, Seed = options.Seed }, weightSeed: options.Seed, std: options.InitStd);
            var trainerOptions = new TrainerOptions
            {
                Steps = options.Steps, BatchSize = options.BatchSize, SeqLen = options.SeqLen, BatchMode = BatchMode.Concatenation,
                Lr = options.Lr, Schedule = LrScheduleKind.Cosine,
                WarmupSteps = options.WarmupSteps ?? Math.Max(1, options.Steps / 20),
                MaxGradNorm = 1.0, WeightDecay = 0.01, Seed = options.Seed, Optimizer = "adamw", OutputDir = work,
                ExactMatchSamples = 0,
                ExtraConfig = new Dictionary<string, string>
                {
                    ["kind"] = "pretrain", ["corpus_lines"] = options.CorpusLines.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    ["layers"] = Inv(options.Layers), ["hidden"] = Inv(options.Hidden), ["heads"] = Inv(options.Heads),
                    ["kv_heads"] = Inv(options.KvHeads), ["intermediate"] = Inv(options.Intermediate),
                },
            };
            TrainResult result;
            using (var trainer = new Trainer(model, data, trainerOptions, null, progress))
            {
                result = trainer.Train(cancellationToken);
                if (result.Cancelled) throw new OperationCanceledException("pretraining was cancelled", cancellationToken);
            }
            string metrics = Path.Combine(output, MetricsFileName);
            try
            {
                HfCheckpoint.Write(output, config, Bf16Tensors(model), long.MaxValue);
                TokenizerLoader.WriteByteTokenizerConfig(output);
                File.Move(Path.Combine(work, Trainer.MetricsFileName), metrics, overwrite: true);
            }
            catch (Exception e) when (e is not OutputFolderException && OutputFolder.IsWriteFailure(e))
            {
                throw OutputFolder.WriteFailed(output, e);
            }
            double seconds = clock.Elapsed.TotalSeconds;
            long parameters = config.ParameterCount();
            LogDone(logger, options.Steps, parameters, result.FinalLoss ?? double.NaN, result.FinalEval?.Loss ?? double.NaN, seconds, output);
            return new PretrainResult(output, config, parameters, result.Steps, result.FinalLoss ?? double.NaN, result.FinalEval?.Loss,
                seconds, metrics);
        }
        finally
        {
            try { if (Directory.Exists(work)) Directory.Delete(work, recursive: true); }
            catch (IOException) { }
            if (ownsOps) ops.Dispose();
        }
    }

    /// <summary>Every base tensor of <paramref name="model"/> rounded to BF16 (round to nearest even), HF names.</summary>
    public static List<SafetensorsTensor> Bf16Tensors(LlamaModel model)
    {
        ArgumentNullException.ThrowIfNull(model);
        return model.BaseParameters().Select(p =>
        {
            var t = p.Dense ?? throw new InvalidOperationException($"{p.Name}: not dense");
            var values = new float[t.Count];
            model.Ops.Download<float>(t, values);
            var bf = new BFloat16[values.Length];
            for (int i = 0; i < values.Length; i++) bf[i] = (BFloat16)values[i];
            return SafetensorsTensor.From(p.Name, t.Shape.Select(d => (long)d).ToArray(), bf);
        }).ToList();
    }

    [LoggerMessage(EventId = 21, Level = LogLevel.Warning, Message = "{Note}")]
    private static partial void LogOutputNote(ILogger logger, string note);

    private static string Inv(int v) => v.ToString(System.Globalization.CultureInfo.InvariantCulture);

    [LoggerMessage(EventId = 20, Level = LogLevel.Information,
        Message = "pretrained {Steps} steps of a {Parameters}-parameter model: loss {Loss:F4}, eval loss {EvalLoss:F4}, {Seconds:F1} s; wrote {Output}")]
    private static partial void LogDone(ILogger logger, int steps, long parameters, double loss, double evalLoss, double seconds, string output);
}
