//! A differentiable class-selectivity penalty for the training loss (Leavitt & Morcos 2021).

use crate::error::bail;
use crate::Result;
use candle_core::{DType, Tensor};

/// Units whose `μ_max + μ_−max` is at most this contribute 0 (and no gradient) to
/// [`selectivity_regularizer`].
pub const REGULARIZER_MIN_ACTIVITY: f64 = 1e-6;

/// A differentiable mean class selectivity of a training batch (Leavitt & Morcos 2021), to add
/// to the loss as `loss + α · reg`: `α > 0` penalizes selectivity, `α < 0` rewards it.
///
/// `acts` are the activations of one forward pass at the probes, with their autograd graph, as
/// [`crate::probe::Capture::finish`] returns them (`(N, U)`, or `(N, C, H, W)`, averaged over positions
/// here); `labels` `(N,)` holds each sample's class, below `classes`. Per probe, class means are
/// `onehotᵀ · acts / counts` over the classes present in the batch; `μ_max` is their maximum
/// (candle's `max`: at an exact tie every tied class gets the gradient) and `μ_−max` the mean
/// of the others. A unit's term is `(μ_max − μ_−max) / (μ_max + μ_−max)`, or 0 with no
/// gradient when `μ_max + μ_−max ≤` [`REGULARIZER_MIN_ACTIVITY`] (a silent unit, whose ratio
/// would have an unbounded gradient). The result is the mean over units of each probe, then
/// over probes: a scalar tensor in the activations' dtype. With fewer than two classes in the
/// batch it is 0.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_reliance::units::selectivity_regularizer;
/// use candle_reliance::ProbeSet;
///
/// let probes = ProbeSet::new();
/// let p = probes.add("h")?;
/// let model = |xs: &Tensor| p.forward(&xs.relu()?);
/// let x = Tensor::new(&[[2f32, 3.0], [0.0, 1.0]], &Device::Cpu)?;
/// let labels = Tensor::new(&[0u32, 1], &Device::Cpu)?;
/// let cap = probes.capture()?;
/// let logits = model.forward(&x)?;
/// let acts = cap.finish()?;
/// let reg = selectivity_regularizer(&acts, &labels, 2)?;
/// // let loss = (cross_entropy(&logits, &labels)? + (reg * alpha)?)?;
/// // Unit 0: class means 2 and 0 → 1; unit 1: 3 and 1 → 0.5. Mean 0.75.
/// assert!((reg.to_scalar::<f32>()? - 0.75).abs() < 1e-6);
/// # let _ = logits;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn selectivity_regularizer(acts: &[Tensor], labels: &Tensor, classes: usize) -> Result<Tensor> {
    let Some(first) = acts.first() else {
        bail!(Data, "selectivity_regularizer: no activations given");
    };
    let (dtype, device) = (first.dtype(), first.device().clone());
    let labels = labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!(
            Data,
            "selectivity_regularizer: label {bad} is not below {classes} classes"
        );
    }
    // Columns for the classes present in the batch only.
    let mut column = vec![usize::MAX; classes];
    let mut counts = Vec::new();
    for &l in &labels {
        let c = &mut column[l as usize];
        if *c == usize::MAX {
            *c = counts.len();
            counts.push(0f64);
        }
        counts[*c] += 1.0;
    }
    let k = counts.len();
    if k < 2 {
        return Ok(Tensor::zeros((), dtype, &device)?);
    }
    let n = labels.len();
    let mut oh = vec![0f64; n * k];
    labels
        .iter()
        .enumerate()
        .for_each(|(i, &l)| oh[i * k + column[l as usize]] = 1.0);
    let one_hot_t = Tensor::from_vec(oh, (n, k), &device)?
        .to_dtype(dtype)?
        .t()?;
    let inv_counts = Tensor::from_vec(
        counts.iter().map(|c| 1.0 / c).collect::<Vec<f64>>(),
        (k, 1),
        &device,
    )?
    .to_dtype(dtype)?;
    let mut total: Option<Tensor> = None;
    for (i, a) in acts.iter().enumerate() {
        let a = match a.rank() {
            2 => a.clone(),
            4 => a.mean((2, 3))?,
            r => bail!(Data,
                "selectivity_regularizer: activation {i} has rank {r}; expected (N, U) or (N, C, H, W)"
            ),
        };
        if a.dim(0)? != n {
            bail!(
                Data,
                "selectivity_regularizer: activation {i} has {} rows for {n} labels",
                a.dim(0)?
            );
        }
        let means = one_hot_t.matmul(&a)?.broadcast_mul(&inv_counts)?; // (K, U)
        let max = means.max(0)?;
        let rest = ((means.sum(0)? - &max)? / (k - 1) as f64)?;
        let num = (&max - &rest)?;
        let den = (&max + &rest)?;
        let live = den.detach().gt(REGULARIZER_MIN_ACTIVITY)?.to_dtype(dtype)?;
        let safe_den = (&den + live.affine(-1.0, 1.0)?)?;
        let term = (num * &live)?.div(&safe_den)?.mean_all()?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    Ok((total.expect("at least one activation") / acts.len() as f64)?)
}
