// common.cuh: the one include of every kernels/*.cu file.
// Under nvcc it pulls in the CUDA headers; compiled as C++ for the emulator it pulls in
// emu/cuda_emu.h, which provides the CUDA execution model on the CPU.
//
// Conventions (see ../shared/DESIGN.md):
//   extern "C" __global__ void name_dtype(...) { ... }
//   EMU_REGISTER(name_dtype)            // after each kernel; empty under nvcc
//   EMU_DYNAMIC_SHARED(float, smem);    // instead of: extern __shared__ float smem[]; (16-byte aligned)
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

// Full unrolling of a loop with a compile-time trip count (keeps per-thread fragment arrays in registers).
#if defined(__CUDACC__)
#define NP_UNROLL _Pragma("unroll")
#else
#define NP_UNROLL _Pragma("GCC unroll 64")
#endif
