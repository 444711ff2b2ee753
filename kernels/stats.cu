// Per-unit statistics in one pass over an activation viewed as (rows, units, inner):
//
//   unit_sums_*        sum[u] += Σ x[r, u, i],  sum_sq[u] += Σ x[r, u, i]²  over r and i
//   class_sums_*       sums[c, u] += Σ x[r, u, i] over the rows r with labels[r] == c
//
// Sums are accumulated in f64 and added atomically into the caller's zeroed (or running) output,
// so several batches can accumulate into one buffer. Labels outside 0..classes are skipped.
//
// Launch (both): block (256, 1, 1); grid.x covers the columns (dense: units, one column per
// thread; maps: one block per unit slice, see below), grid.y splits the rows. Each block adds its
// partial sums with one atomic per column (dense) or per unit (maps).
//
//   *_dense_*  inner == 1: thread t of block (bx, by) owns column c = bx * 256 + t and sums rows
//              by, by + grid.y, ...: a warp reads 32 consecutive floats per row.
//   *_maps_*   inner > 1: block (bx, by) owns unit u = bx (grid-stride over units) and rows
//              by, by + grid.y, ...; its threads sweep each row's contiguous H*W slice, then
//              reduce in shared memory.

#include "common.cuh"

#define STATS_THREADS 256

template <typename T>
__device__ __forceinline__ void unit_sums_dense(const T* __restrict__ x, double* sum,
                                                double* sum_sq, uint64_t rows, uint64_t units) {
    for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < units;
         c += (uint64_t)gridDim.x * blockDim.x) {
        double s = 0.0, s2 = 0.0;
        for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            const double v = to_double(x[r * units + c]);
            s += v;
            s2 += v * v;
        }
        atomicAdd(&sum[c], s);
        atomicAdd(&sum_sq[c], s2);
    }
}

// Block-wide sum of one double per thread; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = 0.0;
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? shared[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    }
    __syncthreads();
    return v;
}

template <typename T>
__device__ __forceinline__ void unit_sums_maps(const T* __restrict__ x, double* sum,
                                               double* sum_sq, uint64_t rows, uint64_t units,
                                               uint64_t inner) {
    __shared__ double shared[STATS_THREADS / 32];
    for (uint64_t u = blockIdx.x; u < units; u += gridDim.x) {
        double s = 0.0, s2 = 0.0;
        for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            const T* p = x + (r * units + u) * inner;
            for (uint64_t i = threadIdx.x; i < inner; i += blockDim.x) {
                const double v = to_double(p[i]);
                s += v;
                s2 += v * v;
            }
        }
        s = block_sum(s, shared);
        s2 = block_sum(s2, shared);
        if (threadIdx.x == 0) {
            atomicAdd(&sum[u], s);
            atomicAdd(&sum_sq[u], s2);
        }
    }
}

// Dense class sums. Rows are walked in order and a thread flushes its running sum when the label
// changes (the label is the same for the whole warp, so the branch does not diverge): one atomic
// per run of equal labels, so rows sorted by label cost one atomic per class and column.
template <typename T>
__device__ __forceinline__ void class_sums_dense(const T* __restrict__ x,
                                                 const uint32_t* __restrict__ labels, double* sums,
                                                 uint64_t rows, uint64_t units, uint64_t classes) {
    for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < units;
         c += (uint64_t)gridDim.x * blockDim.x) {
        double s = 0.0;
        uint32_t current = 0xFFFFFFFFu;
        for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            const uint32_t label = labels[r];
            if (label != current) {
                if (current < classes) atomicAdd(&sums[(uint64_t)current * units + c], s);
                s = 0.0;
                current = label;
            }
            s += to_double(x[r * units + c]);
        }
        if (current < classes) atomicAdd(&sums[(uint64_t)current * units + c], s);
    }
}

template <typename T>
__device__ __forceinline__ void class_sums_maps(const T* __restrict__ x,
                                                const uint32_t* __restrict__ labels, double* sums,
                                                uint64_t rows, uint64_t units, uint64_t inner,
                                                uint64_t classes) {
    __shared__ double shared[STATS_THREADS / 32];
    for (uint64_t u = blockIdx.x; u < units; u += gridDim.x) {
        for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            const uint32_t label = labels[r];  // uniform across the block
            if (label >= classes) continue;
            const T* p = x + (r * units + u) * inner;
            double s = 0.0;
            for (uint64_t i = threadIdx.x; i < inner; i += blockDim.x) s += to_double(p[i]);
            s = block_sum(s, shared);
            if (threadIdx.x == 0) atomicAdd(&sums[(uint64_t)label * units + u], s);
        }
    }
}

#define STATS_OPS(TYPENAME, SUFFIX)                                                          \
    extern "C" __global__ void unit_sums_dense_##SUFFIX(const TYPENAME* x, double* sum,      \
                                                        double* sum_sq, uint64_t rows,       \
                                                        uint64_t units) {                    \
        unit_sums_dense<TYPENAME>(x, sum, sum_sq, rows, units);                              \
    }                                                                                        \
    extern "C" __global__ void unit_sums_maps_##SUFFIX(const TYPENAME* x, double* sum,       \
                                                       double* sum_sq, uint64_t rows,        \
                                                       uint64_t units, uint64_t inner) {     \
        unit_sums_maps<TYPENAME>(x, sum, sum_sq, rows, units, inner);                        \
    }                                                                                        \
    extern "C" __global__ void class_sums_dense_##SUFFIX(const TYPENAME* x,                  \
                                                         const uint32_t* labels, double* sums, \
                                                         uint64_t rows, uint64_t units,      \
                                                         uint64_t classes) {                 \
        class_sums_dense<TYPENAME>(x, labels, sums, rows, units, classes);                   \
    }                                                                                        \
    extern "C" __global__ void class_sums_maps_##SUFFIX(const TYPENAME* x,                   \
                                                        const uint32_t* labels, double* sums, \
                                                        uint64_t rows, uint64_t units,       \
                                                        uint64_t inner, uint64_t classes) {  \
        class_sums_maps<TYPENAME>(x, labels, sums, rows, units, inner, classes);             \
    }

STATS_OPS(float, f32)
STATS_OPS(double, f64)
STATS_OPS(__half, f16)
STATS_OPS(__nv_bfloat16, bf16)
