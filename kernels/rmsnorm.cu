// rmsnorm.cu: RMSNorm forward and backward (HF Llama LlamaRMSNorm), docs/ops-contract.md "RMSNorm".
//
//   rstd[n]   = 1 / sqrt(mean_c(x[n,c]^2) + eps)                  (fp32, saved for the backward)
//   y[n,c]    = w[c] * (x[n,c] * rstd[n])                          (fp32, one rounding to T)
//   dx[n,c]   = rstd[n] * (w[c]*dy[n,c]) - x[n,c] * (rstd[n]^3 * dot[n] / C),  dot[n] = sum_c w*dy*x
//               (or dx[n,c] += that, accumulate != 0: the residual stream's gradient takes the norm's in the
//               same pass, one rounding of the fp32 sum, instead of a separate buffer and an add)
//   dw[c]    += sum_n dy[n,c] * (x[n,c] * rstd[n])                 (fp32 accumulator, +=)
//
// T (x, w, y, dy, dx) is float or __nv_bfloat16; every value is widened to fp32 and all math and
// reductions are fp32. Note: HF rounds x*rstd to the input dtype before multiplying by w; we round once.
// Reductions have a fixed order for a given launch shape (the host picks it from C alone), so the
// results are deterministic and identical on CUDA and the emulator up to FMA contraction by nvcc.
//
// C ABI: rmsnorm_forward_{f32,bf16}, rmsnorm_backward_{f32,bf16}, rmsnorm_backward_dw_{f32,bf16}.
#include "common.cuh"

namespace rmsk {

// Sum over the block (blockDim.x a multiple of 32, at most 1024): warp xor-shuffle sums, then warp 0
// sums the per-warp partials in warp order. Every thread gets the total. `s_partial` holds 32 floats;
// the trailing __syncthreads lets the caller reuse it.
__device__ __forceinline__ float block_sum(float v, float* s_partial)
{
    const int lane = (int)(threadIdx.x & 31);
    const int warp = (int)(threadIdx.x >> 5);
    const int nwarps = (int)(blockDim.x >> 5);
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) s_partial[warp] = v;
    __syncthreads();
    if (warp == 0)
    {
        float t = lane < nwarps ? s_partial[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1)
            t += __shfl_xor_sync(0xffffffffu, t, off);
        if (lane == 0) s_partial[0] = t;
    }
    __syncthreads();
    const float total = s_partial[0];
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------
// Forward. Launch shape: grid = N (one block per row), block = min(256, 32 * ceil(C / 32)) threads
// (a multiple of 32), no dynamic shared memory. Each thread strides over the row's columns
// (c = threadIdx.x, += blockDim.x; with C % 8 == 0 and aligned pointers 8 columns at a time with 16-byte
// accesses, c = 8 * threadIdx.x, += 8 * blockDim.x), summing x^2 in fp32; block_sum; then a second pass
// writes y (x re-read from L1/L2). rstd may be null (inference), else rstd[n] is written. y may alias x
// (no __restrict__ on them: each element is read by the thread that writes it, after the reduction).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void forward_body(const T* x, const T* __restrict__ w, T* y,
                             float* __restrict__ rstd, int C, float eps)
{
    __shared__ float s_partial[32];
    const long long row = (long long)blockIdx.x * C;
    const T* xr = x + row;
    T* yr = y + row;
    // Vector path (C % 8 == 0, x, w, y 16-byte aligned, so every row is): 8 columns per thread per step.
    const bool vec = (C & 7) == 0 && npvec::aligned16(x) && npvec::aligned16(w) && npvec::aligned16(y);

    float ss = 0.0f;
    if (vec)
    {
        for (int c = 8 * (int)threadIdx.x; c < C; c += 8 * (int)blockDim.x)
        {
            float v[8];
            npvec::load8(xr + c, v);
            NP_UNROLL
            for (int k = 0; k < 8; k++) ss += v[k] * v[k];
        }
    }
    else
    {
        for (int c = (int)threadIdx.x; c < C; c += (int)blockDim.x)
        {
            const float v = to_f32(xr[c]);
            ss += v * v;
        }
    }
    ss = block_sum(ss, s_partial);
    const float r = 1.0f / sqrtf(ss / (float)C + eps);  // IEEE sqrt and division on both targets
    if (rstd != nullptr && threadIdx.x == 0) rstd[blockIdx.x] = r;

    if (vec)
    {
        for (int c = 8 * (int)threadIdx.x; c < C; c += 8 * (int)blockDim.x)
        {
            float v[8], g[8];
            npvec::load8(xr + c, v);
            npvec::load8(w + c, g);
            NP_UNROLL
            for (int k = 0; k < 8; k++) v[k] = g[k] * (v[k] * r);
            npvec::store8(yr + c, v);
        }
        return;
    }
    for (int c = (int)threadIdx.x; c < C; c += (int)blockDim.x)
        yr[c] = from_f32<T>(to_f32(w[c]) * (to_f32(xr[c]) * r));
}

// ---------------------------------------------------------------------------------------------
// Backward, dx. Launch shape: as the forward (grid = N, block = min(256, 32 * ceil(C / 32))).
// dot = block_sum(w*dy*x); dx = r*(w*dy) - x*(r^3 * dot / C). dx is overwritten (may alias dy), or with
// accumulate the result is added to dx in fp32 and rounded once (dx must not alias dy or x then: the host checks).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void backward_body(const T* __restrict__ x, const T* __restrict__ w, const T* dy,
                              const float* __restrict__ rstd, T* dx, int C, int accumulate)
{
    __shared__ float s_partial[32];
    const long long row = (long long)blockIdx.x * C;
    const T* xr = x + row;
    const T* dyr = dy + row;
    T* dxr = dx + row;
    const bool vec = (C & 7) == 0 && npvec::aligned16(x) && npvec::aligned16(w) && npvec::aligned16(dy) && npvec::aligned16(dx);

    float dot = 0.0f;
    if (vec)
    {
        for (int c = 8 * (int)threadIdx.x; c < C; c += 8 * (int)blockDim.x)
        {
            float a[8], g[8], b[8];
            npvec::load8(w + c, g);
            npvec::load8(dyr + c, a);
            npvec::load8(xr + c, b);
            NP_UNROLL
            for (int k = 0; k < 8; k++) dot += (g[k] * a[k]) * b[k];
        }
    }
    else
    {
        for (int c = (int)threadIdx.x; c < C; c += (int)blockDim.x)
            dot += (to_f32(w[c]) * to_f32(dyr[c])) * to_f32(xr[c]);
    }
    dot = block_sum(dot, s_partial);

    const float r = rstd[blockIdx.x];
    const float k = (r * r * r) * (dot / (float)C);
    if (vec)
    {
        for (int c = 8 * (int)threadIdx.x; c < C; c += 8 * (int)blockDim.x)
        {
            float a[8], g[8], b[8], o[8];
            npvec::load8(w + c, g);
            npvec::load8(dyr + c, a);
            npvec::load8(xr + c, b);
            if (accumulate) npvec::load8(dxr + c, o);
            NP_UNROLL
            for (int j = 0; j < 8; j++)
            {
                const float v = r * (g[j] * a[j]) - b[j] * k;
                o[j] = accumulate ? o[j] + v : v;
            }
            npvec::store8(dxr + c, o);
        }
        return;
    }
    for (int c = (int)threadIdx.x; c < C; c += (int)blockDim.x)
    {
        const float g = to_f32(w[c]) * to_f32(dyr[c]);
        const float v = r * g - to_f32(xr[c]) * k;
        dxr[c] = from_f32<T>(accumulate ? to_f32(dxr[c]) + v : v);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, dw. Launch shape: block = (32, 16) threads, grid = ceil(C / 32) blocks; no dynamic
// shared memory. Thread (tx, ty) of block b owns column c = 32*b + tx and sums dy*(x*rstd) over the
// rows n = ty, ty + 16, ... in order (coalesced: a warp reads 32 consecutive columns of one row);
// the 16 partials of a column are then added in ty order and the result is added to dw[c] (+=).
// No atomics: the result does not depend on scheduling.
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ void backward_dw_body(const T* __restrict__ x, const T* __restrict__ dy,
                                 const float* __restrict__ rstd, float* __restrict__ dw, int N, int C)
{
    __shared__ float s_part[16][33];
    const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
    const int c = (int)blockIdx.x * 32 + tx;
    float acc = 0.0f;
    if (c < C)
    {
        for (int n = ty; n < N; n += (int)blockDim.y)
        {
            const long long e = (long long)n * C + c;
            acc += to_f32(dy[e]) * (to_f32(x[e]) * rstd[n]);
        }
    }
    s_part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && c < C)
    {
        float t = s_part[0][tx];
        for (int i = 1; i < (int)blockDim.y; i++) t += s_part[i][tx];
        dw[c] += t;
    }
}

}  // namespace rmsk

// rmsnorm_forward_{f32,bf16}(x[N,C], w[C], y[N,C], rstd[N] or null, N, C, eps)
// Launch: grid N, block min(256, 32*ceil(C/32)), shared 0.
NP_KERNEL(rmsnorm_forward_f32, (const float* x, const float* w, float* y, float* rstd, int N, int C, float eps))
{ if ((int)blockIdx.x < N) rmsk::forward_body<float>(x, w, y, rstd, C, eps); }
NP_KERNEL(rmsnorm_forward_bf16, (const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, float* rstd, int N, int C, float eps))
{ if ((int)blockIdx.x < N) rmsk::forward_body<__nv_bfloat16>(x, w, y, rstd, C, eps); }

// rmsnorm_backward_{f32,bf16}(x[N,C], w[C], dy[N,C], rstd[N], dx[N,C], N, C, accumulate)
// Launch: grid N, block min(256, 32*ceil(C/32)), shared 0.
NP_KERNEL(rmsnorm_backward_f32, (const float* x, const float* w, const float* dy, const float* rstd, float* dx, int N, int C, int accumulate))
{ if ((int)blockIdx.x < N) rmsk::backward_body<float>(x, w, dy, rstd, dx, C, accumulate); }
NP_KERNEL(rmsnorm_backward_bf16, (const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* dy, const float* rstd, __nv_bfloat16* dx, int N, int C, int accumulate))
{ if ((int)blockIdx.x < N) rmsk::backward_body<__nv_bfloat16>(x, w, dy, rstd, dx, C, accumulate); }

// rmsnorm_backward_dw_{f32,bf16}(x[N,C], dy[N,C], rstd[N], dw[C] f32 (+=), N, C)
// Launch: grid ceil(C/32), block (32, 16), shared 0.
NP_KERNEL(rmsnorm_backward_dw_f32, (const float* x, const float* dy, const float* rstd, float* dw, int N, int C))
{ rmsk::backward_dw_body<float>(x, dy, rstd, dw, N, C); }
NP_KERNEL(rmsnorm_backward_dw_bf16, (const __nv_bfloat16* x, const __nv_bfloat16* dy, const float* rstd, float* dw, int N, int C))
{ rmsk::backward_dw_body<__nv_bfloat16>(x, dy, rstd, dw, N, C); }
