using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;
using static NativePeft.Tests.Ops.TestData;
using Problem = NativePeft.Tests.Ops.AttentionTcForwardTests.Problem;

namespace NativePeft.Tests.Ops;

/// <summary>
/// The split-KV decode (kernels/attention_decode.cu: flash-decoding on mma.sync, then the combine of the splits) through
/// <see cref="GpuAttentionOps"/>, on the emulator and, when present, a CUDA device; the emulator also runs each case
/// under the race checks. Oracle and bound: those of <see cref="AttentionTcForwardTests"/> (a float64 softmax; P rounded
/// to bf16 as the MMA operand inside each split, the output rounded once): the split partials stay fp32 and the
/// combine's weights exp(lse_s − lse) are fp32, which the bound's 2^-16·A term covers.
/// </summary>
public sealed class AttentionDecodeTests(string device) : DeviceFixture<GpuAttentionOps>(device)
{
    private const int Batch = AttentionTcForwardTests.Batch;

    protected override GpuAttentionOps CreateOps(IGpu gpu) => new(gpu, tensorCores: true);

    protected override IEnumerable<string> RequiredKernels =>
        ["attention_decode_tc_d64_bf16", "attention_decode_tc_d128_bf16", "attention_decode_combine_bf16"];

    /// <summary>(Tq, Tk, Hq, Hkv, D, splits): one query (decode), a few (G·Tq = 16 fills the tile), splits of 1..8 tiles.</summary>
    private static readonly (int Tq, int Tk, int Hq, int Hkv, int D, int Splits)[] Cases =
    [
        (1, 130, 8, 2, 128, 2), (1, 130, 8, 2, 128, 3), (1, 1000, 32, 8, 128, 5), (4, 300, 16, 4, 64, 3),
        (2, 65, 4, 1, 64, 2), (1, 64, 4, 4, 64, 1), (3, 200, 8, 2, 128, 4),
    ];

    private (float[] Out, float[] Lse, int Splits) Run(Problem p, int splits)
    {
        DevicePtr q = Upload(p.Q, DType.BF16), k = Upload(p.K, DType.BF16), v = Upload(p.V, DType.BF16);
        int qn = Batch * p.Tq * p.Hq * p.D, ln = Batch * p.Hq * p.Tq;
        DevicePtr o = Alloc(qn * 2L), l = Alloc(ln * 4L);
        Gpu.Memset(o, 0x7f, qn * 2L);
        long wsBytes = splits * GpuAttentionOps.DecodeWorkspaceBytesPerSplit(Batch, p.Hkv, p.D);
        DevicePtr ws = Alloc(wsBytes);
        int ran = Ops.ForwardDecode(q, k, v, o, l, Batch, p.Tq, p.Tk, p.Hq, p.Hkv, p.D, ws, wsBytes, splits);
        Gpu.Synchronize();
        return (Download(o, qn, DType.BF16), Download(l, ln, DType.F32), ran);
    }

    private static IEnumerable<int> CaseIndices() => Enumerable.Range(0, Cases.Length);

    [TestCaseSource(nameof(CaseIndices))]
    public void Decode_MatchesTheFloat64Softmax_WithinTheBf16POperandBound(int c)
    {
        var s = Cases[c];
        Problem p = AttentionTcForwardTests.Make((s.Tq, s.Tk, s.Hq, s.Hkv, s.D), seed: 80 + c);
        var (out_, lse, ran) = Run(p, s.Splits);
        // Equal chunks of whole 64-key tiles: ceil(tiles / ceil(tiles / splits)) of them.
        int tiles = (s.Tk + 63) / 64, chunk = (tiles + Math.Min(s.Splits, tiles) - 1) / Math.Min(s.Splits, tiles);
        Assert.That(ran, Is.EqualTo((tiles + chunk - 1) / chunk), "splits");
        var (wo, wl) = AttentionTcForwardTests.WorstError(p, out_, lse);
        TestContext.Out.WriteLine($"{Device} {s}: {ran} splits, worst out error {wo:F3} of its bound, lse {wl:F3}");
        Assert.Multiple(() =>
        {
            Assert.That(wo, Is.LessThanOrEqualTo(1.0), "out");
            Assert.That(wl, Is.LessThanOrEqualTo(1.0), "lse");
        });
        var again = UnderOtherSchedule((ulong)c + 3, () => Tuple.Create(Run(p, s.Splits)));
        if (again is not null)
        {
            AssertBitsEqual(again.Item1.Out, out_, "out under another schedule of the race checks");
            AssertBitsEqual(again.Item1.Lse, lse, "lse under another schedule of the race checks");
        }
    }

    [Test]
    public void ForwardCached_WithAWorkspace_TakesTheSplitPath_AndAgrees()
    {
        // The automatic choice: one query of a 4-head group against 300 keys, a workspace for 8 splits.
        Problem p = AttentionTcForwardTests.Make((1, 300, 4, 1, 128), seed: 5);
        long wsBytes = 8 * GpuAttentionOps.DecodeWorkspaceBytesPerSplit(Batch, p.Hkv, p.D);
        DevicePtr ws = Alloc(wsBytes);
        int splits = Ops.DecodeSplits(Batch, p.Tq, p.Tk, p.Hq, p.Hkv, p.D, ws, wsBytes);
        Assert.That(splits, Is.InRange(2, 5), "the heuristic splits a long cache (at most its 5 key tiles)");
        Assert.That(Ops.DecodeSplits(Batch, p.Tq, p.Tk, p.Hq, p.Hkv, p.D, DevicePtr.Null, 0), Is.EqualTo(0), "no workspace: the forward kernel");
        Assert.That(Ops.DecodeSplits(Batch, 5, p.Tk, p.Hq, p.Hkv, p.D, ws, wsBytes), Is.EqualTo(0), "G·Tq = 20 rows: the forward kernel");
        Assert.That(Ops.DecodeSplits(Batch, p.Tq, 40, p.Hq, p.Hkv, p.D, ws, wsBytes), Is.EqualTo(1), "one key tile: the decode kernel, one split");
        Assert.That(Ops.DecodeSplits(Batch, p.Tq, p.Tk, p.Hq, p.Hkv, p.D, ws,
            GpuAttentionOps.DecodeWorkspaceBytesPerSplit(Batch, p.Hkv, p.D)), Is.EqualTo(1), "room for one split: one");

        DevicePtr q = Upload(p.Q, DType.BF16), k = Upload(p.K, DType.BF16), v = Upload(p.V, DType.BF16);
        int qn = Batch * p.Tq * p.Hq * p.D, ln = Batch * p.Hq * p.Tq;
        DevicePtr o = Alloc(qn * 2L), l = Alloc(ln * 4L);
        Ops.ForwardCached(DType.BF16, q, k, v, o, l, Batch, p.Tq, p.Tk, p.Hq, p.Hkv, p.D, ws, wsBytes);
        Gpu.Synchronize();
        var (wo, wl) = AttentionTcForwardTests.WorstError(p, Download(o, qn, DType.BF16), Download(l, ln, DType.F32));
        Assert.That(Math.Max(wo, wl), Is.LessThanOrEqualTo(1.0));
    }

    [Test]
    public void Decode_WithTooSmallAWorkspace_IsRefused()
    {
        Problem p = AttentionTcForwardTests.Make((1, 200, 8, 2, 128), seed: 6);
        DevicePtr q = Upload(p.Q, DType.BF16), k = Upload(p.K, DType.BF16), v = Upload(p.V, DType.BF16);
        DevicePtr o = Alloc(Batch * p.Hq * p.D * 2L), ws = Alloc(1024);
        var e = Assert.Throws<ArgumentException>(() =>
            Ops.ForwardDecode(q, k, v, o, DevicePtr.Null, Batch, 1, p.Tk, p.Hq, p.Hkv, p.D, ws, 1024, 4));
        Assert.That(e!.Message, Does.Contain("workspace must hold 4 splits"));
    }
}
