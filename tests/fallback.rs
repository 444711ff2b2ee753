//! The probe ops' fallback for devices without a kernel (Metal, CUDA built without the `cuda`
//! feature), forced on the CPU: every curve and statistic is bit-identical to the CPU ops'.
//! (One test: the switch is process-wide.)

mod common;

use candle_core::{DType, Module, Tensor};
use candle_reliance::curves::NoiseSpec;
use candle_reliance::ops::force_fallback_for_tests;
use candle_reliance::{Clamp, Measurement, ProbeData, ProbeSet};
use common::nets::{cnn, mlp, spec};

type TestResult = anyhow::Result<()>;

/// Every curve and the statistics of `model`, as JSON (so that NaN compares equal to itself).
fn everything(model: &impl Module, probes: &ProbeSet, data: &ProbeData) -> anyhow::Result<String> {
    let m = Measurement::new(model, probes, data);
    let mut out = vec![serde_json::to_string(m.statistics()?)?];
    for clamp in [Clamp::Zero, Clamp::Mean] {
        out.push(serde_json::to_string(
            &m.ablation_curve(&spec(clamp, 3, 5))?,
        )?);
        // One forward per variant, and no shared rows: the other clamp entry points.
        out.push(serde_json::to_string(
            &Measurement::new(model, probes, data)
                .with_batched(false)
                .ablation_curve(&spec(clamp, 2, 6))?,
        )?);
        out.push(serde_json::to_string(
            &Measurement::new(model, probes, data)
                .with_shared_rows(false)
                .with_incremental(false)
                .ablation_curve(&spec(clamp, 2, 7))?,
        )?);
    }
    let noise = NoiseSpec {
        scales: vec![0.1, 1.0, 10.0],
        draws: 2,
        seed: 3,
    };
    out.push(serde_json::to_string(&m.noise_curve(&noise)?)?);
    Ok(out.join("\n"))
}

/// A sequence model: x (N, T, 3) → relu(L1) (N, T, 6) → probe → L2 → mean over T.
fn sequence() -> anyhow::Result<(ProbeSet, impl Module, ProbeData)> {
    let mut rng = candle_reliance::rng::SplitMix64::new(8);
    let probes = ProbeSet::new();
    let l1 = common::nets::linear(&mut rng, 3, 6, false)?;
    let l2 = common::nets::linear(&mut rng, 6, 4, false)?;
    let p = probes.add("h")?;
    let model = move |xs: &Tensor| -> candle_core::Result<Tensor> {
        l2.forward(&p.forward(&l1.forward(xs)?.relu()?)?)?.mean(1)
    };
    let xs = common::nets::random(&mut rng, &[40, 5, 3], -1, 1, false)?;
    let data = common::nets::labelled(&mut rng, &model, xs)?;
    Ok((probes, model, data))
}

#[test]
fn the_fallback_gives_the_bits_of_the_cpu_ops() -> TestResult {
    let (mlp_probes, mlp_model, mlp_data) = mlp(1, false)?;
    let (cnn_probes, cnn_model, cnn_data) = cnn(2, false, (1, 1, 1))?;
    let (seq_probes, seq_model, seq_data) = sequence()?;
    let run = || -> anyhow::Result<Vec<String>> {
        Ok(vec![
            everything(&mlp_model, &mlp_probes, &mlp_data)?,
            everything(&cnn_model, &cnn_probes, &cnn_data)?,
            everything(&seq_model, &seq_probes, &seq_data)?,
        ])
    };
    let ops = run()?;
    force_fallback_for_tests(true);
    let fallback = run();
    force_fallback_for_tests(false);
    let fallback = fallback?;
    for (name, (a, b)) in ["mlp", "cnn", "sequence"]
        .iter()
        .zip(ops.iter().zip(&fallback))
    {
        assert_eq!(a, b, "{name}");
    }
    // Other float types: the clamp by selection, the noise's rounding and the sums on the host.
    for dtype in [DType::F64, DType::F16, DType::BF16] {
        let mut rng = candle_reliance::rng::SplitMix64::new(4);
        let w1 = common::nets::random(&mut rng, &[5, 8], -1, 1, false)?.to_dtype(dtype)?;
        let w2 = common::nets::random(&mut rng, &[8, 3], -1, 1, false)?.to_dtype(dtype)?;
        let probes = ProbeSet::new();
        let p = probes.add("h")?;
        let model = |xs: &Tensor| -> candle_core::Result<Tensor> {
            p.forward(&xs.matmul(&w1)?.relu()?)?.matmul(&w2)
        };
        let xs = common::nets::random(&mut rng, &[30, 5], -1, 1, false)?.to_dtype(dtype)?;
        let data = common::nets::labelled(&mut rng, &model, xs)?;
        let ops = everything(&model, &probes, &data)?;
        force_fallback_for_tests(true);
        let fallback = everything(&model, &probes, &data);
        force_fallback_for_tests(false);
        assert_eq!(ops, fallback?, "{dtype:?}");
    }
    Ok(())
}
