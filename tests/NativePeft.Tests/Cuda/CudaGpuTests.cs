using System.Text;
using System.Text.RegularExpressions;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Cuda;

/// <summary>Tests that need a CUDA device; each reports "no CUDA device: reason" as ignored without one.</summary>
[NonParallelizable]
public class CudaGpuTests
{
    private CudaGpu? _gpu;
    private string _reason = "";

    [OneTimeSetUp]
    public void OpenDevice()
    {
        if (!CudaGpu.TryCreate(out _gpu, out _reason)) _gpu = null;
        if (_gpu is null && NativePeft.Tests.Ops.TestGpus.CudaRequired)
            Assert.Fail($"{NativePeft.Tests.Ops.TestGpus.RequireCudaVariable}=1 but the CUDA device is unavailable: {_reason}");
    }

    [OneTimeTearDown]
    public void CloseDevice() => _gpu?.Dispose();

    private CudaGpu Gpu
    {
        get
        {
            if (_gpu is null) Assert.Ignore("no CUDA device: " + _reason);
            return _gpu!;
        }
    }

    private CudaBlas Blas
    {
        get
        {
            var g = Gpu;
            try { return g.Blas; }
            catch (InvalidOperationException ex) { Assert.Ignore(ex.Message); throw; }
        }
    }

    [Test]
    public void PropertiesAreSane()
    {
        var p = Gpu.Properties;
        TestContext.Out.WriteLine(p);
        Assert.That(p.Name, Is.Not.Empty);
        Assert.That(p.Kind, Is.EqualTo(GpuKind.Cuda));
        Assert.That(p.MultiprocessorCount, Is.GreaterThan(0));
        Assert.That(p.ComputeCapabilityMajor, Is.InRange(3, 20));
        Assert.That(p.DriverVersion, Is.GreaterThanOrEqualTo(11000));
        var (free, total) = Gpu.MemoryInfo();
        Assert.That(total, Is.InRange(1, p.TotalMemoryBytes));   // equal without MIG
        Assert.That(free, Is.InRange(1, total));
    }

    [Test]
    public void CopyRoundTripAndDeviceToDevice()
    {
        var g = Gpu;
        var data = Enumerable.Range(0, 1000).Select(i => i * 0.25f - 7).ToArray();
        var a = g.Alloc(data.Length * 4);
        var b = g.Alloc(data.Length * 4);
        try
        {
            g.CopyToDevice<float>(data, a);
            g.CopyDeviceToDevice(a.Offset(400), b, 600 * 4);   // elements 100..699
            var back = new float[data.Length];
            g.CopyToHost<float>(a, back);
            Assert.That(back, Is.EqualTo(data));
            var part = new float[600];
            g.CopyToHost<float>(b, part);
            Assert.That(part, Is.EqualTo(data.Skip(100).Take(600).ToArray()));
        }
        finally
        {
            g.Free(a);
            g.Free(b);
        }
    }

    [Test]
    public void AllocationsAreCountedAndPeakTracked()
    {
        var g = Gpu;
        long before = g.AllocatedBytes;
        g.ResetPeak();
        var a = g.Alloc(3000);
        var b = g.Alloc(5000);
        Assert.That(g.AllocatedBytes, Is.EqualTo(before + 8000));
        g.Free(a);
        Assert.That(g.AllocatedBytes, Is.EqualTo(before + 5000));
        Assert.That(g.PeakAllocatedBytes, Is.EqualTo(before + 8000));
        g.Free(b);
        g.ResetPeak();
        Assert.That(g.PeakAllocatedBytes, Is.EqualTo(before));
        Assert.Throws<ArgumentException>(() => g.Free(b));
    }

    [Test]
    public void MemsetBytesAndWords()
    {
        var g = Gpu;
        var p = g.Alloc(1024);
        try
        {
            g.Memset(p, 0x00, 1024);                  // aligned: the D32 path
            g.Memset(p.Offset(1), 0xAB, 13);          // unaligned: the D8 path
            g.Memset(p.Offset(64), 0x5C, 64);         // aligned, non-zero byte replicated into a word
            g.MemsetD32(p.Offset(256), 0xDEADBEEF, 4);
            var bytes = new byte[1024];
            g.CopyToHost<byte>(p, bytes);
            var expected = new byte[1024];
            for (int i = 1; i < 14; i++) expected[i] = 0xAB;
            for (int i = 64; i < 128; i++) expected[i] = 0x5C;
            for (int w = 0; w < 4; w++) BitConverter.TryWriteBytes(expected.AsSpan(256 + 4 * w), 0xDEADBEEFu);
            Assert.That(bytes, Is.EqualTo(expected));
        }
        finally { g.Free(p); }
    }

    [Test]
    public unsafe void ManagedMemoryPrefetchesBothWays()
    {
        var g = Gpu;
        const int n = 1 << 16;
        var p = g.AllocManaged(n * 4);
        try
        {
            var data = Enumerable.Range(0, n).Select(i => (float)i).ToArray();
            g.CopyToDevice<float>(data, p);
            g.Prefetch(p, n * 4, toDevice: true);
            g.Advise(p, n * 4, CuMemAdvise.SetPreferredLocation, forDevice: true);
            g.Prefetch(p, n * 4, toDevice: false);
            g.Synchronize();
            // Managed memory is readable from the host once the stream is idle.
            var host = new ReadOnlySpan<float>((void*)p.Address, n);
            Assert.That(host.ToArray(), Is.EqualTo(data));
            var back = new float[n];
            g.CopyToHost<float>(p, back);
            Assert.That(back, Is.EqualTo(data));
            TestContext.Out.WriteLine($"prefetch via {CudaDriver.PrefetchEntryPoint}, concurrent managed access {g.Properties.ConcurrentManagedAccess}");
        }
        finally { g.Free(p); }
    }

    [Test]
    public void PinnedAsyncCopiesRoundTrip()
    {
        var g = Gpu;
        using var pinned = g.AllocPinned(4096);
        var span = pinned.AsSpan<int>();
        for (int i = 0; i < span.Length; i++) span[i] = i * 3;
        var d = g.Alloc(4096);
        try
        {
            g.CopyToDeviceAsync(pinned, 0, d, 4096);
            g.Synchronize();
            span.Clear();
            g.CopyToHostAsync(d, pinned, 0, 4096);
            g.Synchronize();
            Assert.That(pinned.AsSpan<int>().ToArray(), Is.EqualTo(Enumerable.Range(0, 1024).Select(i => i * 3).ToArray()));
        }
        finally { g.Free(d); }
    }

    [Test]
    public void EventsMeasureNonNegativeTime()
    {
        var g = Gpu;
        var p = g.Alloc(64 << 20);
        try
        {
            using var start = g.RecordEvent();
            g.Memset(p, 1, 64 << 20);
            using var end = g.RecordEvent();
            float ms = g.ElapsedMs(start, end);
            Assert.That(ms, Is.GreaterThanOrEqualTo(0f));
            Assert.That(ms, Is.LessThan(10_000f));
        }
        finally { g.Free(p); }
    }

    // ---- kernels ----

    private void LoadTestKernels()
    {
        if (!Gpu.HasKernel("cudatest_fill_u32"))
            Gpu.LoadPtxModule("cudatest.ptx", Encoding.ASCII.GetBytes(CudaTestKernels.Ptx));
    }

    [Test]
    public void LaunchesAPtxKernelWithIntAndPointerArguments()
    {
        var g = Gpu;
        LoadTestKernels();
        Assert.That(g.HasKernel("cudatest_fill_u32"), Is.True);
        const int n = 1000;
        var p = g.Alloc(n * 4);
        try
        {
            g.Launch("cudatest_fill_u32", (n + 255) / 256, 256, 0, p, 17u, n);
            var back = new uint[n];
            g.CopyToHost<uint>(p, back);
            Assert.That(back, Is.EqualTo(Enumerable.Range(0, n).Select(i => 17u + (uint)i).ToArray()));
        }
        finally { g.Free(p); }
    }

    [Test]
    public void LaunchPassesFloatAndLongArguments()
    {
        var g = Gpu;
        LoadTestKernels();
        const int n = 777;
        var x = Enumerable.Range(0, n).Select(i => i * 0.5f).ToArray();
        var y = Enumerable.Range(0, n).Select(i => 1f - i).ToArray();
        var px = g.Alloc(n * 4);
        var py = g.Alloc(n * 4);
        try
        {
            g.CopyToDevice<float>(x, px);
            g.CopyToDevice<float>(y, py);
            g.Launch("cudatest_axpy_f32", (n + 127) / 128, 128, 0, py, px, 2.5f, (long)n);
            var back = new float[n];
            g.CopyToHost<float>(py, back);
            // 2.5·x + y is exact in fp32 for these values.
            Assert.That(back, Is.EqualTo(Enumerable.Range(0, n).Select(i => 2.5f * x[i] + y[i]).ToArray()));
        }
        finally { g.Free(px); g.Free(py); }
    }

    [Test]
    public void LaunchWithMoreThan48KiBOfDynamicSharedMemory()
    {
        var g = Gpu;
        LoadTestKernels();
        const int n = 16384;                       // 64 KiB of shared memory
        if (g.MaxSharedMemoryPerBlockOptin < n * 4) Assert.Ignore($"device allows only {g.MaxSharedMemoryPerBlockOptin} bytes of shared memory per block");
        var input = Enumerable.Range(0, n).Select(i => (float)i).ToArray();
        var pin = g.Alloc(n * 4);
        var pout = g.Alloc(n * 4);
        try
        {
            g.CopyToDevice<float>(input, pin);
            g.Launch("cudatest_reverse_shared", 1, 512, n * 4, pin, pout, n);
            var back = new float[n];
            g.CopyToHost<float>(pout, back);
            Assert.That(back, Is.EqualTo(input.Reverse().ToArray()));
        }
        finally { g.Free(pin); g.Free(pout); }
    }

    [Test]
    public void UnknownKernelIsReportedClearly()
    {
        var g = Gpu;
        Assert.That(g.HasKernel("no_such_kernel_anywhere"), Is.False);
        var ex = Assert.Throws<InvalidOperationException>(() => g.Launch("no_such_kernel_anywhere", 1, 1, 0));
        Assert.That(ex!.Message, Does.Contain("'no_such_kernel_anywhere' not found"));
    }

    [Test]
    public void InvalidPtxRaisesWithTheJitLog()
    {
        var g = Gpu;
        const string bad = ".version 7.8\n.target sm_80\n.address_size 64\n.visible .entry broken() { this is not ptx; }\n";
        var ex = Assert.Throws<CudaException>(() => g.LoadPtxModule("broken.ptx", Encoding.ASCII.GetBytes(bad)));
        TestContext.Out.WriteLine(ex!.Message);
        Assert.That(ex.Function, Is.EqualTo("cuModuleLoadDataEx"));
        Assert.That(ex.Result, Is.EqualTo(CuResult.InvalidPtx));
        Assert.That(ex.JitLog, Is.Not.Null.And.Not.Empty);
        Assert.That(ex.Message, Does.Contain("CUDA_ERROR_INVALID_PTX (218)").And.Contain("[JIT log: "));
    }

    [Test]
    public void EveryEntryPointOfTheKernelFolderIsLaunchable()
    {
        var g = Gpu;
        var dir = g.KernelDirectory;
        var ptxFiles = Directory.Exists(dir) ? Directory.GetFiles(dir, "*.ptx") : [];
        if (ptxFiles.Length == 0) Assert.Ignore($"no kernels built in {dir}");
        var loaded = g.LoadedModules;
        TestContext.Out.WriteLine("modules: " + string.Join(", ", loaded));
        int entries = 0;
        foreach (var file in ptxFiles)
        {
            var stem = Path.GetFileNameWithoutExtension(file);
            Assert.That(loaded, Has.Some.StartsWith(stem + "."), $"{stem} not loaded");
            foreach (Match m in Regex.Matches(File.ReadAllText(file), @"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)\s*\("))
            {
                Assert.That(g.HasKernel(m.Groups[1].Value), Is.True, m.Groups[1].Value);
                entries++;
            }
        }
        Assert.That(entries, Is.GreaterThan(0));
    }

    // ---- cuBLAS ----

    private static ushort ToBf16(float f)
    {
        uint bits = BitConverter.SingleToUInt32Bits(f);
        uint rounding = 0x7FFFu + ((bits >> 16) & 1u);   // round to nearest even
        return (ushort)((bits + rounding) >> 16);
    }

    private static float FromBf16(ushort h) => BitConverter.UInt32BitsToSingle((uint)h << 16);

    /// <summary>Row-major C[m×n] = op(A)·op(B) in double; A/B stored row-major with row strides lda/ldb.</summary>
    private static double[] Reference(bool transA, bool transB, int m, int n, int k, float[] a, int lda, float[] b, int ldb)
    {
        var c = new double[m * n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double s = 0;
                for (int l = 0; l < k; l++)
                    s += (double)(transA ? a[l * lda + i] : a[i * lda + l]) * (transB ? b[j * ldb + l] : b[l * ldb + j]);
                c[i * n + j] = s;
            }
        return c;
    }

    private static float[] RandomMatrix(int count, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
    }

    [Test]
    public void SgemmRowMajorMatchesADoubleReference([Values(false, true)] bool transA, [Values(false, true)] bool transB)
    {
        var g = Gpu; var blas = Blas;
        const int m = 64, n = 32, k = 16;
        int lda = transA ? m : k, ldb = transB ? k : n;
        var a = RandomMatrix(m * k, 1);
        var b = RandomMatrix(k * n, 2);
        var pa = g.Alloc(a.Length * 4); var pb = g.Alloc(b.Length * 4); var pc = g.Alloc(m * n * 4);
        try
        {
            g.CopyToDevice<float>(a, pa);
            g.CopyToDevice<float>(b, pb);
            g.Memset(pc, 0, m * n * 4);
            blas.GemmRowMajor(transA, transB, m, n, k, 1f, pa, CudaDataType.R32F, lda, pb, CudaDataType.R32F, ldb,
                0f, pc, CudaDataType.R32F, n);
            var c = new float[m * n];
            g.CopyToHost<float>(pc, c);
            var expected = Reference(transA, transB, m, n, k, a, lda, b, ldb);
            // fp32 inputs, CUBLAS_COMPUTE_32F, default math (no TF32): |error| ≲ k·2⁻²⁴·Σ|a·b| < 1e-5 here.
            Assert.That(c.Select(x => (double)x).ToArray(), Is.EqualTo(expected).Within(1e-4));
        }
        finally { g.Free(pa); g.Free(pb); g.Free(pc); }
    }

    [Test]
    public void Bf16InFp32OutGemmMatchesADoubleReference()
    {
        var g = Gpu; var blas = Blas;
        const int m = 64, n = 32, k = 16;
        var a16 = RandomMatrix(m * k, 3).Select(ToBf16).ToArray();
        var b16 = RandomMatrix(n * k, 4).Select(ToBf16).ToArray();   // B stored n×k: C = A·Bᵀ, as a linear layer
        var pa = g.Alloc(a16.Length * 2); var pb = g.Alloc(b16.Length * 2); var pc = g.Alloc(m * n * 4);
        try
        {
            g.CopyToDevice<ushort>(a16, pa);
            g.CopyToDevice<ushort>(b16, pb);
            blas.GemmRowMajor(false, true, m, n, k, 1f, pa, CudaDataType.R16BF, k, pb, CudaDataType.R16BF, k,
                0f, pc, CudaDataType.R32F, n);
            var c = new float[m * n];
            g.CopyToHost<float>(pc, c);
            // Reference from the bf16-rounded inputs: products of bf16 values are exact in fp32, the sum of
            // 16 of them is accumulated in fp32, so the error is a few fp32 ulps of values ≤ 16.
            var expected = Reference(false, true, m, n, k, a16.Select(FromBf16).ToArray(), k, b16.Select(FromBf16).ToArray(), k);
            Assert.That(c.Select(x => (double)x).ToArray(), Is.EqualTo(expected).Within(1e-4));
        }
        finally { g.Free(pa); g.Free(pb); g.Free(pc); }
    }

    [Test]
    public void ColumnMajorGemmFollowsTheCublasDefinition()
    {
        var g = Gpu; var blas = Blas;
        const int m = 6, n = 5, k = 4;
        var a = RandomMatrix(m * k, 5);   // column-major m×k, lda = m
        var b = RandomMatrix(k * n, 6);   // column-major k×n, ldb = k
        var c0 = RandomMatrix(m * n, 7);
        var pa = g.Alloc(a.Length * 4); var pb = g.Alloc(b.Length * 4); var pc = g.Alloc(c0.Length * 4);
        try
        {
            g.CopyToDevice<float>(a, pa); g.CopyToDevice<float>(b, pb); g.CopyToDevice<float>(c0, pc);
            blas.Gemm(false, false, m, n, k, 2f, pa, CudaDataType.R32F, m, pb, CudaDataType.R32F, k, 0.5f, pc, CudaDataType.R32F, m);
            var c = new float[m * n];
            g.CopyToHost<float>(pc, c);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < n; j++)
                {
                    double s = 0;
                    for (int l = 0; l < k; l++) s += (double)a[i + l * m] * b[l + j * k];
                    Assert.That(c[i + j * m], Is.EqualTo(2 * s + 0.5 * c0[i + j * m]).Within(1e-4), $"C({i},{j})");
                }
        }
        finally { g.Free(pa); g.Free(pb); g.Free(pc); }
    }

    [Test]
    public void StridedBatchedRowMajorMatchesPerBatchReferences()
    {
        var g = Gpu; var blas = Blas;
        const int batch = 3, m = 8, n = 5, k = 7;
        var a = RandomMatrix(batch * m * k, 8);
        var b = RandomMatrix(batch * k * n, 9);
        var pa = g.Alloc(a.Length * 4); var pb = g.Alloc(b.Length * 4); var pc = g.Alloc(batch * m * n * 4);
        try
        {
            g.CopyToDevice<float>(a, pa); g.CopyToDevice<float>(b, pb);
            blas.GemmStridedBatchedRowMajor(false, false, m, n, k, 1f, pa, CudaDataType.R32F, k, m * k,
                pb, CudaDataType.R32F, n, k * n, 0f, pc, CudaDataType.R32F, n, m * n, batch);
            var c = new float[batch * m * n];
            g.CopyToHost<float>(pc, c);
            for (int t = 0; t < batch; t++)
            {
                var expected = Reference(false, false, m, n, k, a.Skip(t * m * k).Take(m * k).ToArray(), k,
                    b.Skip(t * k * n).Take(k * n).ToArray(), n);
                Assert.That(c.Skip(t * m * n).Take(m * n).Select(x => (double)x).ToArray(), Is.EqualTo(expected).Within(1e-4), $"batch {t}");
            }
        }
        finally { g.Free(pa); g.Free(pb); g.Free(pc); }
    }
}
