namespace NativePeft.Data;

/// <summary>
/// Text ↔ token ids. <see cref="Encode"/> never appends eos (datasets add it where a format asks for it);
/// <see cref="Decode"/> drops the special tokens (bos, eos, pad) and returns the text of the rest.
/// </summary>
public interface ITokenizer
{
    /// <summary>Number of ids the model's embedding must have rows for: every id this tokenizer can produce is below it.</summary>
    int VocabSize { get; }
    /// <summary>Beginning-of-sequence id, or null when the tokenizer has none.</summary>
    int? BosId { get; }
    /// <summary>End-of-sequence id, or null when the tokenizer has none.</summary>
    int? EosId { get; }
    /// <summary>Padding id, or null when the tokenizer has none (the <see cref="Batcher"/> then pads with eos, labels -100).</summary>
    int? PadId { get; }
    /// <summary>Token ids of <paramref name="text"/>; bos first when <paramref name="addBos"/> and the tokenizer has one.</summary>
    int[] Encode(string text, bool addBos);
    /// <summary>Text of <paramref name="ids"/>, special tokens left out.</summary>
    string Decode(ReadOnlySpan<int> ids);
}
