namespace NativePeft.Runtime;

/// <summary>Picks the device the user asked for: "cuda", "emulator", or "auto" (CUDA when present, else the emulator).</summary>
public static class GpuFactory
{
    public static readonly string[] DeviceNames = ["auto", "cuda", "emulator"];

    /// <summary>
    /// Returns the device, or null with the reason it could not be created. <paramref name="deviceOrdinal"/> picks the
    /// CUDA device (a data-parallel rank's LOCAL_RANK); the emulator has one.
    /// </summary>
    public static IGpu? TryCreate(string device, out string reason, int deviceOrdinal = 0)
    {
        switch (device.ToLowerInvariant())
        {
            case "cuda":
                return CudaGpu.TryCreate(out var cuda, out reason, deviceOrdinal) ? cuda : null;
            case "emulator":
                return EmulatedGpu.TryCreate(out var emu, out reason) ? emu : null;
            case "auto":
                if (CudaGpu.TryCreate(out var c, out var cudaReason, deviceOrdinal)) { reason = ""; return c; }
                if (EmulatedGpu.TryCreate(out var e, out var emuReason)) { reason = "CUDA unavailable (" + cudaReason + "): using the emulator"; return e; }
                reason = $"CUDA unavailable ({cudaReason}); emulator unavailable ({emuReason})";
                return null;
            default:
                reason = $"unknown device '{device}': expected one of {string.Join(", ", DeviceNames)}";
                return null;
        }
    }

    public static IGpu Create(string device) =>
        TryCreate(device, out var reason) ?? throw new InvalidOperationException(reason);
}
