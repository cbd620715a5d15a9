using System.Runtime.InteropServices;
using NativePeft.Runtime;

namespace NativePeft.Ops;

// The C# mirrors of the kernels' parameter structs (docs/design.md, "Kernel ABI"): field for field, in the C order, so
// that [StructLayout(Sequential)] gives the C layout (pointers as DevicePtr, 8 bytes; int, uint, float 4; ulong 8).
// KernelSourceTests compares each one's size and field offsets with the emulator library's np_layout_<struct> and its
// field names with the C declaration; the static_assert beside the C struct holds nvcc to the same size.

/// <summary>
/// The one parameter of the tensor-core attention kernels (kernels/attention_tc.cuh, AttnTcParams):
/// attention_fwd_tc[_packed]_d{64,128}_bf16 and attention_bwd_{dkdv,dq}_tc_d{64,128}_bf16. A kernel reads the fields
/// it needs; the others may stay zero.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct AttnTcParams
{
    /// <summary>The C struct's sizeof (112), as the static_assert in attention_tc.cuh.</summary>
    public const int NativeSize = 112;

    public DevicePtr Q, K, V;
    /// <summary>Forward output [B, Tq, Hq, D] bf16.</summary>
    public DevicePtr Out;
    /// <summary>[B, Hq, Tq] fp32: written by the forward (null: not written), read by the backward.</summary>
    public DevicePtr Lse;
    /// <summary>Null, or int32 [B, T] positions inside packed documents (Tq = Tk = T).</summary>
    public DevicePtr Positions;
    /// <summary>Backward: dL/d out, delta = rowsum(dout ∘ out) fp32, and the outputs dq or dk, dv.</summary>
    public DevicePtr Dout, Delta, Dq, Dk, Dv;
    public int B, Tq, Tk, Hq, Hkv;
    public float Scale;
}

/// <summary>
/// The one parameter of the generic (fp32 and bf16, any head dim) attention kernels (kernels/attention.cu, AttnParams):
/// attention_forward[_cached]_{f32,bf16}, attention_backward_{preprocess,dkdv,dq}_{f32,bf16}. The tensor pointers'
/// element type is the kernel's dtype. A kernel reads the fields it needs; the others may stay zero.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct AttnParams
{
    /// <summary>The C struct's sizeof (120, with 4 bytes of tail padding), as the static_assert in attention.cu.</summary>
    public const int NativeSize = 120;

    public DevicePtr Q, K, V;
    /// <summary>Forward output [B, Tq, Hq, D] (read by the backward preprocess).</summary>
    public DevicePtr Out;
    /// <summary>[B, Hq, Tq] fp32: written by the forward (null: not written), read by the backward.</summary>
    public DevicePtr Lse;
    /// <summary>Null, or int32 [B, T] positions inside packed documents (Tq = Tk = T).</summary>
    public DevicePtr Positions;
    /// <summary>Backward: dL/d out; delta = rowsum(dout ∘ out) fp32 (written by the preprocess); the outputs dq or dk, dv.</summary>
    public DevicePtr Dout, Delta, Dq, Dk, Dv;
    public int B, Tq, Tk, Hq, Hkv, D;
    public float Scale;
}

/// <summary>
/// The one parameter of the split-KV decode kernels (kernels/attention_decode.cu, AttnDecodeParams):
/// attention_decode_tc_d{64,128}_bf16 and attention_decode_combine_bf16. A kernel reads the fields it needs; the
/// others may stay zero.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct AttnDecodeParams
{
    /// <summary>The C struct's sizeof (96, with 4 bytes of tail padding), as the static_assert in attention_decode.cu.</summary>
    public const int NativeSize = 96;

    public DevicePtr Q, K, V;
    /// <summary>The splits' partials: O [B, Hkv, splits, 16, D] and lse [B, Hkv, splits, 16] fp32.</summary>
    public DevicePtr OPart, LsePart;
    /// <summary>The combine's output [B, Tq, Hq, D] bf16 and lse [B, Hq, Tq] fp32 (null: not written).</summary>
    public DevicePtr Out, Lse;
    public int B, Tq, Tk, Hq, Hkv;
    /// <summary>Decode: keys per split (a multiple of 64).</summary>
    public int Chunk;
    /// <summary>Combine: the number of splits and the head dim.</summary>
    public int Splits, D;
    /// <summary>Decode: 1 / sqrt(D).</summary>
    public float Scale;
}

/// <summary>
/// The one parameter of lora_down_tc_bf16 and lora_bwd_input_tc_bf16 (kernels/lora.cu, LoraTcParams) for up to three
/// adapters; unused slots (g ≥ Count) hold null pointers and rank 0.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct LoraTcParams
{
    /// <summary>The C struct's sizeof (152, with 4 bytes of tail padding), as the static_assert in lora.cu.</summary>
    public const int NativeSize = 152;

    /// <summary>x [N, in] bf16; dx [N, in] (backward, read and written; null in the forward).</summary>
    public DevicePtr X, Dx;
    /// <summary>A_g [r_g, in] bf16.</summary>
    public DevicePtr A0, A1, A2;
    /// <summary>Forward: xa_g [N, r_g] (written); backward: dxa_g (read).</summary>
    public DevicePtr Data0, Data1, Data2;
    /// <summary>The fp32 partials workspace, or null.</summary>
    public DevicePtr Ws;
    /// <summary>Philox keys of the dropout masks.</summary>
    public ulong Seed0, Seed1, Seed2;
    public int N, In;
    /// <summary>Forward: 64-feature tiles per split; backward: rows per split.</summary>
    public int Split;
    public int Count;
    public int R0, R1, R2;
    /// <summary>Dropout thresholds (0: no dropout).</summary>
    public uint Thr0, Thr1, Thr2;
    /// <summary>1 / (1 − p), the scale of kept elements.</summary>
    public float Scale0, Scale1, Scale2;
}

/// <summary>
/// The one parameter of the split reductions lora_down_reduce_bf16 and lora_da_reduce_f32 (kernels/lora.cu,
/// LoraReduceParams): Dst_g is xa_g [N, r_g] bf16 for the first, dA_g [r_g, in] fp32 for the second; unused slots
/// (g ≥ Count) hold null pointers and rank 0.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
internal struct LoraReduceParams
{
    /// <summary>The C struct's sizeof (64), as the static_assert in lora.cu.</summary>
    public const int NativeSize = 64;

    /// <summary>The fp32 partials [splits][...], adapters' rows padded to 16.</summary>
    public DevicePtr Ws;
    public DevicePtr Dst0, Dst1, Dst2;
    public int Splits;
    /// <summary>Down: rows of x.</summary>
    public int N;
    /// <summary>The sum of the padded ranks.</summary>
    public int R;
    /// <summary>dA: input features.</summary>
    public int In;
    public int Count;
    public int R0, R1, R2;
}
