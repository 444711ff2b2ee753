//! Does reliance-based stopping pick a good epoch? MNIST (8 000 training / 2 000 test digits)
//! with noisy labels, compared with validation-loss stopping, training for all epochs, and the
//! oracle epoch by test loss. Prints one JSON line per run and a summary; writes SVG plots.
//!
//! ```text
//! cargo run --release --example early_stopping -- --epochs 100 --seeds 3 --noise 0.2,0.4
//! ```
//! After the monitor stops, the run goes on to the last epoch (for the all-epochs and oracle
//! baselines) and keeps measuring the normalized AUC for the plot; `--trace-after-stop 0` skips
//! that. The check share of wall time counts only the checks up to the stop.

#[path = "common/mod.rs"]
mod common;

use candle_core::{Device, Result, Tensor};
use candle_nn::VarMap;
use candle_reliance::data::corrupt_labels;
use candle_reliance::plot::{Plot, Series};
use candle_reliance::{Measurement, ProbeData, ProbeSet, RelianceConfig, RelianceMonitor};
use common::*;
use std::time::Instant;

struct Run {
    test_loss: Vec<f64>,
    test_acc: Vec<f64>,
    metric: Vec<(f64, f64)>,
    /// The same metric measured after the stop, for the plot only (not part of the method).
    metric_after: Vec<(f64, f64)>,
    stop_epoch: Option<usize>,
    chosen: usize,
    train_s: f64,
    check_s: f64,
}

/// Full training split, reliance monitor at its default configuration (training data only).
fn reliance_run(
    x: &Tensor,
    y: &Tensor,
    test: (&Tensor, &Tensor),
    epochs: usize,
    seed: u64,
    hidden: usize,
    lr: f64,
) -> Result<Run> {
    let varmap = VarMap::new();
    let probes = ProbeSet::new();
    let model = Mlp::new(&varmap, &[hidden, hidden], 0.0, &probes, seed)?;
    let mut opt = adamw(varmap.all_vars(), lr)?;
    let config = RelianceConfig::default();
    let spec = config.ablation.clone();
    let mut monitor = RelianceMonitor::new(
        config,
        probes.clone(),
        ProbeData::new(x.clone(), y.clone())?,
    )?;
    let mut rng = Rng::new(seed ^ 0xABCD);
    let mut r = Run {
        test_loss: vec![],
        test_acc: vec![],
        metric: vec![],
        metric_after: vec![],
        stop_epoch: None,
        chosen: epochs,
        train_s: 0.0,
        check_s: 0.0,
    };
    for epoch in 1..=epochs {
        let t0 = Instant::now();
        train_epoch(|b| model.forward_t(b, true), &mut opt, x, y, 64, &mut rng)?;
        let train_s = t0.elapsed().as_secs_f64();
        let (l, a) = evaluate(&model, test.0, test.1)?;
        r.test_loss.push(l);
        r.test_acc.push(a);
        if r.stop_epoch.is_none() {
            // Wall time up to the stop is what a user of the monitor pays.
            r.train_s += train_s;
            let t1 = Instant::now();
            let d = monitor.on_epoch_end(epoch, &model, &varmap)?;
            r.check_s += t1.elapsed().as_secs_f64();
            if let Some(c) = monitor.history().last().filter(|c| c.epoch == epoch) {
                r.metric.push((epoch as f64, c.smoothed));
            }
            if d.is_stop() {
                r.stop_epoch = Some(epoch);
                r.chosen = monitor.best_epoch().unwrap_or(epoch);
                r.metric_after
                    .push((epoch as f64, r.metric.last().map_or(f64::NAN, |m| m.1)));
            }
        } else if arg("trace-after-stop", 1) == 1 {
            let c = Measurement::new(&model, &probes, monitor.data()).ablation_curve(&spec)?;
            r.metric_after.push((epoch as f64, c.normalized_auc));
        }
    }
    if r.stop_epoch.is_none() {
        r.chosen = monitor.best_epoch().unwrap_or(epochs);
    }
    Ok(r)
}

/// Keras/Lightning-style: 20% of the training split held out (not trained on), stop when the
/// validation loss has not improved for 5 epochs, restore the best-validation-loss epoch.
fn val_loss_run(
    x: &Tensor,
    y: &Tensor,
    test: (&Tensor, &Tensor),
    epochs: usize,
    seed: u64,
    hidden: usize,
    lr: f64,
) -> Result<(usize, usize, f64, f64)> {
    let n = x.dim(0)?;
    let cut = n * 4 / 5;
    let (tx, ty) = (x.narrow(0, 0, cut)?, y.narrow(0, 0, cut)?);
    let (vx, vy) = (x.narrow(0, cut, n - cut)?, y.narrow(0, cut, n - cut)?);
    let varmap = VarMap::new();
    let model = Mlp::new(&varmap, &[hidden, hidden], 0.0, &ProbeSet::new(), seed)?;
    let mut opt = adamw(varmap.all_vars(), lr)?;
    let mut rng = Rng::new(seed ^ 0xABCD);
    let (mut best, mut best_epoch, mut wait) = (f64::INFINITY, 0, 0);
    let (mut best_test, mut stop) = ((0.0, 0.0), epochs);
    for epoch in 1..=epochs {
        train_epoch(
            |b| model.forward_t(b, true),
            &mut opt,
            &tx,
            &ty,
            64,
            &mut rng,
        )?;
        let (vl, _) = evaluate(&model, &vx, &vy)?;
        if vl < best {
            (best, best_epoch, wait) = (vl, epoch, 0);
            best_test = evaluate(&model, test.0, test.1)?;
        } else {
            wait += 1;
            if wait >= 5 {
                stop = epoch;
                break;
            }
        }
    }
    Ok((stop, best_epoch, best_test.0, best_test.1))
}

fn main() -> Result<()> {
    let epochs: usize = arg("epochs", 100);
    let seeds: u64 = arg("seeds", 3);
    let hidden: usize = arg("hidden", 512);
    let lr: f64 = arg("lr", 1e-3);
    let noises: Vec<f64> = arg("noise", "0.2,0.4".to_string())
        .split(',')
        .map(|v| v.parse().expect("--noise: numbers"))
        .collect();
    let out = results_dir().join("early_stopping");
    let data = mnist()?;
    let clean = data.train.labels.to_vec1::<u32>()?;
    let test = (&data.test.images, &data.test.labels);
    let mut summary = vec![];
    for &p in &noises {
        let mut rows: Vec<[f64; 12]> = vec![];
        for seed in 0..seeds {
            let y = Tensor::from_vec(
                corrupt_labels(&clean, 10, p, 100 + seed),
                clean.len(),
                &Device::Cpu,
            )?;
            let x = &data.train.images;
            let r = reliance_run(x, &y, test, epochs, seed, hidden, lr)?;
            let (v_stop, v_epoch, v_loss, v_acc) =
                val_loss_run(x, &y, test, epochs, seed, hidden, lr)?;
            let oracle = (0..epochs)
                .min_by(|&a, &b| r.test_loss[a].total_cmp(&r.test_loss[b]))
                .unwrap();
            let at = |e: usize| (r.test_acc[e - 1], r.test_loss[e - 1]);
            let stop = r.stop_epoch.unwrap_or(epochs);
            println!(
                "{{\"experiment\":\"early_stopping\",\"label_noise\":{p},\"seed\":{seed},\"epochs\":{epochs},\
                 \"reliance\":{{\"stopped_after\":{stop},\"chosen_epoch\":{},\"test_acc\":{:.4},\"test_loss\":{:.4},\"check_share_of_wall\":{:.3}}},\
                 \"val_loss\":{{\"stopped_after\":{v_stop},\"chosen_epoch\":{v_epoch},\"test_acc\":{v_acc:.4},\"test_loss\":{v_loss:.4}}},\
                 \"all_epochs\":{{\"test_acc\":{:.4},\"test_loss\":{:.4}}},\
                 \"oracle\":{{\"epoch\":{},\"test_acc\":{:.4},\"test_loss\":{:.4}}}}}",
                r.chosen, at(r.chosen).0, at(r.chosen).1, r.check_s / (r.check_s + r.train_s),
                at(epochs).0, at(epochs).1, oracle + 1, r.test_acc[oracle], r.test_loss[oracle],
            );
            rows.push([
                at(r.chosen).0,
                at(r.chosen).1,
                stop as f64,
                r.check_s / (r.check_s + r.train_s),
                v_acc,
                v_loss,
                v_stop as f64,
                at(epochs).0,
                at(epochs).1,
                r.test_acc[oracle],
                r.test_loss[oracle],
                (oracle + 1) as f64,
            ]);
            if seed == 0 {
                let epochs_x = |v: &[f64]| {
                    v.iter()
                        .enumerate()
                        .map(|(i, &y)| ((i + 1) as f64, y))
                        .collect::<Vec<_>>()
                };
                Plot::new(format!("MNIST, {:.0}% label noise, seed 0", p * 100.0))
                    .x_label("epoch")
                    .y_label("normalized ablation AUC (training data)")
                    .y2_label("test loss")
                    .series(Series::line_points(
                        "normalized AUC (monitor)",
                        r.metric.clone(),
                    ))
                    .series(
                        Series::line("normalized AUC after the stop", r.metric_after.clone())
                            .dashed(),
                    )
                    .series(Series::line("test loss", epochs_x(&r.test_loss)).on_right_axis())
                    .marker(
                        r.chosen as f64,
                        format!("reliance: epoch {}", r.chosen),
                        "#1f77b4",
                    )
                    .marker(
                        v_epoch as f64,
                        format!("val loss: epoch {v_epoch}"),
                        "#ff7f0e",
                    )
                    .marker(
                        (oracle + 1) as f64,
                        format!("oracle: epoch {}", oracle + 1),
                        "#2ca02c",
                    )
                    .save(out.join(format!("noise{:.0}_seed0.svg", p * 100.0)))?;
            }
        }
        let col = |i: usize| mean_sd(&rows.iter().map(|r| r[i]).collect::<Vec<_>>());
        summary.push((p, (0..12).map(col).collect::<Vec<_>>()));
    }
    println!("| label noise | method | test accuracy | test loss | epochs run |");
    println!("|---|---|---|---|---|");
    for (p, c) in &summary {
        let f = |(m, s): (f64, f64), d: usize| format!("{m:.d$} ± {s:.d$}");
        println!("| {p} | reliance monitor (default config) | {} | {} | {} (checks {:.0}% of wall time) |", f(c[0], 4), f(c[1], 3), f(c[2], 1), c[3].0 * 100.0);
        println!(
            "| {p} | validation loss, patience 5 | {} | {} | {} |",
            f(c[4], 4),
            f(c[5], 3),
            f(c[6], 1)
        );
        println!(
            "| {p} | all {epochs} epochs | {} | {} | {epochs} |",
            f(c[7], 4),
            f(c[8], 3)
        );
        println!(
            "| {p} | oracle (best test loss) | {} | {} | epoch {} |",
            f(c[9], 4),
            f(c[10], 3),
            f(c[11], 1)
        );
    }
    Ok(())
}
