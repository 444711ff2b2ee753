//! The training-loop plugin: measures reliance every few epochs, decides when to stop, and puts
//! the best epoch's weights back.
//!
//! ```no_run
//! # use candle_core::{Module, Tensor};
//! # fn batches() -> Vec<(Vec<u32>, Tensor)> { vec![] }
//! # fn demo(model: &impl Module, varmap: &candle_nn::VarMap, xs: Tensor, ys: Tensor) -> candle_core::Result<()> {
//! use candle_reliance::{ProbeData, ProbeSet, RelianceMonitor};
//! let probes = ProbeSet::new(); // the model holds probes.add("fc1")?, ... after its activations
//! let mut monitor = RelianceMonitor::from_yaml_file("reliance.yaml", probes, ProbeData::new(xs, ys)?)?;
//! for epoch in 1..=100 {
//!     for (indices, inputs) in batches() {
//!         let logits = model.forward(&inputs)?;
//!         monitor.observe(&indices, &logits)?; // optional: Label Wave on every training example
//!         // ... loss, backward step
//!     }
//!     if monitor.on_epoch_end(epoch, model, varmap)?.is_stop() { break; }
//! }
//! monitor.finish(varmap)?; // restores the best epoch's weights
//! # Ok(()) }
//! ```

mod config;
mod persistence;
pub(crate) use persistence::files;
mod label_wave;
mod record;
mod stopping;

pub use config::{
    DataConfig, OutputConfig, RelianceConfig, RestoreBestConfig, ScheduleConfig, SnapshotMode,
};
pub use label_wave::{
    LabelWave, LabelWaveRule, LabelWaveState, PredictionChanges, MAX_PATIENCE, MAX_WINDOW,
};
pub use record::{read_history, CheckRecord};
pub use stopping::{
    Best, ChangeSource, CheckSignals, Decision, EarlyStopping, EarlyStoppingStrategy, Health,
    Metric, Observation, StopReason, StoppingRule, StoppingState, Warning, ACCURACY_SWING,
};

use crate::collective::Collective;
use crate::error::{bail, fail, Error};
use crate::measurement::UnitStatistics;
use crate::units::Selectivity;
use crate::Result;
use crate::{Measurement, ProbeData, ProbeSet};
use candle_core::{ModuleT, Tensor};
use candle_nn::VarMap;
use files::{append_json_line, io_err, move_aside, write_atomic, DirLock};
use persistence::*;
pub use persistence::{MonitorState, ProbeDataPrint, STATE_FORMAT};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Measures the ablation AUC on a fixed training subset every `check_every` epochs and decides
/// when to stop and which epoch to restore. See the [crate docs](crate) for the loop.
pub struct RelianceMonitor {
    config: RelianceConfig,
    probes: ProbeSet,
    data: ProbeData,
    /// Training examples in the data given (before the subset was drawn): the index range
    /// [`RelianceMonitor::observe`] accepts.
    training_samples: usize,
    strategy: Box<dyn EarlyStoppingStrategy>,
    /// A resumed monitor's saved stopping state, until its first epoch: a strategy given with
    /// [`RelianceMonitor::with_strategy`] in the meantime loads it.
    resumed: Option<Resumed>,
    /// Set once the monitor said stop: later epochs repeat it without a check.
    stopped: Option<StopReason>,
    history: Vec<CheckRecord>,
    last_epoch: Option<usize>,
    /// The unablated predictions of the last check.
    predictions: Option<Vec<u32>>,
    /// The training loop's predictions ([`RelianceMonitor::observe`]).
    observed: Option<label_wave::PredictionChanges>,
    /// The epoch whose weights are held (in memory or on disk).
    kept: Option<usize>,
    snapshot: Option<Vec<(String, Tensor)>>,
    /// Recent check epochs whose weights are held for a strategy that may move its kept epoch
    /// back ([`EarlyStoppingStrategy::lookback`]).
    held: Vec<Held>,
    /// The epochs of the snapshot files the last committed state names (disk mode).
    committed_snapshots: Vec<usize>,
    warned_no_weights: bool,
    /// The history file missed a line (a failed write): the next epoch rewrites it whole.
    history_behind: bool,
    /// The rank's group in a data-parallel run.
    collective: Option<Arc<dyn Collective>>,
    _locks: Vec<DirLock>,
    /// The probe subset's fingerprint, saved in the state.
    probe_data: ProbeDataPrint,
    /// The probes (name, units) at the last check, saved in the state.
    probe_widths: Option<Vec<(String, usize)>>,
    /// A resumed run's probes as saved: its first check must find the same.
    expect_probes: Option<Vec<(String, usize)>>,
}

impl std::fmt::Debug for RelianceMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelianceMonitor")
            .field("probes", &self.probes)
            .field("probe_samples", &self.data.len())
            .field("checks", &self.history.len())
            .field("last_epoch", &self.last_epoch)
            .field("kept_epoch", &self.kept)
            .field("stopped", &self.stopped)
            .field("rank", &self.collective.as_ref().map(|c| c.rank()))
            .finish_non_exhaustive()
    }
}

impl RelianceMonitor {
    /// A monitor for a fresh run. `data` is training data; the monitor draws its fixed subset of
    /// `data.subset_size` samples from it. Output files that already exist are moved aside to
    /// `NAME.N.bak`, never overwritten.
    pub fn new(config: RelianceConfig, probes: ProbeSet, data: ProbeData) -> Result<Self> {
        config.validate()?;
        let locks = prepare_files(&config)?;
        for (_, path) in output_files(&config) {
            // Half-written files of a crashed run: never the user's, never worth keeping.
            files::remove_tmp(path)?;
            if let Some(to) = move_aside(path)? {
                tracing::warn!(from = %path.display(), to = %to.display(), "moved an existing file aside");
            }
        }
        if let Some(path) = disk_snapshot(&config) {
            files::remove_stale_snapshots(path, &[], true)?;
            move_aside_snapshots(path)?;
        }
        Self::build(config, probes, data, None, locks)
    }

    /// [`RelianceMonitor::new`] with the configuration read from a YAML file.
    pub fn from_yaml_file(
        path: impl AsRef<Path>,
        probes: ProbeSet,
        data: ProbeData,
    ) -> Result<Self> {
        Self::new(RelianceConfig::from_yaml_file(path)?, probes, data)
    }

    /// Decides with `strategy` instead of the built-in rule ([`EarlyStopping`] with the
    /// configuration's `stopping:` section). Give it before the first epoch; a resumed monitor
    /// loads the saved state into it.
    ///
    /// ```no_run
    /// # use candle_reliance::monitor::*;
    /// # struct MyRule;
    /// # impl EarlyStoppingStrategy for MyRule {
    /// #     fn step(&mut self, _: &Observation) -> Decision { Decision::Continue }
    /// #     fn kept_epoch(&self) -> Option<usize> { None }
    /// # }
    /// # fn demo(monitor: candle_reliance::RelianceMonitor) -> candle_core::Result<()> {
    /// let monitor = monitor.with_strategy(Box::new(MyRule))?;
    /// # Ok(()) }
    /// ```
    pub fn with_strategy(mut self, mut strategy: Box<dyn EarlyStoppingStrategy>) -> Result<Self> {
        if self.last_epoch.is_some() && self.resumed.is_none() {
            bail!(
                Usage,
                "with_strategy: give the strategy before the first epoch"
            );
        }
        if self.config.output.state_file.is_some() && strategy.save_state().is_none() {
            bail!(
                Usage,
                "with_strategy: output.state_file is set, but this strategy cannot save its state \
                 (implement save_state and load_state, or set output.state_file: null)"
            );
        }
        if let Some(r) = &mut self.resumed {
            strategy.load_state(r.stopping.clone())?;
            r.check_kept(strategy.as_ref())?;
            r.load_error = None;
        }
        self.strategy = strategy;
        Ok(self)
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
        check_resumable(&config, &state)?;
        let locks = prepare_files(&config)?;
        // The state is authoritative: the history is what it holds (lines of checks it never
        // committed are dropped), snapshot files it does not name and temporary files go.
        if let Some(path) = &config.output.history_file {
            // Lines of checks the state never committed are moved aside with the old file,
            // not deleted; only a last line cut by the crash is dropped.
            if let Some(to) = files::rewrite_json_lines(path, &state.history)? {
                tracing::warn!(
                    from = %path.display(),
                    to = %to.display(),
                    "the history file holds checks the state never committed; moved it aside \
                     and rewrote it from the state"
                );
            }
        }
        if let Some(path) = &config.output.state_file {
            files::remove_tmp(path)?;
        }
        // After a stop no held epoch can become the kept one: `finish` may have removed them.
        let mut state = state;
        if state.stopped.is_some() {
            state.held_epochs.clear();
        }
        if let Some(path) = disk_snapshot(&config) {
            for &epoch in state.kept_epoch.iter().chain(&state.held_epochs) {
                let file = files::snapshot_path(path, epoch);
                let renamed = Some(epoch) == state.kept_epoch && path.exists();
                if !(file.exists() || renamed) {
                    bail!(
                        Resume,
                        "cannot resume: the state names the weights of epoch {epoch}, but {} is \
                         missing",
                        file.display()
                    );
                }
            }
            files::remove_tmp(path)?;
            let keep: Vec<usize> = state
                .kept_epoch
                .into_iter()
                .chain(state.held_epochs.iter().copied())
                .collect();
            files::remove_stale_snapshots(path, &keep, false)?;
        }
        if config.restore_best.enabled
            && config.restore_best.mode == SnapshotMode::Memory
            && state.kept_epoch.is_some()
        {
            tracing::warn!(
                "resuming with restore_best.mode: memory; the best weights so far were held by the \
                 interrupted process and can only be restored if a later epoch becomes the best"
            );
        }
        let mut monitor = Self::build(config, probes, data, Some(state), locks)?;
        monitor.committed_snapshots = monitor.snapshot_epochs();
        Ok(monitor)
    }

    /// Reads a state file written through `output.state_file` or [`RelianceMonitor::save_state`].
    /// A file of an earlier version (without the format number this version writes) is an error
    /// that says so.
    pub fn load_state(path: impl AsRef<Path>) -> Result<MonitorState> {
        persistence::load_state(path.as_ref())
    }

    fn build(
        config: RelianceConfig,
        probes: ProbeSet,
        data: ProbeData,
        state: Option<MonitorState>,
        locks: Vec<DirLock>,
    ) -> Result<Self> {
        let training_samples = data.len();
        let data = data.subset(config.data.subset_size, config.data.seed)?;
        let probe_data = ProbeDataPrint::of(&data, training_samples)?;
        if let Some(saved) = state.as_ref().and_then(|s| s.probe_data.as_ref()) {
            if let Some(what) = probe_data.differences(saved) {
                bail!(
                    Resume,
                    "cannot resume on other probe data than the interrupted run's: {what}"
                );
            }
        }
        let mut strategy: Box<dyn EarlyStoppingStrategy> =
            Box::new(EarlyStopping::new(config.stopping.clone()));
        let mut monitor = Self {
            config,
            probes,
            data,
            training_samples,
            strategy: Box::new(EarlyStopping::new(Default::default())),
            resumed: None,
            stopped: None,
            history: vec![],
            last_epoch: None,
            predictions: None,
            observed: None,
            kept: None,
            snapshot: None,
            held: vec![],
            committed_snapshots: vec![],
            warned_no_weights: false,
            history_behind: false,
            collective: None,
            _locks: locks,
            probe_data,
            probe_widths: None,
            expect_probes: None,
        };
        if let Some(state) = state {
            let mut resumed = Resumed {
                stopping: state.stopping.clone(),
                kept_epoch: state.kept_epoch,
                load_error: None,
            };
            // A run decided by a strategy of the user's loads its state with `with_strategy`.
            match strategy.load_state(state.stopping.clone()) {
                Ok(()) => resumed.check_kept(strategy.as_ref())?,
                Err(e) => resumed.load_error = Some(e.to_string()),
            }
            if let Some(p) = &state.predictions {
                if p.len() != monitor.data.label_values().len() {
                    bail!(
                        Resume,
                        "cannot resume: the state holds predictions for {} probe labels, the \
                         probe data has {}",
                        p.len(),
                        monitor.data.label_values().len()
                    );
                }
            }
            if let Some(p) = &state.training_predictions {
                let tokens = monitor.data.tokens();
                if p.len() != training_samples * tokens {
                    let given = match tokens {
                        1 => format!("{training_samples}"),
                        t => format!("{training_samples} × {t} tokens = {}", training_samples * t),
                    };
                    bail!(
                        Resume,
                        "cannot resume: the state holds {} training predictions, the data given \
                         has {given}",
                        p.len()
                    );
                }
            }
            monitor.resumed = Some(resumed);
            monitor.kept = state.kept_epoch;
            // Held weights survive only as files (disk mode); in memory they died with the
            // interrupted process.
            monitor.held = state
                .held_epochs
                .iter()
                .map(|&epoch| Held {
                    epoch,
                    weights: None,
                })
                .collect();
            monitor.stopped = state.stopped;
            monitor.history = state.history;
            monitor.last_epoch = state.last_epoch;
            monitor.predictions = state.predictions;
            monitor.probe_widths = state.probes.clone();
            monitor.expect_probes = state.probes;
            let tokens = monitor.data.tokens();
            monitor.observed = state
                .training_predictions
                .map(|p| label_wave::PredictionChanges::with_previous_tokens(p, tokens));
        }
        monitor.strategy = strategy;
        Ok(monitor)
    }

    /// A monitor for one rank of a data-parallel run: every rank passes the same configuration
    /// and data and its member of the group. Each rank measures its shard of the subset and the
    /// counts are all-reduced ([`crate::collective`]), so every rank sees the same curve and
    /// makes the same decisions; weights that are NaN or infinite on any rank stop every rank.
    /// Only rank 0 writes the history, state and snapshot files; the other ranks keep their best
    /// weights in memory and restore them in [`RelianceMonitor::finish`] as rank 0 does.
    ///
    /// Every rank must call [`RelianceMonitor::on_epoch_end`] for the same epochs: a check is a
    /// fixed sequence of all-reduces. Prediction changes from [`RelianceMonitor::observe`] are
    /// summed over the ranks, so each rank reports the batches it trained on.
    pub fn new_ranked(
        mut config: RelianceConfig,
        probes: ProbeSet,
        data: ProbeData,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        if collective.rank() != 0 {
            config = without_files(config);
        }
        // A rank that cannot start must not leave the others waiting in the comparison below.
        let mut monitor = Self::new(config, probes, data)
            .inspect_err(|e| collective.abort(&format!("new_ranked: {e}")))?;
        monitor.same_setup_on_every_rank(collective.as_ref())?;
        monitor.collective = Some(collective);
        Ok(monitor)
    }

    /// Compares fingerprints of the settings that decide and of the probe data across the
    /// ranks; if any differs, every rank fails with an error naming what (the same sums, the
    /// same verdict everywhere).
    fn same_setup_on_every_rank(&self, collective: &dyn Collective) -> Result<()> {
        let d = decides(&self.config)?;
        let parts = [
            ("schedule", d["schedule"].to_string()),
            ("data", d["data"].to_string()),
            ("ablation", d["ablation"].to_string()),
            ("stopping", d["stopping"].to_string()),
            (
                "probe data",
                serde_json::to_string(&self.probe_data).map_err(|e| fail!(Data, "{e}"))?,
            ),
        ];
        let prints: Vec<u64> = parts
            .iter()
            .map(|(_, text)| fold24(fnv1a(text.bytes())))
            .collect();
        let differ: Vec<&str> = parts
            .iter()
            .zip(differ_across_ranks(collective, &prints)?)
            .filter(|(_, d)| *d)
            .map(|((name, _), _)| *name)
            .collect();
        if !differ.is_empty() {
            bail!(
                Rank,
                "new_ranked: the ranks were given different {}; every rank passes the same \
                 configuration and probe data",
                differ.join(", ")
            );
        }
        Ok(())
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
        // A rank that cannot resume must not leave the others waiting in the comparison below.
        let abort = |e: Error| {
            collective.abort(&format!("resume_ranked: {e}"));
            e
        };
        let rank = collective.rank();
        let local = move || -> Result<Self> {
            if rank == 0 {
                return Self::resume(config, probes, data, state);
            }
            config.validate()?;
            check_resumable(&config, &state)?;
            let snapshot = match (state.kept_epoch, disk_snapshot(&config)) {
                (Some(kept), Some(path)) => {
                    let (_, saved) = files::read_snapshot(path, kept, data.xs().device())?;
                    Some(saved.into_iter().collect())
                }
                _ => None,
            };
            let held = match disk_snapshot(&config) {
                Some(path) => state
                    .held_epochs
                    .iter()
                    .map(|&epoch| {
                        let (_, saved) = files::read_snapshot(path, epoch, data.xs().device())?;
                        Ok(Held {
                            epoch,
                            weights: Some(saved.into_iter().collect()),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                None => vec![],
            };
            let mut monitor =
                Self::build(without_files(config), probes, data, Some(state), vec![])?;
            monitor.snapshot = snapshot;
            if !held.is_empty() {
                monitor.held = held;
            }
            Ok(monitor)
        };
        let mut monitor = local().map_err(abort)?;
        if differ_across_ranks(collective.as_ref(), &[fingerprint])?[0] {
            bail!(
                Rank,
                "resume_ranked: the ranks were given different states; pass every rank the state \
                 rank 0 saved"
            );
        }
        monitor.collective = Some(collective);
        Ok(monitor)
    }

    /// Reports the training loop's predictions for one batch: `indices[i]` is the index, in the
    /// training data given to the monitor, of the sample in row `i` of `logits`
    /// `(batch, classes)`. Optional: with it, Label Wave counts prediction changes over every
    /// training example from one epoch to the next (the forward passes the loop makes anyway),
    /// which decides the stop far more steadily than the probe data's changes between checks.
    /// Call it in every epoch once you start.
    ///
    /// With token labels (probe data `(N, T)`) the logits are `(batch, T, classes)` and every
    /// token's prediction counts; use [`RelianceMonitor::observe_masked`] for padded batches.
    pub fn observe(&mut self, indices: &[u32], logits: &Tensor) -> Result<()> {
        self.observe_masked(indices, logits, None)
    }

    /// [`RelianceMonitor::observe`] for a token-level task with padded batches: tokens where
    /// `mask` (`(batch, T)`, any dtype; an attention mask) is zero are not counted.
    pub fn observe_masked(
        &mut self,
        indices: &[u32],
        logits: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        let err = |e: Error| e.context("observe");
        match &mut self.observed {
            Some(counter) => counter.record_masked(indices, logits, mask).map_err(err),
            // The counter exists from the first batch recorded: a refused first call leaves the
            // monitor as if it had not been made.
            None => {
                let mut counter = label_wave::PredictionChanges::with_tokens(
                    self.training_samples,
                    self.data.tokens(),
                );
                counter.record_masked(indices, logits, mask).map_err(err)?;
                self.observed = Some(counter);
                Ok(())
            }
        }
    }

    /// Call after each training epoch (`epoch` counts from 1). Runs a check when the schedule
    /// says so, snapshots the weights in `varmap` when the rule keeps this epoch (when
    /// `restore_best` is on) and returns whether to stop.
    pub fn on_epoch_end(
        &mut self,
        epoch: usize,
        model: &impl ModuleT,
        varmap: &VarMap,
    ) -> Result<Decision> {
        let r = self.epoch_end(epoch, model, Some(varmap));
        self.abort_on_error(epoch, r)
    }

    /// [`RelianceMonitor::on_epoch_end`] for models whose weights are not in a [`VarMap`]: the
    /// best weights cannot be restored.
    pub fn check(&mut self, epoch: usize, model: &impl ModuleT) -> Result<Decision> {
        let r = self.epoch_end(epoch, model, None);
        self.abort_on_error(epoch, r)
    }

    /// In a data-parallel run, an epoch that failed on this rank fails the group: the other
    /// ranks' collective calls return an error naming this rank instead of waiting for it.
    fn abort_on_error(&self, epoch: usize, r: Result<Decision>) -> Result<Decision> {
        if let (Err(e), Some(c)) = (&r, &self.collective) {
            c.abort(&format!("epoch {epoch}: {e}"));
        }
        r
    }

    fn epoch_end(
        &mut self,
        epoch: usize,
        model: &impl ModuleT,
        varmap: Option<&VarMap>,
    ) -> Result<Decision> {
        if let Some(c) = &self.collective {
            // Every rank reports the same epoch, or none continues: a rank that skipped one
            // would pair its sums with another epoch's.
            let mut epochs = vec![0u64; c.world_size()];
            epochs[c.rank()] = epoch as u64;
            c.all_reduce_sum_u64(&mut epochs)?;
            if epochs.iter().any(|&e| e != epoch as u64) {
                bail!(
                    Rank,
                    "the ranks reported different epochs (by rank): {epochs:?}; every rank \
                     reports every epoch"
                );
            }
        }
        if let Some(last) = self.last_epoch {
            if epoch <= last {
                bail!(
                    Usage,
                    "epoch {epoch} reported after epoch {last}; epochs must increase"
                );
            }
        }
        if let Some(Resumed {
            load_error: Some(e),
            ..
        }) = &self.resumed
        {
            bail!(
                Resume,
                "cannot continue the resumed run: its saved stopping state is not the built-in \
                 rule's ({e}); give the strategy the run was made with to with_strategy"
            );
        }
        if let Some(reason) = &self.stopped {
            self.last_epoch = Some(epoch);
            return Ok(Decision::Stop {
                reason: reason.clone(),
            });
        }
        // A check's events (the check, the rule's warnings, a stop) go in its span.
        let span = self
            .config
            .schedule
            .is_check_epoch(epoch)
            .then(|| tracing::info_span!("reliance_check", epoch));
        let _enter = span.as_ref().map(|s| s.enter());
        // Until the state file names this epoch, a failure (a snapshot or state that cannot be
        // written, a full disk) puts everything back: the same epoch can be reported again and
        // decides the same.
        let before = Rollback::of(self);
        let (decision, record) = match self.prepare(epoch, model, varmap) {
            Ok(prepared) => prepared,
            Err(e) => return Err(before.restore(self, epoch, e)),
        };
        if let Some((record, predictions)) = &record {
            self.history.push(record.clone());
            self.predictions = Some(predictions.clone());
        }
        if let Decision::Stop { reason } = &decision {
            self.stopped = Some(reason.clone());
        }
        self.last_epoch = Some(epoch);
        if let Err(e) = self.save_state_if_configured() {
            return Err(before.restore(self, epoch, e));
        }
        self.resumed = None;
        // The epoch is committed. The history file follows the state (a resume rewrites it
        // from the state in any case).
        if let Some((record, _)) = &record {
            log_check(record);
            if let Some(path) = &self.config.output.history_file {
                let written = if self.history_behind {
                    files::rewrite_json_lines(path, &self.history).map(|_| ())
                } else {
                    append_json_line(path, record)
                };
                self.history_behind = written.is_err();
                written.map_err(|e| {
                    e.map_message(|m| {
                        format!(
                            "{m} (output.history_file; epoch {epoch} is recorded in the state, \
                             and the history file is rewritten from it at the next epoch)"
                        )
                    })
                })?;
            }
        } else if let Decision::Stop { reason } = &decision {
            tracing::info!(epoch, decision = "stop", reason = %reason, "reliance monitor");
        }
        // Only now, with the state naming the new snapshot committed, may the old one go.
        if let Some(path) = disk_snapshot(&self.config) {
            let keep = self.snapshot_epochs();
            if keep != self.committed_snapshots {
                files::remove_stale_snapshots(path, &keep, false)?;
                self.committed_snapshots = keep;
            }
        }
        Ok(decision)
    }

    /// The epoch up to what the state file is written from: the training set's prediction
    /// changes, the check when scheduled, the rule's step and warnings, the snapshot. Returns the
    /// decision and, for a check, its history record and the probe data's predictions.
    fn prepare(
        &mut self,
        epoch: usize,
        model: &impl ModuleT,
        varmap: Option<&VarMap>,
    ) -> Result<(Decision, Option<CheckOutcome>)> {
        let training_changes = self.training_changes(epoch)?;
        let measured = if self.config.schedule.is_check_epoch(epoch) {
            Some(self.measure(epoch, model, varmap)?)
        } else {
            None
        };
        let observation = Observation {
            epoch,
            training_changes: training_changes.map(|n| n as f64),
            check: measured.as_ref().map(|m| m.signals.clone()),
            budget_end: self.config.schedule.max_epochs.is_some_and(|m| epoch >= m),
        };
        let decision = self.strategy.step(&observation);
        let warnings = self.strategy.take_warnings();
        let kept = self.strategy.kept_epoch();
        let lookback = self.strategy.lookback();
        let held = |k: usize| self.held.iter().any(|h| h.epoch == k);
        // Only where weights are snapshotted does the monitor need to hold the kept epoch's.
        let snapshots = self.config.restore_best.enabled && varmap.is_some();
        if snapshots && kept != self.kept && kept != Some(epoch) && !kept.is_some_and(held) {
            bail!(Usage,
                "the stopping strategy moved its kept epoch from {:?} to {kept:?} at epoch {epoch}; \
                 only the epoch just stepped or one of the last {lookback} check epochs \
                 (`lookback`) can become the kept one: the monitor holds no other weights",
                self.kept
            );
        }
        let kept_now = kept == Some(epoch) && self.kept != kept;
        if kept != self.kept && self.config.restore_best.enabled {
            match (varmap, kept) {
                (Some(vm), Some(k)) if k == epoch => self.snapshot(vm, epoch)?,
                (Some(_), Some(k)) => self.restore_held(k),
                (Some(_), None) => {}
                (None, _) if !self.warned_no_weights => {
                    self.warned_no_weights = true;
                    tracing::warn!("restore_best is on but no VarMap was given (use on_epoch_end); weights are not snapshotted");
                }
                (None, _) => {}
            }
        }
        self.kept = kept;
        // Hold this check's weights while the strategy may still move back to it.
        self.held.retain(|h| h.epoch + lookback > epoch);
        if let (true, true, Some(vm)) = (
            lookback > 0 && self.config.restore_best.enabled,
            measured.is_some(),
            varmap,
        ) {
            self.hold(vm, epoch, kept_now)?;
        }
        for w in &warnings {
            tracing::warn!(epoch, warning = %w, "reliance monitor");
        }
        let record = measured.map(|m| {
            let mut record = m.record;
            record.training_changes = training_changes;
            record.kept = kept_now;
            record.kept_epoch = kept;
            record.decision = decision.clone();
            record.warnings = warnings;
            (record, m.predictions)
        });
        Ok((decision, record))
    }

    /// Prediction changes over the training set since the previous epoch, from
    /// [`RelianceMonitor::observe`]. In a data-parallel run each rank counts the samples it
    /// reported and the counts are summed; the ranks' predictions are merged, so that every rank
    /// (and rank 0's state file) holds all of them for the next epoch.
    fn training_changes(&mut self, epoch: usize) -> Result<Option<usize>> {
        let collective = self.collective.clone();
        let merge = |preds: &mut [u32]| -> Result<()> {
            let Some(c) = &collective else {
                return Ok(());
            };
            // Per sample: the prediction + 1 in the low half, one in the high half per rank that
            // saw it; summed, the high half counts the ranks and the low half is the prediction.
            let mut buf: Vec<u64> = preds
                .iter()
                .map(|&p| match p {
                    label_wave::UNSEEN => 0,
                    p => (1u64 << 32) | (u64::from(p) + 1),
                })
                .collect();
            c.all_reduce_sum_u64(&mut buf)?;
            for (i, (p, v)) in preds.iter_mut().zip(buf).enumerate() {
                *p = match (v >> 32, v & 0xffff_ffff) {
                    (0, _) => label_wave::UNSEEN,
                    (1, q) => (q - 1) as u32,
                    (n, _) => bail!(Rank,
                        "observe(): training sample {i} was reported by {n} ranks in epoch {epoch}; \
                         each rank reports the batches it trains on"
                    ),
                };
            }
            Ok(())
        };
        let now = self.observed.as_ref().is_some_and(|c| c.recorded());
        let ever = self.observed.is_some();
        if let Some(c) = &collective {
            // Every rank takes the same path: the merge below is a collective call.
            let world = c.world_size() as u64;
            let mut flags = [u64::from(now), u64::from(ever)];
            c.all_reduce_sum_u64(&mut flags)?;
            match flags {
                [0, 0] => return Ok(None),
                [n, _] if n == world => {}
                [0, _] => bail!(Usage,
                    "observe() reported predictions in an earlier epoch but none in epoch {epoch}; \
                     report them in every epoch"
                ),
                [n, _] => {
                    bail!(Rank,
                    "observe(): {n} of {world} ranks reported predictions in epoch {epoch}; every \
                     rank must report its batches in every epoch, or none"
                )
                }
            }
        }
        let local =
            match &mut self.observed {
                Some(counter) if now => counter.end_epoch_with(merge)?,
                Some(_) => bail!(Usage,
                "observe() reported predictions in an earlier epoch but none in epoch {epoch}; \
                 report them in every epoch"
            ),
                None => return Ok(None),
            };
        let Some(c) = &collective else {
            return Ok(local);
        };
        // [changes, ranks with a count]: a rank that started reporting later has none yet.
        let mut sums = [local.unwrap_or(0) as u64, u64::from(local.is_some())];
        c.all_reduce_sum_u64(&mut sums)?;
        let world = c.world_size() as u64;
        match sums[1] {
            0 => Ok(None),
            n if n == world => Ok(Some(sums[0] as usize)),
            n => bail!(
                Rank,
                "observe(): {n} of {world} ranks compared epoch {epoch} with an epoch before; \
                 every rank must start reporting its batches in the same epoch"
            ),
        }
    }

    /// The check: the curves, the network's health and the probe data's prediction changes.
    fn measure(
        &mut self,
        epoch: usize,
        model: &impl ModuleT,
        varmap: Option<&VarMap>,
    ) -> Result<Measured> {
        let t0 = Instant::now();
        // A check with nothing to ablate would stop the run as collapsed much later.
        if self.probes.is_empty() {
            bail!(
                Probe,
                "reliance check at epoch {epoch}: the ProbeSet has no probes; add one after each \
                 hidden activation of the model (probes.add(name)) before the first check"
            );
        }
        let mut m = Measurement::new(model, &self.probes, &self.data)
            .with_batching(self.config.batching.clone());
        if let Some(c) = &self.collective {
            m = m.with_collective(c.as_ref());
        }
        let curve = m.ablation_curve(&self.config.ablation)?;
        // The curve's unclamped variant was the statistics pass: no extra forward here.
        let stats = m.statistics()?;
        let found: Vec<(String, usize)> = stats
            .probes
            .iter()
            .map(|p| (p.name.clone(), p.units))
            .collect();
        if found.iter().all(|(_, units)| *units == 0) {
            bail!(
                Probe,
                "reliance check at epoch {epoch}: no probe has a unit to ablate: {}; a probe \
                 must see activations of shape (N, U), (N, T, U) or (N, C, H, W) with U, C > 0",
                probe_list(&found)
            );
        }
        if let Some(saved) = &self.expect_probes {
            if *saved != found {
                bail!(
                    Resume,
                    "cannot continue the resumed run at epoch {epoch}: its probes were {}, the \
                     model's are {}",
                    probe_list(saved),
                    probe_list(&found)
                );
            }
        }
        self.expect_probes = None;
        self.probe_widths = Some(found);
        let noise = match &self.config.noise {
            Some(spec) => Some(m.noise_curve(spec)?),
            None => None,
        };
        let selectivity = if self.config.selectivity {
            Some(Selectivity::from_stats(stats).means())
        } else {
            None
        };
        let metric_kind = self.config.stopping.metric;
        let metric = metric_kind.of(&curve);
        let non_finite = match self.non_finite_weights_on_ranks(varmap)? {
            Some(what) => Some(what),
            None if !curve.finite => Some("logits on the probe data".to_string()),
            None => non_finite_activations(stats),
        };
        let degenerate = degenerate(stats, metric_kind);
        let changes = self.predictions.as_ref().map(|prev| {
            prev.iter()
                .zip(&stats.predictions)
                .filter(|(a, b)| a != b)
                .count()
        });
        // A degenerate network's metric may be undefined (the normalized AUC of a network with
        // no right answer); any other non-finite metric is divergence.
        let health = match (&non_finite, &degenerate) {
            (Some(what), _) => Health::NonFinite(what.clone()),
            (None, Some(what)) => Health::Degenerate(what.clone()),
            (None, None) if !metric.is_finite() => {
                Health::NonFinite(format!("reliance metric ({metric})"))
            }
            (None, None) => Health::Healthy,
        };
        let signals = CheckSignals::new(metric, curve.unablated_accuracy)
            .with_areas(curve.auc, curve.normalized_auc, curve.agreement_auc)
            .with_prediction_changes(changes.map(|n| n as f64))
            .with_health(health);
        let predictions = stats.predictions.clone();
        let record = CheckRecord {
            epoch,
            metric: metric_kind,
            value: metric,
            auc: curve.auc,
            auc_ci: curve.auc_ci,
            normalized_auc: curve.normalized_auc,
            unablated_accuracy: curve.unablated_accuracy,
            noise_auc: noise.as_ref().map(|n| n.auc),
            prediction_changes: changes,
            training_changes: None,
            kept: false,
            kept_epoch: None,
            warnings: vec![],
            decision: Decision::Continue,
            seconds: t0.elapsed().as_secs_f64(),
            curve,
            noise,
            selectivity,
            degenerate,
        };
        Ok(Measured {
            signals,
            record,
            predictions,
        })
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

    /// The epochs whose snapshot files the state names: the kept one and the held ones.
    fn snapshot_epochs(&self) -> Vec<usize> {
        self.kept
            .into_iter()
            .chain(self.held.iter().map(|h| h.epoch))
            .collect()
    }

    /// Keeps this check's weights for `lookback` epochs: in memory, or written as its snapshot
    /// file (disk mode); `snapshotted`: they were just snapshotted as the kept ones.
    fn hold(&mut self, varmap: &VarMap, epoch: usize, snapshotted: bool) -> Result<()> {
        let weights = match self.config.restore_best.mode {
            SnapshotMode::Memory if snapshotted => self.snapshot.clone(),
            SnapshotMode::Memory => Some(copy_weights(varmap)?),
            SnapshotMode::Disk => {
                if !snapshotted {
                    files::save_snapshot(varmap, &self.config.restore_best.path, epoch)?;
                }
                None
            }
        };
        self.held.push(Held { epoch, weights });
        Ok(())
    }

    /// The kept epoch moved back to a held epoch: its weights become the snapshot (disk mode:
    /// its file is there already).
    fn restore_held(&mut self, epoch: usize) {
        if self.config.restore_best.mode == SnapshotMode::Disk {
            return;
        }
        let weights = self
            .held
            .iter()
            .find(|h| h.epoch == epoch)
            .and_then(|h| h.weights.clone());
        if weights.is_none() {
            tracing::warn!(
                epoch,
                "the kept epoch's weights were held in memory by the interrupted process; they \
                 cannot be restored (use restore_best.mode: disk for resumable runs)"
            );
        }
        self.snapshot = weights;
    }

    fn snapshot(&mut self, varmap: &VarMap, epoch: usize) -> Result<()> {
        match self.config.restore_best.mode {
            SnapshotMode::Memory => self.snapshot = Some(copy_weights(varmap)?),
            SnapshotMode::Disk => {
                files::save_snapshot(varmap, &self.config.restore_best.path, epoch)?
            }
        }
        Ok(())
    }

    /// Ends the run: when `restore_best` is on, puts the weights of the kept epoch back into
    /// `varmap` (whether or not training stopped early) and returns that epoch.
    pub fn finish(&mut self, varmap: &VarMap) -> Result<Option<usize>> {
        let Some(best) = self.kept else {
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
                // The kept weights end where the configuration says, under their own name; the
                // weights held for a later choice are no longer needed.
                if file != *path {
                    files::fault_point();
                    std::fs::rename(&file, path).map_err(|e| io_err("rename", &file, e))?;
                    files::sync_folder(path)?;
                }
                files::remove_stale_snapshots(path, &[], false)?;
            }
        }
        tracing::info!(best_epoch = best, "restored the weights of the best epoch");
        Ok(Some(best))
    }

    /// The state to save for resuming. Fails for a strategy that cannot save its state.
    pub fn state(&self) -> Result<MonitorState> {
        let Some(stopping) = self.strategy.save_state() else {
            bail!(
                Usage,
                "the stopping strategy cannot save its state; this run cannot resume"
            );
        };
        Ok(MonitorState {
            format: STATE_FORMAT,
            stopping,
            kept_epoch: self.kept,
            held_epochs: self.held.iter().map(|h| h.epoch).collect(),
            stopped: self.stopped.clone(),
            history: self.history.clone(),
            last_epoch: self.last_epoch,
            decides: decides(&self.config)?,
            predictions: self.predictions.clone(),
            training_predictions: self.observed.as_ref().map(|c| c.previous().to_vec()),
            probe_data: Some(self.probe_data.clone()),
            probes: self.probe_widths.clone(),
        })
    }

    /// Writes the state as JSON, atomically.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let json = serde_json::to_string(&self.state()?).map_err(|e| fail!(Data, "{e}"))?;
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
        self.kept
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

/// A recent check epoch's weights, held in case the strategy moves its kept epoch back to it:
/// in memory, or `None` when they are in its snapshot file (or died with an interrupted
/// process).
#[derive(Clone)]
struct Held {
    epoch: usize,
    weights: Option<Vec<(String, Tensor)>>,
}

/// What [`RelianceMonitor::epoch_end`] puts back when an epoch fails before it is committed.
struct Rollback {
    stopping: Option<serde_json::Value>,
    observed: Option<label_wave::PredictionChanges>,
    snapshot: Option<Vec<(String, Tensor)>>,
    held: Vec<Held>,
    kept: Option<usize>,
    stopped: Option<StopReason>,
    history: usize,
    last_epoch: Option<usize>,
    predictions: Option<Vec<u32>>,
}

impl Rollback {
    fn of(m: &RelianceMonitor) -> Self {
        Self {
            stopping: m.strategy.save_state(),
            observed: m.observed.clone(),
            snapshot: m.snapshot.clone(),
            held: m.held.clone(),
            kept: m.kept,
            stopped: m.stopped.clone(),
            history: m.history.len(),
            last_epoch: m.last_epoch,
            predictions: m.predictions.clone(),
        }
    }

    /// Puts `m` back and returns `e`; a strategy that cannot save its state cannot be put back,
    /// so the epoch then counts as reported.
    fn restore(self, m: &mut RelianceMonitor, epoch: usize, e: Error) -> Error {
        match self.stopping {
            Some(state) => {
                if let Err(e2) = m.strategy.load_state(state) {
                    return e.map_message(|m| format!("{m}; putting the rule back failed: {e2}"));
                }
                m.last_epoch = self.last_epoch;
            }
            None => m.last_epoch = Some(epoch),
        }
        m.observed = self.observed;
        m.snapshot = self.snapshot;
        m.held = self.held;
        m.kept = self.kept;
        m.stopped = self.stopped;
        m.history.truncate(self.history);
        m.predictions = self.predictions;
        e
    }
}

/// A check's history record and the probe data's predictions (the next check's reference).
type CheckOutcome = (CheckRecord, Vec<u32>);

/// Everything a check measured: for the rule, the history, and the next check's changes.
struct Measured {
    signals: CheckSignals,
    record: CheckRecord,
    predictions: Vec<u32>,
}

/// The structured event of a check.
fn log_check(record: &CheckRecord) {
    let selectivity_log = record
        .selectivity
        .as_ref()
        .map(|s| serde_json::to_string(s).unwrap_or_default());
    let [ci_lo, ci_hi] = record.auc_ci.unwrap_or([f64::NAN; 2]);
    let decision = &record.decision;
    // Optional fields (noise, selectivity, reason) are left out of the event when absent.
    tracing::info!(
        epoch = record.epoch,
        metric = record.metric.name(),
        value = record.value,
        auc = record.auc,
        auc_ci_low = ci_lo,
        auc_ci_high = ci_hi,
        normalized_auc = record.normalized_auc,
        accuracy_0 = record.unablated_accuracy,
        noise_auc = record.noise_auc,
        prediction_changes = record.prediction_changes,
        training_changes = record.training_changes,
        selectivity = selectivity_log.as_deref(),
        kept = record.kept,
        kept_epoch = record.kept_epoch,
        seconds = record.seconds,
        decision = if decision.is_stop() {
            "stop"
        } else {
            "continue"
        },
        reason = decision.reason().map(tracing::field::display),
        degenerate = record.degenerate.as_deref(),
        batched = record.curve.batched,
        incremental = record.curve.incremental,
        "reliance check"
    );
}

/// The first weight of `varmap` holding a NaN or an infinity, named.
fn non_finite_weights(varmap: &VarMap) -> Result<Option<String>> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| fail!(Usage, "VarMap lock poisoned"))?;
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
    let mut predicted = stats
        .predictions
        .iter()
        .filter(|&&p| p != crate::ProbeData::PADDING);
    if let Some(&first) = predicted.clone().next() {
        if label_classes > 1 && predicted.all(|&p| p == first) {
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
