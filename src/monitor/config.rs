//! The monitor's configuration, read from YAML. Every key has a default, so an empty file is a
//! valid configuration; unknown keys and invalid values are errors that name the key and, where
//! the parser knows it, the line. The sections that describe a measurement are the measurement's
//! own types ([`Batching`], [`AblationSpec`], [`NoiseSpec`], [`StoppingRule`]); each value is
//! checked once, after parsing, by the same code that checks a configuration built in code.
//! `docs/configuration.md` documents every key.
//!
//! ```
//! use candle_reliance::RelianceConfig;
//!
//! let cfg = RelianceConfig::from_yaml_str("stopping:\n  label_wave:\n    patience: 8\n")?;
//! assert_eq!(cfg.stopping.label_wave.patience, 8);
//! assert_eq!(cfg.stopping.label_wave.window, 3); // default
//! assert_eq!(cfg.schedule.check_every, 1); // default
//!
//! let err = RelianceConfig::from_yaml_str("stopping:\n  label_wave: {patience: 0}\n").unwrap_err();
//! assert!(err.to_string().contains("stopping.label_wave.patience"), "{err}");
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::curves::{AblationSpec, NoiseSpec};
use crate::error::{bail, fail, Error};
use crate::invalid::{Checked, Invalid};
use crate::measurement::Batching;
use crate::monitor::StoppingRule;
use crate::Result;
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
    /// How a check's passes are cut into forward passes.
    #[serde(deserialize_with = "section")]
    pub batching: Batching,
    /// The ablation curve.
    #[serde(deserialize_with = "section")]
    pub ablation: AblationSpec,
    /// The noise curve, recorded beside the ablation curve at every check when given. Default
    /// none.
    pub noise: Option<NoiseSpec>,
    /// Also record and log the mean class selectivity per probe at each check, computed from
    /// the statistics pass the curve already makes (no extra forward). Default false.
    pub selectivity: bool,
    /// The stopping rule.
    #[serde(deserialize_with = "section")]
    pub stopping: StoppingRule,
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
    pub check_every: usize,
    /// No checks before this epoch (epochs count from 1). Default 2.
    pub warmup_epochs: usize,
    /// Stop at this epoch whatever the metric (≥ 1); default none.
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
            && (epoch - self.warmup_epochs.max(1)).is_multiple_of(self.check_every)
    }

    fn check(&self) -> Checked {
        Invalid::at_least("check_every", self.check_every, 1)?;
        if let Some(m) = self.max_epochs {
            Invalid::at_least("max_epochs", m, 1)?;
        }
        Ok(())
    }
}

/// `data:` — the fixed training subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Samples drawn (once, fixed) from the data given to the monitor (≥ 1). Default 1000.
    pub subset_size: usize,
    /// Seed of the subset draw. Default 0.
    #[serde(deserialize_with = "crate::invalid::seed")]
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
    pub history_file: Option<PathBuf>,
    /// The monitor state, rewritten after every epoch reported to the monitor, for resuming.
    /// Default none.
    pub state_file: Option<PathBuf>,
}

impl RelianceConfig {
    /// Parses YAML text; an empty document gives the defaults. Text over 1 MiB, or nested more
    /// than 32 brackets deep, is refused before parsing (a configuration needs neither, and the
    /// parser's time grows fast with them).
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        bounded(text)?;
        let err = |e: serde_norway::Error| Error::Config {
            key: None,
            line: e.location().map(|l| l.line()),
            message: format!("reliance config: {e}"),
        };
        // A file of comments only is an empty document, which a struct cannot be read from.
        // (`IgnoredAny`, not `Value`, which cannot hold an integer beyond 64 bits and would
        // hide the key's own message about it.)
        let empty = serde_norway::from_str::<Option<serde::de::IgnoredAny>>(text)
            .map_err(err)?
            .is_none();
        let cfg: Self = if empty {
            Self::default()
        } else {
            serde_norway::from_str(text).map_err(err)?
        };
        cfg.check().map_err(|e| {
            let line = key_line(text, &e.key);
            let at = line.map_or(String::new(), |l| format!(" at line {l}"));
            Error::Config {
                message: format!("reliance config: {}: {}{at}", e.key, e.msg),
                key: Some(e.key),
                line,
            }
        })?;
        Ok(cfg)
    }

    /// Reads and parses a YAML file; errors name the file.
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("read", path, e).context("reliance config"))?;
        Self::from_yaml_str(&text).map_err(|e| match e {
            Error::Config { key, line, message } => Error::Config {
                key,
                line,
                message: format!("{message} ({})", path.display()),
            },
            e => e,
        })
    }

    /// The configuration as YAML.
    pub fn to_yaml_string(&self) -> Result<String> {
        serde_norway::to_string(self).map_err(|e| fail!(Data, "reliance config: {e}"))
    }

    /// Checks every value, naming the first bad key (`section.key`).
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| Error::Config {
            message: format!("reliance config: {}: {}", e.key, e.msg),
            key: Some(e.key),
            line: None,
        })
    }

    fn check(&self) -> Checked {
        self.schedule.check().map_err(|e| e.within("schedule"))?;
        Invalid::at_least("data.subset_size", self.data.subset_size, 1)?;
        self.batching.check().map_err(|e| e.within("batching"))?;
        self.ablation.check().map_err(|e| e.within("ablation"))?;
        if let Some(noise) = &self.noise {
            noise.check().map_err(|e| e.within("noise"))?;
        }
        self.stopping.check().map_err(|e| e.within("stopping"))?;
        let paths = [
            ("restore_best.path", Some(&self.restore_best.path)),
            ("output.history_file", self.output.history_file.as_ref()),
            ("output.state_file", self.output.state_file.as_ref()),
        ];
        for (key, path) in paths {
            if path.is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(Invalid::new(key, "must not be empty"));
            }
        }
        // Two outputs in one file destroy each other (the snapshot path matters with disk mode).
        let snapshot = (self.restore_best.enabled && self.restore_best.mode == SnapshotMode::Disk)
            .then_some(&self.restore_best.path);
        let outputs = [
            ("output.history_file", self.output.history_file.as_ref()),
            ("output.state_file", self.output.state_file.as_ref()),
            ("restore_best.path", snapshot),
        ];
        for (i, (key, path)) in outputs.iter().enumerate() {
            let Some(path) = path else { continue };
            if let Some((other, _)) = outputs[..i].iter().find(|(_, p)| *p == Some(*path)) {
                return Err(Invalid::new(
                    *key,
                    format!("is the same file as {other} ({})", path.display()),
                ));
            }
        }
        Ok(())
    }
}

/// The most bytes and the deepest bracket nesting a configuration may have.
const MAX_TEXT: usize = 1 << 20;
const MAX_DEPTH: usize = 32;

/// Refuses text too large or too deeply nested to be a configuration, naming the line.
fn bounded(text: &str) -> Result<()> {
    if text.len() > MAX_TEXT {
        bail!(
            Config,
            "reliance config: {} bytes, at most {MAX_TEXT}: not a configuration file",
            text.len()
        );
    }
    // Flow collections may span lines: the depth carries over; quotes and comments do not.
    let mut depth = 0usize;
    for (i, line) in text.lines().enumerate() {
        let mut quote: Option<char> = None;
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        bail!(Config,
                            "reliance config: brackets nested more than {MAX_DEPTH} deep at line {}",
                            i + 1
                        );
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// A section header with nothing under it (`stopping:` with every key commented out) reads as
/// null: treat it as the section's defaults.
fn section<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// 1-based line of a `section.key`, `section.sub.key` (or top-level `key`) in the YAML text,
/// block or flow style: each part of the path is looked for from the line of the one before,
/// within the top-level section.
fn key_line(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let parts: Vec<&str> = path.split('.').collect();
    let (mut at, keys) = match parts.split_first() {
        Some((section, keys)) if !keys.is_empty() => (
            lines
                .iter()
                .position(|l| l.starts_with(&format!("{section}:")))?,
            keys,
        ),
        _ => (0, &parts[..]),
    };
    let start = at;
    let nested = parts.len() > 1;
    let found_on = |line: &str, key: &str| {
        let pattern = format!("{key}:");
        let code = line.split(" #").next().unwrap_or(line);
        code.match_indices(&pattern)
            .any(|(i, _)| i == 0 || matches!(code.as_bytes()[i - 1], b' ' | b'\t' | b'{' | b','))
    };
    for key in keys {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(at) {
            if nested && i > start && !line.is_empty() && !line.starts_with([' ', '\t', '#']) {
                break; // the next top-level section
            }
            if found_on(line, key) && (i > start || !nested) {
                hit = Some(i);
                break;
            }
            // A flow-style section on the header's own line.
            if i == start && nested && found_on(line.split_once(':').map_or("", |p| p.1), key) {
                hit = Some(i);
                break;
            }
        }
        at = hit?;
    }
    Some(at + 1)
}
