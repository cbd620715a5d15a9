using System.Text.Json;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Planning;
using NativePeft.Runtime;
using NativePeft.Tests.Cli;
using NativePeft.Tests.Ops;
using NativePeft.Tests.Training;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Planning;

/// <summary>
/// Device out of memory, forced (issue 10): `--device-memory` caps what a run may hold on the device, so the emulator
/// shows what a full GPU shows — one line with the plan's total, what was free and the options that would fit, before
/// anything is loaded or written; and a device that refuses the pool's memory after the plan fitted (another process
/// took it) gives the same kind of line, never the driver's bare error.
/// </summary>
[Parallelizable(ParallelScope.None)]
public class DeviceMemoryLimitTests
{
    /// <summary>The total of train's plan for these options, from `estimate --json` (the plan the run checks).</summary>
    private static long EstimateTotal(string method)
    {
        // --embedding device: the alternatives keep the run's embedding placement (a QLoRA run of its own would put an
        // untied embedding on the host by default, a little less)
        var r = CliProcess.Run("estimate", "--model", "builtin", "--method", method, "--batch", "4", "--seq", "64", "--dropout", "0.05",
            "--embedding", "device", "--json");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        using var doc = JsonDocument.Parse(r.Stdout);
        return doc.RootElement.GetProperty("total_bytes").GetInt64();
    }

    /// <summary>A small text file (no built-in task: no exact-match generation at the end, which is slow on the emulator).</summary>
    private static string TextData(TempDir dir)
    {
        string path = dir["data.txt"];
        File.WriteAllText(path, string.Concat(Enumerable.Repeat("upper: word -> WORD. the quick brown fox jumps over the lazy dog.\n", 8)));
        return path;
    }

    private static string[] Train(string outDir, string data, string method, string limit) =>
    [
        "train", "--model", "builtin", "--data", data, "--method", method, "--steps", "1", "--batch", "4", "--seq", "64",
        "--device", "emulator", "--device-memory", limit, "--out", outDir,
    ];

    [Test]
    public void ARunOverTheLimitStopsBeforeLoadingWithThePlanTheFreeMemoryAndTheOptionsThatFit()
    {
        long lora = EstimateTotal("lora"), qlora = EstimateTotal("qlora");
        Assert.That(qlora, Is.LessThan(lora), "the built-in model's QLoRA plan is the smaller one");
        long between = (lora + qlora) / 2;
        using var dir = CliProcess.TempDir();
        string data = TextData(dir);
        var r = CliProcess.Run(Train(dir["run"], data, "lora", between.ToString(System.Globalization.CultureInfo.InvariantCulture)));
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        string line = r.Stderr.Trim();
        Assert.That(line.Split('\n'), Has.Length.EqualTo(1), "one line");
        Assert.That(line, Does.StartWith($"error: --device-memory {MemoryPlan.FormatBytes(between)}: the run exceeds the memory limit ({MemoryPlan.FormatBytes(between)}; the device has "));
        Assert.That(line, Does.Contain($"plan total {MemoryPlan.FormatBytes(lora)}; options that would make it fit: ")
            .And.Contain($"--method qlora ({MemoryPlan.FormatBytes(qlora)})"));
        Assert.That(line, Does.Not.Contain("CUDA_ERROR").And.Not.Contain("   at "), "no driver code, no stack trace");
        Assert.That(Directory.Exists(dir["run"]), Is.False, "nothing written");

        // The option it named fits the same limit, and the run trains.
        var q = CliProcess.Run(Train(dir["q"], data, "qlora", between.ToString(System.Globalization.CultureInfo.InvariantCulture)));
        Assert.That(q.ExitCode, Is.EqualTo(0), q.ToString());
        Assert.That(File.Exists(Path.Combine(dir["q"], "adapter", "adapter_model.safetensors")), Is.True);
    }

    [Test]
    public void NoOptionFittingSaysSoWithEveryAlternativesTotal()
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run(Train(dir["run"], TextData(dir), "lora", "64KiB"));
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        Assert.That(r.Stderr, Does.Contain("error: --device-memory 64.0 KiB: the run exceeds the memory limit (64.0 KiB; the device has "));
        Assert.That(r.Stderr, Does.Contain("no option makes it fit (--method qlora: ").And.Contain("use a smaller model or a larger device"));
    }

    [TestCase("train", "--model", "builtin", "--data", "builtin", "--out", "OUT", "--device", "cpu", "--device-memory", "1GiB")]
    [TestCase("generate", "--prompt", "x", "--device", "cpu", "--device-memory", "1GiB")]
    [TestCase("train", "--model", "builtin", "--data", "builtin", "--out", "OUT", "--device", "emulator", "--device-memory", "lots")]
    [TestCase("train", "--model", "builtin", "--data", "builtin", "--out", "OUT", "--device", "emulator", "--device-memory", "-5GiB")]
    [TestCase("bench", "--device", "cpu", "--device-memory", "1GiB")]
    [TestCase("bench", "--device", "cpu", "--profile")]
    public void AMemoryLimitThatCannotApplyIsRefusedNamingTheOption(params string[] args)
    {
        using var dir = CliProcess.TempDir();
        var r = CliProcess.Run(args.Select(a => a == "OUT" ? dir["out"] : a).ToArray());
        Assert.That(r.ExitCode, Is.EqualTo(2), r.ToString());
        string option = args.Contains("--profile") ? "--profile" : "--device-memory";
        Assert.That(r.Stderr, Does.StartWith("error: " + option), r.ToString());
        Assert.That(Directory.Exists(dir["out"]), Is.False);
    }

    [Test]
    public void GenerationOverTheLimitNamesItsPlan()
    {
        var r = CliProcess.Run("generate", "--prompt", "upper: abc\n", "--device", "emulator", "--device-memory", "100KiB");
        Assert.That(r.ExitCode, Is.EqualTo(1), r.ToString());
        // As train: the refusal names the limit in force (ModelSession, one rule for train, generate and eval).
        Assert.That(r.Stderr, Does.StartWith("error: --device-memory 100.0 KiB: the generation exceeds the memory limit (100.0 KiB; the device has "));
        Assert.That(r.Stderr, Does.Contain("plan total "));
    }

    /// <summary>
    /// The device refuses the pool although its reported free memory fitted the plan (another process took it in
    /// between): a <see cref="PlanDoesNotFitException"/> naming the plan's total and what is free, with nothing left
    /// allocated.
    /// </summary>
    [Test]
    public void ADeviceThatRefusesThePoolAfterThePlanFittedGivesThePlanLine()
    {
        var plan = MemoryPlan.Compute(TrainingKit.Config, new PlanOptions { Method = FineTuneMethod.Lora, Rank = 4, Batch = 2, Seq = 16 });
        using var emu = TestGpus.CreateEmulated();
        var gpu = new RefusingGpu(emu, refuseAbove: 4096);
        var e = Assert.Throws<PlanDoesNotFitException>(() => DevicePlanning.TrainingPool(gpu, plan))!;
        TestContext.Out.WriteLine(e.Message);
        Assert.That(e.Message, Does.StartWith($"could not be reserved: plan total {MemoryPlan.FormatBytes(plan.TotalBytes)}, the device's free memory ("));
        Assert.That(e.Message, Does.Contain("taken by another process"));
        Assert.That(((EmulatedGpu)emu).AllocatedBytes, Is.EqualTo(0), "the arenas reserved before the refusal are released");
        // Under a limit the plan exceeds, the same call names the limit and the options instead, before any allocation.
        var limited = Assert.Throws<PlanDoesNotFitException>(() => DevicePlanning.TrainingPool(gpu, plan, limit: plan.TotalBytes - 1))!;
        Assert.That(limited.Message, Does.StartWith($"exceeds the memory limit ({MemoryPlan.FormatBytes(plan.TotalBytes - 1)}; the device has "));
        Assert.That(gpu.Refusals, Is.EqualTo(1), "the limit is checked before the device is asked");
    }

    /// <summary>An emulator that reports its free memory but refuses any allocation above a size, as a device does whose
    /// memory another process took after the query.</summary>
    private sealed class RefusingGpu(IGpu inner, long refuseAbove) : IGpu
    {
        public int Refusals { get; private set; }
        public GpuProperties Properties => inner.Properties;
        public DevicePtr Alloc(long bytes)
        {
            if (bytes > refuseAbove)
            {
                Refusals++;
                throw new OutOfMemoryException($"device out of memory: requested {bytes} bytes");
            }
            return inner.Alloc(bytes);
        }
        public DevicePtr AllocManaged(long bytes) => Alloc(bytes);
        public void Free(DevicePtr ptr) => inner.Free(ptr);
        public void CopyToDevice<T>(ReadOnlySpan<T> source, DevicePtr destination) where T : unmanaged => inner.CopyToDevice(source, destination);
        public void CopyToHost<T>(DevicePtr source, Span<T> destination) where T : unmanaged => inner.CopyToHost(source, destination);
        public void CopyDeviceToDevice(DevicePtr source, DevicePtr destination, long bytes) => inner.CopyDeviceToDevice(source, destination, bytes);
        public void Memset(DevicePtr ptr, byte value, long bytes) => inner.Memset(ptr, value, bytes);
        public void Prefetch(DevicePtr ptr, long bytes, bool toDevice) => inner.Prefetch(ptr, bytes, toDevice);
        public void Launch(string kernel, Dim3 grid, Dim3 block, int sharedBytes, params ReadOnlySpan<KernelArg> args) =>
            inner.Launch(kernel, grid, block, sharedBytes, args);
        public void Gemm(bool transA, bool transB, int m, int n, int k, float alpha, DevicePtr a, DevicePtr b, float beta, DevicePtr c,
            NativePeft.Numerics.DType inputs, NativePeft.Numerics.DType output) => inner.Gemm(transA, transB, m, n, k, alpha, a, b, beta, c, inputs, output);
        public bool HasKernel(string kernel) => inner.HasKernel(kernel);
        public void Synchronize() => inner.Synchronize();
        public (long Free, long Total) MemoryInfo() => inner.MemoryInfo();
        public void Dispose() { }
    }
}
