//! Rows shared by the variants of a clamp pass that agree on the probes reached so far.
//!
//! A clamp pass expands each sample into one row per variant at the first probe the forward
//! pass reaches. Variants whose masks agree on that probe carry the same activations until the
//! next probe, so they share rows: the batch is expanded to one *block* of rows per group of
//! variants that agree on every probe reached so far, and each probe splits the blocks further.
//! The last probe reached leaves one block per variant, so the logits are the usual `variants ×
//! samples` rows.
//!
//! It pays where an early probe has few units next to the total: in a CNN whose first probed map
//! has 16 channels out of 48 probed, a cumulative level often adds units only at later probes
//! (about 30% fewer rows through the layers between the first two probes at the default 17
//! fractions × 3 orders); a single-unit ablation ([`Measurement::importance`]) of a unit
//! behind the first probe clamps nothing there, so all of those variants share one block.
//!
//! [`Measurement::importance`]: crate::Measurement::importance

use super::{Action, Pass};
use crate::error::{bail, fail};
use crate::ops::{level_clamp, level_clamp_shared};
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// How probe `i` turns the incoming blocks into outgoing ones.
#[derive(Debug)]
pub(crate) struct MergeStep {
    /// The block of each variant before the probe; `None`: the unexpanded batch.
    incoming: Option<Arc<[u32]>>,
    /// The block of each variant after the probe.
    outgoing: Arc<[u32]>,
    /// How many blocks leave the probe.
    pub blocks: usize,
    /// For each outgoing block, the incoming block whose rows it reads (on the host and on the
    /// device); `None` when each outgoing block reads the incoming block of the same index (or
    /// the unexpanded batch).
    source: Option<(Arc<[u32]>, Tensor)>,
    /// For each outgoing block, the probe's keep row: `(blocks, units)` u8.
    pub keep: Tensor,
}

/// The step of probe `i` in the running forward pass (the pass's action is a clamp and it
/// expands), cached per action: the blocks so far are those left by the probes already reached.
/// Records the outgoing blocks in the pass.
pub(crate) fn advance(pass: &mut Pass, i: usize) -> Result<Arc<MergeStep>> {
    let incoming = pass.step.as_ref().map(|s| s.outgoing.clone());
    let step = match &pass.merges[i] {
        Some(s) if s.incoming == incoming => s.clone(),
        _ => {
            let s = Arc::new(build(pass, i, incoming)?);
            pass.merges[i] = Some(s.clone());
            s
        }
    };
    pass.step = Some(step.clone());
    Ok(step)
}

fn build(pass: &Pass, i: usize, incoming: Option<Arc<[u32]>>) -> Result<MergeStep> {
    let Action::Clamp { keep, host, .. } = &pass.action else {
        bail!(Probe, "merged rows apply to clamp passes only");
    };
    let variants = pass.variants;
    let rows = &host[i];
    let units = rows.len().checked_div(variants).unwrap_or(0);
    let row = |v: usize| &rows[v * units..(v + 1) * units];
    // The last probe reached leaves one block per variant: the logits are per variant.
    let last = pass.call_order.len() == pass.seen.len();
    let mut outgoing = Vec::with_capacity(variants);
    let mut representative = Vec::new();
    if pass.merge && !last {
        let mut ids: HashMap<(u32, &[u8]), u32> = HashMap::new();
        for v in 0..variants {
            let from = incoming.as_ref().map_or(0, |p| p[v]);
            let next = ids.len() as u32;
            let id = *ids.entry((from, row(v))).or_insert(next);
            if id == next {
                representative.push(v);
            }
            outgoing.push(id);
        }
    } else {
        outgoing.extend(0..variants as u32);
        representative.extend(0..variants);
    }
    let blocks = representative.len();
    let device = keep[i].device();
    let keep = if blocks == variants {
        keep[i].clone()
    } else {
        let k: Vec<u8> = representative
            .iter()
            .flat_map(|&v| row(v))
            .copied()
            .collect();
        Tensor::from_vec(k, (blocks, units), device)?
    };
    let source = match &incoming {
        None => None,
        Some(p) => {
            let s: Vec<u32> = representative.iter().map(|&v| p[v]).collect();
            let same = s.iter().enumerate().all(|(b, &from)| from as usize == b);
            match same {
                true => None,
                false => Some((s.as_slice().into(), Tensor::new(s.as_slice(), device)?)),
            }
        }
    };
    Ok(MergeStep {
        incoming,
        outgoing: outgoing.into(),
        blocks,
        source,
        keep,
    })
}

/// Probe `i`'s clamp of `xs` (the incoming blocks, `rows_in` rows each, or the unexpanded
/// batch when `expand`) into the outgoing blocks.
pub(crate) fn clamp(
    xs: &Tensor,
    step: &MergeStep,
    rows_in: usize,
    values: &Tensor,
    expand: bool,
) -> Result<Tensor> {
    match &step.source {
        Some((host, device)) => Ok(level_clamp_shared(
            xs,
            (host, device),
            rows_in,
            &step.keep,
            values,
        )?),
        None => Ok(level_clamp(xs, &step.keep, values, expand)?),
    }
}

/// A skip connection `skip` brought to the rows of a branch of `branch_rows` rows that went
/// through the probes reached so far, so that the two can be added: tiled when it comes from
/// before the first probe (the unexpanded batch, the same for every variant); gathered along
/// the last probe's step when it holds that probe's incoming blocks; as it is when it already
/// has the branch's blocks. Anything else is an error, after which a measurement runs again
/// without shared rows, where every expanded tensor holds one block per variant.
pub(crate) fn join(pass: &Pass, skip: &Tensor, branch_rows: usize) -> Result<Tensor> {
    let rows = skip.dim(0)?;
    let Some(m) = pass.rows_in.filter(|&m| pass.expand && m > 0) else {
        return Ok(skip.clone());
    };
    let refuse = || {
        fail!(
            Probe,
            "a skip connection of {rows} rows cannot join a branch of {branch_rows} rows after \
             the probes reached (the batch has {m} samples)"
        )
    };
    if rows == m && branch_rows != m {
        if !branch_rows.is_multiple_of(m) {
            return Err(refuse());
        }
        let copies = vec![skip.clone(); branch_rows / m];
        return Ok(Tensor::cat(&copies, 0)?);
    }
    let Some(step) = &pass.step else {
        return match rows == branch_rows {
            true => Ok(skip.clone()),
            false => Err(refuse()),
        };
    };
    let blocks_in = match &step.incoming {
        None => 1,
        Some(p) => p.iter().max().map_or(0, |&b| b as usize + 1),
    };
    let (from_incoming, as_branch) = (rows == blocks_in * m, rows == branch_rows);
    match (&step.source, from_incoming, as_branch) {
        // Already the branch's blocks (from after the last probe), or the incoming ones kept
        // where they were.
        (_, false, true) | (None, true, true) => Ok(skip.clone()),
        // The skip holds the incoming blocks: each outgoing block reads its source.
        (Some((_, on_device)), true, false) if branch_rows == step.blocks * m => {
            let mut dims = skip.dims().to_vec();
            dims[0] = branch_rows;
            Ok(skip
                .contiguous()?
                .reshape((blocks_in, skip.elem_count() / blocks_in))?
                .index_select(on_device, 0)?
                .reshape(dims)?)
        }
        // Incoming or outgoing blocks, the rows cannot tell: refuse rather than guess.
        _ => Err(refuse()),
    }
}
