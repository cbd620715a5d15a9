using System.Runtime.InteropServices;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using NativePeft.Numerics;

namespace NativePeft.IO;

/// <summary>A tensor to write: name, dtype, shape and its raw little-endian bytes.</summary>
public sealed record SafetensorsTensor(string Name, DType DType, long[] Shape, ReadOnlyMemory<byte> Data)
{
    /// <summary>From typed elements (the dtype follows T: float → F32, BFloat16 → BF16, Half → F16, byte → U8, …).</summary>
    public static SafetensorsTensor From<T>(string name, long[] shape, T[] values) where T : unmanaged
        => new(name, DTypes.Of<T>(), shape, MemoryMarshal.AsBytes(values.AsSpan()).ToArray());
}

/// <summary>
/// Writes safetensors files: header JSON (tensors in the given order, optional __metadata__ first) padded with spaces
/// to a multiple of 8 bytes as the Rust implementation does, then the tensors' bytes tightly packed in the same order.
/// The write is atomic: a temporary file in the output directory is written, flushed to disk and renamed over the
/// path; on any error it is deleted and nothing is left at the path.
/// </summary>
public static class SafetensorsWriter
{
    public static void Write(string path, IEnumerable<SafetensorsTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(tensors);
        string full = Path.GetFullPath(path);
        List<SafetensorsTensor> list = tensors.ToList();
        byte[] header = BuildHeader(full, list, metadata);

        string dir = Path.GetDirectoryName(full)!;
        if (!Directory.Exists(dir))
            throw new SafetensorsException(full, null, $"directory {dir} does not exist");
        string temp = OutputFolder.TempPathFor(full);
        try
        {
            OutputFolder.BeforeWrite(temp);
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> len = stackalloc byte[8];
                System.Buffers.Binary.BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)header.Length);
                fs.Write(len);
                fs.Write(header);
                foreach (SafetensorsTensor t in list)
                    fs.Write(t.Data.Span);
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch (Exception e)
        {
            OutputFolder.TryDelete(temp);
            if (e is SafetensorsException) throw;
            throw new SafetensorsException(full, null, $"write failed: {e.Message}", e);
        }
    }

    /// <summary>The padded header bytes (exposed for tests).</summary>
    internal static byte[] BuildHeader(string path, IReadOnlyList<SafetensorsTensor> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        var buffer = new MemoryStream();
        using (var w = new Utf8JsonWriter(buffer, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject("__metadata__");
                foreach (var kv in metadata)
                    w.WriteString(kv.Key, kv.Value);
                w.WriteEndObject();
            }
            long offset = 0;
            foreach (SafetensorsTensor t in tensors)
            {
                if (t.Name == "__metadata__")
                    throw new SafetensorsException(path, t.Name, "is reserved for metadata");
                if (!names.Add(t.Name))
                    throw new SafetensorsException(path, t.Name, "is written twice");
                long expected;
                try { expected = checked(DTypes.ElementCount(t.Shape) * t.DType.ElementSize()); }
                catch (Exception e) when (e is OverflowException or ArgumentException)
                {
                    throw new SafetensorsException(path, t.Name, $"invalid shape [{string.Join(", ", t.Shape)}]: {e.Message}");
                }
                if (expected != t.Data.Length)
                    throw new SafetensorsException(path, t.Name,
                        $"has {t.Data.Length} bytes but {t.DType.SafetensorsName()} [{string.Join(", ", t.Shape)}] needs {expected}");
                w.WriteStartObject(t.Name);
                w.WriteString("dtype", t.DType.SafetensorsName());
                w.WriteStartArray("shape");
                foreach (long d in t.Shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + expected);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += expected;
            }
            w.WriteEndObject();
        }
        int n = (int)buffer.Length;
        int padded = (n + 7) / 8 * 8;
        for (int i = n; i < padded; i++)
            buffer.WriteByte((byte)' ');
        return buffer.ToArray();
    }
}
