using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>
/// The layers above Ops reach the device through <see cref="IOps.Device"/> and <see cref="IOps.SumOfSquares"/>, never by
/// downcasting to <see cref="GpuOps"/> (issue 11 item 3): so an ops wrapper — <see cref="ProfilingOps"/>, as
/// `bench --profile` uses — keeps the device paths of gradient clipping and of every AdamW form instead of silently
/// falling back to host copies (which the old downcasts did: the wrapper is not a GpuOps).
/// </summary>
public class OpsDeviceSeamTests
{
    [TestCase("adamw")]
    [TestCase("adamw8bit")]
    public void ClippingAndTheOptimizerThroughAProfilerUseTheDeviceAndGiveTheSameBits(string optimizer)
    {
        using var direct = TestGpus.CreateOps("emulator");
        using var wrapped = TestGpus.CreateOps("emulator");
        using var profiler = new ProfilingOps(wrapped);
        Assert.That(profiler.Device, Is.SameAs(wrapped.Device), "the wrapper exposes the device");
        Assert.That(new CpuOps().Device, Is.Null, "the CPU reference has none");

        const int n = 5000; // ≥ 4096: the 8-bit form quantizes its states
        var rng = new Random(3);
        float[] p0 = [.. Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() - 0.5))];
        float[] g0 = [.. Enumerable.Range(0, n).Select(_ => (float)(rng.NextDouble() - 0.5) * 0.1f)];
        float[] Run(IOps ops, out double norm)
        {
            var p = ops.Memory.Allocate(DType.F32, n);
            var g = ops.Memory.Allocate(DType.F32, n);
            ops.Upload<float>(p0, p);
            ops.Upload<float>(g0, g);
            using var opt = OptimizerFactory.Create(optimizer, ops);
            norm = GradientClipping.GlobalNorm(ops, [g]);
            for (int step = 0; step < 3; step++) opt.Step([("w", p, g)], 1e-2, GradientClipping.ClipCoefficient(norm, 0.5));
            var result = new float[n];
            ops.Download<float>(p, result);
            return result;
        }
        var viaDevice = Run(direct, out double normDirect);
        profiler.Reset();
        var viaProfiler = Run(profiler, out double normProfiled);
        Assert.That(normProfiled, Is.EqualTo(normDirect), "the same kernels: the same norm, bit for bit");
        Assert.That(viaProfiler, Is.EqualTo(viaDevice), "the same kernels: the same parameters, bit for bit");
        Assert.That(profiler.Totals.Keys, Does.Contain("SumOfSquares"), "clipping's sum went through the ops");
        // Only the test's own two uploads and one download cross to the host: no host fallback of the optimizer or the norm.
        Assert.That(profiler.Totals.TryGetValue("Download", out var downloads) ? downloads.Calls : 0, Is.EqualTo(1));
        double expected = Math.Sqrt(g0.Sum(x => (double)x * x));
        Assert.That(normDirect, Is.EqualTo(expected).Within(1e-12 * expected), "Σ g² in fp64, against a host loop");
    }
}
