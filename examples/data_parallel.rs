//! Data-parallel training on the CPU with thread ranks, and one reliance monitor per rank.
//!
//! Each rank holds a replica of the MNIST MLP (the same initial weights), trains on its share of
//! every minibatch, and averages gradients with the other ranks through a
//! [`ThreadGroup`](candle_reliance::collective::ThreadGroup) — the same collective its monitor
//! uses to shard the check. Every rank must stop at the same epoch and restore the same epoch.
//!
//! ```text
//! cargo run --release --example data_parallel -- --ranks 3
//! ```

#[path = "common/mod.rs"]
mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::{loss, VarMap};
use candle_reliance::collective::{Collective, ThreadGroup};
use candle_reliance::data::corrupt_labels;
use candle_reliance::{ProbeData, ProbeSet, RelianceConfig, RelianceMonitor};
use clap::Parser;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(about = "Data-parallel MNIST training with thread ranks and a monitor per rank")]
struct Args {
    /// Thread ranks.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Share of training labels replaced by random classes.
    #[arg(long, default_value_t = 0.4)]
    label_noise: f64,
    /// Samples per minibatch, over all ranks.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Plain SGD learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
}

/// What one rank ends with: the epoch its monitor stopped it at (`None`: it ran every epoch),
/// the epoch it restored, its test accuracy.
type Outcome = (Option<usize>, Option<usize>, f64);

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!((1..=16).contains(&args.ranks), "--ranks must be in 1..=16");
    ensure!(
        args.batch_size >= args.ranks,
        "--batch-size must be at least --ranks"
    );
    tracing_subscriber::fmt().with_target(false).init();
    let mnist = common::mnist()?;
    let clean = mnist.train.labels.to_vec1::<u32>()?;
    let noisy = corrupt_labels(&clean, 10, args.label_noise, 0);
    let ys = Tensor::new(noisy.as_slice(), &candle_core::Device::Cpu)?;
    let xs = &mnist.train.images;
    let group = ThreadGroup::new(args.ranks)?;
    let outcomes: Vec<Result<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|rank| {
                let (args, ys, mnist) = (&args, &ys, &mnist);
                s.spawn(move || rank_main(args, Arc::new(rank), xs, ys, mnist))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>>>()?;
    for (rank, (stopped, kept, acc)) in outcomes.iter().enumerate() {
        let ran = match stopped {
            Some(e) => format!("stopped by its monitor after epoch {e}"),
            None => format!("ran all {} epochs", args.epochs),
        };
        println!("rank {rank}: {ran}, restored epoch {kept:?}, test accuracy {acc:.4}");
    }
    let same = outcomes
        .iter()
        .all(|o| o.0 == outcomes[0].0 && o.1 == outcomes[0].1);
    ensure!(same, "the ranks did not stop alike");
    println!(
        "all {} ranks stopped after the same epoch and restored the same one",
        outcomes.len()
    );
    Ok(())
}

fn rank_main(
    args: &Args,
    rank: Arc<ThreadGroup>,
    xs: &Tensor,
    ys: &Tensor,
    mnist: &common::idx::Mnist,
) -> Result<Outcome> {
    let (r, world) = (rank.rank(), rank.world_size());
    // The same seed on every rank: identical replicas.
    let varmap = VarMap::new();
    let probes = ProbeSet::new();
    let model = common::Mlp::new(&varmap, &[args.hidden, args.hidden], 0.0, &probes, 0)?;
    let data = ProbeData::new(xs.clone(), ys.clone())?;
    let collective: Arc<dyn Collective> = rank.clone();
    let mut monitor =
        RelianceMonitor::new_ranked(RelianceConfig::default(), probes, data, collective)?;
    let mut vars: Vec<(String, Var)> = varmap.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let n = xs.dim(0)?;
    let mut rng = common::Rng::new(1); // the same sample order on every rank
    let mut stopped = None;
    for epoch in 1..=args.epochs {
        let mut order: Vec<u32> = (0..n as u32).collect();
        rng.shuffle(&mut order);
        for batch in order.chunks(args.batch_size) {
            // This rank's share of the minibatch.
            let part = &batch[batch.len() * r / world..batch.len() * (r + 1) / world];
            let idx = Tensor::new(part, xs.device())?;
            let logits = model.forward_t(&xs.index_select(&idx, 0)?, true)?;
            // Each rank reports the samples it trained on; the monitor sums the changes.
            monitor.observe(part, &logits)?;
            // Summed, not averaged, here: the all-reduce sums, and the division below makes it
            // the mean over the whole minibatch.
            let l =
                (loss::cross_entropy(&logits, &ys.index_select(&idx, 0)?)? * part.len() as f64)?;
            let grads = l.backward()?;
            let mut flat: Vec<f64> = vec![];
            for (_, v) in &vars {
                let g = grads
                    .get(v)
                    .map_or_else(|| v.zeros_like(), |g| Ok(g.clone()))?;
                flat.extend(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            }
            rank.all_reduce_sum_f64(&mut flat)?;
            let mut at = 0;
            for (_, v) in &vars {
                let len = v.elem_count();
                let g = Tensor::from_slice(&flat[at..at + len], v.shape(), v.device())?
                    .to_dtype(v.dtype())?;
                v.set(&(v.as_tensor() - (g * (args.lr / batch.len() as f64))?)?)?;
                at += len;
            }
        }
        if monitor.on_epoch_end(epoch, &model, &varmap)?.is_stop() {
            stopped = Some(epoch);
            break;
        }
    }
    let kept = monitor.finish(&varmap)?;
    let (_, acc) = common::evaluate(&model, &mnist.test.images, &mnist.test.labels)?;
    Ok((stopped, kept, acc))
}
