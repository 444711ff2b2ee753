//! The stopping rule: patience on a (smoothed) reliance metric that should stay at its peak while
//! a network generalizes and fall once it starts to memorize.
//!
//! ```
//! use candle_reliance::monitor::{EarlyStopping, EarlyStoppingStrategy, StoppingRule};
//!
//! let mut rule = EarlyStopping::new(StoppingRule { patience: 2, ..Default::default() });
//! let metrics = [0.50, 0.60, 0.58, 0.59, 0.55];
//! let decisions: Vec<bool> = metrics
//!     .iter()
//!     .enumerate()
//!     .map(|(epoch, m)| rule.update(epoch + 1, *m).is_stop())
//!     .collect();
//! // The peak is at epoch 2; epochs 3 and 4 do not beat it, so the rule stops at epoch 4.
//! assert_eq!(decisions, [false, false, false, true, true]);
//! assert_eq!(rule.state().best.as_ref().unwrap().epoch, 2);
//! ```

use crate::invalid::{Checked, Invalid};
use serde::{Deserialize, Serialize};

/// Which number of a check the stopping rule follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Area under the mean ablation curve. It also grows with plain training accuracy.
    Auc,
    /// Area under the curve divided by the unablated training accuracy: the share of accuracy
    /// the network keeps as units are ablated, with plain accuracy growth factored out. The
    /// default: on noisy labels the raw AUC keeps rising with memorization while this falls
    /// (see `docs/usage.md`, "Which metric").
    #[default]
    NormalizedAuc,
}

impl Metric {
    /// The metric's name as written in configuration and logs.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Auc => "auc",
            Metric::NormalizedAuc => "normalized_auc",
        }
    }
}

/// Parameters of [`EarlyStopping`]: the `stopping:` section of the monitor's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoppingRule {
    /// Which number of a check the rule follows. Default [`Metric::NormalizedAuc`].
    pub metric: Metric,
    /// Checks without improvement before stopping (≥ 1). Default 3.
    pub patience: usize,
    /// An improvement must exceed the best so far by more than this (≥ 0). Default 0.
    pub min_delta: f64,
    /// Exponential smoothing of the metric: `s = smoothing · s_prev + (1 − smoothing) · m`,
    /// in `[0, 1)`; 0 (default) is off.
    pub smoothing: f64,
}

impl Default for StoppingRule {
    fn default() -> Self {
        Self {
            metric: Metric::default(),
            patience: 3,
            min_delta: 0.0,
            smoothing: 0.0,
        }
    }
}

impl StoppingRule {
    /// Checks the values, naming the first bad key.
    pub fn validate(&self) -> candle_core::Result<()> {
        self.check().map_err(|e| e.into_error("stopping"))
    }

    pub(crate) fn check(&self) -> Checked {
        Invalid::at_least("patience", self.patience, 1)?;
        Invalid::non_negative("min_delta", self.min_delta)?;
        Invalid::unit_interval_open("smoothing", self.smoothing)
    }
}

/// Why training should stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The metric has not beaten its peak for `patience` checks: reliance on single directions
    /// is rising.
    PatienceExhausted {
        /// Epoch of the peak.
        best_epoch: usize,
        /// The (smoothed) metric at the peak.
        best_metric: f64,
        /// Checks since the peak.
        checks_without_improvement: usize,
    },
    /// A metric or the logits were NaN or infinite: training has diverged.
    NonFinite {
        /// Epoch of the check.
        epoch: usize,
        /// What was not finite.
        what: String,
    },
    /// The configured epoch budget is spent.
    MaxEpochs {
        /// The epoch.
        epoch: usize,
    },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::PatienceExhausted {
                best_epoch,
                best_metric,
                checks_without_improvement,
            } => write!(
                f,
                "patience exhausted: no improvement for {checks_without_improvement} checks \
                 since the peak {best_metric:.4} at epoch {best_epoch}"
            ),
            StopReason::NonFinite { epoch, what } => {
                write!(f, "non-finite {what} at epoch {epoch}")
            }
            StopReason::MaxEpochs { epoch } => write!(f, "reached max_epochs at epoch {epoch}"),
        }
    }
}

/// What the training loop should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Keep training.
    Continue,
    /// Stop training.
    Stop {
        /// Why.
        reason: StopReason,
    },
}

impl Decision {
    /// Whether this is a [`Decision::Stop`].
    pub fn is_stop(&self) -> bool {
        matches!(self, Decision::Stop { .. })
    }

    /// The stop reason, if any.
    pub fn reason(&self) -> Option<&StopReason> {
        match self {
            Decision::Stop { reason } => Some(reason),
            Decision::Continue => None,
        }
    }
}

/// The peak of the metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// Epoch of the peak.
    pub epoch: usize,
    /// The smoothed metric there (equal to the raw metric without smoothing).
    pub metric: f64,
}

/// Everything [`EarlyStopping`] remembers; serialize it to resume with identical decisions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoppingState {
    /// Smoothed metric after the last update.
    pub smoothed: Option<f64>,
    /// The peak so far.
    pub best: Option<Best>,
    /// Updates since the peak.
    pub checks_without_improvement: usize,
    /// Updates so far.
    pub checks: usize,
    /// Set once a stop was decided; later updates repeat it.
    pub stopped: Option<StopReason>,
}

/// A strategy deciding from a stream of metric values whether to stop.
pub trait EarlyStoppingStrategy {
    /// Feeds the metric measured after `epoch`, returns the decision.
    fn update(&mut self, epoch: usize, metric: f64) -> Decision;
}

/// Patience-based stopping on a higher-is-better metric, with optional smoothing.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyStopping {
    rule: StoppingRule,
    state: StoppingState,
}

impl EarlyStopping {
    /// A fresh rule.
    pub fn new(rule: StoppingRule) -> Self {
        Self {
            rule,
            state: StoppingState::default(),
        }
    }

    /// Continues from a saved state.
    pub fn with_state(rule: StoppingRule, state: StoppingState) -> Self {
        Self { rule, state }
    }

    /// The state, for saving.
    pub fn state(&self) -> &StoppingState {
        &self.state
    }

    /// The rule.
    pub fn rule(&self) -> &StoppingRule {
        &self.rule
    }

    /// Whether the last update set a new peak.
    pub fn improved_last(&self) -> bool {
        self.state.checks > 0
            && self.state.checks_without_improvement == 0
            && self.state.stopped.is_none()
    }

    /// Records a stop decided elsewhere (e.g. max epochs); later updates repeat it.
    pub fn stop(&mut self, reason: StopReason) -> Decision {
        let reason = self.state.stopped.get_or_insert(reason).clone();
        Decision::Stop { reason }
    }
}

impl EarlyStoppingStrategy for EarlyStopping {
    fn update(&mut self, epoch: usize, metric: f64) -> Decision {
        if let Some(reason) = &self.state.stopped {
            return Decision::Stop {
                reason: reason.clone(),
            };
        }
        if !metric.is_finite() {
            return self.stop(StopReason::NonFinite {
                epoch,
                what: format!("reliance metric ({metric})"),
            });
        }
        let a = self.rule.smoothing;
        let smoothed = match self.state.smoothed {
            Some(prev) => a * prev + (1.0 - a) * metric,
            None => metric,
        };
        self.state.smoothed = Some(smoothed);
        self.state.checks += 1;
        let improved = match &self.state.best {
            None => true,
            Some(b) => smoothed > b.metric + self.rule.min_delta,
        };
        if improved {
            self.state.best = Some(Best {
                epoch,
                metric: smoothed,
            });
            self.state.checks_without_improvement = 0;
            return Decision::Continue;
        }
        self.state.checks_without_improvement += 1;
        if self.state.checks_without_improvement >= self.rule.patience {
            let best = self
                .state
                .best
                .clone()
                .expect("a best exists after the first check");
            return self.stop(StopReason::PatienceExhausted {
                best_epoch: best.epoch,
                best_metric: best.metric,
                checks_without_improvement: self.state.checks_without_improvement,
            });
        }
        Decision::Continue
    }
}
