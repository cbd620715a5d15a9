using System.Diagnostics;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// kernels/nf4.cu through <see cref="GpuQuantOps"/> on every device: the emulator always (a missing
/// libnativepeft_emu is a failure), CUDA when a device exists (ignored otherwise). Quantization is compared
/// with the CPU reference (NativePeft.Quantization) bit for bit; the GEMV with a float64 reference.
/// </summary>
public sealed class GpuQuantOpsTests(string device) : DeviceFixture<GpuQuantOps>(device)
{
    protected override GpuQuantOps CreateOps(IGpu gpu) => new(gpu);

    protected override IEnumerable<string> RequiredKernels => ["quantize_4bit_nf4_f32"];

    protected override string MissingKernelMessage(string kernel) =>
        $"{Device}: the nf4.cu kernels are not loaded (build build/kernels/nf4.ptx / libnativepeft_emu)";

    private static readonly int[] Blocksizes = [32, 64, 256, 4096];
    private static readonly int[] Sizes = [0, 1, 63, 64, 65, 4097, (1 << 16) + 3];
    private static readonly DType[] FloatDTypes = [DType.F32, DType.BF16, DType.F16];

    // ------------------------------------------------------------------------------------------
    // Inputs
    // ------------------------------------------------------------------------------------------

    /// <summary>Normal(0, 1) values with a few outliers; when there are several blocks, block 1 is all zero.</summary>
    private static float[] MakeInput(int n, int blocksize, int seed)
    {
        var rng = new Random(seed);
        var x = new float[n];
        for (int i = 0; i < n; i++)
        {
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            x[i] = (float)(Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2.0 * Math.PI * u2));
            if (rng.Next(97) == 0) x[i] *= 8.0f;
        }
        if (GpuQuantOps.AbsmaxCount(n, blocksize) > 1)
            Array.Clear(x, blocksize, Math.Min(blocksize, n - blocksize));
        return x;
    }

    /// <summary>The input as the dtype under test, and its exact fp32 widening (what the kernels see).</summary>
    private static (object Typed, float[] Widened) AsDType(float[] x, DType dtype)
    {
        switch (dtype)
        {
            case DType.F32:
                return (x, x);
            case DType.BF16:
            {
                var b = new BFloat16[x.Length];
                BFloat16.FromSingle(x, b);
                var w = new float[x.Length];
                BFloat16.ToSingle(b, w);
                return (b, w);
            }
            case DType.F16:
            {
                var h = new Half[x.Length];
                var w = new float[x.Length];
                for (int i = 0; i < x.Length; i++) { h[i] = (Half)x[i]; w[i] = (float)h[i]; }
                return (h, w);
            }
            default:
                throw new ArgumentOutOfRangeException(nameof(dtype));
        }
    }

    private (byte[] Packed, float[] Absmax) GpuQuantize(QuantType qt, object typed, int blocksize) => typed switch
    {
        float[] f => Ops.Quantize4bit<float>(qt, f, blocksize),
        BFloat16[] b => Ops.Quantize4bit<BFloat16>(qt, b, blocksize),
        Half[] h => Ops.Quantize4bit<Half>(qt, h, blocksize),
        _ => throw new ArgumentException("unknown input type"),
    };

    // ------------------------------------------------------------------------------------------
    // Quantize / dequantize parity with the CPU reference
    // ------------------------------------------------------------------------------------------

    [Test]
    public void Quantize4bitMatchesCpuReferenceBitForBit(
        [Values] QuantType qt, [ValueSource(nameof(FloatDTypes))] DType dtype,
        [ValueSource(nameof(Blocksizes))] int blocksize, [ValueSource(nameof(Sizes))] int n)
    {
        float[] x = MakeInput(n, blocksize, seed: n * 31 + blocksize);
        (object typed, float[] widened) = AsDType(x, dtype);

        (byte[] packed, float[] absmax) = GpuQuantize(qt, typed, blocksize);
        (byte[] refPacked, float[] refAbsmax) = CpuReference.Quantize(qt, typed, blocksize);

        Assert.That(packed, Has.Length.EqualTo((n + 1) / 2));
        Assert.That(absmax, Has.Length.EqualTo((n + blocksize - 1) / blocksize));
        AssertBitsEqual(absmax, refAbsmax, "absmax");
        Assert.That(packed, Is.EqualTo(refPacked), "packed");

        // independent facts: absmax is max |x| of the widened input; the all-zero block is all nibble 0
        for (int b = 0; b < absmax.Length; b++)
        {
            float m = 0f;
            for (int i = b * blocksize; i < Math.Min(n, (b + 1) * blocksize); i++) m = Math.Max(m, Math.Abs(widened[i]));
            Assert.That(absmax[b], Is.EqualTo(m), $"absmax[{b}]");
        }
        if (absmax.Length > 1)
        {
            Assert.That(absmax[1], Is.EqualTo(0f));
            int first = blocksize / 2, last = (Math.Min(n, 2 * blocksize) + 1) / 2;
            Assert.That(packed[first..last], Is.All.EqualTo((byte)0), "all-zero block packs to nibble 0");
        }
    }

    [Test]
    public void Dequantize4bitVectorAndBytewisePathsGiveTheSameBits([Values(DType.F32, DType.BF16)] DType dtype)
    {
        // Aligned buffers take the 16-elements-a-thread path (8-byte packed loads, 16-byte stores); the output one
        // element further on, or the packed bytes one byte further on, take the byte-by-byte path. Same bits.
        const int n = 16 * 40 + 6, blocksize = 64;
        float[] x = MakeInput(n, blocksize, seed: 7);
        (byte[] packed, float[] absmax) = CpuReference.Quantize(QuantType.Nf4, x, blocksize);
        int es = dtype.ElementSize();
        DevicePtr dAbsmax = Upload(absmax);
        byte[] Run(int outShift, int packedShift)
        {
            DevicePtr dPacked = Alloc(packed.Length + 1).Offset(packedShift);
            Gpu.CopyToDevice<byte>(packed, dPacked);
            DevicePtr dOut = Alloc((long)(n + 1) * es).Offset((long)outShift * es);
            Ops.Dequantize4bit(QuantType.Nf4, dtype, dPacked, dAbsmax, n, blocksize, dOut);
            return Download<byte>(dOut, n * es);
        }
        byte[] vector = Run(0, 0);
        Assert.That(Run(1, 0), Is.EqualTo(vector), "output not 16-byte aligned");
        Assert.That(Run(0, 1), Is.EqualTo(vector), "packed not 8-byte aligned");
        float[] cpu = CpuReference.Dequantize<float>(QuantType.Nf4, packed, absmax, blocksize, n);
        float[] got = new float[n];
        for (int i = 0; i < n; i++)
            got[i] = dtype == DType.F32 ? BitConverter.ToSingle(vector, 4 * i) : (float)BFloat16.FromBits(BitConverter.ToUInt16(vector, 2 * i));
        for (int i = 0; i < n; i++)
            Assert.That(got[i], Is.EqualTo(dtype == DType.F32 ? cpu[i] : (float)BFloat16.FromSingle(cpu[i])), $"out[{i}]");
    }

    [Test]
    public void Dequantize4bitMatchesCpuReferenceBitForBit(
        [Values] QuantType qt, [ValueSource(nameof(FloatDTypes))] DType dtype,
        [ValueSource(nameof(Blocksizes))] int blocksize, [ValueSource(nameof(Sizes))] int n)
    {
        float[] x = MakeInput(n, blocksize, seed: n * 17 + blocksize);
        (byte[] packed, float[] absmax) = CpuReference.Quantize(qt, x, blocksize);
        switch (dtype)
        {
            case DType.F32:
            {
                var gpu = new float[n];
                Ops.Dequantize4bit<float>(qt, packed, absmax, blocksize, gpu);
                float[] cpu = CpuReference.Dequantize<float>(qt, packed, absmax, blocksize, n);
                AssertBitsEqual(gpu, cpu, "out");
                // independent: code[nibble] * absmax in fp32
                ReadOnlySpan<float> code = FourBitCode.Code(qt);
                for (int i = 0; i < n; i++)
                {
                    int nib = (i & 1) == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 15;
                    Assert.That(BitConverter.SingleToInt32Bits(gpu[i]),
                        Is.EqualTo(BitConverter.SingleToInt32Bits(code[nib] * absmax[i / blocksize])), $"out[{i}]");
                }
                break;
            }
            case DType.BF16:
            {
                var gpu = new BFloat16[n];
                Ops.Dequantize4bit<BFloat16>(qt, packed, absmax, blocksize, gpu);
                BFloat16[] cpu = CpuReference.Dequantize<BFloat16>(qt, packed, absmax, blocksize, n);
                Assert.That(gpu.Select(v => v.RawValue), Is.EqualTo(cpu.Select(v => v.RawValue)), "bf16 bits");
                break;
            }
            case DType.F16:
            {
                var gpu = new Half[n];
                Ops.Dequantize4bit<Half>(qt, packed, absmax, blocksize, gpu);
                Half[] cpu = CpuReference.Dequantize<Half>(qt, packed, absmax, blocksize, n);
                Assert.That(gpu.Select(BitConverter.HalfToUInt16Bits), Is.EqualTo(cpu.Select(BitConverter.HalfToUInt16Bits)), "f16 bits");
                break;
            }
        }
    }

    [Test]
    public void Nf4ValuesOnAThresholdGoToTheLowerCode()
    {
        // absmax = 1 (first element), so v = x exactly: a value equal to threshold t_k has exactly k thresholds below it.
        ReadOnlySpan<float> t = FourBitCode.Nf4Thresholds;
        var x = new float[32];
        x[0] = 1.0f;
        for (int k = 0; k < 15; k++)
            x[1 + k] = t[k];
        for (int k = 0; k < 15; k++)
            x[16 + k] = MathF.BitIncrement(t[k]); // the next fp32 above the threshold
        x[31] = -1.0f;
        (byte[] packed, float[] absmax) = Ops.Quantize4bit<float>(QuantType.Nf4, x, 32);
        Assert.That(absmax[0], Is.EqualTo(1.0f));
        int Nib(int i) => (i & 1) == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 15;
        Assert.That(Nib(0), Is.EqualTo(15));
        for (int k = 0; k < 15; k++)
        {
            Assert.That(Nib(1 + k), Is.EqualTo(k), $"on threshold {k}");
            Assert.That(Nib(16 + k), Is.EqualTo(k + 1), $"just above threshold {k}");
        }
        Assert.That(Nib(31), Is.EqualTo(0));
    }

    [Test]
    public void OddLengthPadsTheLastLowNibbleWithTheCodeOfZero([Values] QuantType qt)
    {
        float[] x = [0.5f, -1.0f, 0.25f];
        (byte[] packed, _) = Ops.Quantize4bit<float>(qt, x, 64);
        Assert.That(packed, Has.Length.EqualTo(2));
        Assert.That(packed[1] & 15, Is.EqualTo(qt == QuantType.Nf4 ? 7 : 0));
        (byte[] zeros, float[] zeroAbsmax) = Ops.Quantize4bit<float>(qt, new float[3], 64);
        Assert.That(zeroAbsmax, Is.EqualTo(new[] { 0f }));
        Assert.That(zeros, Is.EqualTo(new byte[] { 0, 0 }));
    }

    [Test]
    public void BlocksizeIsValidated([Values(0, 16, 48, 8192, -64)] int blocksize)
    {
        var ex = Assert.Throws<ArgumentException>(() => Ops.Quantize4bit<float>(QuantType.Nf4, new float[64], blocksize));
        Assert.That(ex!.ParamName, Is.EqualTo("blocksize"));
        ex = Assert.Throws<ArgumentException>(() =>
            Ops.Dequantize4bit(QuantType.Nf4, DType.F32, DevicePtr.Null, DevicePtr.Null, 64, blocksize, DevicePtr.Null));
        Assert.That(ex!.ParamName, Is.EqualTo("blocksize"));
    }

    // ------------------------------------------------------------------------------------------
    // Double quantization
    // ------------------------------------------------------------------------------------------

    private static readonly int[] NestedCounts = [1, 255, 256, 257, 1000, 4096 + 7];

    [Test]
    public void DoubleQuantMatchesCpuReferenceBitForBit([ValueSource(nameof(NestedCounts))] int nblocks)
    {
        // absmax of a real quantization (what the op sees in practice)
        float[] x = MakeInput(nblocks * 64, 64, seed: nblocks);
        (_, float[] absmax) = CpuReference.Quantize(QuantType.Nf4, x, 64);
        float[] map = SignedMap();

        DoubleQuantState gpu = Ops.QuantizeAbsmaxDoubleQuant(absmax, map);
        DoubleQuantState cpu = DoubleQuantState.Quantize(absmax);

        Assert.That(BitConverter.SingleToInt32Bits(gpu.Offset), Is.EqualTo(BitConverter.SingleToInt32Bits(cpu.Offset)), "offset");
        AssertBitsEqual(gpu.NestedAbsmax, cpu.NestedAbsmax, "nested_absmax");
        Assert.That(gpu.QuantizedAbsmax, Is.EqualTo(cpu.QuantizedAbsmax), "qabsmax");

        var decoded = new float[nblocks];
        Ops.DequantizeAbsmaxDoubleQuant(gpu, decoded);
        AssertBitsEqual(decoded, cpu.Decode(), "decoded absmax");

        // independent: decode = map[q] * nested + offset (multiply, then add), and close to the input
        for (int i = 0; i < nblocks; i++)
        {
            float scaled = map[gpu.QuantizedAbsmax[i]] * gpu.NestedAbsmax[i / 256];
            Assert.That(decoded[i], Is.EqualTo(scaled + gpu.Offset), $"decoded[{i}]");
            Assert.That(Math.Abs(decoded[i] - absmax[i]), Is.LessThanOrEqualTo(0.05f * gpu.NestedAbsmax[i / 256] + 1e-6f), $"error[{i}]");
        }
    }

    [Test]
    public void DoubleQuantOfAConstantNestedBlockStoresTheZeroCode()
    {
        float[] absmax = Enumerable.Repeat(0.375f, 300).ToArray();
        float[] map = SignedMap();
        DoubleQuantState state = Ops.QuantizeAbsmaxDoubleQuant(absmax, map);
        Assert.That(state.Offset, Is.EqualTo(0.375f));
        Assert.That(state.NestedAbsmax, Is.EqualTo(new[] { 0f, 0f }));
        int zeroIndex = Array.IndexOf(map, 0f);
        Assert.That(zeroIndex, Is.EqualTo(127));
        Assert.That(state.QuantizedAbsmax, Is.All.EqualTo((byte)zeroIndex));
        var decoded = new float[300];
        Ops.DequantizeAbsmaxDoubleQuant(state, decoded);
        Assert.That(decoded, Is.All.EqualTo(0.375f));
    }

    private static float[] SignedMap()
    {
        string path = Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", "dynamic_map_signed.f32");
        byte[] bytes = File.ReadAllBytes(path);
        var map = new float[bytes.Length / 4];
        Buffer.BlockCopy(bytes, 0, map, 0, bytes.Length);
        Assert.That(map, Has.Length.EqualTo(256));
        return map;
    }

    // ------------------------------------------------------------------------------------------
    // GEMV
    // ------------------------------------------------------------------------------------------

    private static readonly (int Out, int In, int Blocksize)[] GemvShapes =
    [
        (1, 64, 64), (37, 64, 32), (37, 72, 64), (19, 33, 64), (8, 4096, 4096), (300, 200, 256), (5, 1000, 32),
    ];

    [Test]
    public void Gemv4bitMatchesFloat64Reference([Values] QuantType qt, [ValueSource(nameof(FloatDTypes))] DType dtype,
        [ValueSource(nameof(GemvShapes))] (int Out, int In, int Blocksize) shape)
    {
        (int outF, int inF, int bs) = shape;
        float[] w = MakeInput(outF * inF, bs, seed: outF * 7 + inF);
        (byte[] packed, float[] absmax) = CpuReference.Quantize(qt, w, bs);
        float[] wDeq = CpuReference.Dequantize<float>(qt, packed, absmax, bs, outF * inF);   // fp32 weights the kernel uses
        float[] x0 = MakeInput(inF, 4096, seed: inF + 5);
        (object typedX, float[] x) = AsDType(x0, dtype);

        var reference = new double[outF];
        var absSum = new double[outF];
        for (int o = 0; o < outF; o++)
            for (int k = 0; k < inF; k++)
            {
                double p = (double)wDeq[(long)o * inF + k] * x[k];
                reference[o] += p;
                absSum[o] += Math.Abs(p);
            }

        switch (typedX)
        {
            case float[] xf:
            {
                var y = new float[outF];
                Ops.Gemv4bit<float>(qt, xf, packed, absmax, bs, y);
                // The weights are the same fp32 values, so only summation error remains: each lane sums inF/32
                // products in fp32, then 5 shuffle adds: |error| <= (inF/32 + 5 + 1 product rounding + 1) * 2^-24 * sum|w x|.
                for (int o = 0; o < outF; o++)
                    Assert.That(y[o], Is.EqualTo(reference[o]).Within((Math.Ceiling(inF / 32.0) + 7) * Math.Pow(2, -24) * absSum[o]), $"y[{o}]");
                break;
            }
            case BFloat16[] xb:
            {
                var y = new BFloat16[outF];
                Ops.Gemv4bit<BFloat16>(qt, xb, packed, absmax, bs, y);
                for (int o = 0; o < outF; o++)
                    Assert.That(UlpDistanceBf16(y[o].RawValue, BFloat16.FromSingle((float)reference[o]).RawValue), Is.LessThanOrEqualTo(1),
                        $"y[{o}] = {y[o]} vs {reference[o]}");
                break;
            }
            case Half[] xh:
            {
                var y = new Half[outF];
                Ops.Gemv4bit<Half>(qt, xh, packed, absmax, bs, y);
                for (int o = 0; o < outF; o++)
                    Assert.That(UlpDistanceF16(BitConverter.HalfToUInt16Bits(y[o]), BitConverter.HalfToUInt16Bits((Half)reference[o])),
                        Is.LessThanOrEqualTo(1), $"y[{o}] = {y[o]} vs {reference[o]}");
                break;
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Throughput (run by hand: --filter "Name~Throughput")
    // ------------------------------------------------------------------------------------------

    [Test, Explicit("throughput measurement, not a check")]
    public void DequantizeThroughput16M([Values(DType.F32, DType.BF16)] DType dtype)
    {
        const long n = 16L << 20;
        const int bs = 64;
        IGpu gpu = Gpu;
        DevicePtr packed = gpu.Alloc(n / 2), absmax = gpu.Alloc(n / bs * 4), output = gpu.Alloc(n * dtype.ElementSize());
        try
        {
            var bytes = new byte[n / 2];
            new Random(1).NextBytes(bytes);
            gpu.CopyToDevice<byte>(bytes, packed);
            gpu.CopyToDevice<float>(Enumerable.Repeat(0.5f, (int)(n / bs)).ToArray(), absmax);
            Ops.Dequantize4bit(QuantType.Nf4, dtype, packed, absmax, n, bs, output); // warm up
            gpu.Synchronize();
            const int reps = 3;
            var sw = Stopwatch.StartNew();
            for (int r = 0; r < reps; r++)
                Ops.Dequantize4bit(QuantType.Nf4, dtype, packed, absmax, n, bs, output);
            gpu.Synchronize();
            double seconds = sw.Elapsed.TotalSeconds / reps;
            TestContext.Out.WriteLine($"{Device} dequantize_4bit_nf4_{GpuQuantOps.DTypeSuffix(dtype)} 16M: " +
                $"{seconds * 1e3:F1} ms, {n / seconds / 1e6:F0} Melem/s");
            Assert.That(seconds, Is.GreaterThan(0));
        }
        finally
        {
            gpu.Free(packed);
            gpu.Free(absmax);
            gpu.Free(output);
        }
    }

    // ------------------------------------------------------------------------------------------

    /// <summary>Distance in units in the last place between two 16-bit floats of the same layout.</summary>
    private static int OrderedBits(ushort bits) => (bits & 0x8000) != 0 ? -(bits & 0x7FFF) : bits;

    private static int UlpDistanceBf16(ushort a, ushort b) => Math.Abs(OrderedBits(a) - OrderedBits(b));

    private static int UlpDistanceF16(ushort a, ushort b) => Math.Abs(OrderedBits(a) - OrderedBits(b));
}
