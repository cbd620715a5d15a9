using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Quantization;

public class CodeTableTests
{
    // docs/quant-contract.md, "NF4 and FP4", copied as double literals.
    private static readonly double[] Nf4Doc =
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ];

    private static readonly double[] Nf4ThresholdsDoc =
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ];

    [Test]
    public void Nf4TableMatchesFormatsMd()
    {
        for (int i = 0; i < 16; i++)
            Assert.That(FourBitCode.Nf4[i], Is.EqualTo((float)Nf4Doc[i]), $"code {i}");
        // Thresholds are C float literals (0.848…f): the decimal string rounded directly to fp32. They are exact
        // midpoints of fp32 pairs, so rounding via double first ((float)0.848…) can land on the other neighbour.
        var inv = System.Globalization.CultureInfo.InvariantCulture;
        for (int i = 0; i < 15; i++)
        {
            float direct = float.Parse(Nf4ThresholdsDoc[i].ToString("R", inv), inv);
            Assert.That(FourBitCode.Nf4Thresholds[i], Is.EqualTo(direct), $"threshold {i}");
        }
        Assert.That(FourBitCode.Nf4Thresholds[0], Is.Not.EqualTo((float)Nf4ThresholdsDoc[0]), "double rounding differs here");
    }

    [Test]
    public void Nf4ThresholdsAreMidpointsOfTheCode()
    {
        for (int i = 0; i < 15; i++)
            Assert.That(Nf4ThresholdsDoc[i], Is.EqualTo((Nf4Doc[i] + Nf4Doc[i + 1]) / 2).Within(1e-7), $"threshold {i}");
    }

    [Test]
    public void Fp4TableMatchesE2M1()
    {
        // bit 3 sign; magnitude by low 3 bits: 0, 0.0625, 8, 12, 4, 6, 2, 3 (/12).
        double[] mag = [0, 0.0625 / 12, 8.0 / 12, 1.0, 4.0 / 12, 6.0 / 12, 2.0 / 12, 3.0 / 12];
        for (int i = 0; i < 16; i++)
        {
            double expected = (i & 8) != 0 ? -mag[i & 7] : mag[i & 7];
            Assert.That(FourBitCode.Fp4[i], Is.EqualTo((float)expected), $"nibble {i}");
        }
        Assert.That(float.IsNegative(FourBitCode.Fp4[8]), Is.True, "nibble 8 is -0.0");
    }

    [Test]
    public void StoredQuantMaps()
    {
        Assert.That(FourBitCode.QuantMap(QuantType.Nf4), Is.EqualTo(FourBitCode.Nf4.ToArray()));
        float[] fp4 = FourBitCode.QuantMap(QuantType.Fp4);
        // bitsandbytes get_4bit_type("fp4"): Tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, …]) / 12 in fp32.
        float[] expected = [0f, 0.0625f / 12f, 8f / 12f, 1f, 4f / 12f, 0.5f, 2f / 12f, 0.25f,
                            0f, -0.0625f / 12f, -8f / 12f, -1f, -4f / 12f, -0.5f, -2f / 12f, -0.25f];
        Assert.That(fp4, Is.EqualTo(expected));
        Assert.That(float.IsNegative(fp4[8]), Is.False, "Python's -0 is the integer 0: +0.0");
        // The stored map and the kernel's dequantization constants are the same fp32 values (except the sign of zero).
        for (int i = 0; i < 16; i++)
            Assert.That(fp4[i], Is.EqualTo(FourBitCode.Fp4[i]), $"nibble {i}");
    }

    [Test]
    public void Fp4QuantizeTreeBoundaries()
    {
        // On a threshold → lower code; just above → upper code (thresholds ascending, magnitude bits in tree order).
        float[] t = [0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f];
        byte[] below = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010];
        byte[] above = [0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];
        for (int i = 0; i < t.Length; i++)
        {
            Assert.That(FourBitCode.QuantizeFp4(t[i]), Is.EqualTo(below[i]), $"on threshold {i}");
            Assert.That(FourBitCode.QuantizeFp4(MathF.BitIncrement(t[i])), Is.EqualTo(above[i]), $"above threshold {i}");
            Assert.That(FourBitCode.QuantizeFp4(-MathF.BitIncrement(t[i])), Is.EqualTo((byte)(8 | above[i])), $"negative {i}");
        }
        Assert.That(FourBitCode.QuantizeFp4(-0.0f), Is.EqualTo(0), "-0.0 is not < 0");
    }

    [Test]
    public void Nf4QuantizeBoundaries()
    {
        for (int i = 0; i < 15; i++)
        {
            float t = FourBitCode.Nf4Thresholds[i];
            Assert.That(FourBitCode.QuantizeNf4(t), Is.EqualTo(i), $"on threshold {i}");
            Assert.That(FourBitCode.QuantizeNf4(MathF.BitIncrement(t)), Is.EqualTo(i + 1), $"above threshold {i}");
        }
        for (int c = 0; c < 16; c++)
            Assert.That(FourBitCode.QuantizeNf4(FourBitCode.Nf4[c]), Is.EqualTo(c), $"code value {c}");
    }
}
