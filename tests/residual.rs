//! Residual networks: probes inside branches that skip connections bypass. With
//! `Probe::residual` the check stays one batched pass (rows shared between variants included);
//! with a plain add it falls back to a pass per variant. Both give the curve a forward written
//! with plain loops gives.

use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use candle_reliance::curves::AblationOrder;
use candle_reliance::{AblationSpec, Clamp, Measurement, Probe, ProbeData, ProbeSet, ProbedLayer};

type TestResult = anyhow::Result<()>;

const N: usize = 40;
const F: usize = 3;
const D: usize = 5;
const C: usize = 3;

fn values(n: usize, seed: u64, by: f32) -> Vec<f32> {
    let mut rng = candle_reliance::rng::SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * by)
        .collect()
}

/// `(weight (out × in), bias)` of the five layers: x → h0 = relu(L0 x); h1 = h0 + L2 relu(L1 h0);
/// h2 = h1 + L4 relu(L3 h1); logits = L5 h2. The probes see relu(L1 h0) and relu(L3 h1).
struct Weights {
    layers: Vec<(Vec<f32>, Vec<f32>, usize, usize)>,
}

impl Weights {
    fn new() -> Self {
        let shapes = [(D, F), (D, D), (D, D), (D, D), (D, D), (C, D)];
        let layers = shapes
            .iter()
            .enumerate()
            .map(|(i, &(o, n))| {
                let s = 10 * i as u64;
                (values(o * n, s + 1, 1.5), values(o, s + 2, 0.3), o, n)
            })
            .collect();
        Self { layers }
    }

    fn linear(&self, i: usize) -> candle_core::Result<Linear> {
        let (w, b, o, n) = &self.layers[i];
        Ok(Linear::new(
            Tensor::from_slice(w, (*o, *n), &Device::Cpu)?,
            Some(Tensor::from_slice(b, *o, &Device::Cpu)?),
        ))
    }

    /// `L_i v` by hand, in f64 rounded to f32 per output, as a dot product.
    fn apply(&self, i: usize, v: &[f32]) -> Vec<f32> {
        let (w, b, o, n) = &self.layers[i];
        (0..*o)
            .map(|r| {
                let mut z = b[r] as f64;
                for c in 0..*n {
                    z += w[r * n + c] as f64 * v[c] as f64;
                }
                z as f32
            })
            .collect()
    }

    /// Per sample, the two probed activations (unclamped) and the prediction with the units in
    /// `clamped` (global: the first probe's `D`, then the second's) set to `value[u]`.
    fn run(&self, x: &[f32], clamped: &[usize], value: &[f32]) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut acts = vec![];
        let mut preds = vec![];
        for s in 0..N {
            let relu = |v: Vec<f32>| v.into_iter().map(|a| a.max(0.0)).collect::<Vec<_>>();
            let h0 = relu(self.apply(0, &x[s * F..(s + 1) * F]));
            let mut a1 = relu(self.apply(1, &h0));
            let raw1 = a1.clone();
            for (u, a) in a1.iter_mut().enumerate() {
                if clamped.contains(&u) {
                    *a = value[u];
                }
            }
            let h1: Vec<f32> = h0
                .iter()
                .zip(self.apply(2, &a1))
                .map(|(a, b)| a + b)
                .collect();
            let mut a2 = relu(self.apply(3, &h1));
            let raw2 = a2.clone();
            for (u, a) in a2.iter_mut().enumerate() {
                if clamped.contains(&(D + u)) {
                    *a = value[D + u];
                }
            }
            let h2: Vec<f32> = h1
                .iter()
                .zip(self.apply(4, &a2))
                .map(|(a, b)| a + b)
                .collect();
            let logits = self.apply(5, &h2);
            preds.push(
                (0..C)
                    .max_by(|&a, &b| logits[a].partial_cmp(&logits[b]).unwrap())
                    .unwrap(),
            );
            acts.push(raw1.into_iter().chain(raw2).collect());
        }
        (acts, preds)
    }
}

/// The network with plain probes; `residual` chooses `Probe::residual` or a plain add.
struct Net {
    l: Vec<Linear>,
    p1: Probe,
    p2: Probe,
    residual: bool,
}

impl Net {
    /// The network over `w`'s layers with two probes added to `probes`.
    fn new(w: &Weights, probes: &ProbeSet, residual: bool) -> candle_core::Result<Self> {
        Ok(Net {
            l: (0..6)
                .map(|i| w.linear(i))
                .collect::<candle_core::Result<_>>()?,
            p1: probes.add("block1")?,
            p2: probes.add("block2")?,
            residual,
        })
    }

    fn join(&self, p: &Probe, skip: &Tensor, branch: &Tensor) -> candle_core::Result<Tensor> {
        match self.residual {
            true => p.residual(skip, branch),
            false => skip + branch,
        }
    }
}

impl Module for Net {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h0 = self.l[0].forward(xs)?.relu()?;
        let a1 = self.p1.forward(&self.l[1].forward(&h0)?.relu()?)?;
        let h1 = self.join(&self.p1, &h0, &self.l[2].forward(&a1)?)?;
        let a2 = self.p2.forward(&self.l[3].forward(&h1)?.relu()?)?;
        let h2 = self.join(&self.p2, &h1, &self.l[4].forward(&a2)?)?;
        self.l[5].forward(&h2)
    }
}

/// The same network with both probes fused with the layer each feeds.
struct FusedNet {
    l0: Linear,
    l1: Linear,
    f2: ProbedLayer,
    l3: Linear,
    f4: ProbedLayer,
    l5: Linear,
}

impl Module for FusedNet {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h0 = self.l0.forward(xs)?.relu()?;
        let b1 = self.f2.forward(&self.l1.forward(&h0)?.relu()?)?;
        let h1 = self.f2.residual(&h0, &b1)?;
        let b2 = self.f4.forward(&self.l3.forward(&h1)?.relu()?)?;
        let h2 = self.f4.residual(&h1, &b2)?;
        self.l5.forward(&h2)
    }
}

#[test]
fn residual_branches_are_checked_in_one_batched_pass_as_loops_compute_them() -> TestResult {
    let w = Weights::new();
    let x = values(N * F, 99, 1.0);
    let (acts, unablated) = w.run(&x, &[], &[0.0; 2 * D]);
    // Labels: the network's own predictions, every fourth changed (accuracy 0.75).
    let labels: Vec<u32> = unablated
        .iter()
        .enumerate()
        .map(|(s, &p)| {
            if s % 4 == 0 {
                ((p + 1) % C) as u32
            } else {
                p as u32
            }
        })
        .collect();
    let data = ProbeData::new(
        Tensor::from_slice(&x, (N, F), &Device::Cpu)?,
        Tensor::new(labels.clone(), &Device::Cpu)?,
    )?;
    let means: Vec<f32> = (0..2 * D)
        .map(|u| (acts.iter().map(|a| a[u] as f64).sum::<f64>() / N as f64) as f32)
        .collect();
    let order = vec![3, 7, 0, 9, 5, 1, 8, 2, 6, 4];
    let accuracy = |preds: &[usize]| {
        preds
            .iter()
            .zip(&labels)
            .filter(|(p, l)| **p == **l as usize)
            .count() as f64
            / N as f64
    };
    for (clamp, value) in [(Clamp::Zero, vec![0f32; 2 * D]), (Clamp::Mean, means)] {
        let want: Vec<f64> = (0..=2 * D)
            .map(|k| accuracy(&w.run(&x, &order[..k], &value).1))
            .collect();
        assert_eq!(want[0], 0.75);
        assert!(want.iter().any(|&a| a < 0.6), "{want:?}");
        let spec = AblationSpec::default()
            .with_fractions(
                (0..=2 * D)
                    .map(|k| k as f64 / (2 * D) as f64)
                    .collect::<Vec<_>>(),
            )
            .with_clamp(clamp)
            .with_order(AblationOrder::Explicit(order.clone()));
        for residual in [true, false] {
            let probes = ProbeSet::new();
            let net = Net::new(&w, &probes, residual)?;
            let curve = Measurement::new(&net, &probes, &data).ablation_curve(&spec)?;
            assert_eq!(curve.accuracy, want, "residual {residual}, {clamp:?}");
            // With the helper: one batched pass, rows shared; without: a pass per variant.
            assert_eq!(curve.batched, residual, "{clamp:?}");
            assert_eq!(curve.shared_rows, residual, "{clamp:?}");
            let unshared = Measurement::new(&net, &probes, &data)
                .with_shared_rows(false)
                .ablation_curve(&spec)?;
            assert_eq!(unshared.accuracy, want);
            assert_eq!(unshared.batched, residual);
        }
        let probes = ProbeSet::new();
        let fused = FusedNet {
            l0: w.linear(0)?,
            l1: w.linear(1)?,
            f2: probes.add("block1")?.feeding(w.linear(2)?),
            l3: w.linear(3)?,
            f4: probes.add("block2")?.feeding(w.linear(4)?),
            l5: w.linear(5)?,
        };
        let curve = Measurement::new(&fused, &probes, &data).ablation_curve(&spec)?;
        assert_eq!(curve.accuracy, want, "fused, {clamp:?}");
        assert!(
            curve.batched && curve.incremental && curve.shared_rows,
            "{clamp:?}"
        );
    }
    Ok(())
}

#[test]
fn residual_is_the_add_outside_a_measurement_and_in_a_statistics_pass() -> TestResult {
    let w = Weights::new();
    let x = values(N * F, 99, 1.0);
    let xs = Tensor::from_slice(&x, (N, F), &Device::Cpu)?;
    let (probes, plain_probes) = (ProbeSet::new(), ProbeSet::new());
    let (net, plain) = (
        Net::new(&w, &probes, true)?,
        Net::new(&w, &plain_probes, false)?,
    );
    let (a, b) = (net.forward(&xs)?, plain.forward(&xs)?);
    assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    // A statistics pass does not expand the batch: the same moments as with the plain add.
    let data = ProbeData::new(xs, a.argmax(1)?)?;
    let stats = Measurement::new(&net, &probes, &data).statistics()?.clone();
    let plain_stats = Measurement::new(&plain, &plain_probes, &data)
        .statistics()?
        .clone();
    assert_eq!(stats.probes, plain_stats.probes);
    assert_eq!(stats.accuracy, 1.0);
    Ok(())
}
