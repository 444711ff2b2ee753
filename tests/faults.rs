//! Faults: broken networks are never kept, files stay readable whatever the numbers, and a crash
//! at any write leaves files a resumed run can continue from.

mod common;

use candle_core::{Device, Result, Tensor};
use candle_reliance::monitor::read_history;
use candle_reliance::{RelianceConfig, RelianceMonitor, StopReason};
use common::scripted::*;

/// The scripted run's configuration with another metric (tolerance 0, Label Wave window 1,
/// patience 2).
fn cfg(dir: &std::path::Path, metric: &str) -> Result<RelianceConfig> {
    let mut c = config(dir, "")?;
    c.stopping.metric = serde_norway::from_str(metric).unwrap();
    Ok(c)
}

fn set(varmap: &candle_nn::VarMap, name: &str, value: &Tensor) -> Result<()> {
    varmap.data().lock().unwrap()[name].set(value)
}

#[test]
fn nan_weights_before_a_relu_are_never_kept() -> Result<()> {
    // NaN weights feed a ReLU, which turns NaN into 0: the logits stay finite, every prediction
    // is the same, and nothing changes under ablation — an agreement AUC of 1, the best ever
    // seen. The monitor must see the weights themselves.
    for metric in ["agreement_auc", "normalized_auc", "auc"] {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, net, probes, data) = setup()?;
        let mut monitor = RelianceMonitor::new(cfg(dir.path(), metric)?, probes, data)?;
        for epoch in 1..=3 {
            train_epoch(&varmap, epoch)?;
            assert!(!monitor.on_epoch_end(epoch, &net, &varmap)?.is_stop());
        }
        train_epoch(&varmap, 4)?;
        set(
            &varmap,
            "w1",
            &Tensor::full(f32::NAN, (2, HIDDEN), &Device::Cpu)?,
        )?;
        let d = monitor.on_epoch_end(4, &net, &varmap)?;
        match d.reason() {
            Some(StopReason::NonFinite { epoch: 4, what }) => {
                assert!(what.contains("`w1`"), "{what}")
            }
            r => panic!("{metric}: unexpected {r:?}"),
        }
        assert_eq!(monitor.finish(&varmap)?, Some(3), "{metric}");
        assert_eq!(
            values(&varmap)[0].1,
            weights(3)?.0.flatten_all()?.to_vec1::<f32>()?
        );
        assert!(values(&varmap)
            .iter()
            .all(|(_, v)| v.iter().all(|x| x.is_finite())));
    }
    Ok(())
}

#[test]
fn a_dead_network_is_never_kept_and_stops_as_collapsed() -> Result<()> {
    // Every hidden unit silent (the ReLU's input pushed far below zero): the network predicts one
    // class for every sample and its ablation curves are flat.
    for metric in ["agreement_auc", "normalized_auc", "auc"] {
        let dir = tempfile::tempdir().unwrap();
        let (varmap, net, probes, data) = setup()?;
        let mut monitor = RelianceMonitor::new(cfg(dir.path(), metric)?, probes, data)?;
        let mut reasons = vec![];
        for epoch in 1..=10 {
            train_epoch(&varmap, epoch)?;
            if epoch >= 4 {
                set(
                    &varmap,
                    "w1",
                    &Tensor::full(-1e4f32, (2, HIDDEN), &Device::Cpu)?,
                )?;
            }
            let d = monitor.on_epoch_end(epoch, &net, &varmap)?;
            if d.is_stop() {
                reasons.push((epoch, d.reason().cloned()));
                break;
            }
        }
        // Epoch 3 is the last healthy check; from 4 on every check is degenerate, and a run of
        // them as long as the patience (2) stops at 6.
        match &reasons[..] {
            [(
                6,
                Some(StopReason::Collapsed {
                    kept_epoch, what, ..
                }),
            )] => {
                assert_eq!(*kept_epoch, Some(3));
                assert!(
                    what.contains("every sample") || what.contains("silent"),
                    "{what}"
                );
            }
            r => panic!("{metric}: unexpected {r:?}"),
        }
        let hist = read_history(dir.path().join("hist.jsonl"))?;
        assert!(
            hist[3].degenerate.is_some() && !hist[3].kept,
            "{:?}",
            hist[3]
        );
        assert_eq!(monitor.finish(&varmap)?, Some(3), "{metric}");
        assert_eq!(
            values(&varmap)[0].1,
            weights(3)?.0.flatten_all()?.to_vec1::<f32>()?
        );
    }
    Ok(())
}

#[test]
fn a_check_with_no_right_answer_keeps_the_files_readable() -> Result<()> {
    // Every label flipped: the unablated accuracy is 0 and the normalized AUC 0/0. The history
    // and the state must read back (serde_json writes NaN as null, which is not a number), and the
    // stop must say what happened.
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let flipped = (data.labels().ones_like()? - data.labels())?;
    let data = candle_reliance::ProbeData::new(data.xs().clone(), flipped)?;
    let mut monitor = RelianceMonitor::new(cfg(dir.path(), "normalized_auc")?, probes, data)?;
    let mut last = None;
    for epoch in 1..=10 {
        train_epoch(&varmap, epoch)?;
        let d = monitor.on_epoch_end(epoch, &net, &varmap)?;
        if d.is_stop() {
            last = d.reason().cloned();
            break;
        }
    }
    let hist = read_history(dir.path().join("hist.jsonl"))?;
    // 0.23 / 0: the AUC is not 0, ablations turn some wrong predictions right.
    assert_eq!(hist[0].unablated_accuracy, 0.0);
    assert!(hist[0].value == f64::INFINITY, "{:?}", hist[0]);
    assert!(hist[0].curve.normalized_auc == f64::INFINITY);
    assert!(hist.iter().all(|r| !r.kept && r.degenerate.is_some()));
    let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
    assert_eq!(state.history.len(), hist.len());
    match last {
        Some(StopReason::Collapsed {
            what,
            kept_epoch: None,
            ..
        }) => {
            assert!(what.contains("no sample"), "{what}")
        }
        r => panic!("unexpected {r:?}"),
    }
    Ok(())
}

#[test]
fn a_huge_label_is_an_error_before_anything_is_sized_by_it() -> Result<()> {
    // Sized by the label first, the class sums of u32::MAX classes were a 34 GB allocation that
    // aborted the process.
    // (u32::MAX itself is `ProbeData::PADDING`: a sample not counted.)
    let (_, net, probes, data) = setup()?;
    let mut labels = data.label_values().to_vec();
    labels[3] = u32::MAX - 1;
    let n = labels.len();
    let bad = candle_reliance::ProbeData::new(
        data.xs().clone(),
        Tensor::from_vec(labels.clone(), n, &Device::Cpu)?,
    )?;
    let e = candle_reliance::Measurement::new(&net, &probes, &bad)
        .statistics()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("label 4294967294 is out of range for a model with 2 logits"),
        "{e}"
    );
    labels[3] = candle_reliance::ProbeData::PADDING;
    let skipped = candle_reliance::ProbeData::new(
        data.xs().clone(),
        Tensor::from_vec(labels, n, &Device::Cpu)?,
    )?;
    let stats = candle_reliance::Measurement::new(&net, &probes, &skipped)
        .statistics()?
        .clone();
    assert_eq!((stats.samples, stats.targets), (n, n - 1));
    assert_eq!(stats.class_counts.iter().sum::<u64>(), n as u64 - 1);
    Ok(())
}

#[test]
fn sizes_beyond_what_a_check_needs_are_refused_fast() {
    // Each once hung or aborted: a curve of 10^8 fractions, 10^6 or 10^9 orders, 10^6 noise
    // draws, and 200 KB of brackets under one key (parsed in quadratic time).
    let cases: &[(&str, &str)] = &[
        ("ablation:\n  fractions: 100000000\n", "ablation.fractions"),
        ("ablation:\n  orders: 1000000\n", "ablation.orders"),
        ("ablation:\n  orders: 1000000000\n", "ablation.orders"),
        (
            "ablation:\n  orders: 200\n  fractions: 1000\n",
            "ablation.orders",
        ),
        ("noise:\n  draws: 1000000\n", "noise.draws"),
        ("noise:\n  draws: 18446744073709551615\n", "noise.draws"),
    ];
    for (yaml, key) in cases {
        let t = std::time::Instant::now();
        let e = RelianceConfig::from_yaml_str(yaml).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("at most"), "{yaml}: {e}");
        assert!(
            t.elapsed().as_secs_f64() < 1.0,
            "{yaml} took {:?}",
            t.elapsed()
        );
    }
    let deep = format!("stopping:\n  patience: {}\n", "[".repeat(200_000));
    let t = std::time::Instant::now();
    let e = RelianceConfig::from_yaml_str(&deep)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nested more than") && e.contains("line 2"),
        "{e}"
    );
    assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
    let big = format!("# {}\n", "x".repeat(2 << 20));
    let e = RelianceConfig::from_yaml_str(&big).unwrap_err().to_string();
    assert!(e.contains("at most 1048576"), "{e}");
    // Within the bounds, a large curve is fine.
    RelianceConfig::from_yaml_str("ablation:\n  fractions: 1025\n  orders: 97\n").unwrap();
}

/// The configuration of the crash test: every file on, the kept weights on disk, Label Wave's
/// `window` (3: the weights of the last check are held as a snapshot file too).
fn crash_config(dir: &std::path::Path, window: usize) -> Result<RelianceConfig> {
    let mut c = config(
        dir,
        &format!(
            "restore_best: {{mode: disk, path: {}}}\n",
            dir.join("best.safetensors").display()
        ),
    )?;
    c.stopping.label_wave.window = window;
    Ok(c)
}

/// The crash test's Label Wave window, passed to its child process.
fn crash_window() -> usize {
    std::env::var("CANDLE_RELIANCE_CRASH_WINDOW")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1)
}

/// Trains the scripted run from `from` to its stop or epoch 10; returns the stop epoch.
fn train_on(
    monitor: &mut RelianceMonitor,
    varmap: &candle_nn::VarMap,
    net: &Net,
    from: usize,
) -> Result<usize> {
    for epoch in from..=10 {
        train_epoch(varmap, epoch)?;
        observe(monitor, epoch, 0, 1)?;
        if monitor.on_epoch_end(epoch, net, varmap)?.is_stop() {
            return Ok(epoch);
        }
    }
    Ok(10)
}

/// Run in a child process by `a_crash_at_any_write_leaves_files_a_resume_continues_from`, which
/// makes it abort at its k-th write; does nothing in a normal test run.
#[test]
fn crash_child() -> Result<()> {
    let Ok(dir) = std::env::var("CANDLE_RELIANCE_CRASH_DIR") else {
        return Ok(());
    };
    let dir = std::path::PathBuf::from(dir);
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(crash_config(&dir, crash_window())?, probes, data)?;
    train_on(&mut monitor, &varmap, &net, 1)?;
    monitor.finish(&varmap)?;
    Ok(())
}

#[test]
fn a_crash_at_any_write_leaves_files_a_resume_continues_from() -> Result<()> {
    for window in [1, 3] {
        crash_at_every_write(window)?;
    }
    Ok(())
}

fn crash_at_every_write(window: usize) -> Result<()> {
    // The uninterrupted run.
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(crash_config(dir.path(), window)?, probes, data)?;
    let want_stop = train_on(&mut monitor, &varmap, &net, 1)?;
    let want_kept = monitor.finish(&varmap)?;
    let want_history: Vec<(usize, bool)> = read_history(dir.path().join("hist.jsonl"))?
        .iter()
        .map(|r| (r.epoch, r.kept))
        .collect();
    drop(monitor);

    let exe = std::env::current_exe().unwrap();
    let mut crashes = 0;
    for k in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(&exe)
            .args(["crash_child", "--exact", "--test-threads=1", "--quiet"])
            .env("CANDLE_RELIANCE_CRASH_DIR", dir.path())
            .env("CANDLE_RELIANCE_CRASH_WINDOW", window.to_string())
            .env("CANDLE_RELIANCE_ABORT_AT_WRITE", k.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            break; // the run has fewer than k writes
        }
        crashes += 1;
        // Resume from what the crash left: the state when there is one, else a fresh start.
        let (varmap, net, probes, data) = setup()?;
        let cfg = crash_config(dir.path(), window)?;
        let state_file = dir.path().join("state.json");
        let mut stopped_at = None;
        let (mut monitor, from) = if state_file.exists() {
            let state = RelianceMonitor::load_state(&state_file)
                .unwrap_or_else(|e| panic!("crash at write {k}: unreadable state: {e}"));
            let from = state.last_epoch.map_or(1, |e| e + 1);
            if state.stopped.is_some() {
                stopped_at = state.last_epoch; // the stop was committed before the crash
            }
            // The kept epoch's weights are in the snapshot the state names (or, once `finish`
            // began, at the configured path); so are the held epochs' until the run stopped.
            let held = if state.stopped.is_some() {
                &[][..]
            } else {
                &state.held_epochs[..]
            };
            for e in state.kept_epoch.iter().chain(held) {
                let named = dir.path().join(format!("best.safetensors.epoch{e}"));
                let finished = Some(*e) == state.kept_epoch
                    && state.stopped.is_some()
                    && dir.path().join("best.safetensors").exists();
                assert!(
                    named.exists() || finished,
                    "window {window}, crash at write {k}: no snapshot of epoch {e}"
                );
            }
            assert_eq!(state.held_epochs.is_empty(), window == 1 || from == 1);
            let m = RelianceMonitor::resume(cfg, probes, data, state)
                .unwrap_or_else(|e| panic!("crash at write {k}: cannot resume: {e}"));
            (m, from)
        } else {
            (RelianceMonitor::new(cfg, probes, data)?, 1)
        };
        let stop = train_on(&mut monitor, &varmap, &net, from)?;
        let stop = stopped_at.unwrap_or(stop);
        let kept = monitor.finish(&varmap)?;
        assert_eq!(
            (stop, kept),
            (want_stop, want_kept),
            "window {window}, crash at write {k}"
        );
        let history: Vec<(usize, bool)> = read_history(dir.path().join("hist.jsonl"))?
            .iter()
            .map(|r| (r.epoch, r.kept))
            .collect();
        assert_eq!(history, want_history, "window {window}, crash at write {k}");
        let kept = kept.expect("the scripted run keeps an epoch");
        assert_eq!(
            values(&varmap)[1].1,
            weights(kept)?.1.flatten_all()?.to_vec1::<f32>()?,
            "window {window}, crash at write {k}: the kept epoch's weights"
        );
        // Nothing half-written or stale is left: no temporary files, no other snapshots (a
        // fresh start, with no state to trust, moves an earlier run's files aside as `.bak`).
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".tmp")
                && !n.starts_with(".tmp")
                && (!n.contains(".epoch") || n.ends_with(".bak"))),
            "window {window}, crash at write {k}: left {names:?}"
        );
    }
    assert!(crashes >= 10, "only {crashes} writes were crashed at");
    eprintln!("window {window}: crashed and resumed at each of {crashes} writes");
    Ok(())
}

#[test]
fn output_paths_are_checked_against_each_other_and_locked() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // One file for two outputs destroyed the history or the weights.
    for (yaml, key) in [
        (
            format!("output: {{history_file: {d}/a, state_file: {d}/a}}\n"),
            "output.state_file",
        ),
        (
            format!("output: {{state_file: {d}/s}}\nrestore_best: {{mode: disk, path: {d}/s}}\n"),
            "restore_best.path",
        ),
    ] {
        let e = RelianceConfig::from_yaml_str(&yaml)
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains("same file"), "{e}");
    }
    // The snapshot path may equal another output while the snapshot is kept in memory.
    RelianceConfig::from_yaml_str(&format!(
        "output: {{state_file: {d}/s}}\nrestore_best: {{path: {d}/s}}\n"
    ))?;

    // A second monitor on the same folder is refused while the first lives, naming it.
    let (_, _, probes, data) = setup()?;
    let first = RelianceMonitor::new(config(dir.path(), "")?, probes.clone(), data.clone())?;
    let e = RelianceMonitor::new(config(dir.path(), "")?, probes.clone(), data.clone())
        .expect_err("a second monitor on the same folder")
        .to_string();
    assert!(
        e.contains(&format!("process {}", std::process::id())) && e.contains("writing to"),
        "{e}"
    );
    drop(first);
    let second = RelianceMonitor::new(config(dir.path(), "")?, probes.clone(), data.clone())?;
    drop(second);

    // A folder named as an output file, and a snapshot folder that cannot be made, are errors
    // at creation, not at the first new best.
    std::fs::create_dir(dir.path().join("hist.jsonl.d")).unwrap();
    let mut cfg = config(dir.path(), "")?;
    cfg.output.history_file = Some(dir.path().join("hist.jsonl.d"));
    let e = RelianceMonitor::new(cfg, probes.clone(), data.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("output.history_file") && e.contains("is a directory"),
        "{e}"
    );
    std::fs::write(dir.path().join("not-a-folder"), b"x").unwrap();
    let e = RelianceMonitor::new(
        config(
            dir.path(),
            &format!("restore_best: {{mode: disk, path: {d}/not-a-folder/best.safetensors}}\n"),
        )?,
        probes,
        data,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not-a-folder"), "{e}");
    Ok(())
}

#[test]
fn a_resume_with_other_deciding_settings_is_refused_naming_them() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let (varmap, net, probes, data) = setup()?;
    let cfg = config(dir.path(), "")?;
    let mut monitor = RelianceMonitor::new(cfg.clone(), probes.clone(), data.clone())?;
    for epoch in 1..=3 {
        train_epoch(&varmap, epoch)?;
        monitor.on_epoch_end(epoch, &net, &varmap)?;
    }
    drop(monitor);
    let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
    let mut other = cfg.clone();
    other.stopping.metric = candle_reliance::monitor::Metric::NormalizedAuc;
    other.data.subset_size = 10;
    let e = RelianceMonitor::resume(other, probes.clone(), data.clone(), state.clone())
        .expect_err("other settings")
        .to_string();
    assert!(
        e.contains("stopping.metric") && e.contains("data.subset_size") && !e.contains("patience"),
        "{e}"
    );
    // Settings that do not decide (files, batching) may change.
    let mut fine = cfg;
    fine.batching.batch_size = 7;
    RelianceMonitor::resume(fine, probes, data, state)?;
    Ok(())
}

#[test]
fn a_kept_epoch_whose_snapshot_cannot_be_written_is_not_recorded() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let best = dir.path().join("snap").join("best.safetensors");
    let (varmap, net, probes, data) = setup()?;
    let mut monitor = RelianceMonitor::new(
        config(
            dir.path(),
            &format!("restore_best: {{mode: disk, path: {}}}\n", best.display()),
        )?,
        probes,
        data,
    )?;
    train_epoch(&varmap, 1)?;
    monitor.on_epoch_end(1, &net, &varmap)?;
    // The snapshot folder turns into a file: epoch 2's kept weights cannot be written.
    std::fs::remove_dir_all(dir.path().join("snap")).unwrap();
    std::fs::write(dir.path().join("snap"), b"in the way").unwrap();
    train_epoch(&varmap, 2)?;
    let e = monitor
        .on_epoch_end(2, &net, &varmap)
        .unwrap_err()
        .to_string();
    // The error names the file and the key that configures it.
    assert!(
        e.contains("best.safetensors.epoch2") && e.contains("restore_best.path"),
        "{e}"
    );
    assert_eq!(
        monitor.best_epoch(),
        Some(1),
        "epoch 2 was kept without its weights"
    );
    assert_eq!(read_history(dir.path().join("hist.jsonl"))?.len(), 1);
    let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
    assert_eq!((state.last_epoch, state.kept_epoch), (Some(1), Some(1)));
    // Once the obstacle is gone the same epoch is reported again, and decides as it would have.
    std::fs::remove_file(dir.path().join("snap")).unwrap();
    std::fs::create_dir(dir.path().join("snap")).unwrap();
    monitor.on_epoch_end(2, &net, &varmap)?;
    assert_eq!(monitor.best_epoch(), Some(2));
    let hist = read_history(dir.path().join("hist.jsonl"))?;
    assert_eq!(hist.iter().map(|r| r.epoch).collect::<Vec<_>>(), [1, 2]);
    assert!(dir
        .path()
        .join("snap")
        .join("best.safetensors.epoch2")
        .exists());
    Ok(())
}

/// A probe whose width is `wide` for a batch of `rows_wide` samples and one less otherwise.
struct Ragged {
    probe: candle_reliance::Probe,
    rows_wide: usize,
    wide: usize,
}

impl candle_core::Module for Ragged {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let width = if xs.dim(0)? == self.rows_wide {
            self.wide
        } else {
            self.wide - 1
        };
        let h = self.probe.forward(&xs.narrow(1, 0, width)?)?;
        // Logits for 3 classes from whatever width the probe saw.
        h.sum_keepdim(1)?
            .broadcast_as((xs.dim(0)?, 3))?
            .contiguous()
    }
}

fn ragged_data(n: usize) -> Result<candle_reliance::ProbeData> {
    let xs = Tensor::arange(0f32, (n * 6) as f32, &Device::Cpu)?.reshape((n, 6))?;
    let ys = Tensor::new(
        (0..n as u32).map(|i| i % 3).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    Ok(candle_reliance::ProbeData::new(xs, ys)?)
}

#[test]
fn a_probe_whose_width_changes_between_batches_is_named_with_both_widths() -> Result<()> {
    // Ten samples in batches of 4: the widths are 5, 5, then 4 for the last two samples.
    let probes = candle_reliance::ProbeSet::new();
    let model = Ragged {
        probe: probes.add("h")?,
        rows_wide: 4,
        wide: 5,
    };
    let data = ragged_data(10)?;
    let m = candle_reliance::Measurement::new(&model, &probes, &data).with_batch_size(4);
    let e = m.statistics().unwrap_err().to_string();
    assert!(
        e.contains("probe `h`") && e.contains("5 then 4") && !e.contains("class count"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_probe_set_without_units_is_refused_naming_the_probes() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    // No probes at all: refused at the first check (a model may add its probes after the
    // monitor is built).
    let model = Ragged {
        probe: candle_reliance::ProbeSet::new().add("elsewhere")?,
        rows_wide: 0,
        wide: 2,
    };
    let mut monitor = RelianceMonitor::new(
        config(dir.path(), "")?,
        candle_reliance::ProbeSet::new(),
        ragged_data(10)?,
    )?;
    let e = monitor.check(2, &model).unwrap_err().to_string();
    assert!(e.contains("has no probes"), "{e}");
    drop(monitor);
    // Probes whose activations have no units: refused at the first check, naming them.
    let probes = candle_reliance::ProbeSet::new();
    let model = Ragged {
        probe: probes.add("empty")?,
        rows_wide: usize::MAX,
        wide: 1,
    };
    let mut monitor = RelianceMonitor::new(config(dir.path(), "")?, probes, ragged_data(10)?)?;
    let e = monitor.check(2, &model).unwrap_err().to_string();
    assert!(e.contains("`empty`") && e.contains("0 units"), "{e}");
    Ok(())
}

/// Run in a child process by `a_kill_during_snapshot_writes_leaves_nothing_a_start_keeps`:
/// writes disk snapshots of a 16 MB `VarMap` round after round until killed; does nothing in a
/// normal test run.
#[test]
fn snapshot_writer_child() -> Result<()> {
    let Ok(dir) = std::env::var("CANDLE_RELIANCE_KILL_DIR") else {
        return Ok(());
    };
    let dir = std::path::PathBuf::from(dir);
    let (varmap, net, probes, data) = setup()?;
    // Ballast that makes each snapshot 16 MB, so that most of the child's time is spent writing.
    varmap.get(
        (1024, 4096),
        "ballast",
        candle_nn::Init::Const(0.5),
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    for round in 0.. {
        let sub = dir.join(format!("round{round}"));
        let mut monitor =
            RelianceMonitor::new(crash_config(&sub, 1)?, probes.clone(), data.clone())?;
        train_on(&mut monitor, &varmap, &net, 1)?;
        monitor.finish(&varmap)?;
    }
    Ok(())
}

#[test]
fn a_kill_during_snapshot_writes_leaves_nothing_a_start_keeps() -> Result<()> {
    // Killed at arbitrary moments (most of them inside a snapshot write): the only files a
    // kill may leave half-written are the monitor's own `*.tmp`, which the next start of a
    // monitor on the same files removes; no temporary file of anyone else's (safetensors'
    // writer used to leave a hidden `.tmpXXXXXX` of the snapshot's size at every such kill).
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (i, ms) in [300u64, 450, 600, 750, 900, 1050, 1200, 1350]
        .iter()
        .enumerate()
    {
        let run = dir.path().join(format!("kill{i}"));
        let mut child = std::process::Command::new(&exe)
            .args([
                "snapshot_writer_child",
                "--exact",
                "--test-threads=1",
                "--quiet",
            ])
            .env("CANDLE_RELIANCE_KILL_DIR", &run)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(*ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let Ok(rounds) = std::fs::read_dir(&run) else {
            continue; // killed before its first file
        };
        for round in rounds {
            let round = round.unwrap().path();
            let names = |p: &std::path::Path| -> Vec<String> {
                std::fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            };
            let left = names(&round);
            assert!(
                left.iter().all(|n| !n.starts_with(".tmp")),
                "kill after {ms} ms: a foreign temporary file in {}: {left:?}",
                round.display()
            );
            // A fresh start on these files removes what the kill cut short.
            let (_, _, probes, data) = setup()?;
            drop(RelianceMonitor::new(
                crash_config(&round, 1)?,
                probes,
                data,
            )?);
            let left = names(&round);
            assert!(
                left.iter().all(|n| !n.ends_with(".tmp")),
                "kill after {ms} ms: {left:?} after a fresh start in {}",
                round.display()
            );
        }
    }
    Ok(())
}

#[test]
fn a_history_line_written_before_shared_rows_existed_still_reads() -> Result<()> {
    let dir = tempfile::tempdir().unwrap();
    state_after(dir.path(), 3)?;
    let path = dir.path().join("hist.jsonl");
    let old: Vec<String> = std::fs::read_to_string(&path)?
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let curve = v["curve"].as_object_mut().expect("a curve in every line");
            assert!(curve.remove("shared_rows").is_some());
            v.to_string()
        })
        .collect();
    assert!(!old.is_empty());
    std::fs::write(&path, old.join("\n"))?;
    let read = read_history(&path)?;
    assert_eq!(read.len(), old.len());
    assert!(read.iter().all(|r| !r.curve.shared_rows));
    Ok(())
}
