// cross_entropy.cu: cross-entropy over a vocabulary processed in chunks, docs/ops-contract.md "Cross-entropy".
// The CPU reference is src/NativePeft/Ops/Reference/CrossEntropyRef.cs; the launcher is GpuLossOps.cs.
//
// The caller computes one logits chunk at a time, z[rows, chunk] = hidden · W[v0 : v0+chunk]ᵀ (a GEMM: cuBLAS on
// CUDA, host BLAS on the emulator), with a row stride ldz >= chunk, and chains these kernels over the chunks in
// increasing v0, starting at 0:
//
//   forward   cross_entropy_init                       running_max = -inf, running_sum = 0, label_logit = 0
//             cross_entropy_chunk_forward_{f32,bf16}    per chunk: online log-sum-exp, pick z[label]
//             cross_entropy_finish                      lse = max + log(sum); loss_per_row = lse - z[label] (0 ignored)
//             cross_entropy_loss_sum                    (optional) sum and count in double, one block, fixed order
//   backward  cross_entropy_chunk_backward_{f32,bf16}   per chunk, z in place -> dz = (softmax - onehot) * scale
//
// Per row and chunk the forward does what CrossEntropyRef does: chunk_max = max_j z[j] (exact, order-free);
// if chunk_max > running_max: running_sum *= exp(running_max - chunk_max), running_max = chunk_max; then
// running_sum += sum_j exp(z[j] - running_max). Every exponent is <= 0, so nothing overflows. All math is fp32
// (bf16 logits are widened exactly); the only order-dependent step is the block sum of the exponentials, whose order
// is fixed by the launch shape (the host picks it from `chunk` alone), so results are deterministic and the same on
// CUDA and the emulator up to the libm/CUDA difference of expf/logf (an ulp or two) and FMA contraction.
//
// Labels are int32 with ignore index -100; a row whose label is -100 has loss 0 and dz 0 (its lse is still
// computed). A label outside [0, vocab) that is not -100 makes that row's loss NaN (no trap: the loss, and so the
// step, is visibly poisoned instead of the context); the host-array API in GpuLossOps validates labels up front.
#include "common.cuh"

namespace cek {

constexpr int kIgnoreIndex = -100;

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024): warp xor-shuffles, then warp 0 combines the
// per-warp partials in warp order. Every thread gets the result; `s_partial` holds 32 floats and may be reused after.
__device__ __forceinline__ float block_sum(float v, float* s_partial)
{
    const int lane = (int)(threadIdx.x & 31), warp = (int)(threadIdx.x >> 5), nwarps = (int)(blockDim.x >> 5);
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) s_partial[warp] = v;
    __syncthreads();
    if (warp == 0)
    {
        float t = lane < nwarps ? s_partial[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
        if (lane == 0) s_partial[0] = t;
    }
    __syncthreads();
    const float total = s_partial[0];
    __syncthreads();
    return total;
}

__device__ __forceinline__ float block_max(float v, float* s_partial)
{
    const int lane = (int)(threadIdx.x & 31), warp = (int)(threadIdx.x >> 5), nwarps = (int)(blockDim.x >> 5);
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) s_partial[warp] = v;
    __syncthreads();
    if (warp == 0)
    {
        float t = lane < nwarps ? s_partial[lane] : -INFINITY;
        for (int off = 16; off > 0; off >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, off));
        if (lane == 0) s_partial[0] = t;
    }
    __syncthreads();
    const float m = s_partial[0];
    __syncthreads();
    return m;
}

// ---------------------------------------------------------------------------------------------
// Chunk forward. Launch: grid = rows (one block per row), block = min(256, 32*ceil(chunk/32)), shared 0.
// Pass 1: block max of the row's chunk; pass 2: block sum of exp(z - new running max) (z re-read from L1/L2).
// Thread 0 updates running_max/running_sum and picks z[label - v0] when the label falls in this chunk.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void chunk_forward_body(const T* __restrict__ z, int chunk, long long ldz, int v0,
                                   const int* __restrict__ labels, float* __restrict__ running_max,
                                   float* __restrict__ running_sum, float* __restrict__ label_logit)
{
    __shared__ float s_partial[32];
    const int row = (int)blockIdx.x;
    const T* zr = z + (long long)row * ldz;

    float m = -INFINITY;
    for (int j = (int)threadIdx.x; j < chunk; j += (int)blockDim.x) m = fmaxf(m, to_f32(zr[j]));
    const float chunk_max = block_max(m, s_partial);

    const float old_max = running_max[row];
    const float new_max = chunk_max > old_max ? chunk_max : old_max;  // NaN logits keep the old max; the sum turns NaN

    float s = 0.0f;
    for (int j = (int)threadIdx.x; j < chunk; j += (int)blockDim.x) s += expf(to_f32(zr[j]) - new_max);
    s = block_sum(s, s_partial);

    if (threadIdx.x == 0)
    {
        float sum = running_sum[row];
        if (new_max != old_max) sum *= expf(old_max - new_max);  // old_max = -inf (first chunk): 0 * 0 = 0
        running_sum[row] = sum + s;
        running_max[row] = new_max;
        const int label = labels[row] - v0;
        if (label >= 0 && label < chunk) label_logit[row] = to_f32(zr[label]);
    }
}

// ---------------------------------------------------------------------------------------------
// Chunk backward, in place. Launch: as the forward (grid = rows, block = min(256, 32*ceil(chunk/32))).
// dz[j] = scale * exp(z[j] - lse) - scale * [j == label - v0]; an ignored row's chunk is zeroed.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void chunk_backward_body(T* z, int chunk, long long ldz, int v0, const int* __restrict__ labels,
                                    const float* __restrict__ lse, float scale)
{
    const int row = (int)blockIdx.x;
    T* zr = z + (long long)row * ldz;
    const int label = labels[row];
    if (label == kIgnoreIndex)
    {
        for (int j = (int)threadIdx.x; j < chunk; j += (int)blockDim.x) zr[j] = from_f32<T>(0.0f);
        return;
    }
    const float l = lse[row];
    const int hit = label - v0;
    for (int j = (int)threadIdx.x; j < chunk; j += (int)blockDim.x)
    {
        float g = scale * expf(to_f32(zr[j]) - l);
        if (j == hit) g -= scale;
        zr[j] = from_f32<T>(g);
    }
}

}  // namespace cek

// cross_entropy_init(running_max[rows], running_sum[rows], label_logit[rows], rows): -inf, 0, 0.
// Launch: grid ceil(rows/256), block 256, shared 0.
NP_KERNEL(cross_entropy_init, (float* running_max, float* running_sum, float* label_logit, int rows))
{
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < rows)
    {
        running_max[i] = -INFINITY;
        running_sum[i] = 0.0f;
        label_logit[i] = 0.0f;
    }
}

// cross_entropy_chunk_forward_{f32,bf16}(z[rows, ldz], rows, chunk, ldz, v0, labels[rows], running_max[rows],
//     running_sum[rows], label_logit[rows]); the state is fp32 and updated in place.
// Launch: grid rows, block min(256, 32*ceil(chunk/32)), shared 0.
NP_KERNEL(cross_entropy_chunk_forward_f32, (const float* z, int rows, int chunk, long long ldz, int v0, const int* labels,
                                            float* running_max, float* running_sum, float* label_logit))
{ if ((int)blockIdx.x < rows) cek::chunk_forward_body<float>(z, chunk, ldz, v0, labels, running_max, running_sum, label_logit); }
NP_KERNEL(cross_entropy_chunk_forward_bf16, (const __nv_bfloat16* z, int rows, int chunk, long long ldz, int v0, const int* labels,
                                             float* running_max, float* running_sum, float* label_logit))
{ if ((int)blockIdx.x < rows) cek::chunk_forward_body<__nv_bfloat16>(z, chunk, ldz, v0, labels, running_max, running_sum, label_logit); }

// cross_entropy_finish(running_max, running_sum, label_logit, labels, rows, vocab, lse_out[rows], loss_per_row[rows]):
// lse = max + log(sum) for every row; loss = lse - label_logit for labels in [0, vocab), 0 for -100, NaN otherwise.
// Launch: grid ceil(rows/256), block 256, shared 0.
NP_KERNEL(cross_entropy_finish, (const float* running_max, const float* running_sum, const float* label_logit,
                                 const int* labels, int rows, int vocab, float* lse_out, float* loss_per_row))
{
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= rows) return;
    const float l = running_max[i] + logf(running_sum[i]);
    lse_out[i] = l;
    const int label = labels[i];
    float loss;
    if (label == cek::kIgnoreIndex) loss = 0.0f;
    else if (label >= 0 && label < vocab) loss = l - label_logit[i];
    else loss = __int_as_float(0x7fc00000);  // quiet NaN: an invalid label
    loss_per_row[i] = loss;
}

// cross_entropy_loss_sum(loss_per_row[rows], labels[rows], rows, out[2] double): out[0] = sum of loss_per_row in double,
// out[1] = number of rows whose label is not -100. Deterministic: thread t sums rows t, t+256, ... in order, then a
// fixed shared-memory tree. Launch: grid 1, block 256 (exactly), shared 0.
NP_KERNEL(cross_entropy_loss_sum, (const float* loss_per_row, const int* labels, int rows, double* out))
{
    __shared__ double s_sum[256];
    __shared__ int s_count[256];
    const int t = (int)threadIdx.x;
    double sum = 0.0;
    int count = 0;
    for (int i = t; i < rows; i += 256)
    {
        sum += (double)loss_per_row[i];
        count += labels[i] != cek::kIgnoreIndex ? 1 : 0;
    }
    s_sum[t] = sum;
    s_count[t] = count;
    __syncthreads();
    for (int half = 128; half > 0; half >>= 1)
    {
        if (t < half)
        {
            s_sum[t] += s_sum[t + half];
            s_count[t] += s_count[t + half];
        }
        __syncthreads();
    }
    if (t == 0)
    {
        out[0] = s_sum[0];
        out[1] = (double)s_count[0];
    }
}

// cross_entropy_chunk_backward_{f32,bf16}(z[rows, ldz] in place -> dz, rows, chunk, ldz, v0, labels[rows], lse[rows], scale):
// dz = (softmax - onehot) * scale with scale = dloss / count; rows labelled -100 get 0.
// Launch: grid rows, block min(256, 32*ceil(chunk/32)), shared 0.
NP_KERNEL(cross_entropy_chunk_backward_f32, (float* z, int rows, int chunk, long long ldz, int v0, const int* labels,
                                             const float* lse, float scale))
{ if ((int)blockIdx.x < rows) cek::chunk_backward_body<float>(z, chunk, ldz, v0, labels, lse, scale); }
NP_KERNEL(cross_entropy_chunk_backward_bf16, (__nv_bfloat16* z, int rows, int chunk, long long ldz, int v0, const int* labels,
                                              const float* lse, float scale))
{ if ((int)blockIdx.x < rows) cek::chunk_backward_body<__nv_bfloat16>(z, chunk, ldz, v0, labels, lse, scale); }
