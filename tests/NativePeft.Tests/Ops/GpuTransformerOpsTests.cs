using System.Diagnostics;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;

namespace NativePeft.Tests.Ops;

/// <summary>
/// kernels/rmsnorm.cu, rope.cu, swiglu.cu and embedding.cu through <see cref="GpuTransformerOps"/> on every device:
/// the emulator always (a missing libnativepeft_emu is a failure), CUDA when a device exists (ignored otherwise).
/// <para>
/// Oracle: the CPU references (NativePeft.Ops.Reference: RmsNormRef, RopeRef, SwiGluRef, EmbeddingRef) run in
/// float64 (T = double) over the exact (widened) inputs the kernels see, cross-checked against the float64 loops in
/// this file (which also give the error magnitudes); the embedding against the reference in fp32 bit for bit.
/// Tolerances, with
/// u = 2^-24 (fp32 unit roundoff) and "mag" the sum of the absolute values of the terms that make up an output
/// (so cancellation is accounted for, never hidden):
/// <list type="bullet">
/// <item>fp32 outputs: |got - ref| &lt;= k·u·mag with k the a-priori rounding-error count of the kernel's formula
/// (RMSNorm rstd: k_C = (ceil(C / threads) + log2(threads) + 6) / 2 + 4, the fp32 sum of squares halved by the
/// sqrt plus the mean, sqrt and division roundings; y: k_C + 2; dx: k_C + 8; RoPE: 4; SwiGLU h/du: 12 and dg: 16,
/// including expf's 2-ulp error on CUDA), plus an absolute 1e-37 (fp32 exp underflows to 0 where float64 still has
/// a denormal). Measured on the emulator: at most ~4 u·mag everywhere.</item>
/// <item>bf16 outputs: within 1 bf16 ulp of the float64 reference rounded to bf16, or within the fp32 bound above
/// (only reachable under heavy cancellation).</item>
/// <item>fp32 weight gradients: RMSNorm dw within (N / 16 + 24)·u·mag (16 serial partial sums per column, added in
/// order); embedding dtable bit for bit equal to the serial fp32 loop in token order (the kernel is deterministic
/// by construction) and independent of the vocabulary partitioning.</item>
/// </list>
/// </para>
/// </summary>
public sealed class GpuTransformerOpsTests(string device) : DeviceFixture<GpuTransformerOps>(device)
{
    private const double U = 1.0 / (1 << 24);
    private const double AbsSlack = 1e-37;

    protected override GpuTransformerOps CreateOps(IGpu gpu) => new(gpu);

    protected override IEnumerable<string> RequiredKernels =>
        ["rmsnorm_forward_f32", "rope_forward_bf16", "swiglu_backward_f32", "embedding_backward_bf16"];

    private static readonly DType[] DTypes = [DType.F32, DType.BF16];

    // ------------------------------------------------------------------------------------------
    // Comparison
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// fp32: |got - ref| &lt;= k·u·mag + 1e-37; bf16: 1 bf16 ulp from the rounded reference, or the fp32 bound.
    /// Reports the worst error (in u·mag) on the test output; asserts once with the worst offender.
    /// </summary>
    private static void AssertClose(float[] got, double[] expected, double[] mag, DType dtype, double k, string what)
    {
        Assert.That(got, Has.Length.EqualTo(expected.Length), what);
        double worst = 0.0;   // fp32: in u*mag; bf16: in bf16 ulps from the rounded reference
        int bad = -1;
        string detail = "";
        for (int i = 0; i < got.Length; i++)
        {
            double err = Math.Abs(got[i] - expected[i]);
            double tol = k * U * mag[i] + AbsSlack;
            bool ok = err <= tol && !double.IsNaN(got[i]);
            if (dtype == DType.BF16)
            {
                float rounded = BFloat16.FromSingle((float)expected[i]).ToSingle();
                int ulps = Math.Abs(Bf16Key(got[i]) - Bf16Key(rounded));
                worst = Math.Max(worst, ulps);
                ok |= ulps <= 1;
                if (!ok && bad < 0) { bad = i; detail = $"bf16 {got[i]:R} vs rounded reference {rounded:R} (float64 {expected[i]:R}): {ulps} ulps"; }
            }
            else
            {
                if (mag[i] > 0 && err > AbsSlack) worst = Math.Max(worst, err / (U * mag[i]));
                if (!ok && bad < 0) { bad = i; detail = $"{got[i]:R} vs {expected[i]:R}: error {err:E3} > {tol:E3} ({k} u * mag {mag[i]:E3})"; }
            }
        }
        TestContext.Out.WriteLine(dtype == DType.F32
            ? $"{what} [F32]: worst error {worst:F2} u*mag (bound {k})"
            : $"{what} [BF16]: worst {worst} bf16 ulps from the rounded reference (bound 1)");
        Assert.That(bad, Is.EqualTo(-1), $"{what}[{bad}]: {detail}");
    }

    /// <summary>The reference (NativePeft.Ops.Reference, float64) and this file's float64 loop agree to 1e-12·mag.</summary>
    private static void AssertOraclesAgree(double[] reference, double[] local, double[] mag, string what)
    {
        Assert.That(reference, Has.Length.EqualTo(local.Length), what);
        for (int i = 0; i < local.Length; i++)
        {
            if (!(Math.Abs(reference[i] - local[i]) <= 1e-12 * mag[i] + 1e-300))
                Assert.Fail($"{what}[{i}]: reference {reference[i]:R} vs local float64 loop {local[i]:R}");
        }
    }

    // ------------------------------------------------------------------------------------------
    // RMSNorm
    // ------------------------------------------------------------------------------------------

    private static readonly (int N, int C)[] RmsShapes = [(1, 1), (3, 7), (5, 64), (4, 300), (2, 1000), (19, 4096)];

    private static double RmsBoundUlps(int c)
    {
        int threads = GpuTransformerOps.RowBlockThreads(c);
        double serial = Math.Ceiling((double)c / threads);
        return (serial + Math.Log2(threads) + 6) / 2 + 4;
    }

    /// <summary>float64 RMSNorm forward: y, rstd, and mag(y) = |y| (a product: relative error only).</summary>
    private static (double[] Y, double[] Rstd) RmsForward64(float[] x, float[] w, int n, int c, double eps)
    {
        var y = new double[n * c];
        var rstd = new double[n];
        for (int r = 0; r < n; r++)
        {
            double ss = 0;
            for (int j = 0; j < c; j++) ss += (double)x[r * c + j] * x[r * c + j];
            rstd[r] = 1.0 / Math.Sqrt(ss / c + eps);
            for (int j = 0; j < c; j++) y[r * c + j] = w[j] * (x[r * c + j] * rstd[r]);
        }
        return (y, rstd);
    }

    [Test]
    public void RmsNormForwardMatchesFloat64([ValueSource(nameof(DTypes))] DType dtype, [ValueSource(nameof(RmsShapes))] (int N, int C) shape)
    {
        (int n, int c) = shape;
        const float eps = 1e-5f;
        float[] x = Representable(Normal(n * c, seed: 11 + c), dtype);
        float[] w = Representable(Normal(c, seed: 7 + c, scale: 0.5), dtype);
        if (n > 2) Array.Clear(x, 2 * c, c);  // an all-zero row: rstd = 1/sqrt(eps), y = 0

        DevicePtr dX = Upload(x, dtype), dW = Upload(w, dtype);
        DevicePtr dY = Alloc((long)n * c * dtype.ElementSize()), dR = Alloc(n * sizeof(float));
        Ops.RmsNormForward(dtype, dX, dW, dY, dR, n, c, eps);
        Gpu.Synchronize();
        float[] y = Download(dY, n * c, dtype);
        float[] rstd = Download(dR, n, DType.F32);

        (double[] yLoop, double[] rLoop) = RmsForward64(x, w, n, c, eps);
        var yRef = new double[n * c];
        var rRef = new double[n];
        RmsNormRef.Forward<double>(ToDouble(x), ToDouble(w), yRef, rRef, n, c, eps);
        AssertOraclesAgree(rRef, rLoop, rLoop, "rstd oracles");
        AssertOraclesAgree(yRef, yLoop, yLoop.Select(Math.Abs).ToArray(), "y oracles");
        double k = RmsBoundUlps(c);
        AssertClose(rstd, rRef, rRef, DType.F32, k, "rstd");
        AssertClose(y, yRef, yRef.Select(Math.Abs).ToArray(), dtype, k + 2, "y");
        if (n > 2)
        {
            Assert.That(rstd[2], Is.EqualTo((float)(1.0 / Math.Sqrt(eps))).Within(2).Ulps, "zero row: rstd = 1/sqrt(eps)");
            Assert.That(y.Skip(2 * c).Take(c), Is.All.EqualTo(0f), "zero row: y = 0");
        }
    }

    [Test]
    public void RmsNormForwardWithoutRstdAndInPlace([ValueSource(nameof(DTypes))] DType dtype)
    {
        const int n = 6, c = 96;
        float[] x = Representable(Normal(n * c, seed: 5), dtype);
        float[] w = Representable(Normal(c, seed: 6), dtype);
        DevicePtr dX = Upload(x, dtype), dW = Upload(w, dtype), dY = Alloc((long)n * c * dtype.ElementSize());
        Ops.RmsNormForward(dtype, dX, dW, dY, DevicePtr.Null, n, c, 1e-6f);
        Ops.RmsNormForward(dtype, dX, dW, dX, DevicePtr.Null, n, c, 1e-6f);  // y aliases x
        Gpu.Synchronize();
        Assert.That(Download(dX, n * c, dtype), Is.EqualTo(Download(dY, n * c, dtype)), "in place equals out of place");
    }

    [Test]
    public void RmsNormBackwardMatchesFloat64([ValueSource(nameof(DTypes))] DType dtype, [ValueSource(nameof(RmsShapes))] (int N, int C) shape)
    {
        (int n, int c) = shape;
        float[] x = Representable(Normal(n * c, seed: 21 + c), dtype);
        float[] w = Representable(Normal(c, seed: 22 + c, scale: 0.5), dtype);
        float[] dy = Representable(Normal(n * c, seed: 23 + c), dtype);
        // rstd as the forward stores it (fp32); the reference uses the same fp32 values
        (_, double[] r64) = RmsForward64(x, w, n, c, 1e-5);
        float[] rstd = r64.Select(v => (float)v).ToArray();
        float[] dw0 = Normal(c, seed: 24 + c);  // dw accumulates

        DevicePtr dX = Upload(x, dtype), dW = Upload(w, dtype), dDy = Upload(dy, dtype), dR = Upload(rstd, DType.F32);
        DevicePtr dDx = Alloc((long)n * c * dtype.ElementSize()), dDw = Upload(dw0, DType.F32);
        Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, dDx, dDw, n, c);
        Gpu.Synchronize();
        float[] dx = Download(dDx, n * c, dtype);
        float[] dwGot = Download(dDw, c, DType.F32);

        var dxRef = new double[n * c];
        var dxMag = new double[n * c];
        var dwRef = new double[c];
        var dwMag = new double[c];
        for (int j = 0; j < c; j++) { dwRef[j] = dw0[j]; dwMag[j] = Math.Abs(dw0[j]); }
        for (int r = 0; r < n; r++)
        {
            double rs = rstd[r], dot = 0, dotAbs = 0;
            for (int j = 0; j < c; j++)
            {
                double t = (double)w[j] * dy[r * c + j] * x[r * c + j];
                dot += t;
                dotAbs += Math.Abs(t);
            }
            for (int j = 0; j < c; j++)
            {
                int e = r * c + j;
                double g = (double)w[j] * dy[e];
                dxRef[e] = rs * g - x[e] * (rs * rs * rs * dot / c);
                dxMag[e] = rs * Math.Abs(g) + Math.Abs(x[e]) * (rs * rs * rs * dotAbs / c);
                double tw = dy[e] * (x[e] * rs);
                dwRef[j] += tw;
                dwMag[j] += Math.Abs(tw);
            }
        }
        var dxR = new double[n * c];
        double[] dwR = ToDouble(dw0);
        RmsNormRef.Backward<double>(ToDouble(dy), ToDouble(x), ToDouble(w), ToDouble(rstd), dxR, dwR, n, c);
        AssertOraclesAgree(dxR, dxRef, dxMag, "dx oracles");
        AssertOraclesAgree(dwR, dwRef, dwMag, "dw oracles");
        AssertClose(dx, dxR, dxMag, dtype, RmsBoundUlps(c) + 8, "dx");
        AssertClose(dwGot, dwR, dwMag, DType.F32, Math.Ceiling(n / 16.0) + 24, "dw");
    }

    [Test]
    public void RmsNormBackwardAccumulatesIntoDx([ValueSource(nameof(DTypes))] DType dtype)
    {
        // The residual stream's gradient takes the norm's in the kernel (dx += ...), summed in fp32 and rounded once.
        const int n = 5, c = 200;
        float[] x = Representable(Normal(n * c, seed: 41), dtype);
        float[] w = Representable(Normal(c, seed: 42, scale: 0.5), dtype);
        float[] dy = Representable(Normal(n * c, seed: 43), dtype);
        float[] dx0 = Representable(Normal(n * c, seed: 44, scale: 3), dtype);
        (_, double[] r64) = RmsForward64(x, w, n, c, 1e-5);
        float[] rstd = r64.Select(v => (float)v).ToArray();
        DevicePtr dX = Upload(x, dtype), dW = Upload(w, dtype), dDy = Upload(dy, dtype), dR = Upload(rstd, DType.F32);
        DevicePtr dDx = Upload(dx0, dtype);
        Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, dDx, DevicePtr.Null, n, c, accumulate: true);
        Gpu.Synchronize();
        float[] got = Download(dDx, n * c, dtype);

        // float64, written out here: dx0 + rstd·w·dy − x·rstd³·(Σ w·dy·x)/C
        var want = new double[n * c];
        var mag = new double[n * c];
        for (int r = 0; r < n; r++)
        {
            double rs = rstd[r], dot = 0, dotAbs = 0;
            for (int j = 0; j < c; j++) { double t = (double)w[j] * dy[r * c + j] * x[r * c + j]; dot += t; dotAbs += Math.Abs(t); }
            for (int j = 0; j < c; j++)
            {
                int e = r * c + j;
                double g = (double)w[j] * dy[e];
                want[e] = dx0[e] + (rs * g - x[e] * (rs * rs * rs * dot / c));
                mag[e] = Math.Abs(dx0[e]) + rs * Math.Abs(g) + Math.Abs(x[e]) * (rs * rs * rs * dotAbs / c);
            }
        }
        AssertClose(got, want, mag, dtype, RmsBoundUlps(c) + 8, "dx0 + norm gradient");
        // and it did add: without dx0 the result is far from it
        double moved = got.Select((v, i) => Math.Abs(v - (want[i] - dx0[i]))).Max();
        Assert.That(moved, Is.GreaterThan(1.0), "dx0 was added, not overwritten");

        Assert.Throws<ArgumentException>(() => Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, dDy, DevicePtr.Null, n, c, accumulate: true),
            "accumulating over dy is refused");
    }

    [Test]
    public void RmsNormBackwardSkipsNullOutputsAndDxMayAliasDy()
    {
        const int n = 4, c = 40;
        DType dtype = DType.F32;
        float[] x = Normal(n * c, 1), w = Normal(c, 2), dy = Normal(n * c, 3);
        float[] rstd = [0.5f, 1.0f, 2.0f, 0.25f];
        DevicePtr dX = Upload(x, dtype), dW = Upload(w, dtype), dR = Upload(rstd, DType.F32);
        DevicePtr dDy = Upload(dy, dtype), dDx = Alloc(n * c * 4), dDw = Upload(new float[c], DType.F32);
        Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, dDx, DevicePtr.Null, n, c);   // dx only
        Ops.RmsNormBackward(dtype, dX, DevicePtr.Null, dDy, dR, DevicePtr.Null, dDw, n, c);  // dw only (w unused)
        Gpu.Synchronize();
        float[] dx = Download(dDx, n * c, dtype), dw = Download(dDw, c, DType.F32);
        Assert.That(dw.Any(v => v != 0f), "dw was written");

        var dw2 = Upload(new float[c], DType.F32);
        Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, dDy, dw2, n, c);  // dx written over dy
        Gpu.Synchronize();
        Assert.That(Download(dDy, n * c, dtype), Is.EqualTo(dx), "dx computed in place over dy");
        Assert.That(Download(dw2, c, DType.F32), Is.EqualTo(dw), "dw (launched before dx overwrites dy)");
    }

    [Test]
    public void RmsNormIsDeterministic([ValueSource(nameof(DTypes))] DType dtype)
    {
        const int n = 67, c = 2048;
        float[] x = Representable(Normal(n * c, 31), dtype), w = Representable(Normal(c, 32), dtype);
        float[] dy = Representable(Normal(n * c, 33), dtype);
        float[]? first = null;
        for (int run = 0; run < 2; run++)
        {
            DevicePtr dX = Upload(x, dtype), dW = Upload(w, dtype), dDy = Upload(dy, dtype);
            DevicePtr dY = Alloc((long)n * c * dtype.ElementSize()), dR = Alloc(n * 4), dDw = Upload(new float[c], DType.F32);
            Ops.RmsNormForward(dtype, dX, dW, dY, dR, n, c, 1e-5f);
            Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, dDy, dDw, n, c);
            Gpu.Synchronize();
            float[] all = [.. Download(dY, n * c, dtype), .. Download(dR, n, DType.F32), .. Download(dDy, n * c, dtype), .. Download(dDw, c, DType.F32)];
            if (first is null) first = all;
            else AssertBitsEqual(all, first, "second run");
        }
    }

    [Test]
    public void RmsNormHostOverloads()
    {
        const int n = 3, c = 33;
        float[] x = Normal(n * c, 41), w = Normal(c, 42), dy = Normal(n * c, 43);
        var y = new float[n * c];
        var rstd = new float[n];
        Ops.RmsNormForward<float>(x, w, y, rstd, 1e-5f);
        (double[] yRef, double[] rRef) = RmsForward64(x, w, n, c, 1e-5);
        AssertClose(rstd, rRef, rRef, DType.F32, RmsBoundUlps(c), "rstd");
        AssertClose(y, yRef, yRef.Select(Math.Abs).ToArray(), DType.F32, RmsBoundUlps(c) + 2, "y");

        var xb = new BFloat16[n * c];
        var wb = new BFloat16[c];
        var dyb = new BFloat16[n * c];
        BFloat16.FromSingle(x, xb); BFloat16.FromSingle(w, wb); BFloat16.FromSingle(dy, dyb);
        var dxb = new BFloat16[n * c];
        var dw = new float[c];
        Ops.RmsNormBackward<BFloat16>(xb, wb, dyb, rstd, dxb, dw);
        Assert.That(dw.Any(v => v != 0f) && dxb.Any(v => v.ToSingle() != 0f), "outputs written");

        Assert.Throws<ArgumentException>(() => Ops.RmsNormForward<float>(x, w, new float[n * c - 1], rstd, 1e-5f));
        Assert.Throws<ArgumentException>(() => Ops.RmsNormForward<float>(x.AsSpan(1).ToArray(), w, y.AsSpan(1).ToArray(), [], 1e-5f));
        Assert.Throws<ArgumentException>(() => Ops.RmsNormForward<Half>(new Half[4], new Half[2], new Half[4], [], 1e-5f));
    }

    // ------------------------------------------------------------------------------------------
    // RoPE
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// cos/sin tables [maxPos, D/2] (fp32) for theta = 10000 (optionally llama3-scaled): RopeRef's inverse
    /// frequencies and tables in float64, rounded once to fp32 (what the kernels take).
    /// </summary>
    private static (float[] Cos, float[] Sin) RopeTables(int maxPos, int headDim, double theta = 10000.0, RopeScaling? llama3 = null)
    {
        int half = headDim / 2;
        double[] invFreq = RopeRef.InverseFrequencies(headDim, theta, llama3);
        var cos64 = new double[maxPos * half];
        var sin64 = new double[maxPos * half];
        RopeRef.Tables<double>(maxPos, invFreq, cos64, sin64);
        return (cos64.Select(v => (float)v).ToArray(), sin64.Select(v => (float)v).ToArray());
    }

    /// <summary>float64 rotation of a [tokens, rowStride] buffer's first heads*D values per row; sign -1 = backward.</summary>
    private static (double[] Out, double[] Mag) Rope64(float[] x, float[] cos, float[] sin, int[] pos, int heads, int d, long rowStride, double sign)
    {
        int half = d / 2;
        var o = x.Select(v => (double)v).ToArray();
        var mag = x.Select(v => Math.Abs((double)v)).ToArray();
        for (int n = 0; n < pos.Length; n++)
        {
            for (int h = 0; h < heads; h++)
            {
                long b0 = n * rowStride + (long)h * d;
                for (int i = 0; i < half; i++)
                {
                    double c = cos[pos[n] * half + i], s = sign * sin[pos[n] * half + i];
                    double a = x[b0 + i], b = x[b0 + i + half];
                    o[b0 + i] = a * c - b * s;
                    o[b0 + i + half] = b * c + a * s;
                    mag[b0 + i] = Math.Abs(a * c) + Math.Abs(b * s);
                    mag[b0 + i + half] = Math.Abs(b * c) + Math.Abs(a * s);
                }
            }
        }
        return (o, mag);
    }

    private static readonly (int Tokens, int Heads, int D)[] RopeShapes = [(1, 1, 2), (5, 3, 8), (7, 4, 64), (9, 2, 128), (3, 32, 128)];

    [Test]
    public void RopeForwardAndBackwardMatchFloat64([ValueSource(nameof(DTypes))] DType dtype,
        [ValueSource(nameof(RopeShapes))] (int Tokens, int Heads, int D) shape, [Values] bool backward)
    {
        (int tokens, int heads, int d) = shape;
        const int maxPos = 4096;
        (float[] cos, float[] sin) = RopeTables(maxPos, d, 500000.0, d >= 64 ? RopeScaling.Llama31 : null);
        var rng = new Random(tokens * 131 + d);
        int[] pos = Enumerable.Range(0, tokens).Select(t => t == 0 ? maxPos - 1 : rng.Next(maxPos)).ToArray();
        float[] x = Representable(Normal(tokens * heads * d, seed: 51 + d), dtype);

        DevicePtr dX = Upload(x, dtype), dCos = Upload(cos, DType.F32), dSin = Upload(sin, DType.F32), dPos = Upload(pos);
        if (backward) Ops.RopeBackward(dtype, dX, dCos, dSin, dPos, tokens, heads, d, maxPos);
        else Ops.RopeForward(dtype, dX, dCos, dSin, dPos, tokens, heads, d, maxPos);
        Gpu.Synchronize();
        float[] got = Download(dX, x.Length, dtype);
        (double[] local, double[] mag) = Rope64(x, cos, sin, pos, heads, d, (long)heads * d, backward ? -1.0 : 1.0);
        var expected = new double[x.Length];
        if (backward) RopeRef.BackwardFromTables<double>(ToDouble(x), pos, ToDouble(cos), ToDouble(sin), expected, tokens, heads, d);
        else RopeRef.ForwardFromTables<double>(ToDouble(x), pos, ToDouble(cos), ToDouble(sin), expected, tokens, heads, d);
        AssertOraclesAgree(expected, local, mag, "rope oracles");
        AssertClose(got, expected, mag, dtype, 4, backward ? "rope backward" : "rope forward");
    }

    [Test]
    public void RopeBackwardUndoesForwardAndPositionZeroIsIdentity()
    {
        const int tokens = 6, heads = 4, d = 64, maxPos = 300;
        (float[] cos, float[] sin) = RopeTables(maxPos, d);
        int[] pos = [0, 1, 2, 17, 255, 299];
        float[] x = Normal(tokens * heads * d, 61);
        DevicePtr dX = Upload(x, DType.F32), dCos = Upload(cos, DType.F32), dSin = Upload(sin, DType.F32), dPos = Upload(pos);
        Ops.RopeForward(DType.F32, dX, dCos, dSin, dPos, tokens, heads, d, maxPos);
        Gpu.Synchronize();
        float[] rotated = Download(dX, x.Length, DType.F32);
        Assert.That(rotated.Take(heads * d), Is.EqualTo(x.Take(heads * d)), "position 0: cos 1, sin 0");
        Assert.That(rotated.Skip(heads * d).Take(d), Is.Not.EqualTo(x.Skip(heads * d).Take(d)), "position 1 rotates");
        Ops.RopeBackward(DType.F32, dX, dCos, dSin, dPos, tokens, heads, d, maxPos);
        Gpu.Synchronize();
        float[] back = Download(dX, x.Length, DType.F32);
        for (int i = 0; i < x.Length; i++)
        {
            int h0 = i - i % d, j = i % (d / 2);
            double scale = Math.Abs(x[h0 + j]) + Math.Abs(x[h0 + j + d / 2]);
            Assert.That(back[i], Is.EqualTo(x[i]).Within(8 * U * scale + AbsSlack), $"back[{i}]");
        }
    }

    [Test]
    public void RopeRotatesInsideStridedRowsOnly([ValueSource(nameof(DTypes))] DType dtype)
    {
        // q of a fused qkv output: rows of (hq + 2*hkv) * d, q in the first hq * d of each row
        const int tokens = 5, hq = 4, hkv = 2, d = 16, maxPos = 64;
        const long rowStride = (hq + 2 * hkv) * d;
        (float[] cos, float[] sin) = RopeTables(maxPos, d);
        int[] pos = [3, 9, 0, 63, 21];
        float[] qkv = Representable(Normal(tokens * (int)rowStride, 71), dtype);
        DevicePtr dX = Upload(qkv, dtype), dCos = Upload(cos, DType.F32), dSin = Upload(sin, DType.F32), dPos = Upload(pos);
        Ops.RopeForward(dtype, dX, dCos, dSin, dPos, tokens, hq, d, maxPos, rowStride);
        Gpu.Synchronize();
        float[] got = Download(dX, qkv.Length, dtype);
        (double[] expected, double[] mag) = Rope64(qkv, cos, sin, pos, hq, d, rowStride, 1.0);
        AssertClose(got, expected, mag, dtype, 4, "strided rope");
        for (int n = 0; n < tokens; n++)
        {
            for (long e = n * rowStride + hq * d; e < (n + 1) * rowStride; e++)
                Assert.That(got[e], Is.EqualTo(qkv[e]), $"k/v element {e} untouched");
        }
    }

    [Test]
    public void RopeValidatesArguments()
    {
        (float[] cos, float[] sin) = RopeTables(8, 4);
        var x = new float[2 * 1 * 4];
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.RopeForward<float>(x, cos, sin, [0, 8], 1, 4));
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.RopeBackward<float>(x, cos, sin, [-1, 0], 1, 4));
        Assert.Throws<ArgumentException>(() => Ops.RopeForward<float>(new float[2 * 3], cos, sin, [0, 1], 1, 3));
        Assert.Throws<ArgumentException>(() => Ops.RopeForward<float>(new float[7], cos, sin, [0, 1], 1, 4));
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            Ops.RopeForward(DType.F32, new DevicePtr(64), new DevicePtr(64), new DevicePtr(64), new DevicePtr(64), 2, 2, 4, 8, rowStride: 7));
        Assert.Throws<ArgumentException>(() =>
            Ops.RopeForward(DType.F16, new DevicePtr(64), new DevicePtr(64), new DevicePtr(64), new DevicePtr(64), 2, 2, 4, 8));

        // host overload: same result as the float64 rotation
        int[] pos = [5, 2];
        float[] v = Normal(x.Length, 81);
        float[] w = (float[])v.Clone();
        Ops.RopeForward<float>(w, cos, sin, pos, 1, 4);
        (double[] expected, double[] mag) = Rope64(v, cos, sin, pos, 1, 4, 4, 1.0);
        AssertClose(w, expected, mag, DType.F32, 4, "host rope");
    }

    [Test]
    public void RopeOutOfRangePositionTrapsOnTheEmulator()
    {
        if (Gpu.Properties.Kind != GpuKind.Emulated)
            Assert.Ignore("a device-side trap poisons a CUDA context; checked on the emulator only");
        (float[] cos, float[] sin) = RopeTables(4, 4);
        DevicePtr dX = Upload(new float[8], DType.F32), dCos = Upload(cos, DType.F32), dSin = Upload(sin, DType.F32);
        DevicePtr dPos = Upload(new[] { 0, 4 });
        var ex = Assert.Throws<EmulatorException>(() => Ops.RopeForward(DType.F32, dX, dCos, dSin, dPos, 2, 1, 4, 4));
        Assert.That(ex!.Message, Does.Contain("__trap"));
    }

    // ------------------------------------------------------------------------------------------
    // SwiGLU
    // ------------------------------------------------------------------------------------------

    private static readonly int[] SwiGluSizes = [1, 255, 256, 257, 70_000];

    private static float[] SwiGluGate(int n, int seed)
    {
        float[] g = Normal(n, seed, scale: 3.0);
        float[] extremes = [0f, -0f, 20f, -20f, 60f, -60f, 88f, -88f, 100f, -100f, 1e-30f, -1e-30f];
        for (int i = 0; i < Math.Min(n, extremes.Length); i++) g[i * 7 % n] = extremes[i];
        return g;
    }

    [Test]
    public void SwiGluForwardAndBackwardMatchFloat64([ValueSource(nameof(DTypes))] DType dtype, [ValueSource(nameof(SwiGluSizes))] int n)
    {
        float[] g = Representable(SwiGluGate(n, 91 + n), dtype);
        float[] u = Representable(Normal(n, 92 + n), dtype);
        float[] dh = Representable(Normal(n, 93 + n), dtype);
        DevicePtr dG = Upload(g, dtype), dU = Upload(u, dtype), dDh = Upload(dh, dtype);
        long bytes = (long)n * dtype.ElementSize();
        DevicePtr dH = Alloc(bytes), dDg = Alloc(bytes), dDu = Alloc(bytes);
        Ops.SwiGluForward(dtype, dG, dU, dH, n);
        Ops.SwiGluBackward(dtype, dG, dU, dDh, dDg, dDu, n);
        Gpu.Synchronize();
        float[] h = Download(dH, n, dtype), dg = Download(dDg, n, dtype), du = Download(dDu, n, dtype);

        var hRef = new double[n]; var hMag = new double[n];
        var dgRef = new double[n]; var dgMag = new double[n];
        var duRef = new double[n]; var duMag = new double[n];
        for (int i = 0; i < n; i++)
        {
            double z = g[i], sg = 1.0 / (1.0 + Math.Exp(-z)), silu = z * sg;
            hRef[i] = silu * u[i];
            hMag[i] = Math.Abs(hRef[i]);
            duRef[i] = dh[i] * silu;
            duMag[i] = Math.Abs(duRef[i]);
            dgRef[i] = dh[i] * (double)u[i] * sg * (1.0 + z * (1.0 - sg));
            dgMag[i] = Math.Abs(dh[i] * (double)u[i]) * sg * (1.0 + Math.Abs(z));
        }
        var hR = new double[n]; var dgR = new double[n]; var duR = new double[n];
        SwiGluRef.Forward<double>(ToDouble(g), ToDouble(u), hR, 1, n);
        SwiGluRef.Backward<double>(ToDouble(dh), ToDouble(g), ToDouble(u), dgR, duR, 1, n);
        AssertOraclesAgree(hR, hRef, hMag, "h oracles");
        AssertOraclesAgree(dgR, dgRef, dgMag, "dg oracles");
        AssertOraclesAgree(duR, duRef, duMag, "du oracles");
        (hRef, dgRef, duRef) = (hR, dgR, duR);
        Assert.That(h.Concat(dg).Concat(du).All(float.IsFinite), "finite outputs for |g| up to 100");
        AssertClose(h, hRef, hMag, dtype, 12, "h");
        AssertClose(du, duRef, duMag, dtype, 12, "du");
        AssertClose(dg, dgRef, dgMag, dtype, 16, "dg");
    }

    [Test]
    public void VectorAndElementwisePathsGiveTheSameBits([ValueSource(nameof(DTypes))] DType dtype)
    {
        // Buffers 16-byte aligned take the 8-elements-a-thread path (16-byte accesses); the same data one element
        // further on (not 16-byte aligned) takes the element-by-element path. Same per-element math: same bits.
        const int n = 1003;
        int es = dtype.ElementSize();
        float[] g = Representable(SwiGluGate(n, 111), dtype), u = Representable(Normal(n, 112), dtype), dh = Representable(Normal(n, 113), dtype);
        float[] Run(int shift, out float[] dg, out float[] du, out float[] sum)
        {
            DevicePtr At(float[]? values)
            {
                DevicePtr p = Alloc((long)(n + 1) * es).Offset((long)shift * es);
                if (values is not null) Write(p, values, dtype);
                return p;
            }
            DevicePtr dG = At(g), dU = At(u), dDh = At(dh), dH = At(null), dDg = At(null), dDu = At(null), dS = At(null);
            Ops.SwiGluForward(dtype, dG, dU, dH, n);
            Ops.SwiGluBackward(dtype, dG, dU, dDh, dDg, dDu, n);
            new GpuElementwiseOps(Gpu).Add(dtype, dG, dU, dS, n);
            Gpu.Synchronize();
            dg = Download(dDg, n, dtype);
            du = Download(dDu, n, dtype);
            sum = Download(dS, n, dtype);
            return Download(dH, n, dtype);
        }
        float[] hV = Run(0, out var dgV, out var duV, out var sV);
        float[] hS = Run(1, out var dgS, out var duS, out var sS);
        AssertBitsEqual(hS, hV, "swiglu h");
        AssertBitsEqual(dgS, dgV, "swiglu dg");
        AssertBitsEqual(duS, duV, "swiglu du");
        AssertBitsEqual(sS, sV, "add");
        for (int i = 0; i < n; i++)
            Assert.That(sV[i], Is.EqualTo(dtype == DType.F32 ? g[i] + u[i] : (float)BFloat16.FromSingle(g[i] + u[i])), $"add[{i}]");
    }

    [Test]
    public void SwiGluInPlaceAndHostOverloads()
    {
        const int n = 1000;
        float[] g = SwiGluGate(n, 101), u = Normal(n, 102), dh = Normal(n, 103);
        var h = new float[n];
        var dg = new float[n];
        var du = new float[n];
        Ops.SwiGluForward<float>(g, u, h);
        Ops.SwiGluBackward<float>(g, u, dh, dg, du);

        // in place on the device: h over g, then dg over g and du over u
        DevicePtr dG = Upload(g, DType.F32), dU = Upload(u, DType.F32), dDh = Upload(dh, DType.F32), dH = Alloc(n * 4);
        Ops.SwiGluForward(DType.F32, dG, dU, dH, n);
        Ops.SwiGluBackward(DType.F32, dG, dU, dDh, dG, dU, n);
        Gpu.Synchronize();
        Assert.That(Download(dH, n, DType.F32), Is.EqualTo(h), "h");
        Assert.That(Download(dG, n, DType.F32), Is.EqualTo(dg), "dg in place over g");
        Assert.That(Download(dU, n, DType.F32), Is.EqualTo(du), "du in place over u");

        Assert.That(h[0], Is.EqualTo(0f), "silu(0) = 0");
        Assert.Throws<ArgumentException>(() => Ops.SwiGluForward<float>(g, u.AsSpan(1).ToArray(), h));
        Assert.Throws<ArgumentOutOfRangeException>(() => Ops.SwiGluForward(DType.F32, dG, dU, dH, -1));
    }

    // ------------------------------------------------------------------------------------------
    // Embedding
    // ------------------------------------------------------------------------------------------

    private static readonly (int Tokens, int Hidden, int Vocab)[] EmbShapes = [(1, 1, 1), (10, 7, 5), (300, 64, 50), (37, 600, 1000), (513, 256, 3)];

    private static int[] Ids(int tokens, int vocab, int seed)
    {
        var rng = new Random(seed);
        int[] ids = Enumerable.Range(0, tokens).Select(_ => rng.Next(vocab)).ToArray();
        ids[0] = vocab - 1;
        if (tokens > 3) ids[3] = ids[1];  // a repeated id
        return ids;
    }

    [Test]
    public void EmbeddingForwardGathersRowsBitForBit([ValueSource(nameof(DTypes))] DType dtype, [ValueSource(nameof(EmbShapes))] (int Tokens, int Hidden, int Vocab) shape)
    {
        (int tokens, int hidden, int vocab) = shape;
        float[] table = Representable(Normal(vocab * hidden, 111 + hidden), dtype);
        int[] ids = Ids(tokens, vocab, 112 + tokens);
        DevicePtr dIds = Upload(ids), dTable = Upload(table, dtype), dOut = Alloc((long)tokens * hidden * dtype.ElementSize());
        Ops.EmbeddingForward(dtype, dIds, dTable, dOut, tokens, hidden, vocab);
        Gpu.Synchronize();
        float[] got = Download(dOut, tokens * hidden, dtype);
        var expected = new float[tokens * hidden];
        EmbeddingRef.Forward<float>(ids, table, expected, vocab, hidden);
        AssertBitsEqual(got, expected, "out");
    }

    [Test]
    public void EmbeddingBackwardEqualsSerialLoopBitForBit([ValueSource(nameof(DTypes))] DType dtype, [ValueSource(nameof(EmbShapes))] (int Tokens, int Hidden, int Vocab) shape)
    {
        (int tokens, int hidden, int vocab) = shape;
        float[] dout = Representable(Normal(tokens * hidden, 121 + hidden, scale: 1e3), dtype);  // wide range: order matters
        int[] ids = Ids(tokens, vocab, 122 + tokens);
        float[] dtable0 = Normal(vocab * hidden, 123);

        // the CPU reference in fp32: the serial loop in token order (dout widened exactly from bf16)
        var expected = (float[])dtable0.Clone();
        EmbeddingRef.Backward<float>(ids, dout, expected, vocab, hidden);
        var loop = (float[])dtable0.Clone();
        for (int n = 0; n < tokens; n++)
            for (int c = 0; c < hidden; c++)
                loop[ids[n] * hidden + c] += dout[n * hidden + c];
        AssertBitsEqual(expected, loop, "reference vs local serial loop");

        DevicePtr dIds = Upload(ids), dDout = Upload(dout, dtype);
        foreach (int partitions in new[] { 0, 1, Math.Min(3, vocab), vocab })
        {
            DevicePtr dTable = Upload(dtable0, DType.F32);
            Ops.EmbeddingBackward(dtype, dIds, dDout, dTable, tokens, hidden, vocab, partitions);
            Gpu.Synchronize();
            AssertBitsEqual(Download(dTable, vocab * hidden, DType.F32), expected, $"dtable ({partitions} vocabulary partitions)");
        }
    }

    [Test]
    public void EmbeddingHostOverloadsValidateIds()
    {
        const int vocab = 6, hidden = 5;
        float[] table = Normal(vocab * hidden, 131);
        var tb = new BFloat16[table.Length];
        BFloat16.FromSingle(table, tb);
        int[] ids = [5, 0, 5, 2];
        var outB = new BFloat16[ids.Length * hidden];
        Ops.EmbeddingForward<BFloat16>(ids, tb, hidden, outB);
        for (int n = 0; n < ids.Length; n++)
            Assert.That(outB.AsSpan(n * hidden, hidden).ToArray(), Is.EqualTo(tb.AsSpan(ids[n] * hidden, hidden).ToArray()), $"row {n}");

        var dtable = new float[vocab * hidden];
        float[] dout = Enumerable.Range(0, ids.Length * hidden).Select(i => (float)(i + 1)).ToArray();
        Ops.EmbeddingBackward<float>(ids, dout, hidden, dtable);
        Assert.That(dtable[5 * hidden + 1], Is.EqualTo(2f + 12f), "row 5 gets tokens 0 and 2");
        Assert.That(dtable[1 * hidden], Is.EqualTo(0f), "row 1 untouched");

        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => Ops.EmbeddingForward<float>([1, 6], table, hidden, new float[2 * hidden]));
        Assert.That(ex!.Message, Does.Contain("ids[1] = 6"));
        ex = Assert.Throws<ArgumentOutOfRangeException>(() => Ops.EmbeddingBackward<float>([-1], new float[hidden], hidden, dtable));
        Assert.That(ex!.Message, Does.Contain("ids[0] = -1"));
        Assert.Throws<ArgumentException>(() => Ops.EmbeddingForward<float>(ids, table.AsSpan(1).ToArray(), hidden, new float[ids.Length * hidden]));
    }

    [Test]
    public void EmbeddingOutOfRangeIdTrapsOnTheEmulator()
    {
        if (Gpu.Properties.Kind != GpuKind.Emulated)
            Assert.Ignore("a device-side trap poisons a CUDA context; checked on the emulator only");
        DevicePtr dIds = Upload(new[] { 0, 3 }), dTable = Upload(new float[3 * 4], DType.F32), dOut = Alloc(2 * 4 * 4);
        Assert.Throws<EmulatorException>(() => Ops.EmbeddingForward(DType.F32, dIds, dTable, dOut, 2, 4, 3));
        Assert.Throws<EmulatorException>(() => Ops.EmbeddingBackward(DType.F32, dIds, dOut, dTable, 2, 4, 3));
    }

    // ------------------------------------------------------------------------------------------
    // Launch shapes, dtype names
    // ------------------------------------------------------------------------------------------

    [Test]
    public void LaunchShapesAndDTypes()
    {
        Assert.That(GpuTransformerOps.RowBlockThreads(1), Is.EqualTo(32));
        Assert.That(GpuTransformerOps.RowBlockThreads(33), Is.EqualTo(64));
        Assert.That(GpuTransformerOps.RowBlockThreads(4096), Is.EqualTo(256));
        Assert.That(GpuTransformerOps.DTypeSuffix(DType.BF16), Is.EqualTo("bf16"));
        Assert.Throws<ArgumentException>(() => GpuTransformerOps.DTypeSuffix(DType.F16));
        int g = Ops.EmbeddingVocabPartitions(4096, 128_256);
        Assert.That(g, Is.InRange(1, 256));
        Assert.That(Ops.EmbeddingVocabPartitions(64, 2), Is.InRange(1, 2));
        foreach (string op in new[] { "rmsnorm_forward", "rmsnorm_backward", "rmsnorm_backward_dw", "rope_forward", "rope_backward",
                                      "swiglu_forward", "swiglu_backward", "embedding_forward", "embedding_backward" })
        {
            foreach (string dt in new[] { "f32", "bf16" })
                Assert.That(Gpu.HasKernel($"{op}_{dt}"), $"{op}_{dt} loaded");
        }
    }

    /// <summary>Emulator timing of a [4096 x 4096] RMSNorm forward + backward (dx and dw), fp32 and bf16.</summary>
    [Test, Explicit("timing, ~seconds on the emulator")]
    public void RmsNorm4096Timing([ValueSource(nameof(DTypes))] DType dtype)
    {
        const int n = 4096, c = 4096;
        float[] x = Representable(Normal(n * c, 141), dtype), w = Representable(Normal(c, 142), dtype);
        DevicePtr dX = Upload(x, dtype), dW = Upload(w, dtype), dDy = Upload(x, dtype);
        DevicePtr dY = Alloc((long)n * c * dtype.ElementSize()), dR = Alloc(n * 4), dDx = Alloc((long)n * c * dtype.ElementSize());
        DevicePtr dDw = Upload(new float[c], DType.F32);
        for (int rep = 0; rep < 2; rep++)
        {
            var sw = Stopwatch.StartNew();
            Ops.RmsNormForward(dtype, dX, dW, dY, dR, n, c, 1e-5f);
            Gpu.Synchronize();
            double fwd = sw.Elapsed.TotalMilliseconds;
            sw.Restart();
            Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, dDx, DevicePtr.Null, n, c);
            Gpu.Synchronize();
            double bwdDx = sw.Elapsed.TotalMilliseconds;
            sw.Restart();
            Ops.RmsNormBackward(dtype, dX, dW, dDy, dR, DevicePtr.Null, dDw, n, c);
            Gpu.Synchronize();
            double bwdDw = sw.Elapsed.TotalMilliseconds;
            TestContext.Out.WriteLine($"{Device} {dtype} [4096 x 4096] rep {rep}: forward {fwd:F0} ms, backward dx {bwdDx:F0} ms, dw {bwdDw:F0} ms");
        }
        Assert.That(Download(dR, n, DType.F32).All(float.IsFinite));
    }
}
