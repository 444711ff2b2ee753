//! Early stopping for candle training loops from a network's reliance on single directions.
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
mod rng;
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
