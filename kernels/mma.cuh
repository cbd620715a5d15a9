// mma.cuh: the warp-level matrix instructions and asynchronous copies of sm_80+, one source for nvcc
// and the emulator. Under nvcc each function is the PTX instruction (inline asm); compiled for the
// emulator it is the emulator's warp collective with the PTX ISA's semantics (kernels/emu/cuda_emu.h),
// so a kernel written against these functions runs unchanged on both.
//
//   mma_bf16_16816(d, a, b, c)   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D = A B + C,
//                                A 16x16 (4 regs), B 16x8 (2 regs), C/D 16x8 fp32 (4 floats), with the
//                                PTX ISA fragment layout (g = lane / 4, t = lane % 4):
//                                  a0 A[g][2t..2t+1]  a1 A[g+8][2t..]  a2 A[g][2t+8..]  a3 A[g+8][2t+8..]
//                                  b0 B[2t..2t+1][g]  b1 B[2t+8..2t+9][g]
//                                  c0,c1 C[g][2t], C[g][2t+1]   c2,c3 C[g+8][2t], C[g+8][2t+1]
//                                (lower column / k index in bits 0-15 of a register).
//   ldmatrix_x{1,2,4}[_trans](r, row)  ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16: lane
//                                8m + i gives row i of matrix m (16 bytes, 16-byte aligned, shared
//                                memory); register m of lane 4i + w holds M_m[i][2w..2w+1] (.trans:
//                                M_m[2w][i], M_m[2w+1][i]).
//   cp_async_16(dst, src, n)     cp.async.cg.shared.global, 16 bytes; bytes n..15 are zero-filled (n = 0
//                                fills the whole chunk with zeros and reads nothing).
//   cp_async_commit()            cp.async.commit_group
//   cp_async_wait<N>()           cp.async.wait_group N: all but the newest N committed groups are done.
//   pack_bf16(lo, hi)            two floats rounded to bf16 (nearest even) in one register, lo in bits 0-15.
//   fast_exp2(x)                 ex2.approx.ftz.f32 (the emulator: exp2f; the two differ by ~2^-22 relative).
//
// All mma/ldmatrix calls are warp collectives: every lane of the warp must call them convergently.
#pragma once
#include "common.cuh"

namespace npmma {

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    const uint32_t l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const uint32_t h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return l | (h << 16);
}

#if defined(__CUDACC__)

__device__ __forceinline__ uint32_t smem_addr(const void* p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                               const float (&c)[4])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
// "memory" clobbers: no shared-memory access may be moved across a commit or a wait by the compiler.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x by the SFU (MUFU.EX2, relative error about 2^-22, subnormal results flushed to 0): the softmax's exp, as
// FlashAttention's (exp2f would add a range fix-up around each MUFU.EX2). -inf gives 0.
__device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

#else  // the emulator

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                               const float (&c)[4])
{
    ::emu::mma_m16n8k16_bf16(d, a, b, c);
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) { ::emu::ldmatrix_m8n8(r, 1, false, row); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) { ::emu::ldmatrix_m8n8(r, 2, false, row); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix_m8n8(r, 4, false, row); }
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) { ::emu::ldmatrix_m8n8(r, 1, true, row); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { ::emu::ldmatrix_m8n8(r, 2, true, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix_m8n8(r, 4, true, row); }
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) { ::emu::cp_async_16(dst, src, src_bytes); }
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { ::emu::cp_async_wait(N); }
__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }

#endif

}  // namespace npmma
