using System.Text.Json;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Reference;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// A stand-in for gen_model_oracle.py's folder, in its format, made by OUR library (our float64 forward as "their"
/// numbers): it exercises TransformersOracleTests' plumbing (reading, two-shard bf16 loading, adapter loading, merge,
/// bounds, controls) where transformers is not installed. It proves nothing about transformers. Explicit: run with
/// NATIVEPEFT_ORACLE_DIR set to an empty folder, then the oracle tests with the same variable.
/// </summary>
[Explicit("writes a stand-in oracle folder from our own library into NATIVEPEFT_ORACLE_DIR")]
public class OracleStandIn
{
    private static readonly string[] Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    [Test]
    public void Write()
    {
        string out_ = Environment.GetEnvironmentVariable(TransformersOracleTests.DirVariable) ?? throw new InvalidOperationException("set " + TransformersOracleTests.DirVariable);
        Directory.CreateDirectory(out_);
        var config = new LlamaConfig
        {
            HiddenSize = 64, IntermediateSize = 160, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
            VocabSize = 320, MaxPositionEmbeddings = 256, RmsNormEps = 1e-5, RopeTheta = 500000,
            RopeScaling = new Llama3RopeScaling(8, 1, 4, 64), TieWordEmbeddings = false, TorchDtype = DType.BF16,
        };
        int k = 0;
        var tensors = new List<SafetensorsTensor>();
        long total = 0;
        foreach (var (name, shape) in config.ExpectedTensors())
        {
            var noise = GradCheck.RandomNormal((int)DTypes.ElementCount(shape), 100 + k++, 1);
            var v = noise.Select(x => BFloat16.FromSingle((float)(name.EndsWith("norm.weight") ? 1 + 0.1 * x : 0.2 * x))).ToArray();
            tensors.Add(SafetensorsTensor.From(name, shape, v));
            total += v.Length * 2;
        }
        string tiny = Path.Combine(out_, "tiny-gqa");
        HfCheckpoint.Write(tiny, config, tensors, maxShardBytes: (long)(total * 0.6));
        var rng = new Random(5678);
        int[][] ids = [.. Enumerable.Range(0, 2).Select(_ => Enumerable.Range(0, 16).Select(_ => rng.Next(320)).ToArray())];
        var json = new Dictionary<string, object> { ["format"] = 1, ["device"] = "stand-in: NativePeft's own float64 CPU forward, not transformers" };
        var (loss, logits) = Run(tiny, ids, null);
        SafetensorsWriter.Write(Path.Combine(out_, "tiny-gqa-logits.safetensors"), [SafetensorsTensor.From("logits", [2, 16, 320], logits)]);
        json["tiny_gqa"] = new Dictionary<string, object> { ["dir"] = "tiny-gqa", ["ids"] = ids, ["logits"] = "tiny-gqa-logits.safetensors", ["loss"] = loss };

        int[][] bids = [.. Enumerable.Range(0, 2).Select(_ => Enumerable.Range(0, 16).Select(_ => rng.Next(256)).ToArray())];
        var (bloss, blogits) = Run(BuiltinModel.Require(), bids, null);
        SafetensorsWriter.Write(Path.Combine(out_, "builtin-logits.safetensors"), [SafetensorsTensor.From("logits", [2, 16, 259], blogits)]);
        json["builtin"] = new Dictionary<string, object> { ["ids"] = bids, ["logits"] = "builtin-logits.safetensors", ["loss"] = bloss };

        // the adapter: random A and B, saved as PEFT's layout, then read back (the f32 values are the truth)
        string adapterDir = Path.Combine(out_, "tiny-gqa-adapter");
        using (var ck = HfCheckpoint.Open(tiny))
        using (var ops = new CpuOps())
        using (var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 4, Alpha = 8, TargetModules = Targets } }))
        {
            int s = 0;
            foreach (var (_, p, _) in model.TrainableParameters)
                ModelTestKit.Set(ops, p, GradCheck.RandomNormal((int)p.Count, 900 + s++, 0.1));
            PeftAdapter.Save(adapterDir, model, null);
        }
        var adapter = PeftAdapter.Load(adapterDir);
        var (aloss, alogits) = Run(tiny, ids, adapter);
        SafetensorsWriter.Write(Path.Combine(out_, "tiny-gqa-adapter-logits.safetensors"), [SafetensorsTensor.From("logits", [2, 16, 320], alogits)]);
        json["adapter"] = new Dictionary<string, object> { ["dir"] = "tiny-gqa-adapter", ["r"] = 4, ["lora_alpha"] = 8, ["logits"] = "tiny-gqa-adapter-logits.safetensors", ["loss"] = aloss };

        // merged, in float64 from the bf16 base and the f32 A, B, rounded once to f32
        var weights = new Dictionary<string, object>();
        var rows = new List<SafetensorsTensor>();
        using (var ck = HfCheckpoint.Open(tiny))
            foreach (var m in adapter.Modules)
            {
                var w = ck.ReadArray<BFloat16>(m.BaseWeightName);
                var merged = new float[m.OutFeatures * m.InFeatures];
                double sum = 0, sumSq = 0;
                for (int i = 0; i < m.OutFeatures; i++)
                    for (int j = 0; j < m.InFeatures; j++)
                    {
                        double ba = 0;
                        for (int r = 0; r < m.Rank; r++) ba += (double)m.B[i * m.Rank + r] * m.A[r * m.InFeatures + j];
                        float v = (float)(w[i * m.InFeatures + j].ToSingle() + adapter.Scaling * ba);
                        merged[i * m.InFeatures + j] = v;
                        sum += v;
                        sumSq += (double)v * v;
                    }
                weights[m.BaseWeightName] = new Dictionary<string, object> { ["shape"] = new[] { m.OutFeatures, m.InFeatures }, ["sum"] = sum, ["sum_sq"] = sumSq };
                rows.Add(SafetensorsTensor.From(m.BaseWeightName + ".row0", [m.InFeatures], merged[..m.InFeatures]));
                rows.Add(SafetensorsTensor.From(m.BaseWeightName + ".row_last", [m.InFeatures], merged[^m.InFeatures..]));
            }
        SafetensorsWriter.Write(Path.Combine(out_, "tiny-gqa-merged-rows.safetensors"), rows);
        json["merged"] = new Dictionary<string, object> { ["rows"] = "tiny-gqa-merged-rows.safetensors", ["weights"] = weights };
        File.WriteAllText(Path.Combine(out_, "oracle.json"), JsonSerializer.Serialize(json, new JsonSerializerOptions { WriteIndented = true }));
        TestContext.Out.WriteLine($"stand-in written to {out_}: losses {loss}, {bloss}, {aloss}");
    }

    private static (double Loss, float[] Logits) Run(string dir, int[][] rows, PeftAdapter? adapter)
    {
        var ids = rows.SelectMany(r => r).ToArray();
        using var ck = HfCheckpoint.Open(dir);
        using var ops = new CpuOps();
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { ComputeDType = DType.F64, Lora = adapter?.Config.ToLoraSettings() });
        adapter?.ApplyTo(model);
        double loss = model.Forward(ids, ids, rows.Length, rows[0].Length);
        var logits = ops.Memory.Allocate(DType.F64, ids.Length, ck.Config.VocabSize);
        model.Logits(logits);
        var d = ModelTestKit.Get(ops, logits);
        ops.Memory.Free(logits);
        return (loss, Array.ConvertAll(d, v => (float)v));
    }
}
