//! A small convolutional ResNet: a probe inside a residual block's branch (whose skip bypasses
//! it) and a probe on the block's output (which the next block's skip carries, as in
//! `examples/resnet.rs`). Its ablation curves against a forward written with plain loops: with
//! `Probe::residual` one batched pass, with a plain add a pass per variant, fused with the
//! branch's second convolution the incremental path; the same accuracies every way.
//!
//! Inputs and convolution weights are small integers, so every feature map is exact in `f32`
//! and both computations feed the head the same values.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear};
use candle_reliance::curves::AblationOrder;
use candle_reliance::{AblationSpec, Clamp, Measurement, Probe, ProbeData, ProbeSet, ProbedLayer};

type TestResult = anyhow::Result<()>;

/// Samples, channels, image side, classes.
const N: usize = 48;
const C: usize = 2;
const S: usize = 4;
const K: usize = 3;

/// `n` integers in `[-by, by]`.
fn ints(n: usize, seed: u64, by: i32) -> Vec<f32> {
    let mut rng = candle_reliance::rng::SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.below((2 * by + 1) as usize) as i32 - by) as f32)
        .collect()
}

/// A 3 × 3 convolution (padding 1) of `inputs` channels into [`C`].
struct Conv {
    w: Vec<f32>,
    b: Vec<f32>,
    inputs: usize,
}

impl Conv {
    fn new(inputs: usize, seed: u64) -> Self {
        Self {
            w: ints(C * inputs * 9, seed, 2),
            b: ints(C, seed + 1, 1),
            inputs,
        }
    }

    fn candle(&self) -> candle_core::Result<Conv2d> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Conv2d::new(
            Tensor::from_slice(&self.w, (C, self.inputs, 3, 3), &Device::Cpu)?,
            Some(Tensor::from_slice(&self.b, C, &Device::Cpu)?),
            cfg,
        ))
    }

    /// One sample's `(inputs, S, S)` map in, `(C, S, S)` out, by the definition.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; C * S * S];
        for o in 0..C {
            for y in 0..S {
                for x0 in 0..S {
                    let mut z = self.b[o];
                    for i in 0..self.inputs {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (yy, xx) = (y + ky, x0 + kx);
                                if yy < 1 || xx < 1 || yy > S || xx > S {
                                    continue;
                                }
                                let w = self.w[((o * self.inputs + i) * 3 + ky) * 3 + kx];
                                z += w * x[(i * S + yy - 1) * S + xx - 1];
                            }
                        }
                    }
                    out[(o * S + y) * S + x0] = z;
                }
            }
        }
        out
    }
}

fn relu(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|a| a.max(0.0)).collect()
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Channel `u` of a `(C, S, S)` map set to `value`.
fn clamp(map: &mut [f32], u: usize, value: f32) {
    map[u * S * S..(u + 1) * S * S].fill(value);
}

/// stem → block 1 (branch: conv a → ReLU → probe "in" → conv b; skip: identity) → ReLU → probe
/// "out" → block 2 (conv c → ReLU → conv d, identity skip) → ReLU → mean over positions → head.
struct Weights {
    stem: Conv,
    a: Conv,
    b: Conv,
    c: Conv,
    d: Conv,
    head_w: Vec<f32>,
    head_b: Vec<f32>,
}

impl Weights {
    fn new() -> Self {
        Self {
            stem: Conv::new(1, 1),
            a: Conv::new(C, 11),
            b: Conv::new(C, 21),
            c: Conv::new(C, 31),
            d: Conv::new(C, 41),
            head_w: (0..K * C)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
                .collect(),
            head_b: vec![0.25, -0.5, 0.125],
        }
    }

    fn head(&self) -> candle_core::Result<Linear> {
        Ok(Linear::new(
            Tensor::from_slice(&self.head_w, (K, C), &Device::Cpu)?,
            Some(Tensor::from_slice(&self.head_b, K, &Device::Cpu)?),
        ))
    }

    /// Per sample the probed maps' channel sums (unclamped; "in" then "out") and the prediction
    /// with the global units in `clamped` (0..C at "in", C..2C at "out") set to `value[u]`.
    fn run(&self, x: &[f32], clamped: &[usize], value: &[f32]) -> (Vec<Vec<f64>>, Vec<usize>) {
        let (mut sums, mut preds) = (vec![], vec![]);
        for s in 0..N {
            let h0 = relu(self.stem.apply(&x[s * S * S..(s + 1) * S * S]));
            let mut a = relu(self.a.apply(&h0));
            let raw_in = a.clone();
            for u in (0..C).filter(|u| clamped.contains(u)) {
                clamp(&mut a, u, value[u]);
            }
            let mut h1 = relu(add(&h0, &self.b.apply(&a)));
            let raw_out = h1.clone();
            for u in (0..C).filter(|u| clamped.contains(&(C + u))) {
                clamp(&mut h1, u, value[C + u]);
            }
            let h2 = relu(add(&h1, &self.d.apply(&relu(self.c.apply(&h1)))));
            // Sums of 16 exact values, divided by 16: exact, as candle's mean.
            let pooled: Vec<f32> = (0..C)
                .map(|u| h2[u * S * S..(u + 1) * S * S].iter().sum::<f32>() / (S * S) as f32)
                .collect();
            let logits: Vec<f32> = (0..K)
                .map(|k| {
                    let z = self.head_b[k] as f64
                        + (0..C)
                            .map(|u| self.head_w[k * C + u] as f64 * pooled[u] as f64)
                            .sum::<f64>();
                    z as f32
                })
                .collect();
            preds.push(
                (0..K)
                    .max_by(|&a, &b| logits[a].partial_cmp(&logits[b]).unwrap())
                    .unwrap(),
            );
            let channel_sums = |m: &[f32]| -> Vec<f64> {
                (0..C)
                    .map(|u| {
                        m[u * S * S..(u + 1) * S * S]
                            .iter()
                            .map(|&v| v as f64)
                            .sum()
                    })
                    .collect()
            };
            sums.push([channel_sums(&raw_in), channel_sums(&raw_out)].concat());
        }
        (sums, preds)
    }
}

/// The network with plain probes; `residual` chooses `Probe::residual` or a plain add for the
/// skip around the probed branch.
struct Net {
    stem: Conv2d,
    a: Conv2d,
    b: Conv2d,
    c: Conv2d,
    d: Conv2d,
    head: Linear,
    inner: Probe,
    outer: Probe,
    residual: bool,
}

impl Net {
    fn new(w: &Weights, probes: &ProbeSet, residual: bool) -> candle_core::Result<Self> {
        Ok(Self {
            stem: w.stem.candle()?,
            a: w.a.candle()?,
            b: w.b.candle()?,
            c: w.c.candle()?,
            d: w.d.candle()?,
            head: w.head()?,
            inner: probes.add("in")?,
            outer: probes.add("out")?,
            residual,
        })
    }
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h0 = self
            .stem
            .forward(&xs.reshape((xs.dim(0)?, 1, S, S))?)?
            .relu()?;
        let branch = self
            .b
            .forward(&self.inner.forward(&self.a.forward(&h0)?.relu()?)?)?;
        let h1 = match self.residual {
            true => self.inner.residual(&h0, &branch)?,
            false => (&h0 + &branch)?,
        };
        let h1 = self.outer.forward(&h1.relu()?)?;
        // The probe's output is both the branch's input and the skip: no helper needed.
        let h2 = (&h1 + self.d.forward(&self.c.forward(&h1)?.relu()?)?)?.relu()?;
        self.head.forward(&h2.mean((2, 3))?)
    }
}

/// The same network with probe "in" fused with conv b.
struct FusedNet {
    stem: Conv2d,
    a: Conv2d,
    b: ProbedLayer,
    c: Conv2d,
    d: Conv2d,
    head: Linear,
    outer: Probe,
}

impl Module for FusedNet {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h0 = self
            .stem
            .forward(&xs.reshape((xs.dim(0)?, 1, S, S))?)?
            .relu()?;
        let branch = self.b.forward(&self.a.forward(&h0)?.relu()?)?;
        let h1 = self
            .outer
            .forward(&self.b.residual(&h0, &branch)?.relu()?)?;
        let h2 = (&h1 + self.d.forward(&self.c.forward(&h1)?.relu()?)?)?.relu()?;
        self.head.forward(&h2.mean((2, 3))?)
    }
}

#[test]
fn a_conv_resnet_with_a_probe_in_a_branch_is_checked_as_loops_compute_it() -> TestResult {
    let w = Weights::new();
    let x = ints(N * S * S, 99, 3);
    let (sums, unablated) = w.run(&x, &[], &[0.0; 2 * C]);
    // Labels: the network's own predictions, every fourth changed (accuracy 0.75).
    let labels: Vec<u32> = unablated
        .iter()
        .enumerate()
        .map(|(s, &p)| if s % 4 == 0 { (p + 1) % K } else { p } as u32)
        .collect();
    let data = ProbeData::new(
        Tensor::from_slice(&x, (N, S * S), &Device::Cpu)?,
        Tensor::new(labels.clone(), &Device::Cpu)?,
    )?;
    // A feature map's mean clamp value: its mean over samples and positions.
    let means: Vec<f32> = (0..2 * C)
        .map(|u| (sums.iter().map(|s| s[u]).sum::<f64>() / (N * S * S) as f64) as f32)
        .collect();
    let accuracy = |preds: &[usize]| {
        preds
            .iter()
            .zip(&labels)
            .filter(|(p, l)| **p == **l as usize)
            .count() as f64
            / N as f64
    };
    let mut dropped = false;
    for order in [vec![0, 3, 1, 2], vec![2, 1, 3, 0]] {
        for (clamp, value) in [
            (Clamp::Zero, vec![0f32; 2 * C]),
            (Clamp::Mean, means.clone()),
        ] {
            let want: Vec<f64> = (0..=2 * C)
                .map(|k| accuracy(&w.run(&x, &order[..k], &value).1))
                .collect();
            assert_eq!(want[0], 0.75);
            dropped |= want.iter().any(|&a| a < 0.6);
            let spec = AblationSpec::default()
                .with_fractions(
                    (0..=2 * C)
                        .map(|k| k as f64 / (2 * C) as f64)
                        .collect::<Vec<_>>(),
                )
                .with_clamp(clamp)
                .with_order(AblationOrder::Explicit(order.clone()));
            for residual in [true, false] {
                let probes = ProbeSet::new();
                let net = Net::new(&w, &probes, residual)?;
                let curve = Measurement::new(&net, &probes, &data).ablation_curve(&spec)?;
                let case = format!("order {order:?}, {clamp:?}, residual {residual}");
                assert_eq!(curve.accuracy, want, "{case}");
                // With the helper one batched pass; a plain add of the unexpanded skip to the
                // expanded branch cannot broadcast, and the check runs a pass per variant.
                assert_eq!(curve.batched, residual, "{case}");
            }
            let probes = ProbeSet::new();
            let fused = FusedNet {
                stem: w.stem.candle()?,
                a: w.a.candle()?,
                b: probes.add("in")?.feeding(w.b.candle()?),
                c: w.c.candle()?,
                d: w.d.candle()?,
                head: w.head()?,
                outer: probes.add("out")?,
            };
            let curve = Measurement::new(&fused, &probes, &data).ablation_curve(&spec)?;
            assert_eq!(curve.accuracy, want, "fused, order {order:?}, {clamp:?}");
            assert!(curve.batched && curve.incremental, "{clamp:?}");
        }
    }
    // The check is not trivial: some ablation costs more than 15 points.
    assert!(dropped);
    Ok(())
}
