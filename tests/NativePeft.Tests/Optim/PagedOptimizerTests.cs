using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NUnit.Framework;
using static NativePeft.Tests.Optim.OptimTestSupport;

namespace NativePeft.Tests.Optim;

/// <summary>
/// The paged forms: the same update as the unpaged ones (bit for bit), with m and v of parameters of ≥ 1e5 elements
/// in managed memory on a GPU (outside the ops' TensorMemory, reported by PagedStateBytes), plain memory on the CPU.
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulated")]
[TestFixture("cuda")]
public sealed class PagedOptimizerTests(string device)
{
    private IOps _ops = null!;

    [SetUp] public void Create() => _ops = CreateOps(device);
    [TearDown] public void Dispose() => _ops?.Dispose();

    [Test]
    public void PagedEqualsUnpagedAndPlacesLargeStatesInManagedMemory([Values(false, true)] bool eightBit)
    {
        const int large = 100_000, small = 99_999;
        var rng = new Random(8);
        var p0 = new[] { Normal(rng, large), Normal(rng, small) };
        var pa = p0.Select(p => Upload(_ops, p)).ToArray();
        var pb = p0.Select(p => Upload(_ops, p)).ToArray();
        var g = new[] { _ops.Memory.Allocate(DType.F32, large), _ops.Memory.Allocate(DType.F32, small) };
        using AdamWOptimizer plain = eightBit ? new AdamW8bit(_ops) : new AdamW(_ops);
        using AdamWOptimizer paged = eightBit ? new PagedAdamW8bit(_ops) : new PagedAdamW(_ops);
        long before = _ops.Memory.AllocatedBytes;
        for (int step = 0; step < 2; step++)
        {
            _ops.Upload<float>(Normal(rng, large), g[0]);
            _ops.Upload<float>(Normal(rng, small), g[1]);
            plain.Step([("big", pa[0], g[0]), ("small", pa[1], g[1])], 1e-3);
            if (step == 0) before = _ops.Memory.AllocatedBytes;
            paged.Step([("big", pb[0], g[0]), ("small", pb[1], g[1])], 1e-3);
            paged.PrefetchStateToHost(); // between steps, as a memory plan may ask; values unchanged
        }
        for (int k = 0; k < 2; k++) Assert.That(Download(_ops, pb[k]), Is.EqualTo(Download(_ops, pa[k])));
        Assert.That(paged.StateBytes, Is.EqualTo(plain.StateBytes));
        long mvLarge = (eightBit ? 1 : 4) * 2L * large;
        long pagedInTensorMemory = _ops.Memory.AllocatedBytes - before;
        if (device == "cpu")
        {
            Assert.That(paged.PagedStateBytes, Is.Zero, "no GPU: plain memory");
            Assert.That(pagedInTensorMemory, Is.EqualTo(paged.StateBytes));
        }
        else
        {
            Assert.That(paged.PagedStateBytes, Is.EqualTo(mvLarge), "m and v of the 1e5-element parameter only (not its absmax, not the 99 999 one)");
            Assert.That(pagedInTensorMemory, Is.EqualTo(paged.StateBytes - mvLarge + (eightBit ? 2 * 256 * sizeof(float) : 0)),
                "managed state is outside the ops' TensorMemory (the 8-bit forms add their two 1 KB maps)");
        }
        Assert.That(plain.PagedStateBytes, Is.Zero);
        Assert.That(paged.StateBytes, Is.EqualTo(AdamWOptimizer.StateBytesFor(large, eightBit) + AdamWOptimizer.StateBytesFor(small, eightBit)));
        if (device != "cpu")
            Assert.That(paged.PagedStateBytes, Is.EqualTo(AdamWOptimizer.PagedStateBytesFor(large, eightBit) + AdamWOptimizer.PagedStateBytesFor(small, eightBit)));
    }
}
