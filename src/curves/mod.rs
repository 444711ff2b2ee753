//! The paper's two curves, measured through a [`Measurement`](crate::Measurement): the
//! **cumulative ablation curve** (training accuracy as a growing, randomly ordered fraction of
//! the probed units is clamped; Morcos et al. 2018, §2) and the **noise curve** (accuracy as
//! Gaussian noise scaled by each unit's σ is added to every unit; Fig. 1b), with their areas under
//! the curve.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_reliance::curves::{AblationOrder, AblationSpec};
//! use candle_reliance::{Measurement, ProbeData, ProbeSet};
//!
//! // Two units; the model predicts class 0 when unit 0 is larger, else class 1.
//! let probes = ProbeSet::new();
//! let probe = probes.add("hidden")?;
//! let model = |xs: &Tensor| probe.forward(&xs.relu()?);
//! let xs = Tensor::new(&[[2f32, 1.0], [1.0, 3.0]], &Device::Cpu)?;
//! let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
//! let spec = AblationSpec::default()
//!     .with_fractions(vec![0.0, 0.5, 1.0])
//!     .with_order(AblationOrder::Explicit(vec![0, 1]));
//! let curve = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
//! // Nothing clamped: both right. Unit 0 clamped: logits (0,1), (0,3) → class 1 for both (1/2).
//! // Both clamped: all logits 0, arg-max takes the first → class 0 for both (1/2).
//! assert_eq!(curve.accuracy, vec![1.0, 0.5, 0.5]);
//! assert_eq!(curve.auc, 0.625);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod ablation;
mod auc;
mod noise;

pub use crate::measurement::Clamp;
pub use ablation::{
    AblationCurve, AblationOrder, AblationSpec, Fractions, MAX_FRACTIONS, MAX_ORDERS, MAX_VARIANTS,
};
pub use auc::{mean_and_ci95, trapezoid_auc};
pub use noise::{log_spaced, NoiseCurve, NoiseSpec};
