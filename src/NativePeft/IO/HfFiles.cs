namespace NativePeft.IO;

/// <summary>File helpers shared by the HF checkpoint reader and writer.</summary>
internal static class HfFiles
{
    /// <summary>A shard file name as transformers writes it: model-00001-of-00003.safetensors.</summary>
    public static string ShardName(int index, int count) => $"model-{index:D5}-of-{count:D5}.safetensors";

    /// <summary>Whether <paramref name="name"/> is a plain file name (no directory part, not "." or "..").</summary>
    public static bool IsPlainFileName(string name) =>
        name.Length > 0 && name != "." && name != ".." && name.IndexOfAny(['/', '\\', '\0']) < 0;

    public static string Shape(long[] shape) => "[" + string.Join(", ", shape) + "]";
}
