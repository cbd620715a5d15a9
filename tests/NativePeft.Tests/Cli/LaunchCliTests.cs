using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using NativePeft.IO;
using NativePeft.Numerics;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// <c>nativepeft train --nproc N</c> as a user runs it: real worker processes on the CPU, their errors, a worker that
/// fails or is killed (the job ends non-zero, naming the rank, in bounded time, leaving no process behind), and the bad
/// values of --nproc and of the job's environment.
/// </summary>
[NonParallelizable] // several processes each: not next to the other CLI tests on a small machine
public class LaunchCliTests
{
    private static readonly string Exe = Path.Combine(AppContext.BaseDirectory, OperatingSystem.IsWindows() ? "NativePeft.Cli.exe" : "NativePeft.Cli");

    /// <summary>A train command with no WORLD_SIZE/RANK/SLURM_* inherited from the test's own environment.</summary>
    private static readonly Dictionary<string, string?> Clean = new()
    {
        ["WORLD_SIZE"] = null, ["RANK"] = null, ["LOCAL_RANK"] = null, ["LOCAL_WORLD_SIZE"] = null, ["MASTER_ADDR"] = null, ["MASTER_PORT"] = null,
        ["SLURM_PROCID"] = null, ["SLURM_NTASKS"] = null, ["SLURM_LOCALID"] = null,
    };

    private static Dictionary<string, string?> Env(params (string Name, string? Value)[] vars)
    {
        var env = new Dictionary<string, string?>(Clean);
        foreach (var (n, v) in vars) env[n] = v;
        return env;
    }

    [TestCase("0", "error: --nproc 0: must be at least 1")]
    [TestCase("-3", "error: --nproc -3: must be at least 1")]
    [TestCase("65", "error: --nproc 65: at most 64 workers on one node")]
    [TestCase("many", "error: --nproc: 'many' is not an integer")]
    public void ABadNprocIsAnErrorNamingIt(string n, string message)
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.RunWith(Env(), "train", "--model", "builtin", "--data", "builtin", "--steps", "1", "--nproc", n, "--out", dir["out"]);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.StartWith(message), r.ToString());
        Assert.That(Directory.Exists(dir["out"]), Is.False, "nothing written");
    }

    [Test]
    public void NprocOnCudaNeedsThatManyDevices()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.RunWith(Env(), "train", "--model", "builtin", "--data", "builtin", "--steps", "1", "--nproc", "64", "--device", "cuda", "--out", dir["out"]);
        // no machine of ours has 64 GPUs: either "this machine has N CUDA devices" or "cannot count the CUDA devices (why)"
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Match(@"^error: --nproc 64 --device cuda: (this machine has \d+ CUDA devices? \(one worker per device\)|cannot count the CUDA devices \(.+\))"), r.ToString());
        Assert.That(Directory.Exists(dir["out"]), Is.False);
    }

    [Test]
    public void NprocInsideAJobIsRefused()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.RunWith(Env(("WORLD_SIZE", "2")), "train", "--model", "builtin", "--data", "builtin", "--nproc", "2", "--out", dir["out"]);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.StartWith("error: --nproc 2: this process is already a worker of a job (WORLD_SIZE=2 is set"), r.ToString());
    }

    [TestCase("WORLD_SIZE", "x", "error: WORLD_SIZE=x: expected a whole number")]
    [TestCase("RANK", "7", "error: RANK=7: must be less than WORLD_SIZE=2")]
    [TestCase("MASTER_PORT", "99999", "error: MASTER_PORT=99999: must be 1 to 65535")]
    public void AWorkersBadEnvironmentIsAnErrorNamingTheVariable(string name, string value, string message)
    {
        using var dir = CliProcess.TempDir();
        var env = Env(("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), (name, value));
        var r = CliProcess.RunWith(env, "train", "--model", "builtin", "--data", "builtin", "--steps", "1", "--out", dir["out"]);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.StartWith(message), r.ToString());
        Assert.That(r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries), Has.Length.EqualTo(1), "one line, no stack trace");
        Assert.That(Directory.Exists(dir["out"]), Is.False);
    }

    [Test]
    public void TheHelpDocumentsNproc()
    {
        var r = CliProcess.Run("train", "--help");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("--nproc").And.Contain("WORLD_SIZE"), r.ToString());
    }

    /// <summary>The launcher as a child process, its output collected as it comes.</summary>
    private sealed class Launch : IDisposable
    {
        private readonly StringBuilder _out = new(), _err = new();
        public Process Process { get; }
        public Stopwatch Clock { get; } = Stopwatch.StartNew();

        public Launch(IReadOnlyDictionary<string, string?> env, params string[] args)
        {
            var psi = new ProcessStartInfo(Exe) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (var a in args) psi.ArgumentList.Add(a);
            foreach (var (name, value) in env)
                if (value is null) psi.Environment.Remove(name); else psi.Environment[name] = value;
            Process = new Process { StartInfo = psi };
            Process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (_out) _out.AppendLine(e.Data); };
            Process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (_err) _err.AppendLine(e.Data); };
            Process.Start();
            Process.BeginOutputReadLine();
            Process.BeginErrorReadLine();
        }

        public string Stdout { get { lock (_out) return _out.ToString(); } }
        public string Stderr { get { lock (_err) return _err.ToString(); } }
        public override string ToString() => $"exit {(Process.HasExited ? Process.ExitCode : "(running)")} after {Clock.Elapsed.TotalSeconds:F1} s\n--- stdout\n{Stdout}\n--- stderr\n{Stderr}";

        /// <summary>Waits for the launcher to end (at most <paramref name="limit"/>, then kills it and fails).</summary>
        public int Wait(TimeSpan limit)
        {
            if (!Process.WaitForExit(limit))
            {
                Process.Kill(entireProcessTree: true);
                Assert.Fail($"the launcher did not end within {limit.TotalSeconds} s\n{this}");
            }
            Process.WaitForExit();
            return Process.ExitCode;
        }

        public void Dispose()
        {
            if (!Process.HasExited) Process.Kill(entireProcessTree: true);
            Process.Dispose();
        }
    }

    /// <summary>Waits until <paramref name="condition"/> holds (polling), failing after <paramref name="limit"/>.</summary>
    private static void WaitFor(Func<bool> condition, TimeSpan limit, Func<string> what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            if (clock.Elapsed > limit) Assert.Fail($"timed out after {limit.TotalSeconds} s waiting for {what()}");
            Thread.Sleep(100);
        }
    }

    private static int[] WorkerPids(string dir, int n) =>
        Enumerable.Range(0, n).Select(r => int.Parse(File.ReadAllText(Path.Combine(dir, $"rank-{r}.pid")))).ToArray();

    /// <summary>True while a process with this id exists and is not a zombie (Linux /proc).</summary>
    private static bool Alive(int pid)
    {
        string stat = $"/proc/{pid}/stat";
        try { return File.Exists(stat) && File.ReadAllText(stat).Split(')').Last().TrimStart()[0] != 'Z'; }
        catch (IOException) { return false; }
    }

    private static void AssertNoOrphans(int[] pids, Launch launch) =>
        WaitFor(() => pids.All(p => !Alive(p)), TimeSpan.FromSeconds(10), () => $"the workers {string.Join(", ", pids.Where(Alive))} to end\n{launch}");

    /// <summary>
    /// A 2-rank job of 500 steps (far longer than the tests let it run) with pid files in dir/pids, returned once rank 0
    /// printed <paramref name="waitFor"/> (null: at once).
    /// </summary>
    private static Launch StartLongRun(TempDir dir, string? waitFor, params (string Name, string? Value)[] env)
    {
        if (OperatingSystem.IsWindows()) Assert.Ignore("the launcher's tests use /proc and POSIX signals");
        Directory.CreateDirectory(dir["pids"]);
        var launch = new Launch(Env([("NATIVEPEFT_WORKER_PID_DIR", dir["pids"]), .. env]),
            "train", "--nproc", "2", "--device", "cpu", "--model", "builtin", "--data", "builtin", "--steps", "500", "--batch", "2", "--seq", "32", "--out", dir["out"]);
        try
        {
            if (waitFor is null) return launch;
            WaitFor(() => launch.Stdout.Contains(waitFor) || launch.Process.HasExited, TimeSpan.FromSeconds(90), () => $"rank 0's \"{waitFor}\"\n{launch}");
            Assert.That(launch.Process.HasExited, Is.False, launch.ToString());
            return launch;
        }
        catch
        {
            launch.Dispose();
            throw;
        }
    }

    [Test]
    public void AFailingWorkerEndsTheJobNamingItsRank()
    {
        using var dir = CliProcess.TempDir();
        using var launch = StartLongRun(dir, null, ("NATIVEPEFT_FAULT_EXIT_RANK", "1"));
        int rc = launch.Wait(TimeSpan.FromSeconds(120));
        Assert.That(launch.Clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(60)), launch.ToString());
        Assert.That(rc, Is.Not.EqualTo(0), launch.ToString());
        Assert.That(launch.Stderr, Does.Contain("error: rank 1 exited with code 1"), launch.ToString());
        Assert.That(launch.Stderr, Does.Contain("[rank 1] error: injected fault (NATIVEPEFT_FAULT_EXIT_RANK=1, test-only): rank 1 fails after step"), launch.ToString());
        Assert.That(launch.Stdout, Does.Contain("step 1/500"), "rank 0's output passes through\n" + launch);
        Assert.That(launch.Stderr, Does.Not.Contain("   at "), "every rank's error is one line, no stack trace\n" + launch);
        Assert.That(launch.Stdout, Does.Not.Contain("wrote "), "the job did not finish\n" + launch);
        AssertNoOrphans(WorkerPids(dir["pids"], 2), launch);
    }

    [Test]
    public void AKilledWorkerEndsTheJobNamingItsRank()
    {
        using var dir = CliProcess.TempDir();
        using var launch = StartLongRun(dir, "step 1/500");
        var pids = WorkerPids(dir["pids"], 2);
        var killed = Stopwatch.StartNew();
        Process.GetProcessById(pids[1]).Kill(); // SIGKILL: no goodbye
        int rc = launch.Wait(TimeSpan.FromSeconds(120));
        Assert.That(killed.Elapsed, Is.LessThan(TimeSpan.FromSeconds(60)), launch.ToString());
        Assert.That(rc, Is.Not.EqualTo(0), launch.ToString());
        Assert.That(launch.Stderr, Does.Contain("error: rank 1 exited with code 137 (killed by signal 9, SIGKILL)"), launch.ToString());
        AssertNoOrphans(pids, launch);
    }

    [DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int SysKill(int pid, int signal);

    /// <summary>True when <paramref name="pid"/> ignores SIGINT (started in the background by a non-interactive shell).</summary>
    private static bool IgnoresSigint(int pid) =>
        File.ReadLines($"/proc/{pid}/status").FirstOrDefault(l => l.StartsWith("SigIgn:", StringComparison.Ordinal)) is { } line
        && (Convert.ToUInt64(line["SigIgn:".Length..].Trim(), 16) & (1UL << (2 - 1))) != 0;

    [Test]
    public void CtrlCStopsEveryWorkerWhichSavesACheckpoint()
    {
        using var dir = CliProcess.TempDir();
        using var launch = StartLongRun(dir, "step 2/500");
        if (IgnoresSigint(launch.Process.Id)) Assert.Ignore("SIGINT is ignored in this process tree (a background job of a shell), as it would be for a user");
        var pids = WorkerPids(dir["pids"], 2);
        Assert.That(SysKill(launch.Process.Id, 2), Is.EqualTo(0), "kill -INT");
        int rc = launch.Wait(TimeSpan.FromSeconds(60));
        Assert.That(rc, Is.EqualTo(130), launch.ToString());
        var saved = Regex.Match(launch.Stdout, @"interrupted after step (\d+): saved ([^;\s]+)");
        Assert.That(saved.Success, Is.True, "rank 0 saved a checkpoint\n" + launch);
        Assert.That(Directory.Exists(saved.Groups[2].Value), Is.True, launch.ToString());
        Assert.That(launch.Stderr, Does.Not.Contain("exited with code"), "an interrupt is not a failure\n" + launch);
        AssertNoOrphans(pids, launch);
    }

    /// <summary>
    /// The 2-rank run against the 1-process run with twice the accumulation: the loopback transport sums the two ranks'
    /// premultiplied gradients in rank order where the one process accumulates and scales once, so they differ by fp32
    /// rounding only. The tolerances are DataParallelTests' (weights within 1e-6 absolute, losses 1e-7 relative); this
    /// run measured 1.3e-7 at most (a lora_B element of a 4e-4 tensor; AdamW's first steps move every element by about
    /// lr whatever its gradient's size, so rounding shows relative to the small B, not to lr).
    /// </summary>
    private const double WeightTolerance = 1e-6, LossTolerance = 1e-7;

    [Test]
    public void TwoWorkersTrainTheOneProcessRunWithTwiceTheAccumulation()
    {
        using var dir = CliProcess.TempDir();
        string[] common = ["train", "--device", "cpu", "--model", "builtin", "--data", "builtin", "--steps", "3", "--batch", "2", "--seq", "32", "--seed", "5"];
        // --nproc from a --config file: the workers get the expanded options less --nproc (no launcher of launchers)
        File.WriteAllText(dir["job.yaml"], "nproc: 2\n");
        var two = CliProcess.RunWith(Env(), [.. common, "--config", dir["job.yaml"], "--out", dir["two"]]);
        Assert.That(two.ExitCode, Is.EqualTo(0), two.ToString());
        var one = CliProcess.RunWith(Env(), [.. common, "--grad-accum", "2", "--out", dir["one"]]);
        Assert.That(one.ExitCode, Is.EqualTo(0), one.ToString());
        Assert.That(two.Stdout, Does.Contain("2 ranks over cpu (global batch 1×2×2 rows), all-reduce 584.0 KiB per step"), "149504 fp32 gradients\n" + two);
        Assert.That(two.Stderr, Does.Not.Contain("[rank 1]"), "rank 1 says nothing when all is well\n" + two);
        Assert.That(Regex.Matches(two.Stdout, @"^step \d+/3 ", RegexOptions.Multiline), Has.Count.EqualTo(3), "rank 0's step lines, once each\n" + two);

        using var a = SafetensorsFile.Open(Path.Combine(dir["one"], "adapter", "adapter_model.safetensors"));
        using var b = SafetensorsFile.Open(Path.Combine(dir["two"], "adapter", "adapter_model.safetensors"));
        Assert.That(b.Tensors.Select(t => t.Name).Order(), Is.EqualTo(a.Tensors.Select(t => t.Name).Order()));
        foreach (var t in a.Tensors)
        {
            Assert.That(t.DType, Is.EqualTo(DType.F32), t.Name);
            var x = a.GetSpan<float>(t.Name);
            var y = b.GetSpan<float>(t.Name);
            float scale = 0, diff = 0;
            for (int i = 0; i < x.Length; i++) { scale = Math.Max(scale, Math.Abs(x[i])); diff = Math.Max(diff, Math.Abs(x[i] - y[i])); }
            Assert.That(diff, Is.LessThanOrEqualTo(WeightTolerance), $"{t.Name}: max |one - two| {diff:e3} (max |one| {scale:e3})");
        }
        double[] Losses(string run) => JsonDocument.Parse(File.ReadAllText(Path.Combine(dir[run], "metrics.json"))).RootElement
            .GetProperty("steps").EnumerateArray().Select(s => s.GetProperty("loss").GetDouble()).ToArray();
        Assert.That(Losses("two"), Is.EqualTo(Losses("one")).Within(LossTolerance * 100).Percent, "the same loss at every step");
    }
}
