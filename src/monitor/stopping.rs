//! The stopping rule: stop once a reliance metric has fallen clearly below its peak, and keep an
//! epoch from before that fall.
//!
//! While a network learns, the ablation metrics rise and then wander on a plateau; once it
//! starts to memorize (wrong labels, single examples), reliance on single directions rises and
//! the metric falls. Checks are noisy, so a check that merely fails to beat the peak says
//! little: the rule waits for the (optionally smoothed) metric to stay more than `tolerance`
//! below its peak for `patience` epochs. It keeps an epoch **on the plateau** (a check within
//! `tolerance` of the peak), where the network had learned without yet memorizing: by default
//! the plateau check whose network was most accurate on the probe data ([`Keep`]).
//!
//! ```
//! use candle_reliance::monitor::{EarlyStopping, EarlyStoppingStrategy, StoppingRule};
//!
//! let mut rule = EarlyStopping::new(StoppingRule {
//!     tolerance: 0.05,
//!     patience: 2,
//!     ..Default::default()
//! });
//! let metrics = [0.50, 0.60, 0.58, 0.59, 0.55, 0.54];
//! let stops: Vec<bool> = metrics
//!     .iter()
//!     .enumerate()
//!     .map(|(i, m)| rule.update(i + 1, *m).is_stop())
//!     .collect();
//! // Peak 0.60 at epoch 2; 0.58 and 0.59 are within 5% of it (≥ 0.57); 0.55 and 0.54 are not,
//! // and two epochs below it exhaust the patience at epoch 6.
//! assert_eq!(stops, [false, false, false, false, false, true]);
//! assert_eq!(rule.kept_epoch(), Some(4)); // no accuracies given: the last epoch on the plateau
//!
//! // With the unablated accuracy of each check, the most accurate plateau check is kept.
//! let mut rule = EarlyStopping::new(StoppingRule { tolerance: 0.05, patience: 2, ..Default::default() });
//! let accuracy = [0.70, 0.80, 0.90, 0.85, 0.95, 0.97];
//! for (i, (m, a)) in metrics.iter().zip(accuracy).enumerate() {
//!     rule.update_check(i + 1, *m, Some(a));
//! }
//! assert_eq!(rule.kept_epoch(), Some(3)); // epochs 2–4 are on the plateau; 3 is the most accurate
//! ```

use crate::invalid::{Checked, Invalid};
use crate::monitor::{LabelWave, LabelWaveRule, LabelWaveState};
use serde::{Deserialize, Serialize};

/// Which number of a check the stopping rule follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Area under the mean ablation curve (accuracy against the labels). It also grows with
    /// plain training accuracy, including the fitting of wrong labels.
    Auc,
    /// Area under the curve divided by the unablated training accuracy: the share of accuracy
    /// the network keeps as units are ablated.
    NormalizedAuc,
    /// Area under the agreement curve: the share of the network's own predictions that
    /// survive ablation (labels play no part). The default.
    #[default]
    AgreementAuc,
}

impl Metric {
    /// The metric's name as written in configuration and logs.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Auc => "auc",
            Metric::NormalizedAuc => "normalized_auc",
            Metric::AgreementAuc => "agreement_auc",
        }
    }

    /// The metric's value on a curve.
    pub fn of(self, curve: &crate::AblationCurve) -> f64 {
        match self {
            Metric::Auc => curve.auc,
            Metric::NormalizedAuc => curve.normalized_auc,
            Metric::AgreementAuc => curve.agreement_auc,
        }
    }
}

/// Which epoch the rule keeps (and the monitor restores).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// The check on the plateau (within `tolerance` of the peak) whose network was most accurate
    /// on the probe data, unablated; the later one among equals. The default.
    ///
    /// The plateau says *when* the network learned without yet relying on single directions; the
    /// accuracy picks *which* of those epochs. Where the weights jump between checks (plain SGD
    /// with batch norm: test accuracy swings by 20 points from one epoch to the next) the probe
    /// data's accuracy swings with it and steers the choice away from a bad epoch.
    ///
    /// Judged as checks arrive, so that the monitor only ever snapshots the current epoch: a
    /// check replaces the kept one if it is at least as accurate, or if the kept one has fallen
    /// off the plateau (a new peak raised it). Fed through [`EarlyStoppingStrategy::update`],
    /// which knows no accuracy, it keeps the last check on the plateau.
    #[default]
    MostAccurateNearPeak,
    /// The last check within `tolerance` of the peak: the end of the plateau.
    LastNearPeak,
    /// The check with the highest (smoothed) metric.
    Peak,
}

/// What the rule does while the metric has not risen above its first check.
///
/// The reliance signal needs the metric to rise, or at least hold, while the network learns.
/// Where it falls from the first check on (a small batch-norm CNN on Fashion-MNIST: the
/// agreement AUC falls for 40 epochs while test accuracy rises), its plateau is the first check
/// and the rule alone would stop after `patience` epochs and keep one of the first epochs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// While the metric's peak is its first check, [Label Wave](crate::monitor::LabelWave)
    /// over the prediction changes fed with [`EarlyStopping::update_changes`] (the monitor feeds
    /// those of its probe data from one check to the next) keeps the epoch, and a stop waits
    /// for Label Wave's patience as well as the rule's. Once the metric rises above its first
    /// check, the reliance rule alone decides, from that check on. Without any changes fed,
    /// nothing falls back. The default.
    #[default]
    LabelWave,
    /// No fallback: the reliance rule decides alone.
    None,
}

/// Parameters of [`EarlyStopping`]: the `stopping:` section of the monitor's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoppingRule {
    /// Which number of a check the rule follows. Default [`Metric::AgreementAuc`].
    pub metric: Metric,
    /// How far below its peak the (smoothed) metric must fall for a check to count as below the
    /// plateau, as a share of the peak, in `[0, 1)`. Default 0.03.
    pub tolerance: f64,
    /// Epochs since the last check on the plateau before stopping (≥ 1). Default 8.
    pub patience: usize,
    /// Exponential smoothing of the metric: `s = smoothing · s_prev + (1 − smoothing) · m`,
    /// in `[0, 1)`; 0 (default) is off.
    pub smoothing: f64,
    /// Which epoch to keep. Default [`Keep::MostAccurateNearPeak`].
    pub keep: Keep,
    /// A check whose network is less accurate on the probe data (unablated) than the most
    /// accurate check so far by more than this share of it is *unstable* — a spike of the
    /// optimizer, not memorization: it is never kept and never a peak, and counts as below the
    /// plateau. In (0, 1]; 1 turns the guard off. Default 0.1.
    pub accuracy_drop: f64,
    /// What decides while the metric has not risen above its first check. Default
    /// [`Fallback::LabelWave`].
    pub fallback: Fallback,
    /// The Label Wave rule of the fallback (window and patience counted in epochs). Default
    /// window 1 (no moving average), patience 3.
    pub label_wave: LabelWaveRule,
}

impl Default for StoppingRule {
    fn default() -> Self {
        Self {
            metric: Metric::default(),
            tolerance: 0.03,
            patience: 8,
            smoothing: 0.0,
            keep: Keep::default(),
            accuracy_drop: 0.1,
            fallback: Fallback::default(),
            // Chosen on the tuning seeds: no moving average (the kept epoch is then the one
            // with the fewest changes, not the end of a window after it) and patience 3 kept
            // epochs closer to the best than the standalone criterion's window 3, patience 5.
            label_wave: LabelWaveRule {
                window: 1,
                patience: 3,
            },
        }
    }
}

impl StoppingRule {
    /// Checks the values, naming the first bad key.
    pub fn validate(&self) -> candle_core::Result<()> {
        self.check().map_err(|e| e.into_error("stopping"))
    }

    pub(crate) fn check(&self) -> Checked {
        Invalid::unit_interval_open("tolerance", self.tolerance)?;
        Invalid::at_least("patience", self.patience, 1)?;
        Invalid::unit_interval_open("smoothing", self.smoothing)?;
        if !(self.accuracy_drop > 0.0 && self.accuracy_drop <= 1.0) {
            return Err(Invalid::new(
                "accuracy_drop",
                format!("must be in (0, 1], got {}", self.accuracy_drop),
            ));
        }
        self.label_wave.check().map_err(|e| e.within("label_wave"))
    }
}

/// Why training should stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The reliance metric has stayed more than `tolerance` below its peak for `patience`
    /// epochs: reliance on single directions is rising.
    Declined {
        /// Epoch of the peak.
        peak_epoch: usize,
        /// The (smoothed) metric at the peak.
        #[serde(with = "crate::json::float")]
        peak: f64,
        /// The epoch kept (restored).
        kept_epoch: usize,
        /// Epochs since the last check on the plateau.
        epochs_below: usize,
    },
    /// The moving average of prediction changes has not gone below its lowest point for the
    /// Label Wave patience (see [`LabelWave`](crate::monitor::LabelWave)).
    PredictionChangesRose {
        /// Epoch of the lowest moving average.
        lowest_epoch: usize,
        /// The lowest moving average of changed predictions.
        lowest: f64,
        /// Epochs since that low was known.
        epochs_since: usize,
    },
    /// The reliance metric never rose above its first check, so the
    /// [fallback](Fallback::LabelWave) decided: the moving average of prediction changes has not
    /// gone below its lowest point for Label Wave's patience, and the metric has been below its
    /// plateau for the rule's.
    FellBackToLabelWave {
        /// Epoch of the lowest moving average of changed predictions (the window's centre).
        lowest_epoch: usize,
        /// That average.
        #[serde(with = "crate::json::float")]
        lowest: f64,
        /// The epoch kept (restored): the last of the lowest window.
        kept_epoch: usize,
        /// Epochs since the last check on the reliance plateau.
        epochs_below: usize,
    },
    /// The network has been degenerate — one predicted class for every sample, or every probed
    /// unit silent — at every check for `patience` epochs since the last check on the plateau
    /// (or since the first check). A degenerate check is never kept: its reliance metric says
    /// nothing (a constant network keeps all of its "decisions" under any ablation).
    Collapsed {
        /// Epoch of the check.
        epoch: usize,
        /// What was degenerate.
        what: String,
        /// The epoch kept (restored), if any check was kept before.
        kept_epoch: Option<usize>,
    },
    /// A metric, the logits, the activations at a probe or the weights were NaN or infinite:
    /// training has diverged.
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
            StopReason::Declined {
                peak_epoch,
                peak,
                kept_epoch,
                epochs_below,
            } => write!(
                f,
                "reliance rose: the metric has been below its plateau for {epochs_below} epochs \
                 (peak {peak:.4} at epoch {peak_epoch}); keeping epoch {kept_epoch}"
            ),
            StopReason::PredictionChangesRose {
                lowest_epoch,
                lowest,
                epochs_since,
            } => write!(
                f,
                "prediction changes rose: no new low for {epochs_since} epochs since \
                 {lowest:.1} at epoch {lowest_epoch}"
            ),
            StopReason::FellBackToLabelWave {
                lowest_epoch,
                lowest,
                kept_epoch,
                epochs_below,
            } => write!(
                f,
                "the reliance metric never rose above its first check and has been below it for \
                 {epochs_below} epochs; Label Wave: no new low of prediction changes since \
                 {lowest:.1} at epoch {lowest_epoch}; keeping epoch {kept_epoch}"
            ),
            StopReason::Collapsed {
                epoch,
                what,
                kept_epoch,
            } => {
                write!(f, "the network collapsed: {what} at epoch {epoch}; ")?;
                match kept_epoch {
                    Some(k) => write!(f, "keeping epoch {k}"),
                    None => write!(f, "no epoch to keep"),
                }
            }
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

/// A check's epoch, its (smoothed) metric and its unablated accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// The epoch.
    pub epoch: usize,
    /// The smoothed metric there (equal to the raw metric without smoothing).
    #[serde(with = "crate::json::float")]
    pub metric: f64,
    /// The network's accuracy on the probe data, unablated; `None` where the check was fed
    /// without it.
    #[serde(default, with = "crate::json::option")]
    pub accuracy: Option<f64>,
}

/// Everything [`EarlyStopping`] remembers; serialize it to resume with identical decisions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoppingState {
    /// Smoothed metric after the last update.
    #[serde(with = "crate::json::option")]
    pub smoothed: Option<f64>,
    /// The highest smoothed metric so far.
    pub peak: Option<Best>,
    /// The epoch to keep so far (see [`Keep`]).
    pub kept: Option<Best>,
    /// The last check within `tolerance` of the peak.
    pub last_near_peak: Option<usize>,
    /// The epoch of the last update.
    pub last_epoch: Option<usize>,
    /// The epoch of the first update.
    #[serde(default)]
    pub first_epoch: Option<usize>,
    /// Updates so far.
    pub checks: usize,
    /// Set once a stop was decided; later updates repeat it.
    pub stopped: Option<StopReason>,
    /// Whether the metric has risen above its first check (a new peak after the first).
    #[serde(default)]
    pub rose: bool,
    /// Label Wave over the prediction changes fed so far ([`Fallback::LabelWave`]).
    #[serde(default)]
    pub wave: LabelWaveState,
    /// The epoch Label Wave keeps: the last epoch of the window with the fewest changes, so that
    /// it is the current epoch when found (the one whose weights can be snapshotted).
    #[serde(default)]
    pub wave_kept: Option<usize>,
    /// The highest unablated accuracy of a check so far (see [`StoppingRule::accuracy_drop`]).
    #[serde(default, with = "crate::json::option")]
    pub best_accuracy: Option<f64>,
}

/// A strategy deciding from a stream of per-epoch values whether to stop.
pub trait EarlyStoppingStrategy {
    /// Feeds the value measured after `epoch`, returns the decision.
    fn update(&mut self, epoch: usize, value: f64) -> Decision;
}

/// The reliance stopping rule: the metric's plateau (within [`StoppingRule::tolerance`] of its
/// peak), a stop after [`StoppingRule::patience`] epochs below it, and the epoch to keep
/// ([`Keep`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EarlyStopping {
    rule: StoppingRule,
    state: StoppingState,
    /// Label Wave's kept epoch before this epoch's changes were fed: restored if this epoch's
    /// check turns out degenerate or unstable (never kept). Only between the two calls of one
    /// epoch, so not part of the saved state.
    wave_kept_before: Option<Option<usize>>,
}

impl EarlyStopping {
    /// A fresh rule.
    pub fn new(rule: StoppingRule) -> Self {
        Self {
            rule,
            state: StoppingState::default(),
            wave_kept_before: None,
        }
    }

    /// Continues from a saved state.
    pub fn with_state(rule: StoppingRule, state: StoppingState) -> Self {
        Self {
            rule,
            state,
            wave_kept_before: None,
        }
    }

    /// A check of `epoch` that is never kept: Label Wave's kept epoch falls back to the one
    /// before this epoch's changes.
    fn not_kept(&mut self, epoch: usize) {
        if let Some(before) = self.wave_kept_before.take() {
            if self.state.wave_kept == Some(epoch) {
                self.state.wave_kept = before;
            }
        }
    }

    /// The state, for saving.
    pub fn state(&self) -> &StoppingState {
        &self.state
    }

    /// The rule.
    pub fn rule(&self) -> &StoppingRule {
        &self.rule
    }

    /// The epoch kept so far: Label Wave's while [falling back](Fallback::LabelWave), the
    /// reliance rule's otherwise.
    pub fn kept_epoch(&self) -> Option<usize> {
        match self.state.wave_kept {
            Some(e) if self.falling_back() => Some(e),
            _ => self.state.kept.as_ref().map(|b| b.epoch),
        }
    }

    /// Whether Label Wave decides: the fallback is on, prediction changes were fed and the
    /// metric has not risen above its first check.
    pub fn falling_back(&self) -> bool {
        self.rule.fallback == Fallback::LabelWave
            && !self.state.rose
            && !self.state.wave.changes.is_empty()
    }

    /// Whether a check of this unablated accuracy would be unstable: more than
    /// [`StoppingRule::accuracy_drop`] below the most accurate check so far.
    pub fn is_unstable(&self, accuracy: f64) -> bool {
        self.state
            .best_accuracy
            .is_some_and(|best| accuracy < (1.0 - self.rule.accuracy_drop) * best)
    }

    /// Feeds the number of prediction changes since the previous epoch (or check) for
    /// [`Fallback::LabelWave`]; call it before [`EarlyStopping::update_check`] of the same
    /// epoch. Ignored without the fallback. A stop is only ever decided at a check.
    pub fn update_changes(&mut self, epoch: usize, changes: f64) {
        if self.state.stopped.is_some()
            || self.rule.fallback != Fallback::LabelWave
            || !changes.is_finite()
        {
            return;
        }
        let mut wave = LabelWave::with_state(
            self.rule.label_wave.clone(),
            std::mem::take(&mut self.state.wave),
        );
        let before = wave.state().lowest;
        wave.update(epoch, changes);
        self.wave_kept_before = Some(self.state.wave_kept);
        if wave.state().lowest != before {
            self.state.wave_kept = Some(epoch);
        }
        self.state.wave = wave.state().clone();
        self.state.last_epoch = Some(epoch);
    }

    /// Whether the last update chose its own epoch as the one to keep (the moment to snapshot
    /// the weights).
    pub fn kept_last(&self) -> bool {
        self.state.stopped.is_none()
            && self.state.last_epoch.is_some()
            && self.kept_epoch() == self.state.last_epoch
    }

    /// Records a stop decided elsewhere (e.g. max epochs); later updates repeat it.
    pub fn stop(&mut self, reason: StopReason) -> Decision {
        // A check that stops at once (non-finite) is never kept.
        if let Some(epoch) = self.state.last_epoch {
            self.not_kept(epoch);
        }
        let reason = self.state.stopped.get_or_insert(reason).clone();
        Decision::Stop { reason }
    }

    /// Feeds a check whose network is degenerate (`what` says how): it is off the plateau and
    /// never kept, whatever its metric; after `patience` epochs without a check on the plateau
    /// the rule stops with [`StopReason::Collapsed`].
    pub fn degenerate(&mut self, epoch: usize, what: &str) -> Decision {
        if let Some(reason) = &self.state.stopped {
            return Decision::Stop {
                reason: reason.clone(),
            };
        }
        self.not_kept(epoch);
        self.state.checks += 1;
        self.state.last_epoch = Some(epoch);
        let since = *self.state.first_epoch.get_or_insert(epoch);
        let since = self.state.last_near_peak.unwrap_or(since);
        if epoch.saturating_sub(since) >= self.rule.patience {
            return self.stop(StopReason::Collapsed {
                epoch,
                what: what.to_string(),
                kept_epoch: self.kept_epoch(),
            });
        }
        Decision::Continue
    }
}

impl EarlyStoppingStrategy for EarlyStopping {
    fn update(&mut self, epoch: usize, metric: f64) -> Decision {
        self.update_check(epoch, metric, None)
    }
}

impl EarlyStopping {
    /// Feeds a check's metric and the network's unablated accuracy on the probe data (what
    /// [`Keep::MostAccurateNearPeak`] chooses by; a non-finite accuracy counts as unknown).
    /// [`EarlyStoppingStrategy::update`] is this without the accuracy.
    pub fn update_check(&mut self, epoch: usize, metric: f64, accuracy: Option<f64>) -> Decision {
        let accuracy = accuracy.filter(|a| a.is_finite());
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
        let unstable = accuracy.is_some_and(|a| self.is_unstable(a));
        if let Some(a) = accuracy {
            self.state.best_accuracy = Some(self.state.best_accuracy.map_or(a, |b| b.max(a)));
        }
        if unstable {
            // Off the plateau whatever its metric, which does not enter the smoothing either.
            self.not_kept(epoch);
            self.state.checks += 1;
            self.state.last_epoch = Some(epoch);
            return match self.state.peak.clone() {
                Some(peak) => self.below_plateau(epoch, &peak),
                None => Decision::Continue,
            };
        }
        self.wave_kept_before = None;
        let a = self.rule.smoothing;
        let s = match self.state.smoothed {
            Some(prev) => a * prev + (1.0 - a) * metric,
            None => metric,
        };
        self.state.smoothed = Some(s);
        self.state.checks += 1;
        self.state.last_epoch = Some(epoch);
        self.state.first_epoch.get_or_insert(epoch);
        let here = Best {
            epoch,
            metric: s,
            accuracy,
        };
        let new_peak = self.state.peak.as_ref().is_none_or(|b| s > b.metric);
        // The first rise ends a fallback: from here the reliance rule keeps this check.
        let first_rise = new_peak && self.state.peak.is_some() && !self.state.rose;
        let was_falling_back = self.falling_back();
        if new_peak {
            self.state.rose |= self.state.peak.is_some();
            self.state.peak = Some(here.clone());
        }
        let peak = self.state.peak.clone().expect("set above");
        let floor = peak.metric - self.rule.tolerance * peak.metric.abs();
        if s >= floor {
            self.state.last_near_peak = Some(epoch);
            let replace = match (self.rule.keep, &self.state.kept) {
                _ if first_rise && was_falling_back => true,
                (_, None) | (Keep::LastNearPeak, _) => true,
                (Keep::Peak, _) => new_peak,
                (Keep::MostAccurateNearPeak, Some(kept)) => {
                    kept.metric < floor
                        || match (accuracy, kept.accuracy) {
                            (Some(a), Some(k)) => a >= k,
                            // Without accuracies: the end of the plateau.
                            _ => true,
                        }
                }
            };
            if replace {
                self.state.kept = Some(here);
            }
            return Decision::Continue;
        }
        self.below_plateau(epoch, &peak)
    }

    /// The decision at a check below the plateau (or unstable): stop once `patience` epochs
    /// have passed since the last check on it — while falling back, only once Label Wave would
    /// stop too.
    fn below_plateau(&mut self, epoch: usize, peak: &Best) -> Decision {
        let last_near = self.state.last_near_peak.unwrap_or(peak.epoch);
        let below = epoch.saturating_sub(last_near);
        if below >= self.rule.patience && self.falling_back() {
            // Label Wave decides: stop once it would, keeping its epoch.
            return match (&self.state.wave.stopped, self.state.wave.lowest) {
                (Some(_), Some((lowest_epoch, lowest))) => {
                    let kept_epoch = self.kept_epoch().unwrap_or(lowest_epoch);
                    self.stop(StopReason::FellBackToLabelWave {
                        lowest_epoch,
                        lowest,
                        kept_epoch,
                        epochs_below: below,
                    })
                }
                _ => Decision::Continue,
            };
        }
        if below >= self.rule.patience {
            let kept_epoch = self.kept_epoch().unwrap_or(peak.epoch);
            return self.stop(StopReason::Declined {
                peak_epoch: peak.epoch,
                peak: peak.metric,
                kept_epoch,
                epochs_below: below,
            });
        }
        Decision::Continue
    }
}
