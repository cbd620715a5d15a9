using System.Globalization;
using System.Text;
using System.Text.Json;
using NativePeft.Training;
using SkiaSharp;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>compare's results as the printed table, report.md and metrics.json.</summary>
internal sealed class Report(CompareCommand.Args args, CompareCommand.MachineInfo machine, string model, CompareCommand.BaseResult baseResult,
    IReadOnlyList<CompareCommand.MethodResult> results, string speedReference)
{
    private static readonly CultureInfo Inv = CultureInfo.InvariantCulture;

    public static readonly string[] Columns =
    [
        "method", "base weights", "pool peak", "peak RSS", "tokens/s", "ms/step", $"speed", "eval loss", "exact match",
        "trainable params", "trainable %", "adapter file",
    ];

    /// <summary>The rows as text: the base model first, then each method.</summary>
    public List<string[]> Rows()
    {
        var rows = new List<string[]>
        {
            new[]
            {
                "base (no FT)", Output.Bytes(baseResult.BaseWeightBytes), "-", "-", "-", "-", "-", Loss(baseResult.Eval.Loss),
                Exact(baseResult.Eval), "0", "0 %", "-",
            },
        };
        foreach (var r in results)
        {
            rows.Add(
            [
                CompareCommand.Label(r.Method), Output.Bytes(r.BaseWeightBytes), Output.Bytes(r.PoolPeakBytes),
                r.PeakRssBytes is long rss ? Output.Bytes(rss) : "n/a", r.TokensPerSecond.ToString("F0", Inv), r.MsPerStep.ToString("F1", Inv),
                r.RelativeSpeed is double s ? s.ToString("F2", Inv) + "x" : "-", r.After is { } a ? Loss(a.Loss) : "-",
                r.After is { } b ? Exact(b) : "-", r.TrainableParameters.ToString("N0", Inv), (r.TrainableShare * 100).ToString(r.TrainableShare < 0.1 ? "F2" : "F1", Inv) + " %",
                Output.Bytes(r.AdapterBytes),
            ]);
        }
        return rows;
    }

    private static string Loss(double v) => double.IsFinite(v) ? v.ToString("F4", Inv) : "-";
    private static string Exact(EvalMetrics e) => e.ExactMatch is double x ? (x * 100).ToString("F1", Inv) + " %" : "-";

    public Table Table()
    {
        var table = new Table().Border(TableBorder.Rounded);
        string[] shortNames = ["method", "base weights", "pool peak", "peak RSS", "tok/s", "ms/step", $"vs {CompareCommand.Label(speedReference)}",
            "eval loss", "exact", "trainable", "share", "adapter"];
        foreach (var c in shortNames) table.AddColumn(new TableColumn(Markup.Escape(c)) { Alignment = c == "method" ? Justify.Left : Justify.Right });
        foreach (var row in Rows()) table.AddRow(row.Select(Markup.Escape).ToArray());
        return table;
    }

    /// <summary>The compute precision the runs used (--precision resolved for --device).</summary>
    private string Precision => DeviceOption.ComputeDType(args.Precision, args.Device) == Numerics.DType.BF16 ? "bf16 mixed precision" : "fp32";

    /// <summary>" (full FT 0.001)": full fine-tuning's own learning rate (--lr-full, or half of --lr), when it runs.</summary>
    private string FullLrText =>
        CompareCommand.ParseMethods(args.Methods).Contains(Planning.FineTuneMethod.Full) ? string.Create(Inv, $" (full FT {args.FullLr:G3})") : "";

    public IEnumerable<string> Notes()
    {
        yield return $"model: {model}";
        yield return string.Create(Inv, $"settings: {args.Steps} steps, batch {args.Batch} x seq {args.Seq}{(args.Pack ? " packed" : "")}, lr {args.Lr:G3}") +
            FullLrText +
            string.Create(Inv, $", warmup {args.Warmup} then cosine, {args.Optim}, r {args.Rank}, alpha {args.Alpha:G}, dropout {args.Dropout:G}, seed {args.Seed}");
        yield return $"machine: {machine.Cpu}, {machine.Cores} logical cores, {machine.Os}, {machine.Runtime}, device {machine.Device}, compute {Precision}";
        yield return "pool peak: the ops' memory pool (host memory on cpu, device memory otherwise); peak RSS: the whole process; " +
            $"speed: tokens/s relative to {CompareCommand.Label(speedReference)} (steps 2..N); adapter file: the saved adapter (full FT: the whole model)";
        foreach (var claim in Claims()) yield return claim;
    }

    /// <summary>The article's feature table, measured: one line per claim that the methods run here can answer.</summary>
    public IEnumerable<string> Claims()
    {
        var full = results.FirstOrDefault(r => r.Method == "full");
        var lora = results.FirstOrDefault(r => r.Method == "lora");
        var qlora = results.FirstOrDefault(r => r.Method == "qlora");
        if (full is not null)
        {
            if (lora is not null) yield return string.Create(Inv, $"LoRA: pool peak {1 - (double)lora.PoolPeakBytes / full.PoolPeakBytes:P0} below full fine-tuning (article: ~50 %)");
            if (qlora is not null) yield return string.Create(Inv, $"QLoRA: pool peak {1 - (double)qlora.PoolPeakBytes / full.PoolPeakBytes:P0} below full fine-tuning (article: 70-80 %)");
        }
        if (lora is not null && qlora is not null)
        {
            yield return string.Create(Inv, $"QLoRA base weights {(double)qlora.BaseWeightBytes / lora.BaseWeightBytes:P0} of LoRA's; QLoRA speed {qlora.TokensPerSecond / lora.TokensPerSecond:F2}x LoRA's (article: 0.8-0.9x)");
            if (lora.After is { } la && qlora.After is { } qa)
                yield return string.Create(Inv, $"accuracy: exact match LoRA {Exact(la)}, QLoRA {Exact(qa)}") +
                    (full?.After is { } fa ? $", full FT {Exact(fa)}" : "") + " (article: LoRA within 0.5-1 %, QLoRA within 1-2 % of full FT on MMLU)";
        }
    }

    public string Markdown()
    {
        var sb = new StringBuilder();
        sb.AppendLine("# nativepeft compare: full fine-tuning, LoRA and QLoRA, measured").AppendLine();
        sb.AppendLine("```").AppendLine(args.CommandLine).AppendLine("```").AppendLine();
        sb.AppendLine($"- machine: {machine.Cpu}, {machine.Cores} logical cores; {machine.Os}; {machine.Runtime}; device `{machine.Device}`");
        sb.AppendLine($"- model: {model}");
        sb.AppendLine($"- data: {(args.Data == "builtin" ? "builtin (upper: word -> WORD; 2000 training problems, 200 held out)" : args.Data)}" +
            (args.EvalData is null ? "" : $", eval {args.EvalData}"));
        sb.AppendLine(string.Create(Inv, $"- settings (the same for every method, same seed): {args.Steps} steps, batch {args.Batch}, seq {args.Seq}{(args.Pack ? " (packed rows)" : "")}, ") +
            string.Create(Inv, $"lr {args.Lr:G3}{FullLrText}, warmup {args.Warmup} then cosine, {args.Optim}, ") +
            string.Create(Inv, $"LoRA r {args.Rank}, alpha {args.Alpha:G}, dropout {args.Dropout:G}, targets {args.Targets}, seed {args.Seed}, compute {Precision}, exact match over {(args.ExactMatchSamples == 0 ? "all" : args.ExactMatchSamples.ToString(Inv))} held-out problems"));
        sb.AppendLine();
        sb.Append("| ");
        sb.AppendJoin(" | ", Columns.Select(c => c == "speed" ? $"speed vs {CompareCommand.Label(speedReference)}" : c));
        sb.AppendLine(" |");
        sb.Append('|').Append(string.Concat(Columns.Select((_, i) => i == 0 ? "---|" : "---:|"))).AppendLine();
        foreach (var row in Rows()) sb.Append("| ").AppendJoin(" | ", row).AppendLine(" |");
        sb.AppendLine();
        sb.AppendLine($"![loss curves and peak memory]({CompareCommand.PlotFileName})").AppendLine();
        var claims = Claims().ToList();
        if (claims.Count > 0)
        {
            sb.AppendLine("## The article's claims, measured here").AppendLine();
            foreach (var c in claims) sb.AppendLine("- " + c);
            sb.AppendLine();
        }
        sb.AppendLine("## What the columns mean").AppendLine();
        sb.AppendLine("- **base weights**: bytes of the base model's weights as they sit in memory: full FT fp32 (they are trained), " +
            "LoRA bf16 linear weights (embeddings, norms and lm_head fp32), QLoRA NF4 codes (4 bits) plus bitsandbytes' double-quantized " +
            "absmax (an 8-bit code per 64 weights and an fp32 scale per 256 blocks: 0.127 bits per weight), kept so on the device.");
        sb.AppendLine("- **pool peak**: the highest number of bytes the ops' memory pool held during the run (weights, adapters, gradients, " +
            "optimizer states, activations, workspaces): host memory with `--device cpu`, device memory on a GPU. This is the VRAM figure.");
        sb.AppendLine("  On a small model with a large batch the activations dominate the pool, so the weight savings show fully " +
            "in the base-weights column and in the pool only as models grow (`nativepeft estimate` plans 8B and 70B models).");
        sb.AppendLine("- **peak RSS**: the process's peak resident memory while the method ran (Linux VmHWM, reset before each method); " +
            "it includes the .NET runtime and the memory-mapped checkpoint.");
        sb.AppendLine("- **tokens/s**, **ms/step**: tokens (positions that are not padding) per second and wall time per optimizer step, over steps 2..N " +
            "(step 1 carries JIT compilation and first allocations).");
        sb.AppendLine($"- **speed vs {CompareCommand.Label(speedReference)}**: tokens/s divided by {CompareCommand.Label(speedReference)}'s.");
        sb.AppendLine("- **eval loss**: mean next-token cross-entropy on the held-out examples after the last step; **exact match**: greedy answers " +
            "equal to the expected ones on the built-in task's held-out problems.");
        sb.AppendLine("- **trainable params**, **trainable %**: parameters that get gradients, and their share of all parameters " +
            "(base plus adapters, as PEFT's print_trainable_parameters counts).");
        sb.AppendLine("- **adapter file**: bytes of what the run saves: the PEFT adapter folder (adapter_config.json + adapter_model.safetensors), " +
            "or with full FT the whole model (config.json + model.safetensors, fp32).");
        sb.AppendLine();
        sb.AppendLine($"Each method's own output (metrics.json with every step, the adapter or model) is in its subfolder; " +
            $"{CompareCommand.MetricsFileName} here has every step of every method.");
        return sb.ToString();
    }

    public string Json()
    {
        using var stream = new MemoryStream();
        using (var w = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            w.WriteStartObject();
            w.WriteString("command", args.CommandLine);
            w.WriteStartObject("machine");
            w.WriteString("cpu", machine.Cpu);
            w.WriteNumber("cores", machine.Cores);
            w.WriteString("os", machine.Os);
            w.WriteString("runtime", machine.Runtime);
            w.WriteString("device", machine.Device);
            w.WriteEndObject();
            w.WriteStartObject("settings");
            w.WriteString("model", args.Model);
            w.WriteString("model_description", model);
            w.WriteString("data", args.Data);
            w.WriteNumber("steps", args.Steps);
            w.WriteNumber("batch", args.Batch);
            w.WriteNumber("seq", args.Seq);
            w.WriteBoolean("pack", args.Pack);
            w.WriteNumber("lr", args.Lr);
            w.WriteNumber("lr_full", args.FullLr);
            w.WriteNumber("warmup", args.Warmup);
            w.WriteString("optimizer", args.Optim);
            w.WriteString("precision", Precision);
            w.WriteNumber("r", args.Rank);
            w.WriteNumber("lora_alpha", args.Alpha);
            w.WriteNumber("lora_dropout", args.Dropout);
            w.WriteString("target_modules", args.Targets);
            w.WriteNumber("seed", args.Seed);
            w.WriteEndObject();
            w.WriteStartObject("base");
            w.WriteNumber("base_weight_bytes", baseResult.BaseWeightBytes);
            w.WriteNumber("parameters", baseResult.Parameters);
            WriteEval(w, "eval", baseResult.Eval);
            w.WriteEndObject();
            w.WriteString("speed_reference", speedReference);
            w.WriteStartArray("methods");
            foreach (var r in results)
            {
                w.WriteStartObject();
                w.WriteString("method", r.Method);
                w.WriteNumber("lr", r.Lr);
                w.WriteNumber("base_weight_bytes", r.BaseWeightBytes);
                w.WriteNumber("pool_peak_bytes", r.PoolPeakBytes);
                Number(w, "peak_rss_bytes", r.PeakRssBytes);
                w.WriteNumber("tokens_per_second", r.TokensPerSecond);
                w.WriteNumber("ms_per_step", r.MsPerStep);
                Number(w, "relative_speed", r.RelativeSpeed);
                w.WriteNumber("train_seconds", r.TrainSeconds);
                w.WriteNumber("trainable_parameters", r.TrainableParameters);
                w.WriteNumber("total_parameters", r.TotalParameters);
                w.WriteNumber("trainable_share", r.TrainableShare);
                w.WriteNumber("adapter_bytes", r.AdapterBytes);
                w.WriteString("adapter_path", r.AdapterPath);
                WriteEval(w, "eval_before", r.Before);
                if (r.After is { } after) WriteEval(w, "eval_after", after);
                else w.WriteNull("eval_after");
                w.WriteStartArray("steps");
                foreach (var s in r.Steps)
                {
                    w.WriteStartObject();
                    w.WriteNumber("step", s.Metrics.Step);
                    Number(w, "loss", s.Metrics.Loss);
                    w.WriteNumber("lr", s.Metrics.Lr);
                    w.WriteNumber("tokens_per_second", s.Metrics.TokensPerSecond);
                    w.WriteNumber("seconds", s.Metrics.Seconds);
                    w.WriteNumber("tokens", s.Metrics.Tokens);
                    Number(w, "grad_norm", s.Metrics.GradNorm);
                    w.WriteNumber("pool_peak_bytes", s.Metrics.PeakBytes);
                    Number(w, "rss_bytes", s.RssBytes);
                    w.WriteEndObject();
                }
                w.WriteEndArray();
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteStartArray("table");
            w.WriteStartArray();
            foreach (var c in Columns) w.WriteStringValue(c);
            w.WriteEndArray();
            foreach (var row in Rows())
            {
                w.WriteStartArray();
                foreach (var c in row) w.WriteStringValue(c);
                w.WriteEndArray();
            }
            w.WriteEndArray();
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.ToArray()) + "\n";
    }

    private static void WriteEval(Utf8JsonWriter w, string name, EvalMetrics e)
    {
        w.WriteStartObject(name);
        w.WriteNumber("step", e.Step);
        Number(w, "loss", e.Loss);
        Number(w, "perplexity", e.Perplexity);
        Number(w, "exact_match", e.ExactMatch);
        w.WriteNumber("exact_match_count", e.ExactMatchCount);
        w.WriteEndObject();
    }

    private static void Number(Utf8JsonWriter w, string name, double? v)
    {
        if (v is double d && double.IsFinite(d)) w.WriteNumber(name, d);
        else w.WriteNull(name);
    }

    private static void Number(Utf8JsonWriter w, string name, long? v)
    {
        if (v is long l) w.WriteNumber(name, l);
        else w.WriteNull(name);
    }
}

/// <summary>compare.png: the training loss of every method by step (left) and the memory bars (right), with ScottPlot.</summary>
internal static class ComparePlot
{
    public const int Width = 1400, Height = 560;

    public static void Write(string path, IReadOnlyList<CompareCommand.MethodResult> results)
    {
        var loss = new ScottPlot.Plot();
        var palette = new ScottPlot.Palettes.Category10();
        for (int i = 0; i < results.Count; i++)
        {
            var r = results[i];
            var points = r.Steps.Where(s => double.IsFinite(s.Metrics.Loss)).ToList();
            var line = loss.Add.ScatterLine(points.Select(s => (double)s.Metrics.Step).ToArray(), points.Select(s => s.Metrics.Loss).ToArray(), palette.GetColor(i));
            line.LegendText = CompareCommand.Label(r.Method);
            line.LineWidth = 2;
        }
        loss.Axes.SetLimitsY(0, Math.Max(0.1, results.SelectMany(r => r.Steps).Select(s => s.Metrics.Loss).Where(double.IsFinite).DefaultIfEmpty(1).Max() * 1.05));
        loss.Title("training loss");
        loss.XLabel("step");
        loss.YLabel("loss");
        loss.ShowLegend(ScottPlot.Alignment.UpperRight);

        var memory = new ScottPlot.Plot();
        var bars = new List<ScottPlot.Bar>();
        var ticks = new List<ScottPlot.Tick>();
        for (int i = 0; i < results.Count; i++)
        {
            var r = results[i];
            double x = i * 3;
            bars.Add(new ScottPlot.Bar { Position = x, Value = r.BaseWeightBytes / 1048576.0, FillColor = palette.GetColor(0) });
            bars.Add(new ScottPlot.Bar { Position = x + 1, Value = r.PoolPeakBytes / 1048576.0, FillColor = palette.GetColor(1) });
            ticks.Add(new ScottPlot.Tick(x + 0.5, CompareCommand.Label(r.Method)));
        }
        memory.Add.Bars(bars);
        memory.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(ticks.ToArray());
        memory.Axes.Margins(bottom: 0);
        memory.Legend.ManualItems.Add(new ScottPlot.LegendItem { LabelText = "base weights", FillColor = palette.GetColor(0) });
        memory.Legend.ManualItems.Add(new ScottPlot.LegendItem { LabelText = "pool peak", FillColor = palette.GetColor(1) });
        memory.ShowLegend(ScottPlot.Alignment.UpperRight);
        memory.Title("memory (MiB)");
        memory.YLabel("MiB");

        using var surface = SKSurface.Create(new SKImageInfo(Width, Height)) ?? throw new InvalidOperationException("SkiaSharp could not create a surface");
        surface.Canvas.Clear(SKColors.White);
        int half = Width / 2;
        using (var left = SKBitmap.Decode(loss.GetImageBytes(half, Height, ScottPlot.ImageFormat.Png)))
            surface.Canvas.DrawBitmap(left, 0, 0);
        using (var right = SKBitmap.Decode(memory.GetImageBytes(Width - half, Height, ScottPlot.ImageFormat.Png)))
            surface.Canvas.DrawBitmap(right, half, 0);
        using var image = surface.Snapshot();
        using var png = image.Encode(SKEncodedImageFormat.Png, 100);
        NativePeft.IO.OutputFolder.WriteAllBytesAtomic(path, png.ToArray());
    }
}

/// <summary>`train`'s loss.png: the training loss per step and the eval loss at each evaluation, as compare's loss panel.</summary>
internal static class TrainPlot
{
    public const int Width = 900, Height = 560;

    /// <summary>Writes the plot (PNG, via a temporary file); nothing when no step has a finite loss.</summary>
    public static bool Write(string path, IReadOnlyList<NativePeft.Training.StepMetrics> steps, IReadOnlyList<NativePeft.Training.EvalMetrics> evals)
    {
        var points = steps.Where(s => double.IsFinite(s.Loss)).ToList();
        if (points.Count == 0) return false;
        var plot = new ScottPlot.Plot();
        var palette = new ScottPlot.Palettes.Category10();
        var train = plot.Add.ScatterLine(points.Select(s => (double)s.Step).ToArray(), points.Select(s => s.Loss).ToArray(), palette.GetColor(0));
        train.LegendText = "training loss";
        train.LineWidth = 2;
        var ev = evals.Where(e => double.IsFinite(e.Loss)).ToList();
        if (ev.Count > 0)
        {
            var eval = plot.Add.ScatterPoints(ev.Select(e => (double)e.Step).ToArray(), ev.Select(e => e.Loss).ToArray(), palette.GetColor(1));
            eval.LegendText = "eval loss";
            eval.MarkerSize = 9;
        }
        double top = points.Select(s => s.Loss).Concat(ev.Select(e => e.Loss)).Max();
        plot.Axes.SetLimitsY(0, Math.Max(0.1, top * 1.05));
        plot.Title("train: loss");
        plot.XLabel("step");
        plot.YLabel("loss");
        plot.ShowLegend(ScottPlot.Alignment.UpperRight);
        NativePeft.IO.OutputFolder.WriteAllBytesAtomic(path, plot.GetImageBytes(Width, Height, ScottPlot.ImageFormat.Png));
        return true;
    }
}
