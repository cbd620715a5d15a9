using NativePeft.Inference;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Training;

namespace NativePeft.Cli.Commands;

/// <summary>
/// The one table between the library's option records and the command line: which flag of which command binds which
/// property. The commands take each bound flag's default from a fresh record (so a default lives once, in the library),
/// the library validates, and an <see cref="OptionException"/> becomes "--flag detail" through <see cref="Flag"/>,
/// never by parsing the exception's text. OptionFlagsTests checks every binding's default against the record's.
/// </summary>
internal static class OptionFlags
{
    /// <summary>
    /// <paramref name="Flag"/> of <paramref name="Command"/> binds <paramref name="Property"/> of <paramref name="Record"/>
    /// (a dotted path for a nested record: "Lora.Rank" is <see cref="FineTuneOptions.Lora"/>'s <see cref="LoraSettings.Rank"/>).
    /// </summary>
    public sealed record Binding(string Command, string Flag, Type Record, string Property)
    {
        /// <summary>The name an <see cref="OptionException"/> gives the option: the property's own name.</summary>
        public string OptionName => Property[(Property.LastIndexOf('.') + 1)..];
    }

    private static Binding Train(string flag, string property) => new("train", flag, typeof(FineTuneOptions), property);
    private static Binding Generate(string flag, string property) => new("generate", flag, typeof(GenerationOptions), property);
    private static Binding Pretrain(string flag, string property) => new("pretrain", flag, typeof(PretrainOptions), property);

    /// <summary>Every bound flag.</summary>
    public static readonly IReadOnlyList<Binding> Bindings =
    [
        Train("--model", nameof(FineTuneOptions.Model)), Train("--data", nameof(FineTuneOptions.Data)),
        Train("--eval-data", nameof(FineTuneOptions.EvalData)), Train("--method", nameof(FineTuneOptions.Method)),
        Train("--rank", "Lora.Rank"), Train("--alpha", "Lora.Alpha"), Train("--dropout", "Lora.Dropout"),
        Train("--targets", "Lora.TargetModules"), Train("--rslora", "Lora.UseRsLora"),
        Train("--lr", nameof(FineTuneOptions.Lr)), Train("--schedule", nameof(FineTuneOptions.Schedule)),
        Train("--warmup", nameof(FineTuneOptions.WarmupSteps)), Train("--steps", nameof(FineTuneOptions.Steps)),
        Train("--epochs", nameof(FineTuneOptions.Epochs)), Train("--batch", nameof(FineTuneOptions.BatchSize)),
        Train("--grad-accum", nameof(FineTuneOptions.GradAccum)), Train("--seq", nameof(FineTuneOptions.SeqLen)),
        Train("--pack", nameof(FineTuneOptions.Pack)), Train("--seed", nameof(FineTuneOptions.Seed)),
        Train("--optim", nameof(FineTuneOptions.Optimizer)), Train("--max-grad-norm", nameof(FineTuneOptions.MaxGradNorm)), Train("--weight-decay", nameof(FineTuneOptions.WeightDecay)),
        Train("--eval-every", nameof(FineTuneOptions.EvalEvery)), Train("--eval-batches", nameof(FineTuneOptions.EvalBatches)),
        Train("--save-every", nameof(FineTuneOptions.SaveEvery)), Train("--resume", nameof(FineTuneOptions.ResumeFrom)),
        Train("--device", nameof(FineTuneOptions.Device)), Train("--precision", nameof(FineTuneOptions.ComputeDType)),
        Train("--device-memory", nameof(FineTuneOptions.DeviceMemory)), Train("--recompute", nameof(FineTuneOptions.Recompute)),
        Train("--embedding", nameof(FineTuneOptions.Embedding)), Train("--out", nameof(FineTuneOptions.OutputDir)),
        Train("--on-bad-line", nameof(FineTuneOptions.OnBadLine)), Train("--on-nonfinite", nameof(FineTuneOptions.OnNonFinite)),
        Generate("--max-tokens", nameof(GenerationOptions.MaxNewTokens)), Generate("--temperature", nameof(GenerationOptions.Temperature)),
        Generate("--top-p", nameof(GenerationOptions.TopP)), Generate("--top-k", nameof(GenerationOptions.TopK)),
        Generate("--seed", nameof(GenerationOptions.Seed)),
        Pretrain("--seed", nameof(PretrainOptions.Seed)), Pretrain("--steps", nameof(PretrainOptions.Steps)),
        Pretrain("--layers", nameof(PretrainOptions.Layers)), Pretrain("--hidden", nameof(PretrainOptions.Hidden)),
        Pretrain("--heads", nameof(PretrainOptions.Heads)), Pretrain("--kv-heads", nameof(PretrainOptions.KvHeads)),
        Pretrain("--intermediate", nameof(PretrainOptions.Intermediate)), Pretrain("--seq", nameof(PretrainOptions.SeqLen)),
        Pretrain("--batch", nameof(PretrainOptions.BatchSize)), Pretrain("--lr", nameof(PretrainOptions.Lr)),
        Pretrain("--corpus-lines", nameof(PretrainOptions.CorpusLines)),
    ];

    /// <summary>The settings of a <see cref="ModelSession"/> that no option record holds, as generate and eval name them.</summary>
    private static readonly Dictionary<string, string> SessionFlags = new(StringComparer.Ordinal)
    {
        ["Model"] = "--model", ["Device"] = "--device", ["DeviceMemory"] = "--device-memory", ["Adapter"] = "--adapter",
        ["Distributed"] = "data-parallel job (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, NATIVEPEFT_DIST_*):",
    };

    /// <summary>
    /// The flag of an option's property name (an <see cref="OptionException.Option"/>): the table's, else the session's,
    /// else the name in kebab case ("ExactMatchSamples" → "--exact-match-samples") for a property no command binds.
    /// </summary>
    public static string Flag(string option, string? command = null) =>
        Bindings.FirstOrDefault(b => b.OptionName == option && (command is null || b.Command == command))?.Flag
        ?? (SessionFlags.TryGetValue(option, out var flag) ? flag
        : "--" + string.Concat(option.Select((c, i) => char.IsUpper(c) ? (i > 0 ? "-" : "") + char.ToLowerInvariant(c) : c.ToString())));

    /// <summary>"--flag detail" for a refused option (no space before a detail that starts with ':').</summary>
    public static string Message(OptionException e, string? command = null) => OptionException.Format(Flag(e.Option, command), e.Detail);

    /// <summary>Runs a library call; its option errors become CliExceptions naming the command-line option (exit 1).</summary>
    public static T Guard<T>(Func<T> action, string? command = null)
    {
        try { return action(); }
        catch (OptionException e) { throw new CliException(Message(e, command), 1, e); }
    }

    /// <inheritdoc cref="Guard{T}(Func{T}, string?)"/>
    public static void Guard(Action action, string? command = null) => Guard(() => { action(); return 0; }, command);

    /// <summary>
    /// A <see cref="ModelSession"/> step of generate or eval: an adapter whose rank or tensors do not fit the model is one
    /// error naming --adapter and --model; the other refusals name their flag.
    /// </summary>
    public static T Session<T>(Func<T> step, string modelArg, string? adapterArg)
    {
        try { return step(); }
        catch (OptionException e) when (e.Option == "Adapter" && adapterArg is not null)
        {
            throw AdapterArgument.DoesNotFit(e.Detail, adapterArg, modelArg, e);
        }
        catch (PeftAdapterException e) when (adapterArg is not null) { throw AdapterArgument.DoesNotFit(e, adapterArg, modelArg); }
        catch (OptionException e) { throw new CliException(Message(e), 1, e); }
    }

    /// <inheritdoc cref="Session{T}(Func{T}, string, string?)"/>
    public static void Session(Action step, string modelArg, string? adapterArg) => Session(() => { step(); return 0; }, modelArg, adapterArg);
}
