//! Cost of one reliance check, batched versus one forward per level, against the matrix
//! products any implementation must run. Prints one JSON line.
//!
//! MLP 784-256-256-10, 2000 samples, 17 fractions (i/16), 5 random orders, zero clamp.
//! ```text
//! cargo run --release --example bench_check [-- --reps 5]
//! ```

#[path = "common/mod.rs"]
mod common;

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarMap;
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp};
use candle_reliance::measurement::auto_batch_rows;
use candle_reliance::ops::level_clamp_for_tests;
use candle_reliance::{Measurement, ProbeData, ProbeSet};
use std::time::Instant;

#[derive(clap::Parser, Debug)]
#[command(about = "Cost of one reliance check against the matrix products it needs")]
struct Args {
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?; // warm-up: allocations, thread pools
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn main() -> Result<()> {
    let reps = <Args as clap::Parser>::parse().reps;
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
    let batched = time(reps, || measure().ablation_curve(&spec))?;
    // The statistics pass inside every curve: unit counts, means, the unablated accuracy.
    let stats = time(reps, || measure().statistics().cloned())?;
    let per_level = time(reps.min(3), || {
        measure().with_batched(false).ablation_curve(&spec)
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
        Ok(())
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
        Ok(())
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
        Ok(())
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
        Ok(std::hint::black_box(buf.len()))
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
         \"batched_s\":{batched:.4},\"stats_pass_s\":{stats:.4},\"per_level_s\":{per_level:.4},\"speedup\":{speedup:.2},\
         \"batch_rows\":{rows},\"matmul_whole_s\":{whole:.4},\"matmul_blocked_s\":{blocked:.4},\"unavoidable_matmul_s\":{matmul:.4},\"batched_over_matmul\":{ratio:.3},\"model_forward_s\":{model_forward:.4},\"batched_over_model_forward\":{ratio_fwd:.3},\"target_batched_over_matmul\":1.5,\"forward_idle_probes_s\":{idle:.5},\"forward_no_probes_s\":{bare:.5},\"idle_probe_ratio\":{idle_ratio:.3},\"later_probe_clamp_s\":{later_clamp:.4},\"later_probe_clamp_in_place_s\":{later_clamp_in_place:.4}}}",
        threads = rayon_threads(),
        speedup = per_level / batched,
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
