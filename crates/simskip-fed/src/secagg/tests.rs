use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const CONTEXT: &[u8] = b"run-test/stage-1/round-3";

fn settings(threshold: usize) -> SecAggSettings {
    SecAggSettings {
        threshold,
        fixed_point: FixedPoint::new(24).unwrap(),
    }
}

/// `clients` random updates of `dim` values in [-2, 2) with 1..5000 examples each.
fn updates(clients: usize, dim: usize, rng: &mut StdRng) -> Vec<(Vec<f32>, u64)> {
    (0..clients)
        .map(|_| {
            let x = (0..dim).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            (x, rng.random_range(1..5000))
        })
        .collect()
}

/// The plain example-weighted mean of the clients not in `dropped`, and their examples.
fn plain_mean(updates: &[(Vec<f32>, u64)], dropped: &[ClientId]) -> (Vec<f64>, u64) {
    let dim = updates[0].0.len();
    let mut sum = vec![0f64; dim];
    let mut total = 0;
    for (id, (x, n)) in updates.iter().enumerate() {
        if dropped.contains(&(id as ClientId)) {
            continue;
        }
        total += n;
        for (s, v) in sum.iter_mut().zip(x) {
            *s += *n as f64 * *v as f64;
        }
    }
    (sum.iter().map(|s| s / total as f64).collect(), total)
}

fn assert_matches_plain(updates: &[(Vec<f32>, u64)], dropped: &[ClientId], threshold: usize) {
    let mut rng = StdRng::seed_from_u64(42);
    let s = settings(threshold);
    let out = aggregate_in_process(s, CONTEXT, updates, dropped, &mut rng).unwrap();
    let (want, total) = plain_mean(updates, dropped);
    assert_eq!(out.total_examples, total);
    let expected_survivors: Vec<ClientId> = (0..updates.len() as ClientId)
        .filter(|c| !dropped.contains(c))
        .collect();
    assert_eq!(out.survivors, expected_survivors);
    // The fixed-point bound, plus f64 rounding of the plain sum (far below it).
    let bound = s.fixed_point.mean_error_bound(out.survivors.len(), total) + 1e-12;
    for (i, (got, want)) in out.mean().iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() <= bound,
            "coordinate {i}: {got} vs {want} (bound {bound})"
        );
    }
}

#[test]
fn the_unmasked_sum_is_the_plain_weighted_sum_within_the_fixed_point_bound() {
    let mut rng = StdRng::seed_from_u64(1);
    assert_matches_plain(&updates(3, 128, &mut rng), &[], 2);
    assert_matches_plain(&updates(10, 128, &mut rng), &[], 6);
}

#[test]
fn one_of_three_dropping_after_masking_still_gives_the_survivors_sum() {
    let mut rng = StdRng::seed_from_u64(2);
    let u = updates(3, 128, &mut rng);
    for dropped in 0..3 {
        assert_matches_plain(&u, &[dropped], 2);
    }
}

#[test]
fn two_of_five_dropping_after_masking_still_gives_the_survivors_sum() {
    let mut rng = StdRng::seed_from_u64(3);
    let u = updates(5, 128, &mut rng);
    assert_matches_plain(&u, &[1, 3], 3);
    assert_matches_plain(&u, &[0, 4], 3);
}

#[test]
fn more_dropouts_than_the_threshold_allows_fail_instead_of_giving_a_wrong_sum() {
    let mut rng = StdRng::seed_from_u64(4);
    let u = updates(5, 16, &mut rng);
    let err = aggregate_in_process(settings(3), CONTEXT, &u, &[0, 1, 2], &mut rng).unwrap_err();
    assert_eq!(
        err,
        SecAggError::TooFewClients {
            got: 2,
            threshold: 3
        }
    );
}

/// `clients` protocol clients (ids 0, 1, ...) whose keys a new coordinator of updates of
/// `dim` values has received.
fn advertised(
    clients: usize,
    s: SecAggSettings,
    dim: usize,
    rng: &mut StdRng,
) -> (Coordinator, Vec<SecAggClient>) {
    let mut coordinator = Coordinator::new(s, CONTEXT, dim);
    let mut cs = Vec::new();
    for id in 0..clients as ClientId {
        let (c, keys) = SecAggClient::new(id, s, CONTEXT, rng);
        coordinator.on_keys(keys).unwrap();
        cs.push(c);
    }
    (coordinator, cs)
}

/// Every client sends its sealed shares through the coordinator, which closes that step.
fn share_all(coordinator: &mut Coordinator, clients: &mut [SecAggClient], rng: &mut StdRng) {
    let roster = coordinator.roster().unwrap();
    for c in clients {
        let sealed = c.share_keys(&roster, rng).unwrap();
        coordinator.on_shares(c.id(), sealed).unwrap();
    }
    coordinator.close_shares().unwrap();
}

/// Drives an aggregation up to the coordinator's unmask request by hand.
struct Setup {
    coordinator: Coordinator,
    clients: Vec<SecAggClient>,
    masked: Vec<MaskedInput>,
}

fn setup(clients: usize, threshold: usize, dim: usize, seed: u64) -> Setup {
    let mut rng = StdRng::seed_from_u64(seed);
    let u = updates(clients, dim, &mut rng);
    let (mut coordinator, mut cs) = advertised(clients, settings(threshold), dim, &mut rng);
    share_all(&mut coordinator, &mut cs, &mut rng);
    let masked = cs
        .iter_mut()
        .zip(&u)
        .map(|(c, (x, n))| c.masked_input(&coordinator.inbox(c.id()), x, *n).unwrap())
        .collect();
    Setup {
        coordinator,
        clients: cs,
        masked,
    }
}

#[test]
fn a_survivor_that_does_not_answer_the_unmask_step_is_not_needed_beyond_the_threshold() {
    let mut s = setup(4, 2, 8, 5);
    for m in s.masked.drain(..) {
        s.coordinator.on_masked_input(m).unwrap();
    }
    let request = s.coordinator.unmask_request().unwrap();
    let answer = s.clients[0].unmask(&request).unwrap();
    s.coordinator.on_unmask_response(answer).unwrap();
    assert!(!s.coordinator.can_finish());
    assert!(matches!(
        s.coordinator.finish(),
        Err(SecAggError::TooFewClients {
            got: 1,
            threshold: 2
        })
    ));
    let answer = s.clients[2].unmask(&request).unwrap();
    s.coordinator.on_unmask_response(answer).unwrap();
    assert!(s.coordinator.can_finish());
    assert_eq!(s.coordinator.finish().unwrap().survivors, vec![0, 1, 2, 3]);
}

/// Pearson's chi-square of the byte frequencies of `values` against the uniform law.
fn byte_chi_square(values: &[u64]) -> f64 {
    let mut counts = [0u64; 256];
    for v in values {
        for b in v.to_le_bytes() {
            counts[b as usize] += 1;
        }
    }
    let expected = (values.len() * 8) as f64 / 256.0;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

/// The 0.999 quantile of chi-square with 255 degrees of freedom (Wilson-Hilferty: 330.5):
/// a uniform source exceeds it with probability 0.001 (significance 0.1%).
const CHI_SQUARE_255_999: f64 = 330.5;

#[test]
fn the_coordinators_view_of_one_clients_masked_update_is_uniformly_random() {
    // A maximally regular update (every coordinate the same) over 4,095 coordinates: 32,768
    // bytes, 128 expected per byte value. Fixed seed, significance 0.1%.
    let dim = 4095;
    let mut rng = StdRng::seed_from_u64(6);
    let s = settings(2);
    let (mut coordinator, mut clients) = advertised(3, s, dim, &mut rng);
    share_all(&mut coordinator, &mut clients, &mut rng);
    let update = vec![0.25f32; dim];
    let inbox = coordinator.inbox(0);
    let masked = clients[0].masked_input(&inbox, &update, 100).unwrap();

    let chi = byte_chi_square(&masked.values);
    assert!(
        chi < CHI_SQUARE_255_999,
        "masked bytes chi-square {chi} >= {CHI_SQUARE_255_999}"
    );
    // The same test on the unmasked encoding rejects it by far: the test has power.
    let plain = s.fixed_point.encode_weighted(&update, 100, 3).unwrap();
    assert!(byte_chi_square(&plain) > 100.0 * CHI_SQUARE_255_999);

    // And bit by bit: each of the 64 bit positions is set in about half the coordinates
    // (binomial, 4,096 draws: 5 standard deviations is 160).
    for bit in 0..64 {
        let ones = masked
            .values
            .iter()
            .filter(|v| (*v >> bit) & 1 == 1)
            .count() as f64;
        let half = masked.values.len() as f64 / 2.0;
        assert!(
            (ones - half).abs() < 160.0,
            "bit {bit}: {ones} of {}",
            2.0 * half
        );
    }
}

#[test]
fn honest_clients_refuse_to_reveal_both_shares_of_one_client() {
    let mut s = setup(3, 2, 8, 7);
    for m in s.masked.drain(..) {
        s.coordinator.on_masked_input(m).unwrap();
    }
    // A curious coordinator names client 1 both survivor (to get its self-mask seed) and
    // dropped (to get its mask key): with both it could strip client 1's masks.
    let both = UnmaskRequest {
        survivors: vec![0, 1, 2],
        dropped: vec![1],
    };
    for c in &mut s.clients {
        assert_eq!(
            c.unmask(&both),
            Err(SecAggError::RefusedUnmask(
                "a client is named both survivor and dropped"
            ))
        );
    }
    // Or asks in two steps: the self-mask share first, then the key share in a second
    // request. The second is refused.
    let first = UnmaskRequest {
        survivors: vec![0, 1, 2],
        dropped: vec![],
    };
    let second = UnmaskRequest {
        survivors: vec![0, 2],
        dropped: vec![1],
    };
    assert!(s.clients[0].unmask(&first).is_ok());
    assert_eq!(
        s.clients[0].unmask(&second),
        Err(SecAggError::RefusedUnmask("already answered"))
    );
    // Naming too few survivors, or leaving a client out, is refused as well.
    let few = UnmaskRequest {
        survivors: vec![2],
        dropped: vec![0, 1],
    };
    assert_eq!(
        s.clients[2].unmask(&few),
        Err(SecAggError::RefusedUnmask(
            "fewer survivors than the threshold"
        ))
    );
    let partial = UnmaskRequest {
        survivors: vec![1, 2],
        dropped: vec![],
    };
    assert_eq!(
        s.clients[1].unmask(&partial),
        Err(SecAggError::RefusedUnmask(
            "leaves out a client that shared keys"
        ))
    );
}

#[test]
fn sealed_shares_that_were_tampered_with_or_misrouted_do_not_open() {
    let mut rng = StdRng::seed_from_u64(8);
    let (mut coordinator, mut clients) = advertised(3, settings(2), 4, &mut rng);
    let roster = coordinator.roster().unwrap();
    let mut sealed = Vec::new();
    for c in &mut clients {
        sealed.push(c.share_keys(&roster, &mut rng).unwrap());
    }
    // Client 0's set for client 1, with one bit flipped by the relay.
    let mut tampered = sealed[0].iter().find(|s| s.to == 1).unwrap().clone();
    tampered.ciphertext[3] ^= 1;
    let err = clients[1]
        .masked_input(&[tampered], &[0.0; 4], 1)
        .unwrap_err();
    assert!(matches!(
        err,
        SecAggError::BadShares {
            why: "authentication failed",
            ..
        }
    ));
    // Client 0's set for client 2, relabelled as if it were for client 1.
    let mut relabelled = sealed[0].iter().find(|s| s.to == 2).unwrap().clone();
    relabelled.to = 1;
    let err = clients[1]
        .masked_input(&[relabelled], &[0.0; 4], 1)
        .unwrap_err();
    assert!(matches!(
        err,
        SecAggError::BadShares {
            why: "authentication failed",
            ..
        }
    ));
    // The coordinator refuses a set claiming another sender.
    let err = coordinator.on_shares(1, sealed[0].clone()).unwrap_err();
    assert!(matches!(err, SecAggError::BadShares { .. }));
}

#[test]
fn a_roster_that_swaps_a_clients_keys_or_is_below_the_threshold_is_refused() {
    let mut rng = StdRng::seed_from_u64(9);
    let s = settings(2);
    let (mut a, ka) = SecAggClient::new(0, s, CONTEXT, &mut rng);
    let (_b, kb) = SecAggClient::new(1, s, CONTEXT, &mut rng);
    let (_c, kc) = SecAggClient::new(2, s, CONTEXT, &mut rng);
    assert_eq!(
        a.share_keys(&[ka], &mut rng),
        Err(SecAggError::Threshold {
            threshold: 2,
            clients: 1
        })
    );
    let mut swapped = ka;
    swapped.mask_public = kc.mask_public;
    assert_eq!(
        a.share_keys(&[swapped, kb], &mut rng),
        Err(SecAggError::BadRoster("lists other keys for this client"))
    );
    assert_eq!(
        a.share_keys(&[ka, kb, AdvertisedKeys { client: 2, ..kb }], &mut rng),
        Err(SecAggError::BadRoster("repeats a public key"))
    );
}
