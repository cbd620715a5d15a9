using NativePeft.Numerics;

namespace NativePeft.Ops;

/// <summary>
/// <see cref="IOps.LoraDown"/> and <see cref="IOps.LoraBackwardInput"/> as the sequence of ops LoraLinear runs today
/// (Dropout into a temporary dropout(x) and mask, GEMMs, DropoutBackward, Add), one adapter at a time: the CPU
/// implementation, and the GPU's path for what the fused kernels do not take (fp32 activations, in not a multiple of 8,
/// unaligned tensors, an adapter too wide for one launch). Temporaries (dropout(x) and its mask, with dropout only)
/// come from the ops' memory and are returned before the call does (stream order keeps their reuse safe).
/// </summary>
internal static class LoraUnfused
{
    public static void Down(IOps ops, Tensor x, IEnumerable<LoraDownArgs> adapters)
    {
        foreach (var d in adapters)
            WithDropped(ops, x, d.DropoutP, d.Seed, (dropped, _) => ops.Matmul(dropped, false, d.A, true, d.Xa));
    }

    public static void Backward(IOps ops, Tensor x, IEnumerable<LoraBackwardArgs> adapters, Tensor dx)
    {
        foreach (var d in adapters)
        {
            WithDropped(ops, x, d.DropoutP, d.Seed, (dropped, mask) =>
            {
                ops.Matmul(d.DXa, true, dropped, false, d.DA, 1, 1);   // dA += dxaᵀ · dropout(x)
                if (mask is null)
                {
                    ops.Matmul(d.DXa, false, d.A, false, dx, 1, 1);    // dx += dxa · A, in the GEMM (beta = 1)
                    return;
                }
                // d dropout(x) = dxa · A, masked and scaled, then added: into the dropout(x) buffer, no longer needed
                ops.Matmul(d.DXa, false, d.A, false, dropped);
                ops.DropoutBackward(dropped, mask, d.DropoutP, dropped);
                ops.Add(dx, dropped, dx);
            });
        }
    }

    /// <summary>Runs <paramref name="body"/> on dropout(x) and its mask (x itself and null when p = 0).</summary>
    private static void WithDropped(IOps ops, Tensor x, double p, ulong seed, Action<Tensor, Tensor?> body)
    {
        if (p == 0)
        {
            body(x, null);
            return;
        }
        var dropped = ops.Memory.Allocate(x.DType, x.Rows, x.Columns);
        var mask = ops.Memory.Allocate(DType.U8, x.Rows, x.Columns);
        try
        {
            ops.Dropout(x, mask, p, seed, dropped);
            body(dropped, mask);
        }
        finally
        {
            ops.Memory.Free(mask);
            ops.Memory.Free(dropped);
        }
    }
}
