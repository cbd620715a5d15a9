namespace NativePeft.Data;

/// <summary>
/// One training sequence in HF's convention: <see cref="Labels"/> has <see cref="InputIds"/>' length, holds the id
/// to learn at that position (the model shifts: position t predicts labels[t+1]) or <see cref="IgnoreIndex"/>.
/// </summary>
public readonly record struct TrainingExample(int[] InputIds, int[] Labels)
{
    /// <summary>Label of a position without a loss (PyTorch's ignore_index).</summary>
    public const int IgnoreIndex = -100;

    public int Length => InputIds.Length;

    /// <summary>A causal-LM example: labels equal the input ids.</summary>
    public static TrainingExample CausalLm(int[] ids) => new(ids, (int[])ids.Clone());
}

/// <summary>What a loader does with a line it cannot use.</summary>
public enum BadLinePolicy
{
    /// <summary>Throw <see cref="DataFormatException"/> naming the file and line (the default).</summary>
    Stop,
    /// <summary>Leave the line out and count it in <see cref="Dataset.SkippedLines"/>.</summary>
    Skip,
}

/// <summary>A data file's content is wrong; the message names the file and the 1-based line.</summary>
public sealed class DataFormatException : Exception
{
    public string FilePath { get; }
    public int LineNumber { get; }

    public DataFormatException(string source, int lineNumber, string message, Exception? inner = null)
        : base($"{source}:{lineNumber}: {message}", inner)
    {
        FilePath = source;
        LineNumber = lineNumber;
    }

    /// <summary>A problem with the file as a whole (not a regular file, too large): <see cref="LineNumber"/> is 0.</summary>
    public DataFormatException(string source, string message, Exception? inner = null)
        : base($"{source}: {message}", inner)
    {
        FilePath = source;
    }
}

/// <summary>Examples loaded from one source, with the count (and first few messages) of skipped bad lines.</summary>
public sealed class Dataset
{
    public string Name { get; }
    public IReadOnlyList<TrainingExample> Examples { get; }
    public int SkippedLines { get; }
    /// <summary>The first 10 skipped lines' messages ("file:line: why").</summary>
    public IReadOnlyList<string> SkippedMessages { get; }

    public Dataset(string name, IReadOnlyList<TrainingExample> examples, int skippedLines = 0, IReadOnlyList<string>? skippedMessages = null)
    {
        Name = name;
        Examples = examples;
        SkippedLines = skippedLines;
        SkippedMessages = skippedMessages ?? [];
    }

    public int Count => Examples.Count;
    public TrainingExample this[int i] => Examples[i];
    /// <summary>Number of positions with a label (≠ -100) over all examples.</summary>
    public long LabelledTokens => Examples.Sum(e => (long)e.Labels.Count(l => l != TrainingExample.IgnoreIndex));
}
