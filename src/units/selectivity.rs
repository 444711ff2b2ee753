//! Class selectivity of single units (Morcos et al. 2018, §3.4).
//!
//! **Class selectivity index** of a unit:
//! `(μ_max − μ_−max) / (μ_max + μ_−max + ε)`, where `μ_max` is the largest class-conditional
//! mean activity and `μ_−max` the mean of the other classes' class-conditional means. For a
//! feature map the activity of a sample is first averaged over positions. `ε` is
//! [`SELECTIVITY_EPSILON`] (`1e-12`), so a unit that is zero for every class gets 0. Classes
//! with no samples in the data are skipped; with fewer than two classes present every index is
//! 0. For non-negative activity (after a ReLU) the index lies in `[0, 1]`: 0 when all classes
//! have the same mean, 1 when only one class activates the unit.

use crate::measurement::UnitStatistics;
use crate::units::{mean, PerProbe, PerUnit};
use crate::Measurement;
use crate::Result;
use candle_core::ModuleT;
use serde::{Deserialize, Serialize};

/// The `ε` added to the denominator of the selectivity index, so that an all-zero unit gets 0.
pub const SELECTIVITY_EPSILON: f64 = 1e-12;

/// The selectivity index of one unit from its class-conditional means; NaN entries (classes
/// without samples) are skipped, and with fewer than two classes left the index is 0.
///
/// ```
/// use candle_reliance::units::selectivity_index;
/// // μ_max = 6, μ_−max = (2 + 1) / 2 = 1.5: (6 − 1.5) / (6 + 1.5) = 0.6.
/// assert!((selectivity_index(&[2.0, 6.0, 1.0, f64::NAN]) - 0.6).abs() < 1e-12);
/// assert_eq!(selectivity_index(&[0.0, 0.0]), 0.0);
/// ```
pub fn selectivity_index(class_means: &[f64]) -> f64 {
    let present: Vec<f64> = class_means
        .iter()
        .copied()
        .filter(|m| !m.is_nan())
        .collect();
    if present.len() < 2 {
        return 0.0;
    }
    let top = present
        .iter()
        .enumerate()
        .fold(0, |best, (i, &m)| if m > present[best] { i } else { best });
    let max = present[top];
    let rest = present
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != top)
        .map(|(_, m)| m)
        .sum::<f64>()
        / (present.len() - 1) as f64;
    (max - rest) / (max + rest + SELECTIVITY_EPSILON)
}

/// Class selectivity of every probed unit: `(μ_max − μ_−max) / (μ_max + μ_−max + ε)` per unit, see
/// [`selectivity_index`].
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_reliance::{Measurement, ProbeData, ProbeSet};
///
/// let probes = ProbeSet::new();
/// let p = probes.add("h")?;
/// let model = |xs: &Tensor| p.forward(xs);
/// // Unit 0 fires for class 0 only; unit 1 has class means 3 and 1.
/// let xs = Tensor::new(&[[2f32, 3.0], [0.0, 1.0]], &Device::Cpu)?;
/// let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
/// let s = Measurement::new(&model, &probes, &data).selectivity()?;
/// // (2 − 0) / (2 + 0) = 1 and (3 − 1) / (3 + 1) = 0.5.
/// assert!((s.probes[0].value[0] - 1.0).abs() < 1e-9);
/// assert!((s.probes[0].value[1] - 0.5).abs() < 1e-9);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selectivity {
    /// The selectivity index of each probe's units, in the order the probes were added.
    pub probes: Vec<PerProbe<Vec<f64>>>,
    /// Classes with at least one sample, the classes the index is over.
    pub classes: usize,
    /// The `ε` of the denominator ([`SELECTIVITY_EPSILON`]).
    pub epsilon: f64,
}

impl Selectivity {
    /// Selectivity from the class-conditional means of a statistics pass.
    pub fn from_stats(stats: &UnitStatistics) -> Self {
        let probes = stats
            .probes
            .iter()
            .map(|p| {
                p.with_value(
                    (0..p.units)
                        .map(|u| {
                            let means: Vec<f64> = p
                                .value
                                .class_mean
                                .iter()
                                .zip(&stats.class_counts)
                                .filter(|(_, &k)| k > 0)
                                .map(|(m, _)| m[u])
                                .collect();
                            selectivity_index(&means)
                        })
                        .collect(),
                )
            })
            .collect();
        Self {
            probes,
            classes: stats.class_counts.iter().filter(|&&k| k > 0).count(),
            epsilon: SELECTIVITY_EPSILON,
        }
    }

    /// Selectivity of every unit in global order.
    pub fn per_unit(&self) -> Vec<f64> {
        self.probes.per_unit()
    }

    /// Mean selectivity per probe.
    pub fn means(&self) -> Vec<f64> {
        self.probes.means()
    }

    /// Mean selectivity over all units.
    pub fn mean(&self) -> f64 {
        mean(&self.per_unit())
    }
}

impl<M: ModuleT + ?Sized> Measurement<'_, M> {
    /// Class selectivity of every probed unit, from the statistics pass (no extra forward);
    /// logs the mean per probe.
    pub fn selectivity(&self) -> Result<Selectivity> {
        let s = Selectivity::from_stats(self.statistics()?);
        for (p, mean) in s.probes.iter().zip(s.means()) {
            tracing::info!(probe = %p.name, units = p.units, mean_selectivity = mean, "class selectivity");
        }
        Ok(s)
    }
}
