using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using NativePeft.Data;
using NativePeft.Inference;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Planning;
using NativePeft.Training;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft generate`: text from a Llama checkpoint (the shipped built-in model by default), optionally with a PEFT
/// LoRA adapter on top (applied unmerged, as in training), greedy or sampled, with a KV cache. Prints the completion as
/// it is produced and a stats line (or one JSON object with --json). Writes no files.
/// </summary>
public static class GenerateCommand
{
    public static Command Create(TextWriter stdout)
    {
        var model = new Option<string>("--model") { Description = "HF Llama checkpoint folder (config.json, safetensors, tokenizer), or 'builtin' for the shipped model", DefaultValueFactory = _ => BuiltinModel.Name };
        var adapter = new Option<string?>("--adapter") { Description = "PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), e.g. the output of `train`" };
        var prompt = new Option<string>("--prompt") { Description = "the prompt text (for the built-in model and task: \"upper: word\\n\")", Required = true };
        var d = new GenerationOptions(); // the defaults (OptionFlags binds each flag to its property)
        var maxTokens = new Option<int>("--max-tokens") { Description = "new tokens at most (generation also stops at eos)", DefaultValueFactory = _ => d.MaxNewTokens };
        var temperature = new Option<double>("--temperature") { Description = "0 = greedy; > 0 samples from softmax(logits / temperature)", DefaultValueFactory = _ => d.Temperature };
        var topP = new Option<double>("--top-p") { Description = "nucleus sampling: keep the most likely tokens up to this cumulative probability, (0, 1]", DefaultValueFactory = _ => d.TopP };
        var topK = new Option<int>("--top-k") { Description = "keep only the k most likely tokens (0 = off)", DefaultValueFactory = _ => d.TopK };
        var seed = new Option<ulong>("--seed") { Description = "seed of the sampler (the same seed gives the same tokens)", DefaultValueFactory = _ => d.Seed };
        var quantize = DeviceOption.CreateQuantize("load the base in 4 bits as QLoRA does: nf4 (or fp4), blocksize 64, double quant");
        var (device, precision, deviceMemory) = DeviceOption.CreateRun("cpu", "cpu (the C# reference, fp32), or the kernels on auto|cuda|emulator");
        var json = new Option<bool>("--json") { Description = "print one JSON object: prompt, completion, token ids, counts, tokens/s" };
        var cmd = new Command("generate", "Generate text with a Llama model (and a LoRA adapter), greedy or sampled, with a KV cache")
        {
            model, adapter, prompt, maxTokens, temperature, topP, topK, seed, quantize, device, precision, deviceMemory, json,
        };
        cmd.SetAction(parse => Run(new Args(parse.GetValue(model)!, parse.GetValue(adapter), parse.GetValue(prompt)!, parse.GetValue(maxTokens),
            parse.GetValue(temperature), parse.GetValue(topP), parse.GetValue(topK), parse.GetValue(seed), parse.GetValue(quantize),
            parse.GetValue(device)!, parse.GetValue(json)) { Precision = parse.GetValue(precision)!, DeviceMemory = parse.GetValue(deviceMemory), Given = TrainCommand.GivenOptions(parse, cmd) }, stdout));
        return cmd;
    }

    /// <summary>The parsed options.</summary>
    public sealed record Args(string Model, string? Adapter, string Prompt, int MaxTokens, double Temperature, double TopP, int TopK,
        ulong Seed, string? Quantize, string Device, bool Json)
    {
        /// <summary>--precision: auto (bf16 on cuda and the emulator, fp32 on cpu), bf16 or fp32.</summary>
        public string Precision { get; init; } = "auto";
        /// <summary>--device-memory: the run's limit of device memory (a size), null for the device's free memory.</summary>
        public string? DeviceMemory { get; init; }
        /// <summary>The options given explicitly (<see cref="TrainCommand.GivenOptions"/>).</summary>
        public IReadOnlySet<string> Given { get; init; } = new HashSet<string>();
    }

    public static int Run(Args a, TextWriter stdout)
    {
        // ---- the options on their own
        // The library generates 0 tokens if asked; the command exists to print some.
        if (a.MaxTokens < 1) throw new CliException($"--max-tokens {a.MaxTokens}: must be at least 1", 2);
        var options = new GenerationOptions { MaxNewTokens = a.MaxTokens, Temperature = a.Temperature, TopP = a.TopP, TopK = a.TopK, Seed = a.Seed };
        try { options.Validate(); }
        catch (OptionException e) { throw new CliException(OptionFlags.Message(e, "generate"), 2, e); }
        if (a.Prompt.Length == 0) throw new CliException("--prompt: the prompt is empty", 2);
        if (a.Temperature == 0)
            TrainCommand.RefuseUnused(a.Given, new[] { "--seed", "--top-p", "--top-k" }.Select(o => (o, "greedy decoding (--temperature 0) draws nothing")));
        var computeDType = DeviceOption.ComputeDType(a.Precision, a.Device);
        long? memoryLimit = DeviceOption.Memory(a.DeviceMemory, a.Device);

        // ---- files
        string modelDir;
        if (a.Model == BuiltinModel.Name)
        {
            try { modelDir = BuiltinModel.Require(); }
            catch (DirectoryNotFoundException e) { throw new CliException($"--model builtin: {e.Message}", 1, e); }
        }
        else
        {
            modelDir = Path.GetFullPath(a.Model);
            if (!Directory.Exists(modelDir)) throw new CliException($"--model {a.Model}: folder not found");
            if (!File.Exists(Path.Combine(modelDir, LlamaConfig.FileName)))
                throw new CliException($"--model {a.Model}: no {LlamaConfig.FileName} (not a Hugging Face model folder)");
        }
        var lora = AdapterArgument.Load(a.Adapter);

        // One ModelSession opens the checkpoint, the tokenizer, the device, the plan's pool and the model (with the adapter).
        using var session = OptionFlags.Session(() => ModelSession.Open(modelDir, withTokenizer: true, modelName: a.Model, adapter: lora), a.Model, a.Adapter);
        var ckpt = session.Checkpoint;
        var config = ckpt.Config;
        // generate reads the prompt and prints text: unlike train and eval on pre-tokenized data, it needs the tokenizer files.
        var tokenizer = session.Tokenizer!;
        if (tokenizer is IdsOnlyTokenizer idsOnly)
            throw new CliException($"--model {a.Model}: {idsOnly.MissingMessage("generate (it reads the prompt and prints text)", suggestPreTokenized: false)}");

        // ---- the prompt fits the context
        var promptIds = tokenizer.Encode(a.Prompt, tokenizer.BosId is not null);
        int context = config.MaxPositionEmbeddings;
        if ((long)promptIds.Length + a.MaxTokens > context)
        {
            throw new CliException(promptIds.Length >= context
                ? $"--prompt: {promptIds.Length} tokens, the model's context is {context} tokens (max_position_embeddings): shorten the prompt"
                : $"--prompt: {promptIds.Length} tokens + --max-tokens {a.MaxTokens} = {(long)promptIds.Length + a.MaxTokens} exceed the model's context of {context} tokens (max_position_embeddings); use --max-tokens {context - promptIds.Length} or less");
        }

        // ---- the model (and the adapter, checked against it before anything runs)
        var quantization = a.Quantize switch { "nf4" => BaseQuantization.Nf4, "fp4" => BaseQuantization.Fp4, _ => BaseQuantization.None };
        bool bf16Stored = quantization == BaseQuantization.None && !ckpt.IsQuantizedCheckpoint && config.LayerTensors(0)
            .Where(t => t.Shape.Length == 2).All(t => ckpt.GetInfo(t.Name).DType == DType.BF16);
        var modelOptions = new LlamaModelOptions
        {
            ComputeDType = computeDType,
            Lora = lora?.Config.ToLoraSettings(),
            Quantization = quantization,
            DoubleQuant = true,
            // A BF16 checkpoint keeps its frozen linear weights in BF16 (exact: they are BF16 already), half the memory.
            BaseWeightDType = bf16Stored ? DType.BF16 : null,
        };
        // On a GPU device every byte comes from a pool sized from the generation's plan (weights, adapter, KV cache of
        // prompt + --max-tokens − 1 tokens, the forward's workspace); on CUDA the plan is checked against free memory first.
        var llama = OptionFlags.Session(() =>
        {
            session.OpenDevice(a.Device, memoryLimit);
            session.PlanInference(modelOptions,
                new InferencePlanOptions { Mode = InferenceMode.Generate, PromptTokens = promptIds.Length, MaxNewTokens = a.MaxTokens }, "generation");
            return session.LoadModel(modelOptions);
        }, a.Model, a.Adapter);
        var ops = session.Ops!;

        // ---- generate, streaming the text unless --json
        var generator = new TextGenerator(llama, tokenizer);
        var ids = new List<int>();
        int printed = 0;
        Action<int, string>? onToken = a.Json ? null : (id, _) =>
        {
            ids.Add(id);
            string text = tokenizer.Decode(ids.ToArray());
            if (text.EndsWith('\uFFFD')) return; // an incomplete UTF-8 sequence: wait for its next bytes
            stdout.Write(text[Math.Min(printed, text.Length)..]);
            printed = text.Length;
            stdout.Flush();
        };
        GenerationResult result;
        try { result = generator.Generate(promptIds, options, onToken); }
        catch (NonFiniteValuesException e)
        {
            if (printed > 0) stdout.WriteLine();
            throw new CliException($"{e.Message}; check {(a.Adapter is null ? "" : $"--adapter {a.Adapter} and ")}--model {a.Model}", 1, e);
        }
        string deviceName = a.Device == "cpu" ? "cpu" : ops.Name;
        if (a.Json)
        {
            using var buffer = new MemoryStream();
            using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = false, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
            {
                w.WriteStartObject();
                w.WriteString("prompt", a.Prompt);
                w.WriteString("completion", result.Text);
                w.WriteNumber("prompt_tokens", result.PromptTokens);
                w.WriteNumber("new_tokens", result.TokenIds.Length);
                w.WriteStartArray("token_ids");
                foreach (int id in result.TokenIds) w.WriteNumberValue(id);
                w.WriteEndArray();
                w.WriteBoolean("stopped_at_eos", result.StoppedAtEos);
                w.WriteNumber("tokens_per_second", Math.Round(result.TokensPerSecond, 3));
                w.WriteNumber("kv_cache_bytes", result.KvCacheBytes);
                w.WriteString("device", deviceName);
                w.WriteEndObject();
            }
            stdout.WriteLine(Encoding.UTF8.GetString(buffer.ToArray()));
        }
        else
        {
            if (printed < result.Text.Length) stdout.Write(result.Text[printed..]);
            stdout.WriteLine();
            stdout.WriteLine($"-- {result.PromptTokens} prompt tokens, {result.TokenIds.Length} new tokens " +
                $"({(result.StoppedAtEos ? "stopped at eos" : "reached --max-tokens")}), " +
                $"{result.TokensPerSecond.ToString("0.0", CultureInfo.InvariantCulture)} tokens/s, KV cache {Output.Bytes(result.KvCacheBytes)}, " +
                $"{(lora is null ? "no adapter" : "adapter " + a.Adapter)}, {deviceName}");
        }
        return 0;
    }
}
