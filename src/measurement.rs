//! The measurement context: a model, its probes and the probe data, with the statistics pass run
//! once, lazily, and shared by every measurement made through it.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_reliance::curves::AblationSpec;
//! use candle_reliance::{Measurement, ProbeData, ProbeSet};
//!
//! let probes = ProbeSet::new();
//! let probe = probes.add("hidden")?;
//! let model = |xs: &Tensor| probe.forward(&xs.relu()?);
//! let xs = Tensor::new(&[[2f32, 1.0], [1.0, 3.0]], &Device::Cpu)?;
//! let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
//!
//! let m = Measurement::new(&model, &probes, &data);
//! assert_eq!(m.statistics()?.accuracy, 1.0); // the statistics pass, run once
//! let curve = m.ablation_curve(&AblationSpec::default())?; // reuses it
//! let selectivity = m.selectivity()?; // and again
//! # let _ = (curve, selectivity);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::collective::Collective;
use crate::error::{bail, Error};
use crate::invalid::Invalid;
use crate::probe::{Action, PassGuard, ProbeSet, UnitSums};
use crate::units::PerProbe;
use crate::ProbeData;
use crate::Result;
use candle_core::{DType, ModuleT, Tensor, D};
use serde::{Deserialize, Serialize};
use std::cell::OnceCell;
use std::ops::Range;

/// How the passes of a measurement are cut into forward passes: the `batching:` section of the
/// monitor's configuration. Results do not depend on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Batching {
    /// Samples per forward of the statistics pass (≥ 1). Default 512.
    pub batch_size: usize,
    /// Bound on the rows of one expanded forward pass (variants × samples), which bounds peak
    /// memory whatever the subset size (≥ 1). `None` (default) picks it from the device and the
    /// widest probed activation, see [`auto_batch_rows`].
    pub max_batch_rows: Option<usize>,
    /// Evaluate all variants in one expanded pass per chunk of samples (default); `false` runs
    /// one forward per variant, the slow reference way. Not a configuration key.
    #[serde(skip, default = "yes")]
    pub batched: bool,
    /// Let a [`ProbedLayer`](crate::probe::ProbedLayer) that the forward pass reaches first
    /// compute its layer incrementally across nested clamp masks (default); `false` clamps then
    /// applies the layer to every variant. Not a configuration key.
    #[serde(skip, default = "yes")]
    pub incremental: bool,
    /// Let the variants of a clamp pass that clamp the same units at every probe reached so
    /// far share their rows until a probe tells them apart (default; see "Shared rows" in
    /// `docs/performance.md`); `false` gives every variant its own rows from the first probe.
    /// Not a configuration key.
    #[serde(skip, default = "yes")]
    pub shared_rows: bool,
}

fn yes() -> bool {
    true
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            batch_size: 512,
            max_batch_rows: None,
            batched: true,
            incremental: true,
            shared_rows: true,
        }
    }
}

impl Batching {
    /// Checks the values, naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| e.into_error("batching"))
    }

    pub(crate) fn check(&self) -> std::result::Result<(), Invalid> {
        Invalid::at_least("batch_size", self.batch_size, 1)?;
        if let Some(rows) = self.max_batch_rows {
            Invalid::at_least("max_batch_rows", rows, 1)?;
        }
        Ok(())
    }
}

/// Rows per expanded forward when none are configured. On CPU, about 2 MiB of f32 per
/// activation chunk, so the element-wise passes between matrix products (bias, activation, the
/// probes' clamp) stay in cache: measured 1.6× faster than 16 MiB chunks on the 784-256-256-10
/// benchmark (`examples/bench_check.rs`). On a GPU, about 256 MiB, to keep the device busy.
/// `widest` is the largest number of values per sample at one probe (units × positions).
pub fn auto_batch_rows(device: &candle_core::Device, widest: usize) -> usize {
    let widest = widest.max(1);
    if device.is_cpu() {
        ((1 << 19) / widest).clamp(64, 16384)
    } else {
        ((1 << 26) / widest).clamp(1024, 1 << 20)
    }
}

/// Sets glibc's allocator thresholds, once per process, before the first CPU measurement.
///
/// glibc serves blocks above its *mmap threshold* with fresh mappings and returns the free top
/// of the heap to the OS above its *trim threshold*; both start at 128 KiB and grow only when a
/// mapped block is freed (the mmap threshold to that block's size, at most 32 MiB, the trim
/// threshold to twice that). A check allocates and frees tensors of a few MiB chunk after chunk:
/// with the initial thresholds every one of them is page-faulted afresh, which made the
/// benchmark's 256-wide check 2.4× slower (0.33 s against 0.14 s, 318 000 page faults against
/// 24 000). And candle keeps every intermediate of a forward through a model's variables alive
/// until its output is dropped, so a chunk through a deep model (a transformer's layers after
/// the first probe) peaks above even 64 MiB, and the top of the heap went back to the OS after
/// every chunk: the sequence example's check took 5.5 s instead of 1.9 s (500 samples, one
/// thread, 2.5 million page faults against 59 000). So: the mmap threshold at 32 MiB and the
/// trim threshold at [`TRIM_THRESHOLD`]; freed memory below that is kept for reuse. When
/// `GLIBC_TUNABLES` sets any `glibc.malloc.*` tunable the allocator is left as it is; a program
/// that sets its own thresholds with `mallopt` should do so after the first measurement.
fn settle_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
                return;
            }
            extern "C" {
                fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
            }
            const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
            const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
            // SAFETY: glibc's `mallopt` takes the allocator's lock and only changes its
            // parameters; it is safe to call from any thread at any time.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD as std::ffi::c_int);
            }
        });
    }
}

/// The trim threshold [`settle_allocator`] sets: freed heap memory up to this much stays in the
/// process for the next chunk.
const TRIM_THRESHOLD: usize = 256 << 20;

/// How many times [`auto_batch_rows`] a chunk holds once the incremental path is in use: its
/// products of the newly clamped inputs gain from more samples per chunk, the element-wise
/// passes after it lose. Measured with the CPU op (`ops::IncrementalCpu`; 2 cores, medians of
/// interleaved runs): the MNIST example's default check took 0.105 s at 2×, 0.091 s at 4× and
/// 0.096 s at 8×; the 256-wide benchmark MLP 0.138 s, 0.119 s and 0.120 s. The batched path
/// keeps the automatic rows.
const INCREMENTAL_ROWS: usize = 4;

/// The value an ablated unit is clamped to, after the activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clamp {
    /// Zero (the paper's default).
    #[default]
    Zero,
    /// The unit's mean activation over the probe data (for a feature map: over samples and
    /// positions). The paper found this more damaging than zero.
    Mean,
}

/// Per-unit moments of one probe over the probe data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitMoments {
    /// Positions per unit and sample: 1 for a dense layer, `T` for a sequence, `H·W` for a
    /// feature map.
    pub positions: usize,
    /// Mean activation per unit (over samples, and positions for a feature map).
    pub mean: Vec<f64>,
    /// Population standard deviation per unit, over the same values as `mean`.
    pub std: Vec<f64>,
    /// Class-conditional mean activity: `class_mean[class][unit]` is the unit's mean over the
    /// samples of that class (for a feature map, of its mean over positions); NaN for a class
    /// with no samples.
    pub class_mean: Vec<Vec<f64>>,
}

impl UnitMoments {
    /// Whether every mean and standard deviation is finite: sums over the activations are, so
    /// every activation on the probe data was finite.
    pub fn finite(&self) -> bool {
        self.mean.iter().chain(&self.std).all(|v| v.is_finite())
    }
}

/// Per-unit statistics at every probe and the unablated accuracy, from one forward pass over the
/// data ([`Measurement::statistics`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitStatistics {
    /// One entry per probe, in the order the probes were added.
    pub probes: Vec<PerProbe<UnitMoments>>,
    /// Share of the labels (samples, or tokens for token labels; padding not counted) that the
    /// arg-max logit equals, nothing clamped.
    pub accuracy: f64,
    /// Number of classes (logits per sample).
    pub classes: usize,
    /// Whether every logit was finite.
    pub finite: bool,
    /// Number of samples.
    pub samples: usize,
    /// Labels counted: [`ProbeData::targets`] (the samples, or their tokens, without padding).
    #[serde(default)]
    pub targets: usize,
    /// Labels per class (`0..=max label`): samples, or tokens for token labels.
    pub class_counts: Vec<u64>,
    /// Index of the probe the forward pass reaches first (it expands batched measurements).
    pub first_probe: usize,
    /// The arg-max class of each sample (row-major `N × T` for token labels; a padded position
    /// holds [`ProbeData::PADDING`]), nothing clamped: what the agreement of a perturbed network
    /// is counted against.
    pub predictions: Vec<u32>,
    /// Whether the model's logits for the first sample differed between a forward of that
    /// sample alone and one of its chunk: batch norm in training mode, active dropout or
    /// another batch-dependent layer, which makes every measurement depend on how samples are
    /// chunked (a warning is logged).
    #[serde(default)]
    pub batch_dependent: bool,
}

impl UnitStatistics {
    /// Units across all probes.
    pub fn total_units(&self) -> usize {
        self.probes.iter().map(|p| p.units).sum()
    }

    /// The most values one sample has at a single probe (units × positions).
    pub fn widest_sample(&self) -> usize {
        self.probes
            .iter()
            .map(|p| p.units * p.value.positions)
            .max()
            .unwrap_or(1)
    }
}

/// A model, its probes and the data they are measured on: the one entry point of every
/// measurement. The statistics pass (unit moments, the unablated accuracy) runs once, at the
/// first measurement that needs it, and is shared by the rest; build a new `Measurement` after
/// the model's weights change. When that first measurement is an ablation curve that does not
/// need the statistics beforehand (zero clamp, random or explicit order, fraction 0 among its
/// fractions, batched, one process), the statistics come from the curve's own unclamped
/// variant instead, one plain forward over the data cheaper.
///
/// The model must call every probe of `probes` exactly once per forward pass and return logits
/// `(N, classes)`; any [`ModuleT`] works, measured with `train = false` — a [`Module`](candle_core::Module)
/// (every one is a `ModuleT`), a closure, or a model with batch norm or dropout as it is.
pub struct Measurement<'a, M: ModuleT + ?Sized> {
    model: &'a M,
    probes: &'a ProbeSet,
    data: &'a ProbeData,
    batching: Batching,
    stats: OnceCell<UnitStatistics>,
    collective: Option<&'a dyn Collective>,
}

impl<M: ModuleT + ?Sized> std::fmt::Debug for Measurement<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Measurement")
            .field("probes", self.probes)
            .field("samples", &self.data.len())
            .field("batching", &self.batching)
            .field("statistics_done", &self.stats.get().is_some())
            .finish()
    }
}

impl<'a, M: ModuleT + ?Sized> Measurement<'a, M> {
    /// A measurement of `model` through `probes` on `data`, with default [`Batching`].
    pub fn new(model: &'a M, probes: &'a ProbeSet, data: &'a ProbeData) -> Self {
        Self {
            model,
            probes,
            data,
            batching: Batching::default(),
            stats: OnceCell::new(),
            collective: None,
        }
    }

    /// Measures data-parallel: this rank takes its contiguous shard of the data and the counts
    /// and sums are all-reduced through `collective`, so that every rank gets the numbers a
    /// single process gets on the whole data (see [`crate::collective`]). Every rank must make
    /// the same measurements in the same order.
    pub fn with_collective(mut self, collective: &'a dyn Collective) -> Self {
        self.collective = Some(collective);
        self
    }

    /// The model's forward pass in evaluation mode (`train = false`: batch norm on its running
    /// statistics, no dropout); an error a probe raised inside it comes back as that probe's.
    pub(crate) fn forward_model(&self, xs: &Tensor) -> Result<Tensor> {
        // A failure left by a forward whose error was handled (an expansion that fell back).
        let _ = self.probes.take_failure();
        self.model
            .forward_t(xs, false)
            .map_err(|e| self.probes.take_failure().unwrap_or(Error::Candle(e)))
    }

    /// The global indices of the samples this rank measures (all of them without a
    /// collective).
    fn shard(&self) -> Range<usize> {
        let n = self.data.len();
        match self.collective {
            Some(c) => {
                let (r, w) = (c.rank(), c.world_size().max(1));
                n * r / w..n * (r + 1) / w
            }
            None => 0..n,
        }
    }

    /// The inputs of samples `start..start + len`, clipped to this rank's shard.
    fn chunk(&self, start: usize, len: usize) -> Result<Tensor> {
        self.data.chunk(start, len.min(self.shard().end - start))
    }

    /// Sets how passes are chunked.
    pub fn with_batching(mut self, batching: Batching) -> Self {
        self.batching = batching;
        self
    }

    /// Sets the samples per forward of the statistics pass.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batching.batch_size = batch_size;
        self
    }

    /// Sets the bound on rows per expanded forward.
    pub fn with_max_batch_rows(mut self, rows: usize) -> Self {
        self.batching.max_batch_rows = Some(rows);
        self
    }

    /// Batched (default) or one forward per variant, the slow reference way.
    pub fn with_batched(mut self, batched: bool) -> Self {
        self.batching.batched = batched;
        self
    }

    /// Incremental layers after [`ProbedLayer`](crate::probe::ProbedLayer)s (default) or
    /// clamp-then-layer for every variant.
    pub fn with_incremental(mut self, incremental: bool) -> Self {
        self.batching.incremental = incremental;
        self
    }

    /// Shared rows for variants that agree on the probes reached so far (default), or one
    /// block of rows per variant from the first probe on.
    pub fn with_shared_rows(mut self, shared: bool) -> Self {
        self.batching.shared_rows = shared;
        self
    }

    /// The model.
    pub fn model(&self) -> &'a M {
        self.model
    }

    /// The probes.
    pub fn probes(&self) -> &'a ProbeSet {
        self.probes
    }

    /// The probe data.
    pub fn data(&self) -> &'a ProbeData {
        self.data
    }

    /// The batching settings.
    pub fn batching(&self) -> &Batching {
        &self.batching
    }

    /// The statistics pass: one plain forward over the data in chunks of
    /// [`Batching::batch_size`] samples, recording the mean, standard deviation and
    /// class-conditional means of every unit at every probe, and the accuracy. Runs at the
    /// first call only, unless an ablation curve measured first already gave the same numbers
    /// (see [`Measurement`]).
    pub fn statistics(&self) -> Result<&UnitStatistics> {
        if let Some(s) = self.stats.get() {
            return Ok(s);
        }
        let stats = self.statistics_pass()?;
        Ok(self.stats.get_or_init(|| stats))
    }

    fn statistics_pass(&self) -> Result<UnitStatistics> {
        self.batching.validate()?;
        let (probes, data) = (self.probes, self.data);
        let batch_size = self.batching.batch_size;
        let n = data.len();
        let (alone, mut acc) = self.first_sample(None)?;
        let guard = probes.begin(Action::Stats, 1, false)?;
        let shard = self.shard();
        for start in shard.clone().step_by(batch_size) {
            let xs = self.chunk(start, batch_size)?;
            let chunk_labels = data.labels_of(start, xs.dim(0)?).to_vec();
            guard.start_forward_labelled(start, n, Some((chunk_labels, acc.label_classes)))?;
            let logits = self.forward_model(&xs)?;
            guard.finish_forward()?;
            checked_logits(&logits, xs.dim(0)?, data, start)?;
            let first = (start == shard.start)
                .then(|| guard.call_order())
                .transpose()?;
            let pred = arg_max(&logits)?;
            acc.observe(start, (&logits, &pred), data, &alone, first.as_deref())?;
        }
        let sums = guard.take_sums()?;
        drop(guard);
        self.finish_statistics(acc, sums)
    }

    /// Runs the rank's first sample alone (compared later with the same sample in its chunk)
    /// and checks the labels against the model's class count; the accumulator of a statistics
    /// pass. With `shapes`, the probes record that sample, which gives their units and positions.
    fn first_sample(
        &self,
        shapes: Option<&mut Vec<Option<UnitSums>>>,
    ) -> Result<(Tensor, StatsAcc)> {
        let (probes, data) = (self.probes, self.data);
        let n = data.len();
        // The model's class count, from one sample, bounds the labels before anything is sized
        // by them: a stray label of 4 billion must be an error, not a 34 GB allocation.
        // Decided alike on every rank, so that none waits for another at an all-reduce.
        let world = self.collective.map_or(1, |c| c.world_size());
        if world > n {
            bail!(
                Data,
                "{world} ranks cannot share {n} probe samples: more ranks than samples"
            );
        }
        let first = data.chunk(self.shard().start, 1)?;
        let alone = match shapes {
            None => self.forward_model(&first)?,
            Some(sums) => {
                let guard = probes.begin(Action::Stats, 1, false)?;
                guard.start_forward(0, 1)?;
                let alone = self.forward_model(&first)?;
                guard.finish_forward()?;
                *sums = guard.take_sums()?;
                alone
            }
        };
        let (_, model_classes) = logits_dims(&alone, data)?;
        let labelled = || {
            data.label_values()
                .iter()
                .copied()
                .filter(|&l| l != ProbeData::PADDING)
        };
        let max_label = labelled().max().unwrap_or(0);
        if max_label as usize >= model_classes {
            bail!(
                Data,
                "label {max_label} is out of range for a model with {model_classes} logits"
            );
        }
        let label_classes = max_label as usize + 1;
        let mut class_counts = vec![0u64; label_classes];
        labelled().for_each(|l| class_counts[l as usize] += 1);
        let acc = StatsAcc {
            label_classes,
            class_counts,
            correct: 0,
            classes: 0,
            finite: true,
            first_probe: 0,
            batch_dependent: false,
            predictions: vec![0u32; n * data.tokens()],
        };
        Ok((alone, acc))
    }

    /// The statistics from a pass's accumulator and the probes' sums (all-reduced over the
    /// ranks of a collective).
    fn finish_statistics(
        &self,
        acc: StatsAcc,
        mut sums: Vec<Option<UnitSums>>,
    ) -> Result<UnitStatistics> {
        let probes = self.probes;
        let n = self.data.len();
        let StatsAcc {
            label_classes: _,
            class_counts,
            mut correct,
            classes,
            mut finite,
            first_probe,
            mut batch_dependent,
            mut predictions,
        } = acc;
        if let Some(c) = self.collective {
            let names = probes.names();
            let mut floats = Vec::new();
            let mut counts = vec![correct, u64::from(!finite), u64::from(batch_dependent)];
            for (s, name) in sums.iter().zip(&names) {
                let s = s.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg(format!("probe `{name}` recorded nothing"))
                })?;
                floats.extend(s.sum.iter().chain(&s.sum_sq).chain(&s.class_sum));
                counts.push(s.count);
            }
            counts.extend(predictions.iter().map(|&p| u64::from(p)));
            c.all_reduce_sum_u64(&mut counts)?;
            c.all_reduce_sum_f64(&mut floats)?;
            (correct, finite, batch_dependent) = (counts[0], counts[1] == 0, counts[2] > 0);
            let mut at = 0;
            for (i, s) in sums.iter_mut().flatten().enumerate() {
                for v in [&mut s.sum, &mut s.sum_sq, &mut s.class_sum] {
                    let len = v.len();
                    v.copy_from_slice(&floats[at..at + len]);
                    at += len;
                }
                s.count = counts[3 + i];
            }
            let preds = &counts[3 + names.len()..];
            predictions
                .iter_mut()
                .zip(preds)
                .for_each(|(p, &q)| *p = q as u32);
        }
        if batch_dependent {
            tracing::warn!(
                "the model's output for a sample changes with the rest of its batch (batch norm \
                 in training mode, or active dropout?): measurements then depend on how samples \
                 are chunked; measure the model in evaluation mode"
            );
        }
        let probes = moments(probes.names(), sums, &class_counts)?;
        Ok(UnitStatistics {
            probes,
            accuracy: correct as f64 / self.data.targets() as f64,
            classes,
            finite,
            samples: n,
            targets: self.data.targets(),
            class_counts,
            first_probe,
            predictions,
            batch_dependent,
        })
    }

    /// The statistics pass folded into a clamp pass: when no statistics exist yet, nothing
    /// needs them before the pass (zero clamp), the pass's first variant clamps nothing
    /// (`unclamped_first`), it is batched and on one process, the probes' shapes come from the
    /// first sample alone and the unclamped variant's rows of the pass give the rest: one plain
    /// forward over the data saved. `None` where that does not hold.
    pub(crate) fn folded(&self, clamp: Clamp, unclamped_first: bool) -> Result<Option<Folded>> {
        if self.stats.get().is_some()
            || self.collective.is_some()
            || clamp != Clamp::Zero
            || !unclamped_first
            || !self.batching.batched
        {
            return Ok(None);
        }
        self.batching.validate()?;
        let mut sums = Vec::new();
        let (alone, acc) = self.first_sample(Some(&mut sums))?;
        let shapes = UnitStatistics {
            probes: moments(self.probes.names(), sums, &[])?,
            accuracy: 0.0,
            classes: 0,
            finite: true,
            samples: 1,
            targets: 0,
            class_counts: vec![],
            first_probe: 0,
            predictions: vec![],
            batch_dependent: false,
        };
        Ok(Some(Folded { shapes, alone, acc }))
    }

    /// Accuracy on the data with each given set of units clamped: entry `i` of the result is the
    /// accuracy with the global units `clamped[i]` clamped (an empty set is the unablated
    /// accuracy). All sets run batched like the curve.
    ///
    /// This is the primitive behind single-unit importance (one set per unit) and any custom
    /// ablation schedule.
    pub fn ablation_accuracies(&self, clamped: &[Vec<usize>], clamp: Clamp) -> Result<Vec<f64>> {
        let total = self.statistics()?.total_units();
        if let Some(u) = clamped.iter().flatten().find(|&&u| u >= total) {
            bail!(
                Data,
                "ablation_accuracies: unit {u} is out of range (0..{total})"
            );
        }
        if clamped.is_empty() {
            return Ok(vec![]);
        }
        let run = self.evaluate_clamped(clamped.len(), clamp, None, |variant, p, keep| {
            keep.fill(1);
            for &u in &clamped[variant] {
                if (p.offset..p.offset + p.units).contains(&u) {
                    keep[u - p.offset] = 0;
                }
            }
        })?;
        let n = self.data.targets() as f64;
        Ok(run.correct.iter().map(|&c| c as f64 / n).collect())
    }

    /// Runs `variants` clamp settings; `fill_keep(variant, probe, row)` writes the probe's keep
    /// row (non-zero keeps a unit) for one variant.
    /// With `folded`, the pass also yields the statistics (see [`Measurement::folded`]).
    pub(crate) fn evaluate_clamped(
        &self,
        variants: usize,
        clamp: Clamp,
        folded: Option<Folded>,
        fill_keep: impl Fn(usize, &PerProbe<UnitMoments>, &mut [u8]),
    ) -> Result<VariantRun> {
        let shapes = folded.as_ref().map(|f| f.shapes.clone());
        let stats = match &shapes {
            Some(s) => s,
            None => self.statistics()?,
        };
        let device = self.data.xs().device().clone();
        let values = stats
            .probes
            .iter()
            .map(|p| match clamp {
                Clamp::Zero => Tensor::zeros(p.units, DType::F32, &device),
                Clamp::Mean => {
                    let m: Vec<f32> = p.value.mean.iter().map(|&v| v as f32).collect();
                    Tensor::from_vec(m, p.units, &device)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let make_action = |range: Range<usize>| -> Result<Action> {
            let host: Vec<Vec<u8>> = stats
                .probes
                .iter()
                .map(|p| {
                    let mut k = vec![0u8; range.len() * p.units];
                    for (row, variant) in range.clone().enumerate() {
                        fill_keep(variant, p, &mut k[row * p.units..(row + 1) * p.units]);
                    }
                    k
                })
                .collect();
            let keep = host
                .iter()
                .zip(&stats.probes)
                .map(|(k, p)| Tensor::from_slice(k, (range.len(), p.units), &device))
                .collect::<candle_core::Result<_>>()?;
            Ok(Action::Clamp {
                keep,
                host,
                values: values.clone(),
            })
        };
        self.evaluate_folded(variants, &make_action, folded)
    }

    /// Rows per expanded forward: the configured bound, or [`auto_batch_rows`] for the probes'
    /// shapes (`shapes`: the statistics, or a folded pass's shapes).
    fn max_rows(&self, shapes: &UnitStatistics) -> usize {
        match self.batching.max_batch_rows {
            Some(rows) => rows,
            None => auto_batch_rows(self.data.xs().device(), shapes.widest_sample()),
        }
        .max(1)
    }

    /// Correct predictions for each of `variants` settings, built per range of variants by
    /// `make_action`.
    ///
    /// Batched: chunks of samples are expanded at the first probe, to `variants × samples` rows
    /// by the last probe (variants that agree on the probes reached so far share rows until
    /// then, see `probe::merge`), with at most [`Measurement::max_rows`] rows per forward. If the model does not carry the
    /// expanded batch through (a shape error, or logits whose first dimension is not
    /// `variants × samples`), it warns and falls back to one forward per variant.
    pub(crate) fn evaluate_variants(
        &self,
        variants: usize,
        make_action: &dyn Fn(Range<usize>) -> Result<Action>,
    ) -> Result<VariantRun> {
        self.evaluate_folded(variants, make_action, None)
    }

    /// [`Measurement::evaluate_variants`]; with `folded`, variant 0 clamps nothing and its rows
    /// also give the statistics, set at the end (a model that cannot carry the expanded batch
    /// gets the separate statistics pass before its forwards per variant).
    fn evaluate_folded(
        &self,
        variants: usize,
        make_action: &dyn Fn(Range<usize>) -> Result<Action>,
        mut folded: Option<Folded>,
    ) -> Result<VariantRun> {
        self.batching.validate()?;
        let (probes, data) = (self.probes, self.data);
        if data.xs().device().is_cpu() {
            settle_allocator();
        }
        let n = data.len();
        let shapes = match &folded {
            Some(f) => &f.shapes,
            None => self.statistics()?,
        };
        let max_rows = self.max_rows(shapes);
        let (mut predictions, finite) = match &folded {
            // Unknown yet: filled by the first group; the incremental path checks each chunk.
            Some(_) => (vec![0; n], vec![false; shapes.probes.len()]),
            None => (
                shapes.predictions.clone(),
                shapes.probes.iter().map(|p| p.value.finite()).collect(),
            ),
        };
        let mut run = VariantRun {
            correct: vec![0; variants],
            agreeing: vec![0; variants],
            fallback: None,
            incremental: false,
            shared_rows: false,
        };
        if self.batching.batched && variants > 0 {
            let group = variants.min(max_rows);
            let narrow = (max_rows / group).clamp(1, n);
            // The incremental path's products want more samples per chunk than the batched
            // path's element-wise passes (see `INCREMENTAL_ROWS`). With automatic rows, chunks
            // start wide when the path may apply and narrow after the first one if it did not.
            let mut m = if self.batching.incremental && self.batching.max_batch_rows.is_none() {
                (narrow * INCREMENTAL_ROWS).min(n)
            } else {
                narrow
            };
            let mut decided = m == narrow;
            let first = make_action(0..group)?;
            let guard = probes.begin(first, group, true)?;
            guard.set_incremental(self.batching.incremental)?;
            guard.set_merge(self.batching.shared_rows)?;
            guard.set_finite(finite)?;
            guard.set_record_unclamped(folded.is_some())?;
            let mut failure = None;
            'groups: for g0 in (0..variants).step_by(group) {
                let range = g0..(g0 + group).min(variants);
                if g0 > 0 {
                    guard.set_action(make_action(range.clone())?, range.len(), true)?;
                    // The first group saw every sample unclamped.
                    if let Some(f) = &folded {
                        guard.set_record_unclamped(false)?;
                        predictions.clone_from(&f.acc.predictions);
                    }
                }
                let shard = self.shard();
                let mut start = shard.start;
                while start < shard.end {
                    let fold = folded.as_mut().filter(|_| g0 == 0);
                    let mut result =
                        self.batched_forward(&guard, &predictions, fold, start, m, range.len());
                    if result.is_err() && start == shard.start && guard.merged()? {
                        // Shared rows break a model that mixes activations from before and
                        // after a later probe (a skip connection across it): run this first
                        // chunk again with a block per variant, and keep that.
                        guard.set_merge(false)?;
                        if g0 == 0 {
                            // The failed forward may have recorded sums at its first probes.
                            guard.clear_sums()?;
                        }
                        let fold = folded.as_mut().filter(|_| g0 == 0);
                        result =
                            self.batched_forward(&guard, &predictions, fold, start, m, range.len());
                    }
                    start += m;
                    if !decided {
                        if !guard.incremental_used()? {
                            m = narrow;
                        }
                        decided = true;
                    }
                    match result {
                        Ok((correct, agreeing)) => {
                            for (c, k) in run.correct[range.clone()].iter_mut().zip(correct) {
                                *c += k;
                            }
                            for (c, k) in run.agreeing[range.clone()].iter_mut().zip(agreeing) {
                                *c += k;
                            }
                        }
                        Err(reason) => {
                            failure = Some(reason);
                            break 'groups;
                        }
                    }
                }
            }
            run.incremental = guard.incremental_used()?;
            run.shared_rows = guard.merged()?;
            let sums = guard.take_sums()?;
            drop(guard);
            match failure {
                None => {
                    if let Some(f) = folded {
                        let stats = self.finish_statistics(f.acc, sums)?;
                        let _ = self.stats.set(stats);
                    }
                    return self.reduced(run);
                }
                Some(reason) => {
                    tracing::warn!(
                        reason = %reason,
                        "the model does not carry an expanded batch through its forward pass \
                         (does it reshape with a batch size read at the top of forward?); \
                         falling back to one forward pass per variant, which is slower"
                    );
                    run.fallback = Some(reason);
                    run.correct.iter_mut().for_each(|c| *c = 0);
                    run.agreeing.iter_mut().for_each(|c| *c = 0);
                    run.incremental = false;
                    if folded.is_some() {
                        predictions.clone_from(&self.statistics()?.predictions);
                    }
                }
            }
        }
        let chunk = max_rows.min(n);
        let guard = probes.begin(make_action(0..variants.min(1))?, 1, false)?;
        for variant in 0..variants {
            if variant > 0 {
                guard.set_action(make_action(variant..variant + 1)?, 1, false)?;
            }
            for start in self.shard().step_by(chunk) {
                let xs = self.chunk(start, chunk)?;
                guard.start_forward(start, n)?;
                let logits = self.forward_model(&xs)?;
                guard.finish_forward()?;
                let rows = checked_logits(&logits, xs.dim(0)?, data, start)?.0;
                let pred = arg_max(&logits)?;
                let t = data.tokens();
                run.correct[variant] += count_hits(&pred, data.labels_of(start, rows), 1)[0];
                run.agreeing[variant] +=
                    count_hits(&pred, &predictions[start * t..(start + rows) * t], 1)[0];
            }
        }
        self.reduced(run)
    }

    /// The run with its counts summed over the ranks (one all-reduce).
    fn reduced(&self, mut run: VariantRun) -> Result<VariantRun> {
        if let Some(c) = self.collective {
            let v = run.correct.len();
            let mut counts: Vec<u64> = run.correct.iter().chain(&run.agreeing).copied().collect();
            c.all_reduce_sum_u64(&mut counts)?;
            run.correct.copy_from_slice(&counts[..v]);
            run.agreeing.copy_from_slice(&counts[v..]);
        }
        Ok(run)
    }

    /// One expanded forward: per variant, the samples whose prediction equals the label and
    /// those whose prediction equals the unablated one; `Err` carries why expansion failed.
    fn batched_forward(
        &self,
        guard: &PassGuard<'_>,
        predictions: &[u32],
        folded: Option<&mut Folded>,
        start: usize,
        m: usize,
        variants: usize,
    ) -> std::result::Result<(Vec<u64>, Vec<u64>), String> {
        let data = self.data;
        let xs = self.chunk(start, m).map_err(|e| e.to_string())?;
        let rows_in = xs.dims()[0];
        let t = data.tokens();
        let span = start * t..(start + rows_in) * t;
        // Labels for the unclamped variant's per-class sums.
        let labels = folded
            .as_ref()
            .map(|f| (data.labels_of(start, rows_in).to_vec(), f.acc.label_classes));
        guard
            .start_forward_labelled(start, data.len(), labels)
            .map_err(|e| e.to_string())?;
        let logits = self
            .model
            .forward_t(&xs, false)
            .map_err(|e| e.to_string())?;
        guard.finish_forward().map_err(|e| e.to_string())?;
        let (rows, _) = logits_dims(&logits, data).map_err(|e| e.to_string())?;
        if rows != variants * rows_in {
            return Err(format!(
                "logits have {rows} rows, expected {variants} variants × {rows_in} samples = {}",
                variants * rows_in
            ));
        }
        // One copy of the arg-max to the host: `variants × rows_in` small integers.
        let pred = arg_max(&logits).map_err(|e| e.to_string())?;
        let targets = match folded {
            Some(f) => {
                let first = (start == self.shard().start)
                    .then(|| guard.call_order())
                    .transpose()
                    .map_err(|e| e.to_string())?;
                let unclamped = logits.narrow(0, 0, rows_in).map_err(|e| e.to_string())?;
                f.acc
                    .observe(
                        start,
                        (&unclamped, &pred[..rows_in * t]),
                        data,
                        &f.alone,
                        first.as_deref(),
                    )
                    .map_err(|e| e.to_string())?;
                &f.acc.predictions[span.clone()]
            }
            None => &predictions[span.clone()],
        };
        Ok((
            count_hits(&pred, &data.label_values()[span], variants),
            count_hits(&pred, targets, variants),
        ))
    }
}

/// Whether two logit rows differ by more than the rounding of differently blocked products.
fn differs(a: &Tensor, b: &Tensor) -> Result<bool> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    Ok(a.len() != b.len()
        || a.iter()
            .zip(&b)
            .any(|(x, y)| x.is_finite() && y.is_finite() && (x - y).abs() > 1e-3 * scale))
}

/// `(rows, classes)` of logits: `(rows, classes)` for labels per sample, `(rows, T, classes)`
/// for token labels `(N, T)`.
fn logits_dims(logits: &Tensor, data: &ProbeData) -> Result<(usize, usize)> {
    let t = data.tokens();
    match (logits.dims(), data.token_level()) {
        ([r, c], false) if *c > 0 => Ok((*r, *c)),
        ([r, tt, c], true) if *c > 0 && *tt == t => Ok((*r, *c)),
        (d, false) => bail!(
            Data,
            "the model must return logits of shape (N, classes), got {d:?}"
        ),
        (d, true) => bail!(
            Data,
            "with token labels (N, {t}) the model must return logits of shape (N, {t}, classes), \
             got {d:?}"
        ),
    }
}

/// The arg-max class of every row (and token) of the logits, flattened.
fn arg_max(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
}

/// `(rows, classes)` of logits for a chunk of `samples` samples starting at sample `start`;
/// an error when the model returned another number of rows or a label exceeds the logits.
fn checked_logits(
    logits: &Tensor,
    samples: usize,
    data: &ProbeData,
    start: usize,
) -> Result<(usize, usize)> {
    let (rows, classes) = logits_dims(logits, data)?;
    if rows != samples {
        bail!(
            Data,
            "the model returned {rows} rows of logits for {samples} samples"
        );
    }
    let labels = data.labels_of(start, rows);
    if let Some(bad) = labels
        .iter()
        .find(|&&l| l != ProbeData::PADDING && l as usize >= classes)
    {
        bail!(
            Data,
            "label {bad} is out of range for a model with {classes} logits"
        );
    }
    Ok((rows, classes))
}

/// Per variant, how many of the predictions `pred` (`variants × m`, variant-major) equal
/// `targets` (`m`: the labels, or the unablated predictions; a padded position holds
/// [`ProbeData::PADDING`] in both, which no prediction equals).
fn count_hits(pred: &[u32], targets: &[u32], variants: usize) -> Vec<u64> {
    pred.chunks(targets.len().max(1))
        .take(variants)
        .map(|row| row.iter().zip(targets).filter(|(p, t)| p == t).count() as u64)
        .collect()
}

/// How the variant evaluation ran.
#[derive(Debug, Clone, Default)]
pub(crate) struct VariantRun {
    pub correct: Vec<u64>,
    /// Samples (tokens) whose prediction equals the unablated prediction.
    pub agreeing: Vec<u64>,
    /// Why the batched pass was abandoned for one pass per variant, if it was.
    pub fallback: Option<String>,
    /// Whether a probed layer was computed incrementally.
    pub incremental: bool,
    /// Whether variants that agree on the probes reached so far shared rows.
    pub shared_rows: bool,
}

/// What a statistics pass accumulates besides the probes' sums: counts over the unclamped
/// logits, and the label classes.
pub(crate) struct StatsAcc {
    label_classes: usize,
    class_counts: Vec<u64>,
    correct: u64,
    classes: usize,
    finite: bool,
    first_probe: usize,
    batch_dependent: bool,
    predictions: Vec<u32>,
}

impl StatsAcc {
    /// Counts the unclamped logits `(rows, classes)` (or `(rows, T, classes)`) of samples
    /// `start..` and their arg-max `pred`, against their labels. `call_order`: for the rank's
    /// first chunk, the order its forward reached the probes; its first row is then compared
    /// with the first sample's logits `alone`.
    fn observe(
        &mut self,
        start: usize,
        (logits, pred): (&Tensor, &[u32]),
        data: &ProbeData,
        alone: &Tensor,
        call_order: Option<&[usize]>,
    ) -> Result<()> {
        let (rows, classes) = logits_dims(logits, data)?;
        let labels = data.labels_of(start, rows);
        self.classes = classes;
        self.finite &= logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite());
        self.correct += count_hits(pred, labels, 1)[0];
        // A padded position's prediction is padding too: no agreement counts it.
        let t = data.tokens();
        for ((p, &q), &l) in self.predictions[start * t..(start + rows) * t]
            .iter_mut()
            .zip(pred)
            .zip(labels)
        {
            *p = if l == ProbeData::PADDING {
                ProbeData::PADDING
            } else {
                q
            };
        }
        if let Some(order) = call_order {
            self.first_probe = order.first().copied().unwrap_or(0);
            self.batch_dependent = differs(alone, &logits.narrow(0, 0, 1)?)?;
        }
        Ok(())
    }
}

/// Per-unit moments of every probe from its sums.
fn moments(
    names: Vec<String>,
    sums: Vec<Option<UnitSums>>,
    class_counts: &[u64],
) -> Result<Vec<PerProbe<UnitMoments>>> {
    let label_classes = class_counts.len();
    let mut offset = 0;
    let mut out = Vec::with_capacity(sums.len());
    for (name, s) in names.into_iter().zip(sums) {
        let s = candle_core::Context::context(s, format!("probe `{name}` recorded nothing"))?;
        let c = s.count.max(1) as f64;
        let mean: Vec<f64> = s.sum.iter().map(|v| v / c).collect();
        let std = s
            .sum_sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / c - m * m).max(0.0).sqrt())
            .collect();
        let positions = s.positions.max(1);
        let class_mean = (0..label_classes)
            .map(|c| {
                let k = class_counts[c];
                (0..s.units)
                    .map(|u| {
                        if k == 0 {
                            f64::NAN
                        } else {
                            s.class_sum[c * s.units + u] / k as f64
                        }
                    })
                    .collect()
            })
            .collect();
        out.push(PerProbe {
            name,
            offset,
            units: s.units,
            value: UnitMoments {
                positions,
                mean,
                std,
                class_mean,
            },
        });
        offset += s.units;
    }
    Ok(out)
}

/// A statistics pass folded into a clamp pass (see [`Measurement::folded`]).
pub(crate) struct Folded {
    /// The probes' units, offsets and positions (from the first sample; no moments yet).
    shapes: UnitStatistics,
    /// The first sample's logits alone.
    alone: Tensor,
    acc: StatsAcc,
}

impl Folded {
    /// Units across all probes.
    pub(crate) fn total_units(&self) -> usize {
        self.shapes.total_units()
    }
}
