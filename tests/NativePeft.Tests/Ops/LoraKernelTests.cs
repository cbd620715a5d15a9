using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// The fused LoRA kernels (kernels/lora.cu) through <see cref="GpuOps.LoraDown"/> and
/// <see cref="GpuOps.LoraBackwardInput"/> on the emulator (under the race checks) and, when present, a CUDA device.
/// <para>
/// Oracle: a float64 computation in the test over the bf16 inputs, with the masks of
/// <see cref="GpuElementwiseOps.DropoutMaskHost"/> (the Dropout op's C# twin) and the exact keep scale 1/(1 − p).
/// Bounds, with u = 2^-8 (bf16 unit roundoff), e = 2^-24 and S the sum of the magnitudes of the terms of the element:
/// xa: the dropped x is a bf16 MMA operand (u·S when p &gt; 0; none at p = 0: x itself), fp32 accumulation over in terms
/// ((in + 4)·e·S, the fp32 keep scale included), the output rounded to bf16 once (u·|ref|). dx: bf16 inputs whose
/// products are exact in fp32, fp32 sums over r and the adapters and the old dx ((R + 8)·e·S), one bf16 rounding
/// (u·|ref|) per launch (the launches after the first: u·S each). dA: the dropped-x operand (u·S when p &gt; 0), fp32 sums over N rows and the splits ((N + 8)·e·S), fp32
/// output (e·|ref|). A second check compares with the unfused ops (Dropout, Matmul, DropoutBackward, Add) on the same
/// device: the same bf16 operands, so only the summation order and the output roundings differ, which a single
/// dropped-vs-kept element exceeds.
/// </para>
/// </summary>
public sealed class LoraKernelTests(string device) : DeviceFixture<GpuOps>(device)
{
    private const double U = 1.0 / 256;
    private static readonly double E = Math.Pow(2, -24);

    private readonly List<Tensor> _tensors = new();

    protected override GpuOps CreateOps(IGpu gpu) => new(gpu);

    protected override IEnumerable<string> RequiredKernels => ["lora_down_tc_bf16", "lora_down_reduce_bf16", "lora_bwd_input_tc_bf16", "lora_da_reduce_f32"];

    [TearDown]
    public void FreeTensors()
    {
        foreach (var t in _tensors) Ops.Memory.Free(t);
        _tensors.Clear();
    }

    /// <summary>N rows, in features, one rank, dropout p and seed per adapter.</summary>
    public sealed record Case(int N, int In, int[] Ranks, double[] P, string Why)
    {
        public override string ToString() => $"N={N} in={In} r=[{string.Join(",", Ranks)}] p=[{string.Join(",", P)}] ({Why})";
    }

    private static readonly Case[] Cases =
    [
        new(70, 256, [16], [0.0], "G=1, no dropout, N not a multiple of 64"),
        new(100, 200, [16, 8, 16], [0.1, 0.1, 0.1], "q,k,v-like, in not a multiple of 64"),
        new(300, 520, [16, 8, 16], [0.1, 0.1, 0.1], "two backward splits (N > 256)"),
        new(65, 136, [5, 12], [0.25, 0.0], "odd ranks, dropout on one adapter only"),
        new(70, 128, [64, 64, 16], [0.1, 0.2, 0.0], "several launches: forward 64+64 | 16, backward 64 | 64 | 16"),
        new(130, 64, [16, 32], [0.1, 0.0], "one 64-feature tile: the forward writes xa without a split"),
        new(40, 1000, [8, 16, 8], [0.1, 0.05, 0.1], "in = 1000: 16 feature tiles, the last one partial"),
    ];

    private static IEnumerable<int> CaseIndices() => Enumerable.Range(0, Cases.Length);

    private static ulong SeedOf(int g) => 0x9E3779B97F4A7C15UL * (ulong)(g + 1) + 12345;

    internal sealed record Problem(Case C, float[] X, float[][] A, float[][] DXa, float[] Dx0, float[][] DA0);

    internal static Problem Make(Case c, int seed)
    {
        var a = new float[c.Ranks.Length][];
        var dxa = new float[c.Ranks.Length][];
        var da0 = new float[c.Ranks.Length][];
        for (int g = 0; g < c.Ranks.Length; g++)
        {
            a[g] = Representable(Normal(c.Ranks[g] * c.In, seed + 10 * g + 1, 1 / Math.Sqrt(c.In)), DType.BF16);
            dxa[g] = Representable(Normal(c.N * c.Ranks[g], seed + 10 * g + 2, 0.5), DType.BF16);
            da0[g] = Normal(c.Ranks[g] * c.In, seed + 10 * g + 3);
        }
        return new Problem(c, Representable(Normal(c.N * c.In, seed), DType.BF16), a, dxa,
            Representable(Normal(c.N * c.In, seed + 7), DType.BF16), da0);
    }

    private static byte[] Mask(Case c, int g, ulong seed)
    {
        var m = new byte[c.N * c.In];
        GpuElementwiseOps.DropoutMaskHost(m, seed, 0, c.P[g]);
        return m;
    }

    // ---------------------------------------------------------------- device helpers

    private Tensor Bf16(float[] values, params int[] shape)
    {
        var t = Ops.Memory.Allocate(DType.BF16, shape);
        _tensors.Add(t);
        var b = new BFloat16[values.Length];
        BFloat16.FromSingle(values, b);
        Ops.Upload<BFloat16>(b, t);
        return t;
    }

    private Tensor F32(float[] values, params int[] shape)
    {
        var t = Ops.Memory.Allocate(DType.F32, shape);
        _tensors.Add(t);
        Ops.Upload<float>(values, t);
        return t;
    }

    private Tensor New(DType dtype, params int[] shape)
    {
        var t = Ops.Memory.Allocate(dtype, shape);
        _tensors.Add(t);
        return t;
    }

    private float[] Read(Tensor t)
    {
        var r = new float[t.Count];
        if (t.DType == DType.F32) { Ops.Download<float>(t, r); return r; }
        var b = new BFloat16[t.Count];
        Ops.Download<BFloat16>(t, b);
        BFloat16.ToSingle(b, r);
        return r;
    }

    /// <summary>The fused ops: xa per adapter; dx and dA after one backward from dx0, dA0.</summary>
    private (float[][] Xa, float[] Dx, float[][] DA) RunFused(Problem p)
    {
        var c = p.C;
        var x = Bf16(p.X, c.N, c.In);
        var down = new List<LoraDownArgs>();
        var back = new List<LoraBackwardArgs>();
        for (int g = 0; g < c.Ranks.Length; g++)
        {
            var a = Bf16(p.A[g], c.Ranks[g], c.In);
            var xa = New(DType.BF16, c.N, c.Ranks[g]);
            Ops.Fill(xa, float.NaN);  // every element must be written
            down.Add(new LoraDownArgs(a, c.P[g], SeedOf(g), xa));
            back.Add(new LoraBackwardArgs(a, Bf16(p.DXa[g], c.N, c.Ranks[g]), c.P[g], SeedOf(g), F32(p.DA0[g], c.Ranks[g], c.In)));
        }
        var dx = Bf16(p.Dx0, c.N, c.In);
        Ops.LoraDown(x, down);
        Ops.LoraBackwardInput(x, back, dx);
        return (down.Select(d => Read(d.Xa)).ToArray(), Read(dx), back.Select(b => Read(b.DA)).ToArray());
    }

    /// <summary>The sequence LoraLinear runs today, adapter by adapter, on the same device.</summary>
    private (float[][] Xa, float[] Dx, float[][] DA) RunUnfused(Problem p)
    {
        var c = p.C;
        var x = Bf16(p.X, c.N, c.In);
        var dx = Bf16(p.Dx0, c.N, c.In);
        var xas = new float[c.Ranks.Length][];
        var das = new float[c.Ranks.Length][];
        for (int g = 0; g < c.Ranks.Length; g++)
        {
            var a = Bf16(p.A[g], c.Ranks[g], c.In);
            var dxa = Bf16(p.DXa[g], c.N, c.Ranks[g]);
            var da = F32(p.DA0[g], c.Ranks[g], c.In);
            var xa = New(DType.BF16, c.N, c.Ranks[g]);
            var dropped = x;
            Tensor? mask = null;
            if (c.P[g] > 0)
            {
                dropped = New(DType.BF16, c.N, c.In);
                mask = New(DType.U8, c.N, c.In);
                Ops.Dropout(x, mask, c.P[g], SeedOf(g), dropped);
            }
            Ops.Matmul(dropped, false, a, true, xa);
            Ops.Matmul(dxa, true, dropped, false, da, 1, 1);
            var din = New(DType.BF16, c.N, c.In);
            Ops.Matmul(dxa, false, a, false, din);
            if (mask is not null) Ops.DropoutBackward(din, mask, c.P[g], din);
            Ops.Add(dx, din, dx);
            xas[g] = Read(xa);
            das[g] = Read(da);
        }
        return (xas, Read(dx), das);
    }

    // ---------------------------------------------------------------- float64 oracle

    /// <summary>Per adapter: the exact xa and S (sum of |terms|) of each element.</summary>
    internal static (double[] Ref, double[] S) DownRef(Problem p, int g, byte[] mask)
    {
        var c = p.C;
        int r = c.Ranks[g];
        double k = 1 / (1 - c.P[g]);
        var res = new double[c.N * r];
        var s = new double[c.N * r];
        for (int i = 0; i < c.N; i++)
            for (int j = 0; j < r; j++)
            {
                double acc = 0, mag = 0;
                for (int f = 0; f < c.In; f++)
                {
                    int e = i * c.In + f;
                    if (mask[e] == 0) continue;
                    double t = p.X[e] * k * p.A[g][j * c.In + f];
                    acc += t;
                    mag += Math.Abs(t);
                }
                res[i * r + j] = acc;
                s[i * r + j] = mag;
            }
        return (res, s);
    }

    internal static (double[] Ref, double[] S) DxRef(Problem p, byte[][] masks)
    {
        var c = p.C;
        var res = p.Dx0.Select(v => (double)v).ToArray();
        var s = p.Dx0.Select(v => (double)Math.Abs(v)).ToArray();
        for (int g = 0; g < c.Ranks.Length; g++)
        {
            int r = c.Ranks[g];
            double k = 1 / (1 - c.P[g]);
            for (int i = 0; i < c.N; i++)
                for (int f = 0; f < c.In; f++)
                {
                    int e = i * c.In + f;
                    if (masks[g][e] == 0) continue;
                    double acc = 0, mag = 0;
                    for (int j = 0; j < r; j++)
                    {
                        double t = p.DXa[g][i * r + j] * (double)p.A[g][j * c.In + f];
                        acc += t;
                        mag += Math.Abs(t);
                    }
                    res[e] += k * acc;
                    s[e] += k * mag;
                }
        }
        return (res, s);
    }

    internal static (double[] Ref, double[] S) DaRef(Problem p, int g, byte[] mask)
    {
        var c = p.C;
        int r = c.Ranks[g];
        double k = 1 / (1 - c.P[g]);
        var res = p.DA0[g].Select(v => (double)v).ToArray();
        var s = p.DA0[g].Select(v => (double)Math.Abs(v)).ToArray();
        for (int j = 0; j < r; j++)
            for (int f = 0; f < c.In; f++)
            {
                double acc = 0, mag = 0;
                for (int i = 0; i < c.N; i++)
                {
                    int e = i * c.In + f;
                    if (mask[e] == 0) continue;
                    double t = p.DXa[g][i * r + j] * (p.X[e] * k);
                    acc += t;
                    mag += Math.Abs(t);
                }
                res[j * c.In + f] += acc;
                s[j * c.In + f] += mag;
            }
        return (res, s);
    }

    /// <summary>max over elements of |got − ref| / (rel·|ref| + abs·S), and the worst element.</summary>
    private static (double Worst, int At) Worst(float[] got, double[] @ref, double[] s, double rel, double abs)
    {
        double worst = 0;
        int at = -1;
        for (int i = 0; i < got.Length; i++)
        {
            double bound = rel * Math.Abs(@ref[i]) + abs * s[i] + 1e-30;
            double q = double.IsFinite(got[i]) ? Math.Abs(got[i] - @ref[i]) / bound : double.PositiveInfinity;
            if (q > worst || at < 0) { worst = q; at = i; }
        }
        return (worst, at);
    }

    private static double DownOperand(Case c, int g) => c.P[g] > 0 ? U : 0;

    private static double Splits(Case c) => GpuLoraOps.Splits(c.N);

    // ---------------------------------------------------------------- tests

    [TestCaseSource(nameof(CaseIndices))]
    public void Fused_MatchesTheFloat64Reference_WithinTheBf16Bounds(int index)
    {
        var c = Cases[index];
        var p = Make(c, seed: 100 + index);
        var (xa, dx, da) = RunFused(p);
        var masks = Enumerable.Range(0, c.Ranks.Length).Select(g => Mask(c, g, SeedOf(g))).ToArray();
        int rTotal = c.Ranks.Sum();
        Assert.Multiple(() =>
        {
            for (int g = 0; g < c.Ranks.Length; g++)
            {
                var (xr, xs) = DownRef(p, g, masks[g]);
                var (w, at) = Worst(xa[g], xr, xs, U, 1.01 * (DownOperand(c, g) + (c.In + 4) * E));
                TestContext.Out.WriteLine($"{Device} {c}: xa[{g}] worst {w:F3} of its bound");
                Assert.That(w, Is.LessThanOrEqualTo(1.0), $"xa[{g}] element {at}: {xa[g][at]} vs {xr[at]}");

                var (ar, as_) = DaRef(p, g, masks[g]);
                (w, at) = Worst(da[g], ar, as_, E, 1.01 * (DownOperand(c, g) + (c.N + Splits(c) + 8) * E));
                TestContext.Out.WriteLine($"{Device} {c}: dA[{g}] worst {w:F3} of its bound");
                Assert.That(w, Is.LessThanOrEqualTo(1.0), $"dA[{g}] element {at}: {da[g][at]} vs {ar[at]}");
            }
            // One bf16 rounding of dx per backward launch: the launches after the first add u of the partial sums each.
            int launches = GpuLoraOps.Launches(c.Ranks, GpuLoraOps.BackwardMaxPaddedRank).Count;
            var (dr, ds) = DxRef(p, masks);
            var (wx, atx) = Worst(dx, dr, ds, U, 1.01 * ((launches - 1) * U + (rTotal + 8) * E));
            TestContext.Out.WriteLine($"{Device} {c}: dx worst {wx:F3} of its bound");
            Assert.That(wx, Is.LessThanOrEqualTo(1.0), $"dx element {atx}: {dx[atx]} vs {dr[atx]}");
        });
    }

    [Test]
    public void Fused_AtTheQkvShape_MatchesTheFloat64Reference()
    {
        // The model's q/k/v shape with N = 1024 (16 row tiles: 16 feature splits of 4 tiles in the forward, 4 row splits
        // in the backward, 64 × 4 CTAs); about 5 s on the emulator under the race checks, most of it the float64 oracle.
        var c = new Case(1024, 4096, [16, 16, 16], [0.1, 0.1, 0.1], "q/k/v shape, N = 1024");
        var p = Make(c, seed: 31);
        var (xa, dx, da) = RunFused(p);
        var masks = Enumerable.Range(0, c.Ranks.Length).Select(g => Mask(c, g, SeedOf(g))).ToArray();
        Assert.Multiple(() =>
        {
            for (int g = 0; g < c.Ranks.Length; g++)
            {
                var (xr, xs) = DownRef(p, g, masks[g]);
                Assert.That(Worst(xa[g], xr, xs, U, 1.01 * (U + (c.In + 4) * E)).Worst, Is.LessThanOrEqualTo(1.0), $"xa[{g}]");
                var (ar, as_) = DaRef(p, g, masks[g]);
                Assert.That(Worst(da[g], ar, as_, E, 1.01 * (U + (c.N + Splits(c) + 8) * E)).Worst, Is.LessThanOrEqualTo(1.0), $"dA[{g}]");
            }
            var (dr, ds) = DxRef(p, masks);
            Assert.That(Worst(dx, dr, ds, U, 1.01 * (c.Ranks.Sum() + 8) * E).Worst, Is.LessThanOrEqualTo(1.0), "dx");
        });
    }

    [Test]
    public void Fused_WithAnotherSeedsMask_FailsTheBound()
    {
        // Negative control of the mask: the reference drawn with the next seed must not pass.
        var c = Cases[1];
        var p = Make(c, seed: 5);
        var (xa, dx, da) = RunFused(p);
        var wrong = Enumerable.Range(0, c.Ranks.Length).Select(g => Mask(c, g, SeedOf(g) + 1)).ToArray();
        var (xr, xs) = DownRef(p, 0, wrong[0]);
        var (ar, as_) = DaRef(p, 0, wrong[0]);
        var (dr, ds) = DxRef(p, wrong);
        Assert.Multiple(() =>
        {
            Assert.That(Worst(xa[0], xr, xs, U, 1.01 * (U + (c.In + 4) * E)).Worst, Is.GreaterThan(1.0), "xa");
            Assert.That(Worst(da[0], ar, as_, E, 1.01 * (U + (c.N + 9) * E)).Worst, Is.GreaterThan(1.0), "dA");
            Assert.That(Worst(dx, dr, ds, U, 1.01 * (c.Ranks.Sum() + 8) * E).Worst, Is.GreaterThan(1.0), "dx");
        });
    }

    [TestCase(1)]
    [TestCase(3)]
    public void Fused_EqualsTheUnfusedOps_UpToSummationOrder(int index)
    {
        // The fused kernels draw the Dropout op's mask and form the same bf16 operands (x · fp32(1/(1-p)) rounded once),
        // so against the unfused sequence only the order of fp32 sums and the output roundings may differ.
        var c = Cases[index];
        var p = Make(c, seed: 200 + index);
        var f = RunFused(p);
        var u = RunUnfused(p);
        var masks = Enumerable.Range(0, c.Ranks.Length).Select(g => Mask(c, g, SeedOf(g))).ToArray();
        Assert.Multiple(() =>
        {
            for (int g = 0; g < c.Ranks.Length; g++)
            {
                var (_, xs) = DownRef(p, g, masks[g]);
                var un = u.Xa[g].Select(v => (double)v).ToArray();
                // both rounded to bf16 once (u each) from fp32 sums over in terms of the same operands
                var (w, at) = Worst(f.Xa[g], un, xs, 2.01 * U, 2.02 * (c.In + 4) * E);
                Assert.That(w, Is.LessThanOrEqualTo(1.0), $"xa[{g}] element {at}: fused {f.Xa[g][at]} unfused {u.Xa[g][at]}");
                var (_, as_) = DaRef(p, g, masks[g]);
                var ud = u.DA[g].Select(v => (double)v).ToArray();
                (w, at) = Worst(f.DA[g], ud, as_, 2.01 * E, 2.02 * (c.N + Splits(c) + 8) * E);
                Assert.That(w, Is.LessThanOrEqualTo(1.0), $"dA[{g}] element {at}: fused {f.DA[g][at]} unfused {u.DA[g][at]}");
            }
            // dx: the unfused path also rounds dxa·A and its masked, scaled copy to bf16 (2u of the terms) and dx after
            // each adapter's Add (G·u of the partial sums); the fused one rounds once (u·|dx|).
            var (_, ds) = DxRef(p, masks);
            var udx = u.Dx.Select(v => (double)v).ToArray();
            var (wx, atx) = Worst(f.Dx, udx, ds, 1.01 * U, 1.01 * (c.Ranks.Length + 2) * U + 2.02 * (c.Ranks.Sum() + 8) * E);
            Assert.That(wx, Is.LessThanOrEqualTo(1.0), $"dx element {atx}: fused {f.Dx[atx]} unfused {u.Dx[atx]}");
        });
    }

    [Test]
    public void Fused_IsBitIdenticalRunToRun_AndUnderOtherSchedules()
    {
        var p = Make(Cases[2], seed: 3);
        var first = RunFused(p);
        void Same((float[][] Xa, float[] Dx, float[][] DA) again, string when)
        {
            for (int g = 0; g < first.Xa.Length; g++)
            {
                AssertBitsEqual(again.Xa[g], first.Xa[g], $"xa[{g}] {when}");
                AssertBitsEqual(again.DA[g], first.DA[g], $"dA[{g}] {when}");
            }
            AssertBitsEqual(again.Dx, first.Dx, $"dx {when}");
        }
        Same(RunFused(p), "second run");
        foreach (ulong seed in new ulong[] { 1, 2 })
        {
            var again = UnderOtherSchedule(seed, () => Tuple.Create(RunFused(p)));
            if (again is null) break;
            Same(again.Item1, $"under the race checks (seed {seed})");
        }
    }

    [Test]
    public void UnsupportedShapes_TakeTheUnfusedPath_WithTheSameResults()
    {
        // in = 100 (not a multiple of 8) and a rank of 136 (wider than one launch) are not kernel shapes: GpuOps runs
        // the unfused ops, which must still match the float64 reference (its bf16 dropped x, din and per-adapter dx roundings).
        foreach (var c in new[] { new Case(40, 100, [16, 8], [0.1, 0.0], "in % 8 != 0"), new Case(40, 64, [136, 8], [0.1, 0.1], "rank 136") })
        {
            var p = Make(c, seed: 9);
            var (xa, dx, da) = RunFused(p);
            var masks = Enumerable.Range(0, c.Ranks.Length).Select(g => Mask(c, g, SeedOf(g))).ToArray();
            for (int g = 0; g < c.Ranks.Length; g++)
            {
                var (xr, xs) = DownRef(p, g, masks[g]);
                Assert.That(Worst(xa[g], xr, xs, U, 1.01 * (DownOperand(c, g) + (c.In + 4) * E)).Worst, Is.LessThanOrEqualTo(1.0), $"{c} xa[{g}]");
                var (ar, as_) = DaRef(p, g, masks[g]);
                Assert.That(Worst(da[g], ar, as_, E, 1.01 * (DownOperand(c, g) + (c.N + 8) * E)).Worst, Is.LessThanOrEqualTo(1.0), $"{c} dA[{g}]");
            }
            var (dr, ds) = DxRef(p, masks);
            Assert.That(Worst(dx, dr, ds, U, 1.01 * (c.Ranks.Length + 2) * U + 1.01 * (c.Ranks.Sum() + 8) * E).Worst, Is.LessThanOrEqualTo(1.0), $"{c} dx");
        }
    }

    [Test]
    public void BadArguments_ThrowNamingTheArgument()
    {
        var x = New(DType.BF16, 8, 64);
        var a = New(DType.BF16, 4, 64);
        var xa = New(DType.BF16, 8, 4);
        var dx = New(DType.BF16, 8, 64);
        var daBf16 = New(DType.BF16, 4, 64);
        var da = New(DType.F32, 4, 64);
        Assert.Multiple(() =>
        {
            var e = Assert.Throws<ArgumentException>(() => Ops.LoraDown(x, [new(a, 0, 1, xa), new(a, 0, 1, New(DType.BF16, 8, 5))]))!;
            Assert.That(e.Message, Does.Contain("adapters[1].Xa"));
            e = Assert.Throws<ArgumentException>(() => Ops.LoraDown(x, [new(New(DType.BF16, 4, 32), 0, 1, xa)]))!;
            Assert.That(e.Message, Does.Contain("adapters[0].A"));
            var r = Assert.Throws<ArgumentOutOfRangeException>(() => Ops.LoraDown(x, [new(a, 1.0, 1, xa)]))!;
            Assert.That(r.Message, Does.Contain("adapters[0].DropoutP"));
            e = Assert.Throws<ArgumentException>(() => Ops.LoraDown(x, []))!;
            Assert.That(e.ParamName, Is.EqualTo("adapters"));
            e = Assert.Throws<ArgumentException>(() => Ops.LoraBackwardInput(x, [new(a, xa, 0, 1, da)], New(DType.BF16, 8, 32)))!;
            Assert.That(e.ParamName, Is.EqualTo("dx"));
            e = Assert.Throws<ArgumentException>(() => Ops.LoraBackwardInput(x, [new(a, xa, 0, 1, daBf16)], dx))!;
            Assert.That(e.Message, Does.Contain("adapters[0].DA").And.Contain("F32"));
            // the launcher itself refuses shapes the kernels do not take
            var lora = new GpuLoraOps(Gpu);
            e = Assert.Throws<ArgumentException>(() => lora.Down(x.Data, 8, 100, [new LoraKernelAdapter(a.Data, xa.Data, DevicePtr.Null, 4, 0, 1)], DevicePtr.Null))!;
            Assert.That(e.ParamName, Is.EqualTo("inFeatures"));
            e = Assert.Throws<ArgumentException>(() => lora.BackwardInput(x.Data, dx.Data, 8, 64,
                [new LoraKernelAdapter(a.Data, xa.Data, da.Data, 64, 0, 1), new LoraKernelAdapter(a.Data, xa.Data, da.Data, 16, 0, 1)], da.Data))!;
            Assert.That(e.Message, Does.Contain("padded ranks sum to 80"));
        });
    }

    [Test]
    public void Launches_PackAdaptersInOrder_WithinTheLaunchLimits()
    {
        Assert.Multiple(() =>
        {
            Assert.That(GpuLoraOps.Launches([16, 8, 16], 64), Is.EqualTo(new List<(int, int)> { (0, 3) }));
            Assert.That(GpuLoraOps.Launches([64, 64, 16], 64), Is.EqualTo(new List<(int, int)> { (0, 1), (1, 1), (2, 1) }));
            Assert.That(GpuLoraOps.Launches([64, 64, 16], 128), Is.EqualTo(new List<(int, int)> { (0, 2), (2, 1) }));
            Assert.That(GpuLoraOps.Launches([8, 8, 8, 8], 128), Is.EqualTo(new List<(int, int)> { (0, 3), (3, 1) }));
            Assert.That(GpuLoraOps.Launches([16, 136, 8], 128), Is.EqualTo(new List<(int, int)> { (0, 1), (1, 0), (2, 1) }));
            // the forward's feature split: ~256 CTAs from the shape alone, no empty split
            Assert.That(GpuLoraOps.DownSplits(4096, 4096), Is.EqualTo((4, 16)));
            Assert.That(GpuLoraOps.DownSplits(4096, 14336), Is.EqualTo((4, 56)));
            Assert.That(GpuLoraOps.DownSplits(70, 200), Is.EqualTo((4, 1)));
            Assert.That(GpuLoraOps.DownSplits(300, 520), Is.EqualTo((9, 1)));
            Assert.That(GpuLoraOps.DownSplits(130, 64), Is.EqualTo((1, 1)));
            Assert.That(GpuLoraOps.DownSplits(20000, 4096), Is.EqualTo((1, 64)));
            Assert.That(GpuLoraOps.DownWorkspaceBytes(4096, 4096, 48), Is.EqualTo(4L * 4096 * 48 * 4));
        });
    }
}

/// <summary>
/// <see cref="CpuOps.LoraDown"/> and <see cref="CpuOps.LoraBackwardInput"/> in float64 against the same float64 oracle
/// (<see cref="LoraKernelTests"/>): only the summation order differs (1e-12 of the terms' magnitudes).
/// </summary>
public class LoraCpuOpsTests
{
    [Test]
    public void CpuOps_F64_MatchTheFloat64Reference()
    {
        var c = new LoraKernelTests.Case(33, 40, [4, 3], [0.3, 0.0], "cpu");
        var p = LoraKernelTests.Make(c, seed: 11);
        using var ops = new CpuOps();
        Tensor T(float[] v, params int[] shape)
        {
            var t = ops.Memory.Allocate(DType.F64, shape);
            ops.Upload<double>(v.Select(f => (double)f).ToArray(), t);
            return t;
        }
        double[] R(Tensor t) { var r = new double[t.Count]; ops.Download<double>(t, r); return r; }
        ulong Seed(int g) => 77 + (ulong)g;
        var x = T(p.X, c.N, c.In);
        var dx = T(p.Dx0, c.N, c.In);
        var down = Enumerable.Range(0, 2).Select(g => new LoraDownArgs(T(p.A[g], c.Ranks[g], c.In), c.P[g], Seed(g), ops.Memory.Allocate(DType.F64, c.N, c.Ranks[g]))).ToList();
        var back = Enumerable.Range(0, 2).Select(g => new LoraBackwardArgs(down[g].A, T(p.DXa[g], c.N, c.Ranks[g]), c.P[g], Seed(g), T(p.DA0[g], c.Ranks[g], c.In))).ToList();
        ops.LoraDown(x, down);
        ops.LoraBackwardInput(x, back, dx);
        var masks = Enumerable.Range(0, 2).Select(g =>
        {
            var m = new byte[c.N * c.In];
            GpuElementwiseOps.DropoutMaskHost(m, Seed(g), 0, c.P[g]);
            return m;
        }).ToArray();
        Assert.That(masks[0].Count(b => b == 0), Is.GreaterThan(0), "the p = 0.3 mask drops something");
        void Check(double[] got, (double[] Ref, double[] S) want, string what)
        {
            for (int i = 0; i < got.Length; i++)
                Assert.That(Math.Abs(got[i] - want.Ref[i]), Is.LessThanOrEqualTo(1e-12 * want.S[i] + 1e-300), $"{what}[{i}]");
        }
        for (int g = 0; g < 2; g++)
        {
            Check(R(down[g].Xa), LoraKernelTests.DownRef(p, g, masks[g]), $"xa{g}");
            Check(R(back[g].DA), LoraKernelTests.DaRef(p, g, masks[g]), $"dA{g}");
        }
        Check(R(dx), LoraKernelTests.DxRef(p, masks), "dx");
    }

    [Test]
    public void ProfilingOps_TimesTheLoraOpsUnderTheirNames()
    {
        using var cpu = new CpuOps();
        using var ops = new ProfilingOps(cpu);
        var x = cpu.Memory.Allocate(DType.F32, 4, 8);
        var a = cpu.Memory.Allocate(DType.F32, 2, 8);
        var xa = cpu.Memory.Allocate(DType.F32, 4, 2);
        var da = cpu.Memory.Allocate(DType.F32, 2, 8);
        var dx = cpu.Memory.Allocate(DType.F32, 4, 8);
        foreach (var t in new[] { x, a, xa, da, dx }) cpu.Fill(t, 1);
        ops.LoraDown(x, [new(a, 0, 1, xa)]);
        ops.LoraBackwardInput(x, [new(a, xa, 0, 1, da)], dx);
        Assert.That(ops.Totals.Keys, Is.SupersetOf(new[] { "LoraDown", "LoraBackwardInput" }));
        var v = new float[8];
        cpu.Download<float>(xa, v);
        Assert.That(v, Has.All.EqualTo(8f), "xa = x·Aᵀ of ones: 8 each");
    }
}
