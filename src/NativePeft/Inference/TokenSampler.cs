using NativePeft.Data;

namespace NativePeft.Inference;

/// <summary>
/// Picks the next token from a row of logits as Hugging Face's generate() does with do_sample: temperature, then
/// top-k, then top-p (nucleus), then one draw. All arithmetic is in double on the CPU, so for the same logits and
/// the same uniform draws every machine picks the same token.
/// <list type="bullet">
/// <item>temperature 0: greedy, argmax (the first maximum on ties; no draw is used).</item>
/// <item>temperature t &gt; 0: p = softmax(logits / t).</item>
/// <item>top-k k &gt; 0: keep the tokens whose logit is at least the k-th largest (ties at the k-th value are kept, as in
/// HF's TopKLogitsWarper).</item>
/// <item>top-p q &lt; 1: order the kept tokens by probability (descending, lower id first on ties) and keep the shortest
/// prefix whose cumulative probability reaches q (at least one token).</item>
/// <item>the kept probabilities are renormalized and token i is drawn for a uniform u in [0, 1) as the first id (in id
/// order) whose cumulative probability exceeds u.</item>
/// </list>
/// </summary>
public static class TokenSampler
{
    /// <summary>The first index of the largest logit (NaN logits are never chosen; all NaN is an error).</summary>
    public static int Argmax(ReadOnlySpan<double> logits)
    {
        if (logits.IsEmpty) throw new ArgumentException("no logits", nameof(logits));
        int best = -1;
        for (int i = 0; i < logits.Length; i++)
            if (!double.IsNaN(logits[i]) && (best < 0 || logits[i] > logits[best])) best = i;
        return best >= 0 ? best : throw new ArgumentException("every logit is NaN (has the model diverged?)", nameof(logits));
    }

    /// <summary>
    /// The distribution a token is drawn from: softmax(logits / temperature) restricted by top-k and top-p and
    /// renormalized (removed tokens get 0). temperature must be &gt; 0.
    /// </summary>
    public static double[] Distribution(ReadOnlySpan<double> logits, double temperature, int topK = 0, double topP = 1.0)
    {
        if (logits.IsEmpty) throw new ArgumentException("no logits", nameof(logits));
        if (!(temperature > 0) || !double.IsFinite(temperature))
            throw new ArgumentOutOfRangeException(nameof(temperature), temperature, "the sampling temperature must be > 0");
        if (topK < 0) throw new ArgumentOutOfRangeException(nameof(topK), topK, "top_k must be >= 0");
        if (!(topP > 0 && topP <= 1)) throw new ArgumentOutOfRangeException(nameof(topP), topP, "top_p must be in (0, 1]");
        int V = logits.Length;
        var keep = new bool[V];
        Array.Fill(keep, true);
        if (topK > 0 && topK < V)
        {
            var sorted = logits.ToArray();
            Array.Sort(sorted);
            double kth = sorted[V - topK];
            for (int i = 0; i < V; i++) keep[i] = logits[i] >= kth;
        }
        var p = Softmax(logits, temperature, keep);
        if (topP < 1)
        {
            var order = Enumerable.Range(0, V).Where(i => keep[i]).ToArray();
            Array.Sort(order, (a, b) => p[a] != p[b] ? p[b].CompareTo(p[a]) : a.CompareTo(b));
            double cumulative = 0;
            int kept = 0;
            foreach (int i in order)
            {
                if (kept > 0 && cumulative >= topP) keep[i] = false;
                else
                {
                    cumulative += p[i];
                    kept++;
                }
            }
            double sum = 0;
            for (int i = 0; i < V; i++) { if (!keep[i]) p[i] = 0; sum += p[i]; }
            for (int i = 0; i < V; i++) p[i] /= sum;
        }
        return p;
    }

    /// <summary>The next token: greedy when <see cref="GenerationOptions.IsGreedy"/>, else a draw with uniform <paramref name="u"/> in [0, 1).</summary>
    public static int Sample(ReadOnlySpan<double> logits, GenerationOptions options, double u)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.IsGreedy) return Argmax(logits);
        return Draw(Distribution(logits, options.Temperature, options.TopK, options.TopP), u);
    }

    /// <summary>The first id whose cumulative probability exceeds u (the last id with nonzero probability if rounding leaves none).</summary>
    public static int Draw(ReadOnlySpan<double> probabilities, double u)
    {
        if (!(u >= 0 && u < 1)) throw new ArgumentOutOfRangeException(nameof(u), u, "u must be in [0, 1)");
        double cumulative = 0;
        int last = -1;
        for (int i = 0; i < probabilities.Length; i++)
        {
            if (probabilities[i] <= 0) continue;
            last = i;
            cumulative += probabilities[i];
            if (u < cumulative) return i;
        }
        return last >= 0 ? last : throw new ArgumentException("no token has a positive probability", nameof(probabilities));
    }

    /// <summary>
    /// softmax(logits / temperature) over the kept ids, as exp((l − max) / temperature): the exponent is ≤ 0 for every
    /// temperature, so a tiny temperature cannot overflow to ∞ − ∞. When no kept logit is finite and above −∞ (all −∞
    /// or NaN) the distribution is the argmax's one-hot.
    /// </summary>
    private static double[] Softmax(ReadOnlySpan<double> logits, double temperature, bool[] keep)
    {
        int V = logits.Length;
        double max = double.NegativeInfinity;
        for (int i = 0; i < V; i++) if (keep[i] && logits[i] > max) max = logits[i];
        var p = new double[V];
        double sum = 0;
        if (double.IsFinite(max))
        {
            for (int i = 0; i < V; i++)
            {
                if (!keep[i] || double.IsNaN(logits[i])) continue;
                p[i] = Math.Exp((logits[i] - max) / temperature);
                sum += p[i];
            }
        }
        if (!(sum > 0) || !double.IsFinite(sum))
        {
            Array.Clear(p);
            p[Argmax(logits)] = 1;
            return p;
        }
        for (int i = 0; i < V; i++) p[i] /= sum;
        return p;
    }
}

/// <summary>
/// The sampler's uniform draws: SplitMix64 (a fixed, specified algorithm, unlike System.Random's), u = top 53 bits · 2⁻⁵³
/// in [0, 1). The same seed gives the same sequence on every machine.
/// </summary>
public sealed class SamplingRandom(ulong seed)
{
    private SplitMix _state = new(seed);

    public double NextDouble() => (_state.NextU64() >> 11) * (1.0 / (1UL << 53));
}
