//! Ablation orders built from single-unit measures: units by class selectivity or by importance
//! (the paper's "ablate the most selective units first" curves).

use crate::measurement::Clamp;
use crate::units::PerUnit;
use crate::Measurement;
use crate::Result;
use candle_core::ModuleT;

/// All probed units, most (`descending`) or least selective first; ties by unit index.
pub(crate) fn by_selectivity<M: ModuleT + ?Sized>(
    m: &Measurement<'_, M>,
    descending: bool,
) -> Result<Vec<usize>> {
    let sel = crate::units::Selectivity::from_stats(m.statistics()?).per_unit();
    Ok(sorted_order(&sel, descending))
}

/// All probed units, most (`descending`) or least important first under `clamp` (one extra
/// batched pass with one unit clamped per variant); ties by unit index.
pub(crate) fn by_importance<M: ModuleT + ?Sized>(
    m: &Measurement<'_, M>,
    clamp: Clamp,
    descending: bool,
) -> Result<Vec<usize>> {
    let imp = m.importance(clamp)?.probes.per_unit();
    Ok(sorted_order(&imp, descending))
}

/// Unit indices sorted by `key`, descending or ascending, ties (and NaN, last) by index.
fn sorted_order(key: &[f64], descending: bool) -> Vec<usize> {
    let mut o: Vec<usize> = (0..key.len()).collect();
    o.sort_by(|&a, &b| {
        let (x, y) = (key[a], key[b]);
        let ord = match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ if descending => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
            _ => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
        };
        ord.then(a.cmp(&b))
    });
    o
}
