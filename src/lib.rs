//! Early stopping for candle training loops from a network's reliance on single directions.
//!
//! Morcos et al. (ICLR 2018, *On the Importance of Single Directions for Generalization*) found
//! that networks which generalize badly rely on single units: clamping a growing, randomly
//! ordered fraction of hidden units (the **cumulative ablation curve**) hurts them much more, and
//! the area under that curve, measured on training data, falls when the test loss starts to rise.
//!
//! # The training loop
//!
//! Put a [`Probe`] after each activation of the model, then add three lines to the loop:
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
//! # let (train_x, train_y) = (Tensor::zeros((100, 784), DType::F32, &Device::Cpu)?,
//! #                           Tensor::zeros(100, DType::U32, &Device::Cpu)?);
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let probes = ProbeSet::new();
//! let model = Mlp { fc1: linear(784, 256, vb.pp("fc1"))?, fc2: linear(256, 10, vb.pp("fc2"))?,
//!                   probe: probes.add("fc1")? };
//!
//! let mut monitor = RelianceMonitor::new(RelianceConfig::default(), probes, ProbeData::new(train_x, train_y)?)?;
//! for epoch in 1..=100 {
//!     train_one_epoch(&model)?;
//!     if monitor.on_epoch_end(epoch, &model, &varmap)?.is_stop() { break; }
//! }
//! monitor.finish(&varmap)?; // the best epoch's weights are back in `varmap`
//! # Ok(()) }
//! ```
//!
//! [`RelianceConfig`] reads the monitor's settings from YAML
//! ([`RelianceMonitor::from_yaml_file`]); every key has a default.
//!
//! # Modules
//!
//! * [`probe`] — [`Probe`] layers, the [`ProbeSet`] that drives them during a measurement, and
//!   [`ProbedLayer`]: a probe fused with the layer it feeds (and the ReLU and max-pool after
//!   it), which makes checks cheaper.
//! * [`data`] — the fixed training subset a measurement runs on ([`ProbeData`]).
//! * [`measurement`] — [`Measurement`]: a model, its probes and data, the statistics pass run
//!   once and shared by every measurement below.
//! * [`curves`] — the cumulative ablation curve and the noise curve, and their AUC.
//! * [`units`] — single units: class selectivity, mutual information, importance, ordered
//!   ablation, a selectivity regularizer.
//! * [`monitor`] — the training-loop plugin: configuration, stopping rule, records, files.
//! * [`plot`] — SVG charts of curves and histories (no dependencies).
//! * [`rng`] — the crate's seeded generators, for reproducing its draws.
//! * [`error`] — the crate's [`Error`] (variants a caller can match on) and [`Result`]; `?`
//!   turns it into `candle_core::Error` or `anyhow::Error`.
//! * [`collective`] — data-parallel measurement: each rank measures its shard, counts and sums
//!   are all-reduced (thread ranks built in; NCCL with the `nccl` feature).
//!
//! See `docs/usage.md`, `docs/configuration.md` and `examples/mnist.rs` in the repository.
#![warn(missing_docs)]
// docs.rs (`--cfg docsrs`, nightly): feature-gated items show the feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod collective;
pub mod curves;
pub mod data;
pub mod error;
mod invalid;
mod json;
pub mod measurement;
pub mod monitor;
// The ops' test hooks are public only to this crate's own tests (the `test-hooks` feature,
// which the crate's dev-dependency on itself turns on); no user builds them.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod ops;
#[cfg(not(feature = "test-hooks"))]
mod ops;
pub mod plot;
pub mod probe;
pub mod rng;
pub mod units;

pub use curves::{AblationCurve, AblationSpec, Clamp};
pub use data::ProbeData;
pub use error::{Error, Result};
pub use measurement::Measurement;
pub use monitor::{
    CheckRecord, Decision, MonitorState, RelianceConfig, RelianceMonitor, StopReason,
};
pub use probe::{Probe, ProbeSet, ProbedLayer};

// The examples in docs/selectivity.md run as doctests, so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../docs/selectivity.md")]
struct SelectivityDocExamples;
