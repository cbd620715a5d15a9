using System.CommandLine;
using System.Globalization;
using NativePeft.Training;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft pretrain`: trains the built-in base model from random initialization on the built-in corpus
/// (<see cref="Pretrain"/>) and writes a HF folder (config.json, BF16 model.safetensors, tokenizer_config.json) and
/// metrics.json. Deterministic on the CPU for a fixed seed. The defaults reproduce the shipped model.
/// </summary>
public static class PretrainCommand
{
    public static Command Create(TextWriter stdout)
    {
        var d = new PretrainOptions();
        var output = new Option<DirectoryInfo>("--out") { Description = "output folder (new or empty)", Required = true };
        var seed = new Option<int>("--seed") { Description = "seed of the initialization, the corpus and the data order", DefaultValueFactory = _ => d.Seed };
        var steps = new Option<int>("--steps") { Description = "optimizer steps", DefaultValueFactory = _ => d.Steps };
        var layers = new Option<int>("--layers") { Description = "decoder layers", DefaultValueFactory = _ => d.Layers };
        var hidden = new Option<int>("--hidden") { Description = "hidden size", DefaultValueFactory = _ => d.Hidden };
        var heads = new Option<int>("--heads") { Description = "attention heads", DefaultValueFactory = _ => d.Heads };
        var kvHeads = new Option<int>("--kv-heads") { Description = "key/value heads (grouped-query attention)", DefaultValueFactory = _ => d.KvHeads };
        var intermediate = new Option<int>("--intermediate") { Description = "MLP size", DefaultValueFactory = _ => d.Intermediate };
        var seq = new Option<int>("--seq") { Description = "packed row length", DefaultValueFactory = _ => d.SeqLen };
        var batch = new Option<int>("--batch") { Description = "rows per step", DefaultValueFactory = _ => d.BatchSize };
        var lr = new Option<double>("--lr") { Description = "peak learning rate (warmup, then cosine)", DefaultValueFactory = _ => d.Lr };
        var lines = new Option<int>("--corpus-lines") { Description = "corpus documents generated", DefaultValueFactory = _ => d.CorpusLines };
        var cmd = new Command("pretrain", "Train the built-in byte-level Llama base model from scratch on the built-in corpus")
        {
            output, seed, steps, layers, hidden, heads, kvHeads, intermediate, seq, batch, lr, lines,
        };
        cmd.SetAction((parse, cancel) =>
        {
            var options = new PretrainOptions
            {
                Seed = parse.GetValue(seed), Steps = parse.GetValue(steps), Layers = parse.GetValue(layers), Hidden = parse.GetValue(hidden),
                Heads = parse.GetValue(heads), KvHeads = parse.GetValue(kvHeads), Intermediate = parse.GetValue(intermediate),
                SeqLen = parse.GetValue(seq), BatchSize = parse.GetValue(batch), Lr = parse.GetValue(lr), CorpusLines = parse.GetValue(lines),
            };
            return Task.FromResult(Run(options, parse.GetValue(output)!.FullName, stdout, cancel));
        });
        return cmd;
    }

    public static int Run(PretrainOptions options, string output, TextWriter stdout, CancellationToken cancel = default)
    {
        try { options.Validate(); }
        catch (OptionException e) { throw new CliException(OptionFlags.Message(e, "pretrain"), 1, e); }
        if (File.Exists(output)) throw new CliException($"--out {output}: is a file");
        if (IO.OutputFolder.HasContent(output))
            throw new CliException($"--out {output}: the folder exists and is not empty");
        var config = options.Config();
        stdout.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"pretrain: {config.NumHiddenLayers} layers, hidden {config.HiddenSize}, heads {config.NumAttentionHeads}/{config.NumKeyValueHeads}, " +
            $"intermediate {config.IntermediateSize}, vocab {config.VocabSize}: {config.ParameterCount():N0} parameters; " +
            $"{options.Steps} steps of {options.BatchSize}×{options.SeqLen}, lr {options.Lr}, seed {options.Seed}"));
        int every = Math.Max(1, options.Steps / 20);
        var progress = new ActionProgress<TrainerProgress>(p =>
        {
            if (p.Step % every == 0 || p.Step == p.TotalSteps)
                stdout.WriteLine(TrainCommand.StepLine(p));
        });
        bool created = !Directory.Exists(output);
        PretrainResult result;
        try
        {
            result = Pretrain.Run(options, output, new WarningLogger(stdout), progress, null, cancel);
        }
        catch (Exception e) when (e is OperationCanceledException or TrainingDivergedException or IOException or IO.OutputFolderException)
        {
            try { if (created && Directory.Exists(output)) Directory.Delete(output, recursive: true); }
            catch (IOException) { }
            if (e is OperationCanceledException) throw new CliException("pretrain: cancelled; nothing written", TrainCommand.ExitInterrupted, e);
            throw new CliException("pretrain: " + e.Message, e is TrainingDivergedException ? TrainCommand.ExitDiverged : 1, e);
        }
        stdout.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"final loss {result.FinalLoss:F4}, eval loss {result.EvalLoss ?? double.NaN:F4}, {result.Seconds:F1} s"));
        stdout.WriteLine($"wrote {result.OutputDir} (config.json, model.safetensors in bf16, tokenizer_config.json)");
        stdout.WriteLine($"metrics: {result.MetricsPath}");
        return 0;
    }
}
