using NativePeft.Cli;
using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Ops;
using NativePeft.Tests.IO;
using NativePeft.Tests.Training;
using NativePeft.Training;
using NUnit.Framework;
using static NativePeft.Tests.Cli.TrainCliTests;

namespace NativePeft.Tests.Cli;

/// <summary>
/// The output folder of train, compare, merge, quantize, pretrain and the FineTune API (issue 10, classes 1–3): one run
/// at a time (a lock naming its owner; a stale lock taken over), an unwritable folder refused before the first step, a
/// write failure mid-run as one line with the path and the free space that keeps the last good checkpoint, and what a
/// killed run left cleaned up so that the same folder can be used again.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class OutputFolderCliTests
{
    private static (int Exit, string Stdout, string Stderr) InProcess(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int exit = Program.Run(args, stdout, stderr);
        return (exit, stdout.ToString(), stderr.ToString());
    }

    private static string[] Entries(string folder) =>
        Directory.Exists(folder) ? Directory.GetFileSystemEntries(folder).Select(p => Path.GetFileName(p)!).Order(StringComparer.Ordinal).ToArray() : [];

    // ------------------------------------------------------------------------------------------ 1. one writer per folder

    [Test]
    public void TrainIntoAFolderLockedByAnotherProcessFailsNamingTheOwnerAndWritesNothing()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir), output = dir["out"];
        using var held = OutputLock.Acquire(output); // this test process is "the other run"
        var r = CliProcess.Run(Args(model, data, output, "--steps", "2", "--save-every", "1"));
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        var errors = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.That(errors, Has.Length.EqualTo(1), r.ToString());
        Assert.That(errors[0], Does.StartWith($"error: {output}: in use by another run: pid {Environment.ProcessId} on {Environment.MachineName}"));
        Assert.That(r.Stdout, Does.Not.Contain("step 1/2"));
        Assert.That(Entries(output), Is.EqualTo(new[] { OutputLock.FileName }), "wrote nothing");
    }

    [Test]
    public void TwoFineTunesOfOneProcessCannotShareAnOutputFolder()
    {
        using var dir = CliProcess.TempDir();
        var options = new FineTuneOptions { Model = BuiltinModel.Name, Data = BuiltinTask.DataName, Steps = 1, BatchSize = 2, SeqLen = 24, EvalBatches = 1, ExactMatchSamples = 1, OutputDir = dir["out"] };
        using (var first = FineTune.Create(options))
        {
            var e = Assert.Throws<OutputFolderException>(() => FineTune.Create(options).Dispose())!;
            Assert.That(e.Message, Does.Contain($"pid {Environment.ProcessId}").And.StartWith(dir["out"] + ": in use by another run"));
            first.Train();
            Assert.That(Directory.Exists(Path.Combine(dir["out"], "adapter")));
        }
        Assert.That(File.Exists(Path.Combine(dir["out"], OutputLock.FileName)), Is.False, "released by Dispose");
    }

    [Test]
    public void AStaleLockOfAKilledRunIsReportedAndTakenOver()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir), output = dir["out"];
        Directory.CreateDirectory(output);
        int dead = OutputFolderTests.DeadPid();
        OutputFolderTests.WriteLockFile(output, dead);
        var r = CliProcess.Run(Args(model, data, output, "--steps", "2"));
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain($"warning: {output}: removed a stale lock of pid {dead} (nativepeft train --out x) from 2026-01-02 03:04:05 UTC"));
        Assert.That(PeftAdapter.Load(Path.Combine(output, "adapter")).Modules, Is.Not.Empty);
        Assert.That(File.Exists(Path.Combine(output, OutputLock.FileName)), Is.False, "released at the end");
    }

    [Test]
    public void CompareMergeQuantizeAndPretrainRefuseAnOutputInUse()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir);
        // an adapter for merge: the tiny model with LoRA, saved as PEFT does
        using (var ops = new CpuOps())
        using (var lora = TrainingKit.LoraModel(ops))
            PeftAdapter.Save(dir["adapter"], lora, model);
        string shard = Path.Combine(model, HfCheckpoint.SingleFileName);

        using (OutputLock.Acquire(dir["cmp"]))
        {
            var r = InProcess("compare", "--steps", "1", "--methods", "lora", "--out", dir["cmp"]);
            Assert.That(r.Exit, Is.EqualTo(1), r.Stderr);
            Assert.That(r.Stderr, Does.StartWith($"error: {dir["cmp"]}: in use by another run: pid {Environment.ProcessId} on {Environment.MachineName}"));
            Assert.That(Entries(dir["cmp"]), Is.EqualTo(new[] { OutputLock.FileName }));
        }
        using (OutputLock.Acquire(dir["merged"]))
        {
            var r = InProcess("merge", "--model", model, "--adapter", dir["adapter"], "--out", dir["merged"]);
            Assert.That(r.Exit, Is.EqualTo(1), r.Stderr);
            Assert.That(r.Stderr, Does.StartWith($"error: {dir["merged"]}: in use by another run: pid {Environment.ProcessId}"));
            Assert.That(Entries(dir["merged"]), Is.EqualTo(new[] { OutputLock.FileName }));
        }
        using (OutputLock.AcquireForFile(dir["q.safetensors"]))
        {
            var r = InProcess("quantize", "--in", shard, "--out", dir["q.safetensors"]);
            Assert.That(r.Exit, Is.EqualTo(1), r.Stderr);
            Assert.That(r.Stderr, Does.StartWith($"error: {dir.Path}: in use by another run: pid {Environment.ProcessId}"));
            Assert.That(File.Exists(dir["q.safetensors"]), Is.False);
        }
        using (OutputLock.Acquire(dir["pre"]))
        {
            var r = InProcess("pretrain", "--steps", "1", "--layers", "1", "--hidden", "16", "--heads", "2", "--kv-heads", "1", "--intermediate", "32",
                "--seq", "16", "--batch", "2", "--corpus-lines", "8", "--out", dir["pre"]);
            Assert.That(r.Exit, Is.EqualTo(1), r.Stderr);
            Assert.That(r.Stderr, Does.Contain($"{dir["pre"]}: in use by another run: pid {Environment.ProcessId}"));
            Assert.That(Entries(dir["pre"]), Is.EqualTo(new[] { OutputLock.FileName }));
        }
        // free again: each command works into the folder or file the lock was on
        Assert.That(InProcess("merge", "--model", model, "--adapter", dir["adapter"], "--out", dir["merged"]).Exit, Is.EqualTo(0));
        Assert.That(InProcess("quantize", "--in", shard, "--out", dir["q.safetensors"]).Exit, Is.EqualTo(0));
        Assert.That(Entries(dir["merged"]), Does.Not.Contain(OutputLock.FileName));
        // the other file writers alike
        foreach (var args in new[] { new[] { "dequantize", "--in", dir["q.safetensors"], "--out", dir["d.safetensors"] }, ["demo-checkpoint", "--out", dir["d.safetensors"]] })
        {
            using (OutputLock.AcquireForFile(dir["d.safetensors"]))
            {
                var r = InProcess(args);
                Assert.That(r.Exit, Is.EqualTo(1), args[0] + ": " + r.Stderr);
                Assert.That(r.Stderr, Does.StartWith($"error: {dir.Path}: in use by another run: pid {Environment.ProcessId}"), args[0]);
                Assert.That(File.Exists(dir["d.safetensors"]), Is.False, args[0]);
            }
            Assert.That(InProcess(args).Exit, Is.EqualTo(0), args[0]);
            File.Delete(dir["d.safetensors"]);
        }
    }

    // ------------------------------------------------------------------------------------------ 2. unwritable output, write failures

    [Test]
    public void AnOutputThatCannotBeCreatedFailsBeforeTheFirstStep()
    {
        // Root-proof: the parent of --out is a file.
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir);
        File.WriteAllText(dir["file"], "not a folder");
        string output = Path.Combine(dir["file"], "out");
        var r = CliProcess.Run(Args(model, data, output, "--steps", "2"));
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        Assert.That(r.Stderr, Does.StartWith($"error: {output}: cannot write to the output folder (").And.Contain("free there"));
        Assert.That(r.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1), "one line, no stack trace");
        Assert.That(r.Stdout, Does.Not.Contain("step 1/2"));
    }

    [Test]
    public void AReadOnlyOutputFolderFailsBeforeTheFirstStep()
    {
        // chmod stops writes only for a non-root user; as root (CI containers) the refusal is injected at the same point.
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir), output = dir["out"];
        Directory.CreateDirectory(output);
        bool chmodStopsWrites = !OperatingSystem.IsWindows() && MakeReadOnly(output);
        try
        {
            using var fault = chmodStopsWrites ? null
                : OutputFolder.InjectFault(p => p.StartsWith(output + Path.DirectorySeparatorChar, StringComparison.Ordinal)
                    ? new UnauthorizedAccessException($"Access to the path '{p}' is denied.") : null);
            var r = InProcess(Args(model, data, output, "--steps", "2"));
            Assert.That(r.Exit, Is.EqualTo(1), r.Stderr);
            Assert.That(r.Stderr, Does.StartWith($"error: {output}: cannot write to the output folder (Access to the path '{output}/").And.Contain("free there"));
            Assert.That(r.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1));
            Assert.That(r.Stdout, Does.Not.Contain("step 1/2"), "refused before the first step");
            Assert.That(Entries(output), Is.Empty, "nothing written");
        }
        finally
        {
            if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(output, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
    }

    /// <summary>chmod 555; whether that stops this process writing there (not for root, which chmod does not stop).</summary>
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    private static bool MakeReadOnly(string folder)
    {
        File.SetUnixFileMode(folder, UnixFileMode.UserRead | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute |
            UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
        string probe = Path.Combine(folder, "probe");
        try
        {
            File.WriteAllText(probe, "");
            File.Delete(probe);
            return false;
        }
        catch (UnauthorizedAccessException) { return true; }
    }

    [Test]
    public void AWriteFailureAtTheSecondCheckpointKeepsTheFirstAndNamesThePathAndTheFreeSpace()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir), output = dir["out"];
        // The disk fills up while checkpoint-4 is written: its optimizer state cannot be created.
        string? failedAt = null;
        using (OutputFolder.InjectFault(p =>
               {
                   if (!p.Contains(".checkpoint-4.", StringComparison.Ordinal) || !p.Contains(Trainer.OptimizerFileName, StringComparison.Ordinal)) return null;
                   failedAt = p;
                   return new IOException("No space left on device : '" + p + "'");
               }))
        {
            var r = InProcess(Args(model, data, output, "--steps", "6", "--save-every", "2"));
            Assert.That(r.Exit, Is.EqualTo(1), r.Stderr);
            string ckpt4 = Path.Combine(output, "checkpoint-4"), ckpt2 = Path.Combine(output, "checkpoint-2");
            Assert.That(r.Stderr.Trim().Split('\n'), Has.Length.EqualTo(1), r.Stderr);
            Assert.That(r.Stderr.Trim(), Does.Match(
                "^error: " + System.Text.RegularExpressions.Regex.Escape($"{ckpt4}: write failed (No space left on device : '{failedAt}'); ") +
                @"\d+(\.\d+)? (B|KiB|MiB|GiB|TiB) \(\d+ bytes\) free there; kept the last good checkpoint " + System.Text.RegularExpressions.Regex.Escape(ckpt2) + "$"));
            Assert.That(r.Stdout, Does.Contain("step 3/6").And.Not.Contain("step 5/6"), "stopped at the failed save of step 4");
        }
        // checkpoint-2 is intact and resumable; only our temporary files are gone
        Assert.That(Entries(output), Is.EqualTo(new[] { "checkpoint-2", "metrics.json" }));
        Assert.That(PeftAdapter.Load(Path.Combine(output, "checkpoint-2")).Modules, Is.Not.Empty);
        var resumed = InProcess(Args(model, data, output, "--steps", "6", "--save-every", "2", "--resume", Path.Combine(output, "checkpoint-2")));
        Assert.That(resumed.Exit, Is.EqualTo(0), resumed.Stderr);
        Assert.That(resumed.Stdout, Does.Contain("resumed at step 2").And.Contain("step 6/6"));
        Assert.That(Entries(output), Is.EqualTo(new[] { "adapter", "checkpoint-2", "checkpoint-4", "checkpoint-6", "loss.png", "metrics.json" }));
    }

    // ------------------------------------------------------------------------------------------ 3. what a killed run leaves

    [Test]
    public void ARunKilledInItsFirstSaveCanBeRerunIntoTheSameFolder()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir), output = dir["out"];
        // What a run killed while writing checkpoint-2 leaves: its lock, a half-written checkpoint and a metrics temp file.
        Directory.CreateDirectory(output);
        OutputFolderTests.WriteLockFile(output, OutputFolderTests.DeadPid());
        string partial = Path.Combine(output, ".checkpoint-2.0123456789abcdef0123456789abcdef.tmp");
        Directory.CreateDirectory(partial);
        File.WriteAllText(Path.Combine(partial, "adapter_config.json"), "{\"r\": 4");
        File.WriteAllText(Path.Combine(output, ".metrics.json.fedcba9876543210fedcba9876543210.tmp"), "{\"st");
        var r = CliProcess.Run(Args(model, data, output, "--steps", "2", "--save-every", "2"));
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain($"warning: {output}: cleaned up after an interrupted run: removed 2 temporary file(s)/folder(s): "));
        Assert.That(Entries(output), Is.EqualTo(new[] { "adapter", "checkpoint-2", "loss.png", "metrics.json" }));
    }

    [Test]
    public void AKillBetweenTheTwoRenamesOfACheckpointIsRepairedWhenTheRunResumesFromIt()
    {
        using var dir = CliProcess.TempDir();
        string model = WriteModel(dir), data = WriteData(dir), output = dir["out"];
        var first = CliProcess.Run(Args(model, data, output, "--steps", "4", "--save-every", "2"));
        Assert.That(first.ExitCode, Is.EqualTo(0), first.ToString());
        string ckpt4 = Path.Combine(output, "checkpoint-4");
        byte[] state = File.ReadAllBytes(Path.Combine(ckpt4, Trainer.StateFileName));
        // Killed while replacing checkpoint-4: the old copy renamed away, the new one complete but not yet renamed in.
        string old = Path.Combine(output, ".checkpoint-4.0123456789abcdef0123456789abcdef.old");
        string fresh = Path.Combine(output, ".checkpoint-4.fedcba9876543210fedcba9876543210.tmp");
        FileSystemCopy(ckpt4, fresh);
        Directory.Move(ckpt4, old);
        OutputFolderTests.WriteLockFile(output, OutputFolderTests.DeadPid());

        var r = CliProcess.Run(Args(model, data, output, "--steps", "6", "--save-every", "2", "--resume", ckpt4));
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain($"restored checkpoint-4 (from {Path.GetFileName(old)})").And.Contain("resumed at step 4").And.Contain("step 6/6"));
        Assert.That(File.ReadAllBytes(Path.Combine(ckpt4, Trainer.StateFileName)), Is.EqualTo(state), "the restored copy is the saved one");
        Assert.That(Entries(output), Is.EqualTo(new[] { "adapter", "checkpoint-2", "checkpoint-4", "checkpoint-6", "loss.png", "metrics.json" }));
    }

    private static void FileSystemCopy(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
    }
}
