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
//! all-reduces); a rank that fails between them leaves the others waiting, as with NCCL.
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
//!     handles.into_iter().map(|h| h.join().unwrap()).collect::<candle_core::Result<_>>()
//! })?;
//! assert!(sums.iter().all(|b| b == &vec![0 + 1 + 2, 3]));
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::Result;
use std::sync::{Arc, Barrier, Mutex};

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
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
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    group: Arc<Group>,
    rank: usize,
}

#[derive(Debug)]
struct Group {
    world: usize,
    barrier: Barrier,
    u64s: Mutex<Vec<Vec<u64>>>,
    f64s: Mutex<Vec<Vec<f64>>>,
}

impl ThreadGroup {
    /// The `world` members of a new group, rank 0 first.
    pub fn new(world: usize) -> Result<Vec<Self>> {
        if world == 0 {
            candle_core::bail!("a thread group needs at least one rank");
        }
        let group = Arc::new(Group {
            world,
            barrier: Barrier::new(world),
            u64s: Mutex::new(vec![Vec::new(); world]),
            f64s: Mutex::new(vec![Vec::new(); world]),
        });
        Ok((0..world)
            .map(|rank| Self {
                group: group.clone(),
                rank,
            })
            .collect())
    }

    fn reduce<T: Copy + Default + std::ops::AddAssign>(
        &self,
        slots: &Mutex<Vec<Vec<T>>>,
        buf: &mut [T],
    ) -> Result<()> {
        let poisoned = || candle_core::Error::Msg("thread group poisoned by a panic".into());
        slots.lock().map_err(|_| poisoned())?[self.rank] = buf.to_vec();
        self.group.barrier.wait();
        // Every rank sums the same slots in rank order: the same bits everywhere.
        let result = {
            let all = slots.lock().map_err(|_| poisoned())?;
            if all.iter().any(|s| s.len() != buf.len()) {
                let lens: Vec<usize> = all.iter().map(Vec::len).collect();
                Err(candle_core::Error::Msg(format!(
                    "all-reduce: the ranks' buffers differ in length: {lens:?}"
                )))
            } else {
                let mut sum = vec![T::default(); buf.len()];
                for s in all.iter() {
                    sum.iter_mut().zip(s).for_each(|(a, &b)| *a += b);
                }
                Ok(sum)
            }
        };
        // Nobody writes the next round's slot before everybody has read this one.
        self.group.barrier.wait();
        buf.copy_from_slice(&result?);
        Ok(())
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
        self.reduce(&self.group.u64s, buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce(&self.group.f64s, buf)
    }
}
