//! Augmentations of embedding vectors (paper §3.3): random masking and Gaussian noise.
//!
//! * **Mask**: each coordinate is zeroed independently with probability `mask_prob` (α, the
//!   paper masks 20%); the mask vector `M ∈ {0,1}^d` has i.i.d. Bernoulli(1 − α) entries and the
//!   output is `e ∘ M`.
//! * **Noise**: `e + δ·ε` with `ε ~ N(0, I)`. The paper states the noise has "mean 0 and
//!   variance 0.13"; we read 0.13 as the **variance** of the added noise, so the configured
//!   `noise_var` (default 0.13) gives `δ = sqrt(noise_var) ≈ 0.3606` (standard deviation).
//! * **Both**: mask first, then add noise.
//!
//! Implemented on plain `f32` slices with a seeded [`StdRng`]; the trainer turns a whole batch
//! into one tensor afterwards.

use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Which augmentation produces the views.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augmentation {
    /// Zero each coordinate with probability `mask_prob`.
    Mask,
    /// Add Gaussian noise of variance `noise_var`.
    Noise,
    /// Mask, then add noise.
    Both,
}

/// An augmentation with its parameters, applied in place to row-major data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augmenter {
    pub kind: Augmentation,
    /// Probability α that a coordinate is zeroed.
    pub mask_prob: f32,
    /// Variance of the added Gaussian noise (δ² in the paper's `e + δ·ε`).
    pub noise_var: f32,
}

impl Augmenter {
    pub fn new(kind: Augmentation, mask_prob: f32, noise_var: f32) -> Self {
        Self {
            kind,
            mask_prob,
            noise_var,
        }
    }

    /// Standard deviation δ of the added noise: `sqrt(noise_var)`.
    pub fn noise_std(&self) -> f32 {
        self.noise_var.max(0.0).sqrt()
    }

    /// Augment `data` in place (any length; coordinates are independent).
    pub fn apply(&self, data: &mut [f32], rng: &mut StdRng) {
        match self.kind {
            Augmentation::Mask => mask_in_place(data, self.mask_prob, rng),
            Augmentation::Noise => noise_in_place(data, self.noise_std(), rng),
            Augmentation::Both => {
                mask_in_place(data, self.mask_prob, rng);
                noise_in_place(data, self.noise_std(), rng);
            }
        }
    }
}

/// Zero each element independently with probability `p` (clamped to [0, 1]).
pub fn mask_in_place(data: &mut [f32], p: f32, rng: &mut StdRng) {
    if p <= 0.0 {
        return;
    }
    if p >= 1.0 {
        data.fill(0.0);
        return;
    }
    // u < p·2^32 with u uniform on the u32 range has probability p (to within 2^-32).
    let threshold = (p as f64 * 4_294_967_296.0) as u64;
    let mut chunks = data.chunks_exact_mut(2);
    for pair in &mut chunks {
        let r: u64 = rng.random();
        if (r & 0xffff_ffff) < threshold {
            pair[0] = 0.0;
        }
        if (r >> 32) < threshold {
            pair[1] = 0.0;
        }
    }
    for v in chunks.into_remainder() {
        let r: u32 = rng.random();
        if (r as u64) < threshold {
            *v = 0.0;
        }
    }
}

/// Add `std · ε`, `ε ~ N(0, 1)` i.i.d., to each element.
pub fn noise_in_place(data: &mut [f32], std: f32, rng: &mut StdRng) {
    if std == 0.0 {
        return;
    }
    for v in data.iter_mut() {
        let e: f32 = StandardNormal.sample(rng);
        *v += std * e;
    }
}

/// Inverted-dropout mask: each entry is `0` with probability `p`, else `1 / (1 − p)`.
pub fn dropout_mask(len: usize, p: f32, rng: &mut StdRng) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    let mut out = vec![keep; len];
    mask_in_place(&mut out, p, rng);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn base(n: usize) -> Vec<f32> {
        // Non-zero values so that zeros can only come from the mask.
        (0..n).map(|i| 1.0 + (i % 7) as f32).collect()
    }

    #[test]
    fn mask_fraction_matches_alpha() {
        let mut rng = StdRng::seed_from_u64(1);
        for &alpha in &[0.2f32, 0.5, 0.05] {
            let mut v = base(200_001);
            Augmenter::new(Augmentation::Mask, alpha, 0.13).apply(&mut v, &mut rng);
            let frac = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
            assert!(
                (frac - alpha as f64).abs() < 0.01,
                "alpha {alpha}: masked {frac}"
            );
            // Unmasked values untouched.
            let orig = base(200_001);
            assert!(v.iter().zip(&orig).all(|(a, b)| *a == 0.0 || a == b));
        }
    }

    #[test]
    fn noise_has_configured_variance() {
        let mut rng = StdRng::seed_from_u64(2);
        let orig = base(200_000);
        let mut v = orig.clone();
        let aug = Augmenter::new(Augmentation::Noise, 0.2, 0.13);
        assert!((aug.noise_std() - 0.13f32.sqrt()).abs() < 1e-7);
        aug.apply(&mut v, &mut rng);
        let d: Vec<f64> = v.iter().zip(&orig).map(|(a, b)| (*a - *b) as f64).collect();
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        let var = d.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (d.len() - 1) as f64;
        assert!(mean.abs() < 0.005, "noise mean {mean}");
        assert!((var - 0.13).abs() < 0.01, "noise variance {var}");
    }

    #[test]
    fn both_masks_then_adds_noise() {
        let mut rng = StdRng::seed_from_u64(3);
        let orig = vec![5.0f32; 200_000];
        let mut v = orig.clone();
        Augmenter::new(Augmentation::Both, 0.2, 0.13).apply(&mut v, &mut rng);
        // Masked coordinates are pure noise around 0, kept ones noise around 5.
        let near_zero = v.iter().filter(|&&x| x.abs() < 2.5).count() as f64 / v.len() as f64;
        assert!((near_zero - 0.2).abs() < 0.01, "{near_zero}");
        assert!(v.iter().all(|&x| x != 0.0 && x != 5.0));
    }

    #[test]
    fn same_seed_same_augmentation() {
        let aug = Augmenter::new(Augmentation::Both, 0.2, 0.13);
        let mut a = base(1001);
        let mut b = base(1001);
        aug.apply(&mut a, &mut StdRng::seed_from_u64(9));
        aug.apply(&mut b, &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b);
    }

    #[test]
    fn dropout_mask_values() {
        let mut rng = StdRng::seed_from_u64(4);
        let m = dropout_mask(100_000, 0.1, &mut rng);
        let zeros = m.iter().filter(|&&x| x == 0.0).count() as f64 / 1e5;
        assert!((zeros - 0.1).abs() < 0.01);
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.9).abs() < 1e-6));
    }
}
