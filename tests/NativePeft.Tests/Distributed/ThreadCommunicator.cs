using NativePeft.Distributed;
using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Tests.Distributed;

/// <summary>
/// An in-process <see cref="ICommunicator"/> for tests: the ranks are threads of this process sharing one
/// <see cref="Group"/>. Every collective is a rendezvous of all ranks; the reduction is done once, in rank order, by the
/// last rank to arrive (fp64 accumulation of the premultiplied values, rounded once to the tensor's type), so every rank
/// gets the same bits. Async all-reduces run at once (they complete in order). An <see cref="Abort"/> or a timeout ends
/// every rank's collectives with a <see cref="CommunicatorException"/> naming the rank.
/// </summary>
internal sealed class ThreadCommunicator(ThreadCommunicator.Group group, int rank) : ICommunicator
{
    public sealed class Group(int worldSize, TimeSpan? timeout = null)
    {
        private readonly object _lock = new();
        private readonly double[]?[] _slots = new double[worldSize][];
        private double[]? _result;
        private int _arrived, _departed;
        private long _generation;
        private string? _aborted;
        public int WorldSize { get; } = worldSize;
        public TimeSpan Timeout { get; } = timeout ?? TimeSpan.FromSeconds(30);
        /// <summary>Collectives completed so far (all ranks).</summary>
        public long Collectives => Interlocked.Read(ref _generation);

        public ThreadCommunicator[] Create() => Enumerable.Range(0, WorldSize).Select(r => new ThreadCommunicator(this, r)).ToArray();

        public void Abort(int rank, string reason)
        {
            lock (_lock)
            {
                _aborted ??= $"rank {rank}: {reason}";
                Monitor.PulseAll(_lock);
            }
        }

        /// <summary>Deposits <paramref name="mine"/>, waits for every rank, returns <paramref name="combine"/>(all slots) — computed once.</summary>
        public double[] Exchange(int rank, double[] mine, Func<double[]?[], double[]> combine)
        {
            var deadline = DateTime.UtcNow + Timeout;
            lock (_lock)
            {
                // Wait until the previous collective has been read by everyone.
                while (_departed > 0) Wait(deadline, rank);
                Check();
                long generation = _generation;
                _slots[rank] = mine;
                if (++_arrived == WorldSize)
                {
                    _result = combine(_slots);
                    _arrived = 0;
                    _departed = WorldSize;
                    _generation++;
                    Monitor.PulseAll(_lock);
                }
                else
                    while (_generation == generation) Wait(deadline, rank);
                var result = _result!;
                if (--_departed == 0)
                {
                    Array.Clear(_slots);
                    Monitor.PulseAll(_lock);
                }
                return result;
            }
        }

        private void Check()
        {
            if (_aborted is { } why) throw new CommunicatorException(why);
        }

        private void Wait(DateTime deadline, int rank)
        {
            Check();
            var left = deadline - DateTime.UtcNow;
            if (left <= TimeSpan.Zero || !Monitor.Wait(_lock, left))
            {
                Check();
                if (DateTime.UtcNow >= deadline)
                {
                    _aborted ??= $"rank {rank}: timed out after {Timeout.TotalSeconds} s waiting for the other ranks";
                    Monitor.PulseAll(_lock);
                    Check();
                }
            }
            Check();
        }
    }

    private sealed class Done : ICommRequest
    {
        public static readonly Done Instance = new();
        public void Wait() { }
    }

    public int Rank => rank;
    public int WorldSize => group.WorldSize;
    public string Backend => "cpu";
    /// <summary>All-reduces of tensors this rank took part in, and their elements.</summary>
    public int TensorAllReduces { get; private set; }
    public long TensorAllReduceElements { get; private set; }

    private static double[] Read(IOps ops, Tensor t)
    {
        switch (t.DType)
        {
            case DType.F32:
            {
                var v = new float[t.Count];
                ops.Download<float>(t, v);
                return v.Select(x => (double)x).ToArray();
            }
            case DType.F64:
            {
                var v = new double[t.Count];
                ops.Download<double>(t, v);
                return v;
            }
            default: throw new NotSupportedException($"ThreadCommunicator: {t.DType}");
        }
    }

    private static void Write(IOps ops, double[] values, Tensor t)
    {
        if (t.DType == DType.F32) ops.Upload<float>(values.Select(x => (float)x).ToArray(), t);
        else ops.Upload<double>(values, t);
    }

    public void AllReduce(IOps ops, Tensor t, double premultiply = 1.0)
    {
        TensorAllReduces++;
        TensorAllReduceElements += t.Count;
        // Each rank premultiplies its own values (in the tensor's type), the sum is taken once in rank order.
        var mine = Read(ops, t);
        bool f32 = t.DType == DType.F32;
        for (int i = 0; i < mine.Length; i++) mine[i] = f32 ? (float)(mine[i] * premultiply) : mine[i] * premultiply;
        var sum = group.Exchange(rank, mine, slots =>
        {
            var acc = new double[slots[0]!.Length];
            foreach (var s in slots)
                for (int i = 0; i < acc.Length; i++) acc[i] += s![i];
            return acc;
        });
        Write(ops, sum, t);
    }

    public ICommRequest AllReduceAsync(IOps ops, Tensor t, double premultiply = 1.0)
    {
        AllReduce(ops, t, premultiply);
        return Done.Instance;
    }

    public void Broadcast(IOps ops, Tensor t, int root)
    {
        var result = group.Exchange(rank, rank == root ? Read(ops, t) : [], slots => slots[root]!);
        if (rank != root) Write(ops, result, t);
    }

    public void AllReduceHost(Span<double> values)
    {
        var result = group.Exchange(rank, values.ToArray(), slots =>
        {
            var acc = new double[slots[0]!.Length];
            foreach (var s in slots)
                for (int i = 0; i < acc.Length; i++) acc[i] += s![i];
            return acc;
        });
        result.CopyTo(values);
    }

    public void BroadcastHost(Span<byte> bytes, int root)
    {
        var mine = rank == root ? bytes.ToArray().Select(b => (double)b).ToArray() : [];
        var result = group.Exchange(rank, mine, slots => slots[root]!);
        if (rank != root)
            for (int i = 0; i < bytes.Length; i++) bytes[i] = (byte)result[i];
    }

    public void Barrier() => group.Exchange(rank, [], _ => []);

    public void Abort(string reason) => group.Abort(rank, reason);

    public void Dispose() { }
}
