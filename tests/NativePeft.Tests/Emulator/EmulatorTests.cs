using System.Diagnostics;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Emulator;

/// <summary>
/// The CPU emulator (libnativepeft_emu + EmulatedGpu) against host references, through the
/// kernels/selftest.cu kernels. The library is part of every build: if it is missing these tests fail.
/// </summary>
[TestFixture]
public sealed class EmulatorTests
{
    private EmulatedGpu _gpu = null!;

    [OneTimeSetUp]
    public void CreateEmulator()
    {
        if (!EmulatedGpu.TryCreate(out EmulatedGpu? gpu, out string reason))
            Assert.Fail($"the CPU emulator is part of the build and must load: {reason}");
        _gpu = gpu!;
    }

    [OneTimeTearDown]
    public void DisposeEmulator() => _gpu?.Dispose();

    private DevicePtr Upload<T>(T[] data) where T : unmanaged
    {
        DevicePtr p = _gpu.Alloc((long)data.Length * System.Runtime.CompilerServices.Unsafe.SizeOf<T>());
        _gpu.CopyToDevice<T>(data, p);
        return p;
    }

    private T[] Download<T>(DevicePtr p, int count) where T : unmanaged
    {
        var result = new T[count];
        _gpu.CopyToHost<T>(p, result);
        return result;
    }

    private static float[] RandomFloats(int n, int seed, float lo = -1f, float hi = 1f)
    {
        var rng = new Random(seed);
        var x = new float[n];
        for (int i = 0; i < n; i++) x[i] = lo + (hi - lo) * rng.NextSingle();
        return x;
    }

    [Test]
    public void Properties_DescribeTheEmulator()
    {
        Assert.That(_gpu.Properties.Kind, Is.EqualTo(GpuKind.Emulated));
        Assert.That(_gpu.Properties.MultiprocessorCount, Is.GreaterThanOrEqualTo(1));
        Assert.That(_gpu.Properties.Name, Does.StartWith("NativePeft CPU emulator (")
            .And.Contain($"{_gpu.Properties.MultiprocessorCount} worker threads"));
        Assert.That((_gpu.Properties.ComputeCapabilityMajor, _gpu.Properties.ComputeCapabilityMinor), Is.EqualTo((8, 0)));
        Assert.That(_gpu.HasKernel("selftest_block_sum"), Is.True);
        Assert.That(_gpu.HasKernel("selftest_no_such_kernel"), Is.False);
    }

    [TestCase(256, 64)]
    [TestCase(1024, 7)]
    [TestCase(64, 300)]
    public void BlockSum_StaticSharedAndSyncthreads(int blockSize, int blocks)
    {
        const int n = 1 << 18;
        float[] x = RandomFloats(n, 1);
        double expected = x.Sum(v => (double)v);
        DevicePtr dx = Upload(x), dp = _gpu.Alloc(blocks * 4L);
        _gpu.Launch("selftest_block_sum", blocks, blockSize, 0, dx, dp, n);
        double actual = Download<float>(dp, blocks).Sum(v => (double)v);
        Assert.That(actual, Is.EqualTo(expected).Within(1e-3));
        _gpu.Free(dx);
        _gpu.Free(dp);
    }

    [TestCase(32)]
    [TestCase(48)]
    [TestCase(16)]
    [TestCase(256)]
    [TestCase(1000)]
    [TestCase(1024)]
    public void WarpSum_ShuffleDownAndXor_IncludingPartialWarps(int blockSize)
    {
        const int n = 100_003, blocks = 13;
        float[] x = RandomFloats(n, 2);
        DevicePtr dx = Upload(x), dp = _gpu.Alloc(blocks * 4L);
        _gpu.Launch("selftest_warp_sum", blocks, blockSize, 0, dx, dp, n);
        float[] partial = Download<float>(dp, blocks);
        for (int b = 0; b < blocks; b++)
        {
            double expected = 0;
            for (int i = b * blockSize; i < n; i += blocks * blockSize)
                for (int t = 0; t < blockSize && i + t < n; t++) expected += x[i + t];
            Assert.That(partial[b], Is.EqualTo(expected).Within(1e-3), $"block {b}");
        }
        _gpu.Free(dx);
        _gpu.Free(dp);
    }

    [Test]
    public void Shuffles_InAPartialWarp_FollowPtxLaneRules()
    {
        const int block = 48;  // warp 0: 32 lanes, warp 1: 16 lanes
        int[] input = Enumerable.Range(0, block).Select(i => 1000 + i * 7).ToArray();
        DevicePtr din = Upload(input), dout = _gpu.Alloc(3 * block * 4L);
        _gpu.Launch("selftest_shfl_lanes", 1, block, 0, din, dout);
        int[] o = Download<int>(dout, 3 * block);
        for (int t = 0; t < block; t++)
        {
            int warpBase = t / 32 * 32, lane = t % 32, lanes = Math.Min(32, block - warpBase);
            Assert.That(o[3 * t], Is.EqualTo(input[warpBase]), $"shfl idx 0, thread {t}");
            int x = lane ^ 1;
            Assert.That(o[3 * t + 1], Is.EqualTo(x < lanes ? input[warpBase + x] : input[t]), $"shfl xor 1, thread {t}");
            Assert.That(o[3 * t + 2], Is.EqualTo(lane == 0 ? input[t] : input[t - 1]), $"shfl up 1, thread {t}");
        }
        _gpu.Free(din);
        _gpu.Free(dout);
    }

    [TestCase(100, 70)]
    [TestCase(64, 64)]
    [TestCase(1, 33)]
    public void Transpose_TiledInSharedMemory_IsExact(int rows, int cols)
    {
        float[] a = RandomFloats(rows * cols, 3);
        DevicePtr din = Upload(a), dout = _gpu.Alloc(rows * cols * 4L);
        _gpu.Launch("selftest_transpose", new Dim3((uint)((cols + 31) / 32), (uint)((rows + 31) / 32)), new Dim3(32, 8), 0,
            din, dout, rows, cols);
        float[] t = Download<float>(dout, rows * cols);
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                Assert.That(t[c * rows + r], Is.EqualTo(a[r * cols + c]), $"({r},{c})");
        _gpu.Free(din);
        _gpu.Free(dout);
    }

    [Test]
    public void Histogram_SharedAndGlobalAtomicsAcrossBlocks_AreExact()
    {
        const int n = 100_000, bins = 16, blocks = 50;
        var rng = new Random(4);
        int[] values = Enumerable.Range(0, n).Select(_ => rng.Next(0, 64)).ToArray();
        DevicePtr dv = Upload(values), dh = _gpu.Alloc(bins * 4L), dt = _gpu.Alloc(4);
        _gpu.Memset(dh, 0, bins * 4L);
        _gpu.Memset(dt, 0, 4);
        _gpu.Launch("selftest_histogram", blocks, 256, 0, dv, n, dh, bins, dt);
        int[] hist = Download<int>(dh, bins);
        int[] expected = new int[bins];
        long quarterUnits = 0;
        foreach (int v in values) { expected[v % bins]++; quarterUnits += v; }
        Assert.That(hist, Is.EqualTo(expected));
        // Every partial sum is a multiple of 0.25 below 2^22: float addition is exact in any order.
        Assert.That(Download<float>(dt, 1)[0], Is.EqualTo(quarterUnits * 0.25f));
        _gpu.Free(dv);
        _gpu.Free(dh);
        _gpu.Free(dt);
    }

    [Test]
    public void Atomics_IntegerUnsignedAnd64BitAndFloatMaxViaCas_AreExact()
    {
        const int n = 50_000;
        var rng = new Random(5);
        int[] values = Enumerable.Range(0, n).Select(_ => rng.Next(-1_000_000, 1_000_000)).ToArray();
        float[] floats = RandomFloats(n, 6, -100f, 100f);
        DevicePtr dv = Upload(values), df = Upload(floats);
        DevicePtr ints = Upload(new[] { 0, int.MinValue, int.MaxValue, 0, 0, 0 });
        DevicePtr sum64 = Upload(new ulong[] { 0 });
        DevicePtr fmax = Upload(new[] { float.NegativeInfinity });
        DevicePtr uints = Upload(new[] { 0u, 0xFFFFFFFFu });
        _gpu.Launch("selftest_atomics", 37, 128, 0, dv, df, n, ints, sum64, fmax, uints);

        int or = 0, xor = 0;
        ulong s64 = 0;
        uint umax = 0, and = 0xFFFFFFFFu;
        foreach (int v in values)
        {
            or |= 1 << (v & 31);
            xor ^= v;
            s64 += (uint)v;
            umax = Math.Max(umax, (uint)v);
            and &= ~(1u << (v & 31));
        }
        Assert.That(Download<int>(ints, 6), Is.EqualTo(new[] { n, values.Max(), values.Min(), or, -n, xor }));
        Assert.That(Download<ulong>(sum64, 1)[0], Is.EqualTo(s64));
        Assert.That(Download<float>(fmax, 1)[0], Is.EqualTo(floats.Max()));
        Assert.That(Download<uint>(uints, 2), Is.EqualTo(new[] { umax, and }));
        foreach (DevicePtr p in new[] { dv, df, ints, sum64, fmax, uints }) _gpu.Free(p);
    }

    [Test]
    public void DynamicSharedMemory_IsPerBlockAnd16ByteAligned()
    {
        const int n = 1000, block = 128, blocks = (n + block - 1) / block;
        float[] input = RandomFloats(n, 7);
        DevicePtr din = Upload(input), dout = _gpu.Alloc(n * 4L), mis = Upload(new[] { 0 });
        _gpu.Memset(dout, 0, n * 4L);
        _gpu.Launch("selftest_dynamic_smem", blocks, block, block * 4, din, dout, n, mis);
        float[] o = Download<float>(dout, n);
        for (int j = 0; j < n; j++)
        {
            int b = j / block, i = b * block + (block - 1 - j % block);
            Assert.That(o[j], Is.EqualTo(i < n ? input[i] : 0f), $"element {j}");
        }
        Assert.That(Download<int>(mis, 1)[0], Is.Zero, "dynamic shared memory misaligned");
        foreach (DevicePtr p in new[] { din, dout, mis }) _gpu.Free(p);
    }

    [Test]
    public void Votes_BallotAnyAllAndSyncthreadsCount_AreExact()
    {
        const int block = 48, blocks = 4, warpsPerBlock = 2;
        var rng = new Random(8);
        int[] pred = new int[blocks * block];
        for (int i = 0; i < pred.Length; i++) pred[i] = rng.Next(0, 3) == 0 ? 0 : rng.Next(1, 5);
        for (int i = 0; i < 32; i++) pred[i] = 1;          // block 0 warp 0: all true
        for (int i = 48; i < 80; i++) pred[i] = 0;         // block 1 warp 0: all false
        for (int i = 3 * 48 + 32; i < 4 * 48; i++) pred[i] = 7; // block 3 partial warp: all true
        DevicePtr dp = Upload(pred), db = _gpu.Alloc(blocks * warpsPerBlock * 4L), dany = _gpu.Alloc(blocks * warpsPerBlock * 4L),
            dall = _gpu.Alloc(blocks * warpsPerBlock * 4L), dcount = _gpu.Alloc(blocks * 4L);
        _gpu.Launch("selftest_vote", blocks, block, 0, dp, db, dany, dall, dcount);
        uint[] ballots = Download<uint>(db, blocks * warpsPerBlock);
        int[] anys = Download<int>(dany, blocks * warpsPerBlock), alls = Download<int>(dall, blocks * warpsPerBlock);
        int[] counts = Download<int>(dcount, blocks);
        for (int b = 0; b < blocks; b++)
        {
            for (int w = 0; w < warpsPerBlock; w++)
            {
                int lanes = Math.Min(32, block - w * 32);
                uint expected = 0;
                for (int l = 0; l < lanes; l++) if (pred[b * block + w * 32 + l] != 0) expected |= 1u << l;
                uint all = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
                int k = b * warpsPerBlock + w;
                Assert.That(ballots[k], Is.EqualTo(expected), $"ballot block {b} warp {w}");
                Assert.That(anys[k], Is.EqualTo(expected != 0 ? 1 : 0), $"any block {b} warp {w}");
                Assert.That(alls[k], Is.EqualTo(expected == all ? 1 : 0), $"all block {b} warp {w}");
            }
            Assert.That(counts[b], Is.EqualTo(pred.Skip(b * block).Take(block).Count(p => p != 0)), $"count block {b}");
        }
        Assert.That(alls[0], Is.EqualTo(1));
        Assert.That(anys[2], Is.EqualTo(0));
        Assert.That(alls[7], Is.EqualTo(1));
        foreach (DevicePtr p in new[] { dp, db, dany, dall, dcount }) _gpu.Free(p);
    }

    [Test]
    public void Indices_MultiDimensionalGridAndBlock()
    {
        var grid = new Dim3(3, 2, 2);
        var block = new Dim3(4, 2, 3);
        int threads = (int)(grid.Count * block.Count);
        DevicePtr d = _gpu.Alloc(threads * 6 * 4L);
        _gpu.Launch("selftest_indices", grid, block, 0, d);
        int[] o = Download<int>(d, threads * 6);
        int t = 0;
        for (int bz = 0; bz < 2; bz++)
        for (int by = 0; by < 2; by++)
        for (int bx = 0; bx < 3; bx++)
        for (int tz = 0; tz < 3; tz++)
        for (int ty = 0; ty < 2; ty++)
        for (int tx = 0; tx < 4; tx++, t++)
            Assert.That(o.Skip(6 * t).Take(6), Is.EqualTo(new[] { bx, by, bz, tx, ty, tz }), $"thread {t}");
        _gpu.Free(d);
    }

    // ---------------------------------------------------------------- bf16 / fp16 conversions

    /// <summary>float → bf16, round to nearest even, chosen by comparing distances in double.</summary>
    private static ushort ReferenceBf16(float f)
    {
        if (float.IsNaN(f)) return 0x7FFF;  // CUDA's canonical NaN
        uint bits = BitConverter.SingleToUInt32Bits(f);
        uint lo = bits & 0xFFFF0000u;                 // truncated toward zero
        if (lo == bits) return (ushort)(bits >> 16);
        uint hi = lo + 0x10000u;                      // next bf16 away from zero (may be inf)
        double x = Math.Abs((double)f);
        double dlo = x - Math.Abs((double)BitConverter.UInt32BitsToSingle(lo));
        double dhi = Math.Abs((double)BitConverter.UInt32BitsToSingle(hi)) - x;
        if ((hi & 0x7FFFFFFFu) == 0x7F800000u)
            dhi = Math.Pow(2, 128) - x;               // inf sits where the next finite step would be
        if (dlo < dhi) return (ushort)(lo >> 16);
        if (dhi < dlo) return (ushort)(hi >> 16);
        return ((lo >> 16) & 1) == 0 ? (ushort)(lo >> 16) : (ushort)(hi >> 16);
    }

    /// <summary>float → fp16: System.Half's IEEE conversion (round to nearest even), CUDA's canonical NaN.</summary>
    private static ushort ReferenceHalf(float f) =>
        float.IsNaN(f) ? (ushort)0x7FFF : BitConverter.HalfToUInt16Bits((Half)f);

    private static float ReferenceHalfToFloat(ushort h)
    {
        Half v = BitConverter.UInt16BitsToHalf(h);
        return Half.IsNaN(v) ? BitConverter.UInt32BitsToSingle(0x7FFFFFFF) : (float)v;
    }

    private static float[] ConversionInputs()
    {
        var rng = new Random(9);
        var list = new List<float>();
        for (int i = 0; i < 20000; i++) list.Add(BitConverter.UInt32BitsToSingle((uint)rng.NextInt64(0, 1L << 32)));
        for (int i = 0; i < 20000; i++) list.Add((rng.NextSingle() - 0.5f) * 200000f);
        for (int i = 0; i < 5000; i++) list.Add((rng.NextSingle() - 0.5f) * 1e-4f);
        // bf16 ties: low 16 bits exactly 0x8000, both parities; fp16 ties: low 13 bits exactly 0x1000.
        for (int i = 0; i < 3000; i++)
        {
            uint r = (uint)rng.NextInt64(0, 1L << 32);
            list.Add(BitConverter.UInt32BitsToSingle((r & 0xFFFF0000u) | 0x8000u));
            list.Add(BitConverter.UInt32BitsToSingle((r & 0x8FFFE000u) | 0x30000000u | 0x1000u));
        }
        list.AddRange(new[]
        {
            0f, -0f, 1f, -1f, float.Epsilon, float.MaxValue, float.MinValue, float.PositiveInfinity,
            float.NegativeInfinity, float.NaN, 65504f, 65519.99f, 65520f, 1e-8f, 5.9604645e-8f,
        });
        return list.ToArray();
    }

    [Test]
    public void Bf16Conversions_MatchRoundToNearestEven()
    {
        float[] input = ConversionInputs();
        (ushort[] bits, ushort[] bitsRn, float[] back) = RunConversion("selftest_bf16_convert", input);
        for (int i = 0; i < input.Length; i++)
        {
            ushort expected = ReferenceBf16(input[i]);
            Assert.That(bits[i], Is.EqualTo(expected), $"__float2bfloat16(0x{BitConverter.SingleToUInt32Bits(input[i]):X8})");
            Assert.That(bitsRn[i], Is.EqualTo(expected), $"__float2bfloat16_rn(0x{BitConverter.SingleToUInt32Bits(input[i]):X8})");
            Assert.That(BitConverter.SingleToUInt32Bits(back[i]), Is.EqualTo((uint)expected << 16), "__bfloat162float");
        }
    }

    [Test]
    public void HalfConversions_MatchIeeeRoundToNearestEven()
    {
        float[] input = ConversionInputs();
        (ushort[] bits, ushort[] bitsRn, float[] back) = RunConversion("selftest_half_convert", input);
        for (int i = 0; i < input.Length; i++)
        {
            ushort expected = ReferenceHalf(input[i]);
            Assert.That(bits[i], Is.EqualTo(expected), $"__float2half(0x{BitConverter.SingleToUInt32Bits(input[i]):X8})");
            Assert.That(bitsRn[i], Is.EqualTo(expected), $"__float2half_rn(0x{BitConverter.SingleToUInt32Bits(input[i]):X8})");
            Assert.That(BitConverter.SingleToUInt32Bits(back[i]),
                Is.EqualTo(BitConverter.SingleToUInt32Bits(ReferenceHalfToFloat(expected))), "__half2float");
        }
    }

    [TestCase(0x3F800000u, (ushort)0x3F80, TestName = "bf16 1.0")]
    [TestCase(0x3F808000u, (ushort)0x3F80, TestName = "bf16 tie rounds down to even")]
    [TestCase(0x3F818000u, (ushort)0x3F82, TestName = "bf16 tie rounds up to even")]
    [TestCase(0x3F808001u, (ushort)0x3F81, TestName = "bf16 above tie rounds up")]
    [TestCase(0xBF818000u, (ushort)0xBF82, TestName = "bf16 negative tie")]
    [TestCase(0x7F7FFFFFu, (ushort)0x7F80, TestName = "bf16 float max rounds to inf")]
    [TestCase(0x7F800000u, (ushort)0x7F80, TestName = "bf16 inf")]
    [TestCase(0xFF800000u, (ushort)0xFF80, TestName = "bf16 -inf")]
    [TestCase(0x7FC00000u, (ushort)0x7FFF, TestName = "bf16 NaN is canonical")]
    [TestCase(0xFFFFFFFFu, (ushort)0x7FFF, TestName = "bf16 negative NaN payload is canonical")]
    [TestCase(0x7F800001u, (ushort)0x7FFF, TestName = "bf16 NaN with low payload stays NaN")]
    [TestCase(0x00000001u, (ushort)0x0000, TestName = "bf16 tiny subnormal to zero")]
    [TestCase(0x80000000u, (ushort)0x8000, TestName = "bf16 -0")]
    public void Bf16_HandPickedBitPatterns(uint floatBits, ushort expected)
    {
        (ushort[] bits, _, _) = RunConversion("selftest_bf16_convert", new[] { BitConverter.UInt32BitsToSingle(floatBits) });
        Assert.That(bits[0], Is.EqualTo(expected));
    }

    [TestCase(1.0f, (ushort)0x3C00, TestName = "half 1.0")]
    [TestCase(65504f, (ushort)0x7BFF, TestName = "half max")]
    [TestCase(65519.99f, (ushort)0x7BFF, TestName = "half just below the overflow tie")]
    [TestCase(65520f, (ushort)0x7C00, TestName = "half 65520 rounds to inf")]
    [TestCase(-65520f, (ushort)0xFC00, TestName = "half -65520 rounds to -inf")]
    [TestCase(5.9604645e-8f, (ushort)0x0001, TestName = "half smallest subnormal 2^-24")]
    [TestCase(2.9802322e-8f, (ushort)0x0000, TestName = "half 2^-25 ties to zero")]
    [TestCase(8.940697e-8f, (ushort)0x0002, TestName = "half 1.5 * 2^-24 ties to even 2")]
    [TestCase(6.1035156e-5f, (ushort)0x0400, TestName = "half smallest normal 2^-14")]
    [TestCase(6.0975552e-5f, (ushort)0x03FF, TestName = "half largest subnormal")]
    [TestCase(1.00048828125f, (ushort)0x3C00, TestName = "half tie 1 + 2^-11 rounds to even")]
    [TestCase(1.00146484375f, (ushort)0x3C02, TestName = "half tie 1 + 3 * 2^-11 rounds up to even")]
    [TestCase(float.PositiveInfinity, (ushort)0x7C00, TestName = "half inf")]
    [TestCase(float.NaN, (ushort)0x7FFF, TestName = "half NaN is canonical")]
    [TestCase(-0f, (ushort)0x8000, TestName = "half -0")]
    public void Half_HandPickedValues(float value, ushort expected)
    {
        (ushort[] bits, _, float[] back) = RunConversion("selftest_half_convert", new[] { value });
        Assert.That(bits[0], Is.EqualTo(expected));
        if (!float.IsNaN(value) && Math.Abs(value) <= 65504f)
            Assert.That(back[0], Is.EqualTo(value).Within(Math.Abs(value) * 1e-3 + 6e-8));
    }

    private (ushort[] Bits, ushort[] BitsRn, float[] Back) RunConversion(string kernel, float[] input)
    {
        int n = input.Length;
        DevicePtr din = Upload(input), dbits = _gpu.Alloc(n * 2L), drn = _gpu.Alloc(n * 2L), dback = _gpu.Alloc(n * 4L);
        _gpu.Launch(kernel, (n + 255) / 256, 256, 0, din, dbits, drn, dback, n);
        var result = (Download<ushort>(dbits, n), Download<ushort>(drn, n), Download<float>(dback, n));
        foreach (DevicePtr p in new[] { din, dbits, drn, dback }) _gpu.Free(p);
        return result;
    }

    // ---------------------------------------------------------------- errors

    [Test]
    public void UnknownKernel_ThrowsNamingIt()
    {
        var e = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_does_not_exist", 1, 32, 0));
        Assert.That(e!.Message, Does.Contain("selftest_does_not_exist"));
        Assert.That(e.KernelName, Is.EqualTo("selftest_does_not_exist"));
    }

    [Test]
    public void BlockOf2048Threads_IsRejected()
    {
        DevicePtr d = _gpu.Alloc(2048 * 6 * 4L);
        var e = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_indices", 1, 2048, 0, d));
        Assert.That(e!.Message, Does.Contain("selftest_indices").And.Contain("1024"));
        Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_indices", new Dim3(1, 0), 32, 0, d));
        _gpu.Free(d);
    }

    [Test]
    public void WrongArguments_AreRejectedBeforeLaunch()
    {
        DevicePtr d = _gpu.Alloc(64);
        var count = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_indices", 1, 1, 0, d, 3));
        Assert.That(count!.Message, Does.Contain("takes 1 parameters"));
        var size = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_indices", 1, 1, 0, 5));
        Assert.That(size!.Message, Does.Contain("parameter 0 is 8 bytes"));
        _gpu.Free(d);
    }

    [Test]
    public void Trap_BecomesAnExceptionNamingTheThread_AndTheEmulatorStaysUsable()
    {
        DevicePtr d = _gpu.Alloc(32 * 4);
        var e = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_trap", 1, 32, 0, 1, d));
        Assert.That(e!.Message, Does.Contain("__trap").And.Contain("thread (5,0,0)"));
        _gpu.Launch("selftest_trap", 1, 32, 0, 0, d);
        Assert.That(Download<int>(d, 32), Is.EqualTo(Enumerable.Range(0, 32).ToArray()));
        _gpu.Free(d);
    }

    [Test]
    public void Deadlock_IsReportedNotHung()
    {
        DevicePtr d = _gpu.Alloc(32 * 4);
        var e = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_deadlock", 1, 32, 0, d));
        Assert.That(e!.Message, Does.Contain("deadlock"));
        BlockSum_StaticSharedAndSyncthreads(256, 4);  // fibers left inside the kernel were recycled cleanly
        _gpu.Free(d);
    }

    // ---------------------------------------------------------------- memory

    [Test]
    public void Memory_IsTrackedWithPeakAndBudget()
    {
        using EmulatedGpu gpu = EmulatedGpu.Create(memoryBudgetBytes: 1 << 20);
        Assert.That(gpu.MemoryInfo(), Is.EqualTo((1L << 20, 1L << 20)));
        DevicePtr a = gpu.Alloc(1000), b = gpu.Alloc(3000);
        Assert.That(a.Address % 64, Is.Zero);
        Assert.That(b.Address % 64, Is.Zero);
        Assert.That(gpu.AllocatedBytes, Is.EqualTo(4000));
        gpu.Free(a);
        Assert.That(gpu.AllocatedBytes, Is.EqualTo(3000));
        Assert.That(gpu.PeakAllocatedBytes, Is.EqualTo(4000));
        Assert.That(gpu.MemoryInfo(), Is.EqualTo(((1L << 20) - 3000, 1L << 20)));
        gpu.ResetPeak();
        Assert.That(gpu.PeakAllocatedBytes, Is.EqualTo(3000));
        Assert.Throws<ArgumentException>(() => gpu.Free(a));
        Assert.Throws<ArgumentException>(() => gpu.Free(new DevicePtr(b.Address + 64)));
        Assert.Throws<OutOfMemoryException>(() => gpu.Alloc(1 << 20));
        DevicePtr m = gpu.AllocManaged(128);
        gpu.Memset(m, 0xAB, 128);
        gpu.CopyDeviceToDevice(m, b, 128);
        byte[] back = new byte[128];
        gpu.CopyToHost<byte>(b, back);
        Assert.That(back, Is.All.EqualTo(0xAB));
        gpu.Free(m);
        gpu.Free(b);
        Assert.That(gpu.AllocatedBytes, Is.Zero);
    }

    // ---------------------------------------------------------------- timings (for docs/benchmarks.md)

    [Test, Explicit("benchmark: prints timings")]
    public void Benchmark_ElementwiseAndBlockReduction()
    {
        const int n = 1 << 20;
        DevicePtr x = Upload(RandomFloats(n, 10)), y = Upload(RandomFloats(n, 11)), p = _gpu.Alloc(4096 * 4);
        double Time(Action a)
        {
            a();
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < 5; i++) a();
            return sw.Elapsed.TotalMilliseconds / 5;
        }
        double axpy = Time(() => _gpu.Launch("selftest_axpy", n / 256, 256, 0, n, 2f, x, y));
        double sum = Time(() => _gpu.Launch("selftest_block_sum", n / 256, 256, 0, x, p, n));
        double empty = Time(() => _gpu.Launch("selftest_axpy", 1, 1, 0, 0, 2f, x, y));
        // block_sum: 9 __syncthreads per thread (1 + log2 256).
        double perBarrier = (sum - axpy) * 1e6 / ((double)n * 9);
        TestContext.Out.WriteLine($"{_gpu.Properties.Name}: axpy 1M {axpy:F2} ms; block_sum 1M/256 {sum:F2} ms " +
                                  $"(~{perBarrier:F1} ns per thread per __syncthreads); empty launch {empty * 1000:F1} us");
        foreach (DevicePtr d in new[] { x, y, p }) _gpu.Free(d);
    }
}
