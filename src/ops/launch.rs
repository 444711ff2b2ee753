//! Launch geometry of the CUDA kernels: what `src/ops/cuda.rs` passes to each launch.
//!
//! Plain arithmetic with no CUDA types, compiled with or without the `cuda` feature, so that
//! the host emulation of the kernels (`tests/kernel_emulation*.rs`) runs the launcher's own
//! arguments and grids instead of a copy of them.

use super::rows_units_inner;
use candle_core::Result;

/// Threads per block of the level clamp and noise kernels.
pub(crate) const LEVEL_BLOCK: usize = 256;
/// Enough blocks to fill any current GPU many times over; larger launches loop inside (the
/// kernels are grid-stride loops, so any grid covers any size).
const LEVEL_MAX_BLOCKS: usize = 1 << 16;

/// `grid.x` of a level clamp or noise launch over `elements` output elements.
pub(crate) fn level_grid(elements: usize) -> usize {
    elements.div_ceil(LEVEL_BLOCK).clamp(1, LEVEL_MAX_BLOCKS)
}

/// Output geometry of the level clamp and noise kernels, in the kernels' terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Output elements: `levels · per_level · row_len`.
    pub total: usize,
    /// Elements per row: `units · inner`.
    pub row_len: usize,
    /// Units (columns, or channels of a convolutional activation).
    pub units: usize,
    /// Positions per unit: 1, or `H·W`.
    pub inner: usize,
    /// Rows per level (the input's rows when expanding).
    pub per_level: usize,
}

impl Geometry {
    /// The geometry of a level op over an input of shape `dims` with `levels` levels.
    pub(crate) fn new(dims: &[usize], levels: usize, expand: bool) -> Result<Self> {
        let (rows, units, inner) = rows_units_inner(dims)?;
        if levels == 0 {
            candle_core::bail!("level op: zero levels");
        }
        let per_level = if expand { rows } else { rows / levels };
        let row_len = units * inner;
        Ok(Self {
            total: per_level * levels * row_len,
            row_len,
            units,
            inner,
            per_level,
        })
    }
}

/// Threads per block of the statistics kernels (`STATS_THREADS` in kernels/stats.cu).
pub(crate) const STATS_BLOCK: usize = 256;
/// Blocks a statistics launch aims for: enough to fill a GPU several times over. Row splits
/// beyond it only add atomics.
const STATS_TARGET_BLOCKS: usize = 1024;
/// The hardware limit of `gridDim.y` (and our cap on `gridDim.x`; the kernels stride over it).
const GRID_LIMIT: usize = 65535;

/// `(grid.x, grid.y)` of the statistics launch for an activation `(rows, units, inner)`.
///
/// Dense (`inner == 1`): one thread per column, so `grid.x` covers the units in blocks of
/// [`STATS_BLOCK`]; maps: one block per unit. `grid.y` splits the rows.
pub(crate) fn stats_grid(rows: usize, units: usize, inner: usize) -> (usize, usize) {
    let grid_x = if inner == 1 {
        units.div_ceil(STATS_BLOCK)
    } else {
        units
    }
    .clamp(1, GRID_LIMIT);
    let grid_y = (STATS_TARGET_BLOCKS / grid_x).clamp(1, rows.clamp(1, GRID_LIMIT));
    (grid_x, grid_y)
}
