//! The monitor end to end on a scripted "training" whose reliance on single directions is known:
//! at epoch e only k_e redundant hidden units per class carry the signal, so fewer units means
//! more reliance on each one and a lower ablation AUC.

mod common;

use candle_core::{Device, Module, Result, Tensor};
use candle_reliance::{
    monitor::{read_history, Fallback, Keep, Metric, StoppingRule},
    Decision, MonitorState, ProbeSet, RelianceMonitor, StopReason,
};
use common::scripted::*;
use std::path::Path;

#[test]
fn stops_after_the_peak_and_restores_its_weights_bit_exact() -> Result<()> {
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
    // Peak at 4, tied at 5 (on the plateau with tolerance 0); 6 and 7 below it: patience 2
    // stops at epoch 7 and keeps epoch 5, the last on the plateau.
    assert_eq!(decisions.len(), 7);
    match decisions[6].reason() {
        Some(StopReason::Declined {
            peak_epoch: 4,
            kept_epoch: 5,
            epochs_below: 2,
            ..
        }) => {}
        r => panic!("unexpected {r:?}"),
    }
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
    assert_eq!(hist.len(), 7);
    assert_eq!(
        hist.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6, 7]
    );
    assert!(hist[6].decision.is_stop());
    assert_eq!(
        hist.iter().map(|r| r.kept).collect::<Vec<_>>(),
        [true, true, true, true, true, false, false]
    );
    assert_eq!(hist[3].curve.fractions.len(), 9);

    // Plots of the history: one curve per check, and the trend with the best epoch marked.
    let (trend, curves) = candle_reliance::plot::plot_history_file(dir.path().join("hist.jsonl"))?;
    let curves = std::fs::read_to_string(curves).unwrap();
    for epoch in 1..=7 {
        assert!(
            curves.contains(&format!(r#"data-label="epoch {epoch}""#)),
            "epoch {epoch}"
        );
    }
    assert_eq!(curves.matches("<polyline").count(), 7);
    let trend = std::fs::read_to_string(trend).unwrap();
    assert!(
        trend.contains(r#"data-label="auc (smoothed)""#)
            && trend.contains(r#"data-label="ablation AUC""#)
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
    let want_state = strip_seconds(&reference.state());

    for cut in [1, 3, 4, 5] {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, net, probes, data) = setup()?;
        let cfg = config(dir.path(), &disk(dir.path()))?;
        let mut first = RelianceMonitor::new(cfg.clone(), probes, data.clone())?;
        let mut got = run(&mut first, &varmap, &net, 1, cut)?;
        drop(first); // the process dies; only the files remain

        let probes = ProbeSet::new();
        let net = Net {
            w1: net.w1.clone(),
            w2: net.w2.clone(),
            probe: probes.add("hidden")?,
        };
        let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
        let mut resumed = RelianceMonitor::resume(cfg, probes, data, state)?;
        got.extend(run(&mut resumed, &varmap, &net, cut + 1, 10)?);
        assert_eq!(got, want, "interrupted after epoch {cut}");
        assert_eq!(
            strip_seconds(&resumed.state()),
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
    cfg.stopping.patience = 100;
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
    assert_eq!(checks.len(), 7, "one event per check:\n{text}");
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
        ] {
            assert!(f[key].is_number(), "{key} missing in {f}");
        }
        assert_eq!(f["decision"], if i == 6 { "stop" } else { "continue" });
        // What is switched off is left out, not logged as NaN or empty.
        for key in ["noise_auc", "selectivity"] {
            assert!(f.get(key).is_none(), "{key} logged while off: {f}");
        }
        if i < 6 {
            assert!(f.get("reason").is_none(), "a reason without a stop: {f}");
        }
    }
    assert!(checks[6]["fields"]["reason"]
        .as_str()
        .unwrap()
        .contains("reliance rose"));
    assert!(events.iter().any(|e| e["fields"]["message"]
        == "restored the weights of the best epoch"
        && e["fields"]["best_epoch"] == 5));
    Ok(())
}

/// The monitor hands each check's unablated accuracy to the stopping rule: of two checks on the
/// plateau, `most_accurate_near_peak` (the default) restores the accurate one, `last_near_peak`
/// the later one. Epoch 2 is epoch 1's network with its two output columns swapped: every
/// prediction flips, so its accuracy is 0 against 1, while its agreement with its own
/// predictions under ablation stays on a plateau as wide as 50% of the peak.
#[test]
fn the_most_accurate_plateau_check_is_restored() -> Result<()> {
    for (keep, kept) in [(Keep::MostAccurateNearPeak, 1), (Keep::LastNearPeak, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, net, probes, data) = setup()?;
        let mut cfg = config(dir.path(), "")?;
        cfg.stopping = StoppingRule {
            metric: Metric::AgreementAuc,
            tolerance: 0.5,
            patience: 5,
            keep,
            // Epoch 2 loses all its accuracy: the guard would call it unstable and keep neither.
            accuracy_drop: 1.0,
            // The metric never rises above epoch 1's: the fallback would decide.
            fallback: Fallback::None,
            ..Default::default()
        };
        assert_eq!(keep == Keep::MostAccurateNearPeak, keep == Keep::default());
        let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
        let (w1, w2, swapped) = straight_and_swapped()?;
        for (epoch, w2) in [(1, &w2), (2, &swapped)] {
            set_weights(&varmap, &w1, w2)?;
            let d = monitor.on_epoch_end(epoch, &net, &varmap)?;
            assert!(!d.is_stop(), "{keep:?}: epoch {epoch}: {d:?}");
        }
        let acc: Vec<f64> = monitor
            .history()
            .iter()
            .map(|r| r.unablated_accuracy)
            .collect();
        assert_eq!(acc, [1.0, 0.0], "{keep:?}");
        let metric: Vec<f64> = monitor.history().iter().map(|r| r.value).collect();
        assert!(
            metric[1] >= 0.5 * metric[0],
            "{keep:?}: both on the plateau: {metric:?}"
        );
        assert_eq!(monitor.finish(&varmap)?, Some(kept), "{keep:?}");
        let want = if kept == 1 { &w2 } else { &swapped };
        assert_eq!(
            values(&varmap)[1].1,
            want.flatten_all()?.to_vec1::<f32>()?,
            "{keep:?}: epoch {kept}'s weights"
        );
    }
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
    let state = monitor.state();
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

/// With the accuracy guard on (the default), a check whose network lost its accuracy (epoch 2:
/// the output columns swapped, accuracy 0 against 1) is recorded as unstable and not kept, even
/// where its metric would put it on the plateau.
#[test]
fn an_unstable_check_is_recorded_and_not_kept() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut cfg = config(dir.path(), "")?;
    cfg.stopping = StoppingRule {
        metric: Metric::AgreementAuc,
        tolerance: 0.5,
        patience: 5,
        keep: Keep::LastNearPeak,
        ..Default::default()
    };
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
    let (w1, w2, swapped) = straight_and_swapped()?;
    for (epoch, w2) in [(1, &w2), (2, &swapped)] {
        set_weights(&varmap, &w1, w2)?;
        monitor.on_epoch_end(epoch, &net, &varmap)?;
    }
    let flags: Vec<(bool, bool)> = monitor
        .history()
        .iter()
        .map(|r| (r.unstable, r.kept))
        .collect();
    assert_eq!(flags, [(false, true), (true, false)]);
    assert_eq!(monitor.finish(&varmap)?, Some(1));
    assert_eq!(values(&varmap)[1].1, w2.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// The fallback end to end: the metric is highest at the first check (8 units per class, then
/// 4, 2, 1, 1), so Label Wave on the probe data's prediction changes decides. The output columns
/// are swapped at epochs 2–3, so the changes are 64, 0, 64, 0: the fewest at epoch 3, Label
/// Wave's patience 2 runs out at epoch 5, the rule's (2) long before; epoch 3's weights come back.
#[test]
fn the_label_wave_fallback_stops_and_restores_its_epoch() -> Result<()> {
    fallback_run(false)?;
    fallback_run(true)
}

fn fallback_run(disk: bool) -> Result<()> {
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
        patience: 2,
        // The swapped epochs lose all their accuracy; the guard is not what this tests.
        accuracy_drop: 1.0,
        fallback: Fallback::LabelWave,
        label_wave: candle_reliance::monitor::LabelWaveRule {
            window: 1,
            patience: 2,
        },
        ..Default::default()
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
    let kept: Vec<bool> = hist.iter().map(|r| r.kept).collect();
    assert_eq!(kept, [true, true, true, false, false]);
    assert!(decisions[..4].iter().all(|d| !d.is_stop()), "{decisions:?}");
    match decisions[4].reason() {
        Some(StopReason::FellBackToLabelWave {
            lowest_epoch: 3,
            kept_epoch: 3,
            epochs_below: 4,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(monitor.finish(&varmap)?, Some(3));
    assert_eq!(
        values(&varmap)[1].1,
        script[2].1.flatten_all()?.to_vec1::<f32>()?,
        "disk {disk}: epoch 3's weights, bit for bit"
    );
    Ok(())
}
