using System.Runtime.InteropServices;
using System.Text;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

public class HfCheckpointTests
{
    private string _dir = "";

    [SetUp]
    public void SetUp()
    {
        _dir = Path.Combine(Path.GetTempPath(), "np-hf-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_dir);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    /// <summary>hidden 8, intermediate 12, 2 layers, 4 heads (head_dim 2), 2 KV heads, vocab 10.</summary>
    private static readonly LlamaConfig Tiny = new()
    {
        HiddenSize = 8, IntermediateSize = 12, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        HeadDim = 2, VocabSize = 10, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000, TorchDtype = DType.BF16,
    };

    /// <summary>Distinct values per tensor, exactly representable in BF16 (k/64 for small integers k).</summary>
    private static float[] Values(int seed, long count)
    {
        var v = new float[count];
        for (long i = 0; i < count; i++)
            v[i] = ((seed * 31 + i * 7) % 97 - 48) / 64f;
        return v;
    }

    private static Dictionary<string, float[]> TinyValues(LlamaConfig config)
    {
        int seed = 0;
        return config.ExpectedTensors().ToDictionary(t => t.Name, t => Values(++seed, DTypes.ElementCount(t.Shape)));
    }

    private static List<SafetensorsTensor> AsBf16(LlamaConfig config, Dictionary<string, float[]> values) =>
        config.ExpectedTensors().Select(t => SafetensorsTensor.From(t.Name, t.Shape, values[t.Name].Select(BFloat16.FromSingle).ToArray())).ToList();

    private string Sub(string name) => Path.Combine(_dir, name);

    [Test]
    public void SingleFileRoundTrip()
    {
        var values = TinyValues(Tiny);
        string dir = Sub("single");
        HfCheckpoint.Write(dir, Tiny, AsBf16(Tiny, values), maxShardBytes: 1 << 20);
        Assert.That(Directory.GetFiles(dir).Select(Path.GetFileName).Order(), Is.EqualTo(new[] { "config.json", "model.safetensors" }));
        using var ck = HfCheckpoint.Open(dir);
        Assert.That(ck.IsSharded, Is.False);
        Assert.That(ck.Config, Is.EqualTo(Tiny));
        Assert.That(ck.TensorNames, Has.Count.EqualTo(21));
        Assert.DoesNotThrow(ck.Validate);
        foreach (var (name, v) in values)
        {
            Assert.That(ck.ReadSingle(name), Is.EqualTo(v), name);
            Assert.That(ck.GetInfo(name).DType, Is.EqualTo(DType.BF16));
        }
        using var f = SafetensorsFile.Open(Path.Combine(dir, "model.safetensors"));
        Assert.That(f.Metadata["format"], Is.EqualTo("pt"));
    }

    [Test]
    public void ThreeShardRoundTripWithIndex()
    {
        // BF16 bytes: embed 160, per layer 992 (norms 16+16, q 128, k 64, v 64, o 128, gate/up/down 192 each), norm 16,
        // lm_head 160 = 2320. With 900 bytes per shard the greedy split gives 768 + 800 + 752.
        var values = TinyValues(Tiny);
        string dir = Sub("sharded");
        HfCheckpoint.Write(dir, Tiny, AsBf16(Tiny, values), maxShardBytes: 900);
        string[] files = Directory.GetFiles(dir).Select(p => Path.GetFileName(p)!).Order(StringComparer.Ordinal).ToArray();
        Assert.That(files, Is.EqualTo(new[]
        {
            "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors", "model.safetensors.index.json",
        }));
        string index = File.ReadAllText(Path.Combine(dir, "model.safetensors.index.json"));
        Assert.That(index, Does.StartWith("{\n  \"metadata\": {\n    \"total_size\": 2320\n  },\n  \"weight_map\": {\n    \"lm_head.weight\": \"model-00003-of-00003.safetensors\",\n"));
        Assert.That(new FileInfo(Path.Combine(dir, "model-00001-of-00003.safetensors")).Length, Is.GreaterThan(768));

        using var ck = HfCheckpoint.Open(dir);
        Assert.That(ck.IsSharded, Is.True);
        Assert.That(ck.IndexTotalSize, Is.EqualTo(2320));
        Assert.That(ck.FilePaths, Has.Count.EqualTo(3));
        Assert.That(Path.GetFileName(ck.GetFilePath("model.embed_tokens.weight")), Is.EqualTo("model-00001-of-00003.safetensors"));
        Assert.That(Path.GetFileName(ck.GetFilePath("model.layers.1.self_attn.q_proj.weight")), Is.EqualTo("model-00002-of-00003.safetensors"));
        Assert.That(Path.GetFileName(ck.GetFilePath("lm_head.weight")), Is.EqualTo("model-00003-of-00003.safetensors"));
        Assert.DoesNotThrow(ck.Validate);
        foreach (var (name, v) in values)
        {
            Assert.That(ck.ReadSingle(name), Is.EqualTo(v), name);
            Assert.That(ck.ReadBFloat16(name).Select(b => b.ToSingle()), Is.EqualTo(v), name);
        }
    }

    [Test]
    public void ANonFiniteWeightIsRefusedOnReadNamingTheTensorAndElement()
    {
        ushort[] f16Bits = new ushort[80];
        f16Bits[9] = 0x7E00; // NaN
        ushort[] bf16Bits = [0x3F80, 0x3F80, 0xFF80, 0, 0, 0, 0, 0]; // -inf at 2
        float[] f32 = new float[80];
        f32[41] = 2e30f; // finite, beyond ±1e30
        string dir = Sub("nonfinite");
        HfCheckpoint.Write(dir, Tiny, [
            new("model.embed_tokens.weight", DType.F16, [10, 8], MemoryMarshal.AsBytes(f16Bits.AsSpan()).ToArray()),
            new("model.norm.weight", DType.BF16, [8], MemoryMarshal.AsBytes(bf16Bits.AsSpan()).ToArray()),
            SafetensorsTensor.From("lm_head.weight", [10, 8], f32),
        ], 1 << 20);
        using var ck = HfCheckpoint.Open(dir);
        foreach (var (name, expected) in new[] { ("model.embed_tokens.weight", "element 9 is NaN"), ("model.norm.weight", "element 2 is -inf"),
                     ("lm_head.weight", "element 41 is 2E+30 (beyond ±1e30)") })
        {
            var e = Assert.Throws<HfCheckpointException>(() => ck.ReadSingle(name))!;
            Assert.That(e.Message, Does.Contain($"{name}: {expected}: the checkpoint's weights are not finite"));
            Assert.Throws<HfCheckpointException>(() => ck.ReadBFloat16(name), "whatever the destination type");
        }
    }

    [Test]
    public void ConversionsFromF16AndBf16AreExactAndToBf16RoundsToNearestEven()
    {
        var config = Tiny; // only three tensors: not validated, read one by one
        // F16 bits: 0x3555 = 0.333251953125, 0xC000 = -2, 0x7BFF = 65504, 0x0001 = 2^-24 (subnormal), … (embed has 80).
        ushort[] f16Bits = new ushort[80];
        f16Bits[0] = 0x3555; f16Bits[1] = 0xC000; f16Bits[2] = 0x7BFF; f16Bits[3] = 0x0001;
        float[] f16Expected = new float[80];
        f16Expected[0] = 0.333251953125f; f16Expected[1] = -2f; f16Expected[2] = 65504f; f16Expected[3] = MathF.Pow(2, -24);
        // BF16 bits: 0x4049 = 3.140625, 0x0001 = 2^-133 (subnormal), 0xC780 = -65536, 0xC2F7 = -123.5 (a non-finite
        // weight is refused on read: HfCheckpointNonFiniteTests).
        ushort[] bf16Bits = [0x4049, 0x0001, 0xC780, 0xC2F7, 0, 0, 0, 0];
        float[] bf16Expected = [3.140625f, MathF.Pow(2, -133), -65536f, -123.5f, 0, 0, 0, 0];
        // F32: 1 + 2^-8 is a tie → 1.0 (even); 1 + 3·2^-8 is a tie → 1 + 2^-6 (even); 1 + 2^-8 + 2^-20 rounds up.
        float[] f32 = new float[80];
        f32[0] = 1f + MathF.Pow(2, -8); f32[1] = 1f + 3 * MathF.Pow(2, -8); f32[2] = 1f + MathF.Pow(2, -8) + MathF.Pow(2, -20);
        var tensors = new List<SafetensorsTensor>
        {
            new("model.embed_tokens.weight", DType.F16, [10, 8], MemoryMarshal.AsBytes(f16Bits.AsSpan()).ToArray()),
            new("model.norm.weight", DType.BF16, [8], MemoryMarshal.AsBytes(bf16Bits.AsSpan()).ToArray()),
            SafetensorsTensor.From("lm_head.weight", [10, 8], f32),
        };
        string dir = Sub("conv");
        HfCheckpoint.Write(dir, config, tensors, 1 << 20);
        using var ck = HfCheckpoint.Open(dir);
        Assert.That(ck.ReadSingle("model.embed_tokens.weight"), Is.EqualTo(f16Expected));
        Assert.That(ck.ReadSingle("model.norm.weight"), Is.EqualTo(bf16Expected));
        Assert.That(ck.ReadSingle("lm_head.weight"), Is.EqualTo(f32), "F32 → float is a copy");
        BFloat16[] bf = ck.ReadBFloat16("lm_head.weight");
        Assert.That(bf.Take(3).Select(b => b.RawValue), Is.EqualTo(new ushort[] { 0x3F80, 0x3F82, 0x3F81 }));
        Assert.That(ck.ReadBFloat16("model.norm.weight").Select(b => b.RawValue), Is.EqualTo(bf16Bits), "BF16 → BF16 is a copy");
        Assert.That(ck.ReadBFloat16("model.embed_tokens.weight").Take(3).Select(b => b.ToSingle()),
            Is.EqualTo(new[] { 0.333984375f, -2f, 65536f }), "F16 → BF16 rounds to 8 significant bits");
        Assert.That(ck.ReadArray<Half>("model.embed_tokens.weight").Take(4).Select(h => BitConverter.HalfToUInt16Bits(h)),
            Is.EqualTo(f16Bits.Take(4)));
        Assert.Throws<ArgumentException>(() => ck.Read<float>("model.norm.weight", new float[7]));
        var ex = Assert.Throws<HfCheckpointException>(() => ck.ReadSingle("model.layers.0.mlp.up_proj.weight"));
        Assert.That(ex!.Message, Does.Contain(dir).And.Contain("model.layers.0.mlp.up_proj.weight"));
    }

    [Test]
    public void ValidateReportsEveryProblemNamingEachTensor()
    {
        var values = TinyValues(Tiny);
        var tensors = AsBf16(Tiny, values);
        tensors.RemoveAll(t => t.Name == "model.layers.1.mlp.up_proj.weight");                       // missing
        int k = tensors.FindIndex(t => t.Name == "model.layers.0.self_attn.k_proj.weight");
        tensors[k] = SafetensorsTensor.From(tensors[k].Name, [8, 4], new BFloat16[32]);                // wrong shape
        int n = tensors.FindIndex(t => t.Name == "model.norm.weight");
        tensors[n] = SafetensorsTensor.From(tensors[n].Name, [8], new int[8]);                          // wrong dtype
        tensors.Add(SafetensorsTensor.From("model.layers.2.input_layernorm.weight", [8], new BFloat16[8])); // unexpected
        tensors.Add(SafetensorsTensor.From("model.layers.0.self_attn.rotary_emb.inv_freq", [1], new float[1])); // ignored
        string dir = Sub("bad");
        HfCheckpoint.Write(dir, Tiny, tensors, 1 << 20);
        using var ck = HfCheckpoint.Open(dir);
        var ex = Assert.Throws<HfCheckpointException>(ck.Validate)!;
        Assert.That(ex.Problems, Has.Count.EqualTo(4), ex.Message);
        Assert.That(ex.Message, Does.StartWith(Path.GetFullPath(dir) + ": the checkpoint does not match its config.json (4 problems):"));
        Assert.That(ex.Message, Does.Contain("model.layers.1.mlp.up_proj.weight: missing (expected shape [12, 8])"));
        Assert.That(ex.Message, Does.Contain("model.layers.0.self_attn.k_proj.weight: shape [8, 4] in model.safetensors, but the config expects [4, 8]"));
        Assert.That(ex.Message, Does.Contain("model.norm.weight: dtype I32 in model.safetensors, expected BF16, F16 or F32"));
        Assert.That(ex.Message, Does.Contain("model.layers.2.input_layernorm.weight: unexpected tensor"));
        Assert.That(ck.FindProblems(), Is.EqualTo(ex.Problems));
    }

    [Test]
    public void TiedEmbeddingsNeedNoLmHead()
    {
        var tied = Tiny with { TieWordEmbeddings = true };
        var values = TinyValues(tied);
        string dir = Sub("tied");
        HfCheckpoint.Write(dir, tied, AsBf16(tied, values), 1 << 20);
        using var ck = HfCheckpoint.Open(dir);
        Assert.That(ck.Contains("lm_head.weight"), Is.False);
        Assert.DoesNotThrow(ck.Validate);
        Assert.That(File.ReadAllText(Path.Combine(dir, "config.json")), Does.Contain("\"tie_word_embeddings\": true"));
    }

    /// <summary>Writes shards by hand: each entry is (file name, tensors); the index maps as given.</summary>
    private string HandSharded(string name, (string File, SafetensorsTensor[] Tensors)[] shards, Dictionary<string, string> weightMap, LlamaConfig? config = null)
    {
        string dir = Sub(name);
        Directory.CreateDirectory(dir);
        (config ?? Tiny).Save(Path.Combine(dir, "config.json"));
        foreach (var (file, tensors) in shards)
            SafetensorsWriter.Write(Path.Combine(dir, file), tensors);
        var sb = new StringBuilder("{\"metadata\": {\"total_size\": 1}, \"weight_map\": {");
        sb.Append(string.Join(", ", weightMap.Select(kv => $"\"{kv.Key}\": \"{kv.Value}\"")));
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), sb.Append("}}").ToString());
        return dir;
    }

    private static SafetensorsTensor Norm(string name = "model.norm.weight") => SafetensorsTensor.From(name, [8], new BFloat16[8]);

    [Test]
    public void DuplicateTensorAcrossShardsIsNamed()
    {
        string dir = HandSharded("dup",
            [("a.safetensors", [Norm()]), ("b.safetensors", [Norm(), Norm("model.layers.0.input_layernorm.weight")])],
            new() { ["model.norm.weight"] = "a.safetensors", ["model.layers.0.input_layernorm.weight"] = "b.safetensors" });
        var ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(dir))!;
        Assert.That(ex.Message, Does.Contain("model.safetensors.index.json"));
        Assert.That(ex.Message, Does.Contain("model.norm.weight: appears in both a.safetensors and b.safetensors"));
        Assert.That(ex.Problems, Has.Count.EqualTo(1));
    }

    [Test]
    public void ShardContentsMustMatchTheIndex()
    {
        string dir = HandSharded("mismatch",
            [("a.safetensors", [Norm(), Norm("extra.weight")]), ("b.safetensors", [Norm("model.layers.0.input_layernorm.weight")])],
            new()
            {
                ["model.norm.weight"] = "b.safetensors",
                ["model.layers.0.input_layernorm.weight"] = "b.safetensors",
                ["model.layers.0.post_attention_layernorm.weight"] = "a.safetensors",
            });
        var ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(dir))!;
        Assert.That(ex.Problems, Is.EquivalentTo(new[]
        {
            "model.norm.weight: is in a.safetensors but the index's weight_map says b.safetensors",
            "extra.weight: is in a.safetensors but not in the index's weight_map",
            "model.layers.0.post_attention_layernorm.weight: the index's weight_map lists it in a.safetensors, which does not contain it",
        }));
    }

    [Test]
    public void MissingShardFileIsNamed()
    {
        string dir = Sub("missing-shard");
        HfCheckpoint.Write(dir, Tiny, AsBf16(Tiny, TinyValues(Tiny)), maxShardBytes: 900);
        File.Delete(Path.Combine(dir, "model-00002-of-00003.safetensors"));
        var ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(dir))!;
        Assert.That(ex.Message, Does.Contain(Path.Combine(Path.GetFullPath(dir), "model.safetensors.index.json")));
        Assert.That(ex.Message, Does.Contain("model-00002-of-00003.safetensors: listed in weight_map but not in the folder"));
    }

    [Test]
    public void BadIndexJsonIsNamed()
    {
        string dir = Sub("bad-index");
        HfCheckpoint.Write(dir, Tiny, AsBf16(Tiny, TinyValues(Tiny)), maxShardBytes: 900);
        string index = Path.Combine(Path.GetFullPath(dir), "model.safetensors.index.json");
        var cases = new (string Text, string Mention)[]
        {
            ("{\"weight_map\": {", "invalid JSON"),
            ("[]", "must be a JSON object"),
            ("{\"metadata\": {}}", "weight_map: missing"),
            ("{\"weight_map\": {\"model.norm.weight\": 3}}", "weight_map.model.norm.weight: must be a file name string"),
            ("{\"weight_map\": {\"model.norm.weight\": \"../model-00001-of-00003.safetensors\"}}", "not a plain file name"),
            ("{\"weight_map\": {\"model.norm.weight\": \"x.safetensors\", \"model.norm.weight\": \"y.safetensors\"}}", "model.norm.weight: listed twice"),
        };
        foreach (var (text, mention) in cases)
        {
            File.WriteAllText(index, text);
            var ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(dir))!;
            Assert.That(ex.Message, Does.StartWith(index + ": ").And.Contain(mention), text);
        }
    }

    [Test]
    public void FolderProblemsAreNamed()
    {
        string none = Sub("nothing-here");
        Assert.That(Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(none))!.Message,
            Is.EqualTo($"{Path.GetFullPath(none)}: checkpoint folder does not exist"));

        string noConfig = Sub("no-config");
        HfCheckpoint.Write(noConfig, Tiny, AsBf16(Tiny, TinyValues(Tiny)), 1 << 20);
        File.Delete(Path.Combine(noConfig, "config.json"));
        var ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(noConfig))!;
        Assert.That(ex.Message, Does.StartWith(Path.GetFullPath(noConfig) + ": no config.json in the folder"));

        string noWeights = Sub("no-weights");
        Directory.CreateDirectory(noWeights);
        Tiny.Save(Path.Combine(noWeights, "config.json"));
        File.WriteAllBytes(Path.Combine(noWeights, "pytorch_model.bin"), [0]);
        ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(noWeights))!;
        Assert.That(ex.Message, Does.Contain("neither model.safetensors nor model.safetensors.index.json").And.Contain(".bin"));

        string badType = Sub("bad-type");
        Directory.CreateDirectory(badType);
        File.WriteAllText(Path.Combine(badType, "config.json"), Tiny.ToJson().Replace("\"llama\"", "\"gpt2\""));
        var cex = Assert.Throws<LlamaConfigException>(() => HfCheckpoint.Open(badType))!;
        Assert.That(cex.Message, Does.StartWith(Path.Combine(Path.GetFullPath(badType), "config.json") + ": model_type: \"gpt2\""));

        string corrupt = Sub("corrupt");
        HfCheckpoint.Write(corrupt, Tiny, AsBf16(Tiny, TinyValues(Tiny)), 1 << 20);
        string st = Path.Combine(Path.GetFullPath(corrupt), "model.safetensors");
        File.WriteAllBytes(st, File.ReadAllBytes(st)[..^2]);
        ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Open(corrupt))!;
        Assert.That(ex.Message, Does.StartWith(st + ": "));
    }

    [Test]
    public void WriteRefusesAnExistingCheckpointAndBadTensorsWithoutTouchingTheFolder()
    {
        string dir = Sub("existing");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), "old");
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), "tok");
        var ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Write(dir, Tiny, AsBf16(Tiny, TinyValues(Tiny)), 1 << 20))!;
        Assert.That(ex.Message, Does.Contain("config.json: already exists"));
        Assert.That(File.ReadAllText(Path.Combine(dir, "config.json")), Is.EqualTo("old"));
        Assert.That(Directory.GetFiles(dir), Has.Length.EqualTo(2));

        string fresh = Sub("fresh/nested");
        var tensors = AsBf16(Tiny, TinyValues(Tiny));
        tensors.Add(new SafetensorsTensor("broken", DType.F32, [3], new byte[8]));
        tensors.Add(tensors[0]);
        ex = Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Write(fresh, Tiny, tensors, 1 << 20))!;
        Assert.That(ex.Problems, Has.Count.EqualTo(2));
        Assert.That(ex.Message, Does.Contain("broken: has 8 bytes but F32 [3] needs 12").And.Contain("model.embed_tokens.weight: given twice"));
        Assert.That(Directory.Exists(Sub("fresh")), Is.False);
    }

    [Test]
    public void FailureHalfwayRemovesEverythingWritten()
    {
        // A directory squatting on the second shard's name makes its rename fail after the first shard is written.
        string dir = Sub("halfway");
        Directory.CreateDirectory(Path.Combine(dir, "model-00002-of-00003.safetensors"));
        Assert.Throws<HfCheckpointException>(() => HfCheckpoint.Write(dir, Tiny, AsBf16(Tiny, TinyValues(Tiny)), 900));
        Assert.That(Directory.GetFileSystemEntries(dir).Select(Path.GetFileName), Is.EqualTo(new[] { "model-00002-of-00003.safetensors" }));
        Assert.That(Directory.GetFiles(dir), Is.Empty);
    }

    // ---------------------------------------------------------------- 4-bit

    private static readonly string[] LinearNames = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

    private static bool IsLinear(string name) => name.StartsWith("model.layers.", StringComparison.Ordinal) && LinearNames.Any(l => name.EndsWith(l + ".weight", StringComparison.Ordinal));

    /// <summary>Linear weights in bitsandbytes 4-bit layout (layer 0 nf4 with double quant, layer 1 fp4), the rest BF16.</summary>
    private static (List<SafetensorsTensor> Tensors, Dictionary<string, Quantized4BitTensor> Quantized) Quantized(LlamaConfig config, Dictionary<string, float[]> values)
    {
        var tensors = new List<SafetensorsTensor>();
        var quantized = new Dictionary<string, Quantized4BitTensor>();
        foreach (var (name, shape) in config.ExpectedTensors())
        {
            if (!IsLinear(name))
            {
                tensors.Add(SafetensorsTensor.From(name, shape, values[name].Select(BFloat16.FromSingle).ToArray()));
                continue;
            }
            bool layer0 = name.StartsWith("model.layers.0.", StringComparison.Ordinal);
            var q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values[name]), shape, layer0 ? QuantType.Nf4 : QuantType.Fp4, 64, doubleQuant: layer0, DType.BF16);
            quantized.Add(name, q);
            tensors.AddRange(BitsAndBytes4Bit.ToTensors(name[..^"weight".Length], q));
        }
        return (tensors, quantized);
    }

    [Test]
    public void FourBitCheckpointValidatesAndLoads()
    {
        var values = TinyValues(Tiny);
        var (tensors, quantized) = Quantized(Tiny, values);
        string dir = Sub("q4");
        HfCheckpoint.Write(dir, Tiny, tensors, maxShardBytes: 600);
        using var ck = HfCheckpoint.Open(dir);
        Assert.That(ck.IsSharded, Is.True);
        Assert.That(ck.IsQuantizedCheckpoint, Is.True);
        Assert.DoesNotThrow(ck.Validate);
        Assert.That(ck.IsQuantized("model.layers.0.mlp.down_proj.weight"), Is.True);
        Assert.That(ck.IsQuantized("model.layers.0.input_layernorm.weight"), Is.False);
        Assert.That(ck.GetShape("model.layers.0.mlp.down_proj.weight"), Is.EqualTo(new long[] { 8, 12 }));
        Assert.That(ck.GetInfo("model.layers.0.mlp.down_proj.weight").Shape, Is.EqualTo(new long[] { 48, 1 }), "packed bytes");
        foreach (var (name, q) in quantized)
        {
            Quantized4BitTensor loaded = ck.LoadQuantized(name);
            Assert.That(loaded.Packed, Is.EqualTo(q.Packed), name);
            Assert.That(loaded.State.Shape, Is.EqualTo(q.State.Shape), name);
            Assert.That(loaded.State.QuantType, Is.EqualTo(q.State.QuantType), name);
            Assert.That(loaded.DequantizeToSingle(), Is.EqualTo(q.DequantizeToSingle()), name);
        }
        // The state tensors of one weight stay in its shard.
        foreach (string name in quantized.Keys)
        {
            foreach (string component in ck.TensorNames.Where(t => t.StartsWith(name + ".", StringComparison.Ordinal)))
                Assert.That(ck.GetFilePath(component), Is.EqualTo(ck.GetFilePath(name)), component);
        }
        Assert.That(ck.ReadSingle("model.norm.weight"), Is.EqualTo(values["model.norm.weight"]));
        var ex = Assert.Throws<HfCheckpointException>(() => ck.ReadSingle("model.layers.1.mlp.up_proj.weight"))!;
        Assert.That(ex.Message, Does.Contain("model.layers.1.mlp.up_proj.weight").And.Contain("LoadQuantized"));
    }

    [Test]
    public void FourBitWeightSplitAcrossShardsLoads()
    {
        var config = Tiny with { NumHiddenLayers = 1 };
        var values = TinyValues(config);
        var (tensors, quantized) = Quantized(config, values);
        // Everything in a.safetensors except q_proj's absmax and quant state, which go to b.safetensors.
        const string q = "model.layers.0.self_attn.q_proj.weight";
        var inB = tensors.Where(t => t.Name is q + ".absmax" or q + ".quant_state.bitsandbytes__nf4" or q + ".nested_absmax").ToArray();
        var inA = tensors.Except(inB).ToArray();
        var map = inA.ToDictionary(t => t.Name, _ => "a.safetensors");
        foreach (var t in inB) map[t.Name] = "b.safetensors";
        string dir = HandSharded("split", [("a.safetensors", inA), ("b.safetensors", inB)], map, config);
        using var ck = HfCheckpoint.Open(dir);
        Assert.DoesNotThrow(ck.Validate);
        Assert.That(ck.GetFilePath(q), Is.Not.EqualTo(ck.GetFilePath(q + ".absmax")));
        Quantized4BitTensor loaded = ck.LoadQuantized(q);
        Assert.That(loaded.Packed, Is.EqualTo(quantized[q].Packed));
        Assert.That(loaded.DequantizeToSingle(), Is.EqualTo(quantized[q].DequantizeToSingle()));
    }

    [Test]
    public void FourBitProblemsAreNamed()
    {
        var values = TinyValues(Tiny);
        var (tensors, _) = Quantized(Tiny, values);
        const string k = "model.layers.1.self_attn.k_proj.weight";
        // Replace k_proj by a 4-bit tensor of the wrong shape, and drop v_proj's quant_map.
        tensors.RemoveAll(t => t.Name.StartsWith(k, StringComparison.Ordinal) || t.Name == "model.layers.1.self_attn.v_proj.weight.quant_map");
        var wrong = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(new float[64]), [8, 8], QuantType.Nf4, 64, false, DType.BF16);
        tensors.AddRange(BitsAndBytes4Bit.ToTensors("model.layers.1.self_attn.k_proj.", wrong));
        string dir = Sub("q4bad");
        HfCheckpoint.Write(dir, Tiny, tensors, 1 << 20);
        using var ck = HfCheckpoint.Open(dir);
        var ex = Assert.Throws<HfCheckpointException>(ck.Validate)!;
        Assert.That(ex.Problems, Has.Count.EqualTo(2), ex.Message);
        Assert.That(ex.Message, Does.Contain(k + ": 4-bit quant state shape [8, 8], but the config expects [4, 8]"));
        Assert.That(ex.Message, Does.Contain("model.layers.1.self_attn.v_proj.weight.quant_map: missing (part of the 4-bit weight model.layers.1.self_attn.v_proj.weight)"));
        var lex = Assert.Throws<HfCheckpointException>(() => ck.LoadQuantized("model.layers.1.self_attn.v_proj.weight"))!;
        Assert.That(lex.Message, Does.Contain("model.layers.1.self_attn.v_proj.weight.quant_map"));
    }
}
