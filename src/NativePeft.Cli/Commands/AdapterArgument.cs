using NativePeft.IO;
using NativePeft.Modules;

namespace NativePeft.Cli.Commands;

/// <summary>
/// --adapter DIR (a PEFT LoRA adapter folder) for the commands that run a model with one: reading it, and applying it
/// to the loaded base (<see cref="Training.ModelSession"/>), with one clear error naming --adapter (and --model when the
/// adapter does not fit the base).
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
    /// An adapter that does not fit the base (<see cref="Training.ModelSession"/>'s refusal of its rank, or the
    /// <paramref name="detail"/> of a shape or target mismatch) as one error naming both options.
    /// </summary>
    public static CliException DoesNotFit(string detail, string adapterArg, string modelArg, Exception inner) =>
        new($"--adapter {adapterArg} does not fit --model {modelArg} (was it trained on another base model?): {detail}", 1, inner);

    /// <summary>A shape or target mismatch of <see cref="PeftAdapter.ApplyTo"/>, with the first problems.</summary>
    public static CliException DoesNotFit(PeftAdapterException e, string adapterArg, string modelArg) => DoesNotFit(Problems(e), adapterArg, modelArg, e);

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
