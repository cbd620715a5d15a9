using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>The devices the op tests run on.</summary>
internal static class TestGpus
{
    /// <summary>The emulator; a missing or broken libnativepeft_emu fails the test (it must always run).</summary>
    public static IGpu CreateEmulated()
    {
        if (!EmulatedGpu.TryCreate(out EmulatedGpu? gpu, out string reason))
            Assert.Fail($"the emulator must be available (build build/kernels/libnativepeft_emu.so): {reason}");
        return gpu!;
    }

    /// <summary>
    /// GpuOps over the fixture's device: "emulator" (always), or "cuda" — the fixture is ignored with "no CUDA device:
    /// reason" when there is none.
    /// </summary>
    public static NativePeft.Ops.GpuOps CreateOps(string device)
    {
        string reason = "";
        var gpu = device == "emulator" ? CreateEmulated() : TryCreateCuda(out reason);
        if (gpu is null) Assert.Ignore("no CUDA device: " + reason);
        return new NativePeft.Ops.GpuOps(gpu!, ownsGpu: true);
    }

    /// <summary>
    /// Set (to 1) by gpu-check on a GPU machine: there, an unavailable CUDA device or cuBLAS is a failure with its reason,
    /// not a "no CUDA device" skip of every CUDA test.
    /// </summary>
    public const string RequireCudaVariable = "NATIVEPEFT_REQUIRE_CUDA";

    public static bool CudaRequired => Environment.GetEnvironmentVariable(RequireCudaVariable) == "1";

    /// <summary>The CUDA device, or null with the reason there is none (a failure when <see cref="CudaRequired"/>).</summary>
    public static IGpu? TryCreateCuda(out string reason)
    {
        if (!CudaGpu.TryCreate(out CudaGpu? gpu, out reason))
        {
            if (CudaRequired)
                Assert.Fail($"{RequireCudaVariable}=1 but the CUDA device is unavailable: {reason}");
            return null;
        }
        return gpu;
    }
}
