//! Shared rows: the variants of a clamp pass that clamp the same units at every probe reached so
//! far share their rows until a probe tells them apart. Against one forward per variant (no
//! expansion at all), bit for bit on integer-valued networks, with the rows between the probes
//! counted against the distinct masks worked out here.

mod common;

use candle_core::{Module, Result, Tensor};
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp};
use candle_reliance::rng::{permutation, SplitMix64};
use candle_reliance::{Measurement, ProbeData, ProbeSet};
use common::nets::{cnn, labelled, linear, mlp, random, spec, Net};
use std::cell::Cell;
use std::collections::HashSet;

/// A two-probe net whose forward counts the rows between the probes (out of the layer fused
/// with the first probe) and the rows of its logits.
struct Rows<'a, L> {
    net: &'a Net<L>,
    between: Cell<usize>,
    logits: Cell<usize>,
}

impl<'a, L> Rows<'a, L> {
    fn new(net: &'a Net<L>) -> Self {
        Self {
            net,
            between: Cell::new(0),
            logits: Cell::new(0),
        }
    }

    fn take(&self) -> (usize, usize) {
        (self.between.replace(0), self.logits.replace(0))
    }
}

impl<L: Module> Module for Rows<'_, L> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // As `Net::forward`.
        let h = self.net.first.forward(xs)?.relu()?;
        let h = self.net.second.forward(&h)?;
        self.between.set(self.between.get() + h.dim(0)?);
        let out = self.net.third.forward(&h.relu()?)?;
        self.logits.set(self.logits.get() + out.dim(0)?);
        Ok(out)
    }
}

/// Distinct masks of a cumulative curve along `order` at `ks` clamped units: all of them, and
/// their restrictions to the first probe's units `0..first`.
fn distinct_masks(order: &[usize], ks: &[usize], first: usize) -> (usize, usize) {
    let masks = |units: &dyn Fn(usize) -> bool| {
        ks.iter()
            .map(|&k| {
                let mut set: Vec<usize> =
                    order[..k].iter().copied().filter(|&u| units(u)).collect();
                set.sort_unstable();
                set
            })
            .collect::<HashSet<_>>()
            .len()
    };
    (masks(&|_| true), masks(&|u| u < first))
}

#[test]
fn curves_share_the_rows_of_variants_that_agree_on_the_first_probe() -> Result<()> {
    let mut rng = SplitMix64::new(5);
    // Integer networks: probe units 4 + 6 (CNN channels) and 16 + 24 (MLP).
    let nets = [cnn(50, true, (1, 1, 1))?, cnn(51, true, (2, 1, 1))?];
    for (probes, net, data) in &nets {
        check_explicit_orders(&mut rng, probes, net, data, 4)?;
    }
    let (probes, net, data) = mlp(52, true)?;
    check_explicit_orders(&mut rng, &probes, &net, &data, 16)
}

/// For a few random explicit orders: the curve with shared rows equals one forward per
/// variant, the rows between the probes are (distinct first-probe masks) × samples and the
/// logits (distinct masks) × samples; without sharing, both are (distinct masks) × samples.
fn check_explicit_orders<L: Module>(
    rng: &mut SplitMix64,
    probes: &ProbeSet,
    net: &Net<L>,
    data: &ProbeData,
    first_units: usize,
) -> Result<()> {
    let model = Rows::new(net);
    let n = data.len();
    let mut merged_somewhere = false;
    for _ in 0..4 {
        let total = Measurement::new(&model, probes, data)
            .statistics()?
            .total_units();
        let order = permutation(total, rng.next_u64());
        let s = AblationSpec::default()
            .with_fractions(9)
            .with_order(AblationOrder::Explicit(order.clone()));
        let ks: Vec<usize> = (0..9)
            .map(|i| ((i as f64 / 8.0 * total as f64).round() as usize).min(total))
            .collect();
        let (variants, first) = distinct_masks(&order, &ks, first_units);
        let reference = Measurement::new(&model, probes, data)
            .with_batched(false)
            .ablation_curve(&s)?;
        for (shared, incremental) in [(true, true), (true, false), (false, true)] {
            let m = Measurement::new(&model, probes, data)
                .with_shared_rows(shared)
                .with_incremental(incremental);
            m.statistics()?;
            model.take();
            let c = m.ablation_curve(&s)?;
            assert!(c.batched);
            assert_eq!(c.per_order, reference.per_order, "order {order:?}");
            assert_eq!(c.agreement_per_order, reference.agreement_per_order);
            let want_between = if shared { first } else { variants };
            assert_eq!(model.take(), (want_between * n, variants * n), "{order:?}");
        }
        merged_somewhere |= first < variants;
    }
    // Else the counts above would not tell sharing from no sharing.
    assert!(merged_somewhere);
    Ok(())
}

#[test]
fn random_orders_in_groups_and_chunks_equal_one_forward_per_variant() -> Result<()> {
    for seed in 0..3 {
        let (probes, net, data) = cnn(60 + seed, true, (1, 1, 1))?;
        let reference = Measurement::new(&net, &probes, &data)
            .with_batched(false)
            .ablation_curve(&spec(Clamp::Zero, 4, seed))?;
        // Rows bounds that cut the variants into groups (each shares its rows on its own) and
        // the samples into chunks.
        for max_rows in [100_000, 211, 37] {
            let c = Measurement::new(&net, &probes, &data)
                .with_max_batch_rows(max_rows)
                .ablation_curve(&spec(Clamp::Zero, 4, seed))?;
            assert!(c.batched && c.incremental);
            assert_eq!(
                c.per_order, reference.per_order,
                "seed {seed} rows {max_rows}"
            );
            assert_eq!(c.agreement_per_order, reference.agreement_per_order);
        }
    }
    Ok(())
}

#[test]
fn single_unit_ablations_behind_later_probes_share_one_block() -> Result<()> {
    let (probes, net, data) = cnn(70, true, (1, 1, 1))?;
    let model = Rows::new(&net);
    let n = data.len();
    // Units 0..4 are the first probe's channels, 4..10 the second's; one variant clamps
    // nothing, one clamps a unit of each probe.
    let sets: Vec<Vec<usize>> = (0..10)
        .map(|u| vec![u])
        .chain([vec![], vec![1, 7]])
        .collect();
    let reference = Measurement::new(&model, &probes, &data)
        .with_batched(false)
        .ablation_accuracies(&sets, Clamp::Zero)?;
    for clamp in [Clamp::Zero, Clamp::Mean] {
        let m = Measurement::new(&model, &probes, &data);
        m.statistics()?;
        model.take();
        let acc = m.ablation_accuracies(&sets, clamp)?;
        if clamp == Clamp::Zero {
            assert_eq!(acc, reference);
        }
        // At the first probe: nothing clamped (units 4..10 and the empty set), units 0, 1, 2,
        // 3 alone, and unit 1 again for {1, 7}: 5 blocks. After the second: all 12 variants.
        assert_eq!(model.take(), (5 * n, 12 * n), "{clamp:?}");
    }
    Ok(())
}

/// `x → fc1 → ReLU → [probe a] → fc2 → ReLU = h → [probe b] → fc3(b + h)`: the sum mixes the
/// activation before probe b with the one after it.
fn skip_net(seed: u64) -> Result<(ProbeSet, impl Module, ProbeData)> {
    let mut rng = SplitMix64::new(seed);
    let probes = ProbeSet::new();
    let (a, b) = (probes.add("a")?, probes.add("b")?);
    let (fc1, fc2, fc3) = (
        linear(&mut rng, 12, 16, true)?,
        linear(&mut rng, 16, 24, true)?,
        linear(&mut rng, 24, 5, true)?,
    );
    let model = move |xs: &Tensor| -> Result<Tensor> {
        let h = fc2
            .forward(&a.forward(&fc1.forward(xs)?.relu()?)?)?
            .relu()?;
        fc3.forward(&(b.forward(&h)? + h)?)
    };
    let xs = random(&mut rng, &[120, 12], 0, 3, true)?;
    let data = labelled(&mut rng, &model, xs)?;
    Ok((probes, model, data))
}

#[test]
fn a_skip_connection_across_a_later_probe_keeps_a_block_per_variant() -> Result<()> {
    let (probes, model, data) = skip_net(80)?;
    // Probe b's 24 units first: the first levels clamp nothing at probe a, so their rows would
    // be shared there, and `b + h` would add 24 rows to fewer.
    let order: Vec<usize> = (16..40).chain(0..16).collect();
    let s = AblationSpec::default()
        .with_fractions(9)
        .with_order(AblationOrder::Explicit(order));
    let reference = Measurement::new(&model, &probes, &data)
        .with_batched(false)
        .ablation_curve(&s)?;
    let separate = Measurement::new(&model, &probes, &data);
    let stats = separate.statistics()?.clone();
    for max_rows in [100_000, 300] {
        // The curve first: its pass also yields the statistics, and its first chunk runs twice.
        let m = Measurement::new(&model, &probes, &data).with_max_batch_rows(max_rows);
        let c = m.ablation_curve(&s)?;
        assert!(c.batched, "fell back to one forward per variant");
        assert_eq!(c.per_order, reference.per_order);
        assert_eq!(c.agreement_per_order, reference.agreement_per_order);
        assert_eq!(m.statistics()?, &stats, "rows {max_rows}");
    }
    Ok(())
}

/// Three probes of 4, 6 and 8 units behind integer dense layers, counting the rows between
/// them: `fc1 → ReLU → [a] → fc2 → ReLU → [b] → fc3 → ReLU → [c] → fc4`.
struct ThreeProbes {
    layers: [candle_nn::Linear; 4],
    probes: [candle_reliance::probe::Probe; 3],
    rows: [Cell<usize>; 3],
}

impl Module for ThreeProbes {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, probe) in self.probes.iter().enumerate() {
            h = self.layers[i].forward(&h)?.relu()?;
            h = probe.forward(&h)?;
            self.rows[i].set(self.rows[i].get() + h.dim(0)?);
        }
        self.layers[3].forward(&h)
    }
}

#[test]
fn a_middle_probe_splits_the_blocks_it_receives() -> Result<()> {
    let mut rng = SplitMix64::new(90);
    let set = ProbeSet::new();
    let model = ThreeProbes {
        layers: [
            linear(&mut rng, 10, 4, true)?,
            linear(&mut rng, 4, 6, true)?,
            linear(&mut rng, 6, 8, true)?,
            linear(&mut rng, 8, 5, true)?,
        ],
        probes: [set.add("a")?, set.add("b")?, set.add("c")?],
        rows: Default::default(),
    };
    let xs = random(&mut rng, &[90, 10], 0, 3, true)?;
    let data = labelled(&mut rng, &model, xs)?;
    let n = data.len();
    let take = || model.rows.each_ref().map(|r| r.replace(0));
    let mut split_in_the_middle = false;
    for _ in 0..6 {
        let order = permutation(18, rng.next_u64());
        let s = AblationSpec::default()
            .with_fractions(13)
            .with_order(AblationOrder::Explicit(order.clone()));
        let ks: Vec<usize> = (0..13)
            .map(|i| ((i as f64 / 12.0 * 18.0).round() as usize).min(18))
            .collect();
        // Distinct masks over all three probes, over probe a (units 0..4), over a and b
        // (units 0..10).
        let (variants, after_a) = distinct_masks(&order, &ks, 4);
        let (_, after_b) = distinct_masks(&order, &ks, 10);
        split_in_the_middle |= after_a < after_b && after_b < variants;
        let reference = Measurement::new(&model, &set, &data)
            .with_batched(false)
            .ablation_curve(&s)?;
        let m = Measurement::new(&model, &set, &data);
        m.statistics()?;
        take();
        let c = m.ablation_curve(&s)?;
        assert!(c.batched);
        assert_eq!(c.per_order, reference.per_order, "order {order:?}");
        assert_eq!(c.agreement_per_order, reference.agreement_per_order);
        // Rows after probe a, b and c: blocks that agree on a; on a and b; every variant.
        assert_eq!(
            take(),
            [after_a * n, after_b * n, variants * n],
            "order {order:?}"
        );
    }
    // Probe b split blocks that probe a left (and c split b's) in some order.
    assert!(split_in_the_middle);
    Ok(())
}
