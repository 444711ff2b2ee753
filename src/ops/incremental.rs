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

/// What the op applies to each variant's output: ReLU, and after a convolution a `k × k`
/// max-pool with stride `k` over each output channel (as candle's `max_pool2d(k)`; ReLU and
/// max-pooling commute, so their order does not matter). A convolution's outputs are computed
/// in a per-thread scratch, one sample of every variant (later variants start from their base's
/// pre-activations there), and only the tail's result is written out; a dense layer's rows are
/// rectified in place once no later variant starts from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Tail {
    pub relu: bool,
    /// The pool's kernel and stride (`None`: no pool; convolutions only).
    pub pool: Option<usize>,
}

impl Tail {
    fn is_identity(&self) -> bool {
        !self.relu && self.pool.is_none()
    }

    /// ReLU as candle's `max(v, 0)`: a NaN becomes 0. A plain comparison, which vectorizes
    /// (a `partial_cmp` form did not).
    #[inline]
    fn relu<T: WithDType>(v: T) -> T {
        let zero = T::zero();
        if v > zero {
            v
        } else {
            zero
        }
    }

    /// ReLU in place.
    fn rectify<T: WithDType>(values: &mut [T]) {
        values.iter_mut().for_each(|v| *v = Self::relu(*v));
    }

    /// Pooled output `(height, width)` of an `(h, w)` map, as candle's `max_pool2d`.
    pub fn pooled(k: usize, (h, w): (usize, usize)) -> Option<(usize, usize)> {
        (k >= 1 && h >= k && w >= k).then(|| ((h - k) / k + 1, (w - k) / k + 1))
    }

    /// Writes the tail of `pre` (one sample's output: `channels` maps of `hw`) to `out`.
    fn apply<T: WithDType>(&self, pre: &[T], channels: usize, hw: (usize, usize), out: &mut [T]) {
        // candle's max: the window's first value, then each later value larger than it.
        let mx = |a: T, b: T| if a < b { b } else { a };
        let relu = self.relu;
        let finish = |v: T| if relu { Self::relu(v) } else { v };
        let Some(k) = self.pool else {
            out.iter_mut().zip(pre).for_each(|(o, &v)| *o = finish(v));
            return;
        };
        let (h, w) = hw;
        let Some((ph, pw)) = Self::pooled(k, hw) else {
            return;
        };
        let planes = pre.chunks_exact(h * w).zip(out.chunks_exact_mut(ph * pw));
        for (plane, dst) in planes.take(channels) {
            for (oy, line) in dst.chunks_exact_mut(pw).enumerate() {
                let rows = &plane[oy * k * w..(oy * k + k) * w];
                if k == 2 {
                    // The common 2 × 2 pool, in candle's order: top pair, then bottom pair.
                    let (top, bottom) = rows.split_at(w);
                    let pairs = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                    for (o, (t, b)) in line.iter_mut().zip(pairs) {
                        *o = finish(mx(mx(mx(t[0], t[1]), b[0]), b[1]));
                    }
                    continue;
                }
                for (ox, o) in line.iter_mut().enumerate() {
                    let mut largest = rows[ox * k];
                    for row in rows.chunks_exact(w) {
                        largest = row[ox * k..ox * k + k]
                            .iter()
                            .fold(largest, |a, &b| mx(a, b));
                    }
                    *o = finish(largest);
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
/// output, or as the [`Tail`] leaves it.
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
    /// Applied to each variant's output (the identity: none).
    pub tail: Tail,
}

/// The op's output while the sample blocks write it in parallel: a raw pointer to `variants ·
/// m · q_out` values, where block `[start, start + rows)` writes only rows `start..start + rows`
/// of every variant (with a tail, through a scratch of its own). Its methods are the only places
/// that dereference the pointer.
struct Rows<T> {
    ptr: *mut T,
    /// Samples per variant.
    m: usize,
    /// Values per sample of the layer's output (`q`) and of the op's, after the tail (`q_out`).
    q: usize,
    q_out: usize,
}

// SAFETY: the blocks that share `Rows` write disjoint sample ranges (see the type's docs), so
// sending and sharing the pointer between the threads of one parallel loop is sound.
unsafe impl<T: Send> Send for Rows<T> {}
unsafe impl<T: Send> Sync for Rows<T> {}

impl<T: WithDType> Rows<T> {
    /// Copies variant `v`'s base rows `start..start + rows` (`unclamped`: those rows of the
    /// unclamped output) to where its own rows are computed, and returns that place: its rows of
    /// the output, or with `pre` (one sample), its slot there (a scratch holding one sample of
    /// every variant).
    ///
    /// # Safety
    /// `start + rows ≤ m`; no other thread touches rows `start..start + rows` of any variant;
    /// `bases[v]`, if any, is an earlier variant whose same rows (or slot of `pre`) this caller
    /// has already computed; `unclamped` addresses `rows · q` values; `pre` holds `variants · q`.
    unsafe fn start(
        &self,
        bases: &[Option<usize>],
        v: usize,
        (start, rows): (usize, usize),
        unclamped: *const T,
        pre: Option<&mut [T]>,
    ) -> *mut T {
        // Variant `w`'s place is `w · stride + offset` values in.
        let (scratch, stride, offset) = match pre {
            None => (self.ptr, self.m * self.q, start * self.q),
            Some(p) => (p.as_mut_ptr(), self.q, 0),
        };
        let row = |w: usize| w * stride + offset;
        // SAFETY: by the contract, `row(v)` and `row(b)` start `rows · q` values inside the
        // output (or `pre`), in rows only this caller writes, and the base's were written.
        unsafe {
            let dst = scratch.add(row(v));
            let src = match bases[v] {
                Some(b) => scratch.add(row(b)) as *const T,
                None => unclamped,
            };
            std::ptr::copy_nonoverlapping(src, dst, rows * self.q);
            dst
        }
    }

    /// Variant `w`'s rows `start..start + rows` of the output.
    ///
    /// # Safety
    /// As for [`Rows::start`]: the rows exist and only the caller's thread touches them.
    #[allow(clippy::mut_from_ref)]
    unsafe fn variant_rows(&self, w: usize, start: usize, rows: usize) -> &mut [T] {
        // SAFETY: in bounds and exclusive by the contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.add((w * self.m + start) * self.q),
                rows * self.q,
            )
        }
    }

    /// Sample `s` of variant `v` after the tail, in the output.
    ///
    /// # Safety
    /// `s < m`, and only the caller's thread touches sample `s`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn tail_out(&self, v: usize, s: usize) -> &mut [T] {
        // SAFETY: in bounds and exclusive by the contract.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add((v * self.m + s) * self.q_out), self.q_out)
        }
    }
}

/// The fewest sample rows per dense block: below that the product's packing dominates.
const DENSE_BLOCK: usize = 8;

/// Where each variant's newly clamped inputs start among the weights, how many there are in
/// all, and the most of one variant.
struct Added {
    first: Vec<usize>,
    total: usize,
    widest: usize,
}

impl Added {
    fn of(added: &[Vec<u32>]) -> Self {
        let mut first = Vec::with_capacity(added.len());
        let mut total = 0usize;
        for a in added {
            first.push(total);
            total += a.len();
        }
        let widest = added.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            first,
            total,
            widest,
        }
    }
}

impl IncrementalCpu<'_> {
    /// Every variant's output for `m` samples: the unclamped output (or a convolution's weight and
    /// bias, `first_in`), the removed inputs `d` and the added inputs' weights.
    fn run<T: WithDType>(
        &self,
        first_in: &[T],
        d: &[T],
        weights: &[T],
        m: usize,
    ) -> Result<Vec<T>> {
        let (q, q_out) = self.row_lengths()?;
        let len = self.bases.len() * m * q_out;
        let added = Added::of(self.added);
        let mut out: Vec<T> = Vec::with_capacity(len);
        let rows = Rows {
            ptr: out.as_mut_ptr(),
            m,
            q,
            q_out,
        };
        match self.shape {
            LayerShape::Dense { inputs, outputs } => {
                self.dense(&rows, &added, (inputs, outputs), first_in, d, weights)?
            }
            LayerShape::Conv(c) => self.conv(&rows, &added, &c, first_in, d, weights)?,
        }
        // SAFETY: `dense` and `conv` wrote all `len` values: each variant's rows by its base copy,
        // or with a tail, by the tail.
        unsafe { out.set_len(len) };
        Ok(out)
    }

    /// Variants after which each variant's rows are final: a ReLU tail rectifies variant `w`'s
    /// rows in place, in cache, once the last variant that starts from them (`released[v]` lists
    /// the `w` that variant `v` is the last user of).
    fn released(&self) -> Vec<Vec<usize>> {
        let variants = self.bases.len();
        let mut last: Vec<usize> = (0..variants).collect();
        for (v, b) in self.bases.iter().enumerate() {
            if let Some(b) = *b {
                last[b] = last[b].max(v);
            }
        }
        let mut released = vec![vec![]; variants];
        for (w, &v) in last.iter().enumerate() {
            released[v].push(w);
        }
        released
    }

    /// A dense layer: blocks of samples in parallel, each variant's rows its base's minus the
    /// product of its newly clamped inputs with their weight rows.
    fn dense<T: WithDType>(
        &self,
        out: &Rows<T>,
        added: &Added,
        (inputs, outputs): (usize, usize),
        unclamped: &[T],
        d: &[T],
        weights: &[T],
    ) -> Result<()> {
        let (variants, m, q) = (self.bases.len(), out.m, out.q);
        if weights.len() != added.total * outputs
            || d.len() != m * inputs
            || unclamped.len() != m * outputs
        {
            candle_core::bail!("incremental dense layer: inconsistent sizes");
        }
        // One block per thread, in whole multiples of 8 rows (the kernel's height is a multiple
        // of 8), so that the threads get even shares.
        let threads = rayon::current_num_threads().max(1);
        let block = m.div_ceil(threads).next_multiple_of(8).max(DENSE_BLOCK);
        let blocks: Vec<usize> = (0..m).step_by(block).collect();
        // (`row_lengths` refused a pool: a dense tail is a ReLU.)
        let released = match self.tail.is_identity() {
            true => vec![vec![]; variants],
            false => self.released(),
        };
        let minus_one = T::from_f64(-1.0);
        blocks.into_par_iter().for_each_init(
            || vec![T::zero(); block * added.widest],
            |lhs, start| {
                let rows = block.min(m - start);
                for v in 0..variants {
                    let rows_in = unclamped[start * q..].as_ptr();
                    // SAFETY: this block alone owns samples `start..start + rows`, and variants
                    // run in order, so the base's rows are done; `rows_in` holds `rows · q`.
                    let dst = unsafe { out.start(self.bases, v, (start, rows), rows_in, None) };
                    let cols = &self.added[v];
                    let k = cols.len();
                    if k > 0 {
                        for r in 0..rows {
                            let src = &d[(start + r) * inputs..(start + r + 1) * inputs];
                            let row = &mut lhs[r * k..(r + 1) * k];
                            row.iter_mut()
                                .zip(cols)
                                .for_each(|(o, &c)| *o = src[c as usize]);
                        }
                        // dst (rows × outputs) −= lhs (rows × k) · w (k × outputs)
                        let w = &weights[added.first[v] * outputs..];
                        // SAFETY: `dst` is this block's `rows × outputs` of variant `v`, `lhs`
                        // holds `rows × k` and `w` at least `k × outputs`; none overlap.
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
                    for &w in &released[v] {
                        // SAFETY: variant `w`'s rows of this block, finished (no later variant
                        // starts from them) and touched by no other thread.
                        Tail::rectify(unsafe { out.variant_rows(w, start, rows) });
                    }
                }
            },
        );
        Ok(())
    }

    /// A convolution: samples in parallel, each building its patch matrix once; a variant's
    /// output is its base's minus the weights of its newly clamped channels times their patches.
    fn conv<T: WithDType>(
        &self,
        out: &Rows<T>,
        added: &Added,
        c: &ConvShape,
        first_in: &[T],
        d: &[T],
        weights: &[T],
    ) -> Result<()> {
        let (variants, m, q) = (self.bases.len(), out.m, out.q);
        let (oh, ow) = c.out_hw();
        let (kk, positions) = (c.kh * c.kw, oh * ow);
        let per_in = c.channels * c.height * c.width;
        // The weight's rows, each followed by its output's bias.
        let (full, ck) = (first_in, c.channels * kk);
        let first_len = match self.conv_from_weight {
            true => c.outputs * (ck + 1),
            false => m * q,
        };
        if weights.len() != c.outputs * added.total * kk
            || d.len() != m * per_in
            || first_in.len() != first_len
        {
            candle_core::bail!("incremental convolution: inconsistent sizes");
        }
        let tail = (!self.tail.is_identity()).then_some(self.tail);
        let scratch = if tail.is_some() { variants * q } else { 0 };
        let minus_one = T::from_f64(-1.0);
        (0..m).into_par_iter().for_each_init(
            || {
                (
                    vec![T::zero(); ck * positions],
                    vec![T::zero(); added.widest * kk * positions],
                    vec![T::zero(); q],
                    vec![T::zero(); scratch],
                )
            },
            |(patches, rhs, unclamped, pre), s| {
                c.patches(&d[s * per_in..(s + 1) * per_in], patches);
                let unclamped = if self.conv_from_weight {
                    // Bias, plus weight · patches (the patches of the activation itself).
                    for (o, row) in unclamped.chunks_mut(positions).enumerate() {
                        row.fill(full[o * (ck + 1) + ck]);
                    }
                    // SAFETY: `unclamped` is `outputs × positions`, `full` `outputs` rows of
                    // `ck + 1` and `patches` `ck × positions`; all this thread's own buffers.
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
                    let pre = tail.is_some().then_some(&mut pre[..]);
                    // SAFETY: sample `s` is this thread's alone, variants run in order (the
                    // base's sample is done), `unclamped` holds `q` values, `pre` `variants · q`.
                    let dst = unsafe { out.start(self.bases, v, (s, 1), unclamped, pre) };
                    let units = &self.added[v];
                    if !units.is_empty() {
                        let block = kk * positions;
                        for (j, &u) in units.iter().enumerate() {
                            let u = u as usize;
                            rhs[j * block..(j + 1) * block]
                                .copy_from_slice(&patches[u * block..(u + 1) * block]);
                        }
                        let k = units.len() * kk;
                        // dst (outputs × positions) −= w (outputs × k) · rhs (k × positions);
                        // the weights of all variants share rows of `total · kk` values.
                        let w = &weights[added.first[v] * kk..];
                        // SAFETY: `dst` is sample `s` of variant `v` (`outputs × positions`),
                        // `w` `outputs` rows of stride `total · kk` holding `k` each, `rhs`
                        // `k × positions`; `dst` overlaps neither.
                        unsafe {
                            add_product(
                                (c.outputs, positions, k),
                                (dst, positions),
                                (w.as_ptr(), added.total * kk),
                                (rhs.as_ptr(), positions),
                                minus_one,
                            )
                        };
                    }
                    if let Some(tail) = tail {
                        // SAFETY: `dst` is variant `v`'s slot of `pre`, `q` values this thread
                        // just wrote; sample `s` of the output is this thread's alone.
                        let (pre, done) =
                            unsafe { (std::slice::from_raw_parts(dst, q), out.tail_out(v, s)) };
                        tail.apply(pre, c.outputs, c.out_hw(), done);
                    }
                }
            },
        );
        Ok(())
    }

    /// Values per sample of the layer's output and of the op's (after the tail).
    fn row_lengths(&self) -> Result<(usize, usize)> {
        match self.shape {
            LayerShape::Dense { outputs, .. } if self.tail.pool.is_none() => Ok((outputs, outputs)),
            LayerShape::Dense { .. } => {
                candle_core::bail!("incremental-layer: a pool needs a feature map")
            }
            LayerShape::Conv(c) => {
                let (h, w) = self.conv_out_hw(&c)?;
                Ok((c.out_len(), c.outputs * h * w))
            }
        }
    }

    /// A convolution's output map `(height, width)` after the tail.
    fn conv_out_hw(&self, c: &ConvShape) -> Result<(usize, usize)> {
        match self.tail.pool {
            None => Ok(c.out_hw()),
            Some(k) => Tail::pooled(k, c.out_hw()).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "incremental-layer: pool kernel {k} larger than the output {:?}",
                    c.out_hw()
                ))
            }),
        }
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
                let (oh, ow) = self.conv_out_hw(&c)?;
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

#[cfg(test)]
mod tests {
    use super::Tail;

    #[test]
    fn tail_hand_worked() {
        // One 3 × 5 map: a 2 × 2 pool keeps rows 0–1 and columns 0–3 (candle floors).
        let map = [
            1f32, -2.0, 3.0, 0.5, 9.0, //
            -4.0, -1.0, -6.0, -7.0, 9.0, //
            8.0, 8.0, 8.0, 8.0, 8.0,
        ];
        let mut out = [f32::NAN; 2];
        let pool = Tail {
            relu: false,
            pool: Some(2),
        };
        pool.apply(&map, 1, (3, 5), &mut out);
        assert_eq!(out, [1.0, 3.0]);
        // Two channels of 2 × 2, all negative in the second: ReLU then pool gives 0 there.
        let maps = [1f32, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0];
        let relu_pool = Tail {
            relu: true,
            pool: Some(2),
        };
        relu_pool.apply(&maps, 2, (2, 2), &mut out);
        assert_eq!(out, [4.0, 0.0]);
        // A 3 × 3 window (the general path) over 3 × 4: one output, the last column dropped.
        let map = [
            0f32, 1.0, 2.0, 99.0, 3.0, 7.0, 5.0, 99.0, 6.0, -7.0, 8.0, 99.0,
        ];
        let mut one = [f32::NAN; 1];
        Tail {
            relu: false,
            pool: Some(3),
        }
        .apply(&map, 1, (3, 4), &mut one);
        assert_eq!(one, [8.0]);
        // ReLU alone, element by element.
        let mut row = [f32::NAN; 3];
        Tail {
            relu: true,
            pool: None,
        }
        .apply(&[-1.0, 0.0, 2.5], 1, (1, 3), &mut row);
        assert_eq!(row, [0.0, 0.0, 2.5]);
        assert_eq!(Tail::pooled(2, (7, 8)), Some((3, 4)));
        assert_eq!(Tail::pooled(3, (2, 8)), None);
        assert_eq!(Tail::pooled(0, (2, 8)), None);
    }
}
