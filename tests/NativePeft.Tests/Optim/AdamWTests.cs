using System.Runtime.InteropServices;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Optim;
using NUnit.Framework;
using static NativePeft.Tests.Optim.OptimTestSupport;

namespace NativePeft.Tests.Optim;

/// <summary>
/// The fp32 AdamW step against an independent float64 implementation of torch.optim.AdamW's formula written here
/// (decay first: p ← p(1 − lr·wd); m ← β1m + (1−β1)g; v ← β2v + (1−β2)g²; p ← p − lr·m̂/(√v̂ + eps) with
/// m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ)), step by step for 10 steps (p, m, v), on every backend.
/// Tolerance: the optimizer keeps p, m, v in fp32 and does ~10 fp32 roundings per element per step, the reference
/// none, so after t steps |Δ| ≲ t·10·2⁻²⁴ relative to each quantity's scale: we allow 2e-6 · scale, with scale =
/// max|g| for m, max g² for v, and max(|p|) + lr·t for p (each step moves p by at most ≈ lr).
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulated")]
[TestFixture("cuda")]
public sealed class AdamWTests(string device)
{
    private IOps _ops = null!;

    [SetUp] public void Create() => _ops = CreateOps(device);
    [TearDown] public void Dispose() => _ops?.Dispose();

    private sealed class Reference(double[] p, AdamWOptions o)
    {
        public readonly double[] P = p, M = new double[p.Length], V = new double[p.Length];
        public int T;

        public void Step(float[] g, double lr)
        {
            T++;
            double bc1 = 1 - Math.Pow(o.Beta1, T), bc2 = 1 - Math.Pow(o.Beta2, T);
            for (int i = 0; i < P.Length; i++)
            {
                P[i] *= 1 - lr * o.WeightDecay;
                M[i] = o.Beta1 * M[i] + (1 - o.Beta1) * g[i];
                V[i] = o.Beta2 * V[i] + (1 - o.Beta2) * (double)g[i] * g[i];
                double mHat = M[i] / bc1, vHat = V[i] / bc2;
                P[i] -= lr * mHat / (Math.Sqrt(vHat) + o.Eps);
            }
        }
    }

    [Test]
    public void MatchesFloat64ReferenceForTenSteps()
    {
        var o = new AdamWOptions { WeightDecay = 0.1 };
        var rng = new Random(7);
        int[] sizes = [1000, 37, 5000];
        string[] names = ["a.weight", "b.bias", "c.weight"];
        var p0 = sizes.Select(n => Normal(rng, n)).ToArray();
        var refs = p0.Select(p => new Reference(p.Select(x => (double)x).ToArray(), o)).ToArray();
        var pt = p0.Select(p => Upload(_ops, p)).ToArray();
        var gt = sizes.Select(n => _ops.Memory.Allocate(DType.F32, n)).ToArray();
        using var opt = new AdamW(_ops, o);
        double worstP = 0, worstM = 0, worstV = 0;
        for (int step = 1; step <= 10; step++)
        {
            double lr = 0.01 * (1 + 0.1 * step); // a varying schedule
            var grads = sizes.Select(n => Normal(rng, n, 0.5)).ToArray();
            for (int k = 0; k < sizes.Length; k++) { _ops.Upload<float>(grads[k], gt[k]); refs[k].Step(grads[k], lr); }
            opt.Step(names.Select((nm, k) => (nm, pt[k], gt[k])).ToList(), lr);

            var state = opt.SaveState().ToDictionary(t => t.Name);
            for (int k = 0; k < sizes.Length; k++)
            {
                var p = Download(_ops, pt[k]);
                var m = MemoryMarshal.Cast<byte, float>(state[names[k] + ".exp_avg"].Data.Span).ToArray();
                var v = MemoryMarshal.Cast<byte, float>(state[names[k] + ".exp_avg_sq"].Data.Span).ToArray();
                Assert.That(MemoryMarshal.Cast<byte, long>(state[names[k] + ".step"].Data.Span)[0], Is.EqualTo(step));
                double gMax = grads[k].Max(x => Math.Abs((double)x));
                double pScale = refs[k].P.Max(Math.Abs) + lr * step;
                for (int i = 0; i < sizes[k]; i++)
                {
                    double dp = Math.Abs(p[i] - refs[k].P[i]) / pScale;
                    double dm = Math.Abs(m[i] - refs[k].M[i]) / gMax;
                    double dv = Math.Abs(v[i] - refs[k].V[i]) / (gMax * gMax);
                    worstP = Math.Max(worstP, dp); worstM = Math.Max(worstM, dm); worstV = Math.Max(worstV, dv);
                    if (dp > 2e-6 || dm > 2e-6 || dv > 2e-6)
                        Assert.Fail($"step {step} {names[k]}[{i}]: p {p[i]} vs {refs[k].P[i]}, m {m[i]} vs {refs[k].M[i]}, v {v[i]} vs {refs[k].V[i]}");
                }
            }
        }
        TestContext.Out.WriteLine($"{device}: worst scaled error over 10 steps: p {worstP:E2}, m {worstM:E2}, v {worstV:E2}");
        foreach (var t in pt.Concat(gt)) _ops.Memory.Free(t);
    }

    /// <summary>
    /// Hand case: p = 1, g = 0.5 twice, lr 0.1, wd 0.5. Step 1: decay → 0.95; m = 0.05, v = 2.5e-4; m̂ = 0.5, v̂ = 0.25;
    /// p = 0.95 − 0.1·0.5/(0.5 + 1e-8) = 0.850000002. Step 2: decay → 0.8075; m̂ = 0.095/0.19 = 0.5, v̂ = 0.25 → p = 0.7075.
    /// Without bias correction step 1 would give 0.95 − 0.1·0.05/√2.5e-4 = 0.6338; with bitsandbytes' order (decay after
    /// the Adam step) 0.9·0.95 = 0.855.
    /// </summary>
    [Test]
    public void HandCaseBiasCorrectionAndDecoupledDecayFirst()
    {
        var p = Upload(_ops, [1f]);
        var g = Upload(_ops, [0.5f]);
        using var opt = new AdamW(_ops, new AdamWOptions { WeightDecay = 0.5 });
        opt.Step([("w", p, g)], 0.1);
        Assert.That(Download(_ops, p)[0], Is.EqualTo(0.850000002).Within(2e-7));
        opt.Step([("w", p, g)], 0.1);
        Assert.That(Download(_ops, p)[0], Is.EqualTo(0.7075).Within(2e-7));
        Assert.That(opt.StepCount("w"), Is.EqualTo(2));
    }

    [Test]
    public void DefaultsAreTorchs()
    {
        var o = new AdamWOptions();
        Assert.That((o.Lr, o.Beta1, o.Beta2, o.Eps, o.WeightDecay), Is.EqualTo((1e-3, 0.9, 0.999, 1e-8, 0.01)));
    }

    [Test]
    public void GradScaleEqualsScaledGradients()
    {
        var rng = new Random(3);
        var p0 = Normal(rng, 300); var g0 = Normal(rng, 300);
        var gScaled = g0.Select(x => x * 0.25f).ToArray(); // exact: power of two
        var pa = Upload(_ops, p0); var pb = Upload(_ops, p0);
        var ga = Upload(_ops, g0); var gb = Upload(_ops, gScaled);
        using var a = new AdamW(_ops); using var b = new AdamW(_ops);
        a.Step([("w", pa, ga)], 1e-2, gradScale: 0.25);
        b.Step([("w", pb, gb)], 1e-2);
        Assert.That(Download(_ops, pa), Is.EqualTo(Download(_ops, pb)));
        Assert.That(Download(_ops, ga), Is.EqualTo(g0), "the gradients are not modified");
    }

    [Test]
    public void StateSaveLoadRoundTripGivesIdenticalNextSteps([Values("adamw", "adamw8bit")] string name)
    {
        var rng = new Random(11);
        int[] sizes = [9000, 300]; // 9000: 8-bit state in adamw8bit (with a partial last block); 300: fp32 state
        var p0 = sizes.Select(n => Normal(rng, n)).ToArray();
        var pa = p0.Select(p => Upload(_ops, p)).ToArray();
        var g = sizes.Select(n => _ops.Memory.Allocate(DType.F32, n)).ToArray();
        List<(string, Tensor, Tensor)> Params(Tensor[] ps) => [("x", ps[0], g[0]), ("y", ps[1], g[1])];
        var gradSteps = Enumerable.Range(0, 5).Select(_ => sizes.Select(n => Normal(rng, n)).ToArray()).ToArray();
        void SetGrads(int s) { for (int k = 0; k < sizes.Length; k++) _ops.Upload<float>(gradSteps[s][k], g[k]); }

        using var a = OptimizerFactory.Create(name, _ops, new AdamWOptions { Lr = 1e-2 });
        for (int s = 0; s < 3; s++) { SetGrads(s); a.Step(Params(pa), 1e-2); }

        // Through a safetensors file, as a checkpoint would.
        string dir = Path.Combine(Path.GetTempPath(), "np-optim-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            string path = Path.Combine(dir, "optimizer.safetensors");
            SafetensorsWriter.Write(path, a.SaveState());
            List<SafetensorsTensor> loaded;
            using (var f = SafetensorsFile.Open(path))
                loaded = f.Tensors.Select(i => new SafetensorsTensor(i.Name, i.DType, i.Shape, f.GetBytes(i.Name).ToArray())).ToList();
            if (name == "adamw8bit")
                Assert.That(loaded.Select(t => t.Name), Does.Contain("x.state1").And.Contain("x.absmax2").And.Contain("y.exp_avg"));

            var pb = pa.Select(t => Upload(_ops, Download(_ops, t))).ToArray();
            using var b = OptimizerFactory.Create(name, _ops, new AdamWOptions { Lr = 1e-2 });
            b.LoadState(loaded);
            Assert.That(b.StateBytes, Is.EqualTo(a.StateBytes));
            for (int s = 3; s < 5; s++)
            {
                SetGrads(s);
                a.Step(Params(pa), 1e-2);
                b.Step(Params(pb), 1e-2);
            }
            for (int k = 0; k < sizes.Length; k++)
                Assert.That(Download(_ops, pb[k]), Is.EqualTo(Download(_ops, pa[k])), $"param {k} after resuming");
            var sa = a.SaveState(); var sb = b.SaveState();
            Assert.That(sb.Select(t => t.Name), Is.EqualTo(sa.Select(t => t.Name)));
            for (int i = 0; i < sa.Count; i++)
                Assert.That(sb[i].Data.ToArray(), Is.EqualTo(sa[i].Data.ToArray()), sa[i].Name);
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Test]
    public void LoadStateRejectsAMismatchedKind()
    {
        var state = new List<SafetensorsTensor>
        {
            SafetensorsTensor.From("x.step", [1], new long[] { 1 }),
            SafetensorsTensor.From("x.exp_avg", [5000], new float[5000]),
            SafetensorsTensor.From("x.exp_avg_sq", [5000], new float[5000]),
        };
        using var opt = new AdamW8bit(_ops);
        Assert.That(() => opt.LoadState(state), Throws.ArgumentException.With.Message.Contains("8-bit"));
        using var ok = new AdamW(_ops);
        ok.LoadState(state);
        Assert.That(ok.StepCount("x"), Is.EqualTo(1));
        Assert.That(ok.StateBytes, Is.EqualTo(40000));
    }

    [Test]
    public void FactoryNames()
    {
        foreach (var n in OptimizerFactory.Names)
        {
            using var o = OptimizerFactory.Create(n, _ops);
            Assert.That(o.Name, Is.EqualTo(n));
        }
        Assert.That(() => OptimizerFactory.Create("sgd", _ops), Throws.ArgumentException);
    }
}
