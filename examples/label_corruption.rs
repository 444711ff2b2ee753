//! Paper Fig. 1–2 and the clamp-value comparison: MLPs (2 × 512, ReLU) trained until they fit
//! their training labels, with 0–100% of the labels replaced by random classes. Ablation curves
//! (zero and mean clamp) and noise curves on each network's own training labels. Prints one JSON
//! line per network and a summary table; writes SVG plots.
//!
//! ```text
//! cargo run --release --example label_corruption -- --seeds 2 --train 2000
//! ```

#[path = "common/mod.rs"]
mod common;

use candle_core::{Device, Result, Tensor};
use candle_nn::VarMap;
use candle_reliance::plot::{Plot, Series};
use candle_reliance::{
    curves::{AblationOrder, NoiseSpec},
    data::corrupt_labels,
    AblationSpec, Clamp, Measurement, ProbeData, ProbeSet,
};
use common::*;

#[derive(clap::Parser, Debug)]
#[command(about = "Label corruption: reliance of networks that fit partly random labels")]
struct Args {
    /// Seeds per corruption level.
    #[arg(long, default_value_t = 2)]
    seeds: u64,
    /// Training digits.
    #[arg(long, default_value_t = 2000)]
    train: usize,
    /// Epoch cap while fitting the labels.
    #[arg(long, default_value_t = 100)]
    max_epochs: usize,
    /// Units per hidden layer.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
}

fn main() -> Result<()> {
    let Args {
        seeds,
        train,
        max_epochs,
        hidden,
    } = clap::Parser::parse();
    let levels = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
    let out = results_dir().join("label_corruption");
    let data = mnist()?;
    let x = data.train.images.narrow(0, 0, train)?;
    let clean = data.train.labels.narrow(0, 0, train)?.to_vec1::<u32>()?;
    let spec = AblationSpec::default().with_order(AblationOrder::Random { orders: 5, seed: 0 });
    let mean_spec = spec.clone().with_clamp(Clamp::Mean);
    let noise_spec = NoiseSpec::default().with_draws(3);
    // (corruption, [auc zero, normalized zero, auc mean, noise auc, train acc, test acc, epochs])
    let mut rows: Vec<(f64, [f64; 7])> = vec![];
    let (mut zero_plot, mut mean_plot, mut noise_plot) = (
        Plot::new("Ablation curves (zero clamp), seed 0")
            .x_label("fraction of units ablated")
            .y_label("training accuracy (own labels)"),
        Plot::new("Ablation curves (mean clamp), seed 0")
            .x_label("fraction of units ablated")
            .y_label("training accuracy (own labels)"),
        Plot::new("Noise curves, seed 0")
            .x_label("noise std (multiples of each unit's σ)")
            .y_label("training accuracy (own labels)")
            .log_x(),
    );
    for &p in &levels {
        for seed in 0..seeds {
            let labels = corrupt_labels(&clean, 10, p, 1000 + seed);
            let y = Tensor::from_vec(labels, train, &Device::Cpu)?;
            let varmap = VarMap::new();
            let probes = ProbeSet::new();
            let model = Mlp::new(&varmap, &[hidden, hidden], 0.0, &probes, seed)?;
            let mut opt = adamw(varmap.all_vars(), 1e-3)?;
            let mut rng = Rng::new(seed ^ 0x5EED);
            let (mut epochs, mut train_acc) = (0, 0.0);
            while epochs < max_epochs && train_acc < 0.99 {
                train_epoch(|b| model.forward_t(b, true), &mut opt, &x, &y, 64, &mut rng)?;
                epochs += 1;
                train_acc = evaluate(&model, &x, &y)?.1;
            }
            let (_, test_acc) = evaluate(&model, &data.test.images, &data.test.labels)?;
            let probe_data = ProbeData::new(x.clone(), y.clone())?.subset(1000, 0)?;
            let m = Measurement::new(&model, &probes, &probe_data);
            let zero = m.ablation_curve(&spec)?;
            let mean = m.ablation_curve(&mean_spec)?;
            let noise = m.noise_curve(&noise_spec)?;
            println!(
                "{{\"experiment\":\"label_corruption\",\"corruption\":{p},\"seed\":{seed},\"epochs\":{epochs},\"train_acc\":{train_acc:.4},\
                 \"test_acc\":{test_acc:.4},\"auc_zero\":{:.4},\"auc_zero_ci\":{},\"normalized_auc_zero\":{:.4},\"auc_mean\":{:.4},\
                 \"noise_auc\":{:.4},\"curve_zero\":{:?},\"curve_mean\":{:?},\"noise_curve\":{:?}}}",
                zero.auc, serde_json::to_string(&zero.auc_ci).unwrap_or_default(), zero.normalized_auc, mean.auc, noise.auc, zero.accuracy, mean.accuracy, noise.accuracy
            );
            rows.push((
                p,
                [
                    zero.auc,
                    zero.normalized_auc,
                    mean.auc,
                    noise.auc,
                    train_acc,
                    test_acc,
                    epochs as f64,
                ],
            ));
            if seed == 0 {
                let label = format!("{:.0}% corrupted", p * 100.0);
                let pts = |xs: &[f64], ys: &[f64]| {
                    xs.iter()
                        .copied()
                        .zip(ys.iter().copied())
                        .collect::<Vec<_>>()
                };
                zero_plot = zero_plot.series(Series::line(
                    label.clone(),
                    pts(&zero.fractions, &zero.accuracy),
                ));
                mean_plot = mean_plot.series(Series::line(
                    label.clone(),
                    pts(&mean.fractions, &mean.accuracy),
                ));
                noise_plot =
                    noise_plot.series(Series::line(label, pts(&noise.scales, &noise.accuracy)));
            }
        }
    }
    zero_plot.save(out.join("ablation_zero.svg"))?;
    mean_plot.save(out.join("ablation_mean.svg"))?;
    noise_plot.save(out.join("noise.svg"))?;
    let summary: Vec<(f64, Vec<(f64, f64)>)> = levels
        .iter()
        .map(|&p| {
            let sel: Vec<&[f64; 7]> = rows.iter().filter(|r| r.0 == p).map(|r| &r.1).collect();
            (
                p,
                (0..7)
                    .map(|i| mean_sd(&sel.iter().map(|r| r[i]).collect::<Vec<_>>()))
                    .collect(),
            )
        })
        .collect();
    let line = |i: usize| {
        summary
            .iter()
            .map(|(p, c)| (*p, c[i].0))
            .collect::<Vec<_>>()
    };
    Plot::new(format!(
        "AUC against label corruption (mean of {seeds} seeds)"
    ))
    .x_label("fraction of labels corrupted")
    .y_label("area under the curve")
    .series(Series::line_points("ablation AUC, zero clamp", line(0)))
    .series(Series::line_points("ablation AUC, mean clamp", line(2)))
    .series(Series::line_points("noise AUC", line(3)))
    .save(out.join("auc_vs_corruption.svg"))?;
    println!("| corrupted | ablation AUC (zero) | ablation AUC (mean) | noise AUC | train acc | test acc | epochs |");
    println!("|---|---|---|---|---|---|---|");
    for (p, c) in &summary {
        let f = |(m, s): (f64, f64)| format!("{m:.3} ± {s:.3}");
        println!(
            "| {p} | {} | {} | {} | {} | {} | {:.0} |",
            f(c[0]),
            f(c[2]),
            f(c[3]),
            f(c[4]),
            f(c[5]),
            c[6].0
        );
    }
    Ok(())
}
