using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using NativePeft.Quantization;

namespace NativePeft.Optim;

/// <summary>
/// AdamW hyper-parameters. Defaults are torch.optim.AdamW's (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight_decay 0.01);
/// the learning rate of a step is passed to <see cref="IOptimizer.Step"/> (the schedule's value), <see cref="Lr"/> is
/// only the default a caller may use.
/// </summary>
public sealed record AdamWOptions
{
    public double Lr { get; init; } = 1e-3;
    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.999;
    public double Eps { get; init; } = 1e-8;
    public double WeightDecay { get; init; } = 0.01;

    /// <summary>Throws on out-of-range hyper-parameters (as torch does).</summary>
    public void Validate()
    {
        if (!(Lr >= 0)) throw new ArgumentOutOfRangeException(nameof(Lr), Lr, "lr must be >= 0");
        if (!(Beta1 >= 0 && Beta1 < 1)) throw new ArgumentOutOfRangeException(nameof(Beta1), Beta1, "beta1 must be in [0, 1)");
        if (!(Beta2 >= 0 && Beta2 < 1)) throw new ArgumentOutOfRangeException(nameof(Beta2), Beta2, "beta2 must be in [0, 1)");
        if (!(Eps >= 0)) throw new ArgumentOutOfRangeException(nameof(Eps), Eps, "eps must be >= 0");
        if (!(WeightDecay >= 0)) throw new ArgumentOutOfRangeException(nameof(WeightDecay), WeightDecay, "weight_decay must be >= 0");
    }
}

/// <summary>
/// The fp32 scalars of one AdamW step of one tensor, computed in double and rounded to fp32 once (the kernels of
/// kernels/optim.cu take exactly these, as their parameter struct AdamWScalars: this is its C# mirror, field for field;
/// KernelSourceTests checks the layouts agree).
/// </summary>
[System.Runtime.InteropServices.StructLayout(System.Runtime.InteropServices.LayoutKind.Sequential)]
public readonly record struct AdamWStepScalars(
    float Beta1, float Beta2, float OneMinusBeta1, float OneMinusBeta2, float Eps,
    float Decay, float BiasCorrection2Sqrt, float NegStepSize, float GradScale)
{
    /// <summary>The C struct's sizeof (36: nine floats), as the static_assert in kernels/optim.cu.</summary>
    public const int NativeSize = 36;

    /// <summary>The scalars of step <paramref name="step"/> (1-based, torch's state["step"] after its increment).</summary>
    public static AdamWStepScalars For(AdamWOptions o, double lr, long step, double gradScale = 1.0)
    {
        ArgumentNullException.ThrowIfNull(o);
        ArgumentOutOfRangeException.ThrowIfLessThan(step, 1);
        double bc1 = 1 - Math.Pow(o.Beta1, step);
        double bc2 = 1 - Math.Pow(o.Beta2, step);
        return new AdamWStepScalars(
            (float)o.Beta1, (float)o.Beta2, (float)(1 - o.Beta1), (float)(1 - o.Beta2), (float)o.Eps,
            (float)(1 - lr * o.WeightDecay), (float)Math.Sqrt(bc2), (float)(-lr / bc1), (float)gradScale);
    }
}

/// <summary>
/// The C# twin of kernels/optim.cu: the same IEEE fp32 operations in the same order, so CpuOps and the kernels (on
/// the emulator and on CUDA) give bit-identical parameters and states.
/// <para>
/// The step is torch.optim.AdamW's ("decay first"): p ← p·(1 − lr·wd), then the bias-corrected Adam update
/// p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps), with m ← β1·m + (1 − β1)·g and v ← β2·v + (1 − β2)·g².
/// bitsandbytes applies the decay after the Adam step instead; the two differ by O(lr²·wd) per step.
/// </para>
/// </summary>
public static class AdamWMath
{
    /// <summary>Quantization blocksize of the 8-bit states (bitsandbytes' blockwise optimizers).</summary>
    public const int Blocksize = 256;

    /// <summary>Tensors with fewer elements keep fp32 states in the 8-bit optimizers (bitsandbytes' min_8bit_size).</summary>
    public const int Min8BitSize = 4096;

    /// <summary>Index of 0.0 in the unsigned dynamic map.</summary>
    public const int UnsignedZeroIndex = 0;

    /// <summary>One element (kernel optk::adamw_update): updates m and v in place and returns the new p.</summary>
    public static float Update(float p, float gRaw, ref float m, ref float v, in AdamWStepScalars s)
    {
        float g = gRaw * s.GradScale;
        m = MathF.FusedMultiplyAdd(s.Beta1, m, s.OneMinusBeta1 * g);
        v = MathF.FusedMultiplyAdd(s.Beta2, v, s.OneMinusBeta2 * g * g);
        p *= s.Decay;
        float denom = MathF.Sqrt(v) / s.BiasCorrection2Sqrt + s.Eps;
        return MathF.FusedMultiplyAdd(s.NegStepSize, m / denom, p);
    }

    /// <summary>The adamw_f32 kernel on host spans.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void StepF32(Span<float> p, ReadOnlySpan<float> g, Span<float> m, Span<float> v, in AdamWStepScalars s)
    {
        int n = p.Length;
        if (g.Length != n || m.Length != n || v.Length != n)
            throw new ArgumentException($"AdamW: p has {n} elements, g {g.Length}, m {m.Length}, v {v.Length}");
        int i = 0;
        if (Vector256.IsHardwareAccelerated && n >= Vector256<float>.Count)
        {
            // The same IEEE operations as Update, eight lanes at a time (FMA, sqrt and division are correctly rounded
            // in both forms), so the results are bit-identical to the scalar loop.
            var beta1 = Vector256.Create(s.Beta1); var beta2 = Vector256.Create(s.Beta2);
            var oneMinusBeta1 = Vector256.Create(s.OneMinusBeta1); var oneMinusBeta2 = Vector256.Create(s.OneMinusBeta2);
            var decay = Vector256.Create(s.Decay); var bc2Sqrt = Vector256.Create(s.BiasCorrection2Sqrt);
            var eps = Vector256.Create(s.Eps); var negStep = Vector256.Create(s.NegStepSize); var scale = Vector256.Create(s.GradScale);
            ref float rp = ref MemoryMarshal.GetReference(p), rg = ref MemoryMarshal.GetReference(g);
            ref float rm = ref MemoryMarshal.GetReference(m), rv = ref MemoryMarshal.GetReference(v);
            for (; i <= n - Vector256<float>.Count; i += Vector256<float>.Count)
            {
                nuint at = (nuint)i;
                var gv = Vector256.LoadUnsafe(ref rg, at) * scale;
                var mv = Vector256.FusedMultiplyAdd(beta1, Vector256.LoadUnsafe(ref rm, at), oneMinusBeta1 * gv);
                var vv = Vector256.FusedMultiplyAdd(beta2, Vector256.LoadUnsafe(ref rv, at), oneMinusBeta2 * gv * gv);
                var pv = Vector256.LoadUnsafe(ref rp, at) * decay;
                var denom = Vector256.Sqrt(vv) / bc2Sqrt + eps;
                Vector256.FusedMultiplyAdd(negStep, mv / denom, pv).StoreUnsafe(ref rp, at);
                mv.StoreUnsafe(ref rm, at);
                vv.StoreUnsafe(ref rv, at);
            }
        }
        for (; i < n; i++)
            p[i] = Update(p[i], g[i], ref m[i], ref v[i], s);
    }

    /// <summary>Quantization blocks of n elements.</summary>
    public static int Blocks(long n) => checked((int)((n + Blocksize - 1) / Blocksize));

    /// <summary>
    /// The adamw8bit_blockwise kernel on host spans: per block of 256, decode m (signed map) and v (unsigned map),
    /// update, then re-encode with the block's new absmax (<see cref="Dynamic8Bit.QuantizeBlockwise"/>: the same
    /// max, reciprocal and binary search as the kernel).
    /// </summary>
    public static void Step8Bit(Span<float> p, ReadOnlySpan<float> g, Span<byte> qm, Span<byte> qv,
        Span<float> absmaxM, Span<float> absmaxV, in AdamWStepScalars s)
    {
        int n = p.Length, blocks = Blocks(n);
        if (g.Length != n || qm.Length != n || qv.Length != n)
            throw new ArgumentException($"AdamW8bit: p has {n} elements, g {g.Length}, state1 {qm.Length}, state2 {qv.Length}");
        if (absmaxM.Length != blocks || absmaxV.Length != blocks)
            throw new ArgumentException($"AdamW8bit: {blocks} blocks, absmax1 has {absmaxM.Length}, absmax2 {absmaxV.Length}");
        ReadOnlySpan<float> signed = DynamicMap.Signed, unsigned = DynamicMap.Unsigned;
        Span<float> m = stackalloc float[Blocksize], v = stackalloc float[Blocksize];
        for (int b = 0; b < blocks; b++)
        {
            int start = b * Blocksize, len = Math.Min(Blocksize, n - start);
            float am = absmaxM[b], av = absmaxV[b];
            for (int j = 0; j < len; j++)
            {
                int i = start + j;
                m[j] = signed[qm[i]] * am;
                v[j] = unsigned[qv[i]] * av;
                p[i] = Update(p[i], g[i], ref m[j], ref v[j], s);
            }
            Dynamic8Bit.QuantizeBlockwise(m[..len], signed, Blocksize, qm.Slice(start, len), absmaxM.Slice(b, 1), DynamicMap.SignedZeroIndex);
            Dynamic8Bit.QuantizeBlockwise(v[..len], unsigned, Blocksize, qv.Slice(start, len), absmaxV.Slice(b, 1), UnsignedZeroIndex);
        }
    }
}
