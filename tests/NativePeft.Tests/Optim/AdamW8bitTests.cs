using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NativePeft.Quantization;
using NativePeft.Tests.Ops;
using NUnit.Framework;
using static NativePeft.Tests.Optim.OptimTestSupport;

namespace NativePeft.Tests.Optim;

/// <summary>
/// AdamW8bit: tracking of the fp32 optimizer on a noisy quadratic, state size, and parity of the C# twin (CpuOps)
/// with the kernels (emulator, CUDA when present) bit for bit.
/// </summary>
public sealed class AdamW8bitTests
{
    /// <summary>
    /// Toy problem: f(p) = ½ Σ aᵢ (pᵢ − tᵢ)², aᵢ ∈ [0.5, 2], tᵢ ~ N(0, 1), p₀ = 0; gradient aᵢ(pᵢ − tᵢ) + N(0, 0.3²) noise
    /// (the same noise sequence for both optimizers, each evaluating the gradient at its own parameters). 100 steps,
    /// lr 1e-2, default betas/eps/weight decay; 20 000 + 5 000 parameters (8-bit state) and 1 000 (fp32 state).
    /// Measured (CpuOps, deterministic): max |p8 − p32| = 0.095 (p moves up to ≈ 1.0 at lr 1e-2 over 100 steps),
    /// ‖p8 − p32‖ / ‖p32‖ = 0.031, final loss 3.7 % above fp32's (16029 → 3334 fp32, 3456 8-bit). For scale: the fp32
    /// optimizer run with another draw of the gradient noise lands 0.065 away (relative L2), twice as far. Asserted:
    /// max ≤ 0.15, relative ≤ 0.05 and below the noise-draw distance, loss within 6 %.
    /// </summary>
    [Test]
    public void EightBitTracksFp32OverHundredSteps()
    {
        var (p32, loss0, loss32) = RunToyProblem("adamw", noiseSeed: 99);
        var (p8, _, loss8) = RunToyProblem("adamw8bit", noiseSeed: 99);
        var (pOther, _, _) = RunToyProblem("adamw", noiseSeed: 100);
        double maxAbs = 0, diff2 = 0, norm2 = 0, noise2 = 0;
        for (int i = 0; i < p32.Length; i++)
        {
            double d = p8[i] - p32[i], e = pOther[i] - p32[i];
            maxAbs = Math.Max(maxAbs, Math.Abs(d));
            diff2 += d * d; norm2 += (double)p32[i] * p32[i]; noise2 += e * e;
        }
        double rel = Math.Sqrt(diff2 / norm2), noiseRel = Math.Sqrt(noise2 / norm2), lossRel = Math.Abs(loss8 - loss32) / loss32;
        TestContext.Out.WriteLine($"8-bit vs fp32 after 100 steps: max |Δp| {maxAbs:E3}, ‖Δp‖/‖p‖ {rel:E3} " +
            $"(fp32 with other noise: {noiseRel:E3}); loss {loss0:F1} → fp32 {loss32:F2}, 8-bit {loss8:F2} ({lossRel:P2})");
        Assert.That(loss32, Is.LessThan(0.5 * loss0), "the toy problem is being optimized");
        Assert.That(maxAbs, Is.LessThan(0.15), "measured 0.095 (lr 1e-2: p moves at most ≈ 1.0 in 100 steps)");
        Assert.That(rel, Is.LessThan(0.05), "measured 0.031");
        Assert.That(rel, Is.LessThan(noiseRel), "8-bit state moves p less than another draw of the gradient noise does");
        Assert.That(lossRel, Is.LessThan(0.06), "measured 3.7 %");
    }

    /// <summary>100 steps of the toy problem from p = 0; returns all parameters concatenated, the initial and final loss.</summary>
    private static (float[] P, double Loss0, double Loss) RunToyProblem(string optimizer, int noiseSeed)
    {
        using var ops = new CpuOps();
        int[] sizes = [20000, 5000, 1000];
        var rng = new Random(2024);
        var a = sizes.Select(n => Enumerable.Range(0, n).Select(_ => (float)(0.5 + 1.5 * rng.NextDouble())).ToArray()).ToArray();
        var target = sizes.Select(n => Normal(rng, n)).ToArray();
        var p = sizes.Select(n => ops.Memory.Allocate(DType.F32, n)).ToArray();
        var g = sizes.Select(n => ops.Memory.Allocate(DType.F32, n)).ToArray();
        using var opt = (AdamWOptimizer)OptimizerFactory.Create(optimizer, ops);
        var noiseRng = new Random(noiseSeed);
        double Loss() => Enumerable.Range(0, sizes.Length).Sum(k =>
        {
            var x = Download(ops, p[k]);
            return Enumerable.Range(0, x.Length).Sum(i => 0.5 * a[k][i] * Math.Pow(x[i] - target[k][i], 2));
        });
        double loss0 = Loss();
        for (int step = 0; step < 100; step++)
        {
            for (int k = 0; k < sizes.Length; k++)
            {
                var x = Download(ops, p[k]);
                var noise = Normal(noiseRng, x.Length, 0.3);
                var gr = new float[x.Length];
                for (int i = 0; i < x.Length; i++) gr[i] = a[k][i] * (x[i] - target[k][i]) + noise[i];
                ops.Upload<float>(gr, g[k]);
            }
            opt.Step(sizes.Select((_, k) => ($"t{k}", p[k], g[k])).ToList(), 1e-2);
        }
        if (opt.IsEightBit)
            Assert.That(opt.IsQuantized("t0") && opt.IsQuantized("t1") && !opt.IsQuantized("t2"), "20000 and 5000 elements: 8-bit; 1000: fp32");
        return (p.SelectMany(t => Download(ops, t)).ToArray(), loss0, Loss());
    }

    [Test]
    public void StateBytesAreAboutFourTimesSmaller()
    {
        using var ops = new CpuOps();
        var p = ops.Memory.Allocate(DType.F32, 20000);
        var g = Upload(ops, Normal(new Random(1), 20000));
        var small = ops.Memory.Allocate(DType.F32, 4095);
        var gs = ops.Memory.Allocate(DType.F32, 4095);
        using var fp32 = new AdamW(ops);
        using var q8 = new AdamW8bit(ops);
        fp32.Step([("w", p, g)], 1e-3);
        q8.Step([("w", p, g)], 1e-3);
        Assert.That(fp32.StateBytes, Is.EqualTo(2 * 4 * 20000));
        Assert.That(q8.StateBytes, Is.EqualTo(2 * 20000 + 2 * 4 * 79), "u8 m and v + fp32 absmax per 256 (79 blocks)");
        Assert.That((double)fp32.StateBytes / q8.StateBytes, Is.GreaterThan(3.9));
        q8.Step([("s", small, gs)], 1e-3);
        Assert.That(q8.IsQuantized("s"), Is.False, "4095 < 4096 elements keep fp32 state");
        Assert.That(q8.StateBytes, Is.EqualTo(2 * 20000 + 2 * 4 * 79 + 8 * 4095));
    }

    /// <summary>The dynamic maps the twin and the kernel decode with: 0.0 where the zero-state indices say.</summary>
    [Test]
    public void ZeroIndicesOfTheMaps()
    {
        Assert.That(DynamicMap.Signed[DynamicMap.SignedZeroIndex], Is.EqualTo(0f));
        Assert.That(DynamicMap.Unsigned[AdamWMath.UnsignedZeroIndex], Is.EqualTo(0f));
        Assert.That(Dynamic8Bit.Encode(DynamicMap.Signed, 0f), Is.EqualTo(DynamicMap.SignedZeroIndex));
        Assert.That(Dynamic8Bit.Encode(DynamicMap.Unsigned, 0f), Is.EqualTo(AdamWMath.UnsignedZeroIndex));
    }
}

/// <summary>
/// The C# twin on CpuOps against the kernels on a GpuOps (emulator; CUDA when present): parameters and the complete
/// state (fp32 m, v; or u8 state1/state2 and absmax1/absmax2) bit for bit after 6 steps with varying lr and one
/// gradScale ≠ 1. Sizes: 20000 (8-bit, partial last block), 4096 (8-bit, exactly 16 blocks), 4095 and 300 (fp32 state
/// in the 8-bit optimizer), one all-zero gradient tensor (absmax 0 blocks).
/// </summary>
[TestFixture("emulated")]
[TestFixture("cuda")]
public sealed class OptimizerParityTests(string device)
{
    [Test]
    public void CpuTwinEqualsKernelBitForBit([Values("adamw", "adamw8bit", "paged-adamw8bit")] string name)
    {
        using var cpu = new CpuOps();
        using var gpu = CreateOps(device);
        int[] sizes = [20000, 4096, 4095, 300, 512];
        var rng = new Random(5);
        var p0 = sizes.Select(n => Normal(rng, n)).ToArray();
        var pc = p0.Select(p => Upload(cpu, p)).ToArray();
        var pg = p0.Select(p => Upload(gpu, p)).ToArray();
        var gc = sizes.Select(n => cpu.Memory.Allocate(DType.F32, n)).ToArray();
        var gg = sizes.Select(n => gpu.Memory.Allocate(DType.F32, n)).ToArray();
        using var oc = OptimizerFactory.Create(name, cpu, new AdamWOptions { WeightDecay = 0.05 });
        using var og = OptimizerFactory.Create(name, gpu, new AdamWOptions { WeightDecay = 0.05 });
        for (int step = 0; step < 6; step++)
        {
            for (int k = 0; k < sizes.Length; k++)
            {
                var g = k == 4 ? new float[sizes[k]] : Normal(rng, sizes[k], 0.1 * (k + 1));
                cpu.Upload<float>(g, gc[k]); gpu.Upload<float>(g, gg[k]);
            }
            double lr = 1e-3 * (step + 1), scale = step == 3 ? 0.37 : 1.0;
            oc.Step(sizes.Select((_, k) => ($"p{k}", pc[k], gc[k])).ToList(), lr, scale);
            og.Step(sizes.Select((_, k) => ($"p{k}", pg[k], gg[k])).ToList(), lr, scale);
        }
        for (int k = 0; k < sizes.Length; k++)
            Assert.That(Download(gpu, pg[k]), Is.EqualTo(Download(cpu, pc[k])), $"{name} p{k} ({sizes[k]} elements)");
        var sc = oc.SaveState(); var sg = og.SaveState();
        Assert.That(sg.Select(t => t.Name), Is.EqualTo(sc.Select(t => t.Name)));
        for (int i = 0; i < sc.Count; i++)
            Assert.That(sg[i].Data.ToArray(), Is.EqualTo(sc[i].Data.ToArray()), $"{name} state {sc[i].Name}");
        if (name.Contains("8bit"))
            Assert.That(sc.Select(t => t.Name), Does.Contain("p0.state1").And.Contain("p1.absmax2").And.Contain("p2.exp_avg"));
    }
}
