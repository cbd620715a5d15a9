using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using NativePeft.Planning;

namespace NativePeft.IO;

/// <summary>
/// A problem with an output folder or file: held by another run (<see cref="OutputLock"/>), not writable before the first
/// step, or a write that failed mid-run (disk full, permission, I/O error). The message starts with the path and, for a
/// failed write, says how much space is free there.
/// </summary>
public sealed class OutputFolderException(string path, string detail, Exception? inner = null) : Exception($"{path}: {detail}", inner)
{
    /// <summary>The folder or file concerned.</summary>
    public string Path { get; } = path;
    /// <summary>What is wrong, without the path.</summary>
    public string Detail { get; } = detail;
}

/// <summary>
/// How every writer of output folders and files writes (docs/design.md, "Output folders"):
/// <list type="bullet">
/// <item>a file is written to a hidden temporary name next to it (<see cref="TempPathFor"/>: <c>.&lt;name&gt;.&lt;32 hex&gt;.tmp</c>),
/// flushed and renamed over the path (<see cref="WriteAllTextAtomic"/>, <see cref="SafetensorsWriter"/>);</item>
/// <item>a folder is built under such a temporary name and put in place by <see cref="Replace"/>: the old copy is renamed
/// away (<c>.&lt;name&gt;.&lt;32 hex&gt;.old</c>), the new one renamed in, then the old one deleted, so at every instant one
/// complete copy exists under the name or its <c>.old</c> name;</item>
/// <item>what a killed run leaves (those two patterns only) is cleaned up by <see cref="Recover"/> when the next run takes
/// the folder's <see cref="OutputLock"/>: a <c>.old</c> copy whose folder is missing is renamed back, everything else removed;</item>
/// <item>a write that fails becomes an <see cref="OutputFolderException"/> naming the path and the free space
/// (<see cref="WriteFailed"/>).</item>
/// </list>
/// </summary>
public static partial class OutputFolder
{
    [GeneratedRegex(@"^\.(?<name>.+)\.(?<id>[0-9a-f]{32})\.(?<kind>tmp|old)$")]
    private static partial Regex LeftoverName();

    /// <summary>The temporary name a file or folder is written under before it is renamed to <paramref name="path"/>.</summary>
    public static string TempPathFor(string path) => Sibling(path, "tmp");

    /// <summary>The name an existing folder is renamed to while <see cref="Replace"/> puts its new copy in place.</summary>
    internal static string OldPathFor(string path) => Sibling(path, "old");

    private static string Sibling(string path, string kind)
    {
        string full = Path.GetFullPath(path).TrimEnd(Path.DirectorySeparatorChar);
        return Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.{kind}");
    }

    /// <summary>Whether <paramref name="name"/> (a file or folder name) is one of our temporary (.tmp) or replaced (.old) names.</summary>
    public static bool IsLeftover(string name) => LeftoverName().IsMatch(name);

    /// <summary>
    /// Whether <paramref name="folder"/> holds anything of a run: any entry but the lock file and temporary (.tmp) leftovers
    /// of a killed run (which <see cref="Recover"/> removes). A missing folder holds nothing.
    /// </summary>
    public static bool HasContent(string folder)
    {
        try
        {
            return Directory.Exists(folder) && Directory.EnumerateFileSystemEntries(folder).Select(Path.GetFileName).Any(n =>
                n != OutputLock.FileName && !(LeftoverName().Match(n!) is { Success: true } m && m.Groups["kind"].Value == "tmp"));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new OutputFolderException(Path.GetFullPath(folder), $"cannot read the output folder ({Reason(e)})", e);
        }
    }

    /// <summary>
    /// Cleans up what a killed run left in <paramref name="folder"/> (top level only, our own names only; call it while
    /// holding the folder's lock): a <c>.X.&lt;id&gt;.old</c> copy whose X is missing (killed between the two renames of
    /// <see cref="Replace"/>) is renamed back to X; other <c>.old</c> copies and every <c>.tmp</c> file or folder are
    /// deleted. <paramref name="only"/> limits it to leftovers of that one name. Returns one line describing what it did,
    /// or null when there was nothing.
    /// </summary>
    public static string? Recover(string folder, string? only = null)
    {
        if (!Directory.Exists(folder)) return null;
        var restored = new List<string>();
        var removed = new List<string>();
        var leftovers = Directory.EnumerateFileSystemEntries(folder)
            .Select(p => (Path: p, Match: LeftoverName().Match(Path.GetFileName(p))))
            .Where(x => x.Match.Success && (only is null || x.Match.Groups["name"].Value == only))
            // the newest .old first: it is the copy to restore when several were left
            .OrderBy(x => x.Match.Groups["kind"].Value == "old" ? 0 : 1).ThenByDescending(x => Directory.GetLastWriteTimeUtc(x.Path))
            .ToList();
        foreach (var (path, match) in leftovers)
        {
            string final = Path.Combine(folder, match.Groups["name"].Value);
            string name = Path.GetFileName(path);
            if (match.Groups["kind"].Value == "old" && Directory.Exists(path) && !Directory.Exists(final) && !File.Exists(final))
            {
                Directory.Move(path, final);
                restored.Add($"{match.Groups["name"].Value} (from {name})");
            }
            else
            {
                if (Directory.Exists(path)) Directory.Delete(path, recursive: true);
                else File.Delete(path);
                removed.Add(name);
            }
        }
        if (restored.Count == 0 && removed.Count == 0) return null;
        var parts = new List<string>();
        if (restored.Count > 0) parts.Add("restored " + string.Join(", ", restored));
        if (removed.Count > 0) parts.Add($"removed {removed.Count} temporary file(s)/folder(s): {string.Join(", ", removed)}");
        return $"{folder}: cleaned up after an interrupted run: {string.Join("; ", parts)}";
    }

    /// <summary>
    /// Puts the complete folder <paramref name="temp"/> in place as <paramref name="final"/>. When <paramref name="final"/>
    /// exists: rename it away (<see cref="OldPathFor"/>), rename <paramref name="temp"/> in, delete the old copy — at every
    /// instant one complete copy exists under <paramref name="final"/> or its .old name (which <see cref="Recover"/>
    /// restores). If the second rename fails, the old copy is renamed back before the exception propagates.
    /// </summary>
    public static void Replace(string temp, string final) => ReplaceObserved(temp, final, null);

    /// <param name="afterStep">Test hook: called after each rename ("old moved away", "new moved in").</param>
    internal static void ReplaceObserved(string temp, string final, Action<string>? afterStep)
    {
        ArgumentNullException.ThrowIfNull(temp);
        ArgumentNullException.ThrowIfNull(final);
        if (!Directory.Exists(final))
        {
            Directory.Move(temp, final);
            afterStep?.Invoke("new moved in");
            return;
        }
        string old = OldPathFor(final);
        Directory.Move(final, old);
        afterStep?.Invoke("old moved away");
        try { Directory.Move(temp, final); }
        catch
        {
            try { Directory.Move(old, final); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
        afterStep?.Invoke("new moved in");
        // A failure here leaves the .old copy next to the new one; the next run's Recover deletes it.
        try { Directory.Delete(old, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    /// <summary>Writes UTF-8 text (no BOM) to a temporary file, flushes it to disk and renames it over <paramref name="path"/>.</summary>
    public static void WriteAllTextAtomic(string path, string text) => WriteAllBytesAtomic(path, new UTF8Encoding(false).GetBytes(text));

    /// <summary>Writes the bytes to a temporary file, flushes it to disk and renames it over <paramref name="path"/>; on
    /// any error the temporary file is removed and the exception propagates.</summary>
    public static void WriteAllBytesAtomic(string path, ReadOnlySpan<byte> bytes)
    {
        string temp = TempPathFor(path);
        try
        {
            BeforeWrite(temp);
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                fs.Write(bytes);
                fs.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    internal static void TryDelete(string path)
    {
        try { File.Delete(path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    /// <summary>
    /// Creates <paramref name="folder"/> if needed and proves it writable by creating and deleting a small temporary file;
    /// throws an <see cref="OutputFolderException"/> naming the folder and the free space otherwise.
    /// </summary>
    public static void CheckWritable(string folder)
    {
        string full = Path.GetFullPath(folder);
        string probe = TempPathFor(Path.Combine(full, "nativepeft-probe"));
        try
        {
            Directory.CreateDirectory(full);
            BeforeWrite(probe);
            using (new FileStream(probe, FileMode.CreateNew, FileAccess.Write, FileShare.None)) { }
            File.Delete(probe);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TryDelete(probe);
            throw NotWritable(full, e);
        }
    }

    /// <summary>The error for an output folder that cannot be created or written before the run starts.</summary>
    internal static OutputFolderException NotWritable(string folder, Exception e) =>
        new(folder, $"cannot write to the output folder ({Reason(e)}); {FreeText(folder)}", e);

    /// <summary>
    /// The error for a write that failed mid-run: the path, the reason, the free space there, and the last good output that
    /// is kept (or that there is none).
    /// </summary>
    public static OutputFolderException WriteFailed(string path, Exception e, string? kept = null, bool mentionKept = false) =>
        new(path, $"write failed ({Reason(e)}); {FreeText(path)}" +
            (kept is not null ? $"; kept the last good checkpoint {kept}" : mentionKept ? "; no checkpoint was saved before" : ""), e);

    /// <summary>Whether <paramref name="e"/> is (or wraps) a failed file-system operation rather than a bug or bad data.</summary>
    public static bool IsWriteFailure(Exception e) => Innermost(e) is IOException or UnauthorizedAccessException;

    private static Exception Innermost(Exception e)
    {
        while (e.InnerException is { } inner && e is not (IOException or UnauthorizedAccessException)) e = inner;
        return e;
    }

    private static string Reason(Exception e)
    {
        string message = Innermost(e).Message;
        // The OS message often repeats the path ("Access to the path '/x' is denied."); keep it, it says which file.
        return message.TrimEnd('.');
    }

    private static string FreeText(string path) => FreeBytes(path) is long free
        ? $"{MemoryPlan.FormatBytes(free)} ({free.ToString(CultureInfo.InvariantCulture)} bytes) free there"
        : "free space unknown";

    /// <summary>Bytes available to this user on the file system holding <paramref name="path"/> (its nearest existing
    /// ancestor), or null when that cannot be told.</summary>
    public static long? FreeBytes(string path)
    {
        try
        {
            string? dir = Path.GetFullPath(path);
            while (dir is not null && !Directory.Exists(dir)) dir = Path.GetDirectoryName(dir);
            if (dir is null) return null;
            return new DriveInfo(dir).AvailableFreeSpace;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            return null;
        }
    }

    // ------------------------------------------------------------------------------------------ fault injection (tests)

    private static readonly AsyncLocal<Func<string, Exception?>?> Fault = new();

    /// <summary>
    /// Test seam: until the returned scope is disposed, every output write of this async flow (the lock file, the
    /// writability probe, <see cref="WriteAllTextAtomic"/>, <see cref="SafetensorsWriter.Write"/>) first asks
    /// <paramref name="fault"/> with the path it is about to create, and throws the exception it returns. Used to
    /// simulate a full disk or a read-only folder where chmod cannot (root).
    /// </summary>
    internal static IDisposable InjectFault(Func<string, Exception?> fault)
    {
        var previous = Fault.Value;
        Fault.Value = fault;
        return new Scope(() => Fault.Value = previous);
    }

    internal static void BeforeWrite(string path)
    {
        if (Fault.Value?.Invoke(path) is { } e) throw e;
    }

    private sealed class Scope(Action onDispose) : IDisposable
    {
        public void Dispose() => onDispose();
    }
}
