//! The probe ops on views: transposed (non-contiguous) and offset (contiguous, starting inside
//! a larger storage) activations, masks and labels give exactly what the same values in a
//! fresh contiguous tensor give. The contiguous results themselves are checked by hand-worked
//! cases in the other test files.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_reliance::curves::{AblationOrder, AblationSpec};
use candle_reliance::ops::{level_clamp_for_tests, level_noise_for_tests, unit_sums_for_tests};
use candle_reliance::{Measurement, ProbeData, ProbeSet};

/// Deterministic non-zero values.
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 1000;
            (h as f32 - 499.5) / 97.0
        })
        .collect()
}

/// The same values as `x` in three layouts: fresh, transposed (non-contiguous) and offset.
fn views(x: &Tensor) -> Result<Vec<(&'static str, Tensor)>> {
    let transposed = match x.rank() {
        1 => x.clone(),
        2 => x.t()?.contiguous()?.t()?,
        4 => x
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .permute((0, 3, 1, 2))?,
        r => panic!("rank {r}"),
    };
    assert!(x.rank() == 1 || !transposed.is_contiguous());
    let pad = Tensor::zeros([&[3usize], &x.dims()[1..]].concat(), x.dtype(), x.device())?;
    let offset = Tensor::cat(&[&pad, x], 0)?.narrow(0, 3, x.dim(0)?)?;
    assert!(offset.is_contiguous());
    Ok(vec![
        ("fresh", x.clone()),
        ("transposed", transposed),
        ("offset", offset),
    ])
}

fn bits(t: &Tensor) -> Result<Vec<u64>> {
    Ok(t.to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

const SHAPES: &[&[usize]] = &[&[6, 5], &[4, 3, 2, 3]];

#[test]
fn level_ops_ignore_the_layout() -> Result<()> {
    let dev = Device::Cpu;
    for shape in SHAPES {
        let levels = 3;
        let units = shape[1];
        let n: usize = shape.iter().product();
        let x = Tensor::from_vec(values(n, 1), *shape, &dev)?;
        let keep: Vec<u8> = (0..levels * units).map(|i| (i % 3 != 1) as u8).collect();
        let keep = Tensor::from_vec(keep, (levels, units), &dev)?;
        let vals = Tensor::from_vec(values(units, 2), units, &dev)?;
        let std = Tensor::from_vec(values(levels * units, 3), (levels, units), &dev)?.abs()?;
        let want_clamp = bits(&level_clamp_for_tests(&x, &keep, &vals, true)?)?;
        let want_noise = bits(&level_noise_for_tests(&x, &std, true, 9, (0, 0, shape[0]))?)?;
        for (xname, xv) in views(&x)? {
            for (kname, kv) in views(&keep)? {
                let got = bits(&level_clamp_for_tests(&xv, &kv, &vals, true)?)?;
                assert_eq!(got, want_clamp, "clamp {shape:?} x {xname}, keep {kname}");
            }
            for (sname, sv) in views(&std)? {
                let got = bits(&level_noise_for_tests(&xv, &sv, true, 9, (0, 0, shape[0]))?)?;
                assert_eq!(got, want_noise, "noise {shape:?} x {xname}, std {sname}");
            }
        }
        // In-place shape: the input already has levels × rows.
        let big = Tensor::cat(&[&x, &x, &x], 0)?;
        let want = bits(&level_clamp_for_tests(&big, &keep, &vals, false)?)?;
        for (name, v) in views(&big)? {
            let got = bits(&level_clamp_for_tests(&v, &keep, &vals, false)?)?;
            assert_eq!(got, want, "in-place clamp {shape:?} x {name}");
        }
    }
    Ok(())
}

#[test]
fn unit_sums_ignore_the_layout() -> Result<()> {
    let dev = Device::Cpu;
    for shape in SHAPES {
        let n: usize = shape.iter().product();
        let x = Tensor::from_vec(values(n, 4), *shape, &dev)?;
        let labels: Vec<u32> = (0..shape[0] as u32).map(|r| r % 3).collect();
        let labels = Tensor::from_vec(labels, shape[0], &dev)?;
        let want = bits(&unit_sums_for_tests(&x, &labels, 3)?)?;
        for (xname, xv) in views(&x)? {
            for (lname, lv) in views(&labels)? {
                let got = bits(&unit_sums_for_tests(&xv, &lv, 3)?)?;
                assert_eq!(got, want, "unit sums {shape:?} x {xname}, labels {lname}");
            }
        }
    }
    Ok(())
}

/// A probe that sees a transposed activation measures the same curve as one that sees it
/// contiguous.
#[test]
fn a_curve_through_a_non_contiguous_activation() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(values(6 * 8, 5), (6, 8), &dev)?;
    let v = Tensor::from_vec(values(8 * 3, 6), (8, 3), &dev)?;
    let xs = Tensor::from_vec(values(40 * 6, 7), (40, 6), &dev)?;
    let curve = |transpose: bool| -> Result<Vec<f64>> {
        let probes = ProbeSet::new();
        let p = probes.add("h")?;
        let (w, v) = (w.clone(), v.clone());
        let model = move |x: &Tensor| -> Result<Tensor> {
            let h = x.matmul(&w)?.relu()?;
            let h = if transpose {
                h.t()?.contiguous()?.t()?
            } else {
                h
            };
            p.forward(&h)?.matmul(&v)
        };
        let labels = model(&xs)?.argmax(1)?;
        let data = ProbeData::new(xs.clone(), labels)?;
        let spec = AblationSpec::default().with_order(AblationOrder::Random { orders: 2, seed: 3 });
        Ok(Measurement::new(&model, &probes, &data)
            .ablation_curve(&spec)?
            .accuracy)
    };
    let (plain, transposed) = (curve(false)?, curve(true)?);
    assert_eq!(plain, transposed);
    // Not a constant curve: clamping changes the predictions.
    assert!(plain.iter().any(|&a| a < 0.9), "{plain:?}");
    Ok(())
}
