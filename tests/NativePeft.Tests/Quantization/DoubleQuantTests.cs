using NativePeft.Numerics;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Quantization;

public class DoubleQuantTests
{
    private static float[] ReadOracle(string name)
    {
        string path = Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", name);
        byte[] bytes = File.ReadAllBytes(path);
        Assert.That(bytes.Length, Is.EqualTo(256 * 4), path);
        var r = new float[256];
        for (int i = 0; i < 256; i++)
            r[i] = BitConverter.ToSingle(bytes, 4 * i); // little-endian host
        return r;
    }

    [Test]
    public void SignedDynamicMapMatchesTorchBitForBit()
    {
        float[] oracle = ReadOracle("dynamic_map_signed.f32");
        ReadOnlySpan<float> ours = DynamicMap.Signed;
        for (int i = 0; i < 256; i++)
            Assert.That(BitConverter.SingleToUInt32Bits(ours[i]), Is.EqualTo(BitConverter.SingleToUInt32Bits(oracle[i])), $"index {i}: {ours[i]:R} vs {oracle[i]:R}");
        Assert.That(ours[DynamicMap.SignedZeroIndex], Is.EqualTo(0f));
        Assert.That(ours[0], Is.EqualTo(-0.99296875f).Within(1e-7f));
        Assert.That(ours[255], Is.EqualTo(1f));
    }

    [Test]
    public void UnsignedDynamicMapMatchesTorchBitForBit()
    {
        float[] oracle = ReadOracle("dynamic_map_unsigned.f32");
        ReadOnlySpan<float> ours = DynamicMap.Unsigned;
        for (int i = 0; i < 256; i++)
            Assert.That(BitConverter.SingleToUInt32Bits(ours[i]), Is.EqualTo(BitConverter.SingleToUInt32Bits(oracle[i])), $"index {i}: {ours[i]:R} vs {oracle[i]:R}");
    }

    [Test]
    public void EncodeIsNearestCodeWithMidpointRounding()
    {
        ReadOnlySpan<float> map = DynamicMap.Signed;
        Assert.That(Dynamic8Bit.Encode(map, 1f), Is.EqualTo(255));
        Assert.That(Dynamic8Bit.Encode(map, -1f), Is.EqualTo(0));
        Assert.That(Dynamic8Bit.Encode(map, 0f), Is.EqualTo(127));
        for (int i = 0; i < 256; i++)
            Assert.That(Dynamic8Bit.Encode(map, map[i]), Is.EqualTo(i), $"exact code value {i}");
        // Every value maps to a nearest code (ties may go either way).
        var rng = new Random(5);
        for (int k = 0; k < 20000; k++)
        {
            float x = (float)(rng.NextDouble() * 2 - 1);
            int q = Dynamic8Bit.Encode(map, x);
            float best = float.MaxValue;
            for (int i = 0; i < 256; i++) best = MathF.Min(best, MathF.Abs(map[i] - x));
            Assert.That(MathF.Abs(map[q] - x), Is.LessThanOrEqualTo(best * (1 + 1e-6f) + 1e-12f), $"x = {x:R}");
        }
    }

    /// <summary>absmax [1, 3]: offset 2, centered [-1, 1], nested_absmax 1; -1 encodes to 0 (map[0] = -0.99296875),
    /// 1 to 255 (1.0). Decode: map[0]·1 + 2 and 1·1 + 2 = 3.</summary>
    [Test]
    public void HandCase()
    {
        var s = DoubleQuantState.Quantize([1f, 3f]);
        Assert.That(s.Offset, Is.EqualTo(2f));
        Assert.That(s.NestedAbsmax, Is.EqualTo(new[] { 1f }));
        Assert.That(s.QuantizedAbsmax, Is.EqualTo(new byte[] { 0, 255 }));
        float[] back = s.Decode();
        Assert.That(back[0], Is.EqualTo(DynamicMap.Signed[0] + 2f));
        Assert.That(back[1], Is.EqualTo(3f));
    }

    [Test]
    public void AllEqualAbsmaxDecodesExactly()
    {
        // centered values are all 0 → nested_absmax 0 → every code is the index of 0.0 → decode = offset.
        float[] absmax = Enumerable.Repeat(0.125f, 300).ToArray();
        var s = DoubleQuantState.Quantize(absmax);
        Assert.That(s.NestedAbsmax, Is.EqualTo(new[] { 0f, 0f }));
        Assert.That(s.QuantizedAbsmax, Is.All.EqualTo((byte)DynamicMap.SignedZeroIndex));
        Assert.That(s.Decode(), Is.All.EqualTo(0.125f));
    }

    /// <summary>
    /// Bound: |decoded − absmax| ≤ nested_absmax · (largest half-gap of the signed map = (1 − 0.99296875)/2 and
    /// 0.0140625/2 between the top means, i.e. 0.00703125) + fp32 rounding of the offset and the sum.
    /// </summary>
    [Test]
    public void RoundTripWithinTheCodeResolution()
    {
        var rng = new Random(9);
        var absmax = new float[1000];
        for (int i = 0; i < absmax.Length; i++) absmax[i] = (float)(0.01 + 0.05 * rng.NextDouble());
        var s = DoubleQuantState.Quantize(absmax);
        Assert.That(s.NestedAbsmax.Length, Is.EqualTo(4));
        float[] back = s.Decode();
        for (int i = 0; i < absmax.Length; i++)
        {
            double bound = 0.00703125 * s.NestedAbsmax[i / 256] * 1.0001 + 2e-7 * Math.Abs(absmax[i]);
            Assert.That(Math.Abs(back[i] - absmax[i]), Is.LessThanOrEqualTo(bound), $"absmax {i}");
        }
    }

    [Test]
    public void DoubleQuantTensorDequantizesWithDecodedAbsmax()
    {
        const int n = 64 * 600;
        var rng = new Random(4);
        var x = new float[n];
        for (int i = 0; i < n; i++) x[i] = (float)(rng.NextDouble() - 0.5);
        var plain = Quantized4BitTensor.Quantize<float>(x, [600, 64], QuantType.Nf4, 64, doubleQuant: false, DType.F32);
        var dq = Quantized4BitTensor.Quantize<float>(x, [600, 64], QuantType.Nf4, 64, doubleQuant: true, DType.F32);
        Assert.That(dq.Packed, Is.EqualTo(plain.Packed), "the 4-bit codes do not depend on double quant");
        float[] absmax = dq.State.Nested!.Decode();
        float[] back = dq.DequantizeToSingle();
        for (int i = 0; i < n; i += 37)
        {
            int nib = (i & 1) == 0 ? dq.Packed[i / 2] >> 4 : dq.Packed[i / 2] & 15;
            Assert.That(back[i], Is.EqualTo(FourBitCode.Nf4[nib] * absmax[i / 64]));
        }
    }
}
