// attention_decode.cu: split-KV attention for decoding (flash-decoding) on tensor cores, bf16, head
// dims 64 and 128: a few new queries against a long KV cache. Semantics of attention_forward_cached_bf16
// (kernels/attention.cu): q, out [B, Tq, Hq, D], k, v [B, Tk, Hkv, D] bf16; query i at absolute position
// Tk - Tq + i sees keys j <= Tk - Tq + i; query head h reads kv head h / G (G = Hq / Hkv).
//
// With Tq = 1 a grid of query tiles has only B * Hq rows of work; decode is bound by reading K and V.
// So the keys are split: CTA (s, hk, b) takes keys [s * chunk, (s + 1) * chunk) of kv head hk and ALL
// G * Tq query rows of that kv head as the M = 16 rows of one mma tile (row r = head hh * Tq + query
// qi, hh = r / Tq; G * Tq <= 16; padding rows have zero Q and are never stored). K and V are read from
// global memory exactly once in all (cp.async, double-buffered 64-key tiles). Inside the CTA each of the
// 4 warps takes 16 keys of every tile (its own online softmax over its keys: S = Q K_w^T, P V_w on
// mma.sync), and the 4 partial results are merged in shared memory at the end. Each CTA writes its
// split's normalised O (fp32) and log-sum-exp; attention_decode_combine merges the splits:
// lse = M + log sum_s exp(lse_s - M), out = sum_s exp(lse_s - lse) O_s. A split in which a row sees no
// key gives lse_s = -inf and weight 0.
//
// C ABI: both kernels take one AttnDecodeParams (below) by value; the decode reads q, k, v, o_part,
// lse_part, B, Tq, Tk, Hq, Hkv, chunk, scale, the combine o_part, lse_part, out, lse, B, Tq, Hq, Hkv, splits, D.
//   attention_decode_tc_d{64,128}_bf16(p):
//     grid (ceil(Tk / chunk), Hkv, B), block 128, dynamic shared (16 + 4 * 64) * D * 2 bytes (>= the
//     4 * 16 * (D + 2) * 4 bytes of the merge); chunk a multiple of 64; o_part [B, Hkv, splits, 16, D]
//     fp32, lse_part [B, Hkv, splits, 16] fp32 (natural log).
//   attention_decode_combine_bf16(p):
//     grid (G * Tq, Hkv, B), block 128; lse [B, Hq, Tq] fp32 or null.
#include "attention_tc.cuh"

// The parameters of attention_decode_tc_d{64,128}_bf16 and attention_decode_combine_bf16, passed by value as their one
// parameter. Mirrored field for field by C# NativePeft.Ops.AttnDecodeParams ([StructLayout(Sequential)]);
// KernelSourceTests compares its size and field offsets with np_layout_AttnDecodeParams (end of this file) and the
// static_assert holds nvcc to the same size.
struct AttnDecodeParams
{
    const __nv_bfloat16* q;  // [B, Tq, Hq, D]
    const __nv_bfloat16* k;  // [B, Tk, Hkv, D]
    const __nv_bfloat16* v;  // [B, Tk, Hkv, D]
    float* o_part;           // [B, Hkv, splits, 16, D] fp32: written by the decode, read by the combine
    float* lse_part;         // [B, Hkv, splits, 16] fp32
    __nv_bfloat16* out;      // combine: [B, Tq, Hq, D]
    float* lse;              // combine: [B, Hq, Tq] fp32, or null (not written)
    int B, Tq, Tk, Hq, Hkv;
    int chunk;               // decode: keys per split, a multiple of 64
    int splits;              // combine: the decode's grid.x
    int D;                   // combine: head dim
    float scale;             // decode: 1 / sqrt(D)
};
static_assert(sizeof(AttnDecodeParams) == 96,
              "AttnDecodeParams: 7 pointers, 9 four-byte fields and 4 bytes of tail padding, as the C# mirror");

namespace attndec {

using namespace attntc;

constexpr int kRows = 16;
constexpr int kKeys = 64;

template <int D>
__device__ void decode_body(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                            const __nv_bfloat16* __restrict__ v, float* __restrict__ o_part,
                            float* __restrict__ lse_part, int Tq, int Tk, int Hq, int Hkv, int chunk, float scale)
{
    constexpr int KC = D / 16, DT = D / 8;
    constexpr int kTile = kKeys * D * 2;
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    unsigned char* sQ = smem;                 // [16][D]
    unsigned char* sK = sQ + kRows * D * 2;   // [2][64][D]
    unsigned char* sV = sK + 2 * kTile;       // [2][64][D]

    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int split = (int)blockIdx.x, hk = (int)blockIdx.y, b = (int)blockIdx.z;
    const int splits = (int)gridDim.x;
    const int G = Hq / Hkv, rows = G * Tq;
    const long long kv_stride = (long long)Hkv * D;
    const __nv_bfloat16* k_head = k + (long long)b * Tk * kv_stride + (long long)hk * D;
    const __nv_bfloat16* v_head = v + (long long)b * Tk * kv_stride + (long long)hk * D;
    const int key_begin = split * chunk, key_end = min(Tk, key_begin + chunk);
    const int ntiles = (key_end - key_begin + kKeys - 1) / kKeys;

    // Q rows: r = hh * Tq + qi -> q[b, qi, hk * G + hh, :]; rows >= G * Tq zero-filled.
    for (int e = (int)threadIdx.x; e < kRows * (D / 8); e += kThreads)
    {
        const int r = e / (D / 8), c = e % (D / 8);
        const bool ok = r < rows;
        const int hh = ok ? r / Tq : 0, qi = ok ? r % Tq : 0;
        const __nv_bfloat16* src = q + (((long long)b * Tq + qi) * Hq + (long long)hk * G + hh) * D + c * 8;
        npmma::cp_async_16(sQ + swz<D>(r, c), src, ok ? 16 : 0);
    }
    load_tile_async<D, kKeys>(sK, k_head, kv_stride, key_begin, key_end);
    load_tile_async<D, kKeys>(sV, v_head, kv_stride, key_begin, key_end);
    npmma::cp_async_commit();

    float o[DT][4];
NP_UNROLL
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};
    const float sl2 = scale * 1.4426950408889634f;
    // Last key visible to rows g and g + 8 (padding rows: none).
    int last_vis[2];
NP_UNROLL
    for (int r = 0; r < 2; ++r)
    {
        const int row = g + 8 * r;
        last_vis[r] = row < rows ? Tk - Tq + row % Tq : -1;
    }

    uint32_t qf[KC][4];
    for (int j = 0; j < ntiles; ++j)
    {
        const int buf = j & 1;
        if (j + 1 < ntiles)
        {
            load_tile_async<D, kKeys>(sK + (buf ^ 1) * kTile, k_head, kv_stride, key_begin + (j + 1) * kKeys, key_end);
            load_tile_async<D, kKeys>(sV + (buf ^ 1) * kTile, v_head, kv_stride, key_begin + (j + 1) * kKeys, key_end);
        }
        npmma::cp_async_commit();
        npmma::cp_async_wait<1>();
        __syncthreads();  // tile j (and Q) visible
        if (j == 0)
        {
NP_UNROLL
            for (int kc = 0; kc < KC; ++kc) load_a<D>(qf[kc], sQ, 0, kc * 16, lane);
        }
        const unsigned char* tK = sK + buf * kTile;
        const unsigned char* tV = sV + buf * kTile;
        const int k0 = key_begin + j * kKeys + warp * 16;  // this warp's 16 keys

        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
NP_UNROLL
        for (int kc = 0; kc < KC; ++kc)
        {
            uint32_t kb[4];
            load_b_t2<D>(kb, tK, warp * 16, kc * 16, lane);
            mma(s[0], qf[kc], kb[0], kb[1]);
            mma(s[1], qf[kc], kb[2], kb[3]);
        }
NP_UNROLL
        for (int n = 0; n < 2; ++n)
NP_UNROLL
            for (int e = 0; e < 4; ++e)
            {
                const int key = k0 + n * 8 + 2 * t + (e & 1);
                if (key >= key_end || key > last_vis[e >> 1]) s[n][e] = -INFINITY;
            }
        float alpha[2];
        online_softmax<2>(s, m_row, l_row, alpha, sl2);
        uint32_t pa[4];
        acc_to_a(pa, s[0], s[1]);
NP_UNROLL
        for (int i = 0; i < DT; i += 2)
        {
            o[i][0] *= alpha[0]; o[i][1] *= alpha[0]; o[i][2] *= alpha[1]; o[i][3] *= alpha[1];
            o[i + 1][0] *= alpha[0]; o[i + 1][1] *= alpha[0]; o[i + 1][2] *= alpha[1]; o[i + 1][3] *= alpha[1];
            uint32_t vb[4];
            load_b_n2<D>(vb, tV, warp * 16, i * 8, lane);
            mma(o[i], pa, vb[0], vb[1]);
            mma(o[i + 1], pa, vb[2], vb[3]);
        }
        __syncthreads();  // every warp is done with buffer buf before tile j + 2 is loaded into it
    }
    npmma::cp_async_wait<0>();
    __syncthreads();  // every thread's copies have landed before the merge's writes alias the tiles

    // Merge the 4 warps: each writes m, l (reduced over its 4 lanes) and O for the 16 rows.
    float* sM = reinterpret_cast<float*>(smem);  // [4][16] (K/V/Q are no longer read: last barrier above)
    float* sL = sM + 4 * kRows;                  // [4][16]
    float* sO = sL + 4 * kRows;                  // [4][16][D]
NP_UNROLL
    for (int r = 0; r < 2; ++r)
    {
        float l = l_row[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = g + 8 * r;
        if (t == 0)
        {
            sM[warp * kRows + row] = m_row[r];
            sL[warp * kRows + row] = l;
        }
        float* orow = sO + ((long long)warp * kRows + row) * D;
NP_UNROLL
        for (int i = 0; i < DT; ++i)
        {
            orow[i * 8 + 2 * t] = o[i][2 * r];
            orow[i * 8 + 2 * t + 1] = o[i][2 * r + 1];
        }
    }
    __syncthreads();
    const long long part = (((long long)b * Hkv + hk) * splits + split) * kRows;
    for (int e = (int)threadIdx.x; e < rows * D; e += kThreads)
    {
        const int row = e / D, d = e % D;
        float mx = -INFINITY;
        for (int w = 0; w < 4; ++w) mx = fmaxf(mx, sM[w * kRows + row]);
        float l = 0.0f, acc = 0.0f;
        if (mx != -INFINITY)
        {
            for (int w = 0; w < 4; ++w)
            {
                const float mw = sM[w * kRows + row];
                const float f = mw == -INFINITY ? 0.0f : npmma::fast_exp2((mw - mx) * sl2);
                l += f * sL[w * kRows + row];
                acc += f * sO[((long long)w * kRows + row) * D + d];
            }
        }
        o_part[(part + row) * D + d] = l > 0.0f ? acc / l : 0.0f;
        if (d == 0) lse_part[part + row] = l > 0.0f ? mx * scale + logf(l) : -INFINITY;
    }
}

}  // namespace attndec

#define ATTN_DECODE(DIM)                                                                                         \
    NP_KERNEL_BOUNDED(attention_decode_tc_d##DIM##_bf16, attntc::kThreads, (const __grid_constant__ AttnDecodeParams p)) \
    {                                                                                                         \
        if ((int)blockIdx.z < p.B)                                                                            \
            attndec::decode_body<DIM>(p.q, p.k, p.v, p.o_part, p.lse_part, p.Tq, p.Tk, p.Hq, p.Hkv, p.chunk,  \
                                      p.scale);                                                               \
    }

ATTN_DECODE(64)
ATTN_DECODE(128)

// Merge of the splits for one (row, kv head, batch) per CTA; threads stride over d.
NP_KERNEL_BOUNDED(attention_decode_combine_bf16, attntc::kThreads, (const AttnDecodeParams p))
{
    const float* o_part = p.o_part;
    const float* lse_part = p.lse_part;
    float* lse = p.lse;
    const int B = p.B, Tq = p.Tq, Hq = p.Hq, Hkv = p.Hkv, splits = p.splits, D = p.D;
    const int row = (int)blockIdx.x, hk = (int)blockIdx.y, b = (int)blockIdx.z;
    if (b >= B) return;
    const int G = Hq / Hkv, hh = row / Tq, qi = row % Tq, h = hk * G + hh;
    const long long base = ((long long)b * Hkv + hk) * splits * attndec::kRows;
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_part[base + (long long)s * attndec::kRows + row]);
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s)
    {
        const float ls = lse_part[base + (long long)s * attndec::kRows + row];
        sum += ls == -INFINITY ? 0.0f : expf(ls - mx);
    }
    const float total = mx + logf(sum);
    __nv_bfloat16* orow = p.out + (((long long)b * Tq + qi) * Hq + h) * D;
    for (int d = (int)threadIdx.x; d < D; d += (int)blockDim.x)
    {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s)
        {
            const long long r = base + (long long)s * attndec::kRows + row;
            const float ls = lse_part[r];
            if (ls != -INFINITY) acc += expf(ls - total) * o_part[r * D + d];
        }
        orow[d] = __float2bfloat16(acc);
    }
    if (threadIdx.x == 0 && lse != nullptr) lse[((long long)b * Hq + h) * Tq + qi] = total;
}

NP_PARAMS_LAYOUT(AttnDecodeParams, offsetof(AttnDecodeParams, q), offsetof(AttnDecodeParams, k), offsetof(AttnDecodeParams, v),
                 offsetof(AttnDecodeParams, o_part), offsetof(AttnDecodeParams, lse_part), offsetof(AttnDecodeParams, out),
                 offsetof(AttnDecodeParams, lse), offsetof(AttnDecodeParams, B), offsetof(AttnDecodeParams, Tq),
                 offsetof(AttnDecodeParams, Tk), offsetof(AttnDecodeParams, Hq), offsetof(AttnDecodeParams, Hkv),
                 offsetof(AttnDecodeParams, chunk), offsetof(AttnDecodeParams, splits), offsetof(AttnDecodeParams, D),
                 offsetof(AttnDecodeParams, scale))
