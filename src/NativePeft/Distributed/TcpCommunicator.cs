using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Distributed;

/// <summary>
/// The "cpu" backend (docs/distributed.md, "Communicators"): ranks are processes or threads on one machine that talk
/// over TCP on 127.0.0.1 only. Star topology: rank 0 listens on MASTER_PORT (bound to the loopback address), every
/// other rank connects to it; a collective sends each rank's part to rank 0, which checks that every rank called the
/// same collective (operation, sequence number, dtype, count, root), reduces in rank order
/// (<see cref="HostReduction"/>) and sends the one result to every rank, so every rank holds the same bits.
/// Collectives run in order on one background thread per communicator (<see cref="AllReduceAsync"/> returns at once;
/// the synchronous calls wait for theirs). Tensors of CpuOps and the emulator are read and written in place; CUDA
/// tensors are staged through the host (downloaded when the request starts, uploaded in its Wait on the caller's
/// thread). Failures end every rank's collectives in bounded time: an <see cref="Abort"/> travels as a frame, a peer
/// whose connection closes is reported as ended, and a peer that does not answer within
/// <see cref="DistributedOptions.Timeout"/> as a timeout naming the ranks waited for. A world of 1 opens no socket.
/// </summary>
public sealed class TcpCommunicator : ICommunicator
{
    private const long ProtocolMagic = 0x4E50_4343_0001; // "NPCC" v1
    private const int HeaderBytes = 38;
    private const int PollMilliseconds = 100;

    private enum FrameKind : byte { Hello = 1, Welcome, Call, Result, Abort, Goodbye }

    private enum Op : byte { AllReduce = 1, Broadcast, AllReduceHost, BroadcastHost, Barrier }

    /// <summary>Kind, op, dtype, root (or: the sender's rank in Hello; 1 = "append the op" in Abort), sequence number
    /// (the protocol magic in Hello), count (world size in Hello), premultiply, payload length.</summary>
    private readonly record struct Header(FrameKind Kind, Op Op, int DType, int Root, long Seq, long Count, double Scale, int PayloadLength)
    {
        public void Write(Span<byte> b)
        {
            b[0] = (byte)Kind;
            b[1] = (byte)Op;
            BinaryPrimitives.WriteInt32LittleEndian(b[2..], DType);
            BinaryPrimitives.WriteInt32LittleEndian(b[6..], Root);
            BinaryPrimitives.WriteInt64LittleEndian(b[10..], Seq);
            BinaryPrimitives.WriteInt64LittleEndian(b[18..], Count);
            BinaryPrimitives.WriteDoubleLittleEndian(b[26..], Scale);
            BinaryPrimitives.WriteInt32LittleEndian(b[34..], PayloadLength);
        }

        public static Header Read(ReadOnlySpan<byte> b) => new((FrameKind)b[0], (Op)b[1],
            BinaryPrimitives.ReadInt32LittleEndian(b[2..]), BinaryPrimitives.ReadInt32LittleEndian(b[6..]),
            BinaryPrimitives.ReadInt64LittleEndian(b[10..]), BinaryPrimitives.ReadInt64LittleEndian(b[18..]),
            BinaryPrimitives.ReadDoubleLittleEndian(b[26..]), BinaryPrimitives.ReadInt32LittleEndian(b[34..]));
    }

    private sealed record Frame(Header Header, byte[] Payload);

    /// <summary>One collective as this rank called it.</summary>
    private sealed record Call(Op Op, long Seq, DType DType, long Count, int Root)
    {
        public override string ToString() => Op switch
        {
            Op.AllReduce => $"all_reduce #{Seq} ({DType}, {Count} elements)",
            Op.Broadcast => $"broadcast #{Seq} ({DType}, {Count} elements, root {Root})",
            Op.AllReduceHost => $"all_reduce_host #{Seq} ({Count} values)",
            Op.BroadcastHost => $"broadcast_host #{Seq} ({Count} bytes, root {Root})",
            Op.Barrier => $"barrier #{Seq}",
            _ => $"operation {(int)Op} #{Seq}",
        };

        public static Call From(Header h) => new(h.Op, h.Seq, (DType)h.DType, h.Count, h.Root);
    }

    private sealed class Peer(int rank, Socket socket)
    {
        public int Rank { get; } = rank;
        public Socket Socket { get; } = socket;
        public BlockingCollection<Frame> Inbox { get; } = new();
        public object SendLock { get; } = new();
        public volatile bool Departed;
        public Thread? Reader;
    }

    private sealed class Request : ICommRequest
    {
        public required Func<Action?> Run { get; init; }
        public ManualResetEventSlim Done { get; } = new();
        public Exception? Error;
        public Action? Finish;
        private int _finished;

        public void Wait()
        {
            Done.Wait();
            if (Error is CommunicatorException) throw new CommunicatorException(Error.Message, Error);
            if (Error is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(Error);
            if (Interlocked.Exchange(ref _finished, 1) == 0) Finish?.Invoke();
        }
    }

    private readonly DistributedOptions _options;
    private readonly Peer?[] _peers;
    private readonly BlockingCollection<Request> _requests = new();
    private readonly Thread? _worker;
    private readonly CancellationTokenSource _failed = new();
    private readonly object _failLock = new();
    private string? _failure;
    private bool _failureNamesOp;
    private long _seq;
    private volatile bool _disposing;
    private bool _disposed;

    /// <summary>
    /// Joins the group described by <paramref name="options"/> (rendezvous at MASTER_ADDR:MASTER_PORT within
    /// <see cref="DistributedOptions.Timeout"/>). MASTER_ADDR must be a loopback address (127.0.0.1, ::1, localhost):
    /// this backend is single-machine.
    /// </summary>
    public TcpCommunicator(DistributedOptions options) : this(options, bindAnyAddress: false, jobCheck: "") { }

    /// <summary>
    /// As the public constructor; <paramref name="bindAnyAddress"/> lets rank 0 listen on every interface and the
    /// others connect to a non-loopback MASTER_ADDR: ONLY for the bootstrap of <see cref="NcclCommunicator"/>, whose
    /// host collectives must reach other machines. <paramref name="jobCheck"/> must be equal on every rank (a process
    /// of another job that connects to the same port is refused).
    /// </summary>
    internal TcpCommunicator(DistributedOptions options, bool bindAnyAddress, string jobCheck)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.WorldSize < 1) throw new ArgumentException($"WORLD_SIZE must be at least 1, not {options.WorldSize}", nameof(options));
        if (options.Rank < 0 || options.Rank >= options.WorldSize)
            throw new ArgumentException($"RANK={options.Rank} is outside 0..{options.WorldSize - 1} (WORLD_SIZE={options.WorldSize})", nameof(options));
        if (options.MasterPort is < 0 or > 65535) throw new ArgumentException($"MASTER_PORT={options.MasterPort} is not a TCP port", nameof(options));
        if (options.Timeout <= TimeSpan.Zero) throw new ArgumentException($"the distributed timeout must be positive, not {options.Timeout}", nameof(options));
        _options = options;
        BindsAnyAddress = bindAnyAddress;
        _peers = new Peer?[options.WorldSize];
        if (options.WorldSize > 1)
        {
            var master = ResolveMaster(options.MasterAddr, bindAnyAddress);
            if (options.Rank == 0) RendezvousAsRoot(bindAnyAddress, jobCheck);
            else RendezvousAsMember(master, jobCheck);
            foreach (var p in _peers)
            {
                if (p is null) continue;
                p.Reader = new Thread(() => ReadLoop(p)) { IsBackground = true, Name = $"comm rank {Rank} reads rank {p.Rank}" };
                p.Reader.Start();
            }
        }
        _worker = new Thread(WorkLoop) { IsBackground = true, Name = $"comm rank {Rank} collectives" };
        _worker.Start();
    }

    public int Rank => _options.Rank;
    public int WorldSize => _options.WorldSize;
    public string Backend => "cpu";

    /// <summary>Rank 0's listening socket's local address during the rendezvous (null on other ranks and for world 1).</summary>
    internal IPEndPoint? ListenEndPoint { get; private set; }

    /// <summary>Why the group failed (an abort, a rank that ended, a timeout), or null while it works.</summary>
    internal string? FailureMessage
    {
        get { lock (_failLock) return _failure; }
    }

    /// <summary>Whether this communicator was made to accept non-loopback connections (NCCL bootstrap only).</summary>
    internal bool BindsAnyAddress { get; }

    // ---------------------------------------------------------------------------------------------------------------
    // Collectives

    public void AllReduce(IOps ops, Tensor t, double premultiply = 1.0) => AllReduceAsync(ops, t, premultiply).Wait();

    public ICommRequest AllReduceAsync(IOps ops, Tensor t, double premultiply = 1.0)
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(t);
        if (!HostReduction.IsReducible(t.DType))
            throw new ArgumentException($"all-reduce supports F32, F64 and BF16 tensors, not {t}", nameof(t));
        if (!double.IsFinite(premultiply)) throw new ArgumentException($"premultiply must be finite, not {premultiply}", nameof(premultiply));
        var dtype = t.DType;
        long count = t.Count;
        return Enqueue(ops, t, (call, local) => Exchange(call, local, premultiply, contributes: true,
            (parts, scales) => HostReduction.Reduce(dtype, count, parts!, scales)), Op.AllReduce, root: 0);
    }

    public void Broadcast(IOps ops, Tensor t, int root)
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(t);
        CheckRoot(root);
        Enqueue(ops, t, (call, local) => Exchange(call, local, 1.0, contributes: Rank == root, (parts, _) => parts[root]!),
            Op.Broadcast, root).Wait();
    }

    public void AllReduceHost(Span<double> values)
    {
        var copy = values.ToArray();
        double[]? sums = null;
        RunHost(Op.AllReduceHost, copy.Length, 0, call =>
        {
            var result = Exchange(call, MemoryMarshal.AsBytes(copy.AsSpan()).ToArray(), 1.0, contributes: true, (parts, _) =>
            {
                var total = MemoryMarshal.Cast<byte, double>(parts[0].AsSpan()).ToArray();
                foreach (var part in parts.Skip(1))
                {
                    var x = MemoryMarshal.Cast<byte, double>(part.AsSpan());
                    for (int i = 0; i < total.Length; i++) total[i] += x[i];
                }
                return MemoryMarshal.AsBytes(total.AsSpan()).ToArray();
            });
            sums = MemoryMarshal.Cast<byte, double>(result.AsSpan()).ToArray();
            return result;
        });
        sums!.CopyTo(values);
    }

    public void BroadcastHost(Span<byte> bytes, int root)
    {
        CheckRoot(root);
        var copy = bytes.ToArray();
        byte[]? result = null;
        RunHost(Op.BroadcastHost, copy.Length, root, call => result = Exchange(call, copy, 1.0, contributes: Rank == root, (parts, _) => parts[root]!));
        result!.CopyTo(bytes);
    }

    public void Barrier() => RunHost(Op.Barrier, 0, 0, call => Exchange(call, [], 1.0, contributes: false, (_, _) => []));

    public void Abort(string reason)
    {
        ArgumentNullException.ThrowIfNull(reason);
        Fail($"rank {Rank}: {reason}", namesOp: false, relay: true, except: -1);
    }

    // ---------------------------------------------------------------------------------------------------------------
    // Requests: one worker thread runs them in order.

    /// <summary>The most bytes one collective moves (a frame's payload length is 32-bit).</summary>
    internal const long MaxPayloadBytes = int.MaxValue - HeaderBytes;

    private ICommRequest Enqueue(IOps ops, Tensor t, Func<Call, byte[], byte[]> collective, Op op, int root)
    {
        if (t.Bytes > MaxPayloadBytes)
            throw new ArgumentException($"{t} has {t.Bytes} bytes; the cpu communicator moves at most {MaxPayloadBytes} bytes per collective: split it", nameof(t));
        bool inPlace = HostReduction.IsHostAddressable(ops);
        if (inPlace) ops.Device?.Synchronize();
        byte[]? staged = inPlace ? null : HostReduction.Download(ops, t);
        var dtype = t.DType;
        long count = t.Count;
        Request? request = null;
        request = new Request
        {
            Run = () =>
            {
                var call = NextCall(op, dtype, count, root);
                byte[] local = inPlace ? HostReduction.HostBytes(t).ToArray() : staged!;
                byte[] result = collective(call, local);
                if (inPlace)
                {
                    result.CopyTo(HostReduction.HostBytes(t));
                    return null;
                }
                return () => HostReduction.Upload(ops, result, t);
            },
        };
        Submit(request);
        return request;
    }

    private void RunHost(Op op, long count, int root, Func<Call, byte[]> collective)
    {
        var request = new Request { Run = () => { collective(NextCall(op, op == Op.AllReduceHost ? DType.F64 : DType.U8, count, root)); return null; } };
        Submit(request);
        request.Wait();
    }

    private Call NextCall(Op op, DType dtype, long count, int root) => new(op, ++_seq, dtype, count, root);

    private void Submit(Request request)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        try { _requests.Add(request); }
        catch (InvalidOperationException) { throw new ObjectDisposedException(nameof(TcpCommunicator)); }
    }

    private void WorkLoop()
    {
        foreach (var request in _requests.GetConsumingEnumerable())
        {
            try { request.Finish = request.Run(); }
            catch (Exception e) { request.Error = e; }
            request.Done.Set();
        }
    }

    private void CheckRoot(int root)
    {
        if (root < 0 || root >= WorldSize) throw new ArgumentOutOfRangeException(nameof(root), root, $"root must be in 0..{WorldSize - 1}");
    }

    // ---------------------------------------------------------------------------------------------------------------
    // The exchange: every rank's part to rank 0, one result back.

    /// <summary>
    /// One collective: on rank 0, gathers every rank's part and premultiplier (checking that each rank called
    /// <paramref name="call"/>), computes the result with <paramref name="combine"/> (parts indexed by rank; null for a
    /// rank that does not contribute) and sends it to every rank; on the others, sends this rank's part and receives
    /// the result. Returns the result on every rank.
    /// </summary>
    private byte[] Exchange(Call call, byte[] local, double scale, bool contributes, Func<byte[]?[], double[], byte[]> combine)
    {
        ThrowIfFailed(call);
        long deadline = Stopwatch.GetTimestamp() + (long)(_options.Timeout.TotalSeconds * Stopwatch.Frequency);
        if (Rank == 0)
        {
            var parts = new byte[]?[WorldSize];
            var scales = new double[WorldSize];
            parts[0] = contributes ? local : null;
            scales[0] = scale;
            for (int r = 1; r < WorldSize; r++)
            {
                int from = r;
                var frame = Take(_peers[r]!, deadline, call, () =>
                    $"rank 0: {call} timed out after {Seconds(_options.Timeout)} waiting for rank(s) " +
                    string.Join(", ", Enumerable.Range(from, WorldSize - from).Where(q => _peers[q]!.Inbox.Count == 0)));
                var theirs = Call.From(frame.Header);
                if (frame.Header.Kind != FrameKind.Call || theirs != call)
                {
                    string message = $"rank 0: collective mismatch: rank 0 called {call} but rank {r} called {theirs}";
                    Fail(message, namesOp: false, relay: true, except: -1);
                    throw Failure(call);
                }
                parts[r] = frame.Payload.Length > 0 ? frame.Payload : null;
                scales[r] = frame.Header.Scale;
            }
            var result = combine(parts, scales);
            for (int r = 1; r < WorldSize; r++)
                if (!TrySend(_peers[r]!, new Header(FrameKind.Result, call.Op, (int)call.DType, call.Root, call.Seq, call.Count, 0, result.Length), result))
                {
                    Fail($"rank {r} ended (connection closed)", namesOp: true, relay: true, except: r);
                    throw Failure(call);
                }
            return result;
        }
        else
        {
            var payload = contributes ? local : [];
            if (!TrySend(_peers[0]!, new Header(FrameKind.Call, call.Op, (int)call.DType, call.Root, call.Seq, call.Count, scale, payload.Length), payload))
            {
                Fail("rank 0 ended (connection closed)", namesOp: true, relay: false, except: 0);
                throw Failure(call);
            }
            // Rank 0 times out first and names the ranks it waited for; this rank's own limit comes a little later.
            var frame = Take(_peers[0]!, deadline + (long)(Grace.TotalSeconds * Stopwatch.Frequency), call, () =>
                $"rank {Rank}: {call} timed out after {Seconds(_options.Timeout + Grace)} waiting for rank 0 (which gathers every rank's part)");
            if (frame.Header.Kind != FrameKind.Result || frame.Header.Seq != call.Seq)
            {
                Fail($"rank {Rank}: protocol error: expected the result of {call} from rank 0, got a {frame.Header.Kind} frame #{frame.Header.Seq}",
                    namesOp: false, relay: true, except: -1);
                throw Failure(call);
            }
            return frame.Payload;
        }
    }

    private TimeSpan Grace => TimeSpan.FromMilliseconds(Math.Min(2000, _options.Timeout.TotalMilliseconds / 2));

    private static string Seconds(TimeSpan t) => t.TotalSeconds.ToString("0.###", CultureInfo.InvariantCulture) + " s";

    /// <summary>The next frame from <paramref name="p"/>, failing the group on a timeout, an abort, or a peer that left.</summary>
    private Frame Take(Peer p, long deadline, Call call, Func<string> timeoutMessage)
    {
        while (true)
        {
            ThrowIfFailed(call);
            long remaining = (deadline - Stopwatch.GetTimestamp()) * 1000 / Stopwatch.Frequency;
            if (remaining <= 0)
            {
                Fail(timeoutMessage(), namesOp: false, relay: true, except: -1);
                throw Failure(call);
            }
            try
            {
                if (p.Inbox.TryTake(out var frame, (int)Math.Min(remaining, int.MaxValue), _failed.Token)) return frame;
            }
            catch (OperationCanceledException) { throw Failure(call); }
            if (p.Inbox.IsCompleted)
            {
                ThrowIfFailed(call);
                Fail($"rank {p.Rank} left (closed its communicator) before {call}", namesOp: false, relay: true, except: p.Rank);
                throw Failure(call);
            }
        }
    }

    // ---------------------------------------------------------------------------------------------------------------
    // Failure

    private void Fail(string message, bool namesOp, bool relay, int except)
    {
        lock (_failLock)
        {
            if (_failure is not null) return;
            _failure = message;
            _failureNamesOp = namesOp;
        }
        if (relay)
        {
            var payload = Encoding.UTF8.GetBytes(message);
            foreach (var p in _peers)
                if (p is not null && p.Rank != except && !p.Departed)
                    TrySend(p, new Header(FrameKind.Abort, 0, 0, namesOp ? 1 : 0, 0, 0, 0, payload.Length), payload);
        }
        _failed.Cancel();
    }

    private CommunicatorException Failure(Call? call)
    {
        string message;
        bool namesOp;
        lock (_failLock) { message = _failure!; namesOp = _failureNamesOp; }
        return new CommunicatorException(namesOp && call is not null ? $"{message} during {call}" : message);
    }

    private void ThrowIfFailed(Call call)
    {
        if (_failed.IsCancellationRequested) throw Failure(call);
    }

    // ---------------------------------------------------------------------------------------------------------------
    // Sockets

    private static IPAddress ResolveMaster(string masterAddr, bool anyAddress)
    {
        if (string.IsNullOrWhiteSpace(masterAddr)) throw new ArgumentException("MASTER_ADDR is empty");
        if (!anyAddress)
        {
            if (masterAddr == "localhost") return IPAddress.Loopback;
            if (IPAddress.TryParse(masterAddr, out var ip) && IPAddress.IsLoopback(ip)) return ip;
            throw new ArgumentException(
                $"MASTER_ADDR={masterAddr} is not a loopback address: the cpu backend is single-machine (its ranks talk over " +
                "127.0.0.1 only); use 127.0.0.1, or the nccl backend (CUDA devices) for several machines");
        }
        if (IPAddress.TryParse(masterAddr, out var parsed)) return parsed;
        try
        {
            var addresses = Dns.GetHostAddresses(masterAddr);
            return addresses.FirstOrDefault(a => a.AddressFamily == AddressFamily.InterNetwork) ?? addresses.First();
        }
        catch (Exception e) when (e is SocketException or InvalidOperationException)
        {
            throw new ArgumentException($"MASTER_ADDR={masterAddr} does not resolve to an address: {e.Message}", e);
        }
    }

    private static void SendFrame(Socket s, Header h, ReadOnlySpan<byte> payload)
    {
        Span<byte> header = stackalloc byte[HeaderBytes];
        h.Write(header);
        s.Send(header);
        if (payload.Length > 0) s.Send(payload);
    }

    private bool TrySend(Peer p, Header h, ReadOnlySpan<byte> payload)
    {
        try
        {
            lock (p.SendLock) SendFrame(p.Socket, h, payload);
            return true;
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            return false;
        }
    }

    /// <summary>Reads exactly <paramref name="buffer"/>.Length bytes; false when the connection closed first.</summary>
    private static bool ReceiveExact(Socket s, Span<byte> buffer)
    {
        int done = 0;
        while (done < buffer.Length)
        {
            int n = s.Receive(buffer[done..]);
            if (n == 0) return false;
            done += n;
        }
        return true;
    }

    private static Frame? ReceiveFrame(Socket s)
    {
        Span<byte> header = stackalloc byte[HeaderBytes];
        if (!ReceiveExact(s, header)) return null;
        var h = Header.Read(header);
        if (h.PayloadLength < 0) throw new InvalidDataException($"bad frame (payload length {h.PayloadLength})");
        var payload = new byte[h.PayloadLength];
        if (!ReceiveExact(s, payload)) return null;
        return new Frame(h, payload);
    }

    private void ReadLoop(Peer p)
    {
        try
        {
            while (true)
            {
                var frame = ReceiveFrame(p.Socket);
                if (frame is null) break;
                switch (frame.Header.Kind)
                {
                    case FrameKind.Abort:
                        // Rank 0 passes an abort on to the others.
                        Fail(Encoding.UTF8.GetString(frame.Payload), frame.Header.Root == 1, relay: Rank == 0, except: p.Rank);
                        break;
                    case FrameKind.Goodbye:
                        p.Departed = true;
                        p.Inbox.CompleteAdding();
                        return;
                    default:
                        p.Inbox.Add(frame);
                        break;
                }
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or InvalidDataException or InvalidOperationException) { }
        if (_disposing || p.Departed) return;
        p.Departed = true;
        Fail($"rank {p.Rank} ended (connection closed)", namesOp: true, relay: true, except: p.Rank);
        p.Inbox.CompleteAdding();
    }

    // ---------------------------------------------------------------------------------------------------------------
    // Rendezvous

    private void RendezvousAsRoot(bool anyAddress, string jobCheck)
    {
        var address = anyAddress ? IPAddress.Any : IPAddress.Loopback;
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            listener.Bind(new IPEndPoint(address, _options.MasterPort));
            listener.Listen(WorldSize);
        }
        catch (SocketException e)
        {
            throw new CommunicatorException($"rank 0: cannot listen on {address}:{_options.MasterPort} (MASTER_PORT): {e.Message}", e);
        }
        ListenEndPoint = (IPEndPoint)listener.LocalEndPoint!;
        long deadline = Stopwatch.GetTimestamp() + (long)(_options.Timeout.TotalSeconds * Stopwatch.Frequency);
        int arrived = 0;
        while (arrived < WorldSize - 1)
        {
            long remaining = (deadline - Stopwatch.GetTimestamp()) * 1000 / Stopwatch.Frequency;
            if (remaining <= 0)
            {
                var missing = Enumerable.Range(1, WorldSize - 1).Where(r => _peers[r] is null);
                RefuseRendezvous($"rank 0: rendezvous timed out after {Seconds(_options.Timeout)} waiting for rank(s) " +
                    $"{string.Join(", ", missing)} to connect to {ListenEndPoint} (MASTER_ADDR:MASTER_PORT)", null);
            }
            if (!listener.Poll((int)Math.Min(remaining, PollMilliseconds) * 1000, SelectMode.SelectRead)) continue;
            var s = listener.Accept();
            s.NoDelay = true;
            s.SendTimeout = TimeoutMilliseconds;
            s.ReceiveTimeout = (int)Math.Max(1, Math.Min(remaining, int.MaxValue));
            Frame? hello;
            try { hello = ReceiveFrame(s); }
            catch (Exception e) when (e is SocketException or InvalidDataException or OverflowException) { hello = null; }
            if (hello is null || hello.Header.Kind != FrameKind.Hello || hello.Header.Seq != ProtocolMagic)
            {
                s.Dispose(); // not one of ours
                continue;
            }
            int rank = hello.Header.Root;
            long worldSize = hello.Header.Count;
            string job = Encoding.UTF8.GetString(hello.Payload);
            string? error =
                worldSize != WorldSize ? $"rank 0: WORLD_SIZE mismatch: rank 0 has WORLD_SIZE={WorldSize} but rank {rank} has WORLD_SIZE={worldSize}"
                : job != jobCheck ? $"rank 0: rank {rank} belongs to another job (its job check is '{job}', rank 0's is '{jobCheck}')"
                : rank < 1 || rank >= WorldSize ? $"rank 0: a process connected as RANK={rank}, outside 1..{WorldSize - 1}"
                : _peers[rank] is not null ? $"rank 0: two processes connected as rank {rank}"
                : null;
            if (error is not null) RefuseRendezvous(error, s);
            s.ReceiveTimeout = 0;
            _peers[rank] = new Peer(rank, s);
            arrived++;
        }
        foreach (var p in _peers)
            if (p is not null && !TrySend(p, new Header(FrameKind.Welcome, 0, 0, 0, ProtocolMagic, WorldSize, 0, 0), []))
                RefuseRendezvous($"rank {p.Rank} ended (connection closed) during the rendezvous", null);
    }

    /// <summary>Ends a failed rendezvous on rank 0: tells every connected rank (and <paramref name="newcomer"/>) why, and throws.</summary>
    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private void RefuseRendezvous(string message, Socket? newcomer)
    {
        var payload = Encoding.UTF8.GetBytes(message);
        var abort = new Header(FrameKind.Abort, 0, 0, 0, 0, 0, 0, payload.Length);
        foreach (var s in _peers.Where(p => p is not null).Select(p => p!.Socket).Append(newcomer))
        {
            if (s is null) continue;
            try { SendFrame(s, abort, payload); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
            s.Dispose();
        }
        throw new CommunicatorException(message);
    }

    private int TimeoutMilliseconds => (int)Math.Min(int.MaxValue, Math.Max(1, (_options.Timeout + Grace).TotalMilliseconds));

    private void RendezvousAsMember(IPAddress master, string jobCheck)
    {
        var endPoint = new IPEndPoint(master, _options.MasterPort);
        long deadline = Stopwatch.GetTimestamp() + (long)(_options.Timeout.TotalSeconds * Stopwatch.Frequency);
        long Remaining() => (deadline - Stopwatch.GetTimestamp()) * 1000 / Stopwatch.Frequency;
        Socket? socket = null;
        string lastError = "nothing tried";
        while (socket is null)
        {
            long remaining = Remaining();
            if (remaining <= 0)
                throw new CommunicatorException($"rank {Rank}: rendezvous timed out after {Seconds(_options.Timeout)}: could not connect to " +
                    $"rank 0 at {endPoint} (MASTER_ADDR:MASTER_PORT): {lastError}");
            var attempt = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(Math.Min(remaining, 2000)));
                attempt.ConnectAsync(endPoint, cts.Token).AsTask().GetAwaiter().GetResult();
                socket = attempt;
            }
            catch (SocketException e)
            {
                lastError = e.Message;
                attempt.Dispose();
                Thread.Sleep((int)Math.Clamp(Remaining(), 0, 50));
            }
            catch (OperationCanceledException)
            {
                lastError = "the connection attempt timed out";
                attempt.Dispose();
            }
        }
        socket.NoDelay = true;
        socket.SendTimeout = TimeoutMilliseconds;
        var job = Encoding.UTF8.GetBytes(jobCheck);
        Frame? reply;
        try
        {
            SendFrame(socket, new Header(FrameKind.Hello, 0, 0, Rank, ProtocolMagic, WorldSize, 0, job.Length), job);
            socket.ReceiveTimeout = (int)Math.Max(1, Math.Min(Remaining() + (long)Grace.TotalMilliseconds, int.MaxValue));
            reply = ReceiveFrame(socket);
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.TimedOut)
        {
            socket.Dispose();
            throw new CommunicatorException($"rank {Rank}: rendezvous timed out after {Seconds(_options.Timeout)}: connected to rank 0 at " +
                $"{endPoint}, which did not report that all {WorldSize} ranks arrived");
        }
        catch (Exception e) when (e is SocketException or InvalidDataException or OverflowException)
        {
            reply = null;
        }
        if (reply is null || reply.Header.Kind is not (FrameKind.Welcome or FrameKind.Abort))
        {
            socket.Dispose();
            throw new CommunicatorException($"rank {Rank}: rank 0 at {endPoint} closed the connection during the rendezvous");
        }
        if (reply.Header.Kind == FrameKind.Abort)
        {
            socket.Dispose();
            throw new CommunicatorException(Encoding.UTF8.GetString(reply.Payload));
        }
        socket.ReceiveTimeout = 0;
        _peers[0] = new Peer(0, socket);
    }

    // ---------------------------------------------------------------------------------------------------------------

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _requests.CompleteAdding();
        _worker?.Join();
        _disposing = true;
        foreach (var p in _peers)
        {
            if (p is null) continue;
            if (!p.Departed) TrySend(p, new Header(FrameKind.Goodbye, 0, 0, Rank, 0, 0, 0, 0), []);
            try { p.Socket.Shutdown(SocketShutdown.Both); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
            p.Socket.Dispose();
            p.Reader?.Join(TimeSpan.FromSeconds(5));
        }
        _failed.Dispose();
        _requests.Dispose();
    }

    /// <summary>The bytes a rank sends to introduce itself to rank 0 (tests: a foreign process that joins the rendezvous).</summary>
    internal static byte[] HelloFrame(int rank, int worldSize, string jobCheck)
    {
        var job = Encoding.UTF8.GetBytes(jobCheck);
        var bytes = new byte[HeaderBytes + job.Length];
        new Header(FrameKind.Hello, 0, 0, rank, ProtocolMagic, worldSize, 0, job.Length).Write(bytes);
        job.CopyTo(bytes, HeaderBytes);
        return bytes;
    }

    /// <summary>Tests: ends this rank as a killed process would, closing its sockets without a goodbye.</summary>
    internal void CloseWithoutGoodbye()
    {
        _disposing = true;
        foreach (var p in _peers)
        {
            if (p is null) continue;
            try { p.Socket.Shutdown(SocketShutdown.Both); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
            p.Socket.Dispose();
        }
    }
}
