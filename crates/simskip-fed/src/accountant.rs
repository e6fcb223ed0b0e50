//! A Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism: what a run of noisy
//! rounds has spent, as (epsilon, delta).
//!
//! The computation is the one of Mironov, Talwar and Zhang, "Rényi Differential Privacy of the
//! Sampled Gaussian Mechanism" (2019), as Google's `dp-accounting` (the TensorFlow Privacy
//! accountant) and Opacus implement it: `log A_alpha` summed exactly for integer orders and by
//! the two-sided erfc series for fractional ones (Sec. 3.3 of arXiv:1908.10530), RDP adding up
//! over rounds, and the conversion to (epsilon, delta) of Balle et al. 2020 (Prop. 12 of
//! arXiv:2004.00010) minimised over the same default orders. The tests compare it with that
//! library's outputs (`scripts/dp_reference.py` regenerates them).
//!
//! In a federation a "step" is a FIT round, the sampled units are organisations, `q` is the
//! fraction of them selected per round, and the noise multiplier is the ratio of the noise's
//! standard deviation in the aggregate to the clip norm.

/// The orders at which RDP is tracked: dp-accounting's `DEFAULT_RDP_ORDERS`.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + x as f64 / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// A setting the accountant cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountantError {
    #[error("sampling rate {0} not in [0, 1]")]
    SamplingRate(f64),
    #[error("noise multiplier {0} must be finite and non-negative")]
    NoiseMultiplier(f64),
    #[error("delta {0} not in (0, 1)")]
    Delta(f64),
    #[error("target epsilon {0} must be finite and positive")]
    TargetEpsilon(f64),
    #[error("no noise multiplier up to {max} reaches epsilon {epsilon} in {steps} steps at q = {q}, delta = {delta}")]
    Unreachable {
        epsilon: f64,
        steps: u64,
        q: f64,
        delta: f64,
        max: f64,
    },
}

/// RDP spent so far, one value per order (composition is addition).
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl RdpAccountant {
    /// Nothing spent, tracked at `orders` (each above 1).
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Charges `steps` rounds of the Gaussian mechanism with noise multiplier `sigma`, each
    /// applied to a Poisson sample of rate `q`.
    pub fn compose_subsampled_gaussian(
        &mut self,
        q: f64,
        sigma: f64,
        steps: u64,
    ) -> Result<(), AccountantError> {
        let one = rdp_poisson_subsampled_gaussian(q, sigma, &self.orders)?;
        for (total, r) in self.rdp.iter_mut().zip(one) {
            *total += steps as f64 * r;
        }
        Ok(())
    }

    /// The smallest epsilon over the orders at `delta`, and that order.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), AccountantError> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// Epsilon at `delta` after `steps` rounds at rate `q` with noise multiplier `sigma`.
pub fn epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> Result<f64, AccountantError> {
    let mut acc = RdpAccountant::default();
    acc.compose_subsampled_gaussian(q, sigma, steps)?;
    Ok(acc.epsilon(delta)?.0)
}

/// The smallest noise multiplier (to 0.1 % relative) whose `steps` rounds at rate `q` spend at
/// most `target` epsilon at `delta`: how a run picks its noise for a privacy budget.
pub fn noise_multiplier_for(
    target: f64,
    q: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, AccountantError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(AccountantError::TargetEpsilon(target));
    }
    const MAX: f64 = 1e4;
    let spends = |sigma: f64| epsilon(q, sigma, steps, delta);
    if spends(MAX)? > target {
        return Err(AccountantError::Unreachable {
            epsilon: target,
            steps,
            q,
            delta,
            max: MAX,
        });
    }
    // Epsilon falls as sigma grows: bisect on a log scale.
    let (mut lo, mut hi) = (1e-3_f64, MAX);
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if spends(mid)? > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

/// RDP of one round of the Poisson-subsampled Gaussian mechanism at each order.
pub fn rdp_poisson_subsampled_gaussian(
    q: f64,
    sigma: f64,
    orders: &[f64],
) -> Result<Vec<f64>, AccountantError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(AccountantError::SamplingRate(q));
    }
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(AccountantError::NoiseMultiplier(sigma));
    }
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if alpha.is_infinite() || sigma == 0.0 {
                f64::INFINITY
            } else if q == 1.0 {
                alpha / (2.0 * sigma * sigma)
            } else if alpha.fract() == 0.0 {
                log_a_int(q, sigma, alpha as u64) / (alpha - 1.0)
            } else {
                log_a_frac(q, sigma, alpha) / (alpha - 1.0)
            }
        })
        .collect())
}

/// The (epsilon, order) minimising Balle et al.'s conversion over the orders.
pub fn epsilon_from_rdp(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<(f64, f64), AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(f64::NAN));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            // Negative: numerical noise; tiny: the KL bound already gives (0, delta).
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log |binomial(n, k)| for real n.
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log(erfc(x)), accurate in the far tail where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        return r.ln();
    }
    // The asymptotic series of erfc at infinity (dp-accounting's fallback).
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
        - 37.0 / 24.0 * x.powi(-6)
        + 353.0 / 64.0 * x.powi(-8)
}

/// log(A_alpha) for an integer order, 0 < q < 1: the binomial expansion, summed exactly.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log1mq = (-q).ln_1p();
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (i, a) = (i as f64, alpha as f64);
        let log_coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        log_a = log_add(log_a, log_coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// Terms of the fractional-order series tried before the order is given up (as
/// dp-accounting does: it then contributes no bound).
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

/// log(A_alpha) for a fractional order, 0 < q < 1: the integrals over (-inf, z0] and
/// [z0, inf) as two series, stopped once both terms fall and are negligible.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let sqrt2 = std::f64::consts::SQRT_2;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5_f64.ln() + log_erfc((i - z0) / (sqrt2 * sigma));
        let log_e1 = 0.5_f64.ln() + log_erfc((z0 - j) / (sqrt2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (q, sigma, steps, delta, epsilon) from Google's dp-accounting 0.6.0's `RdpAccountant`
    /// (`scripts/dp_reference.py` prints these rows). The second row is TensorFlow Privacy's
    /// MNIST tutorial setting (batch 256 of 60,000, sigma 1.1, 60 epochs).
    const REFERENCE: &[(f64, f64, u64, f64, f64)] = &[
        (0.01, 1.1, 1000, 1e-05, 1.7117701662429012),
        (0.004266666666666667, 1.1, 14062, 1e-05, 2.5965558697943036),
        (1.0, 1.0, 10, 1e-05, 19.05359753163139),
        (1.0, 4.0, 50, 1e-06, 10.089443168745937),
        (0.3, 0.8, 50, 1e-06, 27.039034071840916),
        (0.05, 2.0, 100, 1e-05, 1.2221959852171929),
        (0.5, 5.0, 20, 1e-05, 2.020675299512856),
        (0.001, 0.7, 10000, 1e-06, 2.4730399056428074),
        (0.6666666666666666, 1.5, 30, 1e-05, 15.297046605766024),
    ];

    /// Equal to two significant digits.
    fn same_2_digits(a: f64, b: f64) -> bool {
        let scale = 10f64.powf(b.abs().log10().floor() - 1.0);
        (a / scale).round() == (b / scale).round()
    }

    #[test]
    fn epsilons_match_dp_accounting_to_two_significant_digits() {
        for &(q, sigma, steps, delta, want) in REFERENCE {
            let got = epsilon(q, sigma, steps, delta).unwrap();
            assert!(
                same_2_digits(got, want),
                "q={q} sigma={sigma} steps={steps} delta={delta}: {got} vs {want}"
            );
            // Much closer than that in fact: the same computation.
            assert!((got - want).abs() / want < 1e-3, "{got} vs {want}");
        }
    }

    #[test]
    fn composition_adds_up_and_more_noise_spends_less() {
        let mut a = RdpAccountant::default();
        for _ in 0..10 {
            a.compose_subsampled_gaussian(0.05, 2.0, 10).unwrap();
        }
        let (eps, _) = a.epsilon(1e-5).unwrap();
        assert!((eps - epsilon(0.05, 2.0, 100, 1e-5).unwrap()).abs() < 1e-9);
        assert!(epsilon(0.05, 3.0, 100, 1e-5).unwrap() < eps);
        assert!(epsilon(0.02, 2.0, 100, 1e-5).unwrap() < eps);
        assert_eq!(epsilon(0.0, 2.0, 100, 1e-5).unwrap(), 0.0);
        assert_eq!(epsilon(0.5, 0.0, 1, 1e-5).unwrap(), f64::INFINITY);
    }

    #[test]
    fn the_noise_for_a_budget_spends_it() {
        for target in [8.0, 4.0, 1.0] {
            let sigma = noise_multiplier_for(target, 1.0, 20, 1e-5).unwrap();
            let spent = epsilon(1.0, sigma, 20, 1e-5).unwrap();
            assert!(spent <= target && spent > 0.99 * target, "{sigma}: {spent}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        assert_eq!(
            epsilon(1.5, 1.0, 1, 1e-5).unwrap_err(),
            AccountantError::SamplingRate(1.5)
        );
        assert!(epsilon(0.5, -1.0, 1, 1e-5).is_err());
        assert_eq!(
            epsilon(0.5, 1.0, 1, 0.0).unwrap_err(),
            AccountantError::Delta(0.0)
        );
        assert!(noise_multiplier_for(0.0, 0.5, 10, 1e-5).is_err());
    }
}
