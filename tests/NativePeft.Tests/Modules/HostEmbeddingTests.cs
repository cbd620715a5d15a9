using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// <see cref="LlamaModelOptions.EmbeddingOnHost"/>: the table stays in host memory and the batch's rows are uploaded.
/// Lossless: the same loss and the same LoRA gradients, bit for bit, as the table on the device (the rows are the same
/// rounded values; every later op is unchanged); and the device holds V·C fewer elements.
/// </summary>
[TestFixture("cpu")]
[TestFixture("emulator")]
[Parallelizable(ParallelScope.None)]
public class HostEmbeddingTests(string device)
{
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 64, IntermediateSize = 96, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
        NumHiddenLayers = 2, VocabSize = 300, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    private IOps CreateOps() => device == "cpu" ? new CpuOps() : TestGpus.CreateOps(device);

    private LlamaModelOptions Options(bool host) => new()
    {
        ComputeDType = device == "cpu" ? DType.F32 : DType.BF16,
        Lora = new LoraSettings { Rank = 4, Alpha = 8, TargetModules = LoraSettings.KnownTargets },
        Quantization = BaseQuantization.Nf4, Seed = 1, EmbeddingOnHost = host,
    };

    [Test]
    public void SameLossAndGradientsAsTheDeviceTableWithVTimesCFewerDeviceBytes()
    {
        const int b = 2, t = 7;
        var rng = new Random(3);
        int[] ids = Enumerable.Range(0, b * t).Select(_ => rng.Next(Config.VocabSize)).ToArray();
        (double Loss, float[][] Grads, long Bytes) Run(bool host)
        {
            using var ops = CreateOps();
            using var model = LlamaModel.CreateRandom(Config, ops, Options(host), weightSeed: 5, std: 0.05);
            Assert.That(model.HostEmbedding is not null, Is.EqualTo(host));
            model.ZeroGrad();
            double loss = model.Forward(ids, ids, b, t);
            model.Backward();
            var grads = model.TrainableParameters.Select(p => TrainingKit.Values(ops, p.Grad)).ToArray();
            return (loss, grads, model.ParameterBytes);
        }
        var onDevice = Run(false);
        var onHost = Run(true);
        Assert.That(BitConverter.DoubleToInt64Bits(onHost.Loss), Is.EqualTo(BitConverter.DoubleToInt64Bits(onDevice.Loss)), "loss");
        Assert.That(onHost.Grads, Has.Length.EqualTo(onDevice.Grads.Length));
        for (int i = 0; i < onDevice.Grads.Length; i++)
            Assert.That(onHost.Grads[i], Is.EqualTo(onDevice.Grads[i]), $"gradient {i}");
        Assert.That(onHost.Grads.Any(g => g.Any(v => v != 0)), "the gradients are not all zero");
        long es = (device == "cpu" ? DType.F32 : DType.BF16).ElementSize();
        Assert.That(onDevice.Bytes - onHost.Bytes, Is.EqualTo(Config.VocabSize * Config.HiddenSize * es), "device bytes saved");
    }

    [Test]
    public void RefusedWhereTheDeviceNeedsTheTableAndBadIdsAreNamed()
    {
        using var ops = CreateOps();
        var tied = Assert.Throws<ArgumentException>(() => LlamaModel.CreateRandom(Config with { TieWordEmbeddings = true }, ops, Options(true)));
        Assert.That(tied!.ParamName, Is.EqualTo(nameof(LlamaModelOptions.EmbeddingOnHost)));
        Assert.That(tied.Message, Does.Contain("tie_word_embeddings"));
        var full = Assert.Throws<ArgumentException>(() => new LlamaModelOptions { FullFineTuning = true, EmbeddingOnHost = true }.Validate());
        Assert.That(full!.ParamName, Is.EqualTo(nameof(LlamaModelOptions.EmbeddingOnHost)));

        using var model = LlamaModel.CreateRandom(Config, ops, Options(true), weightSeed: 5);
        var bad = Assert.Throws<ArgumentOutOfRangeException>(() => model.Forward([1, 2, 300], [1, 2, 300], 1, 3));
        Assert.That(bad!.Message, Does.Contain("token id 300 at position 2"));
        Assert.Throws<InvalidOperationException>(() => _ = model.EmbedTokens, "no device table to hand out");
    }
}
