//! The CUDA kernels against the CPU ops: level clamp bit-exact, level noise within float
//! tolerance, on odd sizes, every float dtype, expanded and already-expanded inputs, and whole
//! curves through the public API. Needs `--features cuda`; without a CUDA device every test
//! prints "skipped: no CUDA device" and passes. See docs/cuda.md.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp, NoiseSpec};
use candle_reliance::ops::{level_clamp_for_tests, level_noise_for_tests, unit_sums_for_tests};
use candle_reliance::{Measurement, Probe, ProbeData, ProbeSet};
use common::{level_cases, Case, DTYPES};

/// A value no input or output of these tests can hold (exact in every float dtype).
const SENTINEL: f64 = -4096.0;

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Deterministic values in ±[0.5, 2): non-zero, never the sentinel.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            let v = 0.5 + 1.5 * u;
            if s & 1 == 0 {
                v
            } else {
                -v
            }
        })
        .collect()
}

fn bits01(n: usize, seed: u64) -> Vec<u8> {
    values(n, seed).iter().map(|v| u8::from(*v > 0.0)).collect()
}

/// Fills and frees a device buffer of `elements` with the sentinel, so that the allocator is
/// likely to hand the same memory to the next output: any element a kernel fails to write then
/// still holds the sentinel.
fn poison(dev: &Device, elements: usize, dtype: DType) -> Result<()> {
    let t = Tensor::full(SENTINEL, elements.max(1), dev)?.to_dtype(dtype)?;
    drop(t);
    dev.synchronize()
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

fn assert_no_sentinel(v: &[f64], what: &str) {
    if let Some(i) = v.iter().position(|&x| x == SENTINEL) {
        panic!("{what}: element {i} was never written (holds the poison value)");
    }
}

/// Activation shapes: dense and convolutional, odd sizes, plus empty batches.
const SHAPES: &[&[usize]] = &[&[37, 129], &[5, 7, 3, 5], &[1, 1], &[0, 129], &[0, 7, 3, 5]];
const LEVELS: &[usize] = &[3, 4, 9];

/// `(x, units, seed)` for a case: its input rows (`L·M` unless expanding) of its shape in its
/// dtype, with an infinity at a clamped-or-kept spot; `seed` for the case's other values.
fn input(case: &Case) -> Result<(Tensor, usize, u64)> {
    let Case {
        shape,
        dims,
        levels,
        expand,
        dtype,
    } = *case;
    let seed = (shape * 100 + levels * 10) as u64 + u64::from(expand);
    let mut x_dims = dims.to_vec();
    if !expand {
        x_dims[0] *= levels;
    }
    let n: usize = x_dims.iter().product();
    let mut v = values(n, seed);
    if n > 2 {
        v[1] = f32::INFINITY; // a select must pass it through or clamp it, never make NaN
    }
    let x = Tensor::from_vec(v, x_dims, &Device::Cpu)?.to_dtype(dtype)?;
    Ok((x, dims[1], seed))
}

#[test]
fn level_clamp_matches_cpu_bit_for_bit() -> Result<()> {
    let Some(gpu) = cuda() else { return Ok(()) };
    let mut cases = 0;
    for case in level_cases(SHAPES, LEVELS) {
        let (x, units, seed) = input(&case)?;
        let Case {
            dims: shape,
            levels,
            expand,
            dtype,
            ..
        } = case;
        let keep = Tensor::from_vec(
            bits01(levels * units, seed + 1),
            (levels, units),
            &Device::Cpu,
        )?;
        let vals = Tensor::from_vec(values(units, seed + 2), units, &Device::Cpu)?;
        let want = level_clamp_for_tests(&x, &keep, &vals, expand)?;
        poison(&gpu, want.elem_count(), dtype)?;
        let got = level_clamp_for_tests(
            &x.to_device(&gpu)?,
            &keep.to_device(&gpu)?,
            &vals.to_device(&gpu)?,
            expand,
        )?;
        let what = format!("clamp {shape:?} L={levels} expand={expand} {dtype:?}");
        assert_eq!(got.dims(), want.dims(), "{what}");
        assert_eq!(got.dtype(), dtype, "{what}");
        let (g, w) = (to_f64(&got)?, to_f64(&want)?);
        assert_no_sentinel(&g, &what);
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "{what}: element {i}: {a} vs {b}"
            );
        }
        cases += 1;
    }
    println!("{cases} clamp cases identical");
    Ok(())
}

#[test]
fn level_noise_matches_cpu_within_tolerance() -> Result<()> {
    let Some(gpu) = cuda() else { return Ok(()) };
    let mut cases = 0;
    for case in level_cases(SHAPES, LEVELS) {
        let (x, units, seed) = input(&case)?;
        let Case {
            dims: shape,
            levels,
            expand,
            dtype,
            ..
        } = case;
        let std: Vec<f32> = values(levels * units, seed + 3)
            .iter()
            .map(|v| v.abs() / 2.0)
            .collect();
        let std = Tensor::from_vec(std, (levels, units), &Device::Cpu)?;
        // Offsets as a chunk in the middle of a larger measurement.
        let offsets = (2, 5, shape[0] + 11);
        let noise_seed = 0xDEAD_BEEF ^ seed;
        let want = level_noise_for_tests(&x, &std, expand, noise_seed, offsets)?;
        poison(&gpu, want.elem_count(), dtype)?;
        let got = level_noise_for_tests(
            &x.to_device(&gpu)?,
            &std.to_device(&gpu)?,
            expand,
            noise_seed,
            offsets,
        )?;
        let what = format!("noise {shape:?} L={levels} expand={expand} {dtype:?}");
        assert_eq!(got.dims(), want.dims(), "{what}");
        assert_eq!(got.dtype(), dtype, "{what}");
        let (g, w) = (to_f64(&got)?, to_f64(&want)?);
        assert_no_sentinel(&g, &what);
        // f32/f64: z differs in the last bits of log/cos only. f16/bf16: that may move
        // a rounding by one unit of the element type.
        let rel = match dtype {
            DType::F16 => 2e-3,
            DType::BF16 => 1.6e-2,
            _ => 1e-5,
        };
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let ok = (a == b) || (a - b).abs() <= rel * b.abs().max(1.0);
            assert!(ok, "{what}: element {i}: {a} vs {b}");
        }
        cases += 1;
    }
    println!("{cases} noise cases within tolerance");
    Ok(())
}

#[test]
fn unit_sums_match_cpu() -> Result<()> {
    let Some(gpu) = cuda() else { return Ok(()) };
    // Dense and map shapes; 3001 rows split over many blocks of grid.y, 1031 units over several
    // blocks of grid.x, maps of 300 positions (more than a block's 256 threads), empty batches.
    let shapes: &[&[usize]] = &[
        &[37, 129],
        &[3001, 300],
        &[17, 1031],
        &[5, 7, 3, 5],
        &[9, 5, 15, 20],
        &[1, 1],
        &[0, 129],
        &[0, 7, 3, 5],
    ];
    let mut cases = 0;
    for (si, shape) in shapes.iter().enumerate() {
        for classes in [0usize, 10] {
            for &dtype in DTYPES {
                let n: usize = shape.iter().product();
                let seed = (si * 10 + classes) as u64;
                let x = Tensor::from_vec(values(n, seed), *shape, &Device::Cpu)?.to_dtype(dtype)?;
                // Labels 0..12: some outside 0..classes, which add to no class row.
                let labels: Vec<u32> = (0..shape[0] as u32).map(|r| (r * 7 + 3) % 13).collect();
                let labels = Tensor::from_vec(labels, shape[0], &Device::Cpu)?;
                let want = unit_sums_for_tests(&x, &labels, classes)?;
                let got =
                    unit_sums_for_tests(&x.to_device(&gpu)?, &labels.to_device(&gpu)?, classes)?;
                let what = format!("unit sums {shape:?} classes={classes} {dtype:?}");
                assert_eq!(got.dims(), want.dims(), "{what}");
                assert_eq!(got.dtype(), DType::F64, "{what}");
                // f64 sums of the same values in another order (atomics): rounding only.
                let tol = 1e-12 * (n.max(1) as f64);
                let (g, w) = (to_f64(&got)?, to_f64(&want)?);
                for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                    assert!((a - b).abs() <= tol, "{what}: element {i}: {a} vs {b}");
                }
                cases += 1;
            }
        }
    }
    println!("{cases} unit-sum cases agree");
    Ok(())
}

/// Transposed (non-contiguous) and offset (starting inside a larger storage) inputs on the GPU:
/// the wrappers copy the former, and `cuda_fwd` reads the latter from its offset.
#[test]
fn views_on_cuda_match_cpu() -> Result<()> {
    let Some(gpu) = cuda() else { return Ok(()) };
    let (rows, units, levels) = (23usize, 37usize, 3usize);
    let x = Tensor::from_vec(values(rows * units, 91), (rows, units), &Device::Cpu)?;
    let keep = Tensor::from_vec(bits01(levels * units, 92), (levels, units), &Device::Cpu)?;
    let vals = Tensor::from_vec(values(units, 93), units, &Device::Cpu)?;
    let std = Tensor::from_vec(values(levels * units, 94), (levels, units), &Device::Cpu)?.abs()?;
    let labels: Vec<u32> = (0..rows as u32).map(|r| r % 4).collect();
    let labels = Tensor::from_vec(labels, rows, &Device::Cpu)?;
    let want_clamp = to_f64(&level_clamp_for_tests(&x, &keep, &vals, true)?)?;
    let want_noise = to_f64(&level_noise_for_tests(&x, &std, true, 5, (0, 0, rows))?)?;
    let want_sums = to_f64(&unit_sums_for_tests(&x, &labels, 4)?)?;
    let xg = x.to_device(&gpu)?;
    let pad = Tensor::zeros((5, units), DType::F32, &gpu)?;
    let lpad = Tensor::zeros(5, DType::U32, &gpu)?;
    let labels_g = Tensor::cat(&[&lpad, &labels.to_device(&gpu)?], 0)?.narrow(0, 5, rows)?;
    for (name, v) in [
        ("transposed", xg.t()?.contiguous()?.t()?),
        ("offset", Tensor::cat(&[&pad, &xg], 0)?.narrow(0, 5, rows)?),
    ] {
        let clamp =
            level_clamp_for_tests(&v, &keep.to_device(&gpu)?, &vals.to_device(&gpu)?, true)?;
        let got = to_f64(&clamp)?;
        assert!(
            got.iter()
                .zip(&want_clamp)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "clamp, {name} input"
        );
        let noise = level_noise_for_tests(&v, &std.to_device(&gpu)?, true, 5, (0, 0, rows))?;
        for (a, b) in to_f64(&noise)?.iter().zip(&want_noise) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "noise, {name} input: {a} vs {b}"
            );
        }
        let sums = to_f64(&unit_sums_for_tests(&v, &labels_g, 4)?)?;
        for (a, b) in sums.iter().zip(&want_sums) {
            assert!((a - b).abs() <= 1e-9, "unit sums, {name} input: {a} vs {b}");
        }
    }
    println!("transposed and offset inputs agree with the CPU");
    Ok(())
}

/// MLP 20-33-17-5 with fixed weights, built on CPU and copied, so both devices run the same net.
struct Mlp {
    w: Vec<(Tensor, Tensor)>,
    p: Vec<Probe>,
}

impl Mlp {
    fn new(probes: &ProbeSet, dev: &Device, dtype: DType) -> Result<Self> {
        let sizes = [20, 33, 17, 5];
        let mut w = Vec::new();
        for (i, pair) in sizes.windows(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            let scale = 1.0 / (a as f32).sqrt();
            let m: Vec<f32> = values(a * b, 7 + i as u64)
                .iter()
                .map(|v| v * scale)
                .collect();
            let bias: Vec<f32> = values(b, 70 + i as u64).iter().map(|v| v * 0.1).collect();
            w.push((
                Tensor::from_vec(m, (a, b), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(dev)?,
                Tensor::from_vec(bias, b, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(dev)?,
            ));
        }
        Ok(Self {
            w,
            p: vec![probes.add("h1")?, probes.add("h2")?],
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for (i, (w, b)) in self.w.iter().enumerate() {
            h = h.matmul(w)?.broadcast_add(b)?;
            if i < self.p.len() {
                h = self.p[i].forward(&h.relu()?)?;
            }
        }
        Ok(h)
    }
}

fn data(n: usize, dev: &Device, dtype: DType) -> Result<ProbeData> {
    let xs = Tensor::from_vec(values(n * 20, 99), (n, 20), &Device::Cpu)?.to_dtype(dtype)?;
    let ys: Vec<u32> = values(n, 98)
        .iter()
        .map(|v| ((v.abs() * 1000.0) as u32) % 5)
        .collect();
    Ok(ProbeData::new(
        xs.to_device(dev)?,
        Tensor::from_vec(ys, n, dev)?,
    )?)
}

#[test]
fn ablation_curve_is_identical_on_cuda() -> Result<()> {
    let Some(gpu) = cuda() else { return Ok(()) };
    // f64 so that the two devices' matrix products cannot break an arg-max tie differently.
    let n = 301;
    let curve = |dev: &Device, clamp: Clamp| -> Result<_> {
        let probes = ProbeSet::new();
        let model = Mlp::new(&probes, dev, DType::F64)?;
        let spec = AblationSpec::default()
            .with_order(AblationOrder::Random { orders: 3, seed: 5 })
            .with_clamp(clamp);
        Ok(Measurement::new(&model, &probes, &data(n, dev, DType::F64)?).ablation_curve(&spec)?)
    };
    for clamp in [Clamp::Zero, Clamp::Mean] {
        let (c, g) = (curve(&Device::Cpu, clamp)?, curve(&gpu, clamp)?);
        assert_eq!(c.accuracy, g.accuracy, "{clamp:?}");
        assert_eq!(c.per_order, g.per_order, "{clamp:?}");
        assert_eq!(c.batched, g.batched);
        println!("{clamp:?}: accuracy {:?} on both devices", g.accuracy);
    }
    Ok(())
}

#[test]
fn noise_curve_agrees_on_cuda() -> Result<()> {
    let Some(gpu) = cuda() else { return Ok(()) };
    let n = 301;
    let curve = |dev: &Device| -> Result<_> {
        let probes = ProbeSet::new();
        let model = Mlp::new(&probes, dev, DType::F32)?;
        let spec = NoiseSpec::default().with_draws(2).with_seed(11);
        Ok(Measurement::new(&model, &probes, &data(n, dev, DType::F32)?).noise_curve(&spec)?)
    };
    let (c, g) = (curve(&Device::Cpu)?, curve(&gpu)?);
    assert_eq!(c.accuracy.len(), g.accuracy.len());
    for (a, b) in c.accuracy.iter().zip(&g.accuracy) {
        // A sample whose logits nearly tie may flip between devices; allow two of n.
        assert!(
            (a - b).abs() <= 2.0 / n as f64,
            "{:?} vs {:?}",
            c.accuracy,
            g.accuracy
        );
    }
    println!("noise accuracy cpu {:?} cuda {:?}", c.accuracy, g.accuracy);
    Ok(())
}
