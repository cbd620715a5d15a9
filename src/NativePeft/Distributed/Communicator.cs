using NativePeft.Ops;
using NativePeft.Runtime;

namespace NativePeft.Distributed;

/// <summary>Opens the communicator a job's <see cref="DistributedOptions"/> ask for (docs/distributed.md, "Communicators").</summary>
public static class Communicator
{
    /// <summary>
    /// Joins the group: Backend "auto" is "nccl" when <paramref name="ops"/> runs on a CUDA device, else "cpu";
    /// "cpu" is <see cref="TcpCommunicator"/> (loopback only), "nccl" is <see cref="NcclCommunicator"/> (a CUDA device
    /// is required). A world of 1 works with both.
    /// </summary>
    public static ICommunicator Create(DistributedOptions options, IOps ops)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(ops);
        bool cuda = ops.Device?.Properties.Kind == GpuKind.Cuda;
        string backend = (options.Backend ?? "auto").Trim().ToLowerInvariant();
        return backend switch
        {
            "auto" => cuda ? new NcclCommunicator(options, ops) : new TcpCommunicator(options),
            "cpu" => new TcpCommunicator(options),
            "nccl" when cuda => new NcclCommunicator(options, ops),
            "nccl" => throw new ArgumentException(
                $"the nccl backend needs a CUDA device, and the ops run on {ops.Name}; use the cpu backend (or auto) for CPU and emulator ranks"),
            _ => throw new ArgumentException($"unknown distributed backend '{options.Backend}': use auto, nccl or cpu"),
        };
    }
}
