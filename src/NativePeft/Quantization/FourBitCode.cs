namespace NativePeft.Quantization;

/// <summary>
/// The NF4 and FP4 code tables and quantization thresholds (fp32 literals from bitsandbytes, see docs/quant-contract.md).
/// </summary>
public static class FourBitCode
{
    /// <summary>NF4 value of each code 0..15 (dequantization: code[nibble] * absmax).</summary>
    public static ReadOnlySpan<float> Nf4 =>
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    ];

    /// <summary>NF4 thresholds (midpoints); code = number of thresholds t with v &gt; t.</summary>
    public static ReadOnlySpan<float> Nf4Thresholds =>
    [
        -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
        -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
        0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
        0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f,
    ];

    /// <summary>FP4 value of each nibble 0..15 (bit 3 = sign), as bitsandbytes' dDequantizeFP4Tree returns it.</summary>
    public static ReadOnlySpan<float> Fp4 =>
    [
        0.0f, 0.0052083333f, 0.6666667f, 1.0f, 0.33333333f, 0.5f, 0.16666667f, 0.25f,
        -0.0f, -0.0052083333f, -0.6666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f,
    ];

    /// <summary>FP4 magnitude thresholds on |v|, ascending (bitsandbytes' dQuantizeFP4 tree).</summary>
    public static ReadOnlySpan<float> Fp4Thresholds =>
        [0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f];

    /// <summary>FP4 magnitude bits (low 3 bits of the nibble) by the number of thresholds |v| exceeds (0..7).</summary>
    public static ReadOnlySpan<byte> Fp4MagnitudeByRank => [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

    /// <summary>The code table used to dequantize.</summary>
    public static ReadOnlySpan<float> Code(QuantType quantType) => quantType switch
    {
        QuantType.Nf4 => Nf4,
        QuantType.Fp4 => Fp4,
        _ => throw new ArgumentOutOfRangeException(nameof(quantType), quantType, "unknown quant_type"),
    };

    /// <summary>
    /// The quant_map bitsandbytes stores in checkpoints (get_4bit_type): NF4 = the NF4 table; FP4 =
    /// [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, …, -3] / 12 in fp32. Python's "-0" is the integer 0, so
    /// entry 8 is +0.0.
    /// </summary>
    public static float[] QuantMap(QuantType quantType)
    {
        if (quantType == QuantType.Nf4)
            return Nf4.ToArray();
        if (quantType != QuantType.Fp4)
            throw new ArgumentOutOfRangeException(nameof(quantType), quantType, "unknown quant_type");
        ReadOnlySpan<float> raw = [0f, 0.0625f, 8f, 12f, 4f, 6f, 2f, 3f, 0f, -0.0625f, -8f, -12f, -4f, -6f, -2f, -3f];
        var map = new float[16];
        for (int i = 0; i < 16; i++)
            map[i] = raw[i] / 12f;
        return map;
    }

    /// <summary>NF4 code of a normalized value v = x * (1/absmax): the number of thresholds with v &gt; t.</summary>
    public static byte QuantizeNf4(float v)
    {
        ReadOnlySpan<float> t = Nf4Thresholds;
        int c = 0;
        for (int i = 0; i < t.Length; i++)
            c += v > t[i] ? 1 : 0;
        return (byte)c;
    }

    /// <summary>FP4 nibble of a normalized value: sign bit (v &lt; 0) | magnitude bits of |v|.</summary>
    public static byte QuantizeFp4(float v)
    {
        int sign = v < 0f ? 8 : 0;
        float a = MathF.Abs(v);
        ReadOnlySpan<float> t = Fp4Thresholds;
        int rank = 0;
        for (int i = 0; i < t.Length; i++)
            rank += a > t[i] ? 1 : 0;
        return (byte)(sign | Fp4MagnitudeByRank[rank]);
    }

    /// <summary>The nibble that 0.0f quantizes to (NF4 → 7, FP4 → 0).</summary>
    public static byte ZeroCode(QuantType quantType) => quantType == QuantType.Nf4 ? (byte)7 : (byte)0;
}
