//! Class selectivity, mutual information, single-unit importance, Spearman correlation, ordered
//! ablation and the selectivity regularizer against hand-worked small tables and networks.

mod common;

use candle_core::{DType, Module, Result, Tensor, Var};
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp};
use candle_reliance::monitor::read_history;
use candle_reliance::units::{
    incoming_l1, mutual_information_bits, quantile_bins, selectivity_regularizer, spearman,
    Selectivity, WeightLayout,
};
use candle_reliance::{
    CheckRecord, Measurement, ProbeData, ProbeSet, RelianceConfig, RelianceMonitor,
};
use common::{dev, one_probe_net};

const TOL: f64 = 1e-9;

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
}

/// Six samples of five units; labels 0, 0, 1, 1, 3, 3 (class 2 has no samples).
/// Class means per unit (classes 0, 1, 3):
/// u0: 2, 0, 0   → (2 − 0) / (2 + 0) = 1
/// u1: 5, 5, 5   → 0
/// u2: 3, 1, 1   → (3 − 1) / (3 + 1) = 0.5
/// u3: 0, 0, 0   → 0 (the ε guard)
/// u4: 1, 4, 1   → (4 − 1) / (4 + 1) = 0.6
fn table() -> Result<ProbeData> {
    let xs = Tensor::new(
        &[
            [1f32, 5.0, 2.0, 0.0, 1.0],
            [3.0, 5.0, 4.0, 0.0, 1.0],
            [0.0, 5.0, 1.0, 0.0, 4.0],
            [0.0, 5.0, 1.0, 0.0, 4.0],
            [0.0, 5.0, 0.0, 0.0, 2.0],
            [0.0, 5.0, 2.0, 0.0, 0.0],
        ],
        &dev(),
    )?;
    Ok(ProbeData::new(
        xs,
        Tensor::new(&[0u32, 0, 1, 1, 3, 3], &dev())?,
    )?)
}

#[test]
fn selectivity_of_a_hand_worked_table() -> Result<()> {
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let model = |xs: &Tensor| p.forward(xs);
    // Chunks of 4 samples: the class sums must add up across chunks.
    let s = Measurement::new(&model, &probes, &table()?)
        .with_batch_size(4)
        .selectivity()?;
    assert_eq!(s.classes, 3, "class 2 has no samples and is skipped");
    assert!(
        close(&s.probes[0].value, &[1.0, 0.0, 0.5, 0.0, 0.6], TOL),
        "{:?}",
        s.probes[0].value
    );
    assert!((s.means()[0] - 2.1 / 5.0).abs() < TOL);
    assert!((s.mean() - 0.42).abs() < TOL);
    assert_eq!(s.probes[0].offset, 0);
    Ok(())
}

#[test]
fn selectivity_of_feature_maps_averages_positions_first() -> Result<()> {
    let probes = ProbeSet::new();
    let dense = probes.add("dense")?;
    let conv = probes.add("conv")?;
    // conv input (N, C, H, W) = (4, 2, 1, 2); the dense probe sees the flattened map.
    let model = |xs: &Tensor| {
        dense.forward(&xs.flatten_from(1)?)?;
        conv.forward(xs)?.flatten_from(1)
    };
    let xs = Tensor::new(
        &[
            [[[2f32, 0.0]], [[1.0, 3.0]]],
            [[[4.0, 0.0]], [[2.0, 2.0]]],
            [[[0.0, 0.0]], [[1.0, 1.0]]],
            [[[0.0, 0.0]], [[0.0, 2.0]]],
        ],
        &dev(),
    )?;
    let data = ProbeData::new(xs, Tensor::new(&[0u32, 0, 1, 1], &dev())?)?;
    let s = Measurement::new(&model, &probes, &data)
        .with_batch_size(3)
        .selectivity()?;
    // Channel 0: position means 1, 2 (class 0) and 0, 0 → class means 1.5, 0 → 1.
    // Channel 1: position means 2, 2 and 1, 1 → class means 2, 1 → (2 − 1) / 3.
    assert_eq!(s.probes[1].name, "conv");
    assert_eq!(s.probes[1].offset, 4);
    assert!(
        close(&s.probes[1].value, &[1.0, 1.0 / 3.0], TOL),
        "{:?}",
        s.probes[1].value
    );
    // The dense view: units (2,0,1,3) per sample; class means [3,0,1.5,2.5] and [0,0,0.5,1.5].
    // → 1, 0 (all zero), (1.5 − 0.5) / 2 = 0.5, (2.5 − 1.5) / 4 = 0.25.
    assert!(
        close(&s.probes[0].value, &[1.0, 0.0, 0.5, 0.25], TOL),
        "{:?}",
        s.probes[0].value
    );
    // Positions per unit and sample: 1 × 2 for the map, 1 for the dense view; a sample holds
    // 4 values at either probe.
    let stats = Measurement::new(&model, &probes, &data)
        .with_batch_size(3)
        .statistics()?
        .clone();
    assert_eq!(stats.probes[1].value.positions, 2);
    assert_eq!(stats.probes[0].value.positions, 1);
    assert_eq!(stats.widest_sample(), 4);
    // The activity capture averages positions too: rows of channel means.
    let act = Measurement::new(&model, &probes, &data)
        .with_batch_size(3)
        .activity()?;
    assert_eq!(
        act.probes[1].value,
        vec![1.0, 2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 1.0]
    );
    assert_eq!(act.probes[1].offset, 4);
    Ok(())
}

#[test]
fn a_unit_active_for_one_class_has_selectivity_one_and_mi_of_the_label_entropy() -> Result<()> {
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let model = |xs: &Tensor| p.forward(xs);
    // Unit 0 fires for class 0 only; unit 1 is the same for everyone.
    let xs = Tensor::new(&[[1f32, 7.0], [2.0, 7.0], [0.0, 7.0], [0.0, 7.0]], &dev())?;
    let data = ProbeData::new(xs, Tensor::new(&[0u32, 0, 1, 1], &dev())?)?;
    let s = Measurement::new(&model, &probes, &data)
        .with_batch_size(4)
        .selectivity()?;
    assert!(close(&s.probes[0].value, &[1.0, 0.0], TOL));
    let mi = Measurement::new(&model, &probes, &data)
        .with_batch_size(3)
        .mutual_information(10)?;
    // Balanced binary labels: H = 1 bit; unit 0's bins {0, 0} vs {5, 7} determine the label.
    assert!((mi.label_entropy_bits - 1.0).abs() < TOL);
    assert!(
        close(&mi.probes[0].value, &[1.0, 0.0], TOL),
        "{:?}",
        mi.probes[0].value
    );
    assert_eq!(mi.bins, 10);
    Ok(())
}

#[test]
fn mutual_information_of_a_hand_worked_table_with_ties() -> Result<()> {
    // Unit 2 of the table: values 2, 4, 1, 1, 0, 2. Sorted positions: 0 → 0; 1, 1 → 1, 2; 2, 2
    // → 3, 4; 4 → 5. Ten bins, bin = ⌊pos · 10 / 6⌋ of the first tied position: 0 → 0,
    // 1 → 1, 2 → 5, 4 → 8.
    assert_eq!(
        quantile_bins(&[2.0, 4.0, 1.0, 1.0, 0.0, 2.0], 10),
        vec![5, 8, 1, 1, 0, 5]
    );
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let model = |xs: &Tensor| p.forward(xs);
    let mi = Measurement::new(&model, &probes, &table()?)
        .with_batch_size(4)
        .mutual_information(10)?;
    let h = 3f64.log2(); // three balanced classes present
                         // u0: values 1, 3 (class 0) in bins 6, 8; the four zeros (classes 1, 1, 3, 3) in bin 0:
                         //     H(Y|B) = 4/6 · 1 bit → I = log₂3 − 2/3.
                         // u1, u3: constant → one bin → 0.
                         // u2: bins {0: class 3}, {1: 1, 1}, {5: 0, 3}, {8: 0} → H(Y|B) = 2/6 · 1 → log₂3 − 1/3.
                         // u4: values 1, 1 | 4, 4 | 2, 0 → bins 1, 1 | 8, 8 | 5, 0: every bin is pure → log₂3.
    let want = [h - 2.0 / 3.0, 0.0, h - 1.0 / 3.0, 0.0, h];
    assert!(
        close(&mi.probes[0].value, &want, TOL),
        "{:?}",
        mi.probes[0].value
    );
    assert!((mi.label_entropy_bits - h).abs() < TOL);
    // Two bins: u0 → zeros in bin 0, 1 and 3 at positions 4, 5 → bin 1: still log₂3 − 2/3.
    let two = mutual_information_bits(&[1.0, 3.0, 0.0, 0.0, 0.0, 0.0], &[0, 0, 1, 1, 3, 3], 2);
    assert!((two - (h - 2.0 / 3.0)).abs() < TOL, "{two}");
    Ok(())
}

#[test]
fn importance_is_the_single_unit_ablation_worked_by_hand() -> Result<()> {
    let (probes, model, data) = one_probe_net()?;
    let m = Measurement::new(&model, &probes, &data).with_batch_size(4);
    // Logits (h0 + 0.01, h1 + 0.5 h2); unablated (3.01,1.5) ok, (1.01,2) ok, (2.01,1.6) wrong,
    // (1.01,2.5) ok → 3/4.
    // u0 zeroed: (0.01,1.5) wrong, (0.01,2) ok, (0.01,1.6) ok, (0.01,2.5) ok → 3/4 → 0.
    // u1 zeroed: (3.01,0.5) ok, (1.01,0) wrong, (2.01,1.5) wrong, (1.01,1) wrong → 1/4 → 0.5.
    // u2 zeroed: (3.01,1) ok, (1.01,2) ok, (2.01,0.1) wrong, (1.01,1.5) ok → 3/4 → 0.
    // A bound of 5 rows per expanded forward splits the levels and the samples.
    let zero = Measurement::new(&model, &probes, &data)
        .with_max_batch_rows(5)
        .importance(Clamp::Zero)?;
    assert!(close(&zero.per_unit(), &[0.0, 0.5, 0.0], TOL), "{zero:?}");
    assert!(close(&zero.accuracy, &[0.75, 0.25, 0.75], TOL));
    assert_eq!(zero.unablated_accuracy, 0.75);
    // Mean clamp (means 1.75, 1.15, 1.5):
    // u0 → class-0 logit 1.76: (1.76,1.5) ok, (1.76,2) ok, (1.76,1.6) wrong, (1.76,2.5) ok → 0.
    // u1 → class-1 logit 1.15 + 0.5 h2: 1.65 < 3.01 ok, 1.15 > 1.01 ok, 2.65 ok, 2.15 ok → all
    //      right: importance 0.75 − 1 = −0.25.
    // u2 → class-1 logit h1 + 0.75: 1.75 ok, 2.75 ok, 0.85 wrong, 2.25 ok → 0.
    let imp = m.importance(Clamp::Mean)?;
    assert!(close(&imp.per_unit(), &[0.0, -0.25, 0.0], 1e-6), "{imp:?}");

    // The same single-unit zero ablations computed directly, without probes: mask h.
    let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.0, 0.5]], &dev())?;
    let b = Tensor::new(&[0.01f32, 0.0], &dev())?;
    let labels = data.label_values().to_vec();
    for u in 0..3 {
        let mut m = vec![1f32; 3];
        m[u] = 0.0;
        let mask = Tensor::new(m.as_slice(), &dev())?;
        let logits = data
            .xs()
            .relu()?
            .broadcast_mul(&mask)?
            .matmul(&w)?
            .broadcast_add(&b)?;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        let acc = pred.iter().zip(&labels).filter(|(p, l)| p == l).count() as f64 / 4.0;
        assert!((zero.per_unit()[u] - (0.75 - acc)).abs() < TOL, "unit {u}");
    }
    Ok(())
}

#[test]
fn spearman_with_ties_worked_by_hand() {
    // a ranks 1, 2.5, 2.5, 4; b ranks 1, 3, 2, 4; deviations from 2.5:
    // (−1.5, 0, 0, 1.5) and (−1.5, 0.5, −0.5, 1.5): Σxy = 4.5, Σx² = 4.5, Σy² = 5 → √0.9.
    let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
    assert!((r - 0.9f64.sqrt()).abs() < 1e-12, "{r}");
    // Ties on both sides: a ranks 1, 2.5, 2.5, 4, 5; b = 5, 5, 1, 0, 0 ranks 4.5, 4.5, 3, 1.5,
    // 1.5; deviations from 3: (−2, −.5, −.5, 1, 2), (1.5, 1.5, 0, −1.5, −1.5):
    // Σxy = −8.25, Σx² = 9.5, Σy² = 9.
    let r = spearman(&[10.0, 20.0, 20.0, 30.0, 40.0], &[5.0, 5.0, 1.0, 0.0, 0.0]);
    assert!((r - (-8.25 / (9.5f64 * 9.0).sqrt())).abs() < 1e-12, "{r}");
    // Non-finite pairs are dropped: the NaN pair goes, the rest is perfectly reversed.
    let r = spearman(&[1.0, f64::NAN, 2.0, 3.0], &[3.0, 0.0, 2.0, 1.0]);
    assert!((r + 1.0).abs() < 1e-12, "{r}");
    assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
}

#[test]
fn incoming_l1_of_linear_rows_and_conv_channels() -> Result<()> {
    let w = Tensor::new(&[[1f32, -2.0, 0.5], [0.0, 0.0, -4.0]], &dev())?;
    assert_eq!(incoming_l1(&w, WeightLayout::Linear)?, vec![3.5, 4.0]);
    // (out 2, in 1, 2, 2): channel 0 |1|+|−1|+|2|+|0| = 4, channel 1 0.5·4 = 2.
    let c = Tensor::new(
        &[[[[1f32, -1.0], [2.0, 0.0]]], [[[0.5, 0.5], [-0.5, 0.5]]]],
        &dev(),
    )?;
    assert_eq!(incoming_l1(&c, WeightLayout::Conv2d)?, vec![4.0, 2.0]);
    assert!(incoming_l1(&c, WeightLayout::Linear).is_err());
    Ok(())
}

/// Logits are the three probed units (class u ← unit u). Five samples:
/// s0 c0 (3, 0, 1), s1 c1 (0, 2, 1), s2 c2 (1, 1, 2), s3 c2 (0, .5, 1), s4 c1 (0, 3, 2).
/// Class means: c0 (3, 0, 1), c1 (0, 2.5, 1.5), c2 (.5, .75, 1.5), so selectivity
/// u0 (3 − .25) / 3.25 = 11/13, u1 (2.5 − .375) / 2.875 = 17/23, u2 (1.5 − 1.25) / 2.75 = 1/11.
/// All right unablated. Zeroing u0 alone: s0 → (0,0,1) wrong → 0.8; u1: s1 → (0,0,1), s4 →
/// (0,0,2) wrong → 0.6; u2: s2 → (1,1,0) arg-max 0, s3 → (0,.5,0) wrong → 0.6.
fn identity_logit_net() -> Result<(ProbeSet, impl Module, ProbeData)> {
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let model = move |xs: &Tensor| p.forward(xs);
    let xs = Tensor::new(
        &[
            [3f32, 0.0, 1.0],
            [0.0, 2.0, 1.0],
            [1.0, 1.0, 2.0],
            [0.0, 0.5, 1.0],
            [0.0, 3.0, 2.0],
        ],
        &dev(),
    )?;
    let ys = Tensor::new(&[0u32, 1, 2, 2, 1], &dev())?;
    Ok((probes, model, ProbeData::new(xs, ys)?))
}

#[test]
fn ordered_ablation_follows_selectivity_and_importance() -> Result<()> {
    let (probes, model, data) = identity_logit_net()?;
    let stats = Measurement::new(&model, &probes, &data)
        .with_batch_size(2)
        .statistics()?
        .clone();
    let sel = Selectivity::from_stats(&stats).per_unit();
    assert!(
        close(&sel, &[11.0 / 13.0, 17.0 / 23.0, 1.0 / 11.0], TOL),
        "{sel:?}"
    );
    let imp = Measurement::new(&model, &probes, &data)
        .importance(Clamp::Zero)?
        .per_unit();
    assert!(close(&imp, &[0.2, 0.4, 0.4], TOL), "{imp:?}");
    let curve = |order: AblationOrder| -> Result<Vec<f64>> {
        let spec = AblationSpec::default()
            .with_fractions(vec![0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0])
            .with_order(order);
        Ok(Measurement::new(&model, &probes, &data)
            .ablation_curve(&spec)?
            .accuracy)
    };
    // Most selective first: 0, 1, 2. k=1 → 0.8 (only unit 0 gives it). k=2, units 0 and 1:
    // s0 (0,0,1), s1 (0,0,1), s4 (0,0,2) wrong; s2 (0,0,2), s3 (0,0,1) right → 0.4 (units 0, 2
    // would give 0.6). All zero: arg-max 0 everywhere, only s0 right → 0.2.
    let most = curve(AblationOrder::MostSelectiveFirst)?;
    assert!(close(&most, &[1.0, 0.8, 0.4, 0.2], TOL), "{most:?}");
    // Least selective first: 2, 1, 0. k=1 → 0.6; k=2, units 1 and 2: only s0 (3,0,0) right.
    let least = curve(AblationOrder::LeastSelectiveFirst)?;
    assert!(close(&least, &[1.0, 0.6, 0.2, 0.2], TOL), "{least:?}");
    // Importance 0.2, 0.4, 0.4: most important first 1, 2, 0 (tie by index), the least
    // important first 0, 1, 2.
    let most_imp = curve(AblationOrder::MostImportantFirst)?;
    assert!(close(&most_imp, &[1.0, 0.6, 0.2, 0.2], TOL), "{most_imp:?}");
    let least_imp = curve(AblationOrder::LeastImportantFirst)?;
    assert!(
        close(&least_imp, &[1.0, 0.8, 0.4, 0.2], TOL),
        "{least_imp:?}"
    );
    // The names the `order` key takes, next to the random orders'.
    let names: Vec<serde_json::Value> = [
        AblationOrder::MostSelectiveFirst,
        AblationOrder::LeastSelectiveFirst,
        AblationOrder::MostImportantFirst,
        AblationOrder::LeastImportantFirst,
        AblationOrder::Random { orders: 3, seed: 0 },
    ]
    .into_iter()
    .map(|o| serde_json::to_value(AblationSpec::default().with_order(o)).unwrap()["order"].clone())
    .collect();
    assert_eq!(
        names,
        [
            "most_selective_first",
            "least_selective_first",
            "most_important_first",
            "least_important_first",
            "random",
        ]
    );
    Ok(())
}

fn reg_value(acts: &[f64], shape: (usize, usize), labels: &Tensor) -> Result<f64> {
    let a = Tensor::from_vec(acts.to_vec(), shape, &dev())?;
    selectivity_regularizer(&[a], labels, 4)?.to_scalar::<f64>()
}

#[test]
fn regularizer_value_is_the_mean_selectivity_worked_by_hand() -> Result<()> {
    let data = table()?;
    // Same table as above: 1, 0, 0.5, 0 (silent unit), 0.6 → 0.42.
    let reg = selectivity_regularizer(&[data.xs().clone()], data.labels(), 4)?;
    assert_eq!(reg.dims(), &[] as &[usize]);
    assert!((reg.to_scalar::<f32>()? as f64 - 0.42).abs() < 1e-6);
    // Two probes: the mean of the per-probe means; the second holds unit 0 only (1) → 0.71.
    let second = data.xs().narrow(1, 0, 1)?;
    let reg = selectivity_regularizer(&[data.xs().clone(), second], data.labels(), 4)?;
    assert!((reg.to_scalar::<f32>()? as f64 - 0.71).abs() < 1e-6);
    // One class in the batch: 0.
    let one = Tensor::new(&[2u32, 2], &dev())?;
    let reg = selectivity_regularizer(&[data.xs().narrow(0, 0, 2)?], &one, 4)?;
    assert_eq!(reg.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn regularizer_gradient_matches_finite_differences() -> Result<()> {
    // Positive activity, three classes, a unique top class mean per unit.
    let vals: Vec<f64> = vec![
        1.0, 0.2, 0.7, //
        2.0, 0.3, 0.5, //
        0.4, 1.5, 0.6, //
        0.1, 2.5, 0.9, //
        0.3, 0.4, 2.0, //
        0.6, 0.2, 1.1, //
    ];
    let shape = (6, 3);
    let labels = Tensor::new(&[0u32, 0, 1, 1, 3, 3], &dev())?;
    let a = Var::from_tensor(&Tensor::from_vec(vals.clone(), shape, &dev())?)?;
    let reg = selectivity_regularizer(&[a.as_tensor().clone()], &labels, 4)?;
    let grads = reg.backward()?;
    let g = grads
        .get(a.as_tensor())
        .expect("a gradient for the activations")
        .flatten_all()?
        .to_vec1::<f64>()?;
    let h = 1e-6;
    for i in 0..vals.len() {
        let (mut up, mut down) = (vals.clone(), vals.clone());
        up[i] += h;
        down[i] -= h;
        let fd = (reg_value(&up, shape, &labels)? - reg_value(&down, shape, &labels)?) / (2.0 * h);
        assert!((g[i] - fd).abs() < 1e-7, "element {i}: {} vs {fd}", g[i]);
    }
    assert!(g.iter().any(|v| v.abs() > 1e-3), "a non-trivial gradient");

    // Through a layer and a captured forward: gradient with respect to the weight.
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let x = Tensor::new(
        &[
            [1.0f64, 0.2],
            [0.9, 0.1],
            [0.2, 1.0],
            [0.3, 0.8],
            [0.5, 0.5],
            [0.6, 0.7],
        ],
        &dev(),
    )?;
    let w0 = vec![0.8f64, 0.1, 0.3, 0.2, 0.9, 0.4];
    let forward_reg = |w: &Tensor| -> Result<Tensor> {
        let cap = probes.capture()?;
        p.forward(&x.matmul(w)?.exp()?)?;
        let acts = cap.finish()?;
        Ok(selectivity_regularizer(&acts, &labels, 4)?)
    };
    let w = Var::from_tensor(&Tensor::from_vec(w0.clone(), (2, 3), &dev())?)?;
    let grads = forward_reg(w.as_tensor())?.backward()?;
    let gw = grads
        .get(w.as_tensor())
        .expect("a gradient for the weight")
        .flatten_all()?
        .to_vec1::<f64>()?;
    for i in 0..w0.len() {
        let (mut up, mut down) = (w0.clone(), w0.clone());
        up[i] += h;
        down[i] -= h;
        let f = |v: Vec<f64>| -> Result<f64> {
            forward_reg(&Tensor::from_vec(v, (2, 3), &dev())?)?.to_scalar::<f64>()
        };
        let fd = (f(up)? - f(down)?) / (2.0 * h);
        assert!((gw[i] - fd).abs() < 1e-7, "weight {i}: {} vs {fd}", gw[i]);
    }
    // After finish the probe is an identity again.
    let y = p.forward(&x)?;
    assert_eq!(y.to_vec2::<f64>()?, x.to_vec2::<f64>()?);
    Ok(())
}

#[test]
fn capture_requires_every_probe() -> Result<()> {
    let probes = ProbeSet::new();
    let p = probes.add("a")?;
    probes.add("b")?;
    let cap = probes.capture()?;
    p.forward(&Tensor::ones((2, 3), DType::F32, &dev())?)?;
    let err = cap.finish().unwrap_err().to_string();
    assert!(err.contains("b") && err.contains("not reached"), "{err}");
    Ok(())
}

#[test]
fn the_monitor_records_mean_selectivity_per_probe_when_asked() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let hist = dir.path().join("hist.jsonl");
    let (probes, model, data) = identity_logit_net()?;
    let cfg = RelianceConfig::from_yaml_str(&format!(
        "schedule: {{warmup_epochs: 1}}\nselectivity: true\nablation: {{fractions: 3, orders: 1}}\n\
         restore_best: {{enabled: false}}\noutput: {{history_file: {}}}\n",
        hist.display()
    ))?;
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
    monitor.check(1, &model)?;
    let want = (11.0 / 13.0 + 17.0 / 23.0 + 1.0 / 11.0) / 3.0;
    let records = read_history(&hist)?;
    let rec = &records[0];
    let got = rec.selectivity.clone().expect("selectivity recorded");
    assert!(close(&got, &[want], TOL), "{got:?}");
    // A history line written before the field existed still parses, with no selectivity.
    let mut v = serde_json::to_value(rec).unwrap();
    v.as_object_mut().unwrap().remove("selectivity");
    let old: CheckRecord = serde_json::from_value(v).unwrap();
    assert_eq!(old.selectivity, None);
    // Off by default.
    let (probes, model, data) = identity_logit_net()?;
    let cfg = RelianceConfig::from_yaml_str("schedule: {warmup_epochs: 1}\n")?;
    let mut monitor = RelianceMonitor::new(cfg, probes, data)?;
    monitor.check(1, &model)?;
    assert_eq!(monitor.history()[0].selectivity, None);
    Ok(())
}
