using System.Runtime.CompilerServices;
using System.Numerics;
using System.Runtime.Intrinsics;

namespace NativePeft.Ops.Reference;

/// <summary>
/// Shared argument checks and scalar conversions for the CPU reference ops.
/// The references compute every reduction (dot product, sum of squares) in <see cref="double"/> and round to
/// <c>T</c> once when storing, for <c>T = float</c> and <c>T = double</c> alike; <see cref="D{T}"/> and
/// <see cref="R{T}"/> are the two conversions.
/// </summary>
internal static class RefChecks
{
    /// <summary>Widens a <typeparamref name="T"/> to double (exact for float and double).</summary>
    public static double D<T>(T value) where T : unmanaged, IFloatingPointIeee754<T> => double.CreateTruncating(value);

    /// <summary>Rounds a double to <typeparamref name="T"/> (round to nearest even for float).</summary>
    public static T R<T>(double value) where T : unmanaged, IFloatingPointIeee754<T> => T.CreateTruncating(value);

    public static void Positive(int value, string name)
    {
        if (value <= 0) throw new ArgumentOutOfRangeException(name, value, $"{name} must be positive");
    }

    public static void NonNegative(int value, string name)
    {
        if (value < 0) throw new ArgumentOutOfRangeException(name, value, $"{name} must not be negative");
    }

    /// <summary>Throws unless the span holds at least <paramref name="needed"/> elements.</summary>
    public static void Length(int actual, long needed, string name)
    {
        if (actual < needed)
            throw new ArgumentException($"{name} has {actual} elements, needs {needed}", name);
    }

    /// <summary>Throws unless an optional span is empty or holds at least <paramref name="needed"/> elements.</summary>
    public static void OptionalLength(int actual, long needed, string name)
    {
        if (actual != 0 && actual < needed)
            throw new ArgumentException($"{name} has {actual} elements, needs {needed} (or 0 to skip)", name);
    }
}

/// <summary>
/// Row parallelism for the references. A body may write only the outputs of its own row, and computes them in
/// a fixed order, so the results are identical for any thread count (tests run both ways).
/// </summary>
internal static class RefParallel
{
    /// <summary>Below this many multiply-adds in total a call runs serially (threads cost more than they save).</summary>
    public const long MinParallelWork = 1 << 18;

    /// <summary>
    /// Test hook: 0 = default (<see cref="Parallel.For(int,int,ParallelOptions,Action{int})"/> decides), 1 = serial,
    /// n = at most n threads and no serial cut-off. Thread-static: it affects only calls made on this thread.
    /// </summary>
    [ThreadStatic] internal static int MaxDegreeOverride;

    /// <summary>Runs <paramref name="body"/>(row) for every row in [0, rows).</summary>
    public static void For(int rows, long workPerRow, Action<int> body)
    {
        int degree = MaxDegreeOverride;
        bool serial = degree == 1 || rows <= 1 || (degree == 0 && (long)rows * workPerRow < MinParallelWork);
        if (serial)
        {
            for (int row = 0; row < rows; row++) body(row);
            return;
        }
        var options = new ParallelOptions { MaxDegreeOfParallelism = degree > 0 ? degree : -1 };
        Parallel.For(0, rows, options, body);
    }
}

/// <summary>
/// Four elements of a float or double span as a <see cref="Vector256{T}"/> of doubles (exact widening) and back (rounded
/// to nearest even for float, as the scalar cast): elementwise double arithmetic four lanes at a time gives the same
/// values as the scalar loop. Callers check <see cref="Vector256.IsHardwareAccelerated"/>.
/// </summary>
internal static unsafe class RefVector
{
    public const int Lanes = 4;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<double> Load<T>(T* p) where T : unmanaged
    {
        if (typeof(T) == typeof(double)) return Vector256.Load((double*)p);
        var f = Vector128.Load((float*)p);
        return Vector256.Create(Vector128.WidenLower(f), Vector128.WidenUpper(f));
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Store<T>(T* p, Vector256<double> v) where T : unmanaged
    {
        if (typeof(T) == typeof(double)) v.Store((double*)p);
        else Vector128.Narrow(v.GetLower(), v.GetUpper()).Store((float*)p);
    }
}
