//! FB15k-237-Fed3: Isolation, Collection and FedE on FB15k-237 split over 3 clients by
//! relation with the product's partitioner (FedE's benchmark, FedE's table 3), test MRR and
//! Hits@1/3/10 under two protocols, aggregated over the clients weighted by their test triples
//! (FedE's aggregation):
//!
//! * "tail": `(h, r, ?)` only, filtered, as FedE reports;
//! * "both": heads and tails, filtered, as the rest of the product reports.
//!
//! Every method ranks in each client's own entity space (the entities of its triples),
//! filtered by that client's train/valid/test triples, so the three rows are comparable.
//! (The original FedE ranks over all entities, since each of its clients holds the whole
//! table; see examples/fede_fidelity.rs and the README's fidelity table.)
//!
//! * Isolation: each client trains alone on its own triples for `--baseline-epochs` epochs.
//! * Collection: one model on the union of the clients' training triples (global ids) for
//!   `--baseline-epochs` epochs; each client is evaluated on its rows of that model.
//! * FedE: `--rounds` rounds of `--local-epochs` local epochs, the coordinator averaging
//!   every entity row over the clients holding it (as examples/fede_fidelity.rs, own pool).
//!
//! Settings: `TransEConfig::fede_defaults()` (d 128, L1, self-adversarial γ 10, 256
//! negatives, batch 512, lr .001, negatives filtered against known triples). By default the
//! baselines train `rounds x local_epochs` epochs, the epochs a FedE client trains.
//!
//! cargo run --release -p simskip --example fede_fed3 -- [--dataset DIR] [--clients 3]
//!     [--seed 0] [--rounds 10] [--local-epochs 3] [--baseline-epochs N]
//!     [--methods isolation,collection,fede] [--negatives K] [--json PATH]

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use simskip_data::{ClientPartition, KgDataset, Matrix, NamedArray, Triple};
use simskip_fed::aggregate::{fede_aggregate, EntityTable};
use simskip_fed::ENTITIES;
use simskip_kge::transe::init_bound;
use simskip_kge::{
    evaluate, FilterIndex, LinkPredictionMetrics, TransE, TransEConfig, TransETrainer,
};

#[path = "common/mod.rs"]
mod common;

struct Args {
    dataset: PathBuf,
    clients: usize,
    seed: u64,
    rounds: usize,
    baseline_epochs: Option<usize>,
    methods: Vec<String>,
    cfg: TransEConfig,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        dataset: PathBuf::from("../shared/datasets/fb15k-237"),
        clients: 3,
        seed: 0,
        rounds: 10,
        baseline_epochs: None,
        methods: vec!["isolation".into(), "collection".into(), "fede".into()],
        cfg: TransEConfig::fede_defaults(),
        json: None,
    };
    let mut flags = common::Flags::from_env("fede_fed3.rs");
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--dataset" => a.dataset = flags.value(&flag)?.into(),
            "--clients" => a.clients = flags.parse(&flag)?,
            "--seed" => a.seed = flags.parse(&flag)?,
            "--rounds" => a.rounds = flags.parse(&flag)?,
            "--local-epochs" => a.cfg.epochs = flags.parse(&flag)?,
            "--baseline-epochs" => a.baseline_epochs = Some(flags.parse(&flag)?),
            "--negatives" => a.cfg.negatives = flags.parse(&flag)?,
            "--methods" => {
                a.methods = flags.list(&flag, "method names")?;
                for m in &a.methods {
                    if !["isolation", "collection", "fede"].contains(&m.as_str()) {
                        bail!("--methods: unknown method {m:?}");
                    }
                }
            }
            "--json" => a.json = Some(flags.value(&flag)?.into()),
            other => return Err(flags.unknown(other)),
        }
    }
    a.cfg.seed = a.seed;
    a.cfg.validate()?;
    Ok(a)
}

/// Figures of one client (or the aggregate) under both protocols.
#[derive(Clone, Copy, Default)]
struct Row {
    tail: [f64; 4],
    both: [f64; 4],
}

impl Row {
    fn of(m: &LinkPredictionMetrics) -> Self {
        Self {
            tail: [
                m.tail.mrr,
                m.tail.hits_at_1,
                m.tail.hits_at_3,
                m.tail.hits_at_10,
            ],
            both: [m.mrr, m.hits_at_1, m.hits_at_3, m.hits_at_10],
        }
    }

    /// FedE's aggregate: each figure weighted by the client's share of the test triples.
    fn weighted(rows: &[(Row, usize)]) -> Self {
        let total: usize = rows.iter().map(|(_, n)| n).sum();
        let mut out = Row::default();
        for (r, n) in rows {
            let w = *n as f64 / total as f64;
            for k in 0..4 {
                out.tail[k] += w * r.tail[k];
                out.both[k] += w * r.both[k];
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let side = |v: &[f64; 4]| json!({"mrr": v[0], "hits_at_1": v[1], "hits_at_3": v[2], "hits_at_10": v[3]});
        json!({"tail_filtered": side(&self.tail), "both_filtered": side(&self.both)})
    }
}

fn print_row(label: &str, r: &Row) {
    println!(
        "{label:<22} {:.4} {:.4} {:.4} {:.4}   {:.4} {:.4} {:.4} {:.4}",
        r.tail[0], r.tail[1], r.tail[2], r.tail[3], r.both[0], r.both[1], r.both[2], r.both[3]
    );
}

struct Client {
    part: ClientPartition,
    filter: FilterIndex,
}

impl Client {
    /// This client's figures for entity and relation tables in its local ids.
    fn row(&self, entities: &Matrix, relations: &Matrix, cfg: &TransEConfig) -> (Row, usize) {
        let m = evaluate(entities, relations, cfg.norm, &self.part.test, &self.filter);
        (Row::of(&m), self.part.test.len())
    }
}

fn isolation(clients: &[Client], cfg: &TransEConfig, epochs: usize) -> Row {
    let cfg = TransEConfig {
        epochs,
        ..cfg.clone()
    };
    // The clients train concurrently, as separate organisations do.
    let models: Vec<TransE> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .map(|c| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let mut t =
                        TransETrainer::new(c.part.entities.len(), c.part.relations.len(), cfg);
                    t.train(&c.part.train);
                    t.into_model()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("isolation thread panicked"))
            .collect()
    });
    let rows: Vec<_> = clients
        .iter()
        .zip(&models)
        .map(|(c, m)| c.row(&m.entities, &m.relations, &cfg))
        .collect();
    Row::weighted(&rows)
}

fn collection(ds: &KgDataset, clients: &[Client], cfg: &TransEConfig, epochs: usize) -> Row {
    let cfg = TransEConfig {
        epochs,
        threads: clients.len(),
        ..cfg.clone()
    };
    let union: Vec<Triple> = clients
        .iter()
        .flat_map(|c| {
            c.part.train.iter().map(|t| Triple {
                h: c.part.entity_ids[t.h as usize],
                r: c.part.relation_ids[t.r as usize],
                t: c.part.entity_ids[t.t as usize],
            })
        })
        .collect();
    let mut t = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg.clone());
    t.train(&union);
    let m = t.model();
    let rows: Vec<_> = clients
        .iter()
        .map(|c| {
            c.row(
                &m.entities.select_rows(&c.part.entity_ids),
                &m.relations.select_rows(&c.part.relation_ids),
                &cfg,
            )
        })
        .collect();
    Row::weighted(&rows)
}

fn fede(clients: &[Client], cfg: &TransEConfig, rounds: usize, seed: u64) -> Result<Row> {
    let dim = cfg.dim;
    let bound = init_bound(cfg);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut table = EntityTable::new(dim);
    for c in clients {
        for k in c.part.entities.names() {
            table.insert_with(k, |row| {
                for v in row {
                    *v = rng.random_range(-bound..bound);
                }
            });
        }
    }
    let rows_of = |table: &EntityTable, keys: &[String]| -> Result<Matrix> {
        let a = table.rows_for(keys)?;
        Ok(Matrix::from_vec(keys.len(), dim, a.data))
    };
    let mut trainers: Vec<TransETrainer> = clients
        .iter()
        .map(|c| {
            let mut rng = StdRng::seed_from_u64(cfg.seed);
            let model = TransE::init(c.part.entities.len(), c.part.relations.len(), cfg, &mut rng);
            TransETrainer::from_model(model, cfg.clone())
        })
        .collect();
    for round in 1..=rounds {
        let t0 = Instant::now();
        for (c, t) in clients.iter().zip(&mut trainers) {
            t.set_entities(rows_of(&table, c.part.entities.names())?);
        }
        let updates: Vec<(Vec<String>, NamedArray)> = std::thread::scope(|s| {
            let handles: Vec<_> = clients
                .iter()
                .zip(&mut trainers)
                .map(|(c, t)| {
                    s.spawn(move || {
                        for _ in 0..t.config().epochs {
                            t.train_epoch(&c.part.train);
                        }
                        let e = &t.model().entities;
                        (
                            c.part.entities.names().to_vec(),
                            NamedArray::new(ENTITIES, vec![e.rows, e.cols], e.data.clone()),
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client training thread panicked"))
                .collect()
        });
        fede_aggregate(&mut table, &updates)?;
        println!(
            "  FedE round {round}/{rounds}: {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let mut rows = Vec::with_capacity(clients.len());
    for (c, t) in clients.iter().zip(&trainers) {
        rows.push(c.row(
            &rows_of(&table, c.part.entities.names())?,
            &t.model().relations,
            cfg,
        ));
    }
    Ok(Row::weighted(&rows))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let cfg = args.cfg.clone();
    let baseline_epochs = args.baseline_epochs.unwrap_or(args.rounds * cfg.epochs);
    let (ds, parts) = common::split_by_relation(&args.dataset, args.clients, args.seed)?;
    println!(
        "{}: {} clients by relation, seed {}; {cfg:?}; FedE {} rounds x {} local epochs; Isolation and Collection {baseline_epochs} epochs",
        args.dataset.display(),
        parts.len(),
        args.seed,
        args.rounds,
        cfg.epochs,
    );
    let clients: Vec<Client> = parts
        .into_iter()
        .map(|part| {
            common::print_share(&part);
            let filter = common::own_filter(&part);
            Client { part, filter }
        })
        .collect();
    let mut results = Vec::new();
    for method in &args.methods {
        let t0 = Instant::now();
        let row = match method.as_str() {
            "isolation" => isolation(&clients, &cfg, baseline_epochs),
            "collection" => collection(&ds, &clients, &cfg, baseline_epochs),
            _ => fede(&clients, &cfg, args.rounds, args.seed)?,
        };
        let secs = t0.elapsed().as_secs_f64();
        println!("  {method}: {secs:.0} s (training and evaluation)");
        results.push((method.clone(), row, secs));
    }
    println!(
        "\nweighted test figures; rank among each client's own entities, filtered by its triples"
    );
    println!("{:<22} tail (FedE's protocol):      both sides:", "method");
    println!(
        "{:<22} MRR    H@1    H@3    H@10     MRR    H@1    H@3    H@10",
        ""
    );
    for (m, r, _) in &results {
        print_row(m, r);
    }
    if let Some(p) = &args.json {
        let mut f =
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        let rec = json!({
            "dataset": args.dataset.display().to_string(),
            "clients": args.clients, "seed": args.seed, "rounds": args.rounds,
            "local_epochs": cfg.epochs, "baseline_epochs": baseline_epochs,
            "negatives": cfg.negatives,
            "methods": results.iter().map(|(m, r, s)| json!({"method": m, "figures": r.json(), "seconds": s})).collect::<Vec<_>>(),
        });
        writeln!(f, "{rec}")?;
    }
    Ok(())
}
