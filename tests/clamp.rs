//! The level clamp op on CPU against a plain per-element reference,
//! `out[l, m, u, ·] = keep[l, u] ? x[m, u, ·] : value[u]`, compared bit for bit: every float
//! dtype, random bit patterns (NaN payloads, infinities, subnormals, negative zero), dense and
//! convolutional shapes, expanding and later-probe inputs, and sizes around the op's task
//! boundaries.

use candle_core::{DType, Device, Result, Tensor};
use candle_reliance::ops::level_clamp_for_tests;
mod common;

use common::{Rng, DTYPES};

/// A tensor of `dims` whose elements are random bit patterns of `dtype`, and those bits.
fn random_bits(rng: &mut Rng, dims: &[usize], dtype: DType) -> Result<(Tensor, Vec<u64>)> {
    let n: usize = dims.iter().product();
    let w = dtype.size_in_bytes();
    let bits: Vec<u64> = (0..n)
        .map(|_| rng.next() & (u64::MAX >> (64 - 8 * w)))
        .collect();
    let bytes: Vec<u8> = bits
        .iter()
        .flat_map(|b| b.to_le_bytes()[..w].to_vec())
        .collect();
    let t = Tensor::from_raw_buffer(&bytes, dtype, dims, &Device::Cpu)?;
    Ok((t, bits))
}

fn tensor_bits(t: &Tensor) -> Result<Vec<u64>> {
    let w = t.dtype().size_in_bytes();
    let mut bytes = Vec::new();
    t.write_bytes(&mut bytes)?;
    Ok(bytes
        .chunks_exact(w)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..w].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect())
}

#[test]
fn level_clamp_matches_a_per_element_reference() -> Result<()> {
    let mut rng = Rng::new(1);
    // (rows per level, units, positions per unit); positions 0 = a dense (N, U) activation.
    // 16384 / units decides the op's rows per task: units 1, 7, 300, 16384 and 20000 give many,
    // a few, one and (rounded up) one row per task.
    let shapes: &[(usize, usize, usize)] = &[
        (1, 1, 0),
        (5, 7, 0),
        (37, 129, 0),
        (300, 1, 0),
        (9, 300, 0),
        (2, 16384, 0),
        (2, 20000, 0),
        (4, 3, 5),
        (3, 5, 49),
        (0, 7, 0),
    ];
    let mut cases = 0;
    for &(per_level, units, positions) in shapes {
        for levels in [1usize, 3, 16] {
            for expand in [true, false] {
                for &dtype in DTYPES {
                    let rows = if expand {
                        per_level
                    } else {
                        levels * per_level
                    };
                    let inner = positions.max(1);
                    let dims: Vec<usize> = if positions == 0 {
                        vec![rows, units]
                    } else {
                        vec![rows, units, 1, positions]
                    };
                    let (x, xb) = random_bits(&mut rng, &dims, dtype)?;
                    let (values, vb) = random_bits(&mut rng, &[units], dtype)?;
                    // Any non-zero byte keeps the unit.
                    let keep: Vec<u8> = (0..levels * units)
                        .map(|_| [0u8, 0, 1, 2, 255][(rng.next() % 5) as usize])
                        .collect();
                    let keep_t = Tensor::from_vec(keep.clone(), (levels, units), &Device::Cpu)?;
                    let got = level_clamp_for_tests(&x, &keep_t, &values, expand)?;
                    let mut want_dims = dims.clone();
                    want_dims[0] = levels * per_level;
                    assert_eq!(got.dims(), want_dims.as_slice());
                    assert_eq!(got.dtype(), dtype);
                    let got = tensor_bits(&got)?;
                    let row_len = units * inner;
                    let mut want = Vec::with_capacity(got.len());
                    for l in 0..levels {
                        for m in 0..per_level {
                            let src = if expand { m } else { l * per_level + m };
                            for u in 0..units {
                                for i in 0..inner {
                                    want.push(if keep[l * units + u] != 0 {
                                        xb[src * row_len + u * inner + i]
                                    } else {
                                        vb[u]
                                    });
                                }
                            }
                        }
                    }
                    let what = format!(
                        "{dims:?} levels={levels} expand={expand} {dtype:?}: {} elements",
                        want.len()
                    );
                    assert_eq!(got.len(), want.len(), "{what}");
                    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                        panic!("{what}: element {i}: {:#x} vs {:#x}", got[i], want[i]);
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 10 * 3 * 2 * 4);
    Ok(())
}
