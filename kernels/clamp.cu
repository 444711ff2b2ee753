// Level-masked clamp, the CUDA side of `LevelClamp` (src/ops/clamp.rs):
//
//     out[l, m, u, i] = keep[l, u] ? x[m, u, i] : values[u]
//
// An activation is viewed as (rows, units, inner); `inner` is 1 for a dense (N, U) activation and
// H*W for a convolutional (N, C, H, W) one. The output has `levels * per_level` rows, level-major.
// `level_clamp_expand_*` reads x with `per_level` rows (each read once per level);
// `level_clamp_*` reads x already expanded to the output's rows.
//
// One thread per output element in a grid-stride loop; a clamped element never reads x. Values
// are moved, never converted, so the result is bit-identical to the CPU op for every dtype
// (NaN payloads included).

#include "common.cuh"

template <typename T, typename I, bool EXPAND>
__device__ __forceinline__ void level_clamp_body(const T* __restrict__ x,
                                                 const uint8_t* __restrict__ keep,
                                                 const T* __restrict__ values,
                                                 T* __restrict__ out, I n, I row_len, I units,
                                                 I inner, I per_level) {
    const LevelIndex<I> index(row_len, per_level, inner);
    const I stride = (I)grid_stride();
    for (I idx = (I)grid_start(); idx < n; idx += stride) {
        const LevelPos<I> p = index.at(idx);
        const I src_row = EXPAND ? p.m : p.row;
        out[idx] = keep[p.level * units + p.u] ? x[src_row * row_len + p.col] : values[p.u];
    }
}

// n = levels * per_level * row_len output elements; row_len = units * inner; n > 0.
template <typename T, bool EXPAND>
__device__ __forceinline__ void level_clamp(const T* x, const uint8_t* keep, const T* values,
                                            T* out, uint64_t n, uint64_t row_len, uint64_t units,
                                            uint64_t inner, uint64_t per_level) {
    if (n < FAST_INDEX_LIMIT) {
        level_clamp_body<T, uint32_t, EXPAND>(x, keep, values, out, (uint32_t)n,
                                              (uint32_t)row_len, (uint32_t)units,
                                              (uint32_t)inner, (uint32_t)per_level);
    } else {
        level_clamp_body<T, uint64_t, EXPAND>(x, keep, values, out, n, row_len, units, inner,
                                              per_level);
    }
}

#define LEVEL_CLAMP_OP(TYPENAME, SUFFIX)                                                        \
    extern "C" __global__ void level_clamp_expand_##SUFFIX(                                     \
        const TYPENAME* x, const uint8_t* keep, const TYPENAME* values, TYPENAME* out,          \
        uint64_t n, uint64_t row_len, uint64_t units, uint64_t inner, uint64_t per_level) {     \
        level_clamp<TYPENAME, true>(x, keep, values, out, n, row_len, units, inner, per_level); \
    }                                                                                           \
    extern "C" __global__ void level_clamp_##SUFFIX(                                            \
        const TYPENAME* x, const uint8_t* keep, const TYPENAME* values, TYPENAME* out,          \
        uint64_t n, uint64_t row_len, uint64_t units, uint64_t inner, uint64_t per_level) {     \
        level_clamp<TYPENAME, false>(x, keep, values, out, n, row_len, units, inner,            \
                                     per_level);                                                \
    }

LEVEL_CLAMP_OP(float, f32)
LEVEL_CLAMP_OP(double, f64)
LEVEL_CLAMP_OP(__half, f16)
LEVEL_CLAMP_OP(__nv_bfloat16, bf16)
