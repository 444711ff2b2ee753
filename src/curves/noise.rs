//! The noise curve: training accuracy as zero-mean Gaussian noise is added to every probed unit,
//! with standard deviation `scale × σ_unit` (σ over the probe data), for growing scales
//! (Morcos et al. 2018, Fig. 1b).

use super::auc::summarize;
use crate::invalid::{Checked, Invalid};
use crate::probe::Action;
use crate::Measurement;
use crate::Result;
use candle_core::{ModuleT, Tensor};
use serde::{Deserialize, Serialize};

/// What noise to add: the `noise:` section of the monitor's configuration (absent: no noise
/// curve), and the argument of [`Measurement::noise_curve`]. See the field docs for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseSpec {
    /// Noise scales (multiples of each unit's σ), ascending and positive; default 11 log-spaced
    /// values `10^-1.5 … 10^1`.
    pub scales: Vec<f64>,
    /// Independent noise draws (≥ 1); the curve is their mean. Default 2.
    pub draws: usize,
    /// Seed of the counter-based generator. Default 0.
    #[serde(deserialize_with = "crate::invalid::seed")]
    pub seed: u64,
}

impl Default for NoiseSpec {
    fn default() -> Self {
        Self {
            scales: log_spaced(-1.5, 1.0, 11),
            draws: 2,
            seed: 0,
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
        self.check().map_err(|e| e.into_error("noise"))
    }

    pub(crate) fn check(&self) -> Checked {
        let s = &self.scales;
        let bad = |msg: String| Err(Invalid::new("scales", msg));
        if s.len() < 2 {
            return bad(format!("need at least 2 values, got {}", s.len()));
        }
        if let Some(v) = s.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return bad(format!("must be positive and finite, got {v}"));
        }
        if s.windows(2).any(|w| w[1] <= w[0]) {
            return bad(format!("must be strictly increasing, got {s:?}"));
        }
        Invalid::at_most(
            "scales",
            s.len(),
            super::ablation::MAX_FRACTIONS,
            "more scales than any curve needs",
        )?;
        Invalid::at_least("draws", self.draws, 1)?;
        Invalid::at_most(
            "draws",
            self.draws.saturating_mul(s.len()),
            super::ablation::MAX_VARIANTS,
            "draws × scales is the number of forward passes over the subset",
        )
    }
    /// Sets the scales.
    pub fn with_scales(mut self, scales: Vec<f64>) -> Self {
        self.scales = scales;
        self
    }
    /// Sets the number of draws.
    pub fn with_draws(mut self, draws: usize) -> Self {
        self.draws = draws;
        self
    }
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
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
    pub per_draw: Vec<Vec<f64>>,
    /// Mean over draws of the area under the curve against normalized log-scale.
    #[serde(with = "crate::json::float")]
    pub auc: f64,
    /// Area per draw.
    pub auc_per_draw: Vec<f64>,
    /// 95% Student-t interval of `auc` over draws; `None` with a single draw.
    pub auc_ci: Option<[f64; 2]>,
    /// Accuracy without noise.
    #[serde(with = "crate::json::float")]
    pub unablated_accuracy: f64,
    /// `auc / unablated_accuracy`.
    #[serde(with = "crate::json::float")]
    pub normalized_auc: f64,
    /// Whether all noise-free logits were finite.
    pub finite: bool,
    /// Whether the batched pass was used.
    pub batched: bool,
}

impl<M: ModuleT + ?Sized> Measurement<'_, M> {
    /// The noise curve: zero-mean Gaussian noise with standard deviation `scale × σ_unit` added
    /// to every probed unit, for each scale and draw (the variants), all in one expanded pass per
    /// chunk of samples.
    pub fn noise_curve(&self, spec: &NoiseSpec) -> Result<NoiseCurve> {
        spec.validate()?;
        let stats = self.statistics()?;
        let s_count = spec.scales.len();
        let variants = s_count * spec.draws;
        let device = self.data().xs().device().clone();
        let make_action = |range: std::ops::Range<usize>| -> Result<Action> {
            let std = stats
                .probes
                .iter()
                .map(|p| {
                    let mut v = Vec::with_capacity(range.len() * p.units);
                    for variant in range.clone() {
                        let scale = spec.scales[variant % s_count];
                        v.extend(p.value.std.iter().map(|s| (scale * s) as f32));
                    }
                    Tensor::from_vec(v, (range.len(), p.units), &device)
                })
                .collect::<candle_core::Result<_>>()?;
            Ok(Action::Noise {
                std,
                seed: spec.seed,
                variant_offset: range.start,
            })
        };
        let run = self.evaluate_variants(variants, &make_action)?;
        let n = self.data().targets() as f64;
        let per_draw: Vec<Vec<f64>> = (0..spec.draws)
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
        let s = summarize(&x, &per_draw);
        Ok(NoiseCurve {
            scales: spec.scales.clone(),
            normalized_auc: s.auc / stats.accuracy,
            accuracy: s.accuracy,
            per_draw,
            auc: s.auc,
            auc_per_draw: s.auc_per_run,
            auc_ci: s.auc_ci,
            unablated_accuracy: stats.accuracy,
            finite: stats.finite,
            batched: self.batching().batched && run.fallback.is_none(),
        })
    }
}
