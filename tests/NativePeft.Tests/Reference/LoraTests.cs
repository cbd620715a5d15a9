using NativePeft.Ops.Reference;
using NUnit.Framework;

namespace NativePeft.Tests.Reference;

public class LoraTests
{
    [Test]
    public void Scaling()
    {
        Assert.That(LoraRef.Scaling(16, 8), Is.EqualTo(2.0));
        Assert.That(LoraRef.Scaling(16, 8, useRsLora: true), Is.EqualTo(16 / Math.Sqrt(8)));
        Assert.That(LoraRef.Scaling(32, 16, useRsLora: true), Is.EqualTo(8.0));
        Assert.Throws<ArgumentOutOfRangeException>(() => LoraRef.Scaling(16, 0));
    }

    [Test]
    public void KaimingUniformInit()
    {
        // a = √5: gain √(2/6), bound = gain·√(3/fan_in) = 1/√fan_in.
        Assert.That(LoraRef.KaimingUniformBound(64), Is.EqualTo(0.125).Within(1e-16));
        Assert.That(LoraRef.KaimingUniformBound(3), Is.EqualTo(1 / Math.Sqrt(3)).Within(2e-16));

        const int rank = 16, inFeatures = 400;
        var a = new double[rank * inFeatures];
        LoraRef.InitA<double>(a, rank, inFeatures, new Random(7));
        double bound = 1 / Math.Sqrt(inFeatures);
        Assert.That(a, Is.All.InRange(-bound, bound));
        // U(−b, b): mean 0 ± ~3·b/√(3n), variance b²/3 ± a few %.
        double mean = a.Average(), variance = a.Select(v => (v - mean) * (v - mean)).Average();
        Assert.That(mean, Is.EqualTo(0).Within(3 * bound / Math.Sqrt(3 * a.Length)));
        Assert.That(variance, Is.EqualTo(bound * bound / 3).Within(0.05 * bound * bound / 3));
        Assert.That(a.Max(), Is.GreaterThan(0.99 * bound));
        Assert.That(a.Min(), Is.LessThan(-0.99 * bound));

        // Seeded: reproducible, seed-dependent, float = rounded double.
        var again = new double[a.Length];
        LoraRef.InitA<double>(again, rank, inFeatures, new Random(7));
        Assert.That(again, Is.EqualTo(a));
        var other = new double[a.Length];
        LoraRef.InitA<double>(other, rank, inFeatures, new Random(8));
        Assert.That(other, Is.Not.EqualTo(a));
        var af = new float[a.Length];
        LoraRef.InitA<float>(af, rank, inFeatures, new Random(7));
        Assert.That(af, Is.EqualTo(GradCheck.ToFloat(a)));

        float[] b = [1, 2, 3];
        LoraRef.InitB<float>(b);
        Assert.That(b, Is.All.EqualTo(0f));
    }

    [Test]
    public void DropoutMask()
    {
        var mask = new byte[100_000];
        LoraRef.DropoutMask(mask, 0, new Random(1));
        Assert.That(mask, Is.All.EqualTo((byte)1));
        LoraRef.DropoutMask(mask, 0.25, new Random(1));
        Assert.That(mask, Is.All.EqualTo((byte)0).Or.EqualTo((byte)1));
        double kept = mask.Average(m => (double)m);
        Assert.That(kept, Is.EqualTo(0.75).Within(0.01)); // σ = √(0.1875/1e5) ≈ 0.0014
        Assert.Throws<ArgumentOutOfRangeException>(() => LoraRef.DropoutMask(mask, 1.0, new Random(1)));
        Assert.Throws<ArgumentOutOfRangeException>(() => LoraRef.DropoutMask(mask, -0.1, new Random(1)));
    }

    [Test]
    public void ZeroBLeavesTheBaseOutputUnchanged()
    {
        const int rows = 3, inFeatures = 5, outFeatures = 4, rank = 2;
        float[] x = GradCheck.ToFloat(GradCheck.RandomNormal(rows * inFeatures, 60));
        var a = new float[rank * inFeatures];
        LoraRef.InitA<float>(a, rank, inFeatures, new Random(3));
        var b = new float[outFeatures * rank];
        LoraRef.InitB<float>(b);
        float[] y = GradCheck.ToFloat(GradCheck.RandomNormal(rows * outFeatures, 61)), before = (float[])y.Clone();
        var xa = new float[rows * rank];
        LoraRef.Forward<float>(x, a, b, ReadOnlySpan<byte>.Empty, 0, 2.0, xa, y, rows, inFeatures, outFeatures, rank);
        Assert.That(y, Is.EqualTo(before));
        Assert.That(xa, Has.Some.Not.EqualTo(0f));
    }

    [TestCase(1, 1, 1, 1, 0.0)]
    [TestCase(4, 6, 5, 2, 0.0)]
    [TestCase(4, 6, 5, 2, 0.3)]
    [TestCase(3, 10, 7, 3, 0.5)]
    public void GradientsMatchFiniteDifferences(int rows, int inFeatures, int outFeatures, int rank, double p)
    {
        double scaling = LoraRef.Scaling(2 * rank, rank, useRsLora: true);
        double[] x = GradCheck.RandomNormal(rows * inFeatures, 62);
        double[] a = GradCheck.RandomNormal(rank * inFeatures, 63, 0.5);
        double[] b = GradCheck.RandomNormal(outFeatures * rank, 64, 0.5);
        double[] dy = GradCheck.RandomNormal(rows * outFeatures, 65);
        byte[] mask = p > 0 ? new byte[rows * inFeatures] : [];
        if (p > 0)
        {
            LoraRef.DropoutMask(mask, p, new Random(66));
            mask[0] = 1; // keep at least one element per check
        }
        double Loss()
        {
            var y = new double[rows * outFeatures];
            LoraRef.Forward<double>(x, a, b, mask, p, scaling, new double[rows * rank], y, rows, inFeatures, outFeatures, rank);
            return GradCheck.Dot(y, dy);
        }
        var xa = new double[rows * rank];
        var yOut = new double[rows * outFeatures];
        LoraRef.Forward<double>(x, a, b, mask, p, scaling, xa, yOut, rows, inFeatures, outFeatures, rank);

        double[] dxStart = GradCheck.RandomNormal(x.Length, 67), dx = (double[])dxStart.Clone();
        double[] daStart = GradCheck.RandomNormal(a.Length, 68), da = (double[])daStart.Clone();
        double[] dbStart = GradCheck.RandomNormal(b.Length, 69), db = (double[])dbStart.Clone();
        LoraRef.Backward<double>(dy, x, a, b, mask, p, scaling, xa, dx, da, db, rows, inFeatures, outFeatures, rank);
        GradCheck.Check("dx", x, dx.Select((v, k) => v - dxStart[k]).ToArray(), Loss);
        GradCheck.Check("dA", a, da.Select((v, k) => v - daStart[k]).ToArray(), Loss);
        GradCheck.Check("dB", b, db.Select((v, k) => v - dbStart[k]).ToArray(), Loss);
        for (int k = 0; k < mask.Length; k++)
            if (mask[k] == 0) Assert.That(dx[k], Is.EqualTo(dxStart[k]), $"dropped element {k} gets no gradient");
    }

    [Test]
    public void MergeEqualsForwardAndUnmergeRestores()
    {
        const int rows = 5, inFeatures = 9, outFeatures = 6, rank = 3;
        double scaling = LoraRef.Scaling(6, rank);
        double[] x = GradCheck.RandomNormal(rows * inFeatures, 70);
        double[] w = GradCheck.RandomNormal(outFeatures * inFeatures, 71);
        double[] a = GradCheck.RandomNormal(rank * inFeatures, 72), b = GradCheck.RandomNormal(outFeatures * rank, 73);

        var unmergedY = new double[rows * outFeatures];
        LinearRef.Forward<double>(x, w, ReadOnlySpan<double>.Empty, unmergedY, rows, inFeatures, outFeatures);
        LoraRef.Forward<double>(x, a, b, ReadOnlySpan<byte>.Empty, 0, scaling, new double[rows * rank], unmergedY,
            rows, inFeatures, outFeatures, rank);

        double[] merged = (double[])w.Clone();
        LoraRef.Merge<double>(merged, a, b, scaling, inFeatures, outFeatures, rank);
        var mergedY = new double[rows * outFeatures];
        LinearRef.Forward<double>(x, merged, ReadOnlySpan<double>.Empty, mergedY, rows, inFeatures, outFeatures);
        GradCheck.AssertClose(mergedY, unmergedY, 1e-13, 1e-13, "merged vs base + adapter");

        // Merged W = W + s·B·A by hand for one element.
        double delta = 0;
        for (int r = 0; r < rank; r++) delta += b[2 * rank + r] * a[r * inFeatures + 4];
        Assert.That(merged[2 * inFeatures + 4], Is.EqualTo(w[2 * inFeatures + 4] + scaling * delta).Within(1e-14));

        LoraRef.Unmerge<double>(merged, a, b, scaling, inFeatures, outFeatures, rank);
        GradCheck.AssertClose(merged, w, 1e-15, 1e-15, "unmerge(merge(W))");

        // Float: each step rounds once, so unmerge(merge(W)) is within ~2 roundings of |W| + |s·B·A|.
        float[] wf = GradCheck.ToFloat(w), af = GradCheck.ToFloat(a), bf = GradCheck.ToFloat(b), mf = (float[])wf.Clone();
        LoraRef.Merge<float>(mf, af, bf, scaling, inFeatures, outFeatures, rank);
        LoraRef.Unmerge<float>(mf, af, bf, scaling, inFeatures, outFeatures, rank);
        GradCheck.AssertClose(mf, GradCheck.ToDouble(wf), 2 * GradCheck.U, 2 * GradCheck.U * 10, "float unmerge(merge(W))");
    }

    [Test]
    public void FloatMatchesDouble()
    {
        const int rows = 7, inFeatures = 40, outFeatures = 24, rank = 8;
        const double p = 0.1, scaling = 2.0;
        double[] x = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(rows * inFeatures, 80)));
        double[] a = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(rank * inFeatures, 81, 0.15)));
        double[] b = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(outFeatures * rank, 82, 0.1)));
        double[] dy = GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.RandomNormal(rows * outFeatures, 83)));
        var mask = new byte[rows * inFeatures];
        LoraRef.DropoutMask(mask, p, new Random(84));

        double[] y = new double[rows * outFeatures], xa = new double[rows * rank];
        double[] dx = new double[x.Length], da = new double[a.Length], db = new double[b.Length];
        LoraRef.Forward<double>(x, a, b, mask, p, scaling, xa, y, rows, inFeatures, outFeatures, rank);
        LoraRef.Backward<double>(dy, x, a, b, mask, p, scaling, xa, dx, da, db, rows, inFeatures, outFeatures, rank);

        float[] yf = new float[y.Length], xaf = new float[xa.Length];
        float[] dxf = new float[dx.Length], daf = new float[da.Length], dbf = new float[db.Length];
        LoraRef.Forward<float>(GradCheck.ToFloat(x), GradCheck.ToFloat(a), GradCheck.ToFloat(b), mask, p, scaling, xaf, yf,
            rows, inFeatures, outFeatures, rank);
        LoraRef.Backward<float>(GradCheck.ToFloat(dy), GradCheck.ToFloat(x), GradCheck.ToFloat(a), GradCheck.ToFloat(b),
            mask, p, scaling, xaf, dxf, daf, dbf, rows, inFeatures, outFeatures, rank);

        // xa is the rounded double sum; y and dB inherit xa's rounding (one fp32 rounding of each xa term).
        Assert.That(xaf, Is.EqualTo(GradCheck.ToFloat(xa)));
        double xaScale = xa.Max(Math.Abs);
        GradCheck.AssertFloatMatchesDouble(yf, y, 4, scaling * 0.1 * rank * xaScale, "y");
        GradCheck.AssertFloatMatchesDouble(dbf, db, 4, scaling * rows * xaScale * 3, "dB");
        Assert.That(dxf, Is.EqualTo(GradCheck.ToFloat(dx)), "dx (no intermediate rounding)");
        Assert.That(daf, Is.EqualTo(GradCheck.ToFloat(da)), "dA (no intermediate rounding)");
    }

    [Test]
    public void MatchesPeftInTorch()
    {
        var oracle = OpsOracle.Load("ops_lora.bin");
        int rows = oracle.Shape("x")[0], inFeatures = oracle.Shape("x")[1], outFeatures = oracle.Shape("w")[0];
        double[] config = oracle.F64("config"); // rank, alpha, p, scaling
        int rank = (int)config[0];
        double p = config[2], scaling = LoraRef.Scaling(config[1], rank);
        Assert.That(scaling, Is.EqualTo(config[3]));
        byte[] mask = oracle.U8("mask");
        float[] xf = oracle.F32("x"), wf = oracle.F32("w"), af = oracle.F32("a"), bf = oracle.F32("b"), dyf = oracle.F32("dy");

        // float: base + adapter vs torch fp32 (fp32 matmuls): within a few roundings of the row sums (|x·w| terms ~1).
        var yf = new float[rows * outFeatures];
        LinearRef.Forward<float>(xf, wf, ReadOnlySpan<float>.Empty, yf, rows, inFeatures, outFeatures);
        LoraRef.Forward<float>(xf, af, bf, mask, p, scaling, new float[rows * rank], yf, rows, inFeatures, outFeatures, rank);
        GradCheck.AssertClose(yf, GradCheck.ToDouble(oracle.F32("y_f32")), 0, 2 * inFeatures * GradCheck.U * 4, "y float vs torch fp32");

        // double: forward and the full backward (base dx overwritten, then the adapter adds) vs torch autograd.
        double[] x = GradCheck.ToDouble(xf), w = GradCheck.ToDouble(wf), a = GradCheck.ToDouble(af), b = GradCheck.ToDouble(bf);
        double[] dy = GradCheck.ToDouble(dyf);
        double[] y = new double[rows * outFeatures], xa = new double[rows * rank];
        LinearRef.Forward<double>(x, w, ReadOnlySpan<double>.Empty, y, rows, inFeatures, outFeatures);
        LoraRef.Forward<double>(x, a, b, mask, p, scaling, xa, y, rows, inFeatures, outFeatures, rank);
        GradCheck.AssertClose(y, oracle.F64("y_f64"), 1e-12, 1e-13, "y double vs torch float64");

        double[] dx = new double[x.Length], da = new double[a.Length], db = new double[b.Length];
        LinearRef.Backward<double>(dy, x, w, dx, Span<double>.Empty, Span<double>.Empty, rows, inFeatures, outFeatures);
        LoraRef.Backward<double>(dy, x, a, b, mask, p, scaling, xa, dx, da, db, rows, inFeatures, outFeatures, rank);
        GradCheck.AssertClose(dx, oracle.F64("dx_f64"), 1e-12, 1e-13, "dx vs torch autograd");
        GradCheck.AssertClose(da, oracle.F64("da_f64"), 1e-12, 1e-13, "dA vs torch autograd");
        GradCheck.AssertClose(db, oracle.F64("db_f64"), 1e-12, 1e-13, "dB vs torch autograd");
    }

    [Test]
    public void InvalidArgumentsThrow()
    {
        Assert.Throws<ArgumentException>(() => LoraRef.Forward<float>(new float[6], new float[5], new float[4], ReadOnlySpan<byte>.Empty,
            0, 1, new float[4], new float[4], 2, 3, 2, 2)); // A needs rank·in = 6
        Assert.Throws<ArgumentException>(() => LoraRef.Forward<float>(new float[6], new float[6], new float[4], new byte[5],
            0.1, 1, new float[4], new float[4], 2, 3, 2, 2)); // mask needs rows·in = 6
        Assert.Throws<ArgumentOutOfRangeException>(() => LoraRef.Forward<float>(new float[6], new float[6], new float[4], new byte[6],
            1.0, 1, new float[4], new float[4], 2, 3, 2, 2)); // p = 1
    }
}
