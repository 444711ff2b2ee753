// Level-scaled Gaussian noise, the CUDA side of `LevelNoise` (src/ops/noise.rs):
//
//     out[l, m, u, i] = x[m, u, i] + std[l, u] * z
//
// with z = counter_normal(seed, g), the standard normal of the element's global index
//
//     g = ((level_offset + l) * total_samples + sample_offset + m) * row_len + (u * inner + i)
//
// (64-bit, wrapping). The generator is src/rng.rs `mix64` / `counter_normal` transcribed: the two
// 24-bit uniforms are bit-identical to the CPU's; log, sqrt and cos are CUDA's (log 1 ulp, cos
// 2 ulp, sqrt correctly rounded), so z may differ from the CPU's in the last bits. The product
// std * z is rounded to f32 and added in f64 before one rounding to the element type, as on the
// CPU. The `*_expand_*` kernels read x with `per_level` rows; the others read x already expanded.
//
// Compile without fast-math flags: --use_fast_math would replace logf/cosf by approximations.

#include "common.cuh"

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float counter_normal(uint64_t seed, uint64_t index) {
    const uint64_t h = mix64(seed ^ mix64(index));
    // u1 in (0, 1] so that log(u1) is finite; u2 in [0, 1). Both exact in f32.
    const float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777216.0f);
    const float u2 = (float)(h & 0xFFFFFFull) * (1.0f / 16777216.0f);
    // Explicit round-to-nearest products so that no multiply is fused into an FMA.
    const float tau = 6.28318530717958647692f;
    return __fmul_rn(sqrtf(__fmul_rn(-2.0f, logf(u1))), cosf(__fmul_rn(tau, u2)));
}

template <typename T, typename I, bool EXPAND>
__device__ __forceinline__ void level_noise_body(const T* __restrict__ x,
                                                 const float* __restrict__ std_,
                                                 T* __restrict__ out, I n, I row_len, I units,
                                                 I inner, I per_level, uint64_t seed,
                                                 uint64_t level_offset, uint64_t sample_offset,
                                                 uint64_t total_samples) {
    const LevelIndex<I> index(row_len, per_level, inner);
    const I stride = (I)grid_stride();
    for (I idx = (I)grid_start(); idx < n; idx += stride) {
        const LevelPos<I> p = index.at(idx);
        const I src_row = EXPAND ? p.m : p.row;
        const uint64_t global_row = ((uint64_t)level_offset + (uint64_t)p.level) * total_samples +
                                    sample_offset + (uint64_t)p.m;
        const float z = counter_normal(seed, global_row * (uint64_t)row_len + (uint64_t)p.col);
        const float noise = __fmul_rn(std_[p.level * units + p.u], z);
        out[idx] = from_double<T>(to_double(x[src_row * row_len + p.col]) + (double)noise);
    }
}

template <typename T, bool EXPAND>
__device__ __forceinline__ void level_noise(const T* x, const float* std_, T* out, uint64_t n,
                                            uint64_t row_len, uint64_t units, uint64_t inner,
                                            uint64_t per_level, uint64_t seed,
                                            uint64_t level_offset, uint64_t sample_offset,
                                            uint64_t total_samples) {
    if (n < FAST_INDEX_LIMIT) {
        level_noise_body<T, uint32_t, EXPAND>(x, std_, out, (uint32_t)n, (uint32_t)row_len,
                                              (uint32_t)units, (uint32_t)inner,
                                              (uint32_t)per_level, seed, level_offset,
                                              sample_offset, total_samples);
    } else {
        level_noise_body<T, uint64_t, EXPAND>(x, std_, out, n, row_len, units, inner, per_level,
                                              seed, level_offset, sample_offset, total_samples);
    }
}

#define LEVEL_NOISE_OP(TYPENAME, SUFFIX)                                                       \
    extern "C" __global__ void level_noise_expand_##SUFFIX(                                    \
        const TYPENAME* x, const float* std_, TYPENAME* out, uint64_t n, uint64_t row_len,     \
        uint64_t units, uint64_t inner, uint64_t per_level, uint64_t seed,                     \
        uint64_t level_offset, uint64_t sample_offset, uint64_t total_samples) {               \
        level_noise<TYPENAME, true>(x, std_, out, n, row_len, units, inner, per_level, seed,   \
                                    level_offset, sample_offset, total_samples);               \
    }                                                                                          \
    extern "C" __global__ void level_noise_##SUFFIX(                                           \
        const TYPENAME* x, const float* std_, TYPENAME* out, uint64_t n, uint64_t row_len,     \
        uint64_t units, uint64_t inner, uint64_t per_level, uint64_t seed,                     \
        uint64_t level_offset, uint64_t sample_offset, uint64_t total_samples) {               \
        level_noise<TYPENAME, false>(x, std_, out, n, row_len, units, inner, per_level, seed,  \
                                     level_offset, sample_offset, total_samples);              \
    }

LEVEL_NOISE_OP(float, f32)
LEVEL_NOISE_OP(double, f64)
LEVEL_NOISE_OP(__half, f16)
LEVEL_NOISE_OP(__nv_bfloat16, bf16)
