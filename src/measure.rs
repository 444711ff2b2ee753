//! Running a model over the probe data: the statistics pass and the batched evaluation of many
//! levels (ablation masks or noise scales) in one forward pass per chunk of samples.

use crate::probe::{Action, PassGuard, ProbeSet};
use crate::ProbeData;
use candle_core::{DType, Module, Result, Tensor, D};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Statistics of one probe's units over the probe data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeUnits {
    /// The probe's name.
    pub name: String,
    /// Global index of the probe's first unit.
    pub offset: usize,
    /// Number of units (features of a dense layer, channels of a convolution).
    pub units: usize,
    /// Positions per unit and sample: 1 for a dense layer, `H·W` for a feature map.
    pub positions: usize,
    /// Mean activation per unit (over samples, and positions for a feature map).
    pub mean: Vec<f64>,
    /// Population standard deviation per unit, over the same values as `mean`.
    pub std: Vec<f64>,
    /// Class-conditional mean activity: `class_mean[class][unit]` is the unit's mean over the
    /// samples of that class (for a feature map, of its mean over positions); NaN for a class
    /// with no samples.
    pub class_mean: Vec<Vec<f64>>,
}

/// Per-unit statistics at every probe and the unablated accuracy, from one forward pass over the
/// data (see [`unit_statistics`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitStatistics {
    /// One entry per probe, in the order the probes were added.
    pub probes: Vec<ProbeUnits>,
    /// Share of samples whose arg-max logit equals the label, nothing clamped.
    pub accuracy: f64,
    /// Number of classes (logits per sample).
    pub classes: usize,
    /// Whether every logit was finite.
    pub finite: bool,
    /// Number of samples.
    pub samples: usize,
    /// Samples per class label (`0..=max label`).
    pub class_counts: Vec<u64>,
    /// Index of the probe the forward pass reaches first (it expands batched measurements).
    pub first_probe: usize,
}

impl UnitStatistics {
    /// Units across all probes.
    pub fn total_units(&self) -> usize {
        self.probes.iter().map(|p| p.units).sum()
    }

    /// The most values one sample has at a single probe (units × positions).
    pub fn widest_sample(&self) -> usize {
        self.probes
            .iter()
            .map(|p| p.units * p.positions)
            .max()
            .unwrap_or(1)
    }
}

/// One plain forward pass over `data` in chunks of `batch_size` samples, recording the mean and
/// standard deviation of every unit at every probe and the accuracy.
pub fn unit_statistics(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    batch_size: usize,
) -> Result<UnitStatistics> {
    if batch_size == 0 {
        candle_core::bail!("batch size must be at least 1");
    }
    let guard = probes.begin(Action::Stats, 1, false)?;
    let n = data.len();
    let label_classes = data
        .label_values()
        .iter()
        .max()
        .map_or(0, |&m| m as usize + 1);
    let mut class_counts = vec![0u64; label_classes];
    data.label_values()
        .iter()
        .for_each(|&l| class_counts[l as usize] += 1);
    let (mut correct, mut classes, mut finite, mut first_probe) = (0u64, 0usize, true, 0usize);
    for start in (0..n).step_by(batch_size) {
        let (xs, labels) = data.chunk(start, batch_size)?;
        let chunk_labels = &data.label_values()[start..start + xs.dim(0)?];
        guard.start_forward_labelled(
            start,
            n,
            Some((Tensor::new(chunk_labels, xs.device())?, label_classes)),
        )?;
        let logits = model.forward(&xs)?;
        guard.finish_forward()?;
        let (rows, c) = logits_dims(&logits)?;
        if rows != xs.dim(0)? {
            candle_core::bail!(
                "the model returned {rows} rows of logits for {} samples",
                xs.dim(0)?
            );
        }
        check_labels(&data.label_values()[start..start + rows], c)?;
        classes = c;
        finite &= logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite());
        correct += count_correct(&logits, &labels, 1)?[0];
        if start == 0 {
            first_probe = guard.call_order()?[0];
        }
    }
    let sums = guard.take_sums()?;
    drop(guard);
    let mut offset = 0;
    let mut out = Vec::with_capacity(sums.len());
    for (name, s) in probes.names().into_iter().zip(sums) {
        let s =
            s.ok_or_else(|| candle_core::Error::Msg(format!("probe `{name}` recorded nothing")))?;
        let c = s.count.max(1) as f64;
        let mean: Vec<f64> = s.sum.iter().map(|v| v / c).collect();
        let std = s
            .sum_sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / c - m * m).max(0.0).sqrt())
            .collect();
        let positions = (s.count as usize / (n * s.units.max(1))).max(1);
        let class_mean = (0..label_classes)
            .map(|c| {
                let k = class_counts[c];
                (0..s.units)
                    .map(|u| {
                        if k == 0 {
                            f64::NAN
                        } else {
                            s.class_sum[c * s.units + u] / k as f64
                        }
                    })
                    .collect()
            })
            .collect();
        out.push(ProbeUnits {
            name,
            offset,
            units: s.units,
            positions,
            mean,
            std,
            class_mean,
        });
        offset += s.units;
    }
    Ok(UnitStatistics {
        probes: out,
        accuracy: correct as f64 / n as f64,
        classes,
        finite,
        samples: n,
        class_counts,
        first_probe,
    })
}

fn logits_dims(logits: &Tensor) -> Result<(usize, usize)> {
    match logits.dims() {
        [r, c] if *c > 0 => Ok((*r, *c)),
        d => candle_core::bail!("the model must return logits of shape (N, classes), got {d:?}"),
    }
}

fn check_labels(labels: &[u32], classes: usize) -> Result<()> {
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= classes) {
        candle_core::bail!("label {bad} is out of range for a model with {classes} logits");
    }
    Ok(())
}

/// Correct predictions per level for logits `(levels·m, C)` against labels `(m,)`.
fn count_correct(logits: &Tensor, labels: &Tensor, levels: usize) -> Result<Vec<u64>> {
    let m = labels.dim(0)?;
    let pred = logits.argmax(D::Minus1)?.reshape((levels, m))?;
    let hits = pred
        .broadcast_eq(&labels.unsqueeze(0)?)?
        .to_dtype(DType::U32)?
        .sum(1)?;
    Ok(hits.to_vec1::<u32>()?.into_iter().map(u64::from).collect())
}

/// How the level evaluation ran.
#[derive(Debug, Clone, Default)]
pub(crate) struct LevelRun {
    pub correct: Vec<u64>,
    /// Why the batched pass was abandoned for one pass per level, if it was.
    pub fallback: Option<String>,
}

/// Correct predictions for each of `levels` settings, built per level range by `make_action`.
///
/// Batched: chunks of samples are expanded to `levels × samples` rows at the first probe, with at
/// most `max_rows` rows per forward. If the model does not carry the expanded batch through (a
/// shape error, or logits whose first dimension is not `levels × samples`), it warns and falls
/// back to one forward per level.
pub(crate) fn evaluate_levels(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    levels: usize,
    max_rows: usize,
    batched: bool,
    make_action: &dyn Fn(Range<usize>) -> Result<Action>,
) -> Result<LevelRun> {
    let n = data.len();
    let max_rows = max_rows.max(1);
    let mut run = LevelRun {
        correct: vec![0; levels],
        fallback: None,
    };
    if batched && levels > 0 {
        let group = levels.min(max_rows);
        let m = (max_rows / group).clamp(1, n);
        let first = make_action(0..group)?;
        let guard = probes.begin(first, group, true)?;
        let mut failure = None;
        'groups: for g0 in (0..levels).step_by(group) {
            let range = g0..(g0 + group).min(levels);
            if g0 > 0 {
                guard.set_action(make_action(range.clone())?, range.len(), true)?;
            }
            for start in (0..n).step_by(m) {
                match batched_forward(model, &guard, data, start, m, range.len()) {
                    Ok(counts) => {
                        for (c, k) in run.correct[range.clone()].iter_mut().zip(counts) {
                            *c += k;
                        }
                    }
                    Err(reason) => {
                        failure = Some(reason);
                        break 'groups;
                    }
                }
            }
        }
        drop(guard);
        match failure {
            None => return Ok(run),
            Some(reason) => {
                tracing::warn!(
                    reason = %reason,
                    "the model does not carry an expanded batch through its forward pass \
                     (does it reshape with a batch size read at the top of forward?); \
                     falling back to one forward pass per level, which is slower"
                );
                run.fallback = Some(reason);
                run.correct.iter_mut().for_each(|c| *c = 0);
            }
        }
    }
    let chunk = max_rows.min(n);
    let guard = probes.begin(make_action(0..levels.min(1))?, 1, false)?;
    for level in 0..levels {
        if level > 0 {
            guard.set_action(make_action(level..level + 1)?, 1, false)?;
        }
        for start in (0..n).step_by(chunk) {
            let (xs, labels) = data.chunk(start, chunk)?;
            guard.start_forward(start, n)?;
            let logits = model.forward(&xs)?;
            guard.finish_forward()?;
            let (rows, c) = logits_dims(&logits)?;
            if rows != xs.dim(0)? {
                candle_core::bail!(
                    "the model returned {rows} rows of logits for {} samples",
                    xs.dim(0)?
                );
            }
            check_labels(&data.label_values()[start..start + rows], c)?;
            run.correct[level] += count_correct(&logits, &labels, 1)?[0];
        }
    }
    Ok(run)
}

/// One expanded forward; `Err` carries why expansion failed.
fn batched_forward(
    model: &impl Module,
    guard: &PassGuard<'_>,
    data: &ProbeData,
    start: usize,
    m: usize,
    levels: usize,
) -> std::result::Result<Vec<u64>, String> {
    let (xs, labels) = data.chunk(start, m).map_err(|e| e.to_string())?;
    let rows_in = labels.dims()[0];
    guard
        .start_forward(start, data.len())
        .map_err(|e| e.to_string())?;
    let logits = model.forward(&xs).map_err(|e| e.to_string())?;
    guard.finish_forward().map_err(|e| e.to_string())?;
    let (rows, _) = logits_dims(&logits).map_err(|e| e.to_string())?;
    if rows != levels * rows_in {
        return Err(format!(
            "logits have {rows} rows, expected {levels} levels × {rows_in} samples = {}",
            levels * rows_in
        ));
    }
    count_correct(&logits, &labels, levels).map_err(|e| e.to_string())
}
