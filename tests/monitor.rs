//! The monitor end to end on a scripted "training" whose reliance on single directions is known:
//! at epoch e only k_e redundant hidden units per class carry the signal, so fewer units means
//! more reliance on each one and a lower ablation AUC.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarMap};
use candle_reliance::{
    monitor::read_history, Decision, MonitorState, ProbeData, ProbeSet, RelianceConfig,
    RelianceMonitor, StopReason,
};
use std::path::Path;

const HIDDEN: usize = 16; // 8 units per class

/// Active units per class at each epoch (index 0 = epoch 1): rises to 8 at epoch 4, holds, falls.
const SCRIPT: [usize; 10] = [1, 2, 4, 8, 8, 4, 2, 1, 1, 1];

struct Net {
    w1: Tensor,
    w2: Tensor,
    probe: candle_reliance::Probe,
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.probe.forward(&xs.matmul(&self.w1)?.relu()?)?;
        // Tie-break towards class 0 when everything is ablated.
        h.matmul(&self.w2)?
            .broadcast_add(&Tensor::new(&[1e-3f32, 0.0], xs.device())?)
    }
}

fn setup() -> Result<(VarMap, Net, ProbeSet, ProbeData)> {
    let d = Device::Cpu;
    let varmap = VarMap::new();
    let w1 = varmap.get((2, HIDDEN), "w1", Init::Const(0.0), DType::F32, &d)?;
    let w2 = varmap.get((HIDDEN, 2), "w2", Init::Const(0.0), DType::F32, &d)?;
    let probes = ProbeSet::new();
    let net = Net {
        w1,
        w2,
        probe: probes.add("hidden")?,
    };
    // Inputs (a, -a): class 0 for a > 0, class 1 for a < 0.
    let a: Vec<f32> = (0..64)
        .map(|i| {
            if i % 2 == 0 {
                1.0 + i as f32 / 64.0
            } else {
                -1.0 - i as f32 / 64.0
            }
        })
        .collect();
    let xs: Vec<f32> = a.iter().flat_map(|&v| [v, -v]).collect();
    let ys: Vec<u32> = a.iter().map(|&v| u32::from(v < 0.0)).collect();
    let data = ProbeData::new(
        Tensor::from_vec(xs, (64, 2), &d)?,
        Tensor::from_vec(ys, 64, &d)?,
    )?;
    Ok((varmap, net, probes, data))
}

/// Weights of epoch `e`: units 0..8 read `a`, units 8..16 read `-a`; the first k of each group vote
/// for their class. A small epoch-specific offset makes every epoch's weights distinct.
fn weights(epoch: usize) -> Result<(Tensor, Tensor)> {
    let k = SCRIPT[(epoch - 1).min(SCRIPT.len() - 1)];
    let d = Device::Cpu;
    let mut w1 = vec![0f32; 2 * HIDDEN];
    for u in 0..HIDDEN {
        let row = usize::from(u >= 8);
        w1[row * HIDDEN + u] = 1.0 + epoch as f32 * 1e-3;
    }
    let mut w2 = vec![0f32; HIDDEN * 2];
    for u in 0..HIDDEN {
        let (class, i) = (u / 8, u % 8);
        if i < k {
            w2[u * 2 + class] = 1.0;
        }
    }
    Ok((
        Tensor::from_vec(w1, (2, HIDDEN), &d)?,
        Tensor::from_vec(w2, (HIDDEN, 2), &d)?,
    ))
}

fn train_epoch(varmap: &VarMap, epoch: usize) -> Result<()> {
    let (w1, w2) = weights(epoch)?;
    let vars = varmap.data().lock().unwrap();
    vars["w1"].set(&w1)?;
    vars["w2"].set(&w2)
}

fn config(dir: &Path, extra: &str) -> Result<RelianceConfig> {
    RelianceConfig::from_yaml_str(&format!(
        "schedule: {{check_every: 1, warmup_epochs: 1}}\n\
         ablation: {{fractions: 9, orders: 4, seed: 5}}\n\
         stopping: {{metric: auc, tolerance: 0.0, patience: 2}}\n\
         output: {{history_file: {h}, state_file: {s}}}\n{extra}",
        h = dir.join("hist.jsonl").display(),
        s = dir.join("state.json").display(),
    ))
}

fn values(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
    let vars = varmap.data().lock().unwrap();
    let mut v: Vec<_> = vars
        .iter()
        .map(|(k, var)| {
            (
                k.clone(),
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Runs epochs `from..=to` and returns the decisions.
fn run(
    monitor: &mut RelianceMonitor,
    varmap: &VarMap,
    net: &Net,
    from: usize,
    to: usize,
) -> Result<Vec<Decision>> {
    let mut out = vec![];
    for epoch in from..=to {
        train_epoch(varmap, epoch)?;
        let d = monitor.on_epoch_end(epoch, net, varmap)?;
        let stop = d.is_stop();
        out.push(d);
        if stop {
            break;
        }
    }
    Ok(out)
}

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
