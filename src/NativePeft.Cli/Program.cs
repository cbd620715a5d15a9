using System.CommandLine;
using NativePeft.Cli.Commands;
using NativePeft.Runtime;

namespace NativePeft.Cli;

public static class Program
{
    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    /// <summary>Runs the CLI with the given writers (the end-to-end tests call this in-process).</summary>
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var root = new RootCommand("nativepeft: LoRA and QLoRA fine-tuning with native CUDA kernels, measured.")
        {
            InfoCommand.Create(stdout),
            QuantizeCommand.Create(stdout),
            DequantizeCommand.Create(stdout),
            DemoCheckpointCommand.Create(stdout),
            BenchCommand.Create(stdout),
            EvalCommand.Create(stdout),
            EstimateCommand.Create(stdout),
            TrainCommand.Create(stdout),
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
                foreach (var error in parsed.Errors) stderr.WriteLine("error: " + error.Message);
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
