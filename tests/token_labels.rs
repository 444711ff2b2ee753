//! Token-level labels `(N, T)` with padding: logits `(N, T, classes)`, accuracy and agreement
//! counted over the tokens that are not padding, statistics over the same tokens. Checked
//! against a forward written with plain loops over the same weights, for a plain probe and for
//! a probe fused with the `Linear` it feeds.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use candle_reliance::curves::AblationOrder;
use candle_reliance::monitor::PredictionChanges;
use candle_reliance::{
    AblationSpec, Clamp, Measurement, Probe, ProbeData, ProbeSet, ProbedLayer, RelianceConfig,
    RelianceMonitor,
};

type TestResult = anyhow::Result<()>;

const N: usize = 30;
const T: usize = 4;
const F: usize = 3;
const D: usize = 6;
const E: usize = 5;
const C: usize = 3;
const PAD: u32 = ProbeData::PADDING;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = candle_reliance::rng::SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
}

fn scaled(v: Vec<f32>, by: f32) -> Vec<f32> {
    v.into_iter().map(|x| x * by).collect()
}

/// Sample `n` has `T − n mod 3` real tokens; the rest are padding.
fn real(n: usize, t: usize) -> bool {
    t < T - n % 3
}

/// x (N, T, F) → relu(x·W1ᵀ + b1) (N, T, D) → probe → relu(·W2ᵀ + b2) (N, T, E) → probe →
/// token t's logits: (g_t + mean over the sequence of g)·W3ᵀ + b3 (N, T, C).
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

    /// The first probe's activations `h[n][t][d]` by hand.
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

    /// The second probe's activations `g[n][t][e]` with the units in `clamped` (global numbers:
    /// the first probe's `D`, then the second's `E`) set to `value[u]` at every position.
    fn second(&self, h: &[f32], clamped: &[usize], value: &[f32]) -> Vec<f32> {
        self.second_with(h, clamped, value, &|_, _| 0.0)
    }

    /// [`Weights::second`] with `g_noise(n·T + t, e)` added to the unclamped units.
    fn second_with(
        &self,
        h: &[f32],
        clamped: &[usize],
        value: &[f32],
        g_noise: &dyn Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut g = vec![0f32; N * T * E];
        for nt in 0..N * T {
            for e in 0..E {
                let mut z = self.b2[e] as f64;
                for d in 0..D {
                    let a = if clamped.contains(&d) {
                        value[d]
                    } else {
                        h[nt * D + d]
                    };
                    z += self.w2[e * D + d] as f64 * a as f64;
                }
                g[nt * E + e] = if clamped.contains(&(D + e)) {
                    value[D + e]
                } else {
                    ((z as f32).max(0.0) as f64 + g_noise(nt, e) as f64) as f32
                };
            }
        }
        g
    }

    /// The predicted class of every token, row-major `N × T`.
    fn predictions(&self, h: &[f32], clamped: &[usize], value: &[f32]) -> Vec<u32> {
        self.predictions_from(&self.second(h, clamped, value))
    }

    /// The predicted class of every token from the second probe's activations.
    fn predictions_from(&self, g: &[f32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(N * T);
        for n in 0..N {
            let mut mean = [0f64; E];
            for t in 0..T {
                for (e, m) in mean.iter_mut().enumerate() {
                    *m += g[(n * T + t) * E + e] as f64 / T as f64;
                }
            }
            for t in 0..T {
                let logits: Vec<f64> = (0..C)
                    .map(|c| {
                        self.b3[c] as f64
                            + (0..E)
                                .map(|e| {
                                    let v = g[(n * T + t) * E + e] as f64 + mean[e];
                                    self.w3[c * E + e] as f64 * v
                                })
                                .sum::<f64>()
                    })
                    .collect();
                let best = (0..C)
                    .max_by(|&a, &b| logits[a].partial_cmp(&logits[b]).unwrap())
                    .unwrap();
                out.push(best as u32);
            }
        }
        out
    }
}

/// Token logits from the second probe's output, as [`Weights::predictions`] computes them.
fn head(fc3: &Linear, g: &Tensor) -> candle_core::Result<Tensor> {
    fc3.forward(&g.broadcast_add(&g.mean_keepdim(1)?)?)
}

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
        head(&self.fc3, &g)
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
        head(&self.fc3, &g)
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

fn fused(w: &Weights, probes: &ProbeSet) -> candle_core::Result<Fused> {
    Ok(Fused {
        fc1: w.linear(&w.w1, &w.b1, D, F)?,
        fused: probes
            .add("h")?
            .feeding(w.linear(&w.w2, &w.b2, E, D)?)
            .then_relu(),
        probe_g: probes.add("g")?,
        fc3: w.linear(&w.w3, &w.b3, C, E)?,
    })
}

struct Case {
    w: Weights,
    x: Vec<f32>,
    h: Vec<f32>,
    /// The unablated network's prediction of every token.
    unablated: Vec<u32>,
    /// The labels with the padded positions still holding a class.
    raw: Vec<u32>,
    data: ProbeData,
}

fn case() -> candle_core::Result<Case> {
    let w = Weights::new();
    let x = values(N * T * F, 9);
    let h = w.hidden(&x);
    // Labels: the unablated network's own predictions, with every fifth real token changed.
    // Padded positions keep the network's prediction: counted, they would raise the accuracy.
    let unablated = w.predictions(&h, &[], &[0.0; D + E]);
    let raw: Vec<u32> = unablated
        .iter()
        .enumerate()
        .map(|(k, &p)| {
            if k % 5 == 0 && real(k / T, k % T) {
                (p + 1) % C as u32
            } else {
                p
            }
        })
        .collect();
    let mask: Vec<u8> = (0..N * T).map(|k| u8::from(real(k / T, k % T))).collect();
    let data = ProbeData::with_mask(
        Tensor::from_slice(&x, (N, T, F), &Device::Cpu)?,
        Tensor::from_slice(&raw, (N, T), &Device::Cpu)?,
        &Tensor::from_slice(&mask, (N, T), &Device::Cpu)?,
    )?;
    Ok(Case {
        w,
        x,
        h,
        unablated,
        raw,
        data,
    })
}

/// The cumulative curve along `order`, one point per unit added.
fn along(order: &[usize]) -> AblationSpec {
    AblationSpec::default()
        .with_fractions(
            (0..=D + E)
                .map(|k| k as f64 / (D + E) as f64)
                .collect::<Vec<_>>(),
        )
        .with_order(AblationOrder::Explicit(order.to_vec()))
}

/// `pred` with [`PAD`] at the padded positions: the predictions a statistics pass records.
fn padded(pred: &[u32]) -> Vec<u32> {
    (0..N * T)
        .map(|k| if real(k / T, k % T) { pred[k] } else { PAD })
        .collect()
}

/// The share of real tokens whose prediction equals `targets`.
fn share(pred: &[u32], targets: &[u32]) -> f64 {
    let real_tokens: Vec<usize> = (0..N * T).filter(|&k| real(k / T, k % T)).collect();
    real_tokens
        .iter()
        .filter(|&&k| pred[k] == targets[k])
        .count() as f64
        / real_tokens.len() as f64
}

/// Each unit's mean over the real tokens, by hand.
fn unit_means(a: &[f32], units: usize) -> Vec<f64> {
    let real_tokens: Vec<usize> = (0..N * T).filter(|&k| real(k / T, k % T)).collect();
    (0..units)
        .map(|u| {
            real_tokens
                .iter()
                .map(|&k| a[k * units + u] as f64)
                .sum::<f64>()
                / real_tokens.len() as f64
        })
        .collect()
}

#[test]
fn token_accuracy_and_agreement_count_real_tokens_as_a_hand_written_forward_does() -> TestResult {
    let c = case()?;
    // 120 positions, 30 of them padding.
    assert_eq!(
        (c.data.len(), c.data.tokens(), c.data.targets()),
        (N, T, 90)
    );
    assert!(c.data.token_level());
    let (probes, fused_probes) = (ProbeSet::new(), ProbeSet::new());
    let plain = plain(&c.w, &probes)?;
    let fused = fused(&c.w, &fused_probes)?;
    let g = c.w.second(&c.h, &[], &[0.0; D + E]);
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
            .map(|s| share(&c.w.predictions(&c.h, s, &value), &c.raw))
            .collect();
        // 18 of the 90 real tokens carry a changed label; the padded positions, which the
        // network predicts "right", are not counted.
        assert_eq!(want[0], 72.0 / 90.0);
        assert!(want.iter().any(|&a| a < 0.6), "{want:?}");
        for batch in [7, N] {
            let got = Measurement::new(&plain, &probes, &c.data)
                .with_batch_size(batch)
                .ablation_accuracies(&sets, clamp)?;
            assert_eq!(got, want, "plain probe, {clamp:?}, batch {batch}");
        }
        let order = vec![4, 9, 0, 5, 7, 2, 10, 1, 3, 6, 8];
        let preds: Vec<Vec<u32>> = (0..=D + E)
            .map(|k| c.w.predictions(&c.h, &order[..k], &value))
            .collect();
        let want_curve: Vec<f64> = preds.iter().map(|p| share(p, &c.raw)).collect();
        let want_agreement: Vec<f64> = preds.iter().map(|p| share(p, &c.unablated)).collect();
        assert!(
            want_agreement.iter().any(|&a| a < 0.6),
            "{want_agreement:?}"
        );
        let spec = along(&order).with_clamp(clamp);
        for (model_name, curve) in [
            (
                "plain",
                Measurement::new(&plain, &probes, &c.data).ablation_curve(&spec)?,
            ),
            (
                "plain, a forward per variant",
                Measurement::new(&plain, &probes, &c.data)
                    .with_batching(candle_reliance::measurement::Batching {
                        batched: false,
                        ..Default::default()
                    })
                    .ablation_curve(&spec)?,
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
            assert_eq!(curve.agreement, want_agreement, "{model_name}, {clamp:?}");
            assert_eq!(curve.unablated_accuracy, 0.8, "{model_name}");
            assert_eq!(
                curve.batched,
                model_name != "plain, a forward per variant",
                "{model_name}, {clamp:?}"
            );
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
fn token_statistics_leave_padding_out() -> TestResult {
    let c = case()?;
    let probes = ProbeSet::new();
    let plain = plain(&c.w, &probes)?;
    let g = c.w.second(&c.h, &[], &[0.0; D + E]);
    let labels = c.data.label_values();
    let check = |stats: &candle_reliance::measurement::UnitStatistics, how: &str| {
        assert_eq!(stats.accuracy, 0.8, "{how}");
        assert_eq!((stats.samples, stats.targets, stats.classes), (N, 90, C));
        // Tokens per class, padding left out.
        let counts: Vec<u64> = (0..C as u32)
            .map(|class| labels.iter().filter(|&&l| l == class).count() as u64)
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 90);
        assert_eq!(stats.class_counts, counts, "{how}");
        assert_eq!(stats.predictions, padded(&c.unablated), "{how}");
        for (p, (a, units)) in stats.probes.iter().zip([(&c.h, D), (&g, E)]) {
            let got = &p.value;
            assert_eq!(got.positions, T, "{how}");
            let means = unit_means(a, units);
            for (u, &mean) in means.iter().enumerate() {
                let real_tokens: Vec<usize> = (0..N * T).filter(|&k| real(k / T, k % T)).collect();
                let var = real_tokens
                    .iter()
                    .map(|&k| (a[k * units + u] as f64 - mean).powi(2))
                    .sum::<f64>()
                    / 90.0;
                assert!((got.mean[u] - mean).abs() < 1e-6, "{how}: mean of {u}");
                assert!((got.std[u] - var.sqrt()).abs() < 1e-6, "{how}: std of {u}");
                for class in 0..C {
                    // A token of the class is one value of the unit.
                    let members: Vec<usize> = real_tokens
                        .iter()
                        .copied()
                        .filter(|&k| labels[k] as usize == class)
                        .collect();
                    let want = members
                        .iter()
                        .map(|&k| a[k * units + u] as f64)
                        .sum::<f64>()
                        / members.len() as f64;
                    assert!(
                        (got.class_mean[class][u] - want).abs() < 1e-6,
                        "{how}: class {class} mean of unit {u}: {} vs {want}",
                        got.class_mean[class][u]
                    );
                }
            }
        }
    };
    for batch in [7, N] {
        let m = Measurement::new(&plain, &probes, &c.data).with_batch_size(batch);
        check(m.statistics()?, &format!("statistics pass, batch {batch}"));
    }
    // A zero-clamp curve measured first gives the statistics from its unclamped rows.
    let m = Measurement::new(&plain, &probes, &c.data).with_max_batch_rows(50);
    m.ablation_curve(&AblationSpec::default())?;
    check(m.statistics()?, "folded into a curve");
    Ok(())
}

#[test]
fn token_labels_refuse_what_they_cannot_count() -> TestResult {
    let c = case()?;
    let dev = Device::Cpu;
    let xs = Tensor::from_slice(&c.x, (N, T, F), &dev)?;
    let labels = Tensor::from_slice(&c.raw, (N, T), &dev)?;
    let err = |r: candle_reliance::Result<ProbeData>| r.unwrap_err().to_string();
    // A mask of another shape; every label padding; a NaN mask.
    let e = err(ProbeData::with_mask(
        xs.clone(),
        labels.clone(),
        &Tensor::ones((N, T + 1), DType::U8, &dev)?,
    ));
    assert!(e.contains("mask has shape [30, 5]"), "{e}");
    let e = err(ProbeData::with_mask(
        xs.clone(),
        labels.clone(),
        &Tensor::zeros((N, T), DType::F32, &dev)?,
    ));
    assert!(e.contains("every label is padding"), "{e}");
    let nan = Tensor::full(f32::NAN, (N, T), &dev)?;
    let e = err(ProbeData::with_mask(xs.clone(), labels.clone(), &nan));
    assert!(e.contains("NaN"), "{e}");
    let e = err(ProbeData::new(
        xs.clone(),
        Tensor::zeros((N, 0), DType::U32, &dev)?,
    ));
    assert!(e.contains("(N, T) with T ≥ 1"), "{e}");
    // A subset drawn only from fully padded samples cannot be measured.
    let mut one_real = vec![PAD; N * T];
    one_real[0] = 1;
    let sparse = ProbeData::new(xs.clone(), Tensor::from_slice(&one_real, (N, T), &dev)?)?;
    assert_eq!(sparse.targets(), 1);
    let picked = (1..100).find_map(|seed| {
        let s = sparse.subset(3, seed);
        s.is_err().then_some(s)
    });
    let e = picked
        .expect("some 3-sample subset misses sample 0")
        .unwrap_err();
    assert!(
        e.to_string().contains("every label of the 3-sample subset"),
        "{e}"
    );

    // A model that returns a class per sequence, or the wrong number of tokens.
    let probes = ProbeSet::new();
    let net = plain(&c.w, &probes)?;
    let pooled = |xs: &Tensor| net.forward(xs)?.mean(1);
    let e = Measurement::new(&pooled, &probes, &c.data)
        .statistics()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("token labels (N, 4)") && e.contains("(N, 4, classes), got [1, 3]"),
        "{e}"
    );
    let short = |xs: &Tensor| net.forward(xs)?.narrow(1, 0, 3);
    let e = Measurement::new(&short, &probes, &c.data)
        .statistics()
        .unwrap_err()
        .to_string();
    assert!(e.contains("got [1, 3, 3]"), "{e}");
    // A probe after pooling has no token to give a label to.
    let (p2, pooled_probe) = (ProbeSet::new(), ProbeSet::new());
    let inner = plain(&c.w, &p2)?;
    let after = pooled_probe.add("pooled")?;
    let model = |xs: &Tensor| {
        let logits = inner.forward(xs)?;
        after.forward(&logits.mean(1)?)?;
        Ok(logits)
    };
    let e = Measurement::new(&model, &pooled_probe, &c.data)
        .statistics()
        .unwrap_err()
        .to_string();
    assert!(e.contains("every probe must see (N, T, units)"), "{e}");
    // A real label beyond the logits; padding is never out of range.
    let mut big = c.raw.clone();
    big[1] = 7;
    let data = ProbeData::new(xs.clone(), Tensor::from_slice(&big, (N, T), &dev)?)?;
    let e = Measurement::new(&net, &probes, &data)
        .statistics()
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 7 is out of range"), "{e}");
    // Mutual information needs a label per sample.
    let e = Measurement::new(&net, &probes, &c.data)
        .activity()
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a label per sample"), "{e}");
    Ok(())
}

/// Logits `(rows, T, C)` whose arg-max is `classes`.
fn one_hot(classes: &[u32], rows: usize) -> candle_core::Result<Tensor> {
    let mut v = vec![0f32; rows * T * C];
    for (k, &c) in classes.iter().enumerate() {
        v[k * C + c as usize] = 1.0;
    }
    Tensor::from_vec(v, (rows, T, C), &Device::Cpu)
}

#[test]
fn training_changes_count_tokens_and_leave_masked_ones_out() -> TestResult {
    // Four training sequences; sequence 1 has two padded positions in every batch.
    let mask = Tensor::new(&[[1u8, 1, 1, 1], [1, 1, 0, 0]], &Device::Cpu)?;
    let epoch1 = [[0u32, 1, 2, 0], [1, 1, 1, 1], [2, 2, 2, 2], [0, 0, 0, 0]];
    let epoch2 = [[0u32, 2, 2, 0], [1, 0, 2, 2], [2, 2, 1, 1], [0, 0, 0, 0]];
    // Row 0 of the first batch is sequence 2, row 1 sequence 1 (masked), then sequences 0 and
    // 3. Changed tokens: sequence 2 position 1; sequence 1 position 1 (its positions 2 and 3
    // change too, but are masked); sequence 0 positions 2 and 3; sequence 3 none: 4.
    let mut counter = PredictionChanges::with_tokens(4, T);
    let mut counts = vec![];
    for epoch in [epoch1, epoch2] {
        let flat: Vec<u32> = epoch.iter().flatten().copied().collect();
        counter.record_masked(&[2, 1], &one_hot(&flat[..2 * T], 2)?, Some(&mask))?;
        counter.record(&[0, 3], &one_hot(&flat[2 * T..], 2)?)?;
        counts.push(counter.end_epoch()?);
    }
    assert_eq!(counts, [None, Some(4)]);
    // Logits of another token count, a mask of another shape, a class per sequence.
    let bad = Tensor::zeros((2, T + 1, C), DType::F32, &Device::Cpu)?;
    assert!(counter.record(&[0, 1], &bad).is_err());
    let e = counter
        .record_masked(
            &[0, 1],
            &one_hot(&[0; 2 * T], 2)?,
            Some(&mask.narrow(1, 0, 2)?),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("mask has shape [2, 2]"), "{e}");
    let per_sequence = Tensor::zeros((2, C), DType::F32, &Device::Cpu)?;
    let e = counter
        .record(&[0, 1], &per_sequence)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(batch, 4, classes)"), "{e}");
    Ok(())
}

#[test]
fn the_monitor_checks_a_token_model_and_counts_its_training_changes() -> TestResult {
    let c = case()?;
    let dir = tempfile::tempdir()?;
    let cfg = RelianceConfig::from_yaml_str(&format!(
        "schedule: {{check_every: 1, warmup_epochs: 1}}\n\
         ablation: {{fractions: 5, orders: 2, seed: 5}}\n\
         output: {{history_file: {h}, state_file: {s}}}\n",
        h = dir.path().join("hist.jsonl").display(),
        s = dir.path().join("state.json").display(),
    ))?;
    let probes = ProbeSet::new();
    let net = plain(&c.w, &probes)?;
    let varmap = candle_nn::VarMap::new();
    let mut monitor = RelianceMonitor::new(cfg, probes.clone(), c.data.clone())?;
    // Training predictions: the network's own, then every real token of sequence 0 moved.
    let all: Vec<u32> = (0..N as u32).collect();
    let mask: Vec<u8> = (0..N * T).map(|k| u8::from(real(k / T, k % T))).collect();
    let mask = Tensor::from_slice(&mask, (N, T), &Device::Cpu)?;
    let mut moved = c.unablated.clone();
    for p in &mut moved[..T] {
        *p = (*p + 1) % C as u32;
    }
    // Padded positions moved too: masked, they do not count.
    for (k, p) in moved.iter_mut().enumerate() {
        if !real(k / T, k % T) {
            *p = (*p + 2) % C as u32;
        }
    }
    for (epoch, preds) in [(1, &c.unablated), (2, &moved)] {
        monitor.observe_masked(&all, &one_hot(preds, N)?, Some(&mask))?;
        monitor.on_epoch_end(epoch, &net, &varmap)?;
    }
    let h = monitor.history();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].unablated_accuracy, 0.8);
    assert_eq!(h[0].curve.agreement[0], 1.0);
    assert_eq!(
        (h[0].training_changes, h[1].training_changes),
        (None, Some(T))
    );
    // The state holds a prediction per training token, and a resume reads it back.
    drop(monitor);
    let state = RelianceMonitor::load_state(dir.path().join("state.json"))?;
    let cfg = RelianceConfig::from_yaml_str(&format!(
        "schedule: {{check_every: 1, warmup_epochs: 1}}\n\
         ablation: {{fractions: 5, orders: 2, seed: 5}}\n\
         output: {{history_file: {h}, state_file: {s}}}\n",
        h = dir.path().join("hist.jsonl").display(),
        s = dir.path().join("state.json").display(),
    ))?;
    // A tampered state: a prediction per training sequence instead of per token, or a probe
    // prediction missing.
    let mut short = state.clone();
    short.training_predictions = short.training_predictions.map(|p| p[..N].to_vec());
    let e = RelianceMonitor::resume(cfg.clone(), probes.clone(), c.data.clone(), short)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds 30 training predictions") && e.contains("30 × 4 tokens = 120"),
        "{e}"
    );
    let mut short = state.clone();
    short.predictions = short.predictions.map(|p| p[1..].to_vec());
    let e = RelianceMonitor::resume(cfg.clone(), probes.clone(), c.data.clone(), short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("predictions for 119 probe labels"), "{e}");
    let mut resumed = RelianceMonitor::resume(cfg, probes, c.data.clone(), state)?;
    resumed.observe_masked(&all, &one_hot(&c.unablated, N)?, Some(&mask))?;
    resumed.on_epoch_end(3, &net, &varmap)?;
    assert_eq!(resumed.history().last().unwrap().training_changes, Some(T));
    Ok(())
}

#[test]
fn token_curves_on_thread_ranks_count_every_real_token_once() -> TestResult {
    use candle_reliance::collective::ThreadGroup;
    let c = case()?;
    let order = vec![4, 9, 0, 5, 7, 2, 10, 1, 3, 6, 8];
    let zero = [0f32; D + E];
    let preds: Vec<Vec<u32>> = (0..=D + E)
        .map(|k| c.w.predictions(&c.h, &order[..k], &zero))
        .collect();
    let want_curve: Vec<f64> = preds.iter().map(|p| share(p, &c.raw)).collect();
    let want_agreement: Vec<f64> = preds.iter().map(|p| share(p, &c.unablated)).collect();
    let spec = along(&order);
    for world in [2, 3] {
        let group = ThreadGroup::new(world)?;
        let replicas = (0..world)
            .map(|_| {
                let probes = ProbeSet::new();
                let model = fused(&c.w, &probes)?;
                Ok((probes, model))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let got = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .zip(&replicas)
                .map(|(rank, (probes, model))| {
                    let data = &c.data;
                    let spec = &spec;
                    s.spawn(move || -> candle_reliance::Result<_> {
                        let m = Measurement::new(model, probes, data)
                            .with_collective(rank)
                            .with_batch_size(7);
                        Ok((m.ablation_curve(spec)?, m.statistics()?.clone()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<candle_reliance::Result<Vec<_>>>()
        })?;
        for (rank, (curve, stats)) in got.iter().enumerate() {
            assert_eq!(curve.accuracy, want_curve, "world {world}, rank {rank}");
            assert_eq!(
                curve.agreement, want_agreement,
                "world {world}, rank {rank}"
            );
            assert_eq!((stats.accuracy, stats.targets), (0.8, 90));
            let want = padded(&c.unablated);
            assert_eq!(stats.predictions, want, "world {world}, rank {rank}");
        }
    }
    Ok(())
}

#[test]
fn token_noise_curves_count_real_tokens() -> TestResult {
    // The noise of unit `d` at position `t` of sample `n` in variant `v` is
    // `counter_normal(derive_seed(seed, probe), (v · N·T + n·T + t) · D + d)` (as for sequence
    // activations with labels per sample); the accuracy counts the 90 real tokens.
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
            let g = c.w.second_with(&noised, &[], &[0.0; D + E], &g_noise);
            row[i] = share(&c.w.predictions_from(&g), &c.raw);
        }
    }
    assert!(want.iter().flatten().any(|&a| a < 0.6), "{want:?}");
    for batch in [7, N] {
        let got = Measurement::new(&plain, &probes, &c.data)
            .with_batch_size(batch)
            .noise_curve(&spec)?;
        assert_eq!(got.per_draw, want, "batch {batch}");
        assert_eq!(got.unablated_accuracy, 0.8);
    }
    Ok(())
}
