//! An ordinary candle MNIST training loop (MLP, two hidden ReLU layers) with the reliance
//! monitor added: probes after the two activations and four lines in the loop (the fourth,
//! `observe`, hands the monitor the predictions the loop makes anyway).
//!
//! ```text
//! cargo run --release --example mnist -- --label-noise 0.2
//! RUST_LOG=debug cargo run --release --example mnist -- --log-json
//! ```
//! The monitor only sees training data; the test accuracy printed each epoch is for the reader.

#[path = "common/idx.rs"]
mod idx;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, loss, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_reliance::data::corrupt_labels;
use candle_reliance::rng::SplitMix64;
use candle_reliance::{ProbeData, ProbeSet, ProbedLayer, RelianceMonitor};
use clap::Parser;
use idx::load_mnist_dir;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "Train an MNIST MLP with reliance-based early stopping")]
struct Args {
    /// Folder with MNIST IDX files (gz or not): the standard four, or one images/labels pair.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data"))]
    data: PathBuf,
    /// Monitor configuration (YAML).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/reliance.yaml"))]
    config: PathBuf,
    /// Probability of replacing each training label with a uniformly random class.
    #[arg(long, default_value_t = 0.4)]
    label_noise: f64,
    /// Most epochs to train.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Units per hidden layer.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    #[arg(long, default_value_t = 1e-3)]
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

/// The probes sit after the hidden activations, each fused with the layer that reads it
/// (`probe.feeding(layer)`), so that a check computes that layer incrementally; fc2's ReLU is a
/// step of its fused layer (`then_relu()`), which a check applies in the same op.
struct Mlp {
    fc1: Linear,
    fc2: ProbedLayer,
    fc3: ProbedLayer,
}

impl Mlp {
    fn new(vb: VarBuilder, hidden: usize, probes: &ProbeSet) -> Result<Self> {
        Ok(Self {
            fc1: linear(784, hidden, vb.pp("fc1"))?,
            fc2: probes
                .add("fc1")?
                .feeding(linear(hidden, hidden, vb.pp("fc2"))?)
                .then_relu(),
            fc3: probes
                .add("fc2")?
                .feeding(linear(hidden, 10, vb.pp("fc3"))?),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward(xs)?.relu()?;
        let h = self.fc2.forward(&h)?; // probe "fc1", fc2, ReLU
        self.fc3.forward(&h) // probe "fc2", then fc3
    }
}

/// Test loss and accuracy, in chunks.
fn evaluate(model: &Mlp, xs: &Tensor, ys: &Tensor) -> Result<(f64, f64)> {
    let n = xs.dim(0)?;
    let (mut loss_sum, mut correct) = (0f64, 0f64);
    for start in (0..n).step_by(1000) {
        let len = 1000.min(n - start);
        let (x, y) = (xs.narrow(0, start, len)?, ys.narrow(0, start, len)?);
        let logits = model.forward(&x)?;
        loss_sum += loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64 * len as f64;
        correct += logits
            .argmax(D::Minus1)?
            .eq(&y)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok((loss_sum / n as f64, correct / n as f64))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colours only on a terminal, so that piped or redirected logs stay plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(ansi)
            .init();
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.label_noise),
        "--label-noise must be in [0, 1]"
    );
    anyhow::ensure!(
        args.batch_size > 0 && args.epochs > 0 && args.hidden > 0,
        "sizes must be positive"
    );

    let device = Device::Cpu;
    let mnist = load_mnist_dir(&args.data, args.test_size, &device)
        .with_context(|| format!("loading MNIST from {}", args.data.display()))?;
    let clean = mnist.train.labels.to_vec1::<u32>()?;
    let noisy = corrupt_labels(&clean, 10, args.label_noise, args.seed);
    let changed = clean.iter().zip(&noisy).filter(|(a, b)| a != b).count();
    let train_y = Tensor::from_vec(noisy, clean.len(), &device)?;
    let train_x = mnist.train.images.clone();
    let n = train_x.dim(0)?;
    tracing::info!(
        train = n,
        test = mnist.test.len(),
        label_noise = args.label_noise,
        labels_changed = changed,
        "data loaded"
    );

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let probes = ProbeSet::new();
    let model = Mlp::new(vb, args.hidden, &probes)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    // (1) The monitor: configured in YAML, measuring on the (noisy) training data only.
    let mut monitor = RelianceMonitor::from_yaml_file(
        &args.config,
        probes,
        ProbeData::new(train_x.clone(), train_y.clone())?,
    )?;

    let mut last_epoch = 0;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::new(args.seed);
    for epoch in 1..=args.epochs {
        last_epoch = epoch;
        let t0 = std::time::Instant::now();
        rng.shuffle(&mut order); // a new sample order every epoch

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
        let (test_loss, test_acc) = evaluate(&model, &mnist.test.images, &mnist.test.labels)?;
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
    let (test_loss, test_acc) = evaluate(&model, &mnist.test.images, &mnist.test.labels)?;
    if let Some(history) = &monitor.config().output.history_file {
        let (trend, curves) = candle_reliance::plot::plot_history_file(history)?;
        println!(
            "history: {} (plots: {}, {})",
            history.display(),
            trend.display(),
            curves.display()
        );
    }
    let best = best.map_or("none (no check ran)".to_string(), |e| e.to_string());
    println!(
        "trained {last_epoch} epochs; restored epoch {best} (the epoch the rule kept); \
         final test accuracy {test_acc:.4}, test loss {test_loss:.4}"
    );
    Ok(())
}
