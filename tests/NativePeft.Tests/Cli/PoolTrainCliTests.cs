using System.Text.Json;
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
            "--eval-every", "2", "--eval-batches", "1", "--device", device, "--out", outDir,
        ];
        var emu = CliProcess.Run(Args("emulator", dir["emu"]));
        Assert.That(emu.ExitCode, Is.EqualTo(0), emu.ToString());
        Assert.That(emu.Stdout, Does.Contain("exact match").And.Contain("of 50"), "greedy generation ran on the pool");
        var cpu = CliProcess.Run(Args("cpu", dir["cpu"]));
        Assert.That(cpu.ExitCode, Is.EqualTo(0), cpu.ToString());
        var a = Losses(dir["emu"]);
        var b = Losses(dir["cpu"]);
        Assert.That(a, Has.Length.EqualTo(2));
        for (int i = 0; i < a.Length; i++)
            Assert.That(a[i], Is.EqualTo(b[i]).Within(1e-4 * b[i]), $"step {i + 1}: emulator with the pool vs the CPU");
    }
}
