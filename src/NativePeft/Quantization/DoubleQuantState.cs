namespace NativePeft.Quantization;

/// <summary>
/// Double-quantized absmax ("compress_statistics"): absmax − offset quantized to 8 bits with the signed dynamic map in
/// nested blocks of <see cref="NestedBlockSize"/>, as bitsandbytes stores it (weight.absmax as uint8,
/// weight.nested_absmax, weight.nested_quant_map, nested_offset).
/// </summary>
public sealed record DoubleQuantState
{
    public const int DefaultNestedBlockSize = 256;

    /// <summary>One 8-bit code per absmax entry.</summary>
    public required byte[] QuantizedAbsmax { get; init; }
    /// <summary>fp32, one per nested block: max |absmax − offset| of the block.</summary>
    public required float[] NestedAbsmax { get; init; }
    /// <summary>mean(absmax) as (float)(sum in double / count).</summary>
    public required float Offset { get; init; }
    public int NestedBlockSize { get; init; } = DefaultNestedBlockSize;
    /// <summary>The 256-entry map the codes index (the signed dynamic map when we quantize; as read from a file otherwise).</summary>
    public required float[] NestedQuantMap { get; init; }

    /// <summary>Number of absmax values this state encodes.</summary>
    public int Count => QuantizedAbsmax.Length;

    /// <summary>Quantizes fp32 absmax per the contract (offset on the host, nested blocks of 256, dQuantize&lt;0&gt;).</summary>
    public static DoubleQuantState Quantize(ReadOnlySpan<float> absmax)
    {
        double sum = 0;
        foreach (float a in absmax)
            sum += a;
        float offset = absmax.Length == 0 ? 0f : (float)(sum / absmax.Length);
        var centered = new float[absmax.Length];
        for (int i = 0; i < centered.Length; i++)
            centered[i] = absmax[i] - offset;
        int nestedBlocks = (absmax.Length + DefaultNestedBlockSize - 1) / DefaultNestedBlockSize;
        var q = new byte[absmax.Length];
        var nested = new float[nestedBlocks];
        Dynamic8Bit.QuantizeBlockwise(centered, DynamicMap.Signed, DefaultNestedBlockSize, q, nested, DynamicMap.SignedZeroIndex);
        return new DoubleQuantState
        {
            QuantizedAbsmax = q,
            NestedAbsmax = nested,
            Offset = offset,
            NestedBlockSize = DefaultNestedBlockSize,
            NestedQuantMap = DynamicMap.Signed.ToArray(),
        };
    }

    /// <summary>absmax[i] = map[q[i]] * nested_absmax[i / nested_blocksize] + offset (fp32 multiply, then add).</summary>
    public void Decode(Span<float> absmax)
    {
        if (absmax.Length != QuantizedAbsmax.Length)
            throw new ArgumentException($"absmax has {absmax.Length} entries, the state encodes {QuantizedAbsmax.Length}", nameof(absmax));
        Validate();
        Decode(QuantizedAbsmax, NestedAbsmax, NestedQuantMap, Offset, NestedBlockSize, 0, absmax);
    }

    /// <summary>
    /// absmax[i] = map[q[firstBlock + i]] * nested[(firstBlock + i) / nestedBlockSize] + offset for i in
    /// [0, absmax.Length) (fp32 multiply, then add): a range of blocks of a state held elsewhere (a device tensor).
    /// </summary>
    public static void Decode(ReadOnlySpan<byte> q, ReadOnlySpan<float> nested, ReadOnlySpan<float> map, float offset,
        int nestedBlockSize, long firstBlock, Span<float> absmax)
    {
        for (int i = 0; i < absmax.Length; i++)
        {
            long b = firstBlock + i;
            float scaled = map[q[checked((int)b)]] * nested[checked((int)(b / nestedBlockSize))];
            absmax[i] = scaled + offset;
        }
    }

    public float[] Decode()
    {
        var r = new float[QuantizedAbsmax.Length];
        Decode(r);
        return r;
    }

    /// <summary>Checks the array sizes agree with each other.</summary>
    public void Validate()
    {
        if (NestedBlockSize <= 0)
            throw new ArgumentException($"nested blocksize must be positive, got {NestedBlockSize}");
        if (NestedQuantMap.Length != 256)
            throw new ArgumentException($"nested_quant_map must have 256 entries, got {NestedQuantMap.Length}");
        long expected = (QuantizedAbsmax.LongLength + NestedBlockSize - 1) / NestedBlockSize;
        if (NestedAbsmax.LongLength != expected)
            throw new ArgumentException($"nested_absmax must have {expected} entries for {QuantizedAbsmax.Length} absmax values and nested blocksize {NestedBlockSize}, got {NestedAbsmax.Length}");
    }
}
