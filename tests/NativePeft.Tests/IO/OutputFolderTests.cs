using System.Diagnostics;
using NativePeft.IO;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

/// <summary>
/// The output folder's lock (<see cref="OutputLock"/>), the atomic folder replace and the clean-up of a killed run's
/// leftovers (<see cref="OutputFolder"/>): a kill is simulated by copying the folder as it is on disk at each point of a
/// save and recovering the copy.
/// </summary>
public class OutputFolderTests
{
    /// <summary>The pid of a process that has exited (a real pid of this host, now free).</summary>
    internal static int DeadPid()
    {
        using var p = Process.Start(new ProcessStartInfo("true") { UseShellExecute = false })!;
        p.WaitForExit();
        return p.Id;
    }

    /// <summary>A lock file as a run of pid <paramref name="pid"/> on this host writes it.</summary>
    internal static void WriteLockFile(string folder, int pid, string command = "nativepeft train --out x") =>
        File.WriteAllText(Path.Combine(folder, OutputLock.FileName),
            $"pid={pid}\nhost={Environment.MachineName}\ncommand={command}\nstarted=2026-01-02T03:04:05.0000000Z\n");

    [Test]
    public void ASecondLockOnTheSameFolderIsRefusedNamingTheOwner()
    {
        using var dir = CliProcess.TempDir();
        string folder = dir["out"];
        using (var first = OutputLock.Acquire(folder))
        {
            Assert.That(first.CreatedFolder && Directory.Exists(folder) && File.Exists(Path.Combine(folder, OutputLock.FileName)));
            var e = Assert.Throws<OutputFolderException>(() => OutputLock.Acquire(folder))!;
            Assert.That(e.Message, Does.StartWith(Path.GetFullPath(folder) + ": in use by another run: pid " + Environment.ProcessId + " on "));
            Assert.That(File.Exists(Path.Combine(folder, OutputLock.FileName)), "the refused contender leaves the owner's lock alone");
        }
        Assert.That(Directory.Exists(folder), Is.False, "released: the lock file and the (empty) folder it created are gone");
        using (OutputLock.Acquire(folder)) { } // free again
    }

    [Test]
    public void AStaleLockOfAPidThatIsGoneIsReportedAndTakenOver()
    {
        using var dir = CliProcess.TempDir();
        string folder = dir["out"];
        Directory.CreateDirectory(folder);
        int dead = DeadPid();
        WriteLockFile(folder, dead);
        using var l = OutputLock.Acquire(folder);
        Assert.That(l.Notes, Has.Count.EqualTo(1));
        Assert.That(l.Notes[0], Does.Contain($"removed a stale lock of pid {dead} (nativepeft train --out x) from 2026-01-02 03:04:05 UTC"));
        Assert.That(File.ReadAllText(Path.Combine(folder, OutputLock.FileName)), Does.StartWith($"pid={Environment.ProcessId}\n"));
    }

    [Test]
    public void ALockOfALivePidWithoutItsFileLockIsStillRespected()
    {
        // A lock file whose owner runs (this process, through another tool or with .NET file locking off) but holds no flock.
        using var dir = CliProcess.TempDir();
        string folder = dir["out"];
        Directory.CreateDirectory(folder);
        using var self = Process.GetCurrentProcess();
        File.WriteAllText(Path.Combine(folder, OutputLock.FileName),
            $"pid={Environment.ProcessId}\nhost={Environment.MachineName}\ncommand=other\nstarted={self.StartTime.ToUniversalTime():O}\n");
        var e = Assert.Throws<OutputFolderException>(() => OutputLock.Acquire(folder))!;
        Assert.That(e.Message, Does.Contain($"pid {Environment.ProcessId}").And.Contain("(other)"));
    }

    [Test]
    public void AFileLockCoversOnlyItsFileAndCleansItsOwnTemporaryFiles()
    {
        using var dir = CliProcess.TempDir();
        string leftover = dir[".q.safetensors.0123456789abcdef0123456789abcdef.tmp"];
        string other = dir[".other.safetensors.0123456789abcdef0123456789abcdef.tmp"];
        File.WriteAllText(leftover, "partial");
        File.WriteAllText(other, "partial");
        using var l = OutputLock.AcquireForFile(dir["q.safetensors"]);
        Assert.That(File.Exists(leftover), Is.False);
        Assert.That(File.Exists(other), "another output's temporary file is not ours to remove");
        Assert.Throws<OutputFolderException>(() => OutputLock.AcquireForFile(dir["q.safetensors"]));
        using (OutputLock.AcquireForFile(dir["other.safetensors"])) { }
    }

    /// <summary>Writes a complete copy "version" of a saved folder: two files that must agree.</summary>
    private static void WriteCopy(string folder, string version)
    {
        Directory.CreateDirectory(folder);
        File.WriteAllText(Path.Combine(folder, "a.txt"), version);
        File.WriteAllText(Path.Combine(folder, "b.txt"), version);
    }

    private static string? CompleteVersion(string folder) =>
        Directory.Exists(folder) && File.Exists(Path.Combine(folder, "a.txt")) && File.Exists(Path.Combine(folder, "b.txt"))
        && File.ReadAllText(Path.Combine(folder, "a.txt")) == File.ReadAllText(Path.Combine(folder, "b.txt"))
            ? File.ReadAllText(Path.Combine(folder, "a.txt")) : null;

    private static void CopyTree(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
        foreach (var d in Directory.GetDirectories(from)) CopyTree(d, Path.Combine(to, Path.GetFileName(d)));
    }

    [Test]
    public void ReplacingASavedFolderKeepsOneCompleteCopyAtEveryInstantAndAKilledSaveRecovers()
    {
        using var dir = CliProcess.TempDir();
        string run = dir["run"], final = Path.Combine(run, "adapter");
        WriteCopy(final, "v1");
        string temp = OutputFolder.TempPathFor(final);
        Assert.That(Path.GetFileName(temp), Does.Match(@"^\.adapter\.[0-9a-f]{32}\.tmp$"));

        // The disk as a kill would leave it: while the new copy is half written, once it is complete, and after each rename.
        var snapshots = new List<(string Point, string Copy)>();
        void Snapshot(string point)
        {
            string copy = dir["kill-" + snapshots.Count];
            CopyTree(run, copy);
            snapshots.Add((point, copy));
        }
        Directory.CreateDirectory(temp);
        File.WriteAllText(Path.Combine(temp, "a.txt"), "v2");
        Snapshot("new copy half written");
        File.WriteAllText(Path.Combine(temp, "b.txt"), "v2");
        Snapshot("new copy complete");
        OutputFolder.ReplaceObserved(temp, final, step =>
        {
            // at this instant one complete copy exists under the name or its .old name
            var named = new[] { final }.Concat(Directory.GetDirectories(run, ".adapter.*.old")).Select(CompleteVersion).Where(v => v is not null).ToList();
            Assert.That(named, Is.Not.Empty, step);
            Snapshot(step);
        });
        Assert.That(snapshots.Select(s => s.Point), Is.EqualTo(new[] { "new copy half written", "new copy complete", "old moved away", "new moved in" }));
        Assert.That(CompleteVersion(final), Is.EqualTo("v2"));
        Assert.That(Directory.GetFileSystemEntries(run).Select(Path.GetFileName), Is.EqualTo(new[] { "adapter" }), "the old copy is deleted");

        // Each killed state: taking the lock recovers a complete copy under the name and leaves nothing else.
        string[] expected = ["v1", "v1", "v1", "v2"];
        for (int i = 0; i < snapshots.Count; i++)
        {
            var (point, copy) = snapshots[i];
            using (var l = OutputLock.Acquire(copy))
            {
                Assert.That(CompleteVersion(Path.Combine(copy, "adapter")), Is.EqualTo(expected[i]), point);
                Assert.That(Directory.GetFileSystemEntries(copy).Select(Path.GetFileName).Order(),
                    Is.EqualTo(new[] { OutputLock.FileName, "adapter" }.Order()), point);
                if (i < 3) Assert.That(l.Notes, Has.One.Contains("cleaned up after an interrupted run"), point);
                if (i == 2) Assert.That(l.Notes[0], Does.Contain("restored adapter"), point);
            }
        }
    }

    [Test]
    public void HasContentIgnoresTheLockAndTemporaryLeftoversButNotAReplacedCopy()
    {
        using var dir = CliProcess.TempDir();
        string folder = dir["out"];
        Assert.That(OutputFolder.HasContent(folder), Is.False, "missing");
        Directory.CreateDirectory(folder);
        File.WriteAllText(Path.Combine(folder, OutputLock.FileName), "");
        Directory.CreateDirectory(Path.Combine(folder, ".checkpoint-2.0123456789abcdef0123456789abcdef.tmp"));
        File.WriteAllText(Path.Combine(folder, ".metrics.json.0123456789abcdef0123456789abcdef.tmp"), "");
        Assert.That(OutputFolder.HasContent(folder), Is.False);
        Directory.CreateDirectory(Path.Combine(folder, ".adapter.0123456789abcdef0123456789abcdef.old"));
        Assert.That(OutputFolder.HasContent(folder), Is.True, "a copy renamed away by a killed save is a saved result");
    }

    [Test]
    public void AFailedWriteNamesThePathTheReasonAndTheFreeSpace()
    {
        using var dir = CliProcess.TempDir();
        var e = OutputFolder.WriteFailed(dir["out/checkpoint-4"], new IOException("No space left on device : '/x'"), dir["out/checkpoint-2"]);
        Assert.That(e.Message, Does.StartWith(dir["out/checkpoint-4"] + ": write failed (No space left on device : '/x'); "));
        Assert.That(e.Message, Does.Match(@"; \d+(\.\d+)? (B|KiB|MiB|GiB|TiB) \(\d+ bytes\) free there; kept the last good checkpoint .*checkpoint-2$"));
        Assert.That(e.Message, Does.Not.Contain("\n"));
    }
}
