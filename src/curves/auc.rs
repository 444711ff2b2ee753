//! Area under a curve of accuracy, and its confidence interval over repeated random orders or
//! noise draws.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Area under the piecewise-linear curve through `(x[i], y[i])` (trapezoid rule).
///
/// ```
/// // A curve falling linearly from 1 to 0 over [0, 1] has area 1/2.
/// assert_eq!(candle_reliance::curves::trapezoid_auc(&[0.0, 0.5, 1.0], &[1.0, 0.5, 0.0]), 0.5);
/// ```
///
/// Returns NaN when `x` and `y` differ in length (no curve to integrate).
pub fn trapezoid_auc(x: &[f64], y: &[f64]) -> f64 {
    if x.len() != y.len() {
        return f64::NAN;
    }
    x.windows(2)
        .zip(y.windows(2))
        .map(|(x, y)| (x[1] - x[0]) * (y[0] + y[1]) / 2.0)
        .sum()
}

/// Mean and two-sided 95% Student-t confidence interval of `values`; `None` for the interval
/// when fewer than two values (no spread can be estimated).
pub fn mean_and_ci95(values: &[f64]) -> (f64, Option<[f64; 2]>) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, None);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, None);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .map(|d| d.inverse_cdf(0.975))
        .unwrap_or(f64::NAN);
    let half = t * (var / n as f64).sqrt();
    (mean, Some([mean - half, mean + half]))
}

/// Mean curve, AUC and interval from per-repeat accuracies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub accuracy: Vec<f64>,
    pub auc: f64,
    pub auc_per_run: Vec<f64>,
    pub auc_ci: Option<[f64; 2]>,
}

pub(crate) fn summarize(x_for_auc: &[f64], runs: &[Vec<f64>]) -> Summary {
    let points = x_for_auc.len();
    let accuracy = (0..points)
        .map(|i| runs.iter().map(|r| r[i]).sum::<f64>() / runs.len() as f64)
        .collect();
    let auc_per_run: Vec<f64> = runs.iter().map(|r| trapezoid_auc(x_for_auc, r)).collect();
    let (auc, auc_ci) = mean_and_ci95(&auc_per_run);
    Summary {
        accuracy,
        auc,
        auc_per_run,
        auc_ci,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trapezoid_hand_worked() {
        // Steps: (0,1)-(0.25,1): 0.25; (0.25,1)-(0.5,0.5): 0.1875; (0.5,0.5)-(1,0.1): 0.15.
        let auc = trapezoid_auc(&[0.0, 0.25, 0.5, 1.0], &[1.0, 1.0, 0.5, 0.1]);
        assert!((auc - 0.5875).abs() < 1e-12, "{auc}");
        assert_eq!(trapezoid_auc(&[0.3], &[1.0]), 0.0);
        assert!(trapezoid_auc(&[0.0, 1.0], &[1.0]).is_nan());
    }

    #[test]
    fn ci_matches_t_table() {
        // n = 3, mean 2, sd 1: t(0.975, 2) = 4.302653; half width 4.302653 / sqrt(3) = 2.484138.
        let (m, ci) = mean_and_ci95(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        let [lo, hi] = ci.unwrap();
        assert!((hi - 2.0 - 2.484138).abs() < 1e-5, "{hi}");
        assert!((2.0 - lo - 2.484138).abs() < 1e-5, "{lo}");
        assert_eq!(mean_and_ci95(&[0.7]), (0.7, None));
    }
}
