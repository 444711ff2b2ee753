//! The noise curve: training accuracy as zero-mean Gaussian noise is added to every probed unit,
//! with standard deviation `scale × σ_unit` (σ over the probe data), for growing scales
//! (Morcos et al. 2018, Fig. 1b).

use crate::ablation::auto_batch_rows;
use crate::curve::summarize;
use crate::measure::{evaluate_levels, unit_statistics, UnitStatistics};
use crate::probe::{Action, ProbeSet};
use crate::ProbeData;
use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

/// What noise to add; see the field docs for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseSpec {
    /// Noise scales (multiples of each unit's σ), ascending and positive; default 11 log-spaced
    /// values `10^-1.5 … 10^1`.
    pub scales: Vec<f64>,
    /// Independent noise draws; the curve is their mean. Default 2.
    pub repeats: usize,
    /// Seed of the counter-based generator. Default 0.
    pub seed: u64,
    /// Samples per forward of the statistics pass; default 512.
    pub batch_size: usize,
    /// Bound on rows per expanded forward; `None` (default): see [`auto_batch_rows`].
    pub max_batch_rows: Option<usize>,
    /// Evaluate all scales in one expanded pass (default).
    pub batched: bool,
}

impl Default for NoiseSpec {
    fn default() -> Self {
        Self {
            scales: log_spaced(-1.5, 1.0, 11),
            repeats: 2,
            seed: 0,
            batch_size: 512,
            max_batch_rows: None,
            batched: true,
        }
    }
}

/// `n ≥ 2` values `10^lo … 10^hi`, evenly spaced in the exponent.
pub fn log_spaced(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let n = n.max(2);
    (0..n)
        .map(|i| 10f64.powf(lo + (hi - lo) * i as f64 / (n - 1) as f64))
        .collect()
}

impl NoiseSpec {
    /// Checks the spec, naming the first problem.
    pub fn validate(&self) -> Result<()> {
        validate_scales(&self.scales)?;
        if self.repeats == 0 {
            candle_core::bail!("noise repeats must be at least 1");
        }
        if self.batch_size == 0 || self.max_batch_rows == Some(0) {
            candle_core::bail!("batch_size and max_batch_rows must be at least 1");
        }
        Ok(())
    }
    /// Sets the scales.
    pub fn with_scales(mut self, scales: Vec<f64>) -> Self {
        self.scales = scales;
        self
    }
    /// Sets the number of draws.
    pub fn with_repeats(mut self, repeats: usize) -> Self {
        self.repeats = repeats;
        self
    }
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Batched (default) or one forward per level.
    pub fn with_batched(mut self, batched: bool) -> Self {
        self.batched = batched;
        self
    }
}

pub(crate) fn validate_scales(s: &[f64]) -> Result<()> {
    check_scales(s).map_err(|m| candle_core::Error::Msg(format!("noise scales: {m}")))
}

pub(crate) fn check_scales(s: &[f64]) -> std::result::Result<(), String> {
    if s.len() < 2 {
        return Err(format!("need at least 2 values, got {}", s.len()));
    }
    if let Some(v) = s.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
        return Err(format!("must be positive and finite, got {v}"));
    }
    if s.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!("must be strictly increasing, got {s:?}"));
    }
    Ok(())
}

/// A noise curve. The AUC is taken over `log10(scale)` mapped linearly onto `[0, 1]`, so it is
/// on the same 0–1 footing as the ablation AUC whatever the range of scales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseCurve {
    /// Noise scales (multiples of σ).
    pub scales: Vec<f64>,
    /// Accuracy at each scale, mean over draws.
    pub accuracy: Vec<f64>,
    /// Accuracy at each scale for each draw.
    pub per_repeat: Vec<Vec<f64>>,
    /// Mean over draws of the area under the curve against normalized log-scale.
    pub auc: f64,
    /// Area per draw.
    pub auc_per_repeat: Vec<f64>,
    /// 95% Student-t interval of `auc` over draws; `None` with a single draw.
    pub auc_ci: Option<[f64; 2]>,
    /// Accuracy without noise.
    pub unablated_accuracy: f64,
    /// `auc / unablated_accuracy`.
    pub normalized_auc: f64,
    /// Whether all noise-free logits were finite.
    pub finite: bool,
    /// Whether the batched pass was used.
    pub batched: bool,
}

/// Measures the noise curve of `model` on `data`.
pub fn noise_curve(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    spec: &NoiseSpec,
) -> Result<NoiseCurve> {
    spec.validate()?;
    let stats = unit_statistics(model, probes, data, spec.batch_size)?;
    noise_curve_with_stats(model, probes, data, spec, &stats)
}

/// [`noise_curve`] reusing statistics from [`unit_statistics`] on the same model and data.
pub fn noise_curve_with_stats(
    model: &impl Module,
    probes: &ProbeSet,
    data: &ProbeData,
    spec: &NoiseSpec,
    stats: &UnitStatistics,
) -> Result<NoiseCurve> {
    spec.validate()?;
    let s_count = spec.scales.len();
    let levels = s_count * spec.repeats;
    let device = data.xs().device().clone();
    let make_action = |range: std::ops::Range<usize>| -> Result<Action> {
        let std = stats
            .probes
            .iter()
            .map(|p| {
                let mut v = Vec::with_capacity(range.len() * p.units);
                for level in range.clone() {
                    let scale = spec.scales[level % s_count];
                    v.extend(p.std.iter().map(|s| (scale * s) as f32));
                }
                Tensor::from_vec(v, (range.len(), p.units), &device)
            })
            .collect::<Result<_>>()?;
        Ok(Action::Noise {
            std,
            seed: spec.seed,
            level_offset: range.start,
        })
    };
    let run = evaluate_levels(
        model,
        probes,
        data,
        levels,
        spec.max_batch_rows
            .unwrap_or_else(|| auto_batch_rows(data.xs().device(), stats.widest_sample())),
        spec.batched,
        &make_action,
    )?;
    let n = data.len() as f64;
    let per_repeat: Vec<Vec<f64>> = (0..spec.repeats)
        .map(|r| {
            (0..s_count)
                .map(|i| run.correct[r * s_count + i] as f64 / n)
                .collect()
        })
        .collect();
    let (lo, hi) = (spec.scales[0].log10(), spec.scales[s_count - 1].log10());
    let x: Vec<f64> = spec
        .scales
        .iter()
        .map(|s| (s.log10() - lo) / (hi - lo))
        .collect();
    let s = summarize(&x, &per_repeat);
    Ok(NoiseCurve {
        scales: spec.scales.clone(),
        normalized_auc: s.auc / stats.accuracy,
        accuracy: s.accuracy,
        per_repeat,
        auc: s.auc,
        auc_per_repeat: s.auc_per_run,
        auc_ci: s.auc_ci,
        unablated_accuracy: stats.accuracy,
        finite: stats.finite,
        batched: spec.batched && run.fallback.is_none(),
    })
}
