using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Emulator;

/// <summary>
/// The emulator's race-finding checks (<see cref="EmulatorChecks"/>) on kernels with planted bugs that the default
/// schedule hides: each bug must show under its check and the correct twin must not change. Emulator only (the bugs
/// are races on a GPU).
/// </summary>
[TestFixture]
[NonParallelizable]
public sealed class EmulatorCheckModeTests
{
    private EmulatedGpu _gpu = null!;

    [OneTimeSetUp]
    public void CreateEmulator()
    {
        if (!EmulatedGpu.TryCreate(out EmulatedGpu? gpu, out string reason))
            Assert.Fail($"the CPU emulator is part of the build and must load: {reason}");
        _gpu = gpu!;
    }

    // Each test starts from the default schedule (the planted bugs are invisible there) and leaves the process's
    // default checks (NATIVEPEFT_EMU_CHECKS) in force after it.
    [SetUp]
    public void ChecksOff() => _gpu.SetChecks(EmulatorChecks.None);

    [TearDown]
    public void DefaultChecksBack() => _gpu.SetChecks(_gpu.DefaultChecks);

    [OneTimeTearDown]
    public void DisposeEmulator() => _gpu?.Dispose();

    private float[] Neighbour(float[] x, int barrier)
    {
        DevicePtr px = _gpu.Alloc(x.Length * 4), po = _gpu.Alloc(x.Length * 4);
        try
        {
            _gpu.CopyToDevice<float>(x, px);
            _gpu.Launch("selftest_neighbour", 1, x.Length, x.Length * 4, px, po, barrier);
            var o = new float[x.Length];
            _gpu.CopyToHost<float>(po, o);
            return o;
        }
        finally
        {
            _gpu.Free(px);
            _gpu.Free(po);
        }
    }

    private static float[] Shifted(float[] x) => x.Select((_, t) => x[Math.Max(t - 1, 0)]).ToArray();

    [Test]
    public void ShuffledThreads_ExposeAMissingBarrier()
    {
        float[] x = Enumerable.Range(0, 128).Select(i => 1f + i).ToArray();
        // The default schedule runs thread t - 1 before thread t, so the race is invisible there.
        Assert.That(Neighbour(x, barrier: 0), Is.EqualTo(Shifted(x)));
        int exposed = 0;
        for (ulong seed = 1; seed <= 4; seed++)
        {
            _gpu.SetChecks(EmulatorChecks.ShuffleThreads, seed);
            if (!Neighbour(x, barrier: 0).SequenceEqual(Shifted(x))) exposed++;
            Assert.That(Neighbour(x, barrier: 1), Is.EqualTo(Shifted(x)), $"seed {seed}: the correct kernel changed");
        }
        Assert.That(exposed, Is.EqualTo(4), "every shuffled schedule of 128 threads should expose the race");
    }

    private byte[] CpAsync(int n, int earlyRead, out byte[] expected)
    {
        var rng = new Random(7);
        var src = new byte[n * 16];
        rng.NextBytes(src);
        var srcBytes = Enumerable.Repeat(16, n).ToArray();
        expected = src;
        DevicePtr ps = _gpu.Alloc(src.Length), pb = _gpu.Alloc(n * 4), po = _gpu.Alloc(src.Length);
        try
        {
            _gpu.CopyToDevice<byte>(src, ps);
            _gpu.CopyToDevice<int>(srcBytes, pb);
            _gpu.Launch("selftest_cp_async", 1, n, n * 16, ps, pb, po, earlyRead);
            var o = new byte[src.Length];
            _gpu.CopyToHost<byte>(po, o);
            return o;
        }
        finally
        {
            _gpu.Free(ps);
            _gpu.Free(pb);
            _gpu.Free(po);
        }
    }

    [Test]
    public void DeferredAsyncCopies_ExposeAReadBeforeTheWait()
    {
        // Copying at issue is a legal schedule, and under it the early read happens to see the data.
        Assert.That(CpAsync(64, earlyRead: 1, out byte[] expected), Is.EqualTo(expected));
        _gpu.SetChecks(EmulatorChecks.DeferAsyncCopies | EmulatorChecks.ShuffleThreads, 9);
        byte[] early = CpAsync(64, earlyRead: 1, out expected);
        Assert.That(early.Take(32 * 16).All(b => b == 0xFF), Is.True, "the first half was read before its wait: poison");
        Assert.That(early.Skip(32 * 16), Is.EqualTo(expected.Skip(32 * 16)), "the second half was read after its wait");
        Assert.That(CpAsync(64, earlyRead: 0, out expected), Is.EqualTo(expected), "the correct kernel changed");
    }

    [Test]
    public void MatrixInstruction_WithMissingLanes_IsAnErrorNotAHang()
    {
        // 48 threads: the second warp has 16 lanes, and mma.sync needs all 32.
        DevicePtr p = _gpu.Alloc(48 * 16);
        try
        {
            _gpu.Memset(p, 0, 48 * 16);
            var e = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_mma_bf16", 1, 48, 0, p, p, p, p));
            Assert.That(e!.Message, Does.Contain("needs all 32 lanes"));
        }
        finally
        {
            _gpu.Free(p);
        }
    }

    [Test]
    public void StrictCollectives_LdmatrixOutsideSharedMemoryIsAnError()
    {
        // selftest_ldmatrix with offsets far past the launch's dynamic shared memory.
        var offsets = Enumerable.Range(0, 32).Select(i => 4096 + 16 * i).ToArray();
        DevicePtr src = _gpu.Alloc(1024), off = _gpu.Alloc(128), o = _gpu.Alloc(512);
        try
        {
            _gpu.Memset(src, 0, 1024);
            _gpu.CopyToDevice<int>(offsets, off);
            _gpu.SetChecks(EmulatorChecks.StrictCollectives);
            var e = Assert.Throws<EmulatorException>(() => _gpu.Launch("selftest_ldmatrix", 1, 32, 1024, src, 1024, off, 4, 0, o));
            Assert.That(e!.Message, Does.Contain("outside the launch's dynamic shared memory"));
        }
        finally
        {
            _gpu.Free(src);
            _gpu.Free(off);
            _gpu.Free(o);
        }
    }
}
