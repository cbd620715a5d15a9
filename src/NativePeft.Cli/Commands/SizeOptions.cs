using NativePeft.IO;

namespace NativePeft.Cli.Commands;

/// <summary>
/// The bounds of the size options the commands share (--seq, --batch, --rank, --max-tokens, …) and of --data files,
/// from the one table <see cref="Limits"/>: each refusal is one line naming the option and the value.
/// </summary>
internal static class SizeOptions
{
    /// <summary><paramref name="value"/> of <paramref name="option"/> must be in [<paramref name="min"/>, <paramref name="max"/>].</summary>
    public static void InRange(string option, long value, long max, long min = 1, int exitCode = 2)
    {
        if (Limits.OptionOutOfRange(value, max, min) is { } problem) throw new CliException($"{option} {problem}", exitCode);
    }

    /// <summary>A sequence length option against the model's max_position_embeddings (<see cref="Limits.SequenceProblem"/>).</summary>
    public static void Sequence(string option, long seq, LlamaConfig config, int exitCode = 2)
    {
        if (Limits.SequenceProblem(seq, config.MaxPositionEmbeddings) is { } problem) throw new CliException($"{option} {problem}", exitCode);
    }

    /// <summary>batch × seq tokens of one batch, at most <see cref="Limits.MaxTokensPerBatch"/>.</summary>
    public static void Tokens(long batch, long seq, int exitCode = 2)
    {
        if (batch * seq > Limits.MaxTokensPerBatch)
            throw new CliException($"--batch {batch}: × --seq {seq} = {batch * seq} tokens per batch, more than {Limits.MaxTokensPerBatch}", exitCode);
    }

    /// <summary>A data file option must name a regular file (not a device, FIFO or folder): <see cref="TextInput.FileProblem"/>.</summary>
    public static void DataFile(string option, string path)
    {
        if (TextInput.FileProblem(path, long.MaxValue) is { } problem) throw new CliException($"{option} {path}: {problem}");
    }
}
