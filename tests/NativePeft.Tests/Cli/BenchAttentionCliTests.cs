using System.Text.Json;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `nativepeft bench --op attention` on the emulator and the CPU reference: the FLOP convention is printed, every
/// shape gets a finite TFLOP/s (table and --json FILE), the decode rows a finite GB/s next to the copy, and a bad
/// option value is one error line naming the option with exit code 2. Speed itself is never asserted.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class BenchAttentionCliTests
{
    private static readonly string[] PrefillKeys =
        ["batch", "seq", "heads_q", "heads_kv", "head_dim", "fwd_ms", "bwd_ms", "fwd_flops", "bwd_flops", "fwd_tflops", "bwd_tflops"];

    private static readonly string[] DecodeKeys =
        ["batch", "kv_len", "heads_q", "heads_kv", "head_dim", "ms", "kv_bytes", "gbps", "copy_gbps", "of_copy"];

    [Test]
    public void EmulatorDefaultsPrintTheConventionAndAFiniteRatePerShape()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run("bench", "--op", "attention", "--device", "emulator", "--json", dir["attn.json"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("FLOP convention (FlashAttention): forward = 4·B·Hq·T²·D / 2 (causal halves it), backward = 2.5 × forward"));
        Assert.That(r.Stdout, Does.Contain("mean nothing for GPU speed"), "the emulator says its timings are not GPU timings");

        using var doc = JsonDocument.Parse(File.ReadAllText(dir["attn.json"]));
        var root = doc.RootElement;
        Assert.That(root.GetProperty("device_kind").GetString(), Is.EqualTo("emulator"));
        Assert.That(root.GetProperty("dtype").GetString(), Is.EqualTo("bf16"));
        var prefill = root.GetProperty("prefill").EnumerateArray().ToList();
        Assert.That(prefill, Has.Count.EqualTo(1), "the emulator's default: one small shape");
        var p = prefill[0];
        Assert.That(PrefillKeys.Where(k => !p.TryGetProperty(k, out _)), Is.Empty, "the keys attn_peer.py writes too");
        Assert.That((p.GetProperty("batch").GetInt32(), p.GetProperty("seq").GetInt32(), p.GetProperty("heads_q").GetInt32(),
            p.GetProperty("heads_kv").GetInt32(), p.GetProperty("head_dim").GetInt32()), Is.EqualTo((1, 128, 4, 1, 128)));
        // The convention, computed here: 4·B·Hq·T²·D / 2 and 2.5 times that; the rate is FLOPs over the median time.
        Assert.That(p.GetProperty("fwd_flops").GetDouble(), Is.EqualTo(4.0 * 1 * 4 * 128 * 128 * 128 / 2));
        Assert.That(p.GetProperty("bwd_flops").GetDouble(), Is.EqualTo(2.5 * 4.0 * 1 * 4 * 128 * 128 * 128 / 2));
        foreach (var (time, rate, flops) in new[] { ("fwd_ms", "fwd_tflops", "fwd_flops"), ("bwd_ms", "bwd_tflops", "bwd_flops") })
        {
            double ms = p.GetProperty(time).GetDouble(), tflops = p.GetProperty(rate).GetDouble();
            Assert.That(double.IsFinite(ms) && ms > 0, Is.True, time);
            Assert.That(double.IsFinite(tflops) && tflops > 0, Is.True, rate);
            Assert.That(tflops, Is.EqualTo(p.GetProperty(flops).GetDouble() / (ms * 1e-3) / 1e12).Within(1e-9).Percent, rate);
        }
        // The table row of the shape carries the same (finite) rate.
        string row = r.Stdout.Split('\n').Single(l => l.Contains(" 128 ") && l.Contains("4/1/128") && l.Contains(p.GetProperty("fwd_ms").GetDouble().ToString("0.000")));
        Assert.That(row, Does.Not.Contain("NaN").And.Not.Contain("∞"));

        var decode = root.GetProperty("decode").EnumerateArray().ToList();
        Assert.That(decode.Select(d => d.GetProperty("batch").GetInt32()), Is.EqualTo(new[] { 1, 2 }));
        foreach (var d in decode)
        {
            Assert.That(DecodeKeys.Where(k => !d.TryGetProperty(k, out _)), Is.Empty);
            Assert.That(d.GetProperty("kv_bytes").GetDouble(), Is.EqualTo(2.0 * d.GetProperty("batch").GetInt32() * 128 * 1 * 128 * 2), "B·T·Hkv·D·2 bytes × 2");
            double gbps = d.GetProperty("gbps").GetDouble(), copy = d.GetProperty("copy_gbps").GetDouble();
            Assert.That(double.IsFinite(gbps) && gbps > 0 && double.IsFinite(copy) && copy > 0, Is.True, d.ToString());
            Assert.That(d.GetProperty("of_copy").GetDouble(), Is.EqualTo(gbps / copy).Within(1e-9).Percent);
        }
    }

    [Test]
    public void OverridesSetTheShapesAndTheCpuReferenceRunsThem()
    {
        var r = CliProcess.Run("bench", "--op", "attention", "--device", "cpu", "--seq", "32", "64", "--batch", "2",
            "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--json");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        var prefill = doc.RootElement.GetProperty("prefill").EnumerateArray().ToList();
        Assert.That(prefill.Select(p => (p.GetProperty("batch").GetInt32(), p.GetProperty("seq").GetInt32(), p.GetProperty("heads_q").GetInt32(),
            p.GetProperty("heads_kv").GetInt32(), p.GetProperty("head_dim").GetInt32())), Is.EqualTo(new[] { (2, 32, 4, 2, 64), (2, 64, 4, 2, 64) }));
        foreach (var p in prefill)
            Assert.That(double.IsFinite(p.GetProperty("fwd_tflops").GetDouble()) && double.IsFinite(p.GetProperty("bwd_tflops").GetDouble()), Is.True);
        Assert.That(doc.RootElement.GetProperty("decode").EnumerateArray().Select(d => d.GetProperty("kv_len").GetInt32()), Is.EqualTo(new[] { 32, 64 }));
        Assert.That(doc.RootElement.GetProperty("dtype").GetString(), Is.EqualTo("fp32"), "the CPU reference computes in fp32");
    }

    [TestCase("--seq", "0", "error: --seq 0: must be a positive integer")]
    [TestCase("--batch", "-3", "error: --batch -3: must be a positive integer")]
    [TestCase("--head-dim", "256", "error: --head-dim 256: at most 128")]
    [TestCase("--kv-heads", "3", "error: --kv-heads 3: must divide the default --heads 4")]
    public void ABadValueIsOneLineNamingTheOption(string option, string value, string message)
    {
        var r = CliProcess.Run("bench", "--op", "attention", "--device", "emulator", option, value);
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stdout, Is.Empty, r.ToString());
        Assert.That(r.Stderr, Does.StartWith(message), r.ToString());
        Assert.That(r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries), Has.Length.EqualTo(1), "one line, no stack trace");
    }

    [Test]
    public void ShapeOptionsWithoutOpAttentionAreRefused()
    {
        var r = CliProcess.Run("bench", "--device", "emulator", "--seq", "128");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr.Trim(), Is.EqualTo("error: --seq: only with --op attention or --model"));
    }

    [Test]
    public void AnUnknownOpIsAParseErrorNamingTheOption()
    {
        var r = CliProcess.Run("bench", "--op", "matmul", "--device", "emulator");
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        Assert.That(r.Stderr, Does.StartWith("error: ").And.Contain("--op").And.Contain("matmul"), r.ToString());
    }
}
