// swiglu.cu: the SwiGLU gate of the Llama MLP, elementwise. docs/ops-contract.md "SwiGLU".
//
//   forward : h = silu(g) * u,  silu(z) = z * sigmoid(z), sigmoid(z) = 1 / (1 + exp(-z))
//   backward: du = dh * silu(g);  dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//
// T (g, u, h, dh, dg, du) is float or __nv_bfloat16; math in fp32 (expf), one rounding per output.
// Note: HF rounds silu(g) to the input dtype before multiplying by u; we round once.
// No __restrict__ on purpose: each element is read before the same thread writes it, so h may alias
// g or u, and dg/du may alias g/u (in-place backward).
//
// C ABI: swiglu_forward_{f32,bf16}, swiglu_backward_{f32,bf16}.
#include "common.cuh"

namespace swigluk {

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// ---------------------------------------------------------------------------------------------
// Launch shape (both kernels): block = 256 threads, 1-D grid = min(ceil(n / 8 / 256), cap), grid-stride.
// Vector path (every pointer 16-byte aligned): each thread takes 8 consecutive elements per step with
// 16-byte loads and stores (npvec), the n % 8 tail element by element; otherwise one element per thread
// per step (64-bit index). Same per-element math on both paths. No shared memory.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float forward1(float z, float v) { return (z * sigmoid(z)) * v; }

__device__ __forceinline__ void backward1(float z, float v, float d, float& dg, float& du)
{
    const float sg = sigmoid(z);
    const float silu = z * sg;
    const float dsilu = sg * (1.0f + z * (1.0f - sg));
    dg = d * v * dsilu;
    du = d * silu;
}

template <typename T>
__device__ void forward_body(const T* g, const T* u, T* h, long long n)
{
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (npvec::aligned16(g) && npvec::aligned16(u) && npvec::aligned16(h))
    {
        const long long n8 = n / 8;
        for (long long v = first; v < n8; v += stride)
        {
            float z[8], x[8], y[8];
            npvec::load8(g + 8 * v, z);
            npvec::load8(u + 8 * v, x);
            NP_UNROLL
            for (int k = 0; k < 8; k++) y[k] = forward1(z[k], x[k]);
            npvec::store8(h + 8 * v, y);
        }
        done = 8 * n8;
    }
    for (long long i = done + first; i < n; i += stride)
        h[i] = from_f32<T>(forward1(to_f32(g[i]), to_f32(u[i])));
}

template <typename T>
__device__ void backward_body(const T* g, const T* u, const T* dh, T* dg, T* du, long long n)
{
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (npvec::aligned16(g) && npvec::aligned16(u) && npvec::aligned16(dh) && npvec::aligned16(dg) && npvec::aligned16(du))
    {
        const long long n8 = n / 8;
        for (long long v = first; v < n8; v += stride)
        {
            float z[8], x[8], d[8], a[8], b[8];
            npvec::load8(g + 8 * v, z);
            npvec::load8(u + 8 * v, x);
            npvec::load8(dh + 8 * v, d);
            NP_UNROLL
            for (int k = 0; k < 8; k++) backward1(z[k], x[k], d[k], a[k], b[k]);
            npvec::store8(dg + 8 * v, a);
            npvec::store8(du + 8 * v, b);
        }
        done = 8 * n8;
    }
    for (long long i = done + first; i < n; i += stride)
    {
        float a, b;
        backward1(to_f32(g[i]), to_f32(u[i]), to_f32(dh[i]), a, b);
        dg[i] = from_f32<T>(a);
        du[i] = from_f32<T>(b);
    }
}

}  // namespace swigluk

// swiglu_forward_{f32,bf16}(g[n], u[n], h[n], n)
// Launch: block 256, grid min(ceil(n/8/256), cap), shared 0.
NP_KERNEL(swiglu_forward_f32, (const float* g, const float* u, float* h, long long n))
{ swigluk::forward_body<float>(g, u, h, n); }
NP_KERNEL(swiglu_forward_bf16, (const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* h, long long n))
{ swigluk::forward_body<__nv_bfloat16>(g, u, h, n); }

// swiglu_backward_{f32,bf16}(g[n], u[n], dh[n], dg[n], du[n], n)
// Launch: block 256, grid min(ceil(n/8/256), cap), shared 0.
NP_KERNEL(swiglu_backward_f32, (const float* g, const float* u, const float* dh, float* dg, float* du, long long n))
{ swigluk::backward_body<float>(g, u, dh, dg, du, n); }
NP_KERNEL(swiglu_backward_bf16, (const __nv_bfloat16* g, const __nv_bfloat16* u, const __nv_bfloat16* dh, __nv_bfloat16* dg, __nv_bfloat16* du, long long n))
{ swigluk::backward_body<__nv_bfloat16>(g, u, dh, dg, du, n); }
