using System.Text;

namespace NativePeft.IO;

/// <summary>File helpers shared by the HF checkpoint reader and writer.</summary>
internal static class HfFiles
{
    /// <summary>A temporary name next to <paramref name="path"/> (hidden, unique), for write-then-rename.</summary>
    public static string TempNameFor(string path) =>
        Path.Combine(Path.GetDirectoryName(path)!, $".{Path.GetFileName(path)}.{Guid.NewGuid():N}.tmp");

    /// <summary>Writes UTF-8 text (no BOM) to a temporary file, flushes it to disk and renames it over <paramref name="path"/>.</summary>
    public static void WriteAllTextAtomic(string path, string text)
    {
        string temp = TempNameFor(path);
        try
        {
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                fs.Write(new UTF8Encoding(false).GetBytes(text));
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

    public static void TryDelete(string path)
    {
        try { File.Delete(path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    /// <summary>A shard file name as transformers writes it: model-00001-of-00003.safetensors.</summary>
    public static string ShardName(int index, int count) => $"model-{index:D5}-of-{count:D5}.safetensors";

    /// <summary>Whether <paramref name="name"/> is a plain file name (no directory part, not "." or "..").</summary>
    public static bool IsPlainFileName(string name) =>
        name.Length > 0 && name != "." && name != ".." && name.IndexOfAny(['/', '\\', '\0']) < 0;

    public static string Shape(long[] shape) => "[" + string.Join(", ", shape) + "]";
}
