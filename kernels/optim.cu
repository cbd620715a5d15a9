// optim.cu: the optimizer kernels (launcher: src/NativePeft/Optim/GpuOptimKernels.cs; C# twin: src/NativePeft/Optim/AdamWMath.cs).
//
//   adamw_f32                 one AdamW step on fp32 params, grads and fp32 states m, v (grid-stride)
//   adamw8bit_blockwise       one AdamW step with m, v blockwise 8-bit (dynamic maps, absmax per 256): dequantize,
//                             update, find the new block absmax, requantize — one thread block per quantization block
//   (the sum of squares of global-norm clipping is elementwise.cu's sum_squares_f32 / reduce_sum_f64)
//
// The AdamW step (torch.optim.AdamW's order: decoupled weight decay applied to p BEFORE the Adam update; bitsandbytes
// applies it after). Every fp32 operation is written out with the _rn intrinsics so nvcc cannot contract a multiply
// and an add into an FMA; the C# twin performs the same IEEE operations in the same order, so the results are bit
// identical on CUDA, on the emulator and in C#. The host passes the step's scalars already rounded to fp32:
//   g     = g_raw * grad_scale
//   m     = fma(beta1, m, omb1 * g)                       omb1 = fp32(1 - beta1)
//   v     = fma(beta2, v, (omb2 * g) * g)                 omb2 = fp32(1 - beta2)
//   p     = p * decay                                     decay = fp32(1 - lr * weight_decay)
//   denom = sqrt(v) / bc2_sqrt + eps                      bc2_sqrt = fp32(sqrt(1 - beta2^t))
//   p     = fma(neg_step, m / denom, p)                   neg_step = fp32(-lr / (1 - beta1^t))
// In the 8-bit kernel m and v are first decoded (map[q] * absmax[block]), the parameter update uses the new fp32
// m and v (as bitsandbytes does), and then m and v are re-encoded with the block's new absmax: q = dQuantize(map,
// x * (1 / absmax)) (bitsandbytes' binary search with midpoint rounding); a block whose absmax is 0 stores the index
// of 0.0 in the map (127 signed, 0 unsigned).
#include "common.cuh"

// The fp32 scalars of one AdamW step, by value (C# mirror: NativePeft.Optim.AdamWStepScalars, the same fields in the
// same order; KernelSourceTests compares its size, offsets and names with np_layout_AdamWScalars below).
struct AdamWScalars
{
    float beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
    float decay;                  // 1 - lr * weight_decay
    float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
    float neg_step_size;          // -lr / (1 - beta1^t)
    float grad_scale;
};
static_assert(sizeof(AdamWScalars) == 36, "AdamWScalars: 9 floats, as the C# mirror");

namespace optk {

__device__ __forceinline__ long long first_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

// One element's update; m and v are updated in place and the new p returned.
__device__ __forceinline__ float adamw_update(float p, float g_raw, float& m, float& v, const AdamWScalars& s)
{
    const float g = __fmul_rn(g_raw, s.grad_scale);
    m = __fmaf_rn(s.beta1, m, __fmul_rn(s.one_minus_beta1, g));
    v = __fmaf_rn(s.beta2, v, __fmul_rn(__fmul_rn(s.one_minus_beta2, g), g));
    p = __fmul_rn(p, s.decay);
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias_correction2_sqrt), s.eps);
    return __fmaf_rn(s.neg_step_size, __fdiv_rn(m, denom), p);
}

}  // namespace optk

// adamw_f32(p[n], g[n], m[n], v[n], n, s: AdamWScalars {beta1, beta2, omb1, omb2, eps, decay, bc2_sqrt, neg_step,
// grad_scale}):
// the step above on every element. Launch: grid-stride, block 256, n/4 threads (any grid gives the same result).
NP_KERNEL(adamw_f32, (float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                      float* __restrict__ v, long long n, const AdamWScalars s))
{
    long long done = 0;
    // Vector path (every array 16-byte aligned): 4 elements a thread per step with float4 loads and stores (16 bytes
    // per access, 7 streams of fp32), then the n % 4 tail; the same per-element update, so the same bits.
    if (npvec::aligned16(p) && npvec::aligned16(g) && npvec::aligned16(m) && npvec::aligned16(v))
    {
        const long long n4 = n / 4;
        for (long long q = optk::first_index(); q < n4; q += optk::grid_stride())
        {
            float4 pv = reinterpret_cast<float4*>(p)[q], mv = reinterpret_cast<float4*>(m)[q], vv = reinterpret_cast<float4*>(v)[q];
            const float4 gv = reinterpret_cast<const float4*>(g)[q];
            pv.x = optk::adamw_update(pv.x, gv.x, mv.x, vv.x, s);
            pv.y = optk::adamw_update(pv.y, gv.y, mv.y, vv.y, s);
            pv.z = optk::adamw_update(pv.z, gv.z, mv.z, vv.z, s);
            pv.w = optk::adamw_update(pv.w, gv.w, mv.w, vv.w, s);
            reinterpret_cast<float4*>(p)[q] = pv;
            reinterpret_cast<float4*>(m)[q] = mv;
            reinterpret_cast<float4*>(v)[q] = vv;
        }
        done = 4 * n4;
    }
    for (long long i = done + optk::first_index(); i < n; i += optk::grid_stride())
    {
        float mi = m[i], vi = v[i];
        p[i] = optk::adamw_update(p[i], g[i], mi, vi, s);
        m[i] = mi;
        v[i] = vi;
    }
}

// adamw8bit_blockwise(p[n], g[n], qm[n] u8, qv[n] u8, absmax_m[nb], absmax_v[nb], code_signed[256],
// code_unsigned[256], n, s: AdamWScalars), nb = ceil(n / 256):
// thread t of quantization block b owns element b*256 + t. m is coded with the signed map, v with the unsigned map.
// Launch: block 256 (exactly), grid = any G >= 1 (blocks stride over the nb quantization blocks), shared 0.
// Block max: a fixed shared-memory tree of fmaxf (exact, so order does not matter).
NP_KERNEL(adamw8bit_blockwise, (float* __restrict__ p, const float* __restrict__ g,
                                unsigned char* __restrict__ qm, unsigned char* __restrict__ qv,
                                float* __restrict__ absmax_m, float* __restrict__ absmax_v,
                                const float* __restrict__ code_signed,
                                const float* __restrict__ code_unsigned, long long n, const AdamWScalars s))
{
    __shared__ float s_code_m[256];
    __shared__ float s_code_v[256];
    __shared__ float s_max_m[256];
    __shared__ float s_max_v[256];

    const int t = (int)threadIdx.x;
    s_code_m[t] = code_signed[t];
    s_code_v[t] = code_unsigned[t];
    __syncthreads();

    const long long nb = (n + 255) / 256;
    for (long long b = blockIdx.x; b < nb; b += gridDim.x)
    {
        const long long i = b * 256 + t;
        const bool valid = i < n;
        float mi = 0.0f, vi = 0.0f;
        if (valid)
        {
            mi = __fmul_rn(s_code_m[qm[i]], absmax_m[b]);
            vi = __fmul_rn(s_code_v[qv[i]], absmax_v[b]);
            p[i] = optk::adamw_update(p[i], g[i], mi, vi, s);
        }
        s_max_m[t] = fabsf(mi);
        s_max_v[t] = fabsf(vi);
        __syncthreads();
        for (int half = 128; half > 0; half >>= 1)
        {
            if (t < half)
            {
                s_max_m[t] = fmaxf(s_max_m[t], s_max_m[t + half]);
                s_max_v[t] = fmaxf(s_max_v[t], s_max_v[t + half]);
            }
            __syncthreads();
        }
        const float am = s_max_m[0], av = s_max_v[0];
        __syncthreads();  // s_max_* are rewritten by the next quantization block
        if (t == 0)
        {
            absmax_m[b] = am;
            absmax_v[b] = av;
        }
        if (valid)
        {
            qm[i] = am == 0.0f ? (unsigned char)127 : dquantize_nearest(s_code_m, __fmul_rn(mi, __fdiv_rn(1.0f, am)));
            qv[i] = av == 0.0f ? (unsigned char)0 : dquantize_nearest(s_code_v, __fmul_rn(vi, __fdiv_rn(1.0f, av)));
        }
    }
}

NP_PARAMS_LAYOUT(AdamWScalars, offsetof(AdamWScalars, beta1), offsetof(AdamWScalars, beta2),
                 offsetof(AdamWScalars, one_minus_beta1), offsetof(AdamWScalars, one_minus_beta2),
                 offsetof(AdamWScalars, eps), offsetof(AdamWScalars, decay),
                 offsetof(AdamWScalars, bias_correction2_sqrt), offsetof(AdamWScalars, neg_step_size),
                 offsetof(AdamWScalars, grad_scale))
