//! Level-masked clamp: `out[l, m, u, ·] = keep[l, u] ? x[m, u, ·] : value[u]`.
//!
//! A select, not `x·keep + value·(1−keep)`: the arithmetic form turns an infinite or NaN
//! activation into NaN even where the unit is clamped, and is two passes instead of one.

use super::{contiguous, output_dims, rows_units_inner};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

pub(crate) struct LevelClamp {
    pub levels: usize,
    pub expand: bool,
}

impl LevelClamp {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        dims: &[usize],
        keep: &[u8],
        values: &[T],
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, units, inner) = rows_units_inner(dims)?;
        let l = self.levels;
        let per_level = if self.expand { rows } else { rows / l };
        let row_len = units * inner;
        let out_dims = output_dims(dims, l, self.expand);
        let mut out = vec![T::zero(); per_level * l * row_len];
        if row_len > 0 {
            out.par_chunks_mut(row_len)
                .enumerate()
                .for_each(|(row, dst)| {
                    let level = row / per_level;
                    let src_row = if self.expand { row % per_level } else { row };
                    let src = &x[src_row * row_len..(src_row + 1) * row_len];
                    let keep = &keep[level * units..(level + 1) * units];
                    for u in 0..units {
                        let d = &mut dst[u * inner..(u + 1) * inner];
                        if keep[u] != 0 {
                            d.copy_from_slice(&src[u * inner..(u + 1) * inner]);
                        } else {
                            d.fill(values[u]);
                        }
                    }
                });
        }
        Ok((T::to_cpu_storage_owned(out), Shape::from_dims(&out_dims)))
    }
}

impl CustomOp3 for LevelClamp {
    fn name(&self) -> &'static str {
        "reliance-level-clamp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let keep = match s2 {
            CpuStorage::U8(k) => contiguous(k, l2, self.name())?,
            _ => candle_core::bail!("{}: keep mask must be u8", self.name()),
        };
        let dims = l1.shape().dims();
        macro_rules! go {
            ($x:expr, $v:expr) => {
                self.run(
                    contiguous($x, l1, self.name())?,
                    dims,
                    keep,
                    contiguous($v, l3, self.name())?,
                )
            };
        }
        match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(v)) => go!(x, v),
            (CpuStorage::F64(x), CpuStorage::F64(v)) => go!(x, v),
            (CpuStorage::BF16(x), CpuStorage::BF16(v)) => go!(x, v),
            (CpuStorage::F16(x), CpuStorage::F16(v)) => go!(x, v),
            _ => candle_core::bail!(
                "{}: unsupported dtypes {:?} / {:?}",
                self.name(),
                s1.dtype(),
                s3.dtype()
            ),
        }
    }
}

/// Clamps the units whose `keep` entry is 0 to `values`, one mask row per level.
///
/// * `x`: `(M, U)` / `(M, C, H, W)` when `expand`, else `(L·M, …)`.
/// * `keep`: `(L, U)` u8 (non-zero keeps the unit). `values`: `(U,)`, any float dtype.
pub(crate) fn level_clamp(
    x: &Tensor,
    keep: &Tensor,
    values: &Tensor,
    expand: bool,
) -> Result<Tensor> {
    let (rows, units, _) = rows_units_inner(x.dims())?;
    let (levels, mask_units) = keep.dims2()?;
    if mask_units != units || values.dims1()? != units {
        candle_core::bail!(
            "level clamp: activation has {units} units, mask {:?}, values {:?}",
            keep.dims(),
            values.dims()
        );
    }
    if !expand && rows % levels != 0 {
        candle_core::bail!("level clamp: {rows} rows is not a multiple of {levels} levels");
    }
    if keep.dtype() != DType::U8 {
        candle_core::bail!("level clamp: keep mask must be u8, got {:?}", keep.dtype());
    }
    let values = values.to_dtype(x.dtype())?;
    x.contiguous()?.apply_op3_no_bwd(
        &keep.contiguous()?,
        &values.contiguous()?,
        &LevelClamp { levels, expand },
    )
}
