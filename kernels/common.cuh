// common.cuh: the one include of every kernels/*.cu file.
// Under nvcc it pulls in the CUDA headers; compiled as C++ for the emulator it pulls in
// emu/cuda_emu.h, which provides the CUDA execution model on the CPU.
//
// Conventions (see docs/design.md, "Kernel ABI"):
//   NP_KERNEL(name_dtype, (params)) { ... }                       // every entry point, through the macro
//   NP_KERNEL_BOUNDED(name_dtype, max_threads, (params)) { ... }  // the same with __launch_bounds__(max_threads)
//   EMU_DYNAMIC_SHARED(float, smem);    // instead of: extern __shared__ float smem[]; (16-byte aligned)
// A kernel with many arguments takes one parameter struct by value (FlashAttention's Flash_fwd_params), followed in one
// .cu file by NP_PARAMS_LAYOUT so its size and field offsets are exported from the emulator library
// (np_layout_<struct>) for the C# mirror's test (see attention_tc.cuh's AttnTcParams; `const __grid_constant__ S p`
// where that keeps ptxas' registers as they were with separate parameters, attention_tc.cu).
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define EMU_REGISTER(kernel)
#define EMU_DYNAMIC_SHARED(T, name) \
    extern __shared__ __align__(16) unsigned char np_dynamic_smem[]; \
    T* name = reinterpret_cast<T*>(np_dynamic_smem)
#else
#include "emu/cuda_emu.h"
#endif

// --- entry points ------------------------------------------------------------------------------
// NP_KERNEL(name, (params)) { body } declares the extern "C" entry point `name`, registers it with the emulator
// (EMU_REGISTER: a static registrar in libnativepeft_emu; nothing under nvcc) and opens its definition: the one place
// an entry point's C name, its parameter list and its registration are written (bitsandbytes' MAKE_FUNC style).
// A test (KernelSourceTests) fails when `extern "C" __global__` or EMU_REGISTER appears anywhere else.
#define NP_KERNEL(name, params)                 \
    extern "C" __global__ void name params;     \
    EMU_REGISTER(name)                          \
    extern "C" __global__ void name params
#define NP_KERNEL_BOUNDED(name, max_threads, params)                         \
    extern "C" __global__ void __launch_bounds__(max_threads) name params;   \
    EMU_REGISTER(name)                                                       \
    extern "C" __global__ void __launch_bounds__(max_threads) name params

// NP_PARAMS_LAYOUT(S, offsetof(S, first), ...) after a parameter struct S, in one .cu file: in the emulator library an
// exported `extern "C" int np_layout_S(long long* out, int max)` that writes sizeof(S) and then the listed offsets
// (the fields in declaration order) and returns how many values it has; nothing under nvcc, where the static_assert on
// sizeof beside the struct checks that the device compiler agrees. The C# mirror's test compares them with
// Unsafe.SizeOf and Marshal.OffsetOf.
#if defined(__CUDACC__)
#define NP_PARAMS_LAYOUT(S, ...)
#else
#define NP_PARAMS_LAYOUT(S, ...)                                                                  \
    extern "C" __attribute__((visibility("default"))) int np_layout_##S(long long* out, int max) \
    {                                                                                            \
        const long long v[] = {(long long)sizeof(S), __VA_ARGS__};                               \
        const int n = (int)(sizeof(v) / sizeof(v[0]));                                           \
        for (int i = 0; i < n && i < max; i++) out[i] = v[i];                                    \
        return n;                                                                                \
    }
#endif

// Full unrolling of a loop with a compile-time trip count (keeps per-thread fragment arrays in registers).
#if defined(__CUDACC__)
#define NP_UNROLL _Pragma("unroll")
#else
#define NP_UNROLL _Pragma("GCC unroll 64")
#endif

// --- element conversion ------------------------------------------------------------------------
// Every kernel converts its storage type to fp32 to compute and back to store, with these (defined once here):
// bf16/f16 -> f32 is exact; f32 -> bf16/f16 rounds to nearest even (__float2bfloat16 and __float2bfloat16_rn are the
// same rounding, on the GPU and in the emulator).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// --- the 8-bit dynamic map's code search -----------------------------------------------------------
// bitsandbytes' dQuantize<0> (csrc/kernels.cu): binary search over the sorted 256-entry map, then midpoint rounding
// between the neighbours; same comparisons, same order (C#: Quantization.Dynamic8Bit.Encode). Used by the double
// quantization of absmax (nf4.cu) and the 8-bit optimizer states (optim.cu).
__device__ __forceinline__ unsigned char dquantize_nearest(const float* code, float x)
{
    int pivot = 127;
    int upper_pivot = 255;
    int lower_pivot = 0;
    float lower = -1.0f;
    float upper = 1.0f;
    float val = code[pivot];
    for (int i = 64; i > 0; i >>= 1)
    {
        if (x > val)
        {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        }
        else
        {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val)
    {
        const float midpoint = (upper + val) * 0.5f;
        return (unsigned char)(x > midpoint ? upper_pivot : pivot);
    }
    const float midpoint = (lower + val) * 0.5f;
    return (unsigned char)(x < midpoint ? lower_pivot : pivot);
}

// --- 16-byte vector access --------------------------------------------------------------------
// Memory-bound kernels move 16 bytes per load/store instruction where the data allows it (LDG.E.128 /
// STG.E.128): a warp of 2-byte loads keeps too few bytes in flight to reach HBM bandwidth. npvec::load8 /
// store8 read and write 8 consecutive elements (one 16-byte access for bf16/f16, two for f32) as fp32,
// converting exactly as the scalar paths do (bf16 -> f32 is exact; f32 -> bf16/f16 rounds to nearest even),
// so a kernel's vector path and its scalar fallback give identical bits. The caller checks alignment
// (npvec::aligned16 on every pointer of the vector path) and falls back to its scalar loop otherwise.
namespace npvec {

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0; }

__device__ __forceinline__ void unpack_bf16x2(unsigned int w, float& lo, float& hi)
{
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi)
{
    return (unsigned int)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) | ((unsigned int)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
__device__ __forceinline__ unsigned int pack_f16x2(float lo, float hi)
{
    return (unsigned int)__half_as_ushort(__float2half_rn(lo)) | ((unsigned int)__half_as_ushort(__float2half_rn(hi)) << 16);
}

__device__ __forceinline__ void load8(const float* p, float (&f)[8])
{
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&f)[8])
{
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    unpack_bf16x2(r.x, f[0], f[1]); unpack_bf16x2(r.y, f[2], f[3]); unpack_bf16x2(r.z, f[4], f[5]); unpack_bf16x2(r.w, f[6], f[7]);
}
__device__ __forceinline__ void load8(const __half* p, float (&f)[8])
{
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    const __half* h = reinterpret_cast<const __half*>(&r);
    NP_UNROLL
    for (int k = 0; k < 8; k++) f[k] = __half2float(h[k]);
}
__device__ __forceinline__ void store8(float* p, const float (&f)[8])
{
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&f)[8])
{
    *reinterpret_cast<uint4*>(p) = make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]), pack_bf16x2(f[6], f[7]));
}
__device__ __forceinline__ void store8(__half* p, const float (&f)[8])
{
    *reinterpret_cast<uint4*>(p) = make_uint4(pack_f16x2(f[0], f[1]), pack_f16x2(f[2], f[3]), pack_f16x2(f[4], f[5]), pack_f16x2(f[6], f[7]));
}

}  // namespace npvec

// --- Philox-4x32-10 (Salmon et al., SC'11; Random123) -----------------------------------------
// The counter-based generator of every dropout mask (elementwise.cu's dropout_mask, lora.cu's in-register masks;
// C# twins: CpuOps.DropoutMask, GpuElementwiseOps.DropoutMaskHost): the four words for counter (block lo, block hi,
// 0, 0) and key (seed lo, seed hi). Element e of a tensor is kept when word e & 3 of block e >> 2 is >= the threshold.
namespace nprng {

__device__ __forceinline__ void philox4x32_10(unsigned long long block, unsigned long long seed, unsigned int (&w)[4])
{
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    unsigned int x0 = (unsigned int)block, x1 = (unsigned int)(block >> 32), x2 = 0u, x3 = 0u;
    NP_UNROLL
    for (int round = 0; round < 10; round++)
    {
        if (round > 0) { k0 += W0; k1 += W1; }
        const unsigned int hi0 = __umulhi(M0, x0), lo0 = M0 * x0;
        const unsigned int hi1 = __umulhi(M1, x2), lo1 = M1 * x2;
        const unsigned int y0 = hi1 ^ x1 ^ k0, y2 = hi0 ^ x3 ^ k1;
        x0 = y0; x1 = lo1; x2 = y2; x3 = lo0;
    }
    w[0] = x0; w[1] = x1; w[2] = x2; w[3] = x3;
}

}  // namespace nprng
