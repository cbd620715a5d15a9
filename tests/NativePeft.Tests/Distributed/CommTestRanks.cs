using System.Net;
using System.Net.Sockets;
using NativePeft.Distributed;

namespace NativePeft.Tests.Distributed;

/// <summary>Ranks as threads of the test process, talking over 127.0.0.1 on a free port.</summary>
internal static class CommTestRanks
{
    /// <summary>A port nothing listens on now (bound to port 0, then released), so tests can run in parallel.</summary>
    public static int FreePort()
    {
        var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int port = ((IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop();
        return port;
    }

    public static DistributedOptions Options(int rank, int worldSize, int port, double timeoutSeconds = 5) => new()
    {
        Rank = rank,
        WorldSize = worldSize,
        MasterAddr = "127.0.0.1",
        MasterPort = port,
        Backend = "cpu",
        Timeout = TimeSpan.FromSeconds(timeoutSeconds),
    };

    /// <summary>Opens <paramref name="worldSize"/> communicators, one per thread (the rendezvous needs them at once).</summary>
    public static TcpCommunicator[] Open(int worldSize, double timeoutSeconds = 5)
    {
        int port = FreePort();
        return Run(worldSize, r => new TcpCommunicator(Options(r, worldSize, port, timeoutSeconds)));
    }

    /// <summary>Runs <paramref name="body"/> for every rank on its own thread; the results by rank, or each rank's exception.</summary>
    public static (T? Result, Exception? Error)[] TryRun<T>(int worldSize, Func<int, T> body)
    {
        var results = new (T?, Exception?)[worldSize];
        var threads = Enumerable.Range(0, worldSize).Select(r => new Thread(() =>
        {
            try { results[r] = (body(r), null); }
            catch (Exception e) { results[r] = (default, e); }
        }) { IsBackground = true }).ToList();
        threads.ForEach(t => t.Start());
        foreach (var t in threads)
            if (!t.Join(TimeSpan.FromSeconds(30))) throw new TimeoutException("a rank's thread did not finish in 30 s (a hang)");
        return results;
    }

    /// <summary>As <see cref="TryRun{T}"/>; the first rank's exception is rethrown.</summary>
    public static T[] Run<T>(int worldSize, Func<int, T> body)
    {
        var results = TryRun(worldSize, body);
        if (results.FirstOrDefault(r => r.Error is not null).Error is { } e)
            throw new AggregateException($"a rank failed: {e.Message}", e);
        return results.Select(r => r.Result!).ToArray();
    }

    public static void DisposeAll(IEnumerable<ICommunicator> comms)
    {
        foreach (var c in comms) c.Dispose();
    }
}
