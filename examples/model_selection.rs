//! Reliance as a signal for model selection (Morcos et al. 2018, §3.3): a grid of MLPs (2 hidden
//! layers) over learning rate × width × batch size × seed, trained on the 8 000 shipped MNIST
//! training digits with noisy labels for a fixed number of epochs. For each network: the ablation
//! AUC and normalized AUC on a fixed 1 000-sample subset of the (noisy) training data, and the
//! test accuracy and loss. Reports the Spearman correlations between them (the paper expects
//! higher AUC ↔ higher test accuracy, lower test loss). Prints one JSON line per network, one
//! with the correlations, and a markdown summary; writes scatter plots.
//!
//! ```text
//! cargo run --release --example model_selection -- --noise 0.2 --epochs 12 --seeds 2
//! ```

#[path = "common/mod.rs"]
mod common;

use candle_core::{Device, Result, Tensor};
use candle_nn::VarMap;
use candle_reliance::plot::{Plot, Series};
use candle_reliance::{
    data::corrupt_labels, units::spearman, AblationSpec, Measurement, ProbeData, ProbeSet,
};
use common::*;
use std::time::Instant;

struct Net {
    lr: f64,
    hidden: usize,
    batch: usize,
    seed: u64,
    train_acc: f64,
    test_acc: f64,
    test_loss: f64,
    auc: f64,
    nauc: f64,
}

#[derive(clap::Parser, Debug)]
#[command(about = "Reliance as a signal for model selection")]
struct Args {
    /// Share of training labels replaced by a random class.
    #[arg(long, default_value_t = 0.2)]
    noise: f64,
    /// Epochs per network.
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    /// Seeds per configuration.
    #[arg(long, default_value_t = 2)]
    seeds: u64,
    /// Samples of the probe subset.
    #[arg(long, default_value_t = 1000)]
    subset: usize,
}

fn main() -> Result<()> {
    let t_start = Instant::now();
    let Args {
        noise,
        epochs,
        seeds,
        subset,
    } = clap::Parser::parse();
    let lrs = [1e-3, 3e-3];
    let widths = [128, 512];
    let batches = [64, 256];
    let out = results_dir().join("model_selection");

    let data = mnist()?;
    let clean = data.train.labels.to_vec1::<u32>()?;
    let noisy = corrupt_labels(&clean, 10, noise, 100);
    let x = &data.train.images;
    let y = Tensor::from_vec(noisy, clean.len(), &Device::Cpu)?;
    // The same 1 000 training samples (with their noisy labels) for every network.
    let probe_data = ProbeData::new(x.clone(), y.clone())?.subset(subset, 7)?;
    let spec = AblationSpec::default();

    let mut nets = vec![];
    for &lr in &lrs {
        for &hidden in &widths {
            for &batch in &batches {
                for seed in 0..seeds {
                    let t0 = Instant::now();
                    let varmap = VarMap::new();
                    let probes = ProbeSet::new();
                    let model = Mlp::new(&varmap, &[hidden, hidden], 0.0, &probes, seed)?;
                    let mut opt = adamw(varmap.all_vars(), lr)?;
                    let mut rng = Rng::new(seed ^ 0xABCD);
                    for _ in 0..epochs {
                        train_epoch(
                            |b| model.forward_t(b, true),
                            &mut opt,
                            x,
                            &y,
                            batch,
                            &mut rng,
                        )?;
                    }
                    let train_s = t0.elapsed().as_secs_f64();
                    let (_, train_acc) = evaluate(&model, x, &y)?;
                    let (test_loss, test_acc) =
                        evaluate(&model, &data.test.images, &data.test.labels)?;
                    let t1 = Instant::now();
                    let curve =
                        Measurement::new(&model, &probes, &probe_data).ablation_curve(&spec)?;
                    let ablation_s = t1.elapsed().as_secs_f64();
                    println!(
                        "{{\"experiment\":\"model_selection\",\"label_noise\":{noise},\"epochs\":{epochs},\
                         \"lr\":{lr},\"hidden\":{hidden},\"batch\":{batch},\"seed\":{seed},\
                         \"train_acc_noisy_labels\":{train_acc:.4},\"test_acc\":{test_acc:.4},\"test_loss\":{test_loss:.4},\
                         \"ablation_auc\":{:.4},\"normalized_auc\":{:.4},\"ablation_unablated_acc\":{:.4},\
                         \"train_s\":{train_s:.1},\"ablation_s\":{ablation_s:.1}}}",
                        curve.auc, curve.normalized_auc, curve.unablated_accuracy
                    );
                    nets.push(Net {
                        lr,
                        hidden,
                        batch,
                        seed,
                        train_acc,
                        test_acc,
                        test_loss,
                        auc: curve.auc,
                        nauc: curve.normalized_auc,
                    });
                }
            }
        }
    }

    let col = |f: fn(&Net) -> f64| nets.iter().map(f).collect::<Vec<_>>();
    let (auc, nauc) = (col(|n| n.auc), col(|n| n.nauc));
    let (acc, loss) = (col(|n| n.test_acc), col(|n| n.test_loss));
    let train_acc = col(|n| n.train_acc);
    let rho = [
        spearman(&auc, &acc),
        spearman(&auc, &loss),
        spearman(&nauc, &acc),
        spearman(&nauc, &loss),
        spearman(&train_acc, &acc),
        spearman(&train_acc, &loss),
    ];
    let wall_s = t_start.elapsed().as_secs_f64();
    println!(
        "{{\"experiment\":\"model_selection\",\"summary\":true,\"networks\":{},\"label_noise\":{noise},\"epochs\":{epochs},\
         \"spearman\":{{\"auc_vs_test_acc\":{:.3},\"auc_vs_test_loss\":{:.3},\
         \"normalized_auc_vs_test_acc\":{:.3},\"normalized_auc_vs_test_loss\":{:.3},\
         \"train_acc_vs_test_acc\":{:.3},\"train_acc_vs_test_loss\":{:.3}}},\"wall_s\":{wall_s:.0}}}",
        nets.len(),
        rho[0],
        rho[1],
        rho[2],
        rho[3],
        rho[4],
        rho[5]
    );

    // Scatter plots, one series per width so the two families can be told apart.
    for (name, ylabel, f) in [
        (
            "nauc_vs_test_acc.svg",
            "test accuracy",
            (|n: &Net| n.test_acc) as fn(&Net) -> f64,
        ),
        ("nauc_vs_test_loss.svg", "test loss", |n: &Net| n.test_loss),
    ] {
        let mut plot = Plot::new(format!(
            "{} MLPs, {:.0}% label noise, {epochs} epochs",
            nets.len(),
            noise * 100.0
        ))
        .x_label("normalized ablation AUC (1 000 training samples)")
        .y_label(ylabel);
        for &w in &widths {
            let pts = nets
                .iter()
                .filter(|n| n.hidden == w)
                .map(|n| (n.nauc, f(n)))
                .collect();
            plot = plot.series(Series::points(format!("2 × {w}"), pts));
        }
        plot.save(out.join(name))?;
    }

    println!();
    println!("| lr | hidden | batch | seed | train acc (noisy labels) | test acc | test loss | AUC | normalized AUC |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in &nets {
        println!(
            "| {} | {} | {} | {} | {:.4} | {:.4} | {:.3} | {:.4} | {:.4} |",
            n.lr, n.hidden, n.batch, n.seed, n.train_acc, n.test_acc, n.test_loss, n.auc, n.nauc
        );
    }
    println!();
    println!(
        "| Spearman ρ ({} networks) | test accuracy | test loss |",
        nets.len()
    );
    println!("|---|---|---|");
    println!("| ablation AUC | {:.3} | {:.3} |", rho[0], rho[1]);
    println!("| normalized AUC | {:.3} | {:.3} |", rho[2], rho[3]);
    println!(
        "| training accuracy (noisy labels), for reference | {:.3} | {:.3} |",
        rho[4], rho[5]
    );
    println!();
    println!("Wall time: {wall_s:.0} s.");
    Ok(())
}
