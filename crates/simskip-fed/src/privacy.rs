//! Differential privacy of what an organisation uploads: its update (the local model minus
//! the global one it received) is clipped to a norm bound and Gaussian noise is added, in the
//! organisation's own process, before anything leaves it.
//!
//! * FedAvg (SimSkip) stages: client-level DP. The whole update, all arrays as one vector, is
//!   clipped to L2 norm `clip_norm` (C), then noise N(0, sigma^2 C^2) is added per coordinate.
//! * FedE stages: each uploaded entity row's update is clipped to C on its own, then noised
//!   alike (the unit protected is one organisation's contribution to one entity's row).
//!
//! When the coordinator sees only the sum of the updates (secure aggregation), each of the n
//! organisations in the round adds noise of variance sigma^2 C^2 / n, so that the sum carries
//! the full N(0, sigma^2 C^2) (distributed DP); without it every upload carries the full
//! noise, since the coordinator sees each one.
//!
//! The coordinator owns the settings ([`DpConfig`]) and sends them with every task
//! ([`ClientDp`]); it charges every FIT round to a Rényi-DP accountant
//! ([`crate::accountant`]) and reports epsilon at the configured delta in the round records.

use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use simskip_data::NamedArray;

use crate::params::ParamsError;
use crate::types::{StageKind, ENTITIES};

/// A stage's DP settings, as configured (`[server.stages.privacy]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// Noise standard deviation in the aggregate, in units of `clip_norm`.
    pub noise_multiplier: f64,
    /// L2 bound of one update (FedAvg) or one entity row's update (FedE).
    pub clip_norm: f64,
    /// The delta at which epsilon is reported.
    #[serde(default = "DpConfig::default_delta")]
    pub delta: f64,
}

impl DpConfig {
    pub const DEFAULT_DELTA: f64 = 1e-5;

    fn default_delta() -> f64 {
        Self::DEFAULT_DELTA
    }

    /// Every value in range, or one error naming the key and the value.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(ParamsError::invalid(
                "privacy.noise_multiplier",
                self.noise_multiplier,
                "must be finite and above 0",
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(ParamsError::invalid(
                "privacy.clip_norm",
                self.clip_norm,
                "must be finite and above 0",
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(ParamsError::invalid(
                "privacy.delta",
                self.delta,
                "must be in (0, 1)",
            ));
        }
        Ok(())
    }

    /// What an organisation of a round of `selected` organisations is told to apply.
    /// `sum_only`: the coordinator sees only the round's sum (secure aggregation), so each
    /// organisation adds its share of the noise and the sum carries all of it.
    pub fn for_client(&self, sum_only: bool, selected: usize) -> ClientDp {
        ClientDp {
            noise_multiplier: self.noise_multiplier,
            clip_norm: self.clip_norm,
            noise_shares: if sum_only { selected.max(1) as u32 } else { 1 },
        }
    }
}

/// What an organisation applies to its upload of one task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientDp {
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    /// Into how many uploads the aggregate's noise is split (1: each upload carries it all).
    pub noise_shares: u32,
}

impl ClientDp {
    /// Every value in range (a received task is checked before it is used).
    pub fn validate(&self) -> Result<(), ParamsError> {
        DpConfig {
            noise_multiplier: self.noise_multiplier,
            clip_norm: self.clip_norm,
            delta: DpConfig::DEFAULT_DELTA,
        }
        .validate()?;
        if self.noise_shares == 0 {
            return Err(ParamsError::invalid(
                "privacy.noise_shares",
                0,
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The standard deviation of the noise this organisation adds per coordinate.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm / (self.noise_shares as f64).sqrt()
    }
}

/// What privatising an upload did, for the organisation's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Privatised {
    /// Updates (FedAvg: 1; FedE: rows) whose norm exceeded the bound.
    pub clipped: usize,
    /// Updates privatised.
    pub updates: usize,
    /// The largest update norm before clipping.
    pub max_norm: f64,
}

/// Scales `update` to L2 norm at most `bound`; returns its norm before.
pub fn clip_to_norm(update: &mut [f32], bound: f64) -> f64 {
    let norm = update
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    if norm > bound {
        let scale = (bound / norm) as f32;
        update.iter_mut().for_each(|v| *v *= scale);
    }
    norm
}

/// Adds N(0, std^2) to every coordinate.
pub fn add_gaussian_noise(values: &mut [f32], std: f64, rng: &mut impl Rng) {
    for v in values {
        let z: f64 = rng.sample(StandardNormal);
        *v = (*v as f64 + std * z) as f32;
    }
}

/// Client-level DP of a FedAvg upload: `local` (all arrays, flattened in order) becomes
/// `global + clip(local - global) + noise`. The arrays must have the same lengths.
pub fn privatise_update(
    global: &[&[f32]],
    local: &mut [&mut [f32]],
    dp: &ClientDp,
    rng: &mut impl Rng,
) -> Result<Privatised, ParamsError> {
    if global.len() != local.len()
        || global
            .iter()
            .zip(local.iter())
            .any(|(g, l)| g.len() != l.len())
    {
        return Err(ParamsError::Table(
            "the update and the global model differ in shape".into(),
        ));
    }
    let mut update: Vec<f32> = global
        .iter()
        .zip(local.iter())
        .flat_map(|(g, l)| l.iter().zip(g.iter()).map(|(l, g)| l - g))
        .collect();
    let norm = clip_to_norm(&mut update, dp.clip_norm);
    add_gaussian_noise(&mut update, dp.noise_std(), rng);
    let mut at = 0;
    for (g, l) in global.iter().zip(local.iter_mut()) {
        for (i, v) in l.iter_mut().enumerate() {
            *v = g[i] + update[at + i];
        }
        at += g.len();
    }
    Ok(Privatised {
        clipped: usize::from(norm > dp.clip_norm),
        updates: 1,
        max_norm: norm,
    })
}

/// FedE: each row of `local` (`dim` wide) becomes `global_row + clip(local_row - global_row)
/// + noise`, every row clipped on its own.
pub fn privatise_rows(
    global: &[f32],
    local: &mut [f32],
    dim: usize,
    dp: &ClientDp,
    rng: &mut impl Rng,
) -> Result<Privatised, ParamsError> {
    if dim == 0 || global.len() != local.len() || !local.len().is_multiple_of(dim) {
        return Err(ParamsError::Table(
            "the rows and the global rows differ in shape".into(),
        ));
    }
    let std = dp.noise_std();
    let mut out = Privatised {
        clipped: 0,
        updates: 0,
        max_norm: 0.0,
    };
    let mut update = vec![0f32; dim];
    for (g, l) in global.chunks_exact(dim).zip(local.chunks_exact_mut(dim)) {
        for ((u, l), g) in update.iter_mut().zip(l.iter()).zip(g) {
            *u = l - g;
        }
        let norm = clip_to_norm(&mut update, dp.clip_norm);
        add_gaussian_noise(&mut update, std, rng);
        for ((l, g), u) in l.iter_mut().zip(g).zip(&update) {
            *l = g + u;
        }
        out.updates += 1;
        out.clipped += usize::from(norm > dp.clip_norm);
        out.max_norm = out.max_norm.max(norm);
    }
    Ok(out)
}

/// Privatises a FIT upload in place: `received` is what the task carried (the global model,
/// or the FedE rows the upload sends back, same rows in the same order), `upload` what the
/// organisation is about to send. FedE stages clip and noise each row of [`ENTITIES`];
/// FedAvg stages the whole update, every array matched to the received one by name.
pub fn privatise_upload(
    kind: StageKind,
    dp: &ClientDp,
    received: &[NamedArray],
    upload: &mut [NamedArray],
    rng: &mut impl Rng,
) -> Result<Privatised, ParamsError> {
    let shape = |m: String| ParamsError::Table(format!("differential privacy: {m}"));
    match kind {
        StageKind::FedE => {
            let (Some(g), Some(l)) = (
                received.iter().find(|a| a.name == ENTITIES),
                upload.iter_mut().find(|a| a.name == ENTITIES),
            ) else {
                return Err(shape(format!("no '{ENTITIES}' array to privatise")));
            };
            if g.shape != l.shape || l.shape.len() != 2 {
                return Err(shape(format!(
                    "rows of shape {:?} for received rows of shape {:?}",
                    l.shape, g.shape
                )));
            }
            privatise_rows(&g.data, &mut l.data, l.shape[1], dp, rng)
        }
        StageKind::FedAvg => {
            let mut globals = Vec::with_capacity(upload.len());
            for l in upload.iter() {
                let Some(g) = received.iter().find(|g| g.name == l.name) else {
                    return Err(shape(format!(
                        "no global array {:?} to measure the update against",
                        l.name
                    )));
                };
                globals.push(g.data.as_slice());
            }
            let mut locals: Vec<&mut [f32]> =
                upload.iter_mut().map(|l| l.data.as_mut_slice()).collect();
            privatise_update(&globals, &mut locals, dp, rng)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
    }

    fn dp(noise_multiplier: f64, clip_norm: f64) -> ClientDp {
        ClientDp {
            noise_multiplier,
            clip_norm,
            noise_shares: 1,
        }
    }

    #[test]
    fn clipping_bounds_the_update_norm_exactly_and_keeps_small_updates() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for bound in [0.1, 1.0, 3.5] {
            let mut v: Vec<f32> = (0..1000).map(|_| rng.random_range(-1.0..1.0)).collect();
            let before = clip_to_norm(&mut v, bound);
            assert!(before > bound);
            assert!((norm(&v) - bound).abs() < 1e-5 * bound, "{}", norm(&v));
        }
        let mut small = [0.1f32, -0.2, 0.05];
        let copy = small;
        clip_to_norm(&mut small, 1.0);
        assert_eq!(small, copy);
    }

    #[test]
    fn a_noiseless_privatised_update_is_the_clipped_update_on_the_global_model() {
        // A tiny noise multiplier leaves (almost) only the clipping to see.
        let d = dp(1e-9, 0.5);
        let g1 = [1.0f32; 6];
        let g2 = [-2.0f32; 4];
        let mut l1: Vec<f32> = (0..6).map(|i| 1.0 + i as f32).collect();
        let mut l2: Vec<f32> = (0..4).map(|i| -2.0 - i as f32).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let p = privatise_update(&[&g1, &g2], &mut [&mut l1, &mut l2], &d, &mut rng).unwrap();
        assert_eq!((p.clipped, p.updates), (1, 1));
        let delta: Vec<f32> = l1
            .iter()
            .zip(&g1)
            .chain(l2.iter().zip(&g2))
            .map(|(l, g)| l - g)
            .collect();
        assert!((norm(&delta) - 0.5).abs() < 1e-5, "{}", norm(&delta));
        // Rows are clipped one by one.
        let global = [0f32; 3 * 4];
        let mut rows: Vec<f32> = (0..12).map(|i| i as f32).collect();
        // The first row's update is within the bound: it is left as it is.
        rows[..4].copy_from_slice(&[0.1, 0.0, 0.0, 0.0]);
        let p = privatise_rows(&global, &mut rows, 4, &d, &mut rng).unwrap();
        assert_eq!((p.clipped, p.updates), (2, 3));
        for r in rows.chunks_exact(4).skip(1) {
            assert!((norm(r) - 0.5).abs() < 1e-5, "{}", norm(r));
        }
        assert!((rows[0] - 0.1).abs() < 1e-6 && rows[1].abs() < 1e-6);
        assert!(privatise_rows(&global, &mut rows[..8], 4, &d, &mut rng).is_err());
    }

    /// The sample variance of the noise is sigma^2 C^2 / shares, within 3 standard errors of
    /// the variance estimate (fixed seed).
    #[test]
    fn the_noise_has_the_stated_variance_whole_and_split() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
        let n = 200_000;
        for (sigma, c, shares) in [(1.0, 1.0, 1), (0.8, 2.5, 1), (1.2, 1.0, 5)] {
            let d = ClientDp {
                noise_multiplier: sigma,
                clip_norm: c,
                noise_shares: shares,
            };
            let global = vec![0f32; n];
            let mut local = vec![0f32; n];
            privatise_update(&[&global], &mut [&mut local], &d, &mut rng).unwrap();
            let mean = local.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = local
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / (n - 1) as f64;
            let want = sigma * sigma * c * c / shares as f64;
            // Var of a sample variance of normals: 2 sigma^4 / (n - 1).
            let se = want * (2.0 / (n - 1) as f64).sqrt();
            assert!((var - want).abs() < 3.0 * se, "{var} vs {want}");
            assert!(mean.abs() < 3.0 * (want / n as f64).sqrt(), "{mean}");
        }
        // Split across 5 organisations, the sum of their noise has the full variance.
        let d = ClientDp {
            noise_multiplier: 1.0,
            clip_norm: 2.0,
            noise_shares: 5,
        };
        let m = 50_000;
        let mut sum = vec![0f64; m];
        for _ in 0..5 {
            let global = vec![0f32; m];
            let mut local = vec![0f32; m];
            privatise_update(&[&global], &mut [&mut local], &d, &mut rng).unwrap();
            sum.iter_mut()
                .zip(&local)
                .for_each(|(s, &v)| *s += v as f64);
        }
        let var = sum.iter().map(|v| v * v).sum::<f64>() / m as f64;
        let se = 4.0 * (2.0 / m as f64).sqrt();
        assert!((var - 4.0).abs() < 3.0 * se, "{var}");
    }

    #[test]
    fn bad_settings_name_the_key_and_value() {
        let bad = [
            (
                DpConfig {
                    noise_multiplier: 0.0,
                    clip_norm: 1.0,
                    delta: 1e-5,
                },
                "privacy.noise_multiplier = 0",
            ),
            (
                DpConfig {
                    noise_multiplier: 1.0,
                    clip_norm: f64::NAN,
                    delta: 1e-5,
                },
                "privacy.clip_norm = NaN",
            ),
            (
                DpConfig {
                    noise_multiplier: 1.0,
                    clip_norm: 1.0,
                    delta: 1.0,
                },
                "privacy.delta = 1",
            ),
        ];
        for (cfg, want) in bad {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert_eq!(e.lines().count(), 1);
        }
        let mut d = dp(1.0, 1.0);
        d.noise_shares = 0;
        assert!(d.validate().is_err());
        let ok = DpConfig {
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            delta: 1e-5,
        };
        assert_eq!(ok.for_client(true, 4).noise_shares, 4);
        assert_eq!(ok.for_client(false, 4).noise_shares, 1);
    }
}
