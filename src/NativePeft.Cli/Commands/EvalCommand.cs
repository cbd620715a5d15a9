using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Planning;
using NativePeft.Training;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft eval`: mean next-token cross-entropy of a HF Llama checkpoint over a dataset in any format `train` reads:
/// pre-tokenized JSONL (one {"input_ids": [...], "labels"?: [...]} per line, each line its own sequence, no BOS added),
/// {"text": ...} JSONL and .txt (tokenized with the model's tokenizer, packed into --seq tokens), Alpaca records (loss on
/// the response only, as in training): loss, perplexity, predicted tokens.
/// </summary>
public static class EvalCommand
{
    public static Command Create(TextWriter stdout)
    {
        var model = new Option<DirectoryInfo>("--model") { Description = "HF Llama checkpoint folder (config.json + safetensors, single or sharded), or 'builtin'", Required = true };
        var adapter = new Option<string?>("--adapter") { Description = "PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) applied to the base" };
        var data = new Option<FileInfo>("--data") { Description = "dataset file in any format train reads: pre-tokenized JSONL (each line a separate sequence), {\"text\": ...} JSONL, .txt, Alpaca records, chat {\"messages\": ...} JSONL", Required = true };
        var seq = new Option<int>("--seq") { Description = "sequence length the text formats (.txt, text JSONL) are packed into", DefaultValueFactory = _ => 128 };
        var quantize = DeviceOption.CreateQuantize("quantize the linear weights on load: nf4 or fp4 (blocksize 64, double quant)");
        var (device, precision, deviceMemory) = DeviceOption.CreateRun("cpu", "cpu (the C# reference, fp32), or the kernels on auto|cuda|emulator (see --precision)");
        var json = new Option<bool>("--json") { Description = "print {\"loss\": …, \"perplexity\": …, \"tokens\": …}" };
        var cmd = new Command("eval", "Mean next-token cross-entropy and perplexity of a Llama checkpoint on a dataset (any format train reads)")
        {
            model, adapter, data, seq, quantize, device, precision, deviceMemory, json,
        };
        cmd.SetAction(parse =>
        {
            string dir = TrainCommand.ModelPath(parse, model);
            string file = parse.GetValue(data)!.FullName;
            var quantization = parse.GetValue(quantize) switch
            {
                "nf4" => BaseQuantization.Nf4,
                "fp4" => BaseQuantization.Fp4,
                _ => BaseQuantization.None,
            };
            if (!File.Exists(file)) throw new CliException($"--data {file}: file not found");
            SizeOptions.DataFile("--data", file);
            if (!Directory.Exists(dir)) throw new CliException($"--model {dir}: folder not found");
            if (parse.GetValue(seq) < 2) throw new CliException($"--seq {parse.GetValue(seq)}: must be at least 2");
            long? memoryLimit = DeviceOption.Memory(parse.GetValue(deviceMemory), parse.GetValue(device)!);
            if (TrainCommand.GivenOptions(parse, cmd).Contains("--seq") && !IsBlank(file))
            {
                DataFormat format;
                try { format = DatasetLoader.DetectFormat(file); }
                catch (DataFormatException e) { throw new CliException($"--data {e.Message}", 1, e); }
                if (format is not (DataFormat.PlainText or DataFormat.TextJsonl))
                    TrainCommand.RefuseUnused(new HashSet<string> { "--seq" }, [("--seq", $"only text data (.txt, {{\"text\": ...}} JSONL) is packed to a sequence length; {file} holds {DatasetLoader.TextFormatName(format)}, evaluated example by example, whole")]);
            }
            try
            {
                var result = Run(dir, file, quantization, parse.GetValue(device)!, parse.GetValue(precision)!, parse.GetValue(adapter), parse.GetValue(seq), memoryLimit);
                if (parse.GetValue(json))
                    stdout.WriteLine("{\"loss\": " + R(result.Loss) + ", \"perplexity\": " + R(result.Perplexity) + ", \"tokens\": " + result.Tokens + "}");
                else
                {
                    stdout.WriteLine($"loss        {result.Loss.ToString("F6", CultureInfo.InvariantCulture)}");
                    stdout.WriteLine($"perplexity  {result.Perplexity.ToString("F4", CultureInfo.InvariantCulture)}");
                    stdout.WriteLine($"tokens      {result.Tokens}");
                    stdout.WriteLine($"sequences   {result.Sequences}");
                }
            }
            catch (Exception e) when (ModelSession.IsModelFileError(e)) { throw new CliException(e.Message, 1, e); }
            return 0;
        });
        return cmd;
    }

    private static string R(double v) => v.ToString("R", CultureInfo.InvariantCulture);

    /// <summary>The result of an evaluation: mean loss over every predicted token, exp(loss), the counts.</summary>
    public sealed record EvalResult(double Loss, double Perplexity, long Tokens, int Sequences);

    /// <summary>Evaluates <paramref name="dataFile"/> with the checkpoint in <paramref name="modelDir"/> on the CPU (fp32) or a device (--precision).</summary>
    public static EvalResult Run(string modelDir, string dataFile, BaseQuantization quantization, string device = "cpu", string precision = "auto",
        string? adapterDir = null, int seqLen = 128, long? memoryLimit = null)
    {
        var computeDType = DeviceOption.ComputeDType(precision, device);
        var adapter = AdapterArgument.Load(adapterDir); // checked before the model is read
        using var session = OptionFlags.Session(() => ModelSession.Open(modelDir, adapter: adapter), modelDir, adapterDir);
        var config = session.Config;
        var sequences = ReadData(dataFile, modelDir, config.VocabSize, seqLen, config.MaxPositionEmbeddings);
        var modelOptions = new LlamaModelOptions { Quantization = quantization, ComputeDType = computeDType, Lora = adapter?.Config.ToLoraSettings() };
        // On a GPU device every byte comes from a pool sized from the evaluation's plan (the forward of the longest
        // sequence); on CUDA the plan is checked against free memory first.
        int longest = sequences.Where(s => s.Length >= 2).Select(s => s.Length).DefaultIfEmpty(1).Max();
        var llama = OptionFlags.Session(() =>
        {
            session.OpenDevice(device, memoryLimit);
            session.PlanInference(modelOptions, new InferencePlanOptions { Mode = InferenceMode.Eval, Seq = longest }, "evaluation");
            return session.LoadModel(modelOptions);
        }, modelDir, adapterDir);
        llama.Dropout.Training = false;
        double sum = 0;
        long tokens = 0;
        int sequence = 0;
        foreach (var (ids, labels) in sequences)
        {
            sequence++;
            if (ids.Length < 2) continue; // nothing to predict
            double loss = llama.Forward(ids, labels, 1, ids.Length);
            if (llama.LastTokenCount == 0) continue;
            if (!double.IsFinite(loss))
                throw new CliException($"--data {dataFile}: example {sequence}: the loss is {loss} (not finite): the weights give non-finite logits; check {(adapterDir is null ? "" : $"--adapter {adapterDir} and ")}--model {modelDir}");
            sum += loss * llama.LastTokenCount;
            tokens += llama.LastTokenCount;
        }
        if (tokens == 0) throw new CliException($"--data {dataFile}: no example has a token to predict (every label is -100, or every line is shorter than 2 tokens), so there is nothing to predict");
        double mean = sum / tokens;
        return new EvalResult(mean, Math.Exp(mean), tokens, sequences.Count);
    }

    /// <summary>
    /// The examples of <paramref name="path"/> in any <see cref="DatasetLoader"/> format: pre-tokenized JSONL as
    /// <see cref="ReadJsonl"/> (labels = input_ids), the text formats with the model folder's tokenizer. An empty file is an error.
    /// </summary>
    /// <remarks>
    /// --seq packs the text formats and must then fit <paramref name="maxPositions"/> (the model's
    /// max_position_embeddings); in the other formats each example is its own sequence and must fit it.
    /// </remarks>
    public static List<TrainingExample> ReadData(string path, string modelDir, int vocabSize, int seqLen, int maxPositions = int.MaxValue)
    {
        if (IsBlank(path)) throw new CliException($"--data {path}: the file is empty (no examples)");
        try
        {
            var format = DatasetLoader.DetectFormat(path);
            if (format is DataFormat.PlainText or DataFormat.TextJsonl && Limits.SequenceProblem(seqLen, maxPositions) is { } seqProblem)
                throw new CliException($"--seq {seqProblem}");
            if (format == DataFormat.PreTokenized) return FitPositions(path, ReadJsonl(path, vocabSize).Select(TrainingExample.CausalLm).ToList(), maxPositions);
            var tokenizer = TokenizerLoader.ForModel(modelDir, vocabSize);
            var set = DatasetLoader.Load(path, format, tokenizer, seqLen, BadLinePolicy.Stop, vocabSize,
                format == DataFormat.Chat ? ChatTemplate.ForModel(modelDir) : null);
            if (set.Count == 0) throw new CliException($"--data {path}: no examples");
            foreach (var ex in set.Examples)
                foreach (int id in ex.InputIds)
                    if (id < 0 || id >= vocabSize)
                        throw new CliException($"--data {path}: token id {id} is outside the model's vocabulary [0, {vocabSize})");
            return FitPositions(path, set.Examples.ToList(), maxPositions);
        }
        catch (DataFormatException e) { throw new CliException($"--data {e.Message}", 1, e); }
        catch (Exception e) when (e is InvalidDataException or NotSupportedException) { throw new CliException($"--model {modelDir}: tokenizer: {e.Message}", 1, e); }
        catch (NativePeft.Data.Jinja.JinjaException e) { throw new CliException($"--model {modelDir}: {e.Message}", 1, e); }
    }

    /// <summary>Every example is one sequence of the forward: at most the model's max_position_embeddings tokens.</summary>
    private static List<TrainingExample> FitPositions(string path, List<TrainingExample> examples, int maxPositions)
    {
        for (int i = 0; i < examples.Count; i++)
            if (examples[i].InputIds.Length > maxPositions)
                throw new CliException($"--data {path}: example {i + 1} has {examples[i].InputIds.Length} tokens, more than the model's max_position_embeddings {maxPositions}");
        return examples;
    }

    /// <summary>True when the file holds nothing but white space.</summary>
    internal static bool IsBlank(string path)
    {
        using var reader = new StreamReader(path);
        int c;
        while ((c = reader.Read()) >= 0) if (!char.IsWhiteSpace((char)c)) return false;
        return true;
    }

    /// <summary>Reads the JSONL; blank lines are skipped; errors name the line (1-based).</summary>
    public static List<int[]> ReadJsonl(string path, int vocabSize)
    {
        var result = new List<int[]>();
        foreach (var (lineNumber, line, problem) in TextInput.ReadLines(path, Limits.MaxWholeDataBytes, (p, inner) => new CliException($"--data {path}: {p}", 1, inner)))
        {
            string where = $"--data {path}: line {lineNumber}";
            if (problem is not null) throw new CliException($"{where}: {problem}");
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("input_ids", out var arr))
                    throw new CliException($"{where}: expected an object with \"input_ids\"");
                if (arr.ValueKind != JsonValueKind.Array)
                    throw new CliException($"{where}: \"input_ids\" must be a list of token ids");
                var ids = new int[arr.GetArrayLength()];
                int i = 0;
                foreach (var e in arr.EnumerateArray())
                {
                    if (e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out int id))
                        throw new CliException($"{where}: input_ids[{i}] = {e.GetRawText()} is not an integer token id");
                    if (id < 0 || id >= vocabSize)
                        throw new CliException($"{where}: input_ids[{i}] = {id} is outside the vocabulary [0, {vocabSize})");
                    ids[i++] = id;
                }
                result.Add(ids);
            }
            catch (JsonException e)
            {
                throw new CliException($"{where}: invalid JSON: {e.Message}", 1, e);
            }
        }
        return result;
    }
}
