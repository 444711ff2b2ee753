//! The crate's deterministic random numbers, public so that experiments can reproduce them.
//!
//! The orders of units, the probe subset, label corruption and the noise must be reproducible
//! across runs, platforms and crate versions (a resumed run has to make the same decisions), so
//! they come from fixed, documented generators rather than from a dependency whose streams may
//! change between releases. The examples and tests use the same [`SplitMix64`].
//!
//! ```
//! use candle_reliance::rng::{permutation, SplitMix64};
//!
//! let mut rng = SplitMix64::new(7);
//! let mut v = vec![1, 2, 3, 4];
//! rng.shuffle(&mut v);
//! assert_eq!(v.len(), 4);
//! assert_eq!(permutation(5, 3), permutation(5, 3)); // seeded: the same every time
//! ```

/// SplitMix64 finaliser: a strong 64-bit mixing function (Steele, Lea & Flood 2014).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seeds derived from a base seed and a stream number, so that e.g. order `r` of a run does not
/// depend on how many orders came before it.
#[inline]
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    mix64(seed ^ mix64(stream.wrapping_add(0x632B_E59B_D9B4_E019)))
}

/// A sequential SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose stream is a function of `seed` only.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let out = mix64(self.state);
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out
    }

    /// Uniform integer in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for the sizes
    /// used here, far under anything a curve could show).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Uniform float in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Shuffles `v` uniformly (Fisher–Yates with [`SplitMix64::below`]).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A uniformly random permutation of `0..n`, a function of `seed` only: the order in which
/// [`SplitMix64::shuffle`] leaves `0..n`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut p);
    p
}

/// Standard normal sample number `index` of stream `seed`, from a counter-based generator: the
/// value depends only on `(seed, index)`, so any element can be drawn in any order, on any device,
/// without generator state. Box–Muller on two 32-bit uniforms taken from one hash.
#[inline]
pub fn counter_normal(seed: u64, index: u64) -> f32 {
    let h = mix64(seed ^ mix64(index));
    // u1 in (0, 1] so that ln(u1) is finite; u2 in [0, 1).
    let u1 = ((h >> 40) as f32 + 1.0) * (1.0 / 16_777_216.0);
    let u2 = ((h & 0xFF_FFFF) as f32) * (1.0 / 16_777_216.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let p = permutation(100, 7);
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(p, permutation(100, 7));
        assert_ne!(p, permutation(100, 8));
    }

    #[test]
    fn counter_normal_has_unit_moments() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0f64, 0f64);
        for i in 0..n {
            let z = counter_normal(42, i) as f64;
            assert!(z.is_finite());
            s += z;
            s2 += z * z;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        // Standard error of the mean is 1/sqrt(n) ≈ 0.0022; of the variance ≈ 0.0032.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "var {var}");
    }

    #[test]
    fn uniform_and_below_stay_in_range() {
        let mut r = SplitMix64::new(1);
        let mut hits = [0usize; 5];
        for _ in 0..10_000 {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
            hits[r.below(5)] += 1;
        }
        // Each bucket expects 2000 with sd ≈ 40.
        assert!(hits.iter().all(|&h| (1800..2200).contains(&h)), "{hits:?}");
    }
}
