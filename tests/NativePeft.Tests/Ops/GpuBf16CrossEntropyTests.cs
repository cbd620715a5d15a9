using NativePeft.Numerics;
using NativePeft.Ops;
using NUnit.Framework;

namespace NativePeft.Tests.Ops;

/// <summary>
/// The fused cross-entropy backward with bf16 activations over many vocabulary chunks: dhidden is summed in fp32 and
/// rounded to bf16 once, so the 16-chunk result equals the one-chunk result bit for bit in nearly every element (the
/// chunks only reorder fp32 sums; rounding after every chunk, as before, changes a large share of them) and is no
/// further from the float64 reference.
/// </summary>
[TestFixture("emulator")]
[TestFixture("cuda")]
public class GpuBf16CrossEntropyTests(string device)
{
    private GpuOps _gpu = null!;

    [OneTimeSetUp]
    public void SetUp() => _gpu = TestGpus.CreateOps(device);

    [OneTimeTearDown]
    public void TearDown() => _gpu?.Dispose();

    private const int N = 24, C = 64, V = 512;

    private static float[] RandomBf16Values(int n, int seed, double scale)
    {
        var r = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => BFloat16.FromSingle((float)((r.NextDouble() * 2 - 1) * scale)).ToSingle()).ToArray();
    }

    private double[] Backward(float[] hidden, float[] weight, int[] labels, int chunk)
    {
        var h = _gpu.Memory.Allocate(DType.BF16, N, C);
        var w = _gpu.Memory.Allocate(DType.BF16, V, C);
        var l = _gpu.Memory.Allocate(DType.I32, N);
        var lse = _gpu.Memory.Allocate(DType.F32, N);
        var dh = _gpu.Memory.Allocate(DType.BF16, N, C);
        try
        {
            _gpu.Upload<BFloat16>(hidden.Select(BFloat16.FromSingle).ToArray(), h);
            _gpu.Upload<BFloat16>(weight.Select(BFloat16.FromSingle).ToArray(), w);
            _gpu.Upload<int>(labels, l);
            _gpu.CrossEntropyForward(h, w, l, lse, chunk);
            _gpu.CrossEntropyBackward(h, w, l, lse, 1.0, dh, null, chunk);
            var result = new BFloat16[N * C];
            _gpu.Download<BFloat16>(dh, result);
            return result.Select(x => (double)x.ToSingle()).ToArray();
        }
        finally
        {
            foreach (var t in new[] { dh, lse, l, w, h }) _gpu.Memory.Free(t);
        }
    }

    [Test]
    public void ManyChunksRoundDhiddenOnce()
    {
        var hidden = RandomBf16Values(N * C, 1, 1.0);
        var weight = RandomBf16Values(V * C, 2, 0.5);
        var labels = Enumerable.Range(0, N).Select(i => i % 7 == 3 ? -100 : (i * 37) % V).ToArray();

        // float64 reference on the CPU, from the same bf16 values.
        using var cpu = new CpuOps();
        var h64 = cpu.Memory.Allocate(DType.F64, N, C); var w64 = cpu.Memory.Allocate(DType.F64, V, C);
        var l64 = cpu.Memory.Allocate(DType.I32, N); var lse64 = cpu.Memory.Allocate(DType.F64, N); var dh64 = cpu.Memory.Allocate(DType.F64, N, C);
        cpu.Upload<double>(hidden.Select(x => (double)x).ToArray(), h64);
        cpu.Upload<double>(weight.Select(x => (double)x).ToArray(), w64);
        cpu.Upload<int>(labels, l64);
        cpu.CrossEntropyForward(h64, w64, l64, lse64, V);
        cpu.CrossEntropyBackward(h64, w64, l64, lse64, 1.0, dh64, null, V);
        var exact = new double[N * C];
        cpu.Download<double>(dh64, exact);

        var sixteen = Backward(hidden, weight, labels, V / 16);
        var one = Backward(hidden, weight, labels, V);
        double scale = exact.Max(Math.Abs), err16 = 0, err1 = 0;
        int same = 0;
        for (int i = 0; i < exact.Length; i++)
        {
            err16 = Math.Max(err16, Math.Abs(sixteen[i] - exact[i]));
            err1 = Math.Max(err1, Math.Abs(one[i] - exact[i]));
            if (sixteen[i] == one[i]) same++;
        }
        TestContext.Out.WriteLine($"max |error| / max |dhidden|: 16 chunks {err16 / scale:E3}, one chunk {err1 / scale:E3}");
        // The bf16 logits (rounded at 2⁻⁹) dominate both errors; summing the chunks in fp32 adds nothing on top.
        Assert.That(err1 / scale, Is.LessThan(0.01), "one chunk against float64");
        Assert.That(err16, Is.LessThanOrEqualTo(1.25 * err1), "16 chunks are no worse than one");
        TestContext.Out.WriteLine($"{same} of {exact.Length} elements equal between 16 chunks and one");
        Assert.That(same, Is.GreaterThanOrEqualTo(exact.Length * 95 / 100), "the chunking only reorders fp32 sums");
    }
}
