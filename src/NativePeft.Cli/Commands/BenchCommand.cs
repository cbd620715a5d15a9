using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Runtime;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft bench`: the 4-bit kernels' throughput on one device, each against the limit measured in the same
/// run: a device-to-device copy of the bf16 tensor (the memory-bandwidth ceiling those kernels work under).
/// `--op attention`: causal GQA attention forward, backward and decode instead (<see cref="AttentionBench"/>).
/// `--op lora`: the fused LoRA kernels against the op sequence they replace (<see cref="LoraBench"/>).
/// </summary>
public static class BenchCommand
{
    public sealed record Row(string Op, string Shape, double Ms, double GBps, double OfCopy);

    /// <summary>A transformer op: its rate in <paramref name="Unit"/> and as a share of the same run's limit (GEMM TFLOP/s or copy GB/s).</summary>
    public sealed record OpRow(string Op, string Shape, double Ms, double Rate, string Unit, double OfLimit);

    public static Command Create(TextWriter stdout)
    {
        var device = DeviceOption.Create("auto", "auto|cuda|emulator, or cpu for the C# reference");
        var elements = new Option<long>("--elements") { Description = "tensor size (default: 64M on CUDA, 16M on CPU, 4M on the emulator)" };
        var json = new Option<string>("--json")
        {
            Description = "print the rows as JSON; with FILE (--op attention, --model), write them there and print the table",
            HelpName = "FILE",
            Arity = ArgumentArity.ZeroOrOne,
        };
        var op = new Option<string>("--op")
        {
            Description = "kernels: the 4-bit kernels and transformer ops; attention: causal GQA attention forward, backward and decode; " +
                          "lora: the fused LoRA kernels against the op sequence they replace (q/k/v shape)",
            DefaultValueFactory = _ => "kernels",
            HelpName = "kernels|attention|lora",
        };
        op.Validators.Add(r =>
        {
            if (r.Tokens.Count > 0 && r.Tokens[^1].Value is not ("kernels" or "attention" or "lora"))
                r.AddError($"--op {r.Tokens[^1].Value}: expected kernels, attention or lora");
        });
        var seq = new Option<int[]>("--seq") { Description = "--op attention: sequence length(s) instead of the defaults; --model: one sequence length", AllowMultipleArgumentsPerToken = true };
        var batch = new Option<int[]>("--batch") { Description = "--op attention: batch size(s) instead of the defaults; --model: one batch size", AllowMultipleArgumentsPerToken = true };
        var heads = new Option<int?>("--heads") { Description = "--op attention: query heads (default 32 on CUDA, 4 elsewhere)" };
        var kvHeads = new Option<int?>("--kv-heads") { Description = "--op attention: key/value heads (default 8 on CUDA, 1 elsewhere)" };
        var headDim = new Option<int?>("--head-dim") { Description = "--op attention: head dimension (default 128)" };
        var model = new Option<string>("--model")
        {
            Description = "instead of the kernels, time a training step (forward, backward, clipping, AdamW) of a random Llama of this shape " +
                          "(llama3-*: the published Llama 3 / 3.2 configs; default batch 4 x 1024)",
            HelpName = string.Join("|", ModelBench.ModelNames),
        };
        model.AcceptOnlyFromAmong(ModelBench.ModelNames);
        var layers = new Option<int?>("--layers") { Description = "--model: keep only the first N layers of the model", HelpName = "N" };
        var method = new Option<string>("--method")
        {
            Description = "--model: one method (default: full, lora and qlora for tiny and small; lora and qlora for llama3-*, whose full fine-tuning does not fit one GPU)",
            HelpName = string.Join("|", ModelBench.MethodNames),
        };
        method.AcceptOnlyFromAmong(ModelBench.MethodNames);
        var rank = new Option<int?>("--rank") { Description = "--model: LoRA rank (default 16; alpha 2 x rank; all 7 projections targeted)", HelpName = "R" };
        var recompute = new Option<bool>("--recompute") { Description = "--model: recompute each block's activations in its backward (as train --recompute)" };
        var steps = new Option<int?>("--steps")
        {
            Description = "--model: timed steps per method (default: at least 3, then more up to 20 within a time budget of 3 s, 10 s for llama3-*)",
            HelpName = "N",
        };
        var precision = DeviceOption.CreatePrecision();
        var profile = new Option<bool>("--profile") { Description = "with --model: also print where one step's time goes, by op" };
        var optim = new Option<string>("--optim") { Description = "--model: the optimizer of the step (as train --optim)", DefaultValueFactory = _ => "adamw" };
        optim.AcceptOnlyFromAmong([.. NativePeft.Optim.OptimizerFactory.Names]);
        var embedding = TrainCommand.EmbeddingOption();
        embedding.Description = "--model: " + embedding.Description;
        var deviceMemory = DeviceOption.CreateMemory();
        deviceMemory.Description = "--model: " + deviceMemory.Description + " (a method that does not fit is skipped, with the reason)";
        var cmd = new Command("bench", "Benchmark the 4-bit kernels against a copy of the same bytes, attention (--op attention), or a model's training step")
        {
            device, elements, json, op, seq, batch, heads, kvHeads, headDim, model, layers, method, rank, recompute, steps, profile, precision,
            optim, embedding, deviceMemory,
        };
        cmd.SetAction(parse =>
        {
            var deviceName = parse.GetValue(device)!;
            bool jsonRequested = parse.GetResult(json) is { Implicit: false };
            string? jsonFile = parse.GetValue(json) is { Length: > 0 } f ? f : null;
            bool attention = parse.GetValue(op) == "attention";
            string? modelName = parse.GetValue(model);
            bool Given(Option o) => parse.GetResult(o) is { Implicit: false };
            foreach (var shapeOption in new Option[] { heads, kvHeads, headDim })
                if (!attention && Given(shapeOption))
                    throw new CliException($"{shapeOption.Name}: only with --op attention", 2);
            foreach (var shapeOption in new Option[] { seq, batch })
                if (!attention && modelName is null && Given(shapeOption))
                    throw new CliException($"{shapeOption.Name}: only with --op attention or --model", 2);
            foreach (var modelOption in new Option[] { layers, method, rank, recompute, steps, optim, embedding, profile, deviceMemory })
                if (modelName is null && Given(modelOption))
                    throw new CliException($"{modelOption.Name}: only with --model", 2);
            if (attention)
            {
                if (modelName is not null) throw new CliException("--model: not with --op attention (a training step is its own benchmark)", 2);
                return AttentionBench.Run(stdout, deviceName,
                    new AttentionBench.Overrides(NullIfEmpty(parse.GetValue(seq)), NullIfEmpty(parse.GetValue(batch)), parse.GetValue(heads), parse.GetValue(kvHeads), parse.GetValue(headDim)),
                    jsonRequested, jsonFile);
            }
            if (parse.GetValue(op) == "lora")
            {
                if (modelName is not null) throw new CliException("--model: not with --op lora", 2);
                if (jsonFile is not null) throw new CliException($"--json {jsonFile}: a file only with --op attention or --model (print with --json alone)", 2);
                return LoraBench.Run(stdout, deviceName, jsonRequested);
            }
            if (modelName is not null)
            {
                int? One(Option<int[]> o) => parse.GetValue(o) is { Length: > 0 } v
                    ? v.Length == 1 ? v[0] : throw new CliException($"{o.Name} {string.Join(" ", v)}: one value with --model (several only with --op attention)", 2)
                    : null;
                return ModelBench.Run(stdout, new ModelBench.Settings(deviceName, modelName, parse.GetValue(precision)!, parse.GetValue(layers),
                    parse.GetValue(method), One(batch), One(seq), parse.GetValue(rank) ?? 16, parse.GetValue(recompute), parse.GetValue(steps),
                    parse.GetValue(profile), jsonRequested, jsonFile) { Optimizer = parse.GetValue(optim)!, Embedding = parse.GetValue(embedding)!,
                        DeviceMemory = DeviceOption.Memory(parse.GetValue(deviceMemory), deviceName) });
            }
            if (jsonFile is not null) throw new CliException($"--json {jsonFile}: a file only with --op attention or --model (print with --json alone)", 2);
            long n = parse.GetValue(elements);
            List<Row> rows;
            List<OpRow> opRows = [];
            string where;
            if (deviceName == "cpu")
            {
                n = n > 0 ? n : 16L << 20;
                rows = RunCpu(n);
                where = $"CPU reference ({Environment.ProcessorCount} cores)";
            }
            else
            {
                using var gpu = DeviceOption.Open(deviceName)!;
                n = n > 0 ? n : gpu.Properties.Kind == GpuKind.Cuda ? 64L << 20 : 4L << 20;
                rows = RunGpu(gpu, n);
                opRows = RunTransformerOps(gpu, rows[0].GBps);
                where = gpu.Properties.Name;
            }
            if (jsonRequested)
            {
                stdout.WriteLine(JsonSerializer.Serialize(new { device = where, elements = n, rows, transformer_ops = opRows },
                    new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower }));
                return 0;
            }
            var console = Output.Console(stdout);
            var table = new Table().Border(TableBorder.Rounded).Title(Markup.Escape($"4-bit kernels on {where}, n = {n:N0}, blocksize 64"))
                .AddColumn("op").AddColumn("shape").AddColumn(new TableColumn("ms").RightAligned())
                .AddColumn(new TableColumn("GB/s").RightAligned()).AddColumn(new TableColumn("of copy GB/s").RightAligned());
            foreach (var r in rows)
                table.AddRow(r.Op, r.Shape, r.Ms.ToString("0.000"), r.GBps.ToString("0.0"), r.OfCopy.ToString("P0"));
            console.Write(table);
            if (opRows.Count > 0)
            {
                var ops = new Table().Border(TableBorder.Rounded).Title(Markup.Escape($"transformer ops on {where} (GpuOps)"))
                    .AddColumn("op").AddColumn("shape").AddColumn(new TableColumn("ms").RightAligned())
                    .AddColumn(new TableColumn("rate").RightAligned()).AddColumn(new TableColumn("of limit").RightAligned());
                foreach (var r in opRows)
                    ops.AddRow(Markup.Escape(r.Op), Markup.Escape(r.Shape), r.Ms.ToString("0.000"), $"{r.Rate:0.00} {r.Unit}", r.OfLimit.ToString("P0"));
                console.Write(ops);
            }
            return 0;
        });
        return cmd;
    }

    private static int[]? NullIfEmpty(int[]? values) => values is { Length: > 0 } ? values : null;

    /// <summary>
    /// The model's ops through GpuOps at a Llama-like layer shape (CUDA: tokens 4096, hidden 4096, 32/8 heads of 128;
    /// the emulator: a scaled-down shape). Compute-bound ops are compared with the same run's GEMM TFLOP/s, memory-bound
    /// ones with its copy GB/s.
    /// </summary>
    private static List<OpRow> RunTransformerOps(IGpu gpu, double copyGBps)
    {
        bool cuda = gpu.Properties.Kind == GpuKind.Cuda;
        var dtype = cuda ? DType.BF16 : DType.F32;
        int batch = 1, seq = cuda ? 4096 : 128, hidden = cuda ? 4096 : 256, hq = cuda ? 32 : 4, hkv = cuda ? 8 : 2, d = hidden / hq, vocab = cuda ? 32000 : 1000;
        int tokens = batch * seq, kvDim = hkv * d;
        using var ops = new GpuOps(gpu);
        var rows = new List<OpRow>();
        var x = ops.Memory.Allocate(dtype, tokens, hidden);
        var w = ops.Memory.Allocate(dtype, hidden, hidden);
        var y = ops.Memory.Allocate(dtype, tokens, hidden);
        ops.Fill(x, 0.01); ops.Fill(w, 0.01);
        string s = $"{dtype} [{tokens}, {hidden}]";
        double gemmMs = Time(() => ops.Matmul(x, false, w, true, y), gpu.Synchronize);
        double gemmTflops = 2.0 * tokens * hidden * hidden / (gemmMs * 1e-3) / 1e12;
        rows.Add(new OpRow("Matmul x·Wᵀ (the limit)", $"{s} x [{hidden}, {hidden}]ᵀ", gemmMs, gemmTflops, "TFLOP/s", 1));

        var weight = ops.Memory.Allocate(dtype, hidden);
        var rstd = ops.Memory.Allocate(DType.F32, tokens);
        ops.Fill(weight, 1);
        double normMs = Time(() => ops.RmsNormForward(x, weight, y, rstd, 1e-5), gpu.Synchronize);
        double normBytes = 2.0 * tokens * hidden * dtype.ElementSize();
        rows.Add(new OpRow("RmsNormForward", s, normMs, normBytes / (normMs * 1e-3) / 1e9, "GB/s", normBytes / (normMs * 1e-3) / 1e9 / copyGBps));

        var k = ops.Memory.Allocate(dtype, tokens, kvDim);
        var v = ops.Memory.Allocate(dtype, tokens, kvDim);
        var lse = ops.Memory.Allocate(DType.F32, batch, hq, seq);
        ops.Fill(k, 0.01); ops.Fill(v, 0.01);
        double attnFlops = 4.0 * batch * hq * d * seq * (seq + 1) / 2.0; // causal: QKᵀ and PV over the lower triangle
        double fwdMs = Time(() => ops.AttentionForward(x, k, v, y, lse, batch, seq, hq, hkv, d), gpu.Synchronize);
        rows.Add(new OpRow("AttentionForward (causal GQA)", $"{dtype} T={seq} Hq={hq} Hkv={hkv} D={d}", fwdMs,
            attnFlops / (fwdMs * 1e-3) / 1e12, "TFLOP/s", attnFlops / (fwdMs * 1e-3) / 1e12 / gemmTflops));
        var dq = ops.Memory.Allocate(dtype, tokens, hidden);
        var dk = ops.Memory.Allocate(dtype, tokens, kvDim);
        var dv = ops.Memory.Allocate(dtype, tokens, kvDim);
        double bwdMs = Time(() => ops.AttentionBackward(y, x, k, v, y, lse, dq, dk, dv, batch, seq, hq, hkv, d), gpu.Synchronize);
        rows.Add(new OpRow("AttentionBackward", $"{dtype} T={seq} Hq={hq} Hkv={hkv} D={d}", bwdMs,
            2.5 * attnFlops / (bwdMs * 1e-3) / 1e12, "TFLOP/s", 2.5 * attnFlops / (bwdMs * 1e-3) / 1e12 / gemmTflops));

        var lmHead = ops.Memory.Allocate(dtype, vocab, hidden);
        var labels = ops.Memory.Allocate(DType.I32, tokens);
        var ceLse = ops.Memory.Allocate(DType.F32, tokens);
        ops.Fill(lmHead, 0.01);
        ops.Fill(labels, 0);
        double ceFlops = 2.0 * tokens * hidden * vocab;
        double ceMs = Time(() => ops.CrossEntropyForward(x, lmHead, labels, ceLse, 8192), gpu.Synchronize);
        rows.Add(new OpRow("CrossEntropyForward (lm_head fused, chunk 8192)", $"{s} x V={vocab}", ceMs,
            ceFlops / (ceMs * 1e-3) / 1e12, "TFLOP/s", ceFlops / (ceMs * 1e-3) / 1e12 / gemmTflops));
        return rows;
    }

    /// <summary>Median milliseconds of <paramref name="op"/> over repeats (after one warm-up), at least 3 and about 0.5 s.</summary>
    private static double Time(Action op, Action sync)
    {
        op(); sync();
        var samples = new List<double>();
        var total = Stopwatch.StartNew();
        while (samples.Count < 3 || (total.Elapsed.TotalSeconds < 0.5 && samples.Count < 100))
        {
            var sw = Stopwatch.StartNew();
            op(); sync();
            samples.Add(sw.Elapsed.TotalMilliseconds);
        }
        samples.Sort();
        return samples[samples.Count / 2];
    }

    private static Row MakeRow(string op, string shape, double ms, double bytes, double copyGBps)
    {
        double gbps = bytes / (ms * 1e-3) / 1e9;
        return new Row(op, shape, ms, gbps, copyGBps > 0 ? gbps / copyGBps : 1);
    }

    private const int Blocksize = 64;

    private static List<Row> RunGpu(IGpu gpu, long n)
    {
        var ops = new GpuQuantOps(gpu);
        long nb = GpuQuantOps.AbsmaxCount(n, Blocksize), packedBytes = GpuQuantOps.PackedBytes(n);
        var x = RandomBf16(n);
        var ptrs = new List<DevicePtr>();
        DevicePtr Alloc(long bytes) { var p = gpu.Alloc(bytes); ptrs.Add(p); return p; }
        try
        {
            var dx = Alloc(n * 2); var dy = Alloc(n * 2); var dAbsmax = Alloc(nb * 4); var dPacked = Alloc(packedBytes);
            gpu.CopyToDevice<BFloat16>(x, dx);
            var rows = new List<Row>();
            double copyMs = Time(() => gpu.CopyDeviceToDevice(dx, dy, n * 2), gpu.Synchronize);
            double copyGBps = 4.0 * n / (copyMs * 1e-3) / 1e9;
            rows.Add(MakeRow("copy bf16 (device to device)", $"{n:N0}", copyMs, 4.0 * n, copyGBps));
            double qBytes = 2.0 * n + packedBytes + 4.0 * nb;
            rows.Add(MakeRow("quantize_4bit_nf4_bf16", $"{n:N0}",
                Time(() => ops.Quantize4bit(QuantType.Nf4, DType.BF16, dx, n, Blocksize, dAbsmax, dPacked), gpu.Synchronize), qBytes, copyGBps));
            rows.Add(MakeRow("dequantize_4bit_nf4_bf16", $"{n:N0}",
                Time(() => ops.Dequantize4bit(QuantType.Nf4, DType.BF16, dPacked, dAbsmax, n, Blocksize, dy), gpu.Synchronize), qBytes, copyGBps));
            long nF32 = n / 2; // fp32 output of half the elements fits the bf16 buffer
            rows.Add(MakeRow("dequantize_4bit_nf4_f32", $"{nF32:N0}",
                Time(() => ops.Dequantize4bit(QuantType.Nf4, DType.F32, dPacked, dAbsmax, nF32, Blocksize, dy), gpu.Synchronize),
                4.0 * nF32 + GpuQuantOps.PackedBytes(nF32) + 4.0 * GpuQuantOps.AbsmaxCount(nF32, Blocksize), copyGBps));
            foreach (var (outF, inF) in new[] { (4096, 4096), (14336, 4096), (4096, 14336) })
            {
                long wn = (long)outF * inF;
                if (wn > n) continue;
                var dxv = Alloc(inF * 2L); var dyv = Alloc(outF * 2L);
                gpu.CopyToDevice<BFloat16>(x.AsSpan(0, inF), dxv);
                long wBytes = GpuQuantOps.PackedBytes(wn) + 4 * GpuQuantOps.AbsmaxCount(wn, Blocksize);
                rows.Add(MakeRow("gemv_4bit_nf4_bf16", $"{outF}x{inF}",
                    Time(() => ops.Gemv4bit(QuantType.Nf4, DType.BF16, dxv, dPacked, dAbsmax, dyv, outF, inF, Blocksize), gpu.Synchronize),
                    wBytes + 2.0 * (inF + outF), copyGBps));
            }
            return rows;
        }
        finally
        {
            foreach (var p in ptrs) gpu.Free(p);
        }
    }

    private static List<Row> RunCpu(long n)
    {
        if (n > int.MaxValue / 2) throw new CliException("--elements: at most 1G elements on the CPU");
        var x = RandomBf16(n);
        var y = new BFloat16[n];
        var packed = new byte[Quant4Bit.PackedLength(n)];
        var absmax = new float[Quant4Bit.BlockCount(n, Blocksize)];
        var rows = new List<Row>();
        double copyMs = Time(() => x.AsSpan().CopyTo(y), () => { });
        double copyGBps = 4.0 * n / (copyMs * 1e-3) / 1e9;
        rows.Add(MakeRow("copy bf16 (memory to memory)", $"{n:N0}", copyMs, 4.0 * n, copyGBps));
        double qBytes = 2.0 * n + packed.Length + 4.0 * absmax.Length;
        rows.Add(MakeRow("Quant4Bit.Quantize nf4 bf16", $"{n:N0}",
            Time(() => Quant4Bit.Quantize<BFloat16>(x, packed, absmax, QuantType.Nf4, Blocksize), () => { }), qBytes, copyGBps));
        rows.Add(MakeRow("Quant4Bit.Dequantize nf4 bf16", $"{n:N0}",
            Time(() => Quant4Bit.Dequantize<BFloat16>(packed, absmax, y, QuantType.Nf4, Blocksize), () => { }), qBytes, copyGBps));
        return rows;
    }

    private static BFloat16[] RandomBf16(long n)
    {
        var rng = new Random(0);
        var v = new BFloat16[n];
        for (long i = 0; i < n; i++) v[i] = (BFloat16)(float)(rng.NextDouble() * 2 - 1);
        return v;
    }
}
