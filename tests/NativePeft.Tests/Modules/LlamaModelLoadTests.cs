using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Tests.Reference;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.Modules;

/// <summary>LlamaModel.Load on tiny HF-layout checkpoints written by HfCheckpoint.Write (sharded).</summary>
public class LlamaModelLoadTests
{
    private string _root = "";

    [SetUp]
    public void SetUp() => _root = Directory.CreateTempSubdirectory("nativepeft-load-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_root, recursive: true);

    private string Sub(string name) => Path.Combine(_root, name);

    /// <summary>Distinct values per tensor (tensor index · 1000 + element, scaled), so a tensor in the wrong place shows.</summary>
    internal static Dictionary<string, float[]> Values(LlamaConfig config, int seed = 1)
    {
        var result = new Dictionary<string, float[]>();
        int k = 0;
        foreach (var (name, shape) in config.ExpectedTensors())
        {
            int n = (int)DTypes.ElementCount(shape);
            var noise = GradCheck.RandomNormal(n, seed * 1000 + k++, 0.3);
            result[name] = noise.Select((v, i) => (float)(name.EndsWith("norm.weight") ? 1 + v : v)).ToArray();
        }
        return result;
    }

    internal static List<SafetensorsTensor> F32(LlamaConfig config, Dictionary<string, float[]> values) =>
        config.ExpectedTensors().Select(t => SafetensorsTensor.From(t.Name, t.Shape, values[t.Name])).ToList();

    private static List<SafetensorsTensor> Bf16(LlamaConfig config, Dictionary<string, float[]> values) =>
        config.ExpectedTensors().Select(t => SafetensorsTensor.From(t.Name, t.Shape, values[t.Name].Select(BFloat16.FromSingle).ToArray())).ToList();

    [TestCase(false, DType.F32)]
    [TestCase(true, DType.F32)]
    [TestCase(false, DType.F64)]
    public void EveryTensorLandsInPlace(bool tied, DType compute)
    {
        var config = Tiny with { TieWordEmbeddings = tied };
        var values = Values(config);
        string dir = Sub("ck");
        HfCheckpoint.Write(dir, config, F32(config, values), maxShardBytes: 800);
        using var ck = HfCheckpoint.Open(dir);
        Assert.That(ck.IsSharded, Is.True, "the test is about a sharded checkpoint");
        using var ops = new CpuOps();
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { ComputeDType = compute, Lora = new LoraSettings { Rank = 2 } });
        var loaded = model.BaseParameters().ToList();
        Assert.That(loaded.Select(p => p.Name), Is.EquivalentTo(config.ExpectedTensors().Select(t => t.Name)));
        foreach (var (name, dense, _) in loaded)
        {
            var expected = values[name].Select(v => (double)v).ToArray();
            Assert.That(Get(ops, dense!), Is.EqualTo(expected), name);
        }
        Assert.That(model.LmHead.Data, tied ? Is.EqualTo(model.EmbedTokens.Data) : Is.Not.EqualTo(model.EmbedTokens.Data));
        Assert.That(model.TrainableParameters.Select(p => p.Name), Does.Contain("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"));
    }

    [Test]
    public void Bf16CheckpointWidensExactly()
    {
        var values = Values(Tiny);
        string dir = Sub("bf16");
        HfCheckpoint.Write(dir, Tiny, Bf16(Tiny, values), maxShardBytes: 1 << 20);
        using var ck = HfCheckpoint.Open(dir);
        using var ops = new CpuOps();
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions());
        foreach (var (name, dense, _) in model.BaseParameters())
            Assert.That(Get(ops, dense!), Is.EqualTo(values[name].Select(v => (double)BFloat16.FromSingle(v).ToSingle()).ToArray()), name);
    }

    /// <summary>Tiny's checkpoint in <paramref name="dir"/> with every projection NF4 in bitsandbytes' layout (the rest F32); returns the quantized projections.</summary>
    private static Dictionary<string, Quantized4BitTensor> WriteFourBitCheckpoint(string dir, Dictionary<string, float[]> values, int blocksize, bool doubleQuant)
    {
        var tensors = new List<SafetensorsTensor>();
        var quantized = new Dictionary<string, Quantized4BitTensor>();
        foreach (var (name, shape) in Tiny.ExpectedTensors())
        {
            if (!name.Contains("_proj."))
            {
                tensors.Add(SafetensorsTensor.From(name, shape, values[name]));
                continue;
            }
            var q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values[name]), shape, QuantType.Nf4, blocksize, doubleQuant, DType.F32);
            quantized[name] = q;
            tensors.AddRange(BitsAndBytes4Bit.ToTensors(name[..^"weight".Length], q));
        }
        HfCheckpoint.Write(dir, Tiny, tensors, maxShardBytes: 700);
        return quantized;
    }

    [Test]
    public void FourBitCheckpointLoadsAsIsAndEqualsQuantizeOnLoad()
    {
        var values = Values(Tiny);
        string q4Dir = Sub("q4"), f32Dir = Sub("f32");
        var quantized = WriteFourBitCheckpoint(q4Dir, values, 64, doubleQuant: true);
        HfCheckpoint.Write(f32Dir, Tiny, F32(Tiny, values), maxShardBytes: 700);
        using var ops = new CpuOps();
        using var ckQ = HfCheckpoint.Open(q4Dir);
        using var ckF = HfCheckpoint.Open(f32Dir);
        // no quantization asked: the 4-bit weights are loaded as they are
        using var asIs = LlamaModel.Load(ckQ, ops, new LlamaModelOptions());
        using var onLoad = LlamaModel.Load(ckF, ops, new LlamaModelOptions { Quantization = BaseQuantization.Nf4, Blocksize = 64, DoubleQuant = true });
        var a = asIs.BaseParameters().ToDictionary(p => p.Name);
        var b = onLoad.BaseParameters().ToDictionary(p => p.Name);
        foreach (var (name, q) in quantized)
        {
            var qa = a[name].Quantized!;
            Assert.That(qa.QuantType, Is.EqualTo(QuantType.Nf4));
            var packed = new byte[qa.Packed.Count];
            ops.Download<byte>(qa.Packed, packed);
            Assert.That(packed, Is.EqualTo(q.Packed), name + ": packed bytes as stored");
            Assert.That(qa.Absmax, Is.Null, name + ": no decoded absmax on the device");
            var dq = qa.DoubleQuant!;
            var codes = new byte[dq.Absmax.Count];
            ops.Download<byte>(dq.Absmax, codes);
            Assert.That(codes, Is.EqualTo(q.State.Nested!.QuantizedAbsmax), name + ": the double-quantized absmax as stored");
            var nested = new float[dq.NestedAbsmax.Count];
            ops.Download<float>(dq.NestedAbsmax, nested);
            Assert.That(nested, Is.EqualTo(q.State.Nested.NestedAbsmax), name + ": nested_absmax as stored");
            var offset = new float[1];
            ops.Download<float>(dq.NestedOffset, offset);
            Assert.That(offset[0], Is.EqualTo(q.State.Nested.Offset), name + ": nested_offset");
            var packedB = new byte[b[name].Quantized!.Packed.Count];
            ops.Download<byte>(b[name].Quantized!.Packed, packedB);
            Assert.That(packedB, Is.EqualTo(q.Packed), name + ": quantize-on-load gives the same bytes");
        }
        var (ids, labels) = TinyBatch();
        Assert.That(asIs.Forward(ids, labels, B, T), Is.EqualTo(onLoad.Forward(ids, labels, B, T)));
    }

    [Test]
    public void FourBitCheckpointAtItsOwnBlocksizeLoadsAsStored()
    {
        // Stored at blocksize 128 without double quantization; loaded with the default options (64, double quantization
        // on): the model's layout follows the checkpoint, so each weight keeps its fp32 absmax of ⌈n/128⌉ blocks.
        var values = Values(Tiny);
        string dir = Sub("q4-128");
        var quantized = WriteFourBitCheckpoint(dir, values, 128, doubleQuant: false);
        using var ops = new CpuOps();
        using var ck = HfCheckpoint.Open(dir);
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions());
        Assert.That((model.LayoutOptions.FourBit, model.LayoutOptions.Blocksize, model.LayoutOptions.DoubleQuant), Is.EqualTo((true, 128, false)));
        var loaded = model.BaseParameters().ToDictionary(p => p.Name);
        foreach (var (name, q) in quantized)
        {
            var w = loaded[name].Quantized!;
            long n = values[name].Length;
            Assert.That(w.Absmax!.Count, Is.EqualTo((n + 127) / 128), name + ": one fp32 absmax per 128 values");
            var absmax = new float[w.Absmax.Count];
            ops.Download<float>(w.Absmax, absmax);
            Assert.That(absmax, Is.EqualTo(q.State.Absmax), name + ": absmax as stored");
        }
        Assert.That(ops.Memory.AllocatedBytes, Is.EqualTo(ModelLayout.Parameters(Tiny, model.LayoutOptions).SumBytes()));
    }

    [Test]
    public void BadCheckpointsFailNamingTheTensorWithNothingAllocated()
    {
        var values = Values(Tiny);
        using var ops = new CpuOps();

        var wrongShape = F32(Tiny, values);
        int k = wrongShape.FindIndex(t => t.Name == "model.layers.1.self_attn.k_proj.weight");
        wrongShape[k] = SafetensorsTensor.From(wrongShape[k].Name, [8, 4], values[wrongShape[k].Name]);
        HfCheckpoint.Write(Sub("shape"), Tiny, wrongShape, 800);
        using (var ck = HfCheckpoint.Open(Sub("shape")))
        {
            var ex = Assert.Throws<HfCheckpointException>(() => LlamaModel.Load(ck, ops, new LlamaModelOptions()))!;
            Assert.That(ex.Message, Does.Contain("model.layers.1.self_attn.k_proj.weight"));
            Assert.That(ops.Memory.AllocatedBytes, Is.Zero);
        }

        var missing = F32(Tiny, values).Where(t => t.Name != "model.layers.0.mlp.up_proj.weight").ToList();
        HfCheckpoint.Write(Sub("missing"), Tiny, missing, 800);
        using (var ck = HfCheckpoint.Open(Sub("missing")))
        {
            var ex = Assert.Throws<HfCheckpointException>(() => LlamaModel.Load(ck, ops, new LlamaModelOptions()))!;
            Assert.That(ex.Message, Does.Contain("model.layers.0.mlp.up_proj.weight"));
            Assert.That(ops.Memory.AllocatedBytes, Is.Zero);
        }

        // a good checkpoint with options that fail half-way (blocksize 48 is not a power of two): nothing stays allocated
        HfCheckpoint.Write(Sub("good"), Tiny, F32(Tiny, values), 800);
        using (var ck = HfCheckpoint.Open(Sub("good")))
        {
            Assert.That(() => LlamaModel.Load(ck, ops, new LlamaModelOptions { Quantization = BaseQuantization.Nf4, Blocksize = 48 }),
                Throws.InstanceOf<ArgumentException>());
            Assert.That(ops.Memory.AllocatedBytes, Is.Zero);
            var r = Assert.Throws<ArgumentOutOfRangeException>(() => LlamaModel.Load(ck, ops, new LlamaModelOptions { Lora = new LoraSettings { Rank = 9, TargetModules = ["gate_proj"] } }))!;
            Assert.That(r.Message, Does.Contain("r (LoRA rank) 9").And.Contain("mlp.gate_proj"));
            Assert.That(ops.Memory.AllocatedBytes, Is.Zero);
        }
    }
}
