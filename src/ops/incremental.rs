//! The layer after the first probe, for every nested clamp variant at once, on the CPU.
//!
//! Each variant's output is its base's (an earlier variant whose clamped set it contains, or the
//! unclamped output) minus what its newly clamped inputs contributed. Here that is one pass per
//! variant and sample block: copy the base, then `dst −= lhs · rhs` straight into the output
//! with the `gemm` crate (candle's CPU matmul), the newly clamped inputs gathered into `lhs`.
//! Nothing is padded to the widest variant, and a convolution needs no grouped convolution
//! (which candle runs as one convolution per group and a concatenation): its newly clamped
//! channels' image patches are gathered from the sample's patch matrix, computed once.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, WithDType};
use rayon::prelude::*;

/// The shape of the layer the probe feeds, for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerShape {
    /// A dense layer: `inputs` columns (a feature map flattened) to `outputs`.
    Dense {
        /// Input columns per sample.
        inputs: usize,
        /// Outputs per sample.
        outputs: usize,
    },
    /// A 2-D convolution with one group.
    Conv(ConvShape),
}

/// A convolution's geometry: input `(channels, height, width)`, kernel `(outputs, channels, kh,
/// kw)`, output `(outputs, out_h, out_w)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub outputs: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl ConvShape {
    /// Output height and width (as candle's `conv2d` computes them).
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |size: usize, k: usize| {
            (size + 2 * self.padding).saturating_sub(self.dilation * (k - 1) + 1) / self.stride + 1
        };
        (o(self.height, self.kh), o(self.width, self.kw))
    }

    /// Values per sample of the output.
    fn out_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.outputs * oh * ow
    }

    /// The sample's patch matrix, transposed: row `(c, ky, kx)`, column `(oy, ox)`, zero where
    /// the kernel reads padding. Rows of one channel are contiguous.
    fn patches<T: WithDType>(&self, x: &[T], out: &mut [T]) {
        let (oh, ow) = self.out_hw();
        let (s, p, d) = (self.stride, self.padding as isize, self.dilation);
        let mut row = 0;
        for c in 0..self.channels {
            let plane = &x[c * self.height * self.width..(c + 1) * self.height * self.width];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let dst = &mut out[row * oh * ow..(row + 1) * oh * ow];
                    for oy in 0..oh {
                        let iy = (oy * s + ky * d) as isize - p;
                        let line = &mut dst[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= self.height as isize {
                            line.fill(T::zero());
                            continue;
                        }
                        let src = &plane[iy as usize * self.width..(iy as usize + 1) * self.width];
                        for (ox, v) in line.iter_mut().enumerate() {
                            let ix = (ox * s + kx * d) as isize - p;
                            *v = if ix < 0 || ix >= self.width as isize {
                                T::zero()
                            } else {
                                src[ix as usize]
                            };
                        }
                    }
                    row += 1;
                }
            }
        }
    }
}

/// `out[v] = (bases[v] ? out[bases[v]] : unclamped) − removal(v)` for every variant `v`, where
/// `removal(v)` is the layer (without bias) applied to the removed inputs `d` (the activation
/// minus its clamp values) restricted to `added[v]`.
///
/// Inputs: the unclamped output `(m, …)`, or, with `conv_from_weight`, a convolution's weight
/// with its bias as one more column, `(outputs, channels · kh · kw + 1)` (the op computes the
/// unclamped output from the patches it builds anyway: candle's convolution would build them
/// again, and run its own product and bias pass); `d` `(m, …)`; the weights of all variants' added inputs
/// in variant order: dense `(Σ|added|, outputs)` (rows of the transposed weight); convolution
/// `(outputs, Σ|added|, kh, kw)`. Output `(variants · m, …)` per sample as the unclamped
/// output.
pub(crate) struct IncrementalCpu<'a> {
    /// Each variant's base, always an earlier variant (`None`: the unclamped output).
    pub bases: &'a [Option<usize>],
    /// Each variant's newly clamped inputs: columns of a dense layer, channels of a convolution.
    pub added: &'a [Vec<u32>],
    pub shape: LayerShape,
    /// Whether a convolution's first input is its weight and bias, from which the op computes
    /// the unclamped output (possible when the removed inputs `d` are the activation itself:
    /// the zero clamp); else it is the unclamped output.
    pub conv_from_weight: bool,
}

/// A raw pointer the sample blocks share; each writes only its own rows of every variant.
struct Out<T>(*mut T);

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// The fewest sample rows per dense block: below that the product's packing dominates.
const DENSE_BLOCK: usize = 8;

impl IncrementalCpu<'_> {
    fn run<T: WithDType>(
        &self,
        first_in: &[T],
        d: &[T],
        weights: &[T],
        m: usize,
    ) -> Result<Vec<T>> {
        let variants = self.bases.len();
        let q = match self.shape {
            LayerShape::Dense { outputs, .. } => outputs,
            LayerShape::Conv(c) => c.out_len(),
        };
        // Where each variant's inputs start among the weights.
        let mut first = Vec::with_capacity(variants);
        let mut total = 0usize;
        for a in self.added {
            first.push(total);
            total += a.len();
        }
        let widest = self.added.iter().map(Vec::len).max().unwrap_or(0);
        let len = variants * m * q;
        let minus_one = T::from_f64(-1.0);
        let mut out: Vec<T> = Vec::with_capacity(len);
        let ptr = Out(out.as_mut_ptr());
        // One variant's rows `rows` of a block: copy the base, then subtract the product.
        // Safety: blocks are disjoint sample ranges, and a variant's base is an earlier variant
        // whose same rows this block wrote before.
        // `unclamped`: the block's unclamped rows.
        let copy_base = |v: usize, start: usize, rows: usize, unclamped: *const T| {
            let out = ptr.get();
            let dst = unsafe { out.add((v * m + start) * q) };
            let src = match self.bases[v] {
                Some(b) => unsafe { out.add((b * m + start) * q) as *const T },
                None => unclamped,
            };
            unsafe { std::ptr::copy_nonoverlapping(src, dst, rows * q) };
            dst
        };
        match self.shape {
            LayerShape::Dense { inputs, outputs } => {
                let unclamped = first_in;
                if weights.len() != total * outputs
                    || d.len() != m * inputs
                    || unclamped.len() != m * outputs
                {
                    candle_core::bail!("incremental dense layer: inconsistent sizes");
                }
                // One block per thread, in whole multiples of 8 rows (the kernel's height is a
                // multiple of 8), so that the threads get even shares.
                let threads = rayon::current_num_threads().max(1);
                let block = m.div_ceil(threads).next_multiple_of(8).max(DENSE_BLOCK);
                let blocks: Vec<usize> = (0..m).step_by(block).collect();
                blocks.into_par_iter().for_each_init(
                    || vec![T::zero(); block * widest],
                    |lhs, start| {
                        let rows = block.min(m - start);
                        for v in 0..variants {
                            let dst = copy_base(v, start, rows, unclamped[start * q..].as_ptr());
                            let cols = &self.added[v];
                            let k = cols.len();
                            if k == 0 {
                                continue;
                            }
                            for r in 0..rows {
                                let src = &d[(start + r) * inputs..(start + r + 1) * inputs];
                                let row = &mut lhs[r * k..(r + 1) * k];
                                row.iter_mut()
                                    .zip(cols)
                                    .for_each(|(o, &c)| *o = src[c as usize]);
                            }
                            // dst (rows × outputs) −= lhs (rows × k) · w (k × outputs)
                            let w = &weights[first[v] * outputs..];
                            unsafe {
                                add_product(
                                    (rows, outputs, k),
                                    (dst, outputs),
                                    (lhs.as_ptr(), k),
                                    (w.as_ptr(), outputs),
                                    minus_one,
                                )
                            };
                        }
                    },
                );
            }
            LayerShape::Conv(c) => {
                let (oh, ow) = c.out_hw();
                let (kk, positions) = (c.kh * c.kw, oh * ow);
                let per_in = c.channels * c.height * c.width;
                // The weight's rows, each followed by its output's bias.
                let (full, ck) = (first_in, c.channels * kk);
                let first_len = match self.conv_from_weight {
                    true => c.outputs * (ck + 1),
                    false => m * q,
                };
                if weights.len() != c.outputs * total * kk
                    || d.len() != m * per_in
                    || first_in.len() != first_len
                {
                    candle_core::bail!("incremental convolution: inconsistent sizes");
                }
                (0..m).into_par_iter().for_each_init(
                    || {
                        (
                            vec![T::zero(); ck * positions],
                            vec![T::zero(); widest * kk * positions],
                            vec![T::zero(); q],
                        )
                    },
                    |(patches, rhs, unclamped), s| {
                        c.patches(&d[s * per_in..(s + 1) * per_in], patches);
                        let unclamped = if self.conv_from_weight {
                            // Bias, plus weight · patches (the patches of the activation itself).
                            for (o, row) in unclamped.chunks_mut(positions).enumerate() {
                                row.fill(full[o * (ck + 1) + ck]);
                            }
                            unsafe {
                                add_product(
                                    (c.outputs, positions, ck),
                                    (unclamped.as_mut_ptr(), positions),
                                    (full.as_ptr(), ck + 1),
                                    (patches.as_ptr(), positions),
                                    T::from_f64(1.0),
                                )
                            };
                            unclamped.as_ptr()
                        } else {
                            first_in[s * q..].as_ptr()
                        };
                        for v in 0..variants {
                            let dst = copy_base(v, s, 1, unclamped);
                            let units = &self.added[v];
                            if units.is_empty() {
                                continue;
                            }
                            let block = kk * positions;
                            for (j, &u) in units.iter().enumerate() {
                                let u = u as usize;
                                rhs[j * block..(j + 1) * block]
                                    .copy_from_slice(&patches[u * block..(u + 1) * block]);
                            }
                            let k = units.len() * kk;
                            // dst (outputs × positions) −= w (outputs × k) · rhs (k × positions);
                            // the weights of all variants share rows of `total · kk` values.
                            let w = &weights[first[v] * kk..];
                            unsafe {
                                add_product(
                                    (c.outputs, positions, k),
                                    (dst, positions),
                                    (w.as_ptr(), total * kk),
                                    (rhs.as_ptr(), positions),
                                    minus_one,
                                )
                            };
                        }
                    },
                );
            }
        }
        // Every element was written: each variant's rows by its base copy.
        unsafe { out.set_len(len) };
        Ok(out)
    }
}

/// `dst += sign · lhs · rhs` for row-major matrices given as (pointer, row stride): `dst`
/// `(m × n)`, `lhs` `(m × k)`, `rhs` `(k × n)`, on the calling thread.
///
/// # Safety
/// The pointers must address matrices of those shapes and strides; `dst` must not overlap the
/// others.
unsafe fn add_product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    (lhs, lhs_rs): (*const T, usize),
    (rhs, rhs_rs): (*const T, usize),
    sign: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        true,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        1,
        rhs_rs as isize,
        T::from_f64(1.0),
        sign,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl CustomOp3 for IncrementalCpu<'_> {
    fn name(&self) -> &'static str {
        "incremental-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1)), Some((c0, c1))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("incremental-layer: inputs must be contiguous");
        };
        // The op reads a base's rows after writing them: a base must be an earlier variant.
        if let Some(v) = (0..self.bases.len()).find(|&v| self.bases[v].is_some_and(|b| b >= v)) {
            candle_core::bail!("incremental-layer: variant {v} has a later base");
        }
        if self.added.len() != self.bases.len() {
            candle_core::bail!("incremental-layer: added inputs for every variant needed");
        }
        let m = l2.dims()[0];
        let dims = match self.shape {
            LayerShape::Dense { .. } => {
                let mut dims = l1.dims().to_vec();
                dims[0] *= self.bases.len();
                dims
            }
            LayerShape::Conv(c) => {
                let (oh, ow) = c.out_hw();
                vec![self.bases.len() * m, c.outputs, oh, ow]
            }
        };
        if !self.conv_from_weight && l1.dims()[0] != m {
            candle_core::bail!("incremental-layer: {} outputs for {m} inputs", l1.dims()[0]);
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(u), CpuStorage::F32(d), CpuStorage::F32(w)) => {
                CpuStorage::F32(self.run(&u[a0..a1], &d[b0..b1], &w[c0..c1], m)?)
            }
            (CpuStorage::F64(u), CpuStorage::F64(d), CpuStorage::F64(w)) => {
                CpuStorage::F64(self.run(&u[a0..a1], &d[b0..b1], &w[c0..c1], m)?)
            }
            _ => candle_core::bail!("incremental-layer: f32 or f64 only, all inputs alike"),
        };
        Ok((out, Shape::from(dims)))
    }
}
