using System.Numerics;
using static NativePeft.Ops.Reference.RefChecks;

namespace NativePeft.Ops.Reference;

/// <summary>
/// Token embedding: <c>out[n, :] = table[ids[n], :]</c> with <c>table[vocab, dim]</c> row-major, <c>ids[tokens]</c>.
/// Every id is validated (<c>0 ≤ id &lt; vocab</c>) before anything is written. No allocation.
/// </summary>
public static class EmbeddingRef
{
    /// <summary>Forward: <paramref name="output"/> <c>[ids.Length, dim]</c> is overwritten with the rows of <paramref name="table"/>.</summary>
    public static void Forward<T>(ReadOnlySpan<int> ids, ReadOnlySpan<T> table, Span<T> output, int vocab, int dim)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        Validate(ids, vocab, dim);
        Length(table.Length, (long)vocab * dim, nameof(table));
        Length(output.Length, (long)ids.Length * dim, nameof(output));
        for (int n = 0; n < ids.Length; n++)
            table.Slice(ids[n] * dim, dim).CopyTo(output.Slice(n * dim, dim));
    }

    /// <summary>
    /// Backward (scatter-add): ACCUMULATES <c>dtable[ids[n], :] += dout[n, :]</c> for n = 0, 1, … in that order,
    /// in <c>T</c> (so a repeated id sums its rows in token order: deterministic).
    /// </summary>
    public static void Backward<T>(ReadOnlySpan<int> ids, ReadOnlySpan<T> dout, Span<T> dtable, int vocab, int dim)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        Validate(ids, vocab, dim);
        Length(dout.Length, (long)ids.Length * dim, nameof(dout));
        Length(dtable.Length, (long)vocab * dim, nameof(dtable));
        for (int n = 0; n < ids.Length; n++)
        {
            var src = dout.Slice(n * dim, dim);
            var dst = dtable.Slice(ids[n] * dim, dim);
            for (int c = 0; c < dim; c++) dst[c] += src[c];
        }
    }

    private static void Validate(ReadOnlySpan<int> ids, int vocab, int dim)
    {
        Positive(vocab, nameof(vocab));
        Positive(dim, nameof(dim));
        for (int n = 0; n < ids.Length; n++)
            if ((uint)ids[n] >= (uint)vocab)
                throw new ArgumentOutOfRangeException(nameof(ids), ids[n],
                    $"token id {ids[n]} at position {n} is outside the vocabulary [0, {vocab})");
    }
}
