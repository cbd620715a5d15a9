// attention_tc.cuh: what the tensor-core attention kernels share (kernels/attention_tc.cu forward,
// kernels/attention_tc_bwd.cu backward): swizzled bf16 tiles in shared memory filled by cp.async, and
// the ldmatrix address of a fragment in them.
//
// A tile holds ROWS rows of D bf16 (D = 64 or 128), row r at byte r * 2D, 16-byte chunk c of the row
// stored at chunk c ^ (r & 7) (an XOR swizzle inside each 128-byte span). ldmatrix reads 8 rows of one
// logical chunk at a time; the swizzle puts those 8 rows' chunks in 8 different 16-byte bank groups,
// so every ldmatrix phase and every cp.async store is free of bank conflicts (unswizzled, rows 2D
// bytes apart all start in the same bank: an 8-way conflict at D = 64 or 128).
#pragma once
#include "mma.cuh"

// The parameters of the tensor-core attention kernels (attention_fwd_tc[_packed]_d{64,128}_bf16,
// attention_bwd_{dkdv,dq}_tc_d{64,128}_bf16), passed by value as their one parameter (FlashAttention's
// Flash_fwd_params / Flash_bwd_params). Mirrored field for field by C# NativePeft.Ops.AttnTcParams
// ([StructLayout(Sequential)]); KernelSourceTests compares its size and field offsets with np_layout_AttnTcParams
// (attention_tc.cu) and the static_assert below holds nvcc to the same size. A kernel reads the fields it needs:
// the forward q, k, v, out, lse (null: not written), positions (packed only); the backward q, k, v, lse, dout, delta,
// positions (null: plain causal) and dq or dk, dv.
struct AttnTcParams
{
    const __nv_bfloat16* q;     // [B, Tq, Hq, D]
    const __nv_bfloat16* k;     // [B, Tk, Hkv, D]
    const __nv_bfloat16* v;     // [B, Tk, Hkv, D]
    __nv_bfloat16* out;         // forward output [B, Tq, Hq, D]
    float* lse;                 // [B, Hq, Tq] fp32: written by the forward, read by the backward
    const int* positions;       // int32 [B, T] positions inside packed documents (Tq = Tk = T), or null
    const __nv_bfloat16* dout;  // backward: dL/d out [B, T, Hq, D]
    const float* delta;         // backward: rowsum(dout * out) [B, Hq, T] fp32
    __nv_bfloat16* dq;          // backward outputs (overwritten)
    __nv_bfloat16* dk;
    __nv_bfloat16* dv;
    int B, Tq, Tk, Hq, Hkv;
    float scale;                // 1 / sqrt(D)
};
static_assert(sizeof(AttnTcParams) == 112, "AttnTcParams: 11 pointers and 6 four-byte fields, as the C# mirror");

namespace attntc {

constexpr int kThreads = 128;  // 4 warps

// Byte offset of (row, 16-byte chunk) in a swizzled tile with D columns.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk)
{
    return row * (D * 2) + ((chunk ^ (row & 7)) << 4);
}

// Address of element (row, col) in a swizzled tile; col a multiple of 8 (a chunk start).
template <int D>
__device__ __forceinline__ const unsigned char* tile_at(const unsigned char* tile, int row, int col)
{
    return tile + swz<D>(row, col >> 3);
}

// Issues the cp.async copies of rows row0 .. row0 + ROWS - 1 of one head into a swizzled tile: `head`
// points at element (t = 0, d = 0) of the head, consecutive t are `stride` elements apart; rows at or
// past `len` are zero-filled (nothing is read for them). All kThreads threads take part; the caller
// commits and waits.
template <int D, int ROWS>
__device__ __forceinline__ void load_tile_async(unsigned char* tile, const __nv_bfloat16* head, long long stride,
                                                int row0, int len)
{
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
    static_assert((ROWS * kChunks) % kThreads == 0, "whole chunks per thread");
NP_UNROLL
    for (int i = 0; i < ROWS * kChunks / kThreads; ++i)
    {
        const int e = i * kThreads + (int)threadIdx.x;
        const int r = e / kChunks, c = e % kChunks, t = row0 + r;
        const bool ok = t < len;
        const __nv_bfloat16* src = head + (ok ? (long long)t * stride + c * 8 : 0);
        npmma::cp_async_16(tile + swz<D>(r, c), src, ok ? 16 : 0);
    }
}

// The A fragment (16 x 16) at rows r0.., columns c0.. of a swizzled row-major tile (ldmatrix.x4):
// lane l gives row r0 + (l & 15), column c0 + 8 (l >> 4).
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const unsigned char* tile, int r0, int c0, int lane)
{
    npmma::ldmatrix_x4(a, tile_at<D>(tile, r0 + (lane & 15), c0 + ((lane >> 4) << 3)));
}

// B fragments of two adjacent n8 tiles for a product with the TRANSPOSE of a row-major tile (B[k][n] =
// tile[n][k], e.g. K for S = Q K^T): n rows n0 .. n0 + 15, k columns c0 .. c0 + 15 (ldmatrix.x4):
// b[0..1] for rows n0.., b[2..3] for rows n0 + 8...
template <int D>
__device__ __forceinline__ void load_b_t2(uint32_t (&b)[4], const unsigned char* tile, int n0, int c0, int lane)
{
    npmma::ldmatrix_x4(b, tile_at<D>(tile, n0 + (lane & 7) + ((lane >> 4) << 3), c0 + (((lane >> 3) & 1) << 3)));
}

// B fragments of two adjacent n8 tiles for a product with a row-major tile itself (B[k][n] = tile[k][n],
// e.g. V for O = P V): k rows k0 .. k0 + 15, n columns n0 .. n0 + 15 (ldmatrix.x4.trans): b[0..1] for
// columns n0.., b[2..3] for columns n0 + 8...
template <int D>
__device__ __forceinline__ void load_b_n2(uint32_t (&b)[4], const unsigned char* tile, int k0, int n0, int lane)
{
    npmma::ldmatrix_x4_trans(b, tile_at<D>(tile, k0 + (lane & 15), n0 + ((lane >> 4) << 3)));
}

// The A fragment (16 x 16, bf16) made of the fp32 accumulators of two adjacent n8 tiles of a 16-row product:
// tile lo holds columns 0..7, tile hi columns 8..15 (the C and A layouts put the same rows and column pairs in
// the same lanes: a0 = lo.c0 c1, a1 = lo.c2 c3, a2 = hi.c0 c1, a3 = hi.c2 c3), rounded to nearest even.
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4])
{
    a[0] = npmma::pack_bf16(lo[0], lo[1]);
    a[1] = npmma::pack_bf16(lo[2], lo[3]);
    a[2] = npmma::pack_bf16(hi[0], hi[1]);
    a[3] = npmma::pack_bf16(hi[2], hi[3]);
}

// One online-softmax step (FA2) over NT n8 tiles of raw scores s of a warp's 16 rows (e < 2: row g, e >= 2: row
// g + 8; masked scores -inf): the rows' running max m (raw units) and this lane's partial sum l are updated, s
// becomes p = 2^(s * sl2 - m * sl2) in place (sl2 = scale * log2 e), and alpha is what the rows' O must be scaled
// by. A row that has seen no key keeps m = -inf and uses 0 as the base, so p = 2^-inf = 0, never NaN.
template <int NT>
__device__ __forceinline__ void online_softmax(float (&s)[NT][4], float (&m_row)[2], float (&l_row)[2], float (&alpha)[2],
                                               float sl2)
{
NP_UNROLL
    for (int r = 0; r < 2; ++r)
    {
        float mx = m_row[r];
NP_UNROLL
        for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = mx == -INFINITY ? 0.0f : mx * sl2;
        alpha[r] = m_row[r] == -INFINITY ? 0.0f : npmma::fast_exp2(m_row[r] * sl2 - base);
        m_row[r] = mx;
        float sum = 0.0f;
NP_UNROLL
        for (int n = 0; n < NT; ++n)
        {
            const float p0 = npmma::fast_exp2(s[n][2 * r] * sl2 - base);
            const float p1 = npmma::fast_exp2(s[n][2 * r + 1] * sl2 - base);
            s[n][2 * r] = p0;
            s[n][2 * r + 1] = p1;
            sum += p0 + p1;
        }
        l_row[r] = l_row[r] * alpha[r] + sum;
    }
}

__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    const uint32_t b[2] = {b0, b1};
    npmma::mma_bf16_16816(d, a, b, d);
}

}  // namespace attntc
