using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Tests.Modules;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft merge` end to end, run as a process: a tiny base (F32, or its bitsandbytes NF4 version) and an adapter
/// saved from a LlamaModel with randomized lora_B; the merged folder loads without LoRA and has the adapter model's
/// loss. Bad input: one message, non-zero exit, no output folder.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class MergeCliTests
{
    private static readonly string[] AllTargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    private static readonly LoraSettings Lora = new() { Rank = 2, Alpha = 3, TargetModules = AllTargets };
    private const string TokenizerConfig = "{\"model_max_length\": 64}";

    private static double Loss(LlamaModel model)
    {
        model.Dropout.Training = false;
        var (ids, labels) = TinyBatch();
        return model.Forward(ids, labels, B, T);
    }

    /// <summary>The tiny base in F32 or NF4 (every projection 4-bit, double quant), with a tokenizer_config.json to copy.</summary>
    private static string WriteBase(TempDir dir, string kind)
    {
        var values = LlamaModelLoadTests.Values(Tiny, seed: 5);
        string path = dir["base-" + kind];
        if (kind == "f32")
        {
            HfCheckpoint.Write(path, Tiny with { TorchDtype = DType.F32 }, LlamaModelLoadTests.F32(Tiny, values), maxShardBytes: 900);
        }
        else
        {
            var tensors = new List<SafetensorsTensor>();
            foreach (var (name, shape) in Tiny.ExpectedTensors())
            {
                if (!name.Contains("_proj.")) tensors.Add(SafetensorsTensor.From(name, shape, values[name]));
                else tensors.AddRange(BitsAndBytes4Bit.ToTensors(name[..^"weight".Length],
                    Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values[name]), shape, QuantType.Nf4, 64, doubleQuant: true, DType.BF16)));
            }
            HfCheckpoint.Write(path, Tiny with { TorchDtype = DType.BF16 }, tensors, maxShardBytes: 900);
        }
        File.WriteAllText(Path.Combine(path, "tokenizer_config.json"), TokenizerConfig);
        return path;
    }

    /// <summary>Loads the base with LoRA, randomizes B, saves the adapter; returns the adapter model's loss.</summary>
    private static double SaveAdapter(string baseDir, string adapterDir)
    {
        using var ops = new CpuOps();
        using var ck = HfCheckpoint.Open(baseDir);
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { Lora = Lora, Seed = 4 });
        RandomizeLoraB(model, 90, scale: 0.5);
        double loss = Loss(model);
        PeftAdapter.Save(adapterDir, model, baseDir);
        return loss;
    }

    private static double MergedLoss(string dir)
    {
        using var ops = new CpuOps();
        using var ck = HfCheckpoint.Open(dir);
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions());
        Assert.That(model.LoraLayers, Is.Empty);
        return Loss(model);
    }

    /// <summary>
    /// The merged checkpoint's loss equals the adapter model's within MergeExportTests' tolerances for one rounding of
    /// the fp32 merge (BF16 1e-2, F16 5e-4), differs from the base's (the adapter matters), and the folder holds the
    /// weights in the asked dtype (sharded at 1000 bytes), config.json with that torch_dtype and the copied tokenizer file.
    /// </summary>
    [TestCase("f32", "bf16", DType.BF16, 1e-2)]
    [TestCase("f32", "fp16", DType.F16, 5e-4)]
    [TestCase("nf4", "bf16", DType.BF16, 1e-2)]
    public void MergedCheckpointHasTheAdapterModelsLoss(string baseKind, string dtypeName, DType dtype, double tol)
    {
        using var dir = CliProcess.TempDir();
        string baseDir = WriteBase(dir, baseKind);
        double adapterLoss = SaveAdapter(baseDir, dir["adapter"]);

        var r = CliProcess.Run("merge", "--model", baseDir, "--adapter", dir["adapter"], "--out", dir["merged"], "--dtype", dtypeName, "--max-shard-size", "1000");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stderr, Is.Empty, r.ToString());
        Assert.That(r.Stdout, Does.Contain("merged 14 LoRA modules (r=2, lora_alpha=3, scaling 1.5;"));
        Assert.That(r.Stdout, Does.Contain($"wrote {Tiny.ExpectedTensors().Count()} tensors in {dtype.TorchName()}"));
        if (baseKind == "nf4") Assert.That(r.Stdout, Does.Contain("4-bit base dequantized"));

        using (var ck = HfCheckpoint.Open(dir["merged"]))
        {
            Assert.That(ck.IsQuantizedCheckpoint, Is.False);
            Assert.That(ck.IsSharded, "--max-shard-size 1000 shards the tiny model");
            Assert.That(r.Stdout, Does.Contain($"in {ck.FilePaths.Count} shards"));
            Assert.That(ck.Config.TorchDtype, Is.EqualTo(dtype));
            Assert.That(ck.TensorNames, Is.EquivalentTo(Tiny.ExpectedTensors().Select(t => t.Name)));
            foreach (var name in ck.TensorNames) Assert.That(ck.GetInfo(name).DType, Is.EqualTo(dtype), name);
            long bytes = ck.FilePaths.Sum(f => new FileInfo(f).Length);
            Assert.That(r.Stdout, Does.Contain($"({bytes} bytes)"));
        }
        Assert.That(File.ReadAllText(Path.Combine(dir["merged"], "tokenizer_config.json")), Is.EqualTo(TokenizerConfig));

        double merged = MergedLoss(dir["merged"]);
        Assert.That(merged, Is.EqualTo(adapterLoss).Within(tol));
        Assert.That(merged, Is.Not.EqualTo(MergedLoss(baseDir)).Within(1e-3), "the adapter changes the model (test is not vacuous)");
        TestContext.Out.WriteLine(r.Stdout + $"{baseKind} → {dtypeName}: |Δloss| = {Math.Abs(merged - adapterLoss):E2}");
    }

    /// <summary>Bound on |merged − W − s·B·A| per weight: half a unit in the last place of the output dtype at the value
    /// (one rounding), plus fp32 accumulation of the r products and the sum (a few units of 2^-24 of the magnitudes).</summary>
    private static double MergeBound(DType dtype, double value, double magnitude)
    {
        int mantissa = dtype switch { DType.BF16 => 7, DType.F16 => 10, _ => 23 };
        double ulp = value == 0 ? 0 : Math.Pow(2, Math.Floor(Math.Log2(Math.Abs(value))) - mantissa);
        if (dtype == DType.F16) ulp = Math.Max(ulp, Math.Pow(2, -24));  // subnormal spacing
        return 0.5 * ulp * (1 + 1e-6) + 8 * Math.Pow(2, -24) * magnitude;
    }

    /// <summary>Merged weights (number of those out of bound) against W + s·B·A in float64 from the files.</summary>
    private static (int Bad, long Count) CompareMerge(string baseDir, string adapterDir, string mergedDir, DType dtype, double scaleError)
    {
        var adapter = PeftAdapter.Load(adapterDir);
        double s = adapter.Scaling * scaleError;
        using var baseCk = HfCheckpoint.Open(baseDir);
        using var mergedCk = HfCheckpoint.Open(mergedDir);
        int bad = 0;
        long count = 0;
        foreach (var m in adapter.Modules)
        {
            float[] w = baseCk.ReadArray<float>(m.BaseWeightName), got = mergedCk.ReadArray<float>(m.BaseWeightName);
            for (int o = 0; o < m.OutFeatures; o++)
                for (int i = 0; i < m.InFeatures; i++)
                {
                    double ba = 0, mag = 0;
                    for (int k = 0; k < m.Rank; k++)
                    {
                        double t = (double)m.B[o * m.Rank + k] * m.A[k * m.InFeatures + i];
                        ba += t;
                        mag += Math.Abs(t);
                    }
                    int e = o * m.InFeatures + i;
                    double want = w[e] + s * ba;
                    if (Math.Abs(got[e] - want) > MergeBound(dtype, want, Math.Abs(w[e]) + Math.Abs(s) * mag)) bad++;
                    count++;
                }
        }
        return (bad, count);
    }

    /// <summary>
    /// Every merged weight is W + scaling · B·A (float64 from the base and adapter files) within one rounding to the
    /// output dtype; the same comparison with scaling off by 3 % (a planted defect) fails for most weights.
    /// </summary>
    [TestCase("bf16", DType.BF16)]
    [TestCase("fp16", DType.F16)]
    [TestCase("fp32", DType.F32)]
    public void MergedWeightsAreWPlusScaledBAWithinOneRounding(string dtypeName, DType dtype)
    {
        using var dir = CliProcess.TempDir();
        string baseDir = WriteBase(dir, "f32");
        SaveAdapter(baseDir, dir["adapter"]);
        var r = CliProcess.Run("merge", "--model", baseDir, "--adapter", dir["adapter"], "--out", dir["merged"], "--dtype", dtypeName);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        var (bad, count) = CompareMerge(baseDir, dir["adapter"], dir["merged"], dtype, 1.0);
        // q 8·8, k and v 4·8, o 8·8, gate and up 12·8, down 8·12 = 480 weights a layer, 2 layers
        Assert.That(count, Is.EqualTo(960), "every weight of the 14 adapted projections");
        Assert.That(bad, Is.Zero, $"{bad} of {count} merged weights outside one {dtypeName} rounding of W + s·B·A");
        var (badPlanted, _) = CompareMerge(baseDir, dir["adapter"], dir["merged"], dtype, 1.03);
        Assert.That(badPlanted, Is.GreaterThan(count / 10), "a 3 % scaling error is caught");
    }

    /// <summary>Options from a YAML config file, with --dtype from the command line overriding the file's.</summary>
    [Test]
    public void OptionsFromAConfigFile()
    {
        using var dir = CliProcess.TempDir();
        string baseDir = WriteBase(dir, "f32");
        SaveAdapter(baseDir, dir["adapter"]);
        File.WriteAllText(dir["merge.yaml"], $"model: '{baseDir}'\nadapter: '{dir["adapter"]}'\nout: '{dir["merged"]}'\ndtype: fp16\nmax_shard_size: 5GB\n");
        var r = CliProcess.Run("merge", "--config", dir["merge.yaml"], "--dtype", "bf16");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("in 1 shard "));
        using var ck = HfCheckpoint.Open(dir["merged"]);
        Assert.That(ck.Config.TorchDtype, Is.EqualTo(DType.BF16));
    }

    private static void AssertOneError(CliProcess.Result r, string expected)
    {
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Is.Empty, r.ToString());
        Assert.That(r.Stderr, Does.StartWith("error: "), r.ToString());
        Assert.That(r.Stderr.Split('\n').Count(l => l.StartsWith("error:")), Is.EqualTo(1), r.ToString());
        Assert.That(r.Stderr, Does.Contain(expected), r.ToString());
    }

    [Test]
    public void BadInputGivesOneMessageAndNoOutputFolder()
    {
        using var dir = CliProcess.TempDir();
        string baseDir = WriteBase(dir, "f32");
        SaveAdapter(baseDir, dir["adapter"]);
        string outDir = dir["merged"];
        CliProcess.Result Merge(string adapter, string output, params string[] extra) =>
            CliProcess.Run(["merge", "--model", baseDir, "--adapter", adapter, "--out", output, .. extra]);

        // an adapter trained on another base (intermediate_size 16, not 12): the key and both shapes
        using (var ops = new CpuOps())
        using (var other = LlamaModel.CreateRandom(Tiny with { IntermediateSize = 16 }, ops, new LlamaModelOptions { Lora = Lora }))
            PeftAdapter.Save(dir["other-adapter"], other, "other");
        var r = Merge(dir["other-adapter"], outDir);
        AssertOneError(r, "does not fit --model");
        Assert.That(r.Stderr, Does.Contain(
            "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight: the adapter's lora_B·lora_A is [16, 8], the base's model.layers.0.mlp.gate_proj.weight is [12, 8]"));
        Assert.That(Directory.Exists(outDir), Is.False);

        // missing adapter_config.json
        Directory.CreateDirectory(dir["broken"]);
        File.Copy(Path.Combine(dir["adapter"], PeftAdapter.WeightsFileName), Path.Combine(dir["broken"], PeftAdapter.WeightsFileName));
        AssertOneError(Merge(dir["broken"], outDir), $"--adapter {dir["broken"]}: no adapter_config.json in the folder");
        Assert.That(Directory.Exists(outDir), Is.False);

        // bad --dtype, bad --max-shard-size
        AssertOneError(Merge(dir["adapter"], outDir, "--dtype", "int8"), "--dtype int8: expected bf16, fp16 or fp32");
        AssertOneError(Merge(dir["adapter"], outDir, "--max-shard-size", "lots"), "--max-shard-size lots: expected a size");
        Assert.That(Directory.Exists(outDir), Is.False);

        // a model folder without config.json
        Directory.CreateDirectory(dir["empty-model"]);
        AssertOneError(CliProcess.Run("merge", "--model", dir["empty-model"], "--adapter", dir["adapter"], "--out", outDir), "no config.json");
        Assert.That(Directory.Exists(outDir), Is.False);

        // an existing non-empty --out is left as it was
        Directory.CreateDirectory(outDir);
        File.WriteAllText(Path.Combine(outDir, "keep.txt"), "mine");
        AssertOneError(Merge(dir["adapter"], outDir), "the folder exists and is not empty");
        Assert.That(Directory.GetFileSystemEntries(outDir), Is.EqualTo(new[] { Path.Combine(outDir, "keep.txt") }));

        // an existing empty --out is used, and left empty on failure
        File.Delete(Path.Combine(outDir, "keep.txt"));
        AssertOneError(Merge(dir["other-adapter"], outDir), "does not fit");
        Assert.That(Directory.GetFileSystemEntries(outDir), Is.Empty);
        Assert.That(Merge(dir["adapter"], outDir).ExitCode, Is.EqualTo(0));
        Assert.That(File.Exists(Path.Combine(outDir, HfCheckpoint.IndexFileName)) || File.Exists(Path.Combine(outDir, HfCheckpoint.SingleFileName)));

        // a missing required option is a parse error (exit 2)
        r = CliProcess.Run("merge", "--model", baseDir, "--out", dir["x"]);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.Contain("--adapter"));
        Assert.That(Directory.Exists(dir["x"]), Is.False);
    }
}
