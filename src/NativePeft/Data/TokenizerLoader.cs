using System.Text.Json;
using NativePeft.IO;

namespace NativePeft.Data;

/// <summary>
/// Picks a model folder's tokenizer. Order: tokenizer.json when it is a byte-level BPE (Llama 3); else
/// tokenizer.model (SentencePiece, Llama 2; also when tokenizer.json is a form we don't read, such as Llama 2's);
/// else the built-in <see cref="ByteTokenizer"/> when tokenizer_config.json says
/// <c>"tokenizer_class": "NativePeftByteTokenizer"</c> (what <see cref="WriteByteTokenizerConfig"/> writes) or
/// config.json's vocab_size is 259 with no tokenizer file. Special ids: tokenizer_config.json's bos_token /
/// eos_token / pad_token (a string or {"content": …}) looked up in the vocabulary; else config.json's bos_token_id /
/// eos_token_id / pad_token_id (an int, or the first of a list); else the SentencePiece model's own bos/eos.
/// A tokenizer is needed only to read or print text: <see cref="ForModel"/> gives an <see cref="IdsOnlyTokenizer"/>
/// for a folder without tokenizer files, so that pre-tokenized data trains and evaluates with any model folder.
/// </summary>
public static class TokenizerLoader
{
    public const string ByteTokenizerClass = "NativePeftByteTokenizer";

    /// <summary>A folder, a tokenizer.json / tokenizer.model file, or "byte" for the built-in byte tokenizer.</summary>
    public static ITokenizer Load(string pathOrName)
    {
        ArgumentNullException.ThrowIfNull(pathOrName);
        if (pathOrName == "byte") return ByteTokenizer.Instance;
        if (Directory.Exists(pathOrName)) return FromFolder(pathOrName);
        if (!File.Exists(pathOrName)) throw new FileNotFoundException($"no tokenizer at {pathOrName}", pathOrName);
        string dir = Path.GetDirectoryName(Path.GetFullPath(pathOrName))!;
        return pathOrName.EndsWith(".model", StringComparison.OrdinalIgnoreCase)
            ? WithSpecials(SentencePieceModelTokenizer.FromFile(pathOrName), dir)
            : WithSpecials(HfBpeTokenizer.FromFile(pathOrName), dir);
    }

    /// <summary>The tokenizer files a folder can have, as named in messages.</summary>
    public const string TokenizerFilesText = "tokenizer.json or tokenizer.model (nor a tokenizer_config.json naming the byte tokenizer)";

    /// <summary>The folder's tokenizer; throws <see cref="FileNotFoundException"/> naming the missing files when it has none.</summary>
    public static ITokenizer FromFolder(string dir) =>
        TryFromFolder(dir) ?? throw new FileNotFoundException($"{dir} has no {TokenizerFilesText}", Path.Combine(dir, "tokenizer.json"));

    /// <summary>
    /// The folder's tokenizer, or, when it has no tokenizer files, an <see cref="IdsOnlyTokenizer"/> of the model's
    /// <paramref name="vocabSize"/>: enough for pre-tokenized data, an error naming the missing files for text.
    /// </summary>
    public static ITokenizer ForModel(string dir, int vocabSize) => TryFromFolder(dir) ?? IdsOnlyTokenizer.Create(dir, vocabSize);

    /// <summary>The folder's tokenizer, or null when the folder has no tokenizer files (see the class summary for the order).</summary>
    public static ITokenizer? TryFromFolder(string dir)
    {
        string json = Path.Combine(dir, "tokenizer.json"), model = Path.Combine(dir, "tokenizer.model");
        if (File.Exists(json))
        {
            try { return WithSpecials(HfBpeTokenizer.FromFile(json), dir); }
            catch (NotSupportedException) when (File.Exists(model)) { /* e.g. Llama 2's tokenizer.json: use tokenizer.model */ }
        }
        if (File.Exists(model)) return WithSpecials(SentencePieceModelTokenizer.FromFile(model), dir);
        var tc = ReadJson(Path.Combine(dir, "tokenizer_config.json"));
        if (tc is JsonElement t && t.TryGetProperty("tokenizer_class", out var cls) && cls.ValueKind == JsonValueKind.String && cls.GetString() == ByteTokenizerClass)
            return ByteTokenizer.Instance;
        var cfg = ReadJson(Path.Combine(dir, "config.json"));
        if (cfg is JsonElement c && c.TryGetProperty("vocab_size", out var vs) && vs.ValueKind == JsonValueKind.Number && vs.TryGetInt32(out int size) && size == ByteTokenizer.Size)
            return ByteTokenizer.Instance;
        return null;
    }

    /// <summary>Writes tokenizer_config.json marking <paramref name="dir"/> as using the built-in byte tokenizer.</summary>
    public static void WriteByteTokenizerConfig(string dir)
    {
        IO.OutputFolder.WriteAllTextAtomic(Path.Combine(dir, "tokenizer_config.json"),
            $"{{\n  \"tokenizer_class\": \"{ByteTokenizerClass}\",\n  \"bos_token_id\": {ByteTokenizer.Bos},\n" +
            $"  \"eos_token_id\": {ByteTokenizer.Eos},\n  \"pad_token_id\": {ByteTokenizer.Pad}\n}}\n");
    }

    private static ITokenizer WithSpecials(HfBpeTokenizer tok, string dir)
    {
        var (bos, eos, pad) = ResolveSpecials(dir, tok.TokenToId);
        CheckSpecialIds(dir, tok.VocabSize, bos, eos, pad);
        return tok.WithSpecialIds(bos, eos, pad);
    }

    private static ITokenizer WithSpecials(SentencePieceModelTokenizer tok, string dir)
    {
        var (bos, eos, pad) = ResolveSpecials(dir, tok.TokenToId);
        CheckSpecialIds(dir, tok.VocabSize, bos, eos, pad);
        return tok.WithSpecialIds(bos, eos, pad);
    }

    /// <summary>A bos/eos/pad id from the files outside the vocabulary is the files' error, not an argument error.</summary>
    private static void CheckSpecialIds(string dir, int vocabSize, int? bos, int? eos, int? pad)
    {
        if (SpecialIdProblem(vocabSize, bos, eos, pad) is { } problem)
            throw new InvalidDataException($"{Path.Combine(dir, "tokenizer_config.json")} / {LlamaConfig.FileName}: {problem}");
    }

    /// <summary>The first special id outside [0, <paramref name="vocabSize"/>) as "special id N is outside the vocabulary [0, V)", or null.</summary>
    internal static string? SpecialIdProblem(int vocabSize, int? bos, int? eos, int? pad)
    {
        foreach (int? id in new[] { bos, eos, pad })
            if (id is int i && (i < 0 || i >= vocabSize)) return $"special id {i} is outside the vocabulary [0, {vocabSize})";
        return null;
    }

    internal static (int? Bos, int? Eos, int? Pad) ResolveSpecials(string dir, Func<string, int?> lookup)
    {
        var tc = ReadJson(Path.Combine(dir, "tokenizer_config.json"));
        var cfg = ReadJson(Path.Combine(dir, "config.json"));
        int? Get(string tokenKey, string idKey)
        {
            if (tc is JsonElement t && t.TryGetProperty(tokenKey, out var v))
            {
                string? name = v.ValueKind switch
                {
                    JsonValueKind.String => v.GetString(),
                    JsonValueKind.Object when v.TryGetProperty("content", out var content) && content.ValueKind == JsonValueKind.String => content.GetString(),
                    _ => null,
                };
                if (name is not null)
                    return lookup(name) ?? throw new InvalidDataException($"{Path.Combine(dir, "tokenizer_config.json")}: {tokenKey} \"{name}\" is not in the vocabulary");
            }
            return IdFrom(tc, idKey) ?? IdFrom(cfg, idKey);
        }
        return (Get("bos_token", "bos_token_id"), Get("eos_token", "eos_token_id"), Get("pad_token", "pad_token_id"));
    }

    /// <summary>bos / eos / pad from the id keys alone (tokenizer_config.json, then config.json): for a folder without a vocabulary.</summary>
    internal static (int? Bos, int? Eos, int? Pad) ResolveSpecialIds(string dir)
    {
        var tc = ReadJson(Path.Combine(dir, "tokenizer_config.json"));
        var cfg = ReadJson(Path.Combine(dir, "config.json"));
        return (IdFrom(tc, "bos_token_id") ?? IdFrom(cfg, "bos_token_id"), IdFrom(tc, "eos_token_id") ?? IdFrom(cfg, "eos_token_id"),
            IdFrom(tc, "pad_token_id") ?? IdFrom(cfg, "pad_token_id"));
    }

    private static int? IdFrom(JsonElement? e, string key)
    {
        if (e is not JsonElement o || !o.TryGetProperty(key, out var v)) return null;
        return v.ValueKind switch
        {
            JsonValueKind.Number => Id(v),
            JsonValueKind.Array when v.GetArrayLength() > 0 && v[0].ValueKind == JsonValueKind.Number => Id(v[0]),
            _ => null,
        };
        int Id(JsonElement n) => n.TryGetInt32(out int id) ? id
            : throw new InvalidDataException($"{key}: {n.GetRawText()} is not a token id");
    }

    private static JsonElement? ReadJson(string path)
    {
        if (!File.Exists(path)) return null;
        using var doc = TextInput.ReadJsonFile(path, (problem, inner) => new InvalidDataException($"{path}: {problem}", inner));
        return doc.RootElement.Clone();
    }
}
