//! What the monitor keeps on disk and checks when it continues: the state (format, fingerprints,
//! the checks a resume refuses), the history, weight snapshots and the folder locks
//! ([`files`]). The monitor (`super`) keeps the training-loop logic and calls in here.

pub(crate) mod files;

use super::{CheckRecord, EarlyStoppingStrategy, RelianceConfig, SnapshotMode, StopReason};
use crate::collective::Collective;
use crate::error::{bail, fail, Error};
use crate::ProbeData;
use crate::Result;
use candle_core::Tensor;
use candle_nn::VarMap;
use files::{io_err, move_aside, DirLock};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The format of [`MonitorState`] this version writes and reads.
pub const STATE_FORMAT: u32 = 2;

/// Everything the monitor needs to continue a run with the identical decision sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorState {
    /// The state file's format ([`STATE_FORMAT`]).
    pub format: u32,
    /// The stopping strategy's state ([`EarlyStoppingStrategy::save_state`]).
    pub stopping: serde_json::Value,
    /// The epoch the strategy keeps (the snapshot the monitor holds).
    pub kept_epoch: Option<usize>,
    /// Recent check epochs whose weights are held in case the strategy moves its kept epoch
    /// back to one of them ([`EarlyStoppingStrategy::lookback`]); with `restore_best.mode:
    /// disk`, as snapshot files.
    pub held_epochs: Vec<usize>,
    /// Set once the monitor said stop.
    pub stopped: Option<StopReason>,
    /// All checks so far.
    pub history: Vec<CheckRecord>,
    /// The last epoch reported.
    pub last_epoch: Option<usize>,
    /// The settings that decide (schedule, data, ablation, stopping) as they were when the state
    /// was written: a resume with other settings is refused, naming the keys that differ.
    pub decides: serde_json::Value,
    /// The unablated predictions on the probe data at the last check: the next check counts its
    /// prediction changes against them.
    pub predictions: Option<Vec<u32>>,
    /// The training loop's predictions in the last epoch it reported them
    /// ([`RelianceMonitor::observe`](super::RelianceMonitor::observe); `u32::MAX` for an
    /// example not seen).
    pub training_predictions: Option<Vec<u32>>,
    /// What the checks ran on: a resume on other probe data is refused.
    #[serde(default)]
    pub probe_data: Option<ProbeDataPrint>,
    /// The probes (name, units) at the last check: a resume whose first check finds others is
    /// refused.
    #[serde(default)]
    pub probes: Option<Vec<(String, usize)>>,
}

/// A fingerprint of the probe data a run's checks measure: a resume on other data (another
/// training set, subset or labels) is refused, naming what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeDataPrint {
    /// Training examples given to the monitor, before the subset was drawn.
    pub training_samples: usize,
    /// Samples in the probe subset.
    pub samples: usize,
    /// FNV-1a digest (hex) of the subset's inputs (as `f32`) and labels.
    pub digest: String,
}

impl ProbeDataPrint {
    pub(super) fn of(subset: &ProbeData, training_samples: usize) -> Result<Self> {
        let xs = subset
            .xs()
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let bytes = xs
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .chain(subset.label_values().iter().flat_map(|l| l.to_le_bytes()));
        Ok(Self {
            training_samples,
            samples: subset.len(),
            digest: format!("{:016x}", fnv1a(bytes)),
        })
    }

    /// What differs from `other`, in words.
    pub(super) fn differences(&self, other: &Self) -> Option<String> {
        if self.training_samples != other.training_samples {
            Some(format!(
                "the data given has {} training examples, the interrupted run had {}",
                self.training_samples, other.training_samples
            ))
        } else if self.samples != other.samples {
            Some(format!(
                "the probe subset has {} samples, the interrupted run's had {}",
                self.samples, other.samples
            ))
        } else if self.digest != other.digest {
            Some(format!(
                "the probe samples' values or labels differ (digest {}, the interrupted run's {})",
                self.digest, other.digest
            ))
        } else {
            None
        }
    }
}

/// FNV-1a over `bytes`.
pub(super) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The sections of `config` whose values change the decisions.
pub(super) fn decides(config: &RelianceConfig) -> Result<serde_json::Value> {
    let v = serde_json::to_value(config).map_err(|e| fail!(Data, "{e}"))?;
    Ok(serde_json::json!({
        "schedule": v["schedule"], "data": v["data"], "ablation": v["ablation"],
        "stopping": v["stopping"],
    }))
}

/// The configuration of a rank other than 0: no history, state or snapshot files; best weights
/// in memory.
pub(super) fn without_files(mut config: RelianceConfig) -> RelianceConfig {
    config.output = Default::default();
    config.restore_best.mode = SnapshotMode::Memory;
    config
}

/// A 24-bit digest of what decides a resumed run (the stopping state, the epochs, the
/// settings), small enough that the sum of its squares over many ranks fits in a `u64`.
pub(super) fn state_fingerprint(state: &MonitorState) -> Result<u64> {
    let text = serde_json::to_string(&(
        &state.stopping,
        state.kept_epoch,
        &state.held_epochs,
        &state.stopped,
        state.history.len(),
        state.last_epoch,
        &state.decides,
        &state.predictions,
        &state.training_predictions,
    ))
    .map_err(|e| fail!(Data, "{e}"))?;
    Ok(fold24(fnv1a(text.bytes())))
}

/// A 64-bit digest folded to 24 bits (so that a sum of squares over many ranks fits a `u64`).
pub(super) fn fold24(h: u64) -> u64 {
    (h ^ (h >> 24) ^ (h >> 48)) & 0xff_ffff
}

/// For each 24-bit fingerprint, whether the ranks' values differ: equal on every rank iff the
/// variance over the ranks is 0, so every rank gets the same sums and the same verdict.
pub(super) fn differ_across_ranks(
    collective: &dyn Collective,
    prints: &[u64],
) -> Result<Vec<bool>> {
    let mut sums: Vec<u64> = prints.iter().flat_map(|&f| [f, f * f]).collect();
    collective.all_reduce_sum_u64(&mut sums)?;
    let world = collective.world_size() as u128;
    Ok(sums
        .chunks(2)
        .map(|s| u128::from(s[1]) * world != u128::from(s[0]) * u128::from(s[0]))
        .collect())
}

/// Probes as `` `name` (U units) ``, comma-separated.
pub(super) fn probe_list(probes: &[(String, usize)]) -> String {
    probes
        .iter()
        .map(|(n, u)| format!("`{n}` ({u} units)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a state's history disagrees with its counters, if it does: a state edited by hand or
/// written by something else cannot be continued with the same decisions.
pub(super) fn contradiction(state: &MonitorState) -> Option<String> {
    let epochs: Vec<usize> = state.history.iter().map(|r| r.epoch).collect();
    if let Some(w) = epochs.windows(2).find(|w| w[1] <= w[0]) {
        return Some(format!(
            "its history's epochs do not increase ({} then {})",
            w[0], w[1]
        ));
    }
    if let Some(&last_check) = epochs.last() {
        match state.last_epoch {
            None => {
                return Some(format!(
                    "its history has checks (up to epoch {last_check}) but no last epoch"
                ))
            }
            Some(last) if last < last_check => {
                return Some(format!(
                    "its last epoch is {last} but its history has a check at epoch {last_check}"
                ))
            }
            _ => {}
        }
    }
    for (what, epoch) in state
        .kept_epoch
        .iter()
        .map(|&e| ("kept", e))
        .chain(state.held_epochs.iter().map(|&e| ("held", e)))
    {
        if !epochs.contains(&epoch) {
            return Some(format!(
                "its {what} epoch {epoch} has no check in its history"
            ));
        }
    }
    if state.stopped.is_some() && state.last_epoch.is_none() {
        return Some("it is stopped but has no last epoch".into());
    }
    None
}

/// `section.key` of every value that differs between two [`decides`] objects.
pub(super) fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let mut out = vec![];
    for section in ["schedule", "data", "ablation", "stopping"] {
        let (x, y) = (&a[section], &b[section]);
        let keys: std::collections::BTreeSet<&String> = x
            .as_object()
            .into_iter()
            .chain(y.as_object())
            .flat_map(|o| o.keys())
            .collect();
        out.extend(
            keys.into_iter()
                .filter(|k| x.get(*k) != y.get(*k))
                .map(|k| format!("{section}.{k}")),
        );
    }
    out
}

/// Every variable of `varmap`, copied: `copy` detaches the values from the variables the
/// optimizer keeps updating.
pub(super) fn copy_weights(varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| fail!(Usage, "VarMap lock poisoned"))?;
    vars.iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
        .collect()
}

/// A resumed monitor's saved stopping state, and why the built-in rule could not load it (a run
/// of a strategy of the user's, which loads it when given).
pub(super) struct Resumed {
    pub stopping: serde_json::Value,
    pub kept_epoch: Option<usize>,
    pub load_error: Option<String>,
}

impl Resumed {
    /// The strategy that loaded the state must keep the epoch the monitor's state names.
    pub fn check_kept(&self, strategy: &dyn EarlyStoppingStrategy) -> Result<()> {
        if strategy.kept_epoch() != self.kept_epoch {
            bail!(
                Resume,
                "cannot resume: the state's stopping rule keeps epoch {:?}, its monitor {:?}",
                strategy.kept_epoch(),
                self.kept_epoch
            );
        }
        Ok(())
    }
}

/// Refuses a state this version or these settings cannot continue, naming why.
pub(super) fn check_resumable(config: &RelianceConfig, state: &MonitorState) -> Result<()> {
    if state.format != STATE_FORMAT {
        bail!(
            Resume,
            "cannot resume: the state has format {}, this version reads format {STATE_FORMAT}",
            state.format
        );
    }
    if let Some(what) = contradiction(state) {
        bail!(
            Resume,
            "cannot resume: the state contradicts itself: {what}"
        );
    }
    let now = decides(config)?;
    if state.decides != now {
        bail!(
            Resume,
            "cannot resume with other settings than the interrupted run's: {} differ",
            differing_keys(&state.decides, &now).join(", ")
        );
    }
    Ok(())
}

/// Reads a state file, refusing one of another format.
pub(super) fn load_state(path: &Path) -> Result<MonitorState> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err("read monitor state", path, e))?;
    let err = |e: String| Error::file(path, format!("monitor state {}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let old = |e: String| fail!(Resume, "monitor state {}: {e}", path.display());
    match value.get("format").and_then(|f| f.as_u64()) {
        Some(f) if f == u64::from(STATE_FORMAT) => {}
        Some(f) => {
            return Err(old(format!(
                "format {f}; this version reads format {STATE_FORMAT}"
            )))
        }
        None => {
            return Err(old(format!(
                "written by an earlier version (no format number); this version reads format \
                 {STATE_FORMAT} and cannot resume it: start the run afresh"
            )))
        }
    }
    serde_json::from_value(value).map_err(|e| err(e.to_string()))
}

/// Checks the output paths (distinct, writable, not folders) and locks their folders.
pub(super) fn prepare_files(config: &RelianceConfig) -> Result<Vec<DirLock>> {
    let files = output_files(config);
    for (key, path) in &files {
        files::check_writable(key, path)?;
    }
    let mut dirs: Vec<std::path::PathBuf> = vec![];
    let mut locks = vec![];
    for (_, path) in &files {
        let dir = std::fs::canonicalize(files::folder_of(path))
            .map_err(|e| io_err("resolve", path, e))?;
        if !dirs.contains(&dir) {
            locks.push(files::lock_dir(path)?);
            dirs.push(dir);
        }
    }
    Ok(locks)
}

/// The files the monitor writes, with their configuration keys.
pub(super) fn output_files(config: &RelianceConfig) -> Vec<(&'static str, &Path)> {
    let out = &config.output;
    [
        ("output.history_file", out.history_file.as_deref()),
        ("output.state_file", out.state_file.as_deref()),
        ("restore_best.path", disk_snapshot(config)),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.map(|p| (k, p)))
    .collect()
}

/// The snapshot file, when the kept weights go to disk.
pub(super) fn disk_snapshot(config: &RelianceConfig) -> Option<&Path> {
    (config.restore_best.enabled && config.restore_best.mode == SnapshotMode::Disk)
        .then_some(config.restore_best.path.as_path())
}

/// Moves the epoch snapshots of an earlier run (`PATH.epochE`) aside, as a fresh run does with
/// every file it would write.
pub(super) fn move_aside_snapshots(path: &Path) -> Result<()> {
    let mut found: Vec<std::path::PathBuf> = files::snapshot_files(path)
        .map_err(|e| io_err("read", files::folder_of(path), e))?
        .into_iter()
        .filter(|(_, rest)| rest.parse::<usize>().is_ok())
        .map(|(file, _)| file)
        .collect();
    found.sort();
    for p in found {
        if let Some(to) = move_aside(&p)? {
            tracing::warn!(from = %p.display(), to = %to.display(), "moved an existing file aside");
        }
    }
    Ok(())
}
