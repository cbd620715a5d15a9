// embedding.cu: token embedding gather and its deterministic scatter-add backward.
// docs/ops-contract.md "Embedding".
//
//   forward : out[n, :] = table[ids[n], :]                 (a copy: bit exact in either dtype)
//   backward: dtable[ids[n], :] += dout[n, :]  for n = 0, 1, ..., N-1 in that order (fp32 dtable)
//
// T (table, out, dout) is float or __nv_bfloat16; ids are int32 in [0, V), anything else traps
// (device-side assert, as torch's embedding; the host overloads validate first).
//
// The backward uses no atomics. Block (bx, by) owns the columns [bx * blockDim.x, +blockDim.x) of
// the vocabulary rows [V * by / G, V * (by + 1) / G) (G = gridDim.y) and scans ALL ids in order,
// adding the rows whose id falls in its range. Every element dtable[v, c] is therefore updated by
// exactly one thread, in increasing n: the result is bit-identical to the serial CPU loop in fp32,
// for any grid and on any device. Cost: every block reads all N ids (through shared memory, 4 B
// per id per block), the adds themselves are N * C as for a scatter.
//
// C ABI: embedding_forward_{f32,bf16}, embedding_backward_{f32,bf16}.
#include "common.cuh"

namespace embk {

// ---------------------------------------------------------------------------------------------
// Forward. Launch shape: grid = N (one block per token), block = min(256, 32 * ceil(C / 32)),
// no shared memory; threads stride over the C columns of the row (coalesced copy).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void forward_body(const int* __restrict__ ids, const T* __restrict__ table, T* __restrict__ out,
                             int N, int C, int V)
{
    const int n = (int)blockIdx.x;
    if (n >= N) return;
    const int id = ids[n];
    if (id < 0 || id >= V) __trap();
    const T* src = table + (long long)id * C;
    T* dst = out + (long long)n * C;
    for (int c = (int)threadIdx.x; c < C; c += (int)blockDim.x)
        dst[c] = src[c];
}

// ---------------------------------------------------------------------------------------------
// Backward. Launch shape: block = min(256, 32 * ceil(C / 32)) threads (one column each),
// grid = (ceil(C / blockDim.x), G) with 1 <= G <= V vocabulary partitions (the host picks G to fill
// the device; the result does not depend on it). Static shared: 256 ids. The ids are staged through
// shared memory blockDim.x at a time; for each staged id (same for the whole block, so the branch is
// uniform) the block adds dout[n, its columns] to dtable[id, its columns] when id is in its range.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void backward_body(const int* __restrict__ ids, const T* __restrict__ dout, float* __restrict__ dtable,
                              int N, int C, int V)
{
    __shared__ int s_ids[256];
    const int tid = (int)threadIdx.x;
    const int c = (int)blockIdx.x * (int)blockDim.x + tid;
    const int v0 = (int)(((long long)V * blockIdx.y) / gridDim.y);
    const int v1 = (int)(((long long)V * (blockIdx.y + 1)) / gridDim.y);
    const int chunk = (int)blockDim.x;

    for (int base = 0; base < N; base += chunk)
    {
        const int j = base + tid;
        if (j < N)
        {
            const int id = ids[j];
            if (id < 0 || id >= V) __trap();
            s_ids[tid] = id;
        }
        __syncthreads();
        const int count = N - base < chunk ? N - base : chunk;
        if (c < C)
        {
            for (int k = 0; k < count; k++)
            {
                const int id = s_ids[k];
                if (id >= v0 && id < v1)
                    dtable[(long long)id * C + c] += to_f32(dout[(long long)(base + k) * C + c]);
            }
        }
        __syncthreads();  // s_ids is rewritten by the next chunk
    }
}

}  // namespace embk

// embedding_forward_{f32,bf16}(ids[N], table[V, C], out[N, C], N, C, V)
// Launch: grid N, block min(256, 32*ceil(C/32)), shared 0.
NP_KERNEL(embedding_forward_f32, (const int* ids, const float* table, float* out, int N, int C, int V))
{ embk::forward_body<float>(ids, table, out, N, C, V); }
NP_KERNEL(embedding_forward_bf16, (const int* ids, const __nv_bfloat16* table, __nv_bfloat16* out, int N, int C, int V))
{ embk::forward_body<__nv_bfloat16>(ids, table, out, N, C, V); }

// embedding_backward_{f32,bf16}(ids[N], dout[N, C], dtable[V, C] f32 (+=), N, C, V)
// Launch: grid (ceil(C/block), G), block min(256, 32*ceil(C/32)), shared 0 (1 KiB static).
NP_KERNEL(embedding_backward_f32, (const int* ids, const float* dout, float* dtable, int N, int C, int V))
{ embk::backward_body<float>(ids, dout, dtable, N, C, V); }
NP_KERNEL(embedding_backward_bf16, (const int* ids, const __nv_bfloat16* dout, float* dtable, int N, int C, int V))
{ embk::backward_body<__nv_bfloat16>(ids, dout, dtable, N, C, V); }
