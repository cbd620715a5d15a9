using System.Diagnostics;
using System.Text.Json;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Planning;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft bench --model tiny|small`: the training step (forward + backward) of a random Llama with full
/// fine-tuning (fp32 weights), LoRA (bf16-stored frozen base) and QLoRA (NF4, double quant) on one device, timed in
/// one run; compute per --precision (bf16 by default on a GPU device, fp32 on cpu); the share of the step spent in
/// GEMMs comes from a profiled step (ProfilingOps).
/// </summary>
internal static class ModelBench
{
    public sealed record Row(string Method, double MsPerStep, double TokensPerSecond, double UsPerToken, double GemmShare,
        double RelativeToLora, long ParameterBytes, long ActivationBytes, long PeakBytes, double Loss,
        IReadOnlyDictionary<string, double> ProfileMs);

    public static (LlamaConfig Config, int Batch, int Seq) Shape(string size) => size switch
    {
        "tiny" => (new LlamaConfig
        {
            HiddenSize = 256, IntermediateSize = 688, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 64,
            NumHiddenLayers = 4, VocabSize = 2048, MaxPositionEmbeddings = 1024, RmsNormEps = 1e-5, RopeTheta = 10000,
        }, 4, 128),
        _ => (new LlamaConfig
        {
            HiddenSize = 512, IntermediateSize = 1376, NumAttentionHeads = 8, NumKeyValueHeads = 4, HeadDim = 64,
            NumHiddenLayers = 8, VocabSize = 8192, MaxPositionEmbeddings = 1024, RmsNormEps = 1e-5, RopeTheta = 10000,
        }, 4, 256),
    };

    public static int Run(TextWriter stdout, string device, string size, bool json, bool profile = false, string precision = "auto")
    {
        var computeDType = DeviceOption.ComputeDType(precision, device);
        var (config, batch, seq) = Shape(size);
        var gpu = DeviceOption.Open(device == "auto" ? "auto" : device);
        using var _gpu = gpu;
        string opsName = gpu?.Properties.Name ?? "CPU reference";
        // On a GPU device each method runs on a memory pool sized from its training plan (DevicePlanning, as train does;
        // the bench steps run no optimizer, so the pool's AdamW share stays unused), checked against CUDA's free memory.
        IOps OpsFor(LlamaModelOptions options)
        {
            if (gpu is null) return new CpuOps();
            var plan = DevicePlanning.Training(config, options, batch, seq, "adamw", clipGradients: false);
            if (DevicePlanning.CheckFreeMemory(gpu, plan.DoesNotFitMessage) is { } message)
                throw new CliException($"--device {device}: the {size} model's training step {message}");
            return new GpuOps(gpu, ownsGpu: false, memory: DevicePool.ForGpu(gpu, plan));
        }
        var lora = new LoraSettings { Rank = 16, Alpha = 32, TargetModules = LoraSettings.KnownTargets };
        var methods = new (string Name, LlamaModelOptions Options)[]
        {
            ("full", new LlamaModelOptions { FullFineTuning = true }),
            ("lora r=16 (bf16 base)", new LlamaModelOptions { Lora = lora, BaseWeightDType = NativePeft.Numerics.DType.BF16 }),
            ("qlora r=16 (nf4)", new LlamaModelOptions { Lora = lora, Quantization = BaseQuantization.Nf4, DoubleQuant = true }),
        };
        var rng = new Random(0);
        var ids = Enumerable.Range(0, batch * seq).Select(_ => rng.Next(config.VocabSize)).ToArray();
        var rows = new List<Row>();
        foreach (var (name, plainOptions) in methods)
        {
            var options = plainOptions with { ComputeDType = computeDType };
            using var ops = OpsFor(options);
            using var profiler = new ProfilingOps(ops);
            using var model = LlamaModel.CreateRandom(config, profiler, options, weightSeed: 1);
            double loss = Step(model, ids, batch, seq);                      // warm-up
            profiler.Reset();
            Step(model, ids, batch, seq);                                      // profiled: where the time goes
            double gemm = profiler.Totals.TryGetValue("Matmul", out var m) ? m.Ms : 0;
            double share = gemm / Math.Max(1e-9, profiler.TotalMs);
            var profileMs = profiler.Totals.ToDictionary(kv => kv.Key, kv => kv.Value.Ms);
            var times = new List<double>();
            var clock = Stopwatch.StartNew();
            while (times.Count < 3 || (clock.Elapsed.TotalSeconds < 3 && times.Count < 20))
            {
                var sw = Stopwatch.StartNew();
                Step(model, ids, batch, seq);
                if (gpu is not null) gpu.Synchronize();
                times.Add(sw.Elapsed.TotalMilliseconds);
            }
            times.Sort();
            double ms = times[times.Count / 2];
            rows.Add(new Row(name, ms, batch * seq / (ms * 1e-3), ms * 1e3 / (batch * seq), share, 0,
                model.ParameterBytes, model.ActivationBytes, ops.Memory.PeakAllocatedBytes, loss,
                profileMs));
        }
        double loraMs = rows.First(r => r.Method.StartsWith("lora", StringComparison.Ordinal)).MsPerStep;
        rows = rows.Select(r => r with { RelativeToLora = r.MsPerStep / loraMs }).ToList();

        string title = $"training step of a random Llama ({size}: hidden {config.HiddenSize}, {config.NumHiddenLayers} layers, " +
                       $"vocab {config.VocabSize}; batch {batch} x {seq} tokens) on {opsName}, {computeDType.ToString().ToLowerInvariant()} compute";
        if (json)
        {
            stdout.WriteLine(JsonSerializer.Serialize(new { title, rows },
                new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower }));
            return 0;
        }
        var console = Output.Console(stdout);
        var table = new Table().Border(TableBorder.Rounded).Title(Markup.Escape(title))
            .AddColumn("method").AddColumn(new TableColumn("ms / step").RightAligned()).AddColumn(new TableColumn("tokens/s").RightAligned())
            .AddColumn(new TableColumn("µs / token").RightAligned()).AddColumn(new TableColumn("in GEMMs").RightAligned())
            .AddColumn(new TableColumn("step vs LoRA").RightAligned()).AddColumn(new TableColumn("parameters").RightAligned())
            .AddColumn(new TableColumn("activations").RightAligned()).AddColumn(new TableColumn("peak").RightAligned());
        foreach (var r in rows)
            table.AddRow(Markup.Escape(r.Method), r.MsPerStep.ToString("0.0"), r.TokensPerSecond.ToString("N0"), r.UsPerToken.ToString("0.0"),
                r.GemmShare.ToString("P0"), r.RelativeToLora.ToString("0.00") + "x", Output.Bytes(r.ParameterBytes),
                Output.Bytes(r.ActivationBytes), Output.Bytes(r.PeakBytes));
        console.Write(table);
        if (profile)
        {
            var ops2 = new Table().Border(TableBorder.Rounded).Title("one profiled step: milliseconds per op (device synchronized after each)")
                .AddColumn("op");
            foreach (var r in rows) ops2.AddColumn(new TableColumn(Markup.Escape(r.Method)).RightAligned());
            foreach (var op in rows.SelectMany(r => r.ProfileMs.Keys).Distinct().OrderByDescending(o => rows.Max(r => r.ProfileMs.GetValueOrDefault(o))))
                ops2.AddRow([op, .. rows.Select(r => r.ProfileMs.TryGetValue(op, out var v) ? v.ToString("0.0") : "")]);
            console.Write(ops2);
        }
        return 0;
    }

    private static double Step(LlamaModel model, int[] ids, int batch, int seq)
    {
        double loss = model.Forward(ids, ids, batch, seq);
        model.ZeroGrad();
        model.Backward();
        return loss;
    }
}
