//! The fixed training subset a measurement runs on, and the label corruption of the paper's
//! randomization experiments.

use crate::error::bail;
use crate::Result;
use candle_core::{DType, Tensor};

/// Inputs and integer class labels of the samples a measurement evaluates.
///
/// Reliance is measured on *training* data: no held-out data is needed. Keep the subset fixed
/// across checks so that changes of the curve come from the network, not from the sample.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_reliance::ProbeData;
///
/// let xs = Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let ys = Tensor::new(&[0u32, 2, 1], &Device::Cpu)?;
/// let data = ProbeData::new(xs, ys)?;
/// assert_eq!(data.len(), 3);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ProbeData {
    xs: Tensor,
    labels: Tensor,
    label_values: Vec<u32>,
}

impl ProbeData {
    /// `xs`: inputs with the samples along dimension 0; `labels`: `u32` of shape `(N,)`.
    ///
    /// Fails, naming the problem, on a label tensor of the wrong dtype or shape, a sample count
    /// mismatch, an empty set, or non-finite inputs.
    pub fn new(xs: Tensor, labels: Tensor) -> Result<Self> {
        if labels.dtype() != DType::U32 {
            bail!(
                Data,
                "probe data: labels must be u32, got {:?}",
                labels.dtype()
            );
        }
        let n = match labels.dims() {
            [n] => *n,
            d => bail!(Data, "probe data: labels must have shape (N,), got {d:?}"),
        };
        if xs.rank() == 0 {
            bail!(
                Data,
                "probe data: inputs must have the samples along dimension 0"
            );
        }
        if xs.dim(0)? != n {
            bail!(
                Data,
                "probe data: {} input samples but {n} labels",
                xs.dim(0)?
            );
        }
        if n == 0 {
            bail!(Data, "probe data: the subset is empty");
        }
        if xs.dtype().is_float() {
            // Converted to f32 first: a value beyond its range counts as infinite.
            let finite = crate::ops::all_finite(&xs.to_dtype(DType::F32)?)?;
            if !finite {
                bail!(
                    NonFinite,
                    "probe data: inputs contain NaN or infinite values"
                );
            }
        }
        let label_values = labels.to_vec1::<u32>()?;
        Ok(Self {
            xs,
            labels,
            label_values,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.label_values.len()
    }

    /// Always false: an empty subset is rejected by [`ProbeData::new`].
    pub fn is_empty(&self) -> bool {
        self.label_values.is_empty()
    }

    /// The inputs.
    pub fn xs(&self) -> &Tensor {
        &self.xs
    }

    /// The labels, `u32` `(N,)`.
    pub fn labels(&self) -> &Tensor {
        &self.labels
    }

    /// The labels as host values.
    pub fn label_values(&self) -> &[u32] {
        &self.label_values
    }

    /// A fixed pseudo-random subset of `n` samples (all of them when `n >= len`), chosen by
    /// `seed`, in their original order.
    pub fn subset(&self, n: usize, seed: u64) -> Result<Self> {
        if n == 0 {
            bail!(Data, "probe data: a subset needs at least one sample");
        }
        if n >= self.len() {
            return Ok(self.clone());
        }
        let mut idx: Vec<u32> = crate::rng::permutation(self.len(), seed)[..n]
            .iter()
            .map(|&i| i as u32)
            .collect();
        idx.sort_unstable();
        let ids = Tensor::new(idx.as_slice(), self.xs.device())?;
        let xs = self.xs.index_select(&ids, 0)?;
        let labels = self.labels.index_select(&ids, 0)?;
        let label_values = idx.iter().map(|&i| self.label_values[i as usize]).collect();
        Ok(Self {
            xs,
            labels,
            label_values,
        })
    }

    /// The inputs of samples `start..start + len` (clipped to the end).
    pub(crate) fn chunk(&self, start: usize, len: usize) -> Result<Tensor> {
        let len = len.min(self.len() - start);
        Ok(self.xs.narrow(0, start, len)?)
    }
}

/// Label corruption as in the paper's randomization experiments: each label is replaced, with
/// probability `p`, by a class drawn uniformly from `0..classes` (which may equal the original),
/// reproducibly from `seed`.
///
/// ```
/// let clean = vec![0u32, 1, 2, 3, 4, 5, 6, 7, 8, 9];
/// assert_eq!(candle_reliance::data::corrupt_labels(&clean, 10, 0.0, 1), clean);
/// let noisy = candle_reliance::data::corrupt_labels(&clean, 10, 1.0, 1);
/// assert!(noisy.iter().all(|&l| l < 10));
/// ```
pub fn corrupt_labels(labels: &[u32], classes: u32, p: f64, seed: u64) -> Vec<u32> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    labels
        .iter()
        .map(|&l| {
            // Both draws are made for every label so that label i's fate does not depend on p
            // for the labels before it.
            let (u, c) = (rng.uniform(), rng.below(classes as usize) as u32);
            if u < p {
                c
            } else {
                l
            }
        })
        .collect()
}
