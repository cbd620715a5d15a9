using NativePeft.Runtime;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.Runtime;

/// <summary>
/// The NVTX ranges a profiler sees: `train` runs under a minimal NVTX tool (tests/native/nvtx_recorder.cpp, injected
/// through NVTX_INJECTION64_PATH exactly as Nsight Systems injects its own), which writes every push and pop to a file.
/// The file must show the step's structure — train step > forward/backward > layer k > attention/mlp blocks, and the
/// optimizer step — with every range closed; and without a tool the CLI says the ranges are off.
/// </summary>
public class NvtxTests
{
    private static string? RecorderPath()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, "build", "test-native", "libnativepeft_nvtx_recorder.so");
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    private static bool InSourceCheckout()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "NativePeft.sln"))) return true;
        return false;
    }

    [Test]
    public void TrainUnderAnNvtxToolEmitsNestedRangesByLayerAndOp()
    {
        if (!OperatingSystem.IsLinux()) Assert.Ignore("the test NVTX tool is built on Linux only");
        if (!File.Exists(Nvtx.LibraryPath)) Assert.Ignore($"{Nvtx.LibraryPath} was not built (no NVTX v3 headers at build time)");
        var recorder = RecorderPath();
        if (recorder is null)
        {
            // The GPU bundle ships libnativepeft_nvtx but not the test tool; a source checkout builds both.
            if (!InSourceCheckout()) Assert.Ignore("not a source checkout: the test NVTX tool (build/test-native) is not shipped");
            Assert.Fail("build/test-native/libnativepeft_nvtx_recorder.so was not built beside libnativepeft_nvtx");
        }
        using var dir = CliProcess.TempDir();
        var log = dir["nvtx.log"];
        var env = new Dictionary<string, string?> { ["NVTX_INJECTION64_PATH"] = recorder!, ["NATIVEPEFT_NVTX_TEST_LOG"] = log, ["NATIVEPEFT_NVTX"] = null };
        var r = CliProcess.RunWith(env, "train", "--model", "builtin", "--data", "builtin", "--method", "lora", "--steps", "2",
            "--batch", "2", "--seq", "16", "--out", dir["out"]);
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(File.Exists(log), "the NVTX tool was not loaded (no log written)");

        // Replay the log: a stack of open ranges; each push must come at the depth the tool reports.
        var stack = new Stack<string>();
        var paths = new List<string>();
        foreach (var line in File.ReadLines(log))
        {
            var parts = line.Split(' ', 3);
            if (parts[0] == "push")
            {
                Assert.That(int.Parse(parts[1]), Is.EqualTo(stack.Count), $"depth of '{line}'");
                stack.Push(parts[2]);
                paths.Add(string.Join(" > ", stack.Reverse()));
            }
            else
            {
                Assert.That(stack, Is.Not.Empty, "a pop with no open range");
                stack.Pop();
            }
        }
        Assert.That(stack, Is.Empty, "ranges left open: " + string.Join(" > ", stack.Reverse()));

        int layers = 4; // num_hidden_layers of the built-in model (src/NativePeft.Cli/builtin-model/config.json)
        Assert.Multiple(() =>
        {
            Assert.That(paths.Count(p => p == "train step"), Is.EqualTo(2), "one range per optimizer step");
            Assert.That(paths, Has.Member("train step > forward > embedding"));
            for (int l = 0; l < layers; l++)
            {
                Assert.That(paths, Has.Member($"train step > forward > layer {l} > attention block > attention"));
                Assert.That(paths, Has.Member($"train step > forward > layer {l} > mlp block"));
                Assert.That(paths, Has.Member($"train step > backward > layer {l} > attention block > attention"));
                Assert.That(paths, Has.Member($"train step > backward > layer {l} > mlp block"));
            }
            Assert.That(paths, Has.Member("train step > forward > final norm + lm_head + cross-entropy"));
            Assert.That(paths, Has.Member("train step > optimizer step"));
            Assert.That(paths, Has.No.Member($"train step > forward > layer {layers} > mlp block"), "no more layers than the model has");
        });
    }

    [Test]
    public void WithoutAToolTheRangesAreOffAndInfoSaysWhy()
    {
        var env = new Dictionary<string, string?> { ["NVTX_INJECTION64_PATH"] = null, ["NATIVEPEFT_NVTX"] = null };
        var r = CliProcess.RunWith(env, "info");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("NVTX ranges"));
        Assert.That(r.Stdout, Does.Contain("NVTX_INJECTION64_PATH is not set"));
    }
}
