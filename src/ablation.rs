//! The cumulative ablation curve: training accuracy as a growing fraction of the probed units is
//! clamped, and its area under the curve (Morcos et al. 2018, §2).
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_reliance::{ablation_curve, AblationOrder, AblationSpec, ProbeData, ProbeSet};
//!
//! // Two units; the model predicts class 0 when unit 0 is larger, else class 1.
//! let probes = ProbeSet::new();
//! let probe = probes.add("hidden")?;
//! let model = |xs: &Tensor| probe.forward(&xs.relu()?);
//! let xs = Tensor::new(&[[2f32, 1.0], [1.0, 3.0]], &Device::Cpu)?;
//! let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
//! let spec = AblationSpec::default()
//!     .with_fractions(vec![0.0, 0.5, 1.0])
//!     .with_order(AblationOrder::Explicit(vec![0, 1]));
//! let curve = ablation_curve(&model, &probes, &data, &spec)?;
//! // Nothing clamped: both right. Unit 0 clamped: logits (0,1), (0,3) → class 1 for both (1/2).
//! // Both clamped: all logits 0, arg-max takes the first → class 0 for both (1/2).
//! assert_eq!(curve.accuracy, vec![1.0, 0.5, 0.5]);
//! assert_eq!(curve.auc, 0.625);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::curve::summarize;
use crate::measure::{evaluate_levels, unit_statistics, LevelRun, ProbeUnits, UnitStatistics};
use crate::probe::{Action, ProbeSet};
use crate::ProbeData;
use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

/// The value an ablated unit is clamped to, after the activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clamp {
    /// Zero (the paper's default).
    #[default]
    Zero,
    /// The unit's mean activation over the probe data (for a feature map: over samples and
    /// positions). The paper found this more damaging than zero.
    Mean,
}

/// The order in which units are ablated as the fraction grows.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_reliance::{ablation_curve, AblationOrder, AblationSpec, ProbeData, ProbeSet};
///
/// let probes = ProbeSet::new();
/// let p = probes.add("h")?;
/// let model = |xs: &Tensor| p.forward(xs);
/// // Unit 0 has selectivity 1 (class 0 only), unit 1 (3 − 1) / (3 + 1) = 0.5.
/// let xs = Tensor::new(&[[2f32, 1.0], [0.0, 3.0]], &Device::Cpu)?;
/// let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
/// let spec = AblationSpec::default()
///     .with_fractions(vec![0.0, 0.5, 1.0])
///     .with_order(AblationOrder::MostSelectiveFirst);
/// let curve = ablation_curve(&model, &probes, &data, &spec)?;
/// // Unit 0 zeroed: (0, 1) → class 1, wrong for sample 0. Both zeroed: class 0 for both.
/// assert_eq!(curve.accuracy, vec![1.0, 0.5, 0.5]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AblationOrder {
    /// `repeats` uniformly random orders; order `r` is a function of `(seed, r)` only.
    Random {
        /// Number of orders (≥ 1); the curve is their mean, the interval is over their AUCs.
        repeats: usize,
        /// Seed; the same seed gives the same orders at every check.
        seed: u64,
    },
    /// One given order: a permutation of all global unit indices.
    Explicit(Vec<usize>),
    /// Most class-selective units first ([`crate::Selectivity`], from the statistics pass);
    /// ties by unit index.
    MostSelectiveFirst,
    /// Least class-selective units first; ties by unit index.
    LeastSelectiveFirst,
    /// Most important units first: the largest accuracy drop when the unit alone is clamped
    /// ([`crate::unit_importance`], an extra batched pass with the spec's clamp); ties by unit
    /// index.
    MostImportantFirst,
    /// Least important units first; ties by unit index.
    LeastImportantFirst,
}

impl Default for AblationOrder {
    fn default() -> Self {
        AblationOrder::Random {
            repeats: 3,
            seed: 0,
        }
    }
}

/// What to measure and how; see the field docs for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationSpec {
    /// Fractions of units clamped, ascending in `[0, 1]`; default `i/16` for `i = 0..=16`.
    pub fractions: Vec<f64>,
    /// Clamp value; default [`Clamp::Zero`].
    pub clamp: Clamp,
    /// Ablation order(s); default 3 random orders, seed 0.
    pub order: AblationOrder,
    /// Samples per forward pass of the statistics pass; default 512.
    pub batch_size: usize,
    /// Bound on the rows of one expanded forward pass (levels × samples), which bounds peak
    /// memory whatever the subset size. `None` (default) picks it from the device and the widest
    /// probed activation, see [`auto_batch_rows`].
    pub max_batch_rows: Option<usize>,
    /// Evaluate all fractions in one expanded pass (default); `false` runs one forward per
    /// level, the slow reference way.
    pub batched: bool,
}

impl Default for AblationSpec {
    fn default() -> Self {
        Self {
            fractions: default_fractions(16),
            clamp: Clamp::Zero,
            order: AblationOrder::default(),
            batch_size: 512,
            max_batch_rows: None,
            batched: true,
        }
    }
}

/// Rows per expanded forward when none are configured. On CPU, about 2 MiB of f32 per
/// activation chunk, so the element-wise passes between matrix products (bias, activation, the
/// probes' clamp) stay in cache: measured 1.6× faster than 16 MiB chunks on the 784-256-256-10
/// benchmark (`examples/bench_check.rs`). On a GPU, about 256 MiB, to keep the device busy.
/// `widest` is the largest number of values per sample at one probe (units × positions).
pub fn auto_batch_rows(device: &candle_core::Device, widest: usize) -> usize {
    let widest = widest.max(1);
    if device.is_cpu() {
        ((1 << 19) / widest).clamp(64, 16384)
    } else {
        ((1 << 26) / widest).clamp(1024, 1 << 20)
    }
}

/// `levels` evenly spaced fractions `0, 1/(levels−1), …, 1` (`levels ≥ 2`).
pub fn evenly_spaced_fractions(levels: usize) -> Vec<f64> {
    default_fractions(levels.max(2) - 1)
}

fn default_fractions(steps: usize) -> Vec<f64> {
    (0..=steps).map(|i| i as f64 / steps as f64).collect()
}

impl AblationSpec {
    /// Sets the fractions.
    pub fn with_fractions(mut self, fractions: Vec<f64>) -> Self {
        self.fractions = fractions;
        self
    }
    /// Sets the clamp value.
    pub fn with_clamp(mut self, clamp: Clamp) -> Self {
        self.clamp = clamp;
        self
    }
    /// Sets the order(s).
    pub fn with_order(mut self, order: AblationOrder) -> Self {
        self.order = order;
        self
    }
    /// Sets the statistics pass batch size.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    /// Sets the bound on rows per expanded forward.
    pub fn with_max_batch_rows(mut self, rows: usize) -> Self {
        self.max_batch_rows = Some(rows);
        self
    }
    /// Batched (default) or one forward per level.
    pub fn with_batched(mut self, batched: bool) -> Self {
        self.batched = batched;
        self
    }

    /// Checks the spec, naming the first problem.
    pub fn validate(&self) -> Result<()> {
        validate_fractions(&self.fractions)?;
        if self.batch_size == 0 {
            candle_core::bail!("batch_size must be at least 1");
        }
        if self.max_batch_rows == Some(0) {
            candle_core::bail!("max_batch_rows must be at least 1");
        }
        if let AblationOrder::Random { repeats: 0, .. } = self.order {
            candle_core::bail!("repeats must be at least 1");
        }
        Ok(())
    }
}

pub(crate) fn validate_fractions(f: &[f64]) -> Result<()> {
    check_fractions(f).map_err(|m| candle_core::Error::Msg(format!("fractions: {m}")))
}

pub(crate) fn check_fractions(f: &[f64]) -> std::result::Result<(), String> {
    if f.len() < 2 {
        return Err(format!(
            "need at least 2 values to form a curve, got {}",
            f.len()
        ));
    }
    if let Some(v) = f.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        return Err(format!("{v} is outside [0, 1]"));
    }
    if f.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!("must be strictly increasing, got {f:?}"));
    }
    Ok(())
}

/// A cumulative ablation curve; serializes to JSON for plotting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationCurve {
    /// Fractions of units clamped.
    pub fractions: Vec<f64>,
    /// Units clamped at each fraction: `round(fraction · total_units)`.
    pub units_ablated: Vec<usize>,
    /// Total probed units.
    pub total_units: usize,
    /// The clamp used.
    pub clamp: Clamp,
    /// Accuracy at each fraction, mean over orders.
    pub accuracy: Vec<f64>,
    /// Accuracy at each fraction for each order.
    pub per_order: Vec<Vec<f64>>,
    /// Mean over orders of the trapezoid area under each order's curve.
    pub auc: f64,
    /// Area under each order's curve.
    pub auc_per_order: Vec<f64>,
    /// 95% Student-t interval of `auc` over orders; `None` with a single order.
    pub auc_ci: Option<[f64; 2]>,
    /// Accuracy with nothing clamped.
    pub unablated_accuracy: f64,
    /// `auc / unablated_accuracy`: reliance with plain accuracy factored out.
    pub normalized_auc: f64,
    /// Whether all unablated logits were finite.
    pub finite: bool,
    /// Whether the batched pass was used (false: one forward per level).
    pub batched: bool,
}

/// Measures the cumulative ablation curve of `model` on `data`.
///
/// The model must call every probe of `probes` exactly once per forward and return logits
/// `(N, classes)`. At fraction `f`, the first `round(f · N_total)` units of each order are clamped
/// after the activation. The selectivity and importance orders
/// ([`AblationOrder::MostSelectiveFirst`], ...) give the paper's curves of ablating units by
/// selectivity; importance orders cost one extra batched pass with one clamped unit per level.
/// All fractions of all orders run in one expanded pass per chunk of samples
/// (see [`AblationSpec::max_batch_rows`]); a model that cannot carry an expanded batch is detected
/// and measured one level at a time, with a warning.
pub fn ablation_curve(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    spec: &AblationSpec,
) -> Result<AblationCurve> {
    spec.validate()?;
    let stats = unit_statistics(model, probes, data, spec.batch_size)?;
    ablation_curve_with_stats(model, probes, data, spec, &stats)
}

/// [`ablation_curve`] reusing statistics from [`unit_statistics`] on the same model and data.
pub fn ablation_curve_with_stats(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    spec: &AblationSpec,
    stats: &UnitStatistics,
) -> Result<AblationCurve> {
    spec.validate()?;
    let total = stats.total_units();
    let orders = match &spec.order {
        AblationOrder::MostSelectiveFirst | AblationOrder::LeastSelectiveFirst => {
            let sel = crate::Selectivity::from_stats(stats).per_unit();
            vec![sorted_order(
                &sel,
                spec.order == AblationOrder::MostSelectiveFirst,
            )]
        }
        AblationOrder::MostImportantFirst | AblationOrder::LeastImportantFirst => {
            let imp = crate::unit_importance(
                model,
                probes,
                data,
                stats,
                spec.clamp,
                spec.max_batch_rows,
            )?
            .per_unit();
            vec![sorted_order(
                &imp,
                spec.order == AblationOrder::MostImportantFirst,
            )]
        }
        order => orders(order, total)?,
    };
    // rank[r][u]: position of unit u in order r; u is clamped at k units iff rank < k.
    let ranks: Vec<Vec<usize>> = orders
        .iter()
        .map(|o| {
            let mut rank = vec![0; total];
            o.iter().enumerate().for_each(|(pos, &u)| rank[u] = pos);
            rank
        })
        .collect();
    let units_ablated: Vec<usize> = spec
        .fractions
        .iter()
        .map(|f| ((f * total as f64).round() as usize).min(total))
        .collect();
    // Distinct masks: nothing and everything clamped are the same for every order.
    let mut masks: Vec<(usize, usize)> = Vec::new(); // (order, k)
    let mut index = vec![vec![0; units_ablated.len()]; orders.len()];
    for (r, row) in index.iter_mut().enumerate() {
        for (i, &k) in units_ablated.iter().enumerate() {
            let key = if k == 0 || k == total { (0, k) } else { (r, k) };
            row[i] = match masks.iter().position(|m| *m == key) {
                Some(p) => p,
                None => {
                    masks.push(key);
                    masks.len() - 1
                }
            };
        }
    }
    let run = evaluate_clamped(
        model,
        probes,
        data,
        stats,
        masks.len(),
        spec.clamp,
        spec.max_batch_rows,
        spec.batched,
        |level, p, keep| {
            let (r, cut) = masks[level];
            let ranks = &ranks[r][p.offset..p.offset + p.units];
            keep.iter_mut()
                .zip(ranks)
                .for_each(|(k, &rank)| *k = u8::from(rank >= cut));
        },
    )?;
    let n = data.len() as f64;
    let per_order: Vec<Vec<f64>> = index
        .iter()
        .map(|row| row.iter().map(|&m| run.correct[m] as f64 / n).collect())
        .collect();
    let s = summarize(&spec.fractions, &per_order);
    Ok(AblationCurve {
        fractions: spec.fractions.clone(),
        units_ablated,
        total_units: total,
        clamp: spec.clamp,
        normalized_auc: s.auc / stats.accuracy,
        accuracy: s.accuracy,
        per_order,
        auc: s.auc,
        auc_per_order: s.auc_per_run,
        auc_ci: s.auc_ci,
        unablated_accuracy: stats.accuracy,
        finite: stats.finite,
        batched: spec.batched && run.fallback.is_none(),
    })
}

/// Per probe, the value each unit is clamped to.
fn clamp_values(
    stats: &UnitStatistics,
    clamp: Clamp,
    device: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    stats
        .probes
        .iter()
        .map(|p| match clamp {
            Clamp::Zero => Tensor::zeros(p.units, candle_core::DType::F32, device),
            Clamp::Mean => {
                let m: Vec<f32> = p.mean.iter().map(|&v| v as f32).collect();
                Tensor::from_vec(m, p.units, device)
            }
        })
        .collect()
}

/// Runs `levels` clamp settings; `fill_keep(level, probe, row)` writes the probe's keep row
/// (non-zero keeps a unit) for one level. Shared by the curve and [`ablation_accuracies`].
#[allow(clippy::too_many_arguments)]
fn evaluate_clamped(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    stats: &UnitStatistics,
    levels: usize,
    clamp: Clamp,
    max_batch_rows: Option<usize>,
    batched: bool,
    fill_keep: impl Fn(usize, &ProbeUnits, &mut [u8]),
) -> Result<LevelRun> {
    let device = data.xs().device().clone();
    let values = clamp_values(stats, clamp, &device)?;
    let make_action = |range: std::ops::Range<usize>| -> Result<Action> {
        let keep = stats
            .probes
            .iter()
            .map(|p| {
                let mut k = vec![0u8; range.len() * p.units];
                for (row, level) in range.clone().enumerate() {
                    fill_keep(level, p, &mut k[row * p.units..(row + 1) * p.units]);
                }
                Tensor::from_vec(k, (range.len(), p.units), &device)
            })
            .collect::<Result<_>>()?;
        Ok(Action::Clamp {
            keep,
            values: values.clone(),
        })
    };
    let rows = max_batch_rows.unwrap_or_else(|| auto_batch_rows(&device, stats.widest_sample()));
    evaluate_levels(model, probes, data, levels, rows, batched, &make_action)
}

/// Accuracy on `data` with each given set of units clamped: entry `i` of the result is the
/// accuracy with the global units `clamped[i]` clamped (an empty set is the unablated accuracy).
/// All sets run batched like the curve. `stats` must come from [`unit_statistics`] on the same
/// model and data; `max_batch_rows` as in [`AblationSpec`].
///
/// This is the primitive behind single-unit importance (one set per unit) and any custom
/// ablation schedule.
pub fn ablation_accuracies(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    stats: &UnitStatistics,
    clamped: &[Vec<usize>],
    clamp: Clamp,
    max_batch_rows: Option<usize>,
) -> Result<Vec<f64>> {
    let total = stats.total_units();
    if let Some(u) = clamped.iter().flatten().find(|&&u| u >= total) {
        candle_core::bail!("ablation_accuracies: unit {u} is out of range (0..{total})");
    }
    if clamped.is_empty() {
        return Ok(vec![]);
    }
    let run = evaluate_clamped(
        model,
        probes,
        data,
        stats,
        clamped.len(),
        clamp,
        max_batch_rows,
        true,
        |level, p, keep| {
            keep.fill(1);
            for &u in &clamped[level] {
                if (p.offset..p.offset + p.units).contains(&u) {
                    keep[u - p.offset] = 0;
                }
            }
        },
    )?;
    let n = data.len() as f64;
    Ok(run.correct.iter().map(|&c| c as f64 / n).collect())
}

/// Unit indices sorted by `key`, descending or ascending, ties (and NaN, last) by index.
fn sorted_order(key: &[f64], descending: bool) -> Vec<usize> {
    let mut o: Vec<usize> = (0..key.len()).collect();
    o.sort_by(|&a, &b| {
        let (x, y) = (key[a], key[b]);
        let ord = match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ if descending => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
            _ => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
        };
        ord.then(a.cmp(&b))
    });
    o
}

fn orders(order: &AblationOrder, total: usize) -> Result<Vec<Vec<usize>>> {
    match order {
        AblationOrder::Random { repeats, seed } => Ok((0..*repeats)
            .map(|r| crate::rng::permutation(total, crate::rng::derive_seed(*seed, r as u64)))
            .collect()),
        AblationOrder::Explicit(o) => {
            if o.len() != total {
                candle_core::bail!(
                    "an explicit ablation order must list all {total} probed units once, got {} entries",
                    o.len()
                );
            }
            let mut seen = vec![false; total];
            for &u in o {
                if u >= total {
                    candle_core::bail!(
                        "explicit ablation order: unit {u} is out of range (0..{total})"
                    );
                }
                if std::mem::replace(&mut seen[u], true) {
                    candle_core::bail!("explicit ablation order: unit {u} appears twice");
                }
            }
            Ok(vec![o.clone()])
        }
        _ => candle_core::bail!("{order:?} is built from measurements, not drawn"),
    }
}
