using System.Diagnostics;
using System.Text.Encodings.Web;
using System.Text.Json;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NativePeft.Planning;
using NativePeft.Runtime;
using NativePeft.Training;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft bench --model tiny|small|llama3-1b|llama3-3b|llama3-8b|llama3-70b`: the training step of a random Llama
/// with full fine-tuning (fp32 master weights), LoRA (bf16-stored frozen base) and QLoRA (NF4, double quant) on one
/// device, timed in one run. A step is what `train` runs: forward, backward, gradient clipping (max norm 1.0) and the
/// AdamW update. Compute per --precision (bf16 by default on a GPU device, fp32 on cpu); the weights are made on the
/// device (<see cref="LlamaModel.CreateRandomTiled"/>); the share of the step spent in GEMMs and the per-op profile come
/// from one profiled step (ProfilingOps). Per method: the median step time, tokens/s, the pool's peak beside the plan's
/// estimate, the process's device memory seen by the driver (CUDA), and MFU against the device's dense bf16 peak
/// (<see cref="TrainingFlops"/>).
/// </summary>
internal static class ModelBench
{
    /// <summary>The --model names.</summary>
    public static readonly string[] ModelNames = ["tiny", "small", "llama3-1b", "llama3-3b", "llama3-8b", "llama3-70b"];

    /// <summary>The --method names.</summary>
    public static readonly string[] MethodNames = ["full", "lora", "qlora"];

    /// <summary>What a step consists of, on both sides of a peer comparison (tests/reference/train_peer.py times the same).</summary>
    public static string StepDescription(string optimizer = "adamw") =>
        $"forward + backward + clip grad norm 1.0 + {(optimizer == "adamw" ? "AdamW" : optimizer)} update (lr 2e-4, weight decay 0)";

    public sealed record Settings(string Device, string Model, string Precision = "auto", int? Layers = null, string? Method = null,
        int? Batch = null, int? Seq = null, int Rank = 16, bool Recompute = false, int? Steps = null, bool Profile = false,
        bool JsonRequested = false, string? JsonFile = null)
    {
        /// <summary>The step's optimizer (as train's --optim).</summary>
        public string Optimizer { get; init; } = "adamw";
        /// <summary>Where the frozen embedding lives (as train's --embedding: auto, host or device).</summary>
        public string Embedding { get; init; } = "auto";
        /// <summary>--device-memory in bytes: each method's plan is checked against it (null: the device's free memory).</summary>
        public long? DeviceMemory { get; init; }
    }

    public sealed record Row(string Method, string MethodId, double MsPerStep, double TokensPerSecond, double UsPerToken, double GemmShare,
        double RelativeToLora, long ParameterBytes, long ActivationBytes, long PeakBytes, long PlanBytes, long? DriverPeakBytes,
        double FlopsPerStep, double Tflops, double? Mfu, int TimedSteps, double Loss, IReadOnlyDictionary<string, double> ProfileMs,
        IReadOnlyDictionary<string, int> ProfileCalls);

    /// <summary>A model's config, default batch and sequence length, and default methods.</summary>
    public static (LlamaConfig Config, int Batch, int Seq, string[] Methods) Shape(string name)
    {
        string[] all = ["full", "lora", "qlora"];
        // Full fine-tuning of the Llama-3 shapes needs fp32 master weights, fp32 gradients and AdamW state (16 bytes a
        // parameter: 128 GB for 8B), more than one GPU holds: LoRA and QLoRA by default, full only when asked for.
        string[] peft = ["lora", "qlora"];
        // Llama 3.2 1B and 3B (config.json of meta-llama/Llama-3.2-1B and -3B): tied embeddings, llama3 rope scaling 32.
        var llama32 = LlamaConfig.Preset("llama3-8b") with
        {
            MaxPositionEmbeddings = 131072, RopeScaling = new Llama3RopeScaling(32.0, 1.0, 4.0, 8192), TieWordEmbeddings = true,
        };
        return name switch
        {
            "tiny" => (new LlamaConfig
            {
                HiddenSize = 256, IntermediateSize = 688, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 64,
                NumHiddenLayers = 4, VocabSize = 2048, MaxPositionEmbeddings = 1024, RmsNormEps = 1e-5, RopeTheta = 10000,
            }, 4, 128, all),
            "small" => (new LlamaConfig
            {
                HiddenSize = 512, IntermediateSize = 1376, NumAttentionHeads = 8, NumKeyValueHeads = 4, HeadDim = 64,
                NumHiddenLayers = 8, VocabSize = 8192, MaxPositionEmbeddings = 1024, RmsNormEps = 1e-5, RopeTheta = 10000,
            }, 4, 256, all),
            "llama3-1b" => (llama32 with { HiddenSize = 2048, IntermediateSize = 8192, NumHiddenLayers = 16, NumAttentionHeads = 32, HeadDim = 64 },
                4, 1024, peft),
            "llama3-3b" => (llama32 with { HiddenSize = 3072, IntermediateSize = 8192, NumHiddenLayers = 28, NumAttentionHeads = 24, HeadDim = 128 },
                4, 1024, peft),
            "llama3-8b" => (LlamaConfig.Preset("llama3-8b"), 4, 1024, peft),
            "llama3-70b" => (LlamaConfig.Preset("llama3-70b"), 4, 1024, peft),
            _ => throw new CliException($"--model {name}: expected one of {string.Join(", ", ModelNames)}", 2),
        };
    }

    public static int Run(TextWriter stdout, Settings s)
    {
        var (fullConfig, defaultBatch, defaultSeq, defaultMethods) = Shape(s.Model);
        if (s.Layers is { } layers && (layers < 1 || layers > fullConfig.NumHiddenLayers))
            throw new CliException($"--layers {layers}: expected 1 to {fullConfig.NumHiddenLayers} (the layers of {s.Model})", 2);
        var config = fullConfig with { NumHiddenLayers = s.Layers ?? fullConfig.NumHiddenLayers };
        int batch = s.Batch ?? defaultBatch, seq = s.Seq ?? defaultSeq;
        if (batch < 1) throw new CliException($"--batch {batch}: expected a positive batch size", 2);
        if (seq < 2 || seq > config.MaxPositionEmbeddings)
            throw new CliException($"--seq {seq}: expected 2 to {config.MaxPositionEmbeddings} (max_position_embeddings of {s.Model})", 2);
        if (s.Rank < 1) throw new CliException($"--rank {s.Rank}: expected a positive LoRA rank", 2);
        SizeOptions.InRange("--batch", batch, Limits.MaxBatchSize);
        SizeOptions.InRange("--rank", s.Rank, Limits.MaxLoraRank);
        SizeOptions.Tokens(batch, seq);
        if (s.Steps is < 1) throw new CliException($"--steps {s.Steps}: expected a positive number of timed steps", 2);
        string[] methodIds = s.Method is null ? defaultMethods
            : MethodNames.Contains(s.Method) ? [s.Method]
            : throw new CliException($"--method {s.Method}: expected one of {string.Join(", ", MethodNames)}", 2);

        var computeDType = DeviceOption.ComputeDType(s.Precision, s.Device);
        var gpu = DeviceOption.Open(s.Device == "auto" ? "auto" : s.Device);
        using var _gpu = gpu;
        string opsName = gpu?.Properties.Name ?? "CPU reference";
        bool cuda = gpu?.Properties.Kind == GpuKind.Cuda;
        string deviceKind = gpu is null ? "cpu" : cuda ? "cuda" : "emulator";
        double? peakTflops = cuda ? TrainingFlops.PeakTflops(opsName) : null;
        long? deviceTotal = cuda ? gpu!.MemoryInfo().Total : null;
        bool llama3 = s.Model.StartsWith("llama3", StringComparison.Ordinal);
        double budgetSeconds = llama3 ? 10 : 3;

        var lora = new LoraSettings { Rank = s.Rank, Alpha = 2 * s.Rank, TargetModules = LoraSettings.KnownTargets };
        LlamaModelOptions Options(string id) => (id switch
        {
            "full" => new LlamaModelOptions { FullFineTuning = true },
            "lora" => new LlamaModelOptions { Lora = lora, BaseWeightDType = DType.BF16 },
            _ => new LlamaModelOptions { Lora = lora, Quantization = BaseQuantization.Nf4, DoubleQuant = true },
        }) with { ComputeDType = computeDType, Recompute = s.Recompute, EmbeddingOnHost = EmbeddingOnHost(id) };
        bool EmbeddingOnHost(string id)
        {
            var m = id switch { "full" => FineTuneMethod.Full, "lora" => FineTuneMethod.Lora, _ => FineTuneMethod.Qlora };
            return TrainCommand.ResolveEmbedding(s.Embedding, m, config.TieWordEmbeddings, gpu is not null);
        }
        string Label(string id) => id switch
        {
            "full" => "full",
            "lora" => $"lora r={s.Rank} (bf16 base)",
            _ => $"qlora r={s.Rank} (nf4)",
        };

        var rng = new Random(0);
        var ids = Enumerable.Range(0, batch * seq).Select(_ => rng.Next(config.VocabSize)).ToArray();
        var rows = new List<Row>();
        var skipped = new List<(string MethodId, string Reason)>();
        foreach (var id in methodIds)
        {
            var options = Options(id);
            var plan = DevicePlanning.Training(config, options, batch, seq, s.Optimizer, clipGradients: true,
                device: gpu is null ? PlanDevice.Cpu : PlanDevice.Gpu);
            // The driver's view (CUDA): free memory before this method's pool and model, and the least seen after.
            long? freeBefore = cuda ? gpu!.MemoryInfo().Free : null;
            long minFree = freeBefore ?? 0;
            void SampleDriver() { if (freeBefore is not null) minFree = Math.Min(minFree, gpu!.MemoryInfo().Free); }
            IOps baseOps;
            if (gpu is null) baseOps = new CpuOps();
            else
            {
                // On a GPU device each method runs on a memory pool sized from its training plan (DevicePlanning, as
                // train does), checked against CUDA's free memory.
                // A method that does not fit is skipped (its reason printed) while another may run: llama3-70b's QLoRA
                // fits one large GPU where its LoRA does not.
                DevicePool pool;
                try { pool = DevicePlanning.TrainingPool(gpu, plan, s.DeviceMemory); }
                catch (PlanDoesNotFitException e)
                {
                    skipped.Add((id, $"--device {s.Device}: {Label(id)} of {s.Model} ({config.NumHiddenLayers} layers, {batch} x {seq}) {e.Message}"));
                    continue;
                }
                baseOps = new GpuOps(gpu, ownsGpu: false, memory: pool);
            }
            using var ops = baseOps;
            using var profiler = new ProfilingOps(ops);
            using var model = LlamaModel.CreateRandomTiled(config, profiler, options, weightSeed: 1);
            using var optimizer = OptimizerFactory.Create(s.Optimizer, ops, new AdamWOptions { WeightDecay = 0 });
            var grads = model.TrainableParameters.Select(t => t.Grad).ToList();
            double Step(bool sync)
            {
                double loss = model.Forward(ids, ids, batch, seq);
                model.ZeroGrad();
                model.Backward();
                double clip = GradientClipping.ClipCoefficient(GradientClipping.GlobalNorm(ops, grads), 1.0);
                optimizer.Step(model.TrainableParameters, 2e-4, clip);
                model.RefreshWorkingWeights();
                if (sync) gpu?.Synchronize();
                return loss;
            }
            SampleDriver();
            double loss = Step(sync: true);                                    // warm-up (creates the optimizer state)
            SampleDriver();
            profiler.Reset();
            // Profiled: where the time goes (the profiler synchronizes after each op; the update is timed as a whole).
            model.Forward(ids, ids, batch, seq);
            model.ZeroGrad();
            model.Backward();
            var update = Stopwatch.StartNew();
            optimizer.Step(model.TrainableParameters, 2e-4, GradientClipping.ClipCoefficient(GradientClipping.GlobalNorm(ops, grads), 1.0));
            model.RefreshWorkingWeights();
            gpu?.Synchronize();
            double updateMs = update.Elapsed.TotalMilliseconds;
            var profileMs = profiler.Totals.ToDictionary(kv => kv.Key, kv => kv.Value.Ms);
            var profileCalls = profiler.Totals.ToDictionary(kv => kv.Key, kv => kv.Value.Calls);
            profileMs["clip + AdamW update"] = updateMs;
            double gemm = profiler.Totals.TryGetValue("Matmul", out var m) ? m.Ms : 0;
            double share = gemm / Math.Max(1e-9, profiler.TotalMs + updateMs);
            var times = new List<double>();
            var clock = Stopwatch.StartNew();
            while (s.Steps is { } n ? times.Count < n : times.Count < 3 || (clock.Elapsed.TotalSeconds < budgetSeconds && times.Count < 20))
            {
                var sw = Stopwatch.StartNew();
                Step(sync: true);
                times.Add(sw.Elapsed.TotalMilliseconds);
                SampleDriver();
            }
            times.Sort();
            double ms = times[times.Count / 2];
            double flops = TrainingFlops.PerStep(config, batch, seq, id == "full" ? null : s.Rank, lora.TargetModules);
            double tflops = flops / (ms * 1e-3) / 1e12;
            rows.Add(new Row(Label(id), id, ms, batch * seq / (ms * 1e-3), ms * 1e3 / (batch * seq), share, 0,
                model.ParameterBytes, model.ActivationBytes, ops.Memory.PeakAllocatedBytes, plan.TotalBytes,
                freeBefore is { } before ? before - minFree : null, flops, tflops, peakTflops is { } peak ? tflops / peak : null,
                times.Count, loss, profileMs, profileCalls));
        }
        if (rows.Count == 0) throw new CliException(string.Join("; ", skipped.Select(x => x.Reason)));
        if (rows.FirstOrDefault(r => r.MethodId == "lora") is { } loraRow)
            rows = rows.Select(r => r with { RelativeToLora = r.MsPerStep / loraRow.MsPerStep }).ToList();

        string layersText = config.NumHiddenLayers == fullConfig.NumHiddenLayers ? $"{config.NumHiddenLayers} layers" : $"{config.NumHiddenLayers} of {fullConfig.NumHiddenLayers} layers";
        string title = $"training step of a random Llama ({s.Model}: hidden {config.HiddenSize}, {layersText}, " +
                       $"vocab {config.VocabSize}; batch {batch} x {seq} tokens{(s.Recompute ? ", recompute" : "")}) on {opsName}, " +
                       $"{computeDType.ToString().ToLowerInvariant()} compute";
        var report = new
        {
            title, model = s.Model, device = opsName, device_kind = deviceKind, device_total_bytes = deviceTotal, layers = config.NumHiddenLayers,
            parameters = config.ParameterCount(), batch, seq, tokens_per_step = batch * seq, rank = s.Rank, alpha = 2 * s.Rank,
            targets = lora.TargetModules, recompute = s.Recompute, compute_dtype = computeDType.ToString().ToLowerInvariant(),
            step = StepDescription(s.Optimizer), optimizer = s.Optimizer, embedding_on_host = methodIds.ToDictionary(i => i, EmbeddingOnHost), flop_convention = TrainingFlops.Convention, peak_tflops = peakTflops, rows,
            skipped = skipped.Select(x => new { method_id = x.MethodId, reason = x.Reason }).ToList(),
        };
        string jsonText = JsonSerializer.Serialize(report, new JsonSerializerOptions
        {
            WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
        });
        if (s.JsonRequested && s.JsonFile is null)
        {
            stdout.WriteLine(jsonText);
            return 0;
        }
        if (s.JsonFile is not null)
        {
            try { NativePeft.IO.OutputFolder.WriteAllTextAtomic(s.JsonFile, jsonText + "\n"); }
            catch (Exception e) when (NativePeft.IO.OutputFolder.IsWriteFailure(e)) { throw NativePeft.IO.OutputFolder.WriteFailed(s.JsonFile, e); }
        }
        var console = Output.Console(stdout);
        var table = new Table().Border(TableBorder.Rounded).Title(Markup.Escape(title))
            .AddColumn("method").AddColumn(new TableColumn("ms / step").RightAligned()).AddColumn(new TableColumn("tokens/s").RightAligned())
            .AddColumn(new TableColumn("µs / token").RightAligned()).AddColumn(new TableColumn("in GEMMs").RightAligned())
            .AddColumn(new TableColumn("step vs LoRA").RightAligned()).AddColumn(new TableColumn("parameters").RightAligned())
            .AddColumn(new TableColumn("activations").RightAligned()).AddColumn(new TableColumn("peak").RightAligned())
            .AddColumn(new TableColumn("plan").RightAligned()).AddColumn(new TableColumn("driver").RightAligned())
            .AddColumn(new TableColumn("TFLOP/s").RightAligned()).AddColumn(new TableColumn("MFU").RightAligned());
        foreach (var r in rows)
            table.AddRow(Markup.Escape(r.Method), r.MsPerStep.ToString("0.0"), r.TokensPerSecond.ToString("N0"), r.UsPerToken.ToString("0.0"),
                r.GemmShare.ToString("P0"), r.RelativeToLora > 0 ? r.RelativeToLora.ToString("0.00") + "x" : "", Output.Bytes(r.ParameterBytes),
                Output.Bytes(r.ActivationBytes), Output.Bytes(r.PeakBytes), Output.Bytes(r.PlanBytes),
                r.DriverPeakBytes is { } d ? Output.Bytes(d) : "n/a", r.Tflops.ToString(r.Tflops < 10 ? "0.000" : "0.0"),
                r.Mfu is { } mfu ? mfu.ToString("P1") : "unknown peak");
        console.Write(table);
        stdout.WriteLine($"step: {StepDescription(s.Optimizer)}; median of the timed steps ({string.Join(", ", rows.Select(r => $"{r.MethodId} {r.TimedSteps}"))}) after one warm-up and one profiled step");
        stdout.WriteLine($"FLOP convention: {TrainingFlops.Convention}");
        stdout.WriteLine(peakTflops is { } p
            ? $"MFU: TFLOP/s over the dense bf16 peak of {opsName}, {p:0.#} TFLOP/s"
            : $"MFU: unknown peak for {opsName} (known: {string.Join(", ", TrainingFlops.KnownPeaks.Where(k => k.Tflops is not null).Select(k => $"{k.NameContains} {k.Tflops}"))})");
        stdout.WriteLine("peak: the pool's peak (allocated tensors); plan: the training plan the pool is sized from; " +
                         (deviceKind == "cuda" ? "driver: CUDA free memory before the method's pool and model less the least seen during its steps (pool, cuBLAS workspace; not the context)"
                                               : "driver: n/a (no CUDA driver)"));
        foreach (var (id, reason) in skipped) stdout.WriteLine($"{id}: not run, {reason}");
        if (s.JsonFile is not null) stdout.WriteLine($"wrote {s.JsonFile}");
        if (s.Profile)
        {
            var ops2 = new Table().Border(TableBorder.Rounded).Title("one profiled step: milliseconds per op (calls) (device synchronized after each)")
                .AddColumn("op");
            foreach (var r in rows) ops2.AddColumn(new TableColumn(Markup.Escape(r.Method)).RightAligned());
            foreach (var op in rows.SelectMany(r => r.ProfileMs.Keys).Distinct().OrderByDescending(o => rows.Max(r => r.ProfileMs.GetValueOrDefault(o))))
                ops2.AddRow([Markup.Escape(op), .. rows.Select(r => r.ProfileMs.TryGetValue(op, out var v)
                    ? v.ToString("0.0") + (r.ProfileCalls.TryGetValue(op, out var c) ? $" ({c})" : "") : "")]);
            console.Write(ops2);
        }
        return 0;
    }
}
