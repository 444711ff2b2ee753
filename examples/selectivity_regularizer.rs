//! Training with the class-selectivity regularizer (Leavitt & Morcos 2021) on MNIST: a
//! 784-128-128-10 MLP trained with `loss = cross-entropy + α · mean selectivity` for several α
//! (α > 0 discourages selectivity, α < 0 encourages it). Prints one JSON line per α: test
//! accuracy, mean class selectivity of the hidden units and the ablation AUC, both on 1000
//! training samples.
//!
//! ```text
//! cargo run --release --example selectivity_regularizer
//! ```

#[path = "common/idx.rs"]
mod idx;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{loss, AdamW, Linear, Optimizer, ParamsAdamW};
use candle_reliance::rng::SplitMix64;
use candle_reliance::units::selectivity_regularizer;
use candle_reliance::{AblationSpec, Measurement, Probe, ProbeData, ProbeSet};
use idx::load_mnist_dir;

const HIDDEN: usize = 128;
const EPOCHS: usize = 5;
const BATCH: usize = 64;
const ALPHAS: [f64; 4] = [-1.0, 0.0, 0.5, 1.0];
const SEED: u64 = 0;

struct Mlp {
    layers: [Linear; 3],
    probes: [Probe; 2],
}

impl Mlp {
    /// Kaiming-uniform weights and zero biases; returns the model and its variables.
    fn new(probes: &ProbeSet, rng: &mut SplitMix64, device: &Device) -> Result<(Self, Vec<Var>)> {
        let mut vars = Vec::new();
        let mut layer = |fan_in: usize, fan_out: usize| -> Result<Linear> {
            let bound = (6.0 / fan_in as f32).sqrt();
            let w: Vec<f32> = (0..fan_in * fan_out)
                .map(|_| (2.0 * rng.uniform() as f32 - 1.0) * bound)
                .collect();
            let w = Var::from_tensor(&Tensor::from_vec(w, (fan_out, fan_in), device)?)?;
            let b = Var::zeros(fan_out, DType::F32, device)?;
            let l = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
            vars.extend([w, b]);
            Ok(l)
        };
        let layers = [
            layer(784, HIDDEN)?,
            layer(HIDDEN, HIDDEN)?,
            layer(HIDDEN, 10)?,
        ];
        let model = Self {
            layers,
            probes: [probes.add("fc1")?, probes.add("fc2")?],
        };
        Ok((model, vars))
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.probes[0].forward(&self.layers[0].forward(xs)?.relu()?)?;
        let h = self.probes[1].forward(&self.layers[1].forward(&h)?.relu()?)?;
        self.layers[2].forward(&h)
    }
}

fn accuracy(model: &Mlp, xs: &Tensor, ys: &Tensor) -> Result<f64> {
    let n = xs.dim(0)?;
    let mut correct = 0u32;
    for start in (0..n).step_by(1000) {
        let len = 1000.min(n - start);
        let pred = model
            .forward(&xs.narrow(0, start, len)?)?
            .argmax(D::Minus1)?;
        correct += pred
            .eq(&ys.narrow(0, start, len)?)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
    }
    Ok(f64::from(correct) / n as f64)
}

fn main() -> Result<()> {
    // Logs go to stderr, so that stdout holds only the JSON lines.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let device = Device::Cpu;
    let mnist = load_mnist_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/data"), 2000, &device)?;
    let (train_x, train_y) = (&mnist.train.images, &mnist.train.labels);
    let n = train_x.dim(0)?;
    let probe_data = ProbeData::new(train_x.clone(), train_y.clone())?.subset(1000, SEED)?;

    for alpha in ALPHAS {
        let t0 = std::time::Instant::now();
        let mut rng = SplitMix64::new(SEED);
        let probes = ProbeSet::new();
        let (model, vars) = Mlp::new(&probes, &mut rng, &device)?;
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: 1e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut reg_sum = 0.0;
        let mut steps = 0usize;
        for _ in 0..EPOCHS {
            rng.shuffle(&mut order);
            for batch in order.chunks(BATCH) {
                let idx = Tensor::new(batch, &device)?;
                let (x, y) = (
                    train_x.index_select(&idx, 0)?,
                    train_y.index_select(&idx, 0)?,
                );
                // Record the hidden activations of this forward, graph included.
                let cap = probes.capture()?;
                let logits = model.forward(&x)?;
                let acts = cap.finish()?;
                let reg = selectivity_regularizer(&acts, &y, 10)?;
                let loss = (loss::cross_entropy(&logits, &y)? + (reg.clone() * alpha)?)?;
                opt.backward_step(&loss)?;
                reg_sum += f64::from(reg.to_scalar::<f32>()?);
                steps += 1;
            }
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        let test_accuracy = accuracy(&model, &mnist.test.images, &mnist.test.labels)?;
        let m = Measurement::new(&model, &probes, &probe_data);
        let sel = m.selectivity()?;
        let curve = m.ablation_curve(&AblationSpec::default())?;
        let line = serde_json::json!({
            "alpha": alpha,
            "test_accuracy": test_accuracy,
            "mean_selectivity": sel.mean(),
            "selectivity_per_probe": sel.means(),
            "mean_batch_selectivity": reg_sum / steps as f64,
            "ablation_auc": curve.auc,
            "normalized_auc": curve.normalized_auc,
            "train_accuracy": curve.unablated_accuracy,
            "seconds": t0.elapsed().as_secs_f64(),
            "train_seconds": train_seconds,
        });
        println!("{line}");
    }
    Ok(())
}
