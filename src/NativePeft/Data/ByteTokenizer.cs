using System.Text;

namespace NativePeft.Data;

/// <summary>
/// The built-in model's tokenizer: one token per UTF-8 byte (id = byte value, 0..255) and three specials:
/// <see cref="Bos"/> = 256, <see cref="Eos"/> = 257, <see cref="Pad"/> = 258; <see cref="VocabSize"/> = 259.
/// Decoding drops the specials and turns invalid UTF-8 into U+FFFD (as <see cref="Encoding.UTF8"/> does).
/// </summary>
public sealed class ByteTokenizer : ITokenizer
{
    public const int Bos = 256;
    public const int Eos = 257;
    public const int Pad = 258;
    public const int Size = 259;

    public static ByteTokenizer Instance { get; } = new();

    public int VocabSize => Size;
    public int? BosId => Bos;
    public int? EosId => Eos;
    public int? PadId => Pad;

    public int[] Encode(string text, bool addBos)
    {
        ArgumentNullException.ThrowIfNull(text);
        int n = Encoding.UTF8.GetByteCount(text);
        int offset = addBos ? 1 : 0;
        var ids = new int[n + offset];
        if (addBos) ids[0] = Bos;
        byte[] bytes = Encoding.UTF8.GetBytes(text);
        for (int i = 0; i < bytes.Length; i++) ids[offset + i] = bytes[i];
        return ids;
    }

    public string Decode(ReadOnlySpan<int> ids)
    {
        var bytes = new List<byte>(ids.Length);
        foreach (int id in ids)
        {
            if ((uint)id < 256) bytes.Add((byte)id);
            else if (id >= Size || id < 0) throw new ArgumentOutOfRangeException(nameof(ids), $"id {id} is outside the byte vocabulary [0, {Size})");
        }
        return Encoding.UTF8.GetString(bytes.ToArray());
    }
}
