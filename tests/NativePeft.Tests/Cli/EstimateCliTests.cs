using System.Text.Json;
using NativePeft.IO;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft estimate` end to end, run as a process: the published figures (the ranges and their reasons are in
/// Planning/PublishedFiguresTests), a config.json path, and bad input (one message, non-zero exit).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class EstimateCliTests
{
    private const double GB = 1e9, GiB = 1L << 30;

    private static JsonElement Json(params string[] args)
    {
        var r = CliProcess.Run(["estimate", .. args, "--json"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        return doc.RootElement.Clone();
    }

    private static readonly string[] Published = ["--rank", "16", "--seq", "2048", "--batch", "1", "--recompute"];

    [Test]
    public void Llama3_8B_LoraAbout16AndQloraAbout6()
    {
        var lora = Json(["--model", "llama3-8b", "--method", "lora", .. Published]);
        var qlora = Json(["--model", "llama3-8b", "--method", "qlora", .. Published]);
        Assert.That(lora.GetProperty("total_bytes").GetInt64() / GiB, Is.InRange(15, 18));
        Assert.That(qlora.GetProperty("total_bytes").GetInt64() / GiB, Is.InRange(6, 7.5));
        Assert.That(lora.GetProperty("trainable_parameters").GetInt64(), Is.EqualTo(41_943_040), "r=16 on all seven projections of 32 layers");
    }

    [Test]
    public void Llama3_8B_QloraCategoriesEqualTheArithmetic()
    {
        // Every weight-side category of Llama-3-8B QLoRA r=16 (all 7 projections, adamw, the embedding on the host) by
        // hand from the published shapes (hidden 4096, intermediate 14336, 32 layers, 8 kv heads of 128, vocab 128256):
        // per layer the projections hold q 4096², k and v 1024·4096, o 4096², gate/up/down 14336·4096 = 218,103,808
        // weights; 32 layers: 6,979,321,856.
        var q = Json(["--model", "llama3-8b", "--method", "qlora", "--dropout", "0", .. Published]);
        const long linear = 6_979_321_856, blocks = linear / 64, tensors = 32 * 7;
        long packed = linear / 2;                                        // NF4: two weights a byte
        long lmHead = 128256L * 4096 * 2, norms = (2 * 32 + 1) * 4096L * 2; // bf16; embed_tokens is on the host
        long quantState = blocks                                          // one 8-bit absmax code per block of 64
                          + blocks / 256 * 4                              // the fp32 nested absmax per 256 blocks
                          + tensors * (256 * 4 + 4);                      // each tensor's 256-entry map and offset
        long adapterParams = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336));
        Assert.Multiple(() =>
        {
            Assert.That(q.GetProperty("base_weights_bytes").GetInt64(), Is.EqualTo(packed + lmHead + norms));
            Assert.That(q.GetProperty("quantization_state_bytes").GetInt64(), Is.EqualTo(quantState));
            Assert.That(q.GetProperty("trainable_parameters").GetInt64(), Is.EqualTo(adapterParams).And.EqualTo(41_943_040));
            Assert.That(q.GetProperty("adapters_bytes").GetInt64(), Is.EqualTo(4 * adapterParams), "fp32 adapters");
            Assert.That(q.GetProperty("gradients_bytes").GetInt64(), Is.EqualTo(4 * adapterParams));
            Assert.That(q.GetProperty("optimizer_states_bytes").GetInt64(), Is.EqualTo(8 * adapterParams), "AdamW m and v in fp32");
            Assert.That(q.GetProperty("embedding_host_bytes").GetInt64(), Is.EqualTo(128256L * 4096 * 2));
            // and the total is these plus the activations and workspaces, nothing else
            Assert.That(q.GetProperty("total_bytes").GetInt64(), Is.EqualTo(packed + lmHead + norms + quantState + 16 * adapterParams
                + q.GetProperty("activations_bytes").GetInt64() + q.GetProperty("workspaces_bytes").GetInt64()));
        });
    }

    [Test]
    public void Llama3_8B_QloraWithTheEmbeddingOnTheHostAndPagedAdamWFitsSixGiB()
    {
        // The article's ~6 GB for 8B QLoRA (r=16, all linear, 1 x 2048, recompute): QLoRA's default puts embed_tokens
        // [128256, 4096] bf16 = 1,050,673,152 bytes in host memory; paged AdamW moves the large states to host memory too.
        string[] args = ["--model", "llama3-8b", "--method", "qlora", "--dropout", "0", .. Published];
        var auto = Json(args);
        var device = Json([.. args, "--embedding", "device"]);
        var paged = Json([.. args, "--optim", "paged-adamw"]);
        Assert.That(auto.GetProperty("embedding_on_host").GetBoolean(), Is.True, "auto = host for QLoRA with an untied embedding");
        Assert.That(auto.GetProperty("embedding_host_bytes").GetInt64(), Is.EqualTo(128256L * 4096 * 2));
        Assert.That(device.GetProperty("total_bytes").GetInt64() - auto.GetProperty("total_bytes").GetInt64(), Is.EqualTo(128256L * 4096 * 2));
        Assert.That(paged.GetProperty("total_bytes").GetInt64() / GiB, Is.LessThanOrEqualTo(6.0));
        Assert.That(Json(["--model", "llama3-8b", "--method", "lora", .. Published]).GetProperty("embedding_on_host").GetBoolean(), Is.False,
            "auto keeps LoRA's table on the device");

        var full = CliProcess.Run("estimate", "--model", "llama3-8b", "--method", "full", "--embedding", "host");
        Assert.That(full.ExitCode, Is.EqualTo(2), full.ToString());
        Assert.That(full.Stderr, Does.Contain("--embedding host: full fine-tuning trains the embedding table"));
    }

    [Test]
    public void Llama3_70B_BaseWeights()
    {
        var lora = Json(["--model", "llama3-70b", "--method", "lora", .. Published]);
        var qlora = Json(["--model", "llama3-70b", "--method", "qlora", .. Published]);
        Assert.That(lora.GetProperty("base_weights_bytes").GetInt64() / GB, Is.InRange(135, 145));
        Assert.That((qlora.GetProperty("base_weights_bytes").GetInt64() + qlora.GetProperty("quantization_state_bytes").GetInt64()) / GB, Is.InRange(35, 40));
    }

    [Test]
    public void Llama65B_QloraUnder48GB()
    {
        var r = CliProcess.Run(["estimate", "--model", "llama-65b", "--method", "qlora", .. Published, "--device-memory", "48GB"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("fits in"));
        Assert.That(Json(["--model", "llama-65b", "--method", "qlora", .. Published]).GetProperty("total_bytes").GetInt64() / GB, Is.LessThan(48));
    }

    [Test]
    public void TableShowsEveryCategoryAndTheJsonTotal()
    {
        string[] args = ["--model", "llama2-7b", "--method", "qlora", "--optim", "paged-adamw8bit", "--targets", "q_proj,v_proj"];
        var r = CliProcess.Run(["estimate", .. args]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        long total = Json(args).GetProperty("total_bytes").GetInt64();
        foreach (var row in new[] { "base weights", "quantization state", "adapters", "gradients", "optimizer states (device)", "optimizer states (paged", "activations", "workspaces", "total (device)" })
            Assert.That(r.Stdout, Does.Contain(row));
        Assert.That(r.Stdout, Does.Contain(total.ToString()));
    }

    [Test]
    public void TooSmallADeviceNamesTheOptionsThatFit()
    {
        var r = CliProcess.Run("estimate", "--model", "llama3-8b", "--method", "lora", "--device-memory", "16GiB");
        Assert.That(r.ExitCode, Is.EqualTo(1), "a plan that does not fit fails the check: " + r);
        Assert.That(r.Stdout, Does.Contain("exceeds the device's memory (16.00 GiB)").And.Contain("--method qlora ("));
    }

    [Test]
    public void ConfigJsonPathOrFolderEqualsThePreset()
    {
        using var dir = CliProcess.TempDir();
        LlamaConfig.Preset("llama2-7b").Save(dir["config.json"]);
        long preset = Json("--model", "llama2-7b", "--method", "full", "--compute", "f32").GetProperty("total_bytes").GetInt64();
        Assert.That(Json("--model", dir["config.json"], "--method", "full", "--compute", "f32").GetProperty("total_bytes").GetInt64(), Is.EqualTo(preset));
        Assert.That(Json("--model", dir.Path, "--method", "full", "--compute", "f32").GetProperty("total_bytes").GetInt64(), Is.EqualTo(preset));
    }

    private static void AssertFails(string expected, int? exitCode, params string[] args)
    {
        var r = CliProcess.Run(["estimate", .. args]);
        Assert.That(r.ExitCode, exitCode is { } e ? Is.EqualTo(e) : Is.Not.EqualTo(0), r.ToString());
        Assert.That(r.Stderr, Does.Contain(expected), r.ToString());
        Assert.That(r.Stdout, Does.Not.Contain("total"), "no partial table");
    }

    [Test]
    public void BadInputIsOneMessageAndANonZeroExit()
    {
        using var dir = CliProcess.TempDir();
        AssertFails("unknown model \"llama9-1b\"", 1, "--model", "llama9-1b");
        AssertFails("config.json not found", 1, "--model", dir.Path);
        File.WriteAllText(dir["config.json"], "{\"model_type\": \"llama\"}");
        AssertFails("config.json", 1, "--model", dir["config.json"]);
        AssertFails("'prefix' not recognized", 2, "--model", "llama3-8b", "--method", "prefix");
        AssertFails("'sgd' not recognized", 2, "--model", "llama3-8b", "--optim", "sgd");
        AssertFails("--rank 0", 2, "--model", "llama3-8b", "--rank", "0");
        AssertFails("--batch -2", 2, "--model", "llama3-8b", "--batch", "-2");
        AssertFails("--seq", 2, "--model", "llama3-8b", "--seq", "abc");
        AssertFails("unknown module \"qproj\"", 2, "--model", "llama3-8b", "--targets", "qproj");
        AssertFails("r (LoRA rank) 5000 is larger than min(in, out) = 4096 of q_proj [4096, 4096]\n", 2, "--model", "llama3-8b", "--rank", "5000");
        AssertFails("--device-memory lots", 2, "--model", "llama3-8b", "--device-memory", "lots");
        AssertFails("--model", 2, "--method", "lora");
        AssertFails("--compute bf16 is for a GPU", 2, "--model", "llama3-8b", "--device", "cpu");
    }
}
