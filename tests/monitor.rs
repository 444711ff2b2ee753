//! The monitor end to end on a scripted "training" whose reliance on single directions is known:
//! at epoch e only k_e redundant hidden units per class carry the signal, so fewer units means
//! more reliance on each one and a lower ablation AUC.

mod common;

use candle_core::{Device, Module, Result, Tensor};
use candle_reliance::{
    monitor::{
        read_history, Decision, EarlyStoppingStrategy, LabelWaveRule, Metric, Observation,
        StoppingRule, Warning,
    },
    MonitorState, RelianceMonitor, StopReason,
};
use common::scripted::*;
use std::path::Path;

#[test]
fn stops_when_prediction_changes_rise_and_restores_the_kept_weights_bit_exact() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(config(dir.path(), "")?, probes, data)?;
    let decisions = run(&mut monitor, &varmap, &net, 1, 10)?;
    let aucs: Vec<f64> = monitor.history().iter().map(|r| r.auc).collect();
    // The AUC must follow the script: up to epoch 4, equal at 5, down after.
    assert!(
        aucs[0] < aucs[1] && aucs[1] < aucs[2] && aucs[2] < aucs[3],
        "{aucs:?}"
    );
    assert_eq!(aucs[3], aucs[4], "same units, same orders, same AUC");
    assert!(aucs[5] < aucs[4], "{aucs:?}");
    // Training changes 32, 20, 12 (epoch 4), 15, 18: Label Wave (window 1, patience 2) stops at
    // epoch 6. Epochs 1–5 are on the plateau (tolerance 0: epoch 5 ties the peak), all equally
    // accurate: the later is kept, epoch 5; epoch 6 is neither on it nor a new low.
    assert_eq!(decisions.len(), 6);
    assert_eq!(
        decisions[5].reason(),
        Some(&StopReason::PredictionChangesRose {
            lowest_epoch: 4,
            lowest: 12.0,
            epochs_since: 2,
            kept_epoch: Some(5),
            plateau_end: Some(5),
        })
    );
    // Every record's unablated accuracy: all 64 samples right with k ≥ 1.
    assert!(monitor
        .history()
        .iter()
        .all(|r| r.unablated_accuracy == 1.0));

    assert_eq!(monitor.finish(&varmap)?, Some(5));
    let (w1, w2) = weights(5)?;
    let want = vec![
        ("w1".to_string(), w1.flatten_all()?.to_vec1::<f32>()?),
        ("w2".to_string(), w2.flatten_all()?.to_vec1::<f32>()?),
    ];
    assert_eq!(values(&varmap), want, "epoch 5's weights, bit for bit");

    let hist = read_history(dir.path().join("hist.jsonl"))?;
    assert_eq!(
        hist.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert!(hist[5].decision.is_stop());
    assert_eq!(
        hist.iter().map(|r| r.kept).collect::<Vec<_>>(),
        [true, true, true, true, true, false]
    );
    assert_eq!(
        hist.iter().map(|r| r.kept_epoch).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 5].map(Some)
    );
    assert_eq!(
        hist.iter().map(|r| r.training_changes).collect::<Vec<_>>(),
        [None, Some(32), Some(20), Some(12), Some(15), Some(18)]
    );
    assert_eq!(hist[3].curve.fractions.len(), 9);

    // Plots of the history: one curve per check, and the trend with the kept epoch marked.
    let (trend, curves) = candle_reliance::plot::plot_history_file(dir.path().join("hist.jsonl"))?;
    let curves = std::fs::read_to_string(curves).unwrap();
    for epoch in 1..=6 {
        assert!(
            curves.contains(&format!(r#"data-label="epoch {epoch}""#)),
            "epoch {epoch}"
        );
    }
    assert_eq!(curves.matches("<polyline").count(), 6);
    let trend = std::fs::read_to_string(trend).unwrap();
    assert!(
        trend.contains(r#"data-label="auc""#) && trend.contains(r#"data-label="ablation AUC""#)
    );
    assert!(trend.contains(">kept epoch 5</text>") && trend.contains(">stop</text>"));
    Ok(())
}

#[test]
fn disk_snapshot_restores_bit_exact_and_keeps_existing_files() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let best = dir.path().join("best.safetensors");
    let hist = dir.path().join("hist.jsonl");
    std::fs::write(&best, b"the user's own checkpoint").unwrap();
    std::fs::write(&hist, b"an earlier run's history\n").unwrap();
    let (varmap, net, probes, data) = setup()?;
    let extra = format!("restore_best: {{mode: disk, path: {}}}\n", best.display());
    let mut monitor = RelianceMonitor::new(config(dir.path(), &extra)?, probes, data)?;
    // Nothing the user had is lost: both files were moved aside, not overwritten.
    assert_eq!(
        std::fs::read(dir.path().join("best.safetensors.1.bak")).unwrap(),
        b"the user's own checkpoint"
    );
    assert_eq!(
        std::fs::read(dir.path().join("hist.jsonl.1.bak")).unwrap(),
        b"an earlier run's history\n"
    );
    run(&mut monitor, &varmap, &net, 1, 10)?;
    assert_eq!(monitor.finish(&varmap)?, Some(5));
    let (w1, w2) = weights(5)?;
    let v = values(&varmap);
    assert_eq!(v[0].1, w1.flatten_all()?.to_vec1::<f32>()?);
    assert_eq!(v[1].1, w2.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// Epoch 4's weights, and its second layer with the two output columns swapped: every
/// prediction flips, while agreement under ablation stays much the same.
fn straight_and_swapped() -> Result<(Tensor, Tensor, Tensor)> {
    let (w1, w2) = weights(4)?;
    let swapped = Tensor::cat(&[w2.narrow(1, 1, 1)?, w2.narrow(1, 0, 1)?], 1)?;
    Ok((w1, w2, swapped))
}

fn set_weights(varmap: &candle_nn::VarMap, w1: &Tensor, w2: &Tensor) -> Result<()> {
    let vars = varmap.data().lock().unwrap();
    vars["w1"].set(w1)?;
    vars["w2"].set(w2)
}

fn strip_seconds(state: &MonitorState) -> MonitorState {
    let mut s = state.clone();
    s.history.iter_mut().for_each(|r| r.seconds = 0.0);
    s
}

#[test]
fn interrupted_and_resumed_runs_decide_identically() -> Result<()> {
    let reference_dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let disk = |dir: &Path| {
        format!(
            "restore_best: {{mode: disk, path: {}}}\n",
            dir.join("best.safetensors").display()
        )
    };
    let mut reference = RelianceMonitor::new(
        config(reference_dir.path(), &disk(reference_dir.path()))?,
        probes,
        data,
    )?;
    let want = run(&mut reference, &varmap, &net, 1, 10)?;
    assert!(want.last().unwrap().is_stop());
    let want_state = strip_seconds(&reference.state()?);

    for cut in [1, 3, 4, 5] {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, net, probes, data) = setup()?;
        let cfg = config(dir.path(), &disk(dir.path()))?;
        let mut first = RelianceMonitor::new(cfg.clone(), probes, data.clone())?;
        let mut got = run(&mut first, &varmap, &net, 1, cut)?;
        drop(first); // the process dies; only the files remain

        let (net, probes) = rebuilt(&net)?;
        let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
        let mut resumed = RelianceMonitor::resume(cfg, probes, data, state)?;
        got.extend(run(&mut resumed, &varmap, &net, cut + 1, 10)?);
        assert_eq!(got, want, "interrupted after epoch {cut}");
        assert_eq!(
            strip_seconds(&resumed.state()?),
            want_state,
            "interrupted after epoch {cut}"
        );
        // The history file holds every check once, in order.
        let epochs: Vec<usize> = read_history(dir.path().join("hist.jsonl"))?
            .iter()
            .map(|r| r.epoch)
            .collect();
        assert_eq!(epochs, (1..=want.len()).collect::<Vec<_>>());
        assert_eq!(resumed.finish(&varmap)?, Some(5));
        assert_eq!(
            values(&varmap)[1].1,
            weights(5)?.1.flatten_all()?.to_vec1::<f32>()?
        );
    }
    Ok(())
}

#[test]
fn max_epochs_and_non_finite_stop() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let cfg = config(dir.path(), "")?;
    let mut cfg_max = cfg.clone();
    cfg_max.schedule.max_epochs = Some(3);
    let mut monitor = RelianceMonitor::new(cfg_max, probes.clone(), data.clone())?;
    let d = run(&mut monitor, &varmap, &net, 1, 10)?;
    assert_eq!(d.len(), 3);
    assert_eq!(
        d[2],
        Decision::Stop {
            reason: StopReason::MaxEpochs { epoch: 3 }
        }
    );
    // Prediction changes were still falling (32, 20): the budget ended before they rose.
    assert_eq!(
        monitor.history()[2].warnings,
        [Warning::NoRiseWithinBudget { epoch: 3 }]
    );
    assert!(monitor.history()[..2].iter().all(|r| r.warnings.is_empty()));

    // The first monitor holds the output folder until it is dropped.
    assert!(RelianceMonitor::new(cfg.clone(), probes.clone(), data.clone()).is_err());
    drop(monitor);
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
    train_epoch(&varmap, 1)?;
    assert!(!monitor.on_epoch_end(1, &net, &varmap)?.is_stop());
    let nan = Tensor::full(f32::NAN, (HIDDEN, 2), &Device::Cpu)?;
    varmap.data().lock().unwrap()["w2"].set(&nan)?;
    let d = monitor.on_epoch_end(2, &net, &varmap)?;
    assert!(
        matches!(d.reason(), Some(StopReason::NonFinite { epoch: 2, .. })),
        "{d:?}"
    );
    // The diverged epoch is not the best; finishing restores epoch 1.
    assert_eq!(monitor.finish(&varmap)?, Some(1));
    assert_eq!(
        values(&varmap)[1].1,
        weights(1)?.1.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn schedule_and_epoch_order() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut cfg = config(dir.path(), "")?;
    cfg.schedule.check_every = 2;
    cfg.schedule.warmup_epochs = 3;
    cfg.stopping.label_wave.patience = 100;
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
    run(&mut monitor, &varmap, &net, 1, 8)?;
    let epochs: Vec<usize> = monitor.history().iter().map(|r| r.epoch).collect();
    assert_eq!(epochs, vec![3, 5, 7]);
    let e = monitor
        .on_epoch_end(8, &net, &varmap)
        .unwrap_err()
        .to_string();
    assert!(e.contains("epoch 8 reported after epoch 8"), "{e}");
    Ok(())
}

/// A writer that collects log output in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn every_check_logs_a_structured_event() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    // A global subscriber: a thread-local one races with the other tests of this binary over
    // tracing's per-callsite interest cache. Events are told apart by thread (one per test).
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_thread_names(true)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("only this test sets a subscriber");
    let mut monitor = RelianceMonitor::new(config(dir.path(), "")?, probes, data)?;
    run(&mut monitor, &varmap, &net, 1, 10)?;
    monitor.finish(&varmap)?;
    let me = std::thread::current().name().unwrap().to_string();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["threadName"] == me.as_str())
        .collect();
    let checks: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["fields"]["message"] == "reliance check")
        .collect();
    assert_eq!(checks.len(), 6, "one event per check:\n{text}");
    for (i, c) in checks.iter().enumerate() {
        let f = &c["fields"];
        assert_eq!(f["epoch"], i as u64 + 1);
        assert_eq!(c["span"]["name"], "reliance_check", "{c}");
        for key in [
            "auc",
            "auc_ci_low",
            "auc_ci_high",
            "accuracy_0",
            "seconds",
            "value",
            "kept_epoch",
        ] {
            assert!(f[key].is_number(), "{key} missing in {f}");
        }
        assert_eq!(f["decision"], if i == 5 { "stop" } else { "continue" });
        assert_eq!(f["training_changes"].is_number(), i > 0, "{f}");
        // What is switched off is left out, not logged as NaN or empty.
        for key in ["noise_auc", "selectivity"] {
            assert!(f.get(key).is_none(), "{key} logged while off: {f}");
        }
        if i < 5 {
            assert!(f.get("reason").is_none(), "a reason without a stop: {f}");
        }
    }
    assert!(checks[5]["fields"]["reason"]
        .as_str()
        .unwrap()
        .contains("prediction changes rose"));
    assert!(events.iter().any(|e| e["fields"]["message"]
        == "restored the weights of the best epoch"
        && e["fields"]["best_epoch"] == 5));
    Ok(())
}

/// The monitor hands each check's unablated accuracy to the stopping rule, which keeps the most
/// accurate candidate. Epoch 2 is epoch 1's network with its two output columns swapped: every
/// prediction flips, so its accuracy is 0 against 1, while its agreement with its own
/// predictions under ablation stays on a plateau as wide as 50% of the peak. Both are
/// candidates; epoch 1 comes back.
#[test]
fn the_most_accurate_candidate_is_restored() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut cfg = config(dir.path(), "")?;
    cfg.stopping = StoppingRule {
        metric: Metric::AgreementAuc,
        tolerance: 0.5,
        ..Default::default()
    };
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
    let (w1, w2, swapped) = straight_and_swapped()?;
    for (epoch, w) in [(1, &w2), (2, &swapped)] {
        set_weights(&varmap, &w1, w)?;
        let d = monitor.on_epoch_end(epoch, &net, &varmap)?;
        assert!(!d.is_stop(), "epoch {epoch}: {d:?}");
    }
    let acc: Vec<f64> = monitor
        .history()
        .iter()
        .map(|r| r.unablated_accuracy)
        .collect();
    assert_eq!(acc, [1.0, 0.0]);
    let metric: Vec<f64> = monitor.history().iter().map(|r| r.value).collect();
    assert!(
        metric[1] >= 0.5 * metric[0],
        "both on the plateau: {metric:?}"
    );
    assert_eq!(monitor.finish(&varmap)?, Some(1));
    assert_eq!(
        values(&varmap)[1].1,
        w2.flatten_all()?.to_vec1::<f32>()?,
        "epoch 1's weights"
    );
    Ok(())
}

/// The monitor counts, at each check, the probe samples whose unablated prediction changed since
/// the previous check (what the Label Wave fallback follows), and carries the last predictions
/// through a saved state. Swapping the output columns flips every prediction of the 64 samples.
#[test]
fn prediction_changes_between_checks_are_counted_and_resumed() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let (w1, w2, swapped) = straight_and_swapped()?;
    let script = [&w2, &swapped, &swapped, &w2, &w2];
    let set = |w: &Tensor| set_weights(&varmap, &w1, w);
    let mut monitor = RelianceMonitor::new(config(dir.path(), "")?, probes.clone(), data.clone())?;
    // Counted independently: the arg-max of a plain forward of the monitor's subset.
    let mut want = vec![None];
    let mut previous: Option<Vec<u32>> = None;
    for (i, w) in script.iter().enumerate() {
        set(w)?;
        let pred = net
            .forward(monitor.data().xs())?
            .argmax(candle_core::D::Minus1)?
            .to_vec1::<u32>()?;
        if let Some(p) = &previous {
            want.push(Some(p.iter().zip(&pred).filter(|(a, b)| a != b).count()));
        }
        previous = Some(pred);
        if i < 3 {
            monitor.on_epoch_end(i + 1, &net, &varmap)?;
        }
    }
    let got: Vec<Option<usize>> = monitor
        .history()
        .iter()
        .map(|r| r.prediction_changes)
        .collect();
    assert_eq!(got, want[..3]);
    assert_eq!(
        want,
        [None, Some(64), Some(0), Some(64), Some(0)],
        "the script"
    );
    // Resumed after epoch 3: epoch 4 is counted against epoch 3's predictions.
    let state = monitor.state()?;
    drop(monitor);
    let mut resumed = RelianceMonitor::resume(config(dir.path(), "")?, probes, data, state)?;
    for (epoch, w) in [(4, script[3]), (5, script[4])] {
        set(w)?;
        resumed.on_epoch_end(epoch, &net, &varmap)?;
    }
    let got: Vec<Option<usize>> = resumed
        .history()
        .iter()
        .map(|r| r.prediction_changes)
        .collect();
    assert_eq!(got, want);
    let hist = read_history(dir.path().join("hist.jsonl"))?;
    assert_eq!(
        hist.iter()
            .map(|r| r.prediction_changes)
            .collect::<Vec<_>>(),
        want
    );
    Ok(())
}

/// Without `observe`, Label Wave follows the probe data's prediction changes between checks.
/// The metric is highest at the first check (8 units per class, then 4, 2, 1, 1); the output
/// columns are swapped at epochs 2–3 (accuracy 0), so the changes are 64, 0, 64, 0: the lowest
/// at epoch 3, Label Wave's patience 2 runs out at epoch 5. Epoch 1 is the most accurate
/// candidate; the metric, off its plateau since epoch 1 while the changes fell, is flagged as
/// uninformative at epoch 3.
#[test]
fn probe_data_changes_decide_without_observe() -> Result<()> {
    probe_data_run(false)?;
    probe_data_run(true)
}

fn probe_data_run(disk: bool) -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let extra = match disk {
        true => format!(
            "restore_best: {{mode: disk, path: {}}}\n",
            dir.path().join("best.safetensors").display()
        ),
        false => String::new(),
    };
    let mut cfg = config(dir.path(), &extra)?;
    cfg.stopping = StoppingRule {
        metric: Metric::AgreementAuc,
        tolerance: 0.0,
        label_wave: LabelWaveRule {
            window: 1,
            patience: 2,
        },
    };
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
    let swap = |w2: &Tensor| Tensor::cat(&[w2.narrow(1, 1, 1)?, w2.narrow(1, 0, 1)?], 1);
    let mut script = vec![];
    for (source, swapped) in [(4, false), (6, true), (7, true), (8, false), (9, false)] {
        let (w1, w2) = weights(source)?;
        script.push((w1, if swapped { swap(&w2)? } else { w2 }));
    }
    let mut decisions = vec![];
    for (i, (w1, w2)) in script.iter().enumerate() {
        set_weights(&varmap, w1, w2)?;
        decisions.push(monitor.on_epoch_end(i + 1, &net, &varmap)?);
    }
    let hist = monitor.history();
    let metric: Vec<f64> = hist.iter().map(|r| r.value).collect();
    assert!(
        metric[1..].iter().all(|&m| m < metric[0]),
        "the script's metric must fall from the first check: {metric:?}"
    );
    let changes: Vec<Option<usize>> = hist.iter().map(|r| r.prediction_changes).collect();
    assert_eq!(changes, [None, Some(64), Some(0), Some(64), Some(0)]);
    assert!(hist.iter().all(|r| r.training_changes.is_none()));
    let kept: Vec<bool> = hist.iter().map(|r| r.kept).collect();
    assert_eq!(kept, [true, false, false, false, false]);
    assert_eq!(
        hist[2].warnings,
        [Warning::RelianceUninformative {
            epoch: 3,
            plateau_end: 1,
            lowest_epoch: 3
        }]
    );
    assert!(decisions[..4].iter().all(|d| !d.is_stop()), "{decisions:?}");
    assert_eq!(
        decisions[4].reason(),
        Some(&StopReason::PredictionChangesRose {
            lowest_epoch: 3,
            lowest: 0.0,
            epochs_since: 2,
            kept_epoch: Some(1),
            plateau_end: Some(1),
        })
    );
    assert_eq!(monitor.finish(&varmap)?, Some(1));
    assert_eq!(
        values(&varmap)[1].1,
        script[0].1.flatten_all()?.to_vec1::<f32>()?,
        "disk {disk}: epoch 1's weights, bit for bit"
    );
    Ok(())
}

/// A rule of the user's, in the manner of Lightning's `EarlyStopping`: stop once the raw AUC has
/// not improved by `min_delta` for `patience` checks; keep the best check.
struct AucPatience {
    min_delta: f64,
    patience: usize,
    best: Option<(usize, f64)>,
    waited: usize,
}

impl EarlyStoppingStrategy for AucPatience {
    fn step(&mut self, obs: &Observation) -> Decision {
        let Some(check) = &obs.check else {
            return Decision::Continue;
        };
        match self.best {
            Some((_, best)) if check.auc < best + self.min_delta => self.waited += 1,
            _ => (self.best, self.waited) = (Some((obs.epoch, check.auc)), 0),
        }
        if self.waited >= self.patience {
            let message = format!("the AUC has not improved for {} checks", self.waited);
            return Decision::Stop {
                reason: StopReason::Custom { message },
            };
        }
        Decision::Continue
    }

    fn kept_epoch(&self) -> Option<usize> {
        self.best.map(|(epoch, _)| epoch)
    }
}

/// The monitor runs a strategy of the user's: the scripted AUC rises to epoch 4, ties at 5
/// (an improvement by `min_delta` 0) and falls; patience 2 stops at 7 and epoch 5 comes back.
#[test]
fn a_strategy_of_the_users_decides_and_its_epoch_is_restored() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut cfg = config(dir.path(), "")?;
    let rule = || AucPatience {
        min_delta: 0.0,
        patience: 2,
        best: None,
        waited: 0,
    };
    // It cannot save its state: with a state file that is refused at once.
    let e = RelianceMonitor::new(cfg.clone(), probes.clone(), data.clone())?
        .with_strategy(Box::new(rule()))
        .expect_err("a state file with a strategy that cannot save")
        .to_string();
    assert!(
        e.contains("output.state_file") && e.contains("save_state"),
        "{e}"
    );
    cfg.output.state_file = None;
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?.with_strategy(Box::new(rule()))?;
    let decisions = run(&mut monitor, &varmap, &net, 1, 10)?;
    assert_eq!(decisions.len(), 7);
    assert_eq!(
        decisions[6].reason(),
        Some(&StopReason::Custom {
            message: "the AUC has not improved for 2 checks".into()
        })
    );
    assert!(monitor.state().is_err(), "no state to save");
    assert_eq!(monitor.finish(&varmap)?, Some(5));
    assert_eq!(
        values(&varmap)[1].1,
        weights(5)?.1.flatten_all()?.to_vec1::<f32>()?
    );
    // The history records the user's decisions and kept epochs.
    let hist = read_history(dir.path().join("hist.jsonl"))?;
    assert_eq!(
        hist.iter().map(|r| r.kept_epoch).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 5, 5].map(Some)
    );
    Ok(())
}

/// A strategy that names as kept an epoch the monitor holds no weights of is an error, and the
/// epoch can be reported again.
#[test]
fn a_kept_epoch_without_a_snapshot_is_refused() -> Result<()> {
    struct KeepsThePrevious(Option<usize>);
    impl EarlyStoppingStrategy for KeepsThePrevious {
        fn step(&mut self, obs: &Observation) -> Decision {
            self.0 = obs.epoch.checked_sub(1).filter(|&e| e > 0);
            Decision::Continue
        }
        fn kept_epoch(&self) -> Option<usize> {
            self.0
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut cfg = config(dir.path(), "")?;
    cfg.output.state_file = None;
    let mut monitor =
        RelianceMonitor::new(cfg, probes, data)?.with_strategy(Box::new(KeepsThePrevious(None)))?;
    train_epoch(&varmap, 1)?;
    monitor.on_epoch_end(1, &net, &varmap)?;
    train_epoch(&varmap, 2)?;
    let e = monitor
        .on_epoch_end(2, &net, &varmap)
        .unwrap_err()
        .to_string();
    assert!(e.contains("from None to Some(1) at epoch 2"), "{e}");
    assert_eq!(monitor.history().len(), 1);
    Ok(())
}

#[test]
fn observe_refuses_what_it_cannot_count() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(config(dir.path(), "")?, probes, data)?;
    let logits = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?;
    // The monitor was given 64 training samples.
    let e = monitor.observe(&[3, 64], &logits).unwrap_err().to_string();
    assert!(
        e.starts_with("observe: ") && e.contains("index 64") && e.contains("64"),
        "{e}"
    );
    let e = monitor.observe(&[3], &logits).unwrap_err().to_string();
    assert!(e.contains("2 rows of logits for 1 indices"), "{e}");
    let flat = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
    assert!(monitor.observe(&[0, 1], &flat).is_err());
    // Reported in epoch 1, not in epoch 2: an error naming the epoch.
    train_epoch(&varmap, 1)?;
    observe(&mut monitor, 1, 0, 1)?;
    monitor.on_epoch_end(1, &net, &varmap)?;
    train_epoch(&varmap, 2)?;
    let e = monitor
        .on_epoch_end(2, &net, &varmap)
        .unwrap_err()
        .to_string();
    assert!(e.contains("none in epoch 2"), "{e}");
    // Nothing was lost: reporting the epoch's predictions, the same epoch goes through.
    observe(&mut monitor, 2, 0, 1)?;
    monitor.on_epoch_end(2, &net, &varmap)?;
    assert_eq!(monitor.history()[1].training_changes, Some(32));
    Ok(())
}

#[test]
fn a_state_this_version_cannot_continue_is_refused_saying_why() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let cfg = config(dir.path(), "")?;
    let mut monitor = RelianceMonitor::new(cfg.clone(), probes.clone(), data.clone())?;
    run(&mut monitor, &varmap, &net, 1, 3)?;
    drop(monitor);
    let path = dir.path().join("state.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], 2);
    // A file of 0.1: no format number.
    let old = dir.path().join("old.json");
    let mut without = v.clone();
    without.as_object_mut().unwrap().remove("format");
    std::fs::write(&old, without.to_string()).unwrap();
    let e = RelianceMonitor::load_state(&old).unwrap_err().to_string();
    assert!(
        e.contains("earlier version") && e.contains("old.json"),
        "{e}"
    );
    v["format"] = 7.into();
    std::fs::write(&old, v.to_string()).unwrap();
    let e = RelianceMonitor::load_state(&old).unwrap_err().to_string();
    assert!(e.contains("format 7"), "{e}");
    // Training predictions for another training set.
    let mut state = RelianceMonitor::load_state(&path)?;
    state.training_predictions.as_mut().unwrap().push(0);
    let e = RelianceMonitor::resume(cfg.clone(), probes.clone(), data.clone(), state)
        .expect_err("another training set")
        .to_string();
    assert!(e.contains("65") && e.contains("64"), "{e}");
    // A kept epoch the rule's state does not name.
    let mut state = RelianceMonitor::load_state(&path)?;
    state.kept_epoch = Some(1);
    let e = RelianceMonitor::resume(cfg, probes, data, state)
        .expect_err("a tampered kept epoch")
        .to_string();
    assert!(e.contains("keeps epoch"), "{e}");
    Ok(())
}

/// A strategy that keeps the epoch before the one just stepped (`lookback` 1): the monitor holds
/// the previous check's weights and snapshots them when they become the kept ones.
#[derive(Default)]
struct KeepsTheOneBefore {
    last: Option<usize>,
    kept: Option<usize>,
}

impl EarlyStoppingStrategy for KeepsTheOneBefore {
    fn step(&mut self, obs: &Observation) -> Decision {
        self.kept = self.last;
        self.last = Some(obs.epoch);
        Decision::Continue
    }
    fn kept_epoch(&self) -> Option<usize> {
        self.kept
    }
    fn lookback(&self) -> usize {
        1
    }
    fn save_state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!([self.last, self.kept]))
    }
    fn load_state(&mut self, state: serde_json::Value) -> candle_reliance::Result<()> {
        (self.last, self.kept) = serde_json::from_value(state).map_err(candle_core::Error::msg)?;
        Ok(())
    }
}

#[test]
fn a_kept_epoch_moved_back_to_a_held_one_is_restored_bit_exact() -> Result<()> {
    for disk in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let best = dir.path().join("best.safetensors");
        let extra = match disk {
            true => format!("restore_best: {{mode: disk, path: {}}}\n", best.display()),
            false => String::new(),
        };
        let cfg = config(dir.path(), &extra)?;
        let (varmap, net, probes, data) = setup()?;
        let strategy = || Box::new(KeepsTheOneBefore::default());
        let mut monitor =
            RelianceMonitor::new(cfg.clone(), probes, data.clone())?.with_strategy(strategy())?;
        run(&mut monitor, &varmap, &net, 1, 4)?;
        assert_eq!(monitor.best_epoch(), Some(3), "disk {disk}");
        if disk {
            // The kept epoch's file and the held one's, nothing else.
            let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
            assert_eq!(
                (state.kept_epoch, &state.held_epochs[..]),
                (Some(3), &[4][..])
            );
            let mut snaps: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with("best.safetensors"))
                .collect();
            snaps.sort();
            assert_eq!(
                snaps,
                ["best.safetensors.epoch3", "best.safetensors.epoch4"]
            );
            // Interrupted here and resumed: epoch 4's weights come from its held file.
            drop(monitor);
            let (net, probes) = rebuilt(&net)?;
            let mut resumed =
                RelianceMonitor::resume(cfg, probes, data, state)?.with_strategy(strategy())?;
            run(&mut resumed, &varmap, &net, 5, 5)?;
            assert_eq!(resumed.finish(&varmap)?, Some(4));
            assert_eq!(
                values(&varmap)[1].1,
                weights(4)?.1.flatten_all()?.to_vec1::<f32>()?,
                "epoch 4's weights from the held file"
            );
            let left: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with("best.safetensors"))
                .collect();
            assert_eq!(
                left,
                ["best.safetensors"],
                "held files are gone after finish"
            );
        } else {
            run(&mut monitor, &varmap, &net, 5, 6)?;
            assert_eq!(monitor.finish(&varmap)?, Some(5));
            assert_eq!(
                values(&varmap),
                vec![
                    (
                        "w1".to_string(),
                        weights(5)?.0.flatten_all()?.to_vec1::<f32>()?
                    ),
                    (
                        "w2".to_string(),
                        weights(5)?.1.flatten_all()?.to_vec1::<f32>()?
                    ),
                ],
                "epoch 5's weights, held while epoch 6 trained"
            );
        }
    }
    Ok(())
}

/// A state whose held epochs name snapshot files that are gone is refused at resume, naming the
/// file: the rule could still choose one of them.
#[test]
fn a_held_epoch_without_its_file_is_refused() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let best = dir.path().join("best.safetensors");
    let extra = format!("restore_best: {{mode: disk, path: {}}}\n", best.display());
    let mut cfg = config(dir.path(), &extra)?;
    cfg.stopping.label_wave.window = 3;
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(cfg.clone(), probes, data.clone())?;
    run(&mut monitor, &varmap, &net, 1, 3)?;
    drop(monitor);
    let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
    assert_eq!(state.held_epochs, [3]);
    std::fs::remove_file(dir.path().join("best.safetensors.epoch3")).unwrap();
    let (_, probes) = rebuilt(&net)?;
    let e = RelianceMonitor::resume(cfg, probes, data, state)
        .expect_err("a held file gone")
        .to_string();
    assert!(
        e.contains("best.safetensors.epoch3") && e.contains("missing"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_resume_on_other_probe_data_or_probes_is_refused_naming_what_differs() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let state = state_after(dir.path(), 3)?;
    let (varmap, net, _, data) = setup()?;
    let resume = |probes: candle_reliance::ProbeSet, data: candle_reliance::ProbeData| {
        RelianceMonitor::resume(config(dir.path(), "")?, probes, data, state.clone())
    };
    // The same data: resumed.
    let (_, _, probes, _) = setup()?;
    assert!(resume(probes, data.clone()).is_ok());
    // Other values, same size: refused, naming the digest.
    let (_, _, probes, _) = setup()?;
    let other = candle_reliance::ProbeData::new((data.xs() * 2.0)?, data.labels().clone())?;
    let e = resume(probes, other).expect_err("other values").to_string();
    assert!(
        e.contains("other probe data") && e.contains("digest"),
        "{e}"
    );
    // A state whose recorded digest was tampered with: refused for the same data.
    let mut tampered = state.clone();
    tampered.probe_data.as_mut().unwrap().digest = "0000000000000000".into();
    let (_, _, probes, _) = setup()?;
    let e = RelianceMonitor::resume(config(dir.path(), "")?, probes, data.clone(), tampered)
        .expect_err("a tampered digest")
        .to_string();
    assert!(
        e.contains("other probe data") && e.contains("the interrupted run's 0000000000000000"),
        "{e}"
    );
    // Other labels: refused.
    let (_, _, probes, _) = setup()?;
    let flipped = (Tensor::ones_like(data.labels())? - data.labels())?;
    let e = resume(
        probes,
        candle_reliance::ProbeData::new(data.xs().clone(), flipped)?,
    )
    .expect_err("other labels")
    .to_string();
    assert!(e.contains("other probe data"), "{e}");
    // Fewer training examples: refused, naming both counts.
    let (_, _, probes, _) = setup()?;
    let fewer = candle_reliance::ProbeData::new(
        data.xs().narrow(0, 0, 60)?,
        data.labels().narrow(0, 0, 60)?,
    )?;
    let e = resume(probes, fewer).expect_err("fewer").to_string();
    assert!(
        e.contains("60 training examples") && e.contains("had 64"),
        "{e}"
    );
    // A probe renamed in the model: the first check after the resume is refused, naming both.
    let probes = candle_reliance::ProbeSet::new();
    let renamed = Net {
        w1: net.w1.clone(),
        w2: net.w2.clone(),
        probe: probes.add("hidden2")?,
    };
    let mut monitor = resume(probes, data)?;
    observe(&mut monitor, 4, 0, 1)?;
    let e = monitor
        .on_epoch_end(4, &renamed, &varmap)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`hidden` (16 units)") && e.contains("`hidden2` (16 units)"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_state_whose_history_contradicts_its_counters_is_refused() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let state = state_after(dir.path(), 4)?;
    assert!(state.history.len() >= 2 && state.kept_epoch.is_some());
    let refused = |edit: &dyn Fn(&mut MonitorState)| -> String {
        let mut s = state.clone();
        edit(&mut s);
        let (_, _, probes, data) = setup().unwrap();
        RelianceMonitor::resume(config(dir.path(), "").unwrap(), probes, data, s)
            .expect_err("a contradicting state is refused")
            .to_string()
    };
    let e = refused(&|s| s.last_epoch = Some(1));
    assert!(
        e.contains("last epoch is 1") && e.contains("check at epoch 4"),
        "{e}"
    );
    let e = refused(&|s| s.history.swap(0, 1));
    assert!(e.contains("do not increase"), "{e}");
    let e = refused(&|s| s.kept_epoch = Some(99));
    assert!(e.contains("kept epoch 99 has no check"), "{e}");
    let e = refused(&|s| s.last_epoch = None);
    assert!(e.contains("no last epoch"), "{e}");
    Ok(())
}

#[test]
fn history_lines_the_state_does_not_hold_are_moved_aside_not_deleted() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(config(dir.path(), "")?, probes, data)?;
    run(&mut monitor, &varmap, &net, 1, 3)?;
    let state = monitor.state()?;
    run(&mut monitor, &varmap, &net, 4, 5)?; // two more checks, not in `state`
    drop(monitor);
    let hist = dir.path().join("hist.jsonl");
    let before = std::fs::read_to_string(&hist).unwrap();
    assert_eq!(before.lines().count(), state.history.len() + 2);
    let (_, _, probes, data) = setup()?;
    drop(RelianceMonitor::resume(
        config(dir.path(), "")?,
        probes,
        data,
        state.clone(),
    )?);
    // The file is the state's history; the old one, every line of it, is beside it.
    assert_eq!(read_history(&hist)?.len(), state.history.len());
    let aside = std::fs::read_to_string(dir.path().join("hist.jsonl.1.bak")).unwrap();
    assert_eq!(aside, before);
    // A history that is only behind the state, or cut mid-line by a crash, is rewritten in
    // place: nothing of it is lost.
    let cut = format!(
        "{}{{\"epoch\": 4, \"cut",
        std::fs::read_to_string(&hist).unwrap()
    );
    std::fs::write(&hist, &cut).unwrap();
    let (_, _, probes, data) = setup()?;
    drop(RelianceMonitor::resume(
        config(dir.path(), "")?,
        probes,
        data,
        state.clone(),
    )?);
    assert!(!dir.path().join("hist.jsonl.2.bak").exists());
    assert_eq!(read_history(&hist)?.len(), state.history.len());
    Ok(())
}
