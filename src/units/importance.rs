//! Single-unit importance (the drop in training accuracy when one unit alone is ablated) and its
//! rank correlation with class selectivity, mutual information and the norm of the unit's
//! incoming weights (Morcos et al. 2018, §3.4: selectivity is a poor predictor of importance).

use crate::error::bail;
use crate::measurement::Clamp;
use crate::units::{layout, MutualInformation, PerProbe, PerUnit, Selectivity};
use crate::Measurement;
use crate::Result;
use candle_core::{DType, ModuleT, Tensor};
use serde::{Deserialize, Serialize};
use statrs::statistics::{Data, OrderStatistics, RankTieBreaker};

/// Units whose single-unit ablations are evaluated per batched pass; bounds the clamp masks held
/// at once (the expanded forward is bounded by `max_batch_rows` anyway).
const UNITS_PER_PASS: usize = 4096;

/// Single-unit importance of every probed unit.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_reliance::curves::Clamp;
/// use candle_reliance::{Measurement, ProbeData, ProbeSet};
///
/// // Logits are the two units: sample 0 needs unit 0 (2 > 1), sample 1 needs unit 1 (3 > 0).
/// let probes = ProbeSet::new();
/// let p = probes.add("h")?;
/// let model = |xs: &Tensor| p.forward(xs);
/// let xs = Tensor::new(&[[2f32, 1.0], [0.0, 3.0]], &Device::Cpu)?;
/// let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
/// let imp = Measurement::new(&model, &probes, &data).importance(Clamp::Zero)?;
/// // Unit 0 zeroed: sample 0 becomes (0, 1) → wrong; accuracy 1 → 1/2.
/// // Unit 1 zeroed: sample 1 becomes (0, 0) → arg-max 0, wrong; accuracy 1/2.
/// assert_eq!(imp.per_unit(), vec![0.5, 0.5]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitImportance {
    /// Per probe, `unablated accuracy − accuracy` of each unit: positive when ablating the unit
    /// hurts.
    pub probes: Vec<PerProbe<Vec<f64>>>,
    /// Accuracy with each unit alone ablated, in global unit order.
    pub accuracy: Vec<f64>,
    /// The clamp an ablated unit was set to.
    pub clamp: Clamp,
    /// Accuracy with nothing ablated.
    pub unablated_accuracy: f64,
    /// Number of samples.
    pub samples: usize,
}

impl UnitImportance {
    /// Importance of every unit in global order.
    pub fn per_unit(&self) -> Vec<f64> {
        self.probes.per_unit()
    }
}

impl<M: ModuleT + ?Sized> Measurement<'_, M> {
    /// The drop in accuracy when each probed unit alone is clamped to `clamp`: one ablation set
    /// per unit, evaluated batched by [`Measurement::ablation_accuracies`] in chunks of units.
    /// Logs the mean and largest importance per probe.
    pub fn importance(&self, clamp: Clamp) -> Result<UnitImportance> {
        let stats = self.statistics()?;
        let total = stats.total_units();
        let mut accuracy = Vec::with_capacity(total);
        for start in (0..total).step_by(UNITS_PER_PASS) {
            let sets: Vec<Vec<usize>> = (start..(start + UNITS_PER_PASS).min(total))
                .map(|u| vec![u])
                .collect();
            accuracy.extend(self.ablation_accuracies(&sets, clamp)?);
        }
        let out = UnitImportance {
            probes: stats
                .probes
                .iter()
                .map(|p| {
                    p.with_value(
                        accuracy[p.offset..p.offset + p.units]
                            .iter()
                            .map(|a| stats.accuracy - a)
                            .collect(),
                    )
                })
                .collect(),
            accuracy,
            clamp,
            unablated_accuracy: stats.accuracy,
            samples: stats.samples,
        };
        for p in &out.probes {
            let mean = p.value.iter().sum::<f64>() / p.units.max(1) as f64;
            let max = p.value.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            tracing::info!(probe = %p.name, units = p.units, mean_importance = mean, max_importance = max, "unit importance");
        }
        Ok(out)
    }
}

/// How a weight tensor is laid out, for [`incoming_l1`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// A linear layer's weight `(out, in)` (candle's `Linear`): unit `u`'s incoming weights are
    /// row `u`.
    Linear,
    /// A 2-D convolution's weight `(out, in, kh, kw)`: channel `u`'s incoming weights are
    /// `weight[u]`.
    Conv2d,
}

/// The L1 norm of each output unit's incoming weights (see [`WeightLayout`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_reliance::units::{incoming_l1, WeightLayout};
/// let w = Tensor::new(&[[1f32, -2.0], [0.5, 0.0], [-3.0, 3.0]], &Device::Cpu)?;
/// assert_eq!(incoming_l1(&w, WeightLayout::Linear)?, vec![3.0, 0.5, 6.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn incoming_l1(weight: &Tensor, layout: WeightLayout) -> Result<Vec<f64>> {
    let want = match layout {
        WeightLayout::Linear => 2,
        WeightLayout::Conv2d => 4,
    };
    if weight.rank() != want {
        bail!(
            Data,
            "incoming_l1: a {layout:?} weight has rank {want}, got shape {:?}",
            weight.dims()
        );
    }
    Ok(weight
        .detach()
        .to_dtype(DType::F64)?
        .abs()?
        .flatten_from(1)?
        .sum(1)?
        .to_vec1::<f64>()?)
}

/// Spearman's rank correlation: the Pearson correlation of the average ranks (ties share the
/// mean of their ranks, via `statrs`). Pairs where either value is not finite are dropped; NaN
/// when fewer than two pairs remain or either side is constant.
///
/// ```
/// // A monotone relation has correlation 1 whatever its shape.
/// let r = candle_reliance::units::spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 8.0, 27.0, 64.0]);
/// assert!((r - 1.0).abs() < 1e-12);
/// ```
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(
        a.len(),
        b.len(),
        "spearman: the two series differ in length"
    );
    let (x, y): (Vec<f64>, Vec<f64>) = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|(x, y)| (*x, *y))
        .unzip();
    if x.len() < 2 {
        return f64::NAN;
    }
    let rx = Data::new(x).ranks(RankTieBreaker::Average);
    let ry = Data::new(y).ranks(RankTieBreaker::Average);
    pearson(&rx, &ry)
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman correlations of importance with the other per-unit measures, over one set of units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Correlations {
    /// Units the correlations are over.
    pub units: usize,
    /// With class selectivity.
    pub selectivity: f64,
    /// With mutual information, when given.
    pub mutual_information: Option<f64>,
    /// With the L1 norm of the incoming weights, over the units of the probes whose weights
    /// were named; `None` when none were.
    pub incoming_l1: Option<f64>,
}

/// Rank correlations of single-unit importance with selectivity, mutual information and the
/// incoming-weight norm, over all probed units and per probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportanceCorrelations {
    /// Over all probed units (for `incoming_l1`: all units of the probes whose weights were
    /// named).
    pub overall: Correlations,
    /// Per probe, in the order the probes were added.
    pub per_probe: Vec<PerProbe<Correlations>>,
}

/// Spearman correlations of `importance` with `selectivity`, with `information` when given, and
/// with incoming-weight L1 norms given per probe as `(probe name, norms)` (e.g. from
/// [`incoming_l1`] on the weight of the layer the probe follows). All measures must come from
/// the same probes. Logs the overall correlations.
///
/// ```no_run
/// # fn demo(model: &impl candle_core::Module, probes: &candle_reliance::ProbeSet,
/// #         data: &candle_reliance::ProbeData, fc1_weight: &candle_core::Tensor) -> candle_core::Result<()> {
/// use candle_reliance::curves::Clamp;
/// use candle_reliance::units::*;
/// let m = candle_reliance::Measurement::new(model, probes, data);
/// let imp = m.importance(Clamp::Zero)?;
/// let sel = m.selectivity()?;
/// let mi = m.mutual_information(DEFAULT_MI_BINS)?;
/// let l1 = incoming_l1(fc1_weight, WeightLayout::Linear)?;
/// let c = importance_correlations(&imp, &sel, Some(&mi), &[("fc1", l1)])?;
/// println!("{}", serde_json::to_string(&c).unwrap());
/// # Ok(()) }
/// ```
pub fn importance_correlations(
    importance: &UnitImportance,
    selectivity: &Selectivity,
    information: Option<&MutualInformation>,
    incoming_l1: &[(&str, Vec<f64>)],
) -> Result<ImportanceCorrelations> {
    let shapes = layout(&importance.probes);
    if shapes != layout(&selectivity.probes) {
        bail!(
            Data,
            "importance and selectivity come from different probes"
        );
    }
    if information.is_some_and(|mi| shapes != layout(&mi.probes)) {
        bail!(
            Data,
            "importance and mutual information come from different probes"
        );
    }
    let mut l1: Vec<Option<&Vec<f64>>> = vec![None; shapes.len()];
    for (name, norms) in incoming_l1 {
        let Some(i) = shapes.iter().position(|(n, _)| n == name) else {
            bail!(
                Data,
                "incoming_l1 names probe `{name}`, which is not measured"
            );
        };
        if norms.len() != shapes[i].1 {
            bail!(
                Data,
                "incoming_l1 for probe `{name}` has {} values for {} units",
                norms.len(),
                shapes[i].1
            );
        }
        l1[i] = Some(norms);
    }
    let correlate = |idx: &[usize]| -> Correlations {
        let imp: Vec<f64> = idx
            .iter()
            .flat_map(|&i| importance.probes[i].value.iter().copied())
            .collect();
        let sel: Vec<f64> = idx
            .iter()
            .flat_map(|&i| selectivity.probes[i].value.iter().copied())
            .collect();
        let mi = information.map(|m| {
            let v: Vec<f64> = idx
                .iter()
                .flat_map(|&i| m.probes[i].value.iter().copied())
                .collect();
            spearman(&imp, &v)
        });
        let with_l1: Vec<usize> = idx.iter().copied().filter(|&i| l1[i].is_some()).collect();
        let l1_corr = (!with_l1.is_empty()).then(|| {
            let a: Vec<f64> = with_l1
                .iter()
                .flat_map(|&i| importance.probes[i].value.iter().copied())
                .collect();
            let b: Vec<f64> = with_l1
                .iter()
                .flat_map(|&i| l1[i].into_iter().flatten().copied())
                .collect();
            spearman(&a, &b)
        });
        Correlations {
            units: imp.len(),
            selectivity: spearman(&imp, &sel),
            mutual_information: mi,
            incoming_l1: l1_corr,
        }
    };
    let all: Vec<usize> = (0..shapes.len()).collect();
    let out = ImportanceCorrelations {
        overall: correlate(&all),
        per_probe: all
            .iter()
            .map(|&i| PerProbe {
                name: shapes[i].0.to_string(),
                offset: importance.probes[i].offset,
                units: shapes[i].1,
                value: correlate(&[i]),
            })
            .collect(),
    };
    tracing::info!(
        units = out.overall.units,
        with_selectivity = out.overall.selectivity,
        with_mutual_information = out.overall.mutual_information.unwrap_or(f64::NAN),
        with_incoming_l1 = out.overall.incoming_l1.unwrap_or(f64::NAN),
        "importance rank correlations"
    );
    Ok(out)
}
