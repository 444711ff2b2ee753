//! Ablation curves against hand-worked small networks, and the batched pass against the
//! one-forward-per-level reference.

use candle_core::{DType, Module, Result, Tensor};
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp};
use candle_reliance::{Measurement, ProbeData, ProbeSet};

mod common;

use common::{dev, one_probe_net};

const EPS: f64 = 1e-12;

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < EPS)
}

#[test]
fn hand_worked_zero_clamp() -> Result<()> {
    let (probes, model, data) = one_probe_net()?;
    let spec = AblationSpec::default()
        .with_fractions(vec![0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0])
        .with_order(AblationOrder::Explicit(vec![2, 0, 1]));
    let c = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    // Logits per sample (class 0, class 1):
    // none clamped:  (3.01,1.5) ok, (1.01,2) ok, (2.01,1.6) wrong, (1.01,2.5) ok     -> 3/4
    // unit 2 zeroed: (3.01,1)   ok, (1.01,2) ok, (2.01,0.1) wrong, (1.01,1.5) ok     -> 3/4
    // units 2,0:     (0.01,1) wrong, (0.01,2) ok, (0.01,0.1) ok, (0.01,1.5) ok       -> 3/4
    // all zeroed:    (0.01,0) -> class 0 everywhere, only sample 0 right             -> 1/4
    assert!(
        close(&c.accuracy, &[0.75, 0.75, 0.75, 0.25]),
        "{:?}",
        c.accuracy
    );
    assert_eq!(c.units_ablated, vec![0, 1, 2, 3]);
    assert_eq!(c.total_units, 3);
    // Trapezoids of width 1/3: (0.75 + 0.75 + 0.5) / 3 = 2/3.
    assert!((c.auc - 2.0 / 3.0).abs() < EPS, "{}", c.auc);
    assert!((c.normalized_auc - (2.0 / 3.0) / 0.75).abs() < EPS);
    assert_eq!(c.unablated_accuracy, 0.75);
    assert_eq!(c.auc_ci, None, "a single order has no interval");
    assert!(c.batched && c.finite);
    Ok(())
}

#[test]
fn agreement_counts_the_unablated_predictions_not_the_labels() -> Result<()> {
    // Two units; class 0 wins when unit 0 is larger. Sample 0 is labelled 1 (a wrong label).
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let model = |xs: &Tensor| p.forward(&xs.relu()?);
    let xs = Tensor::new(&[[2f32, 1.0], [1.0, 3.0]], &dev())?;
    let data = ProbeData::new(xs, Tensor::new(&[1u32, 1], &dev())?)?;
    let spec = AblationSpec::default()
        .with_fractions(vec![0.0, 0.5, 1.0])
        .with_order(AblationOrder::Explicit(vec![0, 1]));
    let c = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    // Predictions: nothing clamped (0, 1); unit 0 clamped (1, 1); both clamped, all logits 0,
    // arg-max takes the first class: (0, 0).
    assert_eq!(c.accuracy, vec![0.5, 1.0, 0.0]);
    assert_eq!(c.agreement, vec![1.0, 0.5, 0.5]);
    // 0.5 · (1 + 0.5) / 2 + 0.5 · (0.5 + 0.5) / 2
    assert_eq!(c.agreement_auc, 0.625);
    assert_eq!(c.agreement_auc_per_order, vec![0.625]);
    Ok(())
}

#[test]
fn hand_worked_mean_clamp_differs_from_zero() -> Result<()> {
    let (probes, model, data) = one_probe_net()?;
    let spec = AblationSpec::default()
        .with_fractions(vec![0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0])
        .with_order(AblationOrder::Explicit(vec![2, 0, 1]))
        .with_clamp(Clamp::Mean);
    let c = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    // Unit means over the 4 samples: 1.75, 1.15, 1.5 (unit 2 adds 0.75 to class 1).
    // unit 2 at mean: (3.01,1.75) ok, (1.01,2.75) ok, (2.01,0.85) wrong, (1.01,2.25) ok -> 3/4
    // + unit 0 at mean (class 0 logit 1.76 everywhere):
    //   (1.76,1.75) ok, (1.76,2.75) ok, (1.76,0.85) wrong, (1.76,2.25) ok            -> 3/4
    // all at mean: (1.76, 1.9) -> class 1 everywhere: samples 1,2,3 right            -> 3/4
    assert!(
        close(&c.accuracy, &[0.75, 0.75, 0.75, 0.75]),
        "{:?}",
        c.accuracy
    );
    assert!((c.auc - 0.75).abs() < EPS);
    let stats = Measurement::new(&model, &probes, &data)
        .with_batch_size(3)
        .statistics()?
        .clone();
    let mean = &stats.probes[0].value.mean;
    assert!(
        close(mean, &[1.75, 1.15, 1.5])
            || mean
                .iter()
                .zip([1.75, 1.15, 1.5])
                .all(|(a, b)| (a - b).abs() < 1e-6),
        "{mean:?}"
    );
    Ok(())
}

/// Two probes: h1 = relu(x) (global units 0, 1), h2 = relu(h1·A) (units 2, 3) with
/// A = [[1,1],[0,1]], logits = h2·diag(2,1) + (0.001, 0).
fn two_probe_net() -> Result<(ProbeSet, impl Module, ProbeData)> {
    let probes = ProbeSet::new();
    let p1 = probes.add("h1")?;
    let p2 = probes.add("h2")?;
    let a = Tensor::new(&[[1f32, 1.0], [0.0, 1.0]], &dev())?;
    let bw = Tensor::new(&[[2f32, 0.0], [0.0, 1.0]], &dev())?;
    let bias = Tensor::new(&[0.001f32, 0.0], &dev())?;
    let model = move |xs: &Tensor| -> Result<Tensor> {
        let h1 = p1.forward(&xs.relu()?)?;
        let h2 = p2.forward(&h1.matmul(&a)?.relu()?)?;
        h2.matmul(&bw)?.broadcast_add(&bias)
    };
    let xs = Tensor::new(&[[1f32, 0.5], [0.2, 1.0], [1.0, 2.0]], &dev())?;
    let ys = Tensor::new(&[0u32, 1, 0], &dev())?;
    Ok((probes, model, ProbeData::new(xs, ys)?))
}

#[test]
fn explicit_order_across_two_probes() -> Result<()> {
    let (probes, model, data) = two_probe_net()?;
    let spec = AblationSpec::default()
        .with_fractions(vec![0.0, 0.25, 0.5, 0.75, 1.0])
        .with_order(AblationOrder::Explicit(vec![1, 2, 0, 3]));
    let c = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    // none:           h2 = (x0, x0+x1): (2.001,1.5) ok, (0.401,1.2) ok, (2.001,3) wrong -> 2/3
    // h1[1] zeroed:   h2 = (x0, x0): logits (2x0+.001, x0) -> class 0: ok, wrong, ok   -> 2/3
    // + h2[0] zeroed: logits (0.001, x0) -> class 1: wrong, ok, wrong                  -> 1/3
    // + h1[0] zeroed: h2 = 0, logits (0.001, 0) -> class 0: ok, wrong, ok              -> 2/3
    // + h2[1] zeroed: same                                                              -> 2/3
    let third = 1.0 / 3.0;
    assert!(
        close(
            &c.accuracy,
            &[2.0 * third, 2.0 * third, third, 2.0 * third, 2.0 * third]
        ),
        "{:?}",
        c.accuracy
    );
    // 0.25 · (2/3 + 1/2 + 1/2 + 2/3) = 7/12.
    assert!((c.auc - 7.0 / 12.0).abs() < EPS, "{}", c.auc);
    Ok(())
}

#[test]
fn conv_channels_are_ablated_whole() -> Result<()> {
    let probes = ProbeSet::new();
    let p = probes.add("conv")?;
    let bias = Tensor::new(&[0.001f32, 0.0], &dev())?;
    // logits = per-channel sums over positions (+ tie-break towards class 0).
    let model = move |xs: &Tensor| -> Result<Tensor> {
        p.forward(&xs.relu()?)?.sum((2, 3))?.broadcast_add(&bias)
    };
    let xs = Tensor::new(
        &[
            [[[1f32, 1.0], [1.0, 1.0]], [[0.5, 0.5], [0.0, 0.0]]],
            [[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]],
        ],
        &dev(),
    )?;
    let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &dev())?)?;
    let base = AblationSpec::default()
        .with_fractions(vec![0.0, 0.5, 1.0])
        .with_order(AblationOrder::Explicit(vec![0, 1]));
    // Sums: sample 0 (4, 1) label 0; sample 1 (1, 3) label 1.
    // Zero: channel 0 off -> (0.001,1),(0.001,3): class 1 both -> 1/2; all off -> class 0 -> 1/2.
    let z = Measurement::new(&model, &probes, &data).ablation_curve(&base)?;
    assert!(close(&z.accuracy, &[1.0, 0.5, 0.5]), "{:?}", z.accuracy);
    // Mean over samples and positions: channel 0 = 5/8 (sum 2.5), channel 1 = 4/8 (sum 2).
    // Channel 0 at mean -> (2.501,1) ok, (2.501,3) ok -> 1; both -> (2.501,2) class 0 -> 1/2.
    let m = Measurement::new(&model, &probes, &data)
        .ablation_curve(&base.clone().with_clamp(Clamp::Mean))?;
    assert!(close(&m.accuracy, &[1.0, 1.0, 0.5]), "{:?}", m.accuracy);
    let stats = Measurement::new(&model, &probes, &data)
        .with_batch_size(1)
        .statistics()?
        .clone();
    let u = &stats.probes[0];
    assert_eq!(u.units, 2);
    // Channel 0 values 1,1,1,1,0,0,0,1: mean 0.625, variance 5/8 − 0.625² = 0.234375.
    assert!(
        (u.value.mean[0] - 0.625).abs() < 1e-9
            && (u.value.std[0] - 0.234375f64.sqrt()).abs() < 1e-9,
        "{u:?}"
    );
    Ok(())
}

/// Reproducible pseudo-random values, uniform in [-scale, scale] (the crate's generator).
fn fixed_random(shape: (usize, usize), seed: u64, scale: f32) -> Result<Tensor> {
    let mut rng = candle_reliance::rng::SplitMix64::new(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| ((rng.uniform() * 2.0 - 1.0) as f32) * scale)
        .collect();
    Tensor::from_vec(v, shape, &dev())
}

/// A random 2-hidden-layer MLP (fixed seed) on random data, for comparing evaluation paths.
fn random_mlp(reshape_with_top_batch: bool) -> Result<(ProbeSet, impl Module, ProbeData)> {
    let d = dev();
    let probes = ProbeSet::new();
    let (p1, p2) = (probes.add("a")?, probes.add("b")?);
    let w1 = fixed_random((12, 20), 1, 0.5)?;
    let w2 = fixed_random((20, 16), 2, 0.3)?;
    let w3 = fixed_random((16, 5), 3, 0.3)?;
    let model = move |xs: &Tensor| -> Result<Tensor> {
        let b = xs.dim(0)?;
        let h = p1.forward(&xs.matmul(&w1)?.relu()?)?;
        let h = if reshape_with_top_batch {
            h.reshape((b, 20))?
        } else {
            h
        };
        let h = p2.forward(&h.matmul(&w2)?.relu()?)?;
        h.matmul(&w3)
    };
    let xs = fixed_random((37, 12), 4, 1.0)?;
    let logits = model(&xs)?; // labels the network gets mostly right, so ablation matters
    let ys = logits.argmax(1)?;
    let ys = Tensor::from_vec(
        ys.to_vec1::<u32>()?
            .iter()
            .enumerate()
            .map(|(i, &y)| if i % 4 == 0 { (y + 1) % 5 } else { y })
            .collect::<Vec<_>>(),
        37,
        &d,
    )?;
    Ok((probes, model, ProbeData::new(xs, ys)?))
}

#[test]
fn batched_pass_equals_one_forward_per_level() -> Result<()> {
    let (probes, model, data) = random_mlp(false)?;
    for clamp in [Clamp::Zero, Clamp::Mean] {
        for max_rows in [7, 100, 16384] {
            let spec = AblationSpec::default()
                .with_fractions((0..=8).map(|i| i as f64 / 8.0).collect::<Vec<_>>())
                .with_order(AblationOrder::Random { orders: 4, seed: 3 })
                .with_clamp(clamp);
            let m = || Measurement::new(&model, &probes, &data).with_max_batch_rows(max_rows);
            let batched = m().ablation_curve(&spec)?;
            let single = m().with_batched(false).ablation_curve(&spec)?;
            assert!(batched.batched && !single.batched);
            assert_eq!(
                batched.per_order, single.per_order,
                "{clamp:?}, max rows {max_rows}"
            );
            assert_eq!(batched.auc_per_order, single.auc_per_order);
            assert_eq!(batched.agreement_per_order, single.agreement_per_order);
            // The curve must actually move, or the comparison shows nothing.
            let lowest = batched.accuracy.iter().cloned().fold(1.0, f64::min);
            assert!(batched.accuracy[0] > lowest + 0.2, "{:?}", batched.accuracy);
        }
    }
    Ok(())
}

#[test]
fn model_that_reshapes_with_its_input_batch_falls_back() -> Result<()> {
    let (probes, model, data) = random_mlp(true)?;
    let spec = AblationSpec::default().with_fractions(vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    let fell_back = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    assert!(!fell_back.batched, "expansion cannot pass the reshape");
    let reference = Measurement::new(&model, &probes, &data)
        .with_batched(false)
        .ablation_curve(&spec)?;
    assert_eq!(fell_back.per_order, reference.per_order);
    Ok(())
}

#[test]
fn random_orders_give_interval_and_mean_curve() -> Result<()> {
    let (probes, model, data) = random_mlp(false)?;
    let spec = AblationSpec::default().with_order(AblationOrder::Random {
        orders: 5,
        seed: 11,
    });
    let c = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
    assert_eq!(c.per_order.len(), 5);
    for (i, a) in c.accuracy.iter().enumerate() {
        let mean = c.per_order.iter().map(|o| o[i]).sum::<f64>() / 5.0;
        assert!((a - mean).abs() < EPS);
    }
    let [lo, hi] = c.auc_ci.expect("5 orders give an interval");
    assert!(lo <= c.auc && c.auc <= hi);
    // Same seed, same orders; another seed, other orders.
    assert_eq!(
        Measurement::new(&model, &probes, &data)
            .ablation_curve(&spec)?
            .per_order,
        c.per_order
    );
    let other = spec.clone().with_order(AblationOrder::Random {
        orders: 5,
        seed: 12,
    });
    assert_ne!(
        Measurement::new(&model, &probes, &data)
            .ablation_curve(&other)?
            .per_order,
        c.per_order
    );
    // Nothing and everything ablated do not depend on the order.
    assert!(c
        .per_order
        .iter()
        .all(|o| o[0] == c.per_order[0][0] && o[16] == c.per_order[0][16]));
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let (probes, model, data) = one_probe_net()?;
    let msg = |spec: AblationSpec| {
        Measurement::new(&model, &probes, &data)
            .ablation_curve(&spec)
            .unwrap_err()
            .to_string()
    };
    let base = AblationSpec::default();
    assert!(
        msg(base.clone().with_order(AblationOrder::Explicit(vec![0, 1])))
            .contains("all 3 probed units")
    );
    assert!(msg(base
        .clone()
        .with_order(AblationOrder::Explicit(vec![0, 1, 1])))
    .contains("unit 1 appears twice"));
    assert!(msg(base
        .clone()
        .with_order(AblationOrder::Explicit(vec![0, 1, 3])))
    .contains("unit 3 is out of range"));
    assert!(msg(base.clone().with_fractions(vec![0.0, 1.2])).contains("1.2 is outside [0, 1]"));
    assert!(msg(base.clone().with_fractions(vec![0.5, 0.2])).contains("strictly increasing"));
    assert!(msg(base
        .clone()
        .with_order(AblationOrder::Random { orders: 0, seed: 0 }))
    .contains("orders"));

    // Labels beyond the logits.
    let bad = ProbeData::new(data.xs().clone(), Tensor::new(&[0u32, 1, 2, 1], &dev())?)?;
    let e = Measurement::new(&model, &probes, &bad)
        .ablation_curve(&base)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("label 2 is out of range for a model with 2 logits"),
        "{e}"
    );

    // ProbeData checks.
    let xs = data.xs().clone();
    let e = ProbeData::new(xs.clone(), Tensor::new(&[0u32, 1], &dev())?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 input samples but 2 labels"), "{e}");
    let e = ProbeData::new(xs.clone(), Tensor::new(&[0i64, 1, 1, 1], &dev())?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels must be u32"), "{e}");
    let nan = Tensor::new(&[[f32::NAN, 0.0, 0.0]], &dev())?;
    let e = ProbeData::new(nan, Tensor::new(&[0u32], &dev())?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
    Ok(())
}

#[test]
fn probe_misuse_is_reported() -> Result<()> {
    let d = dev();
    let data = ProbeData::new(
        Tensor::ones((2, 3), DType::F32, &d)?,
        Tensor::new(&[0u32, 1], &d)?,
    )?;
    let spec = AblationSpec::default();

    let probes = ProbeSet::new();
    assert!(
        Measurement::new(&|x: &Tensor| Ok(x.clone()), &probes, &data)
            .ablation_curve(&spec)
            .unwrap_err()
            .to_string()
            .contains("empty")
    );
    let p = probes.add("used")?;
    let _unused = probes.add("forgotten")?;
    let model = |x: &Tensor| p.forward(x);
    let e = Measurement::new(&model, &probes, &data)
        .ablation_curve(&spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("forgotten") && e.contains("not reached"), "{e}");

    let probes = ProbeSet::new();
    let p = probes.add("twice")?;
    let model = |x: &Tensor| p.forward(&p.forward(x)?);
    let e = Measurement::new(&model, &probes, &data)
        .ablation_curve(&spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`twice` ran twice"), "{e}");

    let probes = ProbeSet::new();
    let p = probes.add("rank5")?;
    // (N, 1, 1, 1, U): no supported layout.
    let model = |x: &Tensor| {
        p.forward(&x.unsqueeze(1)?.unsqueeze(1)?.unsqueeze(1)?)?
            .flatten_to(1)?
            .flatten_from(1)
    };
    let e = Measurement::new(&model, &probes, &data)
        .ablation_curve(&spec)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`rank5`") && e.contains("(N, units), (N, T, units) or (N, C, H, W)"),
        "{e}"
    );

    let probes = ProbeSet::new();
    let p = probes.add("flat")?;
    let model = |x: &Tensor| p.forward(x)?.sum(1);
    let e = Measurement::new(&model, &probes, &data)
        .ablation_curve(&spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("logits of shape (N, classes)"), "{e}");
    Ok(())
}

#[test]
fn idle_probe_is_the_identity_without_copy() -> Result<()> {
    let probes = ProbeSet::new();
    let p = probes.add("x")?;
    let xs = Tensor::randn(0f32, 1.0, (4, 5), &dev())?;
    let ys = p.forward(&xs)?;
    assert_eq!(xs.id(), ys.id(), "the same tensor comes back");
    assert!(probes.add("x").is_err());
    assert!(probes.add(" ").is_err());
    Ok(())
}

#[test]
fn class_conditional_means_by_hand() -> Result<()> {
    let (probes, model, data) = one_probe_net()?;
    let s = Measurement::new(&model, &probes, &data)
        .with_batch_size(2)
        .statistics()?
        .clone();
    assert_eq!(s.class_counts, vec![1, 3]);
    // Class 0: sample 0 = (3, 1, 1). Class 1: samples (1,2,0), (2,0.1,3), (1,1.5,2).
    let want = [[3.0, 1.0, 1.0], [4.0 / 3.0, 3.6 / 3.0, 5.0 / 3.0]];
    for (got, want) in s.probes[0].value.class_mean.iter().zip(want) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
    Ok(())
}

#[test]
fn ablation_accuracies_match_the_curve_and_single_units() -> Result<()> {
    let (probes, model, data) = one_probe_net()?;
    let m = Measurement::new(&model, &probes, &data).with_batch_size(4);
    // The curve's sets for order [2, 0, 1], and a single unit worked by hand:
    // unit 1 zeroed: (3.01,0.5) ok, (1.01,0) wrong, (2.01,1.5) wrong, (1.01,1) wrong -> 1/4.
    let sets = vec![vec![], vec![2], vec![2, 0], vec![0, 1, 2], vec![1]];
    let acc = m.ablation_accuracies(&sets, Clamp::Zero)?;
    assert!(close(&acc, &[0.75, 0.75, 0.75, 0.25, 0.25]), "{acc:?}");
    assert!(m.ablation_accuracies(&[vec![3]], Clamp::Zero).is_err());
    Ok(())
}

#[test]
fn probe_data_rejects_infinite_inputs_but_not_large_ones() -> Result<()> {
    let labels = Tensor::new(&[0u32, 1], &dev())?;
    for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let xs = Tensor::new(&[[1f32, 2.0], [bad, 0.0]], &dev())?;
        let e = ProbeData::new(xs, labels.clone()).unwrap_err().to_string();
        assert!(e.contains("NaN or infinite"), "{bad}: {e}");
    }
    // Large finite values are fine (their squares would overflow f32).
    let xs = Tensor::new(&[[3e38f32, -3e38], [1.0, 0.0]], &dev())?;
    assert!(ProbeData::new(xs, labels).is_ok());
    Ok(())
}

#[test]
fn a_batch_dependent_model_is_flagged() -> Result<()> {
    let xs = Tensor::new(&[[3f32, 1.0], [1.0, 2.0], [2.0, 0.5], [0.0, 4.0]], &dev())?;
    let data = ProbeData::new(xs, Tensor::new(&[0u32, 1, 0, 1], &dev())?)?;
    // Normalizing over the batch, as batch norm does in training mode: sample 0 alone becomes
    // (0, 0); in its chunk of four, (3 − 1.5, 1 − 1.875) = (1.5, −0.875).
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let over_batch = move |xs: &Tensor| p.forward(&xs.broadcast_sub(&xs.mean_keepdim(0)?)?.relu()?);
    let m = Measurement::new(&over_batch, &probes, &data);
    assert!(m.statistics()?.batch_dependent);
    // The same layer without the batch: each sample's output is its own.
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let per_sample = move |xs: &Tensor| p.forward(&xs.relu()?);
    let m = Measurement::new(&per_sample, &probes, &data);
    assert!(!m.statistics()?.batch_dependent);
    Ok(())
}
