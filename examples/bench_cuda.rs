//! CUDA check and bench: bandwidth of the level ops against a device-to-device copy in the same
//! run, and an MNIST MLP measured on the GPU and on the CPU. Prints one JSON line.
//!
//! ```text
//! cargo run --release --features cuda --example bench_cuda [-- --data data --reps 20]
//! ```
//! Needs a CUDA device; see docs/cuda.md for building it where there is none and running it
//! on a GPU machine (scripts/gpu-check.sh).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, loss, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
#[path = "common/idx.rs"]
mod idx;

use candle_reliance::curves::{AblationOrder, AblationSpec, NoiseSpec};
use candle_reliance::ops::{level_clamp_for_tests, level_noise_for_tests, unit_sums_for_tests};
use candle_reliance::{Measurement, Probe, ProbeData, ProbeSet};
use idx::load_split;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Parser, Debug)]
#[command(about = "CUDA check and bench of the probe ops")]
struct Args {
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Folder with the shipped MNIST digits.
    #[arg(long, default_value = "data")]
    data: PathBuf,
}

/// Median seconds of `reps` synchronized runs after one warm-up.
fn time(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        t.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn bandwidth(dev: &Device, reps: usize) -> Result<serde_json::Value> {
    // Expanded output 16 × 4096 × 1024 f32 = 256 MiB; input 16 MiB.
    let (levels, rows, units) = (16usize, 4096usize, 1024usize);
    let x = Tensor::randn(0f32, 1.0, (rows, units), dev)?;
    let keep: Vec<u8> = (0..levels * units)
        .map(|i| u8::from((i * 7) % 3 != 0))
        .collect();
    let keep = Tensor::from_vec(keep, (levels, units), dev)?;
    let vals = Tensor::zeros(units, DType::F32, dev)?;
    let std = Tensor::full(0.5f32, (levels, units), dev)?;
    let out_bytes = (levels * rows * units * 4) as f64;
    let in_bytes = (rows * units * 4) as f64;
    let big = Tensor::randn(0f32, 1.0, (levels * rows, units), dev)?;

    let copy_s = time(dev, reps, || big.copy())?;
    let clamp_s = time(dev, reps, || level_clamp_for_tests(&x, &keep, &vals, true))?;
    let clamp_later_s = time(dev, reps, || {
        level_clamp_for_tests(&big, &keep, &vals, false)
    })?;
    let noise_s = time(dev, reps, || {
        level_noise_for_tests(&x, &std, true, 7, (0, 0, rows))
    })?;
    // The statistics pass over the expanded-size activation, with 10 classes.
    let labels: Vec<u32> = (0..(levels * rows) as u32).map(|r| r % 10).collect();
    let labels = Tensor::from_vec(labels, levels * rows, dev)?;
    let sums_s = time(dev, reps, || unit_sums_for_tests(&big, &labels, 10))?;
    let gbps = |bytes: f64, s: f64| bytes / s / 1e9;
    Ok(json!({
        "output_mib": out_bytes / (1 << 20) as f64,
        // Bytes moved: the copy reads and writes its size; an expanding op writes the output
        // and reads the input once (repeated reads hit L2); a later-probe one (L·M rows in) reads and
        // writes the output size.
        "d2d_copy": {"ms": copy_s * 1e3, "gbps": gbps(2.0 * out_bytes, copy_s)},
        "clamp_expand": {"ms": clamp_s * 1e3, "gbps": gbps(out_bytes + in_bytes, clamp_s)},
        "clamp": {"ms": clamp_later_s * 1e3, "gbps": gbps(2.0 * out_bytes, clamp_later_s)},
        "noise_expand": {"ms": noise_s * 1e3, "gbps": gbps(out_bytes + in_bytes, noise_s)},
        // Reads the activation once; the output is tiny.
        "unit_sums": {"ms": sums_s * 1e3, "gbps": gbps(out_bytes, sums_s)},
    }))
}

struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
    p1: Probe,
    p2: Probe,
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.p1.forward(&self.l1.forward(xs)?.relu()?)?;
        let h = self.p2.forward(&self.l2.forward(&h)?.relu()?)?;
        self.l3.forward(&h)
    }
}

/// Copies the trained layers to `dev` with a fresh probe set.
fn mlp_on(layers: &[(Tensor, Tensor)], dev: &Device) -> Result<(Mlp, ProbeSet)> {
    let l = |i: usize| -> Result<Linear> {
        Ok(Linear::new(
            layers[i].0.to_device(dev)?,
            Some(layers[i].1.to_device(dev)?),
        ))
    };
    let probes = ProbeSet::new();
    let m = Mlp {
        l1: l(0)?,
        l2: l(1)?,
        l3: l(2)?,
        p1: probes.add("fc1")?,
        p2: probes.add("fc2")?,
    };
    Ok((m, probes))
}

fn mnist_check(gpu: &Device, data_dir: &Path) -> Result<serde_json::Value> {
    let split = load_split(
        &data_dir.join("mnist-10k-images-idx3-ubyte.gz"),
        &data_dir.join("mnist-10k-labels-idx1-ubyte.gz"),
        gpu,
    )?;
    // Train 784-256-256-10 on the GPU for 3 epochs (AdamW, batch 128).
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, gpu);
    let (l1, l2, l3) = (
        linear(784, 256, vb.pp("l1"))?,
        linear(256, 256, vb.pp("l2"))?,
        linear(256, 10, vb.pp("l3"))?,
    );
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )?;
    let n = split.len();
    let t0 = Instant::now();
    for _epoch in 0..3 {
        for start in (0..n).step_by(128) {
            let len = 128.min(n - start);
            let xs = split.images.narrow(0, start, len)?;
            let ys = split.labels.narrow(0, start, len)?;
            let h = l1.forward(&xs)?.relu()?;
            let h = l2.forward(&h)?.relu()?;
            let logits = l3.forward(&h)?;
            opt.backward_step(&loss::cross_entropy(&logits, &ys)?)?;
        }
    }
    gpu.synchronize()?;
    let train_s = t0.elapsed().as_secs_f64();
    let layers: Vec<(Tensor, Tensor)> = [&l1, &l2, &l3]
        .iter()
        .map(|l| Ok((l.weight().clone(), l.bias().expect("bias").clone())))
        .collect::<Result<_>>()?;

    let subset = 2000;
    let xs = split.images.narrow(0, 0, subset)?;
    let ys = split.labels.narrow(0, 0, subset)?;
    let ablation = AblationSpec::default().with_order(AblationOrder::Random { orders: 3, seed: 1 });
    let noise = NoiseSpec::default().with_draws(2).with_seed(3);
    let mut out = serde_json::Map::new();
    let mut curves = Vec::new();
    for dev in [gpu.clone(), Device::Cpu] {
        let (model, probes) = mlp_on(&layers, &dev)?;
        let data = ProbeData::new(xs.to_device(&dev)?, ys.to_device(&dev)?)?;
        if !dev.is_cpu() {
            // Warm-up: the first use loads the kernel modules (PTX JIT); a monitor pays it once.
            let m = Measurement::new(&model, &probes, &data);
            m.ablation_curve(&ablation)?;
            m.noise_curve(&noise)?;
            dev.synchronize()?;
        }
        let t = Instant::now();
        // A new measurement for each curve, so that each time includes its statistics pass.
        let a = Measurement::new(&model, &probes, &data).ablation_curve(&ablation)?;
        dev.synchronize()?;
        let a_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let nz = Measurement::new(&model, &probes, &data).noise_curve(&noise)?;
        dev.synchronize()?;
        let n_s = t.elapsed().as_secs_f64();
        let name = if dev.is_cpu() { "cpu" } else { "cuda" };
        let acc = model
            .forward(&data.xs().clone())?
            .argmax(D::Minus1)?
            .eq(data.labels())?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        out.insert(
            name.into(),
            json!({"train_accuracy": acc, "ablation_auc": a.auc, "ablation_s": a_s,
                   "noise_auc": nz.auc, "noise_s": n_s, "batched": a.batched && nz.batched}),
        );
        curves.push((a.accuracy, nz.accuracy));
    }
    let max_diff = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, f64::max)
    };
    let ablation_diff = max_diff(&curves[0].0, &curves[1].0);
    let noise_diff = max_diff(&curves[0].1, &curves[1].1);
    out.insert("train_s".into(), json!(train_s));
    out.insert("epoch_s".into(), json!(train_s / 3.0));
    out.insert("samples".into(), json!(subset));
    out.insert("max_abs_diff_ablation".into(), json!(ablation_diff));
    out.insert("max_abs_diff_noise".into(), json!(noise_diff));
    // f32 matrix products differ between cuBLAS and the CPU: allow a few near-tie samples.
    let tol = 5.0 / subset as f64;
    out.insert(
        "ok".into(),
        json!(ablation_diff <= tol && noise_diff <= tol),
    );
    Ok(serde_json::Value::Object(out))
}

fn main() -> Result<()> {
    let Args {
        reps,
        data: data_dir,
    } = clap::Parser::parse();
    let gpu = Device::new_cuda(0)?;
    let bw = bandwidth(&gpu, reps)?;
    let mnist = mnist_check(&gpu, &data_dir)?;
    println!("{}", json!({"bandwidth": bw, "mnist": mnist}));
    Ok(())
}
