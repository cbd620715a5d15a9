using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Text;
using NativePeft.Distributed;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Ops;
using NUnit.Framework;
using static NativePeft.Tests.Distributed.CommTestRanks;

namespace NativePeft.Tests.Distributed;

/// <summary>
/// The cpu backend with ranks as threads over 127.0.0.1: the reductions against sums computed here in rank order
/// (and float64), the same bits on every rank, and every failure ending every rank in bounded time.
/// </summary>
[Parallelizable(ParallelScope.All)]
public class TcpCommunicatorTests
{
    /// <summary>Rank r's value at element i: different magnitudes, so the order of the fp32 sum matters.</summary>
    private static float Value(int r, int i) => (float)((i + 1) * 0.1 * Math.Pow(1000, r % 3) + r * 1e-3 - i * 1e-5);

    private static float[] ReduceF32InRankOrder(int world, int n, Func<int, float> scale)
    {
        var expected = new float[n];
        for (int i = 0; i < n; i++)
        {
            float acc = Value(0, i) * scale(0);
            for (int r = 1; r < world; r++) acc += Value(r, i) * scale(r);
            expected[i] = acc;
        }
        return expected;
    }

    private static T[] AllReduceOnEveryRank<T>(TcpCommunicator[] comms, DType dtype, int n, Func<int, int, T> value, Func<int, double>? scale = null)
        where T : unmanaged
        => Run(comms.Length, r =>
        {
            using var ops = new CpuOps();
            var t = ops.Memory.Allocate(dtype, n);
            ops.Upload(Enumerable.Range(0, n).Select(i => value(r, i)).ToArray().AsSpan(), t);
            comms[r].AllReduce(ops, t, scale?.Invoke(r) ?? 1.0);
            var result = new T[n];
            ops.Download(t, result.AsSpan());
            return result;
        }).SelectMany(x => x).ToArray();

    [TestCase(1)]
    [TestCase(2)]
    [TestCase(3)]
    [TestCase(4)]
    public void AllReduceF32IsTheRankOrderSumWithTheSameBitsOnEveryRank(int world)
    {
        const int n = 37;
        var comms = Open(world);
        try
        {
            var all = AllReduceOnEveryRank(comms, DType.F32, n, Value);
            var expected = ReduceF32InRankOrder(world, n, _ => 1f);
            for (int r = 0; r < world; r++)
                Assert.That(all.Skip(r * n).Take(n).Select(BitConverter.SingleToInt32Bits), Is.EqualTo(expected.Select(BitConverter.SingleToInt32Bits)), $"rank {r}");
            for (int i = 0; i < n; i++)
            {
                double exact = Enumerable.Range(0, world).Sum(r => (double)Value(r, i));
                Assert.That(all[i], Is.EqualTo(exact).Within(Math.Abs(exact) * 1e-6), $"element {i} against the float64 sum");
            }
        }
        finally { DisposeAll(comms); }
    }

    [TestCase(2)]
    [TestCase(4)]
    public void AllReduceF64IsTheFloat64RankOrderSum(int world)
    {
        const int n = 11;
        var comms = Open(world);
        try
        {
            double V(int r, int i) => Math.Sqrt(r + 2) * (i + 1) * (r % 2 == 0 ? 1e8 : 1e-8);
            var all = AllReduceOnEveryRank(comms, DType.F64, n, V);
            for (int i = 0; i < n; i++)
            {
                double acc = V(0, i);
                for (int r = 1; r < world; r++) acc += V(r, i);
                for (int r = 0; r < world; r++) Assert.That(BitConverter.DoubleToInt64Bits(all[r * n + i]), Is.EqualTo(BitConverter.DoubleToInt64Bits(acc)));
            }
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void AllReduceBf16SumsInFp32AndRoundsOnce()
    {
        const int world = 3;
        var comms = Open(world);
        try
        {
            // Parts 1, 2^-8, 2^-8: bf16 has 8 significant bits, so rounding after every step (1 + 2^-8 → 1, ties to
            // even) would give 1; the fp32 sum 1 + 2^-7 is a bf16 value and comes out exact.
            BFloat16 V(int r, int i) => BFloat16.FromSingle(r == 0 ? 1f + i : MathF.Pow(2, -8) * (1 + i));
            var all = AllReduceOnEveryRank(comms, DType.BF16, 4, V);
            var expected = new[] { 1f + 1 / 128f, 2f + 2 / 128f, 3f + 3 / 128f, 4f + 4 / 128f }
                .Select(f => BFloat16.FromSingle(f).ToSingle()).ToArray();
            Assert.That(expected[0], Is.EqualTo(1.0078125f));
            for (int r = 0; r < world; r++) Assert.That(all.Skip(r * 4).Take(4).Select(b => b.ToSingle()), Is.EqualTo(expected), $"rank {r}");
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void PremultiplyScalesEachPartBeforeTheSum()
    {
        const int world = 3, n = 9;
        var comms = Open(world);
        try
        {
            // Averaging as data parallelism does (1/world is not a binary fraction), and a rank-specific factor.
            var mean = AllReduceOnEveryRank(comms, DType.F32, n, Value, _ => 1.0 / world);
            var expectedMean = ReduceF32InRankOrder(world, n, _ => (float)(1.0 / world));
            var scaled = AllReduceOnEveryRank(comms, DType.F32, n, Value, r => 0.5 * (r + 1));
            var expectedScaled = ReduceF32InRankOrder(world, n, r => 0.5f * (r + 1));
            for (int r = 0; r < world; r++)
            {
                Assert.That(mean.Skip(r * n).Take(n), Is.EqualTo(expectedMean), $"rank {r}, premultiply 1/3");
                Assert.That(scaled.Skip(r * n).Take(n), Is.EqualTo(expectedScaled), $"rank {r}, premultiply (r+1)/2");
            }
            Assert.That(expectedMean[0], Is.EqualTo((Value(0, 0) + Value(1, 0) + Value(2, 0)) / 3.0).Within(1e-4).Percent);
        }
        finally { DisposeAll(comms); }
    }

    [TestCase(1)]
    [TestCase(3)]
    public void BroadcastFromEachRootGivesEveryRankTheRootsTensor(int world)
    {
        var comms = Open(world);
        try
        {
            for (int root = 0; root < world; root++)
            {
                int theRoot = root;
                var got = Run(world, r =>
                {
                    using var ops = new CpuOps();
                    var t = ops.Memory.Allocate(DType.F32, 2, 3);
                    ops.Upload(Enumerable.Range(0, 6).Select(i => 100f * r + i).ToArray().AsSpan(), t);
                    comms[r].Broadcast(ops, t, theRoot);
                    var result = new float[6];
                    ops.Download(t, result.AsSpan());
                    return result;
                });
                for (int r = 0; r < world; r++)
                    Assert.That(got[r], Is.EqualTo(Enumerable.Range(0, 6).Select(i => 100f * theRoot + i)), $"root {root}, rank {r}");
            }
        }
        finally { DisposeAll(comms); }
    }

    [TestCase(1)]
    [TestCase(4)]
    public void HostCollectivesSumInRankOrderAndBroadcastBytes(int world)
    {
        var comms = Open(world);
        try
        {
            var got = Run(world, r =>
            {
                var values = new[] { r + 1.0, 0.1 * r, -r };
                comms[r].AllReduceHost(values);
                var bytes = Encoding.UTF8.GetBytes(r == world - 1 ? "from the last" : "something els");
                comms[r].BroadcastHost(bytes, world - 1);
                comms[r].Barrier();
                return (values, Encoding.UTF8.GetString(bytes));
            });
            double tenth = 0;
            for (int r = 0; r < world; r++) tenth += 0.1 * r;
            foreach (var (values, text) in got)
            {
                Assert.That(values[0], Is.EqualTo(world * (world + 1) / 2.0));
                Assert.That(BitConverter.DoubleToInt64Bits(values[1]), Is.EqualTo(BitConverter.DoubleToInt64Bits(tenth)));
                Assert.That(values[2], Is.EqualTo(-world * (world - 1) / 2.0));
                Assert.That(text, Is.EqualTo("from the last"));
            }
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void AsyncRequestsReturnAtOnceAndCompleteInOrder()
    {
        const int world = 2, n = 5;
        var comms = Open(world);
        try
        {
            var got = Run(world, r =>
            {
                using var ops = new CpuOps();
                var tensors = Enumerable.Range(0, 3).Select(k =>
                {
                    var t = ops.Memory.Allocate(DType.F32, n);
                    ops.Upload(Enumerable.Range(0, n).Select(i => (float)(k * 10 + i + r)).ToArray().AsSpan(), t);
                    return t;
                }).ToList();
                if (r == 1) Thread.Sleep(700); // rank 0's requests cannot complete before rank 1 joins
                var clock = Stopwatch.StartNew();
                var requests = tensors.Select(t => comms[r].AllReduceAsync(ops, t)).ToList();
                double started = clock.Elapsed.TotalMilliseconds;
                requests[2].Wait(); // the last one: the earlier ones completed before it
                double finished = clock.Elapsed.TotalMilliseconds;
                var results = tensors.Select(t => { var a = new float[n]; ops.Download(t, a.AsSpan()); return a; }).ToList();
                requests[0].Wait();
                requests[1].Wait();
                comms[r].Barrier();
                return (started, finished, results);
            });
            Assert.That(got[0].started, Is.LessThan(300), "rank 0 was blocked by AllReduceAsync");
            Assert.That(got[0].finished, Is.GreaterThan(400), "rank 0's requests completed before rank 1 took part");
            foreach (var (_, _, results) in got)
                for (int k = 0; k < 3; k++)
                    Assert.That(results[k], Is.EqualTo(Enumerable.Range(0, n).Select(i => (float)(2 * (k * 10 + i) + 1))), $"request {k}");
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void MismatchedCollectivesAreAnErrorNamingBothCalls()
    {
        var comms = Open(2);
        try
        {
            var results = TryRun(2, r =>
            {
                using var ops = new CpuOps();
                var t = ops.Memory.Allocate(DType.F32, r == 0 ? 4 : 6);
                if (r == 0) comms[r].AllReduce(ops, t);
                else comms[r].Broadcast(ops, t, 0);
                return 0;
            });
            foreach (var (_, error) in results)
            {
                Assert.That(error, Is.TypeOf<CommunicatorException>());
                Assert.That(error!.Message, Does.Contain("all_reduce #1 (F32, 4 elements)").And.Contain("broadcast #1 (F32, 6 elements, root 0)"));
            }
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void AbortOnOneRankEndsEveryRanksCollectiveWithItsMessage()
    {
        const int world = 3;
        var comms = Open(world, timeoutSeconds: 30);
        try
        {
            var results = TryRun(world, r =>
            {
                var clock = Stopwatch.StartNew();
                if (r == 2)
                {
                    Thread.Sleep(200);
                    comms[r].Abort("CUDA out of memory in the backward");
                    comms[r].Barrier();
                }
                else
                {
                    using var ops = new CpuOps();
                    comms[r].AllReduce(ops, ops.Memory.Allocate(DType.F32, 8));
                }
                return clock.Elapsed;
            });
            for (int r = 0; r < world; r++)
            {
                Assert.That(results[r].Error, Is.TypeOf<CommunicatorException>(), $"rank {r}");
                Assert.That(results[r].Error!.Message, Does.StartWith("rank 2: CUDA out of memory in the backward"), $"rank {r}");
            }
        }
        finally { DisposeAll(comms); }
    }

    [TestCase(2)]
    [TestCase(0)]
    public void ARankThatVanishesEndsTheOthersCollectives(int vanishing)
    {
        const int world = 3;
        var comms = Open(world, timeoutSeconds: 30);
        try
        {
            var clock = Stopwatch.StartNew();
            var results = TryRun(world, r =>
            {
                if (r == vanishing)
                {
                    Thread.Sleep(200);
                    comms[r].CloseWithoutGoodbye();
                    return 0;
                }
                using var ops = new CpuOps();
                comms[r].AllReduce(ops, ops.Memory.Allocate(DType.F32, 8));
                return 1;
            });
            Assert.That(clock.Elapsed.TotalSeconds, Is.LessThan(5), "the others noticed within the bound (the timeout is 30 s)");
            for (int r = 0; r < world; r++)
            {
                if (r == vanishing) continue;
                Assert.That(results[r].Error, Is.TypeOf<CommunicatorException>(), $"rank {r}");
                Assert.That(results[r].Error!.Message, Is.EqualTo($"rank {vanishing} ended (connection closed) during all_reduce #1 (F32, 8 elements)"), $"rank {r}");
            }
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void AKilledProcessEndsTheCollectiveWithinTheBound()
    {
        if (!OperatingSystem.IsLinux() || !File.Exists("/bin/bash")) Assert.Ignore("needs /bin/bash (its /dev/tcp) on Linux");
        int port = FreePort();
        // Rank 1 is a real process: bash opens a connection, introduces itself as rank 1 of 2, and then sleeps.
        var hello = string.Concat(TcpCommunicator.HelloFrame(1, 2, "").Select(b => "\\" + Convert.ToString(b, 8).PadLeft(3, '0')));
        TcpCommunicator? rank0 = null;
        Exception? rendezvousError = null;
        var opening = new Thread(() =>
        {
            try { rank0 = new TcpCommunicator(Options(0, 2, port, timeoutSeconds: 30)); }
            catch (Exception e) { rendezvousError = e; }
        }) { IsBackground = true };
        opening.Start();
        Thread.Sleep(300); // rank 0 listens
        var psi = new ProcessStartInfo("/bin/bash")
        {
            ArgumentList = { "-c", $"exec 3<>/dev/tcp/127.0.0.1/{port} && printf '{hello}' >&3 && exec sleep 60" },
            UseShellExecute = false,
        };
        using var child = Process.Start(psi)!;
        try
        {
            Assert.That(opening.Join(TimeSpan.FromSeconds(10)), Is.True, "the rendezvous with the child process");
            Assert.That(rendezvousError, Is.Null);
            using var comm = rank0!;
            var killer = new Thread(() => { Thread.Sleep(300); child.Kill(); }) { IsBackground = true };
            killer.Start();
            var clock = Stopwatch.StartNew();
            using var ops = new CpuOps();
            var e = Assert.Throws<CommunicatorException>(() => comm.AllReduce(ops, ops.Memory.Allocate(DType.F32, 4)));
            Assert.That(e!.Message, Is.EqualTo("rank 1 ended (connection closed) during all_reduce #1 (F32, 4 elements)"));
            Assert.That(clock.Elapsed.TotalSeconds, Is.LessThan(5));
        }
        finally
        {
            if (!child.HasExited) child.Kill();
        }
    }

    [Test]
    public void ASilentRankIsATimeoutNamingTheOperationAndTheRank()
    {
        var comms = Open(3, timeoutSeconds: 1);
        try
        {
            var results = TryRun(3, r =>
            {
                using var ops = new CpuOps();
                if (r != 2) comms[r].AllReduce(ops, ops.Memory.Allocate(DType.F32, 3));
                else Thread.Sleep(1500);
                return 0;
            });
            foreach (int r in new[] { 0, 1 })
                Assert.That(results[r].Error?.Message, Is.EqualTo("rank 0: all_reduce #1 (F32, 3 elements) timed out after 1 s waiting for rank(s) 2"), $"rank {r}");
            var late = Assert.Throws<CommunicatorException>(() => comms[2].Barrier());
            Assert.That(late!.Message, Does.Contain("waiting for rank(s) 2"));
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void ARankThatNeverArrivesIsARendezvousTimeoutNamingIt()
    {
        int port = FreePort();
        var clock = Stopwatch.StartNew();
        var results = TryRun(2, r => new TcpCommunicator(Options(r == 0 ? 0 : 2, 4, port, timeoutSeconds: 1.5)));
        Assert.That(clock.Elapsed.TotalSeconds, Is.LessThan(6));
        foreach (var (comm, error) in results)
        {
            comm?.Dispose();
            Assert.That(error, Is.TypeOf<CommunicatorException>());
            Assert.That(error!.Message, Does.StartWith("rank 0: rendezvous timed out after 1.5 s waiting for rank(s) 1, 3 to connect to 127.0.0.1:" + port.ToString(CultureInfo.InvariantCulture)));
        }
    }

    [Test]
    public void WorldSizesThatDisagreeAreAnErrorNamingBoth()
    {
        int port = FreePort();
        var results = TryRun(2, r => new TcpCommunicator(Options(r, r == 0 ? 2 : 3, port, timeoutSeconds: 3)));
        foreach (var (comm, error) in results)
        {
            comm?.Dispose();
            Assert.That(error?.Message, Is.EqualTo("rank 0: WORLD_SIZE mismatch: rank 0 has WORLD_SIZE=2 but rank 1 has WORLD_SIZE=3"));
        }
    }

    [Test]
    public void RankZeroListensOnTheLoopbackAddressOnly()
    {
        var comms = Open(2);
        try
        {
            Assert.That(comms[0].ListenEndPoint!.Address, Is.EqualTo(IPAddress.Loopback));
            Assert.That(comms[0].BindsAnyAddress, Is.False);
            Assert.That(comms[1].ListenEndPoint, Is.Null);
        }
        finally { DisposeAll(comms); }
    }

    [Test]
    public void OnlyTheNcclBootstrapListensOnEveryInterfaceAndItIsAnotherJob()
    {
        int port = FreePort();
        var comms = Run(2, r => new TcpCommunicator(Options(r, 2, port), bindAnyAddress: true, jobCheck: "nccl"));
        try
        {
            Assert.That(comms[0].ListenEndPoint!.Address, Is.EqualTo(IPAddress.Any));
            Assert.That(comms[0].BindsAnyAddress, Is.True);
            var sums = Run(2, r => { var v = new[] { 1.0 + r }; comms[r].AllReduceHost(v); return v[0]; });
            Assert.That(sums, Is.EqualTo(new[] { 3.0, 3.0 }));
        }
        finally { DisposeAll(comms); }

        // A cpu rank cannot join an nccl bootstrap's rendezvous.
        int other = FreePort();
        var results = TryRun(2, r => r == 0
            ? new TcpCommunicator(Options(0, 2, other, timeoutSeconds: 3), bindAnyAddress: true, jobCheck: "nccl")
            : new TcpCommunicator(Options(1, 2, other, timeoutSeconds: 3)));
        foreach (var (comm, error) in results)
        {
            comm?.Dispose();
            Assert.That(error?.Message, Is.EqualTo("rank 0: rank 1 belongs to another job (its job check is '', rank 0's is 'nccl')"));
        }
    }

    [TestCase("10.1.2.3")]
    [TestCase("example.com")]
    public void ANonLoopbackMasterAddrIsRefused(string address)
    {
        var options = Options(1, 2, FreePort()) with { MasterAddr = address };
        var e = Assert.Throws<ArgumentException>(() => new TcpCommunicator(options));
        Assert.That(e!.Message, Does.Contain("MASTER_ADDR=" + address).And.Contain("single-machine"));
    }

    [Test]
    public void WorldOfOneNeedsNoSocketAndAppliesThePremultiply()
    {
        using var comm = new TcpCommunicator(Options(0, 1, port: 1)); // port 1 would need root: nothing is bound
        using var ops = new CpuOps();
        var t = ops.Memory.Allocate(DType.F32, 3);
        ops.Upload(new[] { 1f, 3f, 0.1f }.AsSpan(), t);
        comm.AllReduceAsync(ops, t, 0.5).Wait();
        var got = new float[3];
        ops.Download(t, got.AsSpan());
        Assert.That(got, Is.EqualTo(new[] { 0.5f, 1.5f, 0.1f * 0.5f }));
        Assert.That(comm.ListenEndPoint, Is.Null);
    }

    [Test]
    public void EmulatorTensorsAreReducedInPlaceLikeCpuOnes()
    {
        const int world = 2, n = 13;
        var comms = Open(world);
        try
        {
            var got = Run(world, r =>
            {
                using var ops = new GpuOps(TestGpus.CreateEmulated(), ownsGpu: true);
                var t = ops.Memory.Allocate(DType.F32, n);
                ops.Upload(Enumerable.Range(0, n).Select(i => Value(r, i)).ToArray().AsSpan(), t);
                comms[r].AllReduce(ops, t, 0.25);
                var b = ops.Memory.Allocate(DType.BF16, 2);
                ops.Upload(new[] { BFloat16.FromSingle(r), BFloat16.FromSingle(-r) }.AsSpan(), b);
                comms[r].Broadcast(ops, b, 1);
                var result = new float[n];
                ops.Download(t, result.AsSpan());
                var bytes = new BFloat16[2];
                ops.Download(b, bytes.AsSpan());
                return (result, bytes.Select(x => x.ToSingle()).ToArray());
            });
            var expected = ReduceF32InRankOrder(world, n, _ => 0.25f);
            foreach (var (result, broadcast) in got)
            {
                Assert.That(result, Is.EqualTo(expected));
                Assert.That(broadcast, Is.EqualTo(new[] { 1f, -1f }));
            }
        }
        finally { DisposeAll(comms); }
    }
}
