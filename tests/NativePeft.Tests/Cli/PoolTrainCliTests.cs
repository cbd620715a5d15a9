using System.Text.Json;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Quantization;
using NativePeft.Tests.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft train --device emulator` runs every tensor through the memory pool sized from the plan (TrainCommand):
/// QLoRA on the built-in model and task with batch 1 and a sequence of 16, shorter than the exact-match generation
/// (prompt + answer): the training plan alone is too small for generation (its activations and F32 logits run out of the
/// transient arena), so this passes only because TrainCommand sizes the pool for the generation shape too. The losses equal the CPU run's (no pool aliasing: every
/// sub-allocation zero-filled and disjoint).
/// </summary>
[Parallelizable(ParallelScope.None)]
public class PoolTrainCliTests
{
    private static double[] Losses(string outDir)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "metrics.json")));
        return doc.RootElement.GetProperty("steps").EnumerateArray().Select(s => s.GetProperty("loss").GetDouble()).ToArray();
    }

    [Test]
    public void QloraOnTheEmulatorTrainsAndEvaluatesInsideThePool()
    {
        using var dir = CliProcess.TempDir();
        string[] Args(string device, string outDir) =>
        [
            "train", "--model", "builtin", "--data", "builtin", "--method", "qlora", "--steps", "2", "--batch", "1", "--seq", "16",
            "--eval-every", "2", "--eval-batches", "1", "--device", device, "--precision", "fp32", "--out", outDir,
        ];
        var emu = CliProcess.Run(Args("emulator", dir["emu"]));
        Assert.That(emu.ExitCode, Is.EqualTo(0), emu.ToString());
        Assert.That(emu.Stdout, Does.Contain("exact match").And.Contain("of 50"), "greedy generation ran on the pool");
        Assert.That(emu.Stdout, Does.Match(@"memory pool: peak .* of the plan's .*; persistent .* high-water of .* reserved; rope tables .*; transient .* reserved"),
            "the pool's summary line");
        var cpu = CliProcess.Run(Args("cpu", dir["cpu"]));
        Assert.That(cpu.ExitCode, Is.EqualTo(0), cpu.ToString());
        var a = Losses(dir["emu"]);
        var b = Losses(dir["cpu"]);
        Assert.That(a, Has.Length.EqualTo(2));
        for (int i = 0; i < a.Length; i++)
            Assert.That(a[i], Is.EqualTo(b[i]).Within(1e-4 * b[i]), $"step {i + 1}: emulator with the pool vs the CPU");
    }

    /// <summary>
    /// A bitsandbytes checkpoint stored without double quantization at blocksize 32 (1 bit of fp32 absmax per
    /// parameter instead of the default plan's 0.127): the pool must be sized from what is stored, not from the
    /// defaults, or loading runs out of the persistent arena.
    /// </summary>
    [Test]
    public void AFourBitCheckpointIsPlannedAsStored()
    {
        using var dir = CliProcess.TempDir();
        // Projections of 16384 and 32768 elements: large enough that fp32 absmax per 32 (0.125 bytes per parameter)
        // outweighs the double-quantized layout's per-tensor 1 KiB map.
        var config = TrainingKit.Config with { HiddenSize = 128, IntermediateSize = 256, HeadDim = 32 };
        var rng = new Random(5);
        var tensors = new List<SafetensorsTensor>();
        foreach (var (name, shape) in config.ExpectedTensors())
        {
            var values = new float[shape.Aggregate(1L, (x, y) => x * y)];
            bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
            for (int i = 0; i < values.Length; i++) values[i] = norm ? 1f : (float)(0.05 * (rng.NextDouble() * 2 - 1));
            if (!name.Contains("_proj.", StringComparison.Ordinal)) { tensors.Add(SafetensorsTensor.From(name, shape, values)); continue; }
            var q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values), shape, QuantType.Nf4, 32, doubleQuant: false, DType.F32);
            tensors.AddRange(BitsAndBytes4Bit.ToTensors(name[..^"weight".Length], q));
        }
        HfCheckpoint.Write(dir["q4"], config, tensors, long.MaxValue);
        File.WriteAllLines(dir["data.jsonl"], Enumerable.Range(0, 8).Select(_ =>
            "{\"input_ids\": [" + string.Join(", ", Enumerable.Range(0, rng.Next(8, 31)).Select(_ => rng.Next(97, 123))) + "]}"));
        string[] Args(string device, string outDir) =>
        [
            "train", "--model", dir["q4"], "--data", dir["data.jsonl"], "--method", "qlora", "--rank", "4", "--batch", "2", "--seq", "32",
            "--steps", "2", "--device", device, "--precision", "fp32", "--out", outDir,
        ];
        var emu = CliProcess.Run(Args("emulator", dir["emu"]));
        Assert.That(emu.ExitCode, Is.EqualTo(0), emu.ToString());
        var cpu = CliProcess.Run(Args("cpu", dir["cpu"]));
        Assert.That(cpu.ExitCode, Is.EqualTo(0), cpu.ToString());
        var a = Losses(dir["emu"]);
        var b = Losses(dir["cpu"]);
        for (int i = 0; i < a.Length; i++)
            Assert.That(a[i], Is.EqualTo(b[i]).Within(1e-4 * b[i]), $"step {i + 1}: emulator with the pool vs the CPU");
    }
}
