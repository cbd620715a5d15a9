using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Tests.Modules;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.IO;

/// <summary>Merge an adapter into a base checkpoint (full precision or bitsandbytes NF4) and export BF16/F16/F32.</summary>
public class MergeExportTests
{
    private string _root = "";

    [SetUp]
    public void SetUp() => _root = Directory.CreateTempSubdirectory("nativepeft-merge-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_root, recursive: true);

    private string Sub(string name) => Path.Combine(_root, name);

    private static readonly string[] AllTargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    private static readonly LoraSettings Lora = new() { Rank = 2, Alpha = 3, TargetModules = AllTargets };

    private static (double Loss, double[] Logits) Run(LlamaModel model)
    {
        model.Dropout.Training = false;
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

    /// <summary>A tiny base in F32 (sharded), and the NF4 version of it (every projection 4-bit, double quant).</summary>
    private (string F32, string Nf4, Dictionary<string, float[]> Values) WriteBases()
    {
        var values = LlamaModelLoadTests.Values(Tiny, seed: 5);
        string f32 = Sub("base-f32"), nf4 = Sub("base-nf4");
        HfCheckpoint.Write(f32, Tiny with { TorchDtype = DType.F32 }, LlamaModelLoadTests.F32(Tiny, values), maxShardBytes: 900);
        var tensors = new List<SafetensorsTensor>();
        foreach (var (name, shape) in Tiny.ExpectedTensors())
        {
            if (!name.Contains("_proj.")) tensors.Add(SafetensorsTensor.From(name, shape, values[name]));
            else tensors.AddRange(BitsAndBytes4Bit.ToTensors(name[..^"weight".Length],
                Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values[name]), shape, QuantType.Nf4, 64, doubleQuant: true, DType.BF16)));
        }
        HfCheckpoint.Write(nf4, Tiny with { TorchDtype = DType.BF16 }, tensors, maxShardBytes: 900);
        return (f32, nf4, values);
    }

    /// <summary>Trains nothing: loads the base with LoRA, randomizes B, saves the adapter; returns the adapter model's loss and logits.</summary>
    private (double Loss, double[] Logits, PeftAdapter Adapter) AdapterModel(string baseDir, string adapterDir)
    {
        using var ops = new CpuOps();
        using var ck = HfCheckpoint.Open(baseDir);
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { Lora = Lora, Seed = 4 });
        RandomizeLoraB(model, 90, scale: 0.5);
        var (loss, logits) = Run(model);
        PeftAdapter.Save(adapterDir, model, baseDir);
        return (loss, logits, PeftAdapter.Load(adapterDir));
    }

    private static (double Loss, double[] Logits) MergedModel(string dir)
    {
        using var ops = new CpuOps();
        using var ck = HfCheckpoint.Open(dir);
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions());
        Assert.That(model.LoraLayers, Is.Empty);
        return Run(model);
    }

    private static void AssertClose(double[] actual, double[] expected, double tol, string what)
    {
        Assert.That(actual, Has.Length.EqualTo(expected.Length));
        double max = actual.Zip(expected, (a, e) => Math.Abs(a - e)).Max();
        Assert.That(max, Is.LessThanOrEqualTo(tol), $"{what}: max |Δ| = {max:E2}");
    }

    /// <summary>
    /// F32 output: the merged model equals the adapter model up to fp32 rounding of W + s·BA (|Δlogit| ≤ 2e-5,
    /// |Δloss| ≤ 1e-5, the tolerance of LlamaModel's own merge test); every merged weight equals a float64
    /// W + s·Σ B·A within 2e-6; the tensors the adapter does not touch are bit-identical to the base.
    /// </summary>
    [Test]
    public void F32ExportEqualsTheAdapterModel()
    {
        var (f32, _, values) = WriteBases();
        var (loss, logits, adapter) = AdapterModel(f32, Sub("adapter"));
        string outDir = Sub("merged");
        using (var baseCk = HfCheckpoint.Open(f32)) MergeExport.Write(outDir, baseCk, adapter, DType.F32, maxShardBytes: 1000);

        var (mLoss, mLogits) = MergedModel(outDir);
        Assert.That(mLoss, Is.EqualTo(loss).Within(1e-5));
        Assert.That(mLoss, Is.Not.EqualTo(MergedModel(f32).Loss).Within(1e-3), "the adapter changes the model (test is not vacuous)");
        AssertClose(mLogits, logits, 2e-5, "logits");

        using var ck = HfCheckpoint.Open(outDir);
        Assert.That(ck.IsSharded, "maxShardBytes 1000 shards the tiny model");
        Assert.That(ck.Config.TorchDtype, Is.EqualTo(DType.F32));
        Assert.That(ck.TensorNames, Is.EquivalentTo(Tiny.ExpectedTensors().Select(t => t.Name)));
        foreach (var (name, _) in Tiny.ExpectedTensors())
        {
            Assert.That(ck.GetInfo(name).DType, Is.EqualTo(DType.F32), name);
            var got = ck.ReadArray<float>(name);
            int layer = name.StartsWith("model.layers.") ? int.Parse(name.Split('.')[2]) : -1;
            string target = name.Split('.')[^2];
            var m = layer >= 0 ? adapter.Find(layer, target) : null;
            if (m is null)
            {
                Assert.That(got, Is.EqualTo(values[name]), name + ": untouched");
                continue;
            }
            var w = values[name];
            for (int o = 0; o < m.OutFeatures; o++)
                for (int i = 0; i < m.InFeatures; i++)
                {
                    double d = 0;
                    for (int k = 0; k < m.Rank; k++) d += (double)m.B[o * m.Rank + k] * m.A[k * m.InFeatures + i];
                    Assert.That(got[o * m.InFeatures + i], Is.EqualTo(w[o * m.InFeatures + i] + 1.5 * d).Within(2e-6), $"{name}[{o}, {i}]");
                }
        }
    }

    /// <summary>
    /// BF16 and F16 output: each merged weight is exactly the F32 export rounded to nearest even (so one rounding of
    /// the fp32 merge), and the merged model's loss is within 1e-2 of the adapter model's for BF16 (weights rounded to
    /// 8 significant bits, relative error ≤ 2^-9; measured |Δloss| = 1.4e-4) and within 5e-4 for F16 (11 bits;
    /// measured 1.9e-5).
    /// </summary>
    [TestCase(DType.BF16, 1e-2)]
    [TestCase(DType.F16, 5e-4)]
    public void HalfExportIsTheF32MergeRoundedOnce(DType dtype, double lossTol)
    {
        var (f32, _, _) = WriteBases();
        var (loss, _, adapter) = AdapterModel(f32, Sub("adapter"));
        MergeExport.Write(Sub("m32"), HfCheckpoint.Open(f32), adapter, DType.F32, 1 << 20);
        MergeExport.Write(Sub("m16"), HfCheckpoint.Open(f32), adapter, dtype, 1 << 20);
        using var ck32 = HfCheckpoint.Open(Sub("m32"));
        using var ck16 = HfCheckpoint.Open(Sub("m16"));
        Assert.That(ck16.IsSharded, Is.False);
        Assert.That(ck16.Config.TorchDtype, Is.EqualTo(dtype));
        Assert.That(File.ReadAllText(Path.Combine(Sub("m16"), "config.json")), Does.Contain($"\"torch_dtype\": \"{dtype.TorchName()}\""));
        foreach (var name in ck32.TensorNames)
        {
            Assert.That(ck16.GetInfo(name).DType, Is.EqualTo(dtype), name);
            var wide = ck32.ReadArray<float>(name);
            var narrow = ck16.ReadArray<float>(name);
            var expected = dtype == DType.BF16
                ? wide.Select(v => BFloat16.FromSingle(v).ToSingle()).ToArray()
                : wide.Select(v => (float)(Half)v).ToArray();
            Assert.That(narrow, Is.EqualTo(expected), name);
        }
        var (mLoss, _) = MergedModel(Sub("m16"));
        Assert.That(mLoss, Is.EqualTo(loss).Within(lossTol));
        TestContext.Out.WriteLine($"{dtype}: |Δloss| = {Math.Abs(mLoss - loss):E2}");
    }

    /// <summary>
    /// From an NF4 base: the projections are dequantized (fp32, as the QLoRA forward uses them), merged and written full
    /// precision; no 4-bit state survives. F32 output matches the QLoRA model within the fp32 merge tolerance
    /// (|Δloss| ≤ 1e-5, |Δlogit| ≤ 2e-5; measured 1e-7); BF16 output within 1e-2 (measured 2.5e-3).
    /// </summary>
    [TestCase(DType.F32, 1e-5)]
    [TestCase(DType.BF16, 1e-2)]
    public void FourBitBaseMergesIntoAFullPrecisionCheckpoint(DType dtype, double lossTol)
    {
        var (_, nf4, _) = WriteBases();
        var (loss, logits, adapter) = AdapterModel(nf4, Sub("adapter"));
        string outDir = Sub("merged");
        using (var baseCk = HfCheckpoint.Open(nf4))
        {
            Assert.That(baseCk.IsQuantizedCheckpoint);
            MergeExport.Write(outDir, baseCk, adapter, dtype, maxShardBytes: 1500);
        }
        using var ck = HfCheckpoint.Open(outDir);
        Assert.That(ck.IsQuantizedCheckpoint, Is.False);
        Assert.That(ck.TensorNames, Is.EquivalentTo(Tiny.ExpectedTensors().Select(t => t.Name)), "no absmax / quant_map / quant_state left");
        foreach (var (name, shape) in Tiny.ExpectedTensors())
        {
            Assert.That(ck.GetInfo(name).DType, Is.EqualTo(dtype), name);
            Assert.That(ck.GetInfo(name).Shape, Is.EqualTo(shape), name);
        }
        var (mLoss, mLogits) = MergedModel(outDir);
        Assert.That(mLoss, Is.EqualTo(loss).Within(lossTol));
        if (dtype == DType.F32) AssertClose(mLogits, logits, 2e-5, "logits");
        TestContext.Out.WriteLine($"NF4 → {dtype}: |Δloss| = {Math.Abs(mLoss - loss):E2}");
    }

    [Test]
    public void AnAdapterForAnotherBaseFailsNamingTheKeyAndWritesNothing()
    {
        var (f32, _, _) = WriteBases();
        using var ops = new CpuOps();
        using var other = LlamaModel.CreateRandom(Tiny with { IntermediateSize = 16 }, ops, new LlamaModelOptions { Lora = Lora });
        var adapter = PeftAdapter.FromModel(other, "other");
        string outDir = Sub("merged");
        var e = Assert.Throws<PeftAdapterException>(() => MergeExport.Write(outDir, HfCheckpoint.Open(f32), adapter, DType.BF16, 1 << 20))!;
        Assert.That(e.Message, Does.Contain(
            "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight: the adapter's lora_B·lora_A is [16, 8], the base's model.layers.0.mlp.gate_proj.weight is [12, 8]"));
        Assert.That(Directory.Exists(outDir), Is.False);

        using var deeper = LlamaModel.CreateRandom(Tiny with { NumHiddenLayers = 3 }, ops, new LlamaModelOptions { Lora = Lora });
        e = Assert.Throws<PeftAdapterException>(() => MergeExport.Write(outDir, HfCheckpoint.Open(f32), PeftAdapter.FromModel(deeper, null), DType.BF16, 1 << 20))!;
        Assert.That(e.Message, Does.Contain("the base has no layer 2 (it has 2 layers)"));
        Assert.That(() => MergeExport.Write(outDir, HfCheckpoint.Open(f32), adapter, DType.I32, 1 << 20), Throws.ArgumentException);
        Assert.That(Directory.Exists(outDir), Is.False);

        // an existing checkpoint is not overwritten
        var (_, _, good) = AdapterModel(f32, Sub("adapter"));
        Assert.That(() => MergeExport.Write(f32, HfCheckpoint.Open(f32), good, DType.BF16, 1 << 20),
            Throws.TypeOf<HfCheckpointException>().With.Message.Contains("already holds a checkpoint"));
    }

    /// <summary>
    /// Torch oracle (tests/reference/gen_peft_merge.py, torch 1.13): PEFT's merge delta = (B @ A)·scaling, W += delta in
    /// fp32, for lora (7/3) and rslora (7/√3). Our fp32 result is within 1 ulp-scale (2e-7 absolute on |W'| ≲ 0.3) of
    /// torch's; rounded to BF16 / F16 it equals torch's rounding except where the two fp32 values straddle a rounding
    /// boundary (then one unit in the last place of the narrow type, and at most 2 of 960 elements).
    /// </summary>
    [TestCase("lora", false)]
    [TestCase("rslora", true)]
    public void MergeMatchesTorch(string tag, bool rslora)
    {
        using var file = SafetensorsFile.Open(Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", "peft_merge.safetensors"));
        var w = file.ReadArray<float>("weight");
        var a = file.GetInfo("lora_A");
        var b = file.GetInfo("lora_B");
        int r = (int)a.Shape[0], inF = (int)a.Shape[1], outF = (int)b.Shape[0];
        Assert.That(file.Metadata["r"], Is.EqualTo(r.ToString()));
        double alpha = double.Parse(file.Metadata["lora_alpha"]);
        var module = new PeftLoraModule(0, "q_proj", r, inF, outF, file.ReadArray<float>("lora_A"), file.ReadArray<float>("lora_B"));
        var config = new PeftLoraConfig { R = r, LoraAlpha = alpha, UseRslora = rslora, TargetModules = ["q_proj"] };
        MergeExport.MergeInto(w, module, (float)config.Scaling);

        var torch = file.ReadArray<float>(tag + ".merged_f32");
        AssertClose(w.Select(v => (double)v).ToArray(), torch.Select(v => (double)v).ToArray(), 2e-7, "fp32 merge vs torch");
        foreach (var (suffix, round) in new (string, Func<float, float>)[]
                 {
                     ("merged_bf16", v => BFloat16.FromSingle(v).ToSingle()),
                     ("merged_f16", v => (float)(Half)v),
                 })
        {
            var expected = suffix == "merged_bf16"
                ? file.ReadArray<BFloat16>($"{tag}.{suffix}").Select(v => v.ToSingle()).ToArray()
                : file.ReadArray<Half>($"{tag}.{suffix}").Select(v => (float)v).ToArray();
            var ours = w.Select(round).ToArray();
            int differ = 0;
            for (int i = 0; i < ours.Length; i++)
            {
                if (ours[i] == expected[i]) continue;
                differ++;
                Assert.That(ours[i], Is.EqualTo(expected[i]).Within(Math.Abs(expected[i]) * (suffix == "merged_bf16" ? 1.0 / 128 : 1.0 / 1024)), $"{suffix}[{i}]");
            }
            Assert.That(differ, Is.LessThanOrEqualTo(2), $"{suffix}: elements rounded differently from torch");
        }
    }
}
