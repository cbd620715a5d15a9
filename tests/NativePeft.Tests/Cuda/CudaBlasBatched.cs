using NativePeft.Runtime;

namespace NativePeft.Tests.Cuda;

/// <summary>
/// The strided batched GEMM (cublasGemmStridedBatchedEx) for the tests: no layer of the library uses it, so the
/// wrapper lives here (issue 11, item 6); the binding stays in <see cref="CuBlas"/>, whose library resolver is the
/// library assembly's.
/// </summary>
internal static unsafe class CudaBlasBatched
{
    /// <summary>Column-major cublasGemmStridedBatchedEx; strides are in elements between consecutive matrices.</summary>
    public static void GemmStridedBatched(this CudaBlas blas, bool transA, bool transB, int m, int n, int k,
        float alpha, DevicePtr a, CudaDataType aType, int lda, long strideA,
        DevicePtr b, CudaDataType bType, int ldb, long strideB,
        float beta, DevicePtr c, CudaDataType cType, int ldc, long strideC, int batchCount)
    {
        blas.Gpu.MakeCurrent();
        var status = CuBlas.cublasGemmStridedBatchedEx(blas.Raw, CudaBlas.Op(transA), CudaBlas.Op(transB), m, n, k, &alpha,
            a.Address, aType, lda, strideA, b.Address, bType, ldb, strideB, &beta,
            c.Address, cType, ldc, strideC, batchCount, blas.ComputeType, CuBlas.GemmDefault);
        CuBlas.Check(status, "cublasGemmStridedBatchedEx", $"m={m} n={n} k={k} batch={batchCount} transA={transA} transB={transB}");
    }

    /// <summary>Row-major batched GEMM (each batch as <see cref="CudaBlas.GemmRowMajor"/>); strides in elements.</summary>
    public static void GemmStridedBatchedRowMajor(this CudaBlas blas, bool transA, bool transB, int m, int n, int k,
        float alpha, DevicePtr a, CudaDataType aType, int lda, long strideA,
        DevicePtr b, CudaDataType bType, int ldb, long strideB,
        float beta, DevicePtr c, CudaDataType cType, int ldc, long strideC, int batchCount)
    {
        var g = CudaBlas.RowMajorAsColumnMajor(new CudaBlas.GemmOperands(transA, transB, m, n, k, a, aType, lda, strideA,
            b, bType, ldb, strideB));
        blas.GemmStridedBatched(g.TransA, g.TransB, g.M, g.N, g.K, alpha, g.A, g.AType, g.Lda, g.StrideA, g.B, g.BType, g.Ldb,
            g.StrideB, beta, c, cType, ldc, strideC, batchCount);
    }
}
