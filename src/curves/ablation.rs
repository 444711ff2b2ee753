//! The cumulative ablation curve: training accuracy as a growing fraction of the probed units is
//! clamped, and its area under the curve (Morcos et al. 2018, §2).

use super::auc::summarize;
use crate::error::bail;
use crate::invalid::{Checked, Invalid};
use crate::measurement::Clamp;
use crate::units::ordering;
use crate::Measurement;
use crate::Result;
use candle_core::ModuleT;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most fractions a curve may have (steps of 1/1024).
pub const MAX_FRACTIONS: usize = 1025;
/// The most random orders a curve may have.
pub const MAX_ORDERS: usize = 10_000;
/// The most memory the random orders of one curve may hold (16 bytes per order and unit).
const MAX_ORDER_BYTES: usize = 1 << 30;
/// The most variants (orders × fractions, or noise scales × draws) a curve may evaluate: each
/// is a forward pass over the subset.
pub const MAX_VARIANTS: usize = 100_000;

/// The fractions of units clamped, the curve's x axis: a count of evenly spaced fractions
/// `0, 1/(n−1), …, 1` (YAML `fractions: 17`), or the fractions themselves, strictly increasing
/// in `[0, 1]` (YAML `fractions: [0, 0.25, 0.5, 1]`).
#[derive(Debug, Clone, PartialEq)]
pub enum Fractions {
    /// `n ≥ 2` evenly spaced fractions from 0 to 1.
    Evenly(usize),
    /// Given fractions.
    Explicit(Vec<f64>),
}

impl Default for Fractions {
    fn default() -> Self {
        Fractions::Evenly(17)
    }
}

impl From<usize> for Fractions {
    fn from(n: usize) -> Self {
        Fractions::Evenly(n)
    }
}

impl From<Vec<f64>> for Fractions {
    fn from(v: Vec<f64>) -> Self {
        Fractions::Explicit(v)
    }
}

impl Fractions {
    /// The fractions.
    ///
    /// ```
    /// use candle_reliance::curves::Fractions;
    /// assert_eq!(Fractions::Evenly(5).values(), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    /// ```
    pub fn values(&self) -> Vec<f64> {
        match self {
            Fractions::Evenly(n) => {
                let steps = n.max(&2) - 1;
                (0..=steps).map(|i| i as f64 / steps as f64).collect()
            }
            Fractions::Explicit(v) => v.clone(),
        }
    }

    /// How many fractions there are.
    pub fn len(&self) -> usize {
        match self {
            Fractions::Evenly(n) => *n,
            Fractions::Explicit(v) => v.len(),
        }
    }

    /// Whether there are none (never valid).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn check(&self) -> Checked {
        let bad = |msg: String| Err(Invalid::new("fractions", msg));
        Invalid::at_most(
            "fractions",
            self.len(),
            MAX_FRACTIONS,
            "steps of 1/1024 are finer than any check needs",
        )?;
        match self {
            Fractions::Evenly(n) if *n < 2 => {
                bad(format!("need at least 2 to form a curve, got {n}"))
            }
            Fractions::Evenly(_) => Ok(()),
            Fractions::Explicit(f) => {
                if f.len() < 2 {
                    return bad(format!(
                        "need at least 2 values to form a curve, got {}",
                        f.len()
                    ));
                }
                if let Some(v) = f.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                    return bad(format!("{v} is outside [0, 1]"));
                }
                if f.windows(2).any(|w| w[1] <= w[0]) {
                    return bad(format!("must be strictly increasing, got {f:?}"));
                }
                Ok(())
            }
        }
    }
}

impl Serialize for Fractions {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Fractions::Evenly(n) => s.serialize_u64(*n as u64),
            Fractions::Explicit(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Fractions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fractions;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a count of evenly spaced fractions or a list of fractions")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> std::result::Result<Fractions, E> {
                usize::try_from(n)
                    .map(Fractions::Evenly)
                    .map_err(|_| E::custom(format!("{n} fractions is too many")))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Fractions, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<f64>()? {
                    v.push(x);
                }
                Ok(Fractions::Explicit(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// The order in which units are ablated as the fraction grows.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use candle_reliance::curves::{AblationOrder, AblationSpec};
/// use candle_reliance::{Measurement, ProbeData, ProbeSet};
///
/// let probes = ProbeSet::new();
/// let p = probes.add("h")?;
/// let model = |xs: &Tensor| p.forward(xs);
/// // Unit 0 has selectivity 1 (class 0 only), unit 1 (3 − 1) / (3 + 1) = 0.5.
/// let xs = Tensor::new(&[[2f32, 1.0], [0.0, 3.0]], &Device::Cpu)?;
/// let data = ProbeData::new(xs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
/// let spec = AblationSpec::default()
///     .with_fractions(vec![0.0, 0.5, 1.0])
///     .with_order(AblationOrder::MostSelectiveFirst);
/// let curve = Measurement::new(&model, &probes, &data).ablation_curve(&spec)?;
/// // Unit 0 zeroed: (0, 1) → class 1, wrong for sample 0. Both zeroed: class 0 for both.
/// assert_eq!(curve.accuracy, vec![1.0, 0.5, 0.5]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum AblationOrder {
    /// `orders` uniformly random orders; order `r` is a function of `(seed, r)` only.
    Random {
        /// Number of orders (≥ 1); the curve is their mean, the interval is over their AUCs.
        orders: usize,
        /// Seed; the same seed gives the same orders at every check.
        seed: u64,
    },
    /// One given order: a permutation of all global unit indices.
    Explicit(Vec<usize>),
    /// Most class-selective units first ([`crate::units::Selectivity`], from the statistics
    /// pass); ties by unit index.
    MostSelectiveFirst,
    /// Least class-selective units first; ties by unit index.
    LeastSelectiveFirst,
    /// Most important units first: the largest accuracy drop when the unit alone is clamped
    /// ([`Measurement::importance`], an extra batched pass with the spec's clamp); ties by unit
    /// index.
    MostImportantFirst,
    /// Least important units first; ties by unit index.
    LeastImportantFirst,
}

impl Default for AblationOrder {
    fn default() -> Self {
        AblationOrder::Random { orders: 3, seed: 0 }
    }
}

/// What to measure: the `ablation:` section of the monitor's configuration, and the argument of
/// [`Measurement::ablation_curve`]. See the field docs for the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "AblationSection", into = "AblationSection")]
pub struct AblationSpec {
    /// Fractions of units clamped; default 17 evenly spaced (`i/16`).
    pub fractions: Fractions,
    /// Clamp value; default [`Clamp::Zero`].
    pub clamp: Clamp,
    /// Ablation order(s); default 3 random orders, seed 0.
    pub order: AblationOrder,
}

/// How an [`AblationSpec`] reads and writes as YAML: the order flattened into `order` (a name or
/// an explicit list), `orders` and `seed`.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename = "AblationSpec")]
struct AblationSection {
    fractions: Fractions,
    clamp: Clamp,
    order: OrderKey,
    orders: usize,
    #[serde(deserialize_with = "crate::invalid::seed")]
    seed: u64,
}

/// `order:` — a name, or an explicit permutation of the unit indices.
#[derive(Serialize)]
#[serde(untagged)]
enum OrderKey {
    Named(OrderName),
    Explicit(Vec<usize>),
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum OrderName {
    Random,
    MostSelectiveFirst,
    LeastSelectiveFirst,
    MostImportantFirst,
    LeastImportantFirst,
}

impl<'de> Deserialize<'de> for OrderKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{value::StrDeserializer, IntoDeserializer};
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("random, most_selective_first, least_selective_first, most_important_first, least_important_first, or a list of unit indices")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<OrderKey, E> {
                let d: StrDeserializer<'_, E> = v.into_deserializer();
                OrderName::deserialize(d).map(OrderKey::Named)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<OrderKey, A::Error> {
                let mut v = Vec::new();
                while let Some(u) = seq.next_element::<usize>()? {
                    v.push(u);
                }
                Ok(OrderKey::Explicit(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for AblationSection {
    fn default() -> Self {
        AblationSpec::default().into()
    }
}

impl From<AblationSection> for AblationSpec {
    fn from(s: AblationSection) -> Self {
        let order = match s.order {
            OrderKey::Explicit(v) => AblationOrder::Explicit(v),
            OrderKey::Named(OrderName::Random) => AblationOrder::Random {
                orders: s.orders,
                seed: s.seed,
            },
            OrderKey::Named(OrderName::MostSelectiveFirst) => AblationOrder::MostSelectiveFirst,
            OrderKey::Named(OrderName::LeastSelectiveFirst) => AblationOrder::LeastSelectiveFirst,
            OrderKey::Named(OrderName::MostImportantFirst) => AblationOrder::MostImportantFirst,
            OrderKey::Named(OrderName::LeastImportantFirst) => AblationOrder::LeastImportantFirst,
        };
        Self {
            fractions: s.fractions,
            clamp: s.clamp,
            order,
        }
    }
}

impl From<AblationSpec> for AblationSection {
    fn from(spec: AblationSpec) -> Self {
        // `orders` and `seed` matter for random orders only; others write the defaults.
        let named = |n| (OrderKey::Named(n), 3, 0);
        let (order, orders, seed) = match spec.order {
            AblationOrder::Random { orders, seed } => {
                (OrderKey::Named(OrderName::Random), orders, seed)
            }
            AblationOrder::Explicit(v) => (OrderKey::Explicit(v), 3, 0),
            AblationOrder::MostSelectiveFirst => named(OrderName::MostSelectiveFirst),
            AblationOrder::LeastSelectiveFirst => named(OrderName::LeastSelectiveFirst),
            AblationOrder::MostImportantFirst => named(OrderName::MostImportantFirst),
            AblationOrder::LeastImportantFirst => named(OrderName::LeastImportantFirst),
        };
        Self {
            fractions: spec.fractions,
            clamp: spec.clamp,
            order,
            orders,
            seed,
        }
    }
}

impl AblationSpec {
    /// Sets the fractions: a count of evenly spaced ones, or a list.
    pub fn with_fractions(mut self, fractions: impl Into<Fractions>) -> Self {
        self.fractions = fractions.into();
        self
    }
    /// Sets the clamp value.
    pub fn with_clamp(mut self, clamp: Clamp) -> Self {
        self.clamp = clamp;
        self
    }
    /// Sets the order(s).
    pub fn with_order(mut self, order: AblationOrder) -> Self {
        self.order = order;
        self
    }

    /// Checks the spec, naming the first problem.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| e.into_error("ablation"))
    }

    pub(crate) fn check(&self) -> Checked {
        self.fractions.check()?;
        if let AblationOrder::Random { orders, .. } = self.order {
            Invalid::at_least("orders", orders, 1)?;
            Invalid::at_most("orders", orders, MAX_ORDERS, "each order is drawn and held")?;
            Invalid::at_most(
                "orders",
                orders.saturating_mul(self.fractions.len()),
                MAX_VARIANTS,
                "orders × fractions is the number of forward passes over the subset",
            )?;
        }
        Ok(())
    }
}

/// A cumulative ablation curve; serializes to JSON for plotting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationCurve {
    /// Fractions of units clamped.
    pub fractions: Vec<f64>,
    /// Units clamped at each fraction: `round(fraction · total_units)`.
    pub units_ablated: Vec<usize>,
    /// Total probed units.
    pub total_units: usize,
    /// The clamp used.
    pub clamp: Clamp,
    /// Accuracy at each fraction, mean over orders.
    pub accuracy: Vec<f64>,
    /// Accuracy at each fraction for each order.
    pub per_order: Vec<Vec<f64>>,
    /// Mean over orders of the trapezoid area under each order's curve.
    #[serde(with = "crate::json::float")]
    pub auc: f64,
    /// Area under each order's curve.
    pub auc_per_order: Vec<f64>,
    /// 95% Student-t interval of `auc` over orders; `None` with a single order.
    pub auc_ci: Option<[f64; 2]>,
    /// Accuracy with nothing clamped.
    #[serde(with = "crate::json::float")]
    pub unablated_accuracy: f64,
    /// `auc / unablated_accuracy`: reliance with plain accuracy factored out.
    #[serde(with = "crate::json::float")]
    pub normalized_auc: f64,
    /// Agreement at each fraction, mean over orders: the share of samples (tokens) whose prediction is
    /// the unablated one (1 with nothing clamped). Labels play no part, so fitting wrong labels
    /// does not raise it: it measures how much of the network's own decisions survive ablation.
    #[serde(default)]
    pub agreement: Vec<f64>,
    /// Agreement at each fraction for each order.
    #[serde(default)]
    pub agreement_per_order: Vec<Vec<f64>>,
    /// Mean over orders of the area under each order's agreement curve.
    #[serde(default, with = "crate::json::float")]
    pub agreement_auc: f64,
    /// Area under each order's agreement curve.
    #[serde(default)]
    pub agreement_auc_per_order: Vec<f64>,
    /// Whether all unablated logits were finite.
    pub finite: bool,
    /// Whether the batched pass was used (false: one forward per variant).
    pub batched: bool,
    /// Whether the layer after the first probe was computed incrementally across the nested
    /// masks (the first probe reached is a [`ProbedLayer`](crate::probe::ProbedLayer)).
    #[serde(default)]
    pub incremental: bool,
    /// Whether variants that agree on the probes reached so far shared rows (see
    /// [`Batching::shared_rows`](crate::measurement::Batching::shared_rows)).
    #[serde(default)]
    pub shared_rows: bool,
}

impl<M: ModuleT + ?Sized> Measurement<'_, M> {
    /// The cumulative ablation curve.
    ///
    /// At fraction `f`, the first `round(f · N_total)` units of each order are clamped after the
    /// activation. The selectivity and importance orders ([`AblationOrder::MostSelectiveFirst`],
    /// ...) give the paper's curves of ablating units by selectivity; importance orders cost one
    /// extra batched pass with one clamped unit per variant. All fractions of all orders (the
    /// distinct masks: the *variants*) run in one expanded pass per chunk of samples (see
    /// [`Batching::max_batch_rows`](crate::measurement::Batching::max_batch_rows)); a model that
    /// cannot carry an expanded batch is detected and measured one variant at a time, with a
    /// warning.
    pub fn ablation_curve(&self, spec: &AblationSpec) -> Result<AblationCurve> {
        spec.validate()?;
        let fractions = spec.fractions.values();
        // Orders drawn without the statistics can fold the statistics pass into this one.
        let folded = match spec.order {
            AblationOrder::Random { .. } | AblationOrder::Explicit(_) => {
                self.folded(spec.clamp, fractions.first() == Some(&0.0))?
            }
            _ => None,
        };
        let total = match &folded {
            Some(f) => f.total_units(),
            None => self.statistics()?.total_units(),
        };
        if let AblationOrder::Random { orders, .. } = spec.order {
            // Every order is a permutation of all units, held with its ranks.
            let bytes = orders.saturating_mul(total).saturating_mul(16);
            if bytes > MAX_ORDER_BYTES {
                bail!(
                    Data,
                    "ablation.orders: {orders} orders of {total} units need {:.1} GiB; at most \
                     {:.0} GiB: use fewer orders",
                    bytes as f64 / (1u64 << 30) as f64,
                    MAX_ORDER_BYTES as f64 / (1u64 << 30) as f64
                );
            }
        }
        let orders = match &spec.order {
            AblationOrder::MostSelectiveFirst => vec![ordering::by_selectivity(self, true)?],
            AblationOrder::LeastSelectiveFirst => vec![ordering::by_selectivity(self, false)?],
            AblationOrder::MostImportantFirst => {
                vec![ordering::by_importance(self, spec.clamp, true)?]
            }
            AblationOrder::LeastImportantFirst => {
                vec![ordering::by_importance(self, spec.clamp, false)?]
            }
            AblationOrder::Random { orders, seed } => (0..*orders)
                .map(|r| crate::rng::permutation(total, crate::rng::derive_seed(*seed, r as u64)))
                .collect(),
            AblationOrder::Explicit(o) => vec![checked_explicit(o, total)?],
        };
        // rank[r][u]: position of unit u in order r; u is clamped at k units iff rank < k.
        let ranks: Vec<Vec<usize>> = orders
            .iter()
            .map(|o| {
                let mut rank = vec![0; total];
                o.iter().enumerate().for_each(|(pos, &u)| rank[u] = pos);
                rank
            })
            .collect();
        let units_ablated: Vec<usize> = fractions
            .iter()
            .map(|f| ((f * total as f64).round() as usize).min(total))
            .collect();
        // Variants are the distinct masks: nothing and everything clamped are the same for
        // every order.
        let mut masks: Vec<(usize, usize)> = Vec::new(); // (order, k)
        let mut seen = std::collections::HashMap::new();
        let mut index = vec![vec![0; units_ablated.len()]; orders.len()];
        for (r, row) in index.iter_mut().enumerate() {
            for (i, &k) in units_ablated.iter().enumerate() {
                let key = if k == 0 || k == total { (0, k) } else { (r, k) };
                row[i] = *seen.entry(key).or_insert_with(|| {
                    masks.push(key);
                    masks.len() - 1
                });
            }
        }
        let run = self.evaluate_clamped(masks.len(), spec.clamp, folded, |variant, p, keep| {
            let (r, cut) = masks[variant];
            let ranks = &ranks[r][p.offset..p.offset + p.units];
            keep.iter_mut()
                .zip(ranks)
                .for_each(|(k, &rank)| *k = u8::from(rank >= cut));
        })?;
        let stats = self.statistics()?;
        let n = self.data().targets() as f64;
        let by_order = |counts: &[u64]| -> Vec<Vec<f64>> {
            index
                .iter()
                .map(|row| row.iter().map(|&m| counts[m] as f64 / n).collect())
                .collect()
        };
        let (per_order, agreement_per_order) = (by_order(&run.correct), by_order(&run.agreeing));
        let s = summarize(&fractions, &per_order);
        let a = summarize(&fractions, &agreement_per_order);
        Ok(AblationCurve {
            fractions,
            units_ablated,
            total_units: total,
            clamp: spec.clamp,
            normalized_auc: s.auc / stats.accuracy,
            agreement: a.accuracy,
            agreement_per_order,
            agreement_auc: a.auc,
            agreement_auc_per_order: a.auc_per_run,
            accuracy: s.accuracy,
            per_order,
            auc: s.auc,
            auc_per_order: s.auc_per_run,
            auc_ci: s.auc_ci,
            unablated_accuracy: stats.accuracy,
            finite: stats.finite,
            batched: self.batching().batched && run.fallback.is_none(),
            incremental: run.incremental,
            shared_rows: run.shared_rows,
        })
    }
}

/// An explicit order, checked to be a permutation of `0..total`.
fn checked_explicit(o: &[usize], total: usize) -> Result<Vec<usize>> {
    if o.len() != total {
        bail!(
            Data,
            "an explicit ablation order must list all {total} probed units once, got {} entries",
            o.len()
        );
    }
    let mut seen = vec![false; total];
    for &u in o {
        if u >= total {
            bail!(
                Data,
                "explicit ablation order: unit {u} is out of range (0..{total})"
            );
        }
        if std::mem::replace(&mut seen[u], true) {
            bail!(Data, "explicit ablation order: unit {u} appears twice");
        }
    }
    Ok(o.to_vec())
}
