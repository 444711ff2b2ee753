//! What a check costs next to a training epoch for the models beyond MLPs: a batch-norm CNN
//! whose probe is fused with `then_batch_norm`, a small ResNet (probes after its blocks) and a
//! transformer encoder (probes in its feed-forward blocks, `residual` skips), and how the
//! transformer's check grows with width, depth, sequence length and probe subset size. Prints
//! one JSON line per measurement (times are medians of `--reps` runs, in the same process).
//!
//! ```text
//! cargo run --release --example bench_reach [-- --reps 3]
//! ```
//! Synthetic inputs and labels, untrained weights: a check's cost depends on shapes, not values.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{
    batch_norm, conv2d, layer_norm, linear, loss, AdamW, BatchNormConfig, Conv2d, Conv2dConfig,
    LayerNorm, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap,
};
use candle_reliance::rng::SplitMix64;
use candle_reliance::{AblationSpec, Measurement, ProbeData, ProbeSet, ProbedLayer};
use clap::Parser;
use common::resnet::ResNet;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Training samples per epoch.
    #[arg(long, default_value_t = 8000)]
    train: usize,
    /// Skip the growth series (only the three models at their example sizes).
    #[arg(long)]
    no_growth: bool,
    /// Only the transformer series.
    #[arg(long)]
    transformer_only: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn random(rng: &mut SplitMix64, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.uniform() as f32).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// conv 3×3 (1 → 16) → ReLU → [probe, conv 3×3 (16 → 32) → batch norm → ReLU → pool 2, fused]
/// → [probe, dense, fused] → 10.
struct BnCnn {
    c1: Conv2d,
    f2: ProbedLayer,
    f3: ProbedLayer,
}

impl BnCnn {
    fn new(vb: VarBuilder, probes: &ProbeSet) -> Result<Self> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            c1: conv2d(1, 16, 3, pad, vb.pp("c1"))?,
            f2: probes
                .add("c1")?
                .feeding(conv2d(16, 32, 3, pad, vb.pp("c2"))?)
                .then_batch_norm(batch_norm(32, BatchNormConfig::default(), vb.pp("bn"))?)
                .then_relu()
                .then_max_pool2d(2),
            f3: probes
                .add("c2")?
                .feeding(linear(32 * 14 * 14, 10, vb.pp("fc"))?),
        })
    }
}

impl ModuleT for BnCnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        let h = self.c1.forward(&xs.reshape((n, 1, 28, 28))?)?.relu()?;
        self.f3.forward(&self.f2.forward_t(&h, train)?)
    }
}

/// The sequence example's encoder: `tokens` tokens of 28 values, `depth` pre-norm layers of
/// width `width`, 4 heads, feed-forward `2·width` with its hidden units probed.
struct Transformer {
    embed: Linear,
    layers: Vec<(LayerNorm, Linear, Linear, LayerNorm, Linear, ProbedLayer)>,
    head: Linear,
    tokens: usize,
}

impl Transformer {
    fn new(
        vb: VarBuilder,
        probes: &ProbeSet,
        width: usize,
        depth: usize,
        tokens: usize,
    ) -> Result<Self> {
        let layers = (0..depth)
            .map(|i| -> Result<_> {
                let vb = vb.pp(format!("l{i}"));
                Ok((
                    layer_norm(width, 1e-5, vb.pp("ln1"))?,
                    linear(width, 3 * width, vb.pp("qkv"))?,
                    linear(width, width, vb.pp("proj"))?,
                    layer_norm(width, 1e-5, vb.pp("ln2"))?,
                    linear(width, 2 * width, vb.pp("ff1"))?,
                    probes
                        .add(format!("ff{i}"))?
                        .feeding(linear(2 * width, width, vb.pp("ff2"))?),
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            embed: linear(28, width, vb.pp("embed"))?,
            layers,
            head: linear(width, 10, vb.pp("head"))?,
            tokens,
        })
    }
}

impl Module for Transformer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        let mut h = self.embed.forward(&xs.reshape((n, self.tokens, 28))?)?;
        for (ln1, qkv, proj, ln2, ff1, ff2) in &self.layers {
            let (n, t, w) = h.dims3()?;
            let heads = 4;
            let dh = w / heads;
            let q = qkv
                .forward(&ln1.forward(&h)?)?
                .reshape((n, t, 3, heads, dh))?
                .permute((2, 0, 3, 1, 4))?;
            let (q_, k, v) = (
                q.get(0)?.contiguous()?,
                q.get(1)?.contiguous()?,
                q.get(2)?.contiguous()?,
            );
            let att = candle_nn::ops::softmax_last_dim(
                &(q_.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?,
            )?;
            let out = att.matmul(&v)?.transpose(1, 2)?.reshape((n, t, w))?;
            h = (h + proj.forward(&out)?)?;
            let branch = ff2.forward(&ff1.forward(&ln2.forward(&h)?)?.relu()?)?;
            h = ff2.residual(&h, &branch)?;
        }
        self.head.forward(&h.mean(1)?)
    }
}

/// One epoch of AdamW over `n` samples, batches of 64, and a check on `subset` samples
/// (17 fractions, 3 orders, the zero clamp: the defaults), each `reps` times.
fn measure(
    name: &str,
    params: serde_json::Value,
    model: &impl ModuleT,
    probes: &ProbeSet,
    varmap: &VarMap,
    (n, features, subset): (usize, usize, usize),
    reps: usize,
) -> Result<()> {
    let mut rng = SplitMix64::new(1);
    let xs = random(&mut rng, &[n, features])?;
    let ys = Tensor::from_vec(
        (0..n).map(|_| rng.below(10) as u32).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW::default())?;
    let mut epoch = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        for start in (0..n).step_by(64) {
            let len = 64.min(n - start);
            let logits = model.forward_t(&xs.narrow(0, start, len)?, true)?;
            opt.backward_step(&loss::cross_entropy(&logits, &ys.narrow(0, start, len)?)?)?;
        }
        epoch.push(t.elapsed().as_secs_f64());
    }
    let data = ProbeData::new(xs.narrow(0, 0, subset)?, ys.narrow(0, 0, subset)?)?;
    let mut check = vec![];
    let mut last = None;
    for _ in 0..reps + 1 {
        let t = Instant::now();
        let c = Measurement::new(model, probes, &data).ablation_curve(&AblationSpec::default())?;
        check.push(t.elapsed().as_secs_f64());
        last = Some(c);
    }
    check.remove(0); // warm-up
    let c = last.expect("a check ran");
    let (e, k) = (median(epoch), median(check));
    println!(
        "{}",
        serde_json::json!({
            "bench": "reach", "model": name, "params": params, "train_samples": n,
            "subset": subset, "reps": reps, "epoch_s": e, "check_s": k,
            "check_over_epoch": k / e, "batched": c.batched, "incremental": c.incremental,
            "shared_rows": c.shared_rows,
            "threads": std::thread::available_parallelism().map_or(1, |p| p.get()),
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let n = args.train;
    let build = || {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        (varmap, vb, ProbeSet::new())
    };
    if !args.transformer_only {
        let (varmap, vb, probes) = build();
        let m = BnCnn::new(vb, &probes)?;
        measure(
            "bn-cnn",
            serde_json::json!({}),
            &m,
            &probes,
            &varmap,
            (n, 784, 1000),
            args.reps,
        )?;
    }
    if !args.transformer_only {
        let (varmap, vb, probes) = build();
        let m = ResNet::new(vb, 16, &probes)?;
        measure(
            "resnet",
            serde_json::json!({"channels": 16}),
            &m,
            &probes,
            &varmap,
            (n, 784, 1000),
            args.reps,
        )?;
    }
    let transformer = |width: usize, depth: usize, tokens: usize, subset: usize| -> Result<()> {
        let (varmap, vb, probes) = build();
        let m = Transformer::new(vb, &probes, width, depth, tokens)?;
        let params = serde_json::json!({"width": width, "depth": depth, "tokens": tokens});
        measure(
            "transformer",
            params,
            &m,
            &probes,
            &varmap,
            (n, tokens * 28, subset),
            args.reps,
        )
    };
    transformer(64, 2, 28, 1000)?;
    if !args.no_growth {
        for width in [32, 128] {
            transformer(width, 2, 28, 1000)?;
        }
        for depth in [1, 3] {
            transformer(64, depth, 28, 1000)?;
        }
        for tokens in [7, 14] {
            transformer(64, 2, tokens, 1000)?;
        }
        for subset in [250, 500] {
            transformer(64, 2, 28, subset)?;
        }
    }
    Ok(())
}
