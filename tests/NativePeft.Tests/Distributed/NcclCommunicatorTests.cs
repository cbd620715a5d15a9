using NativePeft.Distributed;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using NativePeft.Tests.Cli;
using NUnit.Framework;

namespace NativePeft.Tests.Distributed;

/// <summary>Where libnccl.so.2 is looked for (a fake machine in a temporary folder), and how the backend is chosen.</summary>
public class NcclLibraryTests
{
    private static string Touch(string root, string relative)
    {
        string path = Path.Combine(root, relative);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllBytes(path, []);
        return path;
    }

    private static ProbeEnvironment Fake(string root, Dictionary<string, string> vars) => new()
    {
        Root = root,
        GetVariable = v => vars.GetValueOrDefault(v),
        LdconfigCache = () => null,
        IncludeDefaultLoader = false,
    };

    [Test]
    public void AMissingLibraryIsAMessageListingWhereItLooked()
    {
        if (!OperatingSystem.IsLinux()) Assert.Ignore("the Linux search");
        using var dir = CliProcess.TempDir();
        string root = dir["root"];
        string mine = Touch(root, "opt/mine/libnccl.so.2");           // empty files: present, but not loadable
        string wheel = Touch(root, "venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2");
        Directory.CreateDirectory(Path.Combine(root, "usr/local/cuda/lib64"));
        var env = Fake(root, new()
        {
            [NcclLibrary.PathVariable] = mine,
            ["CUDA_HOME"] = Path.Combine(root, "opt/cuda"),
            ["VIRTUAL_ENV"] = Path.Combine(root, "venv"),
        });

        var candidates = NcclLibrary.Candidates(env).ToList();
        Assert.That(candidates[0].Source, Is.EqualTo("NATIVEPEFT_NCCL"));
        Assert.That(candidates[0].Path, Is.EqualTo(mine));
        Assert.That(candidates.Select(c => c.Path), Does.Contain(wheel), "PyTorch's pip wheel folder nvidia/nccl/lib");
        Assert.That(candidates.FindIndex(c => c.Path == wheel), Is.GreaterThan(candidates.FindIndex(c => c.Source == "CUDA_HOME")));

        var (handle, report) = NcclLibrary.Probe(env);
        Assert.That(handle, Is.EqualTo(IntPtr.Zero));
        string message = NcclLibrary.MissingMessage(report);
        Assert.That(message, Does.StartWith("NCCL (libnccl.so.2) was not found"));
        Assert.That(message, Does.Contain($"NATIVEPEFT_NCCL: {Path.GetDirectoryName(mine)}: libnccl.so.2 failed"));
        Assert.That(message, Does.Contain(Path.GetDirectoryName(wheel)! + ": libnccl.so.2 failed"));
        Assert.That(message, Does.Contain(Path.Combine(root, "usr/local/cuda/lib64") + ": no libnccl.so.2"));
        Assert.That(message, Does.Contain("set NATIVEPEFT_NCCL"));
    }

    [Test]
    public void TheFirstCandidateThatLoadsIsUsed()
    {
        if (!OperatingSystem.IsLinux()) Assert.Ignore("the Linux search");
        using var dir = CliProcess.TempDir();
        string root = dir["root"];
        Touch(root, "opt/cuda/lib64/libnccl.so.2");
        string wheel = Touch(root, "venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2");
        var env = Fake(root, new() { ["CUDA_HOME"] = Path.Combine(root, "opt/cuda"), ["VIRTUAL_ENV"] = Path.Combine(root, "venv") });
        var (handle, report) = NcclLibrary.Probe(env, path => path == wheel ? (new IntPtr(42), null) : (IntPtr.Zero, "wrong ELF class"));
        Assert.That(handle, Is.EqualTo(new IntPtr(42)));
        Assert.That(report.Loaded!.Candidate.Path, Is.EqualTo(wheel));
        Assert.That(report.Lines(), Does.Contain($"CUDA_HOME: {Path.Combine(root, "opt/cuda/lib64")}: libnccl.so.2 failed: wrong ELF class"));
    }

    [TestCase(22703, "2.27.3")]
    [TestCase(21903, "2.19.3")]
    [TestCase(2708, "2.7.8")]
    public void VersionCodesAreReadAsNcclWritesThem(int code, string text) => Assert.That(NcclLibrary.VersionText(code), Is.EqualTo(text));

    [Test]
    public void TheBackendIsChosenByTheDevice()
    {
        var options = new DistributedOptions { Rank = 0, WorldSize = 1 };
        using (var cpu = new CpuOps())
        {
            using var auto = Communicator.Create(options, cpu);
            Assert.That(auto, Is.TypeOf<TcpCommunicator>());
            Assert.That(auto.Backend, Is.EqualTo("cpu"));
            var e = Assert.Throws<ArgumentException>(() => Communicator.Create(options with { Backend = "nccl" }, cpu));
            Assert.That(e!.Message, Does.Contain("the nccl backend needs a CUDA device"));
            var bad = Assert.Throws<ArgumentException>(() => Communicator.Create(options with { Backend = "mpi" }, cpu));
            Assert.That(bad!.Message, Does.Contain("unknown distributed backend 'mpi'"));
        }
        using var emu = new GpuOps(NativePeft.Tests.Ops.TestGpus.CreateEmulated(), ownsGpu: true);
        using var onEmulator = Communicator.Create(options, emu);
        Assert.That(onEmulator.Backend, Is.EqualTo("cpu"), "the emulator's tensors are host memory");
    }

    [Test]
    public void InfoReportsNccl()
    {
        var r = CliProcess.Run("info");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.ToString());
        Assert.That(r.Stdout, Does.Contain("NCCL"));
        Assert.That(r.Stdout, Does.Contain("  NCCL: "), "the folders searched for libnccl.so.2");
    }
}

/// <summary>A real 1-rank NCCL communicator on the CUDA device; "no CUDA device: reason" (or no NCCL) is a skip.</summary>
[NonParallelizable]
public class NcclCommunicatorCudaTests
{
    private CudaGpu? _gpu;
    private string _reason = "";

    [OneTimeSetUp]
    public void OpenDevice() => _gpu = (CudaGpu?)NativePeft.Tests.Ops.TestGpus.TryCreateCuda(out _reason);

    [OneTimeTearDown]
    public void CloseDevice() => _gpu?.Dispose();

    private GpuOps Ops()
    {
        if (_gpu is null) Assert.Ignore("no CUDA device: " + _reason);
        if (!NcclLibrary.TryLoad(out _, out string why)) Assert.Ignore("no NCCL: " + why);
        return new GpuOps(_gpu!, ownsGpu: false);
    }

    [Test]
    public void OneRankAllReduceWithPremultiplyBroadcastAndAsync()
    {
        using var ops = Ops();
        using var comm = Communicator.Create(new DistributedOptions { Rank = 0, WorldSize = 1, Timeout = TimeSpan.FromSeconds(30) }, ops);
        Assert.That(comm, Is.TypeOf<NcclCommunicator>());
        var t = ops.Memory.Allocate(DType.F32, 4);
        ops.Upload(new[] { 1f, 3f, -5f, 0.1f }.AsSpan(), t);
        comm.AllReduce(ops, t, 0.5);
        var got = new float[4];
        ops.Download(t, got.AsSpan());
        Assert.That(got, Is.EqualTo(new[] { 0.5f, 1.5f, -2.5f, 0.1f * 0.5f }));

        comm.Broadcast(ops, t, 0);
        ops.Download(t, got.AsSpan());
        Assert.That(got, Is.EqualTo(new[] { 0.5f, 1.5f, -2.5f, 0.1f * 0.5f }));

        var b = ops.Memory.Allocate(DType.BF16, 3);
        ops.Upload(new[] { BFloat16.FromSingle(2f), BFloat16.FromSingle(-6f), BFloat16.FromSingle(1f) }.AsSpan(), b);
        var first = comm.AllReduceAsync(ops, t, 2.0);
        var second = comm.AllReduceAsync(ops, b, 0.25);
        first.Wait();
        second.Wait();
        ops.Download(t, got.AsSpan());
        Assert.That(got, Is.EqualTo(new[] { 1f, 3f, -5f, 0.1f * 0.5f * 2f }));
        var bf = new BFloat16[3];
        ops.Download(b, bf.AsSpan());
        Assert.That(bf.Select(x => x.ToSingle()), Is.EqualTo(new[] { 0.5f, -1.5f, 0.25f }));

        var gathered = ops.Memory.Allocate(DType.F32, 4);
        var scattered = ops.Memory.Allocate(DType.F32, 4);
        var nccl = (NcclCommunicator)comm;
        nccl.AllGatherAsync(ops, t, gathered).Wait();
        nccl.ReduceScatterAsync(ops, gathered, scattered).Wait();
        ops.Download(scattered, got.AsSpan());
        Assert.That(got, Is.EqualTo(new[] { 1f, 3f, -5f, 0.1f * 0.5f * 2f }), "1 rank: all-gather and reduce-scatter copy");

        var host = new[] { 1.5, -2.0 };
        comm.AllReduceHost(host);
        comm.Barrier();
        Assert.That(host, Is.EqualTo(new[] { 1.5, -2.0 }));
        TestContext.Out.WriteLine($"NCCL {NcclLibrary.Version()} from {NcclLibrary.Report().Summary}");
    }

    [Test]
    public void TheCpuBackendStagesCudaTensorsThroughTheHost()
    {
        using var probe = Ops();
        var comms = CommTestRanks.Open(2);
        try
        {
            var got = CommTestRanks.Run(2, r =>
            {
                using var ops = new GpuOps(_gpu!, ownsGpu: false);
                var t = ops.Memory.Allocate(DType.F32, 3);
                ops.Upload(new[] { 1f + r, 10f * r, -2f }.AsSpan(), t);
                comms[r].AllReduceAsync(ops, t, 0.5).Wait();
                var result = new float[3];
                ops.Download(t, result.AsSpan());
                return result;
            });
            foreach (var result in got) Assert.That(result, Is.EqualTo(new[] { 1.5f, 5f, -2f }));
        }
        finally { CommTestRanks.DisposeAll(comms); }
    }

    [Test]
    public void AbortEndsLaterCollectivesWithTheReason()
    {
        using var ops = Ops();
        using var comm = new NcclCommunicator(new DistributedOptions { Rank = 0, WorldSize = 1 }, ops);
        comm.Abort("stopping on purpose");
        var t = ops.Memory.Allocate(DType.F32, 2);
        var e = Assert.Throws<CommunicatorException>(() => comm.AllReduce(ops, t));
        Assert.That(e!.Message, Does.StartWith("rank 0: stopping on purpose"));
    }
}
