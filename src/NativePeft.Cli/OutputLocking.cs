using NativePeft.IO;

namespace NativePeft.Cli;

/// <summary>The commands' side of <see cref="OutputLock"/>: take the lock of --out and print what taking it cleaned up.</summary>
internal static class OutputLocking
{
    /// <summary>Locks the output folder (created if needed) for the command's run; its notes go to stdout as warnings.</summary>
    public static OutputLock Folder(string folder, TextWriter stdout) => Report(OutputLock.Acquire(folder), stdout);

    /// <summary>Locks an output file (its folder must exist).</summary>
    public static OutputLock File(string file, TextWriter stdout) => Report(OutputLock.AcquireForFile(file), stdout);

    private static OutputLock Report(OutputLock l, TextWriter stdout)
    {
        foreach (var note in l.Notes) stdout.WriteLine("warning: " + note);
        return l;
    }
}
