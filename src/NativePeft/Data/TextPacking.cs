namespace NativePeft.Data;

/// <summary>Causal-LM text packed into fixed-length sequences.</summary>
public static class TextPacking
{
    /// <summary>
    /// Tokenizes each document (bos first when the tokenizer has one), concatenates them — with eos after every
    /// document when <paramref name="eosBetweenDocuments"/> — and cuts the stream into sequences of
    /// <paramref name="seqLen"/> tokens; a shorter last piece is kept when it has at least 2 tokens. Labels equal
    /// the ids (the model shifts). Attention is not masked at document boundaries inside a sequence.
    /// </summary>
    public static List<TrainingExample> Pack(IReadOnlyList<string> documents, ITokenizer tokenizer, int seqLen, bool eosBetweenDocuments = false)
    {
        ArgumentNullException.ThrowIfNull(documents);
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentOutOfRangeException.ThrowIfLessThan(seqLen, 2);
        if (eosBetweenDocuments && tokenizer.EosId is null) throw new InvalidOperationException("eos between documents needs a tokenizer with an eos token");
        var stream = new List<int>();
        foreach (string d in documents)
        {
            stream.AddRange(tokenizer.Encode(d, addBos: tokenizer.BosId is not null));
            if (eosBetweenDocuments) stream.Add(tokenizer.EosId!.Value);
        }
        var result = new List<TrainingExample>();
        for (int start = 0; start < stream.Count; start += seqLen)
        {
            int n = Math.Min(seqLen, stream.Count - start);
            if (n < 2) break;
            result.Add(TrainingExample.CausalLm(stream.GetRange(start, n).ToArray()));
        }
        return result;
    }
}
