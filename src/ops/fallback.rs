//! The probe ops on a device without a kernel for them (candle's Metal backend, or CUDA built
//! without this crate's `cuda` feature): the clamp as plain tensor ops on the device (a
//! selection, so exact), the noise and the statistics on a host copy with the CPU op (the same
//! bits as the CPU: the noise's counter-based draws and rounding, the sums' order). The results
//! are those of the CPU path; the cost is a copy to the host and back per noise or statistics
//! call.

use candle_core::{Device, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the tests to run the fallback on the CPU.
static FORCED: AtomicBool = AtomicBool::new(false);

/// Whether the ops on `device` go through this module.
pub(crate) fn needed(device: &Device) -> bool {
    if FORCED.load(Ordering::Relaxed) {
        return true;
    }
    match device {
        Device::Cpu => false,
        Device::Cuda(_) => !cfg!(feature = "cuda"),
        _ => true,
    }
}

/// Makes every op take the fallback (or not), also on the CPU: for the tests that compare the
/// two paths.
#[cfg(feature = "test-hooks")]
pub fn force_for_tests(on: bool) {
    FORCED.store(on, Ordering::Relaxed);
}

/// The level clamp as tensor ops: `(L · per_level, units, inner)` rows; row `r` of level
/// `l = r / per_level` reads row `r mod per_level` of `x` when expanding (else row `r`) and
/// keeps unit `u` where `keep[l, u]`, else takes `values[u]`.
pub(crate) fn level_clamp(
    x: &Tensor,
    keep: &Tensor,
    values: &Tensor,
    expand: bool,
) -> Result<Tensor> {
    let (rows, levels) = (x.dim(0)?, keep.dim(0)?);
    let (units, inner) = (
        values.dim(0)?,
        x.elem_count() / rows.max(1) / values.dim(0)?.max(1),
    );
    let per_level = if expand { rows } else { rows / levels.max(1) };
    let flat = x.contiguous()?.reshape((rows, units, inner))?;
    let source = if expand {
        Tensor::cat(&vec![flat; levels], 0)?
    } else {
        flat
    };
    // Each level's keep row for each of its rows: (L·per_level, units, inner).
    let mask = keep
        .reshape((levels, 1, units, 1))?
        .broadcast_as((levels, per_level, units, inner))?
        .reshape((levels * per_level, units, inner))?;
    let fill = values
        .to_dtype(x.dtype())?
        .reshape((1, units, 1))?
        .broadcast_as((levels * per_level, units, inner))?;
    let mut dims = x.dims().to_vec();
    dims[0] = levels * per_level;
    mask.where_cond(&source, &fill)?.reshape(dims)
}

/// Runs `op` on a host copy of `x` and moves the result back to `x`'s device.
pub(crate) fn on_host(x: &Tensor, op: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let host = x.to_device(&Device::Cpu)?;
    op(&host)?.to_device(x.device())
}
