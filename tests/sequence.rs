//! Sequence activations `(N, T, D)`: a unit is the last dimension, clamped at every position.
//! Curves, single-set ablations and statistics are checked against a forward written with plain
//! loops over the same weights, for a probe and for a probe fused with the `Linear` it feeds.

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use candle_reliance::curves::AblationOrder;
use candle_reliance::{AblationSpec, Clamp, Measurement, Probe, ProbeData, ProbeSet, ProbedLayer};

type TestResult = anyhow::Result<()>;

const N: usize = 30;
const T: usize = 4;
const F: usize = 3;
const D: usize = 6;
const E: usize = 5;
const C: usize = 3;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = candle_reliance::rng::SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
}

fn scaled(v: Vec<f32>, by: f32) -> Vec<f32> {
    v.into_iter().map(|x| x * by).collect()
}

/// x (N, T, F) → relu(x·W1ᵀ + b1) (N, T, D) → probe → relu(·W2ᵀ + b2) (N, T, E) → mean over
/// T → ·W3ᵀ + b3 (N, C).
struct Weights {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    w3: Vec<f32>,
    b3: Vec<f32>,
}

impl Weights {
    fn new() -> Self {
        Self {
            w1: scaled(values(D * F, 1), 2.0),
            b1: scaled(values(D, 2), 0.2),
            w2: scaled(values(E * D, 3), 2.0),
            b2: scaled(values(E, 4), 0.2),
            w3: scaled(values(C * E, 5), 3.0),
            b3: scaled(values(C, 6), 0.1),
        }
    }

    fn linear(&self, w: &[f32], b: &[f32], out: usize, inp: usize) -> candle_core::Result<Linear> {
        Ok(Linear::new(
            Tensor::from_slice(w, (out, inp), &Device::Cpu)?,
            Some(Tensor::from_slice(b, out, &Device::Cpu)?),
        ))
    }

    /// The hidden activations `h[n][t][d]` by hand.
    fn hidden(&self, x: &[f32]) -> Vec<f32> {
        let mut h = vec![0f32; N * T * D];
        for nt in 0..N * T {
            for d in 0..D {
                let mut z = self.b1[d] as f64;
                for f in 0..F {
                    z += self.w1[d * F + f] as f64 * x[nt * F + f] as f64;
                }
                h[nt * D + d] = (z as f32).max(0.0);
            }
        }
        h
    }

    /// The predicted class of each sample with the units in `clamped` (global numbers: the
    /// first probe's `D`, then the second's `E`) set to `value[u]` at every position, and
    /// `g_noise(n·T + t, e)` added to the second probe's units, by hand.
    fn predictions_with(
        &self,
        h: &[f32],
        clamped: &[usize],
        value: &[f32],
        g_noise: &dyn Fn(usize, usize) -> f32,
    ) -> Vec<usize> {
        (0..N)
            .map(|n| {
                let mut pooled = [0f64; E];
                for t in 0..T {
                    let nt = n * T + t;
                    let row = &h[nt * D..(nt + 1) * D];
                    for (e, p) in pooled.iter_mut().enumerate() {
                        let mut z = self.b2[e] as f64;
                        for d in 0..D {
                            let a = if clamped.contains(&d) {
                                value[d]
                            } else {
                                row[d]
                            };
                            z += self.w2[e * D + d] as f64 * a as f64;
                        }
                        let g = (z as f32).max(0.0);
                        let g = if clamped.contains(&(D + e)) {
                            value[D + e]
                        } else {
                            (g as f64 + g_noise(nt, e) as f64) as f32
                        };
                        *p += g as f64 / T as f64;
                    }
                }
                let logits: Vec<f64> = (0..C)
                    .map(|c| {
                        self.b3[c] as f64
                            + (0..E)
                                .map(|e| self.w3[c * E + e] as f64 * pooled[e])
                                .sum::<f64>()
                    })
                    .collect();
                (0..C)
                    .max_by(|&a, &b| logits[a].partial_cmp(&logits[b]).unwrap())
                    .unwrap()
            })
            .collect()
    }

    fn predictions(&self, h: &[f32], clamped: &[usize], value: &[f32]) -> Vec<usize> {
        self.predictions_with(h, clamped, value, &|_, _| 0.0)
    }

    /// The second probe's activations `g[n][t][e]`, unclamped, by hand.
    fn second(&self, h: &[f32]) -> Vec<f32> {
        let mut g = vec![0f32; N * T * E];
        for nt in 0..N * T {
            for e in 0..E {
                let mut z = self.b2[e] as f64;
                for d in 0..D {
                    z += self.w2[e * D + d] as f64 * h[nt * D + d] as f64;
                }
                g[nt * E + e] = (z as f32).max(0.0);
            }
        }
        g
    }
}

/// The network with plain probes after both ReLUs.
struct Plain {
    fc1: Linear,
    probe: Probe,
    fc2: Linear,
    probe_g: Probe,
    fc3: Linear,
}

impl Module for Plain {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.probe.forward(&self.fc1.forward(xs)?.relu()?)?;
        let g = self.probe_g.forward(&self.fc2.forward(&h)?.relu()?)?;
        self.fc3.forward(&g.mean(1)?)
    }
}

/// The same network with the first probe fused with the layer it feeds (and the ReLU after it).
struct Fused {
    fc1: Linear,
    fused: ProbedLayer,
    probe_g: Probe,
    fc3: Linear,
}

impl Module for Fused {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward(xs)?.relu()?;
        let g = self.probe_g.forward(&self.fused.forward(&h)?)?;
        self.fc3.forward(&g.mean(1)?)
    }
}

fn plain(w: &Weights, probes: &ProbeSet) -> candle_core::Result<Plain> {
    Ok(Plain {
        fc1: w.linear(&w.w1, &w.b1, D, F)?,
        probe: probes.add("h")?,
        fc2: w.linear(&w.w2, &w.b2, E, D)?,
        probe_g: probes.add("g")?,
        fc3: w.linear(&w.w3, &w.b3, C, E)?,
    })
}

struct Case {
    w: Weights,
    h: Vec<f32>,
    data: ProbeData,
}

fn case() -> candle_core::Result<Case> {
    let w = Weights::new();
    let x = values(N * T * F, 9);
    let h = w.hidden(&x);
    // Labels: the unablated network's own predictions, with every fifth one changed, so that
    // the unablated accuracy is 0.8 and ablation moves it.
    let unablated = w.predictions(&h, &[], &[0.0; D + E]);
    let labels: Vec<u32> = unablated
        .iter()
        .enumerate()
        .map(|(n, &p)| {
            if n % 5 == 0 {
                (p as u32 + 1) % C as u32
            } else {
                p as u32
            }
        })
        .collect();
    let data = ProbeData::new(
        Tensor::from_slice(&x, (N, T, F), &Device::Cpu)?,
        Tensor::new(labels, &Device::Cpu)?,
    )?;
    Ok(Case { w, h, data })
}

fn accuracy(pred: &[usize], data: &ProbeData) -> f64 {
    let labels = data.label_values();
    pred.iter()
        .zip(labels)
        .filter(|(p, l)| **p == **l as usize)
        .count() as f64
        / N as f64
}

/// Each of `units` units' mean over every sample and position, by hand.
fn unit_means(h: &[f32], units: usize) -> Vec<f64> {
    (0..units)
        .map(|d| (0..N * T).map(|nt| h[nt * units + d] as f64).sum::<f64>() / (N * T) as f64)
        .collect()
}

#[test]
fn sequence_probes_clamp_every_position_as_a_hand_written_forward_does() -> TestResult {
    let c = case()?;
    let (probes, fused_probes) = (ProbeSet::new(), ProbeSet::new());
    let plain = plain(&c.w, &probes)?;
    let fused = Fused {
        fc1: c.w.linear(&c.w.w1, &c.w.b1, D, F)?,
        fused: fused_probes
            .add("h")?
            .feeding(c.w.linear(&c.w.w2, &c.w.b2, E, D)?)
            .then_relu(),
        probe_g: fused_probes.add("g")?,
        fc3: c.w.linear(&c.w.w3, &c.w.b3, C, E)?,
    };
    let g = c.w.second(&c.h);
    let mean_values: Vec<f32> = unit_means(&c.h, D)
        .into_iter()
        .chain(unit_means(&g, E))
        .map(|m| m as f32)
        .collect();
    let sets: Vec<Vec<usize>> = vec![
        vec![],
        vec![0],
        vec![7],
        vec![2, 3, 9],
        vec![1, 4, 5, 6, 8],
        (0..D + E).collect(),
    ];
    for (clamp, value) in [(Clamp::Zero, vec![0f32; D + E]), (Clamp::Mean, mean_values)] {
        let want: Vec<f64> = sets
            .iter()
            .map(|s| accuracy(&c.w.predictions(&c.h, s, &value), &c.data))
            .collect();
        assert_eq!(want[0], 0.8);
        assert!(want.iter().any(|&a| a < 0.7), "{want:?}");
        for batch in [7, N] {
            let got = Measurement::new(&plain, &probes, &c.data)
                .with_batch_size(batch)
                .ablation_accuracies(&sets, clamp)?;
            assert_eq!(got, want, "plain probe, {clamp:?}, batch {batch}");
        }
        // The cumulative curve along an explicit order, with the fused probe on its
        // incremental path and without it.
        let order = vec![4, 9, 0, 5, 7, 2, 10, 1, 3, 6, 8];
        let want_curve: Vec<f64> = (0..=D + E)
            .map(|k| accuracy(&c.w.predictions(&c.h, &order[..k], &value), &c.data))
            .collect();
        let spec = AblationSpec::default()
            .with_fractions(
                (0..=D + E)
                    .map(|k| k as f64 / (D + E) as f64)
                    .collect::<Vec<_>>(),
            )
            .with_clamp(clamp)
            .with_order(AblationOrder::Explicit(order.clone()));
        for (model_name, curve) in [
            (
                "plain",
                Measurement::new(&plain, &probes, &c.data).ablation_curve(&spec)?,
            ),
            (
                "fused, incremental",
                Measurement::new(&fused, &fused_probes, &c.data).ablation_curve(&spec)?,
            ),
            (
                "fused, not incremental",
                Measurement::new(&fused, &fused_probes, &c.data)
                    .with_incremental(false)
                    .ablation_curve(&spec)?,
            ),
        ] {
            assert_eq!(curve.accuracy, want_curve, "{model_name}, {clamp:?}");
            // In one expanded pass per chunk (no fall-back to a pass per variant), the fused
            // probe on its incremental path when allowed.
            assert!(curve.batched, "{model_name}, {clamp:?}");
            assert!(curve.shared_rows, "{model_name}, {clamp:?}");
            assert_eq!(
                curve.incremental,
                model_name == "fused, incremental",
                "{model_name}, {clamp:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn sequence_statistics_count_every_position_and_average_a_sample_over_them() -> TestResult {
    let c = case()?;
    let probes = ProbeSet::new();
    let plain = plain(&c.w, &probes)?;
    let stats = Measurement::new(&plain, &probes, &c.data)
        .with_batch_size(7)
        .statistics()?
        .clone();
    let got = &stats.probes[0].value;
    assert_eq!(got.positions, T);
    let means = unit_means(&c.h, D);
    let labels = c.data.label_values();
    for (d, &mean) in means.iter().enumerate() {
        assert!((got.mean[d] - mean).abs() < 1e-6, "mean of unit {d}");
        let var = (0..N * T)
            .map(|nt| (c.h[nt * D + d] as f64 - mean).powi(2))
            .sum::<f64>()
            / (N * T) as f64;
        assert!((got.std[d] - var.sqrt()).abs() < 1e-6, "std of unit {d}");
        for class in 0..C {
            // A sample's value is its mean over positions.
            let members: Vec<usize> = (0..N).filter(|&n| labels[n] as usize == class).collect();
            let want = members
                .iter()
                .map(|&n| (0..T).map(|t| c.h[(n * T + t) * D + d] as f64).sum::<f64>() / T as f64)
                .sum::<f64>()
                / members.len() as f64;
            assert!(
                (got.class_mean[class][d] - want).abs() < 1e-6,
                "class {class} mean of unit {d}: {} vs {want}",
                got.class_mean[class][d]
            );
        }
    }
    Ok(())
}

#[test]
fn sequence_noise_draws_one_value_per_token_and_unit() -> TestResult {
    // Each token is a row of its own for the counter-based generator: the noise of unit `d`
    // at position `t` of sample `n` in variant `v` is
    // `counter_normal(derive_seed(seed, probe), (v · N·T + n·T + t) · D + d)`, whatever the
    // chunking.
    let c = case()?;
    let probes = ProbeSet::new();
    let plain = plain(&c.w, &probes)?;
    let spec = candle_reliance::curves::NoiseSpec {
        scales: vec![0.25, 1.0, 4.0],
        draws: 2,
        seed: 11,
    };
    let stats = Measurement::new(&plain, &probes, &c.data)
        .statistics()?
        .clone();
    let (sigma, sigma_g) = (&stats.probes[0].value.std, &stats.probes[1].value.std);
    let seed = candle_reliance::rng::derive_seed(spec.seed, 0);
    let seed_g = candle_reliance::rng::derive_seed(spec.seed, 1);
    let mut want = vec![vec![0.0; spec.scales.len()]; spec.draws];
    for (r, row) in want.iter_mut().enumerate() {
        for (i, &scale) in spec.scales.iter().enumerate() {
            let v = (r * spec.scales.len() + i) as u64;
            let mut noised = c.h.clone();
            for (k, a) in noised.iter_mut().enumerate() {
                let (nt, d) = ((k / D) as u64, k % D);
                let z = candle_reliance::rng::counter_normal(
                    seed,
                    (v * (N * T) as u64 + nt) * D as u64 + d as u64,
                );
                let s = (scale * sigma[d]) as f32;
                *a = (*a as f64 + (s * z) as f64) as f32;
            }
            let g_noise = |nt: usize, e: usize| {
                let index = (v * (N * T) as u64 + nt as u64) * E as u64 + e as u64;
                (scale * sigma_g[e]) as f32 * candle_reliance::rng::counter_normal(seed_g, index)
            };
            row[i] = accuracy(
                &c.w.predictions_with(&noised, &[], &[0.0; D + E], &g_noise),
                &c.data,
            );
        }
    }
    assert!(want.iter().flatten().any(|&a| a < 0.7), "{want:?}");
    for batch in [7, N] {
        let got = Measurement::new(&plain, &probes, &c.data)
            .with_batch_size(batch)
            .noise_curve(&spec)?;
        assert_eq!(got.per_draw, want, "batch {batch}");
    }
    Ok(())
}
