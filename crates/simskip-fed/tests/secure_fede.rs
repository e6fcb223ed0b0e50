//! FedE's per-entity secure sums, the whole protocol in process (no network, no clock): the
//! coordinator's [`SecureFit`] and each organisation's [`ClientRound`] exchange every step's
//! messages, and the FedE strategy takes the unmasked sum. The new table must equal plain
//! FedE's aggregation of the surviving organisations' rows within the fixed-point bound, when
//! nobody drops, when 1 of 3 drops after masking, and when 2 of 5 do; and what the
//! coordinator receives from one organisation must look uniformly random.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::NamedArray;
use simskip_fed::secagg::{self, ClientRound, SecAggReply, SecureAggregation, SecureFit};
use simskip_fed::types::{ClientInfo, ClientResult};
use simskip_fed::{FedEStrategy, Strategy, ENTITIES};

const DIM: usize = 8;
const ENTITY_NAMES: usize = 240;

/// `orgs` organisations, each holding a seeded ~60% of the entity names (so some entities
/// have one holder, most several), registered with a FedE strategy that exchanges rows of
/// entities held by at least two.
fn federation(orgs: usize, seed: u64) -> (FedEStrategy, Vec<ClientInfo>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut strategy = FedEStrategy::new(DIM, 0.5, seed).with_min_holders(2);
    let clients: Vec<ClientInfo> = (0..orgs)
        .map(|o| {
            let keys: Vec<String> = (0..ENTITY_NAMES)
                .filter(|_| rng.random_bool(0.6))
                .map(|e| format!("e{e}"))
                .collect();
            ClientInfo {
                name: format!("org-{o}"),
                session: format!("s{o}"),
                num_examples: 10 + o as u64,
                entity_keys: Arc::new(keys),
            }
        })
        .collect();
    for c in &clients {
        strategy.on_client_registered(c).unwrap();
    }
    strategy.on_round_start();
    (strategy, clients)
}

/// Each organisation's FIT result: the rows its task carried, moved by its own noise.
fn trained_rows(strategy: &FedEStrategy, clients: &[ClientInfo], seed: u64) -> Vec<NamedArray> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    clients
        .iter()
        .map(|c| {
            let mut rows = strategy.payload(c).unwrap().to_arrays().unwrap().remove(0);
            for v in rows.data.iter_mut() {
                *v += rng.random_range(-3.0f32..3.0);
            }
            rows
        })
        .collect()
}

/// Runs one secure round; organisations in `drop` stop after sharing their keys (their
/// masked input never arrives). Returns the coordinator's view of organisation 0's masked
/// input and the strategy after the unmasked sum.
fn secure_round(
    mut strategy: FedEStrategy,
    clients: &[ClientInfo],
    updates: &[NamedArray],
    drop: &BTreeSet<usize>,
) -> (Vec<u64>, FedEStrategy) {
    let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    let rows: BTreeMap<String, secagg::SecureRows> = clients
        .iter()
        .map(|c| (c.name.clone(), strategy.secure_rows(c).unwrap()))
        .collect();
    let context = secagg::context("secure-fede", 0, 1);
    let len = strategy.secure_len().unwrap();
    let mut fit =
        SecureFit::new(&SecureAggregation::default(), &context, len, &names, &rows).unwrap();
    let mut parties: Vec<ClientRound> = Vec::new();
    for (c, update) in clients.iter().zip(updates) {
        let layout = vec![(ENTITIES.to_string(), update.shape.clone())];
        let (state, keys) = ClientRound::begin(
            fit.ask(&c.name).unwrap(),
            &context,
            &layout,
            std::slice::from_ref(update),
            c.num_examples,
        )
        .unwrap();
        fit.on_reply(&c.name, keys).unwrap();
        parties.push(state);
    }
    let mut seen = Vec::new();
    for step in ["shares", "masked", "unmask"] {
        assert!(fit.advance().unwrap(), "the protocol goes on to {step}");
        for (i, c) in clients.iter().enumerate() {
            let Some(ask) = fit.ask(&c.name).cloned() else {
                continue;
            };
            let reply = parties[i].step(&ask).unwrap();
            if let SecAggReply::Masked(m) = &reply {
                if i == 0 {
                    seen = m.values.clone();
                }
                if drop.contains(&i) {
                    continue;
                }
            }
            fit.on_reply(&c.name, reply).unwrap();
        }
    }
    assert!(!fit.advance().unwrap(), "unmasked");
    let sum = fit.finish().unwrap();
    let survivors: BTreeSet<String> = sum.survivors.iter().cloned().collect();
    let expected: BTreeSet<String> = (0..clients.len())
        .filter(|i| !drop.contains(i))
        .map(|i| names[i].clone())
        .collect();
    assert_eq!(survivors, expected);
    strategy.aggregate_secure(sum).unwrap();
    (seen, strategy)
}

/// Plain FedE over the survivors' results.
fn plain_round(
    mut strategy: FedEStrategy,
    clients: &[ClientInfo],
    updates: &[NamedArray],
    drop: &BTreeSet<usize>,
) -> FedEStrategy {
    let results = clients
        .iter()
        .zip(updates)
        .enumerate()
        .filter(|(i, _)| !drop.contains(i))
        .map(|(_, (c, u))| ClientResult {
            client: c.clone(),
            num_examples: c.num_examples,
            arrays: vec![u.clone()],
            metrics: BTreeMap::new(),
        })
        .collect();
    strategy.aggregate_fit(results).unwrap();
    strategy
}

fn assert_same_tables(secure: &FedEStrategy, plain: &FedEStrategy, before: &FedEStrategy) {
    let (s, p, b) = (secure.table(), plain.table(), before.table());
    assert_eq!(s.keys(), p.keys());
    let mut moved = 0;
    for k in s.keys() {
        let (rs, rp) = (s.row(k).unwrap(), p.row(k).unwrap());
        for (x, y) in rs.iter().zip(rp) {
            // Per coordinate: holders x 2^-25 of rounding, divided by the holders; then f32.
            assert!((x - y).abs() <= 1e-5, "{k}: secure {x} vs plain {y}");
        }
        if rp != b.row(k).unwrap() {
            moved += 1;
        }
    }
    assert!(
        moved > 50,
        "only {moved} rows were aggregated: the test is too small"
    );
}

fn check(orgs: usize, drop: &[usize], seed: u64) -> Vec<u64> {
    let drop: BTreeSet<usize> = drop.iter().copied().collect();
    let (strategy, clients) = federation(orgs, seed);
    let updates = trained_rows(&strategy, &clients, seed);
    let (seen, secure) = secure_round(strategy.clone(), &clients, &updates, &drop);
    let plain = plain_round(strategy.clone(), &clients, &updates, &drop);
    assert_same_tables(&secure, &plain, &strategy);
    seen
}

#[test]
fn per_entity_secure_sums_equal_plain_fede() {
    check(3, &[], 1);
}

#[test]
fn one_of_three_dropping_after_masking_leaves_the_survivors_mean_per_entity() {
    check(3, &[2], 2);
}

#[test]
fn two_of_five_dropping_after_masking_leave_the_survivors_mean_per_entity() {
    check(5, &[1, 3], 3);
}

/// What the coordinator receives from one organisation is the whole shared row space (its own
/// rows and zeros for the entities it does not hold) under a uniformly random mask: every bit
/// of the 64-bit ring elements is set about half of the time, zero slots included.
#[test]
fn the_coordinators_view_of_one_organisations_rows_is_uniformly_random() {
    let (strategy, clients) = federation(3, 4);
    let held: BTreeSet<u32> = strategy
        .secure_rows(&clients[0])
        .unwrap()
        .slots
        .into_iter()
        .collect();
    let total = strategy.secure_rows(&clients[0]).unwrap().total;
    assert!(
        (0..total).any(|s| !held.contains(&s)),
        "organisation 0 holds every shared entity: no zero slot to test"
    );
    let seen = check(3, &[], 4);
    let n = seen.len() as f64;
    assert!(n > 1000.0, "{n} values");
    // Each bit is Bernoulli(1/2) across the values; 6 standard deviations, 64 bits: a false
    // failure has probability below 1e-7.
    let tolerance = 6.0 * 0.5 / n.sqrt();
    for bit in 0..64 {
        let ones = seen.iter().filter(|v| (*v >> bit) & 1 == 1).count() as f64;
        assert!(
            (ones / n - 0.5).abs() < tolerance,
            "bit {bit} set in {:.3} of the masked values",
            ones / n
        );
    }
    // The slots the organisation does not hold (zeros before masking) are just as random.
    let zero_slots: Vec<u64> = (0..total)
        .filter(|s| !held.contains(s))
        .flat_map(|s| seen[s as usize * DIM..(s as usize + 1) * DIM].to_vec())
        .collect();
    let m = zero_slots.len() as f64;
    let ones: f64 = zero_slots
        .iter()
        .map(|v| v.count_ones() as f64)
        .sum::<f64>()
        / (64.0 * m);
    assert!((ones - 0.5).abs() < 6.0 * 0.5 / (64.0 * m).sqrt(), "{ones}");
}
