using NativePeft.IO;
using NativePeft.Numerics;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

public class LlamaConfigTests
{
    /// <summary>meta-llama/Llama-3.1-8B config.json as Hugging Face publishes it.</summary>
    internal const string Llama31_8B = """
        {
          "architectures": [
            "LlamaForCausalLM"
          ],
          "attention_bias": false,
          "attention_dropout": 0.0,
          "bos_token_id": 128000,
          "eos_token_id": 128001,
          "hidden_act": "silu",
          "hidden_size": 4096,
          "initializer_range": 0.02,
          "intermediate_size": 14336,
          "max_position_embeddings": 131072,
          "mlp_bias": false,
          "model_type": "llama",
          "num_attention_heads": 32,
          "num_hidden_layers": 32,
          "num_key_value_heads": 8,
          "pretraining_tp": 1,
          "rms_norm_eps": 1e-05,
          "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3"
          },
          "rope_theta": 500000.0,
          "tie_word_embeddings": false,
          "torch_dtype": "bfloat16",
          "transformers_version": "4.43.0.dev0",
          "use_cache": true,
          "vocab_size": 128256
        }
        """;

    /// <summary>meta-llama/Llama-2-7b-hf config.json (no head_dim, no attention_bias, rope_scaling null).</summary>
    internal const string Llama2_7B = """
        {
          "_name_or_path": "meta-llama/Llama-2-7b-hf",
          "architectures": [
            "LlamaForCausalLM"
          ],
          "bos_token_id": 1,
          "eos_token_id": 2,
          "hidden_act": "silu",
          "hidden_size": 4096,
          "initializer_range": 0.02,
          "intermediate_size": 11008,
          "max_position_embeddings": 4096,
          "model_type": "llama",
          "num_attention_heads": 32,
          "num_hidden_layers": 32,
          "num_key_value_heads": 32,
          "pretraining_tp": 1,
          "rms_norm_eps": 1e-05,
          "rope_scaling": null,
          "tie_word_embeddings": false,
          "torch_dtype": "float16",
          "transformers_version": "4.31.0.dev0",
          "use_cache": true,
          "vocab_size": 32000
        }
        """;

    [Test]
    public void Llama31_8BConfigParses()
    {
        LlamaConfig c = LlamaConfig.Parse(Llama31_8B, "llama31.json");
        Assert.Multiple(() =>
        {
            Assert.That(c.HiddenSize, Is.EqualTo(4096));
            Assert.That(c.IntermediateSize, Is.EqualTo(14336));
            Assert.That(c.NumHiddenLayers, Is.EqualTo(32));
            Assert.That(c.NumAttentionHeads, Is.EqualTo(32));
            Assert.That(c.NumKeyValueHeads, Is.EqualTo(8));
            Assert.That(c.HeadDim, Is.EqualTo(128), "default hidden / heads");
            Assert.That(c.VocabSize, Is.EqualTo(128256));
            Assert.That(c.MaxPositionEmbeddings, Is.EqualTo(131072));
            Assert.That(c.RmsNormEps, Is.EqualTo(1e-5));
            Assert.That(c.RopeTheta, Is.EqualTo(500000.0));
            Assert.That(c.RopeScaling, Is.EqualTo(new Llama3RopeScaling(8.0, 1.0, 4.0, 8192)));
            Assert.That(c.TieWordEmbeddings, Is.False);
            Assert.That(c.TorchDtype, Is.EqualTo(DType.BF16));
            Assert.That(c.BosTokenId, Is.EqualTo(128000));
            Assert.That(c.EosTokenIds, Is.EqualTo(new[] { 128001 }));
            Assert.That(c.KeyValueDim, Is.EqualTo(1024));
        });
        Assert.That(c, Is.EqualTo(LlamaConfig.Preset("llama3.1-8b")));
    }

    [Test]
    public void Llama2_7BConfigParses()
    {
        LlamaConfig c = LlamaConfig.Parse(Llama2_7B, "llama2.json");
        Assert.Multiple(() =>
        {
            Assert.That(c.IntermediateSize, Is.EqualTo(11008));
            Assert.That(c.NumKeyValueHeads, Is.EqualTo(32));
            Assert.That(c.HeadDim, Is.EqualTo(128));
            Assert.That(c.VocabSize, Is.EqualTo(32000));
            Assert.That(c.RopeTheta, Is.EqualTo(10000.0), "transformers' default when rope_theta is absent");
            Assert.That(c.RopeScaling, Is.Null);
            Assert.That(c.AttentionBias, Is.False);
            Assert.That(c.TorchDtype, Is.EqualTo(DType.F16));
            Assert.That(c.EosTokenIds, Is.EqualTo(new[] { 2 }));
        });
        Assert.That(c, Is.EqualTo(LlamaConfig.Preset("llama2-7b")));
    }

    [Test]
    public void DefaultsWhenOptionalFieldsAreAbsent()
    {
        LlamaConfig c = LlamaConfig.Parse(
            """{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}""", "min");
        Assert.Multiple(() =>
        {
            Assert.That(c.NumKeyValueHeads, Is.EqualTo(4));
            Assert.That(c.HeadDim, Is.EqualTo(16));
            Assert.That(c.RmsNormEps, Is.EqualTo(1e-6));
            Assert.That(c.RopeTheta, Is.EqualTo(10000.0));
            Assert.That(c.MaxPositionEmbeddings, Is.EqualTo(2048));
            Assert.That(c.HiddenAct, Is.EqualTo("silu"));
            Assert.That(c.TorchDtype, Is.Null);
            Assert.That(c.EosTokenIds, Is.Null);
        });
    }

    [Test]
    public void NewerRopeParametersFormAndDtypeField()
    {
        // transformers ≥ 5: rope_theta and the scaling live in rope_parameters; "dtype" replaces torch_dtype.
        string json = Llama31_8B
            .Replace("\"rope_theta\": 500000.0,", "")
            .Replace("\"torch_dtype\"", "\"dtype\"")
            .Replace("\"rope_scaling\": {", "\"rope_parameters\": {\n \"rope_theta\": 500000.0,");
        Assert.That(json, Does.Not.Contain("rope_scaling"));
        LlamaConfig c = LlamaConfig.Parse(json, "v5.json");
        Assert.That(c, Is.EqualTo(LlamaConfig.Preset("llama3.1-8b")));

        LlamaConfig plain = LlamaConfig.Parse(Llama2_7B.Replace("\"rope_scaling\": null,",
            "\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 20000.0},"), "v5-default.json");
        Assert.That(plain.RopeScaling, Is.Null);
        Assert.That(plain.RopeTheta, Is.EqualTo(20000.0));
    }

    [Test]
    public void RopeTypeDefaultMeansNoScalingAndOldTypeKeyIsRead()
    {
        LlamaConfig c = LlamaConfig.Parse(Llama2_7B.Replace("\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"default\"}"), "x");
        Assert.That(c.RopeScaling, Is.Null);
        var ex = Assert.Throws<LlamaConfigException>(() =>
            LlamaConfig.Parse(Llama2_7B.Replace("\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}"), "old.json"));
        Assert.That(ex!.Field, Is.EqualTo("rope_scaling.type"));
        Assert.That(ex.Message, Does.Contain("old.json").And.Contain("\"linear\""));
    }

    [Test]
    public void PresetParameterCountsMatchPublishedCounts()
    {
        Assert.That(LlamaConfig.Preset("llama3-8b").ParameterCount(), Is.EqualTo(8_030_261_248L));
        Assert.That(LlamaConfig.Preset("llama3.1-8b").ParameterCount(), Is.EqualTo(8_030_261_248L));
        Assert.That(LlamaConfig.Preset("llama2-7b").ParameterCount(), Is.EqualTo(6_738_415_616L));
        Assert.That(LlamaConfig.Preset("llama3-70b").ParameterCount(), Is.EqualTo(70_553_706_496L));
        Assert.That(LlamaConfig.Preset("llama3.1-70b").ParameterCount(), Is.EqualTo(70_553_706_496L));
        // Tying drops lm_head: vocab × hidden fewer.
        Assert.That((LlamaConfig.Preset("llama3-8b") with { TieWordEmbeddings = true }).ParameterCount(),
            Is.EqualTo(8_030_261_248L - 128256L * 4096));
        var ex = Assert.Throws<ArgumentException>(() => LlamaConfig.Preset("llama9"));
        Assert.That(ex!.Message, Does.Contain("llama9").And.Contain("llama3-8b"));
    }

    [Test]
    public void ExpectedTensorsFollowHfNamesAndGqaShapes()
    {
        LlamaConfig c = LlamaConfig.Preset("llama3-8b");
        var tensors = c.ExpectedTensors().ToDictionary(t => t.Name, t => t.Shape);
        Assert.That(tensors, Has.Count.EqualTo(3 + 9 * 32));
        Assert.Multiple(() =>
        {
            Assert.That(tensors["model.embed_tokens.weight"], Is.EqualTo(new long[] { 128256, 4096 }));
            Assert.That(tensors["model.layers.31.self_attn.q_proj.weight"], Is.EqualTo(new long[] { 4096, 4096 }));
            Assert.That(tensors["model.layers.0.self_attn.k_proj.weight"], Is.EqualTo(new long[] { 1024, 4096 }));
            Assert.That(tensors["model.layers.0.self_attn.v_proj.weight"], Is.EqualTo(new long[] { 1024, 4096 }));
            Assert.That(tensors["model.layers.0.self_attn.o_proj.weight"], Is.EqualTo(new long[] { 4096, 4096 }));
            Assert.That(tensors["model.layers.0.mlp.gate_proj.weight"], Is.EqualTo(new long[] { 14336, 4096 }));
            Assert.That(tensors["model.layers.0.mlp.down_proj.weight"], Is.EqualTo(new long[] { 4096, 14336 }));
            Assert.That(tensors["model.layers.5.input_layernorm.weight"], Is.EqualTo(new long[] { 4096 }));
            Assert.That(tensors["model.layers.5.post_attention_layernorm.weight"], Is.EqualTo(new long[] { 4096 }));
            Assert.That(tensors["model.norm.weight"], Is.EqualTo(new long[] { 4096 }));
            Assert.That(tensors["lm_head.weight"], Is.EqualTo(new long[] { 128256, 4096 }));
        });
        Assert.That((c with { TieWordEmbeddings = true }).ExpectedTensors().Select(t => t.Name), Does.Not.Contain("lm_head.weight"));
    }

    [Test]
    public void ExplicitHeadDimMayDifferFromHiddenOverHeads()
    {
        string json = """{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 100}""";
        LlamaConfig c = LlamaConfig.Parse(json, "hd");
        var t = c.ExpectedTensors().ToDictionary(x => x.Name, x => x.Shape);
        Assert.That(t["model.layers.0.self_attn.q_proj.weight"], Is.EqualTo(new long[] { 128, 64 }));
        Assert.That(t["model.layers.0.self_attn.k_proj.weight"], Is.EqualTo(new long[] { 64, 64 }));
        Assert.That(t["model.layers.0.self_attn.o_proj.weight"], Is.EqualTo(new long[] { 64, 128 }));
    }

    [Test]
    public void ToJsonRoundTripsAndUsesHfFieldNames()
    {
        foreach (string name in LlamaConfig.PresetNames)
        {
            LlamaConfig p = LlamaConfig.Preset(name);
            string json = p.ToJson();
            Assert.That(LlamaConfig.Parse(json, name), Is.EqualTo(p), name);
        }
        string j = LlamaConfig.Preset("llama3.1-8b").ToJson();
        Assert.That(j, Does.StartWith("{\n  \"architectures\": [\n    \"LlamaForCausalLM\"\n  ],\n"));
        Assert.That(j, Does.Contain("\n  \"rms_norm_eps\": 1e-05,\n"));
        Assert.That(j, Does.Contain("\n  \"rope_theta\": 500000.0,\n"));
        Assert.That(j, Does.Contain("\"rope_type\": \"llama3\""));
        Assert.That(j, Does.Contain("\n  \"torch_dtype\": \"bfloat16\",\n"));
        Assert.That(j, Does.EndWith("\"vocab_size\": 128256\n}\n"));
        var multiEos = LlamaConfig.Preset("llama3-8b") with { EosTokenIds = [128001, 128008, 128009] };
        Assert.That(LlamaConfig.Parse(multiEos.ToJson(), "eos").EosTokenIds, Is.EqualTo(new[] { 128001, 128008, 128009 }));
    }

    private static LlamaConfigException Bad(string json, string source = "bad.json") =>
        Assert.Throws<LlamaConfigException>(() => LlamaConfig.Parse(json, source))!;

    [Test]
    public void AnIntegerBeyondInt32IsOutOfRangeNotANonInteger()
    {
        var e = Bad(Llama2_7B.Replace("\"vocab_size\": 32000", "\"vocab_size\": 1099511627776"));
        Assert.That(e.Message, Does.Contain("vocab_size").And.Contain("1099511627776 is out of range").And.Not.Contain("must be an integer, got"));
        Assert.That(Bad(Llama2_7B.Replace("\"vocab_size\": 32000", "\"vocab_size\": 32000.5")).Message, Does.Contain("must be an integer, got 32000.5"));
    }

    [Test]
    public void UnsupportedModelTypeActivationRopeAndBiasAreRejectedByName()
    {
        var cases = new (string Json, string Field, string Mention)[]
        {
            (Llama2_7B.Replace("\"model_type\": \"llama\"", "\"model_type\": \"mistral\""), "model_type", "\"mistral\""),
            (Llama2_7B.Replace("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""), "hidden_act", "\"gelu\""),
            (Llama31_8B.Replace("\"rope_type\": \"llama3\"", "\"rope_type\": \"yarn\""), "rope_scaling.rope_type", "\"yarn\""),
            (Llama31_8B.Replace("\"attention_bias\": false", "\"attention_bias\": true"), "attention_bias", "not supported"),
            (Llama31_8B.Replace("\"mlp_bias\": false", "\"mlp_bias\": true"), "mlp_bias", "not supported"),
            (Llama2_7B.Replace("\"model_type\": \"llama\",", ""), "model_type", "missing"),
            (Llama31_8B.Replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"), "num_key_value_heads", "does not divide"),
            (Llama2_7B.Replace("\"num_attention_heads\": 32", "\"num_attention_heads\": 30").Replace("\"num_key_value_heads\": 32", "\"num_key_value_heads\": 30"),
                "num_attention_heads", "does not divide hidden_size"),
            (Llama2_7B.Replace("\"hidden_size\": 4096,", ""), "hidden_size", "missing"),
            (Llama2_7B.Replace("\"vocab_size\": 32000", "\"vocab_size\": 0"), "vocab_size", "must be positive"),
            (Llama2_7B.Replace("\"intermediate_size\": 11008", "\"intermediate_size\": \"big\""), "intermediate_size", "integer"),
            (Llama2_7B.Replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": -1"), "rms_norm_eps", "positive"),
            (Llama2_7B.Replace("\"torch_dtype\": \"float16\"", "\"torch_dtype\": \"int8\""), "torch_dtype", "\"int8\""),
            (Llama31_8B.Replace("\"low_freq_factor\": 1.0,", ""), "rope_scaling.low_freq_factor", "missing"),
            (Llama31_8B.Replace("\"eos_token_id\": 128001", "\"eos_token_id\": 999999"), "eos_token_id", "vocabulary"),
        };
        foreach (var (json, field, mention) in cases)
        {
            var ex = Bad(json);
            Assert.That(ex.Field, Is.EqualTo(field), ex.Message);
            Assert.That(ex.Message, Does.StartWith("bad.json: " + field + ": ").And.Contain(mention));
        }
    }

    [Test]
    public void InvalidJsonAndMissingFileNameTheSource()
    {
        var ex = Bad("{\"model_type\": \"llama\",", "cfg.json");
        Assert.That(ex.Message, Does.StartWith("cfg.json: invalid JSON"));
        Assert.That(Bad("[1, 2]", "arr.json").Message, Does.Contain("must be a JSON object"));
        string missing = Path.Combine(Path.GetTempPath(), "np-no-such-" + Guid.NewGuid().ToString("N"), "config.json");
        var ex2 = Assert.Throws<LlamaConfigException>(() => LlamaConfig.Load(missing));
        Assert.That(ex2!.Message, Does.Contain(missing).And.Contain("file not found"));
    }

    [Test]
    public void SaveAndLoadRoundTrip()
    {
        string dir = Path.Combine(Path.GetTempPath(), "np-cfg-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            string path = Path.Combine(dir, "config.json");
            LlamaConfig.Preset("llama3-70b").Save(path);
            Assert.That(LlamaConfig.Load(path), Is.EqualTo(LlamaConfig.Preset("llama3-70b")));
            Assert.That(Directory.GetFiles(dir), Has.Length.EqualTo(1), "no temporary file left");
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
