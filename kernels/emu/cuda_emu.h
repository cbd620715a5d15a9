// cuda_emu.h: the CUDA execution model on the CPU, so that unchanged kernels/*.cu compile as C++17
// (g++ >= 12, clang >= 14) into libnativepeft_emu and run there. Included by common.cuh when not
// under nvcc; never include it from a file nvcc compiles.
//
// Model (see emu_runtime.cpp):
//  - a launch runs its blocks on a persistent pool of OS threads; a block's threads run as
//    cooperative fibers on ONE OS thread, switching only at barriers (__syncthreads, __syncwarp,
//    shuffles and votes, which are warp-wide barriers);
//  - static __shared__ is `static thread_local` (one copy per OS thread, and an OS thread runs one
//    block at a time, so one copy per running block); dynamic shared memory is a per-block buffer
//    of the launch's sharedBytes, 16-byte (in fact 64-byte) aligned, reached through
//    EMU_DYNAMIC_SHARED(T, name);
//  - atomics are real atomics (blocks run in parallel).
// Limitations: warp-synchronous code WITHOUT __syncwarp/shuffles (implicit lockstep) is not
// emulated (lanes run one after the other between barriers); __activemask() returns the warp's
// live lanes (no divergence tracking); math functions are the host libm's (the conversions and
// integer/bit intrinsics are bit-exact with CUDA, transcendental functions may differ by an ulp);
// nvcc contracts a*b+c into FMA, the host compiler (without -ffp-contract) does not.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is the host emulation of CUDA; nvcc must not include it"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cfloat>
#include <climits>
#include <cmath>
#include <math.h>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
// __noinline__ is not defined: libstdc++ uses __attribute__((__noinline__)) itself.
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __managed__

#define EMU_HIDDEN __attribute__((visibility("hidden")))

// ---------------------------------------------------------------- vector types
struct uint3 { unsigned int x, y, z; };
struct int3 { int x, y, z; };
struct float3 { float x, y, z; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(2) uchar2 { unsigned char x, y; };
struct alignas(4) short2 { short x, y; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return {x, y, z}; }
inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) { return {x, y, z, w}; }
inline uchar2 make_uchar2(unsigned char x, unsigned char y) { return {x, y}; }
inline short2 make_short2(short x, short y) { return {x, y}; }
inline ushort2 make_ushort2(unsigned short x, unsigned short y) { return {x, y}; }

// ---------------------------------------------------------------- runtime interface
namespace emu {

// Per OS thread (and, for thread_idx, per running fiber: the scheduler rewrites it at each switch).
// __thread, not thread_local: no C++ TLS wrapper call per access (one __tls_get_addr per function).
// Not initial-exec: the __shared__ arrays make the module's TLS too big for glibc's static TLS surplus
// ("cannot allocate memory in static TLS block" at dlopen). Do not build with -mtls-dialect=gnu2
// either: loaded by .NET (dlopen) the kernels then read another thread's/garbage indices.
struct Tls {
    uint3 thread_idx;
    uint3 block_idx;
    uint3 block_dim;
    uint3 grid_dim;
    unsigned char* dynamic_smem;
    void* worker;  // the runtime's per-OS-thread state
};
extern __thread Tls tls EMU_HIDDEN;

enum Collective : int {
    kSyncWarp = 0, kShflIdx = 1, kShflUp = 2, kShflDown = 3, kShflXor = 4,
    kBallot = 5, kAny = 6, kAll = 7, kExchange = 8,
};
enum BlockOp : int { kBarrier = 0, kBarrierCount = 1, kBarrierAnd = 2, kBarrierOr = 3 };

// Implemented in emu_runtime.cpp.
EMU_HIDDEN int block_barrier(int op, int predicate);
EMU_HIDDEN unsigned long long warp_collective(int op, unsigned int mask, unsigned long long value, int b, int c);
EMU_HIDDEN unsigned int active_mask();
[[noreturn]] EMU_HIDDEN void trap(const char* what);

// Warp-level matrix instructions and asynchronous copies (sm_80), reached through kernels/mma.cuh.
// mma and ldmatrix are warp collectives like the shuffles: all 32 lanes must arrive (a missing lane
// is an error, not a hang); the lane that completes the group computes every lane's result from the
// operands all lanes supplied (each waiting lane's operands stay on its fiber's stack).
//   mma_m16n8k16_bf16: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA fragment layout).
//   ldmatrix_m8n8: ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16; row_addr is this lane's row.
//   cp_async_16: cp.async.cg.shared.global 16 bytes, zero-filling bytes [src_bytes, 16).
// Check mode (emu_set_checks): cp.async copies are deferred to the wait that covers them and their
// destinations hold 0xFF bytes (a bf16/fp32 NaN) until then, so a read before the wait shows.
EMU_HIDDEN void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b, const float* c);
EMU_HIDDEN void ldmatrix_m8n8(unsigned* r, int num, bool trans, const void* row_addr);
EMU_HIDDEN void cp_async_16(void* dst, const void* src, int src_bytes);
EMU_HIDDEN void cp_async_commit();
EMU_HIDDEN void cp_async_wait(int pending_groups);

using Thunk = void (*)(void** args);
EMU_HIDDEN void register_kernel(const char* name, Thunk thunk, int param_count, const int* param_sizes);

template <typename F> struct KernelTraits;
template <typename... A> struct KernelTraits<void (*)(A...)> {
    template <void (*K)(A...), std::size_t... I>
    static void call_impl(void** args, std::index_sequence<I...>) {
        K(*static_cast<std::decay_t<A>*>(args[I])...);
    }
    template <void (*K)(A...)>
    static void call(void** args) {
        (void)args;
        call_impl<K>(args, std::index_sequence_for<A...>{});
    }
    static constexpr int count = static_cast<int>(sizeof...(A));
    static const int* sizes() {
        static const int s[sizeof...(A) + 1] = {static_cast<int>(sizeof(std::decay_t<A>))..., 0};
        return s;
    }
};

struct Registrar {
    Registrar(const char* name, Thunk thunk, int count, const int* sizes) {
        register_kernel(name, thunk, count, sizes);
    }
};

template <typename T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles take trivially copyable values of at most 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> inline T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace emu

#define threadIdx (static_cast<const uint3&>(::emu::tls.thread_idx))
#define blockIdx (static_cast<const uint3&>(::emu::tls.block_idx))
#define blockDim (static_cast<dim3>(::emu::tls.block_dim))
#define gridDim (static_cast<dim3>(::emu::tls.grid_dim))
static constexpr int warpSize = 32;

#define EMU_REGISTER(kernel)                                                                   \
    static ::emu::Registrar emu_registrar_##kernel(                                            \
        #kernel, &::emu::KernelTraits<decltype(&kernel)>::template call<&kernel>,              \
        ::emu::KernelTraits<decltype(&kernel)>::count,                                         \
        ::emu::KernelTraits<decltype(&kernel)>::sizes());

#define EMU_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::tls.dynamic_smem)

// ---------------------------------------------------------------- barriers, warp collectives
inline void __syncthreads() { ::emu::block_barrier(::emu::kBarrier, 1); }
inline int __syncthreads_count(int p) { return ::emu::block_barrier(::emu::kBarrierCount, p); }
inline int __syncthreads_and(int p) { return ::emu::block_barrier(::emu::kBarrierAnd, p); }
inline int __syncthreads_or(int p) { return ::emu::block_barrier(::emu::kBarrierOr, p); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::emu::warp_collective(::emu::kSyncWarp, mask, 0, 0, 0); }
inline unsigned int __activemask() { return ::emu::active_mask(); }

template <typename T> inline T __shfl_sync(unsigned int mask, T var, int srcLane, int width = warpSize) {
    return ::emu::from_bits<T>(::emu::warp_collective(::emu::kShflIdx, mask, ::emu::to_bits(var), srcLane,
                                                      ((warpSize - width) << 8) | 0x1f));
}
template <typename T> inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    return ::emu::from_bits<T>(::emu::warp_collective(::emu::kShflUp, mask, ::emu::to_bits(var),
                                                      static_cast<int>(delta), (warpSize - width) << 8));
}
template <typename T> inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
    return ::emu::from_bits<T>(::emu::warp_collective(::emu::kShflDown, mask, ::emu::to_bits(var),
                                                      static_cast<int>(delta), ((warpSize - width) << 8) | 0x1f));
}
template <typename T> inline T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = warpSize) {
    return ::emu::from_bits<T>(::emu::warp_collective(::emu::kShflXor, mask, ::emu::to_bits(var), laneMask,
                                                      ((warpSize - width) << 8) | 0x1f));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    return static_cast<unsigned int>(::emu::warp_collective(::emu::kBallot, mask, predicate != 0, 0, 0));
}
inline int __any_sync(unsigned int mask, int predicate) {
    return static_cast<int>(::emu::warp_collective(::emu::kAny, mask, predicate != 0, 0, 0));
}
inline int __all_sync(unsigned int mask, int predicate) {
    return static_cast<int>(::emu::warp_collective(::emu::kAll, mask, predicate != 0, 0, 0));
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { ::emu::trap("__trap() called"); }
inline void __nanosleep(unsigned int) {}

// ---------------------------------------------------------------- bit casts
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int x; std::memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double d) { long long x; std::memcpy(&x, &d, 8); return x; }

// ---------------------------------------------------------------- atomics (global and shared)
#define EMU_ATOMIC_ORDER __ATOMIC_SEQ_CST
#define EMU_INT_ATOMICS(T)                                                                          \
    inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, EMU_ATOMIC_ORDER); }          \
    inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, EMU_ATOMIC_ORDER); }          \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, EMU_ATOMIC_ORDER); }        \
    inline T atomicCAS(T* p, T cmp, T v) {                                                          \
        __atomic_compare_exchange_n(p, &cmp, v, false, EMU_ATOMIC_ORDER, EMU_ATOMIC_ORDER);        \
        return cmp;                                                                                 \
    }                                                                                               \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, EMU_ATOMIC_ORDER); }          \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, EMU_ATOMIC_ORDER); }            \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, EMU_ATOMIC_ORDER); }          \
    inline T atomicMax(T* p, T v) {                                                                 \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                               \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, EMU_ATOMIC_ORDER, __ATOMIC_RELAXED)) {} \
        return old;                                                                                 \
    }                                                                                               \
    inline T atomicMin(T* p, T v) {                                                                 \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                               \
        while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, EMU_ATOMIC_ORDER, __ATOMIC_RELAXED)) {} \
        return old;                                                                                 \
    }
EMU_INT_ATOMICS(int)
EMU_INT_ATOMICS(unsigned int)
EMU_INT_ATOMICS(unsigned long long)
EMU_INT_ATOMICS(long long)
#undef EMU_INT_ATOMICS

template <typename F, typename U>
inline F emu_atomic_float_op(F* p, F v, F (*op)(F, F)) {
    U* q = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(q, __ATOMIC_RELAXED);
    for (;;) {
        F of; std::memcpy(&of, &old, sizeof(F));
        F nf = op(of, v);
        U nu; std::memcpy(&nu, &nf, sizeof(F));
        if (__atomic_compare_exchange_n(q, &old, nu, true, EMU_ATOMIC_ORDER, __ATOMIC_RELAXED)) return of;
    }
}
inline float atomicAdd(float* p, float v) {
    return emu_atomic_float_op<float, unsigned int>(p, v, [](float a, float b) { return a + b; });
}
inline double atomicAdd(double* p, double v) {
    return emu_atomic_float_op<double, unsigned long long>(p, v, [](double a, double b) { return a + b; });
}
inline float atomicExch(float* p, float v) {
    return __uint_as_float(atomicExch(reinterpret_cast<unsigned int*>(p), __float_as_uint(v)));
}
// Block/system-scoped variants map to the same device-wide atomics.
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicCAS_block atomicCAS
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin

// ---------------------------------------------------------------- integer / bit intrinsics
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return (a << 8 >> 8) * (b << 8 >> 8); }
inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xffffffu) * (b & 0xffffffu); }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }

// ---------------------------------------------------------------- min / max (CUDA's global overloads)
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double max(double a, float b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double min(double a, float b) { return fmin(a, b); }

// ---------------------------------------------------------------- float math
#ifndef INFINITY
#define INFINITY __builtin_inff()
#endif
#define CUDART_INF_F __builtin_inff()
#define CUDART_NAN_F __builtin_nanf("")
#define CUDART_INF __builtin_inf()
#define CUDART_NAN __builtin_nan("")
#define CUDART_PI_F 3.141592654f

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float saturate(float x) { return __saturatef(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned int __float2uint_rn(float x) { return static_cast<unsigned int>(nearbyintf(x)); }
inline unsigned int __float2uint_rz(float x) { return static_cast<unsigned int>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }
inline long long __float2ll_rn(float x) { return static_cast<long long>(nearbyintf(x)); }

// ---------------------------------------------------------------- bf16 / fp16
namespace emu {
// Bit-identical with cuda_bf16.hpp / cuda_fp16.hpp (round to nearest even; NaN -> canonical 0x7FFF).
inline unsigned short float_to_bf16_rn(float f) {
    unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    unsigned int r = x >> 16, rem = x << 16;
    if (rem > 0x80000000u || (rem == 0x80000000u && (r & 1u))) ++r;
    return static_cast<unsigned short>(r);
}
inline unsigned short float_to_bf16_rz(float f) {
    unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<unsigned short>(x >> 16);
}
inline float bf16_to_float(unsigned short h) { return __uint_as_float(static_cast<unsigned int>(h) << 16); }

// Returns the truncated half and the remainder (bits below), as the CUDA host code.
inline unsigned short float_to_half_parts(float f, unsigned int& sign, unsigned int& remainder) {
    unsigned int x = __float_as_uint(f), u = x & 0x7fffffffu, result;
    sign = (x >> 16) & 0x8000u;
    if (u >= 0x7f800000u) { remainder = 0; result = (u == 0x7f800000u) ? (sign | 0x7c00u) : 0x7fffu; }
    else if (u > 0x477fefffu) { remainder = 0x80000000u; result = sign | 0x7bffu; }
    else if (u >= 0x38800000u) { remainder = u << 19; u -= 0x38000000u; result = sign | (u >> 13); }
    else if (u < 0x33000001u) { remainder = u; result = sign; }
    else {
        unsigned int exponent = u >> 23, shift = 0x7eu - exponent, mantissa = (u & 0x7fffffu) | 0x800000u;
        remainder = mantissa << (32u - shift);
        result = sign | (mantissa >> shift);
        result &= 0xffffu;
    }
    return static_cast<unsigned short>(result);
}
inline unsigned short float_to_half_rn(float f) {
    unsigned int sign, rem;
    unsigned short r = float_to_half_parts(f, sign, rem);
    if (rem > 0x80000000u || (rem == 0x80000000u && (r & 1u))) ++r;
    return r;
}
inline unsigned short float_to_half_rz(float f) {
    unsigned int sign, rem;
    return float_to_half_parts(f, sign, rem);
}
inline float half_to_float(unsigned short h) {
    unsigned int sign = (h >> 15) & 1u, exponent = (h >> 10) & 0x1fu, mantissa = (h & 0x3ffu) << 13;
    if (exponent == 0x1fu) {
        sign = mantissa != 0 ? (sign >> 1) : sign;
        mantissa = mantissa != 0 ? 0x7fffffu : 0u;
        exponent = 0xffu;
    } else if (exponent == 0) {
        if (mantissa != 0) {
            unsigned int msb;
            exponent = 0x71u;
            do { msb = mantissa & 0x400000u; mantissa <<= 1; --exponent; } while (msb == 0);
            mantissa &= 0x7fffffu;
        }
    } else {
        exponent += 0x70u;
    }
    return __uint_as_float((sign << 31) | (exponent << 23) | mantissa);
}
}  // namespace emu

struct __nv_bfloat16_raw { unsigned short x; };
struct __half_raw { unsigned short x; };

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(::emu::float_to_bf16_rn(f)) {}
    __nv_bfloat16(double d) : __x(::emu::float_to_bf16_rn(static_cast<float>(d))) {}  // note: double rounding
    __nv_bfloat16(int i) : __x(::emu::float_to_bf16_rn(static_cast<float>(i))) {}
    __nv_bfloat16(unsigned int i) : __x(::emu::float_to_bf16_rn(static_cast<float>(i))) {}
    operator float() const { return ::emu::bf16_to_float(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
    __nv_bfloat16& operator=(float f) { __x = ::emu::float_to_bf16_rn(f); return *this; }
    __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) { __x = r.x; return *this; }
};
struct alignas(2) __half {
    unsigned short __x;
    __half() = default;
    __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(::emu::float_to_half_rn(f)) {}
    __half(double d) : __x(::emu::float_to_half_rn(static_cast<float>(d))) {}  // note: double rounding
    __half(int i) : __x(::emu::float_to_half_rn(static_cast<float>(i))) {}
    __half(unsigned int i) : __x(::emu::float_to_half_rn(static_cast<float>(i))) {}
    operator float() const { return ::emu::half_to_float(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
    __half& operator=(float f) { __x = ::emu::float_to_half_rn(f); return *this; }
    __half& operator=(const __half_raw& r) { __x = r.x; return *this; }
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __half half;
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
struct alignas(4) __half2 { __half x, y; };
typedef __nv_bfloat162 nv_bfloat162;
typedef __half2 half2;

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return static_cast<short>(h.__x); }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16_raw{static_cast<unsigned short>(s)}; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __short_as_half(short s) { return __half_raw{static_cast<unsigned short>(s)}; }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16_raw{::emu::float_to_bf16_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16_raw{::emu::float_to_bf16_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { return __nv_bfloat16_raw{::emu::float_to_bf16_rz(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return ::emu::bf16_to_float(h.__x); }
inline __half __float2half(float f) { return __half_raw{::emu::float_to_half_rn(f)}; }
inline __half __float2half_rn(float f) { return __half_raw{::emu::float_to_half_rn(f)}; }
inline __half __float2half_rz(float f) { return __half_raw{::emu::float_to_half_rz(f)}; }
inline float __half2float(__half h) { return ::emu::half_to_float(h.__x); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __float2bfloat16_rn(static_cast<float>(i)); }
inline __half __int2half_rn(int i) { return __float2half_rn(static_cast<float>(i)); }

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__float2bfloat16_rn(f.x), __float2bfloat16_rn(f.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return {__float2half_rn(f.x), __float2half_rn(f.y)}; }
inline __half2 __float2half2_rn(float a) { return {__float2half_rn(a), __float2half_rn(a)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

// Arithmetic: computed in float and rounded once. For + - * / this equals the single correctly
// rounded bf16/fp16 result (float has >= 2p+2 bits for both formats).
#define EMU_HALF_ARITH(H, TO, FROM)                                                                \
    inline H operator+(const H& a, const H& b) { return H(__##TO(FROM(a) + FROM(b))); }             \
    inline H operator-(const H& a, const H& b) { return H(__##TO(FROM(a) - FROM(b))); }             \
    inline H operator*(const H& a, const H& b) { return H(__##TO(FROM(a) * FROM(b))); }             \
    inline H operator/(const H& a, const H& b) { return H(__##TO(FROM(a) / FROM(b))); }             \
    inline H operator-(const H& a) { H r = a; r.__x ^= 0x8000u; return r; }                         \
    inline H& operator+=(H& a, const H& b) { return a = a + b; }                                    \
    inline H& operator-=(H& a, const H& b) { return a = a - b; }                                    \
    inline H& operator*=(H& a, const H& b) { return a = a * b; }                                    \
    inline H& operator/=(H& a, const H& b) { return a = a / b; }                                    \
    inline bool operator==(const H& a, const H& b) { return FROM(a) == FROM(b); }                   \
    inline bool operator!=(const H& a, const H& b) { return FROM(a) != FROM(b); }                   \
    inline bool operator<(const H& a, const H& b) { return FROM(a) < FROM(b); }                     \
    inline bool operator>(const H& a, const H& b) { return FROM(a) > FROM(b); }                     \
    inline bool operator<=(const H& a, const H& b) { return FROM(a) <= FROM(b); }                   \
    inline bool operator>=(const H& a, const H& b) { return FROM(a) >= FROM(b); }                   \
    inline H __hadd(H a, H b) { return a + b; }                                                     \
    inline H __hsub(H a, H b) { return a - b; }                                                     \
    inline H __hmul(H a, H b) { return a * b; }                                                     \
    inline H __hdiv(H a, H b) { return a / b; }                                                     \
    inline H __hfma(H a, H b, H c) { return H(__##TO(fmaf(FROM(a), FROM(b), FROM(c)))); }          \
    inline H __hneg(H a) { return -a; }                                                             \
    inline H __habs(H a) { H r = a; r.__x &= 0x7fffu; return r; }                                   \
    inline H __hmax(H a, H b) { return H(__##TO(fmaxf(FROM(a), FROM(b)))); }                        \
    inline H __hmin(H a, H b) { return H(__##TO(fminf(FROM(a), FROM(b)))); }                        \
    inline bool __heq(H a, H b) { return a == b; }                                                  \
    inline bool __hne(H a, H b) { return a != b; }                                                  \
    inline bool __hlt(H a, H b) { return a < b; }                                                   \
    inline bool __hle(H a, H b) { return a <= b; }                                                  \
    inline bool __hgt(H a, H b) { return a > b; }                                                   \
    inline bool __hge(H a, H b) { return a >= b; }                                                  \
    inline bool __hisnan(H a) { return std::isnan(FROM(a)); }                                      \
    inline bool __hisinf(H a) { return std::isinf(FROM(a)) ? true : false; }
EMU_HALF_ARITH(__nv_bfloat16, float2bfloat16_rn, __bfloat162float)
EMU_HALF_ARITH(__half, float2half_rn, __half2float)
#undef EMU_HALF_ARITH
