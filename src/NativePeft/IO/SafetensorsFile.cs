using System.Buffers;
using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using NativePeft.Numerics;

namespace NativePeft.IO;

/// <summary>One tensor entry of a safetensors header. Offsets are relative to the data buffer after the header.</summary>
public sealed record SafetensorsTensorInfo(string Name, DType DType, long[] Shape, long Begin, long End)
{
    public long ByteLength => End - Begin;
    public long ElementCount => DTypes.ElementCount(Shape);
}

/// <summary>
/// A safetensors file opened read-only and memory-mapped. The header is validated completely on open (see
/// <see cref="Open"/>); tensor data is exposed as spans over the mapping, valid until <see cref="Dispose"/>.
/// </summary>
public sealed class SafetensorsFile : IDisposable
{
    /// <summary>Largest header accepted (as the Rust implementation: 100 MB).</summary>
    public const long MaxHeaderLength = 100_000_000;

    private readonly MemoryMappedFile? _map;
    private readonly MappedView? _view;
    private readonly Dictionary<string, SafetensorsTensorInfo> _tensors;
    private readonly long _dataStart;

    public string Path { get; }
    /// <summary>Tensors in data-offset order.</summary>
    public IReadOnlyList<SafetensorsTensorInfo> Tensors { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    private SafetensorsFile(string path, MemoryMappedFile? map, MappedView? view, long dataStart,
        List<SafetensorsTensorInfo> tensors, Dictionary<string, string> metadata)
    {
        Path = path;
        _map = map;
        _view = view;
        _dataStart = dataStart;
        Tensors = tensors;
        _tensors = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
        Metadata = metadata;
    }

    /// <summary>
    /// Opens and validates: at least 8 bytes; header length ≤ 100 MB and within the file; the header is a UTF-8 JSON
    /// object; every tensor has a known dtype, a shape of non-negative integers and data_offsets [begin, end] with
    /// begin ≤ end, end − begin = element size × prod(shape), inside the data buffer, not overlapping, and together
    /// covering the buffer exactly (as the Rust implementation requires); __metadata__ is a string→string map.
    /// Throws <see cref="SafetensorsException"/> naming the file.
    /// </summary>
    public static SafetensorsFile Open(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        string full = System.IO.Path.GetFullPath(path);
        long fileLength;
        try
        {
            fileLength = new FileInfo(full).Length;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new SafetensorsException(full, null, $"cannot open: {e.Message}", e);
        }
        if (fileLength < 8)
            throw new SafetensorsException(full, null, $"file is {fileLength} bytes, shorter than the 8-byte header length");

        MemoryMappedFile? map = null;
        MappedView? view = null;
        try
        {
            using (var fs = new FileStream(full, FileMode.Open, FileAccess.Read, FileShare.Read))
            {
                map = MemoryMappedFile.CreateFromFile(fs, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: false);
            }
            view = new MappedView(map, fileLength);
            ReadOnlySpan<byte> all = view.Span(0, 8);
            ulong headerLength = BitConverter.ToUInt64(all);
            if (!BitConverter.IsLittleEndian)
                headerLength = System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(headerLength);
            if (headerLength > MaxHeaderLength)
                throw new SafetensorsException(full, "header", $"header length {headerLength} exceeds the {MaxHeaderLength}-byte limit");
            if (8 + (long)headerLength > fileLength)
                throw new SafetensorsException(full, "header", $"header length {headerLength} runs past the end of the {fileLength}-byte file");
            long dataStart = 8 + (long)headerLength;
            var (tensors, metadata) = ParseHeader(full, view.Span(8, (int)headerLength), fileLength - dataStart);
            return new SafetensorsFile(full, map, view, dataStart, tensors, metadata);
        }
        catch (SafetensorsException)
        {
            view?.Dispose();
            map?.Dispose();
            throw;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            view?.Dispose();
            map?.Dispose();
            throw new SafetensorsException(full, null, $"cannot map: {e.Message}", e);
        }
    }

    private static (List<SafetensorsTensorInfo>, Dictionary<string, string>) ParseHeader(string path, ReadOnlySpan<byte> header, long bufferLength)
    {
        JsonDocument doc = TextInput.ParseJson(header.ToArray(), (problem, inner) => new SafetensorsException(path, "header", problem, inner),
            new JsonDocumentOptions { AllowTrailingCommas = false, CommentHandling = JsonCommentHandling.Disallow });
        using (doc)
        {
            JsonElement root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new SafetensorsException(path, "header", $"must be a JSON object, got {root.ValueKind}");
            var tensors = new List<SafetensorsTensorInfo>();
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (JsonProperty p in root.EnumerateObject())
            {
                if (!seen.Add(p.Name))
                    throw new SafetensorsException(path, p.Name, "appears twice in the header");
                if (p.Name == "__metadata__")
                {
                    if (p.Value.ValueKind != JsonValueKind.Object)
                        throw new SafetensorsException(path, "__metadata__", $"must be an object of strings, got {p.Value.ValueKind}");
                    foreach (JsonProperty m in p.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String)
                            throw new SafetensorsException(path, $"__metadata__.{m.Name}", $"must be a string, got {m.Value.ValueKind}");
                        if (!metadata.TryAdd(m.Name, m.Value.GetString()!))
                            throw new SafetensorsException(path, $"__metadata__.{m.Name}", "appears twice");
                    }
                    continue;
                }
                tensors.Add(ParseTensor(path, p.Name, p.Value, bufferLength));
            }
            // Offsets: sorted, contiguous from 0, ending at the buffer's end (no overlap, no holes).
            tensors.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
            long expected = 0;
            foreach (SafetensorsTensorInfo t in tensors)
            {
                if (t.Begin < expected)
                    throw new SafetensorsException(path, t.Name, $"data_offsets [{t.Begin}, {t.End}] overlap the previous tensor (ends at {expected})");
                if (t.Begin > expected)
                    throw new SafetensorsException(path, t.Name, $"data_offsets [{t.Begin}, {t.End}] leave a gap after byte {expected} of the data buffer");
                expected = t.End;
            }
            if (expected != bufferLength)
                throw new SafetensorsException(path, "data", $"tensors cover {expected} bytes but the data buffer has {bufferLength}");
            return (tensors, metadata);
        }
    }

    private static SafetensorsTensorInfo ParseTensor(string path, string name, JsonElement e, long bufferLength)
    {
        if (e.ValueKind != JsonValueKind.Object)
            throw new SafetensorsException(path, name, $"must be an object with dtype, shape, data_offsets, got {e.ValueKind}");
        if (!e.TryGetProperty("dtype", out JsonElement dt) || dt.ValueKind != JsonValueKind.String)
            throw new SafetensorsException(path, name, "missing or non-string dtype");
        string dtypeName = dt.GetString()!;
        if (!DTypes.TryParseSafetensorsName(dtypeName, out DType dtype))
            throw new SafetensorsException(path, name, $"unknown dtype \"{dtypeName}\"");
        if (!e.TryGetProperty("shape", out JsonElement sh) || sh.ValueKind != JsonValueKind.Array)
            throw new SafetensorsException(path, name, "missing or non-array shape");
        if (sh.GetArrayLength() > Limits.MaxTensorDimensions)
            throw new SafetensorsException(path, name, $"shape has {sh.GetArrayLength()} dimensions, more than {Limits.MaxTensorDimensions}");
        var shape = new long[sh.GetArrayLength()];
        int k = 0;
        foreach (JsonElement d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long v) || v < 0)
                throw new SafetensorsException(path, name, $"shape entry {d} is not a non-negative integer");
            shape[k++] = v;
        }
        if (!e.TryGetProperty("data_offsets", out JsonElement off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new SafetensorsException(path, name, "data_offsets must be an array [begin, end]");
        long[] be = new long[2];
        k = 0;
        foreach (JsonElement d in off.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long v) || v < 0)
                throw new SafetensorsException(path, name, $"data_offsets entry {d} is not a non-negative integer");
            be[k++] = v;
        }
        foreach (JsonProperty extra in e.EnumerateObject())
        {
            if (extra.Name is not ("dtype" or "shape" or "data_offsets"))
                throw new SafetensorsException(path, name, $"unexpected field \"{extra.Name}\"");
        }
        long begin = be[0], end = be[1];
        if (end < begin)
            throw new SafetensorsException(path, name, $"data_offsets [{begin}, {end}]: end is before begin");
        if (end > bufferLength)
            throw new SafetensorsException(path, name, $"data_offsets [{begin}, {end}] run past the {bufferLength}-byte data buffer");
        long bytes;
        try
        {
            bytes = checked(DTypes.ElementCount(shape) * dtype.ElementSize());
        }
        catch (OverflowException)
        {
            throw new SafetensorsException(path, name, $"shape [{string.Join(", ", shape)}] is too large");
        }
        if (bytes != end - begin)
            throw new SafetensorsException(path, name,
                $"data_offsets [{begin}, {end}] hold {end - begin} bytes but {dtypeName} [{string.Join(", ", shape)}] needs {bytes}");
        return new SafetensorsTensorInfo(name, dtype, shape, begin, end);
    }

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public SafetensorsTensorInfo GetInfo(string name)
    {
        ObjectDisposedException.ThrowIf(_view is null || _view.IsDisposed, this);
        return _tensors.TryGetValue(name, out var t) ? t : throw new SafetensorsException(Path, name, "no such tensor");
    }

    /// <summary>The tensor's raw little-endian bytes (a view of the mapping).</summary>
    public ReadOnlySpan<byte> GetBytes(string name)
    {
        SafetensorsTensorInfo t = GetInfo(name);
        if (t.ByteLength > int.MaxValue)
            throw new SafetensorsException(Path, name, $"{t.ByteLength} bytes do not fit one span");
        return _view!.Span(_dataStart + t.Begin, (int)t.ByteLength);
    }

    /// <summary>The tensor's bytes as Memory (for APIs that work in parallel); valid until Dispose.</summary>
    public ReadOnlyMemory<byte> GetMemory(string name)
    {
        SafetensorsTensorInfo t = GetInfo(name);
        if (t.ByteLength > int.MaxValue)
            throw new SafetensorsException(Path, name, $"{t.ByteLength} bytes do not fit one span");
        return _view!.MemoryAt(_dataStart + t.Begin, (int)t.ByteLength);
    }

    /// <summary>
    /// Typed view; T must match the dtype (float ↔ F32, BFloat16 ↔ BF16, Half ↔ F16, byte ↔ U8, …). Works for tensors
    /// over 2 GB as long as they have fewer than 2³¹ elements (Llama-3-70B's bf16 embeddings); larger ones are read
    /// in ranges with <see cref="GetSpan{T}(string, long, int)"/>.
    /// </summary>
    public ReadOnlySpan<T> GetSpan<T>(string name) where T : unmanaged
    {
        SafetensorsTensorInfo t = TypedInfo<T>(name);
        if (t.ElementCount > int.MaxValue)
            throw new SafetensorsException(Path, name, $"{t.ElementCount} elements do not fit one span: read it in ranges");
        return _view!.Span<T>(_dataStart + t.Begin, (int)t.ElementCount);
    }

    /// <summary>Elements [first, first + count) of the tensor as T (dtype must match).</summary>
    public ReadOnlySpan<T> GetSpan<T>(string name, long first, int count) where T : unmanaged
    {
        SafetensorsTensorInfo t = TypedInfo<T>(name);
        if (first < 0 || count < 0 || first + count > t.ElementCount)
            throw new SafetensorsException(Path, name, $"elements [{first}, {first + count}) are outside its {t.ElementCount}");
        return _view!.Span<T>(_dataStart + t.Begin + first * t.DType.ElementSize(), count);
    }

    private SafetensorsTensorInfo TypedInfo<T>(string name) where T : unmanaged
    {
        SafetensorsTensorInfo t = GetInfo(name);
        DType want = DTypes.Of<T>();
        if (t.DType != want)
            throw new SafetensorsException(Path, name, $"is {t.DType.SafetensorsName()}, not {want.SafetensorsName()} ({typeof(T).Name})");
        return t;
    }

    /// <summary>Copy of the tensor as a T[] (dtype must match).</summary>
    public T[] ReadArray<T>(string name) where T : unmanaged => GetSpan<T>(name).ToArray();

    public void Dispose()
    {
        _view?.Dispose();
        _map?.Dispose();
    }
}
