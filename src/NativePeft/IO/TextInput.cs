using System.Buffers;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace NativePeft.IO;

/// <summary>
/// How every reader turns a file's bytes into text or JSON, the one place for it: UTF-8 is decoded strictly (an
/// invalid byte is an error naming its byte offset, line and column, never a silent U+FFFD or an exception from deep
/// inside System.Text.Json), a JSON <c>\uXXXX</c> escape that leaves a lone surrogate is refused the same way, JSON
/// syntax errors carry their line and byte, and a file that is not a regular file (a character device, a FIFO, a
/// folder) or is larger than the reader's bound is refused before it is read. Readers pass a factory for their own
/// typed exception (<see cref="SafetensorsException"/>, <see cref="LlamaConfigException"/>, …), so the error type
/// stays the reader's.
/// </summary>
public static class TextInput
{
    /// <summary>Makes a reader's typed exception from a problem (and the exception that caused it, if any).</summary>
    public delegate Exception ErrorFactory(string problem, Exception? inner);

    /// <summary>UTF-8 that throws on an invalid sequence instead of replacing it.</summary>
    public static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>The byte offset of the first invalid UTF-8 sequence, or −1 when the bytes are valid UTF-8.</summary>
    public static int FindInvalidUtf8(ReadOnlySpan<byte> bytes)
    {
        if (System.Text.Unicode.Utf8.IsValid(bytes)) return -1;
        int i = 0;
        while (i < bytes.Length)
        {
            if (Rune.DecodeFromUtf8(bytes[i..], out _, out int consumed) != OperationStatus.Done) return i;
            i += consumed;
        }
        return -1;
    }

    /// <summary>
    /// The byte offset of the first JSON <c>\uXXXX</c> escape that decodes to a lone surrogate (a high one not followed
    /// by a low escape, or a low one on its own), or −1. Backslashes only occur inside JSON strings, so no string
    /// tracking is needed; <c>\\</c> is skipped as a pair.
    /// </summary>
    public static int FindLoneSurrogateEscape(ReadOnlySpan<byte> json)
    {
        int pending = -1, i = 0;
        while (i < json.Length)
        {
            int rel = json[i..].IndexOf((byte)'\\');
            if (rel < 0) break;
            i += rel;
            int cp = i + 6 <= json.Length && json[i + 1] == (byte)'u' ? Hex4(json.Slice(i + 2, 4)) : -1;
            bool low = cp is >= 0xDC00 and <= 0xDFFF;
            if (pending >= 0)
            {
                // The escape right after a high surrogate must be its low half.
                if (i != pending + 6 || !low) return pending;
                pending = -1;
                i += 6;
                continue;
            }
            if (low) return i;
            if (cp is >= 0xD800 and <= 0xDBFF) pending = i;
            i += cp >= 0 ? 6 : 2;
        }
        return pending;
    }

    private static int Hex4(ReadOnlySpan<byte> s)
    {
        int v = 0;
        foreach (byte b in s)
        {
            int d = b is >= (byte)'0' and <= (byte)'9' ? b - '0' : (b | 0x20) is >= 'a' and <= 'f' ? (b | 0x20) - 'a' + 10 : -1;
            if (d < 0) return -1;
            v = v * 16 + d;
        }
        return v;
    }

    /// <summary>"byte N (line L, column C)" of a 0-based byte offset; columns count bytes, both 1-based.</summary>
    public static string Position(ReadOnlySpan<byte> bytes, int offset)
    {
        ReadOnlySpan<byte> before = bytes[..Math.Min(offset, bytes.Length)];
        int line = before.Count((byte)'\n') + 1;
        int column = offset - (before.LastIndexOf((byte)'\n') + 1) + 1;
        return string.Create(CultureInfo.InvariantCulture, $"byte {offset} (line {line}, column {column})");
    }

    /// <summary>The problem with <paramref name="bytes"/> as UTF-8 text (JSON: also lone surrogate escapes), or null.</summary>
    public static string? Utf8Problem(ReadOnlySpan<byte> bytes, bool json) => Utf8Problem(bytes, json, out _);

    /// <summary><see cref="Utf8Problem(ReadOnlySpan{byte}, bool)"/> with the problem's 1-based line (0 when none).</summary>
    public static string? Utf8Problem(ReadOnlySpan<byte> bytes, bool json, out int line)
    {
        string? problem = Utf8ProblemAt(bytes, json, out int offset);
        line = problem is null ? 0 : bytes[..offset].Count((byte)'\n') + 1;
        return problem;
    }

    private static string? Utf8ProblemAt(ReadOnlySpan<byte> bytes, bool json, out int bad)
    {
        bad = FindInvalidUtf8(bytes);
        if (bad >= 0)
            return string.Create(CultureInfo.InvariantCulture, $"invalid UTF-8 at {Position(bytes, bad)}: 0x{bytes[bad]:X2}");
        if (json && (bad = FindLoneSurrogateEscape(bytes)) >= 0)
            return $"a \\u escape at {Position(bytes, bad)} is a lone UTF-16 surrogate (not a character)";
        return null;
    }

    /// <summary>Strict UTF-8 → string; an invalid sequence is <paramref name="error"/> naming its position.</summary>
    public static string DecodeUtf8(ReadOnlySpan<byte> bytes, ErrorFactory error)
    {
        if (Utf8Problem(bytes, json: false) is { } problem) throw error(problem, null);
        if (bytes.StartsWith("\uFEFF"u8)) bytes = bytes[3..];
        return StrictUtf8.GetString(bytes);
    }

    /// <summary>
    /// Parses UTF-8 JSON after checking it (<see cref="Utf8Problem(ReadOnlySpan{byte}, bool)"/>); syntax errors become <paramref name="error"/>
    /// with System.Text.Json's line and byte. The document refers to <paramref name="utf8"/>, which must outlive it.
    /// Once this returns, <see cref="JsonElement.GetString"/> and property names cannot fail on the text.
    /// </summary>
    public static JsonDocument ParseJson(ReadOnlyMemory<byte> utf8, ErrorFactory error, JsonDocumentOptions options = default)
    {
        ReadOnlySpan<byte> span = utf8.Span;
        if (Utf8Problem(span, json: true) is { } problem) throw error(problem, null);
        if (span.StartsWith("\uFEFF"u8)) utf8 = utf8[3..];
        try { return JsonDocument.Parse(utf8, options); }
        catch (JsonException e) { throw error($"invalid JSON: {e.Message}", e); }
    }

    /// <summary>
    /// The problem with reading <paramref name="path"/> as a regular file of at most <paramref name="maxBytes"/>, or
    /// null: a missing file, a folder, a character or block device, a FIFO or a socket (which would block or never end),
    /// or a file over the bound.
    /// </summary>
    public static string? FileProblem(string path, long maxBytes)
    {
        if (Directory.Exists(path)) return "is a folder, not a file";
        if (!File.Exists(path)) return "file not found";
        if (OperatingSystem.IsLinux() && FileType(path) is { } type && type != "regular file")
            return $"is a {type}, not a regular file";
        long length;
        try { length = new FileInfo(path).Length; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return $"cannot read: {e.Message}"; }
        if (length > maxBytes)
            return string.Create(CultureInfo.InvariantCulture, $"is {length} bytes, more than the {maxBytes}-byte limit for this file");
        return null;
    }

    /// <summary>Reads a whole regular file of at most <paramref name="maxBytes"/>; every problem is <paramref name="error"/>.</summary>
    public static byte[] ReadFile(string path, long maxBytes, ErrorFactory error)
    {
        if (FileProblem(path, maxBytes) is { } problem) throw error(problem, null);
        try
        {
            using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.SequentialScan);
            long length = fs.Length;
            if (length > maxBytes) throw error(string.Create(CultureInfo.InvariantCulture, $"is {length} bytes, more than the {maxBytes}-byte limit for this file"), null);
            var bytes = new byte[length];
            fs.ReadExactly(bytes);
            return bytes;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw error($"cannot read: {e.Message}", e);
        }
    }

    /// <summary>Reads and parses a JSON file (<see cref="ReadFile"/> then <see cref="ParseJson"/>).</summary>
    public static JsonDocument ReadJsonFile(string path, ErrorFactory error, long maxBytes = Limits.MaxJsonFileBytes, JsonDocumentOptions options = default) =>
        ParseJson(ReadFile(path, maxBytes, error), error, options);

    /// <summary>
    /// The lines of a UTF-8 text file, 1-based, each decoded strictly (without its "\n" or "\r\n"): a line that is not
    /// UTF-8 comes back with <c>Text</c> null and <c>Problem</c> naming the column, so that a caller can skip it; a
    /// line longer than <paramref name="maxLineBytes"/> is <paramref name="error"/>. Streams: memory is one line.
    /// </summary>
    public static IEnumerable<(int Line, string? Text, string? Problem)> ReadLines(string path, long maxLineBytes, ErrorFactory error)
    {
        if (FileProblem(path, long.MaxValue) is { } problem) throw error(problem, null);
        FileStream fs;
        try { fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16, FileOptions.SequentialScan); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw error($"cannot read: {e.Message}", e); }
        using (fs)
        {
            var line = new ArrayBufferWriter<byte>();
            byte[] buffer = new byte[1 << 16];
            int number = 0;
            bool first = true;
            while (true)
            {
                int n = fs.Read(buffer, 0, buffer.Length);
                int start = 0;
                for (int i = 0; i < n; i++)
                {
                    if (buffer[i] != (byte)'\n') continue;
                    Append(line, buffer.AsSpan(start, i - start), maxLineBytes, number + 1, error);
                    yield return Decode(++number, line, ref first);
                    line.Clear();
                    start = i + 1;
                }
                if (n == 0)
                {
                    if (line.WrittenCount > 0) yield return Decode(++number, line, ref first);
                    yield break;
                }
                Append(line, buffer.AsSpan(start, n - start), maxLineBytes, number + 1, error);
            }
        }
    }

    private static void Append(ArrayBufferWriter<byte> line, ReadOnlySpan<byte> part, long max, int number, ErrorFactory error)
    {
        if (line.WrittenCount + (long)part.Length > max)
            throw error(string.Create(CultureInfo.InvariantCulture, $"line {number} is longer than the {max}-byte limit"), null);
        line.Write(part);
    }

    private static (int, string?, string?) Decode(int number, ArrayBufferWriter<byte> line, ref bool first)
    {
        ReadOnlySpan<byte> bytes = line.WrittenSpan;
        if (first && bytes.StartsWith("\uFEFF"u8)) bytes = bytes[3..];
        first = false;
        if (bytes.EndsWith("\r"u8)) bytes = bytes[..^1];
        int bad = FindInvalidUtf8(bytes);
        if (bad >= 0)
            return (number, null, string.Create(CultureInfo.InvariantCulture, $"invalid UTF-8 at column {bad + 1} (byte 0x{bytes[bad]:X2})"));
        return (number, Encoding.UTF8.GetString(bytes), null);
    }

    // ---------------------------------------------------------------- file type (Linux: statx, whose layout is the same on every architecture)

    private static string? FileType(string path)
    {
        try
        {
            Span<byte> buf = stackalloc byte[256];
            unsafe
            {
                fixed (byte* p = buf)
                {
                    // AT_FDCWD, follow symlinks, STATX_TYPE.
                    if (StatX(-100, path, 0, 1, p) != 0) return null;
                }
            }
            int mode = BitConverter.ToUInt16(buf.Slice(28, 2)) & 0xF000;
            return mode switch
            {
                0x8000 => "regular file",
                0x4000 => "folder",
                0x2000 => "character device",
                0x6000 => "block device",
                0x1000 => "FIFO (named pipe)",
                0xC000 => "socket",
                _ => null,
            };
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return null; // no statx (old libc): the size bound still applies
        }
    }

    [DllImport("libc", EntryPoint = "statx", SetLastError = true)]
    private static extern unsafe int StatX(int dirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags, uint mask, byte* buffer);
}
