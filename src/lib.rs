//! Early stopping for candle training loops from a network's reliance on single directions.
//!
//! Morcos et al. (ICLR 2018, *On the Importance of Single Directions for Generalization*) found
//! that networks which generalize badly rely on single units: clamping a growing, randomly
//! ordered fraction of hidden units (the **cumulative ablation curve**) hurts them much more, and
//! the area under that curve, measured on training data, falls when the test loss starts to rise.
//!
//! * [`Probe`]s (from a [`ProbeSet`]) go after the activations of a model; they are identities
//!   outside measurements.
//! * [`ablation_curve`] and [`noise_curve`] measure the curves on a fixed training subset
//!   ([`ProbeData`]), all levels batched into one expanded forward pass per chunk.
//! * [`RelianceMonitor`] runs them every few epochs, decides when to stop ([`Decision`]), logs
//!   through `tracing`, writes a history file and restores the best epoch's weights; it is
//!   configured by [`RelianceConfig`] (YAML).
//! * [`class_selectivity`], [`mutual_information`], [`unit_importance`] and
//!   [`selectivity_regularizer`] analyse single units; [`plot`] draws SVG charts.
//!
//! A training loop with the monitor:
//!
//! ```no_run
//! use candle_core::{DType, Device, Module, Result, Tensor};
//! use candle_nn::{linear, Linear, VarBuilder, VarMap};
//! use candle_reliance::{Probe, ProbeData, ProbeSet, RelianceConfig, RelianceMonitor};
//!
//! struct Mlp { fc1: Linear, fc2: Linear, probe: Probe }
//!
//! impl Module for Mlp {
//!     fn forward(&self, xs: &Tensor) -> Result<Tensor> {
//!         // The probe sits after the activation.
//!         self.fc2.forward(&self.probe.forward(&self.fc1.forward(xs)?.relu()?)?)
//!     }
//! }
//!
//! # fn train_one_epoch(_: &Mlp) -> Result<()> { Ok(()) }
//! # fn main() -> Result<()> {
//! let (train_x, train_y) = (Tensor::zeros((100, 784), DType::F32, &Device::Cpu)?,
//!                           Tensor::zeros(100, DType::U32, &Device::Cpu)?);
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let probes = ProbeSet::new();
//! let model = Mlp { fc1: linear(784, 256, vb.pp("fc1"))?, fc2: linear(256, 10, vb.pp("fc2"))?,
//!                   probe: probes.add("fc1")? };
//!
//! let mut monitor = RelianceMonitor::new(RelianceConfig::default(), probes, ProbeData::new(train_x, train_y)?)?;
//! for epoch in 1..=100 {
//!     train_one_epoch(&model)?;
//!     if monitor.on_epoch_end(epoch, &model, &varmap)?.is_stop() {
//!         break;
//!     }
//! }
//! monitor.finish(&varmap)?; // the best epoch's weights are back in `varmap`
//! # Ok(()) }
//! ```
//!
//! See `docs/usage.md`, `docs/configuration.md` and `examples/mnist.rs` in the repository.
#![warn(missing_docs)]

mod ablation;
mod config;
mod curve;
mod data;
mod importance;
mod measure;
pub mod mnist;
mod monitor;
mod noise;
pub mod ops;
pub mod plot;
mod probe;
mod report;
pub mod rng;
mod selectivity;
mod stopping;

pub use ablation::{
    ablation_accuracies, ablation_curve, ablation_curve_with_stats, auto_batch_rows,
    evenly_spaced_fractions, AblationCurve, AblationOrder, AblationSpec, Clamp,
};
pub use config::{
    AblationConfig, DataConfig, NoiseConfig, OutputConfig, RelianceConfig, RestoreBestConfig,
    ScheduleConfig, SnapshotMode, StoppingConfig,
};
pub use curve::{mean_and_ci95, trapezoid_auc};
pub use data::{corrupt_labels, ProbeData};
pub use importance::{
    importance_correlations, incoming_l1, spearman, unit_importance, Correlations,
    ImportanceCorrelations, ProbeCorrelations, ProbeImportance, UnitImportance, WeightLayout,
};
pub use measure::{unit_statistics, ProbeUnits, UnitStatistics};
pub use monitor::{MonitorState, RelianceMonitor};
pub use noise::{log_spaced, noise_curve, noise_curve_with_stats, NoiseCurve, NoiseSpec};
pub use probe::{Capture, Probe, ProbeSet};
pub use report::{read_history, CheckRecord};
pub use selectivity::{
    class_selectivity, label_entropy_bits, mutual_information, mutual_information_bits,
    quantile_bins, selectivity_index, selectivity_regularizer, unit_activity, MutualInformation,
    ProbeActivity, ProbeInformation, ProbeSelectivity, Selectivity, UnitActivity, DEFAULT_MI_BINS,
    REGULARIZER_MIN_ACTIVITY, SELECTIVITY_EPSILON,
};
pub use stopping::{
    Best, Decision, EarlyStopping, EarlyStoppingStrategy, Metric, StopReason, StoppingRule,
    StoppingState,
};
