//! Why FedE evaluation in the federation reports Hits@1 = 0: the query's own entity ranks
//! first. With FedE's settings (no entity normalisation, Adam lr 0.001, 3 local epochs a
//! round) the coordinator initialises entity rows uniform in `±6/√d` (TransE's bound, meant
//! to be followed by normalisation) while the client's relation vectors start at unit L2
//! norm. Then `||h + r - h||_1 = ||r||_1` (about 10) is far below the distance to any other
//! entity (about 45), so for the tail query `(h, r, ?)` the head `h` itself is the nearest
//! candidate — and it is never filtered, since `(h, r, h)` is not a true triple — and the
//! true tail is at best rank 2. Likewise `t` on the head side. Training at lr 0.001 closes
//! that gap only after many rounds.
//!
//! This example trains one client's TransE (relations `r % clients == client` of a
//! graph, FedE's relation partition) with those settings, round by round, and prints the
//! filtered figures next to the fraction of rankings in which the query entity is strictly
//! nearer than the answer; then the same with FedE's own initialisation (entities and
//! relations uniform in `±(γ + 2)/d`, as in AnselCmy/FedE).
//!
//! `cargo run --release -p simskip-kge --example fede_hits_at_1 -- [DATA_DIR] [ROUNDS] [CLIENTS]`

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::{KgDataset, Matrix, Triple};
use simskip_kge::linkpred::{evaluate, FilterIndex};
use simskip_kge::{Loss, Norm, TransE, TransEConfig, TransETrainer};

fn l1(a: &[f32], b: &[f32], c: &[f32], sign: f32) -> f32 {
    a.iter()
        .zip(b)
        .zip(c)
        .map(|((x, y), z)| (x + sign * y - z).abs())
        .sum()
}

/// Fraction of the 2·|queries| rankings in which the query entity itself is strictly nearer
/// than the true answer.
fn self_nearer(model: &TransE, queries: &[Triple]) -> f64 {
    let mut n = 0;
    for t in queries {
        let (h, r, tt) = (
            model.entities.row(t.h as usize),
            model.relations.row(t.r as usize),
            model.entities.row(t.t as usize),
        );
        let r_norm: f32 = r.iter().map(|v| v.abs()).sum();
        // tail side: candidate h at ||h + r - h|| = ||r||; head side: t at ||t - r - t||
        n += (r_norm < l1(h, r, tt, 1.0)) as usize;
        n += (r_norm < l1(tt, r, h, -1.0)) as usize;
    }
    n as f64 / (2 * queries.len()) as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../data/wordnet-5k"
        ))
    });
    let rounds: usize = args.next().map_or(20, |s| s.parse().expect("ROUNDS"));
    let clients: u32 = args.next().map_or(3, |s| s.parse().expect("CLIENTS"));
    let mut ds = KgDataset::load(&dir).expect("load dataset");
    let mine = |t: &Triple| t.r.is_multiple_of(clients);
    ds.train.retain(mine);
    ds.valid.retain(mine);
    ds.test.retain(mine);
    let filter = FilterIndex::from_dataset(&ds);
    let cfg = TransEConfig::fede_defaults();
    let (n, nr, d) = (ds.num_entities(), ds.num_relations(), cfg.dim);
    println!(
        "{} client 0 of {clients} (relations r % {clients} == 0): {} train / {} test triples, \
         FedE settings {:?}",
        dir.display(),
        ds.train.len(),
        ds.test.len(),
        cfg
    );
    let gamma = match cfg.loss {
        Loss::SelfAdversarial { gamma, .. } => gamma,
        Loss::MarginRanking { .. } => 10.0,
    };
    let mut rng = StdRng::seed_from_u64(0);
    // as the federation starts now: TransE::random draws entities in ±6/√d and unit-norm relations
    let as_now = TransE::random(n, nr, d, Norm::L1, &mut rng);
    // FedE's initialisation: everything uniform in ±(γ + 2)/d, no normalisation
    let range = (gamma + 2.0) / d as f32;
    let mut draw = |rows: usize| {
        Matrix::from_vec(
            rows,
            d,
            (0..rows * d)
                .map(|_| rng.random_range(-range..range))
                .collect(),
        )
    };
    let fede_init = TransE {
        entities: draw(n),
        relations: draw(nr),
        norm: Norm::L1,
    };
    for (name, model) in [
        ("init as in the federation", as_now),
        ("FedE's init", fede_init),
    ] {
        println!("\n{name}:");
        println!("round  test MRR  Hits@1  Hits@10  query entity nearer than answer");
        let mut trainer = TransETrainer::from_model(model, cfg.clone());
        for round in 1..=rounds {
            for _ in 0..cfg.epochs {
                trainer.train_epoch(&ds.train);
            }
            if round == 1 || round % 5 == 0 || round == rounds {
                let m = trainer.model();
                let lp = evaluate(&m.entities, &m.relations, m.norm, &ds.test, &filter);
                println!(
                    "{round:>5}  {:>8.4}  {:>6.4}  {:>7.4}  {:>6.1}%",
                    lp.mrr,
                    lp.hits_at_1,
                    lp.hits_at_10,
                    100.0 * self_nearer(m, &ds.test)
                );
            }
        }
    }
}
