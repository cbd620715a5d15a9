// rope.cu: rotary position embedding, HF rotate_half layout (NOT interleaved), in place.
// docs/ops-contract.md "RoPE".
//
//   x[n, h, :] (D even, half = D/2), p = pos[n], c = cos[p, i], s = sin[p, i] (fp32 tables [P, half])
//   forward : out[i] = x[i]*c - x[i+half]*s ;  out[i+half] = x[i+half]*c + x[i]*s      (i < half)
//   backward: the same rotation with -angle (s negated): dx from dy, also in place.
//
// T (x) is float or __nv_bfloat16, math in fp32, one rounding per output. Rows (tokens) may be
// strided: row n starts at x + n * row_stride (elements), row_stride >= H * D, so q and k can be
// rotated in place inside a fused qkv projection output. A position outside [0, P) traps
// (device-side assert; the host overloads validate first).
//
// C ABI: rope_forward_{f32,bf16}, rope_backward_{f32,bf16}.
#include "common.cuh"

namespace ropek {

// ---------------------------------------------------------------------------------------------
// Launch shape: grid = N (one block per token), block = min(256, 32 * ceil(H * D/2 / 32)) threads,
// no shared memory. The block's threads stride over the H * D/2 rotation pairs of the token
// (j = threadIdx.x, += blockDim.x; h = j / half, i = j % half): consecutive threads touch
// consecutive elements of a head, and the token's cos/sin rows are read once per head (L1 hits).
// Each pair is read, then written by the same thread, so the rotation is safe in place.
// ---------------------------------------------------------------------------------------------
template <typename T, bool Inverse>
__device__ void rope_body(T* x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                          const int* __restrict__ pos, int N, int H, int D, int P, long long row_stride)
{
    const int n = (int)blockIdx.x;
    if (n >= N) return;
    const int half = D >> 1;
    const int p = pos[n];
    if (p < 0 || p >= P) __trap();
    const float* cr = cos_t + (long long)p * half;
    const float* sr = sin_t + (long long)p * half;
    T* xr = x + (long long)n * row_stride;
    const int pairs = H * half;
    // Vector path (half % 8 == 0, row_stride % 8 == 0, x 16-byte aligned, so are the tables' rows): 8
    // consecutive pairs of one head per thread per step, 16-byte accesses to x and the tables.
    if ((half & 7) == 0 && (row_stride & 7) == 0 && npvec::aligned16(x) && npvec::aligned16(cos_t) && npvec::aligned16(sin_t))
    {
        for (int j = 8 * (int)threadIdx.x; j < pairs; j += 8 * (int)blockDim.x)
        {
            const int h = j / half;
            const int i = j - h * half;
            T* xh = xr + (long long)h * D;
            float c[8], sn[8], a[8], b[8], lo[8], hi[8];
            npvec::load8(cr + i, c);
            npvec::load8(sr + i, sn);
            npvec::load8(xh + i, a);
            npvec::load8(xh + i + half, b);
            NP_UNROLL
            for (int k = 0; k < 8; k++)
            {
                const float s = Inverse ? -sn[k] : sn[k];
                lo[k] = a[k] * c[k] - b[k] * s;
                hi[k] = b[k] * c[k] + a[k] * s;
            }
            npvec::store8(xh + i, lo);
            npvec::store8(xh + i + half, hi);
        }
        return;
    }
    for (int j = (int)threadIdx.x; j < pairs; j += (int)blockDim.x)
    {
        const int h = j / half;
        const int i = j - h * half;
        T* xh = xr + (long long)h * D;
        const float c = cr[i];
        const float s = Inverse ? -sr[i] : sr[i];
        const float a = to_f32(xh[i]);
        const float b = to_f32(xh[i + half]);
        xh[i] = from_f32<T>(a * c - b * s);
        xh[i + half] = from_f32<T>(b * c + a * s);
    }
}

}  // namespace ropek

// rope_forward_{f32,bf16}(x[N rows of row_stride, H, D] in place, cos[P, D/2], sin[P, D/2], pos[N], N, H, D, P, row_stride)
// Launch: grid N, block min(256, 32*ceil(H*D/2/32)), shared 0.
NP_KERNEL(rope_forward_f32, (float* x, const float* cos_t, const float* sin_t, const int* pos, int N, int H, int D, int P, long long row_stride))
{ ropek::rope_body<float, false>(x, cos_t, sin_t, pos, N, H, D, P, row_stride); }
NP_KERNEL(rope_forward_bf16, (__nv_bfloat16* x, const float* cos_t, const float* sin_t, const int* pos, int N, int H, int D, int P, long long row_stride))
{ ropek::rope_body<__nv_bfloat16, false>(x, cos_t, sin_t, pos, N, H, D, P, row_stride); }

// rope_backward_{f32,bf16}(dy -> dx in place, same arguments and launch shape as the forward)
NP_KERNEL(rope_backward_f32, (float* x, const float* cos_t, const float* sin_t, const int* pos, int N, int H, int D, int P, long long row_stride))
{ ropek::rope_body<float, true>(x, cos_t, sin_t, pos, N, H, D, P, row_stride); }
NP_KERNEL(rope_backward_bf16, (__nv_bfloat16* x, const float* cos_t, const float* sin_t, const int* pos, int N, int H, int D, int P, long long row_stride))
{ ropek::rope_body<__nv_bfloat16, true>(x, cos_t, sin_t, pos, N, H, D, P, row_stride); }
