//! Compute cost of secure aggregation per round against plain FedAvg, side by side in one run,
//! for 3, 10 and 50 organisations, on the SimSkip weight vector at embedding dimension 128
//! (every array that travels in the SimSkip FedAvg stage, flattened).
//!
//! For each repetition and each organisation count, one round of each, in process, on the same
//! random updates:
//! * plain: the coordinator's FedAvg of the updates (the organisations compute nothing);
//! * secure: every organisation's protocol steps (keys, shares, encoding and masking, unmask
//!   answer) and the coordinator's (relaying, adding masked inputs, rebuilding seeds and
//!   removing masks), timed separately. Organisations work in parallel in a deployment, so the
//!   round's added compute is the slowest organisation plus the coordinator.
//!
//! Prints medians over the repetitions with the interquartile range, the ratio of the secure
//! round (slowest organisation + coordinator) to plain FedAvg, and the payload bytes each
//! organisation sends and receives per round (protocol fields only, without protobuf framing).
//!
//! With `--rows R`, the vector is instead a FedE round's masked rows: R shared entities x 128
//! (what every organisation masks under per-entity secure sums), and the plain baseline is
//! the coordinator's mean of the same-length vectors (the per-entity mean when every
//! organisation holds every shared entity).
//!
//! cargo run --release -p simskip-fed --example secagg_cost -- [REPETITIONS] [--rows R] [--orgs 3,10,50]

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::NamedArray;
use simskip_fed::secagg::{ClientId, Coordinator, FixedPoint, SecAggClient, SecAggSettings};
use simskip_refine::weights::Layout;

const DIM: usize = 128;
const CONTEXT: &[u8] = b"secagg_cost";

/// One round's seconds.
struct Sample {
    plain: f64,
    client_max: f64,
    client_median: f64,
    coordinator: f64,
}

fn quartiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

fn one_round(n: usize, len: usize, rng: &mut StdRng) -> anyhow::Result<Sample> {
    let updates: Vec<(Vec<f32>, u64)> = (0..n)
        .map(|_| {
            let x = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (x, rng.random_range(100..10_000))
        })
        .collect();

    // Plain FedAvg, as the coordinator runs it.
    let inputs: Vec<(Vec<NamedArray>, u64)> = updates
        .iter()
        .map(|(x, k)| (vec![NamedArray::new("w", vec![len], x.clone())], *k))
        .collect();
    let t = Instant::now();
    let plain = simskip_fed::fedavg(&inputs)?;
    let plain_secs = since(t);

    // Secure aggregation: every step of every party timed on its own.
    let settings = SecAggSettings {
        threshold: n / 2 + 1,
        fixed_point: FixedPoint::new(24).expect("in range"),
    };
    let mut client = vec![0f64; n];
    let mut coord = 0f64;

    let t = Instant::now();
    let mut coordinator = Coordinator::new(settings, CONTEXT, len);
    coord += since(t);
    let mut clients = Vec::with_capacity(n);
    for id in 0..n as ClientId {
        let t = Instant::now();
        let (c, keys) = SecAggClient::new(id, settings, CONTEXT, rng);
        client[id as usize] += since(t);
        let t = Instant::now();
        coordinator.on_keys(keys)?;
        coord += since(t);
        clients.push(c);
    }
    let t = Instant::now();
    let roster = coordinator.roster()?;
    coord += since(t);
    for (i, c) in clients.iter_mut().enumerate() {
        let t = Instant::now();
        let sealed = c.share_keys(&roster, rng)?;
        client[i] += since(t);
        let t = Instant::now();
        coordinator.on_shares(c.id(), sealed)?;
        coord += since(t);
    }
    let t = Instant::now();
    coordinator.close_shares()?;
    let inboxes: Vec<_> = (0..n as ClientId).map(|c| coordinator.inbox(c)).collect();
    coord += since(t);
    for (i, (c, (x, k))) in clients.iter_mut().zip(&updates).enumerate() {
        let t = Instant::now();
        let masked = c.masked_input(&inboxes[i], x, *k)?;
        client[i] += since(t);
        let t = Instant::now();
        coordinator.on_masked_input(masked)?;
        coord += since(t);
    }
    let t = Instant::now();
    let request = coordinator.unmask_request()?;
    coord += since(t);
    for (i, c) in clients.iter_mut().enumerate() {
        let t = Instant::now();
        let answer = c.unmask(&request)?;
        client[i] += since(t);
        let t = Instant::now();
        coordinator.on_unmask_response(answer)?;
        coord += since(t);
    }
    let t = Instant::now();
    let sum = coordinator.finish()?;
    coord += since(t);

    // The two agree (a benchmark that computed the wrong thing would be worthless).
    let bound = settings.fixed_point.mean_error_bound(n, sum.total_examples) + 1e-6;
    let mean = sum.mean();
    anyhow::ensure!(
        mean.iter()
            .zip(&plain[0].data)
            .all(|(s, p)| (s - *p as f64).abs() <= bound),
        "secure and plain FedAvg disagree"
    );

    let (_, client_median, _) = quartiles(&mut client.clone());
    Ok(Sample {
        plain: plain_secs,
        client_max: client.iter().copied().fold(0.0, f64::max),
        client_median,
        coordinator: coord,
    })
}

/// Payload bytes per organisation and round: (sent, received) for plain and secure.
fn bytes(n: usize, len: usize) -> ((usize, usize), (usize, usize)) {
    let id = 4;
    let share = 8 + 5 * 8; // x and five field elements
    let keys = id + 2 * 32;
    let sealed = 2 * id + 12 + 2 * 5 * 8 + 16; // ids, nonce, two shares, tag
    let model = 4 * len; // the global model down, the f32 update up
    let plain = (model + 8, model);
    let sent = keys + (n - 1) * sealed + id + 8 * (len + 1) + id + n * (id + share);
    let received = model + n * keys + (n - 1) * sealed + n * id;
    (plain, (sent, received))
}

fn main() -> anyhow::Result<()> {
    let mut reps = 9usize;
    let mut rows: Option<usize> = None;
    let mut orgs = vec![3usize, 10, 50];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rows" => rows = Some(args.next().unwrap_or_default().parse()?),
            "--orgs" => {
                orgs = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            n => reps = n.parse()?,
        }
    }
    let len = match rows {
        Some(r) => {
            println!(
                "FedE per-entity secure sums: {r} shared entities x {DIM} = {} values; \
                 {reps} repetitions, medians [IQR]",
                r * DIM
            );
            r * DIM
        }
        None => {
            let layout = Layout::new(DIM);
            let len = layout.trainable_len() + layout.statistics_len();
            println!(
                "SimSkip weights at dim {DIM}: {len} values ({} trained + {} BatchNorm \
                 statistics); {reps} repetitions, medians [IQR]",
                layout.trainable_len(),
                layout.statistics_len()
            );
            len
        }
    };
    println!(
        "| orgs | threshold | plain FedAvg ms | secure: org ms (median org) | secure: slowest org ms | secure: coordinator ms | ratio (slowest org + coordinator) / plain | bytes up plain / secure | bytes down plain / secure |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rng = StdRng::seed_from_u64(2017);
    for n in orgs {
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            samples.push(one_round(n, len, &mut rng)?);
        }
        let ms = |f: &dyn Fn(&Sample) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(|s| f(s) * 1e3).collect();
            let (q1, m, q3) = quartiles(&mut v);
            format!("{m:.2} [{q1:.2}, {q3:.2}]")
        };
        let mut ratios: Vec<f64> = samples
            .iter()
            .map(|s| (s.client_max + s.coordinator) / s.plain)
            .collect();
        let (r1, r, r3) = quartiles(&mut ratios);
        let ((pu, pd), (su, sd)) = bytes(n, len);
        println!(
            "| {n} | {} | {} | {} | {} | {} | {r:.1} [{r1:.1}, {r3:.1}] | {pu} / {su} | {pd} / {sd} |",
            n / 2 + 1,
            ms(&|s| s.plain),
            ms(&|s| s.client_median),
            ms(&|s| s.client_max),
            ms(&|s| s.coordinator),
        );
    }
    Ok(())
}
