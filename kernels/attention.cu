// attention.cu: causal scaled-dot-product attention with grouped-query heads (GQA), forward and
// backward, flash-attention style (docs/ops-contract.md "Causal attention"; CPU reference:
// src/NativePeft/Ops/Reference/AttentionRef.cs).
//
// Layouts (row-major): q, out, dout, dq [B, T, Hq, D]; k, v, dk, dv [B, T, Hkv, D]; lse and the
// backward's delta [B, Hq, T] fp32. Query head h reads kv head h / (Hq / Hkv). Query t attends to
// keys s <= t. scale is passed by the host (1/sqrt(D)).
//
//   forward:   out[t] = sum_{s<=t} softmax_s(scale * q_t.k_s) v_s,  lse[t] = log sum_{s<=t} exp(scale * q_t.k_s)
//   backward:  P[t,s] = exp(scale * q_t.k_s - lse[t]),  delta[t] = dout_t.out_t,
//              dS[t,s] = P[t,s] * (dout_t.v_s - delta[t]),
//              dq_t = scale * sum_s dS[t,s] k_s,   dk_s = scale * sum_{h in group, t} dS[t,s] q_t,
//              dv_s = sum_{h in group, t} P[t,s] dout_t.
//
// T (q, k, v, out, dout, dq, dk, dv) is float or __nv_bfloat16; every value is widened to fp32 when it
// is staged in shared memory and all math (dot products, exp, online softmax, sums) is fp32; each
// output is rounded to T once. The T x T scores never exist in global memory: the forward keeps a
// running max and sum per query row (online softmax) over key tiles staged in shared memory, and the
// backward recomputes P from lse tile by tile.
//
// Packed sequences: positions (int32 [B, T], or null) holds each token's position inside its document
// (0 at every document start, +1 per token inside it; NOT checked here: the host validates). With
// positions, query t sees keys s with t - positions[t] <= s <= t (its own document up to itself); the
// kernels mask keys before a row's document start like keys past the diagonal, skip key tiles that end
// before the document start of the tile's first row (the smallest start of the tile: starts never
// decrease along a row), and the dk/dv kernel stops at the first query tile whose first row starts
// after the block's last key. Null positions: plain causal, the arithmetic (and bits) of no positions.
// A row keeps at least one visible key (itself). Per row, the sums run over the same keys in the same
// order as for the document alone, so a packed document's dq, dk, dv (given the same lse and delta)
// are bit-identical to the document run alone, and its forward is too when the document starts at a
// multiple of the 16-key tile (otherwise the online softmax sees its keys in other tile groupings).
//
// Head dimension D: a runtime argument, 1 <= D <= ATTN_MAX_HEAD_DIM = 128 (any value; the model uses
// even 32..128). Shared memory is dynamic and sized by the host from D (rows are padded to D + 1
// floats so that the rows read by one warp fall in different banks); at D = 128 every kernel uses
// < 36 KB, below the 48 KB that needs no opt-in.
//
// No atomics anywhere: every output element is written by exactly one thread, and every sum is
// accumulated in a fixed order that depends only on the shapes, so results are deterministic
// (bit-identical from run to run and independent of scheduling). The backward is three kernels:
// preprocess (delta), dk/dv (one block per (b, kv head, key tile), looping over the group's query heads
// and the query tiles in order), dq (one block per (b, q head, query tile), looping over key tiles);
// dq recomputes P and dP instead of accumulating with atomics.
//
// Only what the emulator supports: plain shared memory, __syncthreads, xor shuffles; no tensor cores,
// no cp.async, no cooperative groups.
//
// C ABI: attention_forward_{f32,bf16}, attention_forward_cached_{f32,bf16} (queries at an offset, for
//        decoding with a KV cache), attention_backward_preprocess_{f32,bf16},
//        attention_backward_dkdv_{f32,bf16}, attention_backward_dq_{f32,bf16}.
#include "common.cuh"

#define ATTN_MAX_HEAD_DIM 128
#define ATTN_THREADS 128

// Full unrolling keeps the per-thread accumulator arrays (o, dk_acc, ...) in registers.
#if defined(__CUDACC__)
#define ATTN_UNROLL _Pragma("unroll")
#else
#define ATTN_UNROLL _Pragma("GCC unroll 32")
#endif

namespace attnk {

constexpr int kMaxD = ATTN_MAX_HEAD_DIM;
constexpr int kThreads = ATTN_THREADS;

// Forward tile: 32 query rows x 16 keys; 4 threads per query row.
constexpr int kFwdRows = 32;
constexpr int kFwdKeys = 16;
constexpr int kFwdLanes = kThreads / kFwdRows;
// Backward tiles: 16 rows x 16 columns; 8 threads per row of the output tile.
constexpr int kBwdRows = 16;
constexpr int kBwdKeys = 16;
constexpr int kBwdLanes = kThreads / kBwdRows;

static_assert(kFwdKeys % kFwdLanes == 0 && kMaxD % kFwdLanes == 0, "forward tile shape");
static_assert(kBwdRows % kBwdLanes == 0 && kBwdKeys % kBwdLanes == 0 && kMaxD % kBwdLanes == 0, "backward tile shape");
static_assert(kBwdRows == kBwdKeys, "dk/dv and dq use the same lane mapping");

// Stages rows t = row0 .. row0 + rows - 1 of one head into tile[rows][ld] as fp32; rows at or past
// seq_len are zero. `head` points at element (b, t = 0, head, d = 0); consecutive t are row_stride
// elements apart. All threads of the block take part (coalesced: consecutive threads, consecutive d).
template <typename T>
__device__ __forceinline__ void load_tile(float* tile, int ld, const T* head, long long row_stride,
                                          int row0, int rows, int seq_len, int D)
{
    for (int e = (int)threadIdx.x; e < rows * D; e += (int)blockDim.x)
    {
        const int r = e / D, d = e - r * D, t = row0 + r;
        tile[r * ld + d] = t < seq_len ? to_f32(head[(long long)t * row_stride + d]) : 0.0f;
    }
}

__device__ __forceinline__ float dot_rows(const float* a, const float* b, int D)
{
    float acc = 0.0f;
    for (int d = 0; d < D; ++d) acc += a[d] * b[d];
    return acc;
}

// ---------------------------------------------------------------------------------------------
// Forward. Launch: grid (ceil(T / 32), Hq, B), block 128, dynamic shared
// ((32 + 2 * 16) * (D + 1) + 32 * 17) * 4 bytes. Block x handles query tile nqt - 1 - x (the
// longest rows first). Thread (r = tid / 4, c = tid % 4) owns query row q0 + r, the scores of keys
// c, c + 4, c + 8, c + 12 of each key tile, and the output columns d = c + 4k. Per key tile (16 keys,
// up to the diagonal): K and V staged in shared memory; scores -> row max (xor shuffles over the 4
// lanes of the row) -> rescale -> P to shared -> O += P V in registers.
// ---------------------------------------------------------------------------------------------
//
// Queries at an offset (decoding with a KV cache): q, out [B, q_len, Hq, D], k, v [B, kv_len, Hkv, D],
// lse [B, Hq, q_len]; query row i sits at absolute position i + kv_len - q_len and attends to keys
// j <= i + kv_len - q_len. The training forward is the case q_len = kv_len (the same arithmetic, so
// its results are unchanged bit for bit). pos (null, or [B, kv_len] indexed by absolute position):
// row i also needs j >= i + off - pos[i + off] (packed sequences; the C ABI passes it for q_len = kv_len).
template <typename T>
__device__ void forward_body(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             T* __restrict__ out, float* __restrict__ lse, const int* __restrict__ pos,
                             int q_len, int kv_len, int Hq, int Hkv, int D, float scale)
{
    constexpr int BR = kFwdRows, BC = kFwdKeys, LANES = kFwdLanes;
    constexpr int NS = BC / LANES, NO = kMaxD / LANES, LDP = BC + 1;
    EMU_DYNAMIC_SHARED(float, smem);
    const int ld = D + 1;
    float* sQ = smem;             // [BR][ld]
    float* sK = sQ + BR * ld;     // [BC][ld]
    float* sV = sK + BC * ld;     // [BC][ld]
    float* sP = sV + BC * ld;     // [BR][LDP]

    const int nqt = (q_len + BR - 1) / BR;
    const int q0 = (nqt - 1 - (int)blockIdx.x) * BR;
    const int h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int g = h / (Hq / Hkv);
    const int off = kv_len - q_len;  // absolute position of query row 0
    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const T* q_head = q + (long long)b * q_len * q_stride + (long long)h * D;
    const T* k_head = k + (long long)b * kv_len * kv_stride + (long long)g * D;
    const T* v_head = v + (long long)b * kv_len * kv_stride + (long long)g * D;

    const int tid = (int)threadIdx.x, r = tid / LANES, c = tid % LANES;
    const int i = q0 + r;
    const bool row_ok = i < q_len;
    // Document starts (absolute key index): this row's, and the tile's first row's (the smallest).
    const int* pos_b = pos == nullptr ? nullptr : pos + (long long)b * kv_len;
    const int start = pos_b != nullptr && row_ok ? i + off - pos_b[i + off] : 0;
    const int tile_start = pos_b != nullptr ? q0 + off - pos_b[q0 + off] : 0;

    load_tile(sQ, ld, q_head, q_stride, q0, BR, q_len, D);

    float o[NO];
ATTN_UNROLL
    for (int kk = 0; kk < NO; ++kk) o[kk] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    const int last_row = min(q0 + BR, q_len) - 1 + off;  // the last key any row of the tile sees
    const int nkt = last_row / BC + 1;
    for (int kt = tile_start / BC; kt < nkt; ++kt)
    {
        const int k0 = kt * BC;
        __syncthreads();  // the previous tile's reads of sK, sV, sP are done
        load_tile(sK, ld, k_head, kv_stride, k0, BC, kv_len, D);
        load_tile(sV, ld, v_head, kv_stride, k0, BC, kv_len, D);
        __syncthreads();

        float s[NS];
        float mt = -INFINITY;
ATTN_UNROLL
        for (int n = 0; n < NS; ++n)
        {
            const int jj = c + LANES * n, j = k0 + jj;
            float x = -INFINITY;
            if (row_ok && j <= i + off && j >= start)  // j <= i + off < kv_len
                x = dot_rows(sQ + r * ld, sK + jj * ld, D) * scale;
            s[n] = x;
            mt = fmaxf(mt, x);
        }
ATTN_UNROLL
        for (int off = 1; off < LANES; off <<= 1)
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
        const float m_new = fmaxf(m, mt);
        // A row with no key yet (rows past seq_len, and packed rows whose document starts in a later
        // tile) keeps m = -inf, l = 0, o = 0, without a NaN from exp(-inf - -inf).
        const float corr = m == -INFINITY ? 0.0f : expf(m - m_new);
        float ps = 0.0f;
ATTN_UNROLL
        for (int n = 0; n < NS; ++n)
        {
            const float p = s[n] == -INFINITY ? 0.0f : expf(s[n] - m_new);
            sP[r * LDP + c + LANES * n] = p;
            ps += p;
        }
ATTN_UNROLL
        for (int off = 1; off < LANES; off <<= 1)
            ps += __shfl_xor_sync(0xffffffffu, ps, off);
        l = l * corr + ps;
        m = m_new;
        __syncthreads();  // sP complete

        const float* pr = sP + r * LDP;
ATTN_UNROLL
        for (int kk = 0; kk < NO; ++kk)
        {
            const int d = c + LANES * kk;
            if (d < D)
            {
                float acc = o[kk] * corr;
                for (int jj = 0; jj < BC; ++jj) acc += pr[jj] * sV[jj * ld + d];
                o[kk] = acc;
            }
        }
    }

    if (row_ok)
    {
        T* orow = out + (long long)b * q_len * q_stride + (long long)i * q_stride + (long long)h * D;
ATTN_UNROLL
        for (int kk = 0; kk < NO; ++kk)
        {
            const int d = c + LANES * kk;
            if (d < D) orow[d] = from_f32<T>(o[kk] / l);
        }
        if (c == 0 && lse != nullptr) lse[((long long)b * Hq + h) * q_len + i] = m + logf(l);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, preprocess: delta[b, h, t] = sum_d dout[b,t,h,d] * out[b,t,h,d] (fp32).
// Launch: grid ceil(B * T * Hq / 4), block 128 (one warp per (b, t, h) row, rows in memory order;
// lanes stride over d, then an xor-shuffle sum), no shared memory.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void preprocess_body(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta,
                                int B, int seq_len, int Hq, int D)
{
    const int warp = (int)(threadIdx.x >> 5), lane = (int)(threadIdx.x & 31);
    const long long n = (long long)blockIdx.x * (long long)(blockDim.x >> 5) + warp;
    const long long rows = (long long)B * seq_len * Hq;
    if (n >= rows) return;  // uniform over the warp
    const T* a = dout + n * D;
    const T* o = out + n * D;
    float acc = 0.0f;
    for (int d = lane; d < D; d += 32) acc += to_f32(a[d]) * to_f32(o[d]);
ATTN_UNROLL
    for (int off = 16; off > 0; off >>= 1)
        acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0)
    {
        const int h = (int)(n % Hq);
        const long long bt = n / Hq;
        const int t = (int)(bt % seq_len), b = (int)(bt / seq_len);
        delta[((long long)b * Hq + h) * seq_len + t] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dk and dv (overwritten). Launch: grid (ceil(T / 16), Hkv, B), block 128, dynamic shared
// ((4 * 16) * (D + 1) + 2 * 16 * 17 + 3 * 16) * 4 bytes. Block (x, g, b) owns keys k0 = 16x ..
// k0 + 15 of kv head g: K and V stay in shared memory; it loops over the query heads of the group
// in order and, for each, over the query tiles (16 rows) from the one holding row k0 to the last,
// in order (with positions: up to the last tile whose first row's document starts at or before the
// block's last key). Thread (jr = tid / 8, c = tid % 8) computes P and dS for key k0 + jr and query rows
// c, c + 8 of the tile (into shared memory), then accumulates dv[d] += P dout, dk[d] += dS q for
// its key and columns d = c + 8k in registers. dk is scaled once at the end.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void backward_dkdv_body(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                                   const T* __restrict__ v, const float* __restrict__ lse,
                                   const float* __restrict__ delta, const int* __restrict__ pos,
                                   T* __restrict__ dk, T* __restrict__ dv, int seq_len, int Hq, int Hkv, int D,
                                   float scale)
{
    constexpr int BR = kBwdRows, BC = kBwdKeys, LANES = kBwdLanes;
    constexpr int NS = BR / LANES, NO = kMaxD / LANES, LDP = BR + 1;
    EMU_DYNAMIC_SHARED(float, smem);
    const int ld = D + 1;
    float* sK = smem;              // [BC][ld]
    float* sV = sK + BC * ld;      // [BC][ld]
    float* sQ = sV + BC * ld;      // [BR][ld]
    float* sdO = sQ + BR * ld;     // [BR][ld]
    float* sP = sdO + BR * ld;     // [BC][LDP]
    float* sdS = sP + BC * LDP;    // [BC][LDP]
    float* sL = sdS + BC * LDP;    // [BR] lse of the tile's rows
    float* sD = sL + BR;           // [BR] delta of the tile's rows
    int* sS = reinterpret_cast<int*>(sD + BR);  // [BR] document start of the tile's rows

    const int k0 = (int)blockIdx.x * BC;
    const int g = (int)blockIdx.y, b = (int)blockIdx.z;
    const int group = Hq / Hkv;
    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const long long kv_off = (long long)b * seq_len * kv_stride + (long long)g * D;

    const int tid = (int)threadIdx.x, jr = tid / LANES, c = tid % LANES;
    const int j = k0 + jr;
    const int* pos_b = pos == nullptr ? nullptr : pos + (long long)b * seq_len;
    const int k_last = min(k0 + BC, seq_len) - 1;  // the block's last key

    load_tile(sK, ld, k + kv_off, kv_stride, k0, BC, seq_len, D);
    load_tile(sV, ld, v + kv_off, kv_stride, k0, BC, seq_len, D);

    float dk_acc[NO], dv_acc[NO];
ATTN_UNROLL
    for (int kk = 0; kk < NO; ++kk) { dk_acc[kk] = 0.0f; dv_acc[kk] = 0.0f; }

    const int nqt = (seq_len + BR - 1) / BR;
    const int qt_first = k0 / BR;
    for (int hh = 0; hh < group; ++hh)
    {
        const int h = g * group + hh;
        const long long q_off = (long long)b * seq_len * q_stride + (long long)h * D;
        const long long row_off = ((long long)b * Hq + h) * seq_len;
        for (int qt = qt_first; qt < nqt; ++qt)
        {
            const int q0 = qt * BR;
            // This tile's rows (and every later row) start their documents after the block's last key.
            if (pos_b != nullptr && q0 - pos_b[q0] > k_last) break;  // uniform over the block
            __syncthreads();  // the previous tile's reads of sQ, sdO, sP, sdS, sL, sD, sS are done
            load_tile(sQ, ld, q + q_off, q_stride, q0, BR, seq_len, D);
            load_tile(sdO, ld, dout + q_off, q_stride, q0, BR, seq_len, D);
            for (int e = tid; e < BR; e += (int)blockDim.x)
            {
                const int i = q0 + e;
                sL[e] = i < seq_len ? lse[row_off + i] : 0.0f;
                sD[e] = i < seq_len ? delta[row_off + i] : 0.0f;
                sS[e] = pos_b != nullptr && i < seq_len ? i - pos_b[i] : 0;
            }
            __syncthreads();

ATTN_UNROLL
            for (int n = 0; n < NS; ++n)
            {
                const int ii = c + LANES * n, i = q0 + ii;
                float p = 0.0f, ds = 0.0f;
                if (j <= i && i < seq_len && j >= sS[ii])
                {
                    const float s = dot_rows(sK + jr * ld, sQ + ii * ld, D) * scale;
                    p = expf(s - sL[ii]);
                    const float dp = dot_rows(sV + jr * ld, sdO + ii * ld, D);
                    ds = p * (dp - sD[ii]);
                }
                sP[jr * LDP + ii] = p;
                sdS[jr * LDP + ii] = ds;
            }
            __syncthreads();

            const float* pr = sP + jr * LDP;
            const float* dsr = sdS + jr * LDP;
ATTN_UNROLL
            for (int kk = 0; kk < NO; ++kk)
            {
                const int d = c + LANES * kk;
                if (d < D)
                {
                    float av = dv_acc[kk], ak = dk_acc[kk];
                    for (int ii = 0; ii < BR; ++ii)
                    {
                        av += pr[ii] * sdO[ii * ld + d];
                        ak += dsr[ii] * sQ[ii * ld + d];
                    }
                    dv_acc[kk] = av;
                    dk_acc[kk] = ak;
                }
            }
        }
    }

    if (j < seq_len)
    {
        const long long e = kv_off + (long long)j * kv_stride;
ATTN_UNROLL
        for (int kk = 0; kk < NO; ++kk)
        {
            const int d = c + LANES * kk;
            if (d < D)
            {
                dk[e + d] = from_f32<T>(scale * dk_acc[kk]);
                dv[e + d] = from_f32<T>(dv_acc[kk]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dq (overwritten). Launch: grid (ceil(T / 16), Hq, B), block 128, dynamic shared
// ((4 * 16) * (D + 1) + 16 * 17) * 4 bytes. Block x handles query tile nqt - 1 - x (longest rows
// first): Q and dout of its 16 rows stay in shared memory; it loops over the key tiles (16 keys) up
// to the diagonal in order (from the tile holding the first row's document start). Thread (ir = tid / 8, c = tid % 8) computes dS for query q0 + ir and keys
// c, c + 8 of the tile (into shared memory), then dq[d] += dS k for columns d = c + 8k in registers;
// scaled once at the end.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void backward_dq_body(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const float* __restrict__ lse,
                                 const float* __restrict__ delta, const int* __restrict__ pos, T* __restrict__ dq,
                                 int seq_len, int Hq, int Hkv, int D, float scale)
{
    constexpr int BR = kBwdRows, BC = kBwdKeys, LANES = kBwdLanes;
    constexpr int NS = BC / LANES, NO = kMaxD / LANES, LDS = BC + 1;
    EMU_DYNAMIC_SHARED(float, smem);
    const int ld = D + 1;
    float* sQ = smem;              // [BR][ld]
    float* sdO = sQ + BR * ld;     // [BR][ld]
    float* sK = sdO + BR * ld;     // [BC][ld]
    float* sV = sK + BC * ld;      // [BC][ld]
    float* sdS = sV + BC * ld;     // [BR][LDS]

    const int nqt = (seq_len + BR - 1) / BR;
    const int q0 = (nqt - 1 - (int)blockIdx.x) * BR;
    const int h = (int)blockIdx.y, b = (int)blockIdx.z;
    const int g = h / (Hq / Hkv);
    const long long q_stride = (long long)Hq * D, kv_stride = (long long)Hkv * D;
    const long long q_off = (long long)b * seq_len * q_stride + (long long)h * D;
    const long long kv_off = (long long)b * seq_len * kv_stride + (long long)g * D;

    const int tid = (int)threadIdx.x, ir = tid / LANES, c = tid % LANES;
    const int i = q0 + ir;
    const bool row_ok = i < seq_len;
    const long long row = ((long long)b * Hq + h) * seq_len + i;
    const float lse_i = row_ok ? lse[row] : 0.0f;
    const float delta_i = row_ok ? delta[row] : 0.0f;
    const int* pos_b = pos == nullptr ? nullptr : pos + (long long)b * seq_len;
    const int start = pos_b != nullptr && row_ok ? i - pos_b[i] : 0;
    const int tile_start = pos_b != nullptr ? q0 - pos_b[q0] : 0;

    load_tile(sQ, ld, q + q_off, q_stride, q0, BR, seq_len, D);
    load_tile(sdO, ld, dout + q_off, q_stride, q0, BR, seq_len, D);

    float dq_acc[NO];
ATTN_UNROLL
    for (int kk = 0; kk < NO; ++kk) dq_acc[kk] = 0.0f;

    const int last_row = min(q0 + BR, seq_len) - 1;
    const int nkt = last_row / BC + 1;
    for (int kt = tile_start / BC; kt < nkt; ++kt)
    {
        const int k0 = kt * BC;
        __syncthreads();  // the previous tile's reads of sK, sdS are done
        load_tile(sK, ld, k + kv_off, kv_stride, k0, BC, seq_len, D);
        load_tile(sV, ld, v + kv_off, kv_stride, k0, BC, seq_len, D);
        __syncthreads();

ATTN_UNROLL
        for (int n = 0; n < NS; ++n)
        {
            const int jj = c + LANES * n, j = k0 + jj;
            float ds = 0.0f;
            if (row_ok && j <= i && j >= start)
            {
                const float s = dot_rows(sQ + ir * ld, sK + jj * ld, D) * scale;
                const float p = expf(s - lse_i);
                const float dp = dot_rows(sdO + ir * ld, sV + jj * ld, D);
                ds = p * (dp - delta_i);
            }
            sdS[ir * LDS + jj] = ds;
        }
        __syncthreads();

        const float* dsr = sdS + ir * LDS;
ATTN_UNROLL
        for (int kk = 0; kk < NO; ++kk)
        {
            const int d = c + LANES * kk;
            if (d < D)
            {
                float acc = dq_acc[kk];
                for (int jj = 0; jj < BC; ++jj) acc += dsr[jj] * sK[jj * ld + d];
                dq_acc[kk] = acc;
            }
        }
    }

    if (row_ok)
    {
        T* dqrow = dq + q_off + (long long)i * q_stride;
ATTN_UNROLL
        for (int kk = 0; kk < NO; ++kk)
        {
            const int d = c + LANES * kk;
            if (d < D) dqrow[d] = from_f32<T>(scale * dq_acc[kk]);
        }
    }
}

}  // namespace attnk

// The parameters of the kernels below, passed by value as their one parameter (as AttnTcParams for the
// tensor-core kernels). Mirrored field for field by C# NativePeft.Ops.AttnParams ([StructLayout(Sequential)]);
// KernelSourceTests compares its size and field offsets with np_layout_AttnParams (below) and the static_assert
// holds nvcc to the same size. The tensor pointers are void: the kernel's dtype (float or __nv_bfloat16, its
// name's suffix) is the element type of q, k, v, out, dout, dq, dk, dv. A kernel reads the fields it needs:
//   forward:             q, k, v, out, lse (null: not written, inference), positions (null: plain causal;
//                        int32 [B, T]: packed sequences), B, Tq = Tk = T, Hq, Hkv, D, scale
//   forward_cached:      q, k, v, out, lse (null: not written), B, Tq, Tk, Hq, Hkv, D, scale (positions unused)
//   backward_preprocess: dout, out, delta (written), B, Tq = T, Hq, D
//   backward_dkdv / dq:  dout, q, k, v, lse, delta, positions (null or int32 [B, T]), dk, dv or dq, B, Tq = Tk = T,
//                        Hq, Hkv, D, scale
struct AttnParams
{
    const void* q;          // [B, Tq, Hq, D]
    const void* k;          // [B, Tk, Hkv, D]
    const void* v;          // [B, Tk, Hkv, D]
    void* out;              // forward output [B, Tq, Hq, D] (read by the backward preprocess)
    float* lse;             // [B, Hq, Tq] fp32
    const int* positions;   // int32 [B, T] positions inside packed documents, or null
    const void* dout;       // backward: dL/d out [B, T, Hq, D]
    float* delta;           // backward: rowsum(dout * out) [B, Hq, T] fp32, written by the preprocess
    void* dq;               // backward outputs (overwritten)
    void* dk;
    void* dv;
    int B, Tq, Tk, Hq, Hkv, D;
    float scale;            // 1 / sqrt(D)
};
static_assert(sizeof(AttnParams) == 120,
              "AttnParams: 11 pointers, 7 four-byte fields and 4 bytes of tail padding, as the C# mirror");

NP_PARAMS_LAYOUT(AttnParams, offsetof(AttnParams, q), offsetof(AttnParams, k), offsetof(AttnParams, v),
                 offsetof(AttnParams, out), offsetof(AttnParams, lse), offsetof(AttnParams, positions),
                 offsetof(AttnParams, dout), offsetof(AttnParams, delta), offsetof(AttnParams, dq), offsetof(AttnParams, dk),
                 offsetof(AttnParams, dv), offsetof(AttnParams, B), offsetof(AttnParams, Tq), offsetof(AttnParams, Tk),
                 offsetof(AttnParams, Hq), offsetof(AttnParams, Hkv), offsetof(AttnParams, D), offsetof(AttnParams, scale))

// attention_forward_{f32,bf16}(AttnParams: q, k, v, out, lse, positions, B, Tq = Tk = T, Hq, Hkv, D, scale)
// Launch: grid (ceil(T/32), Hq, B), block 128, dynamic shared (64 * (D + 1) + 32 * 17) * 4 bytes.
#define ATTN_FWD(SUFFIX, T)                                                                                            \
    NP_KERNEL_BOUNDED(attention_forward_##SUFFIX, ATTN_THREADS, (const __grid_constant__ AttnParams p))                \
    {                                                                                                                  \
        if ((int)blockIdx.z < p.B)                                                                                     \
            attnk::forward_body<T>(static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v), \
                                   static_cast<T*>(p.out), p.lse, p.positions, p.Tq, p.Tq, p.Hq, p.Hkv, p.D, p.scale); \
    }
ATTN_FWD(f32, float)
ATTN_FWD(bf16, __nv_bfloat16)

// attention_forward_cached_{f32,bf16}(AttnParams: q, k, v, out, lse (null: not written), B, Tq, Tk, Hq, Hkv, D, scale):
// Tq new queries at absolute positions [Tk - Tq, Tk) attend causally to Tk keys (a KV cache; 1 <= Tq <= Tk).
// q, out [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; lse [B, Hq, Tq]. One sequence per batch entry (no packing:
// decoding continues one document; positions is not read).
// Launch: grid (ceil(Tq/32), Hq, B), block 128, dynamic shared (64 * (D + 1) + 32 * 17) * 4 bytes.
#define ATTN_FWD_CACHED(SUFFIX, T)                                                                                     \
    NP_KERNEL_BOUNDED(attention_forward_cached_##SUFFIX, ATTN_THREADS, (const __grid_constant__ AttnParams p))         \
    {                                                                                                                  \
        if ((int)blockIdx.z < p.B)                                                                                     \
            attnk::forward_body<T>(static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v), \
                                   static_cast<T*>(p.out), p.lse, nullptr, p.Tq, p.Tk, p.Hq, p.Hkv, p.D, p.scale);     \
    }
ATTN_FWD_CACHED(f32, float)
ATTN_FWD_CACHED(bf16, __nv_bfloat16)

// attention_backward_preprocess_{f32,bf16}(AttnParams: dout, out, delta, B, Tq = T, Hq, D)
// Launch: grid ceil(B*T*Hq / 4), block 128, shared 0.
#define ATTN_BWD_PRE(SUFFIX, T)                                                                                        \
    NP_KERNEL_BOUNDED(attention_backward_preprocess_##SUFFIX, ATTN_THREADS, (const AttnParams p))                      \
    {                                                                                                                 \
        attnk::preprocess_body<T>(static_cast<const T*>(p.dout), static_cast<const T*>(p.out), p.delta, p.B, p.Tq,   \
                                  p.Hq, p.D);                                                                         \
    }
ATTN_BWD_PRE(f32, float)
ATTN_BWD_PRE(bf16, __nv_bfloat16)

// attention_backward_dkdv_{f32,bf16}(AttnParams: dout, q, k, v, lse, delta, positions (null or int32 [B, T]), dk, dv,
//   B, Tq = Tk = T, Hq, Hkv, D, scale)
// Launch: grid (ceil(T/16), Hkv, B), block 128, dynamic shared (64 * (D + 1) + 2 * 16 * 17 + 48) * 4 bytes.
#define ATTN_BWD_DKDV(SUFFIX, T)                                                                                       \
    NP_KERNEL_BOUNDED(attention_backward_dkdv_##SUFFIX, ATTN_THREADS, (const AttnParams p))                            \
    {                                                                                                                  \
        if ((int)blockIdx.z < p.B)                                                                                     \
            attnk::backward_dkdv_body<T>(static_cast<const T*>(p.dout), static_cast<const T*>(p.q),                    \
                                         static_cast<const T*>(p.k), static_cast<const T*>(p.v), p.lse, p.delta,       \
                                         p.positions, static_cast<T*>(p.dk), static_cast<T*>(p.dv), p.Tq, p.Hq, p.Hkv, \
                                         p.D, p.scale);                                                                \
    }
ATTN_BWD_DKDV(f32, float)
ATTN_BWD_DKDV(bf16, __nv_bfloat16)

// attention_backward_dq_{f32,bf16}(AttnParams: dout, q, k, v, lse, delta, positions (null or int32 [B, T]), dq, B,
//   Tq = Tk = T, Hq, Hkv, D, scale)
// Launch: grid (ceil(T/16), Hq, B), block 128, dynamic shared (64 * (D + 1) + 16 * 17) * 4 bytes.
#define ATTN_BWD_DQ(SUFFIX, T)                                                                                         \
    NP_KERNEL_BOUNDED(attention_backward_dq_##SUFFIX, ATTN_THREADS, (const AttnParams p))                              \
    {                                                                                                                  \
        if ((int)blockIdx.z < p.B)                                                                                     \
            attnk::backward_dq_body<T>(static_cast<const T*>(p.dout), static_cast<const T*>(p.q),                      \
                                       static_cast<const T*>(p.k), static_cast<const T*>(p.v), p.lse, p.delta,         \
                                       p.positions, static_cast<T*>(p.dq), p.Tq, p.Hq, p.Hkv, p.D, p.scale);           \
    }
ATTN_BWD_DQ(f32, float)
ATTN_BWD_DQ(bf16, __nv_bfloat16)
