using System.CommandLine;
using System.CommandLine.Help;
using System.Text.RegularExpressions;
using NativePeft.Cli.Commands;
using NativePeft.Numerics;
using NativePeft.Runtime;

namespace NativePeft.Cli;

public static class Program
{
    /// <summary>The command's name in --help and messages: the installed tool's command (ToolCommandName), whatever the assembly is called.</summary>
    public const string Name = "nativepeft";

    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    /// <summary>Runs the CLI with the given writers (the end-to-end tests call this in-process).</summary>
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var root = new Command(Name, "nativepeft: LoRA and QLoRA fine-tuning with native CUDA kernels, measured.")
        {
            // what RootCommand adds; a RootCommand would name itself after the entry assembly (NativePeft.Cli) in --help
            new HelpOption(),
            new VersionOption(),
            InfoCommand.Create(stdout),
            QuantizeCommand.Create(stdout),
            DequantizeCommand.Create(stdout),
            DemoCheckpointCommand.Create(stdout),
            BenchCommand.Create(stdout),
            EvalCommand.Create(stdout),
            EstimateCommand.Create(stdout),
            TrainCommand.Create(stdout, stderr),
            CompareCommand.Create(stdout),
            MergeCommand.Create(stdout),
            PretrainCommand.Create(stdout),
            GenerateCommand.Create(stdout),
        };
        var config = new InvocationConfiguration { Output = stdout, Error = stderr, EnableDefaultExceptionHandler = false };
        try
        {
            args = ConfigFile.Expand(root, args); // --config FILE: the file's options before the command line's
            var parsed = root.Parse(args);
            if (parsed.Errors.Count > 0)
            {
                // One line per problem, naming the option, and a pointer to --help; no full help dump.
                foreach (var error in parsed.Errors) stderr.WriteLine("error: " + ParseErrors.Friendly(error.Message, parsed.CommandResult.Command));
                stderr.WriteLine("(run with --help for the options)");
                return 2;
            }
            return parsed.Invoke(config);
        }
        catch (CliException e)
        {
            stderr.WriteLine("error: " + e.Message);
            return e.ExitCode;
        }
        catch (NativePeft.IO.OutputFolderException e)
        {
            // An output folder in use by another run, not writable, or a write that failed mid-run (the message names the
            // path and the free space there).
            stderr.WriteLine("error: " + e.Message);
            return 1;
        }
        catch (NonFiniteValuesException e)
        {
            // Non-finite logits or merged weights anywhere a command did not name its option (e.g. train's exact-match
            // generation): the message names the tensor or token position.
            stderr.WriteLine("error: " + e.Message);
            return 1;
        }
        catch (NativePeft.Distributed.CommunicatorException e)
        {
            // A data-parallel job that another rank ended (its failure, abort, death) or a rendezvous that timed out:
            // the message names the rank and the collective; the launcher reports which rank failed first.
            stderr.WriteLine("error: " + e.Message);
            return 1;
        }
        catch (Exception e) when (e is CudaException or CublasException or EmulatorException or OutOfMemoryException)
        {
            // A device failure mid-run (out of memory after the plan check, a failing cuBLAS call, a kernel fault):
            // one line for the user, not a stack trace.
            // (The memory pool's own message already says which arena and plan; the hint is for the driver's.)
            stderr.WriteLine("error: " + e.Message + ((e is OutOfMemoryException && !e.Message.StartsWith("memory pool:", StringComparison.Ordinal))
                || (e is CudaException c && c.Result == CuResult.OutOfMemory)
                ? " (try --recompute, a smaller --batch or --seq, or --method qlora; `nativepeft estimate` shows the plan)"
                : ""));
            return 1;
        }
    }
}

/// <summary>A user-facing error: printed as "error: message" with a non-zero exit code, no stack trace.</summary>
public sealed class CliException(string message, int exitCode = 1, Exception? inner = null) : Exception(message, inner)
{
    public int ExitCode { get; } = exitCode;
}

/// <summary>The parser's messages in the user's terms: value types by name, and the nearest command or option for a typo.</summary>
internal static partial class ParseErrors
{
    [GeneratedRegex(@"^Cannot parse argument '(?<value>.*)' for option '(?<option>[^']*)' as expected type '(?<type>[^']*)'\.?$")]
    private static partial Regex CannotParse();

    [GeneratedRegex(@"^Unrecognized command or argument '(?<token>.*)'\.?$")]
    private static partial Regex Unrecognized();

    public static string Friendly(string message, Command command)
    {
        var m = CannotParse().Match(message);
        if (m.Success)
            return $"{m.Groups["option"].Value}: '{m.Groups["value"].Value}' is not {Expected(m.Groups["type"].Value)}";
        m = Unrecognized().Match(message);
        if (m.Success)
        {
            string token = m.Groups["token"].Value;
            var names = command.Subcommands.Select(c => c.Name)
                .Concat(command.Options.SelectMany(o => o.Aliases.Prepend(o.Name)))
                .Where(n => !n.StartsWith("-", StringComparison.Ordinal) || token.StartsWith("-", StringComparison.Ordinal));
            string? best = names.Select(n => (Name: n, Distance: Distance(token, n)))
                .Where(x => x.Distance <= Math.Max(2, x.Name.Length / 3))
                .OrderBy(x => x.Distance).Select(x => x.Name).FirstOrDefault();
            string what = token.StartsWith("-", StringComparison.Ordinal) ? "option" : "command or argument";
            return $"unrecognized {what} '{token}'" + (best is null ? "" : $" (did you mean '{best}'?)");
        }
        return message;
    }

    private static string Expected(string type)
    {
        if (type.Contains("Int32", StringComparison.Ordinal) || type.Contains("Int64", StringComparison.Ordinal)) return "an integer";
        if (type.Contains("Double", StringComparison.Ordinal) || type.Contains("Single", StringComparison.Ordinal)) return "a number";
        if (type.Contains("Boolean", StringComparison.Ordinal)) return "true or false";
        int dot = type.LastIndexOf('.');
        return "a " + (dot >= 0 ? type[(dot + 1)..] : type).TrimEnd(']');
    }

    /// <summary>Levenshtein distance (insert, delete, substitute).</summary>
    internal static int Distance(string a, string b)
    {
        var row = new int[b.Length + 1];
        for (int j = 0; j <= b.Length; j++) row[j] = j;
        for (int i = 1; i <= a.Length; i++)
        {
            int diag = row[0];
            row[0] = i;
            for (int j = 1; j <= b.Length; j++)
            {
                int up = row[j];
                row[j] = Math.Min(Math.Min(row[j] + 1, row[j - 1] + 1), diag + (a[i - 1] == b[j - 1] ? 0 : 1));
                diag = up;
            }
        }
        return row[b.Length];
    }
}
