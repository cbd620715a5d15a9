using System.Runtime.CompilerServices;
using System.Numerics;
using System.Runtime.Intrinsics;
using static NativePeft.Ops.Reference.RefChecks;
using static NativePeft.Ops.Reference.RefVector;

namespace NativePeft.Ops.Reference;

/// <summary>
/// SwiGLU, the Llama MLP's gate: <c>h = silu(g) · u</c> with <c>silu(z) = z · sigmoid(z)</c>, elementwise over
/// <c>gate[rows, intermediate]</c> and <c>up[rows, intermediate]</c> (i.e. <c>down(silu(gate(x)) * up(x))</c>).
/// Each element is computed in double and rounded once (four at a time with Vector256.Exp, the last count % 4 with
/// Math.Exp), in parallel chunks for large inputs; no element depends on the thread count. No allocation.
/// </summary>
public static class SwiGluRef
{
    /// <summary>Forward: <c>h[i] = silu(gate[i]) · up[i]</c>; all three <c>[rows, intermediate]</c>; h may alias gate or up exactly.</summary>
    public static unsafe void Forward<T>(ReadOnlySpan<T> gate, ReadOnlySpan<T> up, Span<T> h, int rows, int intermediate)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        long count = Count(rows, intermediate);
        Length(gate.Length, count, nameof(gate));
        Length(up.Length, count, nameof(up));
        Length(h.Length, count, nameof(h));
        fixed (T* pg = gate, pu = up, ph = h)
        {
            nint g = (nint)pg, u = (nint)pu, o = (nint)ph;
            Chunks(count, (start, end) => ForwardRange((T*)g, (T*)u, (T*)o, start, end));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static unsafe void ForwardRange<T>(T* gate, T* up, T* h, int start, int end) where T : unmanaged, IFloatingPointIeee754<T>
    {
        int i = start;
        if (Vector256.IsHardwareAccelerated)
            for (; i <= end - Lanes; i += Lanes)
            {
                var g = Load(gate + i);
                Store(h + i, g * Sigmoid(g) * Load(up + i));
            }
        for (; i < end; i++)
        {
            double g = D(gate[i]);
            h[i] = R<T>(g * Sigmoid(g) * D(up[i]));
        }
    }

    /// <summary>
    /// Backward: overwrites <c>dgate[i] = dh[i] · up[i] · silu'(gate[i])</c> with
    /// <c>silu'(z) = σ(z)·(1 + z·(1 − σ(z)))</c>, and <c>dup[i] = dh[i] · silu(gate[i])</c>.
    /// All five <c>[rows, intermediate]</c>; dgate/dup may alias dh, gate or up exactly (each element is read before written).
    /// </summary>
    public static unsafe void Backward<T>(ReadOnlySpan<T> dh, ReadOnlySpan<T> gate, ReadOnlySpan<T> up, Span<T> dgate, Span<T> dup,
        int rows, int intermediate) where T : unmanaged, IFloatingPointIeee754<T>
    {
        long count = Count(rows, intermediate);
        Length(dh.Length, count, nameof(dh));
        Length(gate.Length, count, nameof(gate));
        Length(up.Length, count, nameof(up));
        Length(dgate.Length, count, nameof(dgate));
        Length(dup.Length, count, nameof(dup));
        fixed (T* pd = dh, pg = gate, pu = up, pdg = dgate, pdu = dup)
        {
            nint d = (nint)pd, g = (nint)pg, u = (nint)pu, dg = (nint)pdg, du = (nint)pdu;
            Chunks(count, (start, end) => BackwardRange((T*)d, (T*)g, (T*)u, (T*)dg, (T*)du, start, end));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static unsafe void BackwardRange<T>(T* dh, T* gate, T* up, T* dgate, T* dup, int start, int end)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        int i = start;
        if (Vector256.IsHardwareAccelerated)
        {
            var one = Vector256<double>.One;
            for (; i <= end - Lanes; i += Lanes)
            {
                Vector256<double> g = Load(gate + i), u = Load(up + i), d = Load(dh + i);
                var s = Sigmoid(g);
                Store(dgate + i, d * u * s * (one + g * (one - s)));
                Store(dup + i, d * g * s);
            }
        }
        for (; i < end; i++)
        {
            double g = D(gate[i]), u = D(up[i]), d = D(dh[i]);
            double s = Sigmoid(g);
            dgate[i] = R<T>(d * u * s * (1 + g * (1 - s)));
            dup[i] = R<T>(d * g * s);
        }
    }

    // ----------------------------------------------------------------------------------------------
    // Four doubles at a time. Every element's value depends only on its index and the element count (the last
    // count % 4 elements take the scalar path, the rest Vector256.Exp), never on the chunking or thread count,
    // and float and double inputs take the same path for the same index.
    // ----------------------------------------------------------------------------------------------

    /// <summary>Elements per parallel chunk (a multiple of <see cref="Lanes"/>).</summary>
    private const int ChunkElements = 16 * 1024;

    /// <summary>Runs body(start, end) over [0, count) in chunks of <see cref="ChunkElements"/>, in parallel when there are several.</summary>
    private static void Chunks(long count, Action<int, int> body)
    {
        int n = (int)count, chunks = (int)((count + ChunkElements - 1) / ChunkElements);
        if (chunks <= 1) { if (n > 0) body(0, n); return; }
        RefParallel.For(chunks, 8L * ChunkElements, c => // exp: worth about 8 multiply-adds an element
            body(c * ChunkElements, (int)Math.Min(n, (long)(c + 1) * ChunkElements)));
    }

    private static Vector256<double> Sigmoid(Vector256<double> z) => Vector256<double>.One / (Vector256<double>.One + Vector256.Exp(-z));

    /// <summary>1/(1+e^(−z)); saturates to exactly 0 or 1 without NaN (e^(−z) = ∞ gives 0).</summary>
    public static double Sigmoid(double z) => 1.0 / (1.0 + Math.Exp(-z));

    private static long Count(int rows, int intermediate)
    {
        NonNegative(rows, nameof(rows));
        Positive(intermediate, nameof(intermediate));
        long count = (long)rows * intermediate;
        if (count > Array.MaxLength) throw new ArgumentOutOfRangeException(nameof(rows), $"{rows}×{intermediate} elements is too many for a span");
        return count;
    }
}
