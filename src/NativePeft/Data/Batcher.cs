using System.Globalization;
using System.Text.Json;

namespace NativePeft.Data;

/// <summary>How examples become rows of a batch.</summary>
public enum BatchMode
{
    /// <summary>One example per row, right-padded with the pad id (labels -100) to the sequence length. The default.</summary>
    Padding,
    /// <summary>
    /// Several examples per row, back to back (in order, a new row when the next example does not fit), the rest of the
    /// row padded. Each example stays a document of its own: the batch's <see cref="Batch.Positions"/> restart at 0 at
    /// every example (and at the padding), so the model's RoPE positions are those the example has alone, attention
    /// never crosses a boundary, and each example's first label is -100 (nothing predicts across a boundary). An
    /// example thus trains exactly as in <see cref="Padding"/>, with fewer padding positions.
    /// </summary>
    Packing,
    /// <summary>
    /// Concatenation for pretraining streams (how the built-in model was pretrained): examples back to back as in
    /// <see cref="Packing"/>, an eos (label -100) between two examples when the first does not end with eos, but one
    /// sequence per row: attention runs across the examples, positions run on (0..T−1), labels are kept as they are.
    /// </summary>
    Concatenation,
}

/// <summary>Settings of a <see cref="Batcher"/>.</summary>
public sealed record BatcherOptions
{
    /// <summary>Rows per batch (B).</summary>
    public int BatchSize { get; init; } = 8;
    /// <summary>Row length (T); longer examples are truncated (counted in <see cref="Batcher.Truncated"/>).</summary>
    public int SeqLen { get; init; } = 128;
    public BatchMode Mode { get; init; } = BatchMode.Padding;
    /// <summary>Shuffle the examples each epoch (a permutation from <see cref="Seed"/> and the epoch number).</summary>
    public bool Shuffle { get; init; } = true;
    public ulong Seed { get; init; }
    /// <summary>Leave out an epoch's last batch when it would have fewer than <see cref="BatchSize"/> rows.</summary>
    public bool DropLast { get; init; }
}

/// <summary>
/// Where a <see cref="Batcher"/> stands: epoch, number of examples of that epoch's permutation already consumed,
/// the permutation seed, and the dataset size (checked on restore). Restoring it gives the identical next batches.
/// </summary>
public readonly record struct DataPosition(int Epoch, int Index, ulong Seed, int ExampleCount)
{
    public string ToJson() => string.Create(CultureInfo.InvariantCulture,
        $"{{\"epoch\": {Epoch}, \"index\": {Index}, \"seed\": {Seed}, \"examples\": {ExampleCount}}}");

    public static DataPosition FromJson(string json)
    {
        using var doc = JsonDocument.Parse(json);
        var r = doc.RootElement;
        return new DataPosition(r.GetProperty("epoch").GetInt32(), r.GetProperty("index").GetInt32(),
                                r.GetProperty("seed").GetUInt64(), r.GetProperty("examples").GetInt32());
    }
}

/// <summary>A batch: <see cref="InputIds"/> and <see cref="Labels"/> row-major [Rows, SeqLen].</summary>
public sealed class Batch
{
    public required int Rows { get; init; }
    public required int SeqLen { get; init; }
    public required int[] InputIds { get; init; }
    public required int[] Labels { get; init; }
    /// <summary>
    /// <see cref="BatchMode.Packing"/>: each token's position inside its document, row-major [Rows, SeqLen] (0 at every
    /// document start, +1 per token; the padding at a row's end is a document of its own). Null in the other modes:
    /// each row is one sequence, positions 0..SeqLen−1.
    /// </summary>
    public int[]? Positions { get; init; }
    /// <summary>Epoch the batch's examples came from.</summary>
    public required int Epoch { get; init; }
    /// <summary>Examples in the batch.</summary>
    public required int Examples { get; init; }
    /// <summary>Positions that are not padding.</summary>
    public required int Tokens { get; init; }
    /// <summary>Positions with a label (≠ -100).</summary>
    public int LabelledTokens => Labels.Count(l => l != TrainingExample.IgnoreIndex);
}

/// <summary>
/// Turns examples into fixed-shape batches, epoch after epoch, forever (<see cref="Next"/>). Each epoch visits every
/// example once, in a permutation drawn from (seed, epoch) when shuffling (SplitMix64 + Fisher–Yates: the same on
/// every machine), else in order. A batch never spans two epochs: the last batch of an epoch may have fewer rows
/// (or is dropped with <see cref="BatcherOptions.DropLast"/>). <see cref="Position"/> / <see cref="Restore"/> save
/// and resume exactly.
/// </summary>
public sealed class Batcher
{
    private readonly IReadOnlyList<TrainingExample> _examples;
    private readonly int _padId;
    private readonly int? _eosId;
    private int[] _perm = [];
    private int _permEpoch = -1;
    private ulong _seed;
    private int _epoch, _index;
    private int _lastTruncated;

    public BatcherOptions Options { get; }
    /// <summary>Examples cut to <see cref="BatcherOptions.SeqLen"/> so far.</summary>
    public int Truncated { get; private set; }

    /// <param name="padId">Id for padding positions (their labels are -100): the tokenizer's pad, else its eos.</param>
    /// <param name="eosId">Separator for <see cref="BatchMode.Concatenation"/> (required there).</param>
    public Batcher(IReadOnlyList<TrainingExample> examples, BatcherOptions options, int padId, int? eosId = null)
    {
        ArgumentNullException.ThrowIfNull(examples);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.BatchSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.SeqLen, 1);
        // Batches are int arrays of BatchSize × SeqLen: the product is bounded before it is computed in int.
        if ((long)options.BatchSize * options.SeqLen > NativePeft.IO.Limits.MaxTokensPerBatch)
            throw new ArgumentOutOfRangeException(nameof(options),
                $"batch size {options.BatchSize} × sequence length {options.SeqLen} = {(long)options.BatchSize * options.SeqLen} tokens is more than the {NativePeft.IO.Limits.MaxTokensPerBatch} a batch may hold");
        if (examples.Count == 0) throw new ArgumentException("no examples to batch", nameof(examples));
        if (options.Mode == BatchMode.Concatenation && eosId is null) throw new ArgumentException("concatenation needs an eos id", nameof(eosId));
        if (options.DropLast && options.Mode == BatchMode.Padding && examples.Count < options.BatchSize)
            throw new ArgumentException($"drop_last with {examples.Count} examples and batch size {options.BatchSize} would never produce a batch");
        for (int i = 0; i < examples.Count; i++)
            if (examples[i].InputIds.Length != examples[i].Labels.Length || examples[i].InputIds.Length == 0)
                throw new ArgumentException($"example {i}: {examples[i].InputIds.Length} input ids and {examples[i].Labels.Length} labels");
        _examples = examples;
        Options = options;
        _padId = padId;
        _eosId = eosId;
        _seed = options.Seed;
    }

    /// <summary>A batcher with the tokenizer's pad (else eos) and eos.</summary>
    public static Batcher For(IReadOnlyList<TrainingExample> examples, BatcherOptions options, ITokenizer tokenizer) =>
        new(examples, options, tokenizer.PadId ?? tokenizer.EosId ?? 0, tokenizer.EosId);

    public int ExampleCount => _examples.Count;
    public DataPosition Position => new(_epoch, _index, _seed, _examples.Count);

    /// <summary>Resume at a saved position (its seed replaces the options' seed).</summary>
    public void Restore(DataPosition position)
    {
        if (position.ExampleCount != _examples.Count)
            throw new ArgumentException($"the position was saved for {position.ExampleCount} examples, this dataset has {_examples.Count}");
        if (position.Epoch < 0 || position.Index < 0 || position.Index > _examples.Count)
            throw new ArgumentOutOfRangeException(nameof(position), $"invalid position {position}");
        _seed = position.Seed;
        _epoch = position.Epoch;
        _index = position.Index;
        _permEpoch = -1;
    }

    /// <summary>The order of the examples in an epoch.</summary>
    public int[] Permutation(int epoch)
    {
        var p = new int[_examples.Count];
        for (int i = 0; i < p.Length; i++) p[i] = i;
        if (!Options.Shuffle) return p;
        var rng = new SplitMix(_seed ^ (0xD1B54A32D192ED03UL * (ulong)(epoch + 1)));
        for (int i = p.Length - 1; i > 0; i--)
        {
            int j = rng.Next(i + 1);
            (p[i], p[j]) = (p[j], p[i]);
        }
        return p;
    }

    /// <summary>The next batch (moving to the next epoch when this one is used up).</summary>
    public Batch Next()
    {
        for (int guard = 0; ; guard++)
        {
            if (guard > 2) throw new InvalidOperationException("no batch can be formed (drop_last with too few examples)");
            if (_index >= _examples.Count) { _epoch++; _index = 0; }
            if (_permEpoch != _epoch) { _perm = Permutation(_epoch); _permEpoch = _epoch; }
            var (batch, consumed) = Options.Mode == BatchMode.Padding ? Pad(_index) : Pack(_index);
            if (Options.DropLast && batch.Rows < Options.BatchSize) { _epoch++; _index = 0; continue; }
            _index += consumed;
            Truncated += _lastTruncated;
            return batch;
        }
    }

    private (Batch, int) Pad(int start)
    {
        int B = Options.BatchSize, T = Options.SeqLen;
        int rows = Math.Min(B, _examples.Count - start);
        var ids = new int[rows * T];
        var labels = new int[rows * T];
        Array.Fill(ids, _padId);
        Array.Fill(labels, TrainingExample.IgnoreIndex);
        int tokens = 0;
        _lastTruncated = 0;
        for (int r = 0; r < rows; r++)
        {
            var ex = _examples[_perm[start + r]];
            int n = Math.Min(ex.Length, T);
            if (n < ex.Length) _lastTruncated++;
            ex.InputIds.AsSpan(0, n).CopyTo(ids.AsSpan(r * T));
            ex.Labels.AsSpan(0, n).CopyTo(labels.AsSpan(r * T));
            tokens += n;
        }
        return (new Batch { Rows = rows, SeqLen = T, InputIds = ids, Labels = labels, Epoch = _epoch, Examples = rows, Tokens = tokens }, rows);
    }

    /// <summary>
    /// <see cref="BatchMode.Packing"/> (documents: positions restart, first labels -100, no separator) and
    /// <see cref="BatchMode.Concatenation"/> (one stream per row: eos separators, labels as they are, no positions).
    /// </summary>
    private (Batch, int) Pack(int start)
    {
        int B = Options.BatchSize, T = Options.SeqLen;
        bool documents = Options.Mode == BatchMode.Packing;
        int eos = documents ? -1 : _eosId!.Value;
        var ids = new int[B * T];
        var labels = new int[B * T];
        var positions = documents ? new int[B * T] : null;
        var filled = new int[B];  // tokens of each row before its padding
        Array.Fill(ids, _padId);
        Array.Fill(labels, TrainingExample.IgnoreIndex);
        int row = 0, col = 0, k = start, tokens = 0;
        bool prevEndsWithEos = true;
        _lastTruncated = 0;
        while (k < _examples.Count && row < B)
        {
            var ex = _examples[_perm[k]];
            int sep = !documents && col > 0 && !prevEndsWithEos ? 1 : 0;
            if (col > 0 && col + sep + ex.Length > T) { filled[row] = col; row++; col = 0; prevEndsWithEos = true; continue; }
            int at = row * T + col;
            if (sep == 1) { ids[at] = eos; at++; col++; tokens++; }
            int n = Math.Min(ex.Length, T - col);
            if (n < ex.Length) _lastTruncated++;
            ex.InputIds.AsSpan(0, n).CopyTo(ids.AsSpan(at));
            ex.Labels.AsSpan(0, n).CopyTo(labels.AsSpan(at));
            if (documents)
            {
                // A document of its own: positions 0.., and its first token is no target of the previous document.
                for (int i = 0; i < n; i++) positions![at + i] = i;
                labels[at] = TrainingExample.IgnoreIndex;
            }
            col += n; tokens += n;
            prevEndsWithEos = ex.InputIds[^1] == eos;
            k++;
            if (col >= T) { filled[row] = col; row++; col = 0; prevEndsWithEos = true; }
        }
        int rows = col > 0 ? row + 1 : row;
        if (col > 0) filled[row] = col;
        if (positions is not null)
        {
            // The padding after a row's last document is a document of its own (0, 1, ...): it attends only to padding.
            for (int r = 0; r < rows; r++)
                for (int i = filled[r]; i < T; i++) positions[r * T + i] = i - filled[r];
        }
        if (rows < B)
        {
            Array.Resize(ref ids, rows * T);
            Array.Resize(ref labels, rows * T);
            if (positions is not null) Array.Resize(ref positions, rows * T);
        }
        return (new Batch
        {
            Rows = rows, SeqLen = T, InputIds = ids, Labels = labels, Positions = positions, Epoch = _epoch, Examples = k - start, Tokens = tokens,
        }, k - start);
    }

    /// <summary>One pass over the examples in order, padded, last batch possibly smaller (for evaluation).</summary>
    public static IEnumerable<Batch> Sequential(IReadOnlyList<TrainingExample> examples, int batchSize, int seqLen, int padId)
    {
        var b = new Batcher(examples, new BatcherOptions { BatchSize = batchSize, SeqLen = seqLen, Shuffle = false }, padId);
        for (int done = 0; done < examples.Count;)
        {
            var batch = b.Next();
            done += batch.Examples;
            yield return batch;
        }
    }
}
