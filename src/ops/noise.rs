//! Level-scaled Gaussian noise: `out[l, m, u, ·] = x[m, u, ·] + std[l, u] · z`, where `z` is the
//! counter-based normal [`counter_normal`](crate::rng::counter_normal) of the element's position
//! in the *whole* measurement (global level, global sample), so a result does not depend on how
//! samples and levels were split into chunks.

use super::{contiguous, output_dims, rows_units_inner};
use crate::rng::counter_normal;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
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
                    // 64-bit wrapping arithmetic, exactly as kernels/noise.cu forms the index.
                    let global_row = ((self.level_offset as u64).wrapping_add(level as u64))
                        .wrapping_mul(self.total_samples as u64)
                        .wrapping_add(self.sample_offset as u64)
                        .wrapping_add(m as u64);
                    let base = global_row.wrapping_mul(row_len as u64);
                    for u in 0..units {
                        let s = std[level * units + u];
                        for i in u * inner..(u + 1) * inner {
                            let z = counter_normal(self.seed, base.wrapping_add(i as u64));
                            dst[i] = round_from_f64(src[i].to_f64() + (s * z) as f64);
                        }
                    }
                });
        }
        Ok((T::to_cpu_storage_owned(out), Shape::from_dims(&out_dims)))
    }
}

/// `v` rounded once, to nearest with ties to even, to `T`: what the kernels' `__double2half` /
/// `__double2bfloat16` compute. `half`'s `from_f64` is not always correctly rounded (f16 goes
/// through f32 on x86 with F16C, so the result depends on the processor; bf16 drops low bits of
/// the f64 first), so narrow types are rounded here and handed over exactly representable.
#[inline]
fn round_from_f64<T: WithDType>(v: f64) -> T {
    match T::DTYPE {
        // 11 significant bits, smallest normal 2^-14, largest finite 65504.
        DType::F16 => T::from_f64(round_to_precision(v, 11, -14, 65504.0)),
        // 8 significant bits, smallest normal 2^-126, largest finite (2 - 2^-7) · 2^127.
        DType::BF16 => T::from_f64(round_to_precision(v, 8, -126, 3.389_531_389_251_535_5e38)),
        // `as f32` rounds to nearest-even; f64 is exact.
        _ => T::from_f64(v),
    }
}

/// `v` rounded to nearest-even in a binary format of `precision` significant bits, smallest
/// normal exponent `min_exp` (subnormals below it) and largest finite value `max`; values that
/// round beyond `max` become infinite. The result is exact in that format.
fn round_to_precision(v: f64, precision: i32, min_exp: i32, max: f64) -> f64 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let exp = ((v.abs().to_bits() >> 52) as i32 - 1023).max(min_exp);
    // A power of two: scaling by it is exact, and so is rounding the scaled value.
    let ulp = 2f64.powi(exp - (precision - 1));
    let r = (v / ulp).round_ties_even() * ulp;
    if r.abs() > max {
        f64::INFINITY.copysign(v)
    } else {
        r
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
        with_float_data!(s1, CpuStorage, self.name(), s1.dtype(), |x| {
            self.run(contiguous(x, l1, self.name())?, dims, std)
        })
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
        let out = with_float_data!(&s1.slice, S, name, s1.dtype(), |x| {
            cuda::level_noise(dev, name, g, expand, counter, (x, l1), std)
        })?;
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
    if super::fallback::needed(x.device()) {
        let std = std.to_device(&candle_core::Device::Cpu)?;
        return super::fallback::on_host(x, |h| h.contiguous()?.apply_op2_no_bwd(&std, &op));
    }
    x.contiguous()?.apply_op2_no_bwd(&std, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn narrow_rounding_is_correct_at_ties_and_edges() {
        let p = |e: i32| 2f64.powi(e);
        // (value, correctly rounded f16). Just above a tie, a detour through f32 rounds the
        // excess away and then the tie to even: 1 instead of 1 + 2^-10.
        let f16_cases = [
            (1.0 + p(-11), 1.0),
            (1.0 + p(-11) + p(-40), 1.0 + p(-10)),
            (1.0 + 3.0 * p(-11), 1.0 + 2.0 * p(-10)),
            (-(1.0 + p(-11) + p(-40)), -(1.0 + p(-10))),
            (p(-25), 0.0),
            (p(-25) + p(-60), p(-24)),
            (3.0 * p(-25), 2.0 * p(-24)),
            (65519.0, 65504.0),
            (65520.0, f64::INFINITY),
            (-1e9, f64::NEG_INFINITY),
            (0.1, 0.099_975_585_937_5),
        ];
        for (v, want) in f16_cases {
            let got: f16 = round_from_f64(v);
            assert_eq!(got.to_f64(), want, "f16 of {v:e}");
        }
        // bf16. A conversion that drops the f64's low 32 bits first loses the 2^-30 and lands
        // on the tie.
        let bf16_cases = [
            (1.0 + p(-8), 1.0),
            (1.0 + p(-8) + p(-30), 1.0 + p(-7)),
            (1.0 + p(-8) + p(-50), 1.0 + p(-7)),
            (1.0 + 3.0 * p(-8), 1.0 + 2.0 * p(-7)),
            (p(-134), 0.0),
            (p(-134) + p(-160), p(-133)),
            ((2.0 - p(-8)) * p(127), f64::INFINITY),
            ((2.0 - p(-8) - p(-20)) * p(127), (2.0 - p(-7)) * p(127)),
        ];
        for (v, want) in bf16_cases {
            let got: bf16 = round_from_f64(v);
            assert_eq!(got.to_f64(), want, "bf16 of {v:e}");
        }
        let nan: f16 = round_from_f64(f64::NAN);
        assert!(nan.is_nan());
        assert_eq!(
            round_from_f64::<f32>(1.0 + p(-24) + p(-40)),
            1.0 + p(-23) as f32
        );
    }
}
