//! A batch-norm step in a fused layer (`conv → batch norm → ReLU → pool`): the check stays
//! incremental and its curves are those of the same network written as probe, convolution,
//! candle-nn's batch norm in evaluation mode, ReLU and pool; outside a measurement the step is
//! the batch norm in the mode asked for.

mod common;

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear};
use candle_reliance::{Clamp, Measurement, Probe, ProbeSet, ProbedLayer};
use common::nets::{labelled, linear, random, spec, DEV};

type TestResult = anyhow::Result<()>;

struct Layers {
    c1: Conv2d,
    c2: Conv2d,
    bn: BatchNorm,
    fc: Linear,
}

/// Integer weights and inputs: every convolution sum is exact in f32, so the incremental and
/// the plain path feed the batch norm the same bits.
fn layers(rng: &mut candle_reliance::rng::SplitMix64) -> candle_core::Result<Layers> {
    let pad = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Layers {
        c1: Conv2d::new(
            random(rng, &[3, 1, 3, 3], -2, 2, true)?,
            Some(random(rng, &[3], -2, 2, true)?),
            Conv2dConfig::default(),
        ),
        c2: Conv2d::new(
            random(rng, &[4, 3, 3, 3], -2, 2, true)?,
            Some(random(rng, &[4], -2, 2, true)?),
            pad,
        ),
        bn: BatchNorm::new(
            4,
            Tensor::new(&[1f32, -2.0, 0.5, 3.0], &DEV)?,
            Tensor::new(&[3f32, 0.7, 12.0, 5.0], &DEV)?,
            Tensor::new(&[1.5f32, -0.5, 2.0, 1.0], &DEV)?,
            Tensor::new(&[0.25f32, 1.0, -1.0, 0.0], &DEV)?,
            1e-5,
        )?,
        // 6×6 after c1, c2 keeps it, the pool halves it: 4 channels of 3×3.
        fc: linear(rng, 4 * 3 * 3, 3, false)?,
    })
}

/// probe → c2 → batch norm → ReLU → pool, written out.
struct Plain {
    l: Layers,
    probe: Probe,
}

impl ModuleT for Plain {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.probe.forward(&self.l.c1.forward(xs)?.relu()?)?;
        let h = self.l.bn.forward_t(&self.l.c2.forward(&h)?, train)?;
        self.l
            .fc
            .forward(&h.relu()?.max_pool2d(2)?.flatten_from(1)?)
    }
}

/// The same with the probe fused: `feeding(c2).then_batch_norm(bn).then_relu().then_max_pool2d(2)`.
struct Fused {
    c1: Conv2d,
    fused: ProbedLayer,
    fc: Linear,
}

impl ModuleT for Fused {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.fused.forward_t(&self.c1.forward(xs)?.relu()?, train)?;
        self.fc.forward(&h.flatten_from(1)?)
    }
}

#[test]
fn a_batch_norm_step_keeps_the_check_incremental_with_the_plain_networks_curves() -> TestResult {
    let mut rng = candle_reliance::rng::SplitMix64::new(21);
    let l = layers(&mut rng)?;
    let (plain_probes, fused_probes) = (ProbeSet::new(), ProbeSet::new());
    let fused = Fused {
        c1: l.c1.clone(),
        fused: fused_probes
            .add("c1")?
            .feeding(l.c2.clone())
            .then_batch_norm(l.bn.clone())
            .then_relu()
            .then_max_pool2d(2),
        fc: l.fc.clone(),
    };
    let plain = Plain {
        l,
        probe: plain_probes.add("c1")?,
    };
    let xs = random(&mut rng, &[60, 1, 8, 8], 0, 2, true)?;
    let eval = |x: &Tensor| plain.forward_t(x, false);
    let data = labelled(&mut rng, &eval, xs.clone())?;
    // Module::forward is evaluation mode.
    let h = plain.l.c1.forward(&xs)?.relu()?;
    let (a, b) = (
        fused.fused.forward(&h)?.flatten_all()?.to_vec1::<f32>()?,
        fused
            .fused
            .forward_t(&h, false)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    );
    assert_eq!(a, b);
    let (a, b) = (fused.forward_t(&xs, false)?, plain.forward_t(&xs, false)?);
    assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    for clamp in [Clamp::Zero, Clamp::Mean] {
        let want =
            Measurement::new(&plain, &plain_probes, &data).ablation_curve(&spec(clamp, 3, 4))?;
        let got =
            Measurement::new(&fused, &fused_probes, &data).ablation_curve(&spec(clamp, 3, 4))?;
        assert!(got.incremental && !want.incremental, "{clamp:?}");
        assert_eq!(got.per_order, want.per_order, "{clamp:?}");
        assert_eq!(
            got.agreement_per_order, want.agreement_per_order,
            "{clamp:?}"
        );
        assert!(
            got.accuracy.iter().any(|&a| a < got.accuracy[0]),
            "{:?}",
            got.accuracy
        );
    }
    // Training mode: batch statistics, as the batch norm itself computes them (last: it moves
    // the shared running statistics).
    let (a, b) = (fused.forward_t(&xs, true)?, plain.forward_t(&xs, true)?);
    assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    Ok(())
}
