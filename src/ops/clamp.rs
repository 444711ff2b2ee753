//! Level-masked clamp: `out[l, m, u, ·] = keep[l, u] ? x[m, u, ·] : value[u]`.
//!
//! A select, not `x·keep + value·(1−keep)`: the arithmetic form turns an infinite or NaN
//! activation into NaN even where the unit is clamped, and is two passes instead of one.

use super::{contiguous, rows_units_inner};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::mem::{align_of, size_of, MaybeUninit};
use std::ops::{BitAnd, BitOr, Not};
use std::sync::Arc;

pub(crate) struct LevelClamp {
    pub levels: usize,
    pub expand: bool,
    /// For each level, the block of `rows_in` rows of `x` it reads (shared rows, see
    /// `probe::merge`); CPU only. `None`: the level's own rows, or the input when `expand`.
    pub sources: Option<(Arc<[u32]>, usize)>,
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
        let per_level = match (&self.sources, self.expand) {
            (Some((blocks, rows_in)), _) => {
                if blocks.len() != l || blocks.iter().any(|&b| (b as usize + 1) * rows_in > rows) {
                    candle_core::bail!("level clamp: block sources out of range of {rows} rows");
                }
                *rows_in
            }
            (None, true) => rows,
            (None, false) => rows / l,
        };
        let row_len = units * inner;
        let mut out_dims = dims.to_vec();
        out_dims[0] = per_level * l;
        let total = per_level * l * row_len;
        // Every element is written below; skipping the zero fill saves a pass over the output.
        let mut out: Vec<T> = Vec::with_capacity(total);
        // Tasks of ~64 KiB of output: enough to split across threads, few enough that task
        // overhead stays small next to the copying. (No task at all for zero-width rows.)
        if let Some(rows_per_task) = 16384usize.checked_div(row_len) {
            let rows_per_task = rows_per_task.max(1);
            out.spare_capacity_mut()[..total]
                .par_chunks_mut(row_len * rows_per_task)
                .enumerate()
                .for_each(|(task, block)| {
                    for (i, dst) in block.chunks_mut(row_len).enumerate() {
                        let row = task * rows_per_task + i;
                        let level = row / per_level;
                        let src_row = match &self.sources {
                            Some((blocks, _)) => {
                                blocks[level] as usize * per_level + row % per_level
                            }
                            None if self.expand => row % per_level,
                            None => row,
                        };
                        let src = &x[src_row * row_len..(src_row + 1) * row_len];
                        let keep = &keep[level * units..(level + 1) * units];
                        if inner == 1 {
                            // Dense activations: a select on the values' bits (see
                            // `select_bits`), which the compiler vectorizes.
                            select_row(dst, src, keep, values);
                        } else {
                            for u in 0..units {
                                let d = &mut dst[u * inner..(u + 1) * inner];
                                if keep[u] != 0 {
                                    for (d, &s) in
                                        d.iter_mut().zip(&src[u * inner..(u + 1) * inner])
                                    {
                                        d.write(s);
                                    }
                                } else {
                                    d.iter_mut().for_each(|d| {
                                        d.write(values[u]);
                                    });
                                }
                            }
                        }
                    }
                });
        }
        // SAFETY: the loop above wrote all `total` elements: the row blocks tile `0..total`
        // and each row writes every one of its `row_len` elements.
        unsafe { out.set_len(total) };
        Ok((T::to_cpu_storage_owned(out), Shape::from_dims(&out_dims)))
    }
}

/// `dst[u] = keep[u] != 0 ? src[u] : values[u]` for one dense row, on the values' raw bits.
fn select_row<T: WithDType>(dst: &mut [MaybeUninit<T>], src: &[T], keep: &[u8], values: &[T]) {
    match size_of::<T>() {
        2 => select_bits::<T, u16>(dst, src, keep, values),
        4 => select_bits::<T, u32>(dst, src, keep, values),
        8 => select_bits::<T, u64>(dst, src, keep, values),
        // Every float dtype candle has is 2, 4 or 8 bytes wide.
        _ => {
            for (((d, &s), &k), &v) in dst.iter_mut().zip(src).zip(keep).zip(values) {
                d.write(if k != 0 { s } else { v });
            }
        }
    }
}

/// The select of [`select_row`] as `(s & m) | (v & !m)` on unsigned integers `U` as wide as
/// `T`, with `m` all ones where the unit is kept. A float select on a byte mask does not
/// vectorize (measured 2× slower than this on the 784-256-256-10 benchmark's rows); bits also
/// move NaN payloads unchanged, as the kernels do.
fn select_bits<T: WithDType, U>(dst: &mut [MaybeUninit<T>], src: &[T], keep: &[u8], values: &[T])
where
    U: Copy + Default + BitAnd<Output = U> + BitOr<Output = U> + Not<Output = U>,
{
    assert!(size_of::<T>() == size_of::<U>() && align_of::<T>() == align_of::<U>());
    let n = dst.len().min(src.len()).min(keep.len()).min(values.len());
    // SAFETY: `T` and `U` have the same size and alignment (asserted above), every bit pattern
    // is a valid `U`, and `T` (a float) is valid for any bits written through `U`. The views
    // cover the same elements as the slices they come from and are not used past this call.
    let (dst, src, values) = unsafe {
        (
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<MaybeUninit<U>>(), n),
            std::slice::from_raw_parts(src.as_ptr().cast::<U>(), n),
            std::slice::from_raw_parts(values.as_ptr().cast::<U>(), n),
        )
    };
    let ones = !U::default();
    for (((d, &s), &k), &v) in dst.iter_mut().zip(src).zip(&keep[..n]).zip(values) {
        let m = if k != 0 { ones } else { U::default() };
        d.write((s & m) | (v & !m));
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Geometry};
        use candle_core::cuda_backend::CudaStorageSlice as S;
        if self.sources.is_some() {
            candle_core::bail!("{}: block sources are a CPU path", self.name());
        }
        let dims = l1.shape().dims();
        let g = Geometry::new(dims, self.levels, self.expand)?;
        let keep = match &s2.slice {
            S::U8(k) => (k, l2),
            _ => candle_core::bail!("{}: keep mask must be u8", self.name()),
        };
        let dev = &s1.device;
        let (name, expand) = (self.name(), self.expand);
        let out = match (&s1.slice, &s3.slice) {
            (S::F32(x), S::F32(v)) => {
                cuda::level_clamp(dev, name, g, expand, (x, l1), keep, (v, l3))
            }
            (S::F64(x), S::F64(v)) => {
                cuda::level_clamp(dev, name, g, expand, (x, l1), keep, (v, l3))
            }
            (S::BF16(x), S::BF16(v)) => {
                cuda::level_clamp(dev, name, g, expand, (x, l1), keep, (v, l3))
            }
            (S::F16(x), S::F16(v)) => {
                cuda::level_clamp(dev, name, g, expand, (x, l1), keep, (v, l3))
            }
            _ => candle_core::bail!(
                "{}: unsupported dtypes {:?} / {:?}",
                self.name(),
                s1.dtype(),
                s3.dtype()
            ),
        }?;
        Ok((
            out,
            Shape::from_dims(&super::output_dims(dims, self.levels, expand)),
        ))
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
    let (rows, levels) = (x.dim(0)?, keep.dim(0)?);
    if !expand && rows % levels.max(1) != 0 {
        candle_core::bail!("level clamp: {rows} rows is not a multiple of {levels} levels");
    }
    if super::fallback::needed(x.device()) {
        check(x, keep, values)?;
        return super::fallback::level_clamp(x, keep, values, expand);
    }
    let op = LevelClamp {
        levels,
        expand,
        sources: None,
    };
    apply(x, keep, values, op)
}

/// [`level_clamp`] of rows shared by blocks of levels: level `l` reads the `rows_in` rows of
/// block `sources[l]` of `x` (`(B·rows_in, …)`); the result has `L·rows_in` rows. One pass on
/// the CPU; elsewhere a gather of the blocks' rows, then the clamp.
pub(crate) fn level_clamp_shared(
    x: &Tensor,
    (sources, on_device): (&Arc<[u32]>, &Tensor),
    rows_in: usize,
    keep: &Tensor,
    values: &Tensor,
) -> Result<Tensor> {
    let levels = keep.dim(0)?;
    if sources.len() != levels || rows_in == 0 || x.dim(0)? % rows_in != 0 {
        candle_core::bail!(
            "level clamp: {} block sources for {levels} levels, {} rows in blocks of {rows_in}",
            sources.len(),
            x.dim(0)?
        );
    }
    if !x.device().is_cpu() || super::fallback::needed(x.device()) {
        let mut out = x.dims().to_vec();
        out[0] = levels * rows_in;
        let blocks = x.dim(0)? / rows_in;
        let gathered = x
            .contiguous()?
            .reshape((blocks, x.elem_count() / blocks))?
            .index_select(on_device, 0)?
            .reshape(out)?;
        return level_clamp(&gathered, keep, values, false);
    }
    let op = LevelClamp {
        levels,
        expand: false,
        sources: Some((sources.clone(), rows_in)),
    };
    apply(x, keep, values, op)
}

/// Checks the mask and values against the activation's units, then runs `op`.
fn apply(x: &Tensor, keep: &Tensor, values: &Tensor, op: LevelClamp) -> Result<Tensor> {
    check(x, keep, values)?;
    let values = values.to_dtype(x.dtype())?;
    x.contiguous()?
        .apply_op3_no_bwd(&keep.contiguous()?, &values.contiguous()?, &op)
}

/// The mask `(L, units)` u8 and the values `(units,)` must fit the activation.
fn check(x: &Tensor, keep: &Tensor, values: &Tensor) -> Result<()> {
    let (_, units, _) = rows_units_inner(x.dims())?;
    if keep.dims2()?.1 != units || values.dims1()? != units {
        candle_core::bail!(
            "level clamp: activation has {units} units, mask {:?}, values {:?}",
            keep.dims(),
            values.dims()
        );
    }
    if keep.dtype() != DType::U8 {
        candle_core::bail!("level clamp: keep mask must be u8, got {:?}", keep.dtype());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shared_blocks_hand_worked() -> Result<()> {
        let dev = Device::Cpu;
        // Two blocks of two rows, two units: block 0 = [[1, 2], [3, 4]], block 1 = [[5, 6],
        // [7, 8]]. Level 0 reads block 1 keeping both units, level 1 block 1 clamping unit 0 to
        // 9, level 2 block 0 clamping unit 1 to -1.
        let x = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.], [7., 8.]], &dev)?;
        let sources: Arc<[u32]> = vec![1, 1, 0].into();
        let on_device = Tensor::new(&[1u32, 1, 0], &dev)?;
        let keep = Tensor::new(&[[1u8, 1], [0, 1], [1, 0]], &dev)?;
        let values = Tensor::new(&[9f32, -1.], &dev)?;
        let out = level_clamp_shared(&x, (&sources, &on_device), 2, &keep, &values)?;
        let want = [[5., 6.], [7., 8.], [9., 6.], [9., 8.], [1., -1.], [3., -1.]];
        assert_eq!(out.to_vec2::<f32>()?, want);
        // Feature maps (1 row per block, 2 channels of 2 positions): whole channels clamp.
        let maps = Tensor::new(&[[[1f32, 2.], [3., 4.]], [[5., 6.], [7., 8.]]], &dev)?
            .reshape((2, 2, 1, 2))?;
        let out = level_clamp_shared(&maps, (&sources, &on_device), 1, &keep, &values)?;
        let want = [5., 6., 7., 8., 9., 9., 7., 8., 1., 2., -1., -1.];
        assert_eq!(out.dims(), [3, 2, 1, 2]);
        assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, want);
        // A source past the blocks is an error, not a read out of bounds.
        let far: Arc<[u32]> = vec![1, 2, 0].into();
        let far_dev = Tensor::new(&[1u32, 2, 0], &dev)?;
        assert!(level_clamp_shared(&x, (&far, &far_dev), 2, &keep, &values).is_err());
        Ok(())
    }
}
