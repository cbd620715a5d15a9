using System.Diagnostics;
using System.Globalization;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;

namespace NativePeft.Distributed;

/// <summary>
/// The "nccl" backend (docs/distributed.md, "Communicators"): NCCL through our binding (<see cref="NcclNative"/>) on
/// device tensors of a <see cref="CudaGpu"/>. Rank 0 creates the NCCL unique id and sends it to the others over a
/// <see cref="TcpCommunicator"/> bootstrap (which, for this backend only, may listen on every interface so that
/// MASTER_ADDR can be another machine); the host collectives (<see cref="AllReduceHost"/>, <see cref="BroadcastHost"/>,
/// <see cref="Barrier"/>) and the news of an abort or of a rank that ended travel over that bootstrap too. NCCL runs on
/// a stream of its own: a collective is ordered after the work already enqueued on the compute stream by an event, and
/// the compute stream's later work waits for the collective's event, so the host is not blocked. A request's
/// <see cref="ICommRequest.Wait"/> polls the collective's event, NCCL's asynchronous error and the bootstrap's failure
/// state until <see cref="DistributedOptions.Timeout"/>; a failure aborts the NCCL communicator (ncclCommAbort).
/// </summary>
public sealed class NcclCommunicator : ICommunicator
{
    private readonly DistributedOptions _options;
    private readonly CudaGpu _gpu;
    private readonly TcpCommunicator _bootstrap;
    private readonly IntPtr _comm;
    private readonly IntPtr _stream;
    private readonly IntPtr _ready;
    private readonly object _lock = new();
    private string? _failure;
    private bool _commAborted;
    private bool _disposed;
    private long _seq;

    /// <summary>Joins the group on <paramref name="ops"/>' CUDA device (LOCAL_RANK picks the device when ops are made).</summary>
    public NcclCommunicator(DistributedOptions options, IOps ops) : this(options, ops, bootstrap: null) { }

    /// <summary>
    /// As the public constructor, over a group the ranks already joined (<paramref name="bootstrap"/>, made with
    /// bindAnyAddress for a job that spans machines): FineTune joins first, before it opens the device, so that a rank
    /// failing to set up ends the others. The communicator owns the bootstrap from then on, also when this throws.
    /// </summary>
    internal NcclCommunicator(DistributedOptions options, IOps ops, TcpCommunicator? bootstrap)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(ops);
        if (ops.Device is not CudaGpu gpu)
        {
            bootstrap?.Dispose();
            throw new ArgumentException($"the nccl backend needs ops on a CUDA device, not {ops.Name}; use the cpu backend", nameof(ops));
        }
        if (!NcclLibrary.TryLoad(out _, out string reason))
        {
            bootstrap?.Abort(reason);
            bootstrap?.Dispose();
            throw new InvalidOperationException(reason);
        }
        _options = options;
        _gpu = gpu;
        _bootstrap = bootstrap ?? new TcpCommunicator(options, bindAnyAddress: true, jobCheck: "nccl");
        try
        {
            var id = new NcclNative.UniqueId();
            var bytes = new byte[NcclNative.UniqueId.Size];
            unsafe
            {
                if (Rank == 0)
                {
                    NcclNative.Check(NcclNative.ncclGetUniqueId(out id), "ncclGetUniqueId", Rank);
                    new Span<byte>(id.Internal, NcclNative.UniqueId.Size).CopyTo(bytes);
                }
                _bootstrap.BroadcastHost(bytes, 0);
                bytes.CopyTo(new Span<byte>(id.Internal, NcclNative.UniqueId.Size));
            }
            _gpu.MakeCurrent();
            NcclNative.Check(NcclNative.ncclCommInitRank(out _comm, WorldSize, id, Rank), "ncclCommInitRank", Rank);
            _stream = CudaStreams.CreateStream();
            _ready = CudaStreams.CreateEvent();
        }
        catch
        {
            if (_comm != IntPtr.Zero) NcclNative.ncclCommDestroy(_comm);
            if (_stream != IntPtr.Zero) CudaStreams.cuStreamDestroy(_stream);
            _bootstrap.Dispose();
            throw;
        }
    }

    public int Rank => _options.Rank;
    public int WorldSize => _options.WorldSize;
    public string Backend => "nccl";

    public void AllReduce(IOps ops, Tensor t, double premultiply = 1.0) => ((Request)AllReduceAsync(ops, t, premultiply)).OrderComputeStream();

    public unsafe ICommRequest AllReduceAsync(IOps ops, Tensor t, double premultiply = 1.0)
    {
        ArgumentNullException.ThrowIfNull(t);
        var dtype = DataType(t.DType);
        if (dtype is not (NcclNative.DataType.Float32 or NcclNative.DataType.Float64 or NcclNative.DataType.Bfloat16))
            throw new ArgumentException($"all-reduce supports F32, F64 and BF16 tensors, not {t}", nameof(t));
        if (!double.IsFinite(premultiply)) throw new ArgumentException($"premultiply must be finite, not {premultiply}", nameof(premultiply));
        return Enqueue(ops, $"all_reduce ({t.DType}, {t.Count} elements)", stream =>
        {
            if (premultiply == 1.0)
                return NcclNative.ncclAllReduce((IntPtr)t.Data.Address, (IntPtr)t.Data.Address, (nuint)t.Count, dtype, NcclNative.Sum, _comm, stream);
            // PreMulSum's scalar has the reduction's type, read from the host when the call is enqueued.
            double f64 = premultiply;
            float f32 = (float)premultiply;
            BFloat16 bf16 = BFloat16.FromSingle(f32);
            void* scalar = t.DType switch { DType.F64 => &f64, DType.BF16 => &bf16, _ => &f32 };
            NcclNative.Check(NcclNative.ncclRedOpCreatePreMulSum(out int op, scalar, dtype, NcclNative.ScalarHostImmediate, _comm), "ncclRedOpCreatePreMulSum", Rank);
            var result = NcclNative.ncclAllReduce((IntPtr)t.Data.Address, (IntPtr)t.Data.Address, (nuint)t.Count, dtype, op, _comm, stream);
            NcclNative.ncclRedOpDestroy(op, _comm); // allowed once the last call using it returned
            return result;
        }, "ncclAllReduce");
    }

    public void Broadcast(IOps ops, Tensor t, int root)
    {
        ArgumentNullException.ThrowIfNull(t);
        if (root < 0 || root >= WorldSize) throw new ArgumentOutOfRangeException(nameof(root), root, $"root must be in 0..{WorldSize - 1}");
        var dtype = DataType(t.DType);
        ((Request)Enqueue(ops, $"broadcast ({t.DType}, {t.Count} elements, root {root})", stream =>
            NcclNative.ncclBroadcast((IntPtr)t.Data.Address, (IntPtr)t.Data.Address, (nuint)t.Count, dtype, root, _comm, stream),
            "ncclBroadcast")).OrderComputeStream();
    }

    /// <summary>
    /// output (count/N elements) = this rank's slice of Σ_ranks input (count elements); the slices in rank order.
    /// Ordered like <see cref="AllReduceAsync"/>. For sharded optimizer states (ZeRO-1).
    /// </summary>
    public ICommRequest ReduceScatterAsync(IOps ops, Tensor input, Tensor output) =>
        EnqueueCollective(ops, input, output, gather: false);

    /// <summary>output (N·count elements) = every rank's input (count elements), in rank order.</summary>
    public ICommRequest AllGatherAsync(IOps ops, Tensor input, Tensor output) =>
        EnqueueCollective(ops, input, output, gather: true);

    /// <summary>
    /// Reduce-scatter (<paramref name="gather"/> false: output holds count/N of the input's elements) or all-gather
    /// (true: output holds N·count): checks the shapes, then enqueues the NCCL call.
    /// </summary>
    private ICommRequest EnqueueCollective(IOps ops, Tensor input, Tensor output, bool gather)
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(output);
        var (name, small, large) = gather ? ("all_gather", input, output) : ("reduce_scatter", output, input);
        if (input.DType != output.DType || large.Count != small.Count * WorldSize)
            throw new ArgumentException(gather
                ? $"all-gather needs an output of the input's dtype and {WorldSize}·count: {input} → {output}"
                : $"reduce-scatter needs an output of the input's dtype and count/{WorldSize}: {input} → {output}");
        var dtype = DataType(input.DType);
        return Enqueue(ops, $"{name} ({input.DType}, {input.Count} elements)", stream => gather
            ? NcclNative.ncclAllGather((IntPtr)input.Data.Address, (IntPtr)output.Data.Address, (nuint)small.Count, dtype, _comm, stream)
            : NcclNative.ncclReduceScatter((IntPtr)input.Data.Address, (IntPtr)output.Data.Address, (nuint)small.Count, dtype, NcclNative.Sum, _comm, stream),
            gather ? "ncclAllGather" : "ncclReduceScatter");
    }

    public void AllReduceHost(Span<double> values)
    {
        ThrowIfFailed("all_reduce_host");
        _bootstrap.AllReduceHost(values);
    }

    public void BroadcastHost(Span<byte> bytes, int root)
    {
        ThrowIfFailed("broadcast_host");
        _bootstrap.BroadcastHost(bytes, root);
    }

    public void Barrier()
    {
        ThrowIfFailed("barrier");
        _bootstrap.Barrier();
    }

    public void Abort(string reason)
    {
        ArgumentNullException.ThrowIfNull(reason);
        Fail($"rank {Rank}: {reason}");
        _bootstrap.Abort(reason);
    }

    // ---------------------------------------------------------------------------------------------------------------

    private static NcclNative.DataType DataType(DType dtype) => dtype switch
    {
        DType.F32 => NcclNative.DataType.Float32,
        DType.F64 => NcclNative.DataType.Float64,
        DType.BF16 => NcclNative.DataType.Bfloat16,
        DType.F16 => NcclNative.DataType.Float16,
        DType.I32 => NcclNative.DataType.Int32,
        DType.U32 => NcclNative.DataType.Uint32,
        DType.U8 => NcclNative.DataType.Uint8,
        DType.I8 => NcclNative.DataType.Int8,
        _ => throw new ArgumentException($"NCCL has no data type for {dtype}"),
    };

    private ICommRequest Enqueue(IOps ops, string what, Func<IntPtr, NcclNative.Result> call, string function)
    {
        ArgumentNullException.ThrowIfNull(ops);
        if (!ReferenceEquals(ops.Device, _gpu))
            throw new ArgumentException($"the tensors of {ops.Name} are not on this communicator's CUDA device", nameof(ops));
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            string description = $"{what} #{++_seq}";
            ThrowIfFailed(description);
            _gpu.MakeCurrent();
            CudaStreams.Order(_gpu.StreamHandle, _stream, _ready);
            NcclNative.Check(call(_stream), function, Rank);
            var done = CudaStreams.CreateEvent();
            CudaDriver.Check(CudaStreams.cuEventRecord(done, _stream), "cuEventRecord");
            return new Request(this, done, description);
        }
    }

    /// <summary>Marks the group failed and aborts the NCCL communicator (once): NCCL's kernels of this rank stop waiting.</summary>
    private void Fail(string message)
    {
        lock (_lock)
        {
            _failure ??= message;
            if (_commAborted || _disposed) return;
            _commAborted = true;
            NcclNative.ncclCommAbort(_comm);
        }
    }

    /// <summary>Throws when this rank aborted, another rank's failure came over the bootstrap, or NCCL reported an error.</summary>
    private void ThrowIfFailed(string what)
    {
        if (_bootstrap.FailureMessage is { } remote) Fail(remote);
        var error = NcclNative.Result.Success;
        lock (_lock)
            if (_failure is null && !_commAborted && !_disposed && NcclNative.ncclCommGetAsyncError(_comm, out var asyncError) == NcclNative.Result.Success)
                error = asyncError;
        if (error is not (NcclNative.Result.Success or NcclNative.Result.InProgress))
        {
            string message = $"rank {Rank}: NCCL failed: {error} ({NcclNative.ErrorString(error)})";
            Fail(message);
            _bootstrap.Abort($"NCCL failed: {error} ({NcclNative.ErrorString(error)})");
        }
        if (_failure is { } failure) throw new CommunicatorException($"{failure} (during {what})");
    }

    private sealed class Request(NcclCommunicator owner, IntPtr done, string description) : ICommRequest
    {
        private bool _completed;

        /// <summary>The synchronous calls: the compute stream's later work waits for the collective; the host goes on.</summary>
        public void OrderComputeStream()
        {
            lock (owner._lock)
            {
                owner._gpu.MakeCurrent();
                CudaDriver.Check(CudaStreams.cuStreamWaitEvent(owner._gpu.StreamHandle, done, 0), "cuStreamWaitEvent");
                CudaStreams.cuEventDestroy(done);
                _completed = true;
            }
        }

        public void Wait()
        {
            if (_completed) return;
            var clock = Stopwatch.StartNew();
            owner._gpu.MakeCurrent();
            while (true)
            {
                var state = CudaStreams.cuEventQuery(done);
                if (state == CuResult.Success) break;
                if (state != CuResult.NotReady) CudaDriver.Check(state, "cuEventQuery");
                owner.ThrowIfFailed(description);
                if (clock.Elapsed > owner._options.Timeout)
                {
                    string reason = $"{description} timed out after {owner._options.Timeout.TotalSeconds.ToString("0.###", CultureInfo.InvariantCulture)} s";
                    owner.Abort(reason);
                    throw new CommunicatorException($"rank {owner.Rank}: {reason}");
                }
                Thread.Sleep(clock.ElapsedMilliseconds < 10 ? 0 : 1);
            }
            OrderComputeStream();
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            _gpu.MakeCurrent();
            if (!_commAborted) NcclNative.ncclCommDestroy(_comm);
            CudaStreams.cuEventDestroy(_ready);
            CudaStreams.cuStreamDestroy(_stream);
        }
        _bootstrap.Dispose();
    }
}
