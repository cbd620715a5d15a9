namespace NativePeft.Data;

/// <summary>
/// The stand-in for a model folder without tokenizer files (<see cref="TokenizerLoader.ForModel"/>): token ids only.
/// <see cref="VocabSize"/> is the model's config.json vocab_size and the special ids come from the id keys of
/// tokenizer_config.json or config.json (bos_token_id, eos_token_id, pad_token_id), so pre-tokenized data batches,
/// pads, trains and evaluates as with a real tokenizer. <see cref="Encode"/> and <see cref="Decode"/>, which need a
/// vocabulary, throw a <see cref="FileNotFoundException"/> naming the folder and the missing files.
/// </summary>
public sealed class IdsOnlyTokenizer : ITokenizer
{
    /// <summary>The model folder that has no tokenizer files.</summary>
    public string Folder { get; }
    public int VocabSize { get; }
    public int? BosId { get; }
    public int? EosId { get; }
    public int? PadId { get; }

    public IdsOnlyTokenizer(string folder, int vocabSize, int? bosId = null, int? eosId = null, int? padId = null)
    {
        ArgumentNullException.ThrowIfNull(folder);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(vocabSize);
        Folder = folder;
        VocabSize = vocabSize;
        // A special id outside the vocabulary could not be looked up in the embedding: it is left out (padding then
        // uses eos, or 0; the padded positions carry no loss either way).
        BosId = InRange(bosId);
        EosId = InRange(eosId);
        PadId = InRange(padId);
    }

    /// <summary>The stand-in for <paramref name="folder"/>, its special ids read from the folder's JSON files.</summary>
    public static IdsOnlyTokenizer Create(string folder, int vocabSize)
    {
        var (bos, eos, pad) = TokenizerLoader.ResolveSpecialIds(folder);
        return new IdsOnlyTokenizer(folder, vocabSize, bos, eos, pad);
    }

    /// <summary>"FOLDER has no tokenizer.json or tokenizer.model (…): WHAT needs a tokenizer; …" (and, for data, that
    /// pre-tokenized data needs none).</summary>
    public string MissingMessage(string what, bool suggestPreTokenized = true) =>
        $"{Folder} has no {TokenizerLoader.TokenizerFilesText}: {what} needs a tokenizer; put the model's tokenizer files " +
        "into the folder" + (suggestPreTokenized ? ", or use pre-tokenized data ({\"input_ids\": [...]} JSONL), which needs none" : "");

    public int[] Encode(string text, bool addBos) => throw Missing("reading text", true);

    public string Decode(ReadOnlySpan<int> ids) => throw Missing("printing text", false);

    private FileNotFoundException Missing(string what, bool suggestPreTokenized) =>
        new(MissingMessage(what, suggestPreTokenized), Path.Combine(Folder, "tokenizer.json"));

    private int? InRange(int? id) => id is int i && i >= 0 && i < VocabSize ? i : null;
}
