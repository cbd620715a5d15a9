using NativePeft.Ops;

namespace NativePeft.Distributed;

/// <summary>
/// A group of <see cref="WorldSize"/> ranks that reduce and exchange tensors (docs/distributed.md). Two
/// implementations with the same semantics: <c>NcclCommunicator</c> (NCCL on CUDA devices, device buffers, its own
/// stream ordered after the compute stream) and <c>TcpCommunicator</c> (ranks as processes or threads on one machine,
/// talking over 127.0.0.1 only; host buffers: CpuOps and emulator tensors, staged through the host for CUDA).
/// Every collective is called by every rank in the same order with the same shapes. Every rank receives the same
/// bits from a reduction (the result is computed once and distributed), and the reduction order is fixed for a
/// given world size, so a run is reproducible. A failure on one rank (an exception, <see cref="Abort"/>, a process
/// that ended) ends every rank's pending and later collectives with <see cref="CommunicatorException"/> naming the
/// rank and its message, in bounded time: never a hang.
/// </summary>
public interface ICommunicator : IDisposable
{
    /// <summary>This rank, 0 ≤ Rank &lt; WorldSize.</summary>
    int Rank { get; }
    int WorldSize { get; }
    /// <summary>"nccl" or "cpu".</summary>
    string Backend { get; }

    /// <summary>
    /// In place, every rank: t = Σ_ranks premultiply · t (F32, F64 or BF16 tensors of <paramref name="ops"/>;
    /// premultiply 1 is a plain sum; NCCL: ncclRedOpCreatePreMulSum). Returns when the result may be read by the
    /// next op on <paramref name="ops"/>'s stream.
    /// </summary>
    void AllReduce(IOps ops, Tensor t, double premultiply = 1.0);

    /// <summary>
    /// Starts the same all-reduce and returns at once (NCCL: on the communicator's stream after an event recorded on
    /// the compute stream; CPU: on a background thread). The tensor must not be written until <see cref="ICommRequest.Wait"/>
    /// returned; requests complete in the order they were started.
    /// </summary>
    ICommRequest AllReduceAsync(IOps ops, Tensor t, double premultiply = 1.0);

    /// <summary>In place, every rank: t = root's t.</summary>
    void Broadcast(IOps ops, Tensor t, int root);

    /// <summary>Host values, every rank: values[i] = Σ_ranks values[i] (fp64, in rank order). Counts, losses, flags.</summary>
    void AllReduceHost(Span<double> values);

    /// <summary>Host bytes, every rank: root's bytes (same length on every rank).</summary>
    void BroadcastHost(Span<byte> bytes, int root);

    /// <summary>Returns when every rank has called it.</summary>
    void Barrier();

    /// <summary>
    /// Ends the group: every rank's pending and later collectives throw <see cref="CommunicatorException"/> with
    /// "rank R: <paramref name="reason"/>". Safe to call from any thread, more than once.
    /// </summary>
    void Abort(string reason);
}

/// <summary>A collective that was started and has not necessarily finished.</summary>
public interface ICommRequest
{
    /// <summary>Blocks until the collective finished (its result readable on the ops' stream); throws what it failed with.</summary>
    void Wait();
}

/// <summary>A collective failed: another rank failed or ended, the group was aborted, or a peer did not answer in time.</summary>
public sealed class CommunicatorException : Exception
{
    public CommunicatorException(string message) : base(message) { }
    public CommunicatorException(string message, Exception inner) : base(message, inner) { }
    public CommunicatorException() { }
}
