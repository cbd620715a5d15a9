using Microsoft.ML.Tokenizers;

namespace NativePeft.Data;

/// <summary>
/// A SentencePiece tokenizer.model (protobuf; BPE or Unigram), as Llama 2 ships it, through Microsoft.ML.Tokenizers'
/// <see cref="LlamaTokenizer"/>: the model's own normalization, dummy prefix and byte fallback apply. bos/eos come
/// from the model unless the loader overrides them from tokenizer_config.json / config.json.
/// </summary>
public sealed class SentencePieceModelTokenizer : ITokenizer
{
    private readonly LlamaTokenizer _sp;

    public int VocabSize { get; }
    public int? BosId { get; private set; }
    public int? EosId { get; private set; }
    public int? PadId { get; private set; }

    private SentencePieceModelTokenizer(LlamaTokenizer sp)
    {
        _sp = sp;
        VocabSize = sp.Vocabulary.Values.Max() + 1;
        BosId = sp.BeginningOfSentenceId;
        EosId = sp.EndOfSentenceId;
    }

    public static SentencePieceModelTokenizer FromFile(string path)
    {
        using var stream = File.OpenRead(path);
        try { return new SentencePieceModelTokenizer(LlamaTokenizer.Create(stream, addBeginOfSentence: false, addEndOfSentence: false)); }
        catch (Exception e) when (e is not IOException)
        {
            throw new InvalidDataException($"{path}: not a SentencePiece model Microsoft.ML.Tokenizers can load: {e.Message}", e);
        }
    }

    /// <summary>Id of a piece, or null.</summary>
    public int? TokenToId(string token) => _sp.Vocabulary.TryGetValue(token, out int id) ? id : null;

    /// <summary>Overrides the special ids (null keeps the model's for bos/eos).</summary>
    public SentencePieceModelTokenizer WithSpecialIds(int? bos, int? eos, int? pad)
    {
        if (TokenizerLoader.SpecialIdProblem(VocabSize, bos, eos, pad) is { } problem) throw new ArgumentOutOfRangeException(nameof(bos), problem);
        BosId = bos ?? BosId; EosId = eos ?? EosId; PadId = pad;
        return this;
    }

    public int[] Encode(string text, bool addBos)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = _sp.EncodeToIds(text, addBeginningOfSentence: false, addEndOfSentence: false,
                                  considerPreTokenization: true, considerNormalization: true);
        if (!addBos) return ids.ToArray();
        if (BosId is not int bos) throw new InvalidOperationException("this tokenizer has no bos token");
        var result = new int[ids.Count + 1];
        result[0] = bos;
        for (int i = 0; i < ids.Count; i++) result[i + 1] = ids[i];
        return result;
    }

    public string Decode(ReadOnlySpan<int> ids)
    {
        var list = new List<int>(ids.Length);
        foreach (int id in ids)
        {
            if ((uint)id >= (uint)VocabSize) throw new ArgumentOutOfRangeException(nameof(ids), $"id {id} is outside the vocabulary [0, {VocabSize})");
            if (id == BosId || id == EosId || id == PadId) continue;
            list.Add(id);
        }
        return _sp.Decode(list, considerSpecialTokens: false);
    }
}
