//! Collectives for data-parallel measurement: every rank measures its shard of the probe data
//! and the counts and sums are summed across ranks, so that every rank sees the same numbers.
//!
//! A [`Measurement`](crate::Measurement) given a collective
//! ([`Measurement::with_collective`](crate::Measurement::with_collective)) takes the contiguous
//! shard `rank · N / world .. (rank + 1) · N / world` of its data, runs the statistics pass and
//! the curves on it, and all-reduces the unit sums, the predictions, the accuracy and the
//! per-variant counts. With the zero clamp the curve is exactly the single-process curve; with
//! the mean clamp the unit means are summed in another order and may differ in their last bits.
//!
//! Every rank must make the same measurements in the same order (each is a fixed sequence of
//! all-reduces). A rank that fails — an error, a panic, a rank that leaves — is reported to the
//! others through [`Collective::abort`]: in a [`ThreadGroup`] their pending and later calls
//! return an error naming it; a ranked [`RelianceMonitor`](crate::RelianceMonitor) aborts its
//! group when one of its epochs fails, and compares the ranks' epoch numbers first, so that a
//! rank that skips an epoch fails every rank instead of mixing two epochs' sums. (NCCL offers
//! no abort of a communicator shared with the training loop: see `Nccl`, built with the `nccl`
//! feature.)
//!
//! ```
//! use candle_reliance::collective::{Collective, ThreadGroup};
//!
//! let ranks = ThreadGroup::new(3)?;
//! let sums: Vec<Vec<u64>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ranks
//!         .iter()
//!         .map(|r| s.spawn(move || {
//!             let mut buf = vec![r.rank() as u64, 1];
//!             r.all_reduce_sum_u64(&mut buf).map(|_| buf)
//!         }))
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_reliance::Result<_>>()
//! })?;
//! assert!(sums.iter().all(|b| b == &vec![0 + 1 + 2, 3]));
//! # Ok::<(), candle_reliance::Error>(())
//! ```

use crate::error::{bail, fail, Error};
use crate::Result;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
#[cfg_attr(docsrs, doc(cfg(feature = "nccl")))]
pub use nccl::Nccl;

/// What a data-parallel measurement needs from a process group.
pub trait Collective: Send + Sync {
    /// This process's (or thread's) rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`s (same length
    /// on every rank).
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) -> Result<()>;
    /// As [`Collective::all_reduce_sum_u64`], for `f64`. Every rank must get the same bits:
    /// sum in a fixed order.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Tells the other ranks that this one failed (`why`) and will make no more collective
    /// calls, so that their pending and later calls return an error instead of waiting
    /// forever. The default does nothing: a process group that cannot be told waits.
    fn abort(&self, why: &str) {
        let _ = why;
    }
}

/// One process, no communication: what a measurement without a collective does.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_u64(&self, _: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// Ranks that are threads of one process, for tests and CPU data-parallel training. Created as a
/// whole by [`ThreadGroup::new`]; give each thread its own member.
///
/// A rank that fails does not leave the others waiting: when [`Collective::abort`] is called on
/// it, or its last handle is dropped (its thread returned or panicked) — whichever comes first —
/// every pending and later call of the other ranks returns an error naming the rank and why. A
/// clone is the same rank: the rank leaves when its last clone is dropped.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    group: Arc<Group>,
    rank: usize,
    // Dropped with the rank's last handle: the group learns that the rank left.
    _member: Arc<Member>,
}

#[derive(Debug)]
struct Member {
    group: Arc<Group>,
    rank: usize,
}

impl Drop for Member {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            "panicked"
        } else {
            "left the group (its last handle was dropped)"
        };
        self.group.fail(self.rank, why);
    }
}

#[derive(Debug)]
struct Group {
    world: usize,
    state: Mutex<Round>,
    changed: Condvar,
}

/// One all-reduce after another: the ranks' buffers of the current round, and the result of
/// the last complete one (read by every rank before the next round can complete, since that
/// needs every rank's buffer).
#[derive(Debug)]
struct Round {
    number: u64,
    slots: Vec<Option<Buf>>,
    arrived: usize,
    result: Option<std::result::Result<Buf, String>>,
    /// The first rank that failed, and why.
    failed: Option<(usize, String)>,
}

#[derive(Debug, Clone)]
enum Buf {
    U64(Vec<u64>),
    F64(Vec<f64>),
}

impl Group {
    /// The state, also after a panic of a rank while it held the lock (no invariant is broken
    /// half-way: every update is made before the lock is released or not at all).
    fn lock(&self) -> MutexGuard<'_, Round> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, rank: usize, why: &str) {
        let mut round = self.lock();
        if round.failed.is_none() {
            round.failed = Some((rank, why.to_string()));
        }
        drop(round);
        self.changed.notify_all();
    }
}

fn failed_error(rank: usize, why: &str) -> Error {
    Error::Rank {
        rank: Some(rank),
        message: format!(
            "thread group: rank {rank} failed and makes no more collective calls: {why}"
        ),
    }
}

/// Every rank's buffer summed in rank order: the same bits everywhere.
fn sum(all: Vec<Buf>) -> std::result::Result<Buf, String> {
    match &all[0] {
        Buf::U64(_) => add(&all, |b| match b {
            Buf::U64(v) => Some(v),
            Buf::F64(_) => None,
        })
        .map(Buf::U64),
        Buf::F64(_) => add(&all, |b| match b {
            Buf::F64(v) => Some(v),
            Buf::U64(_) => None,
        })
        .map(Buf::F64),
    }
}

/// The element-wise sum, in rank order, of the buffers `of` finds in `all` (`None`: a rank
/// reduces another type).
fn add<T: Copy + Default + std::ops::AddAssign>(
    all: &[Buf],
    of: impl Fn(&Buf) -> Option<&Vec<T>>,
) -> std::result::Result<Vec<T>, String> {
    let bufs = all
        .iter()
        .map(of)
        .collect::<Option<Vec<_>>>()
        .ok_or("all-reduce: the ranks reduce different types")?;
    let lens: Vec<usize> = bufs.iter().map(|v| v.len()).collect();
    if lens.iter().any(|&l| l != lens[0]) {
        return Err(format!(
            "all-reduce: the ranks' buffers differ in length: {lens:?}"
        ));
    }
    let mut total = vec![T::default(); lens[0]];
    for v in bufs {
        total.iter_mut().zip(v).for_each(|(a, &b)| *a += b);
    }
    Ok(total)
}

impl ThreadGroup {
    /// The `world` members of a new group, rank 0 first.
    pub fn new(world: usize) -> Result<Vec<Self>> {
        if world == 0 {
            bail!(Rank, "a thread group needs at least one rank");
        }
        let group = Arc::new(Group {
            world,
            state: Mutex::new(Round {
                number: 0,
                slots: vec![None; world],
                arrived: 0,
                result: None,
                failed: None,
            }),
            changed: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| Self {
                group: group.clone(),
                rank,
                _member: Arc::new(Member {
                    group: group.clone(),
                    rank,
                }),
            })
            .collect())
    }

    /// Deposits this rank's buffer in the current round and returns the round's sum once every
    /// rank has deposited, or an error once a rank has failed.
    fn exchange(&self, mine: Buf) -> Result<Buf> {
        let group = &*self.group;
        let mut round = group.lock();
        if let Some((rank, why)) = &round.failed {
            return Err(failed_error(*rank, why));
        }
        let number = round.number;
        round.slots[self.rank] = Some(mine);
        round.arrived += 1;
        if round.arrived == group.world {
            let all: Vec<Buf> = round.slots.iter_mut().filter_map(Option::take).collect();
            round.result = Some(sum(all));
            round.arrived = 0;
            round.number += 1;
            group.changed.notify_all();
        } else {
            while round.number == number {
                if let Some((rank, why)) = &round.failed {
                    return Err(failed_error(*rank, why));
                }
                round = group.changed.wait(round).unwrap_or_else(|p| p.into_inner());
            }
        }
        match round.result.clone() {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(fail!(Rank, "{e}")),
            None => Err(fail!(Rank, "thread group: a round ended without a result")),
        }
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum_u64(&self, buf: &mut [u64]) -> Result<()> {
        match self.exchange(Buf::U64(buf.to_vec()))? {
            Buf::U64(v) => buf.copy_from_slice(&v),
            Buf::F64(_) => bail!(Rank, "all-reduce: the ranks reduce different types"),
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        match self.exchange(Buf::F64(buf.to_vec()))? {
            Buf::F64(v) => buf.copy_from_slice(&v),
            Buf::U64(_) => bail!(Rank, "all-reduce: the ranks reduce different types"),
        }
        Ok(())
    }
    fn abort(&self, why: &str) {
        self.group.fail(self.rank, why);
    }
}
