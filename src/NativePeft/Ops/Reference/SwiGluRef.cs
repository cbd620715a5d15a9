using System.Numerics;
using static NativePeft.Ops.Reference.RefChecks;

namespace NativePeft.Ops.Reference;

/// <summary>
/// SwiGLU, the Llama MLP's gate: <c>h = silu(g) · u</c> with <c>silu(z) = z · sigmoid(z)</c>, elementwise over
/// <c>gate[rows, intermediate]</c> and <c>up[rows, intermediate]</c> (i.e. <c>down(silu(gate(x)) * up(x))</c>).
/// Each element is computed in double and rounded once. No allocation.
/// </summary>
public static class SwiGluRef
{
    /// <summary>Forward: <c>h[i] = silu(gate[i]) · up[i]</c>; all three <c>[rows, intermediate]</c>; h may alias gate or up exactly.</summary>
    public static void Forward<T>(ReadOnlySpan<T> gate, ReadOnlySpan<T> up, Span<T> h, int rows, int intermediate)
        where T : unmanaged, IFloatingPointIeee754<T>
    {
        long count = Count(rows, intermediate);
        Length(gate.Length, count, nameof(gate));
        Length(up.Length, count, nameof(up));
        Length(h.Length, count, nameof(h));
        for (int i = 0; i < count; i++)
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
    public static void Backward<T>(ReadOnlySpan<T> dh, ReadOnlySpan<T> gate, ReadOnlySpan<T> up, Span<T> dgate, Span<T> dup,
        int rows, int intermediate) where T : unmanaged, IFloatingPointIeee754<T>
    {
        long count = Count(rows, intermediate);
        Length(dh.Length, count, nameof(dh));
        Length(gate.Length, count, nameof(gate));
        Length(up.Length, count, nameof(up));
        Length(dgate.Length, count, nameof(dgate));
        Length(dup.Length, count, nameof(dup));
        for (int i = 0; i < count; i++)
        {
            double g = D(gate[i]), u = D(up[i]), d = D(dh[i]);
            double s = Sigmoid(g);
            dgate[i] = R<T>(d * u * s * (1 + g * (1 - s)));
            dup[i] = R<T>(d * g * s);
        }
    }

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
