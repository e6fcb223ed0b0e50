//! Robust aggregation: how a stage combines client updates when some clients may be wrong or
//! hostile. Coordinate-wise median and trimmed mean (Yin et al. 2018), and clipping of each
//! client's update norm relative to the global model, before any combination. For FedE every
//! rule applies per entity row, over the clients that hold the entity.
//!
//! Bounds: with `clip_norm = C`, one client moves the mean by at most `C * n_k / sum n`;
//! a coordinate-wise median or a trimmed mean that trims at least `f` values from each end is
//! unaffected in range by up to `f` hostile clients (it stays within the honest values).

use serde::{Deserialize, Serialize};

/// How the updates of a round are combined, coordinate by coordinate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// Example-weighted mean (FedAvg; FedE: the plain mean over holders).
    #[default]
    Mean,
    /// Coordinate-wise median (unweighted).
    Median,
    /// Coordinate-wise mean after dropping the `trim` fraction of values at each end
    /// (unweighted).
    TrimmedMean,
}

/// A stage's aggregation rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Robustness {
    pub combine: Combine,
    /// Fraction of values trimmed at each end by [`Combine::TrimmedMean`], in `[0, 0.5)`.
    pub trim: f64,
    /// Scale each client's update (its arrays minus the global model, or a FedE row minus the
    /// global row) down to at most this L2 norm before combining.
    pub clip_norm: Option<f64>,
    /// FedE: aggregate (and exchange) the rows of entities held by at least this many
    /// organisations; an entity fewer hold is trained at home and its row never leaves its
    /// holder. 1: every row travels, as in FedE. Must be 1 for other stages.
    pub min_holders: u32,
}

impl Default for Robustness {
    fn default() -> Self {
        Self {
            combine: Combine::Mean,
            trim: 0.1,
            clip_norm: None,
            min_holders: 1,
        }
    }
}

impl Robustness {
    /// Checks the values; the error names the key and value.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..0.5).contains(&self.trim) {
            return Err(format!(
                "aggregation.trim = {:?}: must be in [0, 0.5)",
                self.trim
            ));
        }
        if self.min_holders == 0 {
            return Err("aggregation.min_holders = 0: must be at least 1".into());
        }
        if let Some(c) = self.clip_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!(
                    "aggregation.clip_norm = {c:?}: must be a positive number"
                ));
            }
        }
        Ok(())
    }

    /// True for the plain weighted mean without clipping (the fast path).
    pub fn is_plain(&self) -> bool {
        self.combine == Combine::Mean && self.clip_norm.is_none()
    }

    /// Factor that brings `update` (given as its squared L2 norm) within `clip_norm`.
    pub fn clip_scale(&self, squared_norm: f64) -> f64 {
        match self.clip_norm {
            Some(c) if squared_norm > c * c => c / squared_norm.sqrt(),
            _ => 1.0,
        }
    }

    /// Combines one coordinate's `values` with their `weights` (used by the mean only).
    /// `values` is reordered.
    pub fn combine(&self, values: &mut [f64], weights: &[f64]) -> f64 {
        match self.combine {
            Combine::Mean => {
                let total: f64 = weights.iter().sum();
                if total > 0.0 {
                    values.iter().zip(weights).map(|(v, w)| v * w).sum::<f64>() / total
                } else {
                    values.iter().sum::<f64>() / values.len() as f64
                }
            }
            Combine::Median => {
                values.sort_by(f64::total_cmp);
                let n = values.len();
                if n % 2 == 1 {
                    values[n / 2]
                } else {
                    (values[n / 2 - 1] + values[n / 2]) / 2.0
                }
            }
            Combine::TrimmedMean => {
                values.sort_by(f64::total_cmp);
                let n = values.len();
                // Never trim everything away: at least one value remains.
                let k = ((self.trim * n as f64).floor() as usize).min((n - 1) / 2);
                let kept = &values[k..n - k];
                kept.iter().sum::<f64>() / kept.len() as f64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(combine: Combine) -> Robustness {
        Robustness {
            combine,
            trim: 0.25,
            ..Robustness::default()
        }
    }

    #[test]
    fn median_and_trimmed_mean_ignore_an_outlier() {
        let w = [1.0; 5];
        let mut v = [1.0, 2.0, 3.0, 4.0, 1e9];
        assert_eq!(rule(Combine::Median).combine(&mut v, &w), 3.0);
        let mut v = [1.0, 2.0, 3.0, 4.0, 1e9];
        // 25% of 5 values floors to 1 trimmed at each end: mean of 2, 3, 4.
        assert_eq!(rule(Combine::TrimmedMean).combine(&mut v, &w), 3.0);
        let mut v = [1.0, 3.0];
        assert_eq!(rule(Combine::Median).combine(&mut v, &[1.0, 1.0]), 2.0);
        let mut v = [1.0, 3.0];
        assert_eq!(rule(Combine::Mean).combine(&mut v, &[3.0, 1.0]), 1.5);
    }

    #[test]
    fn clipping_scales_long_updates_only() {
        let r = Robustness {
            clip_norm: Some(2.0),
            ..Robustness::default()
        };
        assert_eq!(r.clip_scale(1.0), 1.0);
        assert_eq!(r.clip_scale(16.0), 0.5);
        assert!(Robustness {
            trim: 0.5,
            ..Robustness::default()
        }
        .validate()
        .is_err());
        assert!(Robustness {
            clip_norm: Some(f64::INFINITY),
            ..Robustness::default()
        }
        .validate()
        .is_err());
    }
}
