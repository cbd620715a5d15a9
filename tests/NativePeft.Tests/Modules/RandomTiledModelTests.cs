using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// <see cref="LlamaModel.CreateRandomTiled"/> (the weights of `bench --model`): a tensor longer than the tile repeats it
/// exactly, the values are Normal(0, 0.02²), and a 4-bit weight of whole tiles is what quantizing the same dense values
/// on the host (<see cref="Quantized4BitTensor.Quantize{T}(ReadOnlyMemory{T}, long[], QuantType, int, bool, DType)"/>)
/// gives, bit for bit once dequantized.
/// </summary>
public class RandomTiledModelTests
{
    private const int Tile = LlamaModel.RandomTileElements;

    // gate/up/down 4096 x 512 = 2 tiles exactly; the embedding 3000 x 512 = 1.46 tiles (a partial tail).
    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 512, IntermediateSize = 4096, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 128,
        NumHiddenLayers = 1, VocabSize = 3000, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    private static float[] Get(IOps ops, Tensor t)
    {
        var v = new float[t.Count];
        ops.Download<float>(t, v);
        return v;
    }

    [Test]
    public void DenseTensorsRepeatOneNormalTile()
    {
        using var ops = new CpuOps();
        using var model = LlamaModel.CreateRandomTiled(Config, ops, new LlamaModelOptions { FullFineTuning = true }, weightSeed: 7);
        var embed = Get(ops, model.EmbedTokens);
        Assert.That(embed, Has.Length.EqualTo(3000 * 512));
        int mismatches = 0;
        for (int i = Tile; i < embed.Length; i++) if (embed[i] != embed[i - Tile]) mismatches++;
        Assert.That(mismatches, Is.Zero, "element i is element i − tile");
        double mean = embed.Take(Tile).Average(v => (double)v);
        double std = Math.Sqrt(embed.Take(Tile).Average(v => (v - mean) * (v - mean)));
        Assert.That(mean, Is.EqualTo(0).Within(2e-4), "mean of 2^20 draws of N(0, 0.02²): standard error 2e-5");
        Assert.That(std, Is.EqualTo(0.02).Within(0.0005));
        var norm = Get(ops, model.Layers[0].InputLayernorm);
        Assert.That(norm.Average(v => (double)v), Is.EqualTo(1).Within(0.01), "norm weights 1 + N(0, 0.02²)");
        var gate = Get(ops, model.Layers[0].GateProj is Linear l ? l.Weight : throw new AssertionException("a dense gate_proj"));
        Assert.That(gate.Take(1000), Is.EqualTo(embed.Take(1000)), "every tensor repeats the same tile");
    }

    [Test]
    public void FourBitWeightsAreTheHostQuantizationOfTheSameValues()
    {
        using var ops = new CpuOps();
        using var dense = LlamaModel.CreateRandomTiled(Config, ops, new LlamaModelOptions { FullFineTuning = true }, weightSeed: 7);
        var lora = new LoraSettings { Rank = 4, Alpha = 8, TargetModules = LoraSettings.KnownTargets };
        using var q = LlamaModel.CreateRandomTiled(Config, ops,
            new LlamaModelOptions { Lora = lora, Quantization = BaseQuantization.Nf4, DoubleQuant = true, Blocksize = 64 }, weightSeed: 7);
        var denseByName = dense.BaseParameters().Where(p => p.Dense is not null).ToDictionary(p => p.Name, p => p.Dense!);
        int checkedTensors = 0;
        foreach (var (name, _, quantized) in q.BaseParameters())
        {
            if (quantized is null || (long)quantized.Rows * quantized.Columns % Tile != 0) continue;
            var values = Get(ops, denseByName[name]);
            var host = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values), [quantized.Rows, quantized.Columns], QuantType.Nf4, 64,
                doubleQuant: true, DType.F32).DequantizeToSingle();
            var output = ops.Memory.Allocate(DType.F32, quantized.Rows, quantized.Columns);
            ops.Dequantize4bit(quantized, 0, output);
            var device = Get(ops, output);
            ops.Memory.Free(output);
            Assert.That(device, Is.EqualTo(host), name);
            checkedTensors++;
        }
        Assert.That(checkedTensors, Is.EqualTo(3), "gate, up and down are whole tiles");
    }
}
