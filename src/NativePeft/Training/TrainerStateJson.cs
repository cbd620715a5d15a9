using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using NativePeft.Data;
using NativePeft.IO;

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
    /// <summary>Steps dropped for a non-finite loss or gradient norm (--on-nonfinite skip).</summary>
    public IReadOnlyList<int> SkippedSteps { get; init; } = [];
    /// <summary>Every setting that changes the trajectory (<see cref="TrainerStateJson.Settings"/>), as canonical JSON
    /// text by name; null for a checkpoint written before they were recorded.</summary>
    public IReadOnlyDictionary<string, string>? Settings { get; init; }
    /// <summary>Ranks of the data-parallel run that wrote it (1 for a checkpoint written before it was recorded).</summary>
    public int WorldSize { get; init; } = 1;
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
            w.WriteNumber("next_dropout_step", (long)t.Step * t.GlobalGradAccum);
            w.WriteNumber("world_size", t.WorldSize);
            w.WriteNumber("global_batch", (long)t.Options.BatchSize * t.GlobalGradAccum);
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
            w.WritePropertyName("settings");
            w.WriteStartObject();
            foreach (var (name, value) in Settings(t)) WriteSetting(w, name, value);
            w.WriteEndObject();
            WriteSkipped(w, t.SkippedSteps);
            WriteSteps(w, t.StepHistory);
            WriteEvals(w, t.EvalHistory);
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray()) + "\n";
    }

    /// <summary>
    /// Every setting that changes a run's trajectory, checked on resume (<see cref="Trainer.Resume"/> names each one that
    /// differs): the base model's identity (<see cref="BaseModelIdentity"/>), the method, the seed, the learning-rate
    /// schedule (lr, kind, warmup), batch, grad-accum,
    /// seq, batching (padding/packing, shuffle), the optimizer and its weight decay, clipping, the compute dtype, the
    /// LoRA shape (r, alpha, dropout, rsLoRA, targets) and the training data (<see cref="DataIdentity"/>: a hash of
    /// the tokenized examples, so a moved file is the same data and an edited one is not). Values are int, double,
    /// bool or string. Not among them: the number of steps (a run may be extended; linear and cosine rates then follow
    /// the new total), eval and save cadence, the device, recompute and --on-nonfinite.
    /// </summary>
    public static IReadOnlyList<(string Name, object Value)> Settings(Trainer t)
    {
        var o = t.Options;
        var list = new List<(string, object)>
        {
            ("base_model", BaseModelIdentity(t.Model.Config)),
            ("method", MethodName(t)),
            ("seed", o.Seed),
            ("lr", o.Lr),
            ("schedule", LrSchedule.Name(o.Schedule)),
            ("warmup", o.WarmupSteps),
        };
        list.AddRange(new (string, object)[]
        {
            ("batch", o.BatchSize), ("grad_accum", o.GradAccum), ("seq", o.SeqLen),
            ("batch_mode", o.BatchMode.ToString().ToLowerInvariant()), ("shuffle", o.Shuffle),
            ("optimizer", t.Optimizer.Name), ("weight_decay", o.WeightDecay), ("max_grad_norm", o.MaxGradNorm),
            ("compute_dtype", t.Model.ComputeDType.ToString()),
        });
        if (t.Model.Options.Lora is { } lora && !t.Model.Options.FullFineTuning)
            list.AddRange(new (string, object)[]
            {
                ("lora_r", lora.Rank), ("lora_alpha", lora.Alpha), ("lora_dropout", lora.Dropout), ("use_rslora", lora.UseRsLora),
                ("target_modules", string.Join(",", lora.TargetModules.Order(StringComparer.Ordinal))),
            });
        list.Add(("train_data", t.DataIdentity));
        return list;
    }

    /// <summary>
    /// The base model's identity, cheap (no tensor bytes): "sha256:" over config.json's canonical form (<see
    /// cref="LlamaConfig.ToJson"/> without torch_dtype: a BF16 and an F32 copy are the same model) and the sorted names
    /// and shapes of the tensors it implies. Two checkpoints of one architecture (a base and its instruct tune) share
    /// it; another size, vocabulary, RoPE or layer count does not.
    /// </summary>
    public static string BaseModelIdentity(LlamaConfig config)
    {
        var text = new StringBuilder((config with { TorchDtype = null }).ToJson());
        foreach (var (name, shape) in config.ExpectedTensors().OrderBy(x => x.Name, StringComparer.Ordinal))
            text.Append('\n').Append(name).Append(' ').Append(string.Join(",", shape));
        return "sha256:" + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text.ToString())));
    }

    /// <summary>"sha256:" over the training examples' input ids and labels, in order (lengths included), and their count.</summary>
    public static string DataIdentity(IReadOnlyList<TrainingExample> examples)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var four = new byte[4];
        void Int(int v)
        {
            BinaryPrimitives.WriteInt32LittleEndian(four, v);
            hash.AppendData(four);
        }
        Int(examples.Count);
        foreach (var e in examples)
        {
            Int(e.InputIds.Length);
            hash.AppendData(MemoryMarshal.AsBytes(e.InputIds.AsSpan()));
            Int(e.Labels.Length);
            hash.AppendData(MemoryMarshal.AsBytes(e.Labels.AsSpan()));
        }
        return $"sha256:{Convert.ToHexStringLower(hash.GetHashAndReset())} ({examples.Count} examples)";
    }

    /// <summary>A setting's JSON text as shown in messages: strings without their quotes.</summary>
    public static string SettingDisplay(string json) =>
        json.StartsWith('"') ? ParseString(json) : json;

    private static string ParseString(string json)
    {
        using var doc = JsonDocument.Parse(json);
        return doc.RootElement.GetString() ?? json;
    }

    /// <summary>A setting's canonical JSON text (what <see cref="Read"/> returns for it).</summary>
    public static string SettingText(object value)
    {
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms))
        {
            w.WriteStartObject();
            WriteSetting(w, "v", value);
            w.WriteEndObject();
        }
        using var doc = JsonDocument.Parse(ms.ToArray());
        return doc.RootElement.GetProperty("v").GetRawText();
    }

    private static void WriteSetting(Utf8JsonWriter w, string name, object value)
    {
        switch (value)
        {
            case int i: w.WriteNumber(name, i); break;
            case double d: w.WriteNumber(name, d); break;
            case bool b: w.WriteBoolean(name, b); break;
            default: w.WriteString(name, value.ToString()); break;
        }
    }

    private static void WriteSkipped(Utf8JsonWriter w, IReadOnlyList<int> skipped)
    {
        w.WriteStartArray("skipped_steps");
        foreach (int k in skipped) w.WriteNumberValue(k);
        w.WriteEndArray();
    }

    /// <summary>
    /// Reads trainer_state.json strictly: a missing field, a wrong type, a negative, non-integer or out-of-range number
    /// (step in [0, total_steps], counts ≥ 0) is an <see cref="InvalidDataException"/> naming the file and the field.
    /// Metrics values may be null (written for NaN). A checkpoint without "settings" or "skipped_steps" (written before
    /// they were recorded) reads with <see cref="TrainerState.Settings"/> null and no skipped steps.
    /// </summary>
    public static TrainerState Read(string path)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllBytes(path)); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not a valid trainer state: {e.Message}", e); }
        using (doc)
        {
            var f = new Fields(path);
            var r = f.Object(doc.RootElement, "");
            int total = f.Int(r, "total_steps", min: 1);
            int step = f.Int(r, "step", max: total);
            string method = f.String(r, "method");
            if (method is not ("full" or "lora" or "qlora")) throw f.Bad("method", $"\"{method}\" is not full, lora or qlora");
            var dp = f.Object(f.Get(r, "data_position"), "data_position");
            var data = new DataPosition(f.Int(dp, "epoch", "data_position."), f.Int(dp, "index", "data_position."),
                f.ULong(dp, "seed", "data_position."), f.Int(dp, "examples", "data_position."));
            var steps = f.Array(r, "steps").Select((s, i) =>
            {
                string at = $"steps[{i}].";
                f.Object(s, $"steps[{i}]");
                return new StepMetrics(f.Int(s, "step", at, min: 1, max: step), D(s, "loss"), D(s, "lr"), D(s, "tokens_per_s"),
                    f.Long(s, "peak_bytes", at), D(s, "grad_norm"), f.Long(s, "tokens", at), D(s, "seconds"));
            }).ToList();
            var evals = f.Array(r, "eval").Select((e, i) =>
            {
                string at = $"eval[{i}].";
                f.Object(e, $"eval[{i}]");
                return new EvalMetrics(f.Int(e, "step", at, max: step), D(e, "loss"), D(e, "perplexity"), f.Long(e, "tokens", at),
                    e.TryGetProperty("exact_match", out var em) && em.ValueKind == JsonValueKind.Number ? em.GetDouble() : null,
                    f.Int(e, "exact_match_count", at));
            }).ToList();
            var skipped = r.TryGetProperty("skipped_steps", out _)
                ? f.Array(r, "skipped_steps").Select((k, i) => f.IntValue(k, $"skipped_steps[{i}]", min: 1, max: step)).ToList()
                : [];
            Dictionary<string, string>? settings = null;
            if (r.TryGetProperty("settings", out var se))
            {
                settings = [];
                foreach (var p in f.Object(se, "settings").EnumerateObject())
                {
                    if (p.Value.ValueKind is not (JsonValueKind.Number or JsonValueKind.String or JsonValueKind.True or JsonValueKind.False))
                        throw f.Bad($"settings.{p.Name}", $"is {p.Value.ValueKind}, expected a number, string or boolean");
                    settings[p.Name] = p.Value.GetRawText();
                }
            }
            double seconds = D(r, "seconds");
            if (seconds < 0) throw f.Bad("seconds", $"{seconds} is negative");
            string? schedule = null;
            double? lr = null;
            int? warmup = null;
            if (r.TryGetProperty("lr_schedule", out var ls))
            {
                f.Object(ls, "lr_schedule");
                schedule = f.String(ls, "kind", "lr_schedule.");
                lr = f.Double(ls, "base_lr", "lr_schedule.");
                warmup = f.Int(ls, "warmup_steps", "lr_schedule.");
            }
            return new TrainerState(step, total, method == "full", f.String(r, "optimizer"),
                data, f.ULong(r, "dropout_seed"), f.Long(r, "tokens_seen"), seconds, steps, evals)
            {
                Method = r.TryGetProperty("quantization", out _) || method == "full" ? method : null,
                Schedule = schedule,
                Lr = lr,
                WarmupSteps = warmup,
                SkippedSteps = skipped,
                Settings = settings,
                WorldSize = r.TryGetProperty("world_size", out _) ? f.Int(r, "world_size", min: 1) : 1,
            };
        }
    }

    /// <summary>Typed, range-checked access to trainer_state.json's fields; errors name the file and the field.</summary>
    private sealed class Fields(string path)
    {
        public InvalidDataException Bad(string field, string problem) => new($"{path}: field \"{field}\" {problem}");

        public JsonElement Get(JsonElement obj, string name, string prefix = "") =>
            obj.TryGetProperty(name, out var v) ? v : throw Bad(prefix + name, "is missing");

        public JsonElement Object(JsonElement e, string field) =>
            e.ValueKind == JsonValueKind.Object ? e : throw Bad(field.Length == 0 ? "(root)" : field, $"is {Kind(e)}, expected an object");

        public IEnumerable<JsonElement> Array(JsonElement obj, string name)
        {
            var v = Get(obj, name);
            if (v.ValueKind != JsonValueKind.Array) throw Bad(name, $"is {Kind(v)}, expected an array");
            return v.EnumerateArray().ToList();
        }

        public string String(JsonElement obj, string name, string prefix = "")
        {
            var v = Get(obj, name, prefix);
            return v.ValueKind == JsonValueKind.String ? v.GetString()! : throw Bad(prefix + name, $"is {Kind(v)}, expected a string");
        }

        public double Double(JsonElement obj, string name, string prefix = "")
        {
            var v = Get(obj, name, prefix);
            return v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out double d) && double.IsFinite(d)
                ? d : throw Bad(prefix + name, $"is {Kind(v)}, expected a finite number");
        }

        public int Int(JsonElement obj, string name, string prefix = "", int min = 0, int max = int.MaxValue) =>
            IntValue(Get(obj, name, prefix), prefix + name, min, max);

        public int IntValue(JsonElement v, string field, int min = 0, int max = int.MaxValue)
        {
            if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out long x)) throw Bad(field, $"is {Kind(v)}, expected an integer");
            if (x < min) throw Bad(field, $"is {x}, below {min}");
            if (x > max) throw Bad(field, $"is {x}, above {max}");
            return (int)x;
        }

        public long Long(JsonElement obj, string name, string prefix = "")
        {
            var v = Get(obj, name, prefix);
            if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out long x)) throw Bad(prefix + name, $"is {Kind(v)}, expected an integer");
            return x >= 0 ? x : throw Bad(prefix + name, $"is {x}, below 0");
        }

        public ulong ULong(JsonElement obj, string name, string prefix = "")
        {
            var v = Get(obj, name, prefix);
            return v.ValueKind == JsonValueKind.Number && v.TryGetUInt64(out ulong x) ? x : throw Bad(prefix + name, $"is {Kind(v)}, expected an integer >= 0");
        }

        private static string Kind(JsonElement v)
        {
            string raw = v.ValueKind is JsonValueKind.Object or JsonValueKind.Array ? v.ValueKind.ToString().ToLowerInvariant() : v.GetRawText();
            return raw.Length > 40 ? raw[..40] + "…" : raw;
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
            WriteSkipped(w, t.SkippedSteps);
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
        w.WriteNumber("world_size", t.WorldSize);
        w.WriteNumber("global_batch", (long)o.BatchSize * t.GlobalGradAccum);
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
        w.WriteString("on_nonfinite", o.OnNonFinite.ToString().ToLowerInvariant());
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

    private static void WriteSteps(Utf8JsonWriter w, IReadOnlyList<StepMetrics> steps) => WriteObjects(w, "steps", steps, s =>
    {
        w.WriteNumber("step", s.Step);
        Num(w, "loss", s.Loss);
        Num(w, "lr", s.Lr);
        Num(w, "tokens_per_s", s.TokensPerSecond);
        w.WriteNumber("peak_bytes", s.PeakBytes);
        Num(w, "grad_norm", s.GradNorm);
        w.WriteNumber("tokens", s.Tokens);
        Num(w, "seconds", s.Seconds);
    });

    private static void WriteEvals(Utf8JsonWriter w, IReadOnlyList<EvalMetrics> evals) => WriteObjects(w, "eval", evals, e =>
    {
        w.WriteNumber("step", e.Step);
        Num(w, "loss", e.Loss);
        Num(w, "perplexity", e.Perplexity);
        w.WriteNumber("tokens", e.Tokens);
        if (e.ExactMatch is double x) Num(w, "exact_match", x);
        else w.WriteNull("exact_match");
        w.WriteNumber("exact_match_count", e.ExactMatchCount);
    });

    /// <summary>An array <paramref name="name"/> of one object per item, whose properties <paramref name="writeProperties"/> writes.</summary>
    private static void WriteObjects<T>(Utf8JsonWriter w, string name, IEnumerable<T> items, Action<T> writeProperties)
    {
        w.WriteStartArray(name);
        foreach (var item in items)
        {
            w.WriteStartObject();
            writeProperties(item);
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
