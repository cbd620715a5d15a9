using System.Text.Json;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft bench --op lora` on the emulator: a fused and an unfused time for the forward and the backward at
/// dropout 0 and 0.1 (finite, positive, speed-up = unfused / fused), the emulator's caveat printed; the CPU is refused
/// with one error line. Speed itself is never asserted.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class BenchLoraCliTests
{
    [Test]
    public void EmulatorJsonHasAFusedAndAnUnfusedTimePerPassAndDropout()
    {
        var r = CliProcess.Run("bench", "--op", "lora", "--device", "emulator", "--json");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        var root = doc.RootElement;
        Assert.That(root.GetProperty("device_kind").GetString(), Is.EqualTo("emulator"));
        Assert.That(root.GetProperty("ranks").EnumerateArray().Select(e => e.GetInt32()), Is.EqualTo(new[] { 16, 16, 16 }));
        var rows = root.GetProperty("rows").EnumerateArray().ToList();
        Assert.That(rows.Select(x => x.GetProperty("dropout").GetDouble()), Is.EqualTo(new[] { 0.0, 0.0, 0.1, 0.1 }));
        foreach (var row in rows)
        {
            double f = row.GetProperty("fused_ms").GetDouble(), u = row.GetProperty("unfused_ms").GetDouble();
            Assert.That(double.IsFinite(f) && f > 0 && double.IsFinite(u) && u > 0, Is.True, row.ToString());
            Assert.That(row.GetProperty("speedup").GetDouble(), Is.EqualTo(u / f).Within(1e-9).Percent);
        }
        Assert.That(root.GetProperty("notes").EnumerateArray().Select(n => n.GetString()),
            Has.Some.Contains("mean nothing for GPU speed"));
    }

    [Test]
    public void OnTheCpu_IsOneErrorLineWithExitCode2()
    {
        var r = CliProcess.Run("bench", "--op", "lora", "--device", "cpu");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr.Trim(), Is.EqualTo("error: --op lora: the fused kernels need a device (--device cuda or emulator)"));
    }
}
