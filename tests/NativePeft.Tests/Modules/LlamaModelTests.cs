using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Tests.Reference;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.Modules;

/// <summary>Merge, 4-bit base, options and the loss's structure on the tiny model.</summary>
public class LlamaModelTests
{
    private static readonly string[] AllTargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static (double Loss, double[] Logits) Run(LlamaModel model)
    {
        var (ids, labels) = TinyBatch();
        double loss = model.Forward(ids, labels, B, T);
        var logits = model.Ops.Memory.Allocate(model.ComputeDType, B * T, model.Config.VocabSize);
        try
        {
            model.Logits(logits);
            return (loss, Get(model.Ops, logits));
        }
        finally { model.Ops.Memory.Free(logits); }
    }

    /// <summary>F64: |Δ| ≤ 1e-12 (measured ~1e-15). F32: |Δlogit| ≤ 2e-5 and |Δloss| ≤ 1e-5 (logits are O(1); merged
    /// weights round once more in fp32, ~1e-7 relative per weight, accumulated over 2 layers).</summary>
    [TestCase(DType.F64, 1e-12, 1e-12)]
    [TestCase(DType.F32, 2e-5, 1e-5)]
    public void MergedLogitsEqualTheUnmergedAdapterModel(DType dtype, double logitTol, double lossTol)
    {
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions
        {
            ComputeDType = dtype, Lora = new LoraSettings { Rank = 2, Alpha = 3, Dropout = 0.2, TargetModules = AllTargets },
        }, weightSeed: 2, std: 0.5);
        RandomizeLoraB(model, 50);
        model.Dropout.Training = false;
        var weightsBefore = model.BaseParameters().Select(p => Get(ops, p.Dense!)).ToList();
        var (loss, logits) = Run(model);
        model.MergeAdapters();
        Assert.That(model.LoraLayers.All(l => l.IsMerged));
        var (lossMerged, logitsMerged) = Run(model);
        Assert.That(lossMerged, Is.EqualTo(loss).Within(lossTol));
        for (int i = 0; i < logits.Length; i++)
            Assert.That(logitsMerged[i], Is.EqualTo(logits[i]).Within(logitTol), $"logit {i}");
        Assert.That(() => model.Backward(), Throws.InvalidOperationException, "a merged layer has no backward");
        model.UnmergeAdapters();
        var weightsAfter = model.BaseParameters().Select(p => Get(ops, p.Dense!)).ToList();
        for (int t = 0; t < weightsBefore.Count; t++)
            for (int i = 0; i < weightsBefore[t].Length; i++)
                Assert.That(weightsAfter[t][i], Is.EqualTo(weightsBefore[t][i]).Within(dtype == DType.F64 ? 1e-14 : 1e-6));
    }

    [Test]
    public void BZeroAdapterIsTheIdentityAndAIsKaimingUniform()
    {
        using var ops = new CpuOps();
        using var plain = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions(), weightSeed: 4, std: 0.5);
        using var lora = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 3, TargetModules = AllTargets }, Seed = 9 }, weightSeed: 4, std: 0.5);
        Assert.That(Run(lora).Loss, Is.EqualTo(Run(plain).Loss), "B = 0: the adapted model is the base model");
        foreach (var l in lora.LoraLayers)
        {
            var a = Get(ops, l.LoraA);
            double bound = 1 / Math.Sqrt(l.InFeatures);
            Assert.That(a.All(v => Math.Abs(v) <= bound), $"A within ±1/√in = {bound}");
            Assert.That(a.Max() - a.Min(), Is.GreaterThan(bound / 2), "A is spread over the interval, not constant");
            Assert.That(Get(ops, l.LoraB).All(v => v == 0), "B starts at zero");
        }
        var a0 = Get(ops, lora.LoraLayers[0].LoraA);
        Assert.That(Get(ops, lora.LoraLayers[1].LoraA).Take(a0.Length), Is.Not.EqualTo(a0), "each layer has its own generator");
        using var again = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 3, TargetModules = AllTargets }, Seed = 9 }, weightSeed: 4);
        Assert.That(Get(ops, again.LoraLayers[0].LoraA), Is.EqualTo(a0), "same seed, same A");
    }

    private static readonly LlamaConfig Small = new()
    {
        HiddenSize = 64, IntermediateSize = 160, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
        NumHiddenLayers = 2, VocabSize = 97, MaxPositionEmbeddings = 128, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    /// <summary>
    /// The NF4 model's loss equals, bit for bit, the loss of an F32 model whose linear weights are the dequantized
    /// NF4 values (so Linear4bit is exactly "dequantize, then the same GEMM"); and NF4 vs the F32 original differ by
    /// a bounded amount: |Δloss| ≤ 0.1 on this random model (std 0.1, loss ≈ 4.90; measured Δ = +0.039 for NF4 and
    /// −0.041 for FP4, both with double quant), and not zero.
    /// </summary>
    [TestCase(BaseQuantization.Nf4)]
    [TestCase(BaseQuantization.Fp4)]
    public void FourBitBaseIsDequantizeThenGemmAndCloseToF32(BaseQuantization quantization)
    {
        using var ops = new CpuOps();
        var options = new LlamaModelOptions { Quantization = quantization, Blocksize = 64, DoubleQuant = true };
        using var q4 = LlamaModel.CreateRandom(Small, ops, options, weightSeed: 21, std: 0.1);
        using var f32 = LlamaModel.CreateRandom(Small, ops, new LlamaModelOptions(), weightSeed: 21, std: 0.1);
        using var dequant = LlamaModel.CreateRandom(Small, ops, new LlamaModelOptions(), weightSeed: 21, std: 0.1);
        Assert.That(q4.DequantScratch, Is.Not.Null);
        Assert.That(q4.DequantScratch!.Buffer.Count, Is.EqualTo(160 * 64), "one scratch, the size of the largest layer");
        var qt = quantization == BaseQuantization.Nf4 ? QuantType.Nf4 : QuantType.Fp4;
        foreach (var (name, dense, _) in dequant.BaseParameters())
        {
            if (!name.Contains("_proj.")) continue;
            var values = Array.ConvertAll(Get(ops, dense!), v => (float)v);
            var q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values), [dense!.Rows, dense.Columns], qt, 64, true, DType.F32);
            Set(ops, dense, Array.ConvertAll(q.DequantizeToSingle(), v => (double)v));
        }
        var rng = new Random(3);
        int b = 2, t = 24;
        var ids = Enumerable.Range(0, b * t).Select(_ => rng.Next(Small.VocabSize)).ToArray();
        double lq = q4.Forward(ids, ids, b, t), lf = f32.Forward(ids, ids, b, t), ld = dequant.Forward(ids, ids, b, t);
        Assert.That(lq, Is.EqualTo(ld), "4-bit model = F32 model with the dequantized weights");
        TestContext.Out.WriteLine($"{quantization}: loss {lq:R} vs F32 {lf:R}, Δ = {lq - lf:E3}");
        Assert.That(Math.Abs(lq - lf), Is.LessThan(0.1).And.GreaterThan(0));
    }

    [Test]
    public void QloraGradientsFlowThroughTheFourBitBase()
    {
        using var ops = new CpuOps();
        var lora = new LoraSettings { Rank = 2, Alpha = 2, TargetModules = AllTargets };
        using var q4 = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { ComputeDType = DType.F64, Quantization = BaseQuantization.Nf4, Lora = lora }, 5, 0.5);
        RandomizeLoraB(q4, 8);
        var (ids, labels) = TinyBatch();
        double loss = q4.Forward(ids, labels, B, T);
        q4.Backward();
        // the layer-0 q_proj adapter gets its gradient only through the 4-bit layers above it
        var g = Get(ops, q4.TrainableParameters.First(p => p.Name.EndsWith("layers.0.self_attn.q_proj.lora_A.weight")).Grad);
        Assert.That(g.Any(v => Math.Abs(v) > 1e-6), "gradient reaches layer 0 through the frozen 4-bit base");
        // directional derivative check of all LoRA parameters at once: L(θ + h·g) − L(θ − h·g) ≈ 2h·|g|²
        var all = q4.TrainableParameters.Select(p => (p.Param, Value: Get(ops, p.Param), Grad: Get(ops, p.Grad))).ToList();
        double norm2 = all.Sum(p => GradCheck.Dot(p.Grad, p.Grad)), h = 1e-4 / Math.Sqrt(norm2); // a step of length 1e-4
        double At(double s)
        {
            foreach (var p in all) Set(ops, p.Param, p.Value.Select((v, i) => v + s * p.Grad[i]).ToArray());
            return q4.Forward(ids, labels, B, T);
        }
        double numeric = (8 * (At(h) - At(-h)) - (At(2 * h) - At(-2 * h))) / (12 * h); // five-point stencil
        At(0);
        Assert.That(numeric, Is.EqualTo(norm2).Within(1e-6 * norm2));
        Assert.That(loss, Is.GreaterThan(0));
    }

    [Test]
    public void BadOptionsAreRejectedNamingTheOption()
    {
        using var ops = new CpuOps();
        var ex = Assert.Throws<ArgumentException>(() => LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Lora = new LoraSettings { TargetModules = ["q_proj", "qkv_proj"] } }))!;
        Assert.That(ex.Message, Does.Contain("qkv_proj").And.Contain("target_modules"));
        var r0 = Assert.Throws<ArgumentOutOfRangeException>(() => LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 0 } }))!;
        Assert.That(r0.Message, Does.Contain("r (LoRA rank) 0"));
        // k_proj is [4, 8]: r = 5 is larger than min(in, out) = 4
        var big = Assert.Throws<ArgumentOutOfRangeException>(() => LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 5, TargetModules = ["q_proj", "k_proj"] } }))!;
        Assert.That(big.Message, Does.Contain("r (LoRA rank) 5").And.Contain("self_attn.k_proj"));
        Assert.DoesNotThrow(() => LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 8, TargetModules = ["q_proj"] } }).Dispose(), "r = 8 = min(8, 8) for q_proj");
        Assert.Throws<ArgumentException>(() => LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { FullFineTuning = true, Quantization = BaseQuantization.Nf4 }));
        Assert.Throws<ArgumentException>(() => LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { FullFineTuning = true, Lora = new LoraSettings() }));
        // a bad blocksize fails mid-build (after the embedding was allocated): nothing is left allocated
        Assert.That(() => LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Quantization = BaseQuantization.Nf4, Blocksize = 48 }), Throws.InstanceOf<ArgumentException>());
        Assert.That(ops.Memory.AllocatedBytes, Is.Zero);
    }

    [Test]
    public void LabelsAreShiftedAndAllIgnoredGivesZero()
    {
        Assert.That(LlamaModel.ShiftLabels([1, 2, 3, 4, 5, 6], 2, 3), Is.EqualTo(new[] { 2, 3, -100, 5, 6, -100 }));
        Assert.That(LlamaModel.PositionIds(2, 3), Is.EqualTo(new[] { 0, 1, 2, 0, 1, 2 }));
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions());
        var (ids, _) = TinyBatch();
        Assert.That(model.Forward(ids, Enumerable.Repeat(-100, ids.Length).ToArray(), B, T), Is.Zero);
        Assert.That(model.LastTokenCount, Is.Zero);
        // the Tensor overload equals the host one
        var idT = ops.Memory.Allocate(DType.I32, B, T);
        ops.Upload<int>(ids, idT);
        double viaTensor = model.Forward(idT, idT);
        Assert.That(viaTensor, Is.EqualTo(model.Forward(ids, ids, B, T)));
        ops.Memory.Free(idT);
    }

    [Test]
    public void ActivationsAndParametersAreFreedOnDispose()
    {
        using var ops = new CpuOps();
        var model = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 2 }, Recompute = true });
        var (ids, labels) = TinyBatch();
        model.Forward(ids, labels, B, T);
        model.Backward();
        model.Forward(ids, labels, 1, 10); // another shape: reallocated
        Assert.That(ops.Memory.AllocatedBytes, Is.GreaterThan(0));
        model.Dispose();
        Assert.That(ops.Memory.AllocatedBytes, Is.Zero);
    }
}
