//! The CUDA kernels' own source, run on the CPU, against the CPU ops.
//!
//! `kernels/emu/emulate.cpp` compiles `kernels/clamp.cu` and `kernels/noise.cu` unchanged for the
//! host and runs a launch one (block, thread) at a time (see `kernels/README.md`). These tests
//! feed it random, odd-sized inputs and compare every output element with the CPU ops
//! (`src/ops/clamp.rs`, `src/ops/noise.rs`): the index arithmetic (multiply-shift division,
//! level/row/unit decomposition, expand vs in place, grid-stride loops, both index widths) and
//! the noise generator's transcription. Set `CANDLE_RELIANCE_KERNEL_EMU` to the compiled
//! emulator; without it the tests that need it print "skipped: ..." and pass (the check of the
//! tests' own rounding reference runs regardless).
//!
//! * Clamp: bit-identical to the CPU op, for arbitrary bit patterns (NaN payloads included).
//! * Noise, f32/f64: bit-identical to the CPU op. The emulator's `logf`/`cosf` are the host C
//!   library's, the same functions Rust's `f32::ln`/`cos` call, and `sqrtf` is correctly rounded
//!   in both, so this checks the generator's transcription exactly (a GPU's `logf`/`cosf` may
//!   differ in the last bits).
//! * Noise, f16/bf16: the emulated kernel and the CPU op both bit-identical to the correctly
//!   rounded (nearest-even) value of the f64 sum, computed here independently; that is what the
//!   CUDA conversions `__double2half`/`__double2bfloat16` compute.

use candle_core::{DType, Device, Result, Tensor};
use candle_reliance::ops::{
    level_clamp_for_tests, level_geometry_for_tests, level_launch_for_tests, level_noise_for_tests,
};
mod common;
mod emulation;

use common::{level_cases, Case, Rng};
use emulation::{call, emulator, suffix};

fn bytes(t: &Tensor) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    t.write_bytes(&mut v)?;
    Ok(v)
}

/// Element `i` of a little-endian buffer of `w`-byte elements, as an integer.
fn elem(b: &[u8], w: usize, i: usize) -> u64 {
    let mut x = [0u8; 8];
    x[..w].copy_from_slice(&b[i * w..(i + 1) * w]);
    u64::from_le_bytes(x)
}

/// Kernel arguments for a level op over an input of shape `dims`: the launcher's own
/// (`Geometry` in src/ops/launch.rs, which src/ops/cuda.rs passes).
#[derive(Debug, Clone, Copy)]
struct Geometry(candle_reliance::ops::Geometry);

impl std::ops::Deref for Geometry {
    type Target = candle_reliance::ops::Geometry;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Geometry {
    fn new(dims: &[usize], levels: usize, expand: bool) -> Result<Self> {
        Ok(Self(level_geometry_for_tests(dims, levels, expand)?))
    }

    /// `(level, row within level, unit, inner)` of output element `i`, for messages.
    fn locate(&self, i: usize) -> (usize, usize, usize, usize) {
        let (row, col) = (i / self.row_len, i % self.row_len);
        (
            row / self.per_level,
            row % self.per_level,
            col / self.inner,
            col % self.inner,
        )
    }

    fn args(&self, kernel: &str, x_len: usize, launch: &Launch) -> Vec<String> {
        vec![
            "run".into(),
            format!("kernel={kernel}"),
            format!("grid={}", launch.grid),
            format!("block={}", launch.block),
            format!("index={}", launch.index),
            format!("order={}", launch.order),
            format!("n={}", self.total),
            format!("row_len={}", self.row_len),
            format!("units={}", self.units),
            format!("inner={}", self.inner),
            format!("per_level={}", self.per_level),
            format!("x_len={x_len}"),
        ]
    }
}

#[derive(Debug)]
struct Launch {
    grid: usize,
    block: usize,
    /// `auto`: the extern "C" entry point (32-bit indices below 2^31 elements); `32` / `64`:
    /// the kernel body with that index type.
    index: &'static str,
    order: &'static str,
}

/// The launches every case runs: the one `src/ops/cuda.rs` makes, grids far smaller than the
/// work (many grid-stride iterations, odd strides), and one with more threads than elements.
fn launches(n: usize) -> Vec<Launch> {
    let l = |grid, block, index, order| Launch {
        grid,
        block,
        index,
        order,
    };
    let (block, grid) = level_launch_for_tests(n);
    vec![
        l(grid, block, "auto", "forward"),
        l(1, 1, "64", "forward"),
        l(3, 7, "32", "reverse"),
        l(2, 32, "auto", "reverse"),
        l(5, 1024, "32", "forward"),
        l(n.div_ceil(32) + 3, 32, "64", "reverse"),
    ]
}

/// Activation shapes (per level): dense `(N, U)` and convolutional `(N, C, H, W)`, so that the
/// divisors `row_len`, `per_level` and `inner` cover 1, powers of two, small and large odd
/// numbers.
const SHAPES: &[&[usize]] = &[
    &[37, 129],
    &[5, 7, 3, 5],
    &[1, 1],
    &[1, 1, 1, 1],
    &[3, 3, 1, 1],
    &[16, 64],
    &[4, 8, 4, 8],
    &[4099, 3],
    &[2, 5, 97, 103],
    &[1, 65537],
    &[3, 1, 1, 1023],
];
const LEVELS: &[usize] = &[1, 3, 4];
/// A value of width `w` bytes whose bits are random but neither ±0 nor all ones (the
/// emulator's never-written pattern).
fn random_bits(rng: &mut Rng, w: usize) -> u64 {
    let mask = if w == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * w)) - 1
    };
    let sign = 1u64 << (8 * w - 1);
    loop {
        let b = rng.next() & mask;
        if b & !sign != 0 && b != mask {
            return b;
        }
    }
}

fn random_tensor_bits(rng: &mut Rng, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let w = dtype.size_in_bytes();
    let n: usize = dims.iter().product();
    let mut raw = Vec::with_capacity(n * w);
    for _ in 0..n {
        raw.extend_from_slice(&random_bits(rng, w).to_le_bytes()[..w]);
    }
    Tensor::from_raw_buffer(&raw, dtype, dims, &Device::Cpu)
}

/// Shape of the op's input: `dims` with `levels` times the rows unless expanding.
fn input_dims(dims: &[usize], levels: usize, expand: bool) -> Vec<usize> {
    let mut d = dims.to_vec();
    if !expand {
        d[0] *= levels;
    }
    d
}

fn kernel_name(op: &str, expand: bool, dtype: DType) -> String {
    let root = if expand {
        format!("level_{op}_expand")
    } else {
        format!("level_{op}")
    };
    format!("{root}_{}", suffix(dtype))
}

/// Panics with the first few differing elements of `got` and `want` (`w`-byte elements).
fn assert_same_bits(got: &[u8], want: &[u8], w: usize, g: &Geometry, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    if got == want {
        return;
    }
    let never = if w == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * w)) - 1
    };
    let bad: Vec<String> = (0..got.len() / w)
        .filter(|&i| elem(got, w, i) != elem(want, w, i))
        .take(5)
        .map(|i| {
            let (a, b) = (elem(got, w, i), elem(want, w, i));
            let note = if a == never { " (never written)" } else { "" };
            format!(
                "element {i} (level, row, unit, inner) = {:?}: {a:#x}{note} vs {b:#x}",
                g.locate(i)
            )
        })
        .collect();
    panic!(
        "{what}: kernel differs from the reference: {}",
        bad.join("; ")
    );
}

#[test]
fn level_clamp_kernels_match_the_cpu_op_bit_for_bit() -> Result<()> {
    let Some(emu) = emulator() else {
        return Ok(());
    };
    let mut rng = Rng::new(1);
    let (mut runs, mut elements) = (0usize, 0usize);
    for Case {
        dims,
        levels,
        expand,
        dtype,
        ..
    } in level_cases(SHAPES, LEVELS)
    {
        let x_dims = input_dims(dims, levels, expand);
        let g = Geometry::new(&x_dims, levels, expand)?;
        let x = random_tensor_bits(&mut rng, &x_dims, dtype)?;
        // Zero clamps; any other byte keeps (the CPU op's `k != 0`).
        let keep: Vec<u8> = (0..levels * g.units)
            .map(|_| [0, 0, 0, 1, 1, 2, 255][rng.below(7) as usize])
            .collect();
        let values = random_tensor_bits(&mut rng, &[g.units], dtype)?;
        let keep_t = Tensor::from_vec(keep.clone(), (levels, g.units), &Device::Cpu)?;
        let want = bytes(&level_clamp_for_tests(&x, &keep_t, &values, expand)?)?;
        let mut input = bytes(&x)?;
        input.extend_from_slice(&keep);
        input.extend_from_slice(&bytes(&values)?);
        let kernel = kernel_name("clamp", expand, dtype);
        for launch in launches(g.total) {
            let mut args = g.args(&kernel, x.elem_count(), &launch);
            args.push(format!("keep_len={}", keep.len()));
            args.push(format!("values_len={}", g.units));
            let got = call(&emu, &args, input.clone());
            let what = format!("{kernel} {dims:?} levels={levels} {launch:?}");
            assert_same_bits(&got, &want, dtype.size_in_bytes(), &g, &what);
            runs += 1;
            elements += g.total;
        }
    }
    println!(
        "clamp: {runs} emulated launches, {elements} elements, all bit-identical to the CPU op"
    );
    Ok(())
}

/// `v` rounded to nearest, ties to even, into a binary format with `man` fraction bits and
/// `exp` exponent bits (f16: 10, 5; bf16: 7, 8), as its bits; `v` must not be NaN.
fn round_to_narrow(v: f64, man: u32, exp: u32) -> u16 {
    let sign = if v.is_sign_negative() {
        1u16 << (man + exp)
    } else {
        0
    };
    let a = v.abs();
    let bias = (1i32 << (exp - 1)) - 1;
    let (emin, emax) = (1 - bias, bias);
    let inf = ((1u64 << exp) - 1) << man;
    // floor(log2 a) for normal a; f64 subnormals (far below either format) give -1023.
    let e = ((a.to_bits() >> 52) as i32 - 1023).max(emin);
    if e > emax + 1 {
        return sign | inf as u16;
    }
    // a / ulp, exact (a power-of-two scaling within range), then rounded to an integer.
    let q = e - man as i32;
    let scaled = a * f64::from_bits(((1023 - q) as u64) << 52);
    let r = scaled.round_ties_even() as u64;
    // Exponent field and fraction add up, carry included: a subnormal's field is 0 and its
    // fraction is r; a normal's field is e - emin + 1 and its fraction r - 2^man.
    let bits = (((e - emin) as u64) << man) + r;
    sign | bits.min(inf) as u16
}

fn narrow_format(dtype: DType) -> (u32, u32) {
    match dtype {
        DType::F16 => (10, 5),
        DType::BF16 => (7, 8),
        _ => unreachable!(),
    }
}

#[test]
fn reference_rounding_is_correctly_rounded() -> Result<()> {
    // Known values (f16).
    let f16 = |v: f64| round_to_narrow(v, 10, 5);
    assert_eq!(f16(1.0), 0x3C00);
    assert_eq!(f16(-2.0), 0xC000);
    assert_eq!(f16(65504.0), 0x7BFF);
    assert_eq!(f16(65519.99), 0x7BFF);
    assert_eq!(f16(65520.0), 0x7C00); // the tie above the largest finite rounds to infinity
    assert_eq!(f16(1e9), 0x7C00);
    assert_eq!(f16(2f64.powi(-24)), 0x0001);
    assert_eq!(f16(2f64.powi(-25)), 0x0000); // tie, to even
    assert_eq!(f16(3.0 * 2f64.powi(-25)), 0x0002); // tie, to even
    assert_eq!(f16(2f64.powi(-14) - 2f64.powi(-25)), 0x0400); // rounds up into the normals
    assert_eq!(f16(1.0 + 2f64.powi(-11)), 0x3C00); // tie, to even
    assert_eq!(f16(1.0 + 2f64.powi(-11) + 2f64.powi(-40)), 0x3C01); // not a tie
    assert_eq!(round_to_narrow(1.0, 7, 8), 0x3F80);
    assert_eq!(
        round_to_narrow(1.0 + 2f64.powi(-8) + 2f64.powi(-40), 7, 8),
        0x3F81
    );
    // Every f32 is exact in f64, and candle's f32 -> f16/bf16 conversion is correctly rounded:
    // the reference must agree with it on random f32 bit patterns (NaN excepted).
    let mut rng = Rng::new(7);
    let v: Vec<f32> = (0..200_000)
        .map(|_| f32::from_bits(rng.next() as u32))
        .filter(|v| !v.is_nan())
        .collect();
    let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?;
    for dtype in [DType::F16, DType::BF16] {
        let want = bytes(&t.to_dtype(dtype)?)?;
        let (man, exp) = narrow_format(dtype);
        for (i, &x) in v.iter().enumerate() {
            let w = elem(&want, 2, i) as u16;
            assert_eq!(round_to_narrow(x as f64, man, exp), w, "{dtype:?} of {x:e}");
        }
    }
    Ok(())
}

/// Finite, non-zero activations of `dtype` over a wide range of magnitudes (up to the largest
/// f16 magnitudes for f16, so that rounding to infinity occurs too).
fn noise_input(rng: &mut Rng, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let (lo, hi) = match dtype {
        DType::F16 => (-20.0, 16.0),
        _ => (-30.0, 30.0),
    };
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let mag = (lo + (hi - lo) * rng.unit()).exp2();
            let mag = if dtype == DType::F16 {
                mag.min(65504.0)
            } else {
                mag
            };
            rng.with_random_sign(mag)
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// Noise scales: mostly in [2^-12, 2^5), some exactly 0.
fn noise_std(rng: &mut Rng, levels: usize, units: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..levels * units)
        .map(|_| {
            if rng.below(16) == 0 {
                0.0
            } else {
                (-12.0 + 17.0 * rng.unit()).exp2() as f32
            }
        })
        .collect();
    Tensor::from_vec(v, (levels, units), &Device::Cpu)
}

#[test]
fn level_noise_kernels_match_the_cpu_op() -> Result<()> {
    let Some(emu) = emulator() else {
        return Ok(());
    };
    let mut rng = Rng::new(2);
    let (mut runs, mut elements) = (0, 0);
    // Per f16, bf16: elements compared.
    let mut narrow = [0usize; 2];
    for Case {
        shape: si,
        dims,
        levels,
        expand,
        dtype,
    } in level_cases(SHAPES, LEVELS)
    {
        let x_dims = input_dims(dims, levels, expand);
        let g = Geometry::new(&x_dims, levels, expand)?;
        let x = noise_input(&mut rng, &x_dims, dtype)?;
        let std = noise_std(&mut rng, levels, g.units)?;
        let seed = rng.next();
        // A lone call, a chunk inside a larger measurement, and counters past 2^32
        // (the global element index reaches ~2^59 there).
        let offsets = match (si + levels) % 3 {
            0 => (0, 0, g.per_level),
            1 => (2, 5, g.per_level + 11),
            _ => (1000, 123_456_789, (1 << 33) + 7),
        };
        let cpu = bytes(&level_noise_for_tests(&x, &std, expand, seed, offsets)?)?;
        let w = dtype.size_in_bytes();
        // f16/bf16: the correctly rounded f64 sum. The CPU op in f64 forms exactly
        // that sum (x is exact in f64) and returns it unrounded.
        let want = match dtype {
            DType::F16 | DType::BF16 => {
                let x64 = x.to_dtype(DType::F64)?;
                let sums = level_noise_for_tests(&x64, &std, expand, seed, offsets)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                let (man, exp) = narrow_format(dtype);
                sums.iter()
                    .flat_map(|&s| round_to_narrow(s, man, exp).to_le_bytes())
                    .collect()
            }
            _ => cpu.clone(),
        };
        let mut input = bytes(&x)?;
        input.extend_from_slice(&bytes(&std)?);
        let kernel = kernel_name("noise", expand, dtype);
        for launch in launches(g.total) {
            let mut args = g.args(&kernel, x.elem_count(), &launch);
            args.push(format!("std_len={}", levels * g.units));
            args.push(format!("seed={seed}"));
            args.push(format!("level_offset={}", offsets.0));
            args.push(format!("sample_offset={}", offsets.1));
            args.push(format!("total_samples={}", offsets.2));
            let got = call(&emu, &args, input.clone());
            let what = format!("{kernel} {dims:?} levels={levels} offsets={offsets:?} {launch:?}");
            assert_same_bits(&got, &want, w, &g, &what);
            runs += 1;
            elements += g.total;
        }
        if matches!(dtype, DType::F16 | DType::BF16) {
            // The CPU op rounds once, correctly, too.
            assert_same_bits(
                &cpu,
                &want,
                w,
                &g,
                &format!("CPU op {dtype:?} {dims:?} levels={levels} {offsets:?}"),
            );
            narrow[usize::from(dtype == DType::BF16)] += g.total;
        }
    }
    println!(
        "noise: {runs} emulated launches, {elements} elements: f32/f64 bit-identical to the CPU \
         op; f16/bf16 ({} and {} elements) kernel and CPU op both bit-identical to the \
         correctly rounded sum",
        narrow[0], narrow[1]
    );
    Ok(())
}

/// Divisors for the multiply-shift division: every small one, powers of two and their
/// neighbours, the largest ones below 2^31 (the tightest for its error bound), and random ones.
fn divisors(rng: &mut Rng) -> Vec<u32> {
    let mut d: Vec<u32> = (1..=4096).collect();
    for k in 1..=31u32 {
        let p = 1i64 << k;
        for delta in -3i64..=3 {
            let v = p + delta;
            if (1..1 << 31).contains(&v) {
                d.push(v as u32);
            }
        }
    }
    d.extend((0..512).map(|i| (1u32 << 31) - 1 - i));
    d.extend((0..2000).map(|_| (rng.below(1 << 30) as u32) * 2 + 1));
    d.extend((0..2000).map(|_| 1 + rng.below((1 << 31) - 1) as u32));
    d.sort_unstable();
    d.dedup();
    d
}

#[test]
fn fast_division_is_exact_below_2_pow_31() {
    let Some(emu) = emulator() else { return };
    let mut rng = Rng::new(3);
    const LIMIT: u64 = 1 << 31;
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    for d in divisors(&mut rng) {
        let d64 = u64::from(d);
        let kmax = (LIMIT - 1) / d64;
        let mut ns = vec![0, 1, 2, LIMIT - 1, LIMIT - 2, LIMIT - 1 - d64];
        // Around the first and last multiples of d below 2^31, and random ones.
        for k in [1, 2, 3, kmax - 1, kmax, kmax + 1]
            .into_iter()
            .chain((0..8).map(|_| rng.below(kmax + 1)))
        {
            for delta in [-1i64, 0, 1] {
                if let Some(n) = (k * d64).checked_add_signed(delta) {
                    ns.push(n);
                }
            }
        }
        ns.extend((0..16).map(|_| rng.below(LIMIT)));
        pairs.extend(ns.into_iter().filter(|&n| n < LIMIT).map(|n| (d, n as u32)));
    }
    let input: Vec<u8> = pairs
        .iter()
        .flat_map(|&(d, n)| [d.to_le_bytes(), n.to_le_bytes()].concat())
        .collect();
    let out = call(&emu, &["fastdiv".into()], input);
    assert_eq!(out.len(), pairs.len() * 4);
    for (i, &(d, n)) in pairs.iter().enumerate() {
        let q = u32::from_le_bytes(out[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(q, n / d, "FastDivU32({d}).div({n})");
    }
    // Every n below 2^31 for a few divisors: 7 (a large rounding error m·d - 2^p relative to
    // its range), and 2^30 - 1 and 2^31 - 1, the tightest for the bound n·(m·d - 2^p) < 2^p.
    let sweep = call(
        &emu,
        &[
            "fastdiv-sweep".into(),
            "7".into(),
            "1073741823".into(),
            "2147483647".into(),
        ],
        Vec::new(),
    );
    println!(
        "fastdiv: {} (divisor, n) pairs exact; {}",
        pairs.len(),
        String::from_utf8_lossy(&sweep).trim().replace('\n', "; ")
    );
}
