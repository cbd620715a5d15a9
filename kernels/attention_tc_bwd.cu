// attention_tc_bwd.cu: causal GQA attention backward on tensor cores (FlashAttention-2, bf16), head
// dims 64 and 128. Same semantics, layouts and outputs as attention_backward_dkdv_bf16 /
// attention_backward_dq_bf16 in kernels/attention.cu (which stay the path for fp32 and other head
// dims), after the same delta pre-pass (attention_backward_preprocess_bf16: delta = rowsum(dout * out),
// fp32): dout, q, dq [B, T, Hq, D], k, v, dk, dv [B, T, Hkv, D] bf16; lse, delta [B, Hq, T] fp32 (lse in
// natural log, as the forward writes it); all outputs overwritten.
//
//   P = exp(scale q k^T - lse), dP = dout v^T, dS = P (dP - delta),
//   dv = sum P^T dout, dk = scale sum dS^T q (over the group's query heads), dq = scale dS k.
//
// Deterministic, no atomics (FA2's dq atomics replaced by a second kernel, as in Triton's fused
// attention tutorial): every output element is written by one thread and every sum has a fixed order.
//
// dk/dv: one CTA of 4 warps per (64-key block, kv head, batch); warp w owns keys 16w .. 16w + 15 and
// keeps their dK and dV (16 x D fp32 each) in registers while it walks the group's query heads in order
// and, for each, the 32-query tiles from the one holding the block's first key to the last. K and V of
// the block stay in shared memory; the Q, dout, lse and delta tiles are double-buffered (cp.async for
// step s + 1 issued before step s is computed). Per step, on tensor cores: S^T = K_w Q^T and
// dP^T = V_w dout^T (rows are keys, so P^T and dS^T come out of the accumulators already laid out as
// A fragments), then dV += P^T dout and dK += dS^T Q with P^T, dS^T rounded to bf16 as MMA operands.
//
// dq: one CTA of 4 warps per (64-query tile, q head, batch), heaviest tiles first; warp w owns 16 query
// rows and their dQ (16 x D fp32) in registers (Q and dout fragments re-read from shared memory); over the 64-key tiles up to
// the diagonal: S = Q K^T, dP = dout V^T, dS = P (dP - delta), dQ += dS K (dS rounded to bf16 as the
// operand). K is double-buffered and the V load overlaps S.
//
// Packed sequences (positions: null, or int32 [B, T], each token's position inside its document): query i
// sees keys j with i - positions[i] <= j <= i; P (and so dS) is 0 for the others. dk/dv visits, per query
// head, only the query tiles from the block's first key up to the last one whose first row's document
// starts at or before the block's last key (found by a binary search: starts never decrease); dq starts
// at the key tile holding the document start of its first row. Null: plain causal, as before.
//
// C ABI: one AttnTcParams by value (attention_tc.cuh; T is Tq, Tk is not read):
//        attention_bwd_dkdv_tc_d{64,128}_bf16(p: dout, q, k, v, lse, delta, positions, dk, dv, B, Tq, Hq, Hkv, scale):
//          grid (ceil(T / 64), Hkv, B), block 128, dynamic shared (2 * 64 + 4 * 32) * D * 2 + 768 bytes;
//        attention_bwd_dq_tc_d{64,128}_bf16(p: dout, q, k, v, lse, delta, positions, dq, B, Tq, Hq, Hkv, scale):
//          grid (ceil(T / 64), Hq, B), block 128, dynamic shared 5 * 64 * D * 2 bytes.
//        All bf16 pointers 16-byte aligned.
#include "attention_tc.cuh"

namespace attntc {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// dK, dV
// ---------------------------------------------------------------------------------------------
constexpr int kBwdKeys = 64;  // keys per CTA (4 warps x 16)
constexpr int kBwdQ = 32;     // queries per step

template <int D>
__device__ void bwd_dkdv_body(const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ q,
                              const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              const int* __restrict__ pos, __nv_bfloat16* __restrict__ dk,
                              __nv_bfloat16* __restrict__ dv, int T, int Hq, int Hkv, float scale)
{
    constexpr int KC = D / 16, DT = D / 8, NQ = kBwdQ / 8;
    constexpr int kTile = kBwdQ * D * 2;
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    unsigned char* sK = smem;
    unsigned char* sV = sK + kBwdKeys * D * 2;
    unsigned char* sQ = sV + kBwdKeys * D * 2;  // [2][kBwdQ][D]
    unsigned char* sO = sQ + 2 * kTile;         // dout, [2][kBwdQ][D]
    float* sL = reinterpret_cast<float*>(sO + 2 * kTile);  // [2][kBwdQ] lse * log2 e (+inf past T)
    float* sD = sL + 2 * kBwdQ;                            // [2][kBwdQ] delta
    int* sS = reinterpret_cast<int*>(sD + 2 * kBwdQ);      // [2][kBwdQ] document start of each query

    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int k0 = (int)blockIdx.x * kBwdKeys;
    const int hk = (int)blockIdx.y, b = (int)blockIdx.z;
    const int group = Hq / Hkv;
    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const long long kv_off = (long long)b * T * kv_stride + (long long)hk * D;

    const int qt_first = k0 / kBwdQ;
    const int nqt = (T + kBwdQ - 1) / kBwdQ;
    const int* pos_b = pos == nullptr ? nullptr : pos + (long long)b * T;
    int qt_end = nqt;  // with positions: the first tile whose first row starts after the block's last key
    if (pos_b != nullptr)
    {
        const int k_last = min(k0 + kBwdKeys, T) - 1;
        int lo = qt_first + 1, hi = nqt;  // tile qt_first holds row k0, which sees key k0
        while (lo < hi)
        {
            const int mid = (lo + hi) >> 1, r0 = mid * kBwdQ;
            if (r0 - pos_b[r0] > k_last) hi = mid;
            else lo = mid + 1;
        }
        qt_end = lo;
    }
    const int per_head = qt_end - qt_first;
    const int steps = group * per_head;

    // Stage step s (query head hh, tile qt) into buffer s & 1.
    auto prefetch = [&](int s) {
        const int buf = s & 1;
        const int h = hk * group + s / per_head;
        const int q0 = (qt_first + s % per_head) * kBwdQ;
        const long long q_off = (long long)b * T * q_stride + (long long)h * D;
        load_tile_async<D, kBwdQ>(sQ + buf * kTile, q + q_off, q_stride, q0, T);
        load_tile_async<D, kBwdQ>(sO + buf * kTile, dout + q_off, q_stride, q0, T);
        const int i = (int)threadIdx.x;
        if (i < kBwdQ)
        {
            const long long row = ((long long)b * Hq + h) * T + q0 + i;
            const bool ok = q0 + i < T;
            sL[buf * kBwdQ + i] = ok ? lse[row] * kLog2e : INFINITY;
            sD[buf * kBwdQ + i] = ok ? delta[row] : 0.0f;
            sS[buf * kBwdQ + i] = ok && pos_b != nullptr ? q0 + i - pos_b[q0 + i] : 0;
        }
    };

    load_tile_async<D, kBwdKeys>(sK, k + kv_off, kv_stride, k0, T);
    load_tile_async<D, kBwdKeys>(sV, v + kv_off, kv_stride, k0, T);
    prefetch(0);
    npmma::cp_async_commit();

    float dk_acc[DT][4], dv_acc[DT][4];
NP_UNROLL
    for (int i = 0; i < DT; ++i)
NP_UNROLL
        for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.0f;

    const float sl2 = scale * kLog2e;
    const int key_g = k0 + warp * 16 + g;  // key of accumulator rows g (and g + 8)

    for (int s = 0; s < steps; ++s)
    {
        npmma::cp_async_wait<0>();
        __syncthreads();  // step s's tiles visible; everyone is done with step s - 1's buffer
        if (s + 1 < steps)
        {
            prefetch(s + 1);
            npmma::cp_async_commit();
        }
        const int buf = s & 1;
        const unsigned char* tQ = sQ + buf * kTile;
        const unsigned char* tO = sO + buf * kTile;
        const float* tL = sL + buf * kBwdQ;
        const float* tD = sD + buf * kBwdQ;
        const int* tS = sS + buf * kBwdQ;
        const int q0 = (qt_first + s % per_head) * kBwdQ;

        // S^T = K_w Q^T and dP^T = V_w dout^T: 16 keys x 32 queries each.
        float st[NQ][4], dpt[NQ][4];
NP_UNROLL
        for (int n = 0; n < NQ; ++n)
NP_UNROLL
            for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
NP_UNROLL
        for (int kc = 0; kc < KC; ++kc)
        {
            uint32_t ka[4], va[4];
            load_a<D>(ka, sK, warp * 16, kc * 16, lane);
            load_a<D>(va, sV, warp * 16, kc * 16, lane);
NP_UNROLL
            for (int n = 0; n < NQ; n += 2)
            {
                uint32_t qb[4], ob[4];
                load_b_t2<D>(qb, tQ, n * 8, kc * 16, lane);
                load_b_t2<D>(ob, tO, n * 8, kc * 16, lane);
                mma(st[n], ka, qb[0], qb[1]);
                mma(st[n + 1], ka, qb[2], qb[3]);
                mma(dpt[n], va, ob[0], ob[1]);
                mma(dpt[n + 1], va, ob[2], ob[3]);
            }
        }

        // P^T and dS^T in place: element e of n-tile n is key key_g + 8 (e >> 1), query q0 + 8n + 2t + (e & 1).
NP_UNROLL
        for (int n = 0; n < NQ; ++n)
NP_UNROLL
            for (int e = 0; e < 4; ++e)
            {
                const int qi = n * 8 + 2 * t + (e & 1);
                const int key = key_g + ((e >> 1) << 3);
                // Queries past T have lse = +inf: p = 2^-inf = 0. Keys past the query or before its
                // document start: p = 0.
                const float p = key > q0 + qi || key < tS[qi] ? 0.0f : npmma::fast_exp2(st[n][e] * sl2 - tL[qi]);
                st[n][e] = p;
                dpt[n][e] = p * (dpt[n][e] - tD[qi]);
            }

        // dV += P^T dout and dK += dS^T Q: query chunk c (16 queries) = n-tiles 2c, 2c + 1.
NP_UNROLL
        for (int c = 0; c < kBwdQ / 16; ++c)
        {
            uint32_t pa[4];
            acc_to_a(pa, st[2 * c], st[2 * c + 1]);
            uint32_t sa[4];
            acc_to_a(sa, dpt[2 * c], dpt[2 * c + 1]);
NP_UNROLL
            for (int i = 0; i < DT; i += 2)
            {
                uint32_t ob[4], qb[4];
                load_b_n2<D>(ob, tO, c * 16, i * 8, lane);
                load_b_n2<D>(qb, tQ, c * 16, i * 8, lane);
                mma(dv_acc[i], pa, ob[0], ob[1]);
                mma(dv_acc[i + 1], pa, ob[2], ob[3]);
                mma(dk_acc[i], sa, qb[0], qb[1]);
                mma(dk_acc[i + 1], sa, qb[2], qb[3]);
            }
        }
    }

NP_UNROLL
    for (int r = 0; r < 2; ++r)
    {
        const int key = key_g + 8 * r;
        if (key >= T) continue;
        const long long e = kv_off + (long long)key * kv_stride;
NP_UNROLL
        for (int i = 0; i < DT; ++i)
        {
            *reinterpret_cast<uint32_t*>(dk + e + i * 8 + 2 * t) =
                npmma::pack_bf16(dk_acc[i][2 * r] * scale, dk_acc[i][2 * r + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv + e + i * 8 + 2 * t) =
                npmma::pack_bf16(dv_acc[i][2 * r], dv_acc[i][2 * r + 1]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dQ
// ---------------------------------------------------------------------------------------------
constexpr int kDqRows = 64;  // queries per CTA (4 warps x 16)
constexpr int kDqKeys = 64;  // keys per tile

template <int D>
__device__ void bwd_dq_body(const __nv_bfloat16* __restrict__ dout, const __nv_bfloat16* __restrict__ q,
                            const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                            const float* __restrict__ lse, const float* __restrict__ delta,
                            const int* __restrict__ pos, __nv_bfloat16* __restrict__ dq, int T, int Hq, int Hkv,
                            float scale)
{
    constexpr int KC = D / 16, DT = D / 8, NT = kDqKeys / 8;
    constexpr int kTile = 64 * D * 2;
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    unsigned char* sQ = smem;
    unsigned char* sO = sQ + kTile;
    unsigned char* sK = sO + kTile;  // [2][64][D]
    unsigned char* sV = sK + 2 * kTile;

    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nqt = (T + kDqRows - 1) / kDqRows;
    const int q0 = (nqt - 1 - (int)blockIdx.x) * kDqRows;
    const int h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int hk = h / (Hq / Hkv);
    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const long long q_off = (long long)b * T * q_stride + (long long)h * D;
    const long long kv_off = (long long)b * T * kv_stride + (long long)hk * D;

    // Key tiles j0 .. nkt - 1: j0 holds the document start of the first row (0 without positions).
    const int* pos_b = pos == nullptr ? nullptr : pos + (long long)b * T;
    const int j0 = (pos_b != nullptr ? max(0, q0 - pos_b[q0]) : 0) / kDqKeys;

    load_tile_async<D, kDqRows>(sQ, q + q_off, q_stride, q0, T);
    load_tile_async<D, kDqRows>(sO, dout + q_off, q_stride, q0, T);
    load_tile_async<D, kDqKeys>(sK + (j0 & 1) * kTile, k + kv_off, kv_stride, j0 * kDqKeys, T);
    npmma::cp_async_commit();

    const int row_g = q0 + warp * 16 + g;  // query of accumulator rows g (and g + 8)
    float lse2[2], dl[2];
    int row_start[2];  // document starts of the two rows
NP_UNROLL
    for (int r = 0; r < 2; ++r)
    {
        const int row = row_g + 8 * r;
        const long long idx = ((long long)b * Hq + h) * T + row;
        lse2[r] = row < T ? lse[idx] * kLog2e : INFINITY;
        dl[r] = row < T ? delta[idx] : 0.0f;
        row_start[r] = pos_b != nullptr && row < T ? row - pos_b[row] : 0;
    }

    npmma::cp_async_wait<0>();
    __syncthreads();

    float dq_acc[DT][4];
NP_UNROLL
    for (int i = 0; i < DT; ++i) dq_acc[i][0] = dq_acc[i][1] = dq_acc[i][2] = dq_acc[i][3] = 0.0f;
    const float sl2 = scale * kLog2e;
    const int nkt = (min(q0 + kDqRows, T) - 1) / kDqKeys + 1;

    for (int j = j0; j < nkt; ++j)
    {
        const int k0 = j * kDqKeys;
        const unsigned char* tK = sK + (j & 1) * kTile;
        load_tile_async<D, kDqKeys>(sV, v + kv_off, kv_stride, k0, T);
        npmma::cp_async_commit();
        if (j + 1 < nkt)
            load_tile_async<D, kDqKeys>(sK + ((j + 1) & 1) * kTile, k + kv_off, kv_stride, k0 + kDqKeys, T);
        npmma::cp_async_commit();  // possibly empty: keeps "wait for all but the newest group" meaning V_j

        float s[NT][4];
NP_UNROLL
        for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
NP_UNROLL
        for (int kc = 0; kc < KC; ++kc)
        {
            // Q's fragments are re-read from shared memory (ldmatrix) rather than kept: with dQ, S and dP in
            // registers, holding Q too made the D = 128 kernel spill.
            uint32_t qa[4];
            load_a<D>(qa, sQ, warp * 16, kc * 16, lane);
NP_UNROLL
            for (int n = 0; n < NT; n += 2)
            {
                uint32_t kb[4];
                load_b_t2<D>(kb, tK, n * 8, kc * 16, lane);
                mma(s[n], qa, kb[0], kb[1]);
                mma(s[n + 1], qa, kb[2], kb[3]);
            }
        }

        npmma::cp_async_wait<1>();
        __syncthreads();  // V_j visible

        float dp[NT][4];
NP_UNROLL
        for (int n = 0; n < NT; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
NP_UNROLL
        for (int kc = 0; kc < KC; ++kc)
        {
            uint32_t oa[4];
            load_a<D>(oa, sO, warp * 16, kc * 16, lane);
NP_UNROLL
            for (int n = 0; n < NT; n += 2)
            {
                uint32_t vb[4];
                load_b_t2<D>(vb, sV, n * 8, kc * 16, lane);
                mma(dp[n], oa, vb[0], vb[1]);
                mma(dp[n + 1], oa, vb[2], vb[3]);
            }
        }

        // dS in place of s: element e of n-tile n is row row_g + 8 (e >> 1), key k0 + 8n + 2t + (e & 1).
NP_UNROLL
        for (int n = 0; n < NT; ++n)
NP_UNROLL
            for (int e = 0; e < 4; ++e)
            {
                const int r = e >> 1;
                const int key = k0 + n * 8 + 2 * t + (e & 1);
                const float p = key > row_g + 8 * r || key < row_start[r] ? 0.0f : npmma::fast_exp2(s[n][e] * sl2 - lse2[r]);
                s[n][e] = p * (dp[n][e] - dl[r]);
            }

        // dQ += dS K_j: key chunk c = n-tiles 2c, 2c + 1.
NP_UNROLL
        for (int c = 0; c < kDqKeys / 16; ++c)
        {
            uint32_t sa[4];
            acc_to_a(sa, s[2 * c], s[2 * c + 1]);
NP_UNROLL
            for (int i = 0; i < DT; i += 2)
            {
                uint32_t kb[4];
                load_b_n2<D>(kb, tK, c * 16, i * 8, lane);
                mma(dq_acc[i], sa, kb[0], kb[1]);
                mma(dq_acc[i + 1], sa, kb[2], kb[3]);
            }
        }
        npmma::cp_async_wait<0>();
        __syncthreads();  // K_{j+1} visible; everyone is done with V_j and K_j
    }

NP_UNROLL
    for (int r = 0; r < 2; ++r)
    {
        const int row = row_g + 8 * r;
        if (row >= T) continue;
        __nv_bfloat16* dqrow = dq + q_off + (long long)row * q_stride;
NP_UNROLL
        for (int i = 0; i < DT; ++i)
            *reinterpret_cast<uint32_t*>(dqrow + i * 8 + 2 * t) =
                npmma::pack_bf16(dq_acc[i][2 * r] * scale, dq_acc[i][2 * r + 1] * scale);
    }
}

}  // namespace attntc

#define ATTN_TC_BWD(DIM)                                                                                         \
    NP_KERNEL_BOUNDED(attention_bwd_dkdv_tc_d##DIM##_bf16, attntc::kThreads, (const AttnTcParams p))                    \
    {                                                                                                         \
        if ((int)blockIdx.z < p.B)                                                                            \
            attntc::bwd_dkdv_body<DIM>(p.dout, p.q, p.k, p.v, p.lse, p.delta, p.positions, p.dk, p.dv, p.Tq, p.Hq, \
                                       p.Hkv, p.scale);                                                       \
    }                                                                                                         \
    NP_KERNEL_BOUNDED(attention_bwd_dq_tc_d##DIM##_bf16, attntc::kThreads, (const AttnTcParams p))                    \
    {                                                                                                         \
        if ((int)blockIdx.z < p.B)                                                                            \
            attntc::bwd_dq_body<DIM>(p.dout, p.q, p.k, p.v, p.lse, p.delta, p.positions, p.dq, p.Tq, p.Hq, p.Hkv, \
                                     p.scale);                                                                \
    }

ATTN_TC_BWD(64)
ATTN_TC_BWD(128)
