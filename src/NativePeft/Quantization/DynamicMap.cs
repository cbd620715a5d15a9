namespace NativePeft.Quantization;

/// <summary>
/// bitsandbytes' dynamic 8-bit maps, create_dynamic_map(signed, max_exponent_bits: 7, total_bits: 8): 256 sorted
/// fp32 values. Signed: for i = 0..6 the midpoints of linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6), both signs, then
/// 0 and 1.0. Unsigned: midpoints of linspace(0.1, 1, 2^(i+1) + 1) scaled by 10^(i-6), then 0 and 1.0.
/// The construction reproduces torch's fp32 arithmetic (see <see cref="TorchLinspace"/>); a test checks every bit
/// against tests/NativePeft.Tests/Data/dynamic_map_*.f32 written by torch.
/// </summary>
public static class DynamicMap
{
    private static readonly float[] SignedMap = Create(signed: true);
    private static readonly float[] UnsignedMap = Create(signed: false);

    /// <summary>create_dynamic_map(signed=True): 256 values in [-0.99296875, 1.0]; 0.0 at index 127.</summary>
    public static ReadOnlySpan<float> Signed => SignedMap;

    /// <summary>create_dynamic_map(signed=False): 256 values in [0, 1.0].</summary>
    public static ReadOnlySpan<float> Unsigned => UnsignedMap;

    /// <summary>Index of 0.0 in the signed map.</summary>
    public const int SignedZeroIndex = 127;

    /// <summary>Builds the map; exposed so tests can compare it with the torch oracle.</summary>
    public static float[] Create(bool signed, int maxExponentBits = 7, int totalBits = 8)
    {
        var data = new List<float>(256);
        int nonSignBits = totalBits - 1; // bitsandbytes: total_bits - (1 if signed else 1)
        int additionalItems = (1 << (nonSignBits - maxExponentBits)) - 1;
        int lastI = 0;
        for (int i = 0; i < maxExponentBits; i++)
        {
            int fractionItems = signed
                ? (1 << (i + nonSignBits - maxExponentBits)) + 1
                : (1 << (i + nonSignBits - maxExponentBits + 1)) + 1;
            AddMeans(data, fractionItems, -(maxExponentBits - 1) + i, signed);
            lastI = i;
        }
        if (additionalItems > 0)
            AddMeans(data, additionalItems + 1, -(maxExponentBits - 1) + lastI, signed);
        data.Add(0f);
        data.Add(1.0f);
        if (data.Count != 1 << totalBits)
            throw new InvalidOperationException($"dynamic map has {data.Count} values, expected {1 << totalBits}");
        while (data.Count < 256)
            data.Add(0f);
        data.Sort();
        return data.ToArray();
    }

    private static void AddMeans(List<float> data, int items, int exponent, bool signed)
    {
        float[] boundaries = TorchLinspace(0.1f, 1.0f, items);
        // torch: fp32 tensor * python number → fp32 multiply by the scalar rounded to fp32.
        float scale = (float)Math.Pow(10, exponent);
        var means = new float[items - 1];
        for (int k = 0; k < means.Length; k++)
            means[k] = (boundaries[k] + boundaries[k + 1]) / 2.0f;
        foreach (float m in means)
            data.Add(exponent == 0 ? m : scale * m);
        if (signed)
        {
            foreach (float m in means)
                data.Add(-(exponent == 0 ? m : scale * m));
        }
    }

    /// <summary>
    /// torch.linspace(start, end, steps) in fp32 as torch's CPU kernel computes it (AVX2 build): step = (end - start) /
    /// (steps - 1); element i = fma(step, i, start) for i &lt; steps/2, else fma(-step, steps - 1 - i, end); in runs of
    /// 16 the kernel's vector path takes base = that value at the start of each 8-lane vector and adds lane·step
    /// (lane·step rounded, then added).
    /// </summary>
    internal static float[] TorchLinspace(float start, float end, int steps)
    {
        var r = new float[steps];
        if (steps == 1) { r[0] = start; return r; }
        float step = (end - start) / (steps - 1);
        int halfway = steps / 2;
        float Scalar(int i) => i < halfway
            ? MathF.FusedMultiplyAdd(step, i, start)
            : MathF.FusedMultiplyAdd(-step, steps - i - 1, end);
        int idx = 0;
        int vectorized = steps / 16 * 16;
        while (idx < vectorized)
        {
            float baseValue = Scalar(idx);
            for (int lane = 0; lane < 8; lane++)
                r[idx + lane] = baseValue + lane * step;
            idx += 8;
        }
        for (; idx < steps; idx++)
            r[idx] = Scalar(idx);
        return r;
    }
}
