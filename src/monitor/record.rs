//! What a check leaves behind: one record per check, appended as a JSON line to the history
//! file.

use crate::curves::{AblationCurve, NoiseCurve};
use crate::error::Error;
use crate::monitor::{Decision, Metric, Warning};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One check of the monitor: one line of the history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// Epoch after which the check ran.
    pub epoch: usize,
    /// The metric the stopping rule follows.
    pub metric: Metric,
    /// Its value at this check.
    #[serde(with = "crate::json::float")]
    pub value: f64,
    /// Ablation AUC (mean over orders).
    #[serde(with = "crate::json::float")]
    pub auc: f64,
    /// 95% interval of `auc` over orders.
    pub auc_ci: Option<[f64; 2]>,
    /// AUC divided by the unablated accuracy.
    #[serde(with = "crate::json::float")]
    pub normalized_auc: f64,
    /// Training-subset accuracy with nothing ablated.
    #[serde(with = "crate::json::float")]
    pub unablated_accuracy: f64,
    /// Noise-curve AUC, when the noise curve is configured.
    #[serde(with = "crate::json::option")]
    pub noise_auc: Option<f64>,
    /// Probe-data samples whose unablated prediction changed since the previous check (what
    /// Label Wave follows when the training loop reports no predictions); `None` at the first
    /// check.
    #[serde(default)]
    pub prediction_changes: Option<usize>,
    /// Training examples whose predicted class changed since the previous epoch, from
    /// [`RelianceMonitor::observe`](crate::RelianceMonitor::observe) (what Label Wave follows
    /// when given); `None` without it.
    #[serde(default)]
    pub training_changes: Option<usize>,
    /// Whether this check's epoch is the one the rule keeps now (its weights were snapshotted).
    pub kept: bool,
    /// The epoch the rule keeps after this check.
    #[serde(default)]
    pub kept_epoch: Option<usize>,
    /// Warnings the rule raised at this check (each is also logged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
    /// What the monitor decided: `"decision": "continue"`, or `"stop"` with its `reason`.
    #[serde(flatten)]
    pub decision: Decision,
    /// Seconds the check took.
    pub seconds: f64,
    /// The full ablation curve.
    pub curve: AblationCurve,
    /// The full noise curve, when configured.
    pub noise: Option<NoiseCurve>,
    /// Mean class selectivity per probe (in the order the probes were added), when
    /// `selectivity` is on.
    #[serde(default)]
    pub selectivity: Option<Vec<f64>>,
    /// How the network was degenerate at this check (one predicted class, or every probed unit
    /// silent), when it was: such a check is never kept.
    #[serde(default)]
    pub degenerate: Option<String>,
}

/// Reads a history file written by the monitor (one [`CheckRecord`] per line); errors name the
/// file and the line.
pub fn read_history(path: impl AsRef<Path>) -> Result<Vec<CheckRecord>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read history", path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                Error::file(
                    path,
                    format!("history {} line {}: {e}", path.display(), i + 1),
                )
            })
        })
        .collect()
}
