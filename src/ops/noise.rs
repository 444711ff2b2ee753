//! Level-scaled Gaussian noise: `out[l, m, u, ·] = x[m, u, ·] + std[l, u] · z`, where `z` is the
//! counter-based normal [`counter_normal`](crate::rng::counter_normal) of the element's position
//! in the *whole* measurement (global level, global sample), so a result does not depend on how
//! samples and levels were split into chunks.

use super::{contiguous, output_dims, rows_units_inner};
use crate::rng::counter_normal;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

pub(crate) struct LevelNoise {
    pub levels: usize,
    pub expand: bool,
    pub seed: u64,
    /// Global index of this call's first level and first sample, and the total sample count.
    pub level_offset: usize,
    pub sample_offset: usize,
    pub total_samples: usize,
}

impl LevelNoise {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        dims: &[usize],
        std: &[f32],
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
                    let m = row % per_level;
                    let src_row = if self.expand { m } else { row };
                    let src = &x[src_row * row_len..(src_row + 1) * row_len];
                    let global_row = ((self.level_offset + level) * self.total_samples
                        + self.sample_offset
                        + m) as u64;
                    let base = global_row * row_len as u64;
                    for u in 0..units {
                        let s = std[level * units + u];
                        for i in u * inner..(u + 1) * inner {
                            let z = counter_normal(self.seed, base + i as u64);
                            dst[i] = T::from_f64(src[i].to_f64() + (s * z) as f64);
                        }
                    }
                });
        }
        Ok((T::to_cpu_storage_owned(out), Shape::from_dims(&out_dims)))
    }
}

impl CustomOp2 for LevelNoise {
    fn name(&self) -> &'static str {
        "reliance-level-noise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let std = match s2 {
            CpuStorage::F32(s) => contiguous(s, l2, self.name())?,
            _ => candle_core::bail!("{}: std must be f32", self.name()),
        };
        let dims = l1.shape().dims();
        match s1 {
            CpuStorage::F32(x) => self.run(contiguous(x, l1, self.name())?, dims, std),
            CpuStorage::F64(x) => self.run(contiguous(x, l1, self.name())?, dims, std),
            CpuStorage::BF16(x) => self.run(contiguous(x, l1, self.name())?, dims, std),
            CpuStorage::F16(x) => self.run(contiguous(x, l1, self.name())?, dims, std),
            _ => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), s1.dtype()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Geometry, NoiseCounter};
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let dims = l1.shape().dims();
        let g = Geometry::new(dims, self.levels, self.expand)?;
        let std = match &s2.slice {
            S::F32(s) => (s, l2),
            _ => candle_core::bail!("{}: std must be f32", self.name()),
        };
        let counter = NoiseCounter {
            seed: self.seed,
            level_offset: self.level_offset as u64,
            sample_offset: self.sample_offset as u64,
            total_samples: self.total_samples as u64,
        };
        let dev = &s1.device;
        let (name, expand) = (self.name(), self.expand);
        let out = match &s1.slice {
            S::F32(x) => cuda::level_noise(dev, name, g, expand, counter, (x, l1), std),
            S::F64(x) => cuda::level_noise(dev, name, g, expand, counter, (x, l1), std),
            S::BF16(x) => cuda::level_noise(dev, name, g, expand, counter, (x, l1), std),
            S::F16(x) => cuda::level_noise(dev, name, g, expand, counter, (x, l1), std),
            _ => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), s1.dtype()),
        }?;
        Ok((
            out,
            Shape::from_dims(&output_dims(dims, self.levels, expand)),
        ))
    }
}

/// Adds `std[l, u] · N(0, 1)` noise per level; see [`LevelNoise`] for the indexing.
pub(crate) fn level_noise(x: &Tensor, std: &Tensor, op: LevelNoise) -> Result<Tensor> {
    let (rows, units, _) = rows_units_inner(x.dims())?;
    let (levels, std_units) = std.dims2()?;
    if std_units != units || levels != op.levels {
        candle_core::bail!(
            "level noise: activation has {units} units, std {:?}",
            std.dims()
        );
    }
    if !op.expand && rows % levels != 0 {
        candle_core::bail!("level noise: {rows} rows is not a multiple of {levels} levels");
    }
    let std = std.to_dtype(candle_core::DType::F32)?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(&std, &op)
}
