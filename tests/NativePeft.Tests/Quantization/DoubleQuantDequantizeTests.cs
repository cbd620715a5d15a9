using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Planning;
using NativePeft.Quantization;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Quantization;

/// <summary>
/// bitsandbytes' double-quantized absmax kept on the device: <see cref="IOps.Dequantize4bit"/> through the nested state
/// (CpuOps: decoded per call; GpuOps: kernel dequantize_4bit_dq) must be bit-identical to dequantizing with the absmax
/// decoded first (<see cref="DoubleQuantState.Decode()"/>, then the C# reference <see cref="Quant4Bit.Dequantize(ReadOnlySpan{byte}, ReadOnlySpan{float}, Span{float}, QuantType, int)"/>),
/// for the whole weight and for a row range past the first nested block of 256; the loader keeps the state; the
/// plan's quantization-state row is the docs/quant-contract.md layout, computed here by hand.
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulator")]
[TestFixture("cuda")]
[Parallelizable(ParallelScope.None)]
public class DoubleQuantDequantizeTests(string device)
{
    private IOps CreateOps()
    {
        if (device == "cpu") return new CpuOps();
        if (device == "emulator") return new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
        var cuda = TestGpus.TryCreateCuda(out string reason);
        if (cuda is null) Assert.Ignore("no CUDA device: " + reason);
        return new GpuOps(cuda!, ownsGpu: true);
    }

    private static Tensor Upload<T>(IOps ops, T[] values, DType dtype) where T : unmanaged
    {
        var t = ops.Memory.Allocate(dtype, values.Length);
        ops.Upload<T>(values, t);
        return t;
    }

    [TestCase(QuantType.Nf4, 64)]
    [TestCase(QuantType.Fp4, 64)]
    [TestCase(QuantType.Nf4, 32)]
    public void NestedStateDequantizesBitIdenticallyToTheDecodedAbsmax(QuantType quantType, int blocksize)
    {
        // 600 rows of 64: 1200 blocks of 32 or 600 of 64 -> 3 or 5 nested blocks; outliers spread the absmax.
        const int rows = 600, cols = 64;
        var rng = new Random(7);
        var values = new float[rows * cols];
        for (int i = 0; i < values.Length; i++) values[i] = (float)((rng.NextDouble() * 2 - 1) * (i % 97 == 0 ? 8 : 1) * (1 + i / 9000));
        var q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values), [rows, cols], quantType, blocksize, doubleQuant: true, DType.F32);
        var nested = q.State.Nested!;
        Assert.That(nested.NestedAbsmax, Has.Length.GreaterThan(2), "more than two nested blocks");
        var decoded = nested.Decode();

        using var ops = CreateOps();
        var packed = Upload(ops, q.Packed, DType.U8);
        var plain = new QuantizedWeight
        {
            Packed = packed, Absmax = Upload(ops, decoded, DType.F32), QuantType = quantType, Blocksize = blocksize, Rows = rows, Columns = cols,
        };
        var dq = new QuantizedWeight
        {
            Packed = packed, QuantType = quantType, Blocksize = blocksize, Rows = rows, Columns = cols,
            DoubleQuant = new DoubleQuantAbsmax
            {
                Absmax = Upload(ops, nested.QuantizedAbsmax, DType.U8), NestedAbsmax = Upload(ops, nested.NestedAbsmax, DType.F32),
                NestedQuantMap = Upload(ops, nested.NestedQuantMap, DType.F32), NestedOffset = Upload(ops, new[] { nested.Offset }, DType.F32),
            },
        };
        // The C# reference on the decoded absmax.
        var reference = new float[values.Length];
        Quant4Bit.Dequantize(q.Packed, decoded, reference, quantType, blocksize);

        foreach (var (first, count) in new[] { (0, rows), (520, 70) }) // 520·64/blocksize ≥ 256: a later nested block
        {
            var a = ops.Memory.Allocate(DType.F32, count, cols);
            var b = ops.Memory.Allocate(DType.F32, count, cols);
            ops.Dequantize4bit(plain, first, a);
            ops.Dequantize4bit(dq, first, b);
            var ha = new float[count * cols];
            var hb = new float[count * cols];
            ops.Download<float>(a, ha);
            ops.Download<float>(b, hb);
            var expected = reference.AsSpan(first * cols, count * cols).ToArray();
            Assert.That(Bits(hb), Is.EqualTo(Bits(ha)), $"rows [{first}, {first + count}): nested vs decoded absmax, bit for bit");
            Assert.That(Bits(hb), Is.EqualTo(Bits(expected)), $"rows [{first}, {first + count}): vs the C# reference");
            ops.Memory.Free(a);
            ops.Memory.Free(b);
        }
    }

    private static int[] Bits(float[] v) => Array.ConvertAll(v, BitConverter.SingleToInt32Bits);

    /// <summary>
    /// The kernels themselves, every output dtype: dequantize_4bit_dq against dequantize_absmax_dq (absmax decoded on the
    /// device, bitsandbytes' order) followed by dequantize_4bit — the same bytes, from block 0 and from a later block.
    /// </summary>
    [TestCase(QuantType.Nf4, DType.F32)]
    [TestCase(QuantType.Nf4, DType.BF16)]
    [TestCase(QuantType.Fp4, DType.F16)]
    public void TheKernelMatchesDecodingOnTheDeviceFirst(QuantType quantType, DType dtype)
    {
        if (device == "cpu") Assert.Ignore("kernels: the emulator and CUDA fixtures");
        using var ops = CreateOps();
        var quant = new GpuQuantOps(((GpuOps)ops).Gpu);
        const int blocksize = 64, n = 700 * blocksize - 6; // 700 blocks (3 nested), the last one partial
        var rng = new Random(11);
        var values = new float[n];
        for (int i = 0; i < n; i++) values[i] = (float)((rng.NextDouble() * 2 - 1) * (1 + i / 5000.0));
        var q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values), [n], quantType, blocksize, doubleQuant: true, DType.F32);
        var nested = q.State.Nested!;
        var packed = Upload(ops, q.Packed, DType.U8);
        var codes = Upload(ops, nested.QuantizedAbsmax, DType.U8);
        var map = Upload(ops, nested.NestedQuantMap, DType.F32);
        var nestedAbsmax = Upload(ops, nested.NestedAbsmax, DType.F32);
        var offset = Upload(ops, new[] { nested.Offset }, DType.F32);
        var absmax = ops.Memory.Allocate(DType.F32, nested.Count);
        quant.DequantizeAbsmaxDoubleQuant(codes.Data, map.Data, nestedAbsmax.Data, nested.Offset, absmax.Data, nested.Count);

        foreach (long firstBlock in new long[] { 0, 517 })
        {
            long first = firstBlock * blocksize, count = n - first;
            var a = ops.Memory.Allocate(dtype, checked((int)count));
            var b = ops.Memory.Allocate(dtype, checked((int)count));
            quant.Dequantize4bit(quantType, dtype, packed.Data.Offset(first / 2), absmax.Data.Offset(firstBlock * sizeof(float)), count, blocksize, a.Data);
            quant.Dequantize4bitDoubleQuant(quantType, dtype, packed.Data.Offset(first / 2), codes.Data, map.Data, nestedAbsmax.Data, offset.Data,
                firstBlock, count, blocksize, b.Data);
            var ha = new byte[a.Bytes];
            var hb = new byte[b.Bytes];
            ops.Download<byte>(new Tensor(a.Data, DType.U8, ha.Length), ha);
            ops.Download<byte>(new Tensor(b.Data, DType.U8, hb.Length), hb);
            Assert.That(hb, Is.EqualTo(ha), $"{dtype} from block {firstBlock}");
            Assert.That(hb.Any(x => x != 0), Is.True, "not all zero");
        }
        var decoded = new float[nested.Count];
        ops.Download<float>(absmax, decoded);
        Assert.That(Bits(decoded), Is.EqualTo(Bits(nested.Decode())), "the device decode equals the C# decode");
    }

    [Test]
    public void TheLoaderKeepsTheNestedStateAndItsBytesAreThePlansRow()
    {
        var config = new LlamaConfig
        {
            HiddenSize = 64, IntermediateSize = 128, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
            NumHiddenLayers = 2, VocabSize = 300, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
        };
        var options = new PlanOptions { Method = FineTuneMethod.Qlora, Batch = 1, Seq = 8, Rank = 4, Device = device == "cpu" ? PlanDevice.Cpu : PlanDevice.Gpu };
        var plan = MemoryPlan.Compute(config, options);
        // docs/quant-contract.md per projection: 1 byte per block of 64 + fp32 per 256 blocks + the fp32 256-entry map + the fp32 offset.
        // q, o [64, 64]: 64 blocks -> 64 + 4 + 1024 + 4 = 1096; k, v [32, 64]: 32 blocks -> 1064;
        // gate, up [128, 64] and down [64, 128]: 128 blocks -> 1160. Two layers.
        const long byHand = 2 * (2 * 1096 + 2 * 1064 + 3 * 1160);
        Assert.That(plan.QuantizationStateBytes, Is.EqualTo(byHand));

        using var ops = CreateOps();
        using var model = LlamaModel.CreateRandom(config, ops, options.ToModelOptions(seed: 1), weightSeed: 2);
        long measured = 0;
        foreach (var (_, _, qw) in model.BaseParameters())
        {
            if (qw is null) continue;
            Assert.That(qw.Absmax, Is.Null, "no decoded absmax on the device");
            var s = qw.DoubleQuant!;
            Assert.That(s.Absmax.DType, Is.EqualTo(DType.U8));
            measured += s.Absmax.Bytes + s.NestedAbsmax.Bytes + s.NestedQuantMap.Bytes + s.NestedOffset.Bytes;
        }
        Assert.That(measured, Is.EqualTo(byHand));
        Assert.That(model.ParameterBytes, Is.EqualTo(plan.ParameterBytes));
    }

    [Test]
    public void Llama2SevenBQuantizationStateIsTheFormatsMdFormula()
    {
        if (device != "cpu") Assert.Ignore("a plan only (no device): runs once, in the cpu fixture");
        var plan = MemoryPlan.Compute(LlamaConfig.Preset("llama2-7b"), new PlanOptions { Method = FineTuneMethod.Qlora, Seq = 16 });
        // q, k, v, o [4096, 4096]: 262144 blocks of 64 -> 262144 + 4·1024 + 1024 + 4 = 267268 bytes;
        // gate, up, down 4096·11008: 704512 blocks -> 704512 + 4·2752 + 1028 = 716548; 32 layers.
        Assert.That(plan.QuantizationStateBytes, Is.EqualTo(32L * (4 * 267268 + 3 * 716548)));
        // ≈ 0.127 bits per projection parameter (docs/quant-contract.md: 8/64 + 32/(64·256), plus the per-tensor map).
        double parameters = 32.0 * (4 * 4096.0 * 4096 + 3 * 4096.0 * 11008);
        Assert.That(plan.QuantizationStateBytes * 8 / parameters, Is.EqualTo(8.0 / 64 + 32.0 / (64 * 256)).Within(0.001));
    }
}
