//! What a check leaves behind: one record per check, appended as a JSON line to the history
//! file, and the files written safely (existing files are moved aside, never overwritten by a
//! fresh run; state is replaced atomically).

use crate::{AblationCurve, NoiseCurve};
use candle_core::Result;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One check of the monitor: one line of the history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// Epoch after which the check ran.
    pub epoch: usize,
    /// Name of the metric the stopping rule follows (`auc` or `normalized_auc`).
    pub metric_name: String,
    /// The metric at this check.
    pub metric: f64,
    /// The metric after smoothing (equal to `metric` without smoothing).
    pub smoothed: f64,
    /// Ablation AUC (mean over orders).
    pub auc: f64,
    /// 95% interval of `auc` over orders.
    pub auc_ci: Option<[f64; 2]>,
    /// AUC divided by the unablated accuracy.
    pub normalized_auc: f64,
    /// Training-subset accuracy with nothing ablated.
    pub unablated_accuracy: f64,
    /// Noise-curve AUC, when the noise curve is enabled.
    pub noise_auc: Option<f64>,
    /// Whether this check set a new peak.
    pub improved: bool,
    /// `continue` or `stop`.
    pub decision: String,
    /// Why it stopped, if it did.
    pub reason: Option<String>,
    /// Seconds the check took.
    pub seconds: f64,
    /// The full ablation curve.
    pub curve: AblationCurve,
    /// The full noise curve, when enabled.
    pub noise: Option<NoiseCurve>,
    /// Mean class selectivity per probe (in the order the probes were added), when
    /// `ablation.selectivity` is on; absent in history files written without it.
    #[serde(default)]
    pub selectivity: Option<Vec<f64>>,
}

/// Reads a history file written by the monitor (one [`CheckRecord`] per line); errors name the
/// file and the line.
pub fn read_history(path: impl AsRef<Path>) -> Result<Vec<CheckRecord>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| {
        candle_core::Error::Msg(format!("cannot read history {}: {e}", path.display()))
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                candle_core::Error::Msg(format!("history {} line {}: {e}", path.display(), i + 1))
            })
        })
        .collect()
}

pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("cannot {what} {}: {e}", path.display()))
}

/// Moves an existing file to the first free `NAME.N.bak`, returning where it went.
pub(crate) fn move_aside(path: &Path) -> Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    for n in 1.. {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}.bak"));
        let target = PathBuf::from(name);
        if !target.exists() {
            std::fs::rename(path, &target).map_err(|e| io_err("move aside", path, e))?;
            return Ok(Some(target));
        }
    }
    unreachable!()
}

pub(crate) fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::fs::create_dir_all(p).map_err(|e| io_err("create directory", p, e))
        }
        _ => Ok(()),
    }
}

/// Appends one JSON line and flushes it, so a crash loses at most the line being written.
pub(crate) fn append_json_line<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let line = serde_json::to_string(value).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err("open", path, e))?;
    writeln!(f, "{line}").map_err(|e| io_err("write", path, e))?;
    f.flush().map_err(|e| io_err("write", path, e))
}

/// Writes through a temporary file and renames it over `path`, so the old content survives a
/// crash mid-write.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    ensure_parent(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("replace", path, e))
}
