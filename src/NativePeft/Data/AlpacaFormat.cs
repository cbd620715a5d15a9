namespace NativePeft.Data;

/// <summary>
/// Stanford Alpaca's prompt template (tatsu-lab/stanford_alpaca train.py, PROMPT_DICT) and its label masking:
/// the example is tokenize(prompt + output) with bos, then eos; labels are -100 on the first
/// len(tokenize(prompt)) positions (bos included) and equal the ids after, eos included — loss on the response only.
/// </summary>
public static class AlpacaFormat
{
    public const string PromptInput =
        "Below is an instruction that describes a task, paired with an input that provides further context. " +
        "Write a response that appropriately completes the request.\n\n" +
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";

    public const string PromptNoInput =
        "Below is an instruction that describes a task. " +
        "Write a response that appropriately completes the request.\n\n" +
        "### Instruction:\n{instruction}\n\n### Response:";

    /// <summary>The prompt: <see cref="PromptInput"/> when input is non-empty, else <see cref="PromptNoInput"/>.</summary>
    public static string Prompt(string instruction, string? input) =>
        string.IsNullOrEmpty(input)
            ? "Below is an instruction that describes a task. " +
              "Write a response that appropriately completes the request.\n\n" +
              $"### Instruction:\n{instruction}\n\n### Response:"
            : "Below is an instruction that describes a task, paired with an input that provides further context. " +
              "Write a response that appropriately completes the request.\n\n" +
              $"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";

    /// <summary>
    /// ids = tokenize(prompt + output, bos) + [eos]; labels = -100 on the first len(tokenize(prompt, bos)) positions.
    /// When the tokenizer merges across the prompt/response boundary the masked count is still the prompt's own
    /// token count, as in Stanford Alpaca.
    /// </summary>
    public static TrainingExample Build(ITokenizer tokenizer, string instruction, string? input, string output) =>
        PromptCompletion.Build(tokenizer, Prompt(instruction, input), output);
}

/// <summary>A prompt and its completion as one example with the loss on the completion only.</summary>
public static class PromptCompletion
{
    /// <summary>
    /// ids = tokenize(prompt + completion, bos) + [eos]; labels = -100 on the first len(tokenize(prompt, bos))
    /// positions, the ids after (eos included). When the tokenizer merges across the prompt/completion boundary the
    /// masked count is still the prompt's own token count, as in Stanford Alpaca.
    /// </summary>
    public static TrainingExample Build(ITokenizer tokenizer, string prompt, string completion)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        int eos = tokenizer.EosId ?? throw new InvalidOperationException("a prompt/completion example needs a tokenizer with an eos token");
        bool bos = tokenizer.BosId is not null;
        int promptLen = tokenizer.Encode(prompt, bos).Length;
        int[] full = tokenizer.Encode(prompt + completion, bos);
        var ids = new int[full.Length + 1];
        full.CopyTo(ids, 0);
        ids[^1] = eos;
        var labels = (int[])ids.Clone();
        Array.Fill(labels, TrainingExample.IgnoreIndex, 0, Math.Min(promptLen, labels.Length));
        return new TrainingExample(ids, labels);
    }
}
