//! Cost of one reliance check: incremental (probes fused with the layer they feed), batched
//! (clamp, then every layer on the expanded batch) and one forward per level, against the matrix
//! products the batched path runs; then a check of the monitor's default size against a training
//! epoch, for the MNIST example's MLP and a small CNN, and what reporting the training loop's
//! predictions (`observe`) adds to the MLP's epoch. Prints one JSON line.
//!
//! MLP 784-256-256-10, 2000 samples, 17 fractions (i/16), 5 random orders, zero clamp.
//! ```text
//! cargo run --release --example bench_check [-- --reps 5]
//! cargo run --release --example bench_check -- --peak-rss 10000   # peak memory of one check
//! ```

#[path = "common/mod.rs"]
mod common;

use candle_core::{Device, Module, ModuleT, Result, Tensor};
use candle_nn::Optimizer;
use candle_nn::VarMap;
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp};
use candle_reliance::measurement::auto_batch_rows;
use candle_reliance::monitor::PredictionChanges;
use candle_reliance::ops::level_clamp_for_tests;
use candle_reliance::{Measurement, ProbeData, ProbeSet, ProbedLayer};
use std::time::Instant;

#[derive(clap::Parser, Debug)]
#[command(about = "Cost of one reliance check against the matrix products it needs")]
struct Args {
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Only run one default-size check (incremental) of the MNIST MLP on this many samples and
    /// print the process's peak resident memory.
    #[arg(long)]
    peak_rss: Option<usize>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<T, E: Into<candle_core::Error>>(
    reps: usize,
    mut f: impl FnMut() -> std::result::Result<T, E>,
) -> Result<f64> {
    f().map_err(Into::into)?; // warm-up: allocations, thread pools
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f().map_err(Into::into)?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// One timed run, no warm-up (for runs that follow others of the same kind).
fn once<T, E: Into<candle_core::Error>>(
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> Result<f64> {
    let t0 = Instant::now();
    f().map_err(Into::into)?;
    Ok(t0.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    if let Some(n) = args.peak_rss {
        return peak_rss(n);
    }
    let reps = args.reps;
    let (n, d_in, hidden, classes) = (2000, 784, 256, 10);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let probes = ProbeSet::new();
    let model = common::Mlp::new(&varmap, &[hidden, hidden], 0.0, &probes, 0)?;
    let xs = Tensor::rand(0f32, 1.0, (n, d_in), &dev)?;
    let ys = model.forward(&xs)?.argmax(1)?;
    let data = ProbeData::new(xs.clone(), ys)?;
    let spec = AblationSpec::default()
        .with_fractions((0..=16).map(|i| i as f64 / 16.0).collect::<Vec<_>>())
        .with_order(AblationOrder::Random { orders: 5, seed: 0 })
        .with_clamp(Clamp::Zero);

    // A new measurement each time, so that every timing includes the statistics pass.
    let measure = || Measurement::new(&model, &probes, &data);
    // Incremental and batched interleaved, so that drift on a shared machine hits both alike.
    let (mut inc_t, mut bat_t) = (vec![], vec![]);
    for _ in 0..reps {
        inc_t.push(time(1, || measure().ablation_curve(&spec))?);
        bat_t.push(time(1, || {
            measure().with_incremental(false).ablation_curve(&spec)
        })?);
    }
    let (incremental, batched) = (median(inc_t), median(bat_t));
    // The statistics pass inside every curve: unit counts, means, the unablated accuracy.
    let stats = time(reps, || measure().statistics().cloned())?;
    let per_level = time(reps.min(3), || {
        measure()
            .with_batched(false)
            .with_incremental(false)
            .ablation_curve(&spec)
    })?;

    // The products no implementation can skip: the first layer once per sample, the later
    // layers once per (distinct mask, sample). Nothing and everything ablated are shared by the
    // orders: 5 · 15 + 2 masks.
    let masks = 5 * 15 + 2;
    let w1 = Tensor::rand(0f32, 1.0, (d_in, hidden), &dev)?;
    let w2 = Tensor::rand(0f32, 1.0, (hidden, hidden), &dev)?;
    let w3 = Tensor::rand(0f32, 1.0, (hidden, classes), &dev)?;
    let h = Tensor::rand(0f32, 1.0, (masks * n, hidden), &dev)?;
    let whole = time(reps, || {
        xs.matmul(&w1)?;
        h.matmul(&w2)?;
        h.matmul(&w3)
    })?;
    // The same products in blocks of the rows the batched pass uses: faster on CPU, where the
    // outputs then stay in cache. The baseline is the faster of the two.
    let rows = auto_batch_rows(&dev, hidden);
    let blocked = time(reps, || {
        xs.matmul(&w1)?;
        for start in (0..masks * n).step_by(rows) {
            let hb = h.narrow(0, start, rows.min(masks * n - start))?;
            hb.matmul(&w2)?;
            hb.matmul(&w3)?;
        }
        Ok::<(), candle_core::Error>(())
    })?;
    let matmul = whole.min(blocked);
    // The model's own forward over the same rows (bias adds and ReLUs included, probes idle):
    // what any implementation that runs the unmodified model pays.
    let model_forward = time(reps, || {
        model.layers[0].forward(&xs)?.relu()?;
        for start in (0..masks * n).step_by(rows) {
            let hb = h.narrow(0, start, rows.min(masks * n - start))?;
            model.layers[2].forward(&model.layers[1].forward(&hb)?.relu()?)?;
        }
        Ok::<(), candle_core::Error>(())
    })?;

    // The second probe's clamp over the rows of one check, as the op does it (a new tensor per
    // chunk), and as a loop that clamps a buffer in place by the same bit select (zero clamp:
    // keep the bits or clear them): what clamping the probe's input in place could save
    // (docs/cuda.md, "Later probes").
    let levels = 16;
    let chunk = rows / levels * levels;
    let chunks = (masks * n).div_ceil(chunk);
    let keep_v: Vec<u8> = (0..levels * hidden)
        .map(|i| u8::from(i.wrapping_mul(2_654_435_761) % 97 < 48))
        .collect();
    let keep = Tensor::from_vec(keep_v.clone(), (levels, hidden), &dev)?;
    let zeros = Tensor::zeros(hidden, candle_core::DType::F32, &dev)?;
    let hc = h.narrow(0, 0, chunk)?;
    let later_clamp = time(reps, || {
        for _ in 0..chunks {
            level_clamp_for_tests(&hc, &keep, &zeros, false)?;
        }
        Ok::<(), candle_core::Error>(())
    })?;
    let masks_v: Vec<u32> = keep_v
        .iter()
        .map(|&k| if k != 0 { !0 } else { 0 })
        .collect();
    let mut buf = hc.flatten_all()?.to_vec1::<f32>()?;
    let later_clamp_in_place = time(reps, || {
        use rayon::prelude::*;
        let per_level = chunk / levels;
        for _ in 0..chunks {
            buf.par_chunks_mut(hidden * 64)
                .enumerate()
                .for_each(|(t, block)| {
                    for (i, row) in block.chunks_mut(hidden).enumerate() {
                        let l = (t * 64 + i) / per_level;
                        let m = &masks_v[l * hidden..(l + 1) * hidden];
                        for (d, &m) in row.iter_mut().zip(m) {
                            *d = f32::from_bits(d.to_bits() & m);
                        }
                    }
                });
        }
        Ok::<_, candle_core::Error>(std::hint::black_box(buf.len()))
    })?;

    // Idle probes: the same forward with and without the probe calls (probes are identities
    // outside a measurement), interleaved so drift hits both alike.
    let plain = |xs: &Tensor| -> Result<Tensor> {
        let h = model.layers[0].forward(xs)?.relu()?;
        model.layers[2].forward(&model.layers[1].forward(&h)?.relu()?)
    };
    let (mut with_probes, mut without) = (vec![], vec![]);
    for _ in 0..reps.max(5) {
        without.push(time(1, || plain(&xs))?);
        with_probes.push(time(1, || model.forward(&xs))?);
    }
    let (idle, bare) = (median(with_probes), median(without));

    println!(
        "{{\"bench\":\"ablation_check\",\"model\":\"mlp-784-256-256-10\",\"samples\":{n},\"fractions\":17,\
         \"orders\":5,\"clamp\":\"zero\",\"distinct_masks\":{masks},\"threads\":{threads},\"reps\":{reps},\
         \"incremental_s\":{incremental:.4},\"batched_s\":{batched:.4},\"batched_over_incremental\":{inc_speedup:.2},\"stats_pass_s\":{stats:.4},\"per_level_s\":{per_level:.4},\"speedup\":{speedup:.2},\
         \"batch_rows\":{rows},\"matmul_whole_s\":{whole:.4},\"matmul_blocked_s\":{blocked:.4},\"unavoidable_matmul_s\":{matmul:.4},\"batched_over_matmul\":{ratio:.3},\"model_forward_s\":{model_forward:.4},\"batched_over_model_forward\":{ratio_fwd:.3},\"target_batched_over_matmul\":1.5,\"forward_idle_probes_s\":{idle:.5},\"forward_no_probes_s\":{bare:.5},\"idle_probe_ratio\":{idle_ratio:.3},\"later_probe_clamp_s\":{later_clamp:.4},\"later_probe_clamp_in_place_s\":{later_clamp_in_place:.4},\"default_check\":{per_epoch}}}",
        threads = rayon_threads(),
        speedup = per_level / batched,
        inc_speedup = batched / incremental,
        per_epoch = check_per_epoch(reps)?,
        ratio = batched / matmul,
        ratio_fwd = batched / model_forward,
        idle_ratio = idle / bare,
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A check of the monitor's default size (1 000 samples, 17 fractions, 3 random orders, zero
/// clamp, with its statistics pass) against one training epoch on the 8 000 shipped training
/// digits, for the MNIST example's MLP (784-512-512-10, AdamW, batch 64) and a small CNN (two
/// 3×3 convolutions with probes on their pooled feature maps, SGD, batch 64), each twice: the
/// steps after the first fused layer (the MLP's ReLU, the CNN's ReLU and pool) in that layer
/// (`mlp`, `cnn`) and in the model's forward (`*_steps_outside`); the check also without shared
/// rows (a block of rows per variant from the first probe), and single-unit importance of every
/// unit with and without them. JSON object.
fn check_per_epoch(reps: usize) -> Result<String> {
    let mnist = common::mnist()?;
    let (xs, ys) = (&mnist.train.images, &mnist.train.labels);
    let data = ProbeData::new(xs.clone(), ys.clone())?.subset(1000, 0)?;
    let spec = candle_reliance::RelianceConfig::default().ablation;
    let mut out = vec![];
    for kind in ["mlp", "mlp_steps_outside", "cnn", "cnn_steps_outside"] {
        let varmap = VarMap::new();
        let probes = ProbeSet::new();
        let model: Box<dyn ModuleT> = if kind.starts_with("mlp") {
            let mlp = common::Mlp::new(&varmap, &[512, 512], 0.0, &probes, 0)?;
            Box::new(match kind {
                "mlp" => mlp,
                _ => mlp.with_relu_outside(),
            })
        } else {
            Box::new(SmallCnn::new(&varmap, &probes, kind == "cnn")?)
        };
        let mut rng = common::Rng::new(0);
        let reps = reps.clamp(1, 3);
        // The MNIST MLP's epoch also with the training loop's predictions reported to the monitor
        // (`RelianceMonitor::observe`: a `PredictionChanges` record per batch), alternating.
        let mut observe_json = String::new();
        let epoch = if kind.starts_with("mlp") {
            let mut opt = common::adamw(varmap.all_vars(), 1e-3)?;
            let plain = time(reps, || {
                common::train_epoch(|x| model.forward_t(x, true), &mut opt, xs, ys, 64, &mut rng)
            })?;
            if kind == "mlp" {
                let mut changes = PredictionChanges::new(xs.dim(0)?);
                let (mut with, mut without) = (vec![], vec![]);
                for _ in 0..reps.max(3) {
                    with.push(once(|| {
                        train_epoch_observed(&*model, &mut opt, xs, ys, &mut rng, &mut changes)
                    })?);
                    without.push(once(|| {
                        common::train_epoch(
                            |x| model.forward_t(x, true),
                            &mut opt,
                            xs,
                            ys,
                            64,
                            &mut rng,
                        )
                    })?);
                }
                let (with, without) = (median(with), median(without));
                observe_json = format!(
                    ",\"epoch_observed_s\":{with:.3},\"epoch_not_observed_s\":{without:.3},\"observe_over_epoch\":{:.4}",
                    with / without - 1.0
                );
            }
            plain
        } else {
            let mut opt = candle_nn::SGD::new(varmap.all_vars(), 0.05)?;
            time(reps, || {
                common::train_epoch(|x| model.forward_t(x, true), &mut opt, xs, ys, 64, &mut rng)
            })?
        };
        let m = || Measurement::new(&*model, &probes, &data);
        let (mut inc_t, mut bat_t, mut own_t) = (vec![], vec![], vec![]);
        let (mut imp_t, mut imp_own_t) = (vec![], vec![]);
        let importance = |shared| {
            m().with_shared_rows(shared)
                .importance(candle_reliance::curves::Clamp::Zero)
        };
        for _ in 0..reps.max(3) {
            inc_t.push(time(1, || m().ablation_curve(&spec))?);
            bat_t.push(time(1, || {
                m().with_incremental(false).ablation_curve(&spec)
            })?);
            own_t.push(time(1, || {
                m().with_shared_rows(false).ablation_curve(&spec)
            })?);
            imp_t.push(once(|| importance(true))?);
            imp_own_t.push(once(|| importance(false))?);
        }
        let (inc, bat, own) = (median(inc_t), median(bat_t), median(own_t));
        let (imp, imp_own) = (median(imp_t), median(imp_own_t));
        out.push(format!(
            "\"{kind}\":{{\"epoch_s\":{epoch:.3},\"check_incremental_s\":{inc:.4},\"check_batched_s\":{bat:.4},\
             \"check_rows_per_variant_s\":{own:.4},\"incremental_over_epoch\":{:.4},\"batched_over_epoch\":{:.4},\
             \"rows_per_variant_over_shared\":{:.3},\"importance_s\":{imp:.4},\
             \"importance_rows_per_variant_s\":{imp_own:.4},\"importance_rows_per_variant_over_shared\":{:.3}{observe_json}}}",
            inc / epoch,
            bat / epoch,
            own / inc,
            imp_own / imp
        ));
    }
    Ok(format!("{{{}}}", out.join(",")))
}

/// 28×28 digits: conv 3×3 (16) → ReLU → max-pool → [probe, conv 3×3 (32)] → ReLU → max-pool →
/// [probe, linear 32·7·7 → 10]. The probes see pooled feature maps (units are channels).
/// `fused_steps`: conv2's ReLU and max-pool are steps of its fused layer
/// (`then_relu().then_max_pool2d(2)`), else calls in this forward; the same network either way.
struct SmallCnn {
    c1: candle_nn::Conv2d,
    c2: ProbedLayer,
    fc: ProbedLayer,
}

impl SmallCnn {
    fn new(varmap: &VarMap, probes: &ProbeSet, fused_steps: bool) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_varmap(varmap, candle_core::DType::F32, &Device::Cpu);
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let c2 = probes
            .add("conv1")?
            .feeding(candle_nn::conv2d(16, 32, 3, cfg, vb.pp("conv2"))?);
        let net = Self {
            c1: candle_nn::conv2d(1, 16, 3, cfg, vb.pp("conv1"))?,
            c2: match fused_steps {
                true => c2.then_relu().then_max_pool2d(2),
                false => c2,
            },
            fc: probes
                .add("conv2")?
                .feeding(candle_nn::linear(32 * 7 * 7, 10, vb.pp("fc"))?),
        };
        common::seeded_init(varmap, 0)?;
        Ok(net)
    }
}

impl Module for SmallCnn {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = xs.reshape((xs.dim(0)?, 1, 28, 28))?;
        let h = self.c1.forward(&x)?.relu()?.max_pool2d(2)?;
        let mut h = self.c2.forward(&h)?;
        if self.c2.after().is_empty() {
            h = h.relu()?.max_pool2d(2)?;
        }
        self.fc.forward(&h)
    }
}

/// `common::train_epoch` for the MNIST MLP with each batch's predictions recorded, as
/// `RelianceMonitor::observe` records them; the epoch's changes are counted at its end.
fn train_epoch_observed(
    model: &dyn ModuleT,
    opt: &mut impl Optimizer,
    xs: &Tensor,
    ys: &Tensor,
    rng: &mut common::Rng,
    changes: &mut PredictionChanges,
) -> Result<Option<usize>> {
    let n = xs.dim(0)?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    rng.shuffle(&mut order);
    for b in order.chunks(64) {
        let idx = Tensor::new(b, xs.device())?;
        let logits = model.forward_t(&xs.index_select(&idx, 0)?, true)?;
        changes.record(b, &logits)?;
        let l = candle_nn::loss::cross_entropy(&logits, &ys.index_select(&idx, 0)?)?;
        opt.backward_step(&l)?;
    }
    Ok(changes.end_epoch()?)
}

/// One default-size check of the MNIST MLP on `n` shipped digits (repeated from the training
/// set when `n` exceeds it); prints the peak resident memory before and after.
fn peak_rss(n: usize) -> Result<()> {
    let mnist = common::mnist()?;
    let reps = n.div_ceil(mnist.train.images.dim(0)?);
    let xs = Tensor::cat(&vec![&mnist.train.images; reps], 0)?.narrow(0, 0, n)?;
    let ys = Tensor::cat(&vec![&mnist.train.labels; reps], 0)?.narrow(0, 0, n)?;
    let varmap = VarMap::new();
    let probes = ProbeSet::new();
    let model = common::Mlp::new(&varmap, &[512, 512], 0.0, &probes, 0)?;
    let data = ProbeData::new(xs, ys)?;
    let before = vm_hwm_kib();
    let spec = candle_reliance::RelianceConfig::default().ablation;
    let c = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    println!(
        "{{\"bench\":\"peak_rss\",\"samples\":{n},\"incremental\":{},\"peak_rss_before_check_kib\":{before},\"peak_rss_kib\":{}}}",
        c.incremental,
        vm_hwm_kib()
    );
    Ok(())
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
