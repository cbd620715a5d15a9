using System.Text;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Quantization;
using NUnit.Framework;

namespace NativePeft.Tests.Cli;

/// <summary>End-to-end: the `nativepeft` executable, run as a process, on files it and the tests write.</summary>
[Parallelizable(ParallelScope.None)]
public class CliTests
{
    private static readonly string[] Linear = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

    [Test]
    public void InfoNamesEachComponentAndWhyCudaIsMissing()
    {
        var r = CliProcess.Run("info");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("CUDA device").And.Contain("emulator").And.Contain("kernel files").And.Contain("BLAS"));
        if (!NativePeft.Runtime.CudaGpu.TryCreate(out var gpu, out var reason))
            Assert.That(r.Stdout, Does.Contain("no CUDA device").Or.Contain("not found"), "the reason CUDA is unavailable");
        gpu?.Dispose();
        Assert.That(r.Stdout, Does.Contain("NativePeft CPU emulator"), "the emulator library loads from the build output");
    }

    [Test]
    public void HelpNamesTheProgramNativepeft()
    {
        // The executable is NativePeft.Cli (the installed tool's is the assembly too): help and usage say nativepeft.
        var r = CliProcess.Run("--help");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout.ReplaceLineEndings("\n"), Does.Contain("Usage:\n  nativepeft [command] [options]"), r.ToString());
        Assert.That(r.Stdout, Does.Not.Contain("NativePeft.Cli"), r.ToString());
        var train = CliProcess.Run("train", "--help");
        Assert.That(train.Stdout, Does.Contain("nativepeft train [options]").And.Contain("--config"), train.ToString());
        Assert.That(CliProcess.Run("--version").ExitCode, Is.EqualTo(0));
        // --config still expands on the renamed root (ConfigFile.Expand): a bad key names the command path
        using var dir = CliProcess.TempDir();
        File.WriteAllText(dir["c.yaml"], "no_such_option: 1\n");
        var bad = CliProcess.Run("estimate", "--config", dir["c.yaml"]);
        Assert.That(bad.ExitCode, Is.EqualTo(2), bad.ToString());
        Assert.That(bad.Stderr, Does.Contain("unrecognized option 'no_such_option' for 'nativepeft estimate'"), bad.ToString());
    }

    private static (string Model, TempDir Dir) DemoModel()
    {
        var dir = CliProcess.TempDir();
        var model = dir["model.safetensors"];
        var r = CliProcess.Run("demo-checkpoint", "--out", model, "--layers", "1", "--hidden", "128", "--intermediate", "352", "--vocab", "256");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        return (model, dir);
    }

    [Test]
    public void QuantizeWritesBitsandbytesLayoutWithBoundedError()
    {
        var (model, dir) = DemoModel();
        using var _ = dir;
        var output = dir["model-nf4.safetensors"];
        var r = CliProcess.Run("quantize", "--in", model, "--out", output, "--quant-type", "nf4", "--blocksize", "64", "--double-quant");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("7 of 12 tensors quantized"), r.Stdout);

        using var before = SafetensorsFile.Open(model);
        using var after = SafetensorsFile.Open(output);
        foreach (var lin in Linear)
        {
            var prefix = $"model.layers.0.{lin}.";
            // docs/quant-contract.md: the bitsandbytes keys of a double-quantized NF4 weight
            foreach (var key in new[] { "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4" })
                Assert.That(after.Contains(prefix + key), Is.True, prefix + key);
            var info = before.GetInfo(prefix + "weight");
            Assert.That(after.GetInfo(prefix + "weight").DType, Is.EqualTo(DType.U8));
            Assert.That(after.GetInfo(prefix + "weight").Shape, Is.EqualTo(new long[] { (info.ElementCount + 1) / 2, 1 }));

            var q = BitsAndBytes4Bit.Load(after, prefix);
            var restored = q.DequantizeToSingle();
            var original = before.GetSpan<BFloat16>(prefix + "weight");
            // Per element, NF4 is off by at most half the widest gap between codes (0.1519 of the block's absmax)
            // plus the double-quant error on absmax; check against the block's true max |w|.
            for (int b = 0; b < original.Length / 64; b++)
            {
                float absmax = 0;
                for (int i = b * 64; i < b * 64 + 64; i++) absmax = Math.Max(absmax, Math.Abs(original[i].ToSingle()));
                for (int i = b * 64; i < b * 64 + 64; i++)
                    Assert.That(Math.Abs(restored[i] - original[i].ToSingle()), Is.LessThanOrEqualTo(0.16 * absmax + 1e-6), $"{prefix} element {i}");
            }
        }
        // Tensors that are not linear weights are copied byte for byte.
        foreach (var name in new[] { "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight" })
            Assert.That(after.GetBytes(name).SequenceEqual(before.GetBytes(name)), Is.True, name);
        Assert.That(after.Metadata["format"], Is.EqualTo("pt"));
    }

    [Test]
    public void QuantizeOnTheEmulatorWritesTheSameBytesAsTheCpuReference()
    {
        var (model, dir) = DemoModel();
        using var _ = dir;
        foreach (var (type, dq) in new[] { ("nf4", true), ("fp4", false) })
        {
            string cpu = dir[$"cpu-{type}.safetensors"], emu = dir[$"emu-{type}.safetensors"];
            var args = new List<string> { "quantize", "--in", model, "--quant-type", type, "--blocksize", "128" };
            if (dq) args.Add("--double-quant");
            var a = CliProcess.Run([.. args, "--out", cpu, "--device", "cpu"]);
            var b = CliProcess.Run([.. args, "--out", emu, "--device", "emulator"]);
            Assert.That(a.ExitCode, Is.EqualTo(0), a.ToString());
            Assert.That(b.ExitCode, Is.EqualTo(0), b.ToString());
            Assert.That(File.ReadAllBytes(emu), Is.EqualTo(File.ReadAllBytes(cpu)), $"{type}: kernels/nf4.cu on the emulator vs the C# reference");
            using var f = SafetensorsFile.Open(cpu);
            Assert.That(f.Contains("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__" + type), Is.True);
            Assert.That(f.Contains("model.layers.0.mlp.up_proj.weight.nested_absmax"), Is.EqualTo(dq));
        }
    }

    private static void AssertFailsCleanly(CliProcess.Result r, string output, params string[] mentions)
    {
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        foreach (var m in mentions) Assert.That(r.Stderr, Does.Contain(m), r.ToString());
        Assert.That(r.Stderr, Does.Not.Contain("   at "), "no stack trace for bad input");
        Assert.That(File.Exists(output), Is.False, "nothing written at the output path");
        var dir = Path.GetDirectoryName(output)!;
        Assert.That(Directory.GetFiles(dir).Where(f => Path.GetFileName(f).StartsWith(Path.GetFileName(output))), Is.Empty, "no temp files left");
    }

    [TestCase("100")]
    [TestCase("16")]
    [TestCase("8192")]
    [TestCase("sixty-four")]
    public void BadBlocksizeIsRejectedNamingTheOption(string blocksize)
    {
        var (model, dir) = DemoModel();
        using var _ = dir;
        var output = dir["out.safetensors"];
        AssertFailsCleanly(CliProcess.Run("quantize", "--in", model, "--out", output, "--blocksize", blocksize), output, "--blocksize");
    }

    [Test]
    public void MissingInputAndUnknownOptionsAreRejected()
    {
        using var dir = CliProcess.TempDir();
        var output = dir["out.safetensors"];
        AssertFailsCleanly(CliProcess.Run("quantize", "--in", dir["missing.safetensors"], "--out", output), output, "missing.safetensors");
        AssertFailsCleanly(CliProcess.Run("quantize", "--in", dir["missing.safetensors"], "--out", output, "--bogus"), output, "--bogus");
        AssertFailsCleanly(CliProcess.Run("quantize", "--in", dir["missing.safetensors"], "--out", output, "--quant-type", "int4"), output, "int4");
    }

    private static byte[] File8(string headerJson, byte[] data)
    {
        var header = Encoding.UTF8.GetBytes(headerJson);
        var bytes = new byte[8 + header.Length + data.Length];
        BitConverter.TryWriteBytes(bytes.AsSpan(0, 8), (ulong)header.Length);
        header.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + header.Length);
        return bytes;
    }

    [Test]
    public void MalformedCheckpointsAreRejectedNamingTheFile()
    {
        var (model, dir) = DemoModel();
        using var _ = dir;
        var output = dir["out.safetensors"];
        var cases = new Dictionary<string, byte[]>
        {
            ["truncated"] = File.ReadAllBytes(model)[..5000],
            ["too-short"] = [1, 2, 3],
            // A header whose offsets point past the data (docs/formats.md: end exclusive, relative to the buffer).
            ["lying-offsets"] = File8("""{"w.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,64]}}""", new byte[16]),
            ["unsupported-dtype"] = File8("""{"w.weight":{"dtype":"Q7","shape":[2,2],"data_offsets":[0,16]}}""", new byte[16]),
            ["not-json"] = File8("""{"w.weight":""", new byte[16]),
        };
        foreach (var (name, bytes) in cases)
        {
            var input = dir[name + ".safetensors"];
            File.WriteAllBytes(input, bytes);
            var r = CliProcess.Run("quantize", "--in", input, "--out", output);
            AssertFailsCleanly(r, output, name + ".safetensors");
        }
    }

    [Test]
    public void QuantizeRefusesToOverwriteItsInput()
    {
        var (model, dir) = DemoModel();
        using var _ = dir;
        var before = File.ReadAllBytes(model);
        var r = CliProcess.Run("quantize", "--in", model, "--out", model);
        Assert.That(r.ExitCode, Is.Not.EqualTo(0), r.ToString());
        Assert.That(File.ReadAllBytes(model), Is.EqualTo(before));
    }

    [Test]
    public void BenchOnTheEmulatorReportsEveryKernelAgainstTheCopy()
    {
        var r = CliProcess.Run("bench", "--device", "emulator", "--elements", "65536", "--json");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        var doc = System.Text.Json.JsonDocument.Parse(r.Stdout);
        var ops = doc.RootElement.GetProperty("rows").EnumerateArray().Select(e => e.GetProperty("op").GetString()).ToList();
        Assert.That(ops, Is.SupersetOf(new[] { "quantize_4bit_nf4_bf16", "dequantize_4bit_nf4_bf16" }));
        foreach (var row in doc.RootElement.GetProperty("rows").EnumerateArray())
            Assert.That(row.GetProperty("ms").GetDouble(), Is.GreaterThan(0));
    }
}

/// <summary>`nativepeft dequantize` against docs/quant-contract.md's decode rule, computed here from the raw file bytes.</summary>
[Parallelizable(ParallelScope.None)]
public class DequantizeCliTests
{
    // docs/quant-contract.md, NF4 code, index 0..15
    private static readonly float[] Nf4 =
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    ];

    [Test]
    public void DequantizeDecodesEveryNibbleAsCodeTimesAbsmax()
    {
        using var dir = CliProcess.TempDir();
        string model = dir["m.safetensors"], q = dir["q.safetensors"], back = dir["back.safetensors"], backEmu = dir["back-emu.safetensors"];
        Assert.That(CliProcess.Run("demo-checkpoint", "--out", model, "--layers", "1", "--hidden", "64", "--intermediate", "96", "--vocab", "32").ExitCode, Is.EqualTo(0));
        var r = CliProcess.Run("quantize", "--in", model, "--out", q, "--blocksize", "32");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        r = CliProcess.Run("dequantize", "--in", q, "--out", back, "--dtype", "fp32");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("7 4-bit weights dequantized"));
        r = CliProcess.Run("dequantize", "--in", q, "--out", backEmu, "--dtype", "fp32", "--device", "emulator");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(File.ReadAllBytes(backEmu), Is.EqualTo(File.ReadAllBytes(back)), "kernels on the emulator vs the C# reference");

        using var qf = SafetensorsFile.Open(q);
        using var bf = SafetensorsFile.Open(back);
        using var mf = SafetensorsFile.Open(model);
        Assert.That(bf.Tensors.Select(t => t.Name), Is.EquivalentTo(mf.Tensors.Select(t => t.Name)), "the original tensor names come back");
        const string w = "model.layers.0.mlp.down_proj.weight";
        var packed = qf.GetSpan<byte>(w);
        var absmax = qf.GetSpan<float>(w + ".absmax");
        var restored = bf.GetSpan<float>(w);
        Assert.That(bf.GetInfo(w).Shape, Is.EqualTo(mf.GetInfo(w).Shape));
        for (int i = 0; i < restored.Length; i++)
        {
            int nibble = (i & 1) == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 15; // docs/quant-contract.md: element 2j in the high nibble
            Assert.That(restored[i], Is.EqualTo(Nf4[nibble] * absmax[i / 32]), $"element {i}");
        }
        Assert.That(bf.GetBytes("model.norm.weight").SequenceEqual(mf.GetBytes("model.norm.weight")), Is.True);
    }
}
