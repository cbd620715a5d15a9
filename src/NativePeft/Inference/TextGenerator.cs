using System.Diagnostics;
using NativePeft.Data;
using NativePeft.Modules;
using NativePeft.Numerics;

namespace NativePeft.Inference;

/// <summary>
/// Text generation with a <see cref="LlamaModel"/> (LoRA applied unmerged, dropout off; any IOps, 4-bit or BF16-stored
/// base): the prompt goes through the model once (prefill) into a <see cref="LlamaKvCache"/> sized for prompt + max new
/// tokens, then each new token is one single-token forward. Tokens are picked by <see cref="TokenSampler"/>; the
/// generation stops at eos (when <see cref="GenerationOptions.StopAtEos"/>) or after
/// <see cref="GenerationOptions.MaxNewTokens"/>.
/// </summary>
public sealed class TextGenerator
{
    private readonly LlamaModel _model;
    private readonly ITokenizer? _tokenizer;

    /// <param name="tokenizer">Encodes text prompts and decodes the result; null for token-id-only use.</param>
    public TextGenerator(LlamaModel model, ITokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        if (tokenizer is not null && tokenizer.VocabSize > model.Config.VocabSize)
            throw new ArgumentException($"the tokenizer has {tokenizer.VocabSize} ids, the model's vocab_size is {model.Config.VocabSize}", nameof(tokenizer));
        _model = model;
        _tokenizer = tokenizer;
    }

    public LlamaModel Model => _model;

    /// <summary>The prompt's ids as <see cref="Generate(string, GenerationOptions?, Action{int, string}?)"/> feeds them (bos first when the tokenizer has one).</summary>
    public int[] EncodePrompt(string prompt)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var tok = _tokenizer ?? throw new InvalidOperationException("a text prompt needs a tokenizer");
        return tok.Encode(prompt, tok.BosId is not null);
    }

    /// <summary>
    /// Generates from a text prompt. <paramref name="onToken"/> gets each new token and that token's own text as it is
    /// produced (a character split over several byte tokens decodes whole only in <see cref="GenerationResult.Text"/>;
    /// a streaming caller can decode the ids so far instead, as `nativepeft generate` does).
    /// </summary>
    public GenerationResult Generate(string prompt, GenerationOptions? options = null, Action<int, string>? onToken = null) =>
        Generate(EncodePrompt(prompt), options, onToken);

    /// <summary>
    /// Generates from prompt ids. Throws an <see cref="ArgumentOutOfRangeException"/> when the prompt plus
    /// <see cref="GenerationOptions.MaxNewTokens"/> exceed the model's context (max_position_embeddings).
    /// </summary>
    public GenerationResult Generate(IReadOnlyList<int> promptIds, GenerationOptions? options = null, Action<int, string>? onToken = null)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        options ??= new GenerationOptions();
        options.Validate();
        if (promptIds.Count == 0) throw new ArgumentException("an empty prompt", nameof(promptIds));
        int context = _model.Config.MaxPositionEmbeddings;
        if ((long)promptIds.Count + options.MaxNewTokens > context)
            throw new ArgumentOutOfRangeException(nameof(options),
                $"the prompt ({promptIds.Count} tokens) plus {options.MaxNewTokens} new tokens exceed the model's context of {context} tokens (max_position_embeddings)");
        // eos: the tokenizer's, and every id config.json's eos_token_id lists (Llama 3 chat models have several).
        var eos = new HashSet<int>();
        if (options.StopAtEos)
        {
            if (_tokenizer?.EosId is int e) eos.Add(e);
            foreach (int id in _model.Config.EosTokenIds ?? []) eos.Add(id);
        }
        var prompt = promptIds.ToArray();
        int V = _model.Config.VocabSize;
        var logits = new double[(long)V];
        var generated = new List<int>();
        bool stoppedAtEos = false;
        var rng = new SamplingRandom(options.Seed);
        // The last new token is never fed back, so the cache needs prompt + max − 1 positions (at least the prompt).
        using var cache = _model.CreateKvCache(Math.Max(prompt.Length, prompt.Length + options.MaxNewTokens - 1));
        var clock = Stopwatch.StartNew();
        double prefill = 0;
        if (options.MaxNewTokens > 0)
        {
            cache.Forward(prompt, logits);
            CheckLogits(logits, prompt.Length - 1, 0);
            prefill = clock.Elapsed.TotalSeconds;
            var one = new int[1];
            while (true)
            {
                int next = TokenSampler.Sample(logits, options, options.IsGreedy ? 0 : rng.NextDouble());
                if (eos.Contains(next)) { stoppedAtEos = true; break; }
                generated.Add(next);
                onToken?.Invoke(next, _tokenizer?.Decode([next]) ?? "");
                if (generated.Count >= options.MaxNewTokens) break;
                one[0] = next;
                cache.Forward(one, logits);
                CheckLogits(logits, prompt.Length + generated.Count - 1, generated.Count);
            }
        }
        double total = clock.Elapsed.TotalSeconds;
        var ids = generated.ToArray();
        return new GenerationResult
        {
            Text = _tokenizer?.Decode(ids) ?? "",
            TokenIds = ids,
            PromptTokenIds = prompt,
            StoppedAtEos = stoppedAtEos,
            PrefillSeconds = prefill,
            DecodeSeconds = total - prefill,
            KvCacheBytes = cache.CacheBytes,
        };
    }

    /// <summary>
    /// Greedy decoding of <paramref name="prompt"/> up to <paramref name="maxNewTokens"/> tokens, stopping before
    /// <paramref name="eosId"/> (not included): the KV-cache path of the trainer's exact-match evaluation.
    /// </summary>
    public static int[] Greedy(LlamaModel model, IReadOnlyList<int> prompt, int maxNewTokens, int? eosId)
    {
        ArgumentNullException.ThrowIfNull(model);
        var result = new TextGenerator(model).GenerateIds(prompt, maxNewTokens, eosId);
        return result;
    }

    private int[] GenerateIds(IReadOnlyList<int> prompt, int maxNewTokens, int? eosId)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        if (prompt.Count == 0) throw new ArgumentException("an empty prompt", nameof(prompt));
        ArgumentOutOfRangeException.ThrowIfNegative(maxNewTokens);
        var generated = new List<int>();
        if (maxNewTokens == 0) return [];
        var logits = new double[_model.Config.VocabSize];
        using var cache = _model.CreateKvCache(Math.Min(_model.Config.MaxPositionEmbeddings, prompt.Count + maxNewTokens - 1));
        cache.Forward(prompt.ToArray(), logits);
        CheckLogits(logits, prompt.Count - 1, 0);
        var one = new int[1];
        while (true)
        {
            int next = TokenSampler.Argmax(logits);
            if (next == eosId) break;
            generated.Add(next);
            if (generated.Count >= maxNewTokens || cache.Length >= cache.MaxLength) break;
            one[0] = next;
            cache.Forward(one, logits);
            CheckLogits(logits, prompt.Count + generated.Count - 1, generated.Count);
        }
        return generated.ToArray();
    }

    /// <summary>
    /// Logits with a NaN, ±inf or |x| &gt; 1e30 (<see cref="Finite"/>) stop the generation with a
    /// <see cref="NonFiniteValuesException"/> naming the new token's index (0-based) and the sequence position whose
    /// logits they are, instead of sampling from garbage.
    /// </summary>
    private static void CheckLogits(double[] logits, int position, int newToken)
    {
        if (Finite.FirstBad(logits) is long bad and >= 0)
            throw new NonFiniteValuesException($"the logits of new token {newToken} (position {position})",
                $"{Finite.Describe(bad, logits[bad])} (token id {bad}): the model's or the adapter's weights give non-finite values");
    }
}
