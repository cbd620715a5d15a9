using NativePeft.Numerics;
using NativePeft.Ops;

namespace NativePeft.Optim;

/// <summary>
/// Global-norm gradient clipping as torch.nn.utils.clip_grad_norm_ (norm type 2): the norm is √(Σ g²) over all
/// gradients, the sum of squares in fp64 (each fp32 element squared exactly in double) and deterministic; the clip
/// coefficient is min(1, max_norm / (norm + 1e-6)).
/// <para>
/// The sum is <see cref="IOps.SumOfSquares"/>: on a device kernels/optim.cu (per tensor a fixed-grid pass whose grid
/// depends on the element count only, then a fixed-order reduction, tensors added in list order), the same value on
/// every device; on the CPU the plain sequential sum over the tensors in order, element by element.
/// </para>
/// </summary>
public static class GradientClipping
{
    /// <summary>torch's clip_grad_norm_ epsilon added to the norm.</summary>
    public const double NormEpsilon = 1e-6;

    /// <summary>Σ g² over all gradients, in fp64.</summary>
    public static double SumOfSquares(IOps ops, IEnumerable<Tensor> grads)
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(grads);
        var list = grads.ToList();
        foreach (var g in list)
            if (g.DType != DType.F32) throw new ArgumentException($"gradient {g} must be F32", nameof(grads));
        return ops.SumOfSquares(list);
    }

    /// <summary>The global L2 norm √(Σ g²) (fp64).</summary>
    public static double GlobalNorm(IOps ops, IEnumerable<Tensor> grads) => Math.Sqrt(SumOfSquares(ops, grads));

    /// <summary>min(1, maxNorm / (norm + 1e-6)) — the factor clip_grad_norm_ multiplies the gradients by.</summary>
    public static double ClipCoefficient(double norm, double maxNorm)
    {
        if (!(maxNorm > 0)) throw new ArgumentOutOfRangeException(nameof(maxNorm), maxNorm, "max norm must be > 0");
        return Math.Min(1.0, maxNorm / (norm + NormEpsilon));
    }

    /// <summary>
    /// Scales every gradient in place by <see cref="ClipCoefficient"/> when it is below 1 and returns the norm before
    /// clipping (as clip_grad_norm_). To clip without touching the gradients, pass the coefficient to
    /// <see cref="IOptimizer.Step"/> as gradScale instead.
    /// </summary>
    public static double ClipGlobalNorm(IOps ops, IReadOnlyList<Tensor> grads, double maxNorm)
    {
        double norm = GlobalNorm(ops, grads);
        double coefficient = ClipCoefficient(norm, maxNorm);
        if (coefficient < 1.0)
            foreach (var g in grads) ops.Scale(g, coefficient);
        return norm;
    }
}
