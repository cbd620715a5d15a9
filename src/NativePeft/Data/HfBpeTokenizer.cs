using System.Buffers;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;
using NativePeft.IO;

namespace NativePeft.Data;

/// <summary>
/// A Hugging Face tokenizer.json with a byte-level BPE model, as Llama 3 (and GPT-2) ship it. What it reads:
/// <c>model</c> (type BPE, vocab, merges as "a b" strings or ["a","b"] pairs, ignore_merges), <c>added_tokens</c>,
/// and a <c>pre_tokenizer</c> made of Split (a regex, behavior Isolated) and ByteLevel steps, alone or in a Sequence.
/// Encoding: the text is cut at added tokens (each becomes its id, as HF does), every other stretch is split by
/// the pre-tokenizer's regex, each piece is mapped to GPT-2's byte symbols and, unless <c>ignore_merges</c> finds
/// the whole piece in the vocabulary, merged by Microsoft.ML.Tokenizers' <see cref="BpeTokenizer"/>.
/// The regexes match on code points, as HF's Oniguruma does (see <see cref="CodePointRegex"/>).
/// A normalizer, a non-byte-level model (Llama 2's Metaspace/byte_fallback tokenizer.json) or other pre-tokenizers
/// throw <see cref="NotSupportedException"/>: load that model's tokenizer.model instead.
/// The post_processor is not applied: bos comes from <see cref="Encode"/>'s addBos.
/// </summary>
public sealed class HfBpeTokenizer : ITokenizer
{
    /// <summary>GPT-2's pre-tokenizer regex (ByteLevel with use_regex true).</summary>
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private static readonly char[] ByteToChar = BuildByteToChar();
    private static readonly Dictionary<char, byte> CharToByte = BuildCharToByte();

    private readonly BpeTokenizer _bpe;
    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<int, string> _idToToken;
    private readonly Dictionary<string, int> _addedTokens;
    private readonly HashSet<int> _specialIds;
    private readonly List<CodePointRegex> _splits;
    private readonly Regex? _addedTokenRegex;
    private readonly bool _ignoreMerges;
    private readonly bool _addPrefixSpace;

    public int VocabSize { get; }
    public int? BosId { get; private set; }
    public int? EosId { get; private set; }
    public int? PadId { get; private set; }

    private HfBpeTokenizer(BpeTokenizer bpe, Dictionary<string, int> vocab, Dictionary<string, int> added, HashSet<int> specialIds,
                           List<CodePointRegex> splits, bool ignoreMerges, bool addPrefixSpace)
    {
        _bpe = bpe; _vocab = vocab; _addedTokens = added; _specialIds = specialIds; _splits = splits;
        _ignoreMerges = ignoreMerges; _addPrefixSpace = addPrefixSpace;
        _idToToken = new Dictionary<int, string>();
        foreach (var (t, id) in vocab) _idToToken[id] = t;
        foreach (var (t, id) in added) _idToToken[id] = t;
        VocabSize = _idToToken.Keys.Max() + 1;
        if (added.Count > 0)
            _addedTokenRegex = new Regex(string.Join("|", added.Keys.OrderByDescending(k => k.Length).Select(Regex.Escape)), RegexOptions.CultureInvariant);
    }

    /// <summary>Id of a token string (vocabulary or added token), or null.</summary>
    public int? TokenToId(string token) =>
        _addedTokens.TryGetValue(token, out int a) ? a : _vocab.TryGetValue(token, out int v) ? v : null;

    /// <summary>Sets the special ids (the loader takes them from tokenizer_config.json / config.json).</summary>
    public HfBpeTokenizer WithSpecialIds(int? bos, int? eos, int? pad)
    {
        if (TokenizerLoader.SpecialIdProblem(VocabSize, bos, eos, pad) is { } problem) throw new ArgumentOutOfRangeException(nameof(bos), problem);
        BosId = bos; EosId = eos; PadId = pad;
        foreach (int? id in new[] { bos, eos, pad }) if (id is int i) _specialIds.Add(i);
        return this;
    }

    /// <summary>
    /// Reads tokenizer.json. A file that is not strict UTF-8 JSON, or whose structure is not a tokenizer's (a missing
    /// or mistyped field, an id outside [0, <see cref="Limits.MaxVocabSize"/>), a bad regex), is an
    /// <see cref="InvalidDataException"/> naming the file; an unsupported tokenizer a <see cref="NotSupportedException"/>.
    /// </summary>
    public static HfBpeTokenizer FromFile(string path)
    {
        InvalidDataException Bad(string problem, Exception? inner) => new($"{path}: {problem}", inner);
        byte[] bytes = TextInput.ReadFile(path, Limits.MaxJsonFileBytes, Bad);
        using var doc = TextInput.ParseJson(bytes, Bad);
        try { return FromDocument(doc); }
        catch (NotSupportedException e) { throw new NotSupportedException($"{path}: {e.Message}", e); }
        catch (InvalidDataException e) { throw new InvalidDataException($"{path}: {e.Message}", e); }
        catch (Exception e) when (IsMalformed(e)) { throw Bad($"not a tokenizer.json this reader understands: {e.Message}", e); }
    }

    public static HfBpeTokenizer FromStream(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        var buffer = new MemoryStream();
        stream.CopyTo(buffer);
        InvalidDataException Bad(string problem, Exception? inner) => new($"tokenizer.json: {problem}", inner);
        using var doc = TextInput.ParseJson(buffer.ToArray(), Bad);
        try { return FromDocument(doc); }
        catch (Exception e) when (IsMalformed(e)) { throw Bad($"not a tokenizer.json this reader understands: {e.Message}", e); }
    }

    /// <summary>What JsonElement's typed getters and the tokenizer's constructors throw on a document of the wrong shape.</summary>
    private static bool IsMalformed(Exception e) =>
        e is KeyNotFoundException or InvalidOperationException or FormatException or ArgumentException or IndexOutOfRangeException or OverflowException;

    private static HfBpeTokenizer FromDocument(JsonDocument doc)
    {
        var root = doc.RootElement;
        if (!root.TryGetProperty("model", out var model) || model.ValueKind != JsonValueKind.Object)
            throw new InvalidDataException("tokenizer.json has no \"model\" object");
        string type = model.TryGetProperty("type", out var t) && t.ValueKind == JsonValueKind.String ? t.GetString()! : "BPE";
        if (type != "BPE") throw new NotSupportedException($"tokenizer.json model type \"{type}\" is not supported (BPE only)");
        if (root.TryGetProperty("normalizer", out var norm) && norm.ValueKind != JsonValueKind.Null)
            throw new NotSupportedException($"tokenizer.json normalizer \"{TypeOf(norm)}\" is not supported (a byte-level BPE such as Llama 3's has none)");

        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var p in model.GetProperty("vocab").EnumerateObject()) vocab[p.Name] = TokenId(p.Value, $"model.vocab \"{p.Name}\"");
        var merges = new List<string>();
        if (model.TryGetProperty("merges", out var m))
            foreach (var e in m.EnumerateArray())
                merges.Add(e.ValueKind == JsonValueKind.String ? e.GetString()! : $"{e[0].GetString()} {e[1].GetString()}");
        bool ignoreMerges = model.TryGetProperty("ignore_merges", out var im) && im.ValueKind == JsonValueKind.True;
        if (model.TryGetProperty("byte_fallback", out var bf) && bf.ValueKind == JsonValueKind.True)
            throw new NotSupportedException("tokenizer.json uses byte_fallback (a SentencePiece-style BPE such as Llama 2's): load tokenizer.model instead");

        var added = new Dictionary<string, int>(StringComparer.Ordinal);
        var specialIds = new HashSet<int>();
        if (root.TryGetProperty("added_tokens", out var at) && at.ValueKind == JsonValueKind.Array)
            foreach (var e in at.EnumerateArray())
            {
                int id = TokenId(e.GetProperty("id"), "added_tokens id");
                added[e.GetProperty("content").GetString()!] = id;
                if (e.TryGetProperty("special", out var sp) && sp.ValueKind == JsonValueKind.True) specialIds.Add(id);
            }

        if (vocab.Count == 0 && added.Count == 0) throw new InvalidDataException("model.vocab: is empty");

        var splits = new List<CodePointRegex>();
        bool byteLevel = false, addPrefixSpace = false;
        if (root.TryGetProperty("pre_tokenizer", out var pre) && pre.ValueKind != JsonValueKind.Null)
            ReadPreTokenizer(pre, splits, ref byteLevel, ref addPrefixSpace);
        if (root.TryGetProperty("decoder", out var dec) && dec.ValueKind == JsonValueKind.Object && TypeOf(dec) == "ByteLevel") byteLevel = true;
        if (!byteLevel)
            throw new NotSupportedException("tokenizer.json is not a byte-level BPE (no ByteLevel pre-tokenizer or decoder); for a SentencePiece model load tokenizer.model");

        var options = new BpeOptions(vocab) { Merges = merges, ByteLevel = false };
        var bpe = BpeTokenizer.Create(options);
        return new HfBpeTokenizer(bpe, vocab, added, specialIds, splits, ignoreMerges, addPrefixSpace);
    }

    /// <summary>A token id: an integer in [0, <see cref="Limits.MaxVocabSize"/>) (the vocabulary is sized from the largest).</summary>
    private static int TokenId(JsonElement e, string what)
    {
        if (e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int id) && id >= 0 && id < Limits.MaxVocabSize) return id;
        throw new InvalidDataException($"{what}: {e.GetRawText()} is not a token id in [0, {Limits.MaxVocabSize})");
    }

    private static string TypeOf(JsonElement e) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty("type", out var t) ? t.GetString() ?? "?" : "?";

    private static void ReadPreTokenizer(JsonElement pre, List<CodePointRegex> splits, ref bool byteLevel, ref bool addPrefixSpace)
    {
        switch (TypeOf(pre))
        {
            case "Sequence":
                foreach (var p in pre.GetProperty("pretokenizers").EnumerateArray()) ReadPreTokenizer(p, splits, ref byteLevel, ref addPrefixSpace);
                break;
            case "ByteLevel":
                byteLevel = true;
                if (pre.TryGetProperty("add_prefix_space", out var aps) && aps.ValueKind == JsonValueKind.True) addPrefixSpace = true;
                if (!pre.TryGetProperty("use_regex", out var ur) || ur.ValueKind != JsonValueKind.False)
                    splits.Add(new CodePointRegex(Gpt2Pattern));
                break;
            case "Split":
                string behavior = pre.TryGetProperty("behavior", out var b) ? b.GetString() ?? "" : "";
                if (behavior != "Isolated") throw new NotSupportedException($"Split pre-tokenizer behavior \"{behavior}\" is not supported (Isolated only)");
                if (pre.TryGetProperty("invert", out var inv) && inv.ValueKind == JsonValueKind.True)
                    throw new NotSupportedException("Split pre-tokenizer with invert true is not supported");
                var pat = pre.GetProperty("pattern");
                string rx = pat.TryGetProperty("Regex", out var r) ? r.GetString()! : Regex.Escape(pat.GetProperty("String").GetString()!);
                splits.Add(new CodePointRegex(rx));
                break;
            default:
                throw new NotSupportedException($"pre-tokenizer \"{TypeOf(pre)}\" is not supported (Split, ByteLevel, Sequence)");
        }
    }

    public int[] Encode(string text, bool addBos)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>();
        if (addBos)
        {
            if (BosId is not int bos) throw new InvalidOperationException("this tokenizer has no bos token");
            ids.Add(bos);
        }
        if (_addPrefixSpace && text.Length > 0 && text[0] != ' ') text = " " + text;
        int pos = 0;
        if (_addedTokenRegex is not null)
            foreach (Match match in _addedTokenRegex.Matches(text))
            {
                EncodeOrdinary(text.AsSpan(pos, match.Index - pos), ids);
                ids.Add(_addedTokens[match.Value]);
                pos = match.Index + match.Length;
            }
        EncodeOrdinary(text.AsSpan(pos), ids);
        return ids.ToArray();
    }

    private void EncodeOrdinary(ReadOnlySpan<char> segment, List<int> ids)
    {
        if (segment.IsEmpty) return;
        var pieces = new List<string> { segment.ToString() };
        foreach (var rx in _splits)
        {
            var next = new List<string>();
            foreach (string p in pieces) rx.SplitIsolated(p, next);
            pieces = next;
        }
        foreach (string piece in pieces)
        {
            string mapped = ToByteSymbols(piece);
            if (_ignoreMerges && _vocab.TryGetValue(mapped, out int whole)) { ids.Add(whole); continue; }
            ids.AddRange(_bpe.EncodeToIds(mapped, considerPreTokenization: false, considerNormalization: false));
        }
    }

    public string Decode(ReadOnlySpan<int> ids)
    {
        var bytes = new List<byte>();
        foreach (int id in ids)
        {
            if (_specialIds.Contains(id)) continue;
            if (!_idToToken.TryGetValue(id, out var token)) throw new ArgumentOutOfRangeException(nameof(ids), $"id {id} is not in the vocabulary");
            if (_addedTokens.ContainsKey(token)) { bytes.AddRange(Encoding.UTF8.GetBytes(token)); continue; }
            foreach (char c in token)
                if (CharToByte.TryGetValue(c, out byte by)) bytes.Add(by);
                else bytes.AddRange(Encoding.UTF8.GetBytes(c.ToString()));
        }
        return Encoding.UTF8.GetString(bytes.ToArray());
    }

    /// <summary>
    /// A pre-tokenizer regex matched on code points. .NET's <see cref="Regex"/> matches UTF-16 code units, so a
    /// supplementary-plane letter or digit (𝐀, 𝟏, 𠮷: a surrogate pair) is neither \p{L} nor \p{N} to it and falls
    /// into Llama 3's punctuation branch (" 𝟓" one piece, "𝐀's" cut as "𝐀'" "s"), while HF tokenizers (Oniguruma)
    /// and tiktoken match code points (" ", "𝟓"; "𝐀", "'s"). So a piece with surrogate pairs is matched in a view
    /// where each such code point is one BMP stand-in of the same Unicode category (not ASCII, not case-equal to
    /// ASCII, not in the pattern), and the match bounds are mapped back to the original text.
    /// </summary>
    private sealed class CodePointRegex
    {
        private readonly Regex _regex;
        private readonly char[] _standIn = new char[32];   // by UnicodeCategory; '\0' where there is none

        public CodePointRegex(string pattern)
        {
            _regex = new Regex(pattern, RegexOptions.CultureInvariant);
            for (int c = 0x80; c <= 0xFFFF; c++)
            {
                char ch = (char)c;
                int cat = (int)CharUnicodeInfo.GetUnicodeCategory(ch);
                if (_standIn[cat] != '\0' || char.IsSurrogate(ch)) continue;
                char lower = char.ToLowerInvariant(ch), upper = char.ToUpperInvariant(ch);
                if (lower < 0x80 || upper < 0x80 || pattern.Contains(ch) || pattern.Contains(lower) || pattern.Contains(upper)) continue;
                _standIn[cat] = ch;
            }
        }

        /// <summary>Appends the pieces of <paramref name="text"/>: each non-empty match and the text between matches (Split, Isolated).</summary>
        public void SplitIsolated(string text, List<string> into)
        {
            string view = text;
            int[]? start = null;                            // view index → text index (and view.Length → text.Length)
            if (text.AsSpan().IndexOfAnyInRange('\uD800', '\uDFFF') >= 0) view = CodePointView(text, out start);
            int at = 0;
            foreach (Match m in _regex.Matches(view))
            {
                if (m.Length == 0) continue;
                int from = start?[m.Index] ?? m.Index, to = start?[m.Index + m.Length] ?? m.Index + m.Length;
                if (from > at) into.Add(text[at..from]);
                into.Add(text[from..to]);
                at = to;
            }
            if (at < text.Length) into.Add(text[at..]);
        }

        private string CodePointView(string text, out int[] start)
        {
            var view = new StringBuilder(text.Length);
            var starts = new List<int>(text.Length + 1);
            for (int i = 0; i < text.Length;)
            {
                starts.Add(i);
                if (Rune.DecodeFromUtf16(text.AsSpan(i), out Rune r, out int used) == OperationStatus.Done && used == 2)
                {
                    char standIn = _standIn[(int)Rune.GetUnicodeCategory(r)];
                    if (standIn != '\0') { view.Append(standIn); i += 2; continue; }
                }
                view.Append(text[i]); i++;                  // a BMP character, or an unpaired surrogate as it is
                if (used == 2) { starts.Add(i); view.Append(text[i]); i++; }
            }
            starts.Add(text.Length);
            start = starts.ToArray();
            return view.ToString();
        }
    }

    /// <summary>GPT-2's byte → printable character map applied to the UTF-8 bytes of <paramref name="text"/>.</summary>
    public static string ToByteSymbols(string text)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(text);
        var chars = new char[bytes.Length];
        for (int i = 0; i < bytes.Length; i++) chars[i] = ByteToChar[bytes[i]];
        return new string(chars);
    }

    /// <summary>GPT-2's bytes_to_unicode: printable bytes map to themselves, the other 68 to U+0100 upward in byte order.</summary>
    private static char[] BuildByteToChar()
    {
        var map = new char[256];
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = printable ? (char)b : (char)(256 + n++);
        }
        return map;
    }

    private static Dictionary<char, byte> BuildCharToByte()
    {
        var d = new Dictionary<char, byte>();
        for (int b = 0; b < 256; b++) d[ByteToChar[b]] = (byte)b;
        return d;
    }
}
