//! The noise curve: the noise added is N(0, (scale·σ_unit)²), batched equals one forward per
//! level, and the limits behave.

use candle_core::{Device, Module, Result, Tensor};
use candle_reliance::curves::NoiseSpec;
use candle_reliance::{Measurement, ProbeData, ProbeSet};
use std::sync::{Arc, Mutex};

/// Inputs whose 3 units have known spread: unit u of sample i is (u+1)·s_i with s = ±1
/// alternating, so every unit has mean 0 and σ_u = u + 1.
fn data(n: usize) -> Result<ProbeData> {
    let v: Vec<f32> = (0..n)
        .flat_map(|i| {
            let s = if i % 2 == 0 { 1.0 } else { -1.0 };
            [s, 2.0 * s, 3.0 * s]
        })
        .collect();
    let ys: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
    Ok(ProbeData::new(
        Tensor::from_vec(v, (n, 3), &Device::Cpu)?,
        Tensor::from_vec(ys, n, &Device::Cpu)?,
    )?)
}

#[test]
fn added_noise_has_the_unit_scaled_standard_deviation() -> Result<()> {
    let n = 400;
    let data = data(n)?;
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    // The model hands back what the probe made, so the test sees the perturbed activations.
    let seen: Arc<Mutex<Vec<Tensor>>> = Arc::default();
    let seen2 = seen.clone();
    let model = move |xs: &Tensor| -> Result<Tensor> {
        let h = p.forward(xs)?;
        seen2.lock().unwrap().push(h.clone());
        h.narrow(1, 0, 2) // logits: units 0 and 1
    };
    let stats = Measurement::new(&model, &probes, &data)
        .with_batch_size(64)
        .statistics()?
        .clone();
    for (u, s) in stats.probes[0].value.std.iter().enumerate() {
        assert!((s - (u + 1) as f64).abs() < 1e-9, "σ of unit {u}: {s}");
    }
    seen.lock().unwrap().clear();
    let scales = vec![0.5, 2.0];
    let spec = NoiseSpec::default()
        .with_scales(scales.clone())
        .with_draws(1);
    Measurement::new(&model, &probes, &data).noise_curve(&spec)?;
    // The batched pass saw levels × samples rows per chunk, level-major within each chunk.
    let chunks = seen.lock().unwrap().clone();
    let mut sum = [[0f64; 3]; 2];
    let mut sum_sq = [[0f64; 3]; 2];
    let mut count = 0usize;
    let clean = data.xs().to_vec2::<f32>()?;
    let mut sample = 0usize;
    for out in chunks.iter().skip(2) {
        // skip(2): one sample's forward (the model's class count) and the statistics pass come
        // first, unperturbed.
        let rows = out.to_vec2::<f32>()?;
        let m = rows.len() / 2;
        for level in 0..2 {
            for i in 0..m {
                for u in 0..3 {
                    let d = (rows[level * m + i][u] - clean[sample + i][u]) as f64;
                    sum[level][u] += d;
                    sum_sq[level][u] += d * d;
                }
            }
        }
        sample += m;
        count += m;
    }
    assert_eq!(count, n);
    for level in 0..2 {
        for u in 0..3 {
            let mean = sum[level][u] / n as f64;
            let sd = (sum_sq[level][u] / n as f64 - mean * mean).sqrt();
            let want = scales[level] * (u + 1) as f64;
            // 400 draws: the sample sd is within ~3.5% of the truth with high probability; allow 12%.
            assert!(
                (sd / want - 1.0).abs() < 0.12,
                "level {level} unit {u}: sd {sd}, want {want}"
            );
            assert!(
                mean.abs() < 4.0 * want / (n as f64).sqrt(),
                "level {level} unit {u}: mean {mean}"
            );
        }
    }
    Ok(())
}

#[test]
fn batched_noise_equals_one_forward_per_level_and_limits_hold() -> Result<()> {
    let data = data(64)?;
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    // Unit 2 (σ 3) carries the sign: class 0 for s = +1 (label 0), class 1 for s = −1.
    let w = Tensor::new(&[[0f32, 0.0], [0.0, 0.0], [1.0, -1.0]], &Device::Cpu)?;
    let model = move |xs: &Tensor| -> Result<Tensor> { p.forward(xs)?.matmul(&w) };

    let spec = NoiseSpec::default().with_draws(3).with_seed(9);
    let batched = Measurement::new(&model, &probes, &data).noise_curve(&spec)?;
    let single = Measurement::new(&model, &probes, &data)
        .with_batched(false)
        .noise_curve(&spec)?;
    assert!(batched.batched && !single.batched);
    assert_eq!(
        batched.per_draw, single.per_draw,
        "noise depends only on (seed, position)"
    );
    assert!(
        batched.accuracy[0] > batched.accuracy[10] + 0.2,
        "{:?}",
        batched.accuracy
    );
    assert!(batched.auc_ci.is_some());

    let curve = Measurement::new(&model, &probes, &data)
        .noise_curve(&NoiseSpec::default().with_scales(vec![1e-4, 1e-3, 100.0, 1000.0]))?;
    assert_eq!(curve.unablated_accuracy, 1.0);
    // Tiny noise changes nothing; noise 1000σ leaves a coin flip (64 samples: within
    // 0.5 ± 0.25 with overwhelming probability).
    assert_eq!(curve.accuracy[0], 1.0);
    assert_eq!(curve.accuracy[1], 1.0);
    assert!(
        (curve.accuracy[3] - 0.5).abs() < 0.25,
        "{:?}",
        curve.accuracy
    );
    // AUC over normalized log-scale: x = 0, 1/7, 6/7, 1 for 10^-4, 10^-3, 10^2, 10^3.
    let x = [0.0, 1.0 / 7.0, 6.0 / 7.0, 1.0];
    let y = &curve.accuracy;
    let want: f64 = (0..3)
        .map(|i| (x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2.0)
        .sum();
    assert!((curve.auc - want).abs() < 1e-12);
    Ok(())
}

#[test]
fn bad_noise_specs_are_errors() -> Result<()> {
    let data = data(4)?;
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let model = move |xs: &Tensor| -> Result<Tensor> { p.forward(xs) };
    for (spec, want) in [
        (NoiseSpec::default().with_scales(vec![0.0, 1.0]), "positive"),
        (
            NoiseSpec::default().with_scales(vec![2.0, 1.0]),
            "increasing",
        ),
        (NoiseSpec::default().with_scales(vec![1.0]), "at least 2"),
        (NoiseSpec::default().with_draws(0), "draws"),
    ] {
        let e = Measurement::new(&model, &probes, &data)
            .noise_curve(&spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    Ok(())
}
