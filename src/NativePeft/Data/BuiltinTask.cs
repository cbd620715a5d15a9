namespace NativePeft.Data;

/// <summary>The operation of the built-in task.</summary>
public enum BuiltinTaskKind
{
    /// <summary><c>reverse: abcd\n</c> → <c>dcba</c> (the default).</summary>
    Reverse,
    /// <summary><c>upper: abcd\n</c> → <c>ABCD</c> (an easier fallback).</summary>
    Uppercase,
}

/// <summary>One problem of the built-in task: the model sees <see cref="Prompt"/> and must produce <see cref="Answer"/> then eos.</summary>
public readonly record struct BuiltinProblem(string Word, string Prompt, string Answer);

/// <summary>Settings of the built-in task.</summary>
public sealed record BuiltinTaskOptions
{
    public ulong Seed { get; init; } = 1234;
    public int TrainCount { get; init; } = 2000;
    public int EvalCount { get; init; } = 200;
    /// <summary>Shortest word (letters).</summary>
    public int MinLength { get; init; } = 3;
    /// <summary>Longest word (letters).</summary>
    public int MaxLength { get; init; } = 5;
    public BuiltinTaskKind Kind { get; init; } = BuiltinTaskKind.Reverse;
}

/// <summary>
/// The built-in synthetic instruction task (<c>--data builtin</c>), so training needs no download. Each problem is
/// a random lowercase word w of <see cref="BuiltinTaskOptions.MinLength"/>..<see cref="BuiltinTaskOptions.MaxLength"/>
/// letters; the prompt is <c>"reverse: " + w + "\n"</c> and the answer is w reversed (Kind Reverse), or
/// <c>"upper: " + w + "\n"</c> → w in capitals (Kind Uppercase). Examples: prompt tokens (bos first) are masked
/// (labels -100), the answer and a final eos carry the loss (<see cref="PromptCompletion"/>).
/// Generation is deterministic from the seed (SplitMix64, no System.Random). Split: a word belongs to the
/// held-out set iff a hash of the word (independent of the seed) is 0 mod 10, so no held-out word ever appears
/// in training, for any seed or count; words are unique within each split.
/// Metric: <see cref="ExactMatch(string, string)"/> — the generated text up to eos equals the answer exactly.
/// A base model never trained on reversing cannot do it (it has no way to know the output is the reversed word):
/// <see cref="PretrainCorpus"/> gives the built-in model a corpus of words and <c>copy: w\nw</c> lines — the
/// format and copying, but never reversal.
/// </summary>
public sealed class BuiltinTask
{
    public const string DataName = "builtin";

    public BuiltinTaskOptions Options { get; }
    public IReadOnlyList<BuiltinProblem> Train { get; }
    public IReadOnlyList<BuiltinProblem> Eval { get; }

    private BuiltinTask(BuiltinTaskOptions options, List<BuiltinProblem> train, List<BuiltinProblem> eval)
    {
        Options = options; Train = train; Eval = eval;
    }

    public static BuiltinTask Generate(BuiltinTaskOptions? options = null)
    {
        options ??= new BuiltinTaskOptions();
        ArgumentOutOfRangeException.ThrowIfLessThan(options.MinLength, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.MaxLength, options.MinLength);
        ArgumentOutOfRangeException.ThrowIfNegative(options.TrainCount);
        ArgumentOutOfRangeException.ThrowIfNegative(options.EvalCount);
        double space = 0;
        for (int l = options.MinLength; l <= options.MaxLength; l++) space += Math.Pow(26, l);
        if (options.TrainCount + options.EvalCount * 10.0 > space * 0.5)
            throw new ArgumentException($"{options.TrainCount} train + {options.EvalCount} held-out words do not fit in {space} words of {options.MinLength}..{options.MaxLength} letters");

        var rng = new SplitMix(options.Seed);
        var train = new List<BuiltinProblem>(options.TrainCount);
        var eval = new List<BuiltinProblem>(options.EvalCount);
        var seenTrain = new HashSet<string>(StringComparer.Ordinal);
        var seenEval = new HashSet<string>(StringComparer.Ordinal);
        while (train.Count < options.TrainCount || eval.Count < options.EvalCount)
        {
            string w = RandomWord(ref rng, options.MinLength, options.MaxLength);
            if (IsHeldOut(w))
            {
                if (eval.Count < options.EvalCount && seenEval.Add(w)) eval.Add(Problem(options.Kind, w));
            }
            else if (train.Count < options.TrainCount && seenTrain.Add(w)) train.Add(Problem(options.Kind, w));
        }
        return new BuiltinTask(options, train, eval);
    }

    /// <summary>The problem for a word.</summary>
    public static BuiltinProblem Problem(BuiltinTaskKind kind, string word) => kind switch
    {
        BuiltinTaskKind.Reverse => new BuiltinProblem(word, $"reverse: {word}\n", new string(word.Reverse().ToArray())),
        BuiltinTaskKind.Uppercase => new BuiltinProblem(word, $"upper: {word}\n", word.ToUpperInvariant()),
        _ => throw new ArgumentOutOfRangeException(nameof(kind)),
    };

    /// <summary>Whether a word belongs to the held-out split (FNV-1a of its letters, 0 mod 10).</summary>
    public static bool IsHeldOut(string word)
    {
        uint h = 2166136261;
        foreach (char c in word) { h ^= c; h *= 16777619; }
        return h % 10 == 0;
    }

    public Dataset TrainDataset(ITokenizer tokenizer) => ToDataset("builtin/train", Train, tokenizer);
    public Dataset EvalDataset(ITokenizer tokenizer) => ToDataset("builtin/eval", Eval, tokenizer);

    private static Dataset ToDataset(string name, IReadOnlyList<BuiltinProblem> problems, ITokenizer tokenizer) =>
        new(name, problems.Select(p => PromptCompletion.Build(tokenizer, p.Prompt, p.Answer)).ToList());

    /// <summary>Exact match: <paramref name="predicted"/> (the generated text, up to eos) equals <paramref name="expected"/>
    /// after trailing whitespace is removed from the prediction; nothing else is forgiven.</summary>
    public static bool ExactMatch(string predicted, string expected)
    {
        ArgumentNullException.ThrowIfNull(predicted);
        ArgumentNullException.ThrowIfNull(expected);
        return string.Equals(predicted.TrimEnd(), expected, StringComparison.Ordinal);
    }

    /// <summary>Exact match of generated ids: cut at the first eos (if any), decode, compare.</summary>
    public static bool ExactMatch(ReadOnlySpan<int> generated, string expected, ITokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (tokenizer.EosId is int eos)
        {
            int cut = generated.IndexOf(eos);
            if (cut >= 0) generated = generated[..cut];
        }
        return ExactMatch(tokenizer.Decode(generated), expected);
    }

    /// <summary>Fraction of (predicted, expected) pairs that match exactly (0 for none).</summary>
    public static double ExactMatchRate(IEnumerable<(string Predicted, string Expected)> pairs)
    {
        int n = 0, hits = 0;
        foreach (var (p, e) in pairs) { n++; if (ExactMatch(p, e)) hits++; }
        return n == 0 ? 0 : (double)hits / n;
    }

    /// <summary>
    /// A pretraining corpus for the built-in model, deterministic from the seed: <paramref name="lines"/> lines, each
    /// either a run of 3..8 random words or a <c>"copy: w\nw"</c> pair (w of 3..5 letters). It teaches the
    /// <c>op: word\n</c> format and copying; it never contains "reverse:" or "upper:", so the base model cannot do
    /// the built-in task before fine-tuning.
    /// </summary>
    public static List<string> PretrainCorpus(ulong seed, int lines)
    {
        var rng = new SplitMix(seed ^ 0x5EED_C0DE_0000_0001UL);
        var docs = new List<string>(lines);
        for (int i = 0; i < lines; i++)
        {
            if (rng.Next(2) == 0)
            {
                string w = RandomWord(ref rng, 3, 5);
                docs.Add($"copy: {w}\n{w}");
            }
            else
            {
                int n = 3 + rng.Next(6);
                docs.Add(string.Join(' ', Enumerable.Range(0, n).Select(_ => RandomWord(ref rng, 1, 7))));
            }
        }
        return docs;
    }

    private static string RandomWord(ref SplitMix rng, int min, int max)
    {
        int len = min + rng.Next(max - min + 1);
        var c = new char[len];
        for (int i = 0; i < len; i++) c[i] = (char)('a' + rng.Next(26));
        return new string(c);
    }
}

/// <summary>SplitMix64: a small deterministic generator whose sequence depends only on the seed.</summary>
internal struct SplitMix(ulong seed)
{
    private ulong _state = seed;

    public ulong NextU64()
    {
        ulong z = _state += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>Uniform in [0, n) (Lemire's multiply-shift; the tiny bias for n ≪ 2^32 does not matter here).</summary>
    public int Next(int n) => (int)(((NextU64() >> 32) * (ulong)n) >> 32);
}
