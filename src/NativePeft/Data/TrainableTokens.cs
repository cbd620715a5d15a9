namespace NativePeft.Data;

/// <summary>
/// What truncation to a sequence length leaves to learn: an example trains only through its targets, the positions
/// t ≥ 1 (the model shifts: position t−1 predicts labels[t]) with labels[t] ≠ -100 that lie inside the first SeqLen
/// tokens. An Alpaca prompt longer than the sequence length loses every target and trains nothing.
/// </summary>
/// <param name="Examples">Examples checked.</param>
/// <param name="CutOff">Examples that have targets, all of them at or past <paramref name="SeqLen"/>.</param>
/// <param name="WithoutTargets">Examples with no target at any length (every label -100).</param>
/// <param name="SeqLen">The sequence length checked.</param>
/// <param name="SeqLenForAll">The shortest sequence length that keeps every example's first target (0 when none has one).</param>
/// <param name="SeqLenFor90">The shortest that keeps the first target of 90 % of the examples that have one.</param>
public sealed record TruncationReport(int Examples, int CutOff, int WithoutTargets, int SeqLen, int SeqLenForAll, int SeqLenFor90)
{
    /// <summary>Examples that keep at least one target.</summary>
    public int Trainable => Examples - CutOff - WithoutTargets;

    /// <summary>The index of an example's first target (≥ 1), or -1 when every label from 1 on is -100.</summary>
    public static int FirstTarget(TrainingExample example)
    {
        var labels = example.Labels;
        for (int t = 1; t < labels.Length; t++)
            if (labels[t] != TrainingExample.IgnoreIndex) return t;
        return -1;
    }

    /// <summary>Checks <paramref name="examples"/> at <paramref name="seqLen"/>.</summary>
    public static TruncationReport Check(IReadOnlyList<TrainingExample> examples, int seqLen)
    {
        ArgumentNullException.ThrowIfNull(examples);
        var needed = new List<int>(examples.Count);
        int cut = 0, without = 0;
        foreach (var e in examples)
        {
            int first = FirstTarget(e);
            if (first < 0) { without++; continue; }
            needed.Add(first + 1);
            if (first >= seqLen) cut++;
        }
        needed.Sort();
        int all = needed.Count == 0 ? 0 : needed[^1];
        int p90 = needed.Count == 0 ? 0 : needed[Math.Max(0, (int)Math.Ceiling(0.9 * needed.Count) - 1)];
        return new TruncationReport(examples.Count, cut, without, seqLen, all, p90);
    }

    /// <summary>"a sequence length of N keeps every example's first target (M keeps 90 %)".</summary>
    public string FitHint => SeqLenFor90 < SeqLenForAll
        ? $"a sequence length of {SeqLenForAll} keeps every example's first trainable token ({SeqLenFor90} keeps 90 %)"
        : $"a sequence length of {SeqLenForAll} keeps every example's first trainable token";
}
