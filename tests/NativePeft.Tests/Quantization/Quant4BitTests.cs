using NativePeft.Numerics;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Quantization;

public class Quant4BitTests
{
    private static (byte[] Packed, float[] Absmax) Q(float[] x, QuantType qt, int blocksize)
    {
        var packed = new byte[Quant4Bit.PackedLength(x.Length)];
        var absmax = new float[blocksize > 0 ? Quant4Bit.BlockCount(x.Length, blocksize) : 1];
        Quant4Bit.Quantize(x, packed, absmax, qt, blocksize);
        return (packed, absmax);
    }

    private static float[] Normal(int n, int seed, float scale = 1f)
    {
        var rng = new Random(seed);
        var x = new float[n];
        for (int i = 0; i < n; i++)
            x[i] = scale * (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()));
        return x;
    }

    /// <summary>
    /// absmax = 2 → v = x * 0.5 exactly. t7 = 0.03979014977812767f, t0 = -0.8480964004993439f (docs/quant-contract.md thresholds):
    /// x = 2.0 → v 1 → 15 thresholds below → 15;   x = -2 → 0;   x = 0 → 7 thresholds below 0 → 7;
    /// x = 2·t7 → v = t7, not &gt; t7 → 7;   x = 2·next(t7) → 8;   x = 2·t0 → 0;   x = 2·next(t0) → 1;
    /// x = 1 → v 0.5: t0..t11 &lt; 0.5 &lt; t12 (0.50166) → 12;   x = -0.5 → v -0.25: t0..t3 &lt; -0.25 &lt; t4 (-0.2346) → 4;
    /// n = 9 is odd: the last byte's low nibble is the code of the padded 0.0 → 7.
    /// Bytes (high nibble first): F0 77 80 1C 47.
    /// </summary>
    [Test]
    public void Nf4HandCheckedBlock()
    {
        float t7 = 0.03979014977812767f, t0 = -0.8480964004993439f;
        float[] x = [2f, -2f, 0f, 2 * t7, 2 * MathF.BitIncrement(t7), 2 * t0, 2 * MathF.BitIncrement(t0), 1f, -0.5f];
        var (packed, absmax) = Q(x, QuantType.Nf4, 32);
        Assert.That(absmax, Is.EqualTo(new[] { 2f }));
        Assert.That(packed, Is.EqualTo(new byte[] { 0xF0, 0x77, 0x80, 0x1C, 0x47 }));

        // Same values padded with zeros to a full block of 32 (vector path for all of them): zeros → 7.
        var full = new float[32];
        x.CopyTo(full, 0);
        var (p32, _) = Q(full, QuantType.Nf4, 32);
        Assert.That(p32[..5], Is.EqualTo(new byte[] { 0xF0, 0x77, 0x80, 0x1C, 0x47 }));
        Assert.That(p32[5..], Is.All.EqualTo((byte)0x77));
    }

    /// <summary>
    /// absmax = 1 (x = -0.9 has |x| 0.9 &lt; 1): 1.0 → |v| &gt; 0.8333333 → 011 = 3;  -0.5 → sign 8 | (0.29 &lt; 0.5 ≤ 0.583, &gt; 0.4167 → 101) = D;
    /// 0.00260417 (on the first threshold) → 0;  0.2 (0.0859 &lt; 0.2 ≤ 0.2083) → 110 = 6;  -0.0 → not &lt; 0 → 0;
    /// 0.3 (0.2917 &lt; 0.3 ≤ 0.4167) → 100 = 4;  -0.9 → 8 | 011 = B;  pad (n = 7) → 0.  Bytes: 3D 06 04 B0.
    /// </summary>
    [Test]
    public void Fp4HandCheckedBlock()
    {
        float[] x = [1f, -0.5f, 0.00260417f, 0.2f, -0.0f, 0.3f, -0.9f];
        var (packed, absmax) = Q(x, QuantType.Fp4, 64);
        Assert.That(absmax, Is.EqualTo(new[] { 1f }));
        Assert.That(packed, Is.EqualTo(new byte[] { 0x3D, 0x06, 0x04, 0xB0 }));
    }

    [Test]
    public void PackingPutsEvenElementInHighNibble()
    {
        // absmax 1: 1.0 → 15, -1.0 → 0: byte = 0xF0; swapped → 0x0F.
        var (a, _) = Q([1f, -1f], QuantType.Nf4, 64);
        var (b, _) = Q([-1f, 1f], QuantType.Nf4, 64);
        Assert.That(a, Is.EqualTo(new byte[] { 0xF0 }));
        Assert.That(b, Is.EqualTo(new byte[] { 0x0F }));
    }

    [TestCase(QuantType.Nf4)]
    [TestCase(QuantType.Fp4)]
    public void AllZeroBlockStoresZeroAbsmaxAndZeroNibbles(QuantType qt)
    {
        var x = new float[64 + 64 + 3];
        x[70] = 0.5f; // block 1 non-zero; blocks 0 and 2 all zero (block 2 odd-length with padding)
        var (packed, absmax) = Q(x, qt, 64);
        Assert.That(absmax, Is.EqualTo(new[] { 0f, 0.5f, 0f }));
        Assert.That(packed[..32], Is.All.EqualTo((byte)0));
        Assert.That(packed[64..], Is.All.EqualTo((byte)0), "last block, including the padded low nibble");
        float[] back = new float[x.Length];
        Quant4Bit.Dequantize(packed, absmax, back, qt, 64);
        Assert.That(back[..64], Is.All.EqualTo(0f));
        Assert.That(back[128..], Is.All.EqualTo(0f));
        if (qt == QuantType.Nf4)
            Assert.That(float.IsNegative(back[0]), Is.True, "NF4 code 0 = -1.0 times 0 = -0.0 (as the CUDA kernel)");
    }

    [TestCase(QuantType.Nf4, 0)]
    [TestCase(QuantType.Nf4, 1)]
    [TestCase(QuantType.Nf4, 63)]
    [TestCase(QuantType.Nf4, 65)]
    [TestCase(QuantType.Nf4, 64 + 1)]
    [TestCase(QuantType.Fp4, 1)]
    [TestCase(QuantType.Fp4, 63)]
    [TestCase(QuantType.Fp4, 129)]
    public void OddSizesMatchScalarReference(QuantType qt, int n)
    {
        float[] x = Normal(n, 7 + n);
        var (packed, absmax) = Q(x, qt, 64);
        Assert.That(packed.Length, Is.EqualTo((n + 1) / 2));
        Assert.That(absmax.Length, Is.EqualTo((n + 63) / 64));
        var (refPacked, refAbsmax) = ScalarReference(x, qt, 64);
        Assert.That(absmax, Is.EqualTo(refAbsmax));
        Assert.That(packed, Is.EqualTo(refPacked));
        var back = new float[n];
        Quant4Bit.Dequantize(packed, absmax, back, qt, 64);
        for (int i = 0; i < n; i++)
            Assert.That(back[i], Is.EqualTo(FourBitCode.Code(qt)[Nibble(packed, i)] * absmax[i / 64]));
    }

    private static int Nibble(byte[] packed, int i) => (i & 1) == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 15;

    /// <summary>The contract written out element by element with the tree/threshold functions (no vectors).</summary>
    private static (byte[], float[]) ScalarReference(float[] x, QuantType qt, int bs)
    {
        int n = x.Length, blocks = (n + bs - 1) / bs;
        var absmax = new float[blocks];
        var codes = new byte[n + 1];
        for (int b = 0; b < blocks; b++)
        {
            int s = b * bs, e = Math.Min(n, s + bs);
            float m = 0;
            for (int i = s; i < e; i++) m = MathF.Max(m, MathF.Abs(x[i]));
            absmax[b] = m;
            float inv = 1f / m;
            for (int i = s; i < (e == n && (n & 1) == 1 ? e + 1 : e); i++)
            {
                float xi = i < n ? x[i] : 0f;
                codes[i] = m == 0 ? (byte)0 : qt == QuantType.Nf4 ? FourBitCode.QuantizeNf4(xi * inv) : FourBitCode.QuantizeFp4(xi * inv);
            }
        }
        var packed = new byte[(n + 1) / 2];
        for (int j = 0; j < packed.Length; j++)
            packed[j] = (byte)((codes[2 * j] << 4) | codes[2 * j + 1]);
        return (packed, absmax);
    }

    [Test]
    public void EveryBlocksizeMatchesScalarReference([Values(32, 64, 128, 256, 512, 1024, 2048, 4096)] int bs,
        [Values(QuantType.Nf4, QuantType.Fp4)] QuantType qt)
    {
        float[] x = Normal(3 * bs + 17, bs);
        var (packed, absmax) = Q(x, qt, bs);
        var (refPacked, refAbsmax) = ScalarReference(x, qt, bs);
        Assert.That(absmax, Is.EqualTo(refAbsmax));
        Assert.That(packed, Is.EqualTo(refPacked));
    }

    [TestCase(QuantType.Nf4, 0.1)]
    [TestCase(QuantType.Fp4, 0.12)]
    public void RoundTripErrorOnNormalData(QuantType qt, double rmsBound)
    {
        const int n = 64 * 1000 + 31;
        float[] x = Normal(n, 42, 0.02f);
        var t = Quantized4BitTensor.Quantize<float>(x, [n], qt, 64, doubleQuant: false, DType.F32);
        float[] back = t.DequantizeToSingle();
        float[] absmax = t.State.Absmax!;
        // Per element: at most half the largest gap of the code times absmax
        // (NF4: (-0.6961928 - -1)/2 = 0.1519; FP4: (1 - 2/3)/2 = 0.1667).
        double halfGap = qt == QuantType.Nf4 ? (1 - 0.6961928009986877) / 2 : (1 - 2.0 / 3) / 2;
        double sumSq = 0, sumAbsmaxSq = 0;
        for (int i = 0; i < n; i++)
        {
            double err = Math.Abs(x[i] - back[i]);
            double a = absmax[i / 64];
            Assert.That(err, Is.LessThanOrEqualTo(halfGap * a * (1 + 1e-6)), $"element {i}");
            sumSq += err * err / (a * a);
        }
        double rmsRelative = Math.Sqrt(sumSq / n);
        TestContext.Out.WriteLine($"{qt}: RMS error / absmax = {rmsRelative:F4}");
        Assert.That(rmsRelative, Is.LessThan(rmsBound));
        _ = sumAbsmaxSq;
    }

    [TestCase(QuantType.Nf4)]
    [TestCase(QuantType.Fp4)]
    public void HalfPrecisionInputsQuantizeLikeTheirFp32Values(QuantType qt)
    {
        const int n = 4096 + 77;
        float[] x = Normal(n, 3);
        var bf = new BFloat16[n];
        BFloat16.FromSingle(x, bf);
        var h = new Half[n];
        for (int i = 0; i < n; i++) h[i] = (Half)x[i];
        float[] bfAsFloat = bf.Select(v => (float)v).ToArray();
        float[] hAsFloat = h.Select(v => (float)v).ToArray();

        var pb = new byte[(n + 1) / 2]; var ab = new float[(n + 63) / 64];
        Quant4Bit.Quantize(bf, pb, ab, qt, 64);
        var (pbRef, abRef) = Q(bfAsFloat, qt, 64);
        Assert.That(pb, Is.EqualTo(pbRef)); Assert.That(ab, Is.EqualTo(abRef));

        var ph = new byte[(n + 1) / 2]; var ah = new float[(n + 63) / 64];
        Quant4Bit.Quantize(h, ph, ah, qt, 64);
        var (phRef, ahRef) = Q(hAsFloat, qt, 64);
        Assert.That(ph, Is.EqualTo(phRef)); Assert.That(ah, Is.EqualTo(ahRef));

        // Dequantize to bf16 / fp16 = RNE of the fp32 dequantization.
        var f = new float[n]; var ob = new BFloat16[n]; var oh = new Half[n];
        Quant4Bit.Dequantize(pb, ab, f, qt, 64);
        Quant4Bit.Dequantize(pb, ab, ob, qt, 64);
        Quant4Bit.Dequantize(pb, ab, oh, qt, 64);
        for (int i = 0; i < n; i++)
        {
            Assert.That(ob[i].RawValue, Is.EqualTo(((BFloat16)f[i]).RawValue));
            Assert.That(BitConverter.HalfToUInt16Bits(oh[i]), Is.EqualTo(BitConverter.HalfToUInt16Bits((Half)f[i])));
        }
    }

    [Test]
    public void ParallelPathEqualsSequentialPath([Values(QuantType.Nf4, QuantType.Fp4)] QuantType qt)
    {
        const int n = (1 << 20) + 5;
        float[] x = Normal(n, 11);
        var (p1, a1) = Q(x, qt, 64); // span overload: one thread
        var p2 = new byte[(n + 1) / 2]; var a2 = new float[(n + 63) / 64];
        Quant4Bit.Quantize<float>(x, p2, a2, qt, 64);
        Assert.That(p2, Is.EqualTo(p1)); Assert.That(a2, Is.EqualTo(a1));
        var o1 = new float[n]; var o2 = new float[n];
        Quant4Bit.Dequantize(p1, a1, o1, qt, 64);
        Quant4Bit.Dequantize<float>(p1, a1, o2, qt, 64);
        Assert.That(o2, Is.EqualTo(o1));
    }

    [TestCase(0)]
    [TestCase(16)]
    [TestCase(48)]
    [TestCase(8192)]
    [TestCase(-64)]
    public void InvalidBlocksizeIsRejected(int bs)
    {
        var ex = Assert.Throws<ArgumentException>(() => Q(new float[10], QuantType.Nf4, bs));
        Assert.That(ex!.ParamName, Is.EqualTo("blocksize"));
        Assert.That(ex.Message, Does.Contain("blocksize"));
        Assert.Throws<ArgumentException>(() => Quantized4BitTensor.Quantize<float>(new float[10], [10], QuantType.Nf4, bs, false, DType.F32));
    }

    [Test]
    public void ShortBuffersAndBadShapesAreRejected()
    {
        Assert.Throws<ArgumentException>(() => Quant4Bit.Quantize(new float[10], new byte[4], new float[1], QuantType.Nf4, 64));
        Assert.Throws<ArgumentException>(() => Quant4Bit.Quantize(new float[65], new byte[33], new float[1], QuantType.Nf4, 64));
        Assert.Throws<ArgumentException>(() => Quantized4BitTensor.Quantize<float>(new float[10], [3, 3], QuantType.Nf4, 64, false, DType.F32));
        Assert.Throws<ArgumentException>(() => Quantized4BitTensor.Quantize<float>(new float[10], [10], QuantType.Nf4, 64, false, DType.U8));
    }

    [Test]
    public void EmptyTensor()
    {
        var t = Quantized4BitTensor.Quantize<float>(Array.Empty<float>(), [0, 16], QuantType.Nf4, 64, doubleQuant: true, DType.BF16);
        Assert.That(t.Packed, Is.Empty);
        Assert.That(t.State.Nested!.QuantizedAbsmax, Is.Empty);
        Assert.That(t.DequantizeToBFloat16(), Is.Empty);
    }

    [Test, Explicit("benchmark")]
    public void Throughput16M([Values(QuantType.Nf4, QuantType.Fp4)] QuantType qt)
    {
        const int n = 16 << 20;
        float[] x = Normal(n, 1);
        var bf = new BFloat16[n];
        BFloat16.FromSingle(x, bf);
        var packed = new byte[n / 2]; var absmax = new float[n / 64];
        var outF = new float[n]; var outB = new BFloat16[n];
        Quant4Bit.Quantize<float>(x, packed, absmax, qt, 64); // warm-up
        Quant4Bit.Dequantize<float>(packed, absmax, outF, qt, 64);
        double Time(Action a) { var sw = System.Diagnostics.Stopwatch.StartNew(); for (int r = 0; r < 3; r++) a(); return sw.Elapsed.TotalSeconds / 3; }
        double q32 = Time(() => Quant4Bit.Quantize<float>(x, packed, absmax, qt, 64));
        double q16 = Time(() => Quant4Bit.Quantize<BFloat16>(bf, packed, absmax, qt, 64));
        double qSeq = Time(() => Quant4Bit.Quantize(x.AsSpan(), packed, absmax, qt, 64));
        double d32 = Time(() => Quant4Bit.Dequantize<float>(packed, absmax, outF, qt, 64));
        double d16 = Time(() => Quant4Bit.Dequantize<BFloat16>(packed, absmax, outB, qt, 64));
        double dq = Time(() => DoubleQuantState.Quantize(absmax));
        TestContext.Out.WriteLine($"{qt} n={n} ({Environment.ProcessorCount} cores): quantize fp32 {n * 4 / q32 / 1e6:F0} MB/s in, " +
            $"bf16 {n * 2 / q16 / 1e6:F0} MB/s in, fp32 one thread {n * 4 / qSeq / 1e6:F0} MB/s; dequantize →fp32 {n * 4 / d32 / 1e6:F0} MB/s out, " +
            $"→bf16 {n * 2 / d16 / 1e6:F0} MB/s out; double-quant of {absmax.Length} absmax {dq * 1e3:F1} ms");
        Assert.That(q32, Is.GreaterThan(0));
    }
}
