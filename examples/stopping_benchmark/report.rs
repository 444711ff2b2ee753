//! `report`: replays every stopping criterion over the recorded runs with the crate's own rules,
//! and writes the tables (markdown, to stdout), the per-run choices and a summary (JSON), and
//! plots of the metric against test accuracy with each criterion's epoch marked (SVG).
//!
//! A criterion that needs no held-out data only observes the trajectory of a `full` run, so it is
//! replayed there: its stop epoch (the epochs a user would have trained) and the epoch whose
//! weights it keeps. Validation-loss stopping needs its own runs (`val10`, `val20`), which stopped
//! when their patience ran out.

use crate::common::mean_sd;
use anyhow::{bail, Context, Result};
use candle_reliance::curves::AblationOrder;
use candle_reliance::monitor::ScheduleConfig;
use candle_reliance::monitor::{
    CheckSignals, EarlyStopping, EarlyStoppingStrategy, Health, LabelWave, LabelWaveRule, Metric,
    Observation, Warning,
};
use candle_reliance::plot::{Plot, Series};
use candle_reliance::RelianceConfig;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// Results files written by `run` (JSON lines).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Seeds the defaults were chosen on: reported apart from the held-out ones.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    tuning_seeds: Vec<u64>,
    /// Report the runs of `run --quick` (a smoke test), which are left out otherwise.
    #[arg(long)]
    quick: bool,
    /// Folder for the choices, the summary and the plots.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/results/stopping"))]
    out: PathBuf,
}

/// What a criterion decided on one run: the epoch it stopped after (the epochs trained) and the
/// epoch whose weights it keeps.
#[derive(Debug, Clone, Copy)]
struct Choice {
    stop: usize,
    kept: usize,
}

/// A recorded run.
pub struct Run {
    pub v: Value,
}

impl Run {
    pub fn epochs(&self) -> &[Value] {
        self.v["epochs"].as_array().map_or(&[], |a| a.as_slice())
    }
    pub fn str(&self, k: &str) -> &str {
        self.v[k].as_str().unwrap_or("")
    }
    /// Field `k` of epoch `epoch` (from 1).
    pub fn f(&self, epoch: usize, k: &str) -> f64 {
        self.epochs()[epoch - 1][k].as_f64().unwrap_or(f64::NAN)
    }
    /// Data set and model: `mnist-mlp`.
    pub fn set(&self) -> String {
        format!("{}-{}", self.str("data"), self.str("model"))
    }
    /// Data set, model, optimizer and noise: the cell of the matrix.
    fn cell(&self) -> (String, String, String, String) {
        (
            self.set(),
            self.str("optim").to_string(),
            format!("{}", self.v["noise"].as_f64().unwrap_or(f64::NAN)),
            self.str("kind").to_string(),
        )
    }
    fn seed(&self) -> u64 {
        self.v["seed"].as_u64().unwrap_or(0)
    }
}

/// The reliance metric of a recorded check, from its first `orders` random orders: what the
/// monitor computes from the same curve.
fn metric_of(check: &Value, metric: Metric, orders: usize) -> Result<f64> {
    let mean = |key: &str| -> Result<f64> {
        let v: Vec<f64> = check[key]
            .as_array()
            .with_context(|| format!("no `{key}` in a check"))?
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::NAN))
            .collect();
        if v.len() < orders {
            bail!("a check has {} orders of `{key}`, {orders} wanted", v.len());
        }
        Ok(v[..orders].iter().sum::<f64>() / orders as f64)
    };
    Ok(match metric {
        Metric::Auc => mean("auc")?,
        Metric::NormalizedAuc => mean("auc")? / check["acc0"].as_f64().unwrap_or(f64::NAN),
        // Runs recorded before the agreement curve measured it as a separate curve against the
        // model's own predictions (`self_auc`): the same quantity.
        Metric::AgreementAuc => {
            if check.get("agreement_auc").is_some() {
                mean("agreement_auc")?
            } else {
                mean("self_auc")?
            }
        }
    })
}

/// Where the replayed monitor takes Label Wave's prediction changes from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Changes {
    /// The training loop's predictions (`RelianceMonitor::observe`, the optional fourth line):
    /// the run's `changes`.
    Observed,
    /// The probe data's predictions between checks (the three-line loop): `subset_changes`.
    ProbeData,
}

/// The reliance metric of each check as the replay feeds it: the recorded one, or (to measure
/// what the plateau contributes) one that falls from the first check on, so that no later check
/// is ever on the plateau.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Plateau {
    Recorded,
    Off,
}

/// What a criterion decided on a run; for the monitor, also its warnings and the last check on
/// its reliance plateau.
struct Decided {
    choice: Choice,
    warnings: Vec<Warning>,
    plateau_end: Option<usize>,
}

impl From<Choice> for Decided {
    fn from(choice: Choice) -> Self {
        Self {
            choice,
            warnings: vec![],
            plateau_end: None,
        }
    }
}

/// The monitor's decisions on a run, replayed epoch by epoch as `RelianceMonitor::on_epoch_end`
/// makes them (the configuration's schedule and stopping rule, the run's budget as
/// `max_epochs`); the kept epoch is what `finish` restores.
fn replay_monitor(
    run: &Run,
    config: &RelianceConfig,
    changes: Changes,
    plateau: Plateau,
) -> Result<Decided> {
    let orders = match config.ablation.order {
        AblationOrder::Random { orders, .. } => orders,
        _ => bail!("the replay needs random orders"),
    };
    if config.schedule.check_every != 1 {
        bail!("the replay needs a check every epoch (the runs count subset changes per epoch)");
    }
    let mut rule = EarlyStopping::new(config.stopping.clone());
    let mut warnings = vec![];
    let last = run.epochs().len();
    let budget = run.v["max_epochs"].as_u64().map_or(last, |m| m as usize);
    for epoch in 1..=last {
        let mut obs = Observation::new(epoch);
        if changes == Changes::Observed && epoch >= 2 {
            obs.training_changes = Some(run.f(epoch, "changes"));
        }
        if config.schedule.is_check_epoch(epoch) {
            let check = &run.epochs()[epoch - 1]["check"];
            let metric = match plateau {
                Plateau::Recorded => metric_of(check, config.stopping.metric, orders)?,
                Plateau::Off => -(epoch as f64),
            };
            let accuracy = check["acc0"].as_f64().unwrap_or(f64::NAN);
            let mut signals = CheckSignals::new(metric, accuracy);
            if !check["finite"].as_bool().unwrap_or(true) || !metric.is_finite() {
                signals = signals.with_health(Health::NonFinite("logits".into()));
            }
            if changes == Changes::ProbeData {
                signals =
                    signals.with_prediction_changes(subset_changes(run, &config.schedule, epoch));
            }
            obs = obs.with_check(signals);
        }
        if epoch == budget {
            obs = obs.at_budget_end();
        }
        let decision = rule.step(&obs);
        warnings.extend(EarlyStoppingStrategy::take_warnings(&mut rule));
        if decision.is_stop() {
            return Ok(Decided {
                choice: Choice {
                    stop: epoch,
                    kept: rule.kept_epoch().unwrap_or(epoch),
                },
                warnings,
                plateau_end: rule.state().plateau_end,
            });
        }
    }
    Ok(Decided {
        choice: Choice {
            stop: last,
            kept: rule.kept_epoch().unwrap_or(last),
        },
        warnings,
        plateau_end: rule.state().plateau_end,
    })
}

/// The first epoch whose share of fitted corrupted labels (an oracle: it needs to know which
/// labels were corrupted) exceeds its lowest value so far by 0.02: memorization under way.
/// `None` when that never happens within the run.
pub fn memorization_onset(run: &Run) -> Option<usize> {
    let mut low = f64::INFINITY;
    (1..=run.epochs().len()).find(|&e| {
        let f = run.f(e, "fit_corrupted");
        low = low.min(f);
        f > low + 0.02
    })
}

/// Whether the reliance plateau misled on a run, by the oracle: the metric had left its plateau
/// by the stop, at least `patience` epochs before memorization began (or before the stop, where
/// memorization never began within the run). A plateau that lasts to the stop claimed nothing.
fn plateau_misled(
    run: &Run,
    plateau_end: Option<usize>,
    stop: usize,
    patience: usize,
) -> Option<bool> {
    let end = plateau_end?;
    if end >= stop {
        return Some(false);
    }
    Some(match memorization_onset(run) {
        Some(onset) => onset >= end + patience,
        None => end + patience <= stop,
    })
}

/// The prediction changes the monitor counts on its subset at `epoch`'s check, against its
/// previous check: the run recorded them between consecutive epochs, which with a check every
/// epoch are consecutive checks from the monitor's second check on.
fn subset_changes(run: &Run, schedule: &ScheduleConfig, epoch: usize) -> Option<f64> {
    if !(schedule.is_check_epoch(epoch) && schedule.is_check_epoch(epoch - 1)) {
        return None;
    }
    run.epochs()[epoch - 1]["check"]["subset_changes"].as_f64()
}

/// Label Wave on the prediction changes the run recorded: `changes` from its training batches
/// (every epoch from the second), or `subset_changes` of the check subset between checks.
fn replay_label_wave(run: &Run, key: &str, rule: &LabelWaveRule) -> Choice {
    let mut wave = LabelWave::new(rule.clone());
    let last = run.epochs().len();
    for epoch in 2..=last {
        let changes = match key {
            "changes" => Some(run.f(epoch, key)),
            _ => subset_changes(run, &RelianceConfig::default().schedule, epoch),
        };
        let Some(changes) = changes else {
            continue;
        };
        if wave.update(epoch, changes).is_stop() {
            return Choice {
                stop: epoch,
                kept: wave.kept_epoch().unwrap_or(epoch),
            };
        }
    }
    Choice {
        stop: last,
        kept: wave.kept_epoch().unwrap_or(last),
    }
}

/// The stopping rule of version 0.1 (the previous default), kept here to compare with: stop
/// once the agreement AUC has been more than 3% below its peak for 8 epochs; keep the most
/// accurate check within 3% of the peak; a check more than 10% less accurate than the best so
/// far is never kept nor a peak; while the metric has not risen above its first check, Label
/// Wave (window 1, patience 3) on the probe data's changes keeps the epoch and must agree to
/// stop. Replayed on the recorded checks as that version's monitor made its decisions.
fn replay_v01(run: &Run) -> Result<Choice> {
    #[derive(Clone)]
    struct Check {
        epoch: usize,
        metric: f64,
        acc: f64,
    }
    let (tol, patience, drop) = (0.03, 8usize, 0.1);
    let mut wave = LabelWave::new(LabelWaveRule {
        window: 1,
        patience: 3,
    });
    let (mut peak, mut kept): (Option<Check>, Option<Check>) = (None, None);
    let (mut near, mut rose, mut best_acc) = (None::<usize>, false, None::<f64>);
    let (mut wave_fed, mut wave_kept) = (false, None::<usize>);
    let last = run.epochs().len();
    let schedule = RelianceConfig::default().schedule;
    let kept_epoch = |wave_kept: Option<usize>,
                      rose: bool,
                      wave_fed: bool,
                      kept: &Option<Check>| {
        match wave_kept {
            Some(e) if !rose && wave_fed => Some(e),
            _ => kept.as_ref().map(|k| k.epoch),
        }
    };
    for epoch in 2..=last {
        let c = &run.epochs()[epoch - 1]["check"];
        if !c["finite"].as_bool().unwrap_or(true) {
            return Ok(Choice {
                stop: epoch,
                kept: kept_epoch(wave_kept, rose, wave_fed, &kept).unwrap_or(epoch),
            });
        }
        let mut wave_kept_before = None;
        if let Some(n) = subset_changes(run, &schedule, epoch) {
            let before = wave.state().lowest;
            wave.update(epoch, n);
            wave_fed = true;
            wave_kept_before = Some(wave_kept);
            if wave.state().lowest != before {
                wave_kept = Some(epoch);
            }
        }
        let here = Check {
            epoch,
            metric: metric_of(c, Metric::AgreementAuc, 3)?,
            acc: c["acc0"].as_f64().unwrap_or(f64::NAN),
        };
        let unstable = best_acc.is_some_and(|b| here.acc < (1.0 - drop) * b);
        best_acc = Some(best_acc.map_or(here.acc, |b| b.max(here.acc)));
        let falling_back = |rose: bool| !rose && wave_fed;
        let mut below = false;
        if unstable {
            if let Some(before) = wave_kept_before {
                if wave_kept == Some(epoch) {
                    wave_kept = before;
                }
            }
            below = peak.is_some();
        } else {
            let new_peak = peak.as_ref().is_none_or(|p| here.metric > p.metric);
            let first_rise = new_peak && peak.is_some() && !rose;
            let was_falling_back = falling_back(rose);
            if new_peak {
                rose |= peak.is_some();
                peak = Some(here.clone());
            }
            let floor = peak.as_ref().expect("set").metric * (1.0 - tol);
            if here.metric >= floor {
                near = Some(epoch);
                let replace = (first_rise && was_falling_back)
                    || kept
                        .as_ref()
                        .is_none_or(|k| k.metric < floor || here.acc >= k.acc);
                if replace {
                    kept = Some(here);
                }
            } else {
                below = true;
            }
        }
        if below {
            let p = peak.as_ref().expect("set");
            let since = epoch - near.unwrap_or(p.epoch);
            let stop = if since >= patience && falling_back(rose) {
                wave.state().stopped.is_some() && wave.state().lowest.is_some()
            } else {
                since >= patience
            };
            if stop {
                return Ok(Choice {
                    stop: epoch,
                    kept: kept_epoch(wave_kept, rose, wave_fed, &kept).unwrap_or(p.epoch),
                });
            }
        }
    }
    Ok(Choice {
        stop: last,
        kept: kept_epoch(wave_kept, rose, wave_fed, &kept).unwrap_or(last),
    })
}

/// Validation-loss stopping with patience 5 on a `val` run: the lowest validation loss so far is
/// kept; the run itself stopped when 5 epochs passed without a lower one.
fn replay_validation(run: &Run) -> Choice {
    let last = run.epochs().len();
    let kept = (1..=last)
        .min_by(|&a, &b| run.f(a, "val_loss").total_cmp(&run.f(b, "val_loss")))
        .unwrap_or(last);
    Choice { stop: last, kept }
}

fn argbest(run: &Run, key: &str, higher: bool) -> Choice {
    let last = run.epochs().len();
    let kept = (1..=last)
        .max_by(|&a, &b| {
            let o = run.f(a, key).total_cmp(&run.f(b, key));
            // Ties: the earlier epoch.
            if higher { o } else { o.reverse() }.then(b.cmp(&a))
        })
        .unwrap_or(last);
    Choice { stop: last, kept }
}

/// What a criterion decides on a run.
type Decide = Box<dyn Fn(&Run) -> Result<Decided>>;
type Criterion = (String, Decide);

/// The name of the monitor at its defaults with the fourth line (`observe`): the row the
/// verdicts and warning counts are about.
pub const DEFAULT: &str = "reliance monitor (default, observe)";

/// The criteria replayed on `full` runs.
fn criteria() -> Vec<Criterion> {
    let default = RelianceConfig::default();
    let first_check = default.schedule.warmup_epochs.max(1);
    let plain = |f: fn(&Run) -> Choice| -> Decide { Box::new(move |r: &Run| Ok(f(r).into())) };
    let monitor = |changes, plateau| -> Decide {
        let config = RelianceConfig::default();
        Box::new(move |r: &Run| replay_monitor(r, &config, changes, plateau))
    };
    vec![
        (
            DEFAULT.into(),
            monitor(Changes::Observed, Plateau::Recorded),
        ),
        (
            "reliance monitor (default, three lines: probe-data changes)".into(),
            monitor(Changes::ProbeData, Plateau::Recorded),
        ),
        (
            "reliance monitor without the reliance plateau (observe)".into(),
            monitor(Changes::Observed, Plateau::Off),
        ),
        (
            "reliance monitor 0.1 (previous default)".into(),
            Box::new(|r: &Run| Ok(replay_v01(r)?.into())),
        ),
        (
            "Label Wave".into(),
            plain(|r| replay_label_wave(r, "changes", &LabelWaveRule::default())),
        ),
        (
            "Label Wave on the probe subset".into(),
            plain(|r| replay_label_wave(r, "subset_changes", &LabelWaveRule::default())),
        ),
        (
            format!("first check (epoch {first_check})"),
            Box::new(move |r: &Run| {
                let e = first_check.min(r.epochs().len());
                Ok(Choice { stop: e, kept: e }.into())
            }),
        ),
        (
            "epoch 10".into(),
            plain(|r| {
                let e = 10.min(r.epochs().len());
                Choice { stop: e, kept: e }
            }),
        ),
        (
            "all epochs".into(),
            plain(|r| {
                let e = r.epochs().len();
                Choice { stop: e, kept: e }
            }),
        ),
        (
            "oracle: best test accuracy".into(),
            plain(|r| argbest(r, "test_acc", true)),
        ),
        (
            "oracle: best test loss".into(),
            plain(|r| argbest(r, "test_loss", false)),
        ),
    ]
}

/// One criterion's outcome on one run.
#[derive(Debug, Clone)]
struct Outcome {
    criterion: String,
    choice: Choice,
    test_acc: f64,
    test_loss: f64,
    /// Share of the wall time up to the stop spent in checks (reliance criteria only).
    check_share: Option<f64>,
    /// What the monitor warned about (reliance criteria).
    warnings: Vec<Warning>,
    /// Whether, by the memorization oracle, the reliance plateau misled on the run (see
    /// [`plateau_misled`]; the monitor's criteria only).
    plateau_misled: Option<bool>,
}

fn outcome(run: &Run, criterion: &str, choice: Choice, checks: bool) -> Outcome {
    let check_share = checks.then(|| {
        let (mut train, mut check) = (0.0, 0.0);
        for e in 1..=choice.stop {
            train += run.f(e, "train_s");
            let c = &run.epochs()[e - 1]["check"];
            if RelianceConfig::default().schedule.is_check_epoch(e) {
                check += c["seconds"].as_f64().unwrap_or(0.0);
            }
        }
        check / (train + check)
    });
    Outcome {
        criterion: criterion.to_string(),
        choice,
        test_acc: run.f(choice.kept, "test_acc"),
        test_loss: run.f(choice.kept, "test_loss"),
        check_share,
        warnings: vec![],
        plateau_misled: None,
    }
}

/// The runs of the results files, those of `run --quick` or the others.
pub fn load(paths: &[PathBuf], quick: bool) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}", p.display(), i + 1))?;
            if v["quick"].as_bool().unwrap_or(false) != quick {
                continue;
            }
            runs.push(Run { v });
        }
    }
    Ok(runs)
}

/// Per run id (without the kind) the outcomes of every criterion, validation ones included.
fn outcomes(runs: &[Run]) -> Result<BTreeMap<String, (usize, Vec<Outcome>)>> {
    let mut out: BTreeMap<String, (usize, Vec<Outcome>)> = BTreeMap::new();
    let key = |r: &Run| {
        r.str("id")
            .replacen(&format!("/{}/", r.str("kind")), "/", 1)
    };
    let crits = criteria();
    for (i, r) in runs.iter().enumerate() {
        match r.str("kind") {
            "full" => {
                let entry = out.entry(key(r)).or_insert((i, vec![]));
                entry.0 = i;
                let patience = RelianceConfig::default().stopping.label_wave.patience;
                for (name, f) in &crits {
                    let d = f(r).with_context(|| format!("{} on {}", name, r.str("id")))?;
                    let mut o = outcome(r, name, d.choice, name.starts_with("reliance"));
                    o.warnings = d.warnings;
                    o.plateau_misled = plateau_misled(r, d.plateau_end, d.choice.stop, patience);
                    entry.1.push(o);
                }
            }
            kind @ ("val10" | "val20") => {
                let name = format!("validation loss, {}% held out", &kind[3..]);
                let o = outcome(r, &name, replay_validation(r), false);
                out.entry(key(r)).or_insert((usize::MAX, vec![])).1.push(o);
            }
            other => bail!("unknown run kind `{other}`"),
        }
    }
    Ok(out)
}

pub fn report(args: ReportArgs) -> Result<()> {
    let runs = load(&args.runs, args.quick)?;
    if runs.is_empty() {
        bail!("no runs in {:?}", args.runs);
    }
    let all = outcomes(&runs)?;
    std::fs::create_dir_all(&args.out)?;
    // Per-run choices, the raw material of every table.
    let mut lines = String::new();
    for (id, (i, outs)) in &all {
        let seed = runs.get(*i).map(|r| r.seed());
        for o in outs {
            lines.push_str(&serde_json::to_string(&json!({
                "run": id, "seed": seed, "criterion": o.criterion,
                "stop_epoch": o.choice.stop, "kept_epoch": o.choice.kept,
                "test_acc": o.test_acc, "test_loss": o.test_loss, "check_share": o.check_share,
                "warnings": o.warnings, "plateau_misled": o.plateau_misled,
            }))?);
            lines.push('\n');
        }
    }
    std::fs::write(args.out.join("choices.jsonl"), lines)?;

    let mut summary = Vec::new();
    for held_out in [true, false] {
        let title = if held_out {
            "Held-out seeds and data sets"
        } else {
            "Tuning seeds (the defaults were chosen here)"
        };
        let selected: Vec<&(usize, Vec<Outcome>)> = all
            .values()
            .filter(|(i, _)| {
                runs.get(*i).is_some_and(|r| {
                    let tuning = args.tuning_seeds.contains(&r.seed());
                    tuning != held_out
                })
            })
            .collect();
        if selected.is_empty() {
            continue;
        }
        println!("## {title}\n");
        summary.push(table(&runs, &selected, held_out)?);
    }
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    plots(&runs, &all, &args.tuning_seeds, &args.out)?;
    Ok(())
}

/// The tables of one group of runs (held out or tuning), per data set and model; returns their
/// numbers as JSON.
fn table(runs: &[Run], selected: &[&(usize, Vec<Outcome>)], held_out: bool) -> Result<Value> {
    // (data-model) -> (optim, noise) -> criterion -> outcomes
    type Cells<'a> = BTreeMap<(String, String), BTreeMap<String, Vec<&'a Outcome>>>;
    let mut by_set: BTreeMap<String, Cells> = BTreeMap::new();
    let mut order: Vec<String> = vec![];
    for (i, outs) in selected {
        let (set, optim, noise, _) = runs[*i].cell();
        let cell = by_set
            .entry(set)
            .or_default()
            .entry((optim, noise))
            .or_default();
        for o in outs {
            if !order.contains(&o.criterion) {
                order.push(o.criterion.clone());
            }
            cell.entry(o.criterion.clone()).or_default().push(o);
        }
    }
    let optim_rank = |o: &str| ["sgd", "momentum", "adamw"].iter().position(|x| *x == o);
    let mut json_sets = serde_json::Map::new();
    for (set, cells) in &by_set {
        let mut keys: Vec<&(String, String)> = cells.keys().collect();
        keys.sort_by(|a, b| {
            optim_rank(&a.0)
                .cmp(&optim_rank(&b.0))
                .then(a.1.partial_cmp(&b.1).unwrap())
        });
        let seeds = cells
            .values()
            .next()
            .and_then(|c| c.values().next())
            .map_or(0, |v| v.len());
        println!("### {set} ({seeds} seeds per cell)\n");
        println!("Mean test accuracy of the kept epoch ± standard deviation over seeds (%), and in parentheses the mean gap to the accuracy oracle (points):\n");
        print!("| criterion |");
        for (o, n) in &keys {
            print!(" {o}, noise {n} |");
        }
        println!(" mean gap, noise ≥ 0.2 | mean epochs run | check share |");
        print!("|---|");
        for _ in &keys {
            print!("---|");
        }
        println!("---|---|---|");
        let mut json_rows = serde_json::Map::new();
        for crit in &order {
            let (mut gaps, mut epochs, mut shares) = (vec![], vec![], vec![]);
            let mut row = format!("| {crit} |");
            let mut json_cells = serde_json::Map::new();
            for k in &keys {
                let cell = &cells[*k];
                let Some(v) = cell.get(crit) else {
                    row.push_str(" – |");
                    continue;
                };
                let oracle: Vec<f64> = cell
                    .get("oracle: best test accuracy")
                    .map(|o| o.iter().map(|x| x.test_acc).collect())
                    .unwrap_or_default();
                let accs: Vec<f64> = v.iter().map(|o| o.test_acc).collect();
                let (m, sd) = mean_sd(&accs);
                let gap = if oracle.len() == accs.len() && !oracle.is_empty() {
                    mean_sd(&oracle).0 - m
                } else {
                    f64::NAN
                };
                if k.1.parse::<f64>().unwrap_or(0.0) >= 0.2 && gap.is_finite() {
                    gaps.push(gap);
                }
                epochs.extend(v.iter().map(|o| o.choice.stop as f64));
                shares.extend(v.iter().filter_map(|o| o.check_share));
                row.push_str(&format!(
                    " {:.2} ± {:.2} ({:.2}) |",
                    m * 100.0,
                    sd * 100.0,
                    gap * 100.0
                ));
                json_cells.insert(
                    format!("{}/noise{}", k.0, k.1),
                    json!({"test_acc_mean": m, "test_acc_sd": sd, "gap_to_accuracy_oracle": gap,
                           "test_loss_mean": mean_sd(&v.iter().map(|o| o.test_loss).collect::<Vec<_>>()).0,
                           "epochs_run_mean": mean_sd(&v.iter().map(|o| o.choice.stop as f64).collect::<Vec<_>>()).0,
                           "runs": v.len()}),
                );
            }
            let gap = if gaps.is_empty() {
                f64::NAN
            } else {
                mean_sd(&gaps).0
            };
            let share = if shares.is_empty() {
                "–".to_string()
            } else {
                format!("{:.0}%", mean_sd(&shares).0 * 100.0)
            };
            println!(
                "{row} {:.2} | {:.1} | {share} |",
                gap * 100.0,
                mean_sd(&epochs).0
            );
            json_rows.insert(
                crit.clone(),
                json!({"cells": json_cells, "mean_gap_noise_ge_0.2": gap}),
            );
        }
        println!();
        // The target: the monitor's default at least as good as validation stopping (20% held
        // out) and Label Wave in every cell with noise ≥ 0.2.
        let mean_acc = |cell: &BTreeMap<String, Vec<&Outcome>>, c: &str| {
            cell.get(c)
                .map(|v| mean_sd(&v.iter().map(|o| o.test_acc).collect::<Vec<_>>()).0)
        };
        let mut verdicts = vec![];
        // Noisy cells where the default kept a worse epoch than validation stopping or Label
        // Wave, for the warnings' tally below.
        let mut failing = std::collections::BTreeSet::new();
        for k in &keys {
            if k.1.parse::<f64>().unwrap_or(0.0) < 0.2 {
                continue;
            }
            let cell = &cells[*k];
            let ours = mean_acc(cell, DEFAULT);
            let val = mean_acc(cell, "validation loss, 20% held out");
            let lw = mean_acc(cell, "Label Wave");
            if let (Some(a), Some(b), Some(c)) = (ours, val, lw) {
                if a < b || a < c {
                    failing.insert(*k);
                }
                verdicts.push(format!(
                    "{}, noise {}: {} validation (20%) by {:+.2}, {} Label Wave by {:+.2}",
                    k.0,
                    k.1,
                    if a >= b { "≥" } else { "<" },
                    (a - b) * 100.0,
                    if a >= c { "≥" } else { "<" },
                    (a - c) * 100.0
                ));
            }
        }
        if !verdicts.is_empty() {
            println!("{DEFAULT} against the baselines, per cell (points):\n");
            for v in &verdicts {
                println!("- {v}");
            }
            println!();
        }
        // The run-time warnings: in how many runs each was raised, and how far from the
        // oracle the runs with and without it kept their epoch.
        let mut warn_rows = vec![];
        let mut json_warn = serde_json::Map::new();
        // Over the noisy cells: the warning against the oracle's verdict on the plateau
        // ([warned & misled, warned & not, not warned & misled, neither]).
        let mut confusion = [0usize; 4];
        // The warnings in the noisy cells with validation runs: [the others, the failing].
        #[derive(Default)]
        struct Tally {
            cells: usize,
            runs: usize,
            accuracy_unstable: usize,
            any_warning: usize,
        }
        let mut tally = [Tally::default(), Tally::default()];
        for k in &keys {
            let cell = &cells[*k];
            let (Some(ours), Some(oracle)) =
                (cell.get(DEFAULT), cell.get("oracle: best test accuracy"))
            else {
                continue;
            };
            let mut row = format!("| {}, noise {} |", k.0, k.1);
            let mut cell_json = serde_json::Map::new();
            let misled = ours
                .iter()
                .filter(|o| o.plateau_misled == Some(true))
                .count();
            row.push_str(&format!(" {misled}/{} |", ours.len()));
            cell_json.insert("plateau_misled".into(), json!(misled));
            if k.1.parse::<f64>().unwrap_or(0.0) >= 0.2
                && cell.contains_key("validation loss, 20% held out")
            {
                let t = &mut tally[usize::from(failing.contains(k))];
                t.cells += 1;
                t.runs += ours.len();
                t.accuracy_unstable += ours
                    .iter()
                    .filter(|o| {
                        o.warnings
                            .iter()
                            .any(|w| matches!(w, Warning::AccuracyUnstable { .. }))
                    })
                    .count();
                t.any_warning += ours.iter().filter(|o| !o.warnings.is_empty()).count();
            }
            if k.1.parse::<f64>().unwrap_or(0.0) >= 0.2 {
                for o in ours {
                    let warned = o
                        .warnings
                        .iter()
                        .any(|w| matches!(w, Warning::RelianceUninformative { .. }));
                    let misled = o.plateau_misled == Some(true);
                    confusion[usize::from(!warned) * 2 + usize::from(!misled)] += 1;
                }
            }
            for kind in [
                "reliance_uninformative",
                "accuracy_unstable",
                "no_rise_within_budget",
            ] {
                let (mut with, mut without) = (vec![], vec![]);
                for (o, best) in ours.iter().zip(oracle) {
                    let gap = (best.test_acc - o.test_acc) * 100.0;
                    let warned = o.warnings.iter().any(|w| {
                        serde_json::to_value(w)
                            .ok()
                            .and_then(|v| v["kind"].as_str().map(String::from))
                            == Some(kind.to_string())
                    });
                    if warned {
                        with.push(gap)
                    } else {
                        without.push(gap)
                    }
                }
                let fmt = |v: &[f64]| {
                    if v.is_empty() {
                        "–".to_string()
                    } else {
                        format!("{:.2}", mean_sd(v).0)
                    }
                };
                row.push_str(&format!(
                    " {}/{} ({} vs {}) |",
                    with.len(),
                    ours.len(),
                    fmt(&with),
                    fmt(&without)
                ));
                cell_json.insert(
                    kind.into(),
                    json!({"warned": with.len(), "runs": ours.len(),
                    "gap_warned": (!with.is_empty()).then(|| mean_sd(&with).0),
                    "gap_not_warned": (!without.is_empty()).then(|| mean_sd(&without).0)}),
                );
            }
            warn_rows.push(row);
            json_warn.insert(format!("{}/noise{}", k.0, k.1), Value::Object(cell_json));
        }
        if !warn_rows.is_empty() {
            println!("Warnings of the {DEFAULT}: runs warned / runs (mean gap to the accuracy oracle of the warned vs the other runs, points); and the runs where, by the memorization oracle, the reliance plateau misled (by the stop the metric had left it, a Label Wave patience or more before memorization began — the share of corrupted labels fitted 0.02 above its low — or before the stop where memorization had not begun):\n");
            println!("| cell | plateau misled (oracle) | reliance uninformative | accuracy unstable | no rise within the budget |");
            println!("|---|---|---|---|---|");
            for r in &warn_rows {
                println!("{r}");
            }
            println!();
            println!(
                "Noise ≥ 0.2: `reliance_uninformative` raised in {} of the {} runs where the plateau misled and in {} of the {} where it did not.\n",
                confusion[0],
                confusion[0] + confusion[2],
                confusion[1],
                confusion[1] + confusion[3]
            );
            let [other, failed] = &tally;
            if failed.runs + other.runs > 0 {
                println!(
                    "Noise ≥ 0.2, cells with validation runs: in the {} cells where the {DEFAULT} kept a worse epoch than validation stopping (20%) or Label Wave, `accuracy_unstable` was raised in {} of {} runs (any warning: {}); in the other {} cells, in {} of {} (any warning: {}).\n",
                    failed.cells,
                    failed.accuracy_unstable,
                    failed.runs,
                    failed.any_warning,
                    other.cells,
                    other.accuracy_unstable,
                    other.runs,
                    other.any_warning
                );
                json_warn.insert(
                    "any_warning_noise_ge_0.2".into(),
                    json!({"failing_runs": failed.runs, "failing_accuracy_unstable": failed.accuracy_unstable,
                           "failing_any_warning": failed.any_warning, "other_runs": other.runs,
                           "other_accuracy_unstable": other.accuracy_unstable, "other_any_warning": other.any_warning}),
                );
            }
            json_warn.insert(
                "confusion_noise_ge_0.2".into(),
                json!({"warned_misled": confusion[0], "warned_not_misled": confusion[1],
                       "not_warned_misled": confusion[2], "not_warned_not_misled": confusion[3]}),
            );
        }
        json_rows.insert("warnings".into(), Value::Object(json_warn));
        json_sets.insert(set.clone(), Value::Object(json_rows));
    }
    Ok(json!({"held_out": held_out, "sets": json_sets}))
}

/// Per data set, model and optimizer, for the first held-out seed at the highest noise: the
/// reliance metrics and the test accuracy per epoch, each criterion's kept epoch marked.
fn plots(
    runs: &[Run],
    all: &BTreeMap<String, (usize, Vec<Outcome>)>,
    tuning: &[u64],
    dir: &Path,
) -> Result<()> {
    let mut done = std::collections::HashSet::new();
    let mut picks: Vec<&(usize, Vec<Outcome>)> = all
        .values()
        .filter(|(i, _)| runs.get(*i).is_some())
        .collect();
    // Highest noise first, lowest seed first.
    picks.sort_by(|a, b| {
        let (ra, rb) = (&runs[a.0], &runs[b.0]);
        rb.v["noise"]
            .as_f64()
            .partial_cmp(&ra.v["noise"].as_f64())
            .unwrap()
            .then(ra.seed().cmp(&rb.seed()))
    });
    for (i, outs) in picks {
        let r = &runs[*i];
        let (set, optim, noise, _) = r.cell();
        let held = !tuning.contains(&r.seed());
        if !held || !done.insert((set.clone(), optim.clone())) {
            continue;
        }
        let n = r.epochs().len();
        let per_epoch = |m: Metric| -> Vec<(f64, f64)> {
            (1..=n)
                .filter_map(|e| {
                    let c = &r.epochs()[e - 1]["check"];
                    metric_of(c, m, 3).ok().map(|v| (e as f64, v))
                })
                .collect()
        };
        let mut plot = Plot::new(format!("{set}, {optim}, noise {noise}, seed {}", r.seed()))
            .x_label("epoch")
            .y_label("reliance metric (training subset)")
            .y2_label("test accuracy")
            .series(Series::line(
                "agreement AUC",
                per_epoch(Metric::AgreementAuc),
            ))
            .series(Series::line("normalized AUC", per_epoch(Metric::NormalizedAuc)).dashed())
            .series(
                Series::line(
                    "test accuracy",
                    (1..=n).map(|e| (e as f64, r.f(e, "test_acc"))).collect(),
                )
                .on_right_axis(),
            );
        for (name, color) in [
            (DEFAULT, "#2ca02c"),
            ("Label Wave", "#9467bd"),
            ("validation loss, 20% held out", "#ff7f0e"),
            ("oracle: best test accuracy", "#7f7f7f"),
        ] {
            if let Some(o) = outs.iter().find(|o| o.criterion == name) {
                plot = plot.marker(
                    o.choice.kept as f64,
                    format!("{name}: epoch {}", o.choice.kept),
                    color,
                );
            }
        }
        let file = dir.join(format!("{set}-{optim}-noise{noise}-seed{}.svg", r.seed()));
        plot.save(&file)?;
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}
