namespace NativePeft.Inference;

/// <summary>
/// How <see cref="TextGenerator"/> picks each new token (Hugging Face generate()'s names): greedy when
/// <see cref="Temperature"/> is 0, otherwise sampled from softmax(logits / temperature) restricted to the
/// <see cref="TopK"/> most likely tokens (0 = all) and then to the nucleus of probability <see cref="TopP"/>.
/// </summary>
public sealed record GenerationOptions
{
    /// <summary>New tokens at most (eos, when it stops the generation, is not counted nor returned).</summary>
    public int MaxNewTokens { get; init; } = 64;
    /// <summary>0 = greedy (argmax, the first maximum on ties); &gt; 0 divides the logits before the softmax.</summary>
    public double Temperature { get; init; }
    /// <summary>Nucleus sampling: keep the most likely tokens whose cumulative probability first reaches top_p; (0, 1], 1 = off.</summary>
    public double TopP { get; init; } = 1.0;
    /// <summary>Keep only the k most likely tokens; 0 = off.</summary>
    public int TopK { get; init; }
    /// <summary>Seed of the sampler's generator (SplitMix64: the same tokens on every machine for the same logits).</summary>
    public ulong Seed { get; init; }
    /// <summary>Stop when the model produces the tokenizer's eos.</summary>
    public bool StopAtEos { get; init; } = true;

    /// <summary>Greedy decoding.</summary>
    public bool IsGreedy => Temperature == 0;

    /// <summary>Throws an <see cref="OptionException"/> naming the first invalid setting (its property) and its value.</summary>
    public void Validate()
    {
        var inv = System.Globalization.CultureInfo.InvariantCulture;
        if (MaxNewTokens < 0) throw new OptionException(nameof(MaxNewTokens), $"{MaxNewTokens}: must be >= 0");
        if (!(Temperature >= 0) || !double.IsFinite(Temperature))
            throw new OptionException(nameof(Temperature), $"{Temperature.ToString("R", inv)}: must be a finite number >= 0 (0 = greedy)");
        if (!(TopP > 0 && TopP <= 1)) throw new OptionException(nameof(TopP), $"{TopP.ToString("R", inv)}: must be in (0, 1] (1 = off)");
        if (TopK < 0) throw new OptionException(nameof(TopK), $"{TopK}: must be >= 0 (0 = off)");
    }
}

/// <summary>The outcome of one generation.</summary>
public sealed record GenerationResult
{
    /// <summary>The text of the new tokens (special tokens left out).</summary>
    public required string Text { get; init; }
    /// <summary>The new tokens, eos excluded.</summary>
    public required int[] TokenIds { get; init; }
    /// <summary>The prompt's tokens as fed to the model (bos first when the tokenizer has one).</summary>
    public required int[] PromptTokenIds { get; init; }
    /// <summary>True when the generation ended at eos rather than at the token limit.</summary>
    public required bool StoppedAtEos { get; init; }
    /// <summary>Seconds of the prompt's forward (prefill).</summary>
    public required double PrefillSeconds { get; init; }
    /// <summary>Seconds of the one-token forwards and sampling after the prefill.</summary>
    public required double DecodeSeconds { get; init; }
    /// <summary>Bytes of the KV cache.</summary>
    public required long KvCacheBytes { get; init; }

    public int PromptTokens => PromptTokenIds.Length;
    /// <summary>Generated tokens per second over the whole generation (prefill included): tokens produced (eos counted) / time.</summary>
    public double TokensPerSecond
    {
        get
        {
            int produced = TokenIds.Length + (StoppedAtEos ? 1 : 0);
            double s = PrefillSeconds + DecodeSeconds;
            return s > 0 ? produced / s : 0;
        }
    }
}
