using System.Diagnostics;
using System.Globalization;
using System.Text;

namespace NativePeft.IO;

/// <summary>
/// An exclusive lock on an output folder (or on one output file) for the whole of a run: <c>train</c>, <c>compare</c>,
/// <c>merge</c>, <c>quantize</c>, <c>pretrain</c> and the <see cref="Training.FineTune"/> API take it before they write
/// anything, and release it when they are done (also on failure).
/// <para>
/// The lock is the file <c>&lt;folder&gt;/.nativepeft.lock</c> (for a file output: <c>.&lt;file name&gt;.nativepeft.lock</c>
/// next to it), created with <see cref="FileMode.CreateNew"/> (O_EXCL: one creator wins, in any process or tool) and
/// holding the owner's pid, host, command line and start time. The owner keeps it open with a shared flock
/// (<see cref="FileShare.Read"/>), so others can read who owns it; a contender that finds the file tries an exclusive
/// open: if that fails, the owner is alive. If it succeeds, the owner's pid decides: a pid on this host that is no longer
/// running (or now belongs to a process started after the lock) is a <b>stale lock</b>, which is reported
/// (<see cref="Notes"/>) and taken over; otherwise the folder is in use and <see cref="Acquire"/> throws an
/// <see cref="OutputFolderException"/> naming the owner. Creating the lock file is also the writability check: a folder
/// that cannot be written fails here, before the first step. After taking the lock, <see cref="OutputFolder.Recover"/>
/// cleans up what a killed run left. <see cref="Dispose"/> deletes the lock file and, when <see cref="Acquire"/> created
/// the folder and it is empty again, the folder.
/// </para>
/// </summary>
public sealed class OutputLock : IDisposable
{
    /// <summary>The lock file of a folder output.</summary>
    public const string FileName = ".nativepeft.lock";

    private FileStream? _stream;
    private readonly List<string> _notes = [];

    /// <summary>The locked folder (for a file output: the folder holding it).</summary>
    public string Folder { get; }
    /// <summary>The lock file.</summary>
    public string LockPath { get; }
    /// <summary>Whether <see cref="Acquire"/> created <see cref="Folder"/>.</summary>
    public bool CreatedFolder { get; }
    /// <summary>What taking the lock did besides: a stale lock removed, leftovers of a killed run cleaned up (one line each).</summary>
    public IReadOnlyList<string> Notes => _notes;

    private OutputLock(string folder, string lockPath, bool created)
    {
        Folder = folder;
        LockPath = lockPath;
        CreatedFolder = created;
    }

    /// <summary>
    /// Creates <paramref name="folder"/> if needed, takes its lock and cleans up a killed run's leftovers in it. Throws an
    /// <see cref="OutputFolderException"/> when the folder is a file, cannot be created or written, or is in use.
    /// </summary>
    public static OutputLock Acquire(string folder)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(folder);
        string full = Path.GetFullPath(folder).TrimEnd(Path.DirectorySeparatorChar);
        if (File.Exists(full)) throw new OutputFolderException(full, "is a file; the output must be a folder");
        bool created = !Directory.Exists(full);
        try { Directory.CreateDirectory(full); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw OutputFolder.NotWritable(full, e);
        }
        var l = new OutputLock(full, Path.Combine(full, FileName), created);
        try
        {
            l.Take();
            if (OutputFolder.Recover(full) is { } note) l._notes.Add(note);
            return l;
        }
        catch (Exception e)
        {
            l.Dispose();
            if (e is IOException or UnauthorizedAccessException) throw OutputFolder.NotWritable(full, e);
            throw;
        }
    }

    /// <summary>
    /// Takes the lock of the output file <paramref name="file"/> (its folder must exist): <c>.&lt;name&gt;.nativepeft.lock</c>
    /// next to it, and cleans up the temporary files a killed run left for it.
    /// </summary>
    public static OutputLock AcquireForFile(string file)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(file);
        string full = Path.GetFullPath(file);
        string dir = Path.GetDirectoryName(full)!;
        string name = Path.GetFileName(full);
        if (!Directory.Exists(dir)) throw new OutputFolderException(dir, "folder not found");
        if (Directory.Exists(full)) throw new OutputFolderException(full, "is a folder; the output must be a file");
        var l = new OutputLock(dir, Path.Combine(dir, $".{name}.nativepeft.lock"), false);
        try
        {
            l.Take();
            if (OutputFolder.Recover(dir, only: name) is { } note) l._notes.Add(note);
            return l;
        }
        catch (Exception e)
        {
            l.Dispose();
            if (e is IOException or UnauthorizedAccessException) throw OutputFolder.NotWritable(dir, e);
            throw;
        }
    }

    private void Take()
    {
        for (int attempt = 0; attempt < 3; attempt++)
        {
            try
            {
                OutputFolder.BeforeWrite(LockPath);
                var stream = new FileStream(LockPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.Read | FileShare.Delete);
                try
                {
                    stream.Write(Encoding.UTF8.GetBytes(Owner.Current().Text()));
                    stream.Flush(flushToDisk: true);
                }
                catch
                {
                    stream.Dispose();
                    OutputFolder.TryDelete(LockPath);
                    throw;
                }
                _stream = stream;
                return;
            }
            catch (IOException) when (File.Exists(LockPath))
            {
                if (Inspect() is { } held) throw held;
                // stale: removed; try again
            }
        }
        throw new OutputFolderException(Folder, $"could not take the lock {LockPath} (another run keeps taking it)");
    }

    /// <summary>Looks at an existing lock file: null when it was stale (and is now removed), else the error to throw.</summary>
    private OutputFolderException? Inspect()
    {
        FileStream probe;
        try
        {
            // An exclusive flock fails while a live owner holds its shared one.
            probe = new FileStream(LockPath, FileMode.Open, FileAccess.ReadWrite, FileShare.None);
        }
        catch (FileNotFoundException) { return null; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return InUse(ReadOwner());
        }
        using (probe)
        {
            Owner? owner;
            using (var reader = new StreamReader(probe, Encoding.UTF8, false, 1024, leaveOpen: true)) owner = Owner.Parse(reader.ReadToEnd());
            bool stale = owner is null
                // an empty or unreadable lock file: stale unless it is being written right now
                ? DateTime.UtcNow - File.GetLastWriteTimeUtc(LockPath) > TimeSpan.FromSeconds(10)
                : owner.Host == Environment.MachineName && !owner.IsAlive();
            if (!stale) return InUse(owner);
            File.Delete(LockPath);
            _notes.Add(owner is null
                ? $"{Folder}: removed a stale, unreadable lock file {LockPath}"
                : $"{Folder}: removed a stale lock of pid {owner.Pid} ({owner.Command}) from {owner.StartedText} (that process is gone)");
            return null;
        }
    }

    private Owner? ReadOwner()
    {
        try
        {
            using var fs = new FileStream(LockPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var reader = new StreamReader(fs, Encoding.UTF8);
            return Owner.Parse(reader.ReadToEnd());
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return null; }
    }

    private OutputFolderException InUse(Owner? owner) => new(Folder, owner is null
        ? $"in use by another run (lock file {LockPath}); wait for it to finish or choose another output"
        : $"in use by another run: pid {owner.Pid} on {owner.Host} ({owner.Command}), started {owner.StartedText}; " +
          $"wait for it to finish or choose another output" +
          (owner.Host == Environment.MachineName ? "" : $" (if no such run is active on {owner.Host}, delete {LockPath})"));

    /// <summary>Deletes everything in the locked folder but the lock file (a failed run removing what it wrote).</summary>
    public void RemoveContents()
    {
        foreach (var entry in new DirectoryInfo(Folder).EnumerateFileSystemInfos())
        {
            if (entry.FullName == LockPath) continue;
            try
            {
                if (entry is DirectoryInfo d) d.Delete(recursive: true);
                else entry.Delete();
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
    }

    /// <summary>Deletes the lock file (then closes it), and the folder when <see cref="Acquire"/> created it and it is empty.</summary>
    public void Dispose()
    {
        if (_stream is { } s)
        {
            _stream = null;
            // Delete first: a contender must never find our file without our flock on it.
            OutputFolder.TryDelete(LockPath);
            s.Dispose();
        }
        if (CreatedFolder)
        {
            try
            {
                if (Directory.Exists(Folder) && !Directory.EnumerateFileSystemEntries(Folder).Any()) Directory.Delete(Folder);
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
    }

    /// <summary>The lock file's content: key=value lines.</summary>
    internal sealed record Owner(int Pid, string Host, string Command, DateTime Started)
    {
        public string StartedText => Started.ToString("yyyy-MM-dd HH:mm:ss 'UTC'", CultureInfo.InvariantCulture);

        public static Owner Current()
        {
            using var self = Process.GetCurrentProcess();
            string command = string.Join(' ', Environment.GetCommandLineArgs().Select(a => a.Contains(' ') ? $"\"{a}\"" : a));
            if (command.Length > 300) command = command[..300] + "…";
            return new Owner(Environment.ProcessId, Environment.MachineName, command, self.StartTime.ToUniversalTime());
        }

        public string Text() => string.Create(CultureInfo.InvariantCulture,
            $"pid={Pid}\nhost={Host}\ncommand={Command.Replace('\n', ' ')}\nstarted={Started:O}\n");

        public static Owner? Parse(string text)
        {
            var values = text.Split('\n').Select(l => l.Split('=', 2)).Where(p => p.Length == 2).ToDictionary(p => p[0].Trim(), p => p[1].Trim());
            if (!values.TryGetValue("pid", out var pidText) || !int.TryParse(pidText, NumberStyles.None, CultureInfo.InvariantCulture, out int pid)) return null;
            if (!values.TryGetValue("started", out var startedText) || !DateTime.TryParse(startedText, CultureInfo.InvariantCulture,
                    DateTimeStyles.AdjustToUniversal | DateTimeStyles.AssumeUniversal, out var started)) return null;
            return new Owner(pid, values.GetValueOrDefault("host") ?? "", values.GetValueOrDefault("command") ?? "?", started);
        }

        /// <summary>Whether the pid runs and is the process that took the lock (not a later one that reuses the pid).</summary>
        public bool IsAlive()
        {
            try
            {
                using var p = Process.GetProcessById(Pid);
                if (p.HasExited) return false;
                return p.StartTime.ToUniversalTime() <= Started.AddSeconds(1);
            }
            catch (ArgumentException) { return false; }
            catch (InvalidOperationException) { return false; }
            catch (System.ComponentModel.Win32Exception) { return true; } // not ours to inspect: assume alive
        }
    }
}
