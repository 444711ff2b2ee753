//! A model with batch norm and dropout (a `ModuleT`) is measured as it is, in evaluation mode:
//! its curves equal those of a hand-written evaluation forward over the same weights.

use candle_core::{Device, Module, ModuleT, Tensor};
use candle_nn::{BatchNorm, Dropout, Linear};
use candle_reliance::curves::AblationOrder;
use candle_reliance::{
    AblationSpec, Clamp, Measurement, Probe, ProbeData, ProbeSet, RelianceConfig, RelianceMonitor,
};

type TestResult = anyhow::Result<()>;

/// Seeded values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = candle_reliance::rng::SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform() as f32 * 2.0 - 1.0).collect()
}

struct Weights {
    w1: Tensor,
    b1: Tensor,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor,
    beta: Tensor,
    w2: Tensor,
    b2: Tensor,
}

const EPS: f64 = 1e-5;

impl Weights {
    fn new() -> candle_core::Result<Self> {
        let cpu = Device::Cpu;
        let t =
            |n: usize, seed: u64, shape: &[usize]| Tensor::from_vec(values(n, seed), shape, &cpu);
        Ok(Self {
            w1: t(6 * 4, 1, &[6, 4])?,
            b1: t(6, 2, &[6])?,
            // Running statistics far from 0 and 1, so that evaluation mode matters.
            mean: (t(6, 3, &[6])? * 0.5)?,
            var: (t(6, 4, &[6])?.abs()? + 0.25)?,
            gamma: (t(6, 5, &[6])? + 1.5)?,
            beta: t(6, 6, &[6])?,
            w2: t(3 * 6, 7, &[3, 6])?,
            b2: t(3, 8, &[3])?,
        })
    }
}

/// linear → batch norm → ReLU → probe → dropout → linear, with candle-nn's layers.
struct BnNet {
    fc1: Linear,
    bn: BatchNorm,
    probe: Probe,
    dropout: Dropout,
    fc2: Linear,
}

impl ModuleT for BnNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.bn.forward_t(&self.fc1.forward(xs)?, train)?.relu()?;
        let h = self.dropout.forward_t(&self.probe.forward(&h)?, train)?;
        self.fc2.forward(&h)
    }
}

/// Inputs labelled with the evaluation-mode network's own predictions, so that the unablated
/// accuracy is 1 and ablation moves it.
fn data(eval: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<ProbeData> {
    let n = 48;
    let xs = Tensor::from_vec(values(n * 4, 11), (n, 4), &Device::Cpu)?;
    let ys = eval(&xs)?.argmax(1)?;
    Ok(ProbeData::new(xs, ys)?)
}

#[test]
fn a_batch_norm_and_dropout_model_is_measured_in_evaluation_mode() -> TestResult {
    let w = Weights::new()?;
    let probes = ProbeSet::new();
    let net = BnNet {
        fc1: Linear::new(w.w1.clone(), Some(w.b1.clone())),
        bn: BatchNorm::new(
            6,
            w.mean.clone(),
            w.var.clone(),
            w.gamma.clone(),
            w.beta.clone(),
            EPS,
        )?,
        probe: probes.add("h")?,
        dropout: Dropout::new(0.5),
        fc2: Linear::new(w.w2.clone(), Some(w.b2.clone())),
    };
    // The evaluation forward written out by hand: (x·W1ᵀ + b1 − mean) / √(var + ε) · γ + β,
    // ReLU, the probe, no dropout, then W2.
    let hand_probes = ProbeSet::new();
    let hand_probe = hand_probes.add("h")?;
    let hand = |xs: &Tensor| -> candle_core::Result<Tensor> {
        let z = xs.matmul(&w.w1.t()?)?.broadcast_add(&w.b1)?;
        let sd = (w.var.clone() + EPS)?.sqrt()?;
        let h = z
            .broadcast_sub(&w.mean)?
            .broadcast_div(&sd)?
            .broadcast_mul(&w.gamma)?
            .broadcast_add(&w.beta)?
            .relu()?;
        hand_probe
            .forward(&h)?
            .matmul(&w.w2.t()?)?
            .broadcast_add(&w.b2)
    };
    // (The probe is idle here: an identity.)
    let data = data(hand)?;
    let spec = AblationSpec::default()
        .with_fractions(vec![0.0, 0.25, 0.5, 0.75, 1.0])
        .with_order(AblationOrder::Random { orders: 3, seed: 7 });
    let got = Measurement::new(&net, &probes, &data).ablation_curve(&spec)?;
    let want = Measurement::new(&hand, &hand_probes, &data).ablation_curve(&spec)?;
    assert_eq!(got.per_order, want.per_order);
    assert_eq!(got.per_order[0][0], 1.0);
    assert!(got.accuracy.iter().any(|&a| a < 0.95), "{:?}", got.accuracy);
    let mean_spec = AblationSpec {
        clamp: Clamp::Mean,
        ..spec.clone()
    };
    let got = Measurement::new(&net, &probes, &data).ablation_curve(&mean_spec)?;
    let want = Measurement::new(&hand, &hand_probes, &data).ablation_curve(&mean_spec)?;
    assert_eq!(got.per_order, want.per_order);
    // The statistics pass saw evaluation-mode activations.
    let (s_got, s_want) = (
        Measurement::new(&net, &probes, &data).statistics()?.clone(),
        Measurement::new(&hand, &hand_probes, &data)
            .statistics()?
            .clone(),
    );
    for (a, b) in s_got.probes[0]
        .value
        .mean
        .iter()
        .zip(&s_want.probes[0].value.mean)
    {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // The monitor takes the model as it is too, and checks it as it checks the hand-written
    // forward.
    let config = RelianceConfig::from_yaml_str(
        "schedule: {check_every: 1, warmup_epochs: 1}\n\
         ablation: {fractions: 5, orders: 3, seed: 7}\n",
    )?;
    let mut monitor = RelianceMonitor::new(config.clone(), probes.clone(), data.clone())?;
    monitor.check(1, &net)?;
    let mut by_hand = RelianceMonitor::new(config, hand_probes.clone(), data.clone())?;
    by_hand.check(1, &hand)?;
    let (a, b) = (&monitor.history()[0], &by_hand.history()[0]);
    assert_eq!(a.curve.per_order, b.curve.per_order);
    assert_eq!(a.unablated_accuracy, b.unablated_accuracy);
    // In training mode the network would be another one: batch statistics and dropout. (Last:
    // a training-mode forward also moves the running statistics.)
    let xs = data.xs().clone();
    let train = net.forward_t(&xs, true)?;
    let eval = net.forward_t(&xs, false)?;
    let gap = (train - eval)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        gap > 1e-3,
        "the training-mode forward should differ, gap {gap}"
    );

    Ok(())
}
