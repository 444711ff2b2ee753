//! The monitor's configuration, read from YAML. Every key has a default, so an empty file is a
//! valid configuration; unknown keys and invalid values are errors that name the key and, where
//! the parser knows it, the line. `docs/configuration.md` documents every key.
//!
//! ```
//! use candle_reliance::RelianceConfig;
//!
//! let cfg = RelianceConfig::from_yaml_str("stopping:\n  patience: 5\n")?;
//! assert_eq!(cfg.stopping.patience, 5);
//! assert_eq!(cfg.schedule.check_every, 1); // default
//!
//! let err = RelianceConfig::from_yaml_str("stopping:\n  patience: 0\n").unwrap_err();
//! assert!(err.to_string().contains("stopping.patience"), "{err}");
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::ablation::{
    check_fractions, evenly_spaced_fractions, AblationOrder, AblationSpec, Clamp,
};
use crate::noise::{check_scales, log_spaced, NoiseSpec};
use crate::stopping::{Metric, StoppingRule};
use candle_core::Result;
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

/// The whole monitor configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelianceConfig {
    /// When checks run.
    #[serde(deserialize_with = "section")]
    pub schedule: ScheduleConfig,
    /// Which training samples a check uses.
    #[serde(deserialize_with = "section")]
    pub data: DataConfig,
    /// The ablation curve.
    #[serde(deserialize_with = "section")]
    pub ablation: AblationConfig,
    /// The optional noise curve.
    #[serde(deserialize_with = "section")]
    pub noise: NoiseConfig,
    /// The stopping rule.
    #[serde(deserialize_with = "section")]
    pub stopping: StoppingConfig,
    /// Putting the best epoch's weights back.
    #[serde(deserialize_with = "section")]
    pub restore_best: RestoreBestConfig,
    /// Files written.
    #[serde(deserialize_with = "section")]
    pub output: OutputConfig,
}

/// `schedule:` — when checks run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Check every this many epochs (≥ 1). Default 1.
    #[serde(deserialize_with = "check_every_key")]
    pub check_every: usize,
    /// No checks before this epoch (epochs count from 1). Default 2.
    pub warmup_epochs: usize,
    /// Stop at this epoch whatever the metric (≥ 1); default none.
    #[serde(deserialize_with = "max_epochs_key")]
    pub max_epochs: Option<usize>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            check_every: 1,
            warmup_epochs: 2,
            max_epochs: None,
        }
    }
}

impl ScheduleConfig {
    /// Whether a check runs after `epoch`.
    pub fn is_check_epoch(&self, epoch: usize) -> bool {
        epoch >= self.warmup_epochs.max(1)
            && (epoch - self.warmup_epochs.max(1)) % self.check_every == 0
    }
}

/// `data:` — the fixed training subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Samples drawn (once, fixed) from the data given to the monitor (≥ 1). Default 1000.
    #[serde(deserialize_with = "subset_size_key")]
    pub subset_size: usize,
    /// Seed of the subset draw. Default 0.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            subset_size: 1000,
            seed: 0,
        }
    }
}

/// `ablation:` — the cumulative ablation curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AblationConfig {
    /// Evenly spaced fractions `0, 1/(levels−1), …, 1` (≥ 2). Default 17.
    #[serde(deserialize_with = "levels_key")]
    pub levels: usize,
    /// Explicit fractions (strictly increasing, in [0, 1]); overrides `levels`.
    #[serde(deserialize_with = "fractions_key")]
    pub fractions: Option<Vec<f64>>,
    /// `zero` or `mean`. Default `zero`.
    pub clamp: Clamp,
    /// Random orders (≥ 1). Default 3.
    #[serde(deserialize_with = "repeats_key")]
    pub repeats: usize,
    /// Seed of the orders; fixed across checks. Default 0.
    pub seed: u64,
    /// Samples per forward of the statistics pass (≥ 1). Default 512.
    #[serde(deserialize_with = "batch_size_key")]
    pub batch_size: usize,
    /// Most rows (levels × samples) in one expanded forward (≥ 1). Default `None`: chosen from
    /// the device and the widest activation ([`crate::auto_batch_rows`]).
    #[serde(deserialize_with = "max_batch_rows_key")]
    pub max_batch_rows: Option<usize>,
    /// Also record and log the mean class selectivity per probe at each check, computed from
    /// the statistics pass the curve already makes (no extra forward). Default false.
    pub selectivity: bool,
}

impl Default for AblationConfig {
    fn default() -> Self {
        Self {
            levels: 17,
            fractions: None,
            clamp: Clamp::Zero,
            repeats: 3,
            seed: 0,
            batch_size: 512,
            max_batch_rows: None,
            selectivity: false,
        }
    }
}

impl AblationConfig {
    /// The [`AblationSpec`] this configures.
    pub fn spec(&self) -> AblationSpec {
        AblationSpec {
            fractions: self
                .fractions
                .clone()
                .unwrap_or_else(|| evenly_spaced_fractions(self.levels)),
            clamp: self.clamp,
            order: AblationOrder::Random {
                repeats: self.repeats,
                seed: self.seed,
            },
            batch_size: self.batch_size,
            max_batch_rows: self.max_batch_rows,
            batched: true,
        }
    }
}

/// `noise:` — the noise curve, recorded alongside the ablation curve when enabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseConfig {
    /// Measure the noise curve at each check. Default false.
    pub enabled: bool,
    /// Explicit scales (positive, strictly increasing); default 11 log-spaced `10^-1.5 … 10^1`.
    #[serde(deserialize_with = "scales_key")]
    pub scales: Option<Vec<f64>>,
    /// Independent draws (≥ 1). Default 2.
    #[serde(deserialize_with = "repeats_key")]
    pub repeats: usize,
    /// Seed. Default 0.
    pub seed: u64,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            scales: None,
            repeats: 2,
            seed: 0,
        }
    }
}

impl NoiseConfig {
    /// The [`NoiseSpec`] this configures, with the ablation's batching settings.
    pub fn spec(&self, ablation: &AblationConfig) -> NoiseSpec {
        NoiseSpec {
            scales: self
                .scales
                .clone()
                .unwrap_or_else(|| log_spaced(-1.5, 1.0, 11)),
            repeats: self.repeats,
            seed: self.seed,
            batch_size: ablation.batch_size,
            max_batch_rows: ablation.max_batch_rows,
            batched: true,
        }
    }
}

/// `stopping:` — the stopping rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoppingConfig {
    /// `auc` or `normalized_auc`. Default `normalized_auc`.
    pub metric: Metric,
    /// Checks without improvement before stopping (≥ 1). Default 3.
    #[serde(deserialize_with = "patience_key")]
    pub patience: usize,
    /// Required improvement over the best (≥ 0). Default 0.
    #[serde(deserialize_with = "min_delta_key")]
    pub min_delta: f64,
    /// Exponential smoothing weight of the past, in [0, 1). Default 0 (off).
    #[serde(deserialize_with = "smoothing_key")]
    pub smoothing: f64,
}

impl Default for StoppingConfig {
    fn default() -> Self {
        let r = StoppingRule::default();
        Self {
            metric: Metric::default(),
            patience: r.patience,
            min_delta: r.min_delta,
            smoothing: r.smoothing,
        }
    }
}

impl StoppingConfig {
    /// The [`StoppingRule`] this configures.
    pub fn rule(&self) -> StoppingRule {
        StoppingRule {
            patience: self.patience,
            min_delta: self.min_delta,
            smoothing: self.smoothing,
        }
    }
}

/// Where the best epoch's weights are kept until they are restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// A copy of every variable in memory (fast; lost if the process dies).
    #[default]
    Memory,
    /// A safetensors file at `restore_best.path` (survives interruption and resume).
    Disk,
}

/// `restore_best:` — putting the best epoch's weights back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestoreBestConfig {
    /// Snapshot the weights at each new peak and restore them when training ends. Default true.
    pub enabled: bool,
    /// `memory` or `disk`. Default `memory`.
    pub mode: SnapshotMode,
    /// File for `mode: disk`. Default `reliance-best.safetensors`.
    #[serde(deserialize_with = "path_key")]
    pub path: PathBuf,
}

impl Default for RestoreBestConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: SnapshotMode::Memory,
            path: PathBuf::from("reliance-best.safetensors"),
        }
    }
}

/// `output:` — files the monitor writes. Existing files are never overwritten by a fresh run:
/// they are moved aside to `NAME.N.bak` first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// JSON lines, one per check (epoch, metric, AUC, interval, curve). Default none.
    #[serde(deserialize_with = "history_file_key")]
    pub history_file: Option<PathBuf>,
    /// The monitor state, rewritten after every epoch reported to the monitor, for resuming.
    /// Default none.
    #[serde(deserialize_with = "state_file_key")]
    pub state_file: Option<PathBuf>,
}

impl RelianceConfig {
    /// Parses YAML text; an empty document gives the defaults.
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        let err = |e: serde_norway::Error| {
            candle_core::Error::Msg(format!(
                "reliance config: {}",
                locate_key_error(&e.to_string(), text)
            ))
        };
        // A file of comments only is an empty document, which a struct cannot be read from.
        let empty = matches!(
            serde_norway::from_str(text).map_err(err)?,
            serde_norway::Value::Null
        );
        let cfg: Self = if empty {
            Self::default()
        } else {
            serde_norway::from_str(text).map_err(err)?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a YAML file; errors name the file.
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            candle_core::Error::Msg(format!(
                "reliance config: cannot read {}: {e}",
                path.display()
            ))
        })?;
        Self::from_yaml_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{} ({})", e, path.display())))
    }

    /// The configuration as YAML.
    pub fn to_yaml_string(&self) -> Result<String> {
        serde_norway::to_string(self).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// Checks every value, naming the first bad key. Parsing already runs the per-key checks;
    /// this repeats them for configurations built in code and adds the checks across keys.
    pub fn validate(&self) -> Result<()> {
        let e = |key: &str, msg: String| {
            Err(candle_core::Error::Msg(format!(
                "reliance config: {key}: {msg}"
            )))
        };
        let checks: [(&str, std::result::Result<(), String>); 12] = [
            (
                "schedule.check_every",
                check_at_least(self.schedule.check_every, 1),
            ),
            (
                "schedule.max_epochs",
                self.schedule
                    .max_epochs
                    .map_or(Ok(()), |v| check_at_least(v, 1)),
            ),
            ("data.subset_size", check_at_least(self.data.subset_size, 1)),
            ("ablation.levels", check_at_least(self.ablation.levels, 2)),
            (
                "ablation.fractions",
                self.ablation
                    .fractions
                    .as_deref()
                    .map_or(Ok(()), check_fractions),
            ),
            ("ablation.repeats", check_at_least(self.ablation.repeats, 1)),
            (
                "ablation.batch_size",
                check_at_least(self.ablation.batch_size, 1),
            ),
            (
                "ablation.max_batch_rows",
                self.ablation
                    .max_batch_rows
                    .map_or(Ok(()), |v| check_at_least(v, 1)),
            ),
            (
                "noise.scales",
                self.noise.scales.as_deref().map_or(Ok(()), check_scales),
            ),
            ("noise.repeats", check_at_least(self.noise.repeats, 1)),
            (
                "stopping.patience",
                check_at_least(self.stopping.patience, 1),
            ),
            (
                "stopping.min_delta",
                check_non_negative(self.stopping.min_delta),
            ),
        ];
        for (key, r) in checks {
            if let Err(msg) = r {
                return e(key, msg);
            }
        }
        if let Err(msg) = check_unit_interval_open(self.stopping.smoothing) {
            return e("stopping.smoothing", msg);
        }
        let paths = [
            ("restore_best.path", Some(&self.restore_best.path)),
            ("output.history_file", self.output.history_file.as_ref()),
            ("output.state_file", self.output.state_file.as_ref()),
        ];
        for (key, path) in paths {
            if let Some(Err(msg)) = path.map(|p| check_path(p)) {
                return e(key, msg);
            }
        }
        Ok(())
    }
}

fn check_at_least(v: usize, min: usize) -> std::result::Result<(), String> {
    if v < min {
        Err(format!("must be at least {min}, got {v}"))
    } else {
        Ok(())
    }
}

fn check_non_negative(v: f64) -> std::result::Result<(), String> {
    if !(v.is_finite() && v >= 0.0) {
        Err(format!("must be a finite number ≥ 0, got {v}"))
    } else {
        Ok(())
    }
}

fn check_unit_interval_open(v: f64) -> std::result::Result<(), String> {
    if !(0.0..1.0).contains(&v) {
        Err(format!("must be in [0, 1), got {v}"))
    } else {
        Ok(())
    }
}

fn check_path(p: &Path) -> std::result::Result<(), String> {
    if p.as_os_str().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}

// Checks run while parsing, so that the parser's error carries the key path and line.

fn checked<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    check: impl FnOnce(&T) -> std::result::Result<(), String>,
) -> std::result::Result<T, D::Error> {
    let v = T::deserialize(d)?;
    check(&v).map_err(serde::de::Error::custom)?;
    Ok(v)
}

/// A section header with nothing under it (`noise:` with every key commented out) reads as null:
/// treat it as the section's defaults.
fn section<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Range errors raised by the checked keys come back from the parser as
/// `section: key: message at line L column C`, where the position is the section's first key.
/// Rewrite them as `section.key: message at line L'` with the line of the key itself.
fn locate_key_error(msg: &str, text: &str) -> String {
    let body = msg.rfind(" at line ").map_or(msg, |i| &msg[..i]);
    let parts = body
        .split_once(": ")
        .and_then(|(sec, rest)| rest.split_once(": ").map(|(key, m)| (sec, key, m)));
    let is_name =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    match parts {
        Some((sec, key, m)) if is_name(sec) && is_name(key) => match key_line(text, sec, key) {
            Some(line) => format!("{sec}.{key}: {m} at line {line}"),
            None => format!("{sec}.{key}: {m}"),
        },
        _ => msg.to_string(),
    }
}

/// 1-based line of `key` inside top-level `section` (block or flow style).
fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(&format!("{section}:")))?;
    let pattern = format!("{key}:");
    for (i, line) in lines.iter().enumerate().skip(start) {
        if i > start && !line.is_empty() && !line.starts_with([' ', '\t', '#']) {
            break; // the next top-level section
        }
        let code = line.split(" #").next().unwrap_or(line);
        let found = code.match_indices(&pattern).any(|(at, _)| {
            at == 0 || matches!(code.as_bytes()[at - 1], b' ' | b'\t' | b'{' | b',')
        });
        if found {
            return Some(i + 1);
        }
    }
    None
}

/// One deserializer per checked key, so that the message names the key; the parser adds the
/// section and the line.
macro_rules! checked_key {
    ($fn:ident, $key:literal, $t:ty, $check:expr) => {
        fn $fn<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<$t, D::Error> {
            checked(d, |v: &$t| $check(v).map_err(|m| format!("{}: {m}", $key)))
        }
    };
}

checked_key!(check_every_key, "check_every", usize, |v: &usize| {
    check_at_least(*v, 1)
});
checked_key!(max_epochs_key, "max_epochs", Option<usize>, |v: &Option<
    usize,
>| v
    .map_or(Ok(()), |v| check_at_least(v, 1)));
checked_key!(subset_size_key, "subset_size", usize, |v: &usize| {
    check_at_least(*v, 1)
});
checked_key!(levels_key, "levels", usize, |v: &usize| check_at_least(
    *v, 2
));
checked_key!(
    fractions_key,
    "fractions",
    Option<Vec<f64>>,
    |v: &Option<Vec<f64>>| v.as_deref().map_or(Ok(()), check_fractions)
);
checked_key!(repeats_key, "repeats", usize, |v: &usize| check_at_least(
    *v, 1
));
checked_key!(batch_size_key, "batch_size", usize, |v: &usize| {
    check_at_least(*v, 1)
});
checked_key!(
    max_batch_rows_key,
    "max_batch_rows",
    Option<usize>,
    |v: &Option<usize>| v.map_or(Ok(()), |v| check_at_least(v, 1))
);
checked_key!(scales_key, "scales", Option<Vec<f64>>, |v: &Option<
    Vec<f64>,
>| v
    .as_deref()
    .map_or(Ok(()), check_scales));
checked_key!(patience_key, "patience", usize, |v: &usize| check_at_least(
    *v, 1
));
checked_key!(min_delta_key, "min_delta", f64, |v: &f64| {
    check_non_negative(*v)
});
checked_key!(smoothing_key, "smoothing", f64, |v: &f64| {
    check_unit_interval_open(*v)
});
checked_key!(path_key, "path", PathBuf, |v: &PathBuf| check_path(v));
checked_key!(
    history_file_key,
    "history_file",
    Option<PathBuf>,
    |v: &Option<PathBuf>| v.as_deref().map_or(Ok(()), check_path)
);
checked_key!(
    state_file_key,
    "state_file",
    Option<PathBuf>,
    |v: &Option<PathBuf>| v.as_deref().map_or(Ok(()), check_path)
);
