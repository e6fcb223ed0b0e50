//! Fixed-point encoding of example-weighted updates in the ring of integers mod 2^64.
//!
//! A client with `n` examples and update `x` encodes each coordinate as the two's-complement
//! `round(n * x * 2^frac_bits)` and appends `n` itself, so the masked sum carries the weighted
//! sum and the total example count and nothing else. Wrapping u64 addition is the ring's
//! addition; masks are uniform u64s, so a masked value is uniform whatever it hides.
//!
//! Precision and range (both stated, both checked):
//! * each coordinate of a client's `n * x` is rounded to the nearest multiple of
//!   `2^-frac_bits`, so the decoded weighted sum over `k` clients is off by at most
//!   `k * 2^-(frac_bits + 1)` per coordinate, and the weighted mean by that over the total
//!   example count ([`FixedPoint::mean_error_bound`]);
//! * a client refuses to encode a coordinate with `|n * x| >= 2^(63 - frac_bits) / clients`,
//!   so the sum of all clients stays inside the signed range and never wraps.

/// Encoding precision: the number of fractional bits of every coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedPoint {
    frac_bits: u32,
}

/// The smallest and largest precision accepted (see [`FixedPoint::new`]).
pub const FRAC_BITS_RANGE: std::ops::RangeInclusive<u32> = 8..=40;

/// Why an update could not be encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("coordinate {index} is not finite ({value})")]
    NotFinite { index: usize, value: f64 },
    #[error(
        "coordinate {index}: |examples * value| = {magnitude} is at or beyond the range \
         {limit} allowed for {clients} clients at {frac_bits} fractional bits"
    )]
    OutOfRange {
        index: usize,
        magnitude: f64,
        limit: f64,
        clients: usize,
        frac_bits: u32,
    },
}

impl FixedPoint {
    /// `frac_bits` must be in [`FRAC_BITS_RANGE`] (checked by the configuration).
    pub fn new(frac_bits: u32) -> Option<Self> {
        FRAC_BITS_RANGE
            .contains(&frac_bits)
            .then_some(FixedPoint { frac_bits })
    }

    pub fn frac_bits(self) -> u32 {
        self.frac_bits
    }

    fn scale(self) -> f64 {
        (self.frac_bits as f64).exp2()
    }

    /// The largest `|examples * value|` a client may encode when `clients` take part.
    pub fn limit(self, clients: usize) -> f64 {
        (63.0 - self.frac_bits as f64).exp2() / clients.max(1) as f64
    }

    /// Encodes `examples * values`, then `examples`, as ring elements.
    pub fn encode_weighted(
        self,
        values: &[f32],
        examples: u64,
        clients: usize,
    ) -> Result<Vec<u64>, EncodeError> {
        let limit = self.limit(clients);
        let scale = self.scale();
        let mut out = Vec::with_capacity(values.len() + 1);
        for (index, &v) in values.iter().enumerate() {
            let weighted = examples as f64 * v as f64;
            if !weighted.is_finite() {
                return Err(EncodeError::NotFinite {
                    index,
                    value: v as f64,
                });
            }
            if weighted.abs() >= limit {
                return Err(EncodeError::OutOfRange {
                    index,
                    magnitude: weighted.abs(),
                    limit,
                    clients,
                    frac_bits: self.frac_bits,
                });
            }
            out.push((weighted * scale).round() as i64 as u64);
        }
        out.push(examples);
        Ok(out)
    }

    /// Decodes an unmasked sum: the weighted sum of every coordinate and the total examples.
    pub fn decode_sum(self, sum: &[u64]) -> (Vec<f64>, u64) {
        let Some((&total, coords)) = sum.split_last() else {
            return (Vec::new(), 0);
        };
        let scale = self.scale();
        let weighted = coords.iter().map(|&c| c as i64 as f64 / scale).collect();
        (weighted, total)
    }

    /// Largest error of a decoded weighted mean over `clients` clients and `total_examples`.
    pub fn mean_error_bound(self, clients: usize, total_examples: u64) -> f64 {
        clients as f64 * (-(self.frac_bits as f64) - 1.0).exp2() / total_examples.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_within_half_a_step_and_negative_values_survive_the_ring() {
        let fp = FixedPoint::new(20).unwrap();
        let values = [0.5f32, -1.25, 3.0e-7, -7.0e3];
        let enc = fp.encode_weighted(&values, 3, 4).unwrap();
        assert_eq!(enc.last(), Some(&3));
        let (dec, total) = fp.decode_sum(&enc);
        assert_eq!(total, 3);
        for (d, v) in dec.iter().zip(values) {
            assert!((d - 3.0 * v as f64).abs() <= 2f64.powi(-21), "{d} vs {v}");
        }
    }

    #[test]
    fn values_beyond_the_stated_range_are_refused() {
        let fp = FixedPoint::new(40).unwrap();
        // 2^23 / 2 clients = 2^22 is the limit; 1000 examples * 5000 = 5e6 > 4.19e6.
        let err = fp.encode_weighted(&[5000.0], 1000, 2).unwrap_err();
        assert!(matches!(err, EncodeError::OutOfRange { index: 0, .. }));
        assert!(fp.encode_weighted(&[4000.0], 1000, 2).is_ok());
        assert!(matches!(
            fp.encode_weighted(&[f32::NAN], 1, 1),
            Err(EncodeError::NotFinite { .. })
        ));
    }

    #[test]
    fn precision_outside_its_range_is_refused() {
        assert!(FixedPoint::new(7).is_none());
        assert!(FixedPoint::new(41).is_none());
        assert!(FixedPoint::new(24).is_some());
    }
}
