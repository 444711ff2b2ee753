//! The statistics kernels' own source (`kernels/stats.cu`), run on the CPU, against the CPU op.
//!
//! `kernels/emu/emulate.cpp` (mode `stats`) runs the threads of each block concurrently, as
//! coroutines, with `__syncthreads`, warp shuffles, shared memory and f64 atomics emulated (see
//! `kernels/README.md`, "Host emulation"). It zeroes one `(2 + classes, units)` f64 buffer and
//! launches `unit_stats_*` into it as `src/ops/cuda.rs` (`unit_sums`) does. These tests compare every output element with the CPU op
//! `UnitSums` (`unit_sums_for_tests`) over dense and convolutional shapes, sorted and unsorted
//! labels (some out of range), all four dtypes, several grids (the launcher's and grids smaller
//! and larger than the work) and four thread schedules. Set `CANDLE_RELIANCE_KERNEL_EMU` to the
//! compiled emulator; without it the tests print "skipped: ..." and pass.
//!
//! Tolerance: both sides add the same f64 values (every element converts to f64 exactly, and
//! each square `v·v` is rounded once in both), only in different orders (per-thread partials,
//! shuffle trees and atomics in block order on one side, row blocks on the other). Any order of
//! summing `n` terms is within `γ(n-1)·Σ|x|` of the exact sum, `γ(k) = k·u / (1 - k·u)`,
//! `u = 2^-53`, so the two results differ by at most `2·γ(n-1)·Σ|x|`. The inputs are nonzero
//! with magnitudes in [2^-4, 2^4), so a dropped, repeated or misattributed element moves a sum
//! by at least 2^-4, far above that bound at these sizes (and accumulating in f32 would show
//! too). An output whose `n` is 0 (a class without rows) must be exactly 0.

use candle_core::{DType, Device, Result, Tensor};
use candle_reliance::ops::{unit_sums_for_tests, unit_sums_launch_for_tests};
mod common;
mod emulation;

use common::{Rng, DTYPES};
use emulation::{call, emulator, suffix};

/// Threads per block and `(grid.x, grid.y)` of the launch src/ops/cuda.rs (`unit_sums`) makes.
fn launcher(rows: usize, units: usize, inner: usize) -> (usize, (usize, usize)) {
    unit_sums_launch_for_tests(rows, units, inner)
}

/// The grids each case runs: the launcher's, one block for everything, small odd grids (many
/// grid-stride iterations over columns or units and rows), one larger than the work (idle
/// blocks) and the launcher's columns with a different row split.
fn grids(rows: usize, units: usize, inner: usize) -> Vec<(usize, usize)> {
    let (block, (gx, gy)) = launcher(rows, units, inner);
    let columns = if inner == 1 {
        units.div_ceil(block)
    } else {
        units
    };
    let mut g: Vec<(usize, usize)> = Vec::new();
    for grid in [
        (gx, gy),
        (1, 1),
        (2, 3),
        (columns + 2, rows + 3),
        (gx, (rows / 2).max(1) | 1),
    ] {
        if !g.contains(&grid) {
            g.push(grid);
        }
    }
    g
}

const SCHEDULES: &[&str] = &["rr", "low", "high", "random"];

/// Activations: dense `(N, U)` (units below 256, and 300 and 513, which end in a partial block
/// of columns; 1031 rows for a deep row split) and convolutional `(N, C, H, W)` with `H·W`
/// below, at and above 256, and 259 units. `(N, C, 1, 1)` takes the dense kernels, as in the
/// launcher.
const SHAPES: &[&[usize]] = &[
    &[37, 300],
    &[5, 7],
    &[1, 1],
    &[1031, 5],
    &[19, 513],
    &[7, 5, 15, 20],
    &[9, 11, 3, 5],
    &[5, 259, 1, 7],
    &[3, 4, 16, 16],
    &[1, 1, 1, 2],
    &[6, 3, 1, 1],
];

#[derive(Debug, Clone, Copy)]
enum Labels {
    /// `classes = 0`: the class kernels do not run.
    NoClasses,
    /// Ascending labels in `0..classes + 2` (the top two out of range): long runs.
    Sorted,
    /// Random labels in `0..classes + 2`, some `u32::MAX` (the class kernel's "no run yet").
    Unsorted,
}

fn labels(rng: &mut Rng, rows: usize, kind: Labels, classes: usize) -> Vec<u32> {
    let mut l: Vec<u32> = (0..rows)
        .map(|_| {
            if matches!(kind, Labels::Unsorted) && rng.below(8) == 0 {
                u32::MAX
            } else {
                rng.below(classes as u64 + 2) as u32
            }
        })
        .collect();
    if matches!(kind, Labels::Sorted) {
        l.sort_unstable();
    }
    l
}

/// Nonzero values with magnitudes in [2^-4, 2^4) and random signs, in `dtype`.
fn input(rng: &mut Rng, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let mag = (-4.0 + 8.0 * rng.unit()).exp2();
            rng.with_random_sign(mag)
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// Per output element (the layout of the op's output): the number of terms and `Σ|term|`.
fn magnitudes(
    x: &[f64],
    (rows, units, inner): (usize, usize, usize),
    labels: &[u32],
    classes: usize,
) -> Vec<(usize, f64)> {
    let mut m = vec![(0usize, 0f64); (2 + classes) * units];
    for r in 0..rows {
        let class = labels[r] as usize;
        for u in 0..units {
            for &v in &x[(r * units + u) * inner..(r * units + u + 1) * inner] {
                let mut add = |k: usize, a: f64| {
                    m[k].0 += 1;
                    m[k].1 += a;
                };
                add(u, v.abs());
                add(units + u, v * v);
                if class < classes {
                    add((2 + class) * units + u, v.abs());
                }
            }
        }
    }
    m
}

/// `2·γ(n-1)·Σ|x|`: the largest difference between two summation orders (see the module docs).
fn tolerance((n, abs_sum): (usize, f64)) -> f64 {
    let u = f64::EPSILON / 2.0;
    let k = n.saturating_sub(1) as f64;
    2.0 * (k * u / (1.0 - k * u)) * abs_sum
}

fn run_kernels(dtype: DType, shapes: impl Fn(&[usize]) -> bool) -> Result<()> {
    let Some(emu) = emulator() else {
        return Ok(());
    };
    let mut rng = Rng::new(11 + dtype.size_in_bytes() as u64);
    let (mut runs, mut elements, mut inputs, mut worst) = (0usize, 0usize, 0usize, 0f64);
    let mut schedule = 0;
    for dims in SHAPES.iter().filter(|d| shapes(d)) {
        let (rows, units) = (dims[0], dims[1]);
        let inner: usize = dims[2..].iter().product();
        for (kind, classes) in [
            (Labels::NoClasses, 0),
            (Labels::Sorted, 3),
            (Labels::Unsorted, 4),
        ] {
            let x = input(&mut rng, dims, dtype)?;
            let l = labels(&mut rng, rows, kind, classes);
            let lt = Tensor::new(l.as_slice(), &Device::Cpu)?;
            let want = unit_sums_for_tests(&x, &lt, classes)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let x64 = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let mag = magnitudes(&x64, (rows, units, inner), &l, classes);
            let mut stdin = Vec::new();
            x.write_bytes(&mut stdin)?;
            stdin.extend(l.iter().flat_map(|v| v.to_le_bytes()));
            inputs += 1;
            let (block, _) = launcher(rows, units, inner);
            for (gx, gy) in grids(rows, units, inner) {
                let sched = SCHEDULES[schedule % SCHEDULES.len()];
                schedule += 1;
                let args = vec![
                    "stats".to_string(),
                    format!("dtype={}", suffix(dtype)),
                    format!("rows={rows}"),
                    format!("units={units}"),
                    format!("inner={inner}"),
                    format!("classes={classes}"),
                    format!("grid={gx}"),
                    format!("grid_y={gy}"),
                    format!("block={block}"),
                    format!("sched={sched}"),
                    format!("seed={}", rng.next()),
                ];
                let out = call(&emu, &args, stdin.clone());
                assert_eq!(out.len(), want.len() * 8, "kernel-emu {}", args.join(" "));
                for (i, ((got, &want), &m)) in out
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .zip(&want)
                    .zip(&mag)
                    .enumerate()
                {
                    let tol = tolerance(m);
                    let diff = (got - want).abs();
                    let (row, unit) = (i / units, i % units);
                    let what = match row {
                        0 => "sum".to_string(),
                        1 => "sum of squares".to_string(),
                        r => format!("class {} sum", r - 2),
                    };
                    assert!(
                        diff <= tol,
                        "{dims:?} {dtype:?} {kind:?} classes={classes} grid=({gx}, {gy}) \
                         sched={sched}: {what} of unit {unit}: kernel {got:e}, CPU op {want:e}, \
                         |diff| {diff:e} > {tol:e} ({} terms)",
                        m.0
                    );
                    if tol > 0.0 {
                        worst = worst.max(diff / tol);
                    }
                }
                runs += 1;
                elements += want.len();
            }
        }
    }
    println!(
        "stats {dtype:?}: {inputs} inputs, {runs} emulated launch pairs, {elements} output \
         elements within the summation-order bound (largest |diff| / bound {worst:.3})"
    );
    Ok(())
}

fn dense(dims: &[usize]) -> bool {
    dims.len() == 2 || dims[2..].iter().product::<usize>() == 1
}

#[test]
fn dense_kernels_match_the_cpu_op() -> Result<()> {
    for &dtype in DTYPES {
        run_kernels(dtype, dense)?;
    }
    Ok(())
}

#[test]
fn maps_kernels_match_the_cpu_op() -> Result<()> {
    for &dtype in DTYPES {
        run_kernels(dtype, |d| !dense(d))?;
    }
    Ok(())
}
