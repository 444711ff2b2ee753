//! CUDA plumbing for the probe ops: the PTX that build.rs compiles from `kernels/`, module and
//! kernel names, and the launches. See `kernels/README.md` and `docs/cuda.md`.

pub(crate) use super::launch::Geometry;
use super::launch::{level_grid, stats_grid, LEVEL_BLOCK, STATS_BLOCK};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, WithDType};

/// `kernels/clamp.cu` compiled to PTX by build.rs.
pub(crate) const CLAMP_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/clamp.ptx"));
/// `kernels/noise.cu` compiled to PTX by build.rs.
pub(crate) const NOISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/noise.ptx"));

/// `kernels/stats.cu` compiled to PTX by build.rs.
pub(crate) const STATS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/stats.ptx"));

/// Names under which candle caches the loaded modules, per device. Unique to this crate so they
/// cannot collide with another library's custom modules.
const CLAMP_MODULE: &str = "candle_reliance::clamp";
const NOISE_MODULE: &str = "candle_reliance::noise";
const STATS_MODULE: &str = "candle_reliance::stats";

fn launch_config(elements: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (level_grid(elements) as u32, 1, 1),
        block_dim: (LEVEL_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The part of a storage slice a contiguous layout covers.
pub(crate) fn contiguous_view<'a, T>(
    slice: &'a CudaSlice<T>,
    layout: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// An uninitialised output of `len` elements. A zero-element output still gets one element:
/// the driver rejects zero-byte allocations (`cuMemAlloc` documents `CUDA_ERROR_INVALID_VALUE`),
/// and candle reads a storage only through its layout, so the spare element is never seen.
fn alloc_output<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element of a non-empty output is written by the kernel before it is read.
    unsafe { dev.alloc::<T>(len.max(1)) }
}

/// Launches `level_clamp[_expand]_<dtype>` (kernels/clamp.cu).
#[allow(clippy::too_many_arguments)]
pub(crate) fn level_clamp<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &str,
    g: Geometry,
    expand: bool,
    (x, lx): (&CudaSlice<T>, &Layout),
    (keep, lk): (&CudaSlice<u8>, &Layout),
    (values, lv): (&CudaSlice<T>, &Layout),
) -> Result<CudaStorage> {
    let out = alloc_output::<T>(dev, g.total)?;
    if g.total > 0 {
        let root = if expand {
            "level_clamp_expand"
        } else {
            "level_clamp"
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(root), CLAMP_MODULE, CLAMP_PTX)?;
        let x = contiguous_view(x, lx, op)?;
        let keep = contiguous_view(keep, lk, op)?;
        let values = contiguous_view(values, lv, op)?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&keep);
        b.arg(&values);
        b.arg(&out);
        candle_core::builder_arg!(
            b,
            g.total as u64,
            g.row_len as u64,
            g.units as u64,
            g.inner as u64,
            g.per_level as u64
        );
        // SAFETY: the arguments match the kernel's signature; the views cover the elements the
        // geometry indexes (checked by the op's wrapper), and `out` has `total` elements.
        unsafe { b.launch(launch_config(g.total)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Counter positions of a noise launch (see `LevelNoise`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoiseCounter {
    pub seed: u64,
    pub level_offset: u64,
    pub sample_offset: u64,
    pub total_samples: u64,
}

/// Launches `level_noise[_expand]_<dtype>` (kernels/noise.cu).
pub(crate) fn level_noise<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &str,
    g: Geometry,
    expand: bool,
    counter: NoiseCounter,
    (x, lx): (&CudaSlice<T>, &Layout),
    (std, ls): (&CudaSlice<f32>, &Layout),
) -> Result<CudaStorage> {
    let out = alloc_output::<T>(dev, g.total)?;
    if g.total > 0 {
        let root = if expand {
            "level_noise_expand"
        } else {
            "level_noise"
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(root), NOISE_MODULE, NOISE_PTX)?;
        let x = contiguous_view(x, lx, op)?;
        let std = contiguous_view(std, ls, op)?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&std);
        b.arg(&out);
        candle_core::builder_arg!(
            b,
            g.total as u64,
            g.row_len as u64,
            g.units as u64,
            g.inner as u64,
            g.per_level as u64,
            counter.seed,
            counter.level_offset,
            counter.sample_offset,
            counter.total_samples
        );
        // SAFETY: as for `level_clamp`; `std` has `levels · units` elements.
        unsafe { b.launch(launch_config(g.total)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Launches `unit_stats_{dense,maps}_<dtype>` (kernels/stats.cu) into one zeroed
/// `(2 + classes, units)` f64 output: the op `UnitSums`, in one pass over `x`.
pub(crate) fn unit_sums<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &str,
    (rows, units, inner): (usize, usize, usize),
    classes: usize,
    (x, lx): (&CudaSlice<T>, &Layout),
    (labels, ll): (&CudaSlice<u32>, &Layout),
) -> Result<CudaStorage> {
    let mut out = dev.alloc_zeros::<f64>(((2 + classes) * units).max(1))?;
    if rows > 0 && units > 0 && inner > 0 {
        let x = contiguous_view(x, lx, op)?;
        let labels = contiguous_view(labels, ll, op)?;
        let dense = inner == 1;
        let (grid_x, grid_y) = stats_grid(rows, units, inner);
        let cfg = LaunchConfig {
            grid_dim: (grid_x as u32, grid_y as u32, 1),
            block_dim: (STATS_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let root = if dense {
            "unit_stats_dense"
        } else {
            "unit_stats_maps"
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(root), STATS_MODULE, STATS_PTX)?;
        let (mut sums, mut rest) = out.split_at_mut(units);
        let (mut sums_sq, mut class_sums) = rest.split_at_mut(units);
        // Scalar arguments live here: the builder keeps references to them until the launch.
        let (rows_arg, units_arg, inner_arg, classes_arg) =
            (rows as u64, units as u64, inner as u64, classes as u64);
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&labels);
        b.arg(&mut sums);
        b.arg(&mut sums_sq);
        b.arg(&mut class_sums);
        b.arg(&rows_arg);
        b.arg(&units_arg);
        if !dense {
            b.arg(&inner_arg);
        }
        b.arg(&classes_arg);
        // SAFETY: the arguments match the kernel's signature; `x` covers rows · units · inner
        // elements, `labels` rows, and the three views of `out` hold units, units and
        // classes · units elements (checked by the op's wrapper).
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
