// Host stand-ins for the CUDA built-ins that kernels/clamp.cu and kernels/noise.cu use, so that
// their unmodified source compiles with a host C++17 compiler (g++) into kernels/emu/emulate.cpp.
//
// * fp16/bf16 are NVIDIA's own headers (cuda_fp16.h, cuda_bf16.h), which support host
//   compilation: there `__device__`, `__global__` and `__forceinline__` are host no-ops /
//   `always_inline`, and the conversions take the headers' software paths (round to nearest
//   even, like the device's `cvt.rn`). Include this file before any kernel source.
// * The launch coordinates are plain globals that the emulator sets before it calls a kernel
//   for one (block, thread) at a time.
// * The intrinsics below follow the CUDA Math API's definitions for 32-bit operands.
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

// Launch coordinates of the emulated thread (only .x is used: the kernels launch 1-D grids).
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
