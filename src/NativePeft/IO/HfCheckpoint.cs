using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using NativePeft.Numerics;
using NativePeft.Quantization;

namespace NativePeft.IO;

/// <summary>
/// A Hugging Face checkpoint folder that cannot be opened, validated, read or written. The message names the folder
/// (or file) and every tensor or field at fault; <see cref="Problems"/> lists them one per entry.
/// </summary>
public sealed class HfCheckpointException : Exception
{
    /// <summary>Problems shown in the message; the rest are counted ("… and N more").</summary>
    public const int MaxProblemsInMessage = 40;

    public string Path { get; }
    public IReadOnlyList<string> Problems { get; }

    public HfCheckpointException(string path, string problem, Exception? inner = null)
        : base($"{path}: {problem}", inner)
    {
        Path = path;
        Problems = [problem];
    }

    public HfCheckpointException(string path, string summary, IReadOnlyList<string> problems)
        : base(Format(path, summary, problems))
    {
        Path = path;
        Problems = problems;
    }

    private static string Format(string path, string summary, IReadOnlyList<string> problems)
    {
        var sb = new StringBuilder($"{path}: {summary} ({problems.Count} problem{(problems.Count == 1 ? "" : "s")}):");
        foreach (string p in problems.Take(MaxProblemsInMessage))
            sb.Append("\n  - ").Append(p);
        if (problems.Count > MaxProblemsInMessage)
            sb.Append("\n  … and ").Append(problems.Count - MaxProblemsInMessage).Append(" more");
        return sb.ToString();
    }
}

/// <summary>
/// A Hugging Face Llama checkpoint folder: config.json plus model.safetensors, or model.safetensors.index.json and
/// the shards it lists (transformers' order: a model.safetensors present is used and the index ignored). Every
/// safetensors file is memory-mapped and its header validated on <see cref="Open"/>, which also checks the sharding
/// (listed files exist, each tensor is in exactly one file and where the index says); nothing is read until asked.
/// <see cref="Validate"/> checks the tensors against the config (headers only) and reports every problem at once.
/// 4-bit weights in the bitsandbytes layout (docs/quant-contract.md) are recognised by their quant_state key.
/// </summary>
public sealed class HfCheckpoint : IDisposable
{
    public const string SingleFileName = "model.safetensors";
    public const string IndexFileName = "model.safetensors.index.json";

    /// <summary>Key suffixes, after "&lt;module&gt;.weight", of bitsandbytes' 4-bit state tensors.</summary>
    internal static readonly string[] QuantComponentSuffixes =
        [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"];

    private readonly SafetensorsFile[] _files;
    private readonly Dictionary<string, SafetensorsFile> _where;

    /// <summary>The checkpoint folder (full path).</summary>
    public string Directory { get; }
    public LlamaConfig Config { get; }
    public bool IsSharded { get; }
    /// <summary>metadata.total_size of the index (informative only; not checked); null when single-file or absent.</summary>
    public long? IndexTotalSize { get; }
    /// <summary>The safetensors files, full paths, in the index's shard order.</summary>
    public IReadOnlyList<string> FilePaths { get; }
    /// <summary>Every tensor name in the checkpoint, ordinal order.</summary>
    public IReadOnlyList<string> TensorNames { get; }
    /// <summary>Whether any tensor has a bitsandbytes 4-bit quant state.</summary>
    public bool IsQuantizedCheckpoint { get; }

    private HfCheckpoint(string directory, LlamaConfig config, bool sharded, long? totalSize, SafetensorsFile[] files,
        Dictionary<string, SafetensorsFile> where)
    {
        Directory = directory;
        Config = config;
        IsSharded = sharded;
        IndexTotalSize = totalSize;
        _files = files;
        _where = where;
        FilePaths = files.Select(f => f.Path).ToArray();
        TensorNames = where.Keys.Order(StringComparer.Ordinal).ToArray();
        IsQuantizedCheckpoint = TensorNames.Any(n => n.Contains(".quant_state.bitsandbytes__", StringComparison.Ordinal));
    }

    // ---------------------------------------------------------------- opening

    /// <summary>
    /// Opens a checkpoint folder. Throws <see cref="HfCheckpointException"/> (folder or file, and the tensor) for a
    /// missing folder, config.json or weights file, a bad index, a missing shard, a tensor in two files or not where
    /// the index says, or a safetensors file that does not parse; <see cref="LlamaConfigException"/> for a bad config.json.
    /// </summary>
    public static HfCheckpoint Open(string dir)
    {
        ArgumentNullException.ThrowIfNull(dir);
        string full = Path.GetFullPath(dir);
        if (!System.IO.Directory.Exists(full))
            throw new HfCheckpointException(full, File.Exists(full)
                ? "is a file, not a checkpoint folder (expected a folder with config.json and model.safetensors)"
                : "checkpoint folder does not exist");
        string configPath = Path.Combine(full, LlamaConfig.FileName);
        if (!File.Exists(configPath))
            throw new HfCheckpointException(full,
                "no config.json in the folder (a Hugging Face checkpoint folder has config.json next to model.safetensors or model.safetensors.index.json)");
        LlamaConfig config = LlamaConfig.Load(configPath);

        string single = Path.Combine(full, SingleFileName);
        string index = Path.Combine(full, IndexFileName);
        if (File.Exists(single))
            return OpenFiles(full, config, sharded: false, null, [SingleFileName], null);
        if (File.Exists(index))
        {
            var (totalSize, weightMap, shardNames) = ReadIndex(index);
            return OpenFiles(full, config, sharded: true, totalSize, shardNames, weightMap);
        }
        string hint = System.IO.Directory.EnumerateFiles(full, "pytorch_model*.bin").Any()
            ? "; the folder has only PyTorch .bin weights, convert them to safetensors"
            : "";
        throw new HfCheckpointException(full, $"neither {SingleFileName} nor {IndexFileName} is in the folder{hint}");
    }

    /// <summary>Parses model.safetensors.index.json: weight_map (tensor → shard file name), metadata.total_size.</summary>
    private static (long? TotalSize, Dictionary<string, string> WeightMap, List<string> Shards) ReadIndex(string indexPath)
    {
        JsonDocument doc = TextInput.ReadJsonFile(indexPath, (problem, inner) => new HfCheckpointException(indexPath, problem, inner));
        using (doc)
        {
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new HfCheckpointException(indexPath, $"must be a JSON object, got {root.ValueKind}");
            long? totalSize = null;
            if (root.TryGetProperty("metadata", out JsonElement meta) && meta.ValueKind == JsonValueKind.Object
                && meta.TryGetProperty("total_size", out JsonElement ts) && ts.ValueKind == JsonValueKind.Number)
                totalSize = ts.TryGetInt64(out long t) ? t : ts.TryGetDouble(out double d) && d >= 0 && d < long.MaxValue ? (long)d : null;
            if (!root.TryGetProperty("weight_map", out JsonElement map))
                throw new HfCheckpointException(indexPath, "weight_map: missing");
            if (map.ValueKind != JsonValueKind.Object)
                throw new HfCheckpointException(indexPath, $"weight_map: must be an object of tensor name → file name, got {map.ValueKind}");
            var problems = new List<string>();
            var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
            var shards = new List<string>();
            var shardSet = new HashSet<string>(StringComparer.Ordinal); // a large weight_map must not cost shards × tensors
            foreach (JsonProperty p in map.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.String)
                {
                    problems.Add($"weight_map.{p.Name}: must be a file name string, got {p.Value.ValueKind}");
                    continue;
                }
                string file = p.Value.GetString()!;
                if (!HfFiles.IsPlainFileName(file))
                {
                    problems.Add($"weight_map.{p.Name}: \"{file}\" is not a plain file name in the checkpoint folder");
                    continue;
                }
                if (!weightMap.TryAdd(p.Name, file))
                {
                    problems.Add($"weight_map.{p.Name}: listed twice (\"{weightMap[p.Name]}\" and \"{file}\")");
                    continue;
                }
                if (shardSet.Add(file))
                    shards.Add(file);
            }
            if (weightMap.Count == 0 && problems.Count == 0)
                problems.Add("weight_map: is empty");
            if (problems.Count > 0)
                throw new HfCheckpointException(indexPath, "invalid index", problems);
            shards.Sort(StringComparer.Ordinal);
            return (totalSize, weightMap, shards);
        }
    }

    private static HfCheckpoint OpenFiles(string dir, LlamaConfig config, bool sharded, long? totalSize, List<string> names,
        Dictionary<string, string>? weightMap)
    {
        string where = sharded ? Path.Combine(dir, IndexFileName) : dir;
        List<string> missing = names.Where(n => !File.Exists(Path.Combine(dir, n))).ToList();
        if (missing.Count > 0)
            throw new HfCheckpointException(where, "shard files are missing",
                missing.Select(n => $"{n}: listed in weight_map but not in the folder").ToList());

        var files = new List<SafetensorsFile>();
        try
        {
            foreach (string n in names)
            {
                try
                {
                    files.Add(SafetensorsFile.Open(Path.Combine(dir, n)));
                }
                catch (SafetensorsException e)
                {
                    throw new HfCheckpointException(e.FilePath, Strip(e), e);
                }
            }
            var problems = new List<string>();
            var located = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
            foreach (SafetensorsFile f in files)
            {
                string fileName = Path.GetFileName(f.Path);
                foreach (SafetensorsTensorInfo t in f.Tensors)
                {
                    if (located.TryGetValue(t.Name, out SafetensorsFile? first))
                    {
                        problems.Add($"{t.Name}: appears in both {Path.GetFileName(first.Path)} and {fileName}");
                        continue;
                    }
                    located.Add(t.Name, f);
                    if (weightMap is not null)
                    {
                        if (!weightMap.TryGetValue(t.Name, out string? listed))
                            problems.Add($"{t.Name}: is in {fileName} but not in the index's weight_map");
                        else if (listed != fileName)
                            problems.Add($"{t.Name}: is in {fileName} but the index's weight_map says {listed}");
                    }
                }
            }
            if (weightMap is not null)
            {
                foreach (var (name, file) in weightMap.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                {
                    if (!located.ContainsKey(name))
                        problems.Add($"{name}: the index's weight_map lists it in {file}, which does not contain it");
                }
            }
            if (problems.Count > 0)
                throw new HfCheckpointException(where, "the shards do not match the index", problems);
            return new HfCheckpoint(dir, config, sharded, totalSize, files.ToArray(), located);
        }
        catch
        {
            foreach (SafetensorsFile f in files) f.Dispose();
            throw;
        }
    }

    // ---------------------------------------------------------------- lookup

    public bool Contains(string name) => _where.ContainsKey(name);

    /// <summary>The safetensors header entry (stored dtype and shape; for a 4-bit weight, the packed uint8 tensor).</summary>
    public SafetensorsTensorInfo GetInfo(string name) => FileOf(name).GetInfo(name);

    /// <summary>The full path of the file that holds <paramref name="name"/>.</summary>
    public string GetFilePath(string name) => FileOf(name).Path;

    private SafetensorsFile FileOf(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        ObjectDisposedException.ThrowIf(_disposed, this);
        return _where.TryGetValue(name, out SafetensorsFile? f) ? f : throw new HfCheckpointException(Directory, $"{name}: no such tensor in the checkpoint");
    }

    /// <summary>The raw little-endian bytes (a view of the mapping, valid until Dispose).</summary>
    public ReadOnlySpan<byte> GetBytes(string name) => Wrap(name, () => FileOf(name).GetMemory(name)).Span;

    /// <summary>The raw bytes as Memory (valid until Dispose).</summary>
    public ReadOnlyMemory<byte> GetMemory(string name) => Wrap(name, () => FileOf(name).GetMemory(name));

    private T Wrap<T>(string name, Func<T> f)
    {
        try { return f(); }
        catch (SafetensorsException e) { throw new HfCheckpointException(e.FilePath, Strip(e), e); }
    }

    /// <summary>
    /// The logical shape of a tensor: the header's shape, or for a bitsandbytes 4-bit weight the shape in its quant
    /// state (the original [out, in]).
    /// </summary>
    public long[] GetShape(string name)
    {
        if (!IsQuantized(name))
            return (long[])GetInfo(name).Shape.Clone();
        var (state, problem) = ReadQuantStateHeader(name);
        return state?.Shape ?? throw new HfCheckpointException(GetFilePath(name), $"{name}: {problem}");
    }

    // ---------------------------------------------------------------- typed reads

    /// <summary>
    /// Reads a float tensor into <paramref name="destination"/> (float, BFloat16 or Half), converting from the stored
    /// BF16, F16 or F32: widening conversions are exact, narrowing ones round to nearest even.
    /// </summary>
    public void Read<T>(string name, Span<T> destination) where T : unmanaged
    {
        SafetensorsTensorInfo info = GetInfo(name);
        string file = GetFilePath(name);
        if (IsQuantized(name))
            throw new HfCheckpointException(file, $"{name}: is a bitsandbytes 4-bit weight; load it with LoadQuantized");
        DType want = DTypes.Of<T>();
        if (want is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"element type {typeof(T).Name} is not float, BFloat16 or Half", nameof(T));
        if (info.DType is not (DType.F32 or DType.BF16 or DType.F16))
            throw new HfCheckpointException(file, $"{name}: is {info.DType.SafetensorsName()}, not a float tensor (BF16, F16 or F32)");
        if (destination.Length != info.ElementCount)
            throw new ArgumentException($"{name}: destination has {destination.Length} elements, the tensor {info.ElementCount}", nameof(destination));
        ReadOnlySpan<byte> bytes = GetBytes(name);
        CheckFinite(name, file, info.DType, bytes);
        if (info.DType == want)
        {
            bytes.CopyTo(MemoryMarshal.AsBytes(destination));
            return;
        }
        // Through float: BF16 → float and F16 → float are exact; float → BF16 and float → Half round to nearest even.
        const int Chunk = 1 << 16;
        float[] buffer = new float[Math.Min(Chunk, destination.Length)];
        for (int start = 0; start < destination.Length; start += Chunk)
        {
            int n = Math.Min(Chunk, destination.Length - start);
            Span<float> f = buffer.AsSpan(0, n);
            int size = info.DType.ElementSize();
            ReadOnlySpan<byte> src = bytes.Slice(start * size, n * size);
            switch (info.DType)
            {
                case DType.F32: MemoryMarshal.Cast<byte, float>(src).CopyTo(f); break;
                case DType.BF16: BFloat16.ToSingle(MemoryMarshal.Cast<byte, BFloat16>(src), f); break;
                default:
                    ReadOnlySpan<Half> h = MemoryMarshal.Cast<byte, Half>(src);
                    for (int i = 0; i < n; i++) f[i] = (float)h[i];
                    break;
            }
            Span<T> dst = destination.Slice(start, n);
            if (want == DType.F32)
                f.CopyTo(MemoryMarshal.Cast<T, float>(dst));
            else if (want == DType.BF16)
                BFloat16.FromSingle(f, MemoryMarshal.Cast<T, BFloat16>(dst));
            else
            {
                Span<Half> hd = MemoryMarshal.Cast<T, Half>(dst);
                for (int i = 0; i < n; i++) hd[i] = (Half)f[i];
            }
        }
    }

    /// <summary>
    /// A weight with a NaN, ±inf or |x| &gt; 1e30 (<see cref="Finite"/>) is refused when it is read, naming the tensor and
    /// the element: a diverged or corrupt checkpoint would otherwise train, generate or merge NaN. One pass, as stored.
    /// </summary>
    private static void CheckFinite(string name, string file, DType stored, ReadOnlySpan<byte> bytes)
    {
        long bad;
        double value;
        switch (stored)
        {
            case DType.F32:
                var f = MemoryMarshal.Cast<byte, float>(bytes);
                bad = Finite.FirstBad(f);
                value = bad >= 0 ? f[(int)bad] : 0;
                break;
            case DType.BF16:
                var b = MemoryMarshal.Cast<byte, BFloat16>(bytes);
                bad = Finite.FirstBad(b);
                value = bad >= 0 ? (double)b[(int)bad] : 0;
                break;
            default:
                var h = MemoryMarshal.Cast<byte, Half>(bytes);
                bad = Finite.FirstBad(h);
                value = bad >= 0 ? (double)h[(int)bad] : 0;
                break;
        }
        if (bad >= 0)
            throw new HfCheckpointException(file, $"{name}: {Finite.Describe(bad, value)}: the checkpoint's weights are not finite (a diverged run or a corrupt file)");
    }

    /// <summary>A copy of a float tensor as T[] (float, BFloat16 or Half), converted as <see cref="Read{T}"/> does.</summary>
    public T[] ReadArray<T>(string name) where T : unmanaged
    {
        long n = GetInfo(name).ElementCount;
        if (n > Array.MaxLength)
            throw new HfCheckpointException(GetFilePath(name), $"{name}: {n} elements do not fit one array");
        var r = new T[n];
        Read<T>(name, r);
        return r;
    }

    public float[] ReadSingle(string name) => ReadArray<float>(name);
    public BFloat16[] ReadBFloat16(string name) => ReadArray<BFloat16>(name);

    // ---------------------------------------------------------------- 4-bit weights

    /// <summary>
    /// Whether <paramref name="weightName"/> ("model.layers.0.mlp.down_proj.weight") is stored as a bitsandbytes
    /// 4-bit weight, i.e. "&lt;weightName&gt;.quant_state.bitsandbytes__nf4" (or __fp4) is present.
    /// </summary>
    public bool IsQuantized(string weightName) =>
        _where.ContainsKey(weightName + ".quant_state.bitsandbytes__nf4") || _where.ContainsKey(weightName + ".quant_state.bitsandbytes__fp4");

    /// <summary>
    /// Loads a 4-bit weight through <see cref="BitsAndBytes4Bit.Load"/> (which validates it completely). Its state
    /// tensors may sit in different shards (transformers' sharding splits between tensors): they are then gathered
    /// into a temporary safetensors file for the loader.
    /// </summary>
    public Quantized4BitTensor LoadQuantized(string weightName)
    {
        ArgumentNullException.ThrowIfNull(weightName);
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!IsQuantized(weightName))
            throw new HfCheckpointException(Directory, $"{weightName}: is not a bitsandbytes 4-bit weight (no {weightName}.quant_state.bitsandbytes__nf4 or __fp4)");
        if (!weightName.EndsWith(".weight", StringComparison.Ordinal) && weightName != "weight")
            throw new HfCheckpointException(Directory, $"{weightName}: a 4-bit weight's name must end in \".weight\"");
        string prefix = weightName[..^"weight".Length];
        var components = QuantComponentSuffixes.Select(s => weightName + s).Prepend(weightName).Where(_where.ContainsKey).ToList();
        var files = components.Select(c => _where[c]).Distinct().ToList();
        if (files.Count == 1)
        {
            try { return BitsAndBytes4Bit.Load(files[0], prefix); }
            catch (SafetensorsException e) { throw new HfCheckpointException(e.FilePath, Strip(e), e); }
        }
        string tempDir = Path.Combine(Path.GetTempPath(), "nativepeft-" + Guid.NewGuid().ToString("N"));
        System.IO.Directory.CreateDirectory(tempDir);
        string temp = Path.Combine(tempDir, "gathered.safetensors");
        try
        {
            SafetensorsWriter.Write(temp, components.Select(c =>
            {
                SafetensorsTensorInfo i = GetInfo(c);
                return new SafetensorsTensor(c, i.DType, i.Shape, GetMemory(c));
            }));
            using SafetensorsFile gathered = SafetensorsFile.Open(temp);
            return BitsAndBytes4Bit.Load(gathered, prefix);
        }
        catch (SafetensorsException e)
        {
            string shards = string.Join(", ", files.Select(f => Path.GetFileName(f.Path)));
            throw new HfCheckpointException(Directory, e.Message.Replace(temp, $"[{shards}]", StringComparison.Ordinal), e);
        }
        finally
        {
            try { System.IO.Directory.Delete(tempDir, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    private sealed record QuantHeader(QuantType QuantType, int Blocksize, long[] Shape, bool Nested);

    /// <summary>Parses a 4-bit weight's quant state JSON (small) without reading its data.</summary>
    private (QuantHeader? State, string? Problem) ReadQuantStateHeader(string weightName)
    {
        string nf4 = weightName + ".quant_state.bitsandbytes__nf4", fp4 = weightName + ".quant_state.bitsandbytes__fp4";
        if (_where.ContainsKey(nf4) && _where.ContainsKey(fp4))
            return (null, "has both an nf4 and an fp4 quant state");
        string key = _where.ContainsKey(nf4) ? nf4 : fp4;
        QuantType keyType = key == nf4 ? QuantType.Nf4 : QuantType.Fp4;
        SafetensorsTensorInfo info = GetInfo(key);
        if (info.DType != DType.U8)
            return (null, $"{key} is {info.DType.SafetensorsName()}, expected U8 bytes of a JSON");
        try
        {
            ReadOnlyMemory<byte> json = GetMemory(key);
            if (TextInput.Utf8Problem(json.Span, json: true) is { } text)
                return (null, $"{key}: quant state JSON: {text}");
            using JsonDocument doc = JsonDocument.Parse(json);
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                return (null, $"{key}: quant state JSON is not an object");
            if (!root.TryGetProperty("quant_type", out JsonElement qt) || qt.ValueKind != JsonValueKind.String
                || !QuantTypes.TryParse(qt.GetString()!, out QuantType quantType) || quantType != keyType)
                return (null, $"{key}: quant_type does not match the key suffix {keyType.Name()}");
            if (!root.TryGetProperty("blocksize", out JsonElement bs) || bs.ValueKind != JsonValueKind.Number || !bs.TryGetInt32(out int blocksize) || blocksize <= 0)
                return (null, $"{key}: blocksize missing or not a positive integer");
            if (!root.TryGetProperty("shape", out JsonElement sh) || sh.ValueKind != JsonValueKind.Array)
                return (null, $"{key}: shape missing or not a list");
            var shape = new List<long>();
            foreach (JsonElement d in sh.EnumerateArray())
            {
                if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long v) || v < 0)
                    return (null, $"{key}: shape entry {d} is not a non-negative integer");
                shape.Add(v);
            }
            return (new QuantHeader(quantType, blocksize, shape.ToArray(), root.TryGetProperty("nested_offset", out _)), null);
        }
        catch (JsonException e)
        {
            return (null, $"{key}: invalid quant state JSON: {e.Message}");
        }
    }

    // ---------------------------------------------------------------- validation

    /// <summary>
    /// Every problem with the tensors against <see cref="Config"/>, one line each naming the tensor (and file):
    /// a missing tensor, a wrong shape ([got] vs [expected]), a dtype other than BF16/F16/F32, an inconsistent 4-bit
    /// weight (checked by its quant state's shape, packed length, absmax count, quant_map), an unexpected tensor.
    /// Only headers are read. rotary_emb.inv_freq buffers and a tied lm_head.weight are ignored as transformers does.
    /// </summary>
    public IReadOnlyList<string> FindProblems()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var problems = new List<string>();
        var accounted = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, shape) in Config.ExpectedTensors())
        {
            if (IsQuantized(name))
            {
                accounted.Add(name);
                foreach (string s in QuantComponentSuffixes)
                    accounted.Add(name + s);
                CheckQuantized(name, shape, problems);
                continue;
            }
            if (!Contains(name))
            {
                problems.Add($"{name}: missing (expected shape {HfFiles.Shape(shape)})");
                continue;
            }
            accounted.Add(name);
            SafetensorsTensorInfo info = GetInfo(name);
            string file = Path.GetFileName(GetFilePath(name));
            if (!info.Shape.AsSpan().SequenceEqual(shape))
                problems.Add($"{name}: shape {HfFiles.Shape(info.Shape)} in {file}, but the config expects {HfFiles.Shape(shape)}");
            if (info.DType is not (DType.BF16 or DType.F16 or DType.F32))
                problems.Add($"{name}: dtype {info.DType.SafetensorsName()} in {file}, expected BF16, F16 or F32"
                    + (info.DType == DType.U8 ? " (a 4-bit weight needs its quant_state tensor)" : ""));
        }
        foreach (string name in TensorNames)
        {
            if (accounted.Contains(name)) continue;
            if (name.EndsWith("rotary_emb.inv_freq", StringComparison.Ordinal)) continue;
            if (name == "lm_head.weight" && Config.TieWordEmbeddings) continue;
            problems.Add($"{name}: unexpected tensor in {Path.GetFileName(GetFilePath(name))} (not part of a Llama model with this config)");
        }
        return problems;
    }

    private void CheckQuantized(string name, long[] expected, List<string> problems)
    {
        var (state, problem) = ReadQuantStateHeader(name);
        if (state is null)
        {
            problems.Add($"{name}: {problem}");
            return;
        }
        if (!state.Shape.AsSpan().SequenceEqual(expected))
            problems.Add($"{name}: 4-bit quant state shape {HfFiles.Shape(state.Shape)}, but the config expects {HfFiles.Shape(expected)}");
        long n;
        try { n = DTypes.ElementCount(state.Shape); }
        catch (Exception e) when (e is OverflowException or ArgumentException) { problems.Add($"{name}: quant state shape is invalid"); return; }
        void Expect(string key, DType dtype, long count)
        {
            if (!Contains(key))
            {
                problems.Add($"{key}: missing (part of the 4-bit weight {name})");
                return;
            }
            SafetensorsTensorInfo i = GetInfo(key);
            if (i.DType != dtype || i.ElementCount != count)
                problems.Add($"{key}: {i.DType.SafetensorsName()} {HfFiles.Shape(i.Shape)}, expected {dtype.SafetensorsName()} with {count} elements");
        }
        long blocks = Quant4Bit.BlockCount(n, state.Blocksize);
        Expect(name, DType.U8, Quant4Bit.PackedLength(n));
        Expect(name + ".absmax", state.Nested ? DType.U8 : DType.F32, blocks);
        Expect(name + ".quant_map", DType.F32, 16);
        if (state.Nested)
        {
            if (!Contains(name + ".nested_absmax")) problems.Add($"{name}.nested_absmax: missing (the quant state has nested_offset)");
            if (!Contains(name + ".nested_quant_map")) problems.Add($"{name}.nested_quant_map: missing (the quant state has nested_offset)");
        }
    }

    /// <summary>Throws one <see cref="HfCheckpointException"/> listing every problem <see cref="FindProblems"/> finds.</summary>
    public void Validate()
    {
        IReadOnlyList<string> problems = FindProblems();
        if (problems.Count > 0)
            throw new HfCheckpointException(Directory, "the checkpoint does not match its config.json", problems);
    }

    // ---------------------------------------------------------------- writing

    /// <summary>
    /// Writes a checkpoint folder as transformers' save_pretrained does: config.json (<see cref="LlamaConfig.ToJson"/>)
    /// and model.safetensors when everything fits in <paramref name="maxShardBytes"/>, else shards
    /// model-0000k-of-0000n.safetensors (tensors in the given order, a new shard when the next tensor would overflow
    /// it; a bitsandbytes 4-bit weight's state tensors stay in its shard) and model.safetensors.index.json. Each
    /// safetensors file carries {"format": "pt"} metadata. The folder is created if needed; it must not already hold
    /// config.json, model.safetensors, the index or model-*-of-*.safetensors. Every file is written atomically, and on
    /// any error the files (and folders) written so far are removed. Tensors and config are checked before writing.
    /// </summary>
    public static void Write(string dir, LlamaConfig config, IEnumerable<SafetensorsTensor> tensors, long maxShardBytes)
    {
        ArgumentNullException.ThrowIfNull(dir);
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(tensors);
        string full = Path.GetFullPath(dir);
        if (maxShardBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(maxShardBytes), maxShardBytes, "must be positive");
        config.Validate(Path.Combine(full, LlamaConfig.FileName));
        List<SafetensorsTensor> list = tensors.ToList();
        CheckTensors(full, list);

        if (System.IO.Directory.Exists(full))
        {
            var existing = new[] { LlamaConfig.FileName, SingleFileName, IndexFileName }
                .Where(n => File.Exists(Path.Combine(full, n)))
                .Concat(System.IO.Directory.EnumerateFiles(full, "model-*-of-*.safetensors").Select(Path.GetFileName).OfType<string>())
                .ToList();
            if (existing.Count > 0)
                throw new HfCheckpointException(full, "the folder already holds a checkpoint; write to a new folder",
                    existing.Select(n => $"{n}: already exists").ToList());
        }

        List<List<SafetensorsTensor>> shards = PlanShards(list, maxShardBytes);
        var created = new List<string>();
        var createdDirs = new List<string>();
        try
        {
            for (string? d = full; d is not null && !System.IO.Directory.Exists(d); d = Path.GetDirectoryName(d))
                createdDirs.Add(d);
            System.IO.Directory.CreateDirectory(full);
            var metadata = new Dictionary<string, string> { ["format"] = "pt" };
            if (shards.Count == 1)
            {
                string path = Path.Combine(full, SingleFileName);
                created.Add(path);
                SafetensorsWriter.Write(path, shards[0], metadata);
            }
            else
            {
                var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
                for (int k = 0; k < shards.Count; k++)
                {
                    string name = HfFiles.ShardName(k + 1, shards.Count);
                    string path = Path.Combine(full, name);
                    created.Add(path);
                    SafetensorsWriter.Write(path, shards[k], metadata);
                    foreach (SafetensorsTensor t in shards[k]) weightMap[t.Name] = name;
                }
                string index = Path.Combine(full, IndexFileName);
                created.Add(index);
                OutputFolder.WriteAllTextAtomic(index, IndexJson(list.Sum(t => (long)t.Data.Length), weightMap));
            }
            string configPath = Path.Combine(full, LlamaConfig.FileName);
            created.Add(configPath);
            OutputFolder.WriteAllTextAtomic(configPath, config.ToJson());
        }
        catch (Exception e)
        {
            foreach (string path in created) OutputFolder.TryDelete(path);
            foreach (string d in createdDirs)
            {
                try { System.IO.Directory.Delete(d, recursive: false); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            }
            if (e is HfCheckpointException) throw;
            if (e is SafetensorsException se) throw new HfCheckpointException(se.FilePath, Strip(se), se);
            if (e is IOException or UnauthorizedAccessException) throw new HfCheckpointException(full, $"write failed: {e.Message}", e);
            throw;
        }
    }

    /// <summary>Names unique and not reserved; data length = dtype size × shape; reports all problems at once.</summary>
    private static void CheckTensors(string dir, List<SafetensorsTensor> list)
    {
        var problems = new List<string>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (SafetensorsTensor t in list)
        {
            if (string.IsNullOrEmpty(t.Name) || t.Name == "__metadata__")
            {
                problems.Add($"\"{t.Name}\": not a valid tensor name");
                continue;
            }
            if (!names.Add(t.Name))
                problems.Add($"{t.Name}: given twice");
            long expected;
            try { expected = checked(DTypes.ElementCount(t.Shape) * t.DType.ElementSize()); }
            catch (Exception e) when (e is OverflowException or ArgumentException)
            {
                problems.Add($"{t.Name}: invalid shape {HfFiles.Shape(t.Shape)}");
                continue;
            }
            if (expected != t.Data.Length)
                problems.Add($"{t.Name}: has {t.Data.Length} bytes but {t.DType.SafetensorsName()} {HfFiles.Shape(t.Shape)} needs {expected}");
        }
        if (list.Count == 0)
            problems.Add("no tensors to write");
        if (problems.Count > 0)
            throw new HfCheckpointException(dir, "cannot write these tensors", problems);
    }

    /// <summary>The group a tensor is sharded with: a 4-bit weight's state tensors go with "&lt;module&gt;.weight".</summary>
    private static string ShardGroup(string name)
    {
        foreach (string s in QuantComponentSuffixes)
        {
            if (name.EndsWith(s, StringComparison.Ordinal))
                return name[..^s.Length];
        }
        return name;
    }

    private static List<List<SafetensorsTensor>> PlanShards(List<SafetensorsTensor> list, long maxShardBytes)
    {
        // Groups in order of first appearance (a 4-bit weight and its state tensors form one group).
        var groups = new List<List<SafetensorsTensor>>();
        var byKey = new Dictionary<string, List<SafetensorsTensor>>(StringComparer.Ordinal);
        foreach (SafetensorsTensor t in list)
        {
            string key = ShardGroup(t.Name);
            if (!byKey.TryGetValue(key, out var g))
            {
                g = [];
                byKey.Add(key, g);
                groups.Add(g);
            }
            g.Add(t);
        }
        var shards = new List<List<SafetensorsTensor>>();
        List<SafetensorsTensor>? current = null;
        long size = 0;
        foreach (var g in groups)
        {
            long bytes = g.Sum(t => (long)t.Data.Length);
            if (current is null || (current.Count > 0 && size + bytes > maxShardBytes))
            {
                current = [];
                shards.Add(current);
                size = 0;
            }
            current.AddRange(g);
            size += bytes;
        }
        return shards;
    }

    /// <summary>The index as transformers writes it: json.dumps(indent=2, sort_keys=True) + "\n".</summary>
    private static string IndexJson(long totalSize, SortedDictionary<string, string> weightMap)
    {
        var sb = new StringBuilder("{\n  \"metadata\": {\n    \"total_size\": ");
        sb.Append(totalSize.ToString(CultureInfo.InvariantCulture)).Append("\n  },\n  \"weight_map\": {\n");
        int k = 0;
        foreach (var (name, file) in weightMap)
        {
            sb.Append("    ").Append(PythonJson.String(name)).Append(": ").Append(PythonJson.String(file));
            sb.Append(++k < weightMap.Count ? ",\n" : "\n");
        }
        return sb.Append("  }\n}\n").ToString();
    }

    /// <summary>A SafetensorsException's message without its leading "path: ".</summary>
    private static string Strip(SafetensorsException e) =>
        e.Message.StartsWith(e.FilePath + ": ", StringComparison.Ordinal) ? e.Message[(e.FilePath.Length + 2)..] : e.Message;

    // ---------------------------------------------------------------- disposal

    private bool _disposed;

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (SafetensorsFile f in _files) f.Dispose();
    }
}
