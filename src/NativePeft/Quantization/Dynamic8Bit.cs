namespace NativePeft.Quantization;

/// <summary>
/// Blockwise 8-bit quantization with a 256-entry map (bitsandbytes kQuantizeBlockwise / kDequantizeBlockwise): used
/// for double-quantized absmax and the 8-bit optimizer states.
/// </summary>
public static class Dynamic8Bit
{
    /// <summary>
    /// bitsandbytes' dQuantize&lt;0&gt;: binary search over the sorted 256-value map (pivot 127, steps 64..1), then
    /// rounding to the nearer neighbour by the fp32 midpoint, with the kernel's exact comparisons.
    /// </summary>
    public static byte Encode(ReadOnlySpan<float> map, float x)
    {
        if (map.Length != 256)
            throw new ArgumentException($"map must have 256 entries, got {map.Length}", nameof(map));
        int pivot = 127;
        int upperPivot = 255;
        int lowerPivot = 0;
        float lower = -1.0f;
        float upper = 1.0f;
        float val = map[pivot];
        for (int i = 64; i > 0; i >>= 1)
        {
            if (x > val)
            {
                lowerPivot = pivot;
                lower = val;
                pivot += i;
            }
            else
            {
                upperPivot = pivot;
                upper = val;
                pivot -= i;
            }
            val = map[pivot];
        }
        if (upperPivot == 255)
            upper = map[upperPivot];
        if (lowerPivot == 0)
            lower = map[lowerPivot];

        if (x > val)
        {
            float midpoint = (upper + val) * 0.5f;
            return x > midpoint ? (byte)upperPivot : (byte)pivot;
        }
        else
        {
            float midpoint = (lower + val) * 0.5f;
            return x < midpoint ? (byte)lowerPivot : (byte)pivot;
        }
    }

    /// <summary>
    /// Quantizes <paramref name="values"/> in blocks: absmax[b] = max |x| of block b (fp32), q = Encode(map, x * (1/absmax)).
    /// A block whose absmax is 0 gets <paramref name="zeroIndex"/> for every value (the index of 0.0 in the map).
    /// </summary>
    public static void QuantizeBlockwise(ReadOnlySpan<float> values, ReadOnlySpan<float> map, int blocksize,
        Span<byte> quantized, Span<float> absmax, int zeroIndex)
    {
        if (blocksize <= 0) throw new ArgumentOutOfRangeException(nameof(blocksize), blocksize, "blocksize must be positive");
        int blocks = (values.Length + blocksize - 1) / blocksize;
        if (quantized.Length < values.Length) throw new ArgumentException("quantized is too short", nameof(quantized));
        if (absmax.Length < blocks) throw new ArgumentException("absmax is too short", nameof(absmax));
        for (int b = 0; b < blocks; b++)
        {
            int start = b * blocksize;
            int len = Math.Min(blocksize, values.Length - start);
            ReadOnlySpan<float> block = values.Slice(start, len);
            float m = 0f;
            foreach (float x in block)
                m = MathF.Max(m, MathF.Abs(x));
            absmax[b] = m;
            Span<byte> q = quantized.Slice(start, len);
            if (m == 0f)
            {
                q.Fill((byte)zeroIndex);
                continue;
            }
            float inv = 1.0f / m;
            for (int i = 0; i < len; i++)
                q[i] = Encode(map, block[i] * inv);
        }
    }

    /// <summary>out[i] = map[q[i]] * absmax[i / blocksize] (fp32).</summary>
    public static void DequantizeBlockwise(ReadOnlySpan<byte> quantized, ReadOnlySpan<float> map, ReadOnlySpan<float> absmax,
        int blocksize, Span<float> output)
    {
        if (blocksize <= 0) throw new ArgumentOutOfRangeException(nameof(blocksize), blocksize, "blocksize must be positive");
        if (output.Length < quantized.Length) throw new ArgumentException("output is too short", nameof(output));
        if (absmax.Length < (quantized.Length + blocksize - 1) / blocksize) throw new ArgumentException("absmax is too short", nameof(absmax));
        for (int i = 0; i < quantized.Length; i++)
            output[i] = map[quantized[i]] * absmax[i / blocksize];
    }
}
