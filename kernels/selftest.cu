// selftest.cu: kernels that test the CUDA emulator itself (tests/NativePeft.Tests/Emulator).
// They compile with nvcc too, so the same checks can run on a GPU.
#include "common.cuh"

// Lanes of the calling thread's warp that exist (the last warp of a block may be partial).
__device__ __forceinline__ unsigned np_selftest_warp_mask() {
    const unsigned tid = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    const unsigned first = tid & ~31u;
    const unsigned lanes = n - first >= 32 ? 32 : n - first;
    return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}

// y[i] = a * x[i] + y[i].  Launch: grid ceil(n/256), block 256.
NP_KERNEL(selftest_axpy, (int n, float a, const float* __restrict__ x, float* __restrict__ y)) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

// Block sum in static shared memory: partial[blockIdx.x] = sum of the block's grid-stride slice.
// Launch: grid G, block B (a power of two, <= 1024), no dynamic shared memory.
NP_KERNEL(selftest_block_sum, (const float* __restrict__ x, float* __restrict__ partial, int n)) {
    __shared__ float s[1024];
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    s[threadIdx.x] = v;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

// Warp-shuffle sum: __shfl_down_sync inside each warp (partial last warp allowed), per-warp results in
// static shared memory, then __shfl_xor_sync across them in warp 0. partial[blockIdx.x] = block sum.
// Launch: grid G, block B (1..1024, any size), no dynamic shared memory.
NP_KERNEL(selftest_warp_sum, (const float* __restrict__ x, float* __restrict__ partial, int n)) {
    __shared__ float warp_sums[32];
    const unsigned mask = np_selftest_warp_mask();
    const int lanes = __popc(mask);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_down_sync(mask, v, offset);
        if (lane + offset < lanes) v += other;
    }
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) / 32;
        float w = lane < nwarps ? warp_sums[lane] : 0.0f;
        if (lanes == 32) {
            for (int offset = 16; offset > 0; offset >>= 1) w += __shfl_xor_sync(0xffffffffu, w, offset);
        }
        if (lane == 0) partial[blockIdx.x] = w;
    }
}

// Shuffles in a partial warp. For each thread t with value in[t]:
//   out[3t] = value of lane 0 (__shfl_sync), out[3t+1] = value of lane^1 (__shfl_xor_sync, own if absent),
//   out[3t+2] = value of lane-1 (__shfl_up_sync, own on lane 0).
// Launch: grid 1, block B (e.g. 48: one full warp and one of 16 lanes).
NP_KERNEL(selftest_shfl_lanes, (const int* __restrict__ in, int* __restrict__ out)) {
    const unsigned mask = np_selftest_warp_mask();
    const int t = threadIdx.x;
    const int v = in[t];
    out[3 * t] = __shfl_sync(mask, v, 0);
    out[3 * t + 1] = __shfl_xor_sync(mask, v, 1);
    out[3 * t + 2] = __shfl_up_sync(mask, v, 1);
}

// Tiled transpose through shared memory: out[c][r] = in[r][c] for a rows x cols matrix.
// Launch: grid (ceil(cols/32), ceil(rows/32)), block (32, 8).
NP_KERNEL(selftest_transpose, (const float* __restrict__ in, float* __restrict__ out, int rows, int cols)) {
    __shared__ float tile[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
        const int r = blockIdx.y * 32 + j;
        if (r < rows && c < cols) tile[j][threadIdx.x] = in[(long long)r * cols + c];
    }
    __syncthreads();
    const int oc = blockIdx.y * 32 + threadIdx.x;  // column of out = row of in
    for (int j = threadIdx.y; j < 32; j += blockDim.y) {
        const int orow = blockIdx.x * 32 + j;      // row of out = column of in
        if (orow < cols && oc < rows) out[(long long)orow * rows + oc] = tile[threadIdx.x][j];
    }
}

// Histogram across blocks: a shared-memory histogram per block (shared atomics) merged into hist with
// global atomicAdd; total += values[i] * 0.25f with float atomicAdd. bins <= 256.
// Launch: grid G, block 256, no dynamic shared memory.
NP_KERNEL(selftest_histogram, (const int* __restrict__ values, int n, int* __restrict__ hist, int bins,
                               float* __restrict__ total)) {
    __shared__ int local[256];
    for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
    __syncthreads();
    float sum = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        atomicAdd(&local[values[i] % bins], 1);
        sum += (float)values[i] * 0.25f;
    }
    atomicAdd(total, sum);
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += blockDim.x) atomicAdd(&hist[b], local[b]);
}

__device__ float np_selftest_atomic_max_float(float* address, float value) {
    int* a = reinterpret_cast<int*>(address);
    int old = *a, assumed;
    do {
        assumed = old;
        if (__int_as_float(assumed) >= value) break;
        old = atomicCAS(a, assumed, __float_as_int(value));
    } while (assumed != old);
    return __int_as_float(old);
}

// Integer and float atomics across blocks. For each i < n (v = values[i], f = floats[i]):
//   ints[0] += 1 (atomicAdd), ints[1] = max v (atomicMax), ints[2] = min v (atomicMin),
//   ints[3] |= 1 << (v & 31) (atomicOr), ints[4] -= 1 (atomicSub), ints[5] ^= v (atomicXor),
//   sum64[0] += v as unsigned long long (atomicAdd), fmax[0] = max f (CAS loop),
//   uints[0] = max (unsigned)v (atomicMax unsigned), uints[1] &= ~(1u << (v & 31)) (atomicAnd).
// Initial values are the caller's. Launch: grid G, block B.
NP_KERNEL(selftest_atomics, (const int* __restrict__ values, const float* __restrict__ floats, int n,
                             int* ints, unsigned long long* sum64, float* fmax, unsigned* uints)) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int v = values[i];
        atomicAdd(&ints[0], 1);
        atomicMax(&ints[1], v);
        atomicMin(&ints[2], v);
        atomicOr(&ints[3], 1 << (v & 31));
        atomicSub(&ints[4], 1);
        atomicXor(&ints[5], v);
        atomicAdd(sum64, (unsigned long long)(unsigned)v);
        np_selftest_atomic_max_float(fmax, floats[i]);
        atomicMax(&uints[0], (unsigned)v);
        atomicAnd(&uints[1], ~(1u << (v & 31)));
    }
}

// Dynamic shared memory: each block reverses its slice of blockDim.x elements through the buffer;
// misaligned[0] gets 1 if the buffer is not 16-byte aligned.
// Launch: grid ceil(n/B), block B, sharedBytes = B * 4.
NP_KERNEL(selftest_dynamic_smem, (const float* __restrict__ in, float* __restrict__ out, int n,
                                  int* misaligned)) {
    EMU_DYNAMIC_SHARED(float, buf);
    if (threadIdx.x == 0 && (reinterpret_cast<unsigned long long>(buf) & 15ull) != 0) atomicOr(misaligned, 1);
    const int base = blockIdx.x * blockDim.x;
    const int i = base + threadIdx.x;
    buf[threadIdx.x] = i < n ? in[i] : 0.0f;
    __syncthreads();
    const int j = base + (blockDim.x - 1 - threadIdx.x);
    if (j < n) out[j] = buf[threadIdx.x];
}

// Votes per warp (partial last warp allowed): for warp w (global index blockIdx.x * warpsPerBlock + w)
//   ballots[w] = __ballot_sync, anys[w] = __any_sync, alls[w] = __all_sync of pred[thread] != 0;
//   counts[blockIdx.x] = __syncthreads_count(pred != 0).
// Launch: grid G, block B; pred has G * B entries.
NP_KERNEL(selftest_vote, (const int* __restrict__ pred, unsigned* ballots, int* anys, int* alls,
                          int* counts)) {
    const unsigned mask = np_selftest_warp_mask();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int p = pred[t] != 0;
    const unsigned b = __ballot_sync(mask, p);
    const int any = __any_sync(mask, p);
    const int all = __all_sync(mask, p);
    const int w = blockIdx.x * ((blockDim.x + 31) / 32) + threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        ballots[w] = b;
        anys[w] = any;
        alls[w] = all;
    }
    const int c = __syncthreads_count(p);
    if (threadIdx.x == 0) counts[blockIdx.x] = c;
}

// bf16 conversions: bits[i] = __float2bfloat16(in[i]), bits_rn[i] = __float2bfloat16_rn(in[i]) as ushort,
// back[i] = __bfloat162float(bits[i]). Launch: grid ceil(n/256), block 256.
NP_KERNEL(selftest_bf16_convert, (const float* __restrict__ in, unsigned short* bits,
                                  unsigned short* bits_rn, float* back, int n)) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const __nv_bfloat16 h = __float2bfloat16(in[i]);
    bits[i] = __bfloat16_as_ushort(h);
    bits_rn[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
    back[i] = __bfloat162float(__ushort_as_bfloat16(bits[i]));
}

// fp16 conversions: bits[i] = __float2half(in[i]), bits_rn[i] = __float2half_rn(in[i]) as ushort,
// back[i] = __half2float(bits[i]). Launch: grid ceil(n/256), block 256.
NP_KERNEL(selftest_half_convert, (const float* __restrict__ in, unsigned short* bits,
                                  unsigned short* bits_rn, float* back, int n)) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const __half h = __float2half(in[i]);
    bits[i] = __half_as_ushort(h);
    bits_rn[i] = __half_as_ushort(__float2half_rn(in[i]));
    back[i] = __half2float(__ushort_as_half(bits[i]));
}

// Launch indices: thread (linear index t in the launch, blocks in x-y-z order) writes
// out[6t..6t+5] = blockIdx.x, .y, .z, threadIdx.x, .y, .z. Launch: any grid and block.
NP_KERNEL(selftest_indices, (int* out)) {
    const unsigned long long block = blockIdx.x + (unsigned long long)blockIdx.y * gridDim.x +
                                     (unsigned long long)blockIdx.z * gridDim.x * gridDim.y;
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    const unsigned t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    int* o = out + 6 * (block * threads + t);
    o[0] = blockIdx.x; o[1] = blockIdx.y; o[2] = blockIdx.z;
    o[3] = threadIdx.x; o[4] = threadIdx.y; o[5] = threadIdx.z;
}

// __trap() when flag != 0 (the emulator reports it as a launch error). Launch: grid 1, block 32.
NP_KERNEL(selftest_trap, (int flag, int* out)) {
    if (flag != 0 && threadIdx.x == 5) __trap();
    out[threadIdx.x] = threadIdx.x;
}

// Emulator-only (undefined behaviour on a GPU, never launch it there): lane 0 waits in a shuffle with
// lane 1 while lane 1 waits at __syncthreads for lane 0: the emulator must report a deadlock.
// Launch: grid 1, block 32.
NP_KERNEL(selftest_deadlock, (int* out)) {
    if (threadIdx.x == 0) out[0] = __shfl_sync(0x3u, 1, 1);
    else if (threadIdx.x == 1) __syncthreads();
}

// ---------------------------------------------------------------- warp-level matrix instructions
// Raw per-lane registers in, raw per-lane registers out, so that the tests lay out the fragments with
// their own table from the PTX ISA (tests/NativePeft.Tests/Emulator/MatrixInstructionTests.cs).
#include "mma.cuh"

// d[w][lane][0..3] = mma.m16n8k16 bf16 of a[w][lane][0..3], b[w][lane][0..1], c[w][lane][0..3] for every
// warp w of the block. Launch: grid 1, block 32 * warps.
NP_KERNEL(selftest_mma_bf16, (const uint32_t* __restrict__ a, const uint32_t* __restrict__ b,
                              const float* __restrict__ c, float* __restrict__ d))
{
    const int tid = threadIdx.x;
    const uint32_t ra[4] = {a[4 * tid], a[4 * tid + 1], a[4 * tid + 2], a[4 * tid + 3]};
    const uint32_t rb[2] = {b[2 * tid], b[2 * tid + 1]};
    const float rc[4] = {c[4 * tid], c[4 * tid + 1], c[4 * tid + 2], c[4 * tid + 3]};
    float rd[4];
    npmma::mma_bf16_16816(rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[4 * tid + i] = rd[i];
}

// Copies `bytes` of src into dynamic shared memory, then lane l runs ldmatrix.x{num}{.trans} with the row
// address smem + offsets[l] (bytes); out[l][0..num-1] = its registers. Launch: grid 1, block 32,
// dynamic shared `bytes` (a multiple of 16).
NP_KERNEL(selftest_ldmatrix, (const uint4* __restrict__ src, int bytes, const int* __restrict__ offsets,
                              int num, int trans, uint32_t* __restrict__ out))
{
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    const int lane = threadIdx.x;
    for (int i = lane; i < bytes / 16; i += 32) reinterpret_cast<uint4*>(smem)[i] = src[i];
    __syncthreads();
    const unsigned char* row = smem + offsets[lane];
    uint32_t r[4] = {0, 0, 0, 0};
    if (num == 1) {
        uint32_t x[1];
        if (trans) npmma::ldmatrix_x1_trans(x, row); else npmma::ldmatrix_x1(x, row);
        r[0] = x[0];
    } else if (num == 2) {
        uint32_t x[2];
        if (trans) npmma::ldmatrix_x2_trans(x, row); else npmma::ldmatrix_x2(x, row);
        r[0] = x[0]; r[1] = x[1];
    } else {
        uint32_t x[4];
        if (trans) npmma::ldmatrix_x4_trans(x, row); else npmma::ldmatrix_x4(x, row);
        r[0] = x[0]; r[1] = x[1]; r[2] = x[2]; r[3] = x[3];
    }
    for (int m = 0; m < num; ++m) out[lane * 4 + m] = r[m];
}

// Thread t copies 16-byte chunk t of src (n chunks, src_bytes[t] of it, the rest zero-filled) into shared
// memory with cp.async, in two commit groups (chunks t < n/2, then the others); waits for the first group,
// copies the first half out, waits for all, copies the second half out, each after a barrier.
// With early_read != 0 the first half is copied out BEFORE the first wait: a bug the check mode must show
// (emulator-only that way).
// Launch: grid 1, block n (<= 1024, even), dynamic shared 16 * n.
NP_KERNEL(selftest_cp_async, (const uint4* __restrict__ src, const int* __restrict__ src_bytes,
                              uint4* __restrict__ out, int early_read))
{
    EMU_DYNAMIC_SHARED(uint4, smem);
    const int t = threadIdx.x, n = blockDim.x, half = n / 2;
    if (t < half) npmma::cp_async_16(smem + t, src + t, src_bytes[t]);
    npmma::cp_async_commit();
    if (t >= half) npmma::cp_async_16(smem + t, src + t, src_bytes[t]);
    npmma::cp_async_commit();
    if (early_read) {
        __syncthreads();
        if (t < half) out[t] = smem[t];
    }
    npmma::cp_async_wait<1>();
    __syncthreads();
    if (!early_read && t < half) out[t] = smem[t];
    npmma::cp_async_wait<0>();
    __syncthreads();
    if (t >= half) out[t] = smem[t];
}

// Emulator-only with barrier = 0 (a race on a GPU). out[t] = x[t - 1] (x[0] for t = 0) through shared
// memory; with barrier = 0 the barrier between the
// write and the read is missing (a race the default schedule hides: thread t - 1 runs before t).
// Launch: grid 1, block n, dynamic shared 4 * n.
NP_KERNEL(selftest_neighbour, (const float* __restrict__ x, float* __restrict__ out, int barrier))
{
    EMU_DYNAMIC_SHARED(float, s);
    const int t = threadIdx.x;
    s[t] = x[t];
    if (barrier) __syncthreads();
    out[t] = s[t > 0 ? t - 1 : 0];
}
