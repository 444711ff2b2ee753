//! A small ResNet (convolution → batch norm → ReLU, identity skips) with the reliance monitor in
//! its loop: a probe after each residual block, on the block's whole output (a unit is a
//! feature map). On Fashion-MNIST when Debian's `dataset-fashion-mnist` is installed
//! (`/usr/share/datasets/fashion-mnist/`), else on the shipped MNIST digits. The model has batch
//! norm, so it is a `ModuleT`: the monitor measures it as it is, in evaluation mode.
//!
//! ```text
//! cargo run --release --example resnet -- --epochs 2
//! ```
//! The monitor only sees training data; the test accuracy printed each epoch is for the reader.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{loss, AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_reliance::data::corrupt_labels;
use candle_reliance::rng::SplitMix64;
use candle_reliance::{ProbeData, ProbeSet, RelianceMonitor};
use clap::Parser;
use common::idx::load_mnist_dir;
use common::resnet::ResNet;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Train a small ResNet with reliance-based early stopping")]
struct Args {
    /// Folder with MNIST-format IDX files. Default: Fashion-MNIST when installed, else the
    /// shipped digits.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training samples taken from the data (its first ones), to keep epochs short.
    #[arg(long, default_value_t = 8000)]
    train_size: usize,
    /// Test samples (the standard test split's first ones, or the shipped set's last ones).
    #[arg(long, default_value_t = 2000)]
    test_size: usize,
    /// Monitor configuration (YAML). Default: examples/reliance.yaml with its output files
    /// under reliance-out/resnet/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Probability of replacing each training label with a uniformly random class.
    #[arg(long, default_value_t = 0.4)]
    label_noise: f64,
    /// Most epochs to train.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Channels of the first stage (the second has twice as many).
    #[arg(long, default_value_t = 16)]
    channels: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn main() -> Result<()> {
    let args = Args::parse();
    common::init_logging(args.log_json);
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.label_noise),
        "--label-noise must be in [0, 1]"
    );
    anyhow::ensure!(
        args.batch_size > 0 && args.epochs > 0 && args.channels > 0 && args.train_size > 0,
        "sizes must be positive"
    );

    let device = Device::Cpu;
    let dir = match &args.data {
        Some(d) => d.clone(),
        None if std::path::Path::new(FASHION).is_dir() => FASHION.into(),
        None => concat!(env!("CARGO_MANIFEST_DIR"), "/data").into(),
    };
    let mnist = load_mnist_dir(&dir, args.test_size, &device)
        .with_context(|| format!("loading MNIST-format data from {}", dir.display()))?;
    let take = |x: &Tensor, n: usize| x.narrow(0, 0, n.min(x.dim(0).unwrap_or(0)));
    let train_x = take(&mnist.train.images, args.train_size)?;
    let clean = take(&mnist.train.labels, args.train_size)?.to_vec1::<u32>()?;
    let (test_x, test_y) = (
        take(&mnist.test.images, args.test_size)?,
        take(&mnist.test.labels, args.test_size)?,
    );
    let noisy = corrupt_labels(&clean, 10, args.label_noise, args.seed);
    let train_y = Tensor::from_vec(noisy, clean.len(), &device)?;
    let n = train_x.dim(0)?;
    tracing::info!(data = %dir.display(), train = n, test = test_x.dim(0)?, "data loaded");

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let probes = ProbeSet::new();
    let model = ResNet::new(vb, args.channels, &probes)?;
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
        common::example_config(args.config.as_deref(), "resnet")?,
        probes,
        ProbeData::new(train_x.clone(), train_y.clone())?,
    )?;

    // The model in evaluation mode, for the test set.
    let eval = |x: &Tensor| model.forward_t(x, false);
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
            let logits = model.forward_t(&train_x.index_select(&idx, 0)?, true)?;
            // (2) Optional: the batch's predictions, for Label Wave over every training sample.
            monitor.observe(batch, &logits)?;
            let loss = loss::cross_entropy(&logits, &train_y.index_select(&idx, 0)?)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = common::evaluate(&eval, &test_x, &test_y)?;
        tracing::info!(
            epoch,
            train_loss = loss_sum / batches as f64,
            test_loss,
            test_acc,
            train_seconds,
            "epoch"
        );
        // (3) Ask the monitor after every epoch; it measures the model in evaluation mode.
        if monitor.on_epoch_end(epoch, &model, &varmap)?.is_stop() {
            break;
        }
    }

    // (4) Put the kept epoch's weights back.
    let best = monitor.finish(&varmap)?;
    let (test_loss, test_acc) = common::evaluate(&eval, &test_x, &test_y)?;
    let best = best.map_or("none (no check ran)".to_string(), |e| e.to_string());
    println!(
        "trained {last_epoch} epochs; restored epoch {best} (the epoch the rule kept); \
         final test accuracy {test_acc:.4}, test loss {test_loss:.4}"
    );
    Ok(())
}
