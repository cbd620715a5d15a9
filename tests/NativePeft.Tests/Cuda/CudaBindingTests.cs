using System.Runtime.InteropServices;
using System.Text;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Cuda;

/// <summary>Tests of the CUDA/cuBLAS binding that need no GPU (they run in CI).</summary>
public class CudaBindingTests
{
    [Test]
    public void TryCreateNeverThrowsAndExplainsAFailure()
    {
        bool ok = false;
        CudaGpu? gpu = null;
        string reason = "";
        Assert.DoesNotThrow(() => ok = CudaGpu.TryCreate(out gpu, out reason));
        try
        {
            if (ok)
            {
                Assert.That(gpu, Is.Not.Null);
                Assert.That(reason, Is.Empty);
                Assert.That(gpu!.Properties.Kind, Is.EqualTo(GpuKind.Cuda));
                return;
            }
            Assert.That(gpu, Is.Null);
            if (!NativeLibraries.TryLoadCuda(out _, out _))
            {
                Assert.That(reason, Does.Match(@"^CUDA driver library (libcuda\.so\.1|nvcuda\.dll) not found$"));
                return;
            }
            Assert.That(reason, Does.StartWith("no CUDA device"));
            // A cuInit failure names the CUresult: name and number.
            if (reason.Contains("cuInit"))
                Assert.That(reason, Does.Match(@"cuInit: CUDA_ERROR_[A-Z_]+ \(\d+\)"));
        }
        finally
        {
            gpu?.Dispose();
        }
    }

    [Test]
    public void CreateThrowsWithTheSameReason()
    {
        if (CudaGpu.TryCreate(out var gpu, out var reason))
        {
            gpu!.Dispose();
            using var again = CudaGpu.Create();
            Assert.That(again.Properties.Name, Is.Not.Empty);
            return;
        }
        var ex = Assert.Throws<InvalidOperationException>(() => CudaGpu.Create());
        Assert.That(ex!.Message, Is.EqualTo(reason));
    }

    [Test]
    public void TryCreateWithAnOrdinalPastTheLastDeviceFails()
    {
        bool ok = CudaGpu.TryCreate(out var gpu, out var reason, deviceOrdinal: 4096);
        Assert.That(ok, Is.False);
        Assert.That(gpu, Is.Null);
        Assert.That(reason, Does.StartWith("no CUDA device").Or.StartWith("CUDA driver library"));
    }

    // Values and names from docs/formats.md ("Results: SUCCESS 0, INVALID_VALUE 1, ...").
    [TestCase(0, "CUDA_SUCCESS")]
    [TestCase(1, "CUDA_ERROR_INVALID_VALUE")]
    [TestCase(2, "CUDA_ERROR_OUT_OF_MEMORY")]
    [TestCase(3, "CUDA_ERROR_NOT_INITIALIZED")]
    [TestCase(100, "CUDA_ERROR_NO_DEVICE")]
    [TestCase(209, "CUDA_ERROR_NO_BINARY_FOR_GPU")]
    [TestCase(218, "CUDA_ERROR_INVALID_PTX")]
    [TestCase(222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION")]
    [TestCase(500, "CUDA_ERROR_NOT_FOUND")]
    [TestCase(700, "CUDA_ERROR_ILLEGAL_ADDRESS")]
    [TestCase(719, "CUDA_ERROR_LAUNCH_FAILED")]
    public void CuResultValuesAndNamesMatchCudaH(int value, string name)
    {
        Assert.That(Enum.IsDefined((CuResult)value), Is.True);
        Assert.That(CudaDriver.EnumErrorName((CuResult)value), Is.EqualTo(name));
        Assert.That(CudaDriver.ErrorName((CuResult)value), Is.EqualTo(name));
    }

    [Test]
    public void UnknownCuResultGetsANumericName() =>
        Assert.That(CudaDriver.EnumErrorName((CuResult)12345), Is.EqualTo("CUDA_ERROR_12345"));

    [Test]
    public void EveryCuResultNameAgreesWithTheDriver()
    {
        if (!CudaDriver.IsLibraryAvailable) Assert.Ignore("libcuda not loadable: nothing to compare with");
        int compared = 0;
        foreach (var value in Enum.GetValues<CuResult>())
        {
            // Older drivers do not know the newest codes: compare those they name.
            if (CudaDriver.cuGetErrorName(value, out var p) != CuResult.Success || p == IntPtr.Zero) continue;
            Assert.That(CudaDriver.EnumErrorName(value), Is.EqualTo(Marshal.PtrToStringUTF8(p)), $"value {(int)value}");
            compared++;
        }
        Assert.That(compared, Is.GreaterThan(50));
    }

    [Test]
    public void CudaExceptionNamesFunctionResultNumberAndJitLog()
    {
        var ex = new CudaException(CuResult.InvalidPtx, "cuModuleLoadDataEx", "ptxas fatal   : Unresolved extern function 'f'\n");
        Assert.That(ex.Function, Is.EqualTo("cuModuleLoadDataEx"));
        Assert.That(ex.Result, Is.EqualTo(CuResult.InvalidPtx));
        Assert.That(ex.JitLog, Is.EqualTo("ptxas fatal   : Unresolved extern function 'f'"));
        Assert.That(ex.Message, Does.StartWith("cuModuleLoadDataEx failed: CUDA_ERROR_INVALID_PTX (218)"));
        Assert.That(ex.Message, Does.EndWith("[JIT log: ptxas fatal   : Unresolved extern function 'f']"));
        if (CudaDriver.IsLibraryAvailable)
        {
            // The driver's description follows the number: "...(218): a PTX JIT compilation failed".
            Assert.That(ex.Message, Does.Contain("(218): " + CudaDriver.ErrorString(CuResult.InvalidPtx)));
            Assert.That(CudaDriver.ErrorString(CuResult.InvalidPtx), Is.Not.Empty);
        }

        var plain = new CudaException(CuResult.OutOfMemory, "cuMemAlloc_v2", context: "1024 bytes");
        Assert.That(plain.Message, Does.StartWith("cuMemAlloc_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (2)"));
        Assert.That(plain.Message, Does.EndWith("(1024 bytes)"));
        Assert.That(plain.JitLog, Is.Null);
    }

    [Test]
    public void CheckThrowsOnlyOnFailure()
    {
        Assert.DoesNotThrow(() => CudaDriver.Check(CuResult.Success, "cuInit"));
        var ex = Assert.Throws<CudaException>(() => CudaDriver.Check(CuResult.NoDevice, "cuInit"));
        Assert.That(ex!.Message, Does.StartWith("cuInit failed: CUDA_ERROR_NO_DEVICE (100)"));
    }

    [Test]
    public void CublasExceptionNamesFunctionAndStatus()
    {
        var ex = new CublasException(CublasStatus.InvalidValue, "cublasGemmEx", "m=1 n=2 k=3");
        Assert.That(ex.Function, Is.EqualTo("cublasGemmEx"));
        Assert.That(ex.Status, Is.EqualTo(CublasStatus.InvalidValue));
        Assert.That(ex.Message, Does.StartWith("cublasGemmEx failed: CUBLAS_STATUS_INVALID_VALUE (7)"));
        Assert.That(ex.Message, Does.EndWith("(m=1 n=2 k=3)"));
        Assert.That(CuBlas.StatusName(CublasStatus.NotInitialized), Is.EqualTo("CUBLAS_STATUS_NOT_INITIALIZED"));
        Assert.That(CuBlas.StatusName(CublasStatus.ArchMismatch), Is.EqualTo("CUBLAS_STATUS_ARCH_MISMATCH"));
        Assert.That(CuBlas.StatusName(CublasStatus.ExecutionFailed), Is.EqualTo("CUBLAS_STATUS_EXECUTION_FAILED"));
    }

    [Test]
    public void ResolverProbesTheDocumentedLibraryNamesInOrder()
    {
        if (OperatingSystem.IsWindows())
        {
            Assert.That(NativeLibraries.CudaCandidates[0], Is.EqualTo("nvcuda.dll"));
            Assert.That(NativeLibraries.CublasCandidates, Is.EqualTo(new[] { "cublas64_13.dll", "cublas64_12.dll", "cublas64_11.dll" }));
        }
        else
        {
            Assert.That(NativeLibraries.CudaCandidates[0], Is.EqualTo("libcuda.so.1"));
            Assert.That(NativeLibraries.CublasCandidates, Is.EqualTo(new[] { "libcublas.so.13", "libcublas.so.12", "libcublas.so.11" }));
        }
    }

    [Test]
    public void CuMemLocationIsTwoInts() => Assert.That(Marshal.SizeOf<CuMemLocation>(), Is.EqualTo(8));

    [Test]
    public void PrefetchAndAdvisePreferTheV2EntryPoints()
    {
        if (!NativeLibraries.TryLoadCuda(out var handle, out var reason)) Assert.Ignore("libcuda not loadable: " + reason);
        bool v2 = NativeLibrary.TryGetExport(handle, "cuMemPrefetchAsync_v2", out _);
        bool legacy = NativeLibrary.TryGetExport(handle, "cuMemPrefetchAsync", out _);
        Assert.That(CudaDriver.PrefetchEntryPoint,
            Is.EqualTo(v2 ? "cuMemPrefetchAsync_v2" : legacy ? "cuMemPrefetchAsync" : null));
        bool adviseV2 = NativeLibrary.TryGetExport(handle, "cuMemAdvise_v2", out _);
        bool adviseLegacy = NativeLibrary.TryGetExport(handle, "cuMemAdvise", out _);
        Assert.That(CudaDriver.AdviseEntryPoint,
            Is.EqualTo(adviseV2 ? "cuMemAdvise_v2" : adviseLegacy ? "cuMemAdvise" : null));
        TestContext.Out.WriteLine($"driver exports: prefetch {CudaDriver.PrefetchEntryPoint}, advise {CudaDriver.AdviseEntryPoint}");
    }

    // ---- PTX preparation ----

    [Test]
    public void PreparePtxAppendsOneNul()
    {
        var text = Encoding.ASCII.GetBytes(".version 7.8\n.target sm_80\n");
        var prepared = CudaModuleLoader.PreparePtx(text);
        Assert.That(prepared.Length, Is.EqualTo(text.Length + 1));
        Assert.That(prepared[^1], Is.EqualTo((byte)0));
        Assert.That(prepared.AsSpan(0, text.Length).SequenceEqual(text), Is.True);
    }

    [Test]
    public void PreparePtxKeepsAnExistingNul()
    {
        var text = Encoding.ASCII.GetBytes(".version 7.8\n\0");
        var prepared = CudaModuleLoader.PreparePtx(text);
        Assert.That(prepared, Is.EqualTo(text));
        Assert.That(CudaModuleLoader.PreparePtx(ReadOnlySpan<byte>.Empty), Is.EqualTo(new byte[] { 0 }));
    }

    [Test]
    public void EveryPtxInTheKernelFolderIsNulTerminatedByTheLoader()
    {
        var dir = CudaGpu.DefaultKernelDirectory();
        var files = Directory.Exists(dir) ? Directory.GetFiles(dir, "*.ptx") : [];
        if (files.Length == 0) Assert.Ignore($"no .ptx files in {dir}");
        foreach (var file in files)
        {
            var bytes = File.ReadAllBytes(file);
            var prepared = CudaModuleLoader.PreparePtx(bytes);
            Assert.That(prepared[^1], Is.EqualTo((byte)0), file);
            Assert.That(Array.IndexOf(prepared, (byte)0), Is.EqualTo(prepared.Length - 1), $"{file}: NUL inside the PTX text");
            Assert.That(Encoding.ASCII.GetString(prepared), Does.Contain(".version"), file);
        }
    }

    // ---- row-major GEMM mapping, checked against cuBLAS's column-major definition on the host ----

    [Test]
    public void RowMajorGemmMapsToTheColumnMajorCallComputingTheSameMatrix(
        [Values(false, true)] bool transA, [Values(false, true)] bool transB)
    {
        const int m = 5, n = 4, k = 3;
        var rng = new Random(7);
        // Row-major storage: op(A) is m×k; A is m×k (lda=k) or, transposed, k×m (lda=m). Pad ld by 2 to test strides.
        int lda = (transA ? m : k) + 2, ldb = (transB ? k : n) + 2, ldc = n + 1;
        var a = Enumerable.Range(0, (transA ? k : m) * lda).Select(_ => rng.NextDouble() - 0.5).ToArray();
        var b = Enumerable.Range(0, (transB ? n : k) * ldb).Select(_ => rng.NextDouble() - 0.5).ToArray();

        var expected = new double[m * ldc];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double s = 0;
                for (int l = 0; l < k; l++)
                    s += (transA ? a[l * lda + i] : a[i * lda + l]) * (transB ? b[j * ldb + l] : b[l * ldb + j]);
                expected[i * ldc + j] = s;
            }

        var pa = new DevicePtr(0x1000); var pb = new DevicePtr(0x2000);
        var g = CudaBlas.RowMajorAsColumnMajor(new CudaBlas.GemmOperands(transA, transB, m, n, k,
            pa, CudaDataType.R32F, lda, 0, pb, CudaDataType.R32F, ldb, 0));
        double[] Host(DevicePtr p) => p == pa ? a : p == pb ? b : throw new AssertionException("unknown operand");

        // cuBLAS semantics (column-major): C[i + j*ldc] = Σ_l op(A)(i,l)·op(B)(l,j),
        // op(X)(r,c) = X[r + c*ld] when not transposed, X[c + r*ld] when transposed.
        var ca = Host(g.A); var cb = Host(g.B);
        var actual = new double[m * ldc];
        for (int i = 0; i < g.M; i++)
            for (int j = 0; j < g.N; j++)
            {
                double s = 0;
                for (int l = 0; l < g.K; l++)
                    s += (g.TransA ? ca[l + i * g.Lda] : ca[i + l * g.Lda]) * (g.TransB ? cb[j + l * g.Ldb] : cb[l + j * g.Ldb]);
                actual[i + j * ldc] = s;
            }
        Assert.That(actual, Is.EqualTo(expected).Within(1e-12));
    }
}
