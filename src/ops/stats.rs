//! Per-unit sums of one activation batch, in one pass: the statistics pass's op.
//!
//! For an activation viewed as `(rows, units, inner)` and labels `(rows,)` u32, the output is an
//! f64 tensor `(2 + classes, units)`:
//!
//! * row 0: `Σ x[r, u, i]` over rows and positions,
//! * row 1: `Σ x[r, u, i]²`,
//! * row `2 + c`: `Σ x[r, u, i]` over the rows `r` with `labels[r] == c` and all positions.
//!
//! Labels outside `0..classes` add to no class row. Sums are in f64 whatever the input dtype, so a
//! long pass in f16 loses nothing to accumulation.

use super::{contiguous, rows_units_inner};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

pub(crate) struct UnitSums {
    pub classes: usize,
}

impl UnitSums {
    fn run<T: WithDType>(&self, x: &[T], dims: &[usize], labels: &[u32]) -> Vec<f64> {
        let (rows, units, inner) = rows_units_inner(dims).expect("checked by unit_sums");
        let classes = self.classes;
        let width = (2 + classes) * units;
        let row_len = units * inner;
        if row_len == 0 || rows == 0 {
            return vec![0.0; width];
        }
        // Row blocks of ~64 Ki values each fill a private accumulator; the blocks are then added.
        let rows_per_task = (65536 / row_len).max(1);
        x.par_chunks(rows_per_task * row_len)
            .zip(labels.par_chunks(rows_per_task))
            .fold(
                || vec![0.0f64; width],
                |mut acc, (block, labels)| {
                    for (row, &label) in block.chunks_exact(row_len).zip(labels) {
                        let class = (label as usize) < classes;
                        for u in 0..units {
                            let (mut s, mut s2) = (0.0f64, 0.0f64);
                            for v in &row[u * inner..(u + 1) * inner] {
                                let v = v.to_f64();
                                s += v;
                                s2 += v * v;
                            }
                            acc[u] += s;
                            acc[units + u] += s2;
                            if class {
                                acc[(2 + label as usize) * units + u] += s;
                            }
                        }
                    }
                    acc
                },
            )
            .reduce(
                || vec![0.0f64; width],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            )
    }
}

impl CustomOp2 for UnitSums {
    fn name(&self) -> &'static str {
        "reliance-unit-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let labels = match s2 {
            CpuStorage::U32(l) => contiguous(l, l2, self.name())?,
            _ => candle_core::bail!("{}: labels must be u32", self.name()),
        };
        let dims = l1.shape().dims();
        let out = with_float_data!(s1, CpuStorage, self.name(), s1.dtype(), |x| {
            self.run(contiguous(x, l1, self.name())?, dims, labels)
        });
        let (_, units, _) = rows_units_inner(dims)?;
        Ok((
            CpuStorage::F64(out),
            Shape::from_dims(&[2 + self.classes, units]),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::cuda_backend::CudaStorageSlice as S;
        let dims = l1.shape().dims();
        let riu = rows_units_inner(dims)?;
        let labels = match &s2.slice {
            S::U32(l) => (l, l2),
            _ => candle_core::bail!("{}: labels must be u32", self.name()),
        };
        let (dev, name, classes) = (&s1.device, self.name(), self.classes);
        let out = with_float_data!(&s1.slice, S, name, s1.dtype(), |x| {
            cuda::unit_sums(dev, name, riu, classes, (x, l1), labels)
        })?;
        Ok((out, Shape::from_dims(&[2 + classes, riu.1])))
    }
}

/// Sums, sums of squares and per-class sums of every unit of `x` (see the module docs).
///
/// * `x`: `(N, U)` or `(N, C, H, W)`, any float dtype.
/// * `labels`: `(N,)` u32; only the rows' class rows use them. `classes` may be 0.
pub(crate) fn unit_sums(x: &Tensor, labels: &Tensor, classes: usize) -> Result<Tensor> {
    let (rows, _, _) = rows_units_inner(x.dims())?;
    if labels.dims1()? != rows {
        candle_core::bail!(
            "unit sums: {rows} activation rows but labels of shape {:?}",
            labels.dims()
        );
    }
    if labels.dtype() != DType::U32 {
        candle_core::bail!("unit sums: labels must be u32, got {:?}", labels.dtype());
    }
    let op = UnitSums { classes };
    if super::fallback::needed(x.device()) {
        let labels = labels.to_device(&candle_core::Device::Cpu)?;
        return super::fallback::on_host(x, |h| {
            h.contiguous()?.apply_op2_no_bwd(&labels.contiguous()?, &op)
        });
    }
    x.contiguous()?.apply_op2_no_bwd(&labels.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn sums(x: &Tensor, labels: &[u32], classes: usize) -> Vec<Vec<f64>> {
        let labels = Tensor::new(labels, &Device::Cpu).unwrap();
        unit_sums(x, &labels, classes)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()
    }

    #[test]
    fn dense_by_hand() {
        let x = Tensor::new(&[[1f32, 2.], [3., -1.], [0.5, 4.]], &Device::Cpu).unwrap();
        let s = sums(&x, &[0, 1, 0], 2);
        assert_eq!(
            s,
            vec![
                vec![4.5, 5.0],
                vec![10.25, 21.0],
                vec![1.5, 6.0],
                vec![3.0, -1.0]
            ]
        );
        // f16 and bf16 hold these values exactly.
        for dtype in [DType::F16, DType::BF16, DType::F64] {
            assert_eq!(sums(&x.to_dtype(dtype).unwrap(), &[0, 1, 0], 2), s);
        }
    }

    #[test]
    fn maps_by_hand_and_labels_out_of_range() {
        // (2 samples, 2 channels, 1×2): a channel's values are summed over positions.
        let x = Tensor::new(&[1f32, 2., 3., 4., -1., 0., 2., 2.], &Device::Cpu)
            .unwrap()
            .reshape((2, 2, 1, 2))
            .unwrap();
        let s = sums(&x, &[1, 7], 2);
        assert_eq!(
            s,
            vec![
                vec![2.0, 11.0],
                vec![6.0, 33.0],
                vec![0.0, 0.0],
                vec![3.0, 7.0]
            ]
        );
        assert_eq!(sums(&x, &[1, 7], 0), s[..2].to_vec());
    }

    #[test]
    fn many_blocks_match_a_plain_loop() {
        // 1000 rows of 70 units: the CPU op splits the rows into several blocks.
        let (rows, units, classes) = (1000usize, 70usize, 3usize);
        let v: Vec<f32> = (0..rows * units)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .collect();
        let labels: Vec<u32> = (0..rows as u32).map(|r| r * 5 % 4).collect();
        let x = Tensor::from_vec(v.clone(), (rows, units), &Device::Cpu).unwrap();
        let s = sums(&x, &labels, classes);
        let mut want = vec![vec![0f64; units]; 2 + classes];
        for r in 0..rows {
            for u in 0..units {
                let a = v[r * units + u] as f64;
                want[0][u] += a;
                want[1][u] += a * a;
                if (labels[r] as usize) < classes {
                    want[2 + labels[r] as usize][u] += a;
                }
            }
        }
        for (got, want) in s.iter().flatten().zip(want.iter().flatten()) {
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn empty_batch_and_bad_labels() {
        let x = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(sums(&x, &[], 1), vec![vec![0.0; 3]; 3]);
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let short = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let e = unit_sums(&x, &short, 1).unwrap_err().to_string();
        assert!(e.contains("2 activation rows"), "{e}");
        let wrong = Tensor::new(&[0f32, 1.], &Device::Cpu).unwrap();
        let e = unit_sums(&x, &wrong, 1).unwrap_err().to_string();
        assert!(e.contains("u32"), "{e}");
    }
}
