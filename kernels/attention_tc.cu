// attention_tc.cu: causal GQA attention forward on tensor cores (FlashAttention-2, bf16), head dims 64
// and 128. Same semantics and layouts as attention_forward_cached_bf16 in kernels/attention.cu (which
// stays the path for fp32 and other head dims): q, out [B, Tq, Hq, D], k, v [B, Tk, Hkv, D] bf16,
// lse [B, Hq, Tq] fp32 natural-log (null: not written); query row i sits at absolute position
// Tk - Tq + i and attends to keys j <= Tk - Tq + i (the training forward is Tq = Tk). Query head h reads
// kv head h / (Hq / Hkv) (native GQA: K and V are never replicated).
//
// Algorithm (FA2 forward): one CTA of 4 warps per (64-query tile, q head, batch); warp w owns query
// rows 16w .. 16w + 15 of the tile (no inter-warp reduction). Q, K, V tiles of 64 rows are staged in
// swizzled shared memory by cp.async (attention_tc.cuh); Q goes to registers once as mma A fragments
// (ldmatrix.x4). Per 64-key tile: S = Q K^T (mma.sync m16n8k16, fp32 accumulators; K fragments by
// ldmatrix.x4), the causal mask only on tiles that reach past the diagonal, online softmax in fp32 on
// the accumulators with exp2 and the scale folded in (p = 2^(s * scale * log2 e - m * scale * log2 e):
// one FFMA and one EX2), row max/sum over the 4 lanes of a row by xor shuffles, then O += P V with P
// rounded to bf16 only as the A operand (the S accumulators of n-tiles 2j, 2j+1 ARE the A fragment of
// key chunk j; no shared memory) and V fragments by ldmatrix.x4.trans. Rows keep an unnormalised O and
// a per-lane partial l; both are reduced and normalised once at the end (FA2). The key tiles are walked
// from 0 to the diagonal; K and V are double-buffered: tile j + 1 loads (cp.async) while tile j is
// computed (5 * 64 * D * 2 bytes of shared memory: 80 KB at D = 128, with the opt-in above 48 KB).
// Causal CTAs are unbalanced, so block x takes query tile nqt - 1 - x (the heaviest first).
//
// Packed sequences (positions: null, or int32 [B, Tk] indexed by absolute position, each token's position
// inside its document): row i (absolute a = Tk - Tq + i) sees keys j with a - positions[a] <= j <= a.
// The key tiles start at the one holding the document start of the CTA's first row (the smallest
// start of the tile: starts never decrease), and keys before a row's start are masked like keys past
// the diagonal, on the tiles that begin before the CTA's last row's start (the packed entry points
// below; the causal ones are the code without positions).
//
// Numerics: S and O accumulate in fp32; P is rounded to bf16 (relative error <= 2^-8) for the P V
// product only, l sums the fp32 p. Valid rows always end with a visible key (the row's own);
// rows past Tq are computed on zero-filled Q and never stored. m = -inf is guarded (no inf - inf:
// a packed row whose document starts in a later tile passes fully masked tiles with m = -inf, l = 0,
// O = 0). out = O / l rounded to bf16 once; lse = m * scale + log(l).
//
// C ABI: one AttnTcParams by value (attention_tc.cuh): attention_fwd_tc_d64_bf16, attention_fwd_tc_d128_bf16
//   (p: q, k, v, out, lse, B, Tq, Tk, Hq, Hkv, scale); attention_fwd_tc_packed_d{64,128}_bf16
//   (p: q, k, v, out, lse, positions, B, Tq = Tk = T, Hq, Hkv, scale) for packed training rows (positions
//   not null); grid (ceil(Tq / 64), Hq, B), block 128,
//   dynamic shared 5 * 64 * D * 2 bytes; q, k, v, out 16-byte aligned.
#include "attention_tc.cuh"

namespace attntc {

constexpr int kBR = 64;  // query rows per CTA (4 warps x 16)
constexpr int kBC = 64;  // keys per tile

// kPacked: positions given (attention_fwd_tc_packed_*); false: plain causal, pos unused.
template <int D, bool kPacked>
__device__ void fwd_body(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                         const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                         const int* __restrict__ pos, int Tq, int Tk, int Hq, int Hkv, float scale)
{
    constexpr int KC = D / 16;    // k16 chunks of the head dim
    constexpr int NT = kBC / 8;   // n8 tiles of S per key tile
    constexpr int DT = D / 8;     // n8 tiles of O
    constexpr int kTile = kBC * D * 2;
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    unsigned char* sQ = smem;
    unsigned char* sK = sQ + kBR * D * 2;  // [2][64][D]
    unsigned char* sV = sK + 2 * kTile;    // [2][64][D]

    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nqt = (Tq + kBR - 1) / kBR;
    const int q0 = (nqt - 1 - (int)blockIdx.x) * kBR;
    const int h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int hk = h / (Hq / Hkv);
    const int off = Tk - Tq;  // absolute position of query row 0
    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const __nv_bfloat16* q_head = q + (long long)b * Tq * q_stride + (long long)h * D;
    const __nv_bfloat16* k_head = k + (long long)b * Tk * kv_stride + (long long)hk * D;
    const __nv_bfloat16* v_head = v + (long long)b * Tk * kv_stride + (long long)hk * D;

    // Keys visible to the tile's last row (or to the last query): tiles j0 .. nkt - 1, j0 the tile of the
    // first row's document start (0 without positions).
    const int last_key = min(q0 + kBR, Tq) - 1 + off;
    const int nkt = last_key / kBC + 1;
    const int* pos_b = kPacked ? pos + (long long)b * Tk : nullptr;
    // max(0, .): a position larger than its index (invalid input, checked on the host) must not send cp.async before the row.
    const int first_start = pos_b != nullptr ? max(0, q0 + off - pos_b[q0 + off]) : 0;
    const int last_start = pos_b != nullptr ? last_key - pos_b[last_key] : 0;  // the largest start of the tile
    const int j0 = first_start / kBC;

    load_tile_async<D, kBR>(sQ, q_head, q_stride, q0, Tq);
    // Tile j0 goes to buffer j0 & 1 (tile j always computes from buffer j & 1).
    load_tile_async<D, kBC>(sK + (j0 & 1) * kTile, k_head, kv_stride, j0 * kBC, Tk);
    load_tile_async<D, kBC>(sV + (j0 & 1) * kTile, v_head, kv_stride, j0 * kBC, Tk);
    npmma::cp_async_commit();

    uint32_t qf[KC][4];

    float o[DT][4];
NP_UNROLL
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_row[2] = {-INFINITY, -INFINITY};  // rows g and g + 8: running max of the raw scores
    float l_row[2] = {0.0f, 0.0f};            // this lane's partial sums of p
    const float sl2 = scale * 1.4426950408889634f;
    const int row_abs0 = q0 + warp * 16 + g + off;  // absolute position of row g (row g + 8: + 8)

    for (int j = j0; j < nkt; ++j)
    {
        const int k0 = j * kBC, buf = j & 1;
        // Tile j + 1 streams into the other buffers while tile j is computed (its last readers, at tile j - 1,
        // passed the barrier that ended that iteration).
        if (j + 1 < nkt)
        {
            load_tile_async<D, kBC>(sK + (buf ^ 1) * kTile, k_head, kv_stride, k0 + kBC, Tk);
            load_tile_async<D, kBC>(sV + (buf ^ 1) * kTile, v_head, kv_stride, k0 + kBC, Tk);
        }
        npmma::cp_async_commit();  // possibly empty: "all but the newest group" is then always tile j
        npmma::cp_async_wait<1>();
        __syncthreads();  // tile j (and at j = j0, Q) visible to every warp
        if (j == j0)
        {
NP_UNROLL
            for (int kc = 0; kc < KC; ++kc) load_a<D>(qf[kc], sQ, warp * 16, kc * 16, lane);
        }
        const unsigned char* tK = sK + buf * kTile;
        const unsigned char* tV = sV + buf * kTile;

        float s[NT][4];
NP_UNROLL
        for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
NP_UNROLL
        for (int kc = 0; kc < KC; ++kc)
        {
NP_UNROLL
            for (int n = 0; n < NT; n += 2)
            {
                uint32_t kb[4];
                load_b_t2<D>(kb, tK, n * 8, kc * 16, lane);
                mma(s[n], qf[kc], kb[0], kb[1]);
                mma(s[n + 1], qf[kc], kb[2], kb[3]);
            }
        }

        // Mask: keys past a row's position (causal), past Tk, or before the row's document start. Only
        // tiles that reach past the first row's position or begin before the last row's document start
        // need it (every row of the tile sees every key of the others).
        if (k0 + kBC - 1 > q0 + off || k0 + kBC > Tk || (kPacked && k0 < last_start))
        {
            // Document starts of rows g and g + 8 (0 for rows past Tq), read here rather than held in registers
            // across the loop (at D = 128 every register is taken).
            int row_start[2] = {0, 0};
            if (kPacked)
            {
NP_UNROLL
                for (int r = 0; r < 2; ++r)
                {
                    const int a = row_abs0 + 8 * r;
                    if (a < Tk) row_start[r] = a - pos_b[a];
                }
            }
NP_UNROLL
            for (int n = 0; n < NT; ++n)
NP_UNROLL
                for (int e = 0; e < 4; ++e)
                {
                    const int key = k0 + n * 8 + 2 * t + (e & 1);
                    const int row_abs = row_abs0 + ((e >> 1) << 3);
                    if (key > row_abs || key >= Tk || (kPacked && key < row_start[e >> 1])) s[n][e] = -INFINITY;
                }
        }

        // Online softmax per row (e < 2: row g, e >= 2: row g + 8).
        float alpha[2];
        online_softmax<NT>(s, m_row, l_row, alpha, sl2);
NP_UNROLL
        for (int i = 0; i < DT; ++i)
        {
            o[i][0] *= alpha[0]; o[i][1] *= alpha[0];
            o[i][2] *= alpha[1]; o[i][3] *= alpha[1];
        }

        // O += P V_j: key chunk c (16 keys) = S n-tiles 2c, 2c + 1.
NP_UNROLL
        for (int c = 0; c < kBC / 16; ++c)
        {
            uint32_t pa[4];
            acc_to_a(pa, s[2 * c], s[2 * c + 1]);
NP_UNROLL
            for (int i = 0; i < DT; i += 2)
            {
                uint32_t vb[4];
                load_b_n2<D>(vb, tV, c * 16, i * 8, lane);
                mma(o[i], pa, vb[0], vb[1]);
                mma(o[i + 1], pa, vb[2], vb[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer buf before tile j + 2 is loaded into it
    }

    // Normalise and store: rows g and g + 8 of the warp; lanes t hold columns 8i + 2t, 8i + 2t + 1.
NP_UNROLL
    for (int r = 0; r < 2; ++r)
    {
        float l = l_row[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = q0 + warp * 16 + g + 8 * r;
        if (row >= Tq) continue;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        __nv_bfloat16* orow = out + (long long)b * Tq * q_stride + (long long)row * q_stride + (long long)h * D;
NP_UNROLL
        for (int i = 0; i < DT; ++i)
        {
            const uint32_t packed = npmma::pack_bf16(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
            *reinterpret_cast<uint32_t*>(orow + i * 8 + 2 * t) = packed;
        }
        if (t == 0 && lse != nullptr)
            lse[((long long)b * Hq + h) * Tq + row] = l > 0.0f ? m_row[r] * scale + logf(l) : INFINITY;
    }
}

}  // namespace attntc

// The causal kernel (no positions) and the packed one are separate entry points, so that the causal kernel keeps its
// instructions and registers exactly (at D = 128 on sm_90 it uses 241; the packed one reads its rows' document starts
// inside the masked tiles instead of holding them, and fits too). The packed kernel passes Tq for both lengths (Tk is
// not read). Both take their AttnTcParams as __grid_constant__: without it ptxas (sm_90) gave the packed d64 kernel
// 164 registers instead of the 134 it used with separate parameters; with it every forward kernel uses exactly the
// registers it used before (docs/design.md, "Kernel ABI"). The backward kernels take theirs without: there
// __grid_constant__ cost attention_bwd_dq_tc_d64 4 registers (168 -> 172, one resident CTA less per SM).
#define ATTN_TC_FWD(DIM)                                                                                         \
    NP_KERNEL_BOUNDED(attention_fwd_tc_d##DIM##_bf16, attntc::kThreads, (const __grid_constant__ AttnTcParams p)) \
    {                                                                                                         \
        if ((int)blockIdx.z < p.B)                                                                            \
            attntc::fwd_body<DIM, false>(p.q, p.k, p.v, p.out, p.lse, nullptr, p.Tq, p.Tk, p.Hq, p.Hkv, p.scale); \
    }                                                                                                         \
    NP_KERNEL_BOUNDED(attention_fwd_tc_packed_d##DIM##_bf16, attntc::kThreads, (const __grid_constant__ AttnTcParams p)) \
    {                                                                                                         \
        if ((int)blockIdx.z < p.B)                                                                            \
            attntc::fwd_body<DIM, true>(p.q, p.k, p.v, p.out, p.lse, p.positions, p.Tq, p.Tq, p.Hq, p.Hkv, p.scale); \
    }

ATTN_TC_FWD(64)
ATTN_TC_FWD(128)

NP_PARAMS_LAYOUT(AttnTcParams, offsetof(AttnTcParams, q), offsetof(AttnTcParams, k), offsetof(AttnTcParams, v),
                 offsetof(AttnTcParams, out), offsetof(AttnTcParams, lse), offsetof(AttnTcParams, positions),
                 offsetof(AttnTcParams, dout), offsetof(AttnTcParams, delta), offsetof(AttnTcParams, dq),
                 offsetof(AttnTcParams, dk), offsetof(AttnTcParams, dv), offsetof(AttnTcParams, B),
                 offsetof(AttnTcParams, Tq), offsetof(AttnTcParams, Tk), offsetof(AttnTcParams, Hq),
                 offsetof(AttnTcParams, Hkv), offsetof(AttnTcParams, scale))
