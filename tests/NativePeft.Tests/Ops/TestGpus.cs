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

    /// <summary>The CUDA device, or null with the reason there is none.</summary>
    public static IGpu? TryCreateCuda(out string reason)
    {
        if (!CudaGpu.TryCreate(out CudaGpu? gpu, out reason))
            return null;
        return gpu;
    }
}
