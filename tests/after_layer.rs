//! Steps after a fused layer (`ProbedLayer::then_relu`, `then_max_pool2d`), which a clamp
//! measurement applies inside its CPU op: against the same network applying candle's `relu` and
//! `max_pool2d` in its own forward, with and without the incremental path, and against one
//! forward per variant. ReLU and max-pooling only select values, so the curves must agree bit
//! for bit with the unfused incremental path on any network, and with one forward per variant on
//! integer-valued ones.

mod common;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear};
use candle_reliance::curves::{AblationCurve, Clamp};
use candle_reliance::probe::{AfterLayer, ProbedLayer};
use candle_reliance::rng::SplitMix64;
use candle_reliance::{Measurement, ProbeData, ProbeSet};
use common::nets::{labelled, linear, random, spec};

/// first layer → ReLU → [probe, layer, then `steps`] → [probe, dense layer] → classes; the steps
/// in the fused layer, or those of them in `outside` in this forward.
struct Stepped<L> {
    first: L,
    second: ProbedLayer,
    third: ProbedLayer,
    outside: Vec<AfterLayer>,
}

/// conv 3×3 (1 → 4) → ReLU → [probe, conv 3×3 (4 → 6, padding 1), steps] → [probe, dense].
type Pooled = Stepped<Conv2d>;

/// dense 12 → 16 → ReLU → [probe, dense 16 → 24, ReLU] → [probe, dense 24 → 5].
type Mlp = Stepped<Linear>;

/// The steps into `layer` (`fused`), or left for the forward.
fn with_steps(
    mut layer: ProbedLayer,
    steps: &[AfterLayer],
    fused: bool,
) -> (ProbedLayer, Vec<AfterLayer>) {
    if !fused {
        return (layer, steps.to_vec());
    }
    for step in steps {
        layer = match *step {
            AfterLayer::Relu => layer.then_relu(),
            AfterLayer::MaxPool2d(k) => layer.then_max_pool2d(k),
            other => unreachable!("no {other:?} step in these tests"),
        };
    }
    (layer, vec![])
}

impl<L: Module> Module for Stepped<L> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.second.forward(&self.first.forward(xs)?.relu()?)?;
        for step in &self.outside {
            h = match *step {
                AfterLayer::Relu => h.relu()?,
                AfterLayer::MaxPool2d(k) => h.max_pool2d(k)?,
                other => unreachable!("no {other:?} step in these tests"),
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
    let (second, outside) = with_steps(probes.add("c1")?.feeding(conv), steps, fused);
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

/// The MLP for `seed`, its ReLU after the second layer fused or not; the same weights and data
/// either way.
fn mlp(seed: u64, integer: bool, fused: bool) -> Result<(ProbeSet, Mlp, ProbeData)> {
    let mut rng = SplitMix64::new(seed);
    let probes = ProbeSet::new();
    let first = linear(&mut rng, 12, 16, integer)?;
    let second = probes
        .add("fc1")?
        .feeding(linear(&mut rng, 16, 24, integer)?);
    let (second, outside) = with_steps(second, &[AfterLayer::Relu], fused);
    let model = Mlp {
        first,
        second,
        third: probes
            .add("fc2")?
            .feeding(linear(&mut rng, 24, 5, integer)?),
        outside,
    };
    let xs = random(&mut rng, &[150, 12], 0, 3, integer)?;
    let data = labelled(&mut rng, &model, xs)?;
    Ok((probes, model, data))
}

/// The curves of `fused` and `unfused` (the same network) and of one forward per variant of
/// `fused`, at `max_rows` rows per expanded forward.
fn compare<L: Module>(
    (probes, fused, data): &(ProbeSet, Stepped<L>, ProbeData),
    (probes_u, unfused, data_u): &(ProbeSet, Stepped<L>, ProbeData),
    clamp: Clamp,
    seed: u64,
    max_rows: usize,
) -> Result<[AblationCurve; 3]> {
    let s = spec(clamp, 3, seed);
    assert_eq!(
        data.label_values(),
        data_u.label_values(),
        "the two networks must label alike"
    );
    let a = Measurement::new(fused, probes, data)
        .with_max_batch_rows(max_rows)
        .ablation_curve(&s)?;
    let b = Measurement::new(unfused, probes_u, data_u)
        .with_max_batch_rows(max_rows)
        .ablation_curve(&s)?;
    let c = Measurement::new(fused, probes, data)
        .with_batched(false)
        .ablation_curve(&s)?;
    assert!(a.incremental && b.incremental && !c.incremental);
    Ok([a, b, c])
}

/// [`compare`] for the pooled CNN.
fn three(
    seed: u64,
    integer: bool,
    side: usize,
    steps: &[AfterLayer],
    clamp: Clamp,
    max_rows: usize,
) -> Result<[AblationCurve; 3]> {
    compare(
        &pooled(seed, integer, side, steps, true)?,
        &pooled(seed, integer, side, steps, false)?,
        clamp,
        seed,
        max_rows,
    )
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
fn a_dense_layers_relu_matches() -> Result<()> {
    for seed in 60..63 {
        for max_rows in [100_000, 240] {
            let curves = |clamp| {
                compare(
                    &mlp(seed, true, true)?,
                    &mlp(seed, true, false)?,
                    clamp,
                    seed,
                    max_rows,
                )
            };
            let [fused, unfused, reference] = curves(Clamp::Zero)?;
            assert_eq!(fused.per_order, reference.per_order, "seed {seed}");
            assert_eq!(fused.per_order, unfused.per_order, "seed {seed}");
            assert!(fused.accuracy.first() != fused.accuracy.last());
            let [fused, unfused, _] = curves(Clamp::Mean)?;
            assert_eq!(
                fused.per_order, unfused.per_order,
                "seed {seed}, mean clamp"
            );
        }
    }
    // Float weights: the same op's values, rectified in place or by candle.
    let [fused, unfused, _] = compare(
        &mlp(63, false, true)?,
        &mlp(63, false, false)?,
        Clamp::Zero,
        63,
        100_000,
    )?;
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
