//! Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^61 - 1).
//!
//! This is protocol arithmetic on plain integers, not a cipher: a secret is cut into five
//! limbs of at most 7 bytes (56 bits < 61 bits), and each limb is the constant term of its own
//! random polynomial of degree `threshold - 1`. A share is the evaluation of the five
//! polynomials at the holder's x coordinate. Any `threshold` shares give the secret back by
//! Lagrange interpolation at 0; fewer say nothing about it (every limb value stays equally
//! likely), because the coefficients are drawn uniformly from the whole field.

use rand::{CryptoRng, Rng};

/// The field's modulus, the Mersenne prime 2^61 - 1.
pub const PRIME: u64 = (1 << 61) - 1;
/// Limbs per 32-byte secret.
pub const LIMBS: usize = 5;
const LIMB_BYTES: usize = 7;

/// One holder's share of one secret: the polynomials' values at `x` (never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub x: u64,
    pub y: [u64; LIMBS],
}

/// Why shares could not be combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    #[error("{got} shares given, {threshold} needed")]
    TooFewShares { got: usize, threshold: usize },
    #[error("two shares at the same point x = {0}")]
    DuplicatePoint(u64),
    #[error("share point x = {0} is outside the field or 0")]
    BadPoint(u64),
    #[error("share value {0} is outside the field")]
    BadValue(u64),
    #[error("the shares do not combine into a 32-byte secret")]
    NotASecret,
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b; // both < 2^61: no overflow
    if s >= PRIME {
        s - PRIME
    } else {
        s
    }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b {
        a - b
    } else {
        a + PRIME - b
    }
}

fn mul(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) % PRIME as u128) as u64
}

fn pow(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// The multiplicative inverse of a non-zero element (Fermat: a^(p-2)).
fn inv(a: u64) -> u64 {
    pow(a, PRIME - 2)
}

fn limbs_of(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut limbs = [0u64; LIMBS];
    for (i, chunk) in secret.chunks(LIMB_BYTES).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        limbs[i] = u64::from_le_bytes(b);
    }
    limbs
}

fn secret_of(limbs: &[u64; LIMBS]) -> Result<[u8; 32], ShamirError> {
    let mut secret = [0u8; 32];
    for (i, chunk) in secret.chunks_mut(LIMB_BYTES).enumerate() {
        let bytes = limbs[i].to_le_bytes();
        // A limb holds at most 7 bytes (4 for the last): anything above means the shares did
        // not come from one sharing.
        if bytes[chunk.len()..].iter().any(|&b| b != 0) {
            return Err(ShamirError::NotASecret);
        }
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    Ok(secret)
}

/// Splits `secret` into one share per point of `xs` (distinct, non-zero), any `threshold` of
/// which recover it.
pub fn split<R: CryptoRng>(
    secret: &[u8; 32],
    threshold: usize,
    xs: &[u64],
    rng: &mut R,
) -> Vec<Share> {
    debug_assert!(threshold >= 1 && threshold <= xs.len());
    let limbs = limbs_of(secret);
    // coefficients[limb][k]: the k-th coefficient of the limb's polynomial; k = 0 is the limb.
    let coefficients: Vec<Vec<u64>> = limbs
        .iter()
        .map(|&limb| {
            let mut c = Vec::with_capacity(threshold);
            c.push(limb);
            c.extend((1..threshold).map(|_| rng.random_range(0..PRIME)));
            c
        })
        .collect();
    xs.iter()
        .map(|&x| {
            let mut y = [0u64; LIMBS];
            for (yl, c) in y.iter_mut().zip(&coefficients) {
                // Horner.
                *yl = c.iter().rev().fold(0, |acc, &ck| add(mul(acc, x), ck));
            }
            Share { x, y }
        })
        .collect()
}

/// Recovers the secret from at least `threshold` shares (the first `threshold` are used).
pub fn combine(shares: &[Share], threshold: usize) -> Result<[u8; 32], ShamirError> {
    if shares.len() < threshold || threshold == 0 {
        return Err(ShamirError::TooFewShares {
            got: shares.len(),
            threshold,
        });
    }
    let used = &shares[..threshold];
    for (i, s) in used.iter().enumerate() {
        if s.x == 0 || s.x >= PRIME {
            return Err(ShamirError::BadPoint(s.x));
        }
        if let Some(&bad) = s.y.iter().find(|&&v| v >= PRIME) {
            return Err(ShamirError::BadValue(bad));
        }
        if used[..i].iter().any(|o| o.x == s.x) {
            return Err(ShamirError::DuplicatePoint(s.x));
        }
    }
    let mut limbs = [0u64; LIMBS];
    for (j, sj) in used.iter().enumerate() {
        // Lagrange basis at 0: prod_{m != j} x_m / (x_m - x_j).
        let mut num = 1;
        let mut den = 1;
        for (m, sm) in used.iter().enumerate() {
            if m != j {
                num = mul(num, sm.x);
                den = mul(den, sub(sm.x, sj.x));
            }
        }
        let basis = mul(num, inv(den));
        for (l, limb) in limbs.iter_mut().enumerate() {
            *limb = add(*limb, mul(sj.y[l], basis));
        }
    }
    secret_of(&limbs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn secret(rng: &mut StdRng) -> [u8; 32] {
        let mut s = [0u8; 32];
        rng.fill(&mut s);
        s
    }

    #[test]
    fn any_threshold_subset_recovers_the_secret() {
        let mut rng = StdRng::seed_from_u64(7);
        let s = secret(&mut rng);
        let xs: Vec<u64> = (1..=5).collect();
        let shares = split(&s, 3, &xs, &mut rng);
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let subset = [shares[a], shares[b], shares[c]];
                    assert_eq!(combine(&subset, 3).unwrap(), s, "subset {a}{b}{c}");
                }
            }
        }
    }

    #[test]
    fn fewer_than_threshold_shares_are_refused_and_do_not_interpolate_the_secret() {
        let mut rng = StdRng::seed_from_u64(8);
        let s = secret(&mut rng);
        let shares = split(&s, 3, &[1, 2, 3, 4], &mut rng);
        assert_eq!(
            combine(&shares[..2], 3),
            Err(ShamirError::TooFewShares {
                got: 2,
                threshold: 3
            })
        );
        // Interpolating two shares of a degree-2 polynomial as if it were degree 1 gives some
        // other value, not the secret.
        assert_ne!(combine(&shares[..2], 2).ok(), Some(s));
    }

    #[test]
    fn malformed_shares_are_refused() {
        let mut rng = StdRng::seed_from_u64(9);
        let s = secret(&mut rng);
        let shares = split(&s, 2, &[1, 2], &mut rng);
        assert_eq!(
            combine(&[shares[0], shares[0]], 2),
            Err(ShamirError::DuplicatePoint(1))
        );
        let mut bad = shares[1];
        bad.y[0] = PRIME;
        assert_eq!(
            combine(&[shares[0], bad], 2),
            Err(ShamirError::BadValue(PRIME))
        );
    }

    #[test]
    fn field_inverse_is_an_inverse() {
        for a in [1u64, 2, 3, 12345, PRIME - 1, 1 << 60] {
            assert_eq!(mul(a, inv(a)), 1);
        }
    }
}
