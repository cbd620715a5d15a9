// elementwise.cu: the small elementwise kernels of a training step (launcher: src/NativePeft/Ops/GpuElementwiseOps.cs).
//
//   fill_{f32,bf16}             y[i] = value                       (bf16: value rounded to nearest even)
//   cast_f32_to_bf16            y[i] = bf16_rn(x[i])               (round to nearest even, NaN stays NaN)
//   cast_bf16_to_f32            y[i] = x[i]                        (exact)
//   add_{f32,bf16}              c[i] = a[i] + b[i]                 (fp32 add, one rounding; c may alias a or b)
//   axpy_f32                    y[i] += alpha * x[i]               (fmaf: one rounding on both targets)
//   scale_{f32,bf16}            y[i] = alpha * x[i]                (y may alias x)
//   dropout_mask                mask[i] = keep(seed, offset + i)   (uint8 1 keep / 0 drop, Philox-4x32-10)
//   apply_mask_scale_{f32,bf16} y[i] = mask[i] ? x[i] * scale : 0  (scale = 1/(1-p) from the host; y may alias x)
//   sum_squares_f32             partials[b] = sum of x^2 over block b's slice, in double (pass 1; global-norm clipping)
//   reduce_sum_f64              out[0] += sum of partials[0..count) (pass 2, one block, fixed order; accumulates over
//                               tensors)
//
// Sizes are 64-bit element counts n. The elementwise kernels are grid-stride loops: any grid gives the same result
// (the host picks grid = min(ceil(n/256), 16 * SMs), block 256). sum_squares_f32 is deterministic for a given grid,
// and the host derives its grid from n alone (GpuElementwiseOps.SumSquaresBlocks), so the sum does not depend on the
// device; its double arithmetic is written with the _rn intrinsics so that nvcc cannot contract x*x + acc into a DFMA
// (the emulator does not either): the same bits on every device.
//
// Dropout RNG: element e = offset + i (a 64-bit counter) is decided by Philox-4x32-10 (Salmon et al., SC'11; Random123)
// with key (seed_lo, seed_hi) and counter (e >> 2 low word, e >> 2 high word, 0, 0): word (e & 3) of the output is
// r, and the element is dropped iff r < drop_threshold, where drop_threshold = round(p * 2^32) (capped at 2^32 - 1) is
// computed by the host. The mask is a pure function of (seed, e, threshold); GpuElementwiseOps.DropoutMaskHost is the
// bit-identical C# twin. (Not torch's dropout stream: same distribution, different numbers.)
#include "common.cuh"

namespace ewk {

__device__ __forceinline__ long long first_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

// Philox-4x32-10 (common.cuh): word `lane` (0..3) of the output block for counter (c0, c1, 0, 0) and key (k0, k1).
__device__ __forceinline__ unsigned int philox4x32_10_word(unsigned int c0, unsigned int c1, unsigned int k0,
                                                           unsigned int k1, int lane)
{
    unsigned int w[4];
    nprng::philox4x32_10(((unsigned long long)c1 << 32) | c0, ((unsigned long long)k1 << 32) | k0, w);
    return lane == 0 ? w[0] : lane == 1 ? w[1] : lane == 2 ? w[2] : w[3];
}

template <typename T>
__device__ void fill_body(T* y, long long n, float value)
{
    const T v = from_f32<T>(value);
    for (long long i = first_index(); i < n; i += grid_stride()) y[i] = v;
}

// Vector path when every pointer is 16-byte aligned: 8 consecutive elements per thread per step with 16-byte
// accesses (npvec), then the n % 8 tail element by element; same math on both paths. The host sizes the grid
// for n / 8 threads (grid-stride: any grid is correct).
template <typename T>
__device__ void add_body(const T* a, const T* b, T* c, long long n)
{
    long long done = 0;
    if (npvec::aligned16(a) && npvec::aligned16(b) && npvec::aligned16(c))
    {
        const long long n8 = n / 8;
        for (long long v = first_index(); v < n8; v += grid_stride())
        {
            float x[8], y[8];
            npvec::load8(a + 8 * v, x);
            npvec::load8(b + 8 * v, y);
            NP_UNROLL
            for (int k = 0; k < 8; k++) x[k] += y[k];
            npvec::store8(c + 8 * v, x);
        }
        done = 8 * n8;
    }
    for (long long i = done + first_index(); i < n; i += grid_stride()) c[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename T>
__device__ void scale_body(const T* x, T* y, long long n, float alpha)
{
    for (long long i = first_index(); i < n; i += grid_stride()) y[i] = from_f32<T>(alpha * to_f32(x[i]));
}

template <typename T>
__device__ void apply_mask_scale_body(const T* x, const unsigned char* __restrict__ mask, T* y, long long n, float scale)
{
    for (long long i = first_index(); i < n; i += grid_stride())
        y[i] = from_f32<T>(mask[i] != 0 ? to_f32(x[i]) * scale : 0.0f);
}

}  // namespace ewk

// fill_{f32,bf16}(y[n], n, value). Launch: grid-stride, block 256.
NP_KERNEL(fill_f32, (float* y, long long n, float value)) { ewk::fill_body<float>(y, n, value); }
                     NP_KERNEL(fill_bf16, (__nv_bfloat16* y, long long n, float value)) { ewk::fill_body<__nv_bfloat16>(y, n, value); }
                     
                     // cast_f32_to_bf16(x[n], y[n], n), cast_bf16_to_f32(x[n], y[n], n). Launch: grid-stride, block 256.
                     NP_KERNEL(cast_f32_to_bf16, (const float* __restrict__ x, __nv_bfloat16* __restrict__ y, long long n))
{
    for (long long i = ewk::first_index(); i < n; i += ewk::grid_stride()) y[i] = __float2bfloat16_rn(x[i]);
}
NP_KERNEL(cast_bf16_to_f32, (const __nv_bfloat16* __restrict__ x, float* __restrict__ y, long long n))
{
    for (long long i = ewk::first_index(); i < n; i += ewk::grid_stride()) y[i] = __bfloat162float(x[i]);
}

// add_{f32,bf16}(a[n], b[n], c[n], n): c = a + b; c may alias a or b. Launch: grid-stride, block 256, n/8 threads.
NP_KERNEL(add_f32, (const float* a, const float* b, float* c, long long n)) { ewk::add_body<float>(a, b, c, n); }
                    NP_KERNEL(add_bf16, (const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* c, long long n))
{ ewk::add_body<__nv_bfloat16>(a, b, c, n); }

// axpy_f32(alpha, x[n], y[n], n): y = fmaf(alpha, x, y) (one rounding). Launch: grid-stride, block 256.
NP_KERNEL(axpy_f32, (float alpha, const float* __restrict__ x, float* __restrict__ y, long long n))
{
    for (long long i = ewk::first_index(); i < n; i += ewk::grid_stride()) y[i] = fmaf(alpha, x[i], y[i]);
}

// scale_{f32,bf16}(x[n], y[n], n, alpha): y = alpha * x; y may alias x. Launch: grid-stride, block 256.
NP_KERNEL(scale_f32, (const float* x, float* y, long long n, float alpha)) { ewk::scale_body<float>(x, y, n, alpha); }
                      NP_KERNEL(scale_bf16, (const __nv_bfloat16* x, __nv_bfloat16* y, long long n, float alpha))
{ ewk::scale_body<__nv_bfloat16>(x, y, n, alpha); }

// dropout_mask(mask[n] uint8, n, seed, offset, drop_threshold): mask[i] = philox_word(seed, offset + i) >= drop_threshold.
// Launch: grid-stride, block 256.
NP_KERNEL(dropout_mask, (unsigned char* __restrict__ mask, long long n, unsigned long long seed,
                         unsigned long long offset, unsigned int drop_threshold))
{
    const unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    for (long long i = ewk::first_index(); i < n; i += ewk::grid_stride())
    {
        const unsigned long long e = offset + (unsigned long long)i;
        const unsigned long long block = e >> 2;
        const unsigned int r = ewk::philox4x32_10_word((unsigned int)block, (unsigned int)(block >> 32), k0, k1, (int)(e & 3u));
        mask[i] = r >= drop_threshold ? (unsigned char)1 : (unsigned char)0;
    }
}

// apply_mask_scale_{f32,bf16}(x[n], mask[n], y[n], n, scale): y = mask ? x * scale : 0; y may alias x.
// Launch: grid-stride, block 256.
NP_KERNEL(apply_mask_scale_f32, (const float* x, const unsigned char* mask, float* y, long long n, float scale))
{ ewk::apply_mask_scale_body<float>(x, mask, y, n, scale); }
NP_KERNEL(apply_mask_scale_bf16, (const __nv_bfloat16* x, const unsigned char* mask, __nv_bfloat16* y, long long n, float scale))
{ ewk::apply_mask_scale_body<__nv_bfloat16>(x, mask, y, n, scale); }

// sum_squares_f32(x[n], n, partials[gridDim.x] double): block b sums x[i]^2 in double over i = b*256 + t,
// += gridDim.x*256, thread t in index order, then a fixed shared-memory tree; partials[b] = the block's sum.
// Launch: grid G (the host takes G from n alone, at most 1024), block 256 (exactly), shared 0.
NP_KERNEL(sum_squares_f32, (const float* __restrict__ x, long long n, double* __restrict__ partials))
{
    __shared__ double s[256];
    const int t = (int)threadIdx.x;
    double acc = 0.0;
    for (long long i = ewk::first_index(); i < n; i += ewk::grid_stride())
    {
        const double v = (double)x[i];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    s[t] = acc;
    __syncthreads();
    for (int half = 128; half > 0; half >>= 1)
    {
        if (t < half) s[t] = __dadd_rn(s[t], s[t + half]);
        __syncthreads();
    }
    if (t == 0) partials[blockIdx.x] = s[0];
}

// reduce_sum_f64(partials[count], count, out[1] double): out[0] += the sum of partials (thread t adds entries t, t+256,
// ... in order, then a fixed tree), so several tensors accumulate into one output. Launch: grid 1, block 256
// (exactly), shared 0.
NP_KERNEL(reduce_sum_f64, (const double* __restrict__ partials, int count, double* __restrict__ out))
{
    __shared__ double s[256];
    const int t = (int)threadIdx.x;
    double acc = 0.0;
    for (int i = t; i < count; i += 256) acc = __dadd_rn(acc, partials[i]);
    s[t] = acc;
    __syncthreads();
    for (int half = 128; half > 0; half >>= 1)
    {
        if (t < half) s[t] = __dadd_rn(s[t], s[t + half]);
        __syncthreads();
    }
    if (t == 0) out[0] = __dadd_rn(out[0], s[0]);
}
