using System.Text.Json;
using System.Text.Json.Nodes;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NUnit.Framework;
using static NativePeft.Tests.Modules.ModelTestKit;

namespace NativePeft.Tests.IO;

/// <summary>PEFT adapter folders: the exact files of docs/formats.md, round trips, and clear errors.</summary>
public class PeftAdapterTests
{
    private string _root = "";

    [SetUp]
    public void SetUp() => _root = Directory.CreateTempSubdirectory("nativepeft-peft-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_root, recursive: true);

    private string Sub(string name) => Path.Combine(_root, name);

    private static readonly LoraSettings Settings = new()
    {
        Rank = 2, Alpha = 16, Dropout = 0.05, TargetModules = ["v_proj", "q_proj", "down_proj"],
    };

    private static LlamaModel NewModel(IOps ops, LlamaConfig config, LoraSettings lora, int loraSeed) =>
        LlamaModel.CreateRandom(config, ops, new LlamaModelOptions { Lora = lora, Seed = loraSeed }, weightSeed: 3, std: 0.5);

    /// <summary>A trained-looking adapter (B random) saved from the tiny model into <paramref name="dir"/>.</summary>
    private static void SaveTrained(string dir, LlamaConfig? config = null, LoraSettings? lora = null)
    {
        using var ops = new CpuOps();
        using var model = NewModel(ops, config ?? Tiny, lora ?? Settings, 1);
        RandomizeLoraB(model, 70);
        PeftAdapter.Save(dir, model, "nativepeft/tiny");
    }

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

    // ---------------------------------------------------------------- the files

    [Test]
    public void SaveWritesPeftKeysShapesDtypesAndConfig()
    {
        string dir = Sub("adapter");
        using var ops = new CpuOps();
        using var model = NewModel(ops, Tiny, Settings, 1);
        RandomizeLoraB(model, 70);
        PeftAdapter.Save(dir, model, "nativepeft/tiny");

        Assert.That(Directory.GetFiles(dir).Select(Path.GetFileName), Is.EquivalentTo(new[] { "adapter_config.json", "adapter_model.safetensors" }));
        using var file = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        Assert.That(file.Metadata, Is.EqualTo(new Dictionary<string, string> { ["format"] = "pt" }));
        // docs/formats.md: base_model.model.<module path>.lora_A.weight [r, in], .lora_B.weight [out, r]. Tiny: hidden 8,
        // q out 2·4 = 8, v out 1·4 = 4, intermediate 12.
        var expected = new Dictionary<string, long[]>();
        for (int l = 0; l < 2; l++)
        {
            string p = $"base_model.model.model.layers.{l}.";
            expected[p + "self_attn.q_proj.lora_A.weight"] = [2, 8];
            expected[p + "self_attn.q_proj.lora_B.weight"] = [8, 2];
            expected[p + "self_attn.v_proj.lora_A.weight"] = [2, 8];
            expected[p + "self_attn.v_proj.lora_B.weight"] = [4, 2];
            expected[p + "mlp.down_proj.lora_A.weight"] = [2, 12];
            expected[p + "mlp.down_proj.lora_B.weight"] = [8, 2];
        }
        Assert.That(file.Tensors.Select(t => t.Name), Is.EquivalentTo(expected.Keys));
        foreach (var t in file.Tensors)
        {
            Assert.That(t.Shape, Is.EqualTo(expected[t.Name]), t.Name);
            Assert.That(t.DType, Is.EqualTo(DType.F32), t.Name);
        }
        foreach (var (name, param, _) in model.TrainableParameters)
            Assert.That(file.ReadArray<float>(name).Select(v => (double)v), Is.EqualTo(Get(ops, param)), name + ": the model's values");

        string text = File.ReadAllText(Path.Combine(dir, "adapter_config.json"));
        using var doc = JsonDocument.Parse(text);
        var root = doc.RootElement;
        Assert.That(root.GetProperty("peft_type").GetString(), Is.EqualTo("LORA"));
        Assert.That(root.GetProperty("task_type").GetString(), Is.EqualTo("CAUSAL_LM"));
        Assert.That(root.GetProperty("base_model_name_or_path").GetString(), Is.EqualTo("nativepeft/tiny"));
        Assert.That(root.GetProperty("r").GetInt32(), Is.EqualTo(2));
        Assert.That(root.GetProperty("lora_alpha").GetRawText(), Is.EqualTo("16"), "an integer, as PEFT writes lora_alpha");
        Assert.That(root.GetProperty("lora_dropout").GetDouble(), Is.EqualTo(0.05));
        Assert.That(root.GetProperty("target_modules").EnumerateArray().Select(e => e.GetString()), Is.EqualTo(new[] { "down_proj", "q_proj", "v_proj" }), "sorted");
        Assert.That(root.GetProperty("bias").GetString(), Is.EqualTo("none"));
        foreach (string f in new[] { "fan_in_fan_out", "use_rslora", "use_dora" })
            Assert.That(root.GetProperty(f).ValueKind, Is.EqualTo(JsonValueKind.False), f);
        Assert.That(root.GetProperty("init_lora_weights").ValueKind, Is.EqualTo(JsonValueKind.True));
        Assert.That(root.GetProperty("inference_mode").ValueKind, Is.EqualTo(JsonValueKind.True));
        foreach (string f in new[] { "modules_to_save", "revision", "layers_to_transform" })
            Assert.That(root.GetProperty(f).ValueKind, Is.EqualTo(JsonValueKind.Null), f);
        Assert.That(root.GetProperty("rank_pattern").GetRawText(), Is.EqualTo("{}"));
        Assert.That(root.GetProperty("alpha_pattern").GetRawText(), Is.EqualTo("{}"));
        Assert.That(root.GetProperty("peft_version").GetString(), Is.EqualTo("0.18.0"));
        // json.dumps(indent=2, sort_keys=True) without a trailing newline
        var keys = root.EnumerateObject().Select(p => p.Name).ToList();
        Assert.That(keys, Is.EqualTo(keys.Order(StringComparer.Ordinal)), "sort_keys");
        Assert.That(text, Does.StartWith("{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n"));
        Assert.That(text, Does.Contain("  \"target_modules\": [\n    \"down_proj\",\n    \"q_proj\",\n    \"v_proj\"\n  ],\n"));
        Assert.That(text, Does.EndWith("\n}"));
    }

    [Test]
    public void SaveLoadApplyToAFreshModelGivesIdenticalLogits()
    {
        string dir = Sub("adapter");
        using var ops = new CpuOps();
        using var trained = NewModel(ops, Tiny, Settings with { TargetModules = LoraSettings.KnownTargets }, 1);
        RandomizeLoraB(trained, 70);
        var (loss, logits) = Run(trained);
        PeftAdapter.Save(dir, trained, "base");

        var adapter = PeftAdapter.Load(dir);
        Assert.That(adapter.Config.R, Is.EqualTo(2));
        Assert.That(adapter.Config.LoraAlpha, Is.EqualTo(16));
        Assert.That(adapter.Scaling, Is.EqualTo(8));
        Assert.That(adapter.Modules, Has.Count.EqualTo(2 * 7));
        Assert.That(adapter.Source, Is.EqualTo(Path.GetFullPath(dir)));

        using var fresh = NewModel(ops, Tiny, adapter.Config.ToLoraSettings(), loraSeed: 2);
        Assert.That(Run(fresh).Loss, Is.Not.EqualTo(loss), "before ApplyTo the fresh model differs (B = 0)");
        adapter.ApplyTo(fresh);
        var (loss2, logits2) = Run(fresh);
        Assert.That(loss2, Is.EqualTo(loss), "same base, same adapter: bit-identical loss on the CPU");
        Assert.That(logits2, Is.EqualTo(logits));
        foreach (var ((n1, p1, _), (n2, p2, _)) in trained.TrainableParameters.Zip(fresh.TrainableParameters))
        {
            Assert.That(n2, Is.EqualTo(n1));
            Assert.That(Get(ops, p2), Is.EqualTo(Get(ops, p1)), n1);
        }

        // an F64 model takes the fp32 values widened
        using var f64 = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions { ComputeDType = DType.F64, Lora = adapter.Config.ToLoraSettings() }, 3, 0.5);
        adapter.ApplyTo(f64);
        Assert.That(Get(ops, f64.LoraLayers[3].LoraB), Is.EqualTo(Get(ops, trained.LoraLayers[3].LoraB)));
    }

    [Test]
    public void RsLoraAndFractionalAlphaRoundTrip()
    {
        string dir = Sub("rs");
        var lora = new LoraSettings { Rank = 3, Alpha = 2.5, UseRsLora = true, TargetModules = ["k_proj"] };
        SaveTrained(dir, lora: lora);
        string text = File.ReadAllText(Path.Combine(dir, "adapter_config.json"));
        Assert.That(text, Does.Contain("\"lora_alpha\": 2.5,"));
        Assert.That(text, Does.EndWith("\"use_rslora\": true\n}"));
        Assert.That(text, Does.Contain("\"lora_dropout\": 0.0,"));
        var adapter = PeftAdapter.Load(dir);
        Assert.That(adapter.Scaling, Is.EqualTo(2.5 / Math.Sqrt(3)));
        Assert.That(adapter.Config.ToLoraSettings().Scaling, Is.EqualTo(lora.Scaling));
    }

    // ---------------------------------------------------------------- mismatches

    [Test]
    public void AnAdapterForAnotherBaseFailsNamingTheKeyAndBothShapes()
    {
        string dir = Sub("adapter");
        SaveTrained(dir);
        var adapter = PeftAdapter.Load(dir);
        using var ops = new CpuOps();

        using var wider = NewModel(ops, Tiny with { IntermediateSize = 16 }, adapter.Config.ToLoraSettings(), 2);
        var before = Get(ops, wider.LoraLayers[0].LoraA);
        var e = Assert.Throws<PeftAdapterException>(() => adapter.ApplyTo(wider))!;
        Assert.That(e.Message, Does.Contain("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: the adapter has [2, 12], the model expects [2, 16]"));
        Assert.That(e.Message, Does.Contain("another base model"));
        Assert.That(Get(ops, wider.LoraLayers[0].LoraA), Is.EqualTo(before), "nothing uploaded on a mismatch");

        using var deeper = NewModel(ops, Tiny with { NumHiddenLayers = 3 }, adapter.Config.ToLoraSettings(), 2);
        e = Assert.Throws<PeftAdapterException>(() => adapter.ApplyTo(deeper))!;
        Assert.That(e.Message, Does.Contain("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight: the model has it, the adapter does not"));

        using var otherTargets = NewModel(ops, Tiny, Settings with { TargetModules = ["q_proj", "v_proj"] }, 2);
        e = Assert.Throws<PeftAdapterException>(() => adapter.ApplyTo(otherTargets))!;
        Assert.That(e.Message, Does.Contain("target_modules: the adapter has [down_proj, q_proj, v_proj], the model [q_proj, v_proj]"));

        using var otherRank = NewModel(ops, Tiny, Settings with { Rank = 4, Alpha = 32 }, 2);
        e = Assert.Throws<PeftAdapterException>(() => adapter.ApplyTo(otherRank))!;
        Assert.That(e.Message, Does.Contain("r: the adapter has r = 2, the model r = 4"));

        using var otherAlpha = NewModel(ops, Tiny, Settings with { Alpha = 8 }, 2);
        e = Assert.Throws<PeftAdapterException>(() => adapter.ApplyTo(otherAlpha))!;
        Assert.That(e.Message, Does.Contain("lora_alpha"));

        using var noLora = LlamaModel.CreateRandom(Tiny, ops, new LlamaModelOptions());
        Assert.That(() => adapter.ApplyTo(noLora), Throws.TypeOf<PeftAdapterException>().With.Message.Contains("no LoRA layers"));
    }

    // ---------------------------------------------------------------- bad folders

    private string ValidAdapter(string name)
    {
        string dir = Sub(name);
        SaveTrained(dir);
        return dir;
    }

    private static void EditConfig(string dir, Action<JsonObject> edit)
    {
        string path = Path.Combine(dir, "adapter_config.json");
        var node = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(node);
        File.WriteAllText(path, node.ToJsonString());
    }

    private static string LoadError(string dir) => Assert.Throws<PeftAdapterException>(() => PeftAdapter.Load(dir))!.Message;

    [Test]
    public void MissingFolderOrFilesAreNamed()
    {
        Assert.That(LoadError(Sub("nowhere")), Does.Contain("adapter folder does not exist"));
        string dir = ValidAdapter("a");
        File.Delete(Path.Combine(dir, "adapter_model.safetensors"));
        File.WriteAllText(Path.Combine(dir, "adapter_model.bin"), "pickle");
        Assert.That(LoadError(dir), Does.Contain("no adapter_model.safetensors").And.Contain("adapter_model.bin"));
        File.Delete(Path.Combine(dir, "adapter_config.json"));
        Assert.That(LoadError(dir), Does.Contain("no adapter_config.json"));
    }

    [Test]
    public void MalformedOrUnsupportedConfigsFailNamingTheField()
    {
        string dir = ValidAdapter("a");
        string path = Path.Combine(dir, "adapter_config.json");
        string good = File.ReadAllText(path);

        File.WriteAllText(path, "{\"peft_type\": \"LORA\", ");
        Assert.That(LoadError(dir), Does.Contain("adapter_config.json: invalid JSON"));
        File.WriteAllText(path, "[1, 2]");
        Assert.That(LoadError(dir), Does.Contain("must be a JSON object"));

        void Case(Action<JsonObject> edit, params string[] expected)
        {
            File.WriteAllText(path, good);
            EditConfig(dir, edit);
            string message = LoadError(dir);
            Assert.That(message, Does.Contain(dir), "the message names the adapter");
            foreach (string s in expected) Assert.That(message, Does.Contain(s));
        }
        Case(c => c["use_dora"] = true, "use_dora: true (DoRA, weight-decomposed LoRA) is not supported");
        Case(c => c["peft_type"] = "PREFIX_TUNING", "peft_type: \"PREFIX_TUNING\" is not a LoRA adapter");
        Case(c => c.Remove("peft_type"), "peft_type: missing");
        Case(c => c["r"] = "eight", "r: expected a positive integer, got \"eight\"");
        Case(c => c["r"] = 0, "r: expected a positive integer, got 0");
        Case(c => c["lora_dropout"] = 1.5, "lora_dropout: 1.5 is not in [0, 1)");
        Case(c => c["rank_pattern"] = new JsonObject { ["q_proj"] = 4 }, "rank_pattern: a non-empty rank_pattern", "not supported");
        Case(c => c["alpha_pattern"] = new JsonObject { ["q_proj"] = 4 }, "alpha_pattern: a non-empty alpha_pattern", "not supported");
        Case(c => c["bias"] = "all", "bias: \"all\"", "not supported");
        Case(c => c["target_modules"] = ".*proj", "target_modules: the regular expression", "not supported");
        Case(c => c["target_modules"] = new JsonArray("q_proj", "lm_head"), "target_modules: \"lm_head\" is not a Llama projection");
        Case(c => c["modules_to_save"] = new JsonArray("lm_head"), "modules_to_save", "not supported");
        Case(c => c["layers_to_transform"] = new JsonArray(0), "layers_to_transform", "not supported");
        Case(c => c["init_lora_weights"] = "pissa", "init_lora_weights: \"pissa\"", "change the base weights");
        // several problems are reported at once
        Case(c => { c["use_dora"] = true; c["fan_in_fan_out"] = true; }, "2 problems", "use_dora", "fan_in_fan_out");
        // r in the config disagrees with the tensors
        Case(c => c["r"] = 4, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: shape [2, 8] has r = 2, but adapter_config.json says r = 4");
        // targets in the config disagree with the tensors
        Case(c => c["target_modules"] = new JsonArray("q_proj", "v_proj"),
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: down_proj is not in adapter_config.json's target_modules");
    }

    [Test]
    public void PeftDefaultsFillMissingFieldsAndUnknownFieldsAreIgnored()
    {
        var config = PeftLoraConfig.Parse("{\"peft_type\": \"LORA\", \"some_future_option\": 3, \"lora_bias\": false, \"layer_replication\": null}", "cfg");
        Assert.That(config.R, Is.EqualTo(8));
        Assert.That(config.LoraAlpha, Is.EqualTo(8));
        Assert.That(config.LoraDropout, Is.EqualTo(0));
        Assert.That(config.TargetModules, Is.EqualTo(new[] { "q_proj", "v_proj" }), "PEFT's Llama default");
        Assert.That(config.Bias, Is.EqualTo("none"));
        Assert.That(config.UseRslora, Is.False);
        Assert.That(config.InferenceMode, Is.False);
        Assert.That(config.TaskType, Is.Null);
        Assert.That(config.PeftVersion, Is.Null);
        Assert.That(config.UnknownFields, Is.EqualTo(new[] { "some_future_option" }));
        Assert.That(PeftLoraConfig.Parse("{\"peft_type\": \"LORA\", \"target_modules\": \"all-linear\"}", "c").TargetModules, Has.Count.EqualTo(7));
        Assert.That(PeftLoraConfig.Parse("{\"peft_type\": \"LORA\", \"target_modules\": [\"self_attn.o_proj\"]}", "c").TargetModules, Is.EqualTo(new[] { "o_proj" }));
    }

    /// <summary>adapter_config.json as PEFT 0.13 writes it for a Llama (fields from its LoraConfig.to_dict()).</summary>
    [Test]
    public void AConfigAsPeftWritesItParses()
    {
        const string peftJson = """
        {
          "alpha_pattern": {},
          "auto_mapping": null,
          "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
          "bias": "none",
          "fan_in_fan_out": false,
          "inference_mode": true,
          "init_lora_weights": true,
          "layer_replication": null,
          "layers_pattern": null,
          "layers_to_transform": null,
          "loftq_config": {},
          "lora_alpha": 32,
          "lora_dropout": 0.05,
          "megatron_config": null,
          "megatron_core": "megatron.core",
          "modules_to_save": null,
          "peft_type": "LORA",
          "r": 16,
          "rank_pattern": {},
          "revision": null,
          "target_modules": [
            "v_proj",
            "o_proj",
            "k_proj",
            "up_proj",
            "q_proj",
            "gate_proj",
            "down_proj"
          ],
          "task_type": "CAUSAL_LM",
          "use_dora": false,
          "use_rslora": false
        }
        """;
        var c = PeftLoraConfig.Parse(peftJson, "peft");
        Assert.That(c.R, Is.EqualTo(16));
        Assert.That(c.LoraAlpha, Is.EqualTo(32));
        Assert.That(c.Scaling, Is.EqualTo(2));
        Assert.That(c.TargetModules, Is.EqualTo(LoraSettings.KnownTargets.Order(StringComparer.Ordinal)));
        Assert.That(c.UnknownFields, Is.Empty);
        Assert.That(c.BaseModelNameOrPath, Is.EqualTo("meta-llama/Llama-3.1-8B"));
    }

    [Test]
    public void BadTensorFilesFailNamingTheKey()
    {
        string dir = ValidAdapter("a");
        string weights = Path.Combine(dir, "adapter_model.safetensors");
        List<SafetensorsTensor> Tensors()
        {
            using var f = SafetensorsFile.Open(weights);
            return f.Tensors.Select(t => new SafetensorsTensor(t.Name, t.DType, t.Shape, f.GetBytes(t.Name).ToArray())).ToList();
        }
        var good = Tensors();
        void Case(Func<List<SafetensorsTensor>, IEnumerable<SafetensorsTensor>> edit, string expected)
        {
            SafetensorsWriter.Write(weights, edit(good).ToList());
            Assert.That(LoadError(dir), Does.Contain(expected));
        }
        const string qa = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        const string qb = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
        Case(g => g.Append(SafetensorsTensor.From("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", [8], new float[8])),
            "lora_magnitude_vector: unexpected key (DoRA's magnitude: DoRA is not supported)");
        Case(g => g.Append(SafetensorsTensor.From("base_model.model.lm_head.lora_A.weight", [2, 8], new float[16])),
            "base_model.model.lm_head.lora_A.weight: unexpected key (LoRA on a module other than");
        Case(g => g.Where(t => t.Name != qb), qb + ": missing (the file has lora_A)");
        Case(g => g.Select(t => t.Name == qb ? SafetensorsTensor.From(qb, [8, 3], new float[24]) : t),
            qb + ": shape [8, 3] does not match lora_A [2, 8]");
        Case(g => g.Select(t => t.Name == qa ? SafetensorsTensor.From(qa, [16], new float[16]) : t), qa + ": shape [16] is not a matrix");
        Case(g => g.Select(t => t.Name == qa ? SafetensorsTensor.From(qa, [2, 8], new int[16]) : t), qa + ": dtype I32, expected F32, BF16 or F16");
        Case(g => g.Where(t => !t.Name.Contains("layers.1.mlp.down_proj")),
            "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight: missing (target_modules has down_proj)");
        File.WriteAllText(weights, "not a safetensors file");
        Assert.That(LoadError(dir), Does.Contain("adapter_model.safetensors"));
    }

    /// <summary>PEFT saves in the adapter's dtype: a BF16 file loads widened exactly.</summary>
    [Test]
    public void Bf16AdapterFilesWidenExactly()
    {
        string dir = ValidAdapter("a");
        string weights = Path.Combine(dir, "adapter_model.safetensors");
        Dictionary<string, float[]> f32;
        List<SafetensorsTensor> bf16;
        using (var f = SafetensorsFile.Open(weights))
        {
            f32 = f.Tensors.ToDictionary(t => t.Name, t => f.ReadArray<float>(t.Name));
            bf16 = f.Tensors.Select(t => SafetensorsTensor.From(t.Name, t.Shape, f32[t.Name].Select(BFloat16.FromSingle).ToArray())).ToList();
        }
        SafetensorsWriter.Write(weights, bf16);
        var adapter = PeftAdapter.Load(dir);
        foreach (var m in adapter.Modules)
        {
            Assert.That(m.A, Is.EqualTo(f32[m.KeyA].Select(v => BFloat16.FromSingle(v).ToSingle())), m.KeyA);
            Assert.That(m.B, Is.EqualTo(f32[m.KeyB].Select(v => BFloat16.FromSingle(v).ToSingle())), m.KeyB);
        }
    }

    // ---------------------------------------------------------------- atomic save

    [Test]
    public void SaveIsAllOrNothing()
    {
        using var ops = new CpuOps();
        using var model = NewModel(ops, Tiny, Settings, 1);
        var adapter = PeftAdapter.FromModel(model, null);

        string dir = Sub("out");
        var e = Assert.Throws<PeftAdapterException>(() => adapter.Save(dir, temp =>
        {
            Assert.That(File.Exists(Path.Combine(temp, "adapter_config.json")), "the config is written first, into the temporary folder");
            throw new IOException("disk full (injected)");
        }))!;
        Assert.That(e.Message, Does.Contain("write failed: disk full"));
        Assert.That(Directory.Exists(dir), Is.False, "a failed save leaves no folder");
        Assert.That(Directory.EnumerateFileSystemEntries(_root), Is.Empty, "and no temporary folder");

        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "keep.txt"), "x");
        Assert.That(() => adapter.Save(dir), Throws.TypeOf<PeftAdapterException>().With.Message.Contains("not empty; refusing to overwrite"));
        Assert.That(Directory.GetFiles(dir).Select(Path.GetFileName), Is.EqualTo(new[] { "keep.txt" }));

        string empty = Sub("empty");
        Directory.CreateDirectory(empty);
        adapter.Save(empty);
        Assert.That(Directory.GetFiles(empty), Has.Length.EqualTo(2), "an existing empty folder is fine");

        string nested = Path.Combine(_root, "x", "y", "adapter");
        adapter.Save(nested);
        Assert.That(PeftAdapter.Load(nested).Modules, Has.Count.EqualTo(adapter.Modules.Count));
        Assert.That(Directory.EnumerateFileSystemEntries(Path.Combine(_root, "x", "y")).Select(Path.GetFileName), Is.EqualTo(new[] { "adapter" }));
    }

    [Test]
    public void KeysParseIntoLayerModuleAndMatrix()
    {
        Assert.That(PeftAdapter.TryParseKey("base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight", out int l, out string t, out char m));
        Assert.That((l, t, m), Is.EqualTo((12, "gate_proj", 'B')));
        Assert.That(PeftAdapter.TryParseKey("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", out _, out _, out _), Is.False, "q_proj is under self_attn");
        Assert.That(PeftAdapter.TryParseKey("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", out _, out _, out _), Is.False);
        Assert.That(PeftAdapter.TryParseKey("model.layers.0.self_attn.q_proj.lora_A.weight", out _, out _, out _), Is.False);
        Assert.That(PeftAdapter.TryParseKey("base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight", out _, out _, out _), Is.False);
    }
}
