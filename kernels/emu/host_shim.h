// Host stand-ins for the CUDA built-ins that kernels/clamp.cu, kernels/noise.cu and
// kernels/stats.cu use, so that their unmodified source compiles with a host C++17 compiler (g++)
// into kernels/emu/emulate.cpp.
//
// * fp16/bf16 are NVIDIA's own headers (cuda_fp16.h, cuda_bf16.h), which support host
//   compilation: there `__device__`, `__global__` and `__forceinline__` are host no-ops /
//   `always_inline`, and the conversions take the headers' software paths (round to nearest
//   even, like the device's `cvt.rn`). Include this file before any kernel source.
// * The launch coordinates are plain globals. The emulator sets them before it calls a kernel
//   for one (block, thread) at a time (clamp, noise), or before it resumes one thread of a block
//   (stats: every thread of a block is a coroutine on the one host thread, see emulate.cpp).
// * The intrinsics below follow the CUDA Math API's definitions for 32-bit operands.
// * Block-level built-ins (`__syncthreads`, `__shfl_down_sync`, `__shared__`, `atomicAdd` on
//   double) are at the end; they need the emulator's block scheduler.
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "host_shim.h is for host compilers; nvcc builds the kernels from kernels/*.cu directly"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <math.h>
#include <stdint.h>

// The emulated arithmetic must be IEEE round-to-nearest in the operand's own precision, as on
// the device and in the Rust CPU ops.
#if FLT_EVAL_METHOD != 0
#error "float expressions must be evaluated in their own type (e.g. SSE on x86-64, not x87)"
#endif
#ifdef __FAST_MATH__
#error "build the emulator without -ffast-math: it changes logf/cosf and the rounding"
#endif

// Launch coordinates of the emulated thread (blocks are 1-D; grids are 1-D, or 2-D for stats.cu).
inline uint3 blockIdx = {0, 0, 0};
inline uint3 threadIdx = {0, 0, 0};
inline dim3 blockDim(1, 1, 1);
inline dim3 gridDim(1, 1, 1);

// Number of leading zero bits of a 32-bit integer; 32 for 0.
static inline int __clz(int x) {
    return x == 0 ? 32 : __builtin_clz((unsigned int)x);
}

// High 32 bits of the 64-bit product of two unsigned 32-bit integers.
static inline unsigned int __umulhi(unsigned int x, unsigned int y) {
    return (unsigned int)(((unsigned long long)x * (unsigned long long)y) >> 32);
}

// f32 product rounded to nearest even, never fused into an FMA: a plain product, given IEEE
// single-precision evaluation (checked below) and -ffp-contract=off (the build line in
// kernels/README.md; the rest of noise.cu has no multiply-add a compiler could fuse either).
static inline float __fmul_rn(float a, float b) { return a * b; }

// f64 to f32, round to nearest even (the default rounding mode of the host).
static inline float __double2float_rn(double a) { return (float)a; }

// ---- Block-level built-ins (kernels/stats.cu) --------------------------------------------------
//
// Only valid inside a launch of the emulator's block scheduler (`launch_blocks` in emulate.cpp),
// which runs the threads of one block as coroutines, one block after another, on a single host
// thread; the hooks below fail the run (exit 1) anywhere else.

// Block barrier: the calling thread waits until every thread of its block has called it.
void emu_syncthreads();
// Warp exchange: the calling lane publishes `size` bytes at `value` (size <= 16), waits until
// every lane of its warp has published (all must pass the same `mask`, and the emulator accepts
// only full warps with mask 0xffffffff), then copies what lane `src_lane` published to `out`.
void emu_warp_exchange(unsigned int mask, const void* value, unsigned int size,
                       unsigned int src_lane, void* out);

static inline void __syncthreads() { emu_syncthreads(); }

// Lane i receives lane i + delta's `var`, or its own where i + delta leaves its `width`-lane
// segment (width a power of two <= 32; no wrap-around), as the CUDA Programming Guide defines it.
template <typename T>
static inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
    static_assert(sizeof(T) <= 16, "emu_warp_exchange moves at most 16 bytes");
    const unsigned int lane = threadIdx.x & 31u;  // blocks are 1-D
    const unsigned long long in_segment = lane & (unsigned int)(width - 1);
    const unsigned int src =
        in_segment + delta < (unsigned long long)width ? lane + delta : lane;
    T out;
    emu_warp_exchange(mask, &var, (unsigned int)sizeof(T), src, &out);
    return out;
}

// Only one emulated thread runs at a time and none is suspended between the read and the
// write, so a plain read-modify-write is atomic here. Returns the old value, as CUDA's does.
static inline double atomicAdd(double* address, double val) {
    const double old = *address;
    *address = old + val;
    return old;
}

// A `__shared__` variable is one object per block. Here it is a function-scope static: one copy
// for the whole process, which is one per block because the scheduler runs blocks strictly one
// after another (and the threads of a block on one host thread). It is zero at the first block
// and keeps the previous block's values after that (a read before any write in the block sees
// stale data, as uninitialised shared memory would on a device). The CUDA headers define
// `__shared__` away for host compilers.
#undef __shared__
#define __shared__ static
