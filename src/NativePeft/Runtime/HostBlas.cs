using System.Runtime.InteropServices;

namespace NativePeft.Runtime;

/// <summary>
/// The host BLAS (OpenBLAS or the system's libblas) through its CBLAS interface: the CPU path's sgemm, and
/// the emulator's stand-in for cuBLAS. Bound at run time, so a machine without it still runs everything else.
/// </summary>
public static unsafe class HostBlas
{
    private const int RowMajor = 101, NoTrans = 111, Trans = 112;

    private static readonly string[] Candidates = OperatingSystem.IsWindows()
        ? ["libopenblas.dll", "openblas.dll"]
        : OperatingSystem.IsMacOS()
            ? ["libopenblas.dylib", "/System/Library/Frameworks/Accelerate.framework/Accelerate"]
            : ["libopenblas.so.0", "libopenblas.so", "libcblas.so.3", "libblas.so.3"];

    private static readonly Lazy<(nint Sgemm, string Description)> Loaded = new(Load);

    private static (nint, string) Load()
    {
        var tried = new List<string>();
        foreach (var name in Candidates)
        {
            if (!NativeLibrary.TryLoad(name, out var handle)) { tried.Add(name + " (not found)"); continue; }
            if (NativeLibrary.TryGetExport(handle, "cblas_sgemm", out var sgemm)) return (sgemm, name);
            tried.Add(name + " (no cblas_sgemm)");
        }
        return (0, "no CBLAS library found: tried " + string.Join(", ", tried));
    }

    public static bool IsAvailable => Loaded.Value.Sgemm != 0;

    /// <summary>The library in use, or why none is.</summary>
    public static string Description => Loaded.Value.Description;

    /// <summary>
    /// Row-major C[m,n] = alpha · op(A)[m,k] · op(B)[k,n] + beta · C, where op transposes when asked.
    /// A is [m,k] (or [k,m] when transA), B is [k,n] (or [n,k] when transB).
    /// </summary>
    public static void Sgemm(bool transA, bool transB, int m, int n, int k, float alpha,
        ReadOnlySpan<float> a, ReadOnlySpan<float> b, float beta, Span<float> c)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(m);
        ArgumentOutOfRangeException.ThrowIfNegative(n);
        ArgumentOutOfRangeException.ThrowIfNegative(k);
        if (a.Length < (long)m * k) throw new ArgumentException($"A has {a.Length} elements, needs {(long)m * k}", nameof(a));
        if (b.Length < (long)k * n) throw new ArgumentException($"B has {b.Length} elements, needs {(long)k * n}", nameof(b));
        if (c.Length < (long)m * n) throw new ArgumentException($"C has {c.Length} elements, needs {(long)m * n}", nameof(c));
        if (m == 0 || n == 0) return;
        var sgemm = Loaded.Value.Sgemm;
        if (sgemm == 0) throw new InvalidOperationException(Description);
        int lda = transA ? m : k, ldb = transB ? k : n;
        fixed (float* pa = a)
        fixed (float* pb = b)
        fixed (float* pc = c)
        {
            ((delegate* unmanaged<int, int, int, int, int, int, float, float*, int, float*, int, float, float*, int, void>)sgemm)(
                RowMajor, transA ? Trans : NoTrans, transB ? Trans : NoTrans, m, n, k,
                alpha, pa, Math.Max(lda, 1), pb, Math.Max(ldb, 1), beta, pc, Math.Max(n, 1));
        }
    }
}
