// nf4.cu: 4-bit (NF4 / FP4) blockwise quantization, dequantization, double quantization of absmax
// and the one-token 4-bit GEMV. Bit-compatible with bitsandbytes; the exact semantics are in
// docs/quant-contract.md (CPU reference: NativePeft.Quantization, compared bit for bit).
//
// C ABI: extern "C" kernels named <op>_<quant type>_<dtype>, thin wrappers over templated bodies.
//
// Layout reminders
//   - blocks of `blocksize` consecutive elements of the flattened tensor, absmax[b] = max |x| (fp32)
//   - element 2j -> HIGH nibble of packed[j], element 2j+1 -> low nibble; (n+1)/2 bytes
//   - blocksize is a power of two in [32, 4096] (validated by the host); every block spans whole bytes.
#include "common.cuh"

namespace nf4k {

enum { kNF4 = 0, kFP4 = 1 };

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------

// log2 of a power of two (blocksize), without relying on intrinsics.
__device__ __forceinline__ int log2_pow2(int v)
{
    int s = 0;
    while ((1 << s) < v) s++;
    return s;
}

// NF4 index = number of thresholds t with v > t (strict; a value on a threshold goes to the lower code).
__device__ __forceinline__ unsigned char quantize_nf4_value(float v)
{
    int q = 0;
    q += v > -0.8480964004993439f;
    q += v > -0.6106329262256622f;
    q += v > -0.4599952697753906f;
    q += v > -0.33967943489551544f;
    q += v > -0.23460740596055984f;
    q += v > -0.13791173323988914f;
    q += v > -0.045525018125772476f;
    q += v > 0.03979014977812767f;
    q += v > 0.1202552504837513f;
    q += v > 0.2035212516784668f;
    q += v > 0.2920137718319893f;
    q += v > 0.3893125355243683f;
    q += v > 0.5016634166240692f;
    q += v > 0.6427869200706482f;
    q += v > 0.8614784181118011f;
    return (unsigned char)q;
}

// FP4 (E2M1): bitsandbytes' dQuantizeFP4 decision tree on |v|, sign in bit 3.
__device__ __forceinline__ unsigned char quantize_fp4_value(float v)
{
    const unsigned char sign = v < 0.0f ? 8 : 0;
    const float a = fabsf(v);
    unsigned char m;
    if (a > 0.29166667f)
        m = a > 0.583333f ? (a > 0.8333333f ? 0x3 : 0x2) : (a > 0.4166667f ? 0x5 : 0x4);
    else
        m = a > 0.0859375f ? (a > 0.20833333f ? 0x7 : 0x6) : (a > 0.00260417f ? 0x1 : 0x0);
    return (unsigned char)(sign | m);
}

template <int QT>
__device__ __forceinline__ unsigned char quantize_value(float v)
{
    return QT == kNF4 ? quantize_nf4_value(v) : quantize_fp4_value(v);
}

// Code value of a nibble (fp32). Used to fill a 16-entry shared table once per block.
template <int QT>
__device__ __forceinline__ float code_value(int nibble)
{
    if (QT == kNF4)
    {
        switch (nibble)
        {
            case 0: return -1.0f;
            case 1: return -0.6961928009986877f;
            case 2: return -0.5250730514526367f;
            case 3: return -0.39491748809814453f;
            case 4: return -0.28444138169288635f;
            case 5: return -0.18477343022823334f;
            case 6: return -0.09105003625154495f;
            case 7: return 0.0f;
            case 8: return 0.07958029955625534f;
            case 9: return 0.16093020141124725f;
            case 10: return 0.24611230194568634f;
            case 11: return 0.33791524171829224f;
            case 12: return 0.44070982933044434f;
            case 13: return 0.5626170039176941f;
            case 14: return 0.7229568362236023f;
            default: return 1.0f;
        }
    }
    float m;
    switch (nibble & 7)
    {
        case 0: m = 0.0f; break;
        case 1: m = 0.0052083333f; break;
        case 2: m = 0.6666667f; break;
        case 3: m = 1.0f; break;
        case 4: m = 0.33333333f; break;
        case 5: m = 0.5f; break;
        case 6: m = 0.16666667f; break;
        default: m = 0.25f; break;
    }
    return (nibble & 8) ? -m : m;
}

// Fills s_code[0..15]; the caller must __syncthreads() before reading it. Needs blockDim.x >= 16.
template <int QT>
__device__ __forceinline__ void load_code_table(float* s_code)
{
    if (threadIdx.x < 16) s_code[threadIdx.x] = code_value<QT>((int)threadIdx.x);
}

// ---------------------------------------------------------------------------------------------
// quantize_4bit
//
// Launch shape: block = 256 threads (8 warps), 1-D grid = min(ceil(tasks / 8), cap), grid-stride
// over warp tasks. A quant block is handled by a lane group of G = min(32, blocksize/8) lanes (one
// packed byte = two elements per lane per step, at least 4 steps; consecutive lanes on consecutive
// bytes, so loads and stores are coalesced); a warp handles 32/G quant blocks per task (8 for
// blocksize 32, 4 for 64, 2 for 128, 1 for 256..4096), so tasks = ceil(nblocks / (32/G)). absmax is
// a lane-group xor-shuffle max reduction (log2 G shuffles per task), then the lanes re-read their
// elements (L1/L2 hits) and store the nibbles. No shared memory.
// ---------------------------------------------------------------------------------------------
template <int QT, typename T>
__device__ void quantize_4bit_body(const T* __restrict__ x, float* __restrict__ absmax,
                                   uint8_t* __restrict__ packed, long long n, int blocksize)
{
    const int lane = (int)(threadIdx.x & 31);
    const int half_bs = blocksize >> 1;                 // bytes per quant block
    const int G = (blocksize >> 3) < 32 ? (blocksize >> 3) : 32;  // lanes per quant block
    const int group = lane / G;
    const int glane = lane % G;
    const int groups_per_warp = 32 / G;

    const long long nblocks = (n + blocksize - 1) / blocksize;
    const long long nbytes = (n + 1) / 2;
    const long long ntasks = (nblocks + groups_per_warp - 1) / groups_per_warp;
    const long long warp_id = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;

    // Vector path for whole quant blocks (x 16-byte and packed 4-byte aligned, blocksize a multiple of 64, so each
    // lane's 8 elements start at a multiple of 8 and 8·G divides the block): a lane reads 8 elements with one 16-byte
    // load and writes their 4 packed bytes with one 4-byte store; the same per-element arithmetic as the byte path.
    const bool vec = (blocksize & 63) == 0 && npvec::aligned16(x) && (reinterpret_cast<unsigned long long>(packed) & 3ull) == 0;

    for (long long task = warp_id; task < ntasks; task += nwarps)
    {
        const long long b = task * groups_per_warp + group;
        const bool active = b < nblocks;
        const long long byte0 = b * half_bs;
        const long long byte_end = active ? (byte0 + half_bs < nbytes ? byte0 + half_bs : nbytes) : byte0;
        const long long e0 = b * (long long)blocksize;
        const bool whole = vec && active && e0 + blocksize <= n;

        float m = 0.0f;
        if (whole)
        {
            for (long long e = e0 + 8 * glane; e < e0 + blocksize; e += 8 * G)
            {
                float v[8];
                npvec::load8(x + e, v);
                NP_UNROLL
                for (int k = 0; k < 8; k++) m = fmaxf(m, fabsf(v[k]));
            }
        }
        else
        {
            for (long long j = byte0 + glane; j < byte_end; j += G)
            {
                const long long e = 2 * j;
                m = fmaxf(m, fabsf(to_f32(x[e])));
                if (e + 1 < n) m = fmaxf(m, fabsf(to_f32(x[e + 1])));
            }
        }
        // all 32 lanes take part; xor offsets < G stay inside the lane group
        for (int off = G >> 1; off > 0; off >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));

        if (!active) continue;
        if (glane == 0) absmax[b] = m;

        if (whole)
        {
            const float inv = m == 0.0f ? 0.0f : 1.0f / m;
            for (long long e = e0 + 8 * glane; e < e0 + blocksize; e += 8 * G)
            {
                unsigned int word = 0u;  // all-zero block: every nibble 0 (bitsandbytes' CUDA kernel)
                if (m != 0.0f)
                {
                    float v[8];
                    npvec::load8(x + e, v);
                    NP_UNROLL
                    for (int k = 0; k < 4; k++)
                        word |= ((unsigned int)((quantize_value<QT>(v[2 * k] * inv) << 4) | quantize_value<QT>(v[2 * k + 1] * inv))) << (8 * k);
                }
                *reinterpret_cast<unsigned int*>(packed + (e >> 1)) = word;
            }
            continue;
        }
        if (m == 0.0f)
        {
            // all-zero block: every nibble 0 (bitsandbytes' CUDA kernel), padding nibble included
            for (long long j = byte0 + glane; j < byte_end; j += G) packed[j] = 0;
            continue;
        }
        const float inv = 1.0f / m;
        for (long long j = byte0 + glane; j < byte_end; j += G)
        {
            const long long e = 2 * j;
            const float v0 = to_f32(x[e]) * inv;
            const float v1 = (e + 1 < n ? to_f32(x[e + 1]) : 0.0f) * inv;  // odd n: pad with 0.0f
            packed[j] = (uint8_t)((quantize_value<QT>(v0) << 4) | quantize_value<QT>(v1));
        }
    }
}

// The dequantize kernels' vector path: 8 packed bytes (one 8-byte load) -> 16 elements (16-byte stores), all
// in one quantization block (blocksize >= 16, a power of two, and the group starts at a multiple of 16).
// Taken when packed is 8-byte and out 16-byte aligned; the n % 16 tail and unaligned buffers go element by
// element. Same arithmetic (code * absmax in fp32, one rounding) on both paths.
template <typename T>
__device__ __forceinline__ bool vector16_ok(const uint8_t* packed, const T* out, int blocksize)
{
    return blocksize >= 16 && (reinterpret_cast<unsigned long long>(packed) & 7ull) == 0 && npvec::aligned16(out);
}

template <typename T>
__device__ __forceinline__ void dequantize16(uint2 q, float s, const float* s_code, T* out)
{
    float lo[8], hi[8];
    const unsigned int w[2] = {q.x, q.y};
    NP_UNROLL
    for (int k = 0; k < 8; k++)
    {
        const unsigned int byte = (w[k >> 2] >> (8 * (k & 3))) & 0xffu;  // little-endian: packed byte k
        float* dst = k < 4 ? lo : hi;
        dst[2 * (k & 3)] = s_code[byte >> 4] * s;
        dst[2 * (k & 3) + 1] = s_code[byte & 15] * s;
    }
    npvec::store8(out, lo);
    npvec::store8(out + 8, hi);
}

// ---------------------------------------------------------------------------------------------
// dequantize_4bit
//
// Launch shape: block = 256 threads, 1-D grid = min(ceil(n / 16 / 256), cap), grid-stride: 8 packed
// bytes (16 elements) per thread per step on the vector path (vector16_ok), else one byte (two elements,
// same quant block since blocksize is even) per thread per step. out = code[nibble] * absmax[i / blocksize] in fp32, then RNE to T. 64 B shared (code).
// ---------------------------------------------------------------------------------------------
template <int QT, typename T>
__device__ void dequantize_4bit_body(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                     T* __restrict__ out, long long n, int blocksize)
{
    __shared__ float s_code[16];
    load_code_table<QT>(s_code);
    __syncthreads();

    const int shift = log2_pow2(blocksize);
    const long long nbytes = (n + 1) / 2;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;  // packed bytes handled by the vector path
    if (vector16_ok(packed, out, blocksize))
    {
        const long long n16 = n / 16;
        for (long long v = first; v < n16; v += stride)
        {
            const long long e = 16 * v;
            const uint2 q = reinterpret_cast<const uint2*>(packed)[v];
            dequantize16(q, absmax[e >> shift], s_code, out + e);
        }
        done = 8 * n16;
    }
    for (long long j = done + first; j < nbytes; j += stride)
    {
        const unsigned int byte = packed[j];
        const long long e = 2 * j;
        const float s = absmax[e >> shift];
        out[e] = from_f32<T>(s_code[byte >> 4] * s);
        if (e + 1 < n) out[e + 1] = from_f32<T>(s_code[byte & 15] * s);
    }
}

// ---------------------------------------------------------------------------------------------
// dequantize_4bit_dq: dequantize_4bit reading bitsandbytes' double-quantized absmax as stored:
// absmax[b] = code256[qabsmax[b]] * nested_absmax[b / 256] + offset (fp32 multiply, then add, as
// dequantize_absmax_dq and bitsandbytes' dequantize_blockwise + `absmax += offset`), then
// out = code[nibble] * absmax[b] — bit-identical to decoding absmax first. b is block0 + the block of
// the element within [0, n), so a row range of a weight passes its first block. *offset is the
// one-element fp32 nested_offset on the device.
//
// Launch shape: as dequantize_4bit (block 256, grid-stride over packed bytes). Static shared: the
// 16-entry 4-bit code and the 256-entry map (1088 B).
// ---------------------------------------------------------------------------------------------
template <int QT, typename T>
__device__ void dequantize_4bit_dq_body(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ qabsmax,
                                        const float* __restrict__ code256, const float* __restrict__ nested_absmax,
                                        const float* __restrict__ offset, T* __restrict__ out, long long n,
                                        int blocksize, long long block0)
{
    __shared__ float s_code[16];
    __shared__ float s_code256[256];
    load_code_table<QT>(s_code);
    for (int k = (int)threadIdx.x; k < 256; k += (int)blockDim.x) s_code256[k] = code256[k];
    __syncthreads();

    const float off = *offset;
    const int shift = log2_pow2(blocksize);
    const long long nbytes = (n + 1) / 2;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;  // packed bytes handled by the vector path
    if (vector16_ok(packed, out, blocksize))
    {
        const long long n16 = n / 16;
        for (long long v = first; v < n16; v += stride)
        {
            const long long e = 16 * v;
            const long long b = block0 + (e >> shift);
            const float s = __fmul_rn(s_code256[qabsmax[b]], nested_absmax[b >> 8]) + off;
            const uint2 q = reinterpret_cast<const uint2*>(packed)[v];
            dequantize16(q, s, s_code, out + e);
        }
        done = 8 * n16;
    }
    for (long long j = done + first; j < nbytes; j += stride)
    {
        const unsigned int byte = packed[j];
        const long long e = 2 * j;
        const long long b = block0 + (e >> shift);
        const float s = __fmul_rn(s_code256[qabsmax[b]], nested_absmax[b >> 8]) + off;
        out[e] = from_f32<T>(s_code[byte >> 4] * s);
        if (e + 1 < n) out[e + 1] = from_f32<T>(s_code[byte & 15] * s);
    }
}

// ---------------------------------------------------------------------------------------------
// gemv_4bit: y[o] = sum_k W[o,k] * x[k], W [out, in] row-major 4-bit, absmax per block of the
// flattened tensor (element o*in + k), fp32 weights (code * absmax) and fp32 accumulation.
//
// Launch shape: block = 256 threads = 8 warps, one warp per output row, 1-D grid =
// min(ceil(out / 8), cap), grid-stride over rows. When in % 8 == 0 each lane takes 8 consecutive
// elements (4 bytes, one absmax) per step; otherwise one element per lane per step. Warp xor-shuffle
// sum, lane 0 stores y (RNE to T). 64 B shared (code).
// ---------------------------------------------------------------------------------------------
template <int QT, typename T>
__device__ void gemv_4bit_body(const T* __restrict__ x, const uint8_t* __restrict__ W,
                               const float* __restrict__ absmax, T* __restrict__ y,
                               int out_features, int in_features, int blocksize)
{
    __shared__ float s_code[16];
    load_code_table<QT>(s_code);
    __syncthreads();

    const int shift = log2_pow2(blocksize);
    const int lane = (int)(threadIdx.x & 31);
    const int warps_per_block = (int)(blockDim.x >> 5);
    const long long stride = (long long)gridDim.x * warps_per_block;

    for (long long row = (long long)blockIdx.x * warps_per_block + (threadIdx.x >> 5); row < out_features; row += stride)
    {
        const long long base = row * in_features;
        float acc = 0.0f;
        if ((in_features & 7) == 0)
        {
            for (int k = lane * 8; k < in_features; k += 32 * 8)
            {
                const long long e = base + k;
                const float s = absmax[e >> shift];
                const uint8_t* p = W + (e >> 1);
                for (int i = 0; i < 4; i++)
                {
                    const unsigned int byte = p[i];
                    acc += (s_code[byte >> 4] * s) * to_f32(x[k + 2 * i]);
                    acc += (s_code[byte & 15] * s) * to_f32(x[k + 2 * i + 1]);
                }
            }
        }
        else
        {
            for (int k = lane; k < in_features; k += 32)
            {
                const long long e = base + k;
                const unsigned int byte = W[e >> 1];
                const unsigned int nib = (e & 1) ? (byte & 15) : (byte >> 4);
                acc += (s_code[nib] * absmax[e >> shift]) * to_f32(x[k]);
            }
        }
        for (int off = 16; off > 0; off >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) y[row] = from_f32<T>(acc);
    }
}

// ---------------------------------------------------------------------------------------------
// linear_4bit_gemv: the model's one-token linear layer, y[o] = sum_k T(code[q(o,k)] * absmax(o,k)) * x[k],
// reading the 4-bit weight once (a decode step of `generate`) instead of dequantizing it into a scratch and
// running a one-row GEMM (2 bytes written and 2 read per weight instead of 0.5 read). Each weight is rounded
// to T exactly as dequantize_4bit(_dq) rounds it, then multiplied in fp32 and accumulated in fp32 (the
// GEMM's numerics on the same bf16/f32 weights; only the summation order differs). absmax is the fp32 array
// when `absmax` is not null, else bitsandbytes' double-quantized state decoded per block as in
// dequantize_4bit_dq_body (bit-identical).
//
// Launch shape: block = 256 threads = 8 warps, one warp per output row, grid = min(ceil(out / 8), cap),
// grid-stride over rows. Vector path (in % 32 == 0, blocksize >= 32, x and W 16-byte aligned): lane l takes
// 32 consecutive weights per step (one 16-byte load of packed codes, one absmax, four 16-byte loads of x),
// a warp 1 KiB of the row; else one element per lane per step. Warp xor-shuffle sum; lane 0 stores y.
// 64 B + 1 KiB shared (code, and the 256-entry map for double quantization).
// ---------------------------------------------------------------------------------------------
template <int QT, typename T>
__device__ void linear_4bit_gemv_body(const T* __restrict__ x, const uint8_t* __restrict__ W,
                                      const float* __restrict__ absmax, const uint8_t* __restrict__ qabsmax,
                                      const float* __restrict__ code256, const float* __restrict__ nested_absmax,
                                      const float* __restrict__ offset, T* __restrict__ y,
                                      int out_features, int in_features, int blocksize)
{
    __shared__ float s_code[16];
    __shared__ float s_code256[256];
    load_code_table<QT>(s_code);
    const bool dq = absmax == nullptr;
    if (dq)
        for (int k = (int)threadIdx.x; k < 256; k += (int)blockDim.x) s_code256[k] = code256[k];
    __syncthreads();
    const float off = dq ? *offset : 0.0f;
    const int shift = log2_pow2(blocksize);
    auto scale = [&](long long b) -> float {
        return dq ? __fmul_rn(s_code256[qabsmax[b]], nested_absmax[b >> 8]) + off : absmax[b];
    };
    // T(code * s) widened back: the weight as dequantize_4bit stores it
    auto weight = [&](unsigned int nib, float s) -> float { return to_f32(from_f32<T>(s_code[nib] * s)); };

    const int lane = (int)(threadIdx.x & 31);
    const int warps_per_block = (int)(blockDim.x >> 5);
    const long long stride = (long long)gridDim.x * warps_per_block;
    const bool vec = (in_features & 31) == 0 && blocksize >= 32 && npvec::aligned16(x) && npvec::aligned16(W);

    for (long long row = (long long)blockIdx.x * warps_per_block + (threadIdx.x >> 5); row < out_features; row += stride)
    {
        const long long base = row * in_features;
        float acc = 0.0f;
        if (vec)
        {
            for (int k = lane * 32; k < in_features; k += 32 * 32)
            {
                const long long e = base + k;
                const float s = scale(e >> shift);
                const uint4 q = *reinterpret_cast<const uint4*>(W + (e >> 1));
                const unsigned int words[4] = {q.x, q.y, q.z, q.w};
                NP_UNROLL
                for (int part = 0; part < 4; part++)
                {
                    float xv[8];
                    npvec::load8(x + k + 8 * part, xv);
                    NP_UNROLL
                    for (int j = 0; j < 4; j++)
                    {
                        const unsigned int byte = (words[part] >> (8 * j)) & 0xffu;
                        acc += weight(byte >> 4, s) * xv[2 * j];
                        acc += weight(byte & 15, s) * xv[2 * j + 1];
                    }
                }
            }
        }
        else
        {
            for (int k = lane; k < in_features; k += 32)
            {
                const long long e = base + k;
                const unsigned int byte = W[e >> 1];
                const unsigned int nib = (e & 1) ? (byte & 15) : (byte >> 4);
                acc += weight(nib, scale(e >> shift)) * to_f32(x[k]);
            }
        }
        for (int off2 = 16; off2 > 0; off2 >>= 1)
            acc += __shfl_xor_sync(0xffffffffu, acc, off2);
        if (lane == 0) y[row] = from_f32<T>(acc);
    }
}

}  // namespace nf4k

// ---------------------------------------------------------------------------------------------
// Double quantization of absmax (nested blocksize 256, signed dynamic map; the code search is
// dquantize_nearest in common.cuh)
// ---------------------------------------------------------------------------------------------

// quantize_absmax_dq: qabsmax[i] = dQuantize((absmax[i] - offset) * (1 / nested_absmax[i / 256])).
//
// Launch shape: block = 256 threads (exactly: one thread per absmax of a nested block), 1-D grid =
// min(ceil(nblocks / 256), cap), grid-stride over nested blocks. Static shared: the 256-entry map,
// 8 warp maxima, the zero index. Block max = warp xor-shuffle max + a pass over the 8 warp maxima.
// A nested block whose max is 0 stores the index of 0.0 in the map for all its entries.
NP_KERNEL(quantize_absmax_dq, (const float* __restrict__ absmax, long long nblocks, float offset,
                               const float* __restrict__ code256, uint8_t* __restrict__ qabsmax,
                               float* __restrict__ nested_absmax))
{
    __shared__ float s_code[256];
    __shared__ float s_warp_max[8];
    __shared__ int s_zero_index;

    const int t = (int)threadIdx.x;
    const int lane = t & 31;
    const int warp = t >> 5;
    if (t == 0) s_zero_index = 256;
    __syncthreads();
    s_code[t] = code256[t];
    if (s_code[t] == 0.0f) atomicMin(&s_zero_index, t);
    __syncthreads();
    const int zero_index = s_zero_index < 256 ? s_zero_index : (int)dquantize_nearest(s_code, 0.0f);

    const long long nnested = (nblocks + 255) / 256;
    for (long long nb = blockIdx.x; nb < nnested; nb += gridDim.x)
    {
        const long long i = nb * 256 + t;
        const bool valid = i < nblocks;
        const float c = valid ? absmax[i] - offset : 0.0f;

        float m = fabsf(c);
        for (int off = 16; off > 0; off >>= 1)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        if (lane == 0) s_warp_max[warp] = m;
        __syncthreads();
        m = s_warp_max[0];
        for (int w = 1; w < 8; w++) m = fmaxf(m, s_warp_max[w]);
        __syncthreads();  // s_warp_max is rewritten by the next nested block

        if (t == 0) nested_absmax[nb] = m;
        if (valid)
        {
            if (m == 0.0f)
                qabsmax[i] = (uint8_t)zero_index;
            else
                qabsmax[i] = dquantize_nearest(s_code, c * (1.0f / m));
        }
    }
}

// dequantize_absmax_dq: absmax[i] = code256[qabsmax[i]] * nested_absmax[i / 256] + offset
// (fp32 multiply, then add: __fmul_rn keeps nvcc from contracting it into an FMA).
//
// Launch shape: block = 256 threads, 1-D grid = min(ceil(nblocks / 256), cap), grid-stride, one
// absmax per thread per step. Static shared: the 256-entry map.
NP_KERNEL(dequantize_absmax_dq, (const uint8_t* __restrict__ qabsmax, const float* __restrict__ code256,
                                 const float* __restrict__ nested_absmax, float offset,
                                 float* __restrict__ absmax, long long nblocks))
{
    __shared__ float s_code[256];
    for (int k = (int)threadIdx.x; k < 256; k += (int)blockDim.x) s_code[k] = code256[k];
    __syncthreads();

    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nblocks; i += stride)
        absmax[i] = __fmul_rn(s_code[qabsmax[i]], nested_absmax[i >> 8]) + offset;
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points
// ---------------------------------------------------------------------------------------------

// quantize_4bit_{nf4,fp4}_{f32,bf16,f16}(x, absmax, packed, n, blocksize)
// Launch: block 256, grid min(ceil(ceil(nblocks / (32 / min(32, blocksize/8))) / 8), cap); see quantize_4bit_body.
NP_KERNEL(quantize_4bit_nf4_f32, (const float* x, float* absmax, uint8_t* packed, long long n, int blocksize))
{ nf4k::quantize_4bit_body<nf4k::kNF4, float>(x, absmax, packed, n, blocksize); }
NP_KERNEL(quantize_4bit_nf4_bf16, (const __nv_bfloat16* x, float* absmax, uint8_t* packed, long long n, int blocksize))
{ nf4k::quantize_4bit_body<nf4k::kNF4, __nv_bfloat16>(x, absmax, packed, n, blocksize); }
NP_KERNEL(quantize_4bit_nf4_f16, (const __half* x, float* absmax, uint8_t* packed, long long n, int blocksize))
{ nf4k::quantize_4bit_body<nf4k::kNF4, __half>(x, absmax, packed, n, blocksize); }
NP_KERNEL(quantize_4bit_fp4_f32, (const float* x, float* absmax, uint8_t* packed, long long n, int blocksize))
{ nf4k::quantize_4bit_body<nf4k::kFP4, float>(x, absmax, packed, n, blocksize); }
NP_KERNEL(quantize_4bit_fp4_bf16, (const __nv_bfloat16* x, float* absmax, uint8_t* packed, long long n, int blocksize))
{ nf4k::quantize_4bit_body<nf4k::kFP4, __nv_bfloat16>(x, absmax, packed, n, blocksize); }
NP_KERNEL(quantize_4bit_fp4_f16, (const __half* x, float* absmax, uint8_t* packed, long long n, int blocksize))
{ nf4k::quantize_4bit_body<nf4k::kFP4, __half>(x, absmax, packed, n, blocksize); }

// dequantize_4bit_{nf4,fp4}_{f32,bf16,f16}(packed, absmax, out, n, blocksize)
// Launch: block 256, grid min(ceil(((n + 1) / 2) / 256), cap); see dequantize_4bit_body.
NP_KERNEL(dequantize_4bit_nf4_f32, (const uint8_t* packed, const float* absmax, float* out, long long n, int blocksize))
{ nf4k::dequantize_4bit_body<nf4k::kNF4, float>(packed, absmax, out, n, blocksize); }
NP_KERNEL(dequantize_4bit_nf4_bf16, (const uint8_t* packed, const float* absmax, __nv_bfloat16* out, long long n, int blocksize))
{ nf4k::dequantize_4bit_body<nf4k::kNF4, __nv_bfloat16>(packed, absmax, out, n, blocksize); }
NP_KERNEL(dequantize_4bit_nf4_f16, (const uint8_t* packed, const float* absmax, __half* out, long long n, int blocksize))
{ nf4k::dequantize_4bit_body<nf4k::kNF4, __half>(packed, absmax, out, n, blocksize); }
NP_KERNEL(dequantize_4bit_fp4_f32, (const uint8_t* packed, const float* absmax, float* out, long long n, int blocksize))
{ nf4k::dequantize_4bit_body<nf4k::kFP4, float>(packed, absmax, out, n, blocksize); }
NP_KERNEL(dequantize_4bit_fp4_bf16, (const uint8_t* packed, const float* absmax, __nv_bfloat16* out, long long n, int blocksize))
{ nf4k::dequantize_4bit_body<nf4k::kFP4, __nv_bfloat16>(packed, absmax, out, n, blocksize); }
NP_KERNEL(dequantize_4bit_fp4_f16, (const uint8_t* packed, const float* absmax, __half* out, long long n, int blocksize))
{ nf4k::dequantize_4bit_body<nf4k::kFP4, __half>(packed, absmax, out, n, blocksize); }

// dequantize_4bit_dq_{nf4,fp4}_{f32,bf16,f16}(packed, qabsmax, code256, nested_absmax, offset, out, n, blocksize, block0)
// Launch: block 256, grid min(ceil(((n + 1) / 2) / 256), cap); see dequantize_4bit_dq_body.
NP_KERNEL(dequantize_4bit_dq_nf4_f32, (const uint8_t* packed, const uint8_t* qabsmax, const float* code256, const float* nested_absmax, const float* offset, float* out, long long n, int blocksize, long long block0))
{ nf4k::dequantize_4bit_dq_body<nf4k::kNF4, float>(packed, qabsmax, code256, nested_absmax, offset, out, n, blocksize, block0); }
NP_KERNEL(dequantize_4bit_dq_nf4_bf16, (const uint8_t* packed, const uint8_t* qabsmax, const float* code256, const float* nested_absmax, const float* offset, __nv_bfloat16* out, long long n, int blocksize, long long block0))
{ nf4k::dequantize_4bit_dq_body<nf4k::kNF4, __nv_bfloat16>(packed, qabsmax, code256, nested_absmax, offset, out, n, blocksize, block0); }
NP_KERNEL(dequantize_4bit_dq_nf4_f16, (const uint8_t* packed, const uint8_t* qabsmax, const float* code256, const float* nested_absmax, const float* offset, __half* out, long long n, int blocksize, long long block0))
{ nf4k::dequantize_4bit_dq_body<nf4k::kNF4, __half>(packed, qabsmax, code256, nested_absmax, offset, out, n, blocksize, block0); }
NP_KERNEL(dequantize_4bit_dq_fp4_f32, (const uint8_t* packed, const uint8_t* qabsmax, const float* code256, const float* nested_absmax, const float* offset, float* out, long long n, int blocksize, long long block0))
{ nf4k::dequantize_4bit_dq_body<nf4k::kFP4, float>(packed, qabsmax, code256, nested_absmax, offset, out, n, blocksize, block0); }
NP_KERNEL(dequantize_4bit_dq_fp4_bf16, (const uint8_t* packed, const uint8_t* qabsmax, const float* code256, const float* nested_absmax, const float* offset, __nv_bfloat16* out, long long n, int blocksize, long long block0))
{ nf4k::dequantize_4bit_dq_body<nf4k::kFP4, __nv_bfloat16>(packed, qabsmax, code256, nested_absmax, offset, out, n, blocksize, block0); }
NP_KERNEL(dequantize_4bit_dq_fp4_f16, (const uint8_t* packed, const uint8_t* qabsmax, const float* code256, const float* nested_absmax, const float* offset, __half* out, long long n, int blocksize, long long block0))
{ nf4k::dequantize_4bit_dq_body<nf4k::kFP4, __half>(packed, qabsmax, code256, nested_absmax, offset, out, n, blocksize, block0); }

// gemv_4bit_{nf4,fp4}_{f32,bf16,f16}(x, packedW, absmax, y, out_features, in_features, blocksize)
// Launch: block 256 (8 warps, one row each), grid min(ceil(out_features / 8), cap); see gemv_4bit_body.
NP_KERNEL(gemv_4bit_nf4_f32, (const float* x, const uint8_t* packedW, const float* absmax, float* y, int out_features, int in_features, int blocksize))
{ nf4k::gemv_4bit_body<nf4k::kNF4, float>(x, packedW, absmax, y, out_features, in_features, blocksize); }
NP_KERNEL(gemv_4bit_nf4_bf16, (const __nv_bfloat16* x, const uint8_t* packedW, const float* absmax, __nv_bfloat16* y, int out_features, int in_features, int blocksize))
{ nf4k::gemv_4bit_body<nf4k::kNF4, __nv_bfloat16>(x, packedW, absmax, y, out_features, in_features, blocksize); }
NP_KERNEL(gemv_4bit_nf4_f16, (const __half* x, const uint8_t* packedW, const float* absmax, __half* y, int out_features, int in_features, int blocksize))
{ nf4k::gemv_4bit_body<nf4k::kNF4, __half>(x, packedW, absmax, y, out_features, in_features, blocksize); }
NP_KERNEL(gemv_4bit_fp4_f32, (const float* x, const uint8_t* packedW, const float* absmax, float* y, int out_features, int in_features, int blocksize))
{ nf4k::gemv_4bit_body<nf4k::kFP4, float>(x, packedW, absmax, y, out_features, in_features, blocksize); }
NP_KERNEL(gemv_4bit_fp4_bf16, (const __nv_bfloat16* x, const uint8_t* packedW, const float* absmax, __nv_bfloat16* y, int out_features, int in_features, int blocksize))
{ nf4k::gemv_4bit_body<nf4k::kFP4, __nv_bfloat16>(x, packedW, absmax, y, out_features, in_features, blocksize); }
NP_KERNEL(gemv_4bit_fp4_f16, (const __half* x, const uint8_t* packedW, const float* absmax, __half* y, int out_features, int in_features, int blocksize))
{ nf4k::gemv_4bit_body<nf4k::kFP4, __half>(x, packedW, absmax, y, out_features, in_features, blocksize); }

// linear_4bit_gemv_{nf4,fp4}_{f32,bf16}(x[in], packedW, absmax (fp32 [blocks]) or null, qabsmax, code256, nested_absmax,
// offset (double quantization, used when absmax is null), y[out], out_features, in_features, blocksize)
// Launch: block 256 (8 warps, one row each), grid min(ceil(out_features / 8), cap); see linear_4bit_gemv_body.
#define NP_LINEAR_4BIT_GEMV(QTNAME, QT, TNAME, T) \
NP_KERNEL(linear_4bit_gemv_##QTNAME##_##TNAME, (const T* x, const uint8_t* packedW, const float* absmax, \
    const uint8_t* qabsmax, const float* code256, const float* nested_absmax, const float* offset, T* y, \
    int out_features, int in_features, int blocksize)) \
{ nf4k::linear_4bit_gemv_body<QT, T>(x, packedW, absmax, qabsmax, code256, nested_absmax, offset, y, out_features, in_features, blocksize); }
NP_LINEAR_4BIT_GEMV(nf4, nf4k::kNF4, f32, float)
NP_LINEAR_4BIT_GEMV(nf4, nf4k::kNF4, bf16, __nv_bfloat16)
NP_LINEAR_4BIT_GEMV(fp4, nf4k::kFP4, f32, float)
NP_LINEAR_4BIT_GEMV(fp4, nf4k::kFP4, bf16, __nv_bfloat16)
