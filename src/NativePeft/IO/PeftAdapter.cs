using System.Text.RegularExpressions;
using NativePeft.Modules;
using NativePeft.Numerics;

namespace NativePeft.IO;

/// <summary>
/// One adapted projection: lora_A [r, in] and lora_B [out, r] as fp32, row-major, and where it sits in the model.
/// </summary>
public sealed record PeftLoraModule(int Layer, string Target, int Rank, int InFeatures, int OutFeatures, float[] A, float[] B)
{
    /// <summary>The HF module path: model.layers.{Layer}.self_attn.q_proj.</summary>
    public string ModulePath => $"model.layers.{Layer}.{PeftAdapter.ProjectionPath(Target)}";
    /// <summary>The base weight this module adapts: model.layers.{Layer}.self_attn.q_proj.weight.</summary>
    public string BaseWeightName => ModulePath + ".weight";
    public string KeyA => PeftAdapter.KeyPrefix + ModulePath + ".lora_A.weight";
    public string KeyB => PeftAdapter.KeyPrefix + ModulePath + ".lora_B.weight";
}

/// <summary>
/// A LoRA adapter in Hugging Face PEFT's format: adapter_config.json (<see cref="PeftLoraConfig"/>) and
/// adapter_model.safetensors with keys <c>base_model.model.&lt;module path&gt;.lora_A.weight</c> [r, in] and
/// <c>….lora_B.weight</c> [out, r] (docs/formats.md "PEFT LoRA adapters"), so <c>PeftModel.from_pretrained</c> loads ours and we load theirs.
/// Tensors are held on the host in fp32 (PEFT saves in the adapter's dtype; BF16/F16 files are widened exactly).
/// </summary>
public sealed class PeftAdapter
{
    public const string WeightsFileName = "adapter_model.safetensors";
    public const string KeyPrefix = "base_model.model.";

    private static readonly Regex KeyPattern = new(
        @"^base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,8})\.(self_attn|mlp)\.([a-z_]+)\.lora_(A|B)\.weight$",
        RegexOptions.CultureInvariant);

    private readonly Dictionary<(int, string), PeftLoraModule> _byModule;

    public PeftLoraConfig Config { get; }
    /// <summary>Adapted modules by layer, then in the model's projection order (q, k, v, o, gate, up, down).</summary>
    public IReadOnlyList<PeftLoraModule> Modules { get; }
    /// <summary>Where the adapter was loaded from (the folder), or null when built in memory.</summary>
    public string? Source { get; private init; }
    public double Scaling => Config.Scaling;

    /// <summary>
    /// An adapter from a config and its modules. Checks that each module's A is [r, in] and B [out, r] with the config's
    /// r, that each (layer, target) appears once, that the targets are exactly the config's target_modules and every
    /// adapted layer has all of them.
    /// </summary>
    public PeftAdapter(PeftLoraConfig config, IEnumerable<PeftLoraModule> modules)
        : this(config, modules, config?.BaseModelNameOrPath ?? "PEFT adapter")
    {
    }

    private PeftAdapter(PeftLoraConfig config, IEnumerable<PeftLoraModule> modules, string where)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(modules);
        var list = modules.ToList();
        var problems = new List<string>();
        _byModule = [];
        foreach (var m in list)
        {
            if (ProjectionIndex(m.Target) < 0)
            {
                problems.Add($"{m.Target}: not a Llama projection ({string.Join(", ", LoraSettings.KnownTargets)})");
                continue;
            }
            if (m.Rank != config.R)
                problems.Add($"{m.KeyA}: r = {m.Rank}, but adapter_config.json says r = {config.R}");
            if (m.InFeatures <= 0 || m.OutFeatures <= 0 || m.A.LongLength != (long)m.Rank * m.InFeatures || m.B.LongLength != (long)m.OutFeatures * m.Rank)
                problems.Add($"{m.ModulePath}: lora_A has {m.A.Length} values and lora_B {m.B.Length}, which do not fit [{m.Rank}, {m.InFeatures}] and [{m.OutFeatures}, {m.Rank}]");
            if (!_byModule.TryAdd((m.Layer, m.Target), m))
                problems.Add($"{m.ModulePath}: given twice");
        }
        var targets = new SortedSet<string>(config.TargetModules, StringComparer.Ordinal);
        foreach (var layer in list.Select(m => m.Layer).Distinct().Order())
        {
            foreach (string t in targets)
                if (!_byModule.ContainsKey((layer, t)))
                    problems.Add($"{KeyPrefix}model.layers.{layer}.{ProjectionPath(t)}.lora_A.weight: missing (target_modules has {t})");
        }
        foreach (var m in list.Where(m => ProjectionIndex(m.Target) >= 0 && !targets.Contains(m.Target)))
            problems.Add($"{m.KeyA}: {m.Target} is not in adapter_config.json's target_modules [{string.Join(", ", targets)}]");
        if (list.Count == 0) problems.Add("the adapter has no LoRA modules");
        if (problems.Count > 0)
            throw new PeftAdapterException(where, "the adapter's tensors do not match its config", problems);
        Config = config;
        Modules = list.OrderBy(m => m.Layer).ThenBy(m => ProjectionIndex(m.Target)).ToArray();
    }

    /// <summary>The module adapting projection <paramref name="target"/> (q_proj …) of layer <paramref name="layer"/>, or null.</summary>
    public PeftLoraModule? Find(int layer, string target) => _byModule.GetValueOrDefault((layer, target));

    /// <summary>The number of decoder layers the adapter covers (highest adapted layer + 1).</summary>
    public int LayerCount => Modules.Max(m => m.Layer) + 1;

    // ---------------------------------------------------------------- names

    internal static int ProjectionIndex(string target)
    {
        for (int i = 0; i < LlamaDecoderLayer.Projections.Count; i++)
            if (LlamaDecoderLayer.Projections[i].Short == target) return i;
        return -1;
    }

    internal static string ProjectionPath(string target)
    {
        int i = ProjectionIndex(target);
        return i >= 0 ? LlamaDecoderLayer.Projections[i].Path : throw new ArgumentException($"unknown projection \"{target}\"", nameof(target));
    }

    /// <summary>
    /// Parses a PEFT key, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, into (0, "q_proj", 'A').
    /// False for anything else (including a projection under the wrong block, e.g. mlp.q_proj).
    /// </summary>
    public static bool TryParseKey(string key, out int layer, out string target, out char matrix)
    {
        ArgumentNullException.ThrowIfNull(key);
        layer = -1;
        target = "";
        matrix = '\0';
        var m = KeyPattern.Match(key);
        if (!m.Success) return false;
        int p = ProjectionIndex(m.Groups[3].Value);
        if (p < 0 || LlamaDecoderLayer.Projections[p].Path != m.Groups[2].Value + "." + m.Groups[3].Value) return false;
        layer = int.Parse(m.Groups[1].ValueSpan, provider: System.Globalization.CultureInfo.InvariantCulture);
        target = m.Groups[3].Value;
        matrix = m.Groups[4].Value[0];
        return true;
    }

    // ---------------------------------------------------------------- from / to a model

    /// <summary>
    /// The model's adapter (its LoRA settings and current A, B, copied to the host as fp32). The model needs LoRA
    /// (<see cref="LlamaModelOptions.Lora"/>).
    /// </summary>
    public static PeftAdapter FromModel(LlamaModel model, string? baseModelNameOrPath)
    {
        ArgumentNullException.ThrowIfNull(model);
        var lora = model.Options.Lora
            ?? throw new InvalidOperationException("the model has no LoRA adapters (LlamaModelOptions.Lora is null); nothing to save");
        var tensors = new Dictionary<(int, string), (float[]? A, float[]? B, int Rank, int In, int Out)>();
        foreach (var (name, param, _) in model.TrainableParameters)
        {
            if (!TryParseKey(name, out int layer, out string target, out char matrix))
                throw new InvalidOperationException($"trainable parameter {name} is not a PEFT LoRA key");
            var values = Download(model, param);
            tensors.TryGetValue((layer, target), out var e);
            if (matrix == 'A') e = (values, e.B, param.Rows, param.Columns, e.Out);
            else e = (e.A, values, e.Rank, e.In, param.Rows);
            tensors[(layer, target)] = e;
        }
        var modules = tensors.Select(kv => new PeftLoraModule(kv.Key.Item1, kv.Key.Item2, kv.Value.Rank, kv.Value.In, kv.Value.Out,
            kv.Value.A ?? throw new InvalidOperationException($"no lora_A for layer {kv.Key.Item1} {kv.Key.Item2}"),
            kv.Value.B ?? throw new InvalidOperationException($"no lora_B for layer {kv.Key.Item1} {kv.Key.Item2}")));
        return new PeftAdapter(PeftLoraConfig.From(lora, baseModelNameOrPath), modules);
    }

    private static float[] Download(LlamaModel model, Ops.Tensor t)
    {
        var values = new float[t.Count];
        if (t.DType == DType.F32) model.Ops.Download<float>(t, values);
        else if (t.DType == DType.F64)
        {
            var d = new double[t.Count];
            model.Ops.Download<double>(t, d);
            for (int i = 0; i < d.Length; i++) values[i] = (float)d[i];
        }
        else throw new NotSupportedException($"LoRA tensors in {t.DType}");
        return values;
    }

    /// <summary>
    /// Uploads the adapter's A and B into <paramref name="model"/>'s LoRA layers. Everything is checked first and nothing
    /// is changed on a mismatch: the model must have LoRA with the same r, scaling (lora_alpha, use_rslora) and
    /// target_modules, no merged layer, and each module's shapes must equal the model's (an adapter trained on another
    /// base fails with the key and both shapes). lora_dropout may differ (it only matters in training).
    /// </summary>
    public void ApplyTo(LlamaModel model)
    {
        ArgumentNullException.ThrowIfNull(model);
        string where = Source ?? "PEFT adapter";
        var lora = model.Options.Lora
            ?? throw new PeftAdapterException(where, "the model has no LoRA layers; build it with LlamaModelOptions.Lora = adapter.Config.ToLoraSettings()");
        var problems = new List<string>();
        if (lora.Rank != Config.R) problems.Add($"r: the adapter has r = {Config.R}, the model r = {lora.Rank}");
        if (Math.Abs(lora.Scaling - Config.Scaling) > 1e-12 * Math.Max(1, Math.Abs(Config.Scaling)))
            problems.Add($"lora_alpha / use_rslora: the adapter's scaling is {Config.Scaling} (lora_alpha {Config.LoraAlpha}, use_rslora {Config.UseRslora}), the model's {lora.Scaling} (alpha {lora.Alpha}, rslora {lora.UseRsLora})");
        var modelTargets = lora.TargetModules.Distinct().Order(StringComparer.Ordinal).ToArray();
        if (!modelTargets.SequenceEqual(Config.TargetModules.Order(StringComparer.Ordinal)))
            problems.Add($"target_modules: the adapter has [{string.Join(", ", Config.TargetModules)}], the model [{string.Join(", ", modelTargets)}]");
        if (model.LoraLayers.Any(l => l.IsMerged))
            problems.Add("the model's adapters are merged into its base weights; unmerge them first");

        var uploads = new List<(Ops.Tensor Param, float[] Values)>();
        var seen = new HashSet<(int, string)>();
        foreach (var (name, param, _) in model.TrainableParameters)
        {
            if (!TryParseKey(name, out int layer, out string target, out char matrix)) continue;
            var m = Find(layer, target);
            if (m is null)
            {
                problems.Add($"{name}: the model has it, the adapter does not");
                continue;
            }
            seen.Add((layer, target));
            int rows = matrix == 'A' ? m.Rank : m.OutFeatures, cols = matrix == 'A' ? m.InFeatures : m.Rank;
            if (param.Rank != 2 || param.Rows != rows || param.Columns != cols)
            {
                problems.Add($"{name}: the adapter has [{rows}, {cols}], the model expects [{param.ShapeText}] (was the adapter trained on another base model?)");
                continue;
            }
            uploads.Add((param, matrix == 'A' ? m.A : m.B));
        }
        foreach (var m in Modules.Where(m => !seen.Contains((m.Layer, m.Target))))
            problems.Add($"{m.KeyA}: the adapter has it, the model does not (the model has {model.Config.NumHiddenLayers} layers, targets [{string.Join(", ", modelTargets)}])");
        if (problems.Count > 0)
            throw new PeftAdapterException(where, "the adapter does not fit the model", problems);
        foreach (var (param, values) in uploads)
        {
            if (param.DType == DType.F32) model.Ops.Upload<float>(values, param);
            else if (param.DType == DType.F64) model.Ops.Upload<double>(Array.ConvertAll(values, v => (double)v), param);
            else throw new NotSupportedException($"LoRA tensors in {param.DType}");
        }
    }

    // ---------------------------------------------------------------- writing

    /// <summary>The safetensors tensors PEFT writes: per module lora_A then lora_B, F32, in the model's order.</summary>
    public IReadOnlyList<SafetensorsTensor> ToTensors()
    {
        var list = new List<SafetensorsTensor>();
        foreach (var m in Modules)
        {
            list.Add(SafetensorsTensor.From(m.KeyA, [m.Rank, m.InFeatures], m.A));
            list.Add(SafetensorsTensor.From(m.KeyB, [m.OutFeatures, m.Rank], m.B));
        }
        return list;
    }

    /// <summary>Saves <paramref name="model"/>'s adapter into the new folder <paramref name="dir"/> (see <see cref="Save(string)"/>).</summary>
    public static void Save(string dir, LlamaModel model, string? baseModelNameOrPath) => FromModel(model, baseModelNameOrPath).Save(dir);

    /// <summary>
    /// Writes adapter_config.json and adapter_model.safetensors (F32, metadata {"format": "pt"}) into
    /// <paramref name="dir"/>, atomically: both files go into a hidden temporary folder next to it (each flushed to
    /// disk), which is then renamed to <paramref name="dir"/>; on any error the temporary folder is removed and
    /// <paramref name="dir"/> is not created. <paramref name="dir"/> must not exist or be an empty folder.
    /// </summary>
    public void Save(string dir) => Save(dir, null);

    /// <param name="afterConfigWritten">Test hook: called with the temporary folder after the config is written.</param>
    internal void Save(string dir, Action<string>? afterConfigWritten)
    {
        ArgumentNullException.ThrowIfNull(dir);
        string full = Path.GetFullPath(dir).TrimEnd(Path.DirectorySeparatorChar);
        if (File.Exists(full))
            throw new PeftAdapterException(full, "is a file; the adapter needs a new (or empty) folder");
        if (Directory.Exists(full) && Directory.EnumerateFileSystemEntries(full).Any())
            throw new PeftAdapterException(full, "the folder exists and is not empty; refusing to overwrite it (save to a new folder)");
        if (Path.GetDirectoryName(full) is null) throw new PeftAdapterException(full, "has no parent folder");
        string temp = OutputFolder.TempPathFor(full);
        var tensors = ToTensors();
        try
        {
            Directory.CreateDirectory(temp);
            OutputFolder.WriteAllTextAtomic(Path.Combine(temp, PeftLoraConfig.FileName), Config.ToJson());
            afterConfigWritten?.Invoke(temp);
            SafetensorsWriter.Write(Path.Combine(temp, WeightsFileName), tensors, new Dictionary<string, string> { ["format"] = "pt" });
            if (Directory.Exists(full) && Directory.EnumerateFileSystemEntries(full).Any())
                throw new PeftAdapterException(full, "the folder was filled while the adapter was written; refusing to overwrite it");
            OutputFolder.Replace(temp, full);
        }
        catch (Exception e)
        {
            try { if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true); }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
            if (e is PeftAdapterException) throw;
            if (e is SafetensorsException or IOException or UnauthorizedAccessException)
                throw new PeftAdapterException(full, $"write failed: {e.Message}", e);
            throw;
        }
    }

    // ---------------------------------------------------------------- reading

    /// <summary>
    /// Loads a PEFT LoRA adapter folder. Throws <see cref="PeftAdapterException"/> naming the file and the field or key
    /// for: a missing folder or file, a config PEFT would reject or NativePeft does not support (see
    /// <see cref="PeftLoraConfig.Parse"/>), a key that is not base_model.model.model.layers.N.{self_attn|mlp}.X.lora_{A|B}.weight
    /// (DoRA's lora_magnitude_vector, biases, embeddings …), a dtype other than F32/BF16/F16, shapes inconsistent with
    /// r or with each other, a module missing its A or B, and a non-finite weight (NaN, ±inf or |x| &gt; 1e30,
    /// <see cref="Finite"/>; one pass over the values read).
    /// </summary>
    public static PeftAdapter Load(string dir)
    {
        ArgumentNullException.ThrowIfNull(dir);
        string full = Path.GetFullPath(dir);
        if (!Directory.Exists(full))
            throw new PeftAdapterException(full, File.Exists(full) ? "is a file, not an adapter folder" : "adapter folder does not exist");
        string configPath = Path.Combine(full, PeftLoraConfig.FileName);
        string weightsPath = Path.Combine(full, WeightsFileName);
        if (!File.Exists(configPath))
            throw new PeftAdapterException(full, $"no {PeftLoraConfig.FileName} in the folder (a PEFT adapter folder has {PeftLoraConfig.FileName} and {WeightsFileName})");
        if (!File.Exists(weightsPath))
        {
            string hint = File.Exists(Path.Combine(full, "adapter_model.bin")) ? "; it has adapter_model.bin (PyTorch pickle): convert it to safetensors" : "";
            throw new PeftAdapterException(full, $"no {WeightsFileName} in the folder{hint}");
        }
        byte[] json = TextInput.ReadFile(configPath, Limits.MaxJsonFileBytes, (problem, inner) => new PeftAdapterException(configPath, problem, inner));
        var config = PeftLoraConfig.ParseUtf8(json, configPath);

        SafetensorsFile file;
        try { file = SafetensorsFile.Open(weightsPath); }
        catch (SafetensorsException e) { throw new PeftAdapterException(weightsPath, e.Message, e); }
        using (file)
        {
            var problems = new List<string>();
            var parts = new Dictionary<(int, string), (SafetensorsTensorInfo? A, SafetensorsTensorInfo? B)>();
            foreach (var t in file.Tensors)
            {
                if (!TryParseKey(t.Name, out int layer, out string target, out char matrix))
                {
                    string why = t.Name.EndsWith("lora_magnitude_vector", StringComparison.Ordinal) ? " (DoRA's magnitude: DoRA is not supported)"
                        : t.Name.EndsWith(".bias", StringComparison.Ordinal) ? " (a bias: only bias \"none\" is supported)"
                        : t.Name.Contains(".lora_A.", StringComparison.Ordinal) || t.Name.Contains(".lora_B.", StringComparison.Ordinal)
                            ? " (LoRA on a module other than a decoder layer's q/k/v/o/gate/up/down_proj)"
                            : " (not a LoRA A/B tensor of a Llama projection)";
                    problems.Add($"{t.Name}: unexpected key{why}");
                    continue;
                }
                if (t.DType is not (DType.F32 or DType.BF16 or DType.F16))
                    problems.Add($"{t.Name}: dtype {t.DType.SafetensorsName()}, expected F32, BF16 or F16");
                if (t.Shape.Length != 2)
                    problems.Add($"{t.Name}: shape {HfFiles.Shape(t.Shape)} is not a matrix");
                parts.TryGetValue((layer, target), out var e);
                parts[(layer, target)] = matrix == 'A' ? (t, e.B) : (e.A, t);
            }
            var modules = new List<PeftLoraModule>();
            foreach (var ((layer, target), (a, b)) in parts.OrderBy(kv => kv.Key.Item1).ThenBy(kv => ProjectionIndex(kv.Key.Item2)))
            {
                string prefix = $"{KeyPrefix}model.layers.{layer}.{ProjectionPath(target)}";
                if (a is null || b is null)
                {
                    problems.Add($"{prefix}.lora_{(a is null ? 'A' : 'B')}.weight: missing (the file has lora_{(a is null ? 'B' : 'A')})");
                    continue;
                }
                if (a.Shape.Length != 2 || b.Shape.Length != 2) continue;
                long r = a.Shape[0], inF = a.Shape[1], outF = b.Shape[0];
                if (r != config.R)
                    problems.Add($"{a.Name}: shape {HfFiles.Shape(a.Shape)} has r = {r}, but adapter_config.json says r = {config.R}");
                if (b.Shape[1] != r)
                    problems.Add($"{b.Name}: shape {HfFiles.Shape(b.Shape)} does not match lora_A {HfFiles.Shape(a.Shape)} (expected [out, {r}])");
                if (r <= 0 || inF <= 0 || outF <= 0 || r * inF > Array.MaxLength || outF * r > Array.MaxLength)
                    problems.Add($"{prefix}: shapes {HfFiles.Shape(a.Shape)} and {HfFiles.Shape(b.Shape)} are empty or too large");
                if (problems.Count > 0) continue;
                float[] av = ReadSingle(file, a), bv = ReadSingle(file, b);
                // A NaN/inf (or |x| > 1e30) weight would turn every logit into NaN: refuse it here, naming the tensor.
                foreach (var (info, values) in new[] { (a, av), (b, bv) })
                    if (Finite.FirstBad(values) is long bad and >= 0)
                        problems.Add($"{info.Name}: {Finite.Describe(bad, values[bad])}: the adapter's weights are not finite (did its training diverge?)");
                if (problems.Count > 0) continue;
                modules.Add(new PeftLoraModule(layer, target, (int)r, (int)inF, (int)outF, av, bv));
            }
            if (problems.Count > 0)
                throw new PeftAdapterException(weightsPath, "the adapter's tensors are invalid", problems);
            return new PeftAdapter(config, modules, full) { Source = full };
        }
    }

    private static float[] ReadSingle(SafetensorsFile file, SafetensorsTensorInfo t)
    {
        var r = new float[t.ElementCount];
        switch (t.DType)
        {
            case DType.F32: file.GetSpan<float>(t.Name).CopyTo(r); break;
            case DType.BF16: BFloat16.ToSingle(file.GetSpan<BFloat16>(t.Name), r); break;
            default:
                var h = file.GetSpan<Half>(t.Name);
                for (int i = 0; i < h.Length; i++) r[i] = (float)h[i];
                break;
        }
        return r;
    }
}
