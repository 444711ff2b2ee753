//! Probe layers: identity modules placed after activations, through which a measurement clamps,
//! perturbs or records units.
//!
//! A unit is the last dimension of a rank-2 activation `(N, U)`, the last dimension of a
//! sequence `(N, T, U)` at every position (a transformer's hidden or feed-forward units; clamping
//! it clamps all `T` positions, and its per-sample value is its mean over them), and a channel
//! (dimension 1, a whole feature map) of a rank-4 activation `(N, C, H, W)`. Units are numbered globally across
//! a [`ProbeSet`] in the order the probes were added: probe 0's units first.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_reliance::ProbeSet;
//!
//! let probes = ProbeSet::new();
//! let after_fc1 = probes.add("fc1")?;
//! let xs = Tensor::ones((4, 8), candle_core::DType::F32, &Device::Cpu)?;
//! // Outside a measurement a probe returns its input unchanged (the same storage, no copy).
//! let ys = after_fc1.forward(&xs)?;
//! assert_eq!(ys.to_vec2::<f32>()?, xs.to_vec2::<f32>()?);
//! assert!(probes.add("fc1").is_err()); // names are unique
//! # Ok::<(), candle_core::Error>(())
//! ```

mod fused;
mod merge;
pub use fused::{AfterLayer, NextLayer, ProbedLayer};

use crate::error::{bail, fail, Error};
use crate::ops::{level_clamp, level_noise, rows_units_inner, LevelNoise};
use crate::Result;
use candle_core::{DType, Module, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A named group of probes sharing one measurement state. Cloning is cheap and shares the set.
#[derive(Clone, Default)]
pub struct ProbeSet {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Read on every forward of every probe; the only cost of an idle probe.
    active: AtomicBool,
    inner: Mutex<Inner>,
    /// The typed error of the last failing probe forward: the model's forward returns candle's
    /// error, from which [`ProbeSet::take_failure`] recovers what the probe said.
    failure: Mutex<Option<Error>>,
}

#[derive(Default)]
struct Inner {
    names: Vec<String>,
    pass: Option<Pass>,
}

/// A probe layer. Insert it after an activation; it implements [`Module`] and is an identity
/// outside measurements. Created by [`ProbeSet::add`].
#[derive(Clone)]
pub struct Probe {
    shared: Arc<Shared>,
    index: usize,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe").field("index", &self.index).finish()
    }
}

impl std::fmt::Debug for ProbeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSet")
            .field("names", &self.names())
            .finish()
    }
}

/// Per-unit sums gathered by a statistics pass.
#[derive(Debug, Clone, Default)]
pub(crate) struct UnitSums {
    pub units: usize,
    /// Positions per unit and sample: 1, `T` for a sequence, `H·W` for a feature map.
    pub positions: usize,
    /// Values per unit seen so far (samples × positions, without padded tokens).
    pub count: u64,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    /// Per class, per unit: sum over samples of the unit's activation (averaged over positions
    /// for a feature map), laid out `[class · units + unit]`.
    pub class_sum: Vec<f64>,
}

/// What the probes do during the current forward pass.
pub(crate) enum Action {
    /// Record per-unit sums; pass activations through.
    Stats,
    /// Per probe: keep mask `(V, U)` u8 (one row per variant), the same bytes on the host
    /// (for the rows variants share, see `merge`) and clamp values `(U,)`.
    Clamp {
        keep: Vec<Tensor>,
        host: Vec<Vec<u8>>,
        values: Vec<Tensor>,
    },
    /// Per probe: noise std `(V, U)` f32 (one row per variant); per probe seeds derive from
    /// `seed`; `variant_offset` is the index of the first row's variant among all variants.
    Noise {
        std: Vec<Tensor>,
        seed: u64,
        variant_offset: usize,
    },
    /// Record each probe's activation `(rows, U)` (a feature map averaged over positions), with
    /// its autograd graph; pass activations through.
    Capture,
}

pub(crate) struct Pass {
    pub action: Action,
    /// Settings evaluated by one forward (variants of a batched measurement, else 1).
    pub variants: usize,
    /// Whether the first probe reached expands the batch to `variants × rows`.
    pub expand: bool,
    // Per forward:
    pub rows_in: Option<usize>,
    /// In a clamp pass, the merge step of the last probe reached: which block of rows each
    /// variant reads, and how many blocks the rows hold (`merge`).
    step: Option<std::sync::Arc<merge::MergeStep>>,
    pub seen: Vec<bool>,
    pub call_order: Vec<usize>,
    pub sample_offset: usize,
    pub total_samples: usize,
    /// Labels of the current chunk (a class per sample, or per token) and the class count, for
    /// per-class sums; kept on the host, where the statistics pass selects its rows by them.
    pub labels: Option<(Vec<u32>, usize)>,
    // Accumulated over a pass:
    pub sums: Vec<Option<UnitSums>>,
    /// Per probe, the activation recorded by the last forward of a capture pass.
    pub captured: Vec<Option<Tensor>>,
    /// Whether a [`ProbedLayer`] may compute its layer incrementally during a clamp pass.
    pub incremental: bool,
    /// Per probe, the incremental plan of the current action (built at its first forward).
    plans: Vec<Option<std::sync::Arc<fused::Plan>>>,
    /// Whether some forward of this pass took the incremental path.
    pub incremental_used: bool,
    /// Per probe, whether its activations on the data are known to be finite (from the
    /// statistics pass); unknown ones are checked per forward.
    pub finite: Vec<bool>,
    /// During an expanded clamp pass whose first variant clamps nothing: record every probe's
    /// per-unit sums over that variant's rows, so the pass also yields the statistics.
    pub record_unclamped: bool,
    /// Whether the variants of a clamp pass that agree on the probes reached so far share rows
    /// (`merge`).
    pub merge: bool,
    /// Per probe, its merge step under the current action.
    merges: Vec<Option<std::sync::Arc<merge::MergeStep>>>,
}

impl ProbeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a probe named `name`. Names must be unique and non-empty; probes cannot be added
    /// while a measurement runs.
    pub fn add(&self, name: impl Into<String>) -> Result<Probe> {
        let name = name.into();
        let mut inner = self.lock()?;
        if name.trim().is_empty() {
            bail!(Probe, "probe names must not be empty");
        }
        if inner.pass.is_some() {
            bail!(
                Probe,
                "cannot add probe `{name}` while a measurement is running"
            );
        }
        if inner.names.contains(&name) {
            bail!(Probe, "a probe named `{name}` already exists in this set");
        }
        inner.names.push(name);
        Ok(Probe {
            shared: self.shared.clone(),
            index: inner.names.len() - 1,
        })
    }

    /// The probes' names in the order they were added (the global unit order).
    pub fn names(&self) -> Vec<String> {
        self.lock().map(|i| i.names.clone()).unwrap_or_default()
    }

    /// Number of probes.
    pub fn len(&self) -> usize {
        self.names().len()
    }

    /// Whether the set has no probes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        lock(&self.shared)
    }

    /// The error a probe raised inside the model's forward pass, if one did since the last
    /// call: a measurement returns it in place of the candle error the model passed on.
    pub(crate) fn take_failure(&self) -> Option<Error> {
        self.shared.failure.lock().ok().and_then(|mut f| f.take())
    }

    /// Starts a pass; the guard ends it (also on error paths).
    pub(crate) fn begin(
        &self,
        action: Action,
        variants: usize,
        expand: bool,
    ) -> Result<PassGuard<'_>> {
        let mut inner = self.lock()?;
        if inner.names.is_empty() {
            bail!(
                Probe,
                "the probe set is empty: add probes after the activations to measure"
            );
        }
        if inner.pass.is_some() {
            bail!(Probe, "a measurement is already running on this probe set");
        }
        let n = inner.names.len();
        inner.pass = Some(Pass {
            action,
            variants,
            expand,
            rows_in: None,
            step: None,
            seen: vec![false; n],
            call_order: Vec::with_capacity(n),
            sample_offset: 0,
            total_samples: 0,
            labels: None,
            sums: vec![None; n],
            captured: vec![None; n],
            incremental: true,
            plans: vec![None; n],
            incremental_used: false,
            finite: vec![false; n],
            record_unclamped: false,
            merge: false,
            merges: vec![None; n],
        });
        self.shared.active.store(true, Ordering::Release);
        Ok(PassGuard { set: self })
    }
}

fn lock(shared: &Shared) -> Result<MutexGuard<'_, Inner>> {
    shared
        .inner
        .lock()
        .map_err(|_| fail!(Usage, "probe state poisoned by an earlier panic"))
}

/// Ends the pass when dropped.
pub(crate) struct PassGuard<'a> {
    set: &'a ProbeSet,
}

impl PassGuard<'_> {
    /// Prepares for one forward pass over `samples` starting at `sample_offset` of `total`.
    pub fn start_forward(&self, sample_offset: usize, total: usize) -> Result<()> {
        self.start_forward_labelled(sample_offset, total, None)
    }

    /// [`PassGuard::start_forward`] with the chunk's labels (a class per sample, or per token)
    /// and the class count, for per-class sums.
    pub fn start_forward_labelled(
        &self,
        sample_offset: usize,
        total: usize,
        labels: Option<(Vec<u32>, usize)>,
    ) -> Result<()> {
        self.with(|p| {
            p.labels = labels;
            p.seen.iter_mut().for_each(|s| *s = false);
            p.call_order.clear();
            p.rows_in = None;
            p.step = None;
            p.sample_offset = sample_offset;
            p.total_samples = total;
            Ok(())
        })
    }

    /// Checks every probe ran once in the forward pass just made.
    pub fn finish_forward(&self) -> Result<()> {
        let names = self.set.names();
        self.with(|p| {
            let missing: Vec<&str> = p
                .seen
                .iter()
                .zip(&names)
                .filter(|(s, _)| !**s)
                .map(|(_, n)| n.as_str())
                .collect();
            if !missing.is_empty() {
                bail!(
                    Probe,
                    "probe(s) {missing:?} were not reached by the model's forward pass; \
                     each probe must be applied exactly once per forward"
                );
            }
            Ok(())
        })
    }

    /// Replaces the action (and variant count) between forward passes.
    pub fn set_action(&self, action: Action, variants: usize, expand: bool) -> Result<()> {
        self.with(|p| {
            p.action = action;
            p.variants = variants;
            p.expand = expand;
            p.plans.iter_mut().for_each(|plan| *plan = None);
            p.merges.iter_mut().for_each(|m| *m = None);
            Ok(())
        })
    }

    /// Whether variants that agree on the probes reached so far share rows (see `merge`);
    /// the plans built for the other setting are dropped.
    pub fn set_merge(&self, merge: bool) -> Result<()> {
        self.with(|p| {
            if p.merge != merge {
                p.merge = merge;
                p.plans.iter_mut().for_each(|plan| *plan = None);
                p.merges.iter_mut().for_each(|m| *m = None);
            }
            Ok(())
        })
    }

    /// Whether a probe under the current action left fewer blocks of rows than variants.
    pub fn merged(&self) -> Result<bool> {
        self.with(|p| Ok(p.merges.iter().flatten().any(|s| s.blocks < p.variants)))
    }

    /// Drops the sums recorded so far (a forward that is run again).
    pub fn clear_sums(&self) -> Result<()> {
        self.with(|p| {
            p.sums.iter_mut().for_each(|s| *s = None);
            Ok(())
        })
    }

    /// Allows or forbids the incremental path of [`ProbedLayer`]s (allowed by default).
    pub fn set_incremental(&self, incremental: bool) -> Result<()> {
        self.with(|p| {
            p.incremental = incremental;
            Ok(())
        })
    }

    /// Records which probes' activations are known to be finite on the data.
    pub fn set_finite(&self, finite: Vec<bool>) -> Result<()> {
        self.with(|p| {
            if finite.len() == p.finite.len() {
                p.finite = finite;
            }
            Ok(())
        })
    }

    /// Records (or stops recording) the unclamped variant's sums at every probe; see
    /// [`Pass::record_unclamped`].
    pub fn set_record_unclamped(&self, record: bool) -> Result<()> {
        self.with(|p| {
            p.record_unclamped = record;
            Ok(())
        })
    }

    /// Whether some forward of this pass took the incremental path.
    pub fn incremental_used(&self) -> Result<bool> {
        self.with(|p| Ok(p.incremental_used))
    }

    /// The probes in the order the last forward pass reached them.
    pub fn call_order(&self) -> Result<Vec<usize>> {
        self.with(|p| Ok(p.call_order.clone()))
    }

    /// Takes the activations recorded by the last forward of a capture pass.
    pub fn take_captured(&self) -> Result<Vec<Option<Tensor>>> {
        self.with(|p| {
            let n = p.captured.len();
            Ok(std::mem::replace(&mut p.captured, vec![None; n]))
        })
    }

    /// Takes the sums recorded by a statistics pass.
    pub fn take_sums(&self) -> Result<Vec<Option<UnitSums>>> {
        self.with(|p| Ok(std::mem::take(&mut p.sums)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Pass) -> Result<T>) -> Result<T> {
        let mut inner = self.set.lock()?;
        match inner.pass.as_mut() {
            Some(p) => f(p),
            None => bail!(Probe, "no measurement is running"),
        }
    }
}

impl Drop for PassGuard<'_> {
    fn drop(&mut self) {
        self.set.shared.active.store(false, Ordering::Release);
        if let Ok(mut inner) = self.set.shared.inner.lock() {
            inner.pass = None;
        }
    }
}

/// Records the activation at every probe during one forward pass, keeping the autograd graph,
/// e.g. for [`crate::units::selectivity_regularizer`]. Created by [`ProbeSet::capture`]; the probes
/// are back to identities once it is finished or dropped.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_reliance::ProbeSet;
///
/// let probes = ProbeSet::new();
/// let p = probes.add("conv")?;
/// // A (N, C, H, W) = (1, 2, 1, 2) feature map: channel means 1.5 and 0.
/// let xs = Tensor::new(&[[[[1f32, 2.0]], [[0.0, 0.0]]]], &Device::Cpu)?;
/// let cap = probes.capture()?;
/// p.forward(&xs)?;
/// let acts = cap.finish()?;
/// assert_eq!(acts[0].to_vec2::<f32>()?, vec![vec![1.5, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct Capture<'a> {
    guard: PassGuard<'a>,
}

impl std::fmt::Debug for Capture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").finish_non_exhaustive()
    }
}

impl ProbeSet {
    /// Starts recording: during the next forward pass every probe keeps its activation, `(N, U)`
    /// for a dense layer and `(N, C)` (averaged over positions) for a feature map, without
    /// detaching it. Run exactly one forward, then call [`Capture::finish`]. Fails while a
    /// measurement runs on this set.
    pub fn capture(&self) -> Result<Capture<'_>> {
        Ok(Capture {
            guard: self.begin(Action::Capture, 1, false)?,
        })
    }
}

impl Capture<'_> {
    /// Ends the recording and returns one activation per probe, in the order the probes were
    /// added. Fails when a probe was not reached by the forward pass.
    pub fn finish(self) -> Result<Vec<Tensor>> {
        self.guard.finish_forward()?;
        let names = self.guard.set.names();
        self.guard
            .take_captured()?
            .into_iter()
            .zip(names)
            .map(|(t, name)| {
                t.ok_or_else(|| Error::probe(&name, format!("probe `{name}` recorded nothing")))
            })
            .collect()
    }
}

impl Module for Probe {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_measured(xs).map_err(|e| self.fail_forward(e))
    }
}

impl Probe {
    /// Keeps `e` for [`ProbeSet::take_failure`] and returns its message as candle's error, which
    /// the model's forward passes on.
    pub(crate) fn fail_forward(&self, e: Error) -> candle_core::Error {
        // Every error raised here is this probe's.
        let e = match e {
            Error::Probe {
                probe: None,
                message,
            } => Error::Probe {
                probe: lock(&self.shared)
                    .ok()
                    .and_then(|i| i.names.get(self.index).cloned()),
                message,
            },
            e => e,
        };
        let message = candle_core::Error::Msg(e.to_string());
        if let Ok(mut slot) = self.shared.failure.lock() {
            *slot = Some(e);
        }
        message
    }

    /// `skip + branch` for a residual connection whose branch holds this probe (a ResNet block,
    /// a transformer's feed-forward or attention block). Outside a measurement it is the add.
    /// During one, the branch carries the rows of every ablation variant while the skip does
    /// not: the skip is brought to the branch's rows first, so that the check stays one batched
    /// pass. (A plain `skip + branch` works too, at the cost of one forward pass per variant.)
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use candle_reliance::ProbeSet;
    ///
    /// let probes = ProbeSet::new();
    /// let probe = probes.add("block")?;
    /// let x = Tensor::new(&[[1f32, -2.0]], &Device::Cpu)?;
    /// // out = x + probe(relu(x))
    /// let out = probe.residual(&x, &probe.forward(&x.relu()?)?)?;
    /// assert_eq!(out.to_vec2::<f32>()?, vec![vec![2.0, -2.0]]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn residual(&self, skip: &Tensor, branch: &Tensor) -> candle_core::Result<Tensor> {
        self.residual_measured(skip, branch)
            .map_err(|e| self.fail_forward(e))
    }

    fn residual_measured(&self, skip: &Tensor, branch: &Tensor) -> Result<Tensor> {
        if !self.shared.active.load(Ordering::Acquire) {
            return Ok((skip + branch)?);
        }
        let joined = {
            let inner = lock(&self.shared)?;
            match inner.pass.as_ref() {
                Some(pass) => merge::join(pass, skip, branch.dim(0)?)?,
                None => skip.clone(),
            }
        };
        Ok((joined + branch)?)
    }

    fn forward_measured(&self, xs: &Tensor) -> Result<Tensor> {
        if !self.shared.active.load(Ordering::Acquire) {
            // Idle: a reference-counted handle to the same storage.
            return Ok(xs.clone());
        }
        let mut inner = lock(&self.shared)?;
        let name = inner.names[self.index].clone();
        let pass = match inner.pass.as_mut() {
            Some(p) => p,
            None => return Ok(xs.clone()),
        };
        let i = self.index;
        if pass.seen[i] {
            bail!(
                Probe,
                "probe `{name}` ran twice in one forward pass; use one probe per activation"
            );
        }
        pass.seen[i] = true;
        pass.call_order.push(i);
        let rows = samples(xs.dims()).map_err(in_probe(&name))?;
        // A sequence activation `(N, T, D)` goes through the ops as `N·T` rows of `D` units:
        // every unit clamped (or noised) at every position, a sample's rows kept together.
        let tokens = match xs.dims() {
            [_, t, _] => *t,
            _ => 1,
        };
        let flat = |x: &Tensor| -> Result<Tensor> {
            match x.dims() {
                [n, t, d] => Ok(x.reshape((n * t, *d))?),
                _ => Ok(x.clone()),
            }
        };
        let unflat = |x: Tensor| -> Result<Tensor> {
            match (xs.dims(), x.dims()) {
                ([_, t, _], [r, d]) => Ok(x.reshape((r / t, *t, *d))?),
                _ => Ok(x),
            }
        };
        let first = pass.rows_in.is_none();
        let expand = first && pass.expand;
        if first {
            pass.rows_in = Some(rows);
        } else if pass.expand {
            // Later probes must see the expanded batch; a model that reshapes with the batch
            // size it saw at the top of its forward does not, and the caller falls back.
            let blocks = pass.step.as_ref().map_or(pass.variants, |s| s.blocks);
            let want = pass.rows_in.unwrap_or(rows) * blocks;
            if rows != want {
                bail!(
                    Probe,
                    "probe `{name}` received {rows} rows where the expanded batch has {want}"
                );
            }
        }
        if pass.record_unclamped && matches!(pass.action, Action::Clamp { .. }) {
            record_unclamped(pass, i, xs, expand).map_err(in_probe(&name))?;
        }
        match &pass.action {
            Action::Stats => {
                record_sums(&mut pass.sums[i], xs, pass.labels.as_ref())
                    .map_err(in_probe(&name))?;
                Ok(xs.clone())
            }
            Action::Clamp { keep, values, .. } => {
                if !pass.expand {
                    let out = level_clamp(&flat(xs)?, &keep[i], &values[i], false);
                    return unflat(out.map_err(in_probe(&name))?);
                }
                let values = values[i].clone();
                let step = merge::advance(pass, i).map_err(in_probe(&name))?;
                let rows_in = pass.rows_in.unwrap_or(rows) * tokens;
                let out = merge::clamp(&flat(xs)?, &step, rows_in, &values, expand);
                unflat(out.map_err(in_probe(&name))?)
            }
            Action::Noise {
                std,
                seed,
                variant_offset,
            } => {
                let op = LevelNoise {
                    levels: pass.variants,
                    expand,
                    seed: crate::rng::derive_seed(*seed, i as u64),
                    level_offset: *variant_offset,
                    // Counted in rows: a sequence's tokens each draw their own noise.
                    sample_offset: pass.sample_offset * tokens,
                    total_samples: pass.total_samples * tokens,
                };
                unflat(level_noise(&flat(xs)?, &std[i], op).map_err(in_probe(&name))?)
            }
            Action::Capture => {
                // A sample's value of a unit: its mean over positions.
                pass.captured[i] = Some(match xs.rank() {
                    4 => xs.mean((2, 3))?,
                    3 => xs.mean(1)?,
                    _ => xs.clone(),
                });
                Ok(xs.clone())
            }
        }
    }
}

/// The samples of an activation: `(N, U)`, `(N, T, U)` (a sequence) or `(N, C, H, W)`.
pub(crate) fn samples(dims: &[usize]) -> Result<usize> {
    match dims {
        [n, _, _] => Ok(*n),
        _ => match rows_units_inner(dims) {
            Ok((n, _, _)) => Ok(n),
            Err(_) => bail!(
                Data,
                "an activation must have shape (N, units), (N, T, units) or (N, C, H, W), got \
                 {dims:?}"
            ),
        },
    }
}

/// Puts `probe \`name\`: ` in front of an error's message.
fn in_probe<E: Into<Error>>(name: &str) -> impl Fn(E) -> Error + '_ {
    move |e| e.into().context(format!("probe `{name}`"))
}

/// Records probe `i`'s sums over the unclamped variant's rows: the whole input of the probe
/// that expands the batch, the first `rows_in` rows (variant 0) of an expanded one.
pub(crate) fn record_unclamped(pass: &mut Pass, i: usize, xs: &Tensor, expand: bool) -> Result<()> {
    let rows_in = pass.rows_in.unwrap_or(0);
    let unclamped = if expand {
        xs.clone()
    } else {
        xs.narrow(0, 0, rows_in)?
    };
    record_sums(&mut pass.sums[i], &unclamped, pass.labels.as_ref())
}

/// The rows of an activation that a statistics pass counts, with their labels: with labels per
/// token (`N × T` of them for a sequence `(N, T, D)`), every token is a row `(N·T, D)`; rows
/// whose label is [`ProbeData::PADDING`](crate::ProbeData::PADDING) are left out.
fn labelled_rows(
    xs: &Tensor,
    labels: Option<&(Vec<u32>, usize)>,
) -> Result<(Tensor, Option<(Tensor, usize)>)> {
    let Some((values, classes)) = labels else {
        return Ok((xs.clone(), None));
    };
    let n = xs.dim(0)?;
    let device = xs.device().clone();
    let xs = match xs.dims() {
        _ if values.len() == n => xs.clone(),
        [_, t, d] if values.len() == n * t => xs.reshape((n * t, *d))?,
        d => bail!(
            Data,
            "{} labels for an activation of shape {d:?}: with token labels (N, T) every probe \
             must see (N, T, units)",
            values.len()
        ),
    };
    if !values.contains(&crate::ProbeData::PADDING) {
        return Ok((
            xs,
            Some((Tensor::new(values.as_slice(), &device)?, *classes)),
        ));
    }
    let keep: Vec<u32> = (0..values.len() as u32)
        .filter(|&i| values[i as usize] != crate::ProbeData::PADDING)
        .collect();
    let kept: Vec<u32> = keep.iter().map(|&i| values[i as usize]).collect();
    let (xs, labels) = if keep.is_empty() {
        (xs.narrow(0, 0, 0)?, Tensor::zeros(0, DType::U32, &device)?)
    } else {
        let ids = Tensor::new(keep.as_slice(), &device)?;
        (
            xs.index_select(&ids, 0)?,
            Tensor::new(kept.as_slice(), &device)?,
        )
    };
    Ok((xs, Some((labels, *classes))))
}

fn record_sums(
    slot: &mut Option<UnitSums>,
    xs: &Tensor,
    labels: Option<&(Vec<u32>, usize)>,
) -> Result<()> {
    let positions = match xs.dims() {
        [_, t, _] => *t,
        d => rows_units_inner(d)?.2,
    };
    let (xs, labels) = labelled_rows(xs, labels)?;
    // A sequence `(N, T, D)` is summed as a feature map `(N, D, T, 1)`: the unit's values at
    // every position count, and a sample's value for class sums is its mean over positions.
    let xs = &match xs.dims() {
        [n, t, d] => xs.transpose(1, 2)?.contiguous()?.reshape((*n, *d, *t, 1))?,
        _ => xs,
    };
    let (rows, units, inner) = rows_units_inner(xs.dims())?;
    // One pass over the activation (one kernel on CUDA): sums, sums of squares, class sums.
    let (labels, classes) = match labels {
        Some(lc) => lc,
        None => (Tensor::zeros(rows, DType::U32, xs.device())?, 0),
    };
    let sums = crate::ops::unit_sums(xs, &labels, classes)?.to_vec2::<f64>()?;
    let (sum, sum_sq) = (&sums[0], &sums[1]);
    // Per-class sums of the per-sample values: a feature map's sample value is its mean over
    // positions.
    let class_sum = (classes > 0).then(|| {
        sums[2..]
            .iter()
            .flatten()
            .map(|v| v / inner as f64)
            .collect::<Vec<f64>>()
    });
    let s = slot.get_or_insert_with(|| UnitSums {
        units,
        positions,
        count: 0,
        sum: vec![0.0; units],
        sum_sq: vec![0.0; units],
        class_sum: vec![0.0; class_sum.as_ref().map_or(0, |c| c.len())],
    });
    // The width first: the class sums' length follows it.
    if s.units != units {
        bail!(
            Probe,
            "unit count changed between batches: {} then {units}",
            s.units
        );
    }
    if let Some(cs) = class_sum {
        if cs.len() != s.class_sum.len() {
            bail!(Probe, "class count changed between batches");
        }
        s.class_sum.iter_mut().zip(cs).for_each(|(a, b)| *a += b);
    }
    s.count += (rows * inner) as u64;
    for u in 0..units {
        s.sum[u] += sum[u];
        s.sum_sq[u] += sum_sq[u];
    }
    Ok(())
}
