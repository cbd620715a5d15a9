namespace NativePeft.IO;

/// <summary>A safetensors file that cannot be read or written; the message names the file and the tensor or field.</summary>
public sealed class SafetensorsException : Exception
{
    public string FilePath { get; }
    public string? Field { get; }

    public SafetensorsException(string filePath, string? field, string problem, Exception? inner = null)
        : base(field is null ? $"{filePath}: {problem}" : $"{filePath}: {field}: {problem}", inner)
    {
        FilePath = filePath;
        Field = field;
    }
}
