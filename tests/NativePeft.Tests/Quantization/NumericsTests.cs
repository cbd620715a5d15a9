using NativePeft.Numerics;
using NUnit.Framework;

namespace NativePeft.Tests.Quantization;

public class NumericsTests
{
    private static float F(uint bits) => BitConverter.UInt32BitsToSingle(bits);

    [TestCase(0x3F80_0000u, (ushort)0x3F80)] // 1.0 exact
    [TestCase(0x3F80_8000u, (ushort)0x3F80)] // halfway, lower is even → down
    [TestCase(0x3F81_8000u, (ushort)0x3F82)] // halfway, lower is odd → up to even
    [TestCase(0x3F80_8001u, (ushort)0x3F81)] // above halfway → up
    [TestCase(0x3F80_7FFFu, (ushort)0x3F80)] // below halfway → down
    [TestCase(0xBF81_8000u, (ushort)0xBF82)] // negative, same rule
    [TestCase(0x7F7F_FFFFu, (ushort)0x7F80)] // max float rounds to +inf
    [TestCase(0x7F80_0000u, (ushort)0x7F80)] // +inf
    [TestCase(0x0000_8000u, (ushort)0x0000)] // subnormal halfway → even (0)
    [TestCase(0x8000_0000u, (ushort)0x8000)] // -0 keeps its sign
    public void BFloat16RoundsToNearestEven(uint floatBits, ushort expected)
        => Assert.That(((BFloat16)F(floatBits)).RawValue, Is.EqualTo(expected));

    [Test]
    public void BFloat16KeepsNaNQuiet()
    {
        // Signalling NaN whose payload lives only in the low 16 bits: plain truncation would give +inf.
        var b = (BFloat16)F(0x7F80_0001u);
        Assert.That(b.IsNaN, Is.True);
        Assert.That(float.IsNaN((float)b), Is.True);
        Assert.That(((BFloat16)F(0xFFC0_0000u)).RawValue, Is.EqualTo((ushort)0xFFC0));
    }

    [Test]
    public void BFloat16WidensExactly()
    {
        for (int bits = 0; bits < 0x10000; bits += 7)
        {
            var b = BFloat16.FromBits((ushort)bits);
            float f = (float)b;
            Assert.That(BitConverter.SingleToUInt32Bits(f), Is.EqualTo((uint)bits << 16));
            if (!b.IsNaN)
                Assert.That(((BFloat16)f).RawValue, Is.EqualTo((ushort)bits));
        }
    }

    [Test]
    public void HalfConversionIsRoundToNearestEven()
    {
        // Expected values from IEEE binary16 by hand: ulp(1) = 2^-10, min subnormal = 2^-24, max = 65504.
        Assert.Multiple(() =>
        {
            Assert.That((float)(Half)(1f + MathF.Pow(2, -11)), Is.EqualTo(1f));                    // tie → even (down)
            Assert.That((float)(Half)(1f + 3 * MathF.Pow(2, -11)), Is.EqualTo(1f + MathF.Pow(2, -9))); // tie → even (up)
            Assert.That((float)(Half)(1f + MathF.Pow(2, -11) + MathF.Pow(2, -20)), Is.EqualTo(1f + MathF.Pow(2, -10)));
            Assert.That((float)(Half)65519.99f, Is.EqualTo(65504f));
            Assert.That(float.IsPositiveInfinity((float)(Half)65520f), Is.True);                   // tie above max → inf
            Assert.That((float)(Half)MathF.Pow(2, -25), Is.EqualTo(0f));                           // subnormal tie → 0
            Assert.That((float)(Half)(3 * MathF.Pow(2, -25)), Is.EqualTo(MathF.Pow(2, -23)));      // subnormal tie → even
        });
    }

    [TestCase(DType.F32, "F32", "float32", 4)]
    [TestCase(DType.BF16, "BF16", "bfloat16", 2)]
    [TestCase(DType.F16, "F16", "float16", 2)]
    [TestCase(DType.U8, "U8", "uint8", 1)]
    [TestCase(DType.I8, "I8", "int8", 1)]
    [TestCase(DType.I32, "I32", "int32", 4)]
    [TestCase(DType.I64, "I64", "int64", 8)]
    [TestCase(DType.F64, "F64", "float64", 8)]
    [TestCase(DType.Bool, "BOOL", "bool", 1)]
    [TestCase(DType.F8E4M3, "F8_E4M3", "float8_e4m3fn", 1)]
    public void DTypeNamesAndSizes(DType dtype, string safetensors, string torch, int size)
    {
        Assert.That(dtype.SafetensorsName(), Is.EqualTo(safetensors));
        Assert.That(dtype.TorchName(), Is.EqualTo(torch));
        Assert.That(dtype.ElementSize(), Is.EqualTo(size));
        Assert.That(DTypes.TryParseSafetensorsName(safetensors, out var parsed) && parsed == dtype, Is.True);
        Assert.That(DTypes.TryParseTorchName("torch." + torch, out var parsedTorch) && parsedTorch == dtype, Is.True);
    }

    [Test]
    public void UnknownDTypeNamesAreRejected()
    {
        Assert.That(DTypes.TryParseSafetensorsName("f32", out _), Is.False);
        Assert.That(DTypes.TryParseSafetensorsName("FLOAT", out _), Is.False);
        Assert.That(DTypes.TryParseTorchName("float", out _), Is.False);
    }
}
