//! The incremental path of a probe fused with the layer it feeds, against clamping then applying
//! the layer (the batched path): bit for bit on integer-valued networks, where every sum is exact
//! in f32 and reassociation cannot change a bit; within a sample per point on float networks.
//! And the statistics pass folded into a check, against a separate statistics pass.

mod common;

use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;
use candle_reliance::curves::{AblationCurve, AblationOrder, AblationSpec, Clamp};
use candle_reliance::measurement::UnitStatistics;
use candle_reliance::probe::ProbedLayer;
use candle_reliance::{Measurement, ProbeData, ProbeSet};
use common::nets::{cnn, mlp, spec, Mlp, DEV};
use std::cell::Cell;

/// The curve with and without the incremental path, at `max_rows` rows per expanded forward.
fn both<M: Module>(
    model: &M,
    probes: &ProbeSet,
    data: &ProbeData,
    spec: &AblationSpec,
    max_rows: usize,
) -> Result<(AblationCurve, AblationCurve)> {
    let m = |inc| {
        Measurement::new(model, probes, data)
            .with_max_batch_rows(max_rows)
            .with_incremental(inc)
    };
    Ok((
        m(true).ablation_curve(spec)?,
        m(false).ablation_curve(spec)?,
    ))
}

#[test]
fn integer_mlp_is_bit_identical() -> Result<()> {
    for seed in 0..4 {
        let (probes, model, data) = mlp(seed, true)?;
        // Rows bounds that cut the variants into groups and the samples into chunks.
        for max_rows in [100_000, 500, 37] {
            let (inc, reference) = both(
                &model,
                &probes,
                &data,
                &spec(Clamp::Zero, 4, seed),
                max_rows,
            )?;
            assert!(inc.incremental && !reference.incremental);
            assert_eq!(
                inc.per_order, reference.per_order,
                "seed {seed} rows {max_rows}"
            );
            assert_eq!(inc.agreement_per_order, reference.agreement_per_order);
            // The curve is not flat: the comparison is not between two constant vectors.
            assert!(inc.accuracy.first() != inc.accuracy.last());
        }
    }
    Ok(())
}

#[test]
fn integer_cnn_is_bit_identical() -> Result<()> {
    // (stride, padding, dilation) of the layer computed incrementally.
    let geometries = [
        (1, 1, 1),
        (1, 1, 1),
        (2, 1, 1),
        (1, 0, 2),
        (2, 2, 2),
        (3, 0, 1),
    ];
    for (seed, geometry) in (0..).zip(geometries) {
        let (probes, model, data) = cnn(seed, true, geometry)?;
        for max_rows in [100_000, 211] {
            let (inc, reference) = both(
                &model,
                &probes,
                &data,
                &spec(Clamp::Zero, 3, seed),
                max_rows,
            )?;
            assert!(inc.incremental);
            assert_eq!(
                inc.per_order, reference.per_order,
                "seed {seed} geometry {geometry:?}"
            );
            assert_eq!(inc.agreement_per_order, reference.agreement_per_order);
        }
    }
    Ok(())
}

#[test]
fn a_convolution_without_bias_is_bit_identical() -> Result<()> {
    // The op computes the convolution's unclamped output itself, from its weight and bias.
    let (probes, mut model, data) = cnn(11, true, (1, 1, 1))?;
    let conv = match model.second.layer() {
        candle_reliance::probe::NextLayer::Conv2d(c) => c.clone(),
        other => panic!("expected a convolution, got {other:?}"),
    };
    let unbiased = candle_nn::Conv2d::new(conv.weight().clone(), None, *conv.config());
    model.second = model.second.probe().clone().feeding(unbiased);
    let (inc, reference) = both(&model, &probes, &data, &spec(Clamp::Zero, 3, 11), 100_000)?;
    assert!(inc.incremental);
    assert_eq!(inc.per_order, reference.per_order);
    assert!(inc.accuracy.first() != inc.accuracy.last());
    Ok(())
}

#[test]
fn single_unit_deltas_are_bit_identical() -> Result<()> {
    // Importance clamps one unit per variant: each variant's base is the unclamped output.
    let (probes, model, data) = mlp(7, true)?;
    let sets: Vec<Vec<usize>> = (0..40)
        .map(|u| vec![u])
        .chain([vec![], vec![3, 17, 20]])
        .collect();
    let m = |inc| Measurement::new(&model, &probes, &data).with_incremental(inc);
    let inc = m(true).ablation_accuracies(&sets, Clamp::Zero)?;
    let reference = m(false).ablation_accuracies(&sets, Clamp::Zero)?;
    assert_eq!(inc, reference);
    Ok(())
}

/// Float networks: the layer's output differs from the reference only by reassociation (relative
/// error about 1e-6), which moves a prediction only where two logits lie that close. With
/// continuous random weights that is rare; one sample per point is a loose bound on it.
#[test]
fn float_networks_agree_within_a_sample() -> Result<()> {
    let within = |a: &AblationCurve, b: &AblationCurve, n: usize| {
        a.per_order
            .iter()
            .flatten()
            .zip(b.per_order.iter().flatten())
            .all(|(x, y)| (x - y).abs() <= 1.0 / n as f64 + 1e-12)
    };
    let check = |(inc, reference): (AblationCurve, AblationCurve), n: usize| -> Result<()> {
        assert!(inc.incremental);
        assert!(
            within(&inc, &reference, n),
            "{:?} vs {:?}",
            inc.per_order,
            reference.per_order
        );
        Ok(())
    };
    for seed in 0..3 {
        for clamp in [Clamp::Zero, Clamp::Mean] {
            let (probes, model, data) = mlp(100 + seed, false)?;
            check(
                both(&model, &probes, &data, &spec(clamp, 3, seed), 100_000)?,
                data.len(),
            )?;
            let (probes, model, data) = cnn(100 + seed, false, (1, 1, 1))?;
            check(
                both(&model, &probes, &data, &spec(clamp, 3, seed), 100_000)?,
                data.len(),
            )?;
        }
    }
    Ok(())
}

#[test]
fn mean_clamp_hand_worked() -> Result<()> {
    // One unit pair into y = 1·h0 + 2·h1; h = (1, 3) and (3, 1): means (2, 2).
    let probes = ProbeSet::new();
    let w = Tensor::new(&[[1f32, 2.0], [0.0, 0.0]], &DEV)?;
    let layer = probes
        .add("h")?
        .feeding(Linear::new(w, Some(Tensor::new(&[0f32, 6.5], &DEV)?)));
    let model = move |xs: &Tensor| layer.forward(xs);
    let xs = Tensor::new(&[[1f32, 3.0], [3.0, 1.0]], &DEV)?;
    let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &DEV)?)?;
    let spec = AblationSpec::default()
        .with_fractions(vec![0.0, 0.5, 1.0])
        .with_clamp(Clamp::Mean)
        .with_order(AblationOrder::Explicit(vec![1, 0]));
    let c = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    assert!(c.incremental);
    // Logit 0 per sample (logit 1 is 6.5): none clamped 7, 5 → classes 0, 1: both right.
    // h1 → 2: 5, 7 → classes 1, 0: both wrong. Both → 2: 6, 6 → class 1: sample 1 right.
    assert_eq!(c.accuracy, vec![1.0, 0.0, 0.5]);
    Ok(())
}

#[test]
fn non_finite_activations_take_the_batched_path() -> Result<()> {
    let (probes, mut model, data) = mlp(3, true)?;
    let mut w: Vec<f32> = model.first.weight().flatten_all()?.to_vec1()?;
    w[5] = f32::INFINITY;
    model.first = Linear::new(
        Tensor::from_vec(w, (16, 12), &DEV)?,
        model.first.bias().cloned(),
    );
    let (inc, reference) = both(&model, &probes, &data, &spec(Clamp::Zero, 2, 0), 100_000)?;
    // fc1's output holds inf or NaN: the fused layer clamps first, exactly as the batched path.
    assert!(!inc.incremental);
    assert_eq!(
        format!("{:?}", inc.per_order),
        format!("{:?}", reference.per_order)
    );
    Ok(())
}

// The statistics pass folded into the check: a curve measured before any statistics takes them
// from its unclamped variant's rows instead of a separate plain forward over the data.

/// A model whose forward passes are counted.
struct Counted<'a, M: ?Sized> {
    model: &'a M,
    calls: Cell<usize>,
}

impl<M: Module + ?Sized> Module for Counted<'_, M> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        self.model.forward(xs)
    }
}

/// Statistics, curve and forward passes when the curve comes first (the statistics pass may be
/// folded into it) and when the statistics pass runs first; statistics in chunks of 64.
fn folded_and_separate<M: Module + ?Sized>(
    model: &M,
    probes: &ProbeSet,
    data: &ProbeData,
    spec: &AblationSpec,
    max_rows: usize,
) -> Result<[(UnitStatistics, AblationCurve, usize); 2]> {
    let counted = Counted {
        model,
        calls: Cell::new(0),
    };
    let m = || {
        Measurement::new(&counted, probes, data)
            .with_max_batch_rows(max_rows)
            .with_batch_size(64)
    };
    let first = m();
    let curve = first.ablation_curve(spec)?;
    let folded = (first.statistics()?.clone(), curve, counted.calls.replace(0));
    let second = m();
    let stats = second.statistics()?.clone();
    let separate = (stats, second.ablation_curve(spec)?, counted.calls.get());
    Ok([folded, separate])
}

/// Equal statistics; feature maps' class means within rounding (each chunk's class sums are
/// divided by the positions before they are added, so chunking rounds them differently).
fn assert_same_statistics(a: &UnitStatistics, b: &UnitStatistics) {
    let strip = |s: &UnitStatistics| {
        let mut s = s.clone();
        s.probes
            .iter_mut()
            .filter(|p| p.value.positions > 1)
            .for_each(|p| p.value.class_mean.clear());
        s
    };
    assert_eq!(strip(a), strip(b));
    for (p, q) in a.probes.iter().zip(&b.probes) {
        for (x, y) in p
            .value
            .class_mean
            .iter()
            .flatten()
            .zip(q.value.class_mean.iter().flatten())
        {
            assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
}

/// The folded statistics and curve of `model` against the separate pass, bit for bit (the
/// networks are integer-valued), and one plain forward saved per statistics chunk.
fn assert_folding_exact<M: Module>(
    probes: &ProbeSet,
    model: &M,
    data: &ProbeData,
    seed: u64,
) -> Result<()> {
    // 10 rows: fewer than the 23 variants, so the variants run in groups and only the first
    // group sees every sample unclamped.
    for max_rows in [100_000, 211, 10] {
        let s = spec(Clamp::Zero, 3, seed);
        let [(fs, fc, ff), (ss, sc, sf)] = folded_and_separate(model, probes, data, &s, max_rows)?;
        assert_same_statistics(&fs, &ss);
        assert_eq!(fc.per_order, sc.per_order);
        assert_eq!(fc.agreement_per_order, sc.agreement_per_order);
        assert_eq!(fc.unablated_accuracy, sc.unablated_accuracy);
        let saved = data.len().div_ceil(64);
        assert_eq!(ff + saved, sf, "seed {seed} rows {max_rows}");
    }
    Ok(())
}

#[test]
fn folded_statistics_equal_the_separate_pass() -> Result<()> {
    for seed in 0..2 {
        let (probes, model, data) = mlp(20 + seed, true)?;
        assert_folding_exact(&probes, &model, &data, seed)?;
        let (probes, model, data) = cnn(30 + seed, true, (1, 1, 1))?;
        assert_folding_exact(&probes, &model, &data, seed)?;
    }
    Ok(())
}

#[test]
fn statistics_are_not_folded_where_the_check_needs_them_first() -> Result<()> {
    let (probes, model, data) = mlp(7, true)?;
    let no_zero = spec(Clamp::Zero, 2, 0).with_fractions(vec![0.25, 0.5, 1.0]);
    // The mean clamp needs the means; a curve without fraction 0 has no unclamped variant.
    for s in [spec(Clamp::Mean, 2, 0), no_zero] {
        let [(fs, fc, ff), (ss, sc, sf)] = folded_and_separate(&model, &probes, &data, &s, 1000)?;
        assert_eq!(ff, sf);
        assert_eq!(fs, ss);
        assert_eq!(fc.per_order, sc.per_order);
    }
    Ok(())
}

#[test]
fn folded_statistics_survive_the_fallback_to_one_variant_per_forward() -> Result<()> {
    let (probes, model, data) = mlp(8, true)?;
    // Reshapes with the batch size read at the top: an expanded batch cannot pass.
    let rigid = |xs: &Tensor| {
        let n = xs.dim(0)?;
        model.forward(xs)?.reshape((n, 5))
    };
    let [(fs, fc, _), (ss, sc, _)] =
        folded_and_separate(&rigid, &probes, &data, &spec(Clamp::Zero, 2, 1), 1000)?;
    assert!(!fc.batched && !sc.batched);
    assert_eq!(fs, ss);
    assert_eq!(fc.per_order, sc.per_order);
    assert_eq!(fc.agreement_per_order, sc.agreement_per_order);
    Ok(())
}

#[test]
fn folded_statistics_still_see_a_batch_dependent_model() -> Result<()> {
    let (probes, model, data) = mlp(9, true)?;
    // Subtracting the batch mean: the first sample alone gives other logits than in its chunk.
    let centred = |xs: &Tensor| model.forward(&xs.broadcast_sub(&xs.mean_keepdim(0)?)?);
    let [(fs, _, ff), (ss, _, sf)] =
        folded_and_separate(&centred, &probes, &data, &spec(Clamp::Zero, 2, 1), 1000)?;
    assert!(ff < sf);
    assert!(fs.batch_dependent && ss.batch_dependent);
    Ok(())
}

#[test]
fn double_precision_is_bit_identical() -> Result<()> {
    let (_, model, data) = mlp(40, true)?;
    // The same layers in f64; the fused ones are re-fused to new probes.
    let f64_linear = |l: &Linear| -> Result<Linear> {
        Ok(Linear::new(
            l.weight().to_dtype(candle_core::DType::F64)?,
            l.bias()
                .map(|b| b.to_dtype(candle_core::DType::F64))
                .transpose()?,
        ))
    };
    let probes = ProbeSet::new();
    let refused = |name: &str, fused: &ProbedLayer| -> Result<ProbedLayer> {
        let candle_reliance::probe::NextLayer::Linear(l) = fused.layer() else {
            unreachable!("the MLP feeds dense layers")
        };
        Ok(probes.add(name)?.feeding(f64_linear(l)?))
    };
    let wide = Mlp {
        first: f64_linear(&model.first)?,
        second: refused("fc1", &model.second)?,
        third: refused("fc2", &model.third)?,
    };
    let data = ProbeData::new(
        data.xs().to_dtype(candle_core::DType::F64)?,
        data.labels().clone(),
    )?;
    let (inc, reference) = both(&wide, &probes, &data, &spec(Clamp::Zero, 3, 4), 211)?;
    assert!(inc.incremental);
    assert_eq!(inc.per_order, reference.per_order);
    assert_eq!(inc.agreement_per_order, reference.agreement_per_order);
    Ok(())
}
