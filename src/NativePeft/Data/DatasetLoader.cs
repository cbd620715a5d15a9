using System.Text;
using System.Text.Json;
using NativePeft.Data.Jinja;
using NativePeft.IO;

namespace NativePeft.Data;

/// <summary>The data formats <see cref="DatasetLoader"/> reads.</summary>
public enum DataFormat
{
    /// <summary>Decide from the file: .txt → PlainText; JSONL/JSON whose first record has input_ids / instruction / messages / text.</summary>
    Auto,
    /// <summary>JSONL <c>{"input_ids": [...], "labels": [...]?}</c>; labels default to input_ids, -100 masks.</summary>
    PreTokenized,
    /// <summary>A whole text file, tokenized and packed into fixed-length sequences.</summary>
    PlainText,
    /// <summary>JSONL <c>{"text": "..."}</c>: documents packed into fixed-length sequences, eos after each.</summary>
    TextJsonl,
    /// <summary>Alpaca records <c>{"instruction", "input", "output"}</c> (JSONL, or a JSON array as alpaca_data.json).</summary>
    Alpaca,
    /// <summary>
    /// Chat JSONL <c>{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}</c>, rendered with
    /// the model's chat template or the default one, the loss on the assistant turns (<see cref="ChatFormat"/>).
    /// </summary>
    Chat,
}

/// <summary>
/// Reads the dataset formats into <see cref="TrainingExample"/>s. Every error names the file and the 1-based line
/// (for a JSON array file: the 1-based record). With <see cref="BadLinePolicy.Skip"/> bad lines are left out and
/// counted. Blank lines are ignored.
/// </summary>
public static class DatasetLoader
{
    /// <summary>
    /// Reads <paramref name="path"/> in <paramref name="format"/> (Auto: <see cref="DetectFormat"/>). Pre-tokenized ids
    /// are checked against <paramref name="vocabSize"/> (the model's vocab_size; default: the tokenizer's), and need no
    /// tokenizer: with an <see cref="IdsOnlyTokenizer"/> only the text formats fail, with a
    /// <see cref="FileNotFoundException"/> naming the model folder and the missing tokenizer files.
    /// </summary>
    /// <param name="chatTemplate">For chat data: the model's template (<see cref="ChatTemplate.ForModel"/>); null: <see cref="ChatTemplate.Default"/>.</param>
    public static Dataset Load(string path, DataFormat format, ITokenizer tokenizer, int seqLen, BadLinePolicy policy = BadLinePolicy.Stop,
        int? vocabSize = null, ChatTemplate? chatTemplate = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (format == DataFormat.Auto) format = DetectFormat(path);
        if (format != DataFormat.PreTokenized && tokenizer is IdsOnlyTokenizer ids)
            throw new FileNotFoundException(ids.MissingMessage($"{path} ({TextFormatName(format)})"), Path.Combine(ids.Folder, "tokenizer.json"));
        return format switch
        {
            DataFormat.PreTokenized => PreTokenizedJsonl(path, vocabSize ?? tokenizer.VocabSize, policy),
            DataFormat.PlainText => PlainText(path, tokenizer, seqLen),
            DataFormat.TextJsonl => TextJsonl(path, tokenizer, seqLen, policy),
            DataFormat.Alpaca => Alpaca(path, tokenizer, policy),
            DataFormat.Chat => Chat(path, tokenizer, chatTemplate ?? ChatTemplate.Default, policy),
            _ => throw new ArgumentOutOfRangeException(nameof(format)),
        };
    }

    /// <summary>How a format is named in messages.</summary>
    public static string TextFormatName(DataFormat format) => format switch
    {
        DataFormat.PlainText => "plain text",
        DataFormat.TextJsonl => "{\"text\": ...} JSONL",
        DataFormat.Alpaca => "Alpaca records",
        DataFormat.Chat => "chat {\"messages\": ...} JSONL",
        DataFormat.PreTokenized => "pre-tokenized {\"input_ids\": ...} JSONL",
        _ => format.ToString(),
    };

    /// <summary>
    /// The format of a file from its extension and its first record's keys: .txt is plain text; any other file must
    /// hold JSON objects (JSONL, or a JSON array) whose first has input_ids, instruction, messages or text, else a
    /// <see cref="DataFormatException"/> names the file and line (a .jsonl of bare numbers or strings never trains as
    /// plain text). A file without a record (blank) is plain text (the callers refuse it as empty).
    /// </summary>
    public static DataFormat DetectFormat(string path)
    {
        if (IsPlainTextFile(path)) return DataFormat.PlainText;
        foreach (var (line, _, text, problem) in Records(path))
        {
            if (problem is not null || text is null) throw new DataFormatException(path, line, problem ?? "no text");
            using var doc = TextInput.ParseJson(Encoding.UTF8.GetBytes(text), (p, inner) => new DataFormatException(path, line, p, inner));
            var r = doc.RootElement;
            // Not silently plain text: a file that is not .txt must hold JSON records of a known schema.
            if (r.ValueKind != JsonValueKind.Object)
                throw new DataFormatException(path, line, $"expected a JSON object with one of input_ids, instruction, messages, text; found {JsonKind(r)} (plain text goes in a .txt file)");
            if (r.TryGetProperty("input_ids", out _)) return DataFormat.PreTokenized;
            if (r.TryGetProperty("instruction", out _)) return DataFormat.Alpaca;
            if (r.TryGetProperty("messages", out _)) return DataFormat.Chat;
            if (r.TryGetProperty("text", out _)) return DataFormat.TextJsonl;
            throw new DataFormatException(path, line, "cannot tell the format: the first record has none of input_ids, instruction, messages, text");
        }
        return DataFormat.PlainText;
    }

    /// <summary>A .txt file: plain text by its extension alone (no records, no lines to skip).</summary>
    public static bool IsPlainTextFile(string path) => path.EndsWith(".txt", StringComparison.OrdinalIgnoreCase);

    private static string JsonKind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Array => "an array",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        _ => e.ValueKind.ToString(),
    };

    /// <summary>Pre-tokenized JSONL: input_ids (ints in [0, vocabSize)), optional labels of the same length (-100 or an id).</summary>
    public static Dataset PreTokenizedJsonl(string path, int vocabSize, BadLinePolicy policy = BadLinePolicy.Stop)
    {
        var (examples, skips) = ReadRecords(path, policy, (line, r) =>
        {
            if (!r.TryGetProperty("input_ids", out var idsEl)) throw new DataFormatException(path, line, "missing \"input_ids\"");
            int[] ids = IntArray(path, line, idsEl, "input_ids");
            if (ids.Length == 0) throw new DataFormatException(path, line, "\"input_ids\" is empty");
            for (int i = 0; i < ids.Length; i++)
                if (ids[i] < 0 || ids[i] >= vocabSize)
                    throw new DataFormatException(path, line, $"input_ids[{i}] = {ids[i]} is outside the vocabulary [0, {vocabSize})");
            int[] labels;
            if (r.TryGetProperty("labels", out var labEl) && labEl.ValueKind != JsonValueKind.Null)
            {
                labels = IntArray(path, line, labEl, "labels");
                if (labels.Length != ids.Length)
                    throw new DataFormatException(path, line, $"\"labels\" has {labels.Length} entries, \"input_ids\" has {ids.Length}");
                for (int i = 0; i < labels.Length; i++)
                    if (labels[i] != TrainingExample.IgnoreIndex && (labels[i] < 0 || labels[i] >= vocabSize))
                        throw new DataFormatException(path, line, $"labels[{i}] = {labels[i]} is neither -100 nor in the vocabulary [0, {vocabSize})");
            }
            else labels = (int[])ids.Clone();
            return new TrainingExample(ids, labels);
        });
        return new Dataset(path, examples, skips.Count, skips.Messages);
    }

    /// <summary>A plain text file: the whole text tokenized (bos first) and cut into sequences of seqLen.</summary>
    public static Dataset PlainText(string path, ITokenizer tokenizer, int seqLen)
    {
        byte[] bytes = TextInput.ReadFile(path, Limits.MaxWholeDataBytes, (problem, inner) => new DataFormatException(path, problem, inner));
        if (TextInput.Utf8Problem(bytes, json: false, out int line) is { } bad) throw new DataFormatException(path, line, bad);
        return new(path, TextPacking.Pack([TextInput.DecodeUtf8(bytes, (problem, inner) => new DataFormatException(path, problem, inner))], tokenizer, seqLen));
    }

    /// <summary>JSONL {"text": "..."}: the documents packed into sequences of seqLen, eos between them.</summary>
    public static Dataset TextJsonl(string path, ITokenizer tokenizer, int seqLen, BadLinePolicy policy = BadLinePolicy.Stop)
    {
        var (docs, skips) = ReadRecords(path, policy, (line, r) => RequiredString(path, line, r, "text"));
        return new Dataset(path, TextPacking.Pack(docs, tokenizer, seqLen, eosBetweenDocuments: true), skips.Count, skips.Messages);
    }

    /// <summary>Alpaca records (JSONL or a JSON array) → <see cref="AlpacaFormat.Build"/>.</summary>
    public static Dataset Alpaca(string path, ITokenizer tokenizer, BadLinePolicy policy = BadLinePolicy.Stop)
    {
        var (examples, skips) = ReadRecords(path, policy, (line, r) =>
        {
            string instruction = RequiredString(path, line, r, "instruction");
            string output = RequiredString(path, line, r, "output");
            string input = OptionalString(path, line, r, "input");
            return AlpacaFormat.Build(tokenizer, instruction, input, output);
        });
        return new Dataset(path, examples, skips.Count, skips.Messages);
    }

    /// <summary>
    /// Chat JSONL → <see cref="ChatFormat.Build"/> with <paramref name="template"/>. The template is parsed first (an
    /// unsupported construct throws <see cref="JinjaException"/> before any line is read); a line without "messages",
    /// a message without a string role or content, an unknown role, a conversation without an assistant message and
    /// the template's errors on that conversation (raise_exception, a limit) name the file and line.
    /// </summary>
    public static Dataset Chat(string path, ITokenizer tokenizer, ChatTemplate template, BadLinePolicy policy = BadLinePolicy.Stop)
    {
        ArgumentNullException.ThrowIfNull(template);
        _ = template.Template;
        var (examples, skips) = ReadRecords(path, policy, (line, r) =>
        {
            if (!r.TryGetProperty("messages", out var ms)) throw new DataFormatException(path, line, "missing \"messages\"");
            if (ms.ValueKind != JsonValueKind.Array) throw new DataFormatException(path, line, "\"messages\" is not an array");
            if (ms.GetArrayLength() == 0) throw new DataFormatException(path, line, "\"messages\" is empty");
            var messages = new List<JsonElement>();
            bool assistant = false;
            int i = 0;
            foreach (var m in ms.EnumerateArray())
            {
                if (m.ValueKind != JsonValueKind.Object) throw new DataFormatException(path, line, $"messages[{i}] is not an object");
                string role = RequiredString(path, line, m, "role", $"messages[{i}].");
                RequiredString(path, line, m, "content", $"messages[{i}].");
                if (!ChatFormat.Roles.Contains(role))
                    throw new DataFormatException(path, line, $"messages[{i}].role \"{role}\" is not one of {string.Join(", ", ChatFormat.Roles)}");
                assistant |= role == "assistant";
                messages.Add(m);
                i++;
            }
            if (!assistant) throw new DataFormatException(path, line, "no assistant message: nothing to learn");
            try { return ChatFormat.Build(tokenizer, template, messages); }
            catch (Exception e) when (e is InvalidDataException or JinjaException) { throw new DataFormatException(path, line, e.Message, e); }
        });
        return new Dataset(path, examples, skips.Count, skips.Messages);
    }

    /// <summary>
    /// The records of a JSONL file or JSON array, each parsed (strict UTF-8) and turned into an item by
    /// <paramref name="read"/> (its line and root element, alive only during the call); a line that is not valid, or
    /// that <paramref name="read"/> rejects with a <see cref="DataFormatException"/>, stops the read or, with
    /// <see cref="BadLinePolicy.Skip"/>, is left out and counted.
    /// </summary>
    private static (List<T> Items, Skips Skips) ReadRecords<T>(string path, BadLinePolicy policy, Func<int, JsonElement, T> read)
    {
        var items = new List<T>();
        var skips = new Skips(policy);
        foreach (var (line, _, text, problem) in Records(path))
        {
            try
            {
                using var doc = Parse(path, line, text, problem);
                items.Add(read(line, doc.RootElement));
            }
            catch (DataFormatException e) when (skips.Take(e)) { }
        }
        return (items, skips);
    }

    private sealed class Skips(BadLinePolicy policy)
    {
        public int Count;
        public List<string> Messages { get; } = [];
        public bool Take(DataFormatException e)
        {
            if (policy == BadLinePolicy.Stop) return false;
            Count++;
            if (Messages.Count < 10) Messages.Add(e.Message);
            return true;
        }
    }

    /// <summary>
    /// (1-based line or record, 1-based ordinal, JSON text, problem) of every non-blank JSONL line, or every element of a
    /// JSON array file. A line that is not UTF-8 has a null text and the problem (its column), so that the caller can
    /// skip it under <see cref="BadLinePolicy.Skip"/>. The file must be a regular file (<see cref="TextInput.FileProblem"/>);
    /// a JSON array file, read whole, and one JSONL line are at most <see cref="Limits.MaxWholeDataBytes"/>.
    /// </summary>
    internal static IEnumerable<(int Line, int Ordinal, string? Text, string? Problem)> Records(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path)) throw new FileNotFoundException($"no data file at {path}", path);
        if (TextInput.FileProblem(path, long.MaxValue) is { } fileProblem) throw new DataFormatException(path, fileProblem);
        if (StartsWithArray(path))
        {
            byte[] bytes = TextInput.ReadFile(path, Limits.MaxWholeDataBytes, (problem, inner) => new DataFormatException(path, problem, inner));
            if (TextInput.Utf8Problem(bytes, json: true, out int badLine) is { } bad) throw new DataFormatException(path, badLine, bad);
            JsonDocument doc;
            try { doc = JsonDocument.Parse(bytes); }
            catch (JsonException e) { throw new DataFormatException(path, (int)(e.LineNumber ?? 0) + 1, $"invalid JSON: {e.Message}", e); }
            using (doc)
            {
                int k = 0;
                var texts = doc.RootElement.EnumerateArray().Select(e => e.GetRawText()).ToList();
                foreach (string t in texts) { k++; yield return (k, k, t, null); }
            }
            yield break;
        }
        int ordinal = 0;
        foreach (var (lineNo, text, problem) in TextInput.ReadLines(path, Limits.MaxWholeDataBytes, (p, inner) => new DataFormatException(path, p, inner)))
        {
            if (text is not null && string.IsNullOrWhiteSpace(text)) continue;
            yield return (lineNo, ++ordinal, text, problem);
        }
    }

    private static bool StartsWithArray(string path)
    {
        using var reader = new StreamReader(path, Encoding.UTF8);
        int c;
        while ((c = reader.Read()) >= 0) if (!char.IsWhiteSpace((char)c)) return c == '[';
        return false;
    }

    /// <summary>One record's JSON object; a line that was not UTF-8 (<paramref name="problem"/>) or JSON names the line.</summary>
    private static JsonDocument Parse(string path, int line, string? text, string? problem)
    {
        if (problem is not null || text is null) throw new DataFormatException(path, line, problem ?? "no text");
        JsonDocument doc = TextInput.ParseJson(Encoding.UTF8.GetBytes(text), (p, inner) => new DataFormatException(path, line, p, inner));
        if (doc.RootElement.ValueKind != JsonValueKind.Object)
        {
            doc.Dispose();
            throw new DataFormatException(path, line, "expected a JSON object");
        }
        return doc;
    }

    private static int[] IntArray(string path, int line, JsonElement e, string name)
    {
        if (e.ValueKind != JsonValueKind.Array) throw new DataFormatException(path, line, $"\"{name}\" is not an array");
        var result = new int[e.GetArrayLength()];
        int i = 0;
        foreach (var v in e.EnumerateArray())
        {
            if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt32(out int x))
                throw new DataFormatException(path, line, $"{name}[{i}] is not an integer: {v.GetRawText()}");
            result[i++] = x;
        }
        return result;
    }

    private static string RequiredString(string path, int line, JsonElement r, string name, string where = "")
    {
        if (!r.TryGetProperty(name, out var v)) throw new DataFormatException(path, line, where.Length == 0 ? $"missing \"{name}\"" : $"{where}{name} is missing");
        if (v.ValueKind != JsonValueKind.String) throw new DataFormatException(path, line, where.Length == 0 ? $"\"{name}\" is not a string" : $"{where}{name} is not a string");
        return v.GetString()!;
    }

    private static string OptionalString(string path, int line, JsonElement r, string name)
    {
        if (!r.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return "";
        if (v.ValueKind != JsonValueKind.String) throw new DataFormatException(path, line, $"\"{name}\" is not a string");
        return v.GetString()!;
    }
}
