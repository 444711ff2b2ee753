//! A small transformer encoder on the shipped MNIST digits read as sequences: each digit is 28
//! tokens (its rows) of 28 pixels. Two encoder layers (model width 64, 4 heads, feed-forward
//! 128) built from candle-nn layers, with the reliance monitor added exactly as in the MNIST
//! example: a probe in each feed-forward block, after its ReLU, fused with the layer it feeds.
//! A probed unit is one of the 128 feed-forward units, clamped at all 28 positions at once; the
//! feed-forward block's skip connection is `ff2.residual(&xs, &branch)` instead of `xs + branch`.
//!
//! ```text
//! cargo run --release --example sequence -- --epochs 3
//! ```
//! The monitor only sees training data; the test accuracy printed each epoch is for the reader.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{loss, AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_reliance::data::corrupt_labels;
use candle_reliance::rng::SplitMix64;
use candle_reliance::{ProbeData, ProbeSet, RelianceMonitor};
use clap::Parser;
use common::idx::load_mnist_dir;
use common::transformer::Transformer;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Train a transformer on MNIST rows with reliance-based early stopping")]
struct Args {
    /// Folder with MNIST IDX files (gz or not): the standard four, or one images/labels pair.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data"))]
    data: PathBuf,
    /// Monitor configuration (YAML). Default: examples/reliance.yaml with its output files
    /// under reliance-out/sequence/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Probability of replacing each training label with a uniformly random class.
    #[arg(long, default_value_t = 0.4)]
    label_noise: f64,
    /// Most epochs to train.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Attention heads (must divide the width).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Encoder layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Held-out samples when the folder holds a single set (the shipped 10k digits).
    #[arg(long, default_value_t = 2000)]
    test_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::init_logging(args.log_json);
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.label_noise),
        "--label-noise must be in [0, 1]"
    );
    anyhow::ensure!(
        args.batch_size > 0 && args.epochs > 0 && args.layers > 0 && args.heads > 0,
        "sizes must be positive"
    );
    anyhow::ensure!(
        args.width % args.heads == 0,
        "--width {} is not a multiple of --heads {}",
        args.width,
        args.heads
    );

    let device = Device::Cpu;
    let mnist = load_mnist_dir(&args.data, args.test_size, &device)
        .with_context(|| format!("loading MNIST from {}", args.data.display()))?;
    let clean = mnist.train.labels.to_vec1::<u32>()?;
    let noisy = corrupt_labels(&clean, 10, args.label_noise, args.seed);
    let train_y = Tensor::from_vec(noisy, clean.len(), &device)?;
    let train_x = mnist.train.images.clone();
    let n = train_x.dim(0)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let probes = ProbeSet::new();
    let model = Transformer::new(vb, args.width, args.heads, args.layers, &probes)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    // (1) The monitor, measuring on the (noisy) training data only.
    let mut monitor = RelianceMonitor::new(
        common::example_config(args.config.as_deref(), "sequence")?,
        probes,
        ProbeData::new(train_x.clone(), train_y.clone())?,
    )?;

    let mut last_epoch = 0;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::new(args.seed);
    for epoch in 1..=args.epochs {
        last_epoch = epoch;
        let t0 = std::time::Instant::now();
        rng.shuffle(&mut order);
        let (mut loss_sum, mut batches) = (0f64, 0usize);
        for batch in order.chunks(args.batch_size) {
            let idx = Tensor::new(batch, &device)?;
            let logits = model.forward(&train_x.index_select(&idx, 0)?)?;
            // (2) Optional: the batch's predictions, for Label Wave over every training sample.
            monitor.observe(batch, &logits)?;
            let loss = loss::cross_entropy(&logits, &train_y.index_select(&idx, 0)?)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) =
            common::evaluate(&model, &mnist.test.images, &mnist.test.labels)?;
        tracing::info!(
            epoch,
            train_loss = loss_sum / batches as f64,
            test_loss,
            test_acc,
            train_seconds,
            "epoch"
        );
        // (3) Ask the monitor after every epoch.
        if monitor.on_epoch_end(epoch, &model, &varmap)?.is_stop() {
            break;
        }
    }

    // (4) Put the kept epoch's weights back.
    let best = monitor.finish(&varmap)?;
    let (test_loss, test_acc) = common::evaluate(&model, &mnist.test.images, &mnist.test.labels)?;
    let best = best.map_or("none (no check ran)".to_string(), |e| e.to_string());
    println!(
        "trained {last_epoch} epochs; restored epoch {best} (the epoch the rule kept); \
         final test accuracy {test_acc:.4}, test loss {test_loss:.4}"
    );
    Ok(())
}
