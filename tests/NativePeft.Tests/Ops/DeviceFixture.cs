using NativePeft.Numerics;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>
/// The device fixture of the kernel-launcher tests, run as [TestFixture("emulated")] and [TestFixture("cuda")]: the
/// emulator always (a missing libnativepeft_emu is a failure), CUDA when a device exists (each test is ignored with
/// "no CUDA device: …" otherwise). Creates the launcher under test once per fixture, fails a test when one of the
/// launcher's kernels is not loaded, and frees after each test the device memory taken with <see cref="Alloc"/>. On the
/// emulator every launch runs under the race checks (<see cref="EmulatorChecks.All"/>).
/// </summary>
[TestFixture("emulated")]
[TestFixture("cuda")]
public abstract class DeviceFixture<TOps>(string device) where TOps : class
{
    private IGpu? _gpu;
    private string? _ignoreReason;
    private readonly List<DevicePtr> _allocations = new();

    /// <summary>"emulated" or "cuda" (the argument of the fixture attributes, inherited by every derived fixture).</summary>
    protected string Device { get; } = device;

    /// <summary>The device (set for every test that is not ignored).</summary>
    protected IGpu Gpu => _gpu!;

    /// <summary>The launcher under test, on <see cref="Gpu"/>.</summary>
    protected TOps Ops { get; private set; } = null!;

    protected abstract TOps CreateOps(IGpu gpu);

    /// <summary>Kernels that must be loaded on the device (a sample of the launcher's kernel files).</summary>
    protected abstract IEnumerable<string> RequiredKernels { get; }

    /// <summary>The failure when <paramref name="kernel"/> is missing.</summary>
    protected virtual string MissingKernelMessage(string kernel) =>
        $"{Device}: kernel {kernel} is not loaded (build build/kernels/*.ptx / libnativepeft_emu)";

    [OneTimeSetUp]
    public void CreateDevice()
    {
        _gpu = Device == "emulated" ? TestGpus.CreateEmulated() : TestGpus.TryCreateCuda(out _ignoreReason);
        if (_gpu is not null)
            Ops = CreateOps(_gpu);
        // Every kernel these fixtures launch on the emulator runs under the race checks (shuffled thread order,
        // deferred poisoned cp.async, poisoned shared memory at block start, strict collectives): a correct kernel
        // gives the same bits under them, so every assertion stays as it is, and a race becomes a wrong result.
        if (_gpu is EmulatedGpu emu)
            emu.SetChecks(EmulatorChecks.All, FixtureSeed);
    }

    /// <summary>The race checks' seed of this fixture: fixed per fixture class (a failure reproduces run to run).</summary>
    private ulong FixtureSeed => GetType().Name.Aggregate(17UL, (h, c) => h * 31 + c);

    /// <summary>
    /// On the emulator: <paramref name="run"/> under the race checks with another <paramref name="seed"/> (another
    /// thread order), then the fixture's checks again. Elsewhere: null.
    /// </summary>
    protected T? UnderOtherSchedule<T>(ulong seed, Func<T> run) where T : class
    {
        if (_gpu is not EmulatedGpu emu)
            return null;
        emu.SetChecks(EmulatorChecks.All, seed);
        try
        {
            return run();
        }
        finally
        {
            emu.SetChecks(EmulatorChecks.All, FixtureSeed);
        }
    }

    [SetUp]
    public void RequireDevice()
    {
        if (_gpu is null)
            Assert.Ignore($"no CUDA device: {_ignoreReason}");
        foreach (string k in RequiredKernels)
        {
            if (!_gpu.HasKernel(k))
                Assert.Fail(MissingKernelMessage(k));
        }
    }

    [TearDown]
    public void FreeBuffers()
    {
        foreach (DevicePtr p in _allocations) _gpu?.Free(p);
        _allocations.Clear();
    }

    [OneTimeTearDown]
    public void DisposeDevice()
    {
        if (_gpu is EmulatedGpu emu) emu.SetChecks(emu.DefaultChecks);
        _gpu?.Dispose();
    }

    // ------------------------------------------------------------------------------------------
    // Device buffers (freed after the test)
    // ------------------------------------------------------------------------------------------

    /// <summary>max(bytes, 1) bytes of device memory, freed after the test.</summary>
    protected DevicePtr Alloc(long bytes)
    {
        DevicePtr p = Gpu.Alloc(Math.Max(bytes, 1));
        _allocations.Add(p);
        return p;
    }

    /// <summary>A copy of <paramref name="values"/> on the device, as they are.</summary>
    protected DevicePtr Upload<T>(T[] values) where T : unmanaged
    {
        DevicePtr p = Alloc((long)values.Length * System.Runtime.CompilerServices.Unsafe.SizeOf<T>());
        Gpu.CopyToDevice<T>(values, p);
        return p;
    }

    /// <summary>A copy of <paramref name="values"/> on the device in dtype (F32 or BF16: rounded to nearest even).</summary>
    protected DevicePtr Upload(float[] values, DType dtype)
    {
        DevicePtr p = Alloc((long)values.Length * dtype.ElementSize());
        Write(p, values, dtype);
        return p;
    }

    /// <summary>Copies <paramref name="values"/> to <paramref name="p"/> in dtype (F32 or BF16: rounded to nearest even).</summary>
    protected void Write(DevicePtr p, float[] values, DType dtype)
    {
        if (dtype == DType.F32)
        {
            Gpu.CopyToDevice<float>(values, p);
        }
        else
        {
            var b = new BFloat16[values.Length];
            BFloat16.FromSingle(values, b);
            Gpu.CopyToDevice<BFloat16>(b, p);
        }
    }

    /// <summary>n values of dtype (F32 or BF16) at p, widened to float.</summary>
    protected float[] Download(DevicePtr p, int n, DType dtype)
    {
        var r = new float[n];
        if (dtype == DType.F32)
        {
            Gpu.CopyToHost<float>(p, r);
        }
        else
        {
            var b = new BFloat16[n];
            Gpu.CopyToHost<BFloat16>(p, b);
            BFloat16.ToSingle(b, r);
        }
        return r;
    }

    /// <summary>Synchronizes, then n values of T at p, as they are.</summary>
    protected T[] Download<T>(DevicePtr p, int n) where T : unmanaged
    {
        Gpu.Synchronize();
        var r = new T[n];
        Gpu.CopyToHost<T>(p, r);
        return r;
    }
}
