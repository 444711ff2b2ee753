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
/// Labels are either one class per sample, `(N,)`, or one class per token, `(N, T)`, for a
/// token-level task (tagging, per-position prediction): the model then returns logits
/// `(N, T, classes)` and every accuracy and agreement counts tokens. A label equal to
/// [`ProbeData::PADDING`] is not counted anywhere (a padded position, or a sample to skip);
/// [`ProbeData::with_mask`] sets it from an attention mask. At least one label must not be
/// padding.
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
    /// Row-major `N × T`.
    label_values: Vec<u32>,
    /// Labels that are not [`ProbeData::PADDING`].
    targets: usize,
}

impl ProbeData {
    /// The label of a position (or sample) that no accuracy or agreement counts: `u32::MAX`.
    pub const PADDING: u32 = u32::MAX;

    /// `xs`: inputs with the samples along dimension 0; `labels`: `u32` of shape `(N,)` (a
    /// class per sample) or `(N, T)` (a class per token, logits `(N, T, classes)`), with
    /// [`ProbeData::PADDING`] where nothing is to be counted.
    ///
    /// Fails, naming the problem, on a label tensor of the wrong dtype or shape, a sample count
    /// mismatch, an empty set, labels that are all padding, or non-finite inputs.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_reliance::ProbeData;
    ///
    /// // Two sequences of 3 tokens; the second has one padded position.
    /// let xs = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &Device::Cpu)?;
    /// let pad = ProbeData::PADDING;
    /// let ys = Tensor::new(&[[1u32, 0, 2], [2, 2, pad]], &Device::Cpu)?;
    /// let data = ProbeData::new(xs, ys)?;
    /// assert_eq!((data.len(), data.tokens(), data.targets()), (2, 3, 5));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
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
            [n, t] if *t > 0 => *n,
            d => bail!(
                Data,
                "probe data: labels must have shape (N,) or (N, T) with T ≥ 1, got {d:?}"
            ),
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
        let label_values = labels.flatten_all()?.to_vec1::<u32>()?;
        let targets = counted(&label_values, "every label is padding (ProbeData::PADDING)")?;
        Ok(Self {
            xs,
            labels,
            label_values,
            targets,
        })
    }

    /// [`ProbeData::new`] with the labels at `mask == 0` replaced by [`ProbeData::PADDING`]:
    /// `mask` has the labels' shape and any dtype (an attention mask, 1 for a real token).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_reliance::ProbeData;
    ///
    /// let xs = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &Device::Cpu)?;
    /// let ys = Tensor::new(&[[1u32, 0, 2], [2, 2, 0]], &Device::Cpu)?;
    /// let mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 0]], &Device::Cpu)?;
    /// let data = ProbeData::with_mask(xs, ys, &mask)?;
    /// assert_eq!(data.label_values()[5], ProbeData::PADDING);
    /// assert_eq!(data.targets(), 5);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_mask(xs: Tensor, labels: Tensor, mask: &Tensor) -> Result<Self> {
        if mask.dims() != labels.dims() {
            bail!(
                Data,
                "probe data: the mask has shape {:?}, the labels {:?}",
                mask.dims(),
                labels.dims()
            );
        }
        if labels.dtype() != DType::U32 {
            bail!(
                Data,
                "probe data: labels must be u32, got {:?}",
                labels.dtype()
            );
        }
        let keep = mask_values(mask, "probe data")?;
        let values: Vec<u32> = labels
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .zip(keep)
            .map(|(l, k)| if k { l } else { Self::PADDING })
            .collect();
        let labels = Tensor::from_vec(values, labels.shape(), labels.device())?;
        Self::new(xs, labels)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.label_values.len() / self.tokens()
    }

    /// Always false: an empty subset is rejected by [`ProbeData::new`].
    pub fn is_empty(&self) -> bool {
        self.label_values.is_empty()
    }

    /// Labels per sample: `T` for token labels `(N, T)`, 1 for `(N,)`.
    pub fn tokens(&self) -> usize {
        self.labels.dims().get(1).copied().unwrap_or(1)
    }

    /// Whether the labels are per token, `(N, T)`: the model's logits are then
    /// `(N, T, classes)`.
    pub fn token_level(&self) -> bool {
        self.labels.rank() == 2
    }

    /// Labels that are counted (not [`ProbeData::PADDING`]): the denominator of every accuracy
    /// and agreement.
    pub fn targets(&self) -> usize {
        self.targets
    }

    /// The inputs.
    pub fn xs(&self) -> &Tensor {
        &self.xs
    }

    /// The labels, `u32` `(N,)` or `(N, T)`.
    pub fn labels(&self) -> &Tensor {
        &self.labels
    }

    /// The labels as host values, row-major (`N × T` for token labels).
    pub fn label_values(&self) -> &[u32] {
        &self.label_values
    }

    /// The labels of samples `start..start + samples`, `samples × T` values.
    pub(crate) fn labels_of(&self, start: usize, samples: usize) -> &[u32] {
        let t = self.tokens();
        &self.label_values[start * t..(start + samples) * t]
    }

    /// A fixed pseudo-random subset of `n` samples (all of them when `n >= len`), chosen by
    /// `seed`, in their original order. Fails when every label of the subset is padding.
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
        let t = self.tokens();
        let label_values: Vec<u32> = idx
            .iter()
            .flat_map(|&i| {
                self.label_values[i as usize * t..(i as usize + 1) * t]
                    .iter()
                    .copied()
            })
            .collect();
        let targets = counted(
            &label_values,
            &format!("every label of the {n}-sample subset is padding; use a larger subset"),
        )?;
        Ok(Self {
            xs,
            labels,
            label_values,
            targets,
        })
    }

    /// The inputs of samples `start..start + len` (clipped to the end).
    pub(crate) fn chunk(&self, start: usize, len: usize) -> Result<Tensor> {
        let len = len.min(self.len() - start);
        Ok(self.xs.narrow(0, start, len)?)
    }
}

/// The labels that are not [`ProbeData::PADDING`]; an error saying `none` when there are none.
fn counted(label_values: &[u32], none: &str) -> Result<usize> {
    match label_values
        .iter()
        .filter(|&&l| l != ProbeData::PADDING)
        .count()
    {
        0 => bail!(Data, "probe data: {none}; nothing would be counted"),
        n => Ok(n),
    }
}

/// An attention mask's values, row-major: `true` where a token is real (non-zero). `what` names
/// the caller in the error for a NaN.
pub(crate) fn mask_values(mask: &Tensor, what: &str) -> Result<Vec<bool>> {
    let values = mask.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if values.iter().any(|v| v.is_nan()) {
        bail!(Data, "{what}: the mask contains NaN");
    }
    Ok(values.into_iter().map(|v| v != 0.0).collect())
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
