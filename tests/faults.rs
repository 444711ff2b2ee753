//! Faults: broken networks are never kept, files stay readable whatever the numbers, and a crash
//! at any write leaves files a resumed run can continue from.

mod common;

use candle_core::{Device, Result, Tensor};
use candle_reliance::monitor::read_history;
use candle_reliance::{RelianceConfig, RelianceMonitor, StopReason};
use common::scripted::*;

/// The scripted run's configuration with the default metric (agreement AUC), tolerance 0 and
/// patience 2.
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
        // Epoch 3 is the last on the plateau; 4 and 5 are degenerate; patience 2 stops at 5.
        match &reasons[..] {
            [(
                5,
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
    let (_, net, probes, data) = setup()?;
    let mut labels = data.label_values().to_vec();
    labels[3] = u32::MAX;
    let n = labels.len();
    let bad = candle_reliance::ProbeData::new(
        data.xs().clone(),
        Tensor::from_vec(labels, n, &Device::Cpu)?,
    )?;
    let e = candle_reliance::Measurement::new(&net, &probes, &bad)
        .statistics()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("label 4294967295 is out of range for a model with 2 logits"),
        "{e}"
    );
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
