//! On a slice of the real MNIST digits shipped in `data/`: a network that memorized randomly
//! corrupted labels relies more on single directions (lower ablation AUC) than one trained on
//! clean labels — the paper's central observation (Morcos et al. 2018, Fig. 1).

#[path = "../examples/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{loss, Optimizer, VarMap};
use candle_reliance::curves::{AblationOrder, AblationSpec};
use candle_reliance::data::corrupt_labels;
use candle_reliance::{Measurement, ProbeData, ProbeSet};
use common::idx::load_mnist_dir;
use common::{adamw, Mlp};

const SAMPLES: usize = 1000;

/// Trains a 784-128-128-10 MLP on `ys` until it fits them (or the epoch budget ends) and
/// returns it with its probes and its training accuracy.
fn train(xs: &Tensor, ys: &Tensor, epochs: usize) -> Result<(Mlp, ProbeSet, f64)> {
    let varmap = VarMap::new();
    let probes = ProbeSet::new();
    let model = Mlp::new(&varmap, &[128, 128], 0.0, &probes, 3)?;
    let mut opt = adamw(varmap.all_vars(), 2e-3)?;
    let mut acc = 0.0;
    for _ in 0..epochs {
        for start in (0..SAMPLES).step_by(100) {
            let logits = model.forward(&xs.narrow(0, start, 100)?)?;
            opt.backward_step(&loss::cross_entropy(&logits, &ys.narrow(0, start, 100)?)?)?;
        }
        let pred = model.forward(xs)?.argmax(D::Minus1)?;
        acc = pred
            .eq(ys)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        if acc >= 0.995 {
            break;
        }
    }
    Ok((model, probes, acc))
}

#[test]
fn memorizing_corrupted_labels_lowers_the_ablation_auc() -> Result<()> {
    let data = load_mnist_dir(
        concat!(env!("CARGO_MANIFEST_DIR"), "/data"),
        2000,
        &Device::Cpu,
    )?;
    let xs = data.train.images.narrow(0, 0, SAMPLES)?;
    let clean = data.train.labels.narrow(0, 0, SAMPLES)?;
    let random = Tensor::from_vec(
        corrupt_labels(&clean.to_vec1::<u32>()?, 10, 1.0, 7),
        SAMPLES,
        &Device::Cpu,
    )?;
    let spec = AblationSpec::default().with_order(AblationOrder::Random { orders: 3, seed: 1 });
    let mut report = vec![];
    for (name, ys) in [("clean", &clean), ("random", &random)] {
        let (model, probes, train_acc) = train(&xs, ys, 300)?;
        let curve = Measurement::new(&model, &probes, &ProbeData::new(xs.clone(), ys.clone())?)
            .ablation_curve(&spec)?;
        println!(
            "{name}: train acc {train_acc:.3}, auc {:.3}, normalized {:.3}, curve {:?}",
            curve.auc, curve.normalized_auc, curve.accuracy
        );
        report.push((train_acc, curve));
    }
    let (clean_acc, clean_curve) = &report[0];
    let (random_acc, random_curve) = &report[1];
    // Both networks fit their training labels, so the comparison is at equal training accuracy.
    assert!(
        *clean_acc > 0.98 && *random_acc > 0.9,
        "clean {clean_acc}, random {random_acc}"
    );
    assert!(
        random_curve.normalized_auc + 0.1 < clean_curve.normalized_auc,
        "random labels {:.3} vs clean {:.3}",
        random_curve.normalized_auc,
        clean_curve.normalized_auc
    );
    assert!(random_curve.auc < clean_curve.auc);
    Ok(())
}
