using System.Diagnostics;
using NativePeft.Data;
using NativePeft.Inference;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Inference;

/// <summary>
/// Greedy decoding speed on the built-in model (docs/generate.md): tokens/s with the KV cache (<see cref="TextGenerator"/>)
/// and without it (<see cref="Trainer.GreedyGenerate"/>: a full forward over the whole sequence per token), on the CPU and
/// the emulator. Prints the numbers; asserts only that both paths produce the same tokens.
/// </summary>
[Explicit("benchmark: prints tokens/s")]
public class GenerationBenchmark
{
    [TestCase("cpu", 64)]
    [TestCase("cpu", 200)]
    [TestCase("emulator", 64)]
    public void Benchmark_GreedyWithAndWithoutKvCache(string device, int newTokens)
    {
        using IOps ops = device == "cpu" ? new CpuOps() : new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
        using var ck = HfCheckpoint.Open(BuiltinModel.Require());
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { BaseWeightDType = DType.BF16 });
        model.Dropout.Training = false;
        var prompt = ByteTokenizer.Instance.Encode("upper: hello\n", addBos: true);
        var generator = new TextGenerator(model, ByteTokenizer.Instance);
        var options = new GenerationOptions { MaxNewTokens = newTokens, StopAtEos = false };
        generator.Generate(prompt, options with { MaxNewTokens = 4 }); // warm-up
        var cached = generator.Generate(prompt, options);

        Trainer.GreedyGenerate(model, prompt, 4, null);
        var clock = Stopwatch.StartNew();
        var uncached = Trainer.GreedyGenerate(model, prompt, newTokens, null);
        double seconds = clock.Elapsed.TotalSeconds;
        Assert.That(cached.TokenIds, Is.EqualTo(uncached));
        TestContext.Out.WriteLine($"{device}: prompt {prompt.Length} tokens, {newTokens} new: KV cache {cached.TokensPerSecond:F1} tokens/s " +
            $"(prefill {cached.PrefillSeconds * 1e3:F1} ms, {cached.DecodeSeconds / Math.Max(1, newTokens - 1) * 1e3:F2} ms/token, cache {cached.KvCacheBytes} bytes); " +
            $"without cache {newTokens / seconds:F1} tokens/s ({seconds:F2} s)");
    }
}
