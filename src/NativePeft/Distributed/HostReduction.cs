using System.Runtime.InteropServices;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;

namespace NativePeft.Distributed;

/// <summary>
/// The CPU transport's arithmetic and tensor access (docs/distributed.md, "Communicators"). A reduction is computed
/// once, by rank 0, in rank order 0..N−1, each rank's part first multiplied by that rank's premultiply s (NCCL's
/// PreMulSum: x·s, then the sum):
/// <list type="bullet">
/// <item>F32: acc = x₀·s₀ (fp32, s rounded to fp32), then acc = acc + xᵣ·sᵣ in fp32 for r = 1..N−1.</item>
/// <item>F64: the same in fp64.</item>
/// <item>BF16: each part widened exactly to fp32, the same fp32 arithmetic as F32, the sum rounded once to bf16
/// (nearest even). NCCL rounds to bf16 after every step of its ring, so its bf16 results may differ from these in
/// the last bit.</item>
/// </list>
/// </summary>
internal static class HostReduction
{
    /// <summary>Whether <paramref name="dtype"/> can be all-reduced.</summary>
    public static bool IsReducible(DType dtype) => dtype is DType.F32 or DType.F64 or DType.BF16;

    /// <summary>Σᵣ sᵣ·partᵣ in rank order (see the class), as bytes of <paramref name="dtype"/>.</summary>
    public static byte[] Reduce(DType dtype, long count, IReadOnlyList<byte[]> parts, IReadOnlyList<double> scales)
    {
        var result = new byte[checked(count * dtype.ElementSize())];
        switch (dtype)
        {
            case DType.F32:
            {
                var acc = MemoryMarshal.Cast<byte, float>(result.AsSpan());
                for (int r = 0; r < parts.Count; r++)
                {
                    var x = MemoryMarshal.Cast<byte, float>(parts[r].AsSpan());
                    float s = (float)scales[r];
                    if (r == 0) for (int i = 0; i < acc.Length; i++) acc[i] = x[i] * s;
                    else for (int i = 0; i < acc.Length; i++) acc[i] += x[i] * s;
                }
                break;
            }
            case DType.F64:
            {
                var acc = MemoryMarshal.Cast<byte, double>(result.AsSpan());
                for (int r = 0; r < parts.Count; r++)
                {
                    var x = MemoryMarshal.Cast<byte, double>(parts[r].AsSpan());
                    double s = scales[r];
                    if (r == 0) for (int i = 0; i < acc.Length; i++) acc[i] = x[i] * s;
                    else for (int i = 0; i < acc.Length; i++) acc[i] += x[i] * s;
                }
                break;
            }
            case DType.BF16:
            {
                var acc = new float[count];
                for (int r = 0; r < parts.Count; r++)
                {
                    var x = MemoryMarshal.Cast<byte, BFloat16>(parts[r].AsSpan());
                    float s = (float)scales[r];
                    if (r == 0) for (int i = 0; i < acc.Length; i++) acc[i] = x[i].ToSingle() * s;
                    else for (int i = 0; i < acc.Length; i++) acc[i] += x[i].ToSingle() * s;
                }
                var y = MemoryMarshal.Cast<byte, BFloat16>(result.AsSpan());
                for (int i = 0; i < acc.Length; i++) y[i] = BFloat16.FromSingle(acc[i]);
                break;
            }
            default:
                throw new ArgumentException($"all-reduce supports F32, F64 and BF16 tensors, not {dtype}", nameof(dtype));
        }
        return result;
    }

    /// <summary>
    /// Whether the transport reads and writes <paramref name="ops"/>' tensors in place (host memory: CpuOps, the
    /// emulator) rather than staging them through the host (CUDA).
    /// </summary>
    public static bool IsHostAddressable(IOps ops) =>
        ops.Memory is HostTensorMemory || ops.Device?.Properties.Kind == GpuKind.Emulated;

    /// <summary>The bytes of a host-addressable tensor.</summary>
    public static unsafe Span<byte> HostBytes(Tensor t) => new((void*)t.Data.Address, checked((int)t.Bytes));

    /// <summary>A tensor's bytes copied to the host through <paramref name="ops"/> (waits for its stream).</summary>
    public static byte[] Download(IOps ops, Tensor t)
    {
        var bytes = new byte[t.Bytes];
        switch (t.DType)
        {
            case DType.F32: ops.Download(t, MemoryMarshal.Cast<byte, float>(bytes.AsSpan())); break;
            case DType.F64: ops.Download(t, MemoryMarshal.Cast<byte, double>(bytes.AsSpan())); break;
            case DType.BF16: ops.Download(t, MemoryMarshal.Cast<byte, BFloat16>(bytes.AsSpan())); break;
            case DType.I32: ops.Download(t, MemoryMarshal.Cast<byte, int>(bytes.AsSpan())); break;
            case DType.U8: ops.Download(t, bytes.AsSpan()); break;
            default: throw new ArgumentException($"the cpu communicator stages F32, F64, BF16, I32 and U8 device tensors, not {t.DType}");
        }
        return bytes;
    }

    /// <summary>Host bytes into a tensor through <paramref name="ops"/>.</summary>
    public static void Upload(IOps ops, ReadOnlySpan<byte> bytes, Tensor t)
    {
        switch (t.DType)
        {
            case DType.F32: ops.Upload(MemoryMarshal.Cast<byte, float>(bytes), t); break;
            case DType.F64: ops.Upload(MemoryMarshal.Cast<byte, double>(bytes), t); break;
            case DType.BF16: ops.Upload(MemoryMarshal.Cast<byte, BFloat16>(bytes), t); break;
            case DType.I32: ops.Upload(MemoryMarshal.Cast<byte, int>(bytes), t); break;
            case DType.U8: ops.Upload(bytes, t); break;
            default: throw new ArgumentException($"the cpu communicator stages F32, F64, BF16, I32 and U8 device tensors, not {t.DType}");
        }
    }
}
