using System.Text.Json;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Planning;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `bench --model tiny --device emulator`: each method's training step runs on a memory pool sized from its training
/// plan (the same <see cref="DevicePlanning.Training"/> as `train`); the step is a real one (clipping and AdamW), so the
/// peak each row reports is the plan's steady-state total — parameters, optimizer state, activations, RoPE tables and the
/// largest op workspace — computed here from <see cref="MemoryPlan"/> with the bench's shape (hidden 256, 4 layers,
/// vocab 2048, batch 4 × 128), and the row's plan figure is that total.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class BenchModelPoolTests
{
    private static readonly LlamaConfig Tiny = new()
    {
        HiddenSize = 256, IntermediateSize = 688, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 64,
        NumHiddenLayers = 4, VocabSize = 2048, MaxPositionEmbeddings = 1024, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    [Test]
    public void EachMethodsPeakIsItsPlan()
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = NativePeft.Cli.Program.Run(["bench", "--model", "tiny", "--device", "emulator", "--steps", "1", "--json"], stdout, stderr);
        Assert.That(code, Is.EqualTo(0), stderr.ToString());
        using var doc = JsonDocument.Parse(stdout.ToString());
        var rowList = doc.RootElement.GetProperty("rows").EnumerateArray().ToList();
        var rows = rowList.ToDictionary(r => r.GetProperty("method").GetString()!, r => r.GetProperty("peak_bytes").GetInt64());
        var plans = rowList.ToDictionary(r => r.GetProperty("method").GetString()!, r => r.GetProperty("plan_bytes").GetInt64());
        var o = new PlanOptions
        {
            Batch = 4, Seq = 128, Rank = 16, Alpha = 32, ComputeDType = DType.BF16, ClipGradients = true, Optimizer = "adamw", Device = PlanDevice.Gpu,
        };
        long Expected(FineTuneMethod method)
        {
            // --embedding auto: QLoRA on a GPU device keeps the (untied) embedding table in host memory
            var plan = MemoryPlan.Compute(Tiny, o with { Method = method, EmbeddingOnHost = method == FineTuneMethod.Qlora });
            return plan.ParameterBytes + plan.OptimizerStateBytes + plan.OptimizerMapBytes + plan.ActivationBytes + plan.RopeTableBytes + plan.TransientWorkspaceBytes;
        }
        Assert.Multiple(() =>
        {
            Assert.That(rows["full"], Is.EqualTo(Expected(FineTuneMethod.Full)));
            Assert.That(rows["lora r=16 (bf16 base)"], Is.EqualTo(Expected(FineTuneMethod.Lora)));
            Assert.That(rows["qlora r=16 (nf4)"], Is.EqualTo(Expected(FineTuneMethod.Qlora)));
            Assert.That(plans["full"], Is.EqualTo(Expected(FineTuneMethod.Full)));
            Assert.That(plans["qlora r=16 (nf4)"], Is.EqualTo(Expected(FineTuneMethod.Qlora)));
        });
    }
}
