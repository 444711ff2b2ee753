//! Token-level labels with padding: the `sequence` example's transformer as a tagger. Each digit
//! becomes a sequence of its inked rows only (from its first to its last row with ink, moved to
//! the start), padded with blank rows to 28 tokens; every real token is labelled with the digit's
//! class and the padded ones are masked. The model returns logits `(N, 28, 10)`, and the monitor
//! counts accuracy and agreement over real tokens: the probe data is
//! `ProbeData::with_mask(xs, labels, &mask)` and the loop reports `observe_masked`.
//!
//! ```text
//! cargo run --release --example tagging -- --epochs 3
//! ```
//! A token's logits are its own last state's plus the whole sequence's (`Transformer::tagger`).
//! The encoder attends to the padded positions too (blank rows); only the labels, the loss and
//! the counts leave them out. The test accuracy printed each epoch is over real test tokens.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_reliance::data::corrupt_labels;
use candle_reliance::rng::SplitMix64;
use candle_reliance::{ProbeData, ProbeSet, RelianceMonitor};
use clap::Parser;
use common::idx::load_mnist_dir;
use common::transformer::{Transformer, PIXELS, TOKENS};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    about = "Tag every row of an MNIST digit with its class, with reliance-based early stopping"
)]
struct Args {
    /// Folder with MNIST IDX files (gz or not): the standard four, or one images/labels pair.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data"))]
    data: PathBuf,
    /// Monitor configuration (YAML). Default: examples/reliance.yaml with its output files
    /// under reliance-out/tagging/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Probability of replacing each training digit's label (all its tokens) with a uniformly
    /// random class.
    #[arg(long, default_value_t = 0.4)]
    label_noise: f64,
    /// Most epochs to train.
    #[arg(long, default_value_t = 40)]
    epochs: usize,
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

/// Digits `(N, 784)` as sequences of their inked rows `(N, 784)`, padded with blank rows, and
/// the mask of real tokens `(N, 28)` (1 real, 0 padding).
fn inked_rows(images: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, device) = (images.dim(0)?, images.device());
    let pixels = images.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut seqs = vec![0f32; n * TOKENS * PIXELS];
    let mut mask = vec![0u8; n * TOKENS];
    for (i, img) in pixels.iter().enumerate() {
        let inked: Vec<usize> = (0..TOKENS)
            .filter(|&r| img[r * PIXELS..(r + 1) * PIXELS].iter().any(|&p| p > 0.0))
            .collect();
        // A blank image keeps one (blank) token so that it still counts.
        let (first, last) = (inked.first().copied().unwrap_or(0), inked.last().copied());
        let len = last.map_or(1, |l| l - first + 1);
        let src = &img[first * PIXELS..(first + len) * PIXELS];
        seqs[i * TOKENS * PIXELS..][..len * PIXELS].copy_from_slice(src);
        mask[i * TOKENS..][..len].fill(1);
    }
    Ok((
        Tensor::from_vec(seqs, (n, TOKENS * PIXELS), device)?,
        Tensor::from_vec(mask, (n, TOKENS), device)?,
    ))
}

/// Every token labelled with its digit's class: `(N, 28)`.
fn per_token(labels: &Tensor) -> Result<Tensor> {
    Ok(labels.unsqueeze(1)?.repeat((1, TOKENS))?.contiguous()?)
}

/// Cross-entropy averaged over the real tokens (`mask` `(N, T)` u8).
fn masked_cross_entropy(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    let log_p = candle_nn::ops::log_softmax(&logits.reshape(((), classes))?, D::Minus1)?;
    let picked = log_p.gather(&labels.flatten_all()?.unsqueeze(1)?, 1)?;
    let m = mask.flatten_all()?.to_dtype(DType::F32)?;
    Ok((picked.squeeze(1)?.mul(&m)?.sum_all()?.neg()? / m.sum_all()?.to_scalar::<f32>()? as f64)?)
}

/// Loss and accuracy over the real tokens of a set.
fn evaluate(model: &Transformer, xs: &Tensor, ys: &Tensor, mask: &Tensor) -> Result<(f64, f64)> {
    let n = xs.dim(0)?;
    let (mut loss_sum, mut correct, mut tokens) = (0.0, 0.0, 0.0);
    for start in (0..n).step_by(1000) {
        let len = 1000.min(n - start);
        let (x, y, m) = (
            xs.narrow(0, start, len)?,
            ys.narrow(0, start, len)?,
            mask.narrow(0, start, len)?,
        );
        let logits = model.forward(&x)?;
        let real = m.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64;
        loss_sum += masked_cross_entropy(&logits, &y, &m)?.to_scalar::<f32>()? as f64 * real;
        let hits = logits.argmax(D::Minus1)?.eq(&y)?.mul(&m)?;
        correct += hits.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64;
        tokens += real;
    }
    Ok((loss_sum / tokens, correct / tokens))
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::init_logging(args.log_json);
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.label_noise),
        "--label-noise must be in [0, 1]"
    );
    anyhow::ensure!(
        args.batch_size > 0 && args.epochs > 0,
        "sizes must be positive"
    );

    let device = Device::Cpu;
    let mnist = load_mnist_dir(&args.data, args.test_size, &device)
        .with_context(|| format!("loading MNIST from {}", args.data.display()))?;
    let clean = mnist.train.labels.to_vec1::<u32>()?;
    let noisy = corrupt_labels(&clean, 10, args.label_noise, args.seed);
    let (train_x, train_mask) = inked_rows(&mnist.train.images)?;
    let train_y = per_token(&Tensor::from_vec(noisy, clean.len(), &device)?)?;
    let (test_x, test_mask) = inked_rows(&mnist.test.images)?;
    let test_y = per_token(&mnist.test.labels)?;
    let n = train_x.dim(0)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let probes = ProbeSet::new();
    let model = Transformer::tagger(vb, 64, 4, 2, &probes)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    // (1) The monitor, on the (noisy) training tokens; padded positions are not counted.
    let mut monitor = RelianceMonitor::new(
        common::example_config(args.config.as_deref(), "tagging")?,
        probes,
        ProbeData::with_mask(train_x.clone(), train_y.clone(), &train_mask)?,
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
            let mask = train_mask.index_select(&idx, 0)?;
            let logits = model.forward(&train_x.index_select(&idx, 0)?)?;
            // (2) Optional: the batch's token predictions, padding masked, for Label Wave.
            monitor.observe_masked(batch, &logits, Some(&mask))?;
            let loss = masked_cross_entropy(&logits, &train_y.index_select(&idx, 0)?, &mask)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = evaluate(&model, &test_x, &test_y, &test_mask)?;
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
    let (test_loss, test_acc) = evaluate(&model, &test_x, &test_y, &test_mask)?;
    let best = best.map_or("none (no check ran)".to_string(), |e| e.to_string());
    println!(
        "trained {last_epoch} epochs; restored epoch {best} (the epoch the rule kept); \
         final test token accuracy {test_acc:.4}, test loss {test_loss:.4}"
    );
    Ok(())
}
