namespace NativePeft.Runtime;

/// <summary>How many CUDA devices this machine has, without creating a context on any of them (a launcher checks
/// <c>--nproc</c> against it before starting one worker per device).</summary>
public static class CudaDevices
{
    /// <summary>
    /// The number of CUDA devices (cuInit + cuDeviceGetCount). Never throws: false with a reason ("CUDA driver library
    /// … not found", "cuInit: …") when the driver cannot say; a driver without devices is true with 0.
    /// </summary>
    public static bool TryCount(out int count, out string reason)
    {
        count = 0;
        try
        {
            if (!NativeLibraries.TryLoadCuda(out _, out _))
            {
                reason = $"CUDA driver library {NativeLibraries.CudaLibraryDisplayName} not found";
                return false;
            }
            var init = CudaDriver.cuInit(0);
            if (init == CuResult.NoDevice) { reason = ""; return true; } // a driver, no device: 0
            if (init != CuResult.Success)
            {
                reason = $"cuInit: {CudaDriver.ErrorName(init)} ({(int)init})";
                return false;
            }
            var r = CudaDriver.cuDeviceGetCount(out count);
            if (r != CuResult.Success)
            {
                count = 0;
                reason = $"cuDeviceGetCount: {CudaDriver.ErrorName(r)} ({(int)r})";
                return false;
            }
            reason = "";
            return true;
        }
        catch (Exception ex)
        {
            reason = $"CUDA driver unusable: {ex.GetType().Name}: {ex.Message}";
            return false;
        }
    }
}
