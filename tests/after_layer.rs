//! Steps after a fused layer (`ProbedLayer::then_relu`, `then_max_pool2d`), which a clamp
//! measurement applies inside its CPU op: against the same network applying candle's `relu` and
//! `max_pool2d` in its own forward, with and without the incremental path, and against one
//! forward per variant. ReLU and max-pooling only select values, so the curves must agree bit
//! for bit with the unfused incremental path on any network, and with one forward per variant on
//! integer-valued ones.

mod common;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};
use candle_reliance::curves::{AblationCurve, Clamp};
use candle_reliance::probe::{AfterLayer, ProbedLayer};
use candle_reliance::rng::SplitMix64;
use candle_reliance::{Measurement, ProbeData, ProbeSet};
use common::nets::{labelled, linear, random, spec};

/// conv 3×3 (1 → 4) → ReLU → [probe, conv 3×3 (4 → 6, padding 1), then `steps`] → [probe, dense
/// layer] → classes; `fused`: the steps in the fused layer, else in this forward.
struct Pooled {
    first: Conv2d,
    second: ProbedLayer,
    third: ProbedLayer,
    outside: Vec<AfterLayer>,
}

impl Module for Pooled {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.second.forward(&self.first.forward(xs)?.relu()?)?;
        for step in &self.outside {
            h = match *step {
                AfterLayer::Relu => h.relu()?,
                AfterLayer::MaxPool2d(k) => h.max_pool2d(k)?,
            };
        }
        self.third.forward(&h)
    }
}

/// The network for `seed` on `side × side` inputs; the same weights and data whatever `fused`.
fn pooled(
    seed: u64,
    integer: bool,
    side: usize,
    steps: &[AfterLayer],
    fused: bool,
) -> Result<(ProbeSet, Pooled, ProbeData)> {
    let mut rng = SplitMix64::new(seed);
    let (lo, hi) = if integer { (-2, 2) } else { (-1, 1) };
    let probes = ProbeSet::new();
    let first = Conv2d::new(
        random(&mut rng, &[4, 1, 3, 3], lo, hi, integer)?,
        Some(random(&mut rng, &[4], lo, hi, integer)?),
        Conv2dConfig::default(),
    );
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = Conv2d::new(
        random(&mut rng, &[6, 4, 3, 3], lo, hi, integer)?,
        Some(random(&mut rng, &[6], lo, hi, integer)?),
        cfg,
    );
    // The map after both convolutions is (side − 2)², then each pool shrinks it.
    let mut map = side - 2;
    for step in steps {
        if let AfterLayer::MaxPool2d(k) = *step {
            map = (map - k) / k + 1;
        }
    }
    let fc = linear(&mut rng, 6 * map * map, 4, integer)?;
    let mut second = probes.add("c1")?.feeding(conv);
    let mut outside = steps.to_vec();
    if fused {
        for step in outside.drain(..) {
            second = match step {
                AfterLayer::Relu => second.then_relu(),
                AfterLayer::MaxPool2d(k) => second.then_max_pool2d(k),
            };
        }
    }
    let model = Pooled {
        first,
        second,
        third: probes.add("c2")?.feeding(fc),
        outside,
    };
    let xs = random(&mut rng, &[90, 1, side, side], 0, 2, integer)?;
    let data = labelled(&mut rng, &model, xs)?;
    Ok((probes, model, data))
}

/// The curve of the fused network, of the unfused one (incremental), and of one forward per
/// variant of the fused one.
fn three(
    seed: u64,
    integer: bool,
    side: usize,
    steps: &[AfterLayer],
    clamp: Clamp,
    max_rows: usize,
) -> Result<[AblationCurve; 3]> {
    let s = spec(clamp, 3, seed);
    let (probes, fused, data) = pooled(seed, integer, side, steps, true)?;
    let (probes_u, unfused, data_u) = pooled(seed, integer, side, steps, false)?;
    assert_eq!(
        data.label_values(),
        data_u.label_values(),
        "the two networks must label alike"
    );
    let a = Measurement::new(&fused, &probes, &data)
        .with_max_batch_rows(max_rows)
        .ablation_curve(&s)?;
    let b = Measurement::new(&unfused, &probes_u, &data_u)
        .with_max_batch_rows(max_rows)
        .ablation_curve(&s)?;
    let c = Measurement::new(&fused, &probes, &data)
        .with_batched(false)
        .ablation_curve(&s)?;
    assert!(a.incremental && b.incremental && !c.incremental);
    Ok([a, b, c])
}

const RELU_POOL2: [AfterLayer; 2] = [AfterLayer::Relu, AfterLayer::MaxPool2d(2)];

#[test]
fn integer_networks_match_one_forward_per_variant() -> Result<()> {
    // (side, steps): 2 × 2 pools of even and odd maps (8 and 7 wide: the last column dropped),
    // a 3 × 3 pool (the general window), pool before ReLU, ReLU alone.
    let cases: [(usize, &[AfterLayer]); 5] = [
        (10, &RELU_POOL2),
        (9, &RELU_POOL2),
        (11, &[AfterLayer::Relu, AfterLayer::MaxPool2d(3)]),
        (10, &[AfterLayer::MaxPool2d(2), AfterLayer::Relu]),
        (8, &[AfterLayer::Relu]),
    ];
    for (seed, (side, steps)) in (0..).zip(cases) {
        for max_rows in [100_000, 150] {
            let [fused, unfused, reference] =
                three(seed, true, side, steps, Clamp::Zero, max_rows)?;
            let at = format!("seed {seed}, side {side}, {steps:?}, rows {max_rows}");
            assert_eq!(fused.per_order, reference.per_order, "{at}");
            assert_eq!(fused.per_order, unfused.per_order, "{at}");
            assert_eq!(fused.agreement_per_order, reference.agreement_per_order);
            // The curve is not flat: the comparison is not between two constant vectors.
            assert!(fused.accuracy.first() != fused.accuracy.last(), "{at}");
        }
    }
    Ok(())
}

#[test]
fn float_networks_and_the_mean_clamp_match_the_unfused_path_bit_for_bit() -> Result<()> {
    // Both run the same op on the same values; the steps only select among them.
    for (seed, clamp) in [(20, Clamp::Zero), (21, Clamp::Mean), (22, Clamp::Mean)] {
        let [fused, unfused, reference] = three(seed, false, 10, &RELU_POOL2, clamp, 100_000)?;
        assert_eq!(fused.per_order, unfused.per_order, "seed {seed} {clamp:?}");
        assert_eq!(fused.agreement_per_order, unfused.agreement_per_order);
        // Against clamping then the layer: reassociation only (a sample per point at most).
        let n = 90.0;
        for (a, b) in fused.accuracy.iter().zip(&reference.accuracy) {
            assert!((a - b).abs() <= 1.0 / n + 1e-12, "seed {seed}: {a} vs {b}");
        }
    }
    // Integer weights with the mean clamp (fractional clamp values), in chunks.
    let [fused, unfused, _] = three(23, true, 10, &RELU_POOL2, Clamp::Mean, 150)?;
    assert_eq!(fused.per_order, unfused.per_order);
    Ok(())
}

#[test]
fn single_unit_importance_matches() -> Result<()> {
    let (probes, fused, data) = pooled(30, true, 10, &RELU_POOL2, true)?;
    let sets: Vec<Vec<usize>> = (0..10)
        .map(|u| vec![u])
        .chain([vec![], vec![1, 6]])
        .collect();
    let m = |batched| Measurement::new(&fused, &probes, &data).with_batched(batched);
    let a = m(true).ablation_accuracies(&sets, Clamp::Zero)?;
    let b = m(false).ablation_accuracies(&sets, Clamp::Zero)?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn outside_a_measurement_the_steps_are_candles() -> Result<()> {
    let (_, fused, data) = pooled(40, false, 10, &RELU_POOL2, true)?;
    let (_, unfused, _) = pooled(40, false, 10, &RELU_POOL2, false)?;
    let h = fused.first.forward(data.xs())?.relu()?;
    let a = fused.second.forward(&h)?;
    let b = unfused.second.forward(&h)?.relu()?.max_pool2d(2)?;
    assert_eq!(a.dims(), &[90, 6, 4, 4]);
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(fused.second.after(), &RELU_POOL2);
    Ok(())
}

#[test]
fn bad_pools_are_errors_in_and_out_of_a_measurement() -> Result<()> {
    // Kernel 0 (candle would divide by it) and a kernel wider than the 8 × 8 map.
    for k in [0, 9] {
        let (probes, mut model, data) = pooled(50, true, 10, &[AfterLayer::Relu], true)?;
        model.second = model.second.then_max_pool2d(k);
        let h = model.first.forward(data.xs())?.relu()?;
        let err = model.second.forward(&h).unwrap_err().to_string();
        assert!(
            err.contains("kernel"),
            "k = {k}: the error names the kernel: {err}"
        );
        let err = Measurement::new(&model, &probes, &data)
            .ablation_curve(&spec(Clamp::Zero, 2, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernel"), "k = {k}: {err}");
    }
    Ok(())
}
