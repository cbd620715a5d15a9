using NativePeft.Cli.Commands;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Planning;
using NUnit.Framework;

namespace NativePeft.Tests.Planning;

/// <summary>
/// <see cref="TrainingFlops"/> (the FLOPs `bench --model` reports MFU with) against arithmetic written out by hand, the
/// device peaks it divides by, and the `bench --model llama3-*` shapes against the published parameter counts.
/// </summary>
public class TrainingFlopsTests
{
    // bench --model tiny: hidden 256, intermediate 688, 4 heads of 64 (2 kv heads), 4 layers, vocab 2048.
    private static readonly LlamaConfig Tiny = new()
    {
        HiddenSize = 256, IntermediateSize = 688, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 64,
        NumHiddenLayers = 4, VocabSize = 2048, MaxPositionEmbeddings = 1024, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    [Test]
    public void TinyShapeByHand()
    {
        // Per layer: q 256·256 = 65,536; k and v 128·256 = 32,768 each; o 65,536; gate, up, down 688·256 = 176,128 each.
        long perLayer = 65_536 + 32_768 + 32_768 + 65_536 + 3 * 176_128;   // 724,992
        long linear = 4 * perLayer + 2048 * 256;                              // 2,899,968 + lm_head 524,288 = 3,424,256
        // LoRA r=16: r·(in + out): q 16·512 = 8,192; k, v 16·384 = 6,144; o 8,192; gate, up, down 16·944 = 15,104.
        long lora = 4 * (8_192 + 6_144 + 6_144 + 8_192 + 3 * 15_104);        // 4 · 73,984 = 295,936
        const double tokens = 4 * 128;
        // Causal attention forward per layer: 2·2·B·T²·Hq·D/2 = 2·2·4·128²·4·64/2 = 33,554,432; backward 2.5 × that.
        double attention = 4 * (2.0 * 2 * 4 * 128 * 128 * 4 * 64 / 2) * 3.5; // 469,762,048
        Assert.Multiple(() =>
        {
            Assert.That(linear, Is.EqualTo(3_424_256));
            Assert.That(lora, Is.EqualTo(295_936));
            Assert.That(attention, Is.EqualTo(469_762_048));
            Assert.That(TrainingFlops.LinearParameters(Tiny), Is.EqualTo(linear));
            Assert.That(TrainingFlops.LoraParameters(Tiny, 16, LoraSettings.KnownTargets), Is.EqualTo(lora));
            Assert.That(TrainingFlops.Attention(Tiny, 4, 128), Is.EqualTo(attention));
            // LoRA: 4 · 3,424,256 · 512 + 6 · 295,936 · 512 + 469,762,048 = 7,012,876,288 + 909,115,392 + 469,762,048
            Assert.That(TrainingFlops.PerStep(Tiny, 4, 128, 16, LoraSettings.KnownTargets), Is.EqualTo(8_391_753_728.0));
            Assert.That(TrainingFlops.PerStep(Tiny, 4, 128, 16, LoraSettings.KnownTargets), Is.EqualTo(4 * linear * tokens + 6 * lora * tokens + attention));
            // Full: 6 · 3,424,256 · 512 + 469,762,048 = 10,519,314,432 + 469,762,048
            Assert.That(TrainingFlops.PerStep(Tiny, 4, 128, rank: null), Is.EqualTo(10_989_076_480.0));
            // Only q_proj targeted: 4 layers · 8,192.
            Assert.That(TrainingFlops.LoraParameters(Tiny, 16, ["q_proj"]), Is.EqualTo(4 * 8_192));
        });
    }

    [Test]
    public void TiedEmbeddingsStillCountTheLmHeadGemm()
    {
        var tied = Tiny with { TieWordEmbeddings = true };
        Assert.That(TrainingFlops.LinearParameters(tied), Is.EqualTo(3_424_256), "the lm_head GEMM runs whether or not its weight is the embedding");
        Assert.That(tied.ParameterCount(), Is.LessThan(Tiny.ParameterCount()));
    }

    [TestCase("NVIDIA H100 80GB HBM3", 989.4)]
    [TestCase("NVIDIA H100 PCIe", 756.0)]
    [TestCase("NVIDIA H200", 989.4)]
    [TestCase("NVIDIA A100-SXM4-80GB", 312.0)]
    [TestCase("NVIDIA L40S", 362.0)]
    public void KnownDevicePeaks(string name, double tflops) => Assert.That(TrainingFlops.PeakTflops(name), Is.EqualTo(tflops));

    [TestCase("CPU reference")]
    [TestCase("NVIDIA H100 NVL")]
    [TestCase("NVIDIA GeForce RTX 4090")]
    [TestCase("")]
    public void UnknownDevicesHaveNoPeak(string name) => Assert.That(TrainingFlops.PeakTflops(name), Is.Null);

    // Published parameter counts (Hugging Face model cards / safetensors metadata of meta-llama/*).
    [TestCase("llama3-1b", 1_235_814_400L, 16, true)]
    [TestCase("llama3-3b", 3_212_749_824L, 28, true)]
    [TestCase("llama3-8b", 8_030_261_248L, 32, false)]
    [TestCase("llama3-70b", 70_553_706_496L, 80, false)]
    public void Llama3ShapesHaveThePublishedParameterCounts(string model, long parameters, int layers, bool tied)
    {
        var (config, batch, seq, methods) = ModelBench.Shape(model);
        Assert.Multiple(() =>
        {
            Assert.That(config.ParameterCount(), Is.EqualTo(parameters));
            Assert.That(config.NumHiddenLayers, Is.EqualTo(layers));
            Assert.That(config.TieWordEmbeddings, Is.EqualTo(tied));
            Assert.That(config.VocabSize, Is.EqualTo(128256));
            Assert.That(config.NumKeyValueHeads, Is.EqualTo(8));
            Assert.That(config.RopeTheta, Is.EqualTo(500000.0));
            Assert.That(config.RmsNormEps, Is.EqualTo(1e-5));
            Assert.That((batch, seq), Is.EqualTo((4, 1024)));
            Assert.That(methods, Is.EqualTo(new[] { "lora", "qlora" }), "full fine-tuning of these does not fit one GPU: asked for explicitly");
        });
    }

    [Test]
    public void Llama3HeadShapes()
    {
        Assert.Multiple(() =>
        {
            Assert.That(ModelBench.Shape("llama3-1b").Config is { HiddenSize: 2048, IntermediateSize: 8192, NumAttentionHeads: 32, HeadDim: 64 });
            Assert.That(ModelBench.Shape("llama3-3b").Config is { HiddenSize: 3072, IntermediateSize: 8192, NumAttentionHeads: 24, HeadDim: 128 });
            Assert.That(ModelBench.Shape("llama3-8b").Config is { HiddenSize: 4096, IntermediateSize: 14336, NumAttentionHeads: 32, HeadDim: 128 });
            Assert.That(ModelBench.Shape("llama3-70b").Config is { HiddenSize: 8192, IntermediateSize: 28672, NumAttentionHeads: 64, HeadDim: 128 });
        });
    }
}
