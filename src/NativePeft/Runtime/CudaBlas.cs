namespace NativePeft.Runtime;

/// <summary>
/// cuBLAS GEMMs on a <see cref="CudaGpu"/>'s stream, fp32 accumulation (CUBLAS_COMPUTE_32F) unless
/// <see cref="ComputeType"/> says otherwise. Created by <see cref="CudaGpu.Blas"/>, owned by that CudaGpu.
///
/// <para><b>Conventions.</b> cuBLAS is column-major: <see cref="Gemm"/> computes, for column-major
/// matrices, C[m×n] = alpha·op(A)[m×k]·op(B)[k×n] + beta·C, with ld the distance between columns.
/// Our tensors are row-major. A row-major r×c matrix with row stride ld is, bytes unchanged, the
/// column-major c×r matrix (its transpose) with the same ld; so the row-major product
/// C = op(A)·op(B) is the column-major product Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands and m/n, keep the
/// transpose flags. <see cref="GemmRowMajor"/> does exactly that; its ld arguments are row strides.
/// Examples (row-major): a linear layer Y[m×n] = X[m×k]·Wᵀ with W[n×k] is
/// <c>GemmRowMajor(false, true, m, n, k, 1, X, t, k, W, t, k, 0, Y, t, n)</c>; its weight gradient
/// dW[n×k] = dYᵀ·X is <c>GemmRowMajor(true, false, n, k, m, 1, dY, t, n, X, t, k, 0, dW, t, k)</c>.</para>
/// </summary>
public sealed unsafe class CudaBlas : IDisposable
{
    /// <summary>Workspace given to cublasSetWorkspace_v2 (NVIDIA recommends 32 MiB on Hopper).</summary>
    public const long DefaultWorkspaceBytes = 32L << 20;

    private readonly CudaGpu _gpu;
    private readonly CublasHandle _handle;
    private DevicePtr _workspace;

    /// <summary>The cuBLAS library file in use, e.g. "libcublas.so.12".</summary>
    public string Library { get; }
    /// <summary>Device bytes of the workspace (allocated through the CudaGpu, so counted in its AllocatedBytes).</summary>
    public long WorkspaceBytes { get; }
    /// <summary>Compute type of every GEMM; default CUBLAS_COMPUTE_32F (68).</summary>
    public CublasComputeType ComputeType { get; set; } = CublasComputeType.Compute32F;

    private CudaBlas(CudaGpu gpu, CublasHandle handle, string library, DevicePtr workspace, long workspaceBytes)
    {
        _gpu = gpu;
        _handle = handle;
        _workspace = workspace;
        Library = library;
        WorkspaceBytes = workspaceBytes;
    }

    internal static CudaBlas Create(CudaGpu gpu, long workspaceBytes = DefaultWorkspaceBytes)
    {
        if (!CuBlas.TryLoad(out var reason))
            throw new InvalidOperationException($"cuBLAS not available: {reason}");
        gpu.MakeCurrent();
        CuBlas.Check(CuBlas.cublasCreate_v2(out var raw), "cublasCreate_v2");
        var handle = new CublasHandle(raw);
        DevicePtr workspace = DevicePtr.Null;
        try
        {
            CuBlas.Check(CuBlas.cublasSetStream_v2(raw, gpu.StreamHandle), "cublasSetStream_v2");
            CuBlas.Check(CuBlas.cublasSetMathMode(raw, CublasMath.Default), "cublasSetMathMode");
            if (workspaceBytes > 0)
            {
                workspace = gpu.Alloc(workspaceBytes);
                CuBlas.Check(CuBlas.cublasSetWorkspace_v2(raw, (void*)workspace.Address, (nuint)workspaceBytes), "cublasSetWorkspace_v2");
            }
            return new CudaBlas(gpu, handle, NativeLibraries.LoadedFrom(NativeLibraries.Cublas) ?? "cublas", workspace, workspaceBytes);
        }
        catch
        {
            handle.Dispose();
            if (!workspace.IsNull) gpu.Free(workspace);
            throw;
        }
    }

    /// <summary>
    /// Column-major cublasGemmEx: C[m×n] = alpha·op(A)·op(B) + beta·C, op(A) m×k, op(B) k×n,
    /// lda/ldb/ldc = column strides in elements. alpha/beta are fp32 (host pointer mode).
    /// </summary>
    public void Gemm(bool transA, bool transB, int m, int n, int k,
        float alpha, DevicePtr a, CudaDataType aType, int lda,
        DevicePtr b, CudaDataType bType, int ldb,
        float beta, DevicePtr c, CudaDataType cType, int ldc)
    {
        _gpu.MakeCurrent();
        var status = CuBlas.cublasGemmEx(Raw, Op(transA), Op(transB), m, n, k, &alpha,
            a.Address, aType, lda, b.Address, bType, ldb, &beta, c.Address, cType, ldc, ComputeType, CuBlas.GemmDefault);
        CuBlas.Check(status, "cublasGemmEx", $"m={m} n={n} k={k} transA={transA} transB={transB} lda={lda} ldb={ldb} ldc={ldc} types={aType},{bType}->{cType}");
    }

    /// <summary>
    /// Row-major C[m×n] = alpha·op(A)·op(B) + beta·C, op(A) m×k, op(B) k×n; lda/ldb/ldc are row strides in
    /// elements (A not transposed: lda ≥ k; transposed, A is stored k×m: lda ≥ m). Calls <see cref="Gemm"/>
    /// with the operands swapped (Cᵀ = op(B)ᵀ·op(A)ᵀ in column-major).
    /// </summary>
    public void GemmRowMajor(bool transA, bool transB, int m, int n, int k,
        float alpha, DevicePtr a, CudaDataType aType, int lda,
        DevicePtr b, CudaDataType bType, int ldb,
        float beta, DevicePtr c, CudaDataType cType, int ldc)
    {
        var g = RowMajorAsColumnMajor(new GemmOperands(transA, transB, m, n, k, a, aType, lda, 0, b, bType, ldb, 0));
        Gemm(g.TransA, g.TransB, g.M, g.N, g.K, alpha, g.A, g.AType, g.Lda, g.B, g.BType, g.Ldb, beta, c, cType, ldc);
    }

    /// <summary>The operands of one GEMM (strides only used by the batched form of the tests).</summary>
    internal readonly record struct GemmOperands(bool TransA, bool TransB, int M, int N, int K,
        DevicePtr A, CudaDataType AType, int Lda, long StrideA,
        DevicePtr B, CudaDataType BType, int Ldb, long StrideB);

    /// <summary>Row-major C = op(A)·op(B) as the column-major call computing Cᵀ = op(B)ᵀ·op(A)ᵀ (same C, same ldc).</summary>
    internal static GemmOperands RowMajorAsColumnMajor(GemmOperands r) =>
        new(r.TransB, r.TransA, r.N, r.M, r.K, r.B, r.BType, r.Ldb, r.StrideB, r.A, r.AType, r.Lda, r.StrideA);

    /// <summary>The device this handle's GEMMs run on.</summary>
    internal CudaGpu Gpu => _gpu;

    /// <summary>The cublasHandle_t (throws once disposed).</summary>
    internal IntPtr Raw
    {
        get
        {
            ObjectDisposedException.ThrowIf(_handle.IsClosed, this);
            return _handle.DangerousGetHandle();
        }
    }

    internal static CublasOperation Op(bool transpose) => transpose ? CublasOperation.T : CublasOperation.N;

    public void Dispose()
    {
        if (_handle.IsClosed) return;
        _gpu.MakeCurrent();
        _handle.Dispose();
        if (!_workspace.IsNull)
        {
            _gpu.Free(_workspace);
            _workspace = DevicePtr.Null;
        }
    }
}
