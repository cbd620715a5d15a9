using NativePeft.IO;
using NativePeft.Modules;

namespace NativePeft.Cli.Commands;

/// <summary>
/// --adapter DIR (a PEFT LoRA adapter folder) for the commands that run a model with one: reading it, and applying it
/// to the loaded base, with one clear error naming --adapter (and --model when the adapter does not fit the base).
/// </summary>
internal static class AdapterArgument
{
    /// <summary>The adapter in <paramref name="path"/> (null when none was given), or a CliException naming --adapter.</summary>
    public static PeftAdapter? Load(string? path)
    {
        if (path is null) return null;
        string full = Path.GetFullPath(path);
        try { return PeftAdapter.Load(full); }
        catch (PeftAdapterException e) when (e.Problems.Count > 1)
        {
            // The summary line and the first problems (the exception lists up to 40).
            throw new CliException($"--adapter {path}: {Strip(e.Message.Split('\n')[0], full)}{Problems(e)}", 1, e);
        }
        catch (Exception e) when (e is PeftAdapterException or SafetensorsException or IOException or UnauthorizedAccessException)
        {
            throw new CliException($"--adapter {path}: {Strip(e.Message, full)}", 1, e);
        }
    }

    /// <summary>
    /// Loads the adapter's A and B into <paramref name="model"/> (built with the adapter's LoRA settings); a shape or
    /// target mismatch is a CliException naming both options and the first problems.
    /// </summary>
    public static void Apply(PeftAdapter adapter, LlamaModel model, string adapterArg, string modelArg)
    {
        try { adapter.ApplyTo(model); }
        catch (PeftAdapterException e)
        {
            throw new CliException($"--adapter {adapterArg} does not fit --model {modelArg} (was it trained on another base model?): {Problems(e)}", 1, e);
        }
    }

    /// <summary>A rank the base cannot take (r larger than a layer) as the same one-line error.</summary>
    public static CliException RankDoesNotFit(ArgumentOutOfRangeException e, string adapterArg, string modelArg) =>
        new($"--adapter {adapterArg} does not fit --model {modelArg} (was it trained on another base model?): {e.Message.Split(" (Parameter")[0]}", 1, e);

    private static string Strip(string message, string path) =>
        message.StartsWith(path + ": ", StringComparison.Ordinal) ? message[(path.Length + 2)..] : message;

    /// <summary>The first problems of an adapter mismatch, one per line.</summary>
    private static string Problems(PeftAdapterException e)
    {
        const int Shown = 3;
        if (e.Problems.Count == 0) return e.Message;
        string text = string.Join("", e.Problems.Take(Shown).Select(p => "\n  - " + p));
        return e.Problems.Count > Shown ? text + $"\n  … and {e.Problems.Count - Shown} more" : text;
    }
}
