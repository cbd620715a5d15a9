using System.Text.Json;
using NativePeft.IO;
using NativePeft.Tests.Modules;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>
/// `generate` and `eval` on the emulator run on a memory pool sized from their <see cref="Planning.InferencePlan"/>
/// (an undersized pool throws OutOfMemoryException): with a 4-bit base (--quantize nf4) and in bf16 they give the CPU
/// reference's tokens and loss, and print nothing beyond what they print on the CPU.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class InferencePoolCliTests
{
    private static CliProcess.Result Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int code = NativePeft.Cli.Program.Run(args, stdout, stderr);
        return new CliProcess.Result(code, stdout.ToString(), stderr.ToString());
    }

    private static JsonElement Json(CliProcess.Result r)
    {
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        return JsonDocument.Parse(r.Stdout).RootElement.Clone();
    }

    [Test]
    public void GenerateNf4OnThePoolGivesTheCpuTokens()
    {
        string[] args = ["generate", "--prompt", "upper: pool\n", "--max-tokens", "12", "--quantize", "nf4", "--json"];
        var cpu = Json(Run(args));
        var emu = Json(Run([.. args, "--device", "emulator", "--precision", "fp32"]));
        Assert.That(emu.GetProperty("token_ids").GetRawText(), Is.EqualTo(cpu.GetProperty("token_ids").GetRawText()), "greedy NF4 on the emulator's pool = the CPU");
        Assert.That(emu.GetProperty("kv_cache_bytes").GetInt64(), Is.EqualTo(cpu.GetProperty("kv_cache_bytes").GetInt64()), "fp32 cache on both");
        var bf16 = Json(Run([.. args, "--device", "emulator"]));
        Assert.That(bf16.GetProperty("kv_cache_bytes").GetInt64() * 2, Is.EqualTo(cpu.GetProperty("kv_cache_bytes").GetInt64()), "a bf16 cache is half the fp32 one");
        var text = Run("generate", "--prompt", "upper: pool\n", "--max-tokens", "4", "--device", "emulator");
        Assert.That(text.ExitCode, Is.EqualTo(0), text.ToString());
        Assert.That(text.Stdout.TrimEnd().Split('\n'), Has.Length.EqualTo(2), "the completion and the stats line, nothing about the pool");
        Assert.That(text.Stderr, Is.Empty);
    }

    [Test]
    public void EvalNf4AndBf16OnThePoolGiveTheCpuLoss()
    {
        using var dir = CliProcess.TempDir();
        var config = ModelTestKit.Tiny;
        HfCheckpoint.Write(dir["model"], config, LlamaModelLoadTests.F32(config, LlamaModelLoadTests.Values(config, seed: 4)), 800);
        File.WriteAllLines(dir["data.jsonl"], ["{\"input_ids\": [3, 7, 1, 10, 4]}", "{\"input_ids\": [2, 8, 6, 1, 1, 4, 9, 0]}", "{\"input_ids\": [5]}"]);
        double Loss(params string[] extra)
        {
            var r = Json(Run(["eval", "--model", dir["model"], "--data", dir["data.jsonl"], "--json", .. extra]));
            Assert.That(r.GetProperty("tokens").GetInt64(), Is.EqualTo(4 + 7));
            return r.GetProperty("loss").GetDouble();
        }
        double cpu = Loss("--quantize", "nf4");
        Assert.That(Loss("--quantize", "nf4", "--device", "emulator", "--precision", "fp32"), Is.EqualTo(cpu).Within(1e-5 * cpu), "NF4 on the emulator's pool");
        double fp32 = Loss();
        Assert.That(Loss("--device", "emulator"), Is.EqualTo(fp32).Within(0.02 * fp32), "bf16 on the emulator's pool, near the fp32 loss");
    }
}
