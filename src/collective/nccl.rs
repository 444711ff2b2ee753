//! [`Nccl`]: the collective over an NCCL communicator, for one process per GPU.

use super::Collective;
use crate::error::{bail, fail, Error};
use crate::Result;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nccl::{Comm, NcclType, ReduceOp};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

/// A [`Collective`] over the NCCL communicator a data-parallel training loop already has for its
/// gradients (cudarc's [`Comm`], as candle re-exports it under `candle_core::cuda_backend::cudarc`).
///
/// Every reduction copies the host buffer to the communicator's device, reduces it there, and
/// copies it back: a check moves a few kilobytes (per-variant counts, per-unit sums). The `u64`
/// counts are summed by NCCL (integer sums: exact, the same on every rank). The `f64` sums are
/// all-gathered and summed on the host in rank order, so that every rank gets the same bits
/// whatever algorithm NCCL picks — decisions must not differ in a last bit. Before each
/// reduction the ranks compare their buffers' lengths (one more tiny reduction), so a rank that
/// measured something else fails with an error instead of corrupting the others' sums.
///
/// A rank that fails cannot abort the others' NCCL calls: cudarc aborts a communicator only when
/// its last handle is dropped, and the training loop holds one for its gradients, so
/// [`Collective::abort`] does nothing here and the other ranks wait in their next collective
/// call — of the monitor or of the gradients — as they would without the monitor. Run the
/// ranks under a launcher that ends every process when one fails (torchrun-style), or set
/// `NCCL_TIMEOUT`-like watchdogs of your launcher.
///
/// Built with the `nccl` feature (which needs nvcc at build time, like `cuda`, and libnccl at run
/// time). It has been compile-checked only: no multi-GPU machine has run it.
///
/// ```ignore
/// use candle_core::cuda_backend::cudarc::nccl::{Comm, Id};
/// use candle_reliance::{collective::Nccl, RelianceMonitor};
/// use std::sync::Arc;
///
/// // One process per GPU; rank 0 made `id` and shared it (a file, an environment variable).
/// let comm = Arc::new(Comm::from_rank(stream, rank, world_size, id)?);
/// // ... the training loop all-reduces its gradients through `comm` ...
/// let collective = Arc::new(Nccl::new(comm.clone()));
/// let mut monitor = RelianceMonitor::new_ranked(config, probes, data, collective)?;
/// ```
pub struct Nccl {
    comm: Arc<Comm>,
    // NCCL calls on one communicator must not run concurrently; the monitor makes them from
    // one thread, this makes sure of it.
    lock: Mutex<()>,
}

// SAFETY: `Comm` holds a raw NCCL handle and its CUDA stream; NCCL allows a communicator to be
// used from any thread as long as calls are not concurrent, which `lock` serializes for every
// call made through this type. cudarc binds the stream's context to the calling thread in each
// copy and allocation.
unsafe impl Send for Nccl {}
// SAFETY: as above: every method takes `lock` before touching the communicator.
unsafe impl Sync for Nccl {}

impl Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .finish()
    }
}

fn nccl_error(what: &str, e: impl Debug) -> Error {
    fail!(Rank, "NCCL collective: {what} failed: {e:?}")
}

impl Nccl {
    /// The collective over `comm`; share the same communicator with the gradient all-reduce.
    pub fn new(comm: Arc<Comm>) -> Self {
        Self {
            comm,
            lock: Mutex::new(()),
        }
    }

    /// The communicator.
    pub fn comm(&self) -> &Arc<Comm> {
        &self.comm
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }

    /// `buf` on the communicator's device.
    fn to_device<T: DeviceRepr>(&self, buf: &[T]) -> Result<CudaSlice<T>> {
        self.stream()
            .clone_htod(buf)
            .map_err(|e| nccl_error("copy to the device", e))
    }

    /// `dev` back on the host, once the stream's work (the collective) is done.
    fn to_host<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let stream = self.stream();
        let host = stream
            .clone_dtoh(dev)
            .map_err(|e| nccl_error("copy to the host", e))?;
        stream
            .synchronize()
            .map_err(|e| nccl_error("stream synchronize", e))?;
        Ok(host)
    }

    /// `buf` reduced with `op` across ranks, on the device and back.
    fn reduce<T: DeviceRepr + NcclType + Copy>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let mut dev = self.to_device(buf)?;
        self.comm
            .all_reduce_in_place(&mut dev, &op)
            .map_err(|e| nccl_error("all-reduce", e))?;
        buf.copy_from_slice(&self.to_host(&dev)?);
        Ok(())
    }

    /// Fails on every rank unless all ranks' buffers have length `len`.
    fn same_length(&self, len: usize) -> Result<()> {
        // Max of the lengths and max of their complements: the largest and the smallest length.
        let mut lens = [len as u64, u64::MAX - len as u64];
        self.reduce(&mut lens, ReduceOp::Max)?;
        let (longest, shortest) = (lens[0], u64::MAX - lens[1]);
        if longest != shortest {
            bail!(
                Rank,
                "all-reduce: the ranks' buffers differ in length (from {shortest} to {longest}); \
                 every rank must make the same measurements"
            );
        }
        Ok(())
    }

    fn all_gather<T: DeviceRepr + NcclType + ValidAsZeroBits + Copy>(
        &self,
        buf: &[T],
    ) -> Result<Vec<T>> {
        let send = self.to_device(buf)?;
        let mut recv = self
            .stream()
            .alloc_zeros::<T>(buf.len() * self.comm.world_size())
            .map_err(|e| nccl_error("allocation", e))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| nccl_error("all-gather", e))?;
        self.to_host(&recv)
    }

    fn locked(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.lock
            .lock()
            .map_err(|_| fail!(Rank, "NCCL collective poisoned by a panic"))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum_u64(&self, buf: &mut [u64]) -> Result<()> {
        let _only = self.locked()?;
        self.same_length(buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.reduce(buf, ReduceOp::Sum)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _only = self.locked()?;
        self.same_length(buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let all = self.all_gather(buf)?;
        let (n, world) = (buf.len(), self.comm.world_size());
        // Rank by rank from zero, as every rank does: the same bits everywhere.
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (0..world).map(|r| all[r * n + i]).fold(0.0, |s, x| s + x);
        }
        Ok(())
    }
}
