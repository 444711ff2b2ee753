//! Mutual information between single units' activity and the class label, from per-sample
//! activity recorded at the probes.

use crate::error::bail;
use crate::probe::Action;
use crate::units::{PerProbe, PerUnit};
use crate::Measurement;
use crate::Result;
use candle_core::{DType, Device, ModuleT};
use serde::{Deserialize, Serialize};

/// Default number of equal-count bins of the mutual-information estimator.
pub const DEFAULT_MI_BINS: usize = 10;

/// Per-sample activity of every probed unit, with the labels: the input of the
/// mutual-information estimator. Holds `samples × total units` `f32` values (4 MB for 1000
/// samples and 1000 units); the pass itself holds one chunk of the model's activations at a
/// time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitActivity {
    /// Per probe, `samples × units` values, row-major: `value[i · units + u]` is unit `u` on
    /// sample `i` (for a feature map, averaged over positions).
    pub probes: Vec<PerProbe<Vec<f32>>>,
    /// The label of each sample.
    pub labels: Vec<u32>,
    /// Number of samples (those labelled [`ProbeData::PADDING`](crate::ProbeData::PADDING) are
    /// left out).
    pub samples: usize,
}

impl PerProbe<Vec<f32>> {
    /// Unit `u`'s activity on every sample, from a [`UnitActivity`] entry.
    pub fn unit(&self, u: usize) -> Vec<f64> {
        self.value
            .iter()
            .skip(u)
            .step_by(self.units.max(1))
            .map(|&v| f64::from(v))
            .collect()
    }
}

/// Equal-count (quantile) bins of `values`: sorted ascending, the value at sorted position `p`
/// (of `n`) goes to bin `⌊p · bins / n⌋`. Ties: equal values all go to the bin of the first of
/// them, so a value is never split across bins; bins can then hold more or fewer than `n/bins`
/// values, and some can be empty (a ReLU unit silent on 60% of the samples puts all of those in
/// bin 0). NaN sorts above every number.
///
/// ```
/// use candle_reliance::units::quantile_bins;
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
/// use candle_reliance::units::mutual_information_bits;
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

/// Mutual information between each unit's activity and the class label
/// ([`mutual_information_bits`]), in bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MutualInformation {
    /// Mutual information of each probe's units, in the order the probes were added.
    pub probes: Vec<PerProbe<Vec<f64>>>,
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
            bail!(Data, "mutual information needs at least 1 bin");
        }
        let probes = activity
            .probes
            .iter()
            .map(|p| {
                p.with_value(
                    (0..p.units)
                        .map(|u| mutual_information_bits(&p.unit(u), &activity.labels, bins))
                        .collect(),
                )
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
        self.probes.per_unit()
    }

    /// Mean per probe.
    pub fn means(&self) -> Vec<f64> {
        self.probes.means()
    }
}

impl<M: ModuleT + ?Sized> Measurement<'_, M> {
    /// Records every probed unit's activity on every sample (feature maps averaged over
    /// positions) in one forward pass over chunks of [`Batching::batch_size`] samples. Memory:
    /// see [`UnitActivity`]. Needs a label per sample (an error for token labels `(N, T)`);
    /// samples labelled [`ProbeData::PADDING`](crate::ProbeData::PADDING) are left out.
    ///
    /// [`Batching::batch_size`]: crate::measurement::Batching::batch_size
    pub fn activity(&self) -> Result<UnitActivity> {
        self.batching().validate()?;
        let (probes, data) = (self.probes(), self.data());
        if data.token_level() {
            bail!(
                Data,
                "unit activity (and mutual information) needs a label per sample; the probe data \
                 has token labels (N, {})",
                data.tokens()
            );
        }
        let batch_size = self.batching().batch_size;
        let names = probes.names();
        let guard = probes.begin(Action::Capture, 1, false)?;
        let n = data.len();
        let mut out: Vec<Option<PerProbe<Vec<f32>>>> = vec![None; names.len()];
        for start in (0..n).step_by(batch_size) {
            let xs = data.chunk(start, batch_size)?;
            let rows = xs.dim(0)?;
            guard.start_forward(start, n)?;
            self.forward_model(&xs)?;
            guard.finish_forward()?;
            for (i, t) in guard.take_captured()?.into_iter().enumerate() {
                let name = &names[i];
                let t =
                    candle_core::Context::context(t, format!("probe `{name}` recorded nothing"))?;
                let (r, units) = t.dims2()?;
                if r != rows {
                    bail!(
                        Data,
                        "probe `{name}` saw {r} rows for a chunk of {rows} samples"
                    );
                }
                let v = t
                    .detach()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let slot = out[i].get_or_insert_with(|| PerProbe {
                    name: name.clone(),
                    offset: 0,
                    units,
                    value: Vec::with_capacity(n * units),
                });
                if slot.units != units {
                    bail!(
                        Data,
                        "probe `{name}`: unit count changed between batches: {} then {units}",
                        slot.units
                    );
                }
                slot.value.extend(v);
            }
        }
        drop(guard);
        let labels = data.label_values();
        let counted = |i: &usize| labels[*i] != crate::ProbeData::PADDING;
        let mut offset = 0;
        let probes = out
            .into_iter()
            .zip(&names)
            .map(|(p, name)| {
                let mut p =
                    candle_core::Context::context(p, format!("probe `{name}` recorded nothing"))?;
                p.offset = offset;
                offset += p.units;
                if data.targets() < n {
                    let units = p.units;
                    p.value = (0..n)
                        .filter(counted)
                        .flat_map(|i| p.value[i * units..(i + 1) * units].to_vec())
                        .collect();
                }
                Ok(p)
            })
            .collect::<Result<_>>()?;
        Ok(UnitActivity {
            probes,
            labels: (0..n).filter(counted).map(|i| labels[i]).collect(),
            samples: data.targets(),
        })
    }

    /// Mutual information between every probed unit's activity and the label, from one capture
    /// pass ([`Measurement::activity`]) and `bins` equal-count bins ([`DEFAULT_MI_BINS`] is the
    /// usual choice); logs the mean per probe.
    pub fn mutual_information(&self, bins: usize) -> Result<MutualInformation> {
        let mi = MutualInformation::from_activity(&self.activity()?, bins)?;
        for (p, mean) in mi.probes.iter().zip(mi.means()) {
            tracing::info!(
                probe = %p.name,
                units = p.units,
                mean_bits = mean,
                label_entropy_bits = mi.label_entropy_bits,
                bins,
                "mutual information"
            );
        }
        Ok(mi)
    }
}
