//! A probe fused with the layer that reads it, so that a clamp measurement can compute that
//! layer's output incrementally.
//!
//! Cumulative ablation masks are nested: the units clamped at one fraction of an order are
//! those of the previous fraction plus a few more. When the layer after a probe is linear in its
//! input, its output at the next fraction is the previous output minus the contribution of the
//! newly clamped units, `z' = z − W[:, Δ] (h − c)[Δ]`, so an order costs about one product of
//! that layer instead of one per fraction. [`ProbedLayer`] is the probe and that layer in one
//! module; outside measurements it is exactly `layer(probe(x))`.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_nn::Linear;
//! use candle_reliance::ProbeSet;
//!
//! let probes = ProbeSet::new();
//! let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
//! // The probe after fc1's activation, fused with fc2, which reads it.
//! let fc2 = probes.add("fc1")?.feeding(Linear::new(w, None));
//! let h = Tensor::new(&[[1f32, 1.0]], &Device::Cpu)?;
//! assert_eq!(fc2.forward(&h)?.to_vec2::<f32>()?, vec![vec![3.0, 7.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use super::{lock, Action, Probe};
use crate::ops::{ConvShape, IncrementalCpu, LayerShape, Tail};
use crate::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Linear};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The layer a [`ProbedLayer`] feeds: linear in the probed activation.
#[derive(Debug, Clone)]
pub enum NextLayer {
    /// A dense layer. After a feature map `(N, C, H, W)` it reads the map flattened from
    /// dimension 1 (as `flatten_from(1)` then the layer), so its input width must be `C·H·W`.
    Linear(Linear),
    /// A 2-D convolution (`groups: 1`; other groups are measured the batched way).
    Conv2d(Conv2d),
}

impl From<Linear> for NextLayer {
    fn from(l: Linear) -> Self {
        NextLayer::Linear(l)
    }
}

impl From<Conv2d> for NextLayer {
    fn from(c: Conv2d) -> Self {
        NextLayer::Conv2d(c)
    }
}

impl Module for NextLayer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            NextLayer::Linear(l) if xs.rank() == 4 => l.forward(&xs.flatten_from(1)?),
            NextLayer::Linear(l) => l.forward(xs),
            NextLayer::Conv2d(c) => c.forward(xs),
        }
    }
}

impl NextLayer {
    /// The layer's weight.
    fn weight(&self) -> &Tensor {
        match self {
            NextLayer::Linear(l) => l.weight(),
            NextLayer::Conv2d(c) => c.weight(),
        }
    }

    /// Whether the incremental path applies to input `xs`.
    fn supports(&self, xs: &Tensor) -> bool {
        match (self, xs.rank()) {
            (NextLayer::Linear(l), 2) => l.weight().dim(1).ok() == xs.dim(1).ok(),
            // A sequence `(N, T, D)`: the layer reads each position's `D` units.
            (NextLayer::Linear(l), 3) => l.weight().dim(1).ok() == xs.dim(2).ok(),
            (NextLayer::Linear(l), 4) => {
                l.weight().dim(1).ok() == Some(xs.dims()[1..].iter().product())
            }
            (NextLayer::Conv2d(c), 4) => c.config().groups == 1,
            _ => false,
        }
    }
}

/// A step a [`ProbedLayer`] applies to its layer's output, as the model's forward would right
/// after the layer (see [`ProbedLayer::then_relu`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AfterLayer {
    /// `relu()`.
    Relu,
    /// `max_pool2d(k)`: a `k × k` max-pool with stride `k` over each channel of a feature map.
    MaxPool2d(usize),
    /// candle-nn's `BatchNorm`, the next one given to [`ProbedLayer::then_batch_norm`]:
    /// `forward_t(xs, train)`.
    BatchNorm,
}

impl AfterLayer {
    fn apply(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match *self {
            AfterLayer::Relu => xs.relu(),
            AfterLayer::MaxPool2d(0) => candle_core::bail!("ProbedLayer: max-pool kernel 0"),
            AfterLayer::MaxPool2d(k) => xs.max_pool2d(k),
            AfterLayer::BatchNorm => {
                candle_core::bail!("ProbedLayer: a batch norm without its layer")
            }
        }
    }
}

/// A [`Probe`] and the layer that reads its output, as one module: `layer(probe(x))`, then the
/// steps added with [`ProbedLayer::then_relu`] and [`ProbedLayer::then_max_pool2d`]. Created
/// by [`Probe::feeding`].
///
/// During a clamp measurement in which this probe is the first one the forward pass reaches, the
/// layer's output for every variant is computed incrementally from the unclamped one: the masks
/// of one order are nested, so each fraction's output is the previous one minus what the newly
/// clamped units contributed, `z' = z − W[:, Δ] (h − c)[Δ]` (see `docs/performance.md`,
/// "Incremental checks"). It differs from clamping then applying the layer only by
/// floating-point reassociation. Otherwise, and whenever the probed activation holds a
/// non-finite value, it is the probe then the layer.
///
/// Keep nothing between the probe and the layer that is not the identity at evaluation time: a
/// max-pool between a feature map and the next convolution belongs before the probe (clamping a
/// channel to zero commutes with max-pooling it).
#[derive(Debug, Clone)]
pub struct ProbedLayer {
    probe: Probe,
    layer: NextLayer,
    after: Vec<AfterLayer>,
    /// The batch norms of the [`AfterLayer::BatchNorm`] steps, in order.
    norms: Vec<candle_nn::BatchNorm>,
}

impl Probe {
    /// Fuses this probe with `layer`, the layer that reads the probed activation, for a cheaper
    /// ablation curve. Use the result in place of both in the model's forward pass.
    pub fn feeding(self, layer: impl Into<NextLayer>) -> ProbedLayer {
        ProbedLayer {
            probe: self,
            layer: layer.into(),
            after: Vec::new(),
            norms: Vec::new(),
        }
    }
}

impl ProbedLayer {
    /// The probe.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The layer it feeds.
    pub fn layer(&self) -> &NextLayer {
        &self.layer
    }

    /// Also applies ReLU to the layer's output; the model's forward drops its own `relu()`
    /// after this module.
    ///
    /// Only a cost matter: during a clamp measurement the CPU computes the ReLU (and a
    /// max-pool added with [`ProbedLayer::then_max_pool2d`]) inside the op that computes every
    /// variant's layer output, so that those full-size outputs are not written out, read back by
    /// the activation, written again and read by the pool. That made a small CNN's check 2.1–2.7×
    /// and the MNIST MLP's about 1.1× cheaper (`docs/performance.md`, "Activation and pool in the
    /// fused layer"). Elsewhere these are candle's `relu` and `max_pool2d`.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use candle_nn::{Conv2d, Conv2dConfig};
    /// use candle_reliance::ProbeSet;
    ///
    /// let probes = ProbeSet::new();
    /// let w = Tensor::ones((2, 1, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
    /// // probe → conv → ReLU → 2×2 max-pool, as one module.
    /// let block = probes
    ///     .add("conv1")?
    ///     .feeding(Conv2d::new(w, None, Conv2dConfig::default()))
    ///     .then_relu()
    ///     .then_max_pool2d(2);
    /// let x = Tensor::new(&[[[[1f32, -2.0], [3.0, -4.0]]]], &Device::Cpu)?;
    /// assert_eq!(block.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, vec![3.0, 3.0]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn then_relu(mut self) -> Self {
        self.after.push(AfterLayer::Relu);
        self
    }

    /// Also applies a `k × k` max-pool with stride `k` (candle's `max_pool2d(k)`) to the
    /// layer's output, a feature map; see [`ProbedLayer::then_relu`]. A kernel of 0 is an error
    /// at the forward pass.
    pub fn then_max_pool2d(mut self, k: usize) -> Self {
        self.after.push(AfterLayer::MaxPool2d(k));
        self
    }

    /// Also applies candle-nn's batch norm to the layer's output (a convolution's channels or a
    /// dense layer's outputs), as `conv → batch norm → ReLU` blocks do:
    /// `.then_batch_norm(bn).then_relu()`. A model with such a step is a `ModuleT`: call
    /// [`ProbedLayer::forward_t`] with its `train` flag (`Module::forward` is evaluation mode).
    ///
    /// During a clamp measurement (evaluation mode, where batch norm is an affine map per
    /// channel) the layer is still computed incrementally for every variant; the batch norm and
    /// the steps after it then run as candle ops on that output.
    pub fn then_batch_norm(mut self, bn: candle_nn::BatchNorm) -> Self {
        self.after.push(AfterLayer::BatchNorm);
        self.norms.push(bn);
        self
    }

    /// The steps applied after the layer, in order.
    pub fn after(&self) -> &[AfterLayer] {
        &self.after
    }

    /// The steps after the layer, with candle's ops; batch norm in training mode if `train`.
    fn finish(&self, mut xs: Tensor, train: bool) -> Result<Tensor> {
        let mut norms = self.norms.iter();
        for a in &self.after {
            xs = match a {
                AfterLayer::BatchNorm => match norms.next() {
                    Some(bn) => candle_core::ModuleT::forward_t(bn, &xs, train)?,
                    None => a.apply(&xs)?,
                },
                _ => a.apply(&xs)?,
            };
        }
        Ok(xs)
    }

    /// The steps after the layer as the CPU op's tail, if it can apply them all.
    fn tail(&self, shape: LayerShape) -> Option<Tail> {
        // A pool needs a feature map at least as large as its window.
        let pools = |k| match shape {
            LayerShape::Conv(c) => Tail::pooled(k, c.out_hw()).is_some(),
            LayerShape::Dense { .. } => false,
        };
        let mut tail = Tail::default();
        for a in &self.after {
            match *a {
                AfterLayer::Relu => tail.relu = true,
                // ReLU and max-pooling commute: one pool anywhere in the steps.
                AfterLayer::MaxPool2d(k) if tail.pool.is_none() && pools(k) => tail.pool = Some(k),
                // (A batch norm runs as candle ops after the op.)
                _ => return None,
            }
        }
        Some(tail)
    }
}

impl Module for ProbedLayer {
    /// The probe, the layer and its steps; a batch-norm step in evaluation mode.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(xs, false)
    }
}

impl ProbedLayer {
    /// The probe, the layer and its steps, batch-norm steps in training mode if `train` (as
    /// candle's `ModuleT::forward_t`); without such a step, `train` changes nothing.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_measured(xs, train)
            .map_err(|e| self.probe.fail_forward(e))
    }

    /// `skip + branch` for a residual connection whose branch holds this layer: see
    /// [`Probe::residual`].
    pub fn residual(&self, skip: &Tensor, branch: &Tensor) -> candle_core::Result<Tensor> {
        self.probe.residual(skip, branch)
    }

    fn forward_measured(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let shared = &self.probe.shared;
        if !shared.active.load(Ordering::Acquire) {
            return self.finish(self.layer.forward(xs)?, train);
        }
        match self.claim(xs)? {
            Some((plan, values)) => {
                let tail = match &plan.kind {
                    PlanKind::Cpu { shape, .. } => self.tail(*shape),
                    PlanKind::Batched { .. } => None,
                };
                // A sequence goes through as `N·T` rows; each variant's rows come back as its
                // `N` samples of `T` positions.
                let out = incremental(
                    &flat(xs)?,
                    &self.layer,
                    &plan,
                    &values,
                    tail.unwrap_or_default(),
                )?;
                let out = match (xs.dims(), out.dims()) {
                    ([_, t, _], [r, o]) => out.reshape((r / t, *t, *o))?,
                    _ => out,
                };
                match tail {
                    Some(_) => Ok(out),
                    None => self.finish(out, train),
                }
            }
            None => self.finish(self.layer.forward(&self.probe.forward(xs)?)?, train),
        }
    }
}

/// A sequence activation `(N, T, D)` as `N·T` rows of `D` units; any other as it is.
fn flat(xs: &Tensor) -> Result<Tensor> {
    match xs.dims() {
        [n, t, d] => Ok(xs.reshape((n * t, *d))?),
        _ => Ok(xs.clone()),
    }
}

/// How each variant's output is reached: from a base (an earlier variant whose clamped set is
/// contained in this one's, or the unclamped output) by removing the newly clamped inputs. The
/// plan is built once per check, so that a forward runs a fixed handful of ops whatever the
/// variant count.
#[derive(Debug)]
pub(crate) struct Plan {
    variants: usize,
    /// Whether every clamp value is zero (then the removed input is the activation itself).
    zero: bool,
    /// Each variant's base (`None`: the unclamped output); always an earlier variant.
    bases: Vec<Option<usize>>,
    kind: PlanKind,
}

#[derive(Debug)]
enum PlanKind {
    /// On the CPU (f32, f64): one op writes every variant's output, base copy then product
    /// (`ops::IncrementalCpu`).
    Cpu {
        /// Newly clamped inputs of each variant: columns of a dense layer, channels of a
        /// convolution.
        added: Vec<Vec<u32>>,
        /// The weights of those inputs in variant order: dense `(Σ|added|, out)`, convolution
        /// `(out, Σ|added|, kh, kw)`.
        weights: Tensor,
        /// With the zero clamp, a convolution's weight with its bias as one more column, `(out,
        /// channels · kh · kw + 1)`: the op computes the unclamped output itself.
        full: Option<Tensor>,
        shape: LayerShape,
    },
    /// Elsewhere: a padded batched product and a chain-matrix product.
    Batched {
        /// Newly clamped input indices of every variant, padded to `width` with index 0 (whose
        /// weights are zero there): `(variants · width,)` u32.
        gather: Tensor,
        width: usize,
        /// The weight restricted to each variant's new inputs (zeros at the padding): a dense
        /// layer `(variants, width, out)`; a convolution `(variants · out, width, kh, kw)`.
        weights: Tensor,
        /// `chain[v][w] = 1` when variant `w` is `v` or one of its bases: a variant's output
        /// is the unclamped one minus the sum of the removals along its chain.
        /// `(variants, variants)`.
        chain: Tensor,
    },
}

impl ProbedLayer {
    /// Takes the incremental path when it applies: records the probe as reached (as
    /// [`Probe::forward`] would) and returns the plan and the clamp values. `None`: use the
    /// probe, then the layer.
    fn claim(&self, xs: &Tensor) -> Result<Option<(Arc<Plan>, Tensor)>> {
        let mut inner = lock(&self.probe.shared)?;
        let i = self.probe.index;
        let Some(pass) = inner.pass.as_mut() else {
            return Ok(None);
        };
        let Action::Clamp { values, .. } = &pass.action else {
            return Ok(None);
        };
        // Only the first probe reached sees the unexpanded batch, the same for every variant.
        let applies = pass.incremental
            && pass.expand
            && pass.rows_in.is_none()
            && !pass.seen[i]
            && self.layer.supports(xs);
        // A clamped inf or NaN must vanish, as the batched select makes it; `h − c` cannot.
        if !applies || !(pass.finite[i] || crate::ops::all_finite(xs)?) {
            return Ok(None);
        }
        let values = values[i].clone();
        let rows = super::samples(xs.dims())?;
        pass.seen[i] = true;
        pass.call_order.push(i);
        pass.rows_in = Some(rows);
        // One output block per group of variants that agree on this probe (see `merge`).
        let step = super::merge::advance(pass, i)?;
        let plan = match &pass.plans[i] {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(build_plan(
                    &step.keep,
                    &values,
                    flat(xs)?.dims(),
                    &self.layer,
                )?);
                pass.plans[i] = Some(p.clone());
                p
            }
        };
        if pass.record_unclamped {
            super::record_unclamped(pass, i, xs, true)?;
        }
        pass.incremental_used = true;
        Ok(Some((plan, values)))
    }
}

/// For each variant (a row of `keep`, 0 = clamped), the base with the most clamped units among
/// the earlier variants whose clamped sets it contains, and the units it adds to it.
/// How many earlier variants are searched for a base.
const LOOK_BACK: usize = 64;

/// For each variant (a row of `keep`, 0 = clamped), the base with the most clamped units among
/// the earlier variants whose clamped sets it contains, and the units it adds to it.
fn build_plan(keep: &Tensor, values: &Tensor, dims: &[usize], layer: &NextLayer) -> Result<Plan> {
    let keep = keep.to_vec2::<u8>()?;
    let zero = values
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .all(|&v| v == 0.0);
    let (variants, units) = (keep.len(), dims[1]);
    // A dense layer after a feature map reads `positions` flattened columns per channel.
    let per_unit = match layer {
        NextLayer::Linear(_) if dims.len() == 4 => dims[2] * dims[3],
        _ => 1,
    };
    let clamped: Vec<Vec<usize>> = keep
        .iter()
        .map(|row| (0..units).filter(|&u| row[u] == 0).collect())
        .collect();
    let mut bases = Vec::with_capacity(variants);
    let mut added: Vec<Vec<u32>> = Vec::with_capacity(variants);
    let mut in_set = vec![false; units];
    for (v, set) in clamped.iter().enumerate() {
        set.iter().for_each(|&u| in_set[u] = true);
        // Variants come order by order, fraction by fraction, so the base is nearly always the
        // previous one; looking back a bounded distance keeps planning linear in the variants.
        let mut base: Option<usize> = None;
        let mut best = 0;
        for w in (v.saturating_sub(LOOK_BACK)..v).rev() {
            let other = &clamped[w];
            if other.len() > best && other.len() <= set.len() && other.iter().all(|&u| in_set[u]) {
                base = Some(w);
                best = other.len();
                if best == set.len() {
                    break;
                }
            }
        }
        set.iter().for_each(|&u| in_set[u] = false);
        let from: &[usize] = base.map_or(&[], |b| &clamped[b]);
        from.iter().for_each(|&u| in_set[u] = true);
        added.push(
            set.iter()
                .filter(|&&u| !in_set[u])
                .map(|&u| u as u32)
                .collect::<Vec<u32>>(),
        );
        from.iter().for_each(|&u| in_set[u] = false);
        bases.push(base);
    }
    // A dense layer reads the columns of its added units; a convolution, their channels.
    let columns: Vec<Vec<u32>> = match layer {
        NextLayer::Linear(_) if per_unit > 1 => added
            .iter()
            .map(|a| {
                a.iter()
                    .flat_map(|&u| {
                        let u = u as usize;
                        (u * per_unit..(u + 1) * per_unit).map(|c| c as u32)
                    })
                    .collect()
            })
            .collect(),
        _ => added,
    };
    let (device, dtype) = (layer.weight().device(), layer.weight().dtype());
    let kind = if device.is_cpu() && matches!(dtype, DType::F32 | DType::F64) {
        cpu_plan(columns, dims, layer, zero)?
    } else {
        batched_plan(columns, &bases, layer)?
    };
    Ok(Plan {
        variants,
        zero,
        bases,
        kind,
    })
}

/// The CPU op's plan: every variant's added inputs and their weights, unpadded; with the zero
/// clamp, a convolution's weight and bias for the op's own unclamped output.
fn cpu_plan(
    added: Vec<Vec<u32>>,
    dims: &[usize],
    layer: &NextLayer,
    zero: bool,
) -> Result<PlanKind> {
    let all: Vec<u32> = added.iter().flatten().copied().collect();
    let (weights, shape) = match layer {
        NextLayer::Linear(l) => {
            let (outputs, inputs) = l.weight().dims2()?;
            // Rows of the transposed weight `(inputs, out)`, one per added column.
            let wt = l.weight().t()?.contiguous()?;
            let w = if all.is_empty() {
                wt.narrow(0, 0, 0)?
            } else {
                wt.index_select(&Tensor::new(all.as_slice(), wt.device())?, 0)?
            };
            (w, LayerShape::Dense { inputs, outputs })
        }
        NextLayer::Conv2d(c) => {
            let (outputs, channels, kh, kw) = c.weight().dims4()?;
            let w = if all.is_empty() {
                c.weight().narrow(1, 0, 0)?
            } else {
                c.weight()
                    .index_select(&Tensor::new(all.as_slice(), c.weight().device())?, 1)?
            };
            let cfg = c.config();
            let shape = ConvShape {
                channels,
                height: dims[2],
                width: dims[3],
                outputs,
                kh,
                kw,
                stride: cfg.stride,
                padding: cfg.padding,
                dilation: cfg.dilation,
            };
            (w, LayerShape::Conv(shape))
        }
    };
    // The op computes a convolution's unclamped output from the patches of `d`, which are the
    // activation's own only for the zero clamp.
    let full = match layer {
        NextLayer::Conv2d(c) if zero => Some(weight_and_bias(c)?),
        _ => None,
    };
    Ok(PlanKind::Cpu {
        added,
        weights: weights.contiguous()?,
        full,
        shape,
    })
}

/// A convolution's weight `(out, c, kh, kw)` as rows `(out, c · kh · kw)`, each followed by its
/// output's bias (zero without one).
fn weight_and_bias(c: &Conv2d) -> Result<Tensor> {
    let w = c.weight();
    let out = w.dim(0)?;
    let rows = w.reshape((out, w.elem_count() / out.max(1)))?;
    let bias = match c.bias() {
        Some(b) => b.reshape((out, 1))?,
        None => Tensor::zeros((out, 1), w.dtype(), w.device())?,
    };
    Ok(Tensor::cat(&[&rows, &bias], 1)?.contiguous()?)
}

/// The padded batched plan for devices other than the CPU.
fn batched_plan(
    added: Vec<Vec<u32>>,
    bases: &[Option<usize>],
    layer: &NextLayer,
) -> Result<PlanKind> {
    let variants = added.len();
    let width = added.iter().map(Vec::len).max().unwrap_or(0).max(1);
    // Padding gathers input 0 against zero weights: it adds exact zeros (the input is finite).
    let gather: Vec<u32> = added
        .iter()
        .flat_map(|a| a.iter().copied().chain(std::iter::repeat(0)).take(width))
        .collect();
    let real: Vec<f32> = added
        .iter()
        .flat_map(|a| (0..width).map(move |j| if j < a.len() { 1.0 } else { 0.0 }))
        .collect();
    let (device, dtype) = (layer.weight().device(), layer.weight().dtype());
    let gather = Tensor::new(gather.as_slice(), device)?;
    let real = Tensor::new(real.as_slice(), device)?.to_dtype(dtype)?;
    let weights = match layer {
        NextLayer::Linear(l) => {
            // Rows of the transposed weight `(inputs, out)` gathered to `(variants · width, out)`
            // (whole rows: a copy each, where a column gather reads element by element), padding
            // zeroed.
            let w = l.weight().t()?.contiguous()?.index_select(&gather, 0)?;
            let out = w.dim(1)?;
            w.broadcast_mul(&real.unsqueeze(1)?)?
                .reshape((variants, width, out))?
        }
        NextLayer::Conv2d(c) => {
            let w = c.weight().index_select(&gather, 1)?; // (out, variants · width, kh, kw)
            let (out, _, kh, kw) = w.dims4()?;
            w.broadcast_mul(&real.reshape((1, variants * width, 1, 1))?)?
                .reshape((out, variants, width, kh, kw))?
                .transpose(0, 1)?
                .reshape((variants * out, width, kh, kw))?
        }
    }
    .contiguous()?;
    let mut chain = vec![0f32; variants * variants];
    for v in 0..variants {
        let mut w = Some(v);
        while let Some(i) = w {
            chain[v * variants + i] = 1.0;
            w = bases[i];
        }
    }
    let chain = Tensor::from_vec(chain, (variants, variants), device)?.to_dtype(dtype)?;
    Ok(PlanKind::Batched {
        gather,
        width,
        weights,
        chain,
    })
}

/// The layer's output for every variant, variant-major: `(variants · N, ...)`; on the CPU with
/// `tail` applied (elsewhere `tail` must be the identity).
fn incremental(
    xs: &Tensor,
    layer: &NextLayer,
    plan: &Plan,
    values: &Tensor,
    tail: Tail,
) -> Result<Tensor> {
    // What clamping removes from the input: h − c (h itself for the zero clamp).
    let d = if plan.zero {
        xs.clone()
    } else {
        let mut shape = vec![1; xs.rank()];
        shape[1] = xs.dim(1)?;
        xs.broadcast_sub(&values.to_dtype(xs.dtype())?.reshape(shape)?)?
    };
    let v = plan.variants;
    let m = xs.dim(0)?;
    let (gather, width, weights, chain) = match &plan.kind {
        PlanKind::Cpu {
            added,
            weights,
            full,
            shape,
        } => {
            let op = IncrementalCpu {
                bases: &plan.bases,
                added,
                shape: *shape,
                conv_from_weight: full.is_some(),
                tail,
            };
            let first = match full {
                Some(f) => f.clone(),
                None => layer.forward(xs)?.contiguous()?,
            };
            return Ok(first.apply_op3_no_bwd(&d.contiguous()?, weights, &op)?);
        }
        PlanKind::Batched {
            gather,
            width,
            weights,
            chain,
        } => (gather, *width, weights, chain),
    };
    let unclamped = layer.forward(xs)?;
    let removed = match layer {
        NextLayer::Linear(_) => {
            // Rows of the transposed input `(inputs, m)` gathered to `(variants, width, m)`, read
            // as `(variants, m, width)` by the product without a copy.
            let part = d
                .flatten_from(1)?
                .t()?
                .contiguous()?
                .index_select(gather, 0)?
                .reshape((v, width, m))?
                .transpose(1, 2)?;
            part.matmul(weights)? // (variants, m, out)
        }
        NextLayer::Conv2d(c) => {
            // (m, variants · width, h, w): one group per variant.
            let part = d.index_select(gather, 1)?;
            let cfg = c.config();
            let r = part.conv2d(weights, cfg.padding, cfg.stride, cfg.dilation, v)?;
            let (_, _, oh, ow) = r.dims4()?;
            let out = r.dim(1)? / v;
            r.reshape((m, v, out, oh, ow))?
                .transpose(0, 1)?
                .contiguous()?
        }
    };
    let per_variant: Vec<usize> = removed.dims()[1..].to_vec();
    let flat = removed.reshape((v, per_variant.iter().product::<usize>()))?;
    let along_chain = chain.matmul(&flat)?.reshape(removed.shape())?;
    let out = unclamped.unsqueeze(0)?.broadcast_sub(&along_chain)?;
    let mut dims = per_variant;
    dims[0] *= v;
    Ok(out.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProbeSet;
    use candle_core::Device;
    use candle_nn::Conv2dConfig;

    #[test]
    fn the_op_takes_the_steps_it_can_apply() -> Result<()> {
        let probes = ProbeSet::new();
        let w = Tensor::zeros((2, 1, 3, 3), DType::F32, &Device::Cpu)?;
        let conv = probes
            .add("a")?
            .feeding(Conv2d::new(w, None, Conv2dConfig::default()));
        // An 8 × 8 output map.
        let shape = LayerShape::Conv(ConvShape {
            channels: 1,
            height: 10,
            width: 10,
            outputs: 2,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 0,
            dilation: 1,
        });
        let tail = |l: &ProbedLayer| l.tail(shape);
        assert_eq!(tail(&conv), Some(Tail::default()));
        let relu_pool = conv.clone().then_relu().then_max_pool2d(2);
        let expected = Tail {
            relu: true,
            pool: Some(2),
        };
        assert_eq!(tail(&relu_pool), Some(expected));
        assert_eq!(
            tail(&conv.clone().then_max_pool2d(2).then_relu()),
            Some(expected)
        );
        // Two pools, a window wider than the map, a zero kernel: candle's ops after the op.
        assert_eq!(tail(&relu_pool.then_max_pool2d(2)), None);
        assert_eq!(tail(&conv.clone().then_max_pool2d(9)), None);
        assert_eq!(tail(&conv.then_max_pool2d(0)), None);
        // A dense layer takes a ReLU, not a pool.
        let dense = LayerShape::Dense {
            inputs: 4,
            outputs: 2,
        };
        let lin = probes
            .add("b")?
            .feeding(Linear::new(
                Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?,
                None,
            ))
            .then_relu();
        let relu = Tail {
            relu: true,
            pool: None,
        };
        assert_eq!(lin.tail(dense), Some(relu));
        assert_eq!(lin.then_max_pool2d(1).tail(dense), None);
        Ok(())
    }
}
