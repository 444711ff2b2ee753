// Shared helpers for the probe-op kernels: element conversions and index arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Float conversions for the arithmetic kernels (noise, statistics). The clamp kernels only move
// values and never convert.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_double(float v) { return (double)v; }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) { return (double)__half2float(v); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return (double)__bfloat162float(v); }

// Round a double to the element type once (no double rounding through f32).
template <typename T> __device__ __forceinline__ T from_double(double v);
template <> __device__ __forceinline__ float from_double<float>(double v) { return __double2float_rn(v); }
template <> __device__ __forceinline__ double from_double<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_double<__half>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
    return __double2bfloat16(v);
}

// Quotient by a divisor fixed for the whole launch, without a hardware division per element.
//
// 32-bit path (every index below 2^31): multiply-high by m = ceil(2^p / d), p = 31 + ceil(log2 d),
// then shift by p - 32. Exact for n < 2^31 (Granlund & Montgomery 1994; the round-up variant
// CUTLASS's FastDivmod uses). The 64-bit path divides normally; launches whose indices reach
// 2^31 take it.
struct FastDivU32 {
    uint32_t d, m, s;
    __device__ __forceinline__ explicit FastDivU32(uint32_t divisor) : d(divisor), m(0), s(0) {
        if (d > 1) {
            uint32_t c = 32 - __clz(d - 1);  // ceil(log2 d), d >= 2
            uint32_t p = 31 + c;
            m = (uint32_t)(((1ull << p) + d - 1) / d);
            s = p - 32;
        }
    }
    __device__ __forceinline__ uint32_t div(uint32_t n) const {
        return d == 1 ? n : (__umulhi(n, m) >> s);
    }
};

struct DivU64 {
    uint64_t d;
    __device__ __forceinline__ explicit DivU64(uint64_t divisor) : d(divisor) {}
    __device__ __forceinline__ uint64_t div(uint64_t n) const { return n / d; }
};

template <typename I> struct Div;
template <> struct Div<uint32_t> { typedef FastDivU32 type; };
template <> struct Div<uint64_t> { typedef DivU64 type; };

// Indices below this use the 32-bit path.
#define FAST_INDEX_LIMIT (1ull << 31)

// Position of output element `idx` of a level op, whose output is (levels, per_level, units,
// inner) flattened with rows of row_len = units * inner: row, column, level, row within the
// level (m) and unit. Shared by the clamp and noise kernels.
template <typename I> struct LevelPos {
    I row, col, level, m, u;
};

template <typename I> struct LevelIndex {
    typename Div<I>::type by_row, by_level, by_inner;
    I row_len, per_level;
    __device__ __forceinline__ LevelIndex(I row_len_, I per_level_, I inner)
        : by_row(row_len_), by_level(per_level_), by_inner(inner), row_len(row_len_),
          per_level(per_level_) {}
    __device__ __forceinline__ LevelPos<I> at(I idx) const {
        LevelPos<I> p;
        p.row = by_row.div(idx);
        p.col = idx - p.row * row_len;
        p.level = by_level.div(p.row);
        p.m = p.row - p.level * per_level;
        p.u = by_inner.div(p.col);
        return p;
    }
};

__device__ __forceinline__ uint64_t grid_start() {
    return (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ uint64_t grid_stride() { return (uint64_t)gridDim.x * blockDim.x; }
