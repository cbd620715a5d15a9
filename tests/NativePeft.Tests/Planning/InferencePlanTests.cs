using System.Text.Json;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Planning;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.Planning;

/// <summary>
/// The <see cref="InferencePlan"/> from the config alone: Llama-3-8B NF4 generation at 8192 tokens against the figures
/// computed here by hand from the config's numbers (KV cache 1 GiB in bf16, 4-bit weights ≈ 5.7 GB), `estimate
/// --generate` printing the same plan (table and JSON), the one-line "does not fit" message naming --quantize nf4 and
/// --max-tokens, and bad estimate options.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class InferencePlanTests
{
    private static readonly LlamaConfig Llama3_8B = LlamaConfig.Preset("llama3-8b");

    /// <summary>Bytes of the 4-bit base of a config, by hand: packed codes, bitsandbytes' double-quantized absmax, and the
    /// bf16 embeddings, lm_head and norms (every tensor's size divides the blocks exactly for Llama-3-8B).</summary>
    private static long HandNf4WeightBytes(LlamaConfig c)
    {
        long C = c.HiddenSize, I = c.IntermediateSize, L = c.NumHiddenLayers, V = c.VocabSize;
        long q = C * c.NumAttentionHeads * c.HeadDim, kv = C * c.NumKeyValueHeads * c.HeadDim;
        long[] projections = [q, kv, kv, q, C * I, C * I, C * I]; // q, k, v, o, gate, up, down
        long bytes = 2 * V * C * 2 + (2 * L + 1) * C * 2;          // embed_tokens + lm_head + norms in bf16
        foreach (long n in projections)
        {
            long blocks = n / 64;
            Assert.That(n % 64, Is.Zero);
            Assert.That(blocks % 256, Is.Zero);
            // codes (2 per byte) + 1 byte absmax per block + fp32 nested absmax per 256 blocks + 256 fp32 code + fp32 offset
            bytes += L * (n / 2 + blocks + blocks / 256 * 4 + 256 * 4 + 4);
        }
        return bytes;
    }

    [Test]
    public void Llama3_8B_Nf4GenerationAt8192TokensMatchesTheHandFigures()
    {
        var plan = InferencePlan.Compute(Llama3_8B, new InferencePlanOptions
        {
            Mode = InferenceMode.Generate, PromptTokens = 1, MaxNewTokens = 8192, Quantization = BaseQuantization.Nf4, ComputeDType = DType.BF16,
        });
        Assert.That(plan.Options.MaxLength, Is.EqualTo(8192));
        // 32 layers × (K and V) × 8192 tokens × (8 kv heads × 128) × 2 bytes = 1 GiB.
        Assert.That(plan.KvCacheBytes, Is.EqualTo(32L * 2 * 8192 * 1024 * 2).And.EqualTo(1L << 30));
        long weights = plan.BaseWeightBytes + plan.QuantizationStateBytes;
        Assert.That(weights, Is.EqualTo(HandNf4WeightBytes(Llama3_8B)));
        Assert.That(weights, Is.EqualTo(5_702_525_824L), "3.49 GB of codes + 2.10 GB bf16 embeddings/lm_head + 0.11 GB absmax");
        Assert.That(weights / 1e9, Is.InRange(4.5, 5.75), "the published ≈ 4.5–5.7 GB of a 4-bit Llama-3-8B");
        Assert.That(plan.AdapterBytes + plan.AdapterGradientBytes, Is.Zero);
        // A one-token prompt: the workspace is that of 16 tokens, the RoPE tables fp32 [8192, 64] × 2.
        Assert.That(plan.RopeTableBytes, Is.EqualTo(2L * 8192 * 64 * 4));
        Assert.That(plan.TotalBytes, Is.EqualTo(plan.ParameterBytes + plan.KvCacheBytes + plan.RopeTableBytes + plan.ForwardWorkspaceBytes));
        Assert.That(plan.TotalBytes / (double)(1L << 30), Is.InRange(6.3, 6.5), "≈ 5.31 GiB of weights + 1 GiB of cache + a 64 MiB dequant scratch");
    }

    [Test]
    public void EstimateGeneratePrintsThePlan()
    {
        string[] args = ["estimate", "--model", "llama3-8b", "--generate", "--max-length", "8192", "--prompt-tokens", "1", "--method", "qlora", "--no-adapter"];
        var json = CliProcess.Run([.. args, "--json"]);
        Assert.That(json.ExitCode, Is.EqualTo(0), json.ToString());
        using var doc = JsonDocument.Parse(json.Stdout);
        var root = doc.RootElement;
        var plan = InferencePlan.Compute(Llama3_8B, new InferencePlanOptions
        {
            Mode = InferenceMode.Generate, PromptTokens = 1, MaxNewTokens = 8192, Quantization = BaseQuantization.Nf4, ComputeDType = DType.BF16,
        });
        Assert.Multiple(() =>
        {
            Assert.That(root.GetProperty("mode").GetString(), Is.EqualTo("generate"));
            Assert.That(root.GetProperty("max_length").GetInt32(), Is.EqualTo(8192));
            Assert.That(root.GetProperty("kv_cache_bytes").GetInt64(), Is.EqualTo(1L << 30));
            Assert.That(root.GetProperty("base_weights_bytes").GetInt64() + root.GetProperty("quantization_state_bytes").GetInt64(),
                Is.EqualTo(HandNf4WeightBytes(Llama3_8B)));
            Assert.That(root.GetProperty("total_bytes").GetInt64(), Is.EqualTo(plan.TotalBytes));
            long sum = 0;
            foreach (var key in new[] { "base_weights_bytes", "quantization_state_bytes", "adapters_bytes", "adapter_gradients_bytes", "kv_cache_bytes", "activations_bytes", "workspaces_bytes" })
                sum += root.GetProperty(key).GetInt64();
            Assert.That(sum, Is.EqualTo(root.GetProperty("total_bytes").GetInt64()), "the categories add up to the total");
            var aligned = plan.Aligned(256);
            Assert.That(root.GetProperty("pool_transient_bytes").GetInt64(), Is.EqualTo(aligned.KvCacheBytes + aligned.ForwardWorkspaceBytes));
        });
        var table = CliProcess.Run(args);
        Assert.That(table.ExitCode, Is.EqualTo(0), table.ToString());
        Assert.That(table.Stdout, Does.Contain("KV cache").And.Contain("1073741824").And.Contain(plan.TotalBytes.ToString()).And.Contain("no adapter"));
        // The adapter (r=16 on all seven projections, fp32) adds A, B and the gradients the model allocates with them.
        var withAdapter = CliProcess.Run(["estimate", "--model", "llama3-8b", "--generate", "--max-length", "8192", "--prompt-tokens", "1", "--method", "qlora", "--json"]);
        using var doc2 = JsonDocument.Parse(withAdapter.Stdout);
        Assert.That(doc2.RootElement.GetProperty("adapters_bytes").GetInt64(), Is.EqualTo(41_943_040L * 4), "r=16 on all seven projections of 32 layers, fp32");
    }

    [Test]
    public void TheDoesNotFitMessageNamesTheOptionsThatWouldFit()
    {
        var bf16 = InferencePlan.Compute(Llama3_8B, new InferencePlanOptions
        {
            Mode = InferenceMode.Generate, PromptTokens = 100, MaxNewTokens = 8000, ComputeDType = DType.BF16,
        });
        long device = 12L << 30;
        Assert.That(bf16.TotalBytes, Is.GreaterThan(device), "a bf16 Llama-3-8B (16 GB of weights) does not fit 12 GiB");
        string message = bf16.DoesNotFitMessage(device)!;
        Assert.That(message, Does.StartWith("exceeds the device's free memory (12.00 GiB)").And.Contain("fit: --quantize nf4 (").And.Contain("--quantize nf4 --max-tokens 4000 (")
            .And.Not.Contain(", --max-tokens 4000 ("), "halving --max-tokens alone leaves 16 GB of bf16 weights");
        Assert.That(message, Does.Not.Contain("\n"));
        var nf4 = bf16.With(o => o with { Quantization = BaseQuantization.Nf4 });
        // The NF4 plan at 8100 tokens does not fit 6.4 GiB; halving the new tokens does.
        long small = (long)(6.3 * (1L << 30));
        Assert.That(nf4.Fits(small), Is.False);
        Assert.That(nf4.DoesNotFitMessage(small), Does.Contain("--max-tokens 4000 (").And.Not.Contain("--quantize"));
        Assert.That(nf4.DoesNotFitMessage(64L << 30), Is.Null);
    }

    [Test]
    public void EstimateRejectsGenerationOptionsWithoutGenerateAndBadLengths()
    {
        var r1 = CliProcess.Run(["estimate", "--model", "llama3-8b", "--max-length", "100"]);
        Assert.That(r1.ExitCode, Is.Not.Zero);
        Assert.That(r1.Stderr, Does.Contain("--max-length is for --generate"));
        var r2 = CliProcess.Run(["estimate", "--model", "llama3-8b", "--generate", "--max-length", "100", "--prompt-tokens", "101"]);
        Assert.That(r2.ExitCode, Is.Not.Zero);
        Assert.That(r2.Stderr, Does.Contain("--prompt-tokens 101: must be in [1, --max-length 100]"));
    }

    [Test]
    public void EvalPlanIsTheTrainingForwardWithoutGradientsOrOptimizer()
    {
        // Eval allocates the training activations (backward buffers included, no recompute): the same bytes as the
        // training plan's activations, with no gradients, no optimizer state and only the cross-entropy forward's workspace.
        var eval = InferencePlan.Compute(Llama3_8B, new InferencePlanOptions { Mode = InferenceMode.Eval, Seq = 512, LoraRank = 16, BaseWeightDType = DType.BF16 });
        var train = MemoryPlan.Compute(Llama3_8B, new PlanOptions { Method = FineTuneMethod.Lora, Seq = 512, Rank = 16 });
        Assert.Multiple(() =>
        {
            Assert.That(eval.ActivationBytes, Is.EqualTo(train.ActivationBytes));
            Assert.That(eval.BaseWeightBytes, Is.EqualTo(train.BaseWeightBytes));
            Assert.That(eval.AdapterBytes, Is.EqualTo(train.AdapterBytes));
            Assert.That(eval.AdapterGradientBytes, Is.EqualTo(train.GradientBytes));
            Assert.That(eval.DequantScratchBytes, Is.EqualTo(train.DequantScratchBytes));
            Assert.That(eval.RopeTableBytes, Is.EqualTo(train.RopeTableBytes));
            // fp32 [4, 512] + the chunk logits [512, 8192] in fp32
            Assert.That(eval.TransientWorkspaceBytes, Is.EqualTo(4L * 512 * 4 + 512L * 8192 * 4));
            Assert.That(eval.KvCacheBytes, Is.Zero);
        });
    }
}
