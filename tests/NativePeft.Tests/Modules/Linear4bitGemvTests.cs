using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// A 4-bit layer's one-token forward (a decode step) reads the packed weight once (kernel linear_4bit_gemv) instead of
/// dequantizing it and running a one-row GEMM. Oracle: the float64 dot product of the dequantized weight (the layer's own
/// Dequantize, rounded to bf16 as the GEMM path uses it) with x. Both absmax layouts (double-quantized as QLoRA loads
/// it, and fp32), and both kernel paths (in % 32 == 0: 16-byte loads; otherwise element by element).
/// </summary>
[TestFixture("emulator")]
[TestFixture("cuda")]
[Parallelizable(ParallelScope.None)]
public class Linear4bitGemvTests(string device)
{
    private static float[] Bf16Values(IOps ops, Tensor t)
    {
        var b = new BFloat16[t.Count];
        ops.Download<BFloat16>(t, b);
        return b.Select(v => (float)v).ToArray();
    }

    [TestCase(true, 96, TestName = "DoubleQuant, in 64 and 96 (vector path)")]
    [TestCase(false, 80, TestName = "fp32 absmax, in 80 (element path) and 64")]
    public void OneTokenForwardEqualsTheDequantizedWeightTimesX(bool doubleQuant, int intermediate)
    {
        var config = new LlamaConfig
        {
            HiddenSize = 64, IntermediateSize = intermediate, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 16,
            NumHiddenLayers = 1, VocabSize = 50, MaxPositionEmbeddings = 32, RmsNormEps = 1e-5, RopeTheta = 10000,
        };
        using var ops = TestGpus.CreateOps(device);
        using var model = LlamaModel.CreateRandom(config, ops, new LlamaModelOptions
        {
            ComputeDType = DType.BF16, Quantization = BaseQuantization.Nf4, DoubleQuant = doubleQuant, Blocksize = 64,
            Lora = new LoraSettings { Rank = 2, Alpha = 4, TargetModules = ["q_proj"] },
        }, weightSeed: 7, std: 0.3);
        foreach (var name in new[] { "gate_proj", "down_proj" })
        {
            var layer = (Linear4bit)model.Layers[0][name];
            Assert.That(layer.Weight.DoubleQuant is not null, Is.EqualTo(doubleQuant));
            int inF = layer.InFeatures, outF = layer.OutFeatures;
            var rng = new Random(11);
            var xv = Enumerable.Range(0, inF).Select(_ => (float)BFloat16.FromSingle((float)(rng.NextDouble() * 2 - 1))).ToArray();
            var x = ops.Memory.Allocate(DType.BF16, 1, inF);
            var y = ops.Memory.Allocate(DType.BF16, 1, outF);
            ops.Upload<BFloat16>(xv.Select(BFloat16.FromSingle).ToArray(), x);
            Assert.That(ops.TryGemv4bit(x, layer.Weight, y), Is.True, "the GPU ops have the one-token kernel");
            var got = Bf16Values(ops, y);
            layer.Forward(x, y);                                   // the layer takes the same path for one row
            Assert.That(Bf16Values(ops, y), Is.EqualTo(got), $"{name}: Linear4bit.Forward uses the kernel");
            var w = Bf16Values(ops, layer.Dequantize());   // bf16 weights, as the GEMM path multiplies them
            for (int o = 0; o < outF; o++)
            {
                double dot = 0, mag = 0;
                for (int k = 0; k < inF; k++) { dot += (double)w[o * inF + k] * xv[k]; mag += Math.Abs((double)w[o * inF + k] * xv[k]); }
                // bf16 output (half an ulp, 2^-9 relative) plus fp32 summation error
                double tol = Math.Abs(dot) * Math.Pow(2, -8) + mag * inF * 1.2e-7 + 1e-30;
                Assert.That(got[o], Is.EqualTo(dot).Within(tol), $"{name} y[{o}] (in {inF})");
            }
            Assert.That(got.Any(v => v != 0), $"{name}: not all zero");
            ops.Memory.Free(y);
            ops.Memory.Free(x);
        }
        var two = ops.Memory.Allocate(DType.BF16, 2, 64);
        var twoOut = ops.Memory.Allocate(DType.BF16, 2, intermediate);
        Assert.That(ops.TryGemv4bit(two, ((Linear4bit)model.Layers[0]["gate_proj"]).Weight, twoOut), Is.False, "more than one row: dequantize + GEMM");
        Assert.That(new CpuOps().TryGemv4bit(two, ((Linear4bit)model.Layers[0]["gate_proj"]).Weight, twoOut), Is.False, "the CPU reference has no such kernel");
    }
}
