// Per-unit statistics in one pass over an activation viewed as (rows, units, inner), with labels
// (rows,) u32:
//
//   sum[u]           += Σ x[r, u, i]      over r and i
//   sum_sq[u]        += Σ x[r, u, i]²
//   class_sums[c, u] += Σ x[r, u, i]      over i and the rows r with labels[r] == c
//
// Sums are accumulated in f64 and added atomically into the caller's zeroed (or running) output,
// so several batches can accumulate into one buffer. Labels outside 0..classes add to no class
// (classes may be 0). Each element of x is read once.
//
// Launch (both): block (256, 1, 1); grid.x covers the columns (dense: units, one column per
// thread; maps: one block per unit slice, see below), grid.y splits the rows.
//
//   unit_stats_dense_*  inner == 1: thread t of block (bx, by) owns column c = bx * 256 + t and
//                       sums rows by, by + grid.y, ...: a warp reads 32 consecutive values per
//                       row. One atomic per column for sum and sum_sq, and one per run of equal
//                       labels for the class sums (the label is the same for the whole warp, so
//                       the branch does not diverge): rows sorted by label cost one class atomic
//                       per class and column.
//   unit_stats_maps_*   inner > 1: block (bx, by) owns unit u = bx (grid-stride over units) and
//                       rows by, by + grid.y, ...; its threads sweep each row's contiguous H*W
//                       slice. A run of equal labels ends with one block reduction in shared
//                       memory and one atomic; sum and sum_sq are reduced once at the end.

#include "common.cuh"

#define STATS_THREADS 256

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
__device__ __forceinline__ void unit_stats_dense(const T* __restrict__ x,
                                                 const uint32_t* __restrict__ labels, double* sum,
                                                 double* sum_sq, double* class_sums,
                                                 uint64_t rows, uint64_t units, uint64_t classes) {
    for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < units;
         c += (uint64_t)gridDim.x * blockDim.x) {
        double s = 0.0, s2 = 0.0, cs = 0.0;
        uint32_t current = 0xFFFFFFFFu;
        for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            const uint32_t label = labels[r];
            if (label != current) {
                if (current < classes) atomicAdd(&class_sums[(uint64_t)current * units + c], cs);
                cs = 0.0;
                current = label;
            }
            const double v = to_double(x[r * units + c]);
            s += v;
            s2 += v * v;
            cs += v;
        }
        if (current < classes) atomicAdd(&class_sums[(uint64_t)current * units + c], cs);
        atomicAdd(&sum[c], s);
        atomicAdd(&sum_sq[c], s2);
    }
}

template <typename T>
__device__ __forceinline__ void unit_stats_maps(const T* __restrict__ x,
                                                const uint32_t* __restrict__ labels, double* sum,
                                                double* sum_sq, double* class_sums, uint64_t rows,
                                                uint64_t units, uint64_t inner, uint64_t classes) {
    __shared__ double shared[STATS_THREADS / 32];
    for (uint64_t u = blockIdx.x; u < units; u += gridDim.x) {
        double s = 0.0, s2 = 0.0, cs = 0.0;
        // Every thread reads the same labels, so `current` and the branches on it are uniform
        // across the block, as block_sum's barriers need.
        uint32_t current = 0xFFFFFFFFu;
        for (uint64_t r = blockIdx.y; r < rows; r += gridDim.y) {
            const uint32_t label = labels[r];
            if (label != current) {
                if (current < classes) {
                    const double t = block_sum(cs, shared);
                    if (threadIdx.x == 0) atomicAdd(&class_sums[(uint64_t)current * units + u], t);
                }
                cs = 0.0;
                current = label;
            }
            const T* p = x + (r * units + u) * inner;
            for (uint64_t i = threadIdx.x; i < inner; i += blockDim.x) {
                const double v = to_double(p[i]);
                s += v;
                s2 += v * v;
                cs += v;
            }
        }
        if (current < classes) {
            const double t = block_sum(cs, shared);
            if (threadIdx.x == 0) atomicAdd(&class_sums[(uint64_t)current * units + u], t);
        }
        s = block_sum(s, shared);
        s2 = block_sum(s2, shared);
        if (threadIdx.x == 0) {
            atomicAdd(&sum[u], s);
            atomicAdd(&sum_sq[u], s2);
        }
    }
}

#define STATS_OPS(TYPENAME, SUFFIX)                                                           \
    extern "C" __global__ void unit_stats_dense_##SUFFIX(                                     \
        const TYPENAME* x, const uint32_t* labels, double* sum, double* sum_sq,               \
        double* class_sums, uint64_t rows, uint64_t units, uint64_t classes) {                \
        unit_stats_dense<TYPENAME>(x, labels, sum, sum_sq, class_sums, rows, units, classes); \
    }                                                                                         \
    extern "C" __global__ void unit_stats_maps_##SUFFIX(                                      \
        const TYPENAME* x, const uint32_t* labels, double* sum, double* sum_sq,               \
        double* class_sums, uint64_t rows, uint64_t units, uint64_t inner, uint64_t classes) { \
        unit_stats_maps<TYPENAME>(x, labels, sum, sum_sq, class_sums, rows, units, inner,     \
                                  classes);                                                   \
    }

STATS_OPS(float, f32)
STATS_OPS(double, f64)
STATS_OPS(__half, f16)
STATS_OPS(__nv_bfloat16, bf16)
