using System.CommandLine;
using System.Globalization;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Planning;
using NativePeft.Training;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft estimate`: the <see cref="MemoryPlan"/> of a fine-tune, by category, from a preset or a config.json
/// alone (no weights, no GPU).
/// </summary>
public static class EstimateCommand
{
    public static Command Create(TextWriter stdout)
    {
        var model = new Option<string>("--model")
        {
            Description = "a preset (" + string.Join(", ", PlanModels.Names) + "), builtin (the shipped model) or a path to config.json (or its folder)", Required = true,
        };
        var method = new Option<string>("--method") { Description = "full, lora or qlora", DefaultValueFactory = _ => "lora" };
        method.AcceptOnlyFromAmong("full", "lora", "qlora");
        var rank = new Option<int>("--rank") { Description = "LoRA r", DefaultValueFactory = _ => 16 };
        var alpha = new Option<double>("--alpha") { Description = "lora_alpha (no effect on memory)", DefaultValueFactory = _ => 32 };
        var dropout = new Option<double>("--dropout") { Description = "lora_dropout (train's default 0.05; above 0 the LoRA layers keep dropout(x) and its mask)", DefaultValueFactory = _ => 0.05 };
        var targets = new Option<string>("--targets")
        {
            Description = "comma-separated target_modules", DefaultValueFactory = _ => string.Join(",", LoraSettings.KnownTargets),
        };
        var batch = new Option<int>("--batch") { Description = "sequences per step", DefaultValueFactory = _ => 1 };
        var seq = new Option<int>("--seq") { Description = "sequence length (default 2048, or the model's max_position_embeddings when that is shorter)", DefaultValueFactory = _ => 2048 };
        var recompute = new Option<bool>("--recompute") { Description = "gradient checkpointing (keep block inputs only)" };
        var embedding = TrainCommand.EmbeddingOption();
        var optim = new Option<string>("--optim") { Description = "adamw, paged-adamw, adamw8bit or paged-adamw8bit", DefaultValueFactory = _ => "adamw" };
        optim.AcceptOnlyFromAmong("adamw", "paged-adamw", "adamw8bit", "paged-adamw8bit");
        var compute = new Option<string>("--compute")
        {
            Description = "compute dtype: bf16 (a GPU, as the published figures assume) or f32 (what this build runs today)",
            DefaultValueFactory = _ => "bf16",
        };
        compute.AcceptOnlyFromAmong("bf16", "f32");
        var device = new Option<string>("--device") { Description = "gpu (CUDA or the emulator) or cpu: where workspaces and paged state live", DefaultValueFactory = _ => "gpu" };
        device.AcceptOnlyFromAmong("gpu", "cuda", "emulator", "cpu");
        var chunk = new Option<int>("--ce-chunk") { Description = "vocabulary rows per cross-entropy chunk", DefaultValueFactory = _ => 8192 };
        var deviceMemory = new Option<string?>("--device-memory") { Description = "check the plan against this much memory, e.g. 24GiB, 80GB or bytes (exit 1 when it does not fit)" };
        var json = new Option<bool>("--json") { Description = "print every category in bytes and total_bytes as JSON" };
        var generate = new Option<bool>("--generate")
        {
            Description = "plan generation with a KV cache instead of training: lora = a bf16 base + the adapter, qlora = NF4 (double quant) + the adapter, full = the base alone",
        };
        var maxLength = new Option<int?>("--max-length") { Description = "with --generate: tokens in the KV cache (prompt + new tokens; default --seq)" };
        var noAdapter = new Option<bool>("--no-adapter") { Description = "with --generate: the base alone (no LoRA adapter on top)" };
        var promptTokens = new Option<int?>("--prompt-tokens") { Description = "with --generate: tokens of the prompt's prefill (default --max-length, the largest workspace)" };
        var nproc = new Option<int>("--nproc")
        {
            Description = "data-parallel ranks (GPUs): the plan is per GPU (full fine-tuning shards the optimizer state, ZeRO-1) and shows the gradient all-reduce volume per step",
            DefaultValueFactory = _ => 1,
        };
        var cmd = new Command("estimate", "Memory plan of a fine-tune by category (base weights, adapters, optimizer, activations, …); needs no GPU and no weights")
        {
            model, method, rank, alpha, dropout, targets, batch, seq, recompute, embedding, optim, compute, device, chunk, deviceMemory, json, generate, maxLength, promptTokens, noAdapter, nproc,
        };
        cmd.SetAction(parse =>
        {
            string modelName = parse.GetValue(model)!;
            var bf16 = parse.GetValue(compute) == "bf16";
            var planDevice = parse.GetValue(device) == "cpu" ? PlanDevice.Cpu : PlanDevice.Gpu;
            if (bf16 && planDevice == PlanDevice.Cpu)
                throw new CliException("--compute bf16 is for a GPU; with --device cpu use --compute f32", 2);
            int rankValue = parse.GetValue(rank), batchValue = parse.GetValue(batch), seqValue = parse.GetValue(seq), chunkValue = parse.GetValue(chunk);
            if (rankValue <= 0) throw new CliException($"--rank {rankValue}: must be a positive integer", 2);
            if (batchValue <= 0) throw new CliException($"--batch {batchValue}: must be a positive integer", 2);
            if (seqValue <= 0) throw new CliException($"--seq {seqValue}: must be a positive integer", 2);
            if (chunkValue <= 0) throw new CliException($"--ce-chunk {chunkValue}: must be a positive integer", 2);
            int nprocValue = parse.GetValue(nproc);
            if (nprocValue <= 0) throw new CliException($"--nproc {nprocValue}: must be a positive integer", 2);
            SizeOptions.InRange("--rank", rankValue, Limits.MaxLoraRank);
            SizeOptions.InRange("--batch", batchValue, Limits.MaxBatchSize);
            SizeOptions.InRange("--seq", seqValue, Limits.MaxSequenceLength);
            SizeOptions.Tokens(batchValue, seqValue);
            var targetList = parse.GetValue(targets)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            foreach (var t in targetList)
                if (!LoraSettings.KnownTargets.Contains(t))
                    throw new CliException($"--targets: unknown module \"{t}\"; known: {string.Join(", ", LoraSettings.KnownTargets)}", 2);
            long? memory = null;
            if (parse.GetValue(deviceMemory) is { } text)
                memory = ParseSize(text) ?? throw new CliException($"--device-memory {text}: expected a size such as 24GiB, 80GB, 512MiB or a number of bytes", 2);

            LlamaConfig config;
            try
            {
                config = PlanModels.Resolve(modelName);
            }
            catch (Exception e) when (e is ArgumentException or LlamaConfigException or FileNotFoundException or IOException or UnauthorizedAccessException)
            {
                throw new CliException("--model " + modelName + ": " + Clean(e), 1, e);
            }
            // The default 2048 is for the published models; a model with a shorter context (the built-in one: 256) gets
            // its own length, while a --seq given beyond it is refused.
            if (parse.GetResult(seq) is null or { Implicit: true }) seqValue = Math.Min(seqValue, config.MaxPositionEmbeddings);
            if (!parse.GetValue(generate)) SizeOptions.Sequence("--seq", seqValue, config);
            if (!parse.GetValue(generate))
            {
                if (parse.GetValue(maxLength) is not null) throw new CliException("--max-length is for --generate (training uses --seq)", 2);
                if (parse.GetValue(promptTokens) is not null) throw new CliException("--prompt-tokens is for --generate", 2);
                if (parse.GetValue(noAdapter)) throw new CliException("--no-adapter is for --generate", 2);
            }
            else
            {
                if (nprocValue > 1) throw new CliException("--nproc is for training plans, not --generate", 2);
                int length = parse.GetValue(maxLength) ?? seqValue;
                if (length <= 0) throw new CliException($"--max-length {length}: must be a positive integer", 2);
                SizeOptions.Sequence(parse.GetValue(maxLength) is null ? "--seq" : "--max-length", length, config);
                int prompt = parse.GetValue(promptTokens) ?? length;
                if (prompt <= 0 || prompt > length) throw new CliException($"--prompt-tokens {prompt}: must be in [1, --max-length {length}]", 2);
                string methodName = parse.GetValue(method)!;
                var inference = new InferencePlanOptions
                {
                    Mode = InferenceMode.Generate, PromptTokens = prompt, MaxNewTokens = length - prompt + 1,
                    Quantization = methodName == "qlora" ? BaseQuantization.Nf4 : BaseQuantization.None,
                    ComputeDType = bf16 ? DType.BF16 : DType.F32, BaseWeightDType = methodName == "lora" ? DType.BF16 : null,
                    LoraRank = methodName == "full" || parse.GetValue(noAdapter) ? null : rankValue, LoraTargets = targetList, Device = planDevice,
                };
                InferencePlan inferencePlan;
                try { inferencePlan = InferencePlan.Compute(config, inference); }
                catch (ArgumentException e) { throw new CliException(Clean(e), 2, e); }
                if (parse.GetValue(json)) stdout.WriteLine(inferencePlan.ToJson());
                else Print(stdout, modelName, inferencePlan);
                if (memory is { } im)
                {
                    if (inferencePlan.Fits(im)) stdout.WriteLine($"fits in {MemoryPlan.FormatBytes(im)} ({MemoryPlan.FormatBytes(im - inferencePlan.TotalBytes)} to spare)");
                    else
                    {
                        // The plan is printed; the answer to "does it fit?" is the exit status too (scripts check it).
                        stdout.WriteLine(inferencePlan.DoesNotFitMessage(im));
                        return 1;
                    }
                }
                return 0;
            }
            var planMethod = parse.GetValue(method) switch { "full" => FineTuneMethod.Full, "qlora" => FineTuneMethod.Qlora, _ => FineTuneMethod.Lora };
            bool embeddingOnHost = TrainCommand.ResolveEmbedding(parse.GetValue(embedding)!, planMethod, config.TieWordEmbeddings, planDevice == PlanDevice.Gpu);
            var options = new PlanOptions
            {
                Method = planMethod,
                EmbeddingOnHost = embeddingOnHost,
                Rank = rankValue, Alpha = parse.GetValue(alpha), Dropout = parse.GetValue(dropout), Targets = targetList, Batch = batchValue, Seq = seqValue,
                Recompute = parse.GetValue(recompute), Optimizer = parse.GetValue(optim)!, ComputeDType = bf16 ? DType.BF16 : DType.F32,
                Device = planDevice, CrossEntropyChunk = chunkValue, WorldSize = nprocValue,
            };
            MemoryPlan plan;
            try
            {
                plan = MemoryPlan.Compute(config, options);
            }
            catch (ArgumentException e)
            {
                throw new CliException(Clean(e), 2, e);
            }

            if (parse.GetValue(json))
            {
                stdout.WriteLine(plan.ToJson());
            }
            else
            {
                Print(stdout, modelName, plan);
            }
            if (memory is { } m)
            {
                if (plan.Fits(m)) stdout.WriteLine($"fits in {MemoryPlan.FormatBytes(m)} ({MemoryPlan.FormatBytes(m - plan.TotalBytes)} to spare)");
                else
                {
                    stdout.WriteLine(plan.DoesNotFitMessage(m));
                    return 1;  // a plan that does not fit is a failed check, also for scripts
                }
            }
            return 0;
        });
        return cmd;
    }

    private static void Print(TextWriter stdout, string modelName, MemoryPlan plan)
    {
        var o = plan.Options;
        var console = Output.Console(stdout);
        string setup = o.Method == FineTuneMethod.Full
            ? "full fine-tuning"
            : $"{o.Method.ToString().ToLowerInvariant()} r={o.Rank} on {string.Join(",", o.Targets)}";
        console.WriteLine(
            $"{modelName}: {plan.TotalParameterCount / 1e9:0.00} B parameters, {setup}; trainable {plan.TrainableParameterCount:N0} " +
            $"({100.0 * plan.TrainableParameterCount / plan.TotalParameterCount:0.###} %); batch {o.Batch} × seq {o.Seq}" +
            $"{(o.Recompute ? ", recompute" : "")}{(o.EmbeddingOnHost ? ", embedding on the host" : "")}, {o.Optimizer}, {o.ComputeDType.ToString().ToLowerInvariant()} compute on {(o.Device == PlanDevice.Gpu ? "a GPU" : "the CPU")}");
        var table = new Table().Border(TableBorder.Rounded).AddColumn("category").AddColumn(new TableColumn("bytes").RightAligned())
            .AddColumn(new TableColumn("size").RightAligned()).AddColumn(new TableColumn("GB (10⁹)").RightAligned());
        foreach (var (category, key, bytes) in plan.Rows())
        {
            string gb = (bytes / 1e9).ToString("0.000", CultureInfo.InvariantCulture);
            if (key == "total")
                table.AddRow("[bold]" + Markup.Escape(category) + "[/]", "[bold]" + bytes.ToString(CultureInfo.InvariantCulture) + "[/]",
                    "[bold]" + MemoryPlan.FormatBytes(bytes) + "[/]", "[bold]" + gb + "[/]");
            else
                table.AddRow(Markup.Escape(category), bytes.ToString(CultureInfo.InvariantCulture), MemoryPlan.FormatBytes(bytes), gb);
        }
        console.Write(table);
        console.WriteLine("Workspaces: dequantization scratch " + MemoryPlan.FormatBytes(plan.DequantScratchBytes) + ", RoPE tables " +
                          MemoryPlan.FormatBytes(plan.RopeTableBytes) + ", largest op workspace " + MemoryPlan.FormatBytes(plan.TransientWorkspaceBytes) +
                          (plan.OptimizerMapBytes > 0 ? ", 8-bit maps " + MemoryPlan.FormatBytes(plan.OptimizerMapBytes) : "") +
                          ". Paged optimizer state lives in host-backed managed memory and is not in the device total; " +
                          "the CUDA context and allocator rounding come on top.");
        if (o.WorldSize > 1)
            console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"Per GPU of {o.WorldSize} data-parallel ranks{(o.Method == FineTuneMethod.Full ? " (optimizer state sharded, ZeRO-1: the largest shard)" : "")}. " +
                $"Gradient all-reduce per step: {MemoryPlan.FormatBytes(plan.AllReduceBytes)}; ring traffic per rank, 2(N-1)/N of it: {MemoryPlan.FormatBytes(plan.RingTrafficBytesPerRank)}."));
    }

    private static void Print(TextWriter stdout, string modelName, InferencePlan plan)
    {
        var o = plan.Options;
        var console = Output.Console(stdout);
        string setup = (o.Quantization == BaseQuantization.None ? (o.BaseWeightDType ?? o.ComputeDType).ToString().ToLowerInvariant() + " base" : "nf4 base (double quant)")
                       + (o.LoraRank is { } r ? $", LoRA r={r} on {string.Join(",", o.LoraTargets)}" : ", no adapter");
        console.WriteLine(
            $"{modelName}: {plan.TotalParameterCount / 1e9:0.00} B parameters, generation with a KV cache of {o.MaxLength} tokens " +
            $"(prompt {o.PromptTokens}); {setup}; {o.ComputeDType.ToString().ToLowerInvariant()} compute on {(o.Device == PlanDevice.Gpu ? "a GPU" : "the CPU")}");
        var table = new Table().Border(TableBorder.Rounded).AddColumn("category").AddColumn(new TableColumn("bytes").RightAligned())
            .AddColumn(new TableColumn("size").RightAligned()).AddColumn(new TableColumn("GB (10⁹)").RightAligned());
        foreach (var (category, key, bytes) in plan.Rows())
        {
            string gb = (bytes / 1e9).ToString("0.000", CultureInfo.InvariantCulture);
            string B(string t) => key == "total" ? "[bold]" + t + "[/]" : t;
            table.AddRow(B(Markup.Escape(category)), B(bytes.ToString(CultureInfo.InvariantCulture)), B(MemoryPlan.FormatBytes(bytes)), B(gb));
        }
        console.Write(table);
        console.WriteLine("Workspaces: dequantization scratch " + MemoryPlan.FormatBytes(plan.DequantScratchBytes) + ", RoPE tables " +
                          MemoryPlan.FormatBytes(plan.RopeTableBytes) + ", the forward's workspace (prefill and decode) " +
                          MemoryPlan.FormatBytes(plan.ForwardWorkspaceBytes) + ". The CUDA context and cuBLAS' workspace come on top.");
    }

    /// <summary>The message without .NET's " (Parameter 'x')" and "Actual value was" suffixes.</summary>
    private static string Clean(Exception e)
    {
        string m = e.Message.Split('\n')[0].TrimEnd();
        int p = m.IndexOf(" (Parameter '", StringComparison.Ordinal);
        return p >= 0 ? m[..p] : m;
    }

    /// <summary>"24GiB", "80GB", "512 MiB", "1e9" or plain bytes; null when not a size.</summary>
    internal static long? ParseSize(string text)
    {
        string s = text.Trim().Replace(" ", "", StringComparison.Ordinal);
        (string Suffix, double Factor)[] units =
        [
            ("tib", 1L << 40), ("gib", 1L << 30), ("mib", 1L << 20), ("kib", 1L << 10),
            ("tb", 1e12), ("gb", 1e9), ("mb", 1e6), ("kb", 1e3), ("b", 1),
        ];
        double factor = 1;
        string lower = s.ToLowerInvariant();
        foreach (var (suffix, f) in units)
        {
            if (lower.EndsWith(suffix, StringComparison.Ordinal))
            {
                factor = f;
                s = s[..^suffix.Length];
                break;
            }
        }
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double value) || !(value > 0) || double.IsInfinity(value))
            return null;
        double bytes = value * factor;
        return bytes >= long.MaxValue ? null : (long)bytes;
    }
}
