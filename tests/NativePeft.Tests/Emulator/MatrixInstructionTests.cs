using NativePeft.Numerics;
using NativePeft.Runtime;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Emulator;

/// <summary>
/// The warp-level matrix instructions of kernels/mma.cuh (mma.sync m16n8k16 bf16, ldmatrix x1/x2/x4 with and
/// without .trans, cp.async with zero fill and commit/wait groups) through kernels/selftest.cu, on the emulator and,
/// when one exists, a CUDA device.
/// <para>
/// Oracle: the per-lane tables below, written from the PTX ISA (§9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with
/// floating point type", §9.7.14.5.15 "ldmatrix"), not from the emulator's code: the test lays out the fragments
/// itself, the kernel only passes registers through the instruction, and the result is mapped back with the same
/// tables and compared with a float64 product. A negative control lays A out with a wrong table and must fail.
/// </para>
/// </summary>
public sealed class MatrixInstructionTests(string device) : DeviceFixture<IGpu>(device)
{
    protected override IGpu CreateOps(IGpu gpu) => gpu;

    protected override IEnumerable<string> RequiredKernels => ["selftest_mma_bf16", "selftest_ldmatrix", "selftest_cp_async"];

    // ------------------------------------------------------------------------------------------
    // The PTX ISA's fragment tables (g = lane / 4 "groupID", t = lane % 4 "threadID_in_group")
    // ------------------------------------------------------------------------------------------

    /// <summary>A (16x16, .row): element i = 0..7 of a lane (register i / 2, half i % 2).</summary>
    private static (int Row, int Col) AElement(int lane, int i)
    {
        int g = lane / 4, t = lane % 4;
        int row = i is 0 or 1 or 4 or 5 ? g : g + 8;
        int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        return (row, col);
    }

    /// <summary>B (16x8, .col): element i = 0..3 (register i / 2).</summary>
    private static (int Row, int Col) BElement(int lane, int i)
    {
        int g = lane / 4, t = lane % 4;
        return (t * 2 + (i & 1) + (i >= 2 ? 8 : 0), g);
    }

    /// <summary>C and D (16x8 fp32): element i = 0..3.</summary>
    private static (int Row, int Col) CElement(int lane, int i)
    {
        int g = lane / 4, t = lane % 4;
        return (i < 2 ? g : g + 8, t * 2 + (i & 1));
    }

    /// <summary>A wrong table for the negative control: registers 1 and 2 exchanged (rows g+8 and columns +8 swapped).</summary>
    private static (int Row, int Col) AElementWrong(int lane, int i)
    {
        int swapped = i switch { 2 => 4, 3 => 5, 4 => 2, 5 => 3, _ => i };
        return AElement(lane, swapped);
    }

    private static ushort Bf16Bits(float x) => BFloat16.FromSingle(x).RawValue;

    private static uint Pack(ushort lo, ushort hi) => lo | ((uint)hi << 16);

    private static float[,] RandomBf16Matrix(Random rng, int rows, int cols)
    {
        var m = new float[rows, cols];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                m[r, c] = BFloat16.FromSingle((float)(rng.NextDouble() * 4 - 2)).ToSingle();
        return m;
    }

    private (float[] D, float[,][] A, float[,][] B, float[,][] C) RunMma(int warps, int seed,
        Func<int, int, (int, int)> aTable)
    {
        var rng = new Random(seed);
        var a = new uint[warps * 32 * 4];
        var b = new uint[warps * 32 * 2];
        var c = new float[warps * 32 * 4];
        var mats = new (float[,] A, float[,] B, float[,] C)[warps];
        for (int w = 0; w < warps; w++)
        {
            float[,] A = RandomBf16Matrix(rng, 16, 16), B = RandomBf16Matrix(rng, 16, 8);
            var C = new float[16, 8];
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 8; n++)
                    C[r, n] = (float)(rng.NextDouble() * 2 - 1);
            mats[w] = (A, B, C);
            for (int lane = 0; lane < 32; lane++)
            {
                int tid = w * 32 + lane;
                for (int reg = 0; reg < 4; reg++)
                {
                    var (r0, c0) = aTable(lane, 2 * reg);
                    var (r1, c1) = aTable(lane, 2 * reg + 1);
                    a[tid * 4 + reg] = Pack(Bf16Bits(A[r0, c0]), Bf16Bits(A[r1, c1]));
                }
                for (int reg = 0; reg < 2; reg++)
                {
                    var (r0, c0) = BElement(lane, 2 * reg);
                    var (r1, c1) = BElement(lane, 2 * reg + 1);
                    b[tid * 2 + reg] = Pack(Bf16Bits(B[r0, c0]), Bf16Bits(B[r1, c1]));
                }
                for (int i = 0; i < 4; i++)
                {
                    var (r, n) = CElement(lane, i);
                    c[tid * 4 + i] = C[r, n];
                }
            }
        }
        DevicePtr pa = Upload(a), pb = Upload(b), pc = Upload(c), pd = Alloc(c.Length * 4L);
        Gpu.Launch("selftest_mma_bf16", 1, warps * 32, 0, pa, pb, pc, pd);
        float[] d = Download<float>(pd, c.Length);
        return (d, Wrap(mats.Select(m => m.A)), Wrap(mats.Select(m => m.B)), Wrap(mats.Select(m => m.C)));
    }

    private static float[,][] Wrap(IEnumerable<float[,]> ms)
    {
        var list = ms.ToList();
        var r = new float[list.Count, 1][];
        for (int i = 0; i < list.Count; i++) r[i, 0] = Flatten(list[i]);
        return r;
    }

    private static float[] Flatten(float[,] m)
    {
        int rows = m.GetLength(0), cols = m.GetLength(1);
        var f = new float[rows * cols];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                f[r * cols + c] = m[r, c];
        return f;
    }

    /// <summary>
    /// Worst |D − (A·B + C)| over all elements, as a fraction of the allowed error: the products of bf16 values are
    /// exact in fp32 and the hardware accumulates 16 of them and C in fp32 in an unspecified order (with possible
    /// truncation), so each element may be off by up to 17 · 2^-23 · (Σ_k |a_ik b_kj| + |c_ij|).
    /// </summary>
    private static double WorstMmaError(float[] d, float[,][] A, float[,][] B, float[,][] C, int warps)
    {
        double worst = 0;
        for (int w = 0; w < warps; w++)
        {
            float[] a = A[w, 0], b = B[w, 0], c = C[w, 0];
            for (int lane = 0; lane < 32; lane++)
                for (int i = 0; i < 4; i++)
                {
                    var (r, n) = CElement(lane, i);
                    double exact = c[r * 8 + n], mag = Math.Abs(c[r * 8 + n]);
                    for (int k = 0; k < 16; k++)
                    {
                        exact += (double)a[r * 16 + k] * b[k * 8 + n];
                        mag += Math.Abs((double)a[r * 16 + k] * b[k * 8 + n]);
                    }
                    double got = d[(w * 32 + lane) * 4 + i];
                    double allowed = 17 * Math.Pow(2, -23) * mag + 1e-30;
                    worst = Math.Max(worst, Math.Abs(got - exact) / allowed);
                }
        }
        return worst;
    }

    [Test]
    public void Mma_m16n8k16_Bf16_MatchesTheFloat64ProductUnderThePtxLayout([Values(1, 4)] int warps)
    {
        var (d, A, B, C) = RunMma(warps, seed: 11 + warps, AElement);
        double worst = WorstMmaError(d, A, B, C, warps);
        TestContext.Out.WriteLine($"{Device}: worst |D - (AB+C)| = {worst:F3} of the fp32 accumulation bound");
        Assert.That(worst, Is.LessThanOrEqualTo(1.0));
    }

    [Test]
    public void Mma_WithAWrongLaneMappingOfA_GivesAWrongProduct()
    {
        // Negative control: the same instruction fed with A laid out by a table that swaps registers 1 and 2 must
        // not reproduce A·B + C (so the test above can tell a right layout from a wrong one).
        var (d, A, B, C) = RunMma(1, seed: 5, AElementWrong);
        Assert.That(WorstMmaError(d, A, B, C, 1), Is.GreaterThan(1000.0));
    }

    [Test]
    public void Mma_IdentityTimesB_IsExact()
    {
        // A hand-computed case: A = I (16x16), C = 0.5 everywhere, so D = B + 0.5 exactly for bf16 B in [-2, 2).
        var rng = new Random(3);
        float[,] B = RandomBf16Matrix(rng, 16, 8);
        var a = new uint[128];
        var b = new uint[64];
        var c = new float[128];
        for (int lane = 0; lane < 32; lane++)
        {
            for (int reg = 0; reg < 4; reg++)
            {
                var (r0, c0) = AElement(lane, 2 * reg);
                var (r1, c1) = AElement(lane, 2 * reg + 1);
                a[lane * 4 + reg] = Pack(Bf16Bits(r0 == c0 ? 1f : 0f), Bf16Bits(r1 == c1 ? 1f : 0f));
            }
            for (int reg = 0; reg < 2; reg++)
            {
                var (r0, c0) = BElement(lane, 2 * reg);
                var (r1, c1) = BElement(lane, 2 * reg + 1);
                b[lane * 2 + reg] = Pack(Bf16Bits(B[r0, c0]), Bf16Bits(B[r1, c1]));
            }
            for (int i = 0; i < 4; i++) c[lane * 4 + i] = 0.5f;
        }
        DevicePtr pa = Upload(a), pb = Upload(b), pc = Upload(c), pd = Alloc(512);
        Gpu.Launch("selftest_mma_bf16", 1, 32, 0, pa, pb, pc, pd);
        float[] d = Download<float>(pd, 128);
        for (int lane = 0; lane < 32; lane++)
            for (int i = 0; i < 4; i++)
            {
                var (r, n) = CElement(lane, i);
                // D is 16x8 and A = I, so D[r][n] = B[r][n] + 0.5 for the 16 rows of B.
                Assert.That(d[lane * 4 + i], Is.EqualTo(B[r, n] + 0.5f), $"lane {lane} element {i}");
            }
    }

    // ------------------------------------------------------------------------------------------
    // ldmatrix
    // ------------------------------------------------------------------------------------------

    [Test]
    public void Ldmatrix_DeliversThePtxIsaFragments([Values(1, 2, 4)] int num, [Values(false, true)] bool trans)
    {
        // 64 rows of 16 bytes (8 bf16 bit patterns each, all distinct); each matrix's 8 rows are scattered over
        // random 16-byte slots (rows may be anywhere in shared memory). Lanes at or past 8·num get other valid
        // addresses, which the instruction must ignore.
        const int slots = 64;
        var rng = new Random(100 + num * 2 + (trans ? 1 : 0));
        var image = new ushort[slots * 8];
        for (int i = 0; i < image.Length; i++) image[i] = (ushort)(0x1000 + i * 7);
        int[] perm = Enumerable.Range(0, slots).OrderBy(_ => rng.Next()).ToArray();
        var offsets = new int[32];
        for (int lane = 0; lane < 32; lane++) offsets[lane] = perm[lane] * 16;

        var expected = new uint[32, 4];
        for (int lane = 0; lane < 32; lane++)
        {
            int i = lane / 4, w = lane % 4;
            for (int m = 0; m < num; m++)
            {
                // M_m[row][col] = element col of the row whose address lane 8m + row supplies.
                ushort M(int row, int col) => image[offsets[8 * m + row] / 2 + col];
                expected[lane, m] = trans ? Pack(M(2 * w, i), M(2 * w + 1, i)) : Pack(M(i, 2 * w), M(i, 2 * w + 1));
            }
        }

        DevicePtr src = Upload(image), off = Upload(offsets), out_ = Alloc(32 * 4 * 4);
        Gpu.Launch("selftest_ldmatrix", 1, 32, slots * 16, src, slots * 16, off, num, trans ? 1 : 0, out_);
        uint[] got = Download<uint>(out_, 128);
        for (int lane = 0; lane < 32; lane++)
            for (int m = 0; m < num; m++)
                Assert.That(got[lane * 4 + m], Is.EqualTo(expected[lane, m]), $"lane {lane} register {m}");

        // Negative control: the other variant's table does not describe what was delivered.
        int mismatches = 0;
        for (int lane = 0; lane < 32; lane++)
        {
            int i = lane / 4, w = lane % 4;
            ushort M0(int row, int col) => image[offsets[row] / 2 + col];
            uint other = trans ? Pack(M0(i, 2 * w), M0(i, 2 * w + 1)) : Pack(M0(2 * w, i), M0(2 * w + 1, i));
            if (other != got[lane * 4]) mismatches++;
        }
        Assert.That(mismatches, Is.GreaterThan(16));
    }

    // ------------------------------------------------------------------------------------------
    // cp.async
    // ------------------------------------------------------------------------------------------

    private (byte[] Expected, byte[] Got) RunCpAsync(int n, int earlyRead, int seed)
    {
        var rng = new Random(seed);
        var src = new byte[n * 16];
        rng.NextBytes(src);
        int[] choices = [0, 4, 8, 12, 16, 16, 16];
        var srcBytes = new int[n];
        for (int t = 0; t < n; t++) srcBytes[t] = choices[rng.Next(choices.Length)];
        var expected = new byte[n * 16];
        for (int t = 0; t < n; t++)
            for (int k = 0; k < srcBytes[t]; k++)
                expected[t * 16 + k] = src[t * 16 + k];
        DevicePtr ps = Upload(src), pb = Upload(srcBytes), po = Alloc(n * 16);
        Gpu.Launch("selftest_cp_async", 1, n, n * 16, ps, pb, po, earlyRead);
        return (expected, Download<byte>(po, n * 16));
    }

    [Test]
    public void CpAsync_CopiesAndZeroFillsInCommitGroups([Values(64, 256)] int n)
    {
        var (expected, got) = RunCpAsync(n, earlyRead: 0, seed: n);
        Assert.That(got, Is.EqualTo(expected));
    }
}
