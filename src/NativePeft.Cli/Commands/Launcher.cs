using System.CommandLine;
using System.CommandLine.Parsing;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Reflection;
using System.Runtime.InteropServices;
using NativePeft.Distributed;
using NativePeft.Runtime;

namespace NativePeft.Cli.Commands;

/// <summary>
/// <c>nativepeft train --nproc N</c>: starts N worker processes on this node — this same CLI with the same arguments
/// less --nproc, and the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
/// MASTER_ADDR=127.0.0.1, MASTER_PORT = a free port) — and supervises them (docs/distributed.md):
/// rank 0's output passes through; the other ranks' stderr lines are prefixed "[rank R] " and their stdout is kept only
/// to be shown if they fail. When a worker exits non-zero the others are stopped (SIGTERM, then killed after
/// <see cref="StopGrace"/>), "rank R exited with code C" is printed with its last lines, and the launcher exits
/// non-zero. Ctrl-C (SIGINT) is forwarded to every worker, which finishes its step, saves and exits 130.
/// </summary>
internal static class Launcher
{
    /// <summary>The most workers one launcher starts: one node's GPUs; larger jobs are launched per node (torchrun, srun).</summary>
    public const int MaxProcesses = 64;
    /// <summary>How long stopped workers get between SIGTERM and SIGKILL.</summary>
    public static readonly TimeSpan StopGrace = TimeSpan.FromSeconds(5);

    /// <summary>Test-only: the worker of this rank fails with an error after its first optimizer step.</summary>
    public const string FaultExitRankVariable = "NATIVEPEFT_FAULT_EXIT_RANK";
    /// <summary>Test-only: a folder where each worker writes rank-R.pid (its process id) when it starts.</summary>
    public const string PidDirVariable = "NATIVEPEFT_WORKER_PID_DIR";
    /// <summary>Set by the launcher for its workers: its process id; a worker whose parent is no longer it exits.</summary>
    public const string LauncherPidVariable = "NATIVEPEFT_LAUNCHER_PID";

    /// <summary>After the first failure, how long other ranks' own failures are still recorded before the rest are stopped.</summary>
    private static readonly TimeSpan SettleTime = TimeSpan.FromSeconds(1);

    private const int TailLines = 8;
    private static readonly TimeSpan Poll = TimeSpan.FromMilliseconds(250);

    /// <summary>Checks --nproc N for --device: 1 ≤ N ≤ <see cref="MaxProcesses"/>, N ≤ the CUDA devices for cuda; exit 2 otherwise.
    /// Also refuses --nproc in a process that is already a worker of a job (torchrun, srun).</summary>
    public static void Check(int n, string device, IReadOnlyDictionary<string, string?> env)
    {
        if (n < 1) throw new CliException($"--nproc {n}: must be at least 1 (the number of worker processes on this node)", 2);
        if (n > MaxProcesses)
            throw new CliException($"--nproc {n}: at most {MaxProcesses} workers on one node; for several nodes start one worker per GPU with torchrun or srun (docs/distributed.md)", 2);
        foreach (string v in new[] { DistributedEnvironment.WorldSize, DistributedEnvironment.Rank })
            if (env.TryGetValue(v, out var value) && value is not null)
                throw new CliException($"--nproc {n}: this process is already a worker of a job ({v}={value} is set, by torchrun or another launcher); leave --nproc out, or unset {v}", 2);
        if (device is "cuda" or "auto" && CudaDevices.TryCount(out int count, out string reason) is var known)
        {
            if (device == "cuda" && !known) throw new CliException($"--nproc {n} --device cuda: cannot count the CUDA devices ({reason})", 2);
            if (known && n > count && (device == "cuda" || count > 0))
                throw new CliException($"--nproc {n} --device {device}: this machine has {count} CUDA device{(count == 1 ? "" : "s")} (one worker per device)", 2);
        }
    }

    /// <summary>The arguments the workers get: the parsed command line (with a --config file's options expanded) less --nproc.</summary>
    public static List<string> WorkerArguments(ParseResult parse, Option nproc)
    {
        var args = new List<string>();
        var tokens = parse.Tokens;
        for (int i = 0; i < tokens.Count; i++)
        {
            if (tokens[i].Type == TokenType.Option && (tokens[i].Value == nproc.Name || nproc.Aliases.Contains(tokens[i].Value)))
            {
                if (i + 1 < tokens.Count && tokens[i + 1].Type == TokenType.Argument) i++;
                continue;
            }
            args.Add(tokens[i].Value);
        }
        return args;
    }

    /// <summary>The program and leading arguments that start this CLI again: the apphost, or the dotnet host and the CLI's dll.</summary>
    internal static (string FileName, string[] Prefix) SelfCommand()
    {
        string cli = typeof(Program).Assembly.Location;
        string? process = Environment.ProcessPath;
        if (process is not null && Assembly.GetEntryAssembly() == typeof(Program).Assembly)
            return Path.GetFileNameWithoutExtension(process) == "dotnet" ? (process, [cli]) : (process, []);
        // embedded (the CLI run in-process by another program): the apphost next to the dll, else dotnet and the dll
        string apphost = Path.ChangeExtension(cli, OperatingSystem.IsWindows() ? ".exe" : null);
        return File.Exists(apphost) ? (apphost, []) : ("dotnet", [cli]);
    }

    /// <summary>A port free on 127.0.0.1 now (bound to port 0, then released).</summary>
    internal static int FreePort()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        try { return ((IPEndPoint)listener.LocalEndpoint).Port; }
        finally { listener.Stop(); }
    }

    private sealed class Worker(int rank, Process process)
    {
        public int Rank { get; } = rank;
        public Process Process { get; } = process;
        public Queue<string> ErrorTail { get; } = new();
        public Queue<string> OutputTail { get; } = new();
        public Task Exit { get; set; } = Task.CompletedTask;
        /// <summary>The exit code when it failed on its own (not stopped by us, not interrupted).</summary>
        public int? FailedWith { get; set; }
    }

    /// <summary>Runs the job: N workers with <paramref name="workerArgs"/>; returns 0 when every worker did, else non-zero.</summary>
    public static int Run(int n, IReadOnlyList<string> workerArgs, TextWriter stdout, TextWriter stderr, CancellationToken cancel)
    {
        int port = FreePort();
        var (file, prefix) = SelfCommand();
        var workers = new List<Worker>();
        var gate = new object();
        bool interrupted = false;

        void Stop(int signal)
        {
            foreach (var w in workers)
                if (!HasExited(w.Process)) Signal(w.Process, signal);
        }
        void KillAll()
        {
            foreach (var w in workers)
                if (!HasExited(w.Process))
                    try { w.Process.Kill(entireProcessTree: true); } catch (InvalidOperationException) { } catch (System.ComponentModel.Win32Exception) { }
        }
        // The launcher ending for any reason (including System.CommandLine's termination timeout) takes its workers with it.
        EventHandler onExit = (_, _) =>
        {
            Stop(Sigterm);
            var until = DateTime.UtcNow + TimeSpan.FromSeconds(2);
            while (DateTime.UtcNow < until && workers.Any(w => !HasExited(w.Process))) Thread.Sleep(50);
            KillAll();
        };
        ConsoleCancelEventHandler onCancel = (_, e) =>
        {
            e.Cancel = true;
            lock (gate)
            {
                if (interrupted) { stderr.WriteLine("launcher: second Ctrl-C: killing the workers"); KillAll(); return; }
                interrupted = true;
            }
            Stop(Sigint); // the terminal sent it to the workers too; twice is the same as once for them
        };
        // SIGTERM to the launcher (a scheduler ending the job): passed on, and what is left is killed after the grace period
        bool terminated = false;
        using var onTerm = OperatingSystem.IsWindows() ? null : PosixSignalRegistration.Create(PosixSignal.SIGTERM, ctx =>
        {
            ctx.Cancel = true;
            lock (gate) terminated = true;
            Stop(Sigterm);
        });
        AppDomain.CurrentDomain.ProcessExit += onExit;
        Console.CancelKeyPress += onCancel;
        using var onToken = cancel.Register(() => { lock (gate) interrupted = true; Stop(Sigint); });
        try
        {
            for (int rank = 0; rank < n; rank++)
            {
                var psi = new ProcessStartInfo(file)
                {
                    RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = false, UseShellExecute = false,
                };
                foreach (var p in prefix) psi.ArgumentList.Add(p);
                foreach (var a in workerArgs) psi.ArgumentList.Add(a);
                psi.Environment[DistributedEnvironment.Rank] = rank.ToString(CultureInfo.InvariantCulture);
                psi.Environment[DistributedEnvironment.LocalRank] = rank.ToString(CultureInfo.InvariantCulture);
                psi.Environment[DistributedEnvironment.WorldSize] = n.ToString(CultureInfo.InvariantCulture);
                psi.Environment[DistributedEnvironment.LocalWorldSize] = n.ToString(CultureInfo.InvariantCulture);
                psi.Environment[DistributedEnvironment.MasterAddr] = "127.0.0.1";
                psi.Environment[DistributedEnvironment.MasterPort] = port.ToString(CultureInfo.InvariantCulture);
                psi.Environment[LauncherPidVariable] = Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
                var process = new Process { StartInfo = psi, EnableRaisingEvents = true };
                var w = new Worker(rank, process);
                int r = rank;
                process.OutputDataReceived += (_, e) =>
                {
                    if (e.Data is null) return;
                    lock (gate)
                    {
                        if (r == 0) stdout.WriteLine(e.Data);
                        Keep(w.OutputTail, e.Data);
                    }
                };
                process.ErrorDataReceived += (_, e) =>
                {
                    if (e.Data is null) return;
                    lock (gate)
                    {
                        stderr.WriteLine(r == 0 ? e.Data : $"[rank {r}] {e.Data}");
                        Keep(w.ErrorTail, e.Data);
                    }
                };
                try { process.Start(); }
                catch (System.ComponentModel.Win32Exception e)
                {
                    throw new CliException($"--nproc {n}: could not start worker {rank} ({file}): {e.Message}", 1, e);
                }
                process.BeginOutputReadLine();
                process.BeginErrorReadLine();
                w.Exit = process.WaitForExitAsync(CancellationToken.None);
                lock (gate) workers.Add(w);
            }

            // After the first failure: a short settling time in which other ranks that fail on their own (a rank that
            // learnt of the failure through the communicator) are recorded as failures too, then SIGTERM, then SIGKILL.
            DateTime? signalAt = null, killAt = null;
            var running = workers.ToList();
            var failedInOrder = new List<Worker>();
            while (running.Count > 0)
            {
                lock (gate)
                    if (terminated && killAt is null) killAt = DateTime.UtcNow + StopGrace;
                DateTime? next = killAt ?? signalAt;
                var timeout = next is { } t ? Max(t - DateTime.UtcNow, TimeSpan.Zero) : Poll;
                if (timeout > Poll) timeout = Poll; // a signal to the launcher is noticed within Poll
                int i = Task.WaitAny([.. running.Select(w => w.Exit)], timeout);
                if (i < 0)
                {
                    if (next is null || DateTime.UtcNow < next) continue;
                    if (killAt is null)
                    {
                        Stop(Sigterm);
                        killAt = DateTime.UtcNow + StopGrace;
                        continue;
                    }
                    KillAll(); // the grace period is over
                    Task.WaitAll([.. running.Select(w => w.Exit)], TimeSpan.FromSeconds(10));
                    break;
                }
                var done = running[i];
                running.RemoveAt(i);
                done.Process.WaitForExit(); // the output events are drained
                int code = done.Process.ExitCode;
                bool userStop;
                lock (gate) userStop = terminated || (interrupted && code == TrainCommand.ExitInterrupted);
                if (code != 0 && !userStop && killAt is null)
                {
                    done.FailedWith = code;
                    failedInOrder.Add(done);
                    signalAt ??= DateTime.UtcNow + SettleTime;
                }
            }

            if (failedInOrder.Count > 0)
            {
                for (int f = 0; f < failedInOrder.Count; f++)
                {
                    var w = failedInOrder[f];
                    stderr.WriteLine($"error: rank {w.Rank} exited with code {Describe(w.FailedWith!.Value)}" +
                                     (f == 0 && n > failedInOrder.Count ? "; the other ranks were stopped" : ""));
                    var tail = w.ErrorTail.Count > 0 ? w.ErrorTail : w.OutputTail;
                    if (tail.Count > 0)
                    {
                        stderr.WriteLine($"  rank {w.Rank}'s last lines:");
                        foreach (var line in tail) stderr.WriteLine("    " + line);
                    }
                }
                int first = failedInOrder[0].FailedWith!.Value;
                return first is > 0 and < 126 ? first : 1;
            }
            return terminated ? 128 + Sigterm : interrupted ? TrainCommand.ExitInterrupted : 0;
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
            KillAll();
            AppDomain.CurrentDomain.ProcessExit -= onExit;
            foreach (var w in workers) w.Process.Dispose();
        }
    }

    private static void Keep(Queue<string> tail, string line)
    {
        tail.Enqueue(line);
        while (tail.Count > TailLines) tail.Dequeue();
    }

    private static string Describe(int code) =>
        code > 128 && code < 128 + 65 ? $"{code} (killed by signal {code - 128}{(code - 128) switch { 9 => ", SIGKILL", 15 => ", SIGTERM", 6 => ", SIGABRT", 11 => ", SIGSEGV", _ => "" }})"
        : code.ToString(CultureInfo.InvariantCulture);

    private static TimeSpan Max(TimeSpan a, TimeSpan b) => a > b ? a : b;

    private static bool HasExited(Process p)
    {
        try { return p.HasExited; }
        catch (InvalidOperationException) { return true; }
    }

    private const int Sigint = 2, Sigterm = 15;

    private static void Signal(Process p, int signal)
    {
        try
        {
            if (OperatingSystem.IsWindows()) p.Kill(entireProcessTree: true);
            else _ = SysKill(p.Id, signal);
        }
        catch (InvalidOperationException) { }
    }

    [DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int SysKill(int pid, int signal);

    [DllImport("libc", EntryPoint = "getppid")]
    private static extern int GetParentPid();

    [DllImport("libc", EntryPoint = "_exit")]
    private static extern void SysExit(int code);

    /// <summary>
    /// Ends this process at once with <paramref name="code"/> (POSIX _exit: no ProcessExit handlers, which could wait for
    /// the training thread — Environment.Exit from another thread was seen to block while the run went on).
    /// </summary>
    private static void ExitNow(int code)
    {
        try { Console.Error.Flush(); } catch (IOException) { }
        if (OperatingSystem.IsWindows()) Environment.Exit(code);
        SysExit(code);
    }

    /// <summary>
    /// In a worker: the test-only hooks (<see cref="PidDirVariable"/>: write rank-R.pid) and, for a worker of ours
    /// (<see cref="LauncherPidVariable"/>), a watchdog that ends it when the launcher is gone (killed with SIGKILL:
    /// its workers must not train on as orphans).
    /// </summary>
    public static void OnWorkerStart(DistributedOptions job)
    {
        if (Environment.GetEnvironmentVariable(PidDirVariable) is { Length: > 0 } dir)
            File.WriteAllText(Path.Combine(dir, $"rank-{job.Rank}.pid"), Environment.ProcessId.ToString(CultureInfo.InvariantCulture));
        if (!OperatingSystem.IsWindows() && int.TryParse(Environment.GetEnvironmentVariable(LauncherPidVariable), NumberStyles.None, CultureInfo.InvariantCulture, out int launcher))
        {
            var watchdog = new Thread(() =>
            {
                while (true)
                {
                    Thread.Sleep(1000);
                    if (GetParentPid() != launcher)
                    {
                        try { Console.Error.WriteLine($"error: rank {job.Rank}: the launcher (process {launcher}) has ended; stopping"); }
                        catch (IOException) { } // its pipe is gone with it
                        ExitNow(1);
                    }
                }
            }) { IsBackground = true, Name = "launcher watchdog" };
            watchdog.Start();
        }
    }

    /// <summary>
    /// Test-only (<see cref="FaultExitRankVariable"/>): when this worker's rank is the variable's, a thread watches
    /// <paramref name="step"/> and, once the first optimizer step is done, prints an error and exits the process with
    /// code 1 — a worker that dies mid-run (the other ranks learn it from their communicator; the launcher from the exit).
    /// Only rank 0 reports progress in a data-parallel run, hence a thread rather than the progress callback.
    /// </summary>
    public static void InjectFault(DistributedOptions job, Func<int> step)
    {
        if (Environment.GetEnvironmentVariable(FaultExitRankVariable) is not { } r
            || !int.TryParse(r, NumberStyles.None, CultureInfo.InvariantCulture, out int rank) || rank != job.Rank) return;
        var fault = new Thread(() =>
        {
            int done;
            while ((done = step()) < 1) Thread.Sleep(20);
            try { Console.Error.WriteLine($"error: injected fault ({FaultExitRankVariable}={rank}, test-only): rank {rank} fails after step {done}"); }
            catch (IOException) { }
            ExitNow(1);
        }) { IsBackground = true, Name = "injected fault" };
        fault.Start();
    }
}
