using System.Globalization;

namespace NativePeft.IO;

/// <summary>
/// The one table of bounds on counts and sizes that come from files and options: every reader and option check uses
/// it before anything is sized from a value, so a corrupt or hostile file fails with a message naming the field
/// instead of an allocation of gigabytes. Each bound is far above every published model (the largest published
/// value, in brackets, times about 8 or more) and far below where the arithmetic on it could overflow.
/// </summary>
public static class Limits
{
    /// <summary>num_hidden_layers [Llama-3.1-405B: 126].</summary>
    public const int MaxLayers = 1024;
    /// <summary>num_attention_heads and num_key_value_heads [Llama-3.1-405B: 128].</summary>
    public const int MaxHeads = 1024;
    /// <summary>head_dim [Gemma: 256; the kernels take ≤ 128].</summary>
    public const int MaxHeadDim = 2048;
    /// <summary>hidden_size [Llama-3.1-405B: 16384].</summary>
    public const int MaxHiddenSize = 131072;
    /// <summary>intermediate_size [Llama-3.1-405B: 53248].</summary>
    public const int MaxIntermediateSize = 524288;
    /// <summary>vocab_size [Gemma 3: 262144].</summary>
    public const int MaxVocabSize = 1 << 22;
    /// <summary>max_position_embeddings and rope_scaling's original_max_position_embeddings [Llama 4 Scout: 10M].</summary>
    public const int MaxPositions = 1 << 24;
    /// <summary>LoRA r, from adapter_config.json or an option [published adapters: ≤ 1024].</summary>
    public const int MaxLoraRank = 8192;
    /// <summary>
    /// Sequence length of a run (--seq, --max-length): at most the model's max_position_embeddings, and never more than
    /// this, so that batch × seq × vocab products stay far inside a long [1M-token contexts].
    /// </summary>
    public const int MaxSequenceLength = 1 << 22;
    /// <summary>Rows per (micro-)batch (--batch) [published fine-tunes: ≤ 512].</summary>
    public const int MaxBatchSize = 1 << 16;
    /// <summary>Tokens of one (micro-)batch, batch × seq [Llama 3's global pre-training batch: 16M tokens]; keeps the int arrays of a batch in range.</summary>
    public const int MaxTokensPerBatch = 1 << 24;
    /// <summary>A JSON metadata file read whole: config.json, tokenizer.json, tokenizer_config.json, adapter_config.json, the index [Gemma's tokenizer.json: 33 MB].</summary>
    public const long MaxJsonFileBytes = 1L << 30;
    /// <summary>A dataset file read whole (a .txt, a JSON array) or one JSONL line: a .NET string holds at most 2³⁰ characters.</summary>
    public const long MaxWholeDataBytes = 1L << 30;
    /// <summary>Dimensions of one tensor's shape in a safetensors header [checkpoints: ≤ 4; numpy allows 64].</summary>
    public const int MaxTensorDimensions = 64;
    /// <summary>Elements of one weight (vocab × hidden, intermediate × hidden, heads × head_dim × hidden) [Llama-3.1-405B's embedding: 2.1e9 ≈ 2³¹]; keeps per-tensor block counts (e.g. 8-bit optimizer blocks of 256) in an int.</summary>
    public const long MaxTensorElements = 1L << 36;
    /// <summary>Largest allowed count of parameters of a config (checked long arithmetic) [Llama-3.1-405B: 4.1e11].</summary>
    public const long MaxParameters = 1L << 42;

    /// <summary>"[min, max]": how every bound is written.</summary>
    public static string Range(long max, long min = 1) => string.Create(CultureInfo.InvariantCulture, $"[{min}, {max}]");

    /// <summary>
    /// The problem with a file's <paramref name="value"/> outside [<paramref name="min"/>, <paramref name="max"/>], or null:
    /// "N must be in [min, max]" (a field's wording, after "file: field: ").
    /// </summary>
    public static string? OutOfRange(long value, long max, long min = 1) =>
        value < min || value > max ? string.Create(CultureInfo.InvariantCulture, $"{value} must be in {Range(max, min)}") : null;

    /// <summary>
    /// The problem with an option's <paramref name="value"/> outside [<paramref name="min"/>, <paramref name="max"/>], or
    /// null: "N: must be in [min, max]" (an option's wording, after "--option ").
    /// </summary>
    public static string? OptionOutOfRange(long value, long max, long min = 1) =>
        value < min || value > max ? string.Create(CultureInfo.InvariantCulture, $"{value}: must be in {Range(max, min)}") : null;

    /// <summary>
    /// The problem with a run's sequence length (an option) against the model's max_position_embeddings, or null: seq
    /// must be at most <paramref name="maxPositions"/> (positions beyond it have no trained RoPE meaning) and
    /// <see cref="MaxSequenceLength"/>.
    /// </summary>
    public static string? SequenceProblem(long seq, int maxPositions) =>
        seq > maxPositions && seq <= MaxSequenceLength
            ? string.Create(CultureInfo.InvariantCulture, $"{seq}: exceeds the model's max_position_embeddings {maxPositions}")
            : OptionOutOfRange(seq, MaxSequenceLength);
}
