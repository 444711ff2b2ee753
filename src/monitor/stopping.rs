//! The stopping rule as one state machine: [`EarlyStopping`] and what it sees and decides.

use crate::invalid::{Checked, Invalid};
use crate::monitor::{LabelWave, LabelWaveRule, LabelWaveState};
use serde::{Deserialize, Serialize};

/// Which number of a check the reliance plateau follows.
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

/// Parameters of [`EarlyStopping`]: the `stopping:` section of the monitor's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, from = "StoppingSection")]
pub struct StoppingRule {
    /// Which number of a check the reliance plateau follows. Default [`Metric::AgreementAuc`].
    pub metric: Metric,
    /// How far below its peak the metric may be for a check to count as on the plateau, as a
    /// share of the peak, in `[0, 1)`. Default 0.03.
    pub tolerance: f64,
    /// Label Wave over prediction changes: `window` epochs in the moving average and `patience`
    /// epochs without a new low before stopping. Default window 3, patience 5 (the criterion's
    /// own defaults).
    pub label_wave: LabelWaveRule,
}

impl Default for StoppingRule {
    fn default() -> Self {
        Self {
            metric: Metric::default(),
            tolerance: 0.03,
            label_wave: LabelWaveRule::default(),
        }
    }
}

/// The `stopping:` section as written: the rule's keys and the keys of earlier versions, which
/// are refused with a message saying what replaced them.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StoppingSection {
    metric: Metric,
    tolerance: f64,
    label_wave: LabelWaveRule,
    #[serde(deserialize_with = "removed::patience")]
    patience: (),
    #[serde(deserialize_with = "removed::smoothing")]
    smoothing: (),
    #[serde(deserialize_with = "removed::keep")]
    keep: (),
    #[serde(deserialize_with = "removed::accuracy_drop")]
    accuracy_drop: (),
    #[serde(deserialize_with = "removed::fallback")]
    fallback: (),
}

/// Keys of the `stopping:` section of 0.1: present, each is an error (raised while its value is
/// read, so the parser adds its line) saying what replaced it.
mod removed {
    use serde::Deserializer;

    fn refuse<'de, D: Deserializer<'de>>(key: &str, why: &str) -> Result<(), D::Error> {
        Err(serde::de::Error::custom(format!(
            "`{key}` was removed in 0.2.0: {why} (see docs/configuration.md, \"The stopping \
             rule, step by step\")"
        )))
    }

    pub fn patience<'de, D: Deserializer<'de>>(_: D) -> Result<(), D::Error> {
        refuse::<D>("patience", "the stop now waits for `label_wave.patience`")
    }
    pub fn smoothing<'de, D: Deserializer<'de>>(_: D) -> Result<(), D::Error> {
        refuse::<D>("smoothing", "the metric is no longer smoothed")
    }
    pub fn keep<'de, D: Deserializer<'de>>(_: D) -> Result<(), D::Error> {
        refuse::<D>("keep", "the most accurate candidate check is kept")
    }
    pub fn accuracy_drop<'de, D: Deserializer<'de>>(_: D) -> Result<(), D::Error> {
        refuse::<D>(
            "accuracy_drop",
            "keeping the most accurate check leaves out a collapsed epoch by itself",
        )
    }
    pub fn fallback<'de, D: Deserializer<'de>>(_: D) -> Result<(), D::Error> {
        refuse::<D>("fallback", "Label Wave always decides when to stop")
    }
}

impl Default for StoppingSection {
    fn default() -> Self {
        let r = StoppingRule::default();
        Self {
            metric: r.metric,
            tolerance: r.tolerance,
            label_wave: r.label_wave,
            patience: (),
            smoothing: (),
            keep: (),
            accuracy_drop: (),
            fallback: (),
        }
    }
}

impl From<StoppingSection> for StoppingRule {
    fn from(s: StoppingSection) -> Self {
        Self {
            metric: s.metric,
            tolerance: s.tolerance,
            label_wave: s.label_wave,
        }
    }
}

impl StoppingRule {
    /// Checks the values, naming the first bad key.
    pub fn validate(&self) -> crate::Result<()> {
        self.check().map_err(|e| e.into_error("stopping"))
    }

    pub(crate) fn check(&self) -> Checked {
        Invalid::unit_interval_open("tolerance", self.tolerance)?;
        self.label_wave.check().map_err(|e| e.within("label_wave"))
    }
}

/// Where the prediction changes Label Wave follows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeSource {
    /// The training loop's own predictions, reported with
    /// [`RelianceMonitor::observe`](crate::RelianceMonitor::observe): every training example,
    /// from one epoch to the next.
    Training,
    /// The probe data's unablated predictions, from one check to the next.
    ProbeData,
}

impl ChangeSource {
    /// The name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            ChangeSource::Training => "training",
            ChangeSource::ProbeData => "probe_data",
        }
    }
}

/// Whether a check's network can be judged at all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "what", rename_all = "snake_case")]
pub enum Health {
    /// Finite and not degenerate.
    #[default]
    Healthy,
    /// One predicted class for every sample, or every probed unit silent: a constant network
    /// keeps all of its "decisions" under any ablation, so its metric says nothing. The text
    /// says how.
    Degenerate(String),
    /// A metric, the logits, the activations at a probe or the weights were NaN or infinite.
    /// The text says what.
    NonFinite(String),
}

/// What a check measured, as a stopping strategy sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckSignals {
    /// The configured metric ([`StoppingRule::metric`]): one of the three areas below.
    #[serde(with = "crate::json::float")]
    pub metric: f64,
    /// Area under the ablation curve (accuracy against the labels); NaN where not given.
    #[serde(with = "crate::json::float")]
    pub auc: f64,
    /// That area divided by the unablated accuracy; NaN where not given.
    #[serde(with = "crate::json::float")]
    pub normalized_auc: f64,
    /// Area under the agreement curve; NaN where not given.
    #[serde(with = "crate::json::float")]
    pub agreement_auc: f64,
    /// The network's accuracy on the probe data, nothing ablated.
    #[serde(with = "crate::json::float")]
    pub accuracy: f64,
    /// Probe-data samples whose unablated prediction changed since the previous check; `None`
    /// at the first check.
    #[serde(default, with = "crate::json::option")]
    pub prediction_changes: Option<f64>,
    /// Whether the network is healthy.
    #[serde(default)]
    pub health: Health,
}

impl CheckSignals {
    /// A healthy check with this metric and accuracy, no prediction changes, and the three
    /// areas not given (NaN; see [`CheckSignals::with_areas`]).
    pub fn new(metric: f64, accuracy: f64) -> Self {
        Self {
            metric,
            auc: f64::NAN,
            normalized_auc: f64::NAN,
            agreement_auc: f64::NAN,
            accuracy,
            prediction_changes: None,
            health: Health::Healthy,
        }
    }

    /// Sets the three areas: under the ablation curve, normalized, and under the agreement
    /// curve.
    pub fn with_areas(mut self, auc: f64, normalized_auc: f64, agreement_auc: f64) -> Self {
        (self.auc, self.normalized_auc, self.agreement_auc) = (auc, normalized_auc, agreement_auc);
        self
    }

    /// Sets the probe data's prediction changes since the previous check.
    pub fn with_prediction_changes(mut self, changes: Option<f64>) -> Self {
        self.prediction_changes = changes;
        self
    }

    /// Sets the network's health.
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }
}

/// Everything an epoch produced for a stopping strategy: the argument of
/// [`EarlyStoppingStrategy::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The epoch (from 1, increasing).
    pub epoch: usize,
    /// Training examples whose predicted class changed since the previous epoch, counted by
    /// [`RelianceMonitor::observe`](crate::RelianceMonitor::observe); `None` when the loop
    /// reports no predictions, and at the first epoch it does.
    pub training_changes: Option<f64>,
    /// The check made after this epoch, when the schedule ran one.
    pub check: Option<CheckSignals>,
    /// Whether this is the last epoch of the budget (`schedule.max_epochs`).
    pub budget_end: bool,
}

impl Observation {
    /// An epoch without a check, training changes or budget end.
    pub fn new(epoch: usize) -> Self {
        Self {
            epoch,
            training_changes: None,
            check: None,
            budget_end: false,
        }
    }

    /// Sets the training set's prediction changes.
    pub fn with_training_changes(mut self, changes: Option<f64>) -> Self {
        self.training_changes = changes;
        self
    }

    /// Sets the check.
    pub fn with_check(mut self, check: CheckSignals) -> Self {
        self.check = Some(check);
        self
    }

    /// Marks the last epoch of the budget.
    pub fn at_budget_end(mut self) -> Self {
        self.budget_end = true;
        self
    }
}

/// Why training should stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The moving average of prediction changes has not gone below its lowest point for the
    /// Label Wave patience: the network has started fitting what it could not learn.
    PredictionChangesRose {
        /// Epoch of the lowest moving average (the window's centre).
        lowest_epoch: usize,
        /// That average.
        #[serde(with = "crate::json::float")]
        lowest: f64,
        /// Epochs since that low was known.
        epochs_since: usize,
        /// The epoch kept (restored), when a rule keeps one.
        #[serde(default)]
        kept_epoch: Option<usize>,
        /// The last check on the reliance plateau, when a rule follows one: before the stop
        /// epoch, reliance on single directions had risen too; at it, it had not.
        #[serde(default)]
        plateau_end: Option<usize>,
    },
    /// Every check has been degenerate for `label_wave.patience` epochs: the network predicts
    /// one class for every sample, or every probed unit is silent. A degenerate check is never
    /// kept.
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
    /// A stop decided by a strategy of the user's ([`EarlyStoppingStrategy`]).
    Custom {
        /// What the strategy says.
        message: String,
    },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::PredictionChangesRose {
                lowest_epoch,
                lowest,
                epochs_since,
                kept_epoch,
                plateau_end,
            } => {
                write!(
                    f,
                    "prediction changes rose: no new low for {epochs_since} epochs since \
                     {lowest:.1} at epoch {lowest_epoch}"
                )?;
                if let Some(p) = plateau_end {
                    write!(
                        f,
                        "; the reliance metric was on its plateau until epoch {p}"
                    )?;
                }
                match kept_epoch {
                    Some(k) => write!(f, "; keeping epoch {k}"),
                    None => Ok(()),
                }
            }
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
            StopReason::Custom { message } => f.write_str(message),
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

/// The relative fall of the probe data's accuracy between two consecutive checks beyond which
/// [`Warning::AccuracyUnstable`] is raised. On the benchmark's tuning seeds the largest fall
/// within a run stayed at or under 5.7% except under plain SGD on Fashion-MNIST (8.9% to 67%),
/// the runs where validation stopping does better (docs/results.md).
pub const ACCURACY_SWING: f64 = 0.08;

/// Something a user should know about the signals, raised once per run: logged as a `tracing`
/// warning and recorded in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Warning {
    /// Label Wave's newest low lies at least `label_wave.patience` epochs after the reliance
    /// plateau's last check: the metric left its plateau while prediction changes kept falling,
    /// so on this network it does not follow memorization (it falls while the network still
    /// learns) and no longer marks candidates; the epoch is kept by Label Wave's lows and the
    /// probe data's accuracy.
    RelianceUninformative {
        /// The epoch of the check.
        epoch: usize,
        /// The last check on the reliance plateau.
        plateau_end: usize,
        /// The epoch of Label Wave's newest low, after the plateau.
        lowest_epoch: usize,
    },
    /// The epoch budget ended before prediction changes rose: the network may still have been
    /// learning. The most accurate candidate is kept; a larger budget may find a better epoch.
    NoRiseWithinBudget {
        /// The last epoch of the budget.
        epoch: usize,
    },
    /// The network's accuracy on the probe data fell by more than [`ACCURACY_SWING`] of its
    /// value from one check to the next: its epochs swing (plain SGD at a high learning rate),
    /// the test accuracy with them, and the kept epoch — the most accurate candidate on
    /// training data — may lie well below the best one; a held-out validation set chooses
    /// better among such epochs.
    AccuracyUnstable {
        /// The epoch of the check.
        epoch: usize,
        /// Its accuracy on the probe data (unablated).
        accuracy: f64,
        /// The epoch of the check before.
        previous_epoch: usize,
        /// Its accuracy.
        previous_accuracy: f64,
    },
    /// A warning of a strategy of the user's.
    Custom {
        /// What the strategy says.
        message: String,
    },
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::RelianceUninformative {
                epoch,
                plateau_end,
                lowest_epoch,
            } => write!(
                f,
                "at epoch {epoch}: the reliance metric has been below its plateau since epoch \
                 {plateau_end} while prediction changes kept falling (a new low at epoch \
                 {lowest_epoch}); on this network it does not follow memorization, so the epoch \
                 is kept by Label Wave and the probe data's accuracy"
            ),
            Warning::NoRiseWithinBudget { epoch } => write!(
                f,
                "the budget ended at epoch {epoch} before prediction changes rose: the network \
                 may still have been learning; keeping the most accurate candidate, a larger \
                 budget may find a better epoch"
            ),
            Warning::AccuracyUnstable {
                epoch,
                accuracy,
                previous_epoch,
                previous_accuracy,
            } => write!(
                f,
                "at epoch {epoch}: the accuracy on the probe data fell from {previous_accuracy:.3} \
                 (epoch {previous_epoch}) to {accuracy:.3}, by more than {:.0}%: the network's \
                 epochs swing, and the most accurate one on training data may be well below the \
                 best; a held-out validation set would choose better among them",
                ACCURACY_SWING * 100.0
            ),
            Warning::Custom { message } => f.write_str(message),
        }
    }
}

/// A rule that decides, epoch by epoch, when to stop and which epoch to keep. The monitor runs
/// the built-in [`EarlyStopping`] unless given another with
/// [`RelianceMonitor::with_strategy`](crate::RelianceMonitor::with_strategy).
///
/// The monitor calls [`step`](Self::step) once per epoch reported to it, then snapshots the
/// weights when [`kept_epoch`](Self::kept_epoch) names that epoch. The kept epoch may only change
/// to the epoch just stepped, or to one of the last [`lookback`](Self::lookback) check epochs
/// (whose weights the monitor holds); another change is an error.
///
/// A rule in the manner of Lightning's `EarlyStopping`, on the raw ablation AUC: stop once it has
/// not improved by `min_delta` for `patience` checks, keep the best check.
///
/// ```
/// use candle_reliance::monitor::{
///     CheckSignals, Decision, EarlyStoppingStrategy, Health, Observation, StopReason,
/// };
///
/// struct AucPatience {
///     min_delta: f64,
///     patience: usize,
///     best: Option<(usize, f64)>,
///     waited: usize,
/// }
///
/// impl EarlyStoppingStrategy for AucPatience {
///     fn step(&mut self, obs: &Observation) -> Decision {
///         let Some(check) = &obs.check else { return Decision::Continue };
///         if let Health::NonFinite(what) = &check.health {
///             let reason = StopReason::NonFinite { epoch: obs.epoch, what: what.clone() };
///             return Decision::Stop { reason };
///         }
///         match self.best {
///             Some((_, best)) if check.auc < best + self.min_delta => self.waited += 1,
///             _ => (self.best, self.waited) = (Some((obs.epoch, check.auc)), 0),
///         }
///         if self.waited >= self.patience {
///             let message = format!("the AUC has not improved for {} checks", self.waited);
///             return Decision::Stop { reason: StopReason::Custom { message } };
///         }
///         Decision::Continue
///     }
///
///     fn kept_epoch(&self) -> Option<usize> {
///         self.best.map(|(epoch, _)| epoch)
///     }
/// }
///
/// let mut rule = AucPatience { min_delta: 0.01, patience: 2, best: None, waited: 0 };
/// let aucs = [0.50, 0.60, 0.605, 0.55];
/// let mut decisions = vec![];
/// for (i, auc) in aucs.iter().enumerate() {
///     let check = CheckSignals::new(*auc, 0.9).with_areas(*auc, f64::NAN, f64::NAN);
///     decisions.push(rule.step(&Observation::new(i + 1).with_check(check)).is_stop());
/// }
/// // 0.605 does not beat 0.60 by 0.01, nor does 0.55: two checks without improvement.
/// assert_eq!(decisions, [false, false, false, true]);
/// assert_eq!(rule.kept_epoch(), Some(2));
/// // In a training loop: `monitor.with_strategy(Box::new(rule))?`.
/// ```
pub trait EarlyStoppingStrategy: Send {
    /// Decides after one epoch. After a stop, every later step repeats it.
    fn step(&mut self, observation: &Observation) -> Decision;

    /// The epoch whose weights should be restored, if any.
    fn kept_epoch(&self) -> Option<usize>;

    /// How many epochs before the one just stepped the kept epoch may move back to (0 by
    /// default): the monitor holds the weights of that many recent check epochs.
    fn lookback(&self) -> usize {
        0
    }

    /// Warnings raised since the last call (the monitor logs them and records them in the
    /// history). None by default.
    fn take_warnings(&mut self) -> Vec<Warning> {
        Vec::new()
    }

    /// The state to save for resuming, or `None` if the strategy cannot resume (the default).
    fn save_state(&self) -> Option<serde_json::Value> {
        None
    }

    /// Continues from a state written by [`save_state`](Self::save_state).
    fn load_state(&mut self, state: serde_json::Value) -> crate::Result<()> {
        let _ = state;
        crate::error::bail!(
            Resume,
            "this stopping strategy cannot resume from a saved state"
        )
    }
}

/// A check's epoch, its metric and its unablated accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// The epoch.
    pub epoch: usize,
    /// The metric there.
    #[serde(with = "crate::json::float")]
    pub metric: f64,
    /// The network's accuracy on the probe data, unablated.
    #[serde(with = "crate::json::float")]
    pub accuracy: f64,
}

/// Everything [`EarlyStopping`] remembers; serialize it to resume with identical decisions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoppingState {
    /// The epoch of the last step.
    pub last_epoch: Option<usize>,
    /// Set once a stop was decided; later steps repeat it.
    pub stopped: Option<StopReason>,
    /// The check with the highest metric so far.
    pub peak: Option<Best>,
    /// The last check on the plateau.
    pub plateau_end: Option<usize>,
    /// The candidate kept so far: the most accurate one.
    pub kept: Option<Best>,
    /// Where Label Wave's prediction changes come from, fixed by the first count fed.
    pub source: Option<ChangeSource>,
    /// Label Wave over those changes.
    pub wave: LabelWaveState,
    /// The healthy checks of the last `label_wave.window / 2` epochs: a new lowest window makes
    /// its centre, found that many epochs later, a candidate.
    pub recent: Vec<Best>,
    /// The first epoch of the current run of degenerate checks.
    pub degenerate_since: Option<usize>,
    /// The epoch and probe-data accuracy of the last finite check, for
    /// [`Warning::AccuracyUnstable`].
    #[serde(default)]
    pub last_accuracy: Option<(usize, f64)>,
    /// Warnings raised so far (each kind once per run).
    pub warned: Vec<Warning>,
    /// Warnings raised since [`EarlyStoppingStrategy::take_warnings`] was last called.
    #[serde(skip)]
    pub pending_warnings: Vec<Warning>,
}

/// The built-in stopping rule.
///
/// The stopping rule, as one state machine: [`EarlyStopping::step`] takes what an epoch produced
/// (an [`Observation`]) and returns a [`Decision`].
///
/// Two signals, measured on training data only, each answering its own question:
///
/// - **When to stop: [Label Wave](crate::monitor::LabelWave)** over prediction changes. The
///   number of training examples whose predicted class changes from one epoch to the next falls
///   while a network learns and rises once it starts fitting wrong labels; the rule stops when
///   its moving average has found no new low for `label_wave.patience` epochs. The changes come
///   from the training loop's own predictions when the loop reports them
///   ([`RelianceMonitor::observe`](crate::RelianceMonitor::observe)), otherwise from the probe
///   data's predictions at each check.
/// - **Which epoch to keep: the reliance plateau and the probe data's accuracy.** A check is a
///   *candidate* while the reliance metric is on its plateau (within `tolerance` of its peak: the
///   network does not yet rely more on single directions than it did at its best), when it is
///   the centre of a new lowest Label Wave window (found `window / 2` epochs later: the monitor
///   holds those epochs' weights), or while Label Wave has no low yet. The candidate whose
///   network is most accurate on the probe data (unablated) is kept and restored, the later
///   among equals.
///
/// The precedence of every case is the table in `docs/configuration.md` ("The stopping rule,
/// step by step"); `tests/stopping.rs` checks it row by row.
///
/// ```
/// use candle_reliance::monitor::{
///     CheckSignals, EarlyStopping, LabelWaveRule, Observation, StoppingRule,
/// };
///
/// let mut rule = EarlyStopping::new(StoppingRule {
///     tolerance: 0.05,
///     label_wave: LabelWaveRule { window: 1, patience: 2 },
///     ..Default::default()
/// });
/// // Epoch, reliance metric, accuracy on the probe data, training-set prediction changes.
/// let epochs = [
///     (1, 0.50, 0.60, None),
///     (2, 0.60, 0.70, Some(300.0)),
///     (3, 0.59, 0.75, Some(200.0)),  // on the plateau (≥ 0.57), the most accurate so far
///     (4, 0.50, 0.80, Some(250.0)),  // below the plateau, no new low: not a candidate
///     (5, 0.45, 0.85, Some(260.0)),  // two epochs without a new low: stop
/// ];
/// let mut stopped_at = None;
/// for (epoch, metric, accuracy, changes) in epochs {
///     let obs = Observation::new(epoch)
///         .with_training_changes(changes)
///         .with_check(CheckSignals::new(metric, accuracy));
///     if rule.step(&obs).is_stop() {
///         stopped_at = Some(epoch);
///         break;
///     }
/// }
/// assert_eq!(stopped_at, Some(5));
/// assert_eq!(rule.kept_epoch(), Some(3));
/// ```
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

    /// The epoch kept so far: the most accurate candidate check.
    pub fn kept_epoch(&self) -> Option<usize> {
        self.state.kept.as_ref().map(|b| b.epoch)
    }

    /// Feeds prediction changes to Label Wave if they come from the source it follows (the
    /// first source fed); returns whether the epoch ends a new lowest window.
    fn feed(&mut self, epoch: usize, changes: f64, source: ChangeSource) -> bool {
        if !changes.is_finite() || *self.state.source.get_or_insert(source) != source {
            return false;
        }
        let mut wave = LabelWave::with_state(
            self.rule.label_wave.clone(),
            std::mem::take(&mut self.state.wave),
        );
        let before = wave.state().lowest;
        wave.update(epoch, changes);
        self.state.wave = wave.state().clone();
        self.state.wave.lowest != before
    }

    fn stop(&mut self, reason: StopReason) -> Decision {
        self.state.stopped = Some(reason.clone());
        Decision::Stop { reason }
    }

    fn warn(&mut self, w: Warning) {
        let same = |a: &Warning| std::mem::discriminant(a) == std::mem::discriminant(&w);
        if !self.state.warned.iter().any(same) {
            self.state.warned.push(w.clone());
            self.state.pending_warnings.push(w);
        }
    }

    /// A healthy check: the plateau and the candidate (rows 5–6 of the table).
    fn judge(&mut self, epoch: usize, check: &CheckSignals) {
        let here = Best {
            epoch,
            metric: check.metric,
            accuracy: check.accuracy,
        };
        if self
            .state
            .peak
            .as_ref()
            .is_none_or(|p| here.metric > p.metric)
        {
            self.state.peak = Some(here.clone());
        }
        let peak = self.state.peak.as_ref().expect("set above").metric;
        let on_plateau = here.metric >= peak - self.rule.tolerance * peak.abs();
        if on_plateau {
            self.state.plateau_end = Some(epoch);
        }
        if on_plateau || self.state.wave.lowest.is_none() {
            self.consider(here.clone());
        }
        // Kept for the window's centre: Label Wave finds a low `window / 2` epochs after it.
        let h = self.rule.label_wave.window / 2;
        self.state.recent.retain(|b| b.epoch + h >= epoch);
        self.state.recent.push(here);
        // The metric left its plateau `patience` epochs before Label Wave's newest low: the two
        // disagree about when memorization starts.
        if let (Some(end), Some((low, _))) = (self.state.plateau_end, self.state.wave.lowest) {
            if low >= end + self.rule.label_wave.patience {
                self.warn(Warning::RelianceUninformative {
                    epoch,
                    plateau_end: end,
                    lowest_epoch: low,
                });
            }
        }
    }

    /// Warns when the probe data's accuracy fell by more than [`ACCURACY_SWING`] since the last
    /// finite check.
    fn swing(&mut self, epoch: usize, accuracy: f64) {
        if let Some((previous_epoch, previous_accuracy)) = self.state.last_accuracy {
            if accuracy < previous_accuracy * (1.0 - ACCURACY_SWING) {
                self.warn(Warning::AccuracyUnstable {
                    epoch,
                    accuracy,
                    previous_epoch,
                    previous_accuracy,
                });
            }
        }
        self.state.last_accuracy = Some((epoch, accuracy));
    }

    /// A candidate: kept if at least as accurate as the kept one, the later among equals.
    fn consider(&mut self, c: Best) {
        let better = self.state.kept.as_ref().is_none_or(|k| {
            c.accuracy > k.accuracy || (c.accuracy == k.accuracy && c.epoch >= k.epoch)
        });
        if better {
            self.state.kept = Some(c);
        }
    }

    /// Decides after one epoch; see [`EarlyStopping`] and the table in
    /// `docs/configuration.md`. An epoch not after the last one stepped is ignored (the last
    /// decision is returned).
    pub fn step(&mut self, obs: &Observation) -> Decision {
        // Row 1: a stop is final.
        if let Some(reason) = &self.state.stopped {
            return Decision::Stop {
                reason: reason.clone(),
            };
        }
        // Row 2: an epoch not after the last one is ignored.
        let epoch = obs.epoch;
        if self.state.last_epoch.is_some_and(|last| epoch <= last) {
            return Decision::Continue;
        }
        self.state.last_epoch = Some(epoch);
        // Row 3: the training set's changes feed Label Wave.
        let mut new_low = obs
            .training_changes
            .is_some_and(|n| self.feed(epoch, n, ChangeSource::Training));
        if let Some(check) = &obs.check {
            if !matches!(check.health, Health::NonFinite(_)) {
                self.swing(epoch, check.accuracy);
            }
            match &check.health {
                // Row 4: a non-finite network stops at once; its epoch is never kept.
                Health::NonFinite(what) => {
                    return self.stop(StopReason::NonFinite {
                        epoch,
                        what: what.clone(),
                    })
                }
                // Row 5: a degenerate check is never a candidate; a run of them as long as the
                // patience stops.
                Health::Degenerate(what) => {
                    let since = *self.state.degenerate_since.get_or_insert(epoch);
                    if epoch - since >= self.rule.label_wave.patience {
                        return self.stop(StopReason::Collapsed {
                            epoch,
                            what: what.clone(),
                            kept_epoch: self.kept_epoch(),
                        });
                    }
                }
                // Row 6: the probe data's changes feed Label Wave (when it follows them); the
                // plateau and the candidates.
                Health::Healthy => {
                    self.state.degenerate_since = None;
                    if let Some(n) = check.prediction_changes {
                        new_low |= self.feed(epoch, n, ChangeSource::ProbeData);
                    }
                    self.judge(epoch, check);
                }
            }
        }
        // Row 6: a new lowest Label Wave window makes its centre a candidate, if that epoch
        // had a healthy check.
        if new_low {
            let centre = self.state.wave.lowest.map(|(e, _)| e);
            if let Some(c) = self.state.recent.iter().find(|b| Some(b.epoch) == centre) {
                self.consider(c.clone());
            }
        }
        // Row 7: Label Wave found no new low for its patience.
        if let (Some(_), Some((lowest_epoch, lowest))) =
            (&self.state.wave.stopped, self.state.wave.lowest)
        {
            let h = self.rule.label_wave.window / 2;
            return self.stop(StopReason::PredictionChangesRose {
                lowest_epoch,
                lowest,
                epochs_since: epoch.saturating_sub(lowest_epoch + h),
                kept_epoch: self.kept_epoch(),
                plateau_end: self.state.plateau_end,
            });
        }
        // Row 8: the budget is spent.
        if obs.budget_end {
            self.warn(Warning::NoRiseWithinBudget { epoch });
            return self.stop(StopReason::MaxEpochs { epoch });
        }
        Decision::Continue
    }
}

impl EarlyStoppingStrategy for EarlyStopping {
    fn step(&mut self, observation: &Observation) -> Decision {
        EarlyStopping::step(self, observation)
    }

    fn kept_epoch(&self) -> Option<usize> {
        EarlyStopping::kept_epoch(self)
    }

    fn take_warnings(&mut self) -> Vec<Warning> {
        std::mem::take(&mut self.state.pending_warnings)
    }

    /// The window's centre: `label_wave.window / 2` epochs back.
    fn lookback(&self) -> usize {
        self.rule.label_wave.window / 2
    }

    fn save_state(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.state).ok()
    }

    fn load_state(&mut self, state: serde_json::Value) -> crate::Result<()> {
        self.state = serde_json::from_value(state)
            .map_err(|e| crate::error::fail!(Resume, "the stopping rule's saved state: {e}"))?;
        Ok(())
    }
}
