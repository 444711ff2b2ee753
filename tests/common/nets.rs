//! Small random networks with two fused probes, integer-valued (every sum exact in f32) or
//! float, and their data.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear};
use candle_reliance::curves::{AblationOrder, AblationSpec, Clamp};
use candle_reliance::probe::ProbedLayer;
use candle_reliance::rng::SplitMix64;
use candle_reliance::{ProbeData, ProbeSet};

pub const DEV: Device = Device::Cpu;

/// A tensor of `dims` with integer values in `lo..=hi` (or uniform floats in `[lo, hi)`).
pub fn random(
    rng: &mut SplitMix64,
    dims: &[usize],
    lo: i32,
    hi: i32,
    integer: bool,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            if integer {
                (lo + rng.below((hi - lo + 1) as usize) as i32) as f32
            } else {
                (lo as f64 + rng.uniform() * (hi - lo) as f64) as f32
            }
        })
        .collect();
    Tensor::from_vec(v, dims, &DEV)
}

/// A first layer, then two fused probes (each after a ReLU) with the layers they feed.
pub struct Net<L> {
    pub first: L,
    pub second: ProbedLayer,
    pub third: ProbedLayer,
}

impl<L: Module> Module for Net<L> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.first.forward(xs)?.relu()?;
        let h = self.second.forward(&h)?.relu()?;
        self.third.forward(&h)
    }
}

/// MLP `d_in → h1 → h2 → classes` with a fused probe after each hidden activation.
pub type Mlp = Net<Linear>;

pub fn linear(rng: &mut SplitMix64, d_in: usize, d_out: usize, integer: bool) -> Result<Linear> {
    let (lo, hi) = if integer { (-3, 3) } else { (-1, 1) };
    Ok(Linear::new(
        random(rng, &[d_out, d_in], lo, hi, integer)?,
        Some(random(rng, &[d_out], lo, hi, integer)?),
    ))
}

pub fn mlp(seed: u64, integer: bool) -> Result<(ProbeSet, Mlp, ProbeData)> {
    let mut rng = SplitMix64::new(seed);
    let probes = ProbeSet::new();
    let model = Mlp {
        first: linear(&mut rng, 12, 16, integer)?,
        second: probes
            .add("fc1")?
            .feeding(linear(&mut rng, 16, 24, integer)?),
        third: probes
            .add("fc2")?
            .feeding(linear(&mut rng, 24, 5, integer)?),
    };
    let xs = random(&mut rng, &[150, 12], 0, 3, integer)?;
    let data = labelled(&mut rng, &model, xs)?;
    Ok((probes, model, data))
}

/// conv 3×3 (1 → 4) → ReLU → [probe, fused conv 3×3 (4 → 6, padding 1)] → ReLU →
/// [probe, fused dense layer over the flattened map] → classes.
pub type Cnn = Net<Conv2d>;

/// `geometry`: the second convolution's stride, padding and dilation.
pub fn cnn(
    seed: u64,
    integer: bool,
    (stride, padding, dilation): (usize, usize, usize),
) -> Result<(ProbeSet, Cnn, ProbeData)> {
    let mut rng = SplitMix64::new(seed);
    let (lo, hi) = if integer { (-2, 2) } else { (-1, 1) };
    let probes = ProbeSet::new();
    let cfg = Conv2dConfig {
        padding,
        stride,
        dilation,
        ..Default::default()
    };
    let c1 = Conv2d::new(
        random(&mut rng, &[4, 1, 3, 3], lo, hi, integer)?,
        Some(random(&mut rng, &[4], lo, hi, integer)?),
        Conv2dConfig::default(),
    );
    let c2 = Conv2d::new(
        random(&mut rng, &[6, 4, 3, 3], lo, hi, integer)?,
        Some(random(&mut rng, &[6], lo, hi, integer)?),
        cfg,
    );
    // 8×8 input → 6×6 after c1 → c2's output side
    let side = (6 + 2 * padding - dilation * 2 - 1) / stride + 1;
    let fc = linear(&mut rng, 6 * side * side, 4, integer)?;
    let model = Cnn {
        first: c1,
        second: probes.add("c1")?.feeding(c2),
        third: probes.add("c2")?.feeding(fc),
    };
    let xs = random(&mut rng, &[80, 1, 8, 8], 0, 2, integer)?;
    let data = labelled(&mut rng, &model, xs)?;
    Ok((probes, model, data))
}

/// Labels: the model's own predictions, a fifth of them replaced by random classes, so that the
/// curve falls from near 1 as units are clamped.
pub fn labelled(rng: &mut SplitMix64, model: &impl Module, xs: Tensor) -> Result<ProbeData> {
    let logits = model.forward(&xs)?;
    let classes = logits.dim(1)?;
    let ys: Vec<u32> = logits
        .argmax(1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|y| {
            if rng.below(5) == 0 {
                rng.below(classes) as u32
            } else {
                y
            }
        })
        .collect();
    Ok(ProbeData::new(xs, Tensor::new(ys.as_slice(), &DEV)?)?)
}

pub fn spec(clamp: Clamp, orders: usize, seed: u64) -> AblationSpec {
    AblationSpec::default()
        .with_fractions(9)
        .with_clamp(clamp)
        .with_order(AblationOrder::Random { orders, seed })
}
