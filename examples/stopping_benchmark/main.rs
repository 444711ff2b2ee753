//! The stopping benchmark: trains a matrix of (data set, model, optimizer, label noise, seed)
//! runs and records, per epoch, everything the stopping criteria look at — the reliance check on
//! the training subset, prediction changes on the training set (Label Wave), validation loss (in
//! runs with a held-out split) — and the test loss and accuracy they are judged by.
//!
//! ```text
//! cargo run --release --example stopping_benchmark -- run --data mnist --model mlp --seeds 0,1,2
//! cargo run --release --example stopping_benchmark -- run --quick
//! cargo run --release --example stopping_benchmark -- report docs/results/stopping/*.jsonl
//! cargo run --release --example stopping_benchmark -- diagnose docs/results/stopping/runs/*.jsonl
//! ```
//!
//! One JSON line per run goes to the results file (`--out`). Runs already in the file are
//! skipped, so the matrix can be filled over several sittings or split over processes with
//! separate `--out` files. A `full` run trains on the whole training split and serves every
//! criterion that needs no held-out data (they only observe its trajectory); `val10` and `val20`
//! hold out 10% or 20% of the training split for validation-loss stopping.
//!
//! Fashion-MNIST (`--data fashion`) is read from `/usr/share/datasets/fashion-mnist/`, which
//! Debian's `dataset-fashion-mnist` package installs (`apt-get install dataset-fashion-mnist`).

#[path = "../common/mod.rs"]
mod common;
mod diagnose;
mod report;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, ModuleT, Tensor, Var, D};
use candle_nn::{
    batch_norm, conv2d, conv2d_no_bias, linear, loss, BatchNorm, BatchNormConfig, Conv2d,
    Conv2dConfig, Linear, Optimizer, VarBuilder, VarMap,
};
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp, NoiseSpec};
use candle_reliance::data::corrupt_labels;
use candle_reliance::{Measurement, Probe, ProbeData, ProbeSet, ProbedLayer, RelianceConfig};
use clap::{Parser, Subcommand};
use common::idx::load_mnist_dir;
use common::resnet::ResNet;
use common::transformer::Transformer;
use common::{seeded_init, Mlp, Rng};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Stopping benchmark: train a matrix of runs and record their trajectories")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train the runs of a matrix that are not yet in the results file.
    Run(RunArgs),
    /// Replay every criterion over recorded runs; print the tables, write choices and plots.
    Report(report::ReportArgs),
    /// Why the reliance signal follows memorization on some networks and not on others, from
    /// runs recorded with `--diagnostics`.
    Diagnose(diagnose::DiagnoseArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Results file (JSON lines, appended to).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/results/stopping/runs.jsonl"))]
    out: PathBuf,
    /// Data sets: mnist (the shipped digits) and/or fashion.
    #[arg(long, value_delimiter = ',', default_value = "mnist")]
    data: Vec<DataSet>,
    /// Models: mlp (784-512-512-10), cnn (two 3×3 conv layers with batch norm) and/or
    /// cnn-plain (two 3×3 conv layers without batch norm, probes fused as the README shows),
    /// transformer (the `sequence` example's encoder: digits as 28 tokens of 28 pixels, width
    /// 64, 4 heads, 2 layers, probes in the feed-forward blocks) and/or resnet (the `resnet`
    /// example's network with 4 channels in its first stage, probes after its two blocks).
    #[arg(long, value_delimiter = ',', default_value = "mlp")]
    model: Vec<ModelKind>,
    /// Optimizers: sgd (lr 0.05), momentum (SGD, momentum 0.9, lr 0.01), adamw (lr 1e-3,
    /// weight decay 0.01, candle's defaults).
    #[arg(long, value_delimiter = ',', default_value = "sgd,momentum,adamw")]
    optim: Vec<OptimKind>,
    /// Label noise levels: share of training labels replaced by a uniformly random class.
    #[arg(long, value_delimiter = ',', default_value = "0,0.2,0.4")]
    noise: Vec<f64>,
    /// Seeds (initialization, sample order, label noise, validation split).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Run kinds: full (whole training split, every check recorded), val10 / val20 (10% / 20%
    /// held out, validation-loss stopping with patience 5).
    #[arg(long, value_delimiter = ',', default_value = "full,val10,val20")]
    kinds: Vec<RunKind>,
    /// Most epochs per run.
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Random ablation orders recorded per check beyond the default configuration's (the
    /// default's orders are the first ones of the same seed).
    #[arg(long, default_value_t = 0)]
    extra_orders: usize,
    /// Also measure the ablation curve against the model's own predictions on the subset, as a
    /// separate curve (the default check's agreement curve measures the same in its own passes).
    #[arg(long)]
    self_curve: bool,
    /// Also record, at every check, the measurements that explain the default metric: the
    /// mean-clamp curve, each probe's curve alone, the noise curve, the agreement curve on the
    /// subset's clean, memorized and unfit samples, and the subset's loss (`check.diag`).
    #[arg(long)]
    diagnostics: bool,
    /// Folder with the Fashion-MNIST IDX files.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    fashion_dir: PathBuf,
    /// Fashion-MNIST training images used (the first ones of the training file).
    #[arg(long, default_value_t = 10_000)]
    fashion_train: usize,
    /// Fashion-MNIST test images used (the first ones of the test file).
    #[arg(long, default_value_t = 10_000)]
    fashion_test: usize,
    /// Run only every n-th run of the matrix, starting at the k-th (`k/n`, k from 0), to split
    /// a matrix over processes (each with its own `--out`).
    #[arg(long, value_parser = parse_shard, default_value = "0/1")]
    shard: (usize, usize),
    /// A tiny matrix for smoke tests: 1 000 training and 500 test digits, a 64-unit MLP, one
    /// seed, noise 0.4, 3 epochs, a 200-sample check subset.
    #[arg(long)]
    quick: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum DataSet {
    Mnist,
    Fashion,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum ModelKind {
    Mlp,
    Cnn,
    CnnPlain,
    Transformer,
    Resnet,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum OptimKind {
    Sgd,
    Momentum,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum RunKind {
    Full,
    Val10,
    Val20,
}

fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("expected k/n with k < n, got `{s}`");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if k < n {
        Ok((k, n))
    } else {
        Err(bad())
    }
}

fn name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

impl OptimKind {
    fn lr(self) -> f64 {
        match self {
            OptimKind::Sgd => 0.05,
            OptimKind::Momentum => 0.01,
            OptimKind::Adamw => 1e-3,
        }
    }
}

impl RunKind {
    fn held_out_percent(self) -> usize {
        match self {
            RunKind::Full => 0,
            RunKind::Val10 => 10,
            RunKind::Val20 => 20,
        }
    }
}

/// One cell of the matrix and its seed.
#[derive(Debug, Clone)]
struct Key {
    data: DataSet,
    model: ModelKind,
    optim: OptimKind,
    noise: f64,
    seed: u64,
    kind: RunKind,
    epochs: usize,
    quick: bool,
    /// Training and test samples used (before any validation split).
    sizes: (usize, usize),
}

impl Key {
    fn id(&self) -> String {
        format!(
            "{}-{}-{}/{}/{}/noise{}/seed{}/{}/e{}{}",
            name(&self.data),
            self.sizes.0,
            self.sizes.1,
            name(&self.model),
            name(&self.optim),
            self.noise,
            self.seed,
            name(&self.kind),
            self.epochs,
            if self.quick { "/quick" } else { "" }
        )
    }
}

/// SGD with momentum (PyTorch's form: `b ← μ b + g`, `w ← w − lr b`); candle-nn has plain SGD.
struct Momentum {
    vars: Vec<Var>,
    buf: Vec<Option<Tensor>>,
    lr: f64,
    mu: f64,
}

impl Momentum {
    fn step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        for (v, b) in self.vars.iter().zip(self.buf.iter_mut()) {
            if let Some(g) = grads.get(v) {
                let next = match b.take() {
                    Some(b) => ((b * self.mu)? + g)?,
                    None => g.clone(),
                };
                v.set(&v.sub(&(&next * self.lr)?)?)?;
                // Detached: the buffer must not keep this step's graph (and, through it, every
                // earlier step's) alive.
                *b = Some(next.detach());
            }
        }
        Ok(())
    }
}

enum Opt {
    Sgd(candle_nn::SGD),
    Momentum(Momentum),
    AdamW(candle_nn::AdamW),
}

impl Opt {
    fn new(kind: OptimKind, varmap: &VarMap) -> Result<Self> {
        let vars: Vec<Var> = varmap
            .all_vars()
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .collect();
        Ok(match kind {
            OptimKind::Sgd => Opt::Sgd(candle_nn::SGD::new(vars, kind.lr())?),
            OptimKind::Momentum => Opt::Momentum(Momentum {
                buf: vec![None; vars.len()],
                vars,
                lr: kind.lr(),
                mu: 0.9,
            }),
            OptimKind::Adamw => Opt::AdamW(candle_nn::AdamW::new(
                vars,
                candle_nn::ParamsAdamW {
                    lr: kind.lr(),
                    ..Default::default()
                },
            )?),
        })
    }

    fn step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        match self {
            Opt::Sgd(o) => o.backward_step(loss),
            Opt::Momentum(o) => o.step(loss),
            Opt::AdamW(o) => o.backward_step(loss),
        }
    }
}

/// A small CNN for 28×28 images: conv 3×3 (8) → BN → ReLU → max-pool, conv 3×3 (16) → BN →
/// ReLU → probe → max-pool, linear 64 → ReLU → probe, linear 10. The probes sit on the second
/// feature map (its units are channels) and on the dense layer; none on the first feature map,
/// whose expanded check would cost more than a training epoch on two CPU cores.
struct Cnn {
    c1: Conv2d,
    bn1: BatchNorm,
    c2: Conv2d,
    bn2: BatchNorm,
    fc1: Linear,
    fc2: Linear,
    probes: Vec<Probe>,
}

/// A 3×3 convolution's configuration that keeps the map's size.
fn same_size() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        ..Default::default()
    }
}

impl Cnn {
    fn new(varmap: &VarMap, probes: &ProbeSet, seed: u64) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let cfg = same_size();
        let net = Self {
            c1: conv2d_no_bias(1, 8, 3, cfg, vb.pp("conv1"))?,
            bn1: batch_norm(8, BatchNormConfig::default(), vb.pp("bn1"))?,
            c2: conv2d_no_bias(8, 16, 3, cfg, vb.pp("conv2"))?,
            bn2: batch_norm(16, BatchNormConfig::default(), vb.pp("bn2"))?,
            fc1: linear(16 * 7 * 7, 64, vb.pp("fc1"))?,
            fc2: linear(64, 10, vb.pp("fc2"))?,
            probes: vec![probes.add("conv2")?, probes.add("fc1")?],
        };
        seeded_init(varmap, seed)?;
        Ok(net)
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        let x = xs.reshape((n, 1, 28, 28))?;
        let h = self
            .c1
            .forward(&x)?
            .apply_t(&self.bn1, train)?
            .relu()?
            .max_pool2d(2)?;
        let h = self.c2.forward(&h)?.apply_t(&self.bn2, train)?.relu()?;
        let h = self.probes[0].forward(&h)?.max_pool2d(2)?;
        let h = self.fc1.forward(&h.flatten_from(1)?)?.relu()?;
        self.fc2.forward(&self.probes[1].forward(&h)?)
    }
}

/// A plain CNN for 28×28 images, without batch norm: conv 3×3 (16) → ReLU → max-pool →
/// [probe, conv 3×3 (32) → ReLU → max-pool] → [probe, linear 32·7·7 → 10]. The probes see the
/// pooled feature maps (units are channels) and are fused with the layer that reads them, conv2's
/// ReLU and pool as steps of its fused layer, as the README recommends.
struct PlainCnn {
    c1: Conv2d,
    c2: ProbedLayer,
    fc: ProbedLayer,
}

impl PlainCnn {
    fn new(varmap: &VarMap, probes: &ProbeSet, seed: u64) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let cfg = same_size();
        let net = Self {
            c1: conv2d(1, 16, 3, cfg, vb.pp("conv1"))?,
            c2: probes
                .add("conv1")?
                .feeding(conv2d(16, 32, 3, cfg, vb.pp("conv2"))?)
                .then_relu()
                .then_max_pool2d(2),
            fc: probes
                .add("conv2")?
                .feeding(linear(32 * 7 * 7, 10, vb.pp("fc"))?),
        };
        seeded_init(varmap, seed)?;
        Ok(net)
    }
}

impl Module for PlainCnn {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let x = xs.reshape((xs.dim(0)?, 1, 28, 28))?;
        let h = self.c1.forward(&x)?.relu()?.max_pool2d(2)?;
        self.fc.forward(&self.c2.forward(&h)?)
    }
}

/// Channels of the benchmark ResNet's first stage (the `resnet` example's default is 16; 4 keeps
/// an epoch near 15 s on one core, so that a matrix of runs fits a 2-core machine).
const RESNET_CHANNELS: usize = 4;

enum Net {
    Mlp(Mlp),
    Cnn(Box<Cnn>),
    CnnPlain(Box<PlainCnn>),
    Transformer(Box<Transformer>),
    Resnet(Box<ResNet>),
}

impl Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Net::Mlp(m) => m.forward_t(xs, train),
            Net::Cnn(c) => c.forward_t(xs, train),
            Net::CnnPlain(c) => c.forward(xs),
            // No dropout: the same forward in both modes.
            Net::Transformer(t) => t.forward(xs),
            Net::Resnet(r) => r.forward_t(xs, train),
        }
    }
}

impl Module for Net {
    /// Evaluation mode (batch norm uses its running statistics).
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(xs, false)
    }
}

/// Training and test split of one data set, labels clean.
struct Data {
    train_x: Tensor,
    train_y: Vec<u32>,
    test_x: Tensor,
    test_y: Tensor,
}

fn load(set: DataSet, args: &RunArgs) -> Result<Data> {
    let dev = Device::Cpu;
    let m = match set {
        DataSet::Mnist => common::mnist()?,
        DataSet::Fashion => load_mnist_dir(&args.fashion_dir, 1, &dev).with_context(|| {
            format!(
                "loading Fashion-MNIST from {} (apt-get install dataset-fashion-mnist)",
                args.fashion_dir.display()
            )
        })?,
    };
    let (mut train_x, mut train_y) = (m.train.images, m.train.labels);
    let (mut test_x, mut test_y) = (m.test.images, m.test.labels);
    let (n_train, n_test) = sizes(set, args);
    let (n_train, n_test) = (n_train.min(train_x.dim(0)?), n_test.min(test_x.dim(0)?));
    train_x = train_x.narrow(0, 0, n_train)?;
    train_y = train_y.narrow(0, 0, n_train)?;
    test_x = test_x.narrow(0, 0, n_test)?;
    test_y = test_y.narrow(0, 0, n_test)?;
    Ok(Data {
        train_x,
        train_y: train_y.to_vec1::<u32>()?,
        test_x,
        test_y,
    })
}

/// Training and test samples asked for: the shipped digits' 8 000 / 2 000, Fashion-MNIST's
/// `--fashion-train` / `--fashion-test`, 1 000 / 500 in quick mode.
fn sizes(set: DataSet, args: &RunArgs) -> (usize, usize) {
    match set {
        _ if args.quick => (1000, 500),
        DataSet::Mnist => (8000, 2000),
        DataSet::Fashion => (args.fashion_train, args.fashion_test),
    }
}

/// Mean cross-entropy and accuracy in evaluation mode.
fn evaluate(model: &Net, xs: &Tensor, ys: &Tensor) -> Result<(f64, f64)> {
    Ok(common::evaluate(model, xs, ys)?)
}

/// Arg-max predictions in evaluation mode, in chunks.
fn predict(model: &Net, xs: &Tensor) -> Result<Vec<u32>> {
    let n = xs.dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let len = 1000.min(n - start);
        let logits = model.forward(&xs.narrow(0, start, len)?)?;
        out.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    Ok(out)
}

/// Which subset samples had their labels corrupted, and the network's predictions on them: the
/// groups the agreement curve is split into in [`diagnostics`].
struct DiagGroups<'a> {
    /// Row in the training split of each subset sample.
    subset_idx: &'a [usize],
    /// Per training-split row: whether its label was corrupted.
    corrupted: &'a [bool],
    /// The network's arg-max prediction per subset sample, unablated.
    predictions: &'a [u32],
}

/// Area under a curve sampled at evenly spaced points of `[0, 1]` (trapezoids).
fn area(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return v.first().copied().unwrap_or(f64::NAN);
    }
    let h = 1.0 / (v.len() - 1) as f64;
    v.windows(2).map(|w| (w[0] + w[1]) * 0.5 * h).sum()
}

/// What explains a check's metric (`--diagnostics`): the subset's loss against its (noisy)
/// labels; the mean-clamp curve; each probe's units ablated alone (the default fractions of that
/// probe's units, random orders of its own units; areas over `[0, 1]` of those fractions); the
/// noise curve against the labels and against the network's own predictions; and the agreement
/// curve on three groups of the subset: clean labels, corrupted labels the network predicts
/// (memorized) and corrupted labels it does not.
fn diagnostics(
    m: &Measurement<Net>,
    model: &Net,
    probes: &ProbeSet,
    subset: &ProbeData,
    spec: &AblationSpec,
    groups: &DiagGroups,
) -> Result<Value> {
    let dev = Device::Cpu;
    let (orders, seed) = match spec.order {
        AblationOrder::Random { orders, seed } => (orders, seed),
        _ => bail!("diagnostics need random orders"),
    };
    let mut out = json!({});
    let (loss, _) = evaluate(model, subset.xs(), subset.labels())?;
    out["subset_loss"] = json!(loss);

    let t = Instant::now();
    let mean = m.ablation_curve(&spec.clone().with_clamp(Clamp::Mean))?;
    out["mean_clamp"] = json!({
        "acc0": mean.unablated_accuracy,
        "auc": mean.auc_per_order,
        "agreement_auc": mean.agreement_auc_per_order,
        "seconds": t.elapsed().as_secs_f64(),
    });

    let stats = m.statistics()?.clone();
    let total = stats.total_units();
    let fractions = spec.fractions.values();
    let mut per_probe = vec![];
    for p in &stats.probes {
        let t = Instant::now();
        let own: Vec<f64> = fractions
            .iter()
            .map(|f| f * p.units as f64 / total as f64)
            .collect();
        let (mut acc, mut agree) = (vec![], vec![]);
        for r in 0..orders {
            let perm = candle_reliance::rng::permutation(
                p.units,
                candle_reliance::rng::derive_seed(seed ^ 0xD1A6_0000, r as u64),
            );
            let mut order: Vec<usize> = perm.iter().map(|&u| p.offset + u).collect();
            order.extend((0..total).filter(|u| !(p.offset..p.offset + p.units).contains(u)));
            let c = m.ablation_curve(
                &AblationSpec::default()
                    .with_fractions(own.clone())
                    .with_order(AblationOrder::Explicit(order)),
            )?;
            acc.push(area(&c.accuracy));
            agree.push(area(&c.agreement));
        }
        per_probe.push(json!({
            "probe": p.name,
            "units": p.units,
            "auc": acc,
            "agreement_auc": agree,
            "seconds": t.elapsed().as_secs_f64(),
        }));
    }
    out["per_probe"] = json!(per_probe);

    let t = Instant::now();
    let noise_spec = NoiseSpec::default()
        .with_scales(candle_reliance::curves::log_spaced(-1.0, 1.0, 5))
        .with_draws(1);
    let own = ProbeData::new(subset.xs().clone(), Tensor::new(groups.predictions, &dev)?)?;
    let noise = m.noise_curve(&noise_spec)?;
    let noise_own = Measurement::new(model, probes, &own).noise_curve(&noise_spec)?;
    out["noise"] = json!({
        "scales": noise.scales,
        "accuracy": noise.accuracy,
        "agreement": noise_own.accuracy,
        "auc": noise.auc,
        "agreement_auc": noise_own.auc,
        "seconds": t.elapsed().as_secs_f64(),
    });

    let t = Instant::now();
    let labels = subset.label_values();
    let mut idx: [Vec<u32>; 3] = Default::default();
    for (i, &row) in groups.subset_idx.iter().enumerate() {
        let g = match (groups.corrupted[row], groups.predictions[i] == labels[i]) {
            (false, _) => 0,
            (true, true) => 1,
            (true, false) => 2,
        };
        idx[g].push(i as u32);
    }
    let mut g = json!({});
    for (name, ids) in ["clean", "memorized", "unfit_noisy"].iter().zip(&idx) {
        if ids.len() < 10 {
            g[*name] = json!({ "n": ids.len() });
            continue;
        }
        let xs = subset
            .xs()
            .index_select(&Tensor::new(ids.as_slice(), &dev)?, 0)?;
        let pred: Vec<u32> = ids
            .iter()
            .map(|&i| groups.predictions[i as usize])
            .collect();
        let d = ProbeData::new(xs, Tensor::new(pred.as_slice(), &dev)?)?;
        let c = Measurement::new(model, probes, &d).ablation_curve(spec)?;
        g[*name] = json!({ "n": ids.len(), "agreement_auc": c.agreement_auc_per_order });
    }
    g["seconds"] = json!(t.elapsed().as_secs_f64());
    out["groups"] = g;
    Ok(out)
}

fn run_one(key: &Key, data: &Data, args: &RunArgs, pb: &indicatif::ProgressBar) -> Result<Value> {
    let dev = Device::Cpu;
    let wall = Instant::now();
    let n_all = data.train_y.len();
    let noisy = corrupt_labels(&data.train_y, 10, key.noise, key.seed);
    // Validation rows: a seeded share of the training split, labels as noisy as the rest.
    let held = n_all * key.kind.held_out_percent() / 100;
    let mut perm: Vec<u32> = (0..n_all as u32).collect();
    Rng::new(key.seed ^ 0x5A11_D0E5).shuffle(&mut perm);
    let (val_idx, train_idx) = perm.split_at(held);
    let mut train_idx = train_idx.to_vec();
    train_idx.sort_unstable();
    let select = |idx: &[u32]| -> Result<(Tensor, Vec<u32>, Vec<u32>)> {
        let t = Tensor::new(idx, &dev)?;
        Ok((
            data.train_x.index_select(&t, 0)?,
            idx.iter().map(|&i| noisy[i as usize]).collect(),
            idx.iter().map(|&i| data.train_y[i as usize]).collect(),
        ))
    };
    let (tx, ty_noisy, ty_clean) = select(&train_idx)?;
    let n = ty_noisy.len();
    let ty = Tensor::new(ty_noisy.as_slice(), &dev)?;
    let val = if held > 0 {
        let (vx, vy, _) = select(val_idx)?;
        let n_val = vy.len();
        Some((vx, Tensor::from_vec(vy, n_val, &dev)?))
    } else {
        None
    };

    let varmap = VarMap::new();
    let probes = ProbeSet::new();
    let model = match key.model {
        ModelKind::Mlp => {
            let h = if key.quick { 64 } else { 512 };
            Net::Mlp(Mlp::new(&varmap, &[h, h], 0.0, &probes, key.seed)?)
        }
        ModelKind::Cnn => Net::Cnn(Box::new(Cnn::new(&varmap, &probes, key.seed)?)),
        ModelKind::CnnPlain => Net::CnnPlain(Box::new(PlainCnn::new(&varmap, &probes, key.seed)?)),
        ModelKind::Transformer => {
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let t = Transformer::new(vb, 64, 4, 2, &probes)?;
            seeded_init(&varmap, key.seed)?;
            Net::Transformer(Box::new(t))
        }
        ModelKind::Resnet => {
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let r = ResNet::new(vb, RESNET_CHANNELS, &probes)?;
            seeded_init(&varmap, key.seed)?;
            Net::Resnet(Box::new(r))
        }
    };
    let mut opt = Opt::new(key.optim, &varmap)?;
    let mut rng = Rng::new(key.seed ^ 0xABCD);

    // The check exactly as the monitor's default configuration measures it.
    let config = RelianceConfig::default();
    let spec = config.ablation.clone();
    let subset_size = if key.quick {
        200
    } else {
        config.data.subset_size
    };
    let subset = ProbeData::new(tx.clone(), ty.clone())?.subset(subset_size, config.data.seed)?;
    // The subset's rows in the training split, as `ProbeData::subset` draws them.
    let mut subset_idx: Vec<usize> =
        candle_reliance::rng::permutation(n, config.data.seed)[..subset.len().min(n)].to_vec();
    subset_idx.sort_unstable();
    anyhow::ensure!(
        subset_idx.len() == subset.len()
            && subset_idx
                .iter()
                .zip(subset.label_values())
                .all(|(&i, &y)| ty_noisy[i] == y),
        "the subset's rows could not be recovered"
    );
    let (default_orders, order_seed) = match spec.order {
        AblationOrder::Random { orders, seed } => (orders, seed),
        _ => bail!("the default ablation order is expected to be random"),
    };
    let all_orders = spec.clone().with_order(AblationOrder::Random {
        orders: default_orders + args.extra_orders,
        seed: order_seed,
    });
    let corrupted: Vec<bool> = ty_noisy
        .iter()
        .zip(&ty_clean)
        .map(|(a, b)| a != b)
        .collect();
    let n_corrupted = corrupted.iter().filter(|&&c| c).count();

    let mut prev_pred: Option<Vec<u32>> = None;
    let mut prev_subset_pred: Option<Vec<u32>> = None;
    let mut epochs = Vec::new();
    let (mut best_val, mut wait, mut stopped_at) = (f64::INFINITY, 0usize, None);
    for epoch in 1..=key.epochs {
        pb.set_message(format!("{} epoch {epoch}", key.id()));
        let t0 = Instant::now();
        let mut order: Vec<u32> = (0..n as u32).collect();
        rng.shuffle(&mut order);
        let mut pred = vec![0u32; n];
        let (mut loss_sum, mut batches) = (0f64, 0usize);
        for b in order.chunks(64) {
            let idx = Tensor::new(b, &dev)?;
            let logits = model.forward_t(&tx.index_select(&idx, 0)?, true)?;
            let l = loss::cross_entropy(&logits, &ty.index_select(&idx, 0)?)?;
            // Predictions of the forward pass the training step made anyway (Label Wave's
            // input), before the step.
            let p = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            opt.step(&l)?;
            for (&i, &p) in b.iter().zip(&p) {
                pred[i as usize] = p;
            }
            loss_sum += l.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        let train_s = t0.elapsed().as_secs_f64();
        let changes = prev_pred
            .as_ref()
            .map(|q| q.iter().zip(&pred).filter(|(a, b)| a != b).count());
        let hits = |labels: &[u32]| pred.iter().zip(labels).filter(|(a, b)| a == b).count();
        let fit_corrupted = pred
            .iter()
            .zip(&ty_noisy)
            .zip(&corrupted)
            .filter(|((p, y), c)| **c && p == y)
            .count();
        let train_acc = hits(&ty_noisy) as f64 / n as f64;
        let train_clean_acc = hits(&ty_clean) as f64 / n as f64;
        prev_pred = Some(pred);

        let t1 = Instant::now();
        let (test_loss, test_acc) = evaluate(&model, &data.test_x, &data.test_y)?;
        let eval_s = t1.elapsed().as_secs_f64();
        let mut rec = json!({
            "epoch": epoch,
            "train_loss": loss_sum / batches as f64,
            "train_acc": train_acc,
            "train_clean_acc": train_clean_acc,
            "fit_corrupted": if n_corrupted > 0 { json!(fit_corrupted as f64 / n_corrupted as f64) } else { Value::Null },
            "changes": changes,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "train_s": train_s,
            "eval_s": eval_s,
        });
        if let Some((vx, vy)) = &val {
            let (val_loss, val_acc) = evaluate(&model, vx, vy)?;
            rec["val_loss"] = json!(val_loss);
            rec["val_acc"] = json!(val_acc);
            epochs.push(rec);
            if val_loss < best_val {
                (best_val, wait) = (val_loss, 0);
            } else {
                wait += 1;
                if wait >= 5 {
                    stopped_at = Some(epoch);
                    break;
                }
            }
            pb.inc(1);
            continue;
        }

        // The default check, timed as the monitor would run it.
        let t2 = Instant::now();
        let m = Measurement::new(&model, &probes, &subset).with_batching(config.batching.clone());
        let curve = m.ablation_curve(&spec)?;
        let check_s = t2.elapsed().as_secs_f64();
        let mut check = json!({
            "acc0": curve.unablated_accuracy,
            "auc": curve.auc_per_order,
            "agreement_auc": curve.agreement_auc_per_order,
            "curve": curve.accuracy,
            "agreement": curve.agreement,
            "finite": curve.finite,
            "seconds": check_s,
        });
        if args.extra_orders > 0 {
            let t3 = Instant::now();
            let more = m.ablation_curve(&all_orders)?;
            // Orders are drawn from (seed, index) only: the first ones are the default's.
            anyhow::ensure!(
                more.per_order[..default_orders] == curve.per_order[..],
                "the first orders of the longer run differ from the default check's"
            );
            check["auc"] = json!(more.auc_per_order);
            check["extra_seconds"] = json!(t3.elapsed().as_secs_f64());
        }
        let subset_pred = predict(&model, subset.xs())?;
        if args.diagnostics {
            let t5 = Instant::now();
            let groups = DiagGroups {
                subset_idx: &subset_idx,
                corrupted: &corrupted,
                predictions: &subset_pred,
            };
            check["diag"] = diagnostics(&m, &model, &probes, &subset, &spec, &groups)?;
            check["diag_seconds"] = json!(t5.elapsed().as_secs_f64());
        }
        if args.self_curve {
            let t4 = Instant::now();
            let own = ProbeData::new(
                subset.xs().clone(),
                Tensor::new(subset_pred.as_slice(), &dev)?,
            )?;
            let c = Measurement::new(&model, &probes, &own).ablation_curve(&spec)?;
            check["self_auc"] = json!(c.auc_per_order);
            check["self_seconds"] = json!(t4.elapsed().as_secs_f64());
        }
        check["subset_changes"] = json!(prev_subset_pred.as_ref().map(|q| q
            .iter()
            .zip(&subset_pred)
            .filter(|(a, b)| a != b)
            .count()));
        prev_subset_pred = Some(subset_pred);
        rec["check"] = check;
        epochs.push(rec);
        pb.inc(1);
    }
    if stopped_at.is_some() {
        pb.inc((key.epochs - epochs.len()) as u64);
    }
    Ok(json!({
        "id": key.id(),
        "data": name(&key.data),
        "model": name(&key.model),
        "optim": name(&key.optim),
        "lr": key.optim.lr(),
        "noise": key.noise,
        "seed": key.seed,
        "kind": name(&key.kind),
        "max_epochs": key.epochs,
        "quick": key.quick,
        "train_size": n,
        "val_size": held,
        "test_size": data.test_x.dim(0)?,
        "corrupted": n_corrupted,
        "subset_size": subset.len(),
        "default_orders": default_orders,
        "stopped_at": stopped_at,
        "wall_s": wall.elapsed().as_secs_f64(),
        "epochs": epochs,
    }))
}

/// Ids of the runs already in the results file. A last line cut short by an interrupted write
/// is removed, so that the next line starts clean.
fn done_ids(path: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(ids);
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    if complete.len() != text.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(complete.len() as u64)?;
        eprintln!("{}: removed an unfinished last line", path.display());
    }
    for (i, line) in std::io::Cursor::new(complete).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        if let Some(id) = v["id"].as_str() {
            ids.insert(id.to_string());
        }
    }
    Ok(ids)
}

fn run(mut args: RunArgs) -> Result<()> {
    if args.quick {
        args.data.retain(|d| *d == DataSet::Mnist);
        args.model = vec![ModelKind::Mlp];
        args.noise = vec![0.4];
        args.seeds.truncate(1);
        args.epochs = args.epochs.min(3);
        args.extra_orders = args.extra_orders.min(2);
    }
    if args.noise.iter().any(|p| !(0.0..=1.0).contains(p)) {
        bail!("--noise values must be in [0, 1]");
    }
    if args.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    let mut keys = Vec::new();
    for &data in &args.data {
        for &model in &args.model {
            for &optim in &args.optim {
                for &noise in &args.noise {
                    for &seed in &args.seeds {
                        for &kind in &args.kinds {
                            keys.push(Key {
                                data,
                                model,
                                optim,
                                noise,
                                seed,
                                kind,
                                epochs: args.epochs,
                                quick: args.quick,
                                sizes: sizes(data, &args),
                            });
                        }
                    }
                }
            }
        }
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let done = done_ids(&args.out)?;
    let (k, n) = args.shard;
    let todo: Vec<Key> = keys
        .into_iter()
        .enumerate()
        .filter(|(i, key)| i % n == k && !done.contains(&key.id()))
        .map(|(_, key)| key)
        .collect();
    eprintln!(
        "{} runs to do, {} already in {}",
        todo.len(),
        done.len(),
        args.out.display()
    );
    let pb = indicatif::ProgressBar::new((todo.len() * args.epochs) as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} epochs, eta {eta} {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut loaded: Vec<(DataSet, Data)> = Vec::new();
    for key in &todo {
        if !loaded.iter().any(|(d, _)| *d == key.data) {
            loaded.push((key.data, load(key.data, &args)?));
        }
        let data = &loaded.iter().find(|(d, _)| *d == key.data).unwrap().1;
        let rec = run_one(key, data, &args, &pb)?;
        let last = &rec["epochs"][rec["epochs"].as_array().map_or(0, |e| e.len()) - 1];
        let msg = format!(
            "{}: {:.0} s, last epoch {} test acc {:.4}",
            key.id(),
            rec["wall_s"].as_f64().unwrap_or(0.0),
            last["epoch"],
            last["test_acc"].as_f64().unwrap_or(f64::NAN)
        );
        // The bar is hidden when stderr is not a terminal (a log file): print plain lines then.
        if pb.is_hidden() {
            eprintln!("{msg}");
        } else {
            pb.println(msg);
        }
        // One write of one whole line, so an interrupted run leaves at most a cut last line.
        let mut line = serde_json::to_string(&rec)?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.out)?;
        f.write_all(line.as_bytes())?;
        f.flush()?;
    }
    pb.finish_with_message("done");
    Ok(())
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Run(a) => run(a),
        Cmd::Report(a) => report::report(a),
        Cmd::Diagnose(a) => diagnose::diagnose(a),
    }
}
