using System.Text.Json;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Planning;
using NUnit.Framework;

namespace NativePeft.Tests.Planning;

/// <summary>The plan's arithmetic by hand on a small config, its fit check and message, its JSON and table, validation.</summary>
public class MemoryPlanTests
{
    private static readonly LlamaConfig Small = new()
    {
        HiddenSize = 16, IntermediateSize = 32, NumAttentionHeads = 2, NumKeyValueHeads = 1, HeadDim = 8,
        NumHiddenLayers = 3, VocabSize = 50, MaxPositionEmbeddings = 128,
    };

    [Test]
    public void LoraOnQAndVByHand()
    {
        // q [16,16], k [8,16], v [8,16], o [16,16], gate/up [32,16], down [16,32]; r = 2 on q and v.
        var plan = MemoryPlan.Compute(Small, new PlanOptions
        {
            Method = FineTuneMethod.Lora, Rank = 2, Targets = ["q_proj", "v_proj"], Batch = 2, Seq = 4, BaseWeightDType = DType.F32, Device = PlanDevice.Cpu,
        });
        long projections = 16 * 16 + 8 * 16 + 8 * 16 + 16 * 16 + 3 * 32 * 16;            // 2304
        long baseElements = 2 * 50 * 16 + 3 * (projections + 2 * 16) + 16;                 // embed, lm_head, layers, norm
        long adapterElements = 3 * (2 * 16 + 16 * 2 + 2 * 16 + 8 * 2);                     // A, B of q and v per layer
        Assert.Multiple(() =>
        {
            Assert.That(plan.BaseWeightBytes, Is.EqualTo(4 * baseElements));
            Assert.That(plan.AdapterBytes, Is.EqualTo(4 * adapterElements));
            Assert.That(plan.GradientBytes, Is.EqualTo(4 * adapterElements));
            Assert.That(plan.OptimizerStateBytes, Is.EqualTo(8 * adapterElements), "AdamW: m and v in fp32");
            Assert.That(plan.TrainableParameterCount, Is.EqualTo(adapterElements));
            Assert.That(plan.DequantScratchBytes, Is.Zero, "an F32 base needs no widening scratch");
            Assert.That(plan.RopeTableBytes, Is.EqualTo(2 * 64 * 4 * 4), "cos and sin [64 rows, D/2 = 4]");
            Assert.That(plan.TransientWorkspaceBytes, Is.Zero, "the CPU ops take no workspace from the pool");
            Assert.That(plan.TotalBytes, Is.EqualTo(plan.ParameterBytes + plan.ActivationBytes + plan.OptimizerStateBytes + plan.RopeTableBytes));
        });
    }

    [Test]
    public void RecomputeKeepsOneBlockAndQloraShrinksTheBase()
    {
        var o = new PlanOptions { Seq = 512 };
        var c = LlamaConfig.Preset("llama2-7b");
        var keep = MemoryPlan.Compute(c, o);
        var recompute = MemoryPlan.Compute(c, o with { Recompute = true });
        long N = 512, C = 4096, I = 11008;
        // n1, q, k, v, attention out, h, n2 (llama2-7b has no GQA: all C wide) = 7·N·C;
        // gate, up, silu·up = 3·N·I; two rstd [N]; lse [N·H]
        long block = 7 * N * C * 4 + 3 * N * I * 4 + 2 * N * 4 + N * 32 * 4;
        Assert.That(keep.ActivationBytes - recompute.ActivationBytes, Is.EqualTo(31 * block), "31 fewer blocks of saved tensors");
        var qlora = MemoryPlan.Compute(c, o with { Method = FineTuneMethod.Qlora });
        long projections = 32L * (4 * 4096 * 4096 + 3 * 4096 * 11008);
        Assert.That(qlora.BaseWeightBytes, Is.EqualTo(projections / 2 + 4L * (2 * 32000 * 4096 + 65 * 4096)), "4 bits per projection weight, fp32 rest");
        var decoded = MemoryPlan.Compute(c, o with { Method = FineTuneMethod.Qlora, DoubleQuant = false });
        Assert.That(decoded.QuantizationStateBytes, Is.EqualTo(4 * (projections / 64)), "fp32 absmax per 64 without double quantization");
        Assert.That(qlora.QuantizationStateBytes, Is.LessThan(decoded.QuantizationStateBytes / 3), "double-quantized absmax (the default)");
    }

    [Test]
    public void PagedStateLeavesTheDeviceTotalOnAGpuOnly()
    {
        var c = LlamaConfig.Preset("llama3-8b");
        var plain = MemoryPlan.Compute(c, new PlanOptions());
        var paged = MemoryPlan.Compute(c, new PlanOptions { Optimizer = "paged-adamw" });
        Assert.That(paged.PagedOptimizerStateBytes, Is.GreaterThan(0));
        Assert.That(paged.OptimizerStateBytes + paged.PagedOptimizerStateBytes, Is.EqualTo(plain.OptimizerStateBytes));
        Assert.That(paged.TotalBytes, Is.EqualTo(plain.TotalBytes - paged.PagedOptimizerStateBytes));
        var cpu = MemoryPlan.Compute(c, new PlanOptions { Optimizer = "paged-adamw", Device = PlanDevice.Cpu });
        Assert.That(cpu.PagedOptimizerStateBytes, Is.Zero);
        var eight = MemoryPlan.Compute(c, new PlanOptions { Optimizer = "adamw8bit" });
        Assert.That(eight.OptimizerStateBytes, Is.LessThan(plain.OptimizerStateBytes * 0.3), "8-bit state ≈ 2 bytes per element + absmax");
    }

    [Test]
    public void FitsAndTheMessageNamesTheAlternatives()
    {
        var c = LlamaConfig.Preset("llama3-8b");
        var plan = MemoryPlan.Compute(c, PlanOptions.Published(FineTuneMethod.Lora) with { Recompute = false, Batch = 2 });
        long device = 20L << 30;
        Assert.That(plan.Fits(plan.TotalBytes), Is.True);
        Assert.That(plan.Fits(plan.TotalBytes - 1), Is.False);
        Assert.That(plan.DoesNotFitMessage(plan.TotalBytes), Is.Null);
        string message = plan.DoesNotFitMessage(device)!;
        TestContext.Out.WriteLine(message);
        Assert.That(message, Does.StartWith("exceeds the device's memory (20.00 GiB): plan total " + MemoryPlan.FormatBytes(plan.TotalBytes) + "; options that would make it fit: "));
        var alternatives = plan.Alternatives();
        Assert.That(alternatives.Select(a => a.Flags), Does.Contain("--method qlora").And.Contain("--recompute").And.Contain("--batch 1").And.Contain("--seq 1024"));
        foreach (var (flags, alternative) in alternatives)
        {
            Assert.That(alternative.TotalBytes, Is.LessThan(plan.TotalBytes), flags);
            string entry = flags + " (" + MemoryPlan.FormatBytes(alternative.TotalBytes) + ")";
            if (alternative.Fits(device)) Assert.That(message, Does.Contain(entry));
            else Assert.That(message, Does.Not.Contain(entry));
        }
        // at batch 2 without recompute the activations (32 blocks × 4096 tokens) dominate: recompute alone fits, qlora alone does not
        Assert.That(alternatives.Single(a => a.Flags == "--recompute").Plan.Fits(device), Is.True);
        Assert.That(alternatives.Single(a => a.Flags == "--method qlora").Plan.Fits(device), Is.False);
        Assert.That(MemoryPlan.Compute(LlamaConfig.Preset("llama3-70b"), PlanOptions.Published(FineTuneMethod.Lora)).DoesNotFitMessage(device),
            Does.Contain("no option makes it fit"));
    }

    [Test]
    public void JsonHasEveryCategoryInBytesAndTheTotal()
    {
        var plan = MemoryPlan.Compute(LlamaConfig.Preset("llama2-7b"), PlanOptions.Published(FineTuneMethod.Qlora));
        using var doc = JsonDocument.Parse(plan.ToJson());
        var root = doc.RootElement;
        long sum = 0;
        foreach (var (_, key, bytes) in plan.Rows())
        {
            if (key == "total") continue;
            Assert.That(root.GetProperty(key + "_bytes").GetInt64(), Is.EqualTo(bytes), key);
            if (key != "optimizer_states_paged") sum += bytes;
        }
        Assert.That(root.GetProperty("total_bytes").GetInt64(), Is.EqualTo(plan.TotalBytes).And.EqualTo(sum));
        Assert.That(root.GetProperty("method").GetString(), Is.EqualTo("qlora"));
        Assert.That(plan.ToTable(), Does.Contain("total (device)").And.Contain(plan.TotalBytes.ToString()));
    }

    [Test]
    public void BadOptionsAreRejectedByName()
    {
        var c = LlamaConfig.Preset("llama2-7b");
        Assert.That(() => MemoryPlan.Compute(c, new PlanOptions { Batch = 0 }), Throws.InstanceOf<ArgumentOutOfRangeException>().With.Message.Contains("batch"));
        Assert.That(() => MemoryPlan.Compute(c, new PlanOptions { Optimizer = "sgd" }), Throws.ArgumentException.With.Message.Contains("sgd"));
        Assert.That(() => MemoryPlan.Compute(c, new PlanOptions { Targets = ["qproj"] }), Throws.ArgumentException.With.Message.Contains("qproj"));
        Assert.That(() => MemoryPlan.Compute(c, new PlanOptions { Rank = 0 }), Throws.InstanceOf<ArgumentOutOfRangeException>());
        Assert.That(() => MemoryPlan.Compute(c, new PlanOptions { ComputeDType = DType.BF16, Device = PlanDevice.Cpu }), Throws.ArgumentException);
        Assert.That(() => PlanModels.Resolve("llama9-1b"), Throws.ArgumentException.With.Message.Contains("llama-65b"));
        Assert.That(() => PlanModels.Resolve("/nonexistent/config.json"), Throws.InstanceOf<FileNotFoundException>());
    }
}
