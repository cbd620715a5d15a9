using System.Numerics.Tensors;

namespace NativePeft.Numerics;

/// <summary>
/// The one finiteness check of weights, logits and merged tensors: a value is bad when it is NaN, ±∞ or its magnitude
/// exceeds <see cref="Bound"/> (1e30: no trained weight or logit comes near it, and beyond it the next GEMM overflows
/// fp32; BF16/F16 values that large are ∞ already). One vectorized pass (<see cref="TensorPrimitives.MaxMagnitude(ReadOnlySpan{float})"/>);
/// the index of the first bad value is looked up only when there is one.
/// </summary>
public static class Finite
{
    /// <summary>The largest magnitude accepted.</summary>
    public const float Bound = 1e30f;

    /// <summary>The index of the first bad value of <paramref name="values"/>, or -1.</summary>
    public static long FirstBad(ReadOnlySpan<float> values)
    {
        if (values.IsEmpty) return -1;
        float max = TensorPrimitives.MaxMagnitude(values); // the value of largest magnitude (signed); NaN when any is NaN
        if (Math.Abs(max) <= Bound) return -1;
        for (int i = 0; i < values.Length; i++)
            if (!(Math.Abs(values[i]) <= Bound)) return i;
        return -1;
    }

    /// <summary>The index of the first bad value of <paramref name="values"/>, or -1.</summary>
    public static long FirstBad(ReadOnlySpan<double> values)
    {
        for (int i = 0; i < values.Length; i++)
            if (!(Math.Abs(values[i]) <= Bound)) return i;
        return -1;
    }

    /// <summary>The index of the first bad value of <paramref name="values"/>, or -1.</summary>
    public static long FirstBad(ReadOnlySpan<BFloat16> values)
    {
        const int Chunk = 1 << 14;
        Span<float> buffer = new float[Math.Min(Chunk, values.Length)];
        for (int start = 0; start < values.Length; start += Chunk)
        {
            int n = Math.Min(Chunk, values.Length - start);
            BFloat16.ToSingle(values.Slice(start, n), buffer[..n]);
            long i = FirstBad(buffer[..n]);
            if (i >= 0) return start + i;
        }
        return -1;
    }

    /// <summary>The index of the first bad value of <paramref name="values"/>, or -1.</summary>
    public static long FirstBad(ReadOnlySpan<Half> values)
    {
        for (int i = 0; i < values.Length; i++)
            if (!Half.IsFinite(values[i])) return i; // |Half| <= 65504 < Bound
        return -1;
    }

    /// <summary>"element 12 is NaN" (or ∞, or 3E+35, beyond ±1e30).</summary>
    public static string Describe(long index, double value) =>
        double.IsNaN(value) ? $"element {index} is NaN"
        : double.IsInfinity(value) ? $"element {index} is {(value > 0 ? "+" : "-")}inf"
        : $"element {index} is {value.ToString("G4", System.Globalization.CultureInfo.InvariantCulture)} (beyond ±1e30)";
}

/// <summary>
/// Non-finite (NaN, ±∞ or beyond ±1e30, <see cref="Finite"/>) values where a finite result is required: the logits of
/// a generation or evaluation step, a merged weight. <see cref="Where"/> names the tensor or the step and position.
/// </summary>
public sealed class NonFiniteValuesException(string where, string detail)
    : Exception($"{where}: {detail}")
{
    public string Where { get; } = where;
    public string Detail { get; } = detail;
}
