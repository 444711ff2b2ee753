//! Fixtures shared by the integration tests.
#![allow(dead_code)]

pub mod nets;
pub mod scripted;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_reliance::{ProbeData, ProbeSet};

pub fn dev() -> Device {
    Device::Cpu
}

/// One probe on 3 units `h = relu(x)`; logits = h·W + b with
/// W = [[1,0],[0,1],[0,0.5]], b = (0.01, 0): unit 0 votes for class 0, units 1 and 2 for class 1,
/// and the bias breaks the all-zero tie towards class 0.
pub fn one_probe_net() -> Result<(ProbeSet, impl Module, ProbeData)> {
    let probes = ProbeSet::new();
    let p = probes.add("h")?;
    let w = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.0, 0.5]], &dev())?;
    let b = Tensor::new(&[0.01f32, 0.0], &dev())?;
    let model = move |xs: &Tensor| -> Result<Tensor> {
        let h = p.forward(&xs.relu()?)?;
        h.matmul(&w)?.broadcast_add(&b)
    };
    let xs = Tensor::new(
        &[
            [3f32, 1.0, 1.0],
            [1.0, 2.0, 0.0],
            [2.0, 0.1, 3.0],
            [1.0, 1.5, 2.0],
        ],
        &dev(),
    )?;
    let ys = Tensor::new(&[0u32, 1, 1, 1], &dev())?;
    Ok((probes, model, ProbeData::new(xs, ys)?))
}

/// The crate's generator ([`candle_reliance::rng::SplitMix64`]) with the conveniences the
/// tests use.
pub struct Rng(candle_reliance::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(candle_reliance::rng::SplitMix64::new(seed))
    }
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.uniform()
    }
    /// `mag` with a random sign.
    pub fn with_random_sign(&mut self, mag: f64) -> f64 {
        if self.next() & 1 == 0 {
            mag
        } else {
            -mag
        }
    }
}

/// The element types every kernel is instantiated for.
pub const DTYPES: &[DType] = &[DType::F32, DType::F64, DType::F16, DType::BF16];

/// One case of the level-op tests: activation shape (`shape` its index in the shape list),
/// level count, expanding or not, and dtype.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub shape: usize,
    pub dims: &'static [usize],
    pub levels: usize,
    pub expand: bool,
    pub dtype: DType,
}

/// Every combination of `shapes`, `levels`, expanding or not, and [`DTYPES`], in that nesting
/// order.
pub fn level_cases(
    shapes: &'static [&'static [usize]],
    levels: &'static [usize],
) -> impl Iterator<Item = Case> {
    shapes.iter().enumerate().flat_map(move |(shape, &dims)| {
        levels.iter().flat_map(move |&levels| {
            [true, false].into_iter().flat_map(move |expand| {
                DTYPES.iter().map(move |&dtype| Case {
                    shape,
                    dims,
                    levels,
                    expand,
                    dtype,
                })
            })
        })
    })
}
