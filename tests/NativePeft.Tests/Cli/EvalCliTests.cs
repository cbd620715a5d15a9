using System.Text.Json;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Tests.Modules;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>`nativepeft eval` end to end: a tiny checkpoint and a JSONL file written here, the CLI run as a process.</summary>
[Parallelizable(ParallelScope.None)]
public class EvalCliTests
{
    private static readonly int[][] Lines = [[3, 7, 1, 10, 4], [0, 9], [5], [2, 8, 6, 1, 1, 4, 9, 0]];

    private static string WriteData(TempDir dir, string name = "data.jsonl")
    {
        string path = dir[name];
        File.WriteAllLines(path, Lines.Select(l => "{\"input_ids\": [" + string.Join(", ", l) + "]}").Append(""));
        return path;
    }

    private static (double Loss, double Perplexity, long Tokens) RunJson(params string[] args)
    {
        var r = CliProcess.Run(["eval", .. args, "--json"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        var root = doc.RootElement;
        return (root.GetProperty("loss").GetDouble(), root.GetProperty("perplexity").GetDouble(), root.GetProperty("tokens").GetInt64());
    }

    private const long ExpectedTokens = 4 + 1 + 0 + 7; // every line predicts len − 1 tokens

    [Test]
    public void UniformLogitsGiveLnVocabulary()
    {
        using var dir = CliProcess.TempDir();
        var config = ModelTestKit.Tiny;
        // every weight zero except the norms (ones): hidden states and logits are 0, so each loss term is ln(V)
        var tensors = config.ExpectedTensors().Select(t => SafetensorsTensor.From(t.Name, t.Shape,
            Enumerable.Repeat(t.Name.EndsWith("norm.weight") ? 1f : 0f, (int)t.Shape.Aggregate(1L, (a, b) => a * b)).ToArray())).ToList();
        HfCheckpoint.Write(dir["model"], config, tensors, 800);
        var (loss, ppl, tokens) = RunJson("--model", dir["model"], "--data", WriteData(dir));
        Assert.That(tokens, Is.EqualTo(ExpectedTokens));
        Assert.That(loss, Is.EqualTo(Math.Log(11)).Within(1e-6), "ln 11 up to fp32 rounding of the log-sum-exp");
        Assert.That(ppl, Is.EqualTo(11).Within(1e-5));
    }

    [Test]
    public void LossEqualsTheInProcessModelForward()
    {
        using var dir = CliProcess.TempDir();
        var config = ModelTestKit.Tiny;
        var values = LlamaModelLoadTests.Values(config, seed: 4);
        HfCheckpoint.Write(dir["model"], config, LlamaModelLoadTests.F32(config, values), 800);
        string data = WriteData(dir);

        double sum = 0;
        long count = 0;
        using (var ck = HfCheckpoint.Open(dir["model"]))
        using (var ops = new CpuOps())
        using (var model = LlamaModel.Load(ck, ops, new LlamaModelOptions()))
        {
            foreach (var ids in Lines.Where(l => l.Length >= 2))
            {
                sum += model.Forward(ids, ids, 1, ids.Length) * model.LastTokenCount;
                count += model.LastTokenCount;
            }
        }
        double expected = sum / count;
        var (loss, ppl, tokens) = RunJson("--model", dir["model"], "--data", data);
        Assert.That(tokens, Is.EqualTo(ExpectedTokens));
        Assert.That(loss, Is.EqualTo(expected).Within(1e-12 * expected));
        Assert.That(ppl, Is.EqualTo(Math.Exp(expected)).Within(1e-9 * Math.Exp(expected)));
        Assert.That(loss, Is.Not.EqualTo(Math.Log(11)).Within(1e-3), "a random model is not uniform");

        var (nf4, _, nf4Tokens) = RunJson("--model", dir["model"], "--data", data, "--quantize", "nf4");
        Assert.That(nf4Tokens, Is.EqualTo(ExpectedTokens));
        Assert.That(nf4, Is.Not.EqualTo(loss), "NF4 changes the weights");
        Assert.That(nf4, Is.EqualTo(loss).Within(0.5), "but not the loss by much");

        var (emulated, _, emuTokens) = RunJson("--model", dir["model"], "--data", data, "--device", "emulator", "--precision", "fp32");
        Assert.That(emuTokens, Is.EqualTo(ExpectedTokens));
        Assert.That(emulated, Is.EqualTo(loss).Within(1e-5 * loss), "the kernels on the emulator vs the CPU reference");

        var text = CliProcess.Run("eval", "--model", dir["model"], "--data", data);
        Assert.That(text.ExitCode, Is.EqualTo(0), text.ToString());
        Assert.That(text.Stdout, Does.Contain("loss").And.Contain("perplexity").And.Contain("tokens      12"));
    }

    [Test]
    public void BadInputIsNamed()
    {
        using var dir = CliProcess.TempDir();
        var config = ModelTestKit.Tiny;
        HfCheckpoint.Write(dir["model"], config, LlamaModelLoadTests.F32(config, LlamaModelLoadTests.Values(config)), 1 << 20);

        File.WriteAllLines(dir["bad.jsonl"], ["{\"input_ids\": [1, 2]}", "{\"input_ids\": [1, 2,", "{\"input_ids\": [3]}"]);
        var r = CliProcess.Run("eval", "--model", dir["model"], "--data", dir["bad.jsonl"]);
        Assert.That(r.ExitCode, Is.Not.EqualTo(0));
        Assert.That(r.Stderr, Does.Contain("line 2").And.Contain("invalid JSON"), r.ToString());

        File.WriteAllLines(dir["oov.jsonl"], ["{\"input_ids\": [1, 2]}", "", "{\"input_ids\": [1, 11]}"]);
        r = CliProcess.Run("eval", "--model", dir["model"], "--data", dir["oov.jsonl"]);
        Assert.That(r.Stderr, Does.Contain("line 3").And.Contain("input_ids[1] = 11").And.Contain("vocabulary"), r.ToString());

        File.WriteAllLines(dir["short.jsonl"], ["{\"input_ids\": [1]}"]);
        r = CliProcess.Run("eval", "--model", dir["model"], "--data", dir["short.jsonl"]);
        Assert.That(r.Stderr, Does.Contain("nothing to predict"), r.ToString());

        if (!NativePeft.Runtime.CudaGpu.TryCreate(out var cuda, out _))
        {
            r = CliProcess.Run("eval", "--model", dir["model"], "--data", dir["short.jsonl"], "--device", "cuda");
            Assert.That(r.ExitCode, Is.Not.EqualTo(0));
            Assert.That(r.Stderr, Does.Contain("--device cuda").And.Contain("no CUDA device"), r.ToString());
        }
        cuda?.Dispose();

        r = CliProcess.Run("eval", "--model", dir["nope"], "--data", dir["short.jsonl"]);
        Assert.That(r.Stderr, Does.Contain("not found"), r.ToString());
    }
}
