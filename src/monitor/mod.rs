//! The training-loop plugin: measures reliance every few epochs, decides when to stop, and puts
//! the best epoch's weights back.
//!
//! ```no_run
//! # use candle_core::{Module, Tensor};
//! # fn train_one_epoch() {}
//! # fn demo(model: &impl Module, varmap: &candle_nn::VarMap, xs: Tensor, ys: Tensor) -> candle_core::Result<()> {
//! use candle_reliance::{ProbeData, ProbeSet, RelianceMonitor};
//! let probes = ProbeSet::new(); // the model holds probes.add("fc1")?, ... after its activations
//! let mut monitor = RelianceMonitor::from_yaml_file("reliance.yaml", probes, ProbeData::new(xs, ys)?)?;
//! for epoch in 1..=100 {
//!     train_one_epoch();
//!     if monitor.on_epoch_end(epoch, model, varmap)?.is_stop() { break; }
//! }
//! monitor.finish(varmap)?; // restores the best epoch's weights
//! # Ok(()) }
//! ```

mod config;
pub(crate) mod files;
mod label_wave;
mod record;
mod stopping;

pub use config::{
    DataConfig, OutputConfig, RelianceConfig, RestoreBestConfig, ScheduleConfig, SnapshotMode,
};
pub use label_wave::{LabelWave, LabelWaveRule, LabelWaveState, PredictionChanges};
pub use record::{read_history, CheckRecord};
pub use stopping::{
    Best, Decision, EarlyStopping, EarlyStoppingStrategy, Fallback, Keep, Metric, StopReason,
    StoppingRule, StoppingState,
};

use crate::collective::Collective;
use crate::measurement::UnitStatistics;
use crate::units::Selectivity;
use crate::{Measurement, ProbeData, ProbeSet};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarMap;
use files::{append_json_line, io_err, move_aside, write_atomic, DirLock};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Everything the monitor needs to continue a run with the identical decision sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorState {
    /// The stopping rule's state.
    pub stopping: StoppingState,
    /// All checks so far.
    pub history: Vec<CheckRecord>,
    /// The last epoch reported.
    pub last_epoch: Option<usize>,
    /// The settings that decide (schedule, data, ablation, stopping) as they were when the state
    /// was written: a resume with other settings is refused, naming the keys that differ.
    #[serde(default)]
    pub decides: Option<serde_json::Value>,
    /// The unablated predictions on the probe data at the last check: the next check counts its
    /// prediction changes against them ([`Fallback::LabelWave`]).
    #[serde(default)]
    pub predictions: Option<Vec<u32>>,
}

impl MonitorState {
    /// The epoch whose weights the state says are kept (see [`EarlyStopping::kept_epoch`]).
    fn kept_epoch(&self, config: &RelianceConfig) -> Option<usize> {
        EarlyStopping::with_state(config.stopping.clone(), self.stopping.clone()).kept_epoch()
    }
}

/// The sections of `config` whose values change the decisions.
fn decides(config: &RelianceConfig) -> Result<serde_json::Value> {
    let v = serde_json::to_value(config).map_err(candle_core::Error::msg)?;
    Ok(serde_json::json!({
        "schedule": v["schedule"], "data": v["data"], "ablation": v["ablation"],
        "stopping": v["stopping"],
    }))
}

/// The configuration of a rank other than 0: no history, state or snapshot files; best weights
/// in memory.
fn without_files(mut config: RelianceConfig) -> RelianceConfig {
    config.output = Default::default();
    config.restore_best.mode = SnapshotMode::Memory;
    config
}

/// A 24-bit digest of what decides a resumed run (the stopping state, the epochs, the
/// settings), small enough that the sum of its squares over many ranks fits in a `u64`.
fn state_fingerprint(state: &MonitorState) -> Result<u64> {
    let text = serde_json::to_string(&(
        &state.stopping,
        state.history.len(),
        state.last_epoch,
        &state.decides,
    ))
    .map_err(candle_core::Error::msg)?;
    // FNV-1a, folded.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    Ok((h ^ (h >> 24) ^ (h >> 48)) & 0xff_ffff)
}

/// `section.key` of every value that differs between two [`decides`] objects.
fn differing_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
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

/// Measures the ablation AUC on a fixed training subset every `check_every` epochs and signals
/// a stop when reliance on single directions rises. See the [crate docs](crate) for the loop.
pub struct RelianceMonitor {
    config: RelianceConfig,
    probes: ProbeSet,
    data: ProbeData,
    stopping: EarlyStopping,
    history: Vec<CheckRecord>,
    last_epoch: Option<usize>,
    /// The unablated predictions of the last check.
    predictions: Option<Vec<u32>>,
    snapshot: Option<Vec<(String, Tensor)>>,
    /// The epoch of the snapshot file the last committed state names (disk mode).
    committed_snapshot: Option<usize>,
    warned_no_weights: bool,
    /// The rank's group in a data-parallel run.
    collective: Option<Arc<dyn Collective>>,
    _locks: Vec<DirLock>,
}

impl RelianceMonitor {
    /// A monitor for a fresh run. `data` is training data; the monitor draws its fixed subset of
    /// `data.subset_size` samples from it. Output files that already exist are moved aside to
    /// `NAME.N.bak`, never overwritten.
    pub fn new(config: RelianceConfig, probes: ProbeSet, data: ProbeData) -> Result<Self> {
        config.validate()?;
        let locks = Self::prepare_files(&config)?;
        for (_, path) in output_files(&config) {
            // Half-written files of a crashed run: never the user's, never worth keeping.
            files::remove_tmp(path)?;
            if let Some(to) = move_aside(path)? {
                tracing::warn!(from = %path.display(), to = %to.display(), "moved an existing file aside");
            }
        }
        if let Some(path) = disk_snapshot(&config) {
            files::remove_stale_snapshots(path, None, true)?;
            move_aside_snapshots(path)?;
        }
        let state = MonitorState {
            stopping: Default::default(),
            history: vec![],
            last_epoch: None,
            decides: Some(decides(&config)?),
            predictions: None,
        };
        Self::build(config, probes, data, state, locks)
    }

    /// Checks the output paths (distinct, writable, not folders) and locks their folders.
    fn prepare_files(config: &RelianceConfig) -> Result<Vec<DirLock>> {
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

    /// [`RelianceMonitor::new`] with the configuration read from a YAML file.
    pub fn from_yaml_file(
        path: impl AsRef<Path>,
        probes: ProbeSet,
        data: ProbeData,
    ) -> Result<Self> {
        Self::new(RelianceConfig::from_yaml_file(path)?, probes, data)
    }

    /// Continues an interrupted run from its saved state; the history file is appended to. Pass
    /// the same configuration and data: the subset and the ablation orders are drawn from their
    /// seeds, so the continued run makes the same decisions. With `restore_best.mode: memory`
    /// the best weights of the interrupted process are gone; use `disk` for resumable runs.
    pub fn resume(
        config: RelianceConfig,
        probes: ProbeSet,
        data: ProbeData,
        state: MonitorState,
    ) -> Result<Self> {
        config.validate()?;
        let now = decides(&config)?;
        match &state.decides {
            Some(then) if *then != now => candle_core::bail!(
                "cannot resume with other settings than the interrupted run's: {} differ",
                differing_keys(then, &now).join(", ")
            ),
            Some(_) => {}
            None => tracing::warn!(
                "the state holds no settings to compare with (written by an earlier version); \
                 resuming with the given ones"
            ),
        }
        let locks = Self::prepare_files(&config)?;
        // The state is authoritative: the history is what it holds (lines of checks it never
        // committed are dropped), snapshot files it does not name and temporary files go.
        if let Some(path) = &config.output.history_file {
            files::rewrite_json_lines(path, &state.history)?;
        }
        if let Some(path) = &config.output.state_file {
            files::remove_tmp(path)?;
        }
        if let Some(path) = disk_snapshot(&config) {
            files::remove_tmp(path)?;
            files::remove_stale_snapshots(path, state.kept_epoch(&config), false)?;
        }
        if config.restore_best.enabled
            && config.restore_best.mode == SnapshotMode::Memory
            && state.kept_epoch(&config).is_some()
        {
            tracing::warn!(
                "resuming with restore_best.mode: memory; the best weights so far were held by the \
                 interrupted process and can only be restored if a later epoch becomes the best"
            );
        }
        let mut monitor = Self::build(config, probes, data, state, locks)?;
        monitor.committed_snapshot = monitor.stopping.kept_epoch();
        Ok(monitor)
    }

    /// Reads a state file written through `output.state_file` or [`RelianceMonitor::save_state`].
    pub fn load_state(path: impl AsRef<Path>) -> Result<MonitorState> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|e| io_err("read monitor state", path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("monitor state {}: {e}", path.display())))
    }

    fn build(
        config: RelianceConfig,
        probes: ProbeSet,
        data: ProbeData,
        state: MonitorState,
        locks: Vec<DirLock>,
    ) -> Result<Self> {
        let data = data.subset(config.data.subset_size, config.data.seed)?;
        let stopping = EarlyStopping::with_state(config.stopping.clone(), state.stopping);
        Ok(Self {
            config,
            probes,
            data,
            stopping,
            history: state.history,
            last_epoch: state.last_epoch,
            predictions: state.predictions,
            snapshot: None,
            committed_snapshot: None,
            warned_no_weights: false,
            collective: None,
            _locks: locks,
        })
    }

    /// A monitor for one rank of a data-parallel run: every rank passes the same configuration
    /// and data and its member of the group. Each rank measures its shard of the subset and the
    /// counts are all-reduced ([`crate::collective`]), so every rank sees the same curve and
    /// makes the same decisions; weights that are NaN or infinite on any rank stop every rank.
    /// Only rank 0 writes the history, state and snapshot files; the other ranks keep their best
    /// weights in memory and restore them in [`RelianceMonitor::finish`] as rank 0 does.
    ///
    /// Every rank must call [`RelianceMonitor::on_epoch_end`] for the same epochs: a check is a
    /// fixed sequence of all-reduces.
    pub fn new_ranked(
        mut config: RelianceConfig,
        probes: ProbeSet,
        data: ProbeData,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        if collective.rank() != 0 {
            config = without_files(config);
        }
        let mut monitor = Self::new(config, probes, data)?;
        monitor.collective = Some(collective);
        Ok(monitor)
    }

    /// [`RelianceMonitor::resume`] for one rank of a data-parallel run. Every rank passes the same
    /// configuration and data, its member of the group, and the state rank 0 saved (its
    /// `output.state_file`, read by every rank from a shared filesystem or sent by rank 0).
    ///
    /// Rank 0 resumes as [`RelianceMonitor::resume`] does, files and all. The other ranks write
    /// nothing; with `restore_best.mode: disk` they read the kept epoch's weights from rank 0's
    /// snapshot file now (before any rank can go on and move it), so that
    /// [`RelianceMonitor::finish`] restores the same weights on every rank.
    ///
    /// The ranks compare a fingerprint of their states; if any differs, every rank fails with an
    /// error rather than deciding apart.
    pub fn resume_ranked(
        config: RelianceConfig,
        probes: ProbeSet,
        data: ProbeData,
        state: MonitorState,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let fingerprint = state_fingerprint(&state)?;
        let mut monitor = if collective.rank() == 0 {
            Self::resume(config, probes, data, state)?
        } else {
            config.validate()?;
            let snapshot = match (state.kept_epoch(&config), disk_snapshot(&config)) {
                (Some(kept), Some(path)) => {
                    let (_, saved) = files::read_snapshot(path, kept, data.xs().device())?;
                    Some(saved.into_iter().collect())
                }
                _ => None,
            };
            let mut monitor = Self::build(without_files(config), probes, data, state, vec![])?;
            monitor.snapshot = snapshot;
            monitor
        };
        // Equal fingerprints on every rank iff the variance of the ranks' fingerprints is 0: the
        // same sums, the same verdict on every rank.
        let world = collective.world_size() as u128;
        let mut sums = [fingerprint, fingerprint * fingerprint];
        collective.all_reduce_sum_u64(&mut sums)?;
        if u128::from(sums[1]) * world != u128::from(sums[0]) * u128::from(sums[0]) {
            candle_core::bail!(
                "resume_ranked: the ranks were given different states; pass every rank the state \
                 rank 0 saved"
            );
        }
        monitor.collective = Some(collective);
        Ok(monitor)
    }

    /// Call after each training epoch (`epoch` counts from 1). Runs a check when the schedule
    /// says so, snapshots the weights in `varmap` at a new peak (when `restore_best` is on) and
    /// returns whether to stop.
    pub fn on_epoch_end(
        &mut self,
        epoch: usize,
        model: &impl Module,
        varmap: &VarMap,
    ) -> Result<Decision> {
        self.epoch_end(epoch, model, Some(varmap))
    }

    /// [`RelianceMonitor::on_epoch_end`] for models whose weights are not in a [`VarMap`]: the
    /// best weights cannot be restored.
    pub fn check(&mut self, epoch: usize, model: &impl Module) -> Result<Decision> {
        self.epoch_end(epoch, model, None)
    }

    fn epoch_end(
        &mut self,
        epoch: usize,
        model: &impl Module,
        varmap: Option<&VarMap>,
    ) -> Result<Decision> {
        if let Some(last) = self.last_epoch {
            if epoch <= last {
                candle_core::bail!(
                    "epoch {epoch} reported after epoch {last}; epochs must increase"
                );
            }
        }
        self.last_epoch = Some(epoch);
        if let Some(reason) = &self.stopping.state().stopped {
            return Ok(Decision::Stop {
                reason: reason.clone(),
            });
        }
        let mut decision = Decision::Continue;
        if self.config.schedule.is_check_epoch(epoch) {
            decision = self.run_check(epoch, model, varmap)?;
        }
        if !decision.is_stop() && self.config.schedule.max_epochs.is_some_and(|m| epoch >= m) {
            decision = self.stopping.stop(StopReason::MaxEpochs { epoch });
            tracing::info!(epoch, decision = "stop", reason = %decision.reason().unwrap(), "reliance monitor");
        }
        self.save_state_if_configured()?;
        // Only now, with the state naming the new snapshot committed, may the old one go.
        if let Some(path) = disk_snapshot(&self.config) {
            let kept = self.stopping.kept_epoch();
            if kept != self.committed_snapshot {
                files::remove_stale_snapshots(path, kept, false)?;
                self.committed_snapshot = kept;
            }
        }
        Ok(decision)
    }

    fn run_check(
        &mut self,
        epoch: usize,
        model: &impl Module,
        varmap: Option<&VarMap>,
    ) -> Result<Decision> {
        let span = tracing::info_span!("reliance_check", epoch);
        let _enter = span.enter();
        let t0 = Instant::now();
        let mut m = Measurement::new(model, &self.probes, &self.data)
            .with_batching(self.config.batching.clone());
        if let Some(c) = &self.collective {
            m = m.with_collective(c.as_ref());
        }
        let curve = m.ablation_curve(&self.config.ablation)?;
        let noise = match &self.config.noise {
            Some(spec) => Some(m.noise_curve(spec)?),
            None => None,
        };
        let selectivity = if self.config.selectivity {
            Some(Selectivity::from_stats(m.statistics()?).means())
        } else {
            None
        };
        let metric_kind = self.config.stopping.metric;
        let metric = metric_kind.of(&curve);
        let stats = m.statistics()?;
        let non_finite = match self.non_finite_weights_on_ranks(varmap)? {
            Some(what) => Some(what),
            None if !curve.finite => Some("logits on the probe data".to_string()),
            None => non_finite_activations(stats),
        };
        let degenerate = degenerate(stats, metric_kind);
        // Undone if the kept weights cannot be written: a kept epoch always has its snapshot.
        let before = (self.stopping.clone(), self.predictions.clone());
        let changes = self.predictions.as_ref().map(|prev| {
            prev.iter()
                .zip(&stats.predictions)
                .filter(|(a, b)| a != b)
                .count()
        });
        if let Some(n) = changes {
            self.stopping.update_changes(epoch, n as f64);
        }
        self.predictions = Some(stats.predictions.clone());
        // As the rule judges it: only a finite, non-degenerate check can be unstable.
        let unstable = non_finite.is_none()
            && degenerate.is_none()
            && self.stopping.is_unstable(curve.unablated_accuracy)
            && self.stopping.state().stopped.is_none();
        let decision = match (&non_finite, &degenerate) {
            (Some(what), _) => self.stopping.stop(StopReason::NonFinite {
                epoch,
                what: what.clone(),
            }),
            (None, Some(what)) => self.stopping.degenerate(epoch, what),
            (None, None) => {
                self.stopping
                    .update_check(epoch, metric, Some(curve.unablated_accuracy))
            }
        };
        let kept = self.stopping.kept_last();
        if kept && self.config.restore_best.enabled {
            match varmap {
                Some(vm) => {
                    if let Err(e) = self.snapshot(vm, epoch) {
                        (self.stopping, self.predictions) = before;
                        return Err(e);
                    }
                }
                None if !self.warned_no_weights => {
                    self.warned_no_weights = true;
                    tracing::warn!("restore_best is on but no VarMap was given (use on_epoch_end); weights are not snapshotted");
                }
                None => {}
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let smoothed = self.stopping.state().smoothed.unwrap_or(metric);
        let record = CheckRecord {
            epoch,
            metric: metric_kind,
            value: metric,
            smoothed,
            auc: curve.auc,
            auc_ci: curve.auc_ci,
            normalized_auc: curve.normalized_auc,
            unablated_accuracy: curve.unablated_accuracy,
            noise_auc: noise.as_ref().map(|n| n.auc),
            prediction_changes: changes,
            unstable,
            kept,
            decision: decision.clone(),
            seconds,
            curve,
            noise,
            selectivity,
            degenerate: degenerate.clone(),
        };
        let selectivity_log = record
            .selectivity
            .as_ref()
            .map(|s| serde_json::to_string(s).unwrap_or_default());
        let [ci_lo, ci_hi] = record.auc_ci.unwrap_or([f64::NAN; 2]);
        // Optional fields (noise, selectivity, reason) are left out of the event when absent.
        tracing::info!(
            epoch,
            metric = metric_kind.name(),
            value = metric,
            smoothed,
            auc = record.auc,
            auc_ci_low = ci_lo,
            auc_ci_high = ci_hi,
            normalized_auc = record.normalized_auc,
            accuracy_0 = record.unablated_accuracy,
            noise_auc = record.noise_auc,
            prediction_changes = changes,
            unstable,
            selectivity = selectivity_log.as_deref(),
            kept,
            seconds,
            decision = if decision.is_stop() {
                "stop"
            } else {
                "continue"
            },
            reason = decision.reason().map(tracing::field::display),
            degenerate = degenerate.as_deref(),
            batched = record.curve.batched,
            incremental = record.curve.incremental,
            "reliance check"
        );
        if let Some(path) = &self.config.output.history_file {
            append_json_line(path, &record)?;
        }
        self.history.push(record);
        Ok(decision)
    }

    /// The weights that are NaN or infinite, named; in a data-parallel run, the ranks that
    /// hold such weights (the same words on every rank, so that every rank records the same
    /// decision).
    fn non_finite_weights_on_ranks(&self, varmap: Option<&VarMap>) -> Result<Option<String>> {
        let local = varmap.map(non_finite_weights).transpose()?.flatten();
        let Some(c) = &self.collective else {
            return Ok(local);
        };
        let mut ranks = vec![0u64; c.world_size()];
        if let Some(what) = &local {
            tracing::warn!(rank = c.rank(), what = %what, "non-finite weights on this rank");
            ranks[c.rank()] = 1;
        }
        c.all_reduce_sum_u64(&mut ranks)?;
        let bad: Vec<usize> = (0..ranks.len()).filter(|&r| ranks[r] > 0).collect();
        Ok((!bad.is_empty()).then(|| format!("weights on rank(s) {bad:?}")))
    }

    fn snapshot(&mut self, varmap: &VarMap, epoch: usize) -> Result<()> {
        match self.config.restore_best.mode {
            SnapshotMode::Memory => {
                let vars = varmap
                    .data()
                    .lock()
                    .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
                // `copy` detaches the values from the variables the optimizer keeps updating.
                let snap = vars
                    .iter()
                    .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
                    .collect::<Result<Vec<_>>>()?;
                self.snapshot = Some(snap);
            }
            SnapshotMode::Disk => {
                files::save_snapshot(varmap, &self.config.restore_best.path, epoch)?
            }
        }
        Ok(())
    }

    /// Ends the run: when `restore_best` is on, puts the weights of the best epoch back into
    /// `varmap` (whether or not training stopped early) and returns that epoch.
    pub fn finish(&mut self, varmap: &VarMap) -> Result<Option<usize>> {
        let Some(best) = self.stopping.kept_epoch() else {
            return Ok(None);
        };
        if !self.config.restore_best.enabled {
            return Ok(None);
        }
        match self.config.restore_best.mode {
            // A clone shares the variables: setting through it sets the caller's.
            SnapshotMode::Memory => match &self.snapshot {
                Some(s) => varmap
                    .clone()
                    .set(s.iter().map(|(name, value)| (name, value)))?,
                None => {
                    tracing::warn!(best_epoch = best, "no in-memory snapshot of the best epoch (resumed run?); weights left as they are");
                    return Ok(None);
                }
            },
            SnapshotMode::Disk => {
                let path = &self.config.restore_best.path;
                let file = files::load_snapshot(varmap, path, best)?;
                // The kept weights end where the configuration says, under their own name.
                if file != *path {
                    files::fault_point();
                    std::fs::rename(&file, path).map_err(|e| io_err("rename", &file, e))?;
                }
            }
        }
        tracing::info!(best_epoch = best, "restored the weights of the best epoch");
        Ok(Some(best))
    }

    /// The state to save for resuming.
    pub fn state(&self) -> MonitorState {
        MonitorState {
            stopping: self.stopping.state().clone(),
            history: self.history.clone(),
            last_epoch: self.last_epoch,
            decides: decides(&self.config).ok(),
            predictions: self.predictions.clone(),
        }
    }

    /// Writes the state as JSON, atomically.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let json = serde_json::to_string(&self.state()).map_err(candle_core::Error::msg)?;
        write_atomic(path.as_ref(), |tmp| {
            std::fs::write(tmp, &json).map_err(|e| io_err("write", tmp, e))
        })
    }

    fn save_state_if_configured(&self) -> Result<()> {
        match &self.config.output.state_file {
            Some(p) => self.save_state(p),
            None => Ok(()),
        }
    }

    /// All checks so far.
    pub fn history(&self) -> &[CheckRecord] {
        &self.history
    }

    /// The epoch the stopping rule keeps so far: the one `finish` restores.
    pub fn best_epoch(&self) -> Option<usize> {
        self.stopping.kept_epoch()
    }

    /// The configuration.
    pub fn config(&self) -> &RelianceConfig {
        &self.config
    }

    /// The fixed subset checks run on.
    pub fn data(&self) -> &ProbeData {
        &self.data
    }
}

/// The first weight of `varmap` holding a NaN or an infinity, named.
fn non_finite_weights(varmap: &VarMap) -> Result<Option<String>> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?;
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let v = vars[name].as_tensor();
        if !v.dtype().is_float() {
            continue;
        }
        // x − x is 0 for every finite x and NaN for NaN and ±inf: one reduction per variable.
        let x = v.to_dtype(candle_core::DType::F32)?;
        if !x.sub(&x)?.sum_all()?.to_scalar::<f32>()?.is_finite() {
            return Ok(Some(format!("weights in `{name}`")));
        }
    }
    Ok(None)
}

/// The first probe whose activations were NaN or infinite in the statistics pass, named.
fn non_finite_activations(stats: &UnitStatistics) -> Option<String> {
    stats
        .probes
        .iter()
        .find(|p| !p.value.finite())
        .map(|p| format!("activations at probe `{}`", p.name))
}

/// How the network is degenerate on the probe subset, if it is: one predicted class for every
/// sample (while the labels hold several), every probed unit silent, or (for the normalized AUC,
/// a ratio to the accuracy) no sample predicted right.
fn degenerate(stats: &UnitStatistics, metric: Metric) -> Option<String> {
    if metric == Metric::NormalizedAuc && stats.accuracy == 0.0 {
        return Some(
            "no sample of the probe subset is predicted right (the normalized AUC is undefined)"
                .to_string(),
        );
    }
    let label_classes = stats.class_counts.iter().filter(|&&k| k > 0).count();
    if let Some(&first) = stats.predictions.first() {
        if label_classes > 1 && stats.predictions.iter().all(|&p| p == first) {
            return Some(format!(
                "it predicts class {first} for every sample of the probe subset"
            ));
        }
    }
    let silent = stats
        .probes
        .iter()
        .all(|p| p.value.mean.iter().all(|&m| m == 0.0) && p.value.std.iter().all(|&s| s == 0.0));
    silent.then(|| "every probed unit is silent (zero) on the probe subset".to_string())
}

/// The files the monitor writes, with their configuration keys.
fn output_files(config: &RelianceConfig) -> Vec<(&'static str, &Path)> {
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
fn disk_snapshot(config: &RelianceConfig) -> Option<&Path> {
    (config.restore_best.enabled && config.restore_best.mode == SnapshotMode::Disk)
        .then_some(config.restore_best.path.as_path())
}

/// Moves the epoch snapshots of an earlier run (`PATH.epochE`) aside, as a fresh run does with
/// every file it would write.
fn move_aside_snapshots(path: &Path) -> Result<()> {
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
