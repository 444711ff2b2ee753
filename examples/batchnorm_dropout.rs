//! Batch norm and dropout versus reliance on single directions (Morcos et al. 2018, §3.4), on the
//! shipped MNIST digits.
//!
//! (a) A small CNN (conv 1→16 3×3, ReLU, maxpool 2, conv 16→32 3×3, ReLU, maxpool 2, linear → 10,
//! probes on both feature maps) with and without batch norm after each conv: test accuracy, the
//! ablation AUC of whole feature maps and the mean class selectivity, all measured in eval mode on
//! training samples. The paper: batch norm lowers reliance (higher AUC) and selectivity.
//!
//! (b) MLPs 784-512-512-10 with dropout 0 / 0.1 / 0.2 / 0.3 after each hidden layer, on clean and
//! on fully random labels, trained on a 2 000-sample subset until the training accuracy reaches
//! 0.95 or an epoch cap: the ablation curves and the fraction ablated at which the accuracy first
//! falls more than 5% below its unablated value. The paper: with dropout p, accuracy barely drops
//! until about a fraction p is ablated.
//!
//! Prints one JSON line per network and a markdown summary; writes SVG plots.
//!
//! ```text
//! cargo run --release --example batchnorm_dropout -- --cnn-train 4000 --cnn-epochs 3 --cnn-seeds 2 \
//!     --mlp-train 2000 --max-epochs 40 --seeds 1
//! ```

#[path = "common/mod.rs"]
mod common;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{
    batch_norm, conv2d, linear, AdamW, BatchNorm, BatchNormConfig, Conv2d, Linear, VarBuilder,
    VarMap,
};
use candle_reliance::data::corrupt_labels;
use candle_reliance::plot::{Plot, Series};
use candle_reliance::{
    AblationCurve, AblationSpec, Clamp, Measurement, Probe, ProbeData, ProbeSet,
};
use common::*;
use std::time::Instant;

/// conv → [batch norm] → ReLU → probe → maxpool, twice, then a linear read-out.
struct Cnn {
    conv: [Conv2d; 2],
    bn: Option<[BatchNorm; 2]>,
    probes: [Probe; 2],
    fc: Linear,
}

impl Cnn {
    fn new(varmap: &VarMap, with_bn: bool, probes: &ProbeSet, seed: u64) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let conv = [
            conv2d(1, 16, 3, Default::default(), vb.pp("conv1"))?,
            conv2d(16, 32, 3, Default::default(), vb.pp("conv2"))?,
        ];
        let bn = if with_bn {
            Some([
                batch_norm(16, BatchNormConfig::default(), vb.pp("bn1"))?,
                batch_norm(32, BatchNormConfig::default(), vb.pp("bn2"))?,
            ])
        } else {
            None
        };
        // 28 → conv 26 → pool 13 → conv 11 → pool 5.
        let fc = linear(32 * 5 * 5, 10, vb.pp("fc"))?;
        let probes = [probes.add("conv1")?, probes.add("conv2")?];
        seeded_init(varmap, seed)?;
        // Batch norm starts as the identity: scale 1, shift 0, running mean 0, variance 1.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if let Some(stat) = name.strip_prefix("bn").and_then(|n| n.split_once('.')) {
                let one = matches!(stat.1, "weight" | "running_var");
                let v = if one {
                    var.ones_like()?
                } else {
                    var.zeros_like()?
                };
                var.set(&v)?;
            }
        }
        Ok(Self {
            conv,
            bn,
            probes,
            fc,
        })
    }

    /// Batch norm uses batch statistics (and updates its running ones) only when `train`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = xs.reshape((xs.dim(0)?, 1, 28, 28))?;
        for i in 0..2 {
            h = self.conv[i].forward(&h)?;
            if let Some(bn) = &self.bn {
                h = bn[i].forward_t(&h, train)?;
            }
            h = self.probes[i].forward(&h.relu()?)?.max_pool2d(2)?;
        }
        self.fc.forward(&h.flatten_from(1)?)
    }
}

impl Module for Cnn {
    /// Eval mode: what evaluation and every measurement see.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, false)
    }
}

fn trainable_adamw(varmap: &VarMap, lr: f64) -> Result<AdamW> {
    // Batch norm's running statistics are variables too, but not trained ones.
    let vars = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| !name.contains("running_"))
        .map(|(_, v)| v.clone())
        .collect();
    common::adamw(vars, lr)
}

/// The smallest fraction at which the mean curve is more than 5% below the unablated accuracy.
fn drop5_fraction(c: &AblationCurve) -> Option<f64> {
    c.fractions
        .iter()
        .zip(&c.accuracy)
        .find(|(_, &a)| a < 0.95 * c.unablated_accuracy)
        .map(|(&f, _)| f)
}

fn curve_points(c: &AblationCurve) -> Vec<(f64, f64)> {
    c.fractions
        .iter()
        .copied()
        .zip(c.accuracy.iter().copied())
        .collect()
}

fn json_list(v: &[f64]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:.4}")).collect();
    format!("[{}]", items.join(","))
}

fn opt_f(v: Option<f64>) -> String {
    v.map_or("null".into(), |f| format!("{f:.3}"))
}

#[derive(clap::Parser, Debug)]
#[command(about = "Batch norm and dropout versus reliance on single directions")]
struct Args {
    /// Training digits of the CNN part.
    #[arg(long, default_value_t = 4000)]
    cnn_train: usize,
    /// Epochs of each CNN.
    #[arg(long, default_value_t = 3)]
    cnn_epochs: usize,
    /// Seeds of the CNN part.
    #[arg(long, default_value_t = 2)]
    cnn_seeds: u64,
    /// Fractions of the CNN's ablation curves (evenly spaced).
    #[arg(long, default_value_t = 17)]
    cnn_fractions: usize,
    /// Training digits of the MLP part.
    #[arg(long, default_value_t = 2000)]
    mlp_train: usize,
    /// Epoch cap of each MLP.
    #[arg(long, default_value_t = 40)]
    max_epochs: usize,
    /// Seeds of the MLP part.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Samples of the probe subset.
    #[arg(long, default_value_t = 1000)]
    subset: usize,
    /// Run the MLP part (`--mlp false` runs only the CNN part).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    mlp: bool,
}

fn main() -> Result<()> {
    let t_start = Instant::now();
    let Args {
        cnn_train,
        cnn_epochs,
        cnn_seeds,
        cnn_fractions,
        mlp_train,
        max_epochs,
        seeds,
        subset,
        mlp: run_mlp,
    } = clap::Parser::parse();
    let out = results_dir().join("batchnorm_dropout");
    let data = mnist()?;
    let test = (&data.test.images, &data.test.labels);

    // (a) CNN with and without batch norm.
    let (cx, cy) = (
        data.train.images.narrow(0, 0, cnn_train)?,
        data.train.labels.narrow(0, 0, cnn_train)?,
    );
    let cnn_probe_data = ProbeData::new(cx.clone(), cy.clone())?.subset(subset, 7)?;
    let cnn_spec = AblationSpec::default().with_fractions(cnn_fractions);
    let mut cnn_rows: Vec<(bool, [f64; 6])> = vec![];
    let mut cnn_plot = Plot::new(format!(
        "CNN on {cnn_train} MNIST digits, {cnn_epochs} epochs: feature-map ablation"
    ))
    .x_label("fraction of feature maps ablated")
    .y_label(format!("training accuracy ({subset} samples)"));
    for with_bn in [false, true] {
        for seed in 0..cnn_seeds {
            let t0 = Instant::now();
            let varmap = VarMap::new();
            let probes = ProbeSet::new();
            let model = Cnn::new(&varmap, with_bn, &probes, seed)?;
            let mut opt = trainable_adamw(&varmap, 1e-3)?;
            let mut rng = Rng::new(seed ^ 0xABCD);
            for _ in 0..cnn_epochs {
                train_epoch(
                    |b| model.forward_t(b, true),
                    &mut opt,
                    &cx,
                    &cy,
                    64,
                    &mut rng,
                )?;
            }
            let train_s = t0.elapsed().as_secs_f64();
            let (_, train_acc) = evaluate(&model, &cx, &cy)?;
            let (test_loss, test_acc) = evaluate(&model, test.0, test.1)?;
            let t1 = Instant::now();
            let m = Measurement::new(&model, &probes, &cnn_probe_data);
            let curve = m.ablation_curve(&cnn_spec)?;
            let ablation_s = t1.elapsed().as_secs_f64();
            // Mean clamp too: it does not shift the next layer's input mean, which separates
            // "batch norm amplifies a zeroed map" from "the network relies on single maps".
            let curve_mean = m.ablation_curve(&cnn_spec.clone().with_clamp(Clamp::Mean))?;
            let sel = m.selectivity()?;
            let means = sel.means();
            println!(
                "{{\"experiment\":\"batchnorm_dropout\",\"part\":\"cnn\",\"batch_norm\":{with_bn},\"seed\":{seed},\
                 \"train_samples\":{cnn_train},\"epochs\":{cnn_epochs},\"train_acc\":{train_acc:.4},\
                 \"test_acc\":{test_acc:.4},\"test_loss\":{test_loss:.4},\"ablation_auc\":{:.4},\
                 \"normalized_auc\":{:.4},\"ablation_auc_mean_clamp\":{:.4},\"ablation_unablated_acc\":{:.4},\"mean_selectivity\":{:.4},\
                 \"selectivity_conv1\":{:.4},\"selectivity_conv2\":{:.4},\"fractions\":{},\"curve\":{},\
                 \"train_s\":{train_s:.1},\"ablation_s\":{ablation_s:.1}}}",
                curve.auc,
                curve.normalized_auc,
                curve_mean.auc,
                curve.unablated_accuracy,
                sel.mean(),
                means[0],
                means[1],
                json_list(&curve.fractions),
                json_list(&curve.accuracy),
            );
            let label = format!(
                "{}, seed {seed}",
                if with_bn { "batch norm" } else { "no BN" }
            );
            let mut s = Series::line_points(label, curve_points(&curve)).with_color(if with_bn {
                "#d62728"
            } else {
                "#1f77b4"
            });
            if seed > 0 {
                s = s.dashed();
            }
            cnn_plot = cnn_plot.series(s);
            cnn_rows.push((
                with_bn,
                [
                    test_acc,
                    curve.auc,
                    curve.normalized_auc,
                    sel.mean(),
                    train_acc,
                    curve_mean.auc,
                ],
            ));
        }
    }
    cnn_plot.save(out.join("cnn_bn_curves.svg"))?;

    // (b) MLPs with dropout on clean and random labels.
    let (mx, clean) = (
        data.train.images.narrow(0, 0, mlp_train)?,
        data.train.labels.narrow(0, 0, mlp_train)?,
    );
    let clean_v = clean.to_vec1::<u32>()?;
    let random = Tensor::from_vec(
        corrupt_labels(&clean_v, 10, 1.0, 200),
        mlp_train,
        &Device::Cpu,
    )?;
    // Fine steps up to 0.6, where the dropout fractions are, coarser after.
    let mut fractions: Vec<f64> = (0..=24).map(|i| i as f64 * 0.025).collect();
    fractions.extend((13..=20).map(|i| i as f64 * 0.05));
    let mlp_spec = AblationSpec::default().with_fractions(fractions);
    let dropouts = [0.0, 0.1, 0.2, 0.3];
    let mut mlp_rows = vec![];
    let label_sets = if run_mlp {
        vec![("clean", &clean), ("random", &random)]
    } else {
        vec![]
    };
    for (labels_name, ys) in label_sets {
        let probe_data = ProbeData::new(mx.clone(), ys.clone())?;
        let mut plot = Plot::new(format!(
            "MLP 2 × 512 on {mlp_train} MNIST digits, {labels_name} labels"
        ))
        .x_label("fraction of hidden units ablated")
        .y_label("training accuracy (training labels)");
        for &p in &dropouts {
            for seed in 0..seeds {
                let t0 = Instant::now();
                let varmap = VarMap::new();
                let probes = ProbeSet::new();
                let model = Mlp::new(&varmap, &[512, 512], p as f32, &probes, seed)?;
                let mut opt = trainable_adamw(&varmap, 1e-3)?;
                let mut rng = Rng::new(seed ^ 0xABCD);
                let (mut epochs_run, mut train_acc) = (0, 0.0);
                while epochs_run < max_epochs && train_acc < 0.95 {
                    train_epoch(
                        |b| model.forward_t(b, true),
                        &mut opt,
                        &mx,
                        ys,
                        64,
                        &mut rng,
                    )?;
                    epochs_run += 1;
                    train_acc = evaluate(&model, &mx, ys)?.1;
                }
                let train_s = t0.elapsed().as_secs_f64();
                let (test_loss, test_acc) = evaluate(&model, test.0, test.1)?;
                let curve =
                    Measurement::new(&model, &probes, &probe_data).ablation_curve(&mlp_spec)?;
                let drop = drop5_fraction(&curve);
                println!(
                    "{{\"experiment\":\"batchnorm_dropout\",\"part\":\"dropout\",\"labels\":\"{labels_name}\",\
                     \"dropout\":{p},\"seed\":{seed},\"train_samples\":{mlp_train},\"epochs_run\":{epochs_run},\
                     \"reached_train_acc_0.95\":{},\"train_acc\":{train_acc:.4},\"test_acc\":{test_acc:.4},\
                     \"test_loss\":{test_loss:.4},\"ablation_auc\":{:.4},\"normalized_auc\":{:.4},\
                     \"first_fraction_below_95pct\":{},\"fractions\":{},\"curve\":{},\"train_s\":{train_s:.1}}}",
                    train_acc >= 0.95,
                    curve.auc,
                    curve.normalized_auc,
                    opt_f(drop),
                    json_list(&curve.fractions),
                    json_list(&curve.accuracy),
                );
                if seed == 0 {
                    plot = plot.series(Series::line(format!("dropout {p}"), curve_points(&curve)));
                }
                mlp_rows.push((
                    labels_name,
                    p,
                    seed,
                    epochs_run,
                    train_acc,
                    test_acc,
                    curve.auc,
                    curve.normalized_auc,
                    drop,
                ));
            }
        }
        for &p in &dropouts[1..] {
            plot = plot.marker(p, format!("p = {p}"), "#7f7f7f");
        }
        plot.save(out.join(format!("dropout_{labels_name}_labels.svg")))?;
    }

    let wall_s = t_start.elapsed().as_secs_f64();
    println!();
    println!(
        "CNN: {cnn_train} training digits, {cnn_epochs} epochs, AdamW 1e-3, batch 64; ablation \
         ({cnn_fractions} fractions × 3 random orders) and selectivity on {subset} of those digits, eval mode."
    );
    println!();
    println!(
        "| CNN | seeds | train acc | test acc | ablation AUC | normalized AUC | AUC, mean clamp | mean class selectivity |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for with_bn in [false, true] {
        let rows: Vec<&[f64; 6]> = cnn_rows
            .iter()
            .filter(|r| r.0 == with_bn)
            .map(|r| &r.1)
            .collect();
        let f = |i: usize, d: usize| {
            let (m, s) = mean_sd(&rows.iter().map(|r| r[i]).collect::<Vec<_>>());
            format!("{m:.d$} ± {s:.d$}")
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            if with_bn {
                "batch norm"
            } else {
                "no batch norm"
            },
            rows.len(),
            f(4, 4),
            f(0, 4),
            f(1, 4),
            f(2, 4),
            f(5, 4),
            f(3, 4)
        );
    }
    println!();
    println!(
        "MLP 2 × 512: {mlp_train} training digits, AdamW 1e-3, batch 64, until training accuracy \
         ≥ 0.95 or {max_epochs} epochs; ablation (3 random orders) on all {mlp_train} with their \
         training labels."
    );
    println!();
    println!("| labels | dropout | seed | epochs run | train acc | test acc | ablation AUC | normalized AUC | first fraction with accuracy < 95% of unablated |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (l, p, seed, e, tr, te, auc, nauc, drop) in &mlp_rows {
        println!(
            "| {l} | {p} | {seed} | {e}{} | {tr:.4} | {te:.4} | {auc:.4} | {nauc:.4} | {} |",
            if *tr >= 0.95 { "" } else { " (cap)" },
            opt_f(*drop)
        );
    }
    println!();
    println!("Wall time: {wall_s:.0} s.");
    Ok(())
}
