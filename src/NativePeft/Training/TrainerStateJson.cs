using System.Globalization;
using System.Text;
using System.Text.Json;
using NativePeft.Data;

namespace NativePeft.Training;

/// <summary>What trainer_state.json holds (what <see cref="Trainer.Resume"/> needs besides the tensors).</summary>
internal sealed record TrainerState(int Step, int TotalSteps, bool FullFineTuning, string Optimizer, DataPosition Data, ulong DropoutSeed,
    long TokensSeen, double Seconds, IReadOnlyList<StepMetrics> Steps, IReadOnlyList<EvalMetrics> Evals)
{
    /// <summary>full, lora or qlora; null for a checkpoint written before the base's quantization was recorded (it says "lora" for both).</summary>
    public string? Method { get; init; }
    public string? Schedule { get; init; }
    public double? Lr { get; init; }
    public int? WarmupSteps { get; init; }
}

/// <summary>
/// trainer_state.json and metrics.json. Doubles are written with "R" (round-trip), so metrics restored from a
/// checkpoint equal the ones computed; a non-finite number is written as null (JSON has no NaN) and read back as NaN.
/// </summary>
internal static class TrainerStateJson
{
    private static readonly JsonWriterOptions Indented = new() { Indented = true };

    public static string Write(Trainer t)
    {
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms, Indented))
        {
            w.WriteStartObject();
            w.WriteNumber("step", t.Step);
            w.WriteNumber("total_steps", t.TotalSteps);
            w.WriteString("method", MethodName(t));
            w.WriteString("quantization", t.Model.Options.Quantization.ToString().ToLowerInvariant());
            w.WriteString("optimizer", t.Optimizer.Name);
            w.WriteNumber("seed", t.Options.Seed);
            w.WriteNumber("dropout_seed", t.Model.Dropout.Seed);
            w.WriteNumber("next_dropout_step", (long)t.Step * t.Options.GradAccum);
            w.WritePropertyName("data_position");
            var p = t.Batcher.Position;
            w.WriteStartObject();
            w.WriteNumber("epoch", p.Epoch);
            w.WriteNumber("index", p.Index);
            w.WriteNumber("seed", p.Seed);
            w.WriteNumber("examples", p.ExampleCount);
            w.WriteEndObject();
            w.WritePropertyName("lr_schedule");
            w.WriteStartObject();
            w.WriteString("kind", LrSchedule.Name(t.Options.Schedule));
            w.WriteNumber("base_lr", t.Options.Lr);
            w.WriteNumber("warmup_steps", t.Options.WarmupSteps);
            w.WriteNumber("total_steps", t.TotalSteps);
            w.WriteNumber("steps_taken", t.Step);
            Num(w, "next_lr", t.Step < t.TotalSteps ? t.LearningRateAt(t.Step + 1) : 0);
            w.WriteEndObject();
            w.WriteNumber("tokens_seen", t.TokensSeen);
            Num(w, "seconds", t.SecondsTrained);
            WriteSteps(w, t.StepHistory);
            WriteEvals(w, t.EvalHistory);
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray()) + "\n";
    }

    public static TrainerState Read(string path)
    {
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
            var r = doc.RootElement;
            var dp = r.GetProperty("data_position");
            var data = new DataPosition(dp.GetProperty("epoch").GetInt32(), dp.GetProperty("index").GetInt32(),
                dp.GetProperty("seed").GetUInt64(), dp.GetProperty("examples").GetInt32());
            var steps = r.GetProperty("steps").EnumerateArray().Select(s => new StepMetrics(
                s.GetProperty("step").GetInt32(), D(s, "loss"), D(s, "lr"), D(s, "tokens_per_s"), s.GetProperty("peak_bytes").GetInt64(),
                D(s, "grad_norm"), s.GetProperty("tokens").GetInt64(), D(s, "seconds"))).ToList();
            var evals = r.GetProperty("eval").EnumerateArray().Select(e => new EvalMetrics(
                e.GetProperty("step").GetInt32(), D(e, "loss"), D(e, "perplexity"), e.GetProperty("tokens").GetInt64(),
                e.TryGetProperty("exact_match", out var em) && em.ValueKind == JsonValueKind.Number ? em.GetDouble() : null,
                e.GetProperty("exact_match_count").GetInt32())).ToList();
            return new TrainerState(r.GetProperty("step").GetInt32(), r.GetProperty("total_steps").GetInt32(),
                r.GetProperty("method").GetString() == "full", r.GetProperty("optimizer").GetString() ?? "",
                data, r.GetProperty("dropout_seed").GetUInt64(), r.GetProperty("tokens_seen").GetInt64(), D(r, "seconds"), steps, evals)
            {
                Method = r.TryGetProperty("quantization", out _) || r.GetProperty("method").GetString() == "full" ? r.GetProperty("method").GetString() : null,
                Schedule = r.TryGetProperty("lr_schedule", out var ls) && ls.TryGetProperty("kind", out var kind) ? kind.GetString() : null,
                Lr = r.TryGetProperty("lr_schedule", out ls) && ls.TryGetProperty("base_lr", out var lr) && lr.ValueKind == JsonValueKind.Number ? lr.GetDouble() : null,
                WarmupSteps = r.TryGetProperty("lr_schedule", out ls) && ls.TryGetProperty("warmup_steps", out var wu) && wu.ValueKind == JsonValueKind.Number ? wu.GetInt32() : null,
            };
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            throw new InvalidDataException($"{path}: not a valid trainer state: {e.Message}", e);
        }
    }

    /// <summary>metrics.json.</summary>
    public static string Metrics(Trainer t)
    {
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms, Indented))
        {
            w.WriteStartObject();
            WriteSteps(w, t.StepHistory);
            WriteEvals(w, t.EvalHistory);
            w.WritePropertyName("config");
            WriteConfig(w, t);
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray()) + "\n";
    }

    /// <summary>full, qlora (LoRA on a quantized base) or lora.</summary>
    public static string MethodName(Trainer t) =>
        t.Model.Options.FullFineTuning ? "full" : t.Model.LoraLayers.Count > 0 && t.Model.Options.Quantization != Modules.BaseQuantization.None ? "qlora" : "lora";

    private static void WriteConfig(Utf8JsonWriter w, Trainer t)
    {
        var o = t.Options;
        w.WriteStartObject();
        w.WriteString("method", MethodName(t));
        w.WriteNumber("total_steps", t.TotalSteps);
        if (o.Steps is int s) w.WriteNumber("steps", s);
        if (o.Epochs is double e) w.WriteNumber("epochs", e);
        w.WriteNumber("batch", o.BatchSize);
        w.WriteNumber("grad_accum", o.GradAccum);
        w.WriteNumber("seq", o.SeqLen);
        w.WriteString("batch_mode", o.BatchMode.ToString().ToLowerInvariant());
        w.WriteNumber("lr", o.Lr);
        w.WriteString("schedule", LrSchedule.Name(o.Schedule));
        w.WriteNumber("warmup", o.WarmupSteps);
        w.WriteNumber("max_grad_norm", o.MaxGradNorm);
        w.WriteNumber("eval_every", o.EvalEvery);
        w.WriteNumber("eval_batches", o.EvalBatches);
        w.WriteNumber("save_every", o.SaveEvery);
        w.WriteNumber("seed", o.Seed);
        w.WriteString("optimizer", t.Optimizer.Name);
        w.WriteNumber("weight_decay", o.WeightDecay);
        w.WriteString("token_weighting", "token-weighted mean over the micro-batches of a step");
        w.WriteNumber("train_examples", t.Data.Train.Count);
        w.WriteNumber("eval_examples", t.Data.Eval?.Count ?? 0);
        if (t.Model.Options.Lora is { } lora)
        {
            w.WritePropertyName("lora");
            w.WriteStartObject();
            w.WriteNumber("r", lora.Rank);
            w.WriteNumber("lora_alpha", lora.Alpha);
            w.WriteNumber("lora_dropout", lora.Dropout);
            w.WriteBoolean("use_rslora", lora.UseRsLora);
            w.WriteStartArray("target_modules");
            foreach (var target in lora.TargetModules) w.WriteStringValue(target);
            w.WriteEndArray();
            w.WriteEndObject();
        }
        w.WriteNumber("trainable_parameters", t.Model.TrainableParameters.Sum(p => p.Param.Count));
        w.WriteString("device", t.Model.Ops.GetType().Name);
        if (o.ExtraConfig is { } extra)
            foreach (var (k, v) in extra) w.WriteString(k, v);
        w.WriteEndObject();
    }

    private static void WriteSteps(Utf8JsonWriter w, IReadOnlyList<StepMetrics> steps)
    {
        w.WriteStartArray("steps");
        foreach (var s in steps)
        {
            w.WriteStartObject();
            w.WriteNumber("step", s.Step);
            Num(w, "loss", s.Loss);
            Num(w, "lr", s.Lr);
            Num(w, "tokens_per_s", s.TokensPerSecond);
            w.WriteNumber("peak_bytes", s.PeakBytes);
            Num(w, "grad_norm", s.GradNorm);
            w.WriteNumber("tokens", s.Tokens);
            Num(w, "seconds", s.Seconds);
            w.WriteEndObject();
        }
        w.WriteEndArray();
    }

    private static void WriteEvals(Utf8JsonWriter w, IReadOnlyList<EvalMetrics> evals)
    {
        w.WriteStartArray("eval");
        foreach (var e in evals)
        {
            w.WriteStartObject();
            w.WriteNumber("step", e.Step);
            Num(w, "loss", e.Loss);
            Num(w, "perplexity", e.Perplexity);
            w.WriteNumber("tokens", e.Tokens);
            if (e.ExactMatch is double x) Num(w, "exact_match", x);
            else w.WriteNull("exact_match");
            w.WriteNumber("exact_match_count", e.ExactMatchCount);
            w.WriteEndObject();
        }
        w.WriteEndArray();
    }

    /// <summary>A double in round-trip form, or null when not finite.</summary>
    private static void Num(Utf8JsonWriter w, string name, double v)
    {
        if (double.IsFinite(v)) w.WriteNumber(name, v);
        else w.WriteNull(name);
    }

    private static double D(JsonElement e, string name) =>
        e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : double.NaN;

}
