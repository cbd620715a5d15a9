// lora.cu: the rank-r paths of LoRA on tensor cores, for G <= 3 adapters that share one input x (q, k, v share the
// normed hidden; gate and up share theirs). Launcher: src/NativePeft/Ops/GpuLoraOps.cs; design and numerics:
// docs/lora-kernels.md.
//
//   lora_down_tc_bf16        xa_g = dropout_g(x) A_g^T                      for g < count (forward, and the backward's
//                            x [N, in], A_g [r_g, in], xa_g [N, r_g] bf16     recompute of xa); with a split k (ws not
//                                                                           null) fp32 partials per k split into ws
//   lora_down_reduce_bf16    xa_g = bf16(sum over k splits of ws[split])    fixed split order: deterministic
//   lora_bwd_input_tc_bf16   dx += sum_g dropout_g'(dxa_g A_g)               dx [N, in] bf16, read and written once
//                            ws[split] = dxa_g^T dropout_g(x)                 fp32 partial dA_g of the split's rows
//   lora_da_reduce_f32       dA_g += sum over splits of ws[split]            fixed split order: deterministic
//
// Dropout: adapter g keeps element e = row * in + col of x (its index in the [N, in] tensor, as the Dropout op numbers
// it) iff word (e & 3) of Philox-4x32-10(counter (e >> 2), key seed_g) >= thr_g -- the dropout_mask kernel of
// elementwise.cu, bit for bit, so no mask is stored -- and a kept element is bf16_rn(x * scale_g), scale_g = 1/(1-p)
// in fp32: exactly the bf16 value apply_mask_scale_bf16 writes. thr_g = 0 (p = 0) skips the generator.
// The backward applies the same mask to dxa_g A_g (d dropout(x)/dx = mask * scale).
//
// Tiles: 64 rows of x per CTA (4 warps x 16 rows), 64 input features per k tile (one 128-byte swizzled row,
// attention_tc.cuh); adapter g's rows of A (and columns of dxa) are padded to a multiple of 16 with zeros, and the
// padded adapters are stacked: group j (16 rank rows) belongs to adapter 0 for j < gr0, 1 for j < gr0 + gr1, else 2.
// Requirements (checked by the launcher): in % 8 == 0 (16-byte cp.async chunks; also makes every pair / quad of x
// elements a thread handles share one Philox block), x, A_g, dx 16-byte aligned, sum of padded ranks <= 128 (forward)
// / 64 (backward).
//
// C ABI (grid, block 128, dynamic shared); the two tensor-core kernels take one LoraTcParams by value (below):
//   lora_down_tc_bf16(p: x, N, in, split = split_tiles, count, a0, a1, a2, data0..2 = xa0..2, r0, r1, r2, thr0, thr1,
//                     thr2, seed0, seed1, seed2, scale0, scale1, scale2, ws)
//                     grid (ceil(N/64), k splits of split_tiles 64-feature tiles each), shared 2 * (64 + R) * 64 * 2
//                     bytes (R = sum of padded ranks); ws null (one split: xa written directly) or fp32
//                     [splits][N][R] (the partials; then lora_down_reduce_bf16 writes xa)
//   lora_down_reduce_bf16(p: ws, dst0..2 = xa0..2, splits, n = N, R, count, r0..2)   grid-stride, block 256
//   lora_bwd_input_tc_bf16(p: x, dx, N, in, split = split_rows, count, a0..2, data0..2 = dxa0..2, r0..2, thr0..2,
//                     seed0..2, scale0..2, ws)
//                     grid (ceil(in/64), ceil(N/split_rows)), shared 5 * 8192 + 64 * 72 bytes; split_rows a multiple of 64;
//                     ws fp32 [splits][R][in]
//   lora_da_reduce_f32(p: ws, dst0..2 = da0..2, splits, R, in, count, r0..2)   grid-stride, block 256
// Unused adapter slots (g >= count) take null pointers and rank 0.
#include "attention_tc.cuh"

// The parameters of lora_down_tc_bf16 and lora_bwd_input_tc_bf16, by value (FlashAttention's Flash_fwd_params style).
// Mirrored field for field by C# NativePeft.Ops.LoraTcParams ([StructLayout(Sequential)]); KernelSourceTests compares
// its size and field offsets with np_layout_LoraTcParams (below) and the static_assert holds nvcc to the same size.
// Pointers first, then the 8-byte seeds, then the 4-byte fields: no padding but 4 bytes at the end.
struct LoraTcParams
{
    const __nv_bfloat16* x;       // [N, in]
    __nv_bfloat16* dx;            // backward: [N, in], read and written; forward: null
    const __nv_bfloat16* a0;      // A_g [r_g, in]; null for g >= count
    const __nv_bfloat16* a1;
    const __nv_bfloat16* a2;
    __nv_bfloat16* data0;         // forward: xa_g [N, r_g] (written); backward: dxa_g [N, r_g] (read)
    __nv_bfloat16* data1;
    __nv_bfloat16* data2;
    float* ws;                    // fp32 partials (see the C ABI above) or null
    unsigned long long seed0, seed1, seed2;  // Philox keys of the dropout masks
    int n, in;
    int split;                    // forward: 64-feature tiles per split; backward: rows per split (a multiple of 64)
    int count;                    // adapters, 1..3
    int r0, r1, r2;               // ranks (0 for g >= count)
    unsigned int thr0, thr1, thr2;  // dropout thresholds (0: no dropout)
    float scale0, scale1, scale2;   // 1 / (1 - p) of kept elements
};
static_assert(sizeof(LoraTcParams) == 152, "LoraTcParams: 9 pointers, 3 seeds, 13 four-byte fields and 4 bytes of padding, as the C# mirror");

namespace lorak {

constexpr int kThreads = 128;
constexpr int kBM = 64;            // rows of x per CTA / per row tile
constexpr int kBK = 64;            // input features per tile
constexpr int kDownMaxRank = 128;  // sum of padded ranks per forward launch (64 fp32 accumulators per lane)
constexpr int kBwdMaxRank = 64;    // per backward launch (dA accumulators 32, dx 32, one adapter's dx term 32)
constexpr int kTileBytes = kBM * kBK * 2;
// Row stride of the backward's mask tile: 72 bytes (18 banks) puts the 8 rows a fragment read touches in 8 different
// bank pairs (a 64-byte stride: 4-way conflicts).
constexpr int kMaskStride = 72;

// Keeps a loop rolled under nvcc (the adapter loop: its body is large and its trip count is run-time).
#if defined(__CUDACC__)
#define NP_NO_UNROLL _Pragma("unroll 1")
#else
#define NP_NO_UNROLL
#endif

typedef __nv_bfloat16 bf16;

// Adapter g's value among three (g is warp-uniform; a select, never a local-memory array indexed at run time).
template <typename T>
__device__ __forceinline__ T sel(int g, T v0, T v1, T v2) { return g == 0 ? v0 : g == 1 ? v1 : v2; }

// The adapter of padded rank group j.
__device__ __forceinline__ int adapter_of(int j, int gr0, int gr1) { return j < gr0 ? 0 : j < gr0 + gr1 ? 1 : 2; }

// Philox-4x32-10 of counter (block lo, block hi, 0, 0) and key (seed lo, seed hi): the four words (common.cuh).
__device__ __forceinline__ void philox4(unsigned long long block, unsigned long long seed, unsigned int (&w)[4])
{
    nprng::philox4x32_10(block, seed, w);
}

__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// Dropout of the lane's A fragment in place. Register p holds the pair x[g + 8 (p & 1)][2t + 8 (p >> 1) + {0, 1}] of the
// warp's 16 x 16 block; e0 = the index in x of the lane's element (g, 2t), e8 = 8 rows of x. Lanes 2s and 2s + 1 hold the
// two halves of the same four Philox blocks (features 4s .. 4s + 3, and + 8, of rows g and g + 8), so each lane
// computes two of them -- the even lane the blocks of registers 0, 1, the odd lane those of 2, 3 -- and hands its
// partner the 4 keep bits it needs with one shuffle: 2 Philox calls per lane instead of 4. Warp-collective (call
// convergently).
__device__ __forceinline__ void drop_fragment(uint32_t (&a)[4], unsigned long long e0, unsigned long long e8, int lane,
                                              unsigned int thr, unsigned long long seed, float scale)
{
    const bool odd = (lane & 1) != 0;
    const unsigned long long block0 = (e0 >> 2) + (odd ? 2 : 0);  // +8 features = +2 blocks
    unsigned int w[4], v[4];
    philox4(block0, seed, w);
    philox4(block0 + (e8 >> 2), seed, v);
    const unsigned int kw = (unsigned int)(w[0] >= thr) | ((unsigned int)(w[1] >= thr) << 1) |
                            ((unsigned int)(w[2] >= thr) << 2) | ((unsigned int)(w[3] >= thr) << 3);
    const unsigned int kv = (unsigned int)(v[0] >= thr) | ((unsigned int)(v[1] >= thr) << 1) |
                            ((unsigned int)(v[2] >= thr) << 2) | ((unsigned int)(v[3] >= thr) << 3);
    // Words 0, 1 of a block are the even lane's pair, words 2, 3 the odd lane's.
    const unsigned int mine_w = odd ? kw >> 2 : kw & 3u, mine_v = odd ? kv >> 2 : kv & 3u;
    const unsigned int give = odd ? (kw & 3u) | ((kv & 3u) << 2) : (kw >> 2) | ((kv >> 2) << 2);
    const unsigned int got = __shfl_xor_sync(0xffffffffu, give, 1);
    // keep bits of registers 0..3 (2 per register: low, high element)
    const unsigned int bits = odd ? (got & 15u) | (mine_w << 4) | (mine_v << 6) : mine_w | (mine_v << 2) | ((got & 15u) << 4);
NP_UNROLL
    for (int p = 0; p < 4; ++p)
    {
        const unsigned int b = bits >> (2 * p);
        a[p] = npmma::pack_bf16((b & 1u) ? bf16_lo(a[p]) * scale : 0.0f, (b & 2u) ? bf16_hi(a[p]) * scale : 0.0f);
    }
}

// The A fragment of the TRANSPOSE of a row-major swizzled tile (A[m][k] = tile[k][m], e.g. dxa^T): k rows k0..k0+15,
// m columns m0..m0+15 (ldmatrix.x4.trans; matrices: (k0, m0) -> a0, (k0, m0+8) -> a1, (k0+8, m0) -> a2, (k0+8, m0+8)
// -> a3, the mma A layout).
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const unsigned char* tile, int k0, int m0, int lane)
{
    npmma::ldmatrix_x4_trans(a, attntc::tile_at<64>(tile, k0 + (lane & 7) + ((lane >> 4) << 3),
                                                    m0 + (((lane >> 3) & 1) << 3)));
}

// cp.async of rows row0 .. row0 + 63, features col0 .. col0 + 63 of a row-major [rows, in] bf16 matrix into a
// swizzled 64 x 64 tile; rows at or past `rows` and features at or past `in` are zero-filled.
__device__ __forceinline__ void load_x_tile(unsigned char* tile, const bf16* x, int rows, int in, int row0, int col0)
{
NP_UNROLL
    for (int i = 0; i < kBM * 8 / kThreads; ++i)
    {
        const int e = i * kThreads + (int)threadIdx.x, r = e >> 3, c = e & 7;
        const int row = row0 + r, col = col0 + c * 8;
        const bool ok = row < rows && col < in;
        npmma::cp_async_16(tile + attntc::swz<64>(r, c), x + (ok ? (long long)row * in + col : 0), ok ? 16 : 0);
    }
}

// cp.async of features col0 .. col0 + 63 of every adapter's A into the stacked, padded tile (groups * 16 rows).
__device__ __forceinline__ void load_a_tile(unsigned char* tile, const bf16* a0, const bf16* a1, const bf16* a2,
                                            int r0, int r1, int r2, int gr0, int gr1, int groups, int in, int col0)
{
    for (int e = (int)threadIdx.x; e < groups * 16 * 8; e += kThreads)
    {
        const int r = e >> 3, c = e & 7, g = adapter_of(r >> 4, gr0, gr1);
        const int j = r - 16 * sel(g, 0, gr0, gr0 + gr1), col = col0 + c * 8;
        const bf16* a = sel(g, a0, a1, a2);
        const bool ok = j < sel(g, r0, r1, r2) && col < in;
        npmma::cp_async_16(tile + attntc::swz<64>(r, c), a + (ok ? (long long)j * in + col : 0), ok ? 16 : 0);
    }
}

__device__ void down_body(const bf16* __restrict__ x, int n, int in, int split_tiles, int count, const bf16* a0,
                          const bf16* a1, const bf16* a2, bf16* o0, bf16* o1, bf16* o2, int r0, int r1, int r2,
                          unsigned int t0, unsigned int t1, unsigned int t2, unsigned long long s0,
                          unsigned long long s1, unsigned long long s2, float k0, float k1, float k2,
                          float* __restrict__ ws)
{
    constexpr int NG = kDownMaxRank / 16;
    const int gr0 = (r0 + 15) >> 4, gr1 = count > 1 ? (r1 + 15) >> 4 : 0, gr2 = count > 2 ? (r2 + 15) >> 4 : 0;
    const int groups = gr0 + gr1 + gr2;
    const int aTileBytes = groups * 16 * kBK * 2;
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    unsigned char* sX = smem;                  // [2][64][64] bf16
    unsigned char* sA = smem + 2 * kTileBytes;  // [2][groups * 16][64] bf16
    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int row0 = (int)blockIdx.x * kBM;
    // k split blockIdx.y: k tiles [kt0, kt1) of the ceil(in / 64)
    const int kt0 = (int)blockIdx.y * split_tiles, kt1 = min((in + kBK - 1) / kBK, kt0 + split_tiles);
    // The lane's fragment rows (g, g + 8) and first column (2t) of the A layout.
    const long long frow = (long long)row0 + warp * 16 + (lane >> 2);
    const int fcol = 2 * (lane & 3);

    float acc[2 * NG][4];
NP_UNROLL
    for (int j = 0; j < 2 * NG; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    load_x_tile(sX, x, n, in, row0, kt0 * kBK);
    load_a_tile(sA, a0, a1, a2, r0, r1, r2, gr0, gr1, groups, in, kt0 * kBK);
    npmma::cp_async_commit();
    for (int kt = kt0; kt < kt1; ++kt)
    {
        const int buf = (kt - kt0) & 1;
        if (kt + 1 < kt1)
        {
            load_x_tile(sX + (buf ^ 1) * kTileBytes, x, n, in, row0, (kt + 1) * kBK);
            load_a_tile(sA + (buf ^ 1) * aTileBytes, a0, a1, a2, r0, r1, r2, gr0, gr1, groups, in, (kt + 1) * kBK);
        }
        npmma::cp_async_commit();  // possibly empty: "all but the newest group" is then always tile kt
        npmma::cp_async_wait<1>();
        __syncthreads();
        const unsigned char* X = sX + buf * kTileBytes;
        const unsigned char* A = sA + buf * aTileBytes;
        // Rolled: the body holds up to 3 inlined mask computations (2 Philox each) and 8 groups of MMAs; unrolled 4x
        // the kernel grew to ~11k SASS instructions for no gain (nothing is indexed by kk at compile time).
NP_NO_UNROLL
        for (int kk = 0; kk < kBK / 16; ++kk)
        {
            uint32_t xf[4], am[4] = {0u, 0u, 0u, 0u};
            attntc::load_a<64>(xf, X, warp * 16, kk * 16, lane);
            const unsigned long long e0 = (unsigned long long)(frow * in + kt * kBK + kk * 16 + fcol);
NP_UNROLL
            for (int j = 0; j < NG; ++j)
            {
                if (j < groups)
                {
                    // Each adapter's own mask on the A operand, made once per adapter (at its first group).
                    if (j == 0 || j == gr0 || j == gr0 + gr1)
                    {
                        const int g = adapter_of(j, gr0, gr1);
                        const unsigned int thr = sel(g, t0, t1, t2);
                        am[0] = xf[0]; am[1] = xf[1]; am[2] = xf[2]; am[3] = xf[3];
                        if (thr != 0u)  // uniform: the whole warp takes part in drop_fragment's shuffle
                            drop_fragment(am, e0, (unsigned long long)8 * in, lane, thr, sel(g, s0, s1, s2), sel(g, k0, k1, k2));
                    }
                    uint32_t b[4];
                    attntc::load_b_t2<64>(b, A, j * 16, kk * 16, lane);
                    attntc::mma(acc[2 * j], am, b[0], b[1]);
                    attntc::mma(acc[2 * j + 1], am, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with buffer buf before tile kt + 2 is loaded into it
    }

    if (ws != nullptr)
    {
        // Split k: the fp32 partial sums of every (padded) rank column go to ws[split][row][16 group + column];
        // lora_down_reduce_bf16 adds the splits in order and rounds once.
        const int R = groups * 16;
        float* plane = ws + (long long)blockIdx.y * n * R;
NP_UNROLL
        for (int j = 0; j < NG; ++j)
        {
            if (j < groups)
            {
NP_UNROLL
                for (int h = 0; h < 2; ++h)
NP_UNROLL
                    for (int half = 0; half < 2; ++half)
                    {
                        const long long row = frow + 8 * half;
                        if (row < n)
                        {
                            float* p = plane + row * R + j * 16 + h * 8 + fcol;
                            p[0] = acc[2 * j + h][2 * half];
                            p[1] = acc[2 * j + h][2 * half + 1];
                        }
                    }
            }
        }
        return;
    }
NP_UNROLL
    for (int j = 0; j < NG; ++j)
    {
        if (j < groups)
        {
            const int g = adapter_of(j, gr0, gr1);
            const int rank = sel(g, r0, r1, r2);
            bf16* out = sel(g, o0, o1, o2);
            const int jl = j - sel(g, 0, gr0, gr0 + gr1);
NP_UNROLL
            for (int h = 0; h < 2; ++h)
NP_UNROLL
                for (int half = 0; half < 2; ++half)
                {
                    const long long row = frow + 8 * half;
                    const int col = jl * 16 + h * 8 + fcol;
                    if (row < n)
                    {
                        if (col < rank) out[row * rank + col] = __float2bfloat16_rn(acc[2 * j + h][2 * half]);
                        if (col + 1 < rank) out[row * rank + col + 1] = __float2bfloat16_rn(acc[2 * j + h][2 * half + 1]);
                    }
                }
        }
    }
}

__device__ void bwd_body(const bf16* __restrict__ x, bf16* __restrict__ dx, int n, int in, int split_rows, int count,
                         const bf16* a0, const bf16* a1, const bf16* a2, const bf16* d0, const bf16* d1, const bf16* d2,
                         int r0, int r1, int r2, unsigned int t0, unsigned int t1, unsigned int t2,
                         unsigned long long s0, unsigned long long s1, unsigned long long s2, float k0, float k1,
                         float k2, float* __restrict__ ws)
{
    constexpr int NG = kBwdMaxRank / 16;
    const int gr0 = (r0 + 15) >> 4, gr1 = count > 1 ? (r1 + 15) >> 4 : 0, gr2 = count > 2 ? (r2 + 15) >> 4 : 0;
    const int groups = gr0 + gr1 + gr2;
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    unsigned char* sA = smem;                   // [64 rank rows][64 features] bf16: A_g, stacked and padded
    unsigned char* sX0 = sA + kTileBytes;       // [2][64 rows][64 features] bf16: x, double-buffered over row tiles
    unsigned char* sD = sX0 + 2 * kTileBytes;   // [64 rows][64 rank columns] bf16: dxa_g, stacked and padded
    unsigned char* sXd = sD + kTileBytes;       // [64][64] bf16: dropout_g(x) of the adapter being processed
    unsigned char* sM = sXd + kTileBytes;       // [64][kMaskStride] uint8: its mask (row-major, unswizzled)
    const int tid = (int)threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int col0 = (int)blockIdx.x * kBK;
    const int split = (int)blockIdx.y;
    const int rbeg = split * split_rows;
    const int rend = min(n, rbeg + split_rows);

    float dA[NG][2][4];  // dA[group][n8 tile] of the warp's 16 features col0 + 16 warp ..
NP_UNROLL
    for (int j = 0; j < NG; ++j)
NP_UNROLL
        for (int h = 0; h < 2; ++h) dA[j][h][0] = dA[j][h][1] = dA[j][h][2] = dA[j][h][3] = 0.0f;

    load_a_tile(sA, a0, a1, a2, r0, r1, r2, gr0, gr1, groups, in, col0);
    load_x_tile(sX0, x, rend, in, rbeg, col0);
    npmma::cp_async_commit();
    for (int rt = rbeg, it = 0; rt < rend; rt += kBM, ++it)
    {
        const unsigned char* sX = sX0 + (it & 1) * kTileBytes;
        // The next row tile's x streams in while this one is computed (its buffer was last read in iteration it - 1,
        // which ended with a barrier).
        if (rt + kBM < rend) load_x_tile(sX0 + ((it + 1) & 1) * kTileBytes, x, rend, in, rt + kBM, col0);
        npmma::cp_async_commit();  // possibly empty: "all but the newest group" is then always this tile
        // dxa_g is [N, r_g] with any r_g: plain loads (it is 1/in of the traffic of x), zeros in the padding.
        for (int e = tid; e < kBM * 64; e += kThreads)
        {
            const int r = e >> 6, c = e & 63, grp = c >> 4, g = adapter_of(grp, gr0, gr1);
            const int j = c - 16 * sel(g, 0, gr0, gr0 + gr1), rank = sel(g, r0, r1, r2), row = rt + r;
            const bf16* d = sel(g, d0, d1, d2);
            const bf16 v = (grp < groups && j < rank && row < rend) ? d[(long long)row * rank + j] : __float2bfloat16_rn(0.0f);
            *reinterpret_cast<bf16*>(sD + attntc::swz<64>(r, c >> 3) + (c & 7) * 2) = v;
        }
        npmma::cp_async_wait<1>();
        __syncthreads();

        float dacc[8][4];  // the dx update of the warp's 16 rows x 64 features
NP_UNROLL
        for (int j = 0; j < 8; ++j) dacc[j][0] = dacc[j][1] = dacc[j][2] = dacc[j][3] = 0.0f;

NP_NO_UNROLL
        for (int g = 0; g < count; ++g)
        {
            const unsigned int thr = sel(g, t0, t1, t2);
            const float scale = sel(g, k0, k1, k2);
            const int goff = sel(g, 0, gr0, gr0 + gr1), ng = sel(g, gr0, gr1, gr2);
            const unsigned char* XD = sX;
            if (thr != 0u)
            {
                // dropout_g(x) and its mask for the tile: one Philox block (4 words) per 4 consecutive features.
                const unsigned long long seed = sel(g, s0, s1, s2);
NP_UNROLL
                for (int i = 0; i < kBM * 16 / kThreads; ++i)
                {
                    const int q = i * kThreads + tid, r = q >> 4, c4 = (q & 15) * 4;
                    const unsigned long long e = (unsigned long long)(rt + r) * in + (col0 + c4);
                    unsigned int w[4];
                    philox4(e >> 2, seed, w);
                    const int off = attntc::swz<64>(r, c4 >> 3) + (c4 & 7) * 2;
                    const uint2 v = *reinterpret_cast<const uint2*>(sX + off);
                    const bool k_0 = w[0] >= thr, k_1 = w[1] >= thr, k_2 = w[2] >= thr, k_3 = w[3] >= thr;
                    uint2 o;
                    o.x = npmma::pack_bf16(k_0 ? bf16_lo(v.x) * scale : 0.0f, k_1 ? bf16_hi(v.x) * scale : 0.0f);
                    o.y = npmma::pack_bf16(k_2 ? bf16_lo(v.y) * scale : 0.0f, k_3 ? bf16_hi(v.y) * scale : 0.0f);
                    *reinterpret_cast<uint2*>(sXd + off) = o;
                    *reinterpret_cast<uint32_t*>(sM + r * kMaskStride + c4) =
                        (uint32_t)k_0 | ((uint32_t)k_1 << 8) | ((uint32_t)k_2 << 16) | ((uint32_t)k_3 << 24);
                }
                __syncthreads();
                XD = sXd;
            }

            // dx term: t = dxa_g A_g over the adapter's rank groups, then masked and scaled into dacc.
            float t[8][4];
NP_UNROLL
            for (int j = 0; j < 8; ++j) t[j][0] = t[j][1] = t[j][2] = t[j][3] = 0.0f;
NP_UNROLL
            for (int kk = 0; kk < NG; ++kk)
            {
                if (kk < ng)
                {
                    uint32_t af[4];
                    attntc::load_a<64>(af, sD, warp * 16, (goff + kk) * 16, lane);
NP_UNROLL
                    for (int p = 0; p < 4; ++p)
                    {
                        uint32_t b[4];
                        attntc::load_b_n2<64>(b, sA, (goff + kk) * 16, p * 16, lane);
                        attntc::mma(t[2 * p], af, b[0], b[1]);
                        attntc::mma(t[2 * p + 1], af, b[2], b[3]);
                    }
                }
            }
            if (thr != 0u)
            {
NP_UNROLL
                for (int j = 0; j < 8; ++j)
NP_UNROLL
                    for (int half = 0; half < 2; ++half)
                    {
                        const int r = warp * 16 + (lane >> 2) + 8 * half, c = j * 8 + 2 * (lane & 3);
                        const unsigned int m = *reinterpret_cast<const unsigned short*>(sM + r * kMaskStride + c);
                        dacc[j][2 * half] += (m & 0xffu) ? t[j][2 * half] * scale : 0.0f;
                        dacc[j][2 * half + 1] += (m >> 8) ? t[j][2 * half + 1] * scale : 0.0f;
                    }
            }
            else
            {
NP_UNROLL
                for (int j = 0; j < 8; ++j)
NP_UNROLL
                    for (int v = 0; v < 4; ++v) dacc[j][v] += t[j][v];
            }

            // dA term: dA_g[rank, features 16 warp ..] += dxa_g^T dropout_g(x) over the tile's 64 rows.
NP_UNROLL
            for (int ks = 0; ks < kBM / 16; ++ks)
            {
                uint32_t b[4];
                attntc::load_b_n2<64>(b, XD, ks * 16, warp * 16, lane);
NP_UNROLL
                for (int j = 0; j < NG; ++j)
                {
                    if (j >= goff && j < goff + ng)
                    {
                        uint32_t at[4];
                        load_a_t(at, sD, ks * 16, j * 16, lane);
                        attntc::mma(dA[j][0], at, b[0], b[1]);
                        attntc::mma(dA[j][1], at, b[2], b[3]);
                    }
                }
            }
            __syncthreads();  // every warp is done with sXd and sM before the next adapter rewrites them
        }

        // dx += the tile's update: read once, one rounding.
NP_UNROLL
        for (int j = 0; j < 8; ++j)
NP_UNROLL
            for (int half = 0; half < 2; ++half)
            {
                const int row = rt + warp * 16 + (lane >> 2) + 8 * half, col = col0 + j * 8 + 2 * (lane & 3);
                if (row < rend && col < in)
                {
                    uint32_t* p = reinterpret_cast<uint32_t*>(dx + (long long)row * in + col);
                    const uint32_t old = *p;
                    *p = npmma::pack_bf16(bf16_lo(old) + dacc[j][2 * half], bf16_hi(old) + dacc[j][2 * half + 1]);
                }
            }
        __syncthreads();  // sD is reloaded, and this x buffer refilled, in the next iterations
    }

    // The split's partial dA of every (padded) rank row: ws[split][group * 16 + row][feature].
    const int R = groups * 16;
NP_UNROLL
    for (int j = 0; j < NG; ++j)
    {
        if (j < groups)
        {
NP_UNROLL
            for (int h = 0; h < 2; ++h)
NP_UNROLL
                for (int half = 0; half < 2; ++half)
                {
                    const int prow = j * 16 + (lane >> 2) + 8 * half, col = col0 + warp * 16 + h * 8 + 2 * (lane & 3);
                    if (col < in)
                    {
                        float* p = ws + ((long long)split * R + prow) * in + col;
                        p[0] = dA[j][h][2 * half];
                        p[1] = dA[j][h][2 * half + 1];
                    }
                }
        }
    }
}

}  // namespace lorak

NP_KERNEL_BOUNDED(lora_down_tc_bf16, lorak::kThreads, (const LoraTcParams p))
{
    lorak::down_body(p.x, p.n, p.in, p.split, p.count, p.a0, p.a1, p.a2, p.data0, p.data1, p.data2, p.r0, p.r1, p.r2,
                     p.thr0, p.thr1, p.thr2, p.seed0, p.seed1, p.seed2, p.scale0, p.scale1, p.scale2, p.ws);
}

// The parameters of the split reductions lora_down_reduce_bf16 and lora_da_reduce_f32, passed by value as their one
// parameter. Mirrored field for field by C# NativePeft.Ops.LoraReduceParams ([StructLayout(Sequential)]);
// KernelSourceTests compares its size and field offsets with np_layout_LoraReduceParams (end of this file) and the
// static_assert holds nvcc to the same size. dst_g is xa_g [n, r_g] bf16 for the down reduction, dA_g [r_g, in] fp32
// for the dA one (unused slots g >= count: null, rank 0); the down reduction reads n, the dA one in.
struct LoraReduceParams
{
    const float* ws;  // [splits][...] fp32 partials, adapters' rows padded to 16 (R in all)
    void* dst0;
    void* dst1;
    void* dst2;
    int splits;
    int n;            // down: rows of x
    int R;            // sum over g of 16 * ceil(r_g / 16)
    int in;           // dA: input features
    int count;        // adapters, 1 .. 3
    int r0, r1, r2;
};
static_assert(sizeof(LoraReduceParams) == 64, "LoraReduceParams: 4 pointers and 8 four-byte fields, as the C# mirror");

// xa_g[row][j] = bf16_rn(sum over s = 0 .. splits - 1 (in that order, fp32) of ws[s][row][16 goff_g + j]), j < r_g.
NP_KERNEL(lora_down_reduce_bf16, (const LoraReduceParams p))
{
    const float* __restrict__ ws = p.ws;
    const int splits = p.splits, n = p.n, R = p.R, count = p.count, r0 = p.r0, r1 = p.r1, r2 = p.r2;
    __nv_bfloat16* xa0 = static_cast<__nv_bfloat16*>(p.dst0);
    __nv_bfloat16* xa1 = static_cast<__nv_bfloat16*>(p.dst1);
    __nv_bfloat16* xa2 = static_cast<__nv_bfloat16*>(p.dst2);
    const int gr0 = (r0 + 15) >> 4, gr1 = count > 1 ? (r1 + 15) >> 4 : 0;
    const long long total = (long long)n * R;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
    {
        const long long row = i / R;
        const int prow = (int)(i % R), g = lorak::adapter_of(prow >> 4, gr0, gr1);
        const int j = prow - 16 * lorak::sel(g, 0, gr0, gr0 + gr1), rank = lorak::sel(g, r0, r1, r2);
        if (j >= rank) continue;
        float s = 0.0f;
        for (int sp = 0; sp < splits; ++sp) s += ws[sp * total + i];
        lorak::sel(g, xa0, xa1, xa2)[row * rank + j] = __float2bfloat16_rn(s);
    }
}

NP_KERNEL_BOUNDED(lora_bwd_input_tc_bf16, lorak::kThreads, (const LoraTcParams p))
{
    lorak::bwd_body(p.x, p.dx, p.n, p.in, p.split, p.count, p.a0, p.a1, p.a2, p.data0, p.data1, p.data2, p.r0, p.r1,
                    p.r2, p.thr0, p.thr1, p.thr2, p.seed0, p.seed1, p.seed2, p.scale0, p.scale1, p.scale2, p.ws);
}

// dA_g[j][c] += sum over s = 0 .. splits - 1 (in that order, fp32) of ws[s][16 goff_g + j][c], for j < r_g.
NP_KERNEL(lora_da_reduce_f32, (const LoraReduceParams p))
{
    const float* __restrict__ ws = p.ws;
    const int splits = p.splits, R = p.R, in = p.in, count = p.count, r0 = p.r0, r1 = p.r1, r2 = p.r2;
    float* da0 = static_cast<float*>(p.dst0);
    float* da1 = static_cast<float*>(p.dst1);
    float* da2 = static_cast<float*>(p.dst2);
    const int gr0 = (r0 + 15) >> 4, gr1 = count > 1 ? (r1 + 15) >> 4 : 0;
    const long long total = (long long)R * in, plane = total;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
    {
        const int prow = (int)(i / in), c = (int)(i % in), g = lorak::adapter_of(prow >> 4, gr0, gr1);
        const int j = prow - 16 * lorak::sel(g, 0, gr0, gr0 + gr1);
        if (j >= lorak::sel(g, r0, r1, r2)) continue;
        float s = 0.0f;
        for (int sp = 0; sp < splits; ++sp) s += ws[sp * plane + i];
        float* da = lorak::sel(g, da0, da1, da2);
        da[(long long)j * in + c] += s;
    }
}

NP_PARAMS_LAYOUT(LoraTcParams, offsetof(LoraTcParams, x), offsetof(LoraTcParams, dx), offsetof(LoraTcParams, a0),
                 offsetof(LoraTcParams, a1), offsetof(LoraTcParams, a2), offsetof(LoraTcParams, data0),
                 offsetof(LoraTcParams, data1), offsetof(LoraTcParams, data2), offsetof(LoraTcParams, ws),
                 offsetof(LoraTcParams, seed0), offsetof(LoraTcParams, seed1), offsetof(LoraTcParams, seed2),
                 offsetof(LoraTcParams, n), offsetof(LoraTcParams, in), offsetof(LoraTcParams, split),
                 offsetof(LoraTcParams, count), offsetof(LoraTcParams, r0), offsetof(LoraTcParams, r1),
                 offsetof(LoraTcParams, r2), offsetof(LoraTcParams, thr0), offsetof(LoraTcParams, thr1),
                 offsetof(LoraTcParams, thr2), offsetof(LoraTcParams, scale0), offsetof(LoraTcParams, scale1),
                 offsetof(LoraTcParams, scale2))
NP_PARAMS_LAYOUT(LoraReduceParams, offsetof(LoraReduceParams, ws), offsetof(LoraReduceParams, dst0),
                 offsetof(LoraReduceParams, dst1), offsetof(LoraReduceParams, dst2), offsetof(LoraReduceParams, splits),
                 offsetof(LoraReduceParams, n), offsetof(LoraReduceParams, R), offsetof(LoraReduceParams, in),
                 offsetof(LoraReduceParams, count), offsetof(LoraReduceParams, r0), offsetof(LoraReduceParams, r1),
                 offsetof(LoraReduceParams, r2))
