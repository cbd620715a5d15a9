using System.Runtime.InteropServices;

namespace NativePeft.Numerics;

/// <summary>
/// bfloat16: the upper 16 bits of an IEEE fp32 (1 sign, 8 exponent, 7 mantissa bits).
/// float → bf16 rounds to nearest, ties to even, and keeps NaN a (quiet) NaN; bf16 → float is exact.
/// (.NET 10 has no public System.Numerics.BFloat16, hence this type.)
/// </summary>
[StructLayout(LayoutKind.Sequential, Size = 2)]
public readonly struct BFloat16 : IEquatable<BFloat16>, IComparable<BFloat16>
{
    private readonly ushort _bits;

    private BFloat16(ushort bits) => _bits = bits;

    /// <summary>The raw 16-bit pattern.</summary>
    public ushort RawValue => _bits;

    public static BFloat16 FromBits(ushort bits) => new(bits);

    public static BFloat16 Zero => new(0);
    public static BFloat16 One => new(0x3F80);

    public bool IsNaN => (_bits & 0x7FFF) > 0x7F80;

    /// <summary>Round-to-nearest-even of the fp32 bits; NaN stays NaN with the quiet bit set.</summary>
    public static BFloat16 FromSingle(float value) => new(RoundToBits(value));

    /// <summary>Exact widening to fp32.</summary>
    public float ToSingle() => BitConverter.UInt32BitsToSingle((uint)_bits << 16);

    internal static ushort RoundToBits(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        if ((bits & 0x7FFF_FFFFu) > 0x7F80_0000u)
            return (ushort)((bits >> 16) | 0x0040u); // NaN: keep sign and payload top bits, force quiet
        uint lsb = (bits >> 16) & 1u;
        return (ushort)((bits + 0x7FFFu + lsb) >> 16);
    }

    public static explicit operator BFloat16(float value) => FromSingle(value);
    public static explicit operator BFloat16(double value) => FromSingle((float)value);
    public static explicit operator float(BFloat16 value) => value.ToSingle();
    public static explicit operator double(BFloat16 value) => value.ToSingle();

    /// <summary>Converts a span of bf16 to fp32 (exact).</summary>
    public static void ToSingle(ReadOnlySpan<BFloat16> source, Span<float> destination)
    {
        if (destination.Length < source.Length)
            throw new ArgumentException("destination is shorter than source", nameof(destination));
        ReadOnlySpan<ushort> src = MemoryMarshal.Cast<BFloat16, ushort>(source);
        Span<uint> dst = MemoryMarshal.Cast<float, uint>(destination);
        for (int i = 0; i < src.Length; i++)
            dst[i] = (uint)src[i] << 16;
    }

    /// <summary>Converts a span of fp32 to bf16 with round-to-nearest-even.</summary>
    public static void FromSingle(ReadOnlySpan<float> source, Span<BFloat16> destination)
    {
        if (destination.Length < source.Length)
            throw new ArgumentException("destination is shorter than source", nameof(destination));
        Span<ushort> dst = MemoryMarshal.Cast<BFloat16, ushort>(destination);
        for (int i = 0; i < source.Length; i++)
            dst[i] = RoundToBits(source[i]);
    }

    public bool Equals(BFloat16 other) => ToSingle().Equals(other.ToSingle());
    public override bool Equals(object? obj) => obj is BFloat16 other && Equals(other);
    public override int GetHashCode() => ToSingle().GetHashCode();
    public int CompareTo(BFloat16 other) => ToSingle().CompareTo(other.ToSingle());
    public static bool operator ==(BFloat16 a, BFloat16 b) => a.ToSingle() == b.ToSingle();
    public static bool operator !=(BFloat16 a, BFloat16 b) => a.ToSingle() != b.ToSingle();
    public override string ToString() => ToSingle().ToString(System.Globalization.CultureInfo.InvariantCulture);
}
