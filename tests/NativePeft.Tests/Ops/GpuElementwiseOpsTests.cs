using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// kernels/elementwise.cu through <see cref="GpuElementwiseOps"/>, on the emulator always and on CUDA when present.
/// Every op except the sum of squares is one IEEE operation (or one fma) per element, so the oracle is the same
/// operation in C# float arithmetic and the comparison is bit for bit: fill, casts (vs <see cref="BFloat16"/>), add,
/// axpy (vs <see cref="MathF.FusedMultiplyAdd"/>), scale, apply_mask_scale. The dropout mask equals its C# twin
/// <see cref="GpuElementwiseOps.DropoutMaskHost"/> bit for bit; the Philox generator is checked against Random123's
/// published known-answer vectors, and the keep fraction against a 5-sigma binomial bound. The sum of squares is
/// checked against a compensated (Neumaier) float64 sum: each square is exact in double, so the error is the double
/// additions' only, |Δ| ≤ (n_serial + 18 + ceil(blocks/256))·2⁻⁵³·Σx² (n_serial = elements per thread; 8 tree levels
/// per pass; 2 for the oracle).
/// Sizes include n = 70001, more than the largest grid times 256 on the emulator, so the grid-stride loops wrap.
/// </summary>
public sealed class GpuElementwiseOpsTests(string device) : DeviceFixture<GpuElementwiseOps>(device)
{
    protected override GpuElementwiseOps CreateOps(IGpu gpu) => new(gpu);

    protected override IEnumerable<string> RequiredKernels =>
        ["fill_bf16", "cast_f32_to_bf16", "dropout_mask", "sum_squares_f32", "reduce_sum_f64"];

    private static readonly int[] Sizes = [1, 257, 70001];

    private static BFloat16[] ToBf16(float[] x) => x.Select(BFloat16.FromSingle).ToArray();

    // ------------------------------------------------------------------------------------------
    // fill, casts
    // ------------------------------------------------------------------------------------------

    [Test]
    public void FillIsBitExact([ValueSource(nameof(Sizes))] int n)
    {
        foreach (float value in new[] { 0.1f, -3.0e38f, float.NegativeInfinity, 1.00390625f /* bf16 tie */, -0.0f })
        {
            DevicePtr f = Alloc(n * 4L), b = Alloc(n * 2L);
            Ops.Fill(DType.F32, f, n, value);
            Ops.Fill(DType.BF16, b, n, value);
            AssertBitsEqual(Download<float>(f, n), Enumerable.Repeat(value, n).ToArray(), $"fill_f32({value})");
            AssertBitsEqual(Download<BFloat16>(b, n), Enumerable.Repeat(BFloat16.FromSingle(value), n).ToArray(), $"fill_bf16({value})");
        }
    }

    [Test]
    public void FillWritesOnlyNElements()
    {
        DevicePtr f = Upload(new float[] { 1, 2, 3, 4, 5 });
        Ops.Fill(DType.F32, f, 3, 9f);
        Ops.Fill(DType.F32, f, 0, 7f);
        Assert.That(Download<float>(f, 5), Is.EqualTo(new float[] { 9, 9, 9, 4, 5 }));
    }

    /// <summary>Ties, the rounding carry into the exponent, overflow to inf, denormals, signed zeros, infinities.</summary>
    private static float[] CastEdgeCases() =>
    [
        .. new uint[]
        {
            0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x3FFF8000, 0x7F7FFFFF, 0x7F7F7FFF, 0xFF7F8000,
            0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x00000000, 0x80000000, 0x7F800000, 0xFF800000,
        }.Select(BitConverter.UInt32BitsToSingle),
    ];

    [Test]
    public void CastF32ToBf16IsRneBitExact([ValueSource(nameof(Sizes))] int n)
    {
        float[] x = [.. CastEdgeCases(), .. Normal(n, n, 100.0)];
        var rng = new Random(n);
        for (int i = 0; i < n / 3; i++) x[CastEdgeCases().Length + i] = BitConverter.UInt32BitsToSingle((uint)rng.NextInt64(0, 0x7F800000) | (uint)(rng.Next(2) << 31));
        DevicePtr dX = Upload(x), dY = Alloc(x.Length * 2L);
        Ops.CastF32ToBf16(dX, dY, x.Length);
        AssertBitsEqual(Download<BFloat16>(dY, x.Length), ToBf16(x), "cast_f32_to_bf16 vs BFloat16.FromSingle");
    }

    [Test]
    public void CastF32ToBf16NaNStaysNaN()
    {
        // CUDA's cvt.rn.bf16.f32 (and the emulator) return the canonical NaN 0x7FFF; BFloat16.FromSingle keeps the
        // payload's top bits. Both are NaN; the bits differ by design, so only NaN-ness is compared.
        float[] x = [.. new uint[] { 0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FFFFFFF }.Select(BitConverter.UInt32BitsToSingle)];
        DevicePtr dX = Upload(x), dY = Alloc(x.Length * 2L);
        Ops.CastF32ToBf16(dX, dY, x.Length);
        BFloat16[] y = Download<BFloat16>(dY, x.Length);
        Assert.That(y.Select(v => v.IsNaN), Is.All.True);
        Assert.That(y.Select(v => v.RawValue), Is.All.EqualTo((ushort)0x7FFF), "canonical NaN, as CUDA's cvt.rn.bf16.f32");
    }

    [Test]
    public void CastBf16ToF32IsExact()
    {
        var all = new BFloat16[65536];
        for (int i = 0; i < all.Length; i++) all[i] = BFloat16.FromBits((ushort)i);
        DevicePtr dX = Upload(all), dY = Alloc(all.Length * 4L);
        Ops.CastBf16ToF32(dX, dY, all.Length);
        AssertBitsEqual(Download<float>(dY, all.Length), all.Select(b => b.ToSingle()).ToArray(), "cast_bf16_to_f32, all 65536 patterns");
    }

    // ------------------------------------------------------------------------------------------
    // add, axpy, scale
    // ------------------------------------------------------------------------------------------

    [Test]
    public void AddIsBitExactAndMayAlias([ValueSource(nameof(Sizes))] int n)
    {
        float[] a = Normal(n, 1), b = Normal(n, 2, 1e-3);
        var want = new float[n];
        for (int i = 0; i < n; i++) want[i] = a[i] + b[i];
        DevicePtr dA = Upload(a), dB = Upload(b), dC = Alloc(n * 4L);
        Ops.Add(DType.F32, dA, dB, dC, n);
        AssertBitsEqual(Download<float>(dC, n), want, "add_f32");
        Ops.Add(DType.F32, dA, dB, dA, n);  // in place
        AssertBitsEqual(Download<float>(dA, n), want, "add_f32 in place");

        BFloat16[] ha = ToBf16(a), hb = ToBf16(b);
        BFloat16[] wantB = ha.Zip(hb, (x, y) => BFloat16.FromSingle(x.ToSingle() + y.ToSingle())).ToArray();
        DevicePtr bA = Upload(ha), bB = Upload(hb);
        Ops.Add(DType.BF16, bA, bB, bB, n);
        AssertBitsEqual(Download<BFloat16>(bB, n), wantB, "add_bf16 in place (c = b)");
    }

    [Test]
    public void AxpyIsOneFusedMultiplyAdd([ValueSource(nameof(Sizes))] int n)
    {
        float[] x = Normal(n, 3), y = Normal(n, 4);
        const float alpha = -0.3f;
        float[] want = x.Zip(y, (xi, yi) => MathF.FusedMultiplyAdd(alpha, xi, yi)).ToArray();
        DevicePtr dX = Upload(x), dY = Upload(y);
        Ops.Axpy(alpha, dX, dY, n);
        AssertBitsEqual(Download<float>(dY, n), want, "axpy_f32");
    }

    [Test]
    public void ScaleIsBitExact([ValueSource(nameof(Sizes))] int n)
    {
        float[] x = Normal(n, 5);
        const float alpha = 0.7f;
        DevicePtr dX = Upload(x), dY = Alloc(n * 4L);
        Ops.Scale(DType.F32, dX, dY, n, alpha);
        AssertBitsEqual(Download<float>(dY, n), x.Select(v => alpha * v).ToArray(), "scale_f32");
        BFloat16[] xb = ToBf16(x);
        DevicePtr bX = Upload(xb);
        Ops.Scale(DType.BF16, bX, bX, n, alpha);
        AssertBitsEqual(Download<BFloat16>(bX, n), xb.Select(v => BFloat16.FromSingle(alpha * v.ToSingle())).ToArray(), "scale_bf16 in place");
    }

    // ------------------------------------------------------------------------------------------
    // Dropout
    // ------------------------------------------------------------------------------------------

    [Test]
    public void PhiloxMatchesRandom123KnownAnswers()
    {
        // Random123 kat_vectors, "philox4x32 10": (counter, key) -> output.
        Assert.That(GpuElementwiseOps.Philox4x32x10(0, 0, 0, 0, 0, 0), Is.EqualTo((0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u)));
        Assert.That(GpuElementwiseOps.Philox4x32x10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u), Is.EqualTo((0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu)));
        Assert.That(GpuElementwiseOps.Philox4x32x10(0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0),
            Is.EqualTo((0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u)));
    }

    [Test]
    public void DropoutWordLayout()
    {
        // element e = word (e mod 4) of the block at counter e / 4; the seed's low word is key 0, high word key 1
        var b0 = GpuElementwiseOps.Philox4x32x10(0, 0, 0, 0, 0x89abcdefu, 0x01234567u);
        var b1 = GpuElementwiseOps.Philox4x32x10(1, 0, 0, 0, 0x89abcdefu, 0x01234567u);
        var bHi = GpuElementwiseOps.Philox4x32x10(0, 1, 0, 0, 0x89abcdefu, 0x01234567u);
        const ulong seed = 0x0123456789abcdefUL;
        Assert.That(GpuElementwiseOps.DropoutWord(seed, 0), Is.EqualTo(b0.X0));
        Assert.That(GpuElementwiseOps.DropoutWord(seed, 3), Is.EqualTo(b0.X3));
        Assert.That(GpuElementwiseOps.DropoutWord(seed, 6), Is.EqualTo(b1.X2));
        Assert.That(GpuElementwiseOps.DropoutWord(seed, 4UL << 32 | 1), Is.EqualTo(bHi.X1));
        Assert.That(GpuElementwiseOps.DropThreshold(0), Is.EqualTo(0u));
        Assert.That(GpuElementwiseOps.DropThreshold(0.5), Is.EqualTo(0x80000000u));
        Assert.That(GpuElementwiseOps.DropThreshold(Math.BitDecrement(1.0)), Is.EqualTo(uint.MaxValue));
        Assert.Throws<ArgumentOutOfRangeException>(() => GpuElementwiseOps.DropThreshold(1.0));
        Assert.Throws<ArgumentOutOfRangeException>(() => GpuElementwiseOps.DropThreshold(-0.1));
    }

    private static readonly (ulong Seed, ulong Offset, double P)[] DropoutCases =
    [
        (0, 0, 0.1), (42, 1, 0.5), (0xDEADBEEFCAFEF00DUL, 0xFFFFFFFFFFFF0000UL, 0.05), (7, (1UL << 34) + 3, 0.9), (3, 5, 0.0),
    ];

    [Test]
    public void DropoutMaskEqualsHostTwinAndKeepFractionIsBinomial([ValueSource(nameof(DropoutCases))] (ulong Seed, ulong Offset, double P) c)
    {
        const int n = 70001;
        DevicePtr dMask = Alloc(n);
        Ops.DropoutMask(dMask, n, c.Seed, c.Offset, c.P);
        byte[] got = Download<byte>(dMask, n);
        var want = new byte[n];
        GpuElementwiseOps.DropoutMaskHost(want, c.Seed, c.Offset, c.P);
        Assert.That(got, Is.EqualTo(want).AsCollection, "device mask == C# twin, bit for bit");
        Assert.That(got, Is.All.LessThanOrEqualTo((byte)1));

        int kept = got.Count(b => b == 1);
        double q = 1 - c.P, sigma = Math.Sqrt(n * q * (1 - q));
        Assert.That(Math.Abs(kept - n * q), Is.LessThanOrEqualTo(5 * sigma + 1e-9), $"kept {kept} of {n}, expected {n * q:F0} ± 5·{sigma:F1}");

        // reproducible from (seed, offset) alone: a sub-range launched at offset + 1000 equals the slice
        DevicePtr part = Alloc(500);
        Ops.DropoutMask(part, 500, c.Seed, c.Offset + 1000, c.P);
        Assert.That(Download<byte>(part, 500), Is.EqualTo(got.AsSpan(1000, 500).ToArray()).AsCollection, "mask of a sub-range");
    }

    [Test]
    public void DropoutMasksDifferAcrossSeeds()
    {
        var a = new byte[4096];
        var b = new byte[4096];
        GpuElementwiseOps.DropoutMaskHost(a, 1, 0, 0.5);
        GpuElementwiseOps.DropoutMaskHost(b, 2, 0, 0.5);
        int same = a.Zip(b, (x, y) => x == y ? 1 : 0).Sum();
        Assert.That(same, Is.InRange(2048 - 5 * 32, 2048 + 5 * 32), "two seeds agree on about half the elements (independent)");
    }

    [Test]
    public void ApplyMaskScaleIsBitExact([ValueSource(nameof(Sizes))] int n)
    {
        const double p = 0.3;
        float[] x = Normal(n, 9);
        var mask = new byte[n];
        GpuElementwiseOps.DropoutMaskHost(mask, 11, 0, p);
        float scale = GpuElementwiseOps.KeepScale(p);
        Assert.That(scale, Is.EqualTo((float)(1 / 0.7)));
        float[] want = x.Select((v, i) => mask[i] != 0 ? v * scale : 0f).ToArray();
        DevicePtr dX = Upload(x), dMask = Upload(mask), dY = Alloc(n * 4L);
        Ops.ApplyMaskScale(DType.F32, dX, dMask, dY, n, p);
        AssertBitsEqual(Download<float>(dY, n), want, "apply_mask_scale_f32");

        BFloat16[] xb = ToBf16(x);
        BFloat16[] wantB = xb.Select((v, i) => BFloat16.FromSingle(mask[i] != 0 ? v.ToSingle() * scale : 0f)).ToArray();
        DevicePtr bX = Upload(xb);
        Ops.ApplyMaskScale(DType.BF16, bX, dMask, bX, n, p);
        AssertBitsEqual(Download<BFloat16>(bX, n), wantB, "apply_mask_scale_bf16 in place");
    }

    // ------------------------------------------------------------------------------------------
    // Sum of squares
    // ------------------------------------------------------------------------------------------

    [Test]
    public void SumSquaresMatchesFloat64([Values(0, 1, 255, 4097, 70001, 5_000_000)] int n)
    {
        float[] x = Normal(n, 13 + n, 3.0);
        DevicePtr dX = Upload(x);
        double got = Ops.SumSquares(dX, n);
        double want = NeumaierSumOfSquares(x);  // the float64 oracle, compensated: error ~2⁻⁵³·Σ
        int blocks = GpuElementwiseOps.SumSquaresBlocks(n);
        double serial = Math.Ceiling((double)n / (blocks * GpuElementwiseOps.ThreadsPerBlock));
        // per-thread serial sum, 8 tree levels, pass 2 (ceil(blocks/256) serial + 8 tree levels), the oracle's 2
        double k = serial + 8 + Math.Ceiling(blocks / 256.0) + 8 + 2;
        double err = Math.Abs(got - want);
        TestContext.Out.WriteLine($"n={n}: blocks {blocks}, sum {got:R}, float64 {want:R}, error {err / (Math.Pow(2, -53) * Math.Max(want, 1e-300)):F2}·2⁻⁵³·Σ (bound {k})");
        Assert.That(err, Is.LessThanOrEqualTo(k * Math.Pow(2, -53) * want));
        Assert.That(Ops.SumSquares(dX, n), Is.EqualTo(got), "deterministic");
    }

    private static double NeumaierSumOfSquares(float[] x)
    {
        double sum = 0, comp = 0;
        foreach (float v in x)
        {
            double t = (double)v * v, s = sum + t;
            comp += Math.Abs(sum) >= t ? (sum - s) + t : (t - s) + sum;
            sum = s;
        }
        return sum + comp;
    }

    [Test]
    public void SumSquaresOfSeveralTensorsShareOnePartialBuffer()
    {
        float[] a = Normal(10000, 21), b = Normal(300, 22), c = [3f, 4f];
        DevicePtr dA = Upload(a), dB = Upload(b), dC = Upload(c);
        int na = GpuElementwiseOps.SumSquaresBlocks(a.Length), nb = GpuElementwiseOps.SumSquaresBlocks(b.Length), nc = GpuElementwiseOps.SumSquaresBlocks(c.Length);
        DevicePtr partials = Alloc((na + nb + nc) * 8L), output = Alloc(8);
        Gpu.Memset(output, 0, 8); // pass 2 accumulates into the output
        int k = Ops.SumSquaresPartial(dA, a.Length, partials);
        k += Ops.SumSquaresPartial(dB, b.Length, partials.Offset(k * 8L));
        k += Ops.SumSquaresPartial(dC, c.Length, partials.Offset(k * 8L));
        Assert.That(k, Is.EqualTo(na + nb + nc));
        Ops.ReduceSum(partials, k, output);
        double got = Download<double>(output, 1)[0];
        double want = NeumaierSumOfSquares([.. a, .. b, .. c]);
        Assert.That(got, Is.EqualTo(want).Within(40 * Math.Pow(2, -53) * want), "three tensors, one reduction");
        Assert.That(Ops.SumSquares(dC, 2), Is.EqualTo(25.0), "3² + 4², exact");
        // The list form (gradient clipping's): tensor by tensor, each reduced into the running output — the sum of the
        // three single-tensor sums added in order, bit for bit.
        DevicePtr scratch = Alloc((GpuElementwiseOps.MaxSumSquaresBlocks + 1) * 8L);
        double list = Ops.SumSquares([(dA, a.Length), (dB, b.Length), (dC, c.Length)], scratch,
            scratch.Offset(GpuElementwiseOps.MaxSumSquaresBlocks * 8L));
        Assert.That(list, Is.EqualTo(Ops.SumSquares(dA, a.Length) + Ops.SumSquares(dB, b.Length) + 25.0), "in order, one rounding per add");
        Assert.That(list, Is.EqualTo(want).Within(40 * Math.Pow(2, -53) * want));
        Assert.That(GpuElementwiseOps.SumSquaresBlocks(0), Is.EqualTo(1));
        Assert.That(GpuElementwiseOps.SumSquaresBlocks(long.MaxValue), Is.EqualTo(GpuElementwiseOps.MaxSumSquaresBlocks));
    }

    [Test]
    public void Validation()
    {
        DevicePtr p = Alloc(16);
        Assert.Throws<ArgumentException>(() => Ops.Fill(DType.F16, p, 1, 0f));
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.Fill(DType.F32, p, -1, 0f));
        Assert.Throws<ArgumentException>(() => Ops.Add(DType.F32, p, DevicePtr.Null, p, 4));
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.DropoutMask(p, 4, 0, 0, 1.0));
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.ApplyMaskScale(DType.F32, p, p, p, 4, double.NaN));
        Assert.DoesNotThrow(() => Ops.Scale(DType.F32, DevicePtr.Null, DevicePtr.Null, 0, 1f), "n = 0 launches nothing");
    }
}
