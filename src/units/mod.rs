//! Analyses of single units (Morcos et al. 2018, §3.4; Leavitt & Morcos 2021): class
//! selectivity, mutual information with the label, single-unit importance and its rank
//! correlations, the orders that ablate units by these measures, and a differentiable
//! selectivity regularizer. See `docs/selectivity.md`.
//!
//! The measurements come from a [`Measurement`](crate::Measurement)
//! ([`selectivity`](crate::Measurement::selectivity),
//! [`mutual_information`](crate::Measurement::mutual_information),
//! [`importance`](crate::Measurement::importance)); every per-probe result is a [`PerProbe`].

mod importance;
mod information;
pub(crate) mod ordering;
mod regularizer;
mod selectivity;

pub use importance::{
    importance_correlations, incoming_l1, spearman, Correlations, ImportanceCorrelations,
    UnitImportance, WeightLayout,
};
pub use information::{
    label_entropy_bits, mutual_information_bits, quantile_bins, MutualInformation, UnitActivity,
    DEFAULT_MI_BINS,
};
pub use regularizer::{selectivity_regularizer, REGULARIZER_MIN_ACTIVITY};
pub use selectivity::{selectivity_index, Selectivity, SELECTIVITY_EPSILON};

use serde::{Deserialize, Serialize};

/// One probe's share of a per-unit result: which units it holds in the global numbering, and
/// its value (per-unit numbers, moments, correlations…).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerProbe<T> {
    /// The probe's name.
    pub name: String,
    /// Global index of the probe's first unit.
    pub offset: usize,
    /// Number of units.
    pub units: usize,
    /// The probe's value.
    pub value: T,
}

impl<T> PerProbe<T> {
    /// The same probe and units with another value.
    pub fn with_value<U>(&self, value: U) -> PerProbe<U> {
        PerProbe {
            name: self.name.clone(),
            offset: self.offset,
            units: self.units,
            value,
        }
    }
}

/// Flattening and averaging of per-probe, per-unit numbers.
///
/// ```
/// use candle_reliance::units::{PerProbe, PerUnit};
/// let probes = vec![
///     PerProbe { name: "a".into(), offset: 0, units: 2, value: vec![1.0, 3.0] },
///     PerProbe { name: "b".into(), offset: 2, units: 1, value: vec![5.0] },
/// ];
/// assert_eq!(probes.per_unit(), vec![1.0, 3.0, 5.0]);
/// assert_eq!(probes.means(), vec![2.0, 5.0]);
/// ```
pub trait PerUnit {
    /// Every unit's number in global order.
    fn per_unit(&self) -> Vec<f64>;
    /// The mean over each probe's units (NaN for a probe without units).
    fn means(&self) -> Vec<f64>;
}

impl PerUnit for [PerProbe<Vec<f64>>] {
    fn per_unit(&self) -> Vec<f64> {
        self.iter().flat_map(|p| p.value.iter().copied()).collect()
    }

    fn means(&self) -> Vec<f64> {
        self.iter().map(|p| mean(&p.value)).collect()
    }
}

/// `(name, units)` of each probe: two results come from the same probes when these agree.
pub(crate) fn layout<T>(probes: &[PerProbe<T>]) -> Vec<(&str, usize)> {
    probes.iter().map(|p| (p.name.as_str(), p.units)).collect()
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}
