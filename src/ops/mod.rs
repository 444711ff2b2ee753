//! The tensor operations a measurement runs at the probes.
//!
//! Each is one candle custom op so that a device backend can replace it with a single kernel
//! (`kernels/` holds one source file per op family here). Activations are viewed as
//! `(rows, units, inner)`: `inner` is 1 for a dense activation `(N, U)` and `H·W` for a
//! convolutional one `(N, C, H, W)`, whose units are whole feature maps.
//!
//! A measurement evaluates `L` variants (masks or noise settings) at once; here and in the
//! kernels a variant is called a *level* (`L` levels). The first probe a forward pass reaches
//! *expands* its input from `M` rows to `L·M` rows, level-major; later probes see `L·M` rows and
//! apply the level's setting to the rows of that level. Private to the crate; with the
//! `test-hooks` feature (this crate's own tests) the `*_for_tests` functions are public.

/// Evaluates `$body` with `$x` bound to the data of a float storage — `$data` is a
/// `CpuStorage` or a `CudaStorageSlice` (`$kind`), whose variants share their names — so that
/// the body is compiled once per float dtype; any other dtype (`$dtype`) is an error naming
/// `$op`.
macro_rules! with_float_data {
    ($data:expr, $kind:ident, $op:expr, $dtype:expr, |$x:ident| $body:expr) => {
        match $data {
            $kind::F32($x) => $body,
            $kind::F64($x) => $body,
            $kind::BF16($x) => $body,
            $kind::F16($x) => $body,
            _ => candle_core::bail!("{}: unsupported dtype {:?}", $op, $dtype),
        }
    };
}

mod clamp;
#[cfg(feature = "cuda")]
mod cuda;
mod fallback;
#[cfg(feature = "test-hooks")]
pub use fallback::force_for_tests as force_fallback_for_tests;
mod incremental;
// Launch geometry: the CUDA kernels and the host emulation of them in the tests.
#[cfg(any(feature = "cuda", feature = "test-hooks"))]
mod launch;
mod noise;
mod stats;

pub(crate) use clamp::{level_clamp, level_clamp_shared};
pub(crate) use incremental::{ConvShape, IncrementalCpu, LayerShape, Tail};
#[cfg(feature = "test-hooks")]
pub use launch::Geometry;
pub(crate) use noise::{level_noise, LevelNoise};
pub(crate) use stats::unit_sums;

use candle_core::{Layout, Result, Tensor};

/// The level clamp op on any device, for the device-equivalence tests; not part of the API.
#[cfg(feature = "test-hooks")]
pub fn level_clamp_for_tests(
    x: &Tensor,
    keep: &Tensor,
    values: &Tensor,
    expand: bool,
) -> Result<Tensor> {
    level_clamp(x, keep, values, expand)
}

/// The level noise op on any device, for the device-equivalence tests; not part of the API.
/// `offsets` is `(level_offset, sample_offset, total_samples)`.
#[cfg(feature = "test-hooks")]
pub fn level_noise_for_tests(
    x: &Tensor,
    std: &Tensor,
    expand: bool,
    seed: u64,
    offsets: (usize, usize, usize),
) -> Result<Tensor> {
    let (levels, _) = std.dims2()?;
    let (level_offset, sample_offset, total_samples) = offsets;
    let op = LevelNoise {
        levels,
        expand,
        seed,
        level_offset,
        sample_offset,
        total_samples,
    };
    level_noise(x, std, op)
}

/// The statistics pass's per-unit sums on any device, for the device-equivalence tests; not
/// part of the API. Returns `(2 + classes, units)` f64: sums, sums of squares, class sums.
#[cfg(feature = "test-hooks")]
pub fn unit_sums_for_tests(x: &Tensor, labels: &Tensor, classes: usize) -> Result<Tensor> {
    unit_sums(x, labels, classes)
}

/// Geometry of a level clamp or noise launch over an input of shape `dims`, as the CUDA
/// launcher passes it, for the host emulation of the kernels; not part of the API.
#[cfg(feature = "test-hooks")]
pub fn level_geometry_for_tests(dims: &[usize], levels: usize, expand: bool) -> Result<Geometry> {
    Geometry::new(dims, levels, expand)
}

/// Threads per block and `grid.x` of a level clamp or noise launch over `elements` output
/// elements, for the host emulation of the kernels; not part of the API.
#[cfg(feature = "test-hooks")]
pub fn level_launch_for_tests(elements: usize) -> (usize, usize) {
    (launch::LEVEL_BLOCK, launch::level_grid(elements))
}

/// Threads per block and `(grid.x, grid.y)` of the statistics launch for an activation
/// `(rows, units, inner)`, for the host emulation of the kernels; not part of the API.
#[cfg(feature = "test-hooks")]
pub fn unit_sums_launch_for_tests(
    rows: usize,
    units: usize,
    inner: usize,
) -> (usize, (usize, usize)) {
    (launch::STATS_BLOCK, launch::stats_grid(rows, units, inner))
}

/// Whether every value of a float tensor is finite: `x − x` is 0 for every finite `x` and NaN for
/// NaN and ±inf, and one NaN makes the sum NaN. One reduction on the tensor's own device, no copy
/// of it to the host.
pub(crate) fn all_finite(x: &Tensor) -> Result<bool> {
    let s = x.sub(x)?.sum_all()?.to_dtype(candle_core::DType::F32)?;
    Ok(s.to_scalar::<f32>()?.is_finite())
}

/// `(rows, units, inner)` of a rank-2 or rank-4 activation.
pub(crate) fn rows_units_inner(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match dims {
        [n, u] => Ok((*n, *u, 1)),
        [n, c, h, w] => Ok((*n, *c, h * w)),
        _ => candle_core::bail!(
            "an activation must have shape (N, units) or (N, C, H, W), got {dims:?}"
        ),
    }
}

/// The contiguous slice of `data` a layout covers, or an error naming the op.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Shape of the op's output: the input's, with `rows·levels` rows when expanding.
pub(crate) fn output_dims(dims: &[usize], levels: usize, expand: bool) -> Vec<usize> {
    let mut out = dims.to_vec();
    if expand {
        out[0] *= levels;
    }
    out
}
