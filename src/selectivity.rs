//! Class selectivity and mutual information of single units, and a differentiable selectivity
//! regularizer (Morcos et al. 2018, §3.4; Leavitt & Morcos 2021). See `docs/selectivity.md`.
//!
//! **Class selectivity index** of a unit:
//! `(μ_max − μ_−max) / (μ_max + μ_−max + ε)`, where `μ_max` is the largest class-conditional
//! mean activity and `μ_−max` the mean of the other classes' class-conditional means. For a
//! feature map the activity of a sample is first averaged over positions. `ε` is
//! [`SELECTIVITY_EPSILON`] (`1e-12`), so a unit that is zero for every class gets 0. Classes
//! with no samples in the data are skipped; with fewer than two classes present every index is
//! 0. For non-negative activity (after a ReLU) the index lies in `[0, 1]`: 0 when all classes
//! have the same mean, 1 when only one class activates the unit.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_reliance::{class_selectivity, ProbeData, ProbeSet};
//!
//! let probes = ProbeSet::new();
//! let p = probes.add("h")?;
//! let model = |xs: &Tensor| p.forward(xs);
//! // Unit 0 fires for class 0 only; unit 1 has class means 3 and 1.
//! let xs = Tensor::new(&[[2f32, 3.0], [0.0, 1.0]], &Device::Cpu)?;
//! let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
//! let s = class_selectivity(&model, &probes, &data, 512)?;
//! // (2 − 0) / (2 + 0) = 1 and (3 − 1) / (3 + 1) = 0.5.
//! assert!((s.probes[0].selectivity[0] - 1.0).abs() < 1e-9);
//! assert!((s.probes[0].selectivity[1] - 0.5).abs() < 1e-9);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::measure::{unit_statistics, UnitStatistics};
use crate::probe::{Action, ProbeSet};
use crate::ProbeData;
use candle_core::{DType, Device, Module, Result, Tensor};
use serde::{Deserialize, Serialize};

/// The `ε` added to the denominator of the selectivity index, so that an all-zero unit gets 0.
pub const SELECTIVITY_EPSILON: f64 = 1e-12;

/// Default number of equal-count bins of the mutual-information estimator.
pub const DEFAULT_MI_BINS: usize = 10;

/// Units whose `μ_max + μ_−max` is at most this contribute 0 (and no gradient) to
/// [`selectivity_regularizer`].
pub const REGULARIZER_MIN_ACTIVITY: f64 = 1e-6;

/// The selectivity index of one unit from its class-conditional means; NaN entries (classes
/// without samples) are skipped, and with fewer than two classes left the index is 0.
///
/// ```
/// use candle_reliance::selectivity_index;
/// // μ_max = 6, μ_−max = (2 + 1) / 2 = 1.5: (6 − 1.5) / (6 + 1.5) = 0.6.
/// assert!((selectivity_index(&[2.0, 6.0, 1.0, f64::NAN]) - 0.6).abs() < 1e-12);
/// assert_eq!(selectivity_index(&[0.0, 0.0]), 0.0);
/// ```
pub fn selectivity_index(class_means: &[f64]) -> f64 {
    let present: Vec<f64> = class_means
        .iter()
        .copied()
        .filter(|m| !m.is_nan())
        .collect();
    if present.len() < 2 {
        return 0.0;
    }
    let top = present
        .iter()
        .enumerate()
        .fold(0, |best, (i, &m)| if m > present[best] { i } else { best });
    let max = present[top];
    let rest = present
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != top)
        .map(|(_, m)| m)
        .sum::<f64>()
        / (present.len() - 1) as f64;
    (max - rest) / (max + rest + SELECTIVITY_EPSILON)
}

/// Selectivity of one probe's units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSelectivity {
    /// The probe's name.
    pub name: String,
    /// Global index of the probe's first unit.
    pub offset: usize,
    /// Number of units.
    pub units: usize,
    /// Selectivity index per unit.
    pub selectivity: Vec<f64>,
    /// Mean of `selectivity` over the probe's units.
    pub mean: f64,
}

/// Class selectivity of every probed unit: `(μ_max − μ_−max) / (μ_max + μ_−max + ε)` per unit, see
/// [`selectivity_index`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selectivity {
    /// One entry per probe, in the order the probes were added.
    pub probes: Vec<ProbeSelectivity>,
    /// Classes with at least one sample, the classes the index is over.
    pub classes: usize,
    /// The `ε` of the denominator ([`SELECTIVITY_EPSILON`]).
    pub epsilon: f64,
}

impl Selectivity {
    /// Selectivity from the class-conditional means of a statistics pass.
    pub fn from_stats(stats: &UnitStatistics) -> Self {
        let probes = stats
            .probes
            .iter()
            .map(|p| {
                let selectivity: Vec<f64> = (0..p.units)
                    .map(|u| {
                        let means: Vec<f64> = p
                            .class_mean
                            .iter()
                            .zip(&stats.class_counts)
                            .filter(|(_, &k)| k > 0)
                            .map(|(m, _)| m[u])
                            .collect();
                        selectivity_index(&means)
                    })
                    .collect();
                ProbeSelectivity {
                    name: p.name.clone(),
                    offset: p.offset,
                    units: p.units,
                    mean: mean(&selectivity),
                    selectivity,
                }
            })
            .collect();
        Self {
            probes,
            classes: stats.class_counts.iter().filter(|&&k| k > 0).count(),
            epsilon: SELECTIVITY_EPSILON,
        }
    }

    /// Selectivity of every unit in global order.
    pub fn per_unit(&self) -> Vec<f64> {
        self.probes
            .iter()
            .flat_map(|p| p.selectivity.iter().copied())
            .collect()
    }

    /// Mean selectivity per probe.
    pub fn means(&self) -> Vec<f64> {
        self.probes.iter().map(|p| p.mean).collect()
    }

    /// Mean selectivity over all units.
    pub fn mean(&self) -> f64 {
        mean(&self.per_unit())
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Class selectivity of every probed unit on `data`, from one statistics pass in chunks of
/// `batch_size` samples ([`unit_statistics`]); logs the mean per probe.
pub fn class_selectivity(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    batch_size: usize,
) -> Result<Selectivity> {
    let stats = unit_statistics(model, probes, data, batch_size)?;
    let s = Selectivity::from_stats(&stats);
    for p in &s.probes {
        tracing::info!(probe = %p.name, units = p.units, mean_selectivity = p.mean, "class selectivity");
    }
    Ok(s)
}

/// The activity of one probe's units on every sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeActivity {
    /// The probe's name.
    pub name: String,
    /// Global index of the probe's first unit.
    pub offset: usize,
    /// Number of units.
    pub units: usize,
    /// `samples × units` values, row-major: `values[i · units + u]` is unit `u` on sample `i`
    /// (for a feature map, averaged over positions).
    pub values: Vec<f32>,
}

impl ProbeActivity {
    /// Unit `u`'s activity on every sample.
    pub fn unit(&self, u: usize) -> Vec<f64> {
        self.values
            .iter()
            .skip(u)
            .step_by(self.units.max(1))
            .map(|&v| f64::from(v))
            .collect()
    }
}

/// Per-sample activity of every probed unit, with the labels: the input of the
/// mutual-information estimator. Holds `samples × total units` `f32` values (4 MB for 1000
/// samples and 1000 units); the pass itself holds one chunk of the model's activations at a
/// time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitActivity {
    /// One entry per probe, in the order the probes were added.
    pub probes: Vec<ProbeActivity>,
    /// The label of each sample.
    pub labels: Vec<u32>,
    /// Number of samples.
    pub samples: usize,
}

/// Records every probed unit's activity on every sample of `data` (feature maps averaged over
/// positions) in one forward pass over chunks of `batch_size` samples. Memory: see
/// [`UnitActivity`].
pub fn unit_activity(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    batch_size: usize,
) -> Result<UnitActivity> {
    if batch_size == 0 {
        candle_core::bail!("batch size must be at least 1");
    }
    let names = probes.names();
    let guard = probes.begin(Action::Capture, 1, false)?;
    let n = data.len();
    let mut out: Vec<Option<ProbeActivity>> = vec![None; names.len()];
    for start in (0..n).step_by(batch_size) {
        let (xs, _) = data.chunk(start, batch_size)?;
        let rows = xs.dim(0)?;
        guard.start_forward(start, n)?;
        model.forward(&xs)?;
        guard.finish_forward()?;
        for (i, t) in guard.take_captured()?.into_iter().enumerate() {
            let name = &names[i];
            let t = t.ok_or_else(|| {
                candle_core::Error::Msg(format!("probe `{name}` recorded nothing"))
            })?;
            let (r, units) = t.dims2()?;
            if r != rows {
                candle_core::bail!("probe `{name}` saw {r} rows for a chunk of {rows} samples");
            }
            let v = t
                .detach()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let slot = out[i].get_or_insert_with(|| ProbeActivity {
                name: name.clone(),
                offset: 0,
                units,
                values: Vec::with_capacity(n * units),
            });
            if slot.units != units {
                candle_core::bail!(
                    "probe `{name}`: unit count changed between batches: {} then {units}",
                    slot.units
                );
            }
            slot.values.extend(v);
        }
    }
    drop(guard);
    let mut offset = 0;
    let probes = out
        .into_iter()
        .zip(&names)
        .map(|(p, name)| {
            let mut p = p.ok_or_else(|| {
                candle_core::Error::Msg(format!("probe `{name}` recorded nothing"))
            })?;
            p.offset = offset;
            offset += p.units;
            Ok(p)
        })
        .collect::<Result<_>>()?;
    Ok(UnitActivity {
        probes,
        labels: data.label_values().to_vec(),
        samples: n,
    })
}

/// Equal-count (quantile) bins of `values`: sorted ascending, the value at sorted position `p`
/// (of `n`) goes to bin `⌊p · bins / n⌋`. Ties: equal values all go to the bin of the first of
/// them, so a value is never split across bins; bins can then hold more or fewer than `n/bins`
/// values, and some can be empty (a ReLU unit silent on 60% of the samples puts all of those in
/// bin 0). NaN sorts above every number.
///
/// ```
/// use candle_reliance::quantile_bins;
/// // Sorted: 0, 0, 1, 2 at positions 0..4; with 2 bins: 0 → bin 0 (both zeros), 1 → ⌊2·2/4⌋ = 1.
/// assert_eq!(quantile_bins(&[1.0, 0.0, 2.0, 0.0], 2), vec![1, 0, 1, 0]);
/// ```
pub fn quantile_bins(values: &[f64], bins: usize) -> Vec<usize> {
    let n = values.len();
    let bins = bins.max(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0; n];
    let mut prev: Option<(f64, usize)> = None;
    for (pos, &i) in order.iter().enumerate() {
        let v = values[i];
        let bin = match prev {
            Some((pv, pb)) if pv.total_cmp(&v).is_eq() => pb,
            _ => pos * bins / n,
        };
        out[i] = bin;
        prev = Some((v, bin));
    }
    out
}

/// Plug-in mutual information, in bits, between a unit's activity and the labels: the activity
/// is cut into `bins` equal-count bins ([`quantile_bins`]) and
/// `I = Σ_{b,c} p(b,c) log₂ (p(b,c) / (p(b) p(c)))` over the empirical joint distribution. No
/// bias correction: for independent activity and labels the estimate is about
/// `(B−1)(C−1) / (2 N ln 2)` bits above 0 (B bins, C classes, N samples).
///
/// ```
/// use candle_reliance::mutual_information_bits;
/// // Activity separates two balanced classes: I = H(label) = 1 bit.
/// let i = mutual_information_bits(&[1.0, 2.0, 0.0, 0.0], &[0, 0, 1, 1], 10);
/// assert!((i - 1.0).abs() < 1e-12);
/// ```
pub fn mutual_information_bits(values: &[f64], labels: &[u32], bins: usize) -> f64 {
    assert_eq!(
        values.len(),
        labels.len(),
        "mutual_information_bits: values and labels differ in length"
    );
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let b = quantile_bins(values, bins);
    let nb = bins.max(1);
    let nc = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut joint = vec![0u64; nb * nc];
    for (&bin, &c) in b.iter().zip(labels) {
        joint[bin * nc + c as usize] += 1;
    }
    let pb: Vec<u64> = (0..nb)
        .map(|i| joint[i * nc..(i + 1) * nc].iter().sum())
        .collect();
    let pc: Vec<u64> = (0..nc)
        .map(|c| (0..nb).map(|i| joint[i * nc + c]).sum())
        .collect();
    let n = n as f64;
    let mut mi = 0.0;
    for i in 0..nb {
        for c in 0..nc {
            let k = joint[i * nc + c];
            if k > 0 {
                let k = k as f64;
                mi += k / n * (k * n / (pb[i] as f64 * pc[c] as f64)).log2();
            }
        }
    }
    mi.max(0.0)
}

/// Entropy of the labels in bits: the largest mutual information a unit can have with them.
pub fn label_entropy_bits(labels: &[u32]) -> f64 {
    let nc = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut k = vec![0u64; nc];
    labels.iter().for_each(|&l| k[l as usize] += 1);
    let n = labels.len() as f64;
    k.iter()
        .filter(|&&k| k > 0)
        .map(|&k| -(k as f64 / n) * (k as f64 / n).log2())
        .sum()
}

/// Mutual information of one probe's units with the label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeInformation {
    /// The probe's name.
    pub name: String,
    /// Global index of the probe's first unit.
    pub offset: usize,
    /// Number of units.
    pub units: usize,
    /// Mutual information per unit, in bits.
    pub bits: Vec<f64>,
    /// Mean of `bits` over the probe's units.
    pub mean: f64,
}

/// Mutual information between each unit's activity and the class label
/// ([`mutual_information_bits`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MutualInformation {
    /// One entry per probe, in the order the probes were added.
    pub probes: Vec<ProbeInformation>,
    /// Equal-count bins of the estimator.
    pub bins: usize,
    /// Entropy of the labels in bits, the upper bound of every unit's value.
    pub label_entropy_bits: f64,
    /// Number of samples.
    pub samples: usize,
}

impl MutualInformation {
    /// Estimates from recorded activity with `bins` equal-count bins (≥ 1).
    pub fn from_activity(activity: &UnitActivity, bins: usize) -> Result<Self> {
        if bins == 0 {
            candle_core::bail!("mutual information needs at least 1 bin");
        }
        let probes = activity
            .probes
            .iter()
            .map(|p| {
                let bits: Vec<f64> = (0..p.units)
                    .map(|u| mutual_information_bits(&p.unit(u), &activity.labels, bins))
                    .collect();
                ProbeInformation {
                    name: p.name.clone(),
                    offset: p.offset,
                    units: p.units,
                    mean: mean(&bits),
                    bits,
                }
            })
            .collect();
        Ok(Self {
            probes,
            bins,
            label_entropy_bits: label_entropy_bits(&activity.labels),
            samples: activity.samples,
        })
    }

    /// Mutual information of every unit in global order.
    pub fn per_unit(&self) -> Vec<f64> {
        self.probes
            .iter()
            .flat_map(|p| p.bits.iter().copied())
            .collect()
    }

    /// Mean per probe.
    pub fn means(&self) -> Vec<f64> {
        self.probes.iter().map(|p| p.mean).collect()
    }
}

/// Mutual information between every probed unit's activity and the label on `data`, from one
/// capture pass ([`unit_activity`], chunks of `batch_size`) and `bins` equal-count bins
/// ([`DEFAULT_MI_BINS`] is the usual choice); logs the mean per probe.
pub fn mutual_information(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    batch_size: usize,
    bins: usize,
) -> Result<MutualInformation> {
    let activity = unit_activity(model, probes, data, batch_size)?;
    let mi = MutualInformation::from_activity(&activity, bins)?;
    for p in &mi.probes {
        tracing::info!(
            probe = %p.name,
            units = p.units,
            mean_bits = p.mean,
            label_entropy_bits = mi.label_entropy_bits,
            bins,
            "mutual information"
        );
    }
    Ok(mi)
}

/// A differentiable mean class selectivity of a training batch (Leavitt & Morcos 2021), to add
/// to the loss as `loss + α · reg`: `α > 0` penalizes selectivity, `α < 0` rewards it.
///
/// `acts` are the activations of one forward pass at the probes, with their autograd graph, as
/// [`crate::Capture::finish`] returns them (`(N, U)`, or `(N, C, H, W)`, averaged over positions
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
/// use candle_reliance::{selectivity_regularizer, ProbeSet};
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
        candle_core::bail!("selectivity_regularizer: no activations given");
    };
    let (dtype, device) = (first.dtype(), first.device().clone());
    let labels = labels
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
        candle_core::bail!("selectivity_regularizer: label {bad} is not below {classes} classes");
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
        return Tensor::zeros((), dtype, &device);
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
            r => candle_core::bail!(
                "selectivity_regularizer: activation {i} has rank {r}; expected (N, U) or (N, C, H, W)"
            ),
        };
        if a.dim(0)? != n {
            candle_core::bail!(
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
    total.expect("at least one activation") / acts.len() as f64
}
