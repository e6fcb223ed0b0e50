//! FedE fidelity: the product's FedE, in process, per round, on a knowledge graph split over
//! clients by relation with the product's partitioner, for comparison with the original FedE
//! (AnselCmy/FedE) run on the same split.
//!
//! Per evaluated round it prints, per client and aggregated over the clients weighted by their
//! test triples (FedE's aggregation): filtered tail MRR and tail Hits@1/3/10 (FedE's figures)
//! and head-and-tail MRR and Hits@10. Every client ranks in its own entity space (the entities
//! of its training triples), filtered by its own train/valid/test triples, as FedE's
//! evaluation does.
//!
//! Settings start from `TransEConfig::fede_defaults()` (head-or-tail corruption, negatives
//! filtered against known triples, Adam kept across rounds); each flag switches one of them:
//!
//! cargo run --release -p simskip --example fede_fidelity -- \
//!     [--dataset DIR] [--clients 3] [--seed 0] [--rounds 10] [--eval-rounds 1,2,3,5,10] \
//!     [--init fede|bordes] [--corruption head_or_tail|tail_only] [--pool own|all] \
//!     [--filter none|known_triples] [--adam keep|reset] [--lr X] [--local-epochs N] \
//!     [--json PATH]
//!
//! `--pool all` draws negatives from every entity of the federation, as FedE does (each of its
//! clients holds the whole table): the client then trains on a copy of the whole global table
//! and sends back only its own rows. The product's protocol sends a client only its own rows,
//! so `own` is what a deployment can do.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use simskip_data::{ClientPartition, Matrix, NamedArray, Triple};
use simskip_fed::aggregate::{fede_aggregate, EntityTable};
use simskip_fed::ENTITIES;
use simskip_kge::transe::{
    init_bound, AdamAcrossRounds, Corruption, EmbeddingInit, NegativeFilter, FEDE_EPSILON,
};
use simskip_kge::{
    evaluate, FilterIndex, LinkPredictionMetrics, TransE, TransEConfig, TransETrainer,
};

#[path = "common/mod.rs"]
mod common;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pool {
    /// The client's own entities (what the product's protocol sends it).
    Own,
    /// Every entity of the federation (FedE).
    All,
}

struct Args {
    dataset: PathBuf,
    clients: usize,
    seed: u64,
    rounds: usize,
    eval_rounds: Vec<usize>,
    pool: Pool,
    cfg: TransEConfig,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        dataset: PathBuf::from("../shared/datasets/fb15k-237"),
        clients: 3,
        seed: 0,
        rounds: 10,
        eval_rounds: vec![1, 2, 3, 5, 10],
        pool: Pool::Own,
        cfg: TransEConfig::fede_defaults(),
        json: None,
    };
    let mut flags = common::Flags::from_env("fede_fidelity.rs");
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--dataset" => a.dataset = flags.value(&flag)?.into(),
            "--clients" => a.clients = flags.parse(&flag)?,
            "--seed" => a.seed = flags.parse(&flag)?,
            "--rounds" => a.rounds = flags.parse(&flag)?,
            "--eval-rounds" => a.eval_rounds = flags.list(&flag, "round numbers")?,
            "--init" => {
                a.cfg.init = match flags.value(&flag)?.as_str() {
                    "fede" => EmbeddingInit::GammaEpsilon {
                        epsilon: FEDE_EPSILON,
                    },
                    "bordes" => EmbeddingInit::Bordes,
                    v => bail!("--init {v:?}: expected fede or bordes"),
                }
            }
            "--corruption" => {
                a.cfg.corruption = match flags.value(&flag)?.as_str() {
                    "head_or_tail" => Corruption::HeadOrTail,
                    "tail_only" => Corruption::TailOnly,
                    v => bail!("--corruption {v:?}: expected head_or_tail or tail_only"),
                }
            }
            "--filter" => {
                a.cfg.negative_filter = match flags.value(&flag)?.as_str() {
                    "none" => NegativeFilter::None,
                    "known_triples" => NegativeFilter::KnownTriples,
                    v => bail!("--filter {v:?}: expected none or known_triples"),
                }
            }
            "--adam" => {
                a.cfg.adam_across_rounds = match flags.value(&flag)?.as_str() {
                    "keep" => AdamAcrossRounds::Keep,
                    "reset" => AdamAcrossRounds::Reset,
                    v => bail!("--adam {v:?}: expected keep or reset"),
                }
            }
            "--pool" => {
                a.pool = match flags.value(&flag)?.as_str() {
                    "own" => Pool::Own,
                    "all" => Pool::All,
                    v => bail!("--pool {v:?}: expected own or all"),
                }
            }
            "--lr" => a.cfg.lr = flags.parse(&flag)?,
            "--local-epochs" => a.cfg.epochs = flags.parse(&flag)?,
            "--json" => a.json = Some(flags.value(&flag)?.into()),
            other => return Err(flags.unknown(other)),
        }
    }
    a.cfg.seed = a.seed;
    a.cfg.validate()?;
    Ok(a)
}

/// One client: its private graph, the filter its evaluation uses, the keys its rows travel
/// under, and its local trainer.
struct Client {
    part: ClientPartition,
    filter: FilterIndex,
    keys: Vec<String>,
    /// Training triples in the trainer's entity ids (local, or global for `--pool all`).
    train: Vec<Triple>,
    trainer: TransETrainer,
}

/// Figures of one client (or the aggregate) at one round.
#[derive(Clone, Copy, Default)]
struct Row {
    tail_mrr: f64,
    tail_h1: f64,
    tail_h3: f64,
    tail_h10: f64,
    mrr: f64,
    h10: f64,
}

impl Row {
    fn of(m: &LinkPredictionMetrics) -> Self {
        Self {
            tail_mrr: m.tail.mrr,
            tail_h1: m.tail.hits_at_1,
            tail_h3: m.tail.hits_at_3,
            tail_h10: m.tail.hits_at_10,
            mrr: m.mrr,
            h10: m.hits_at_10,
        }
    }

    /// FedE's aggregate: each figure weighted by the client's share of the test triples.
    fn weighted(rows: &[(Row, usize)]) -> Self {
        let total: usize = rows.iter().map(|(_, n)| n).sum();
        let mut out = Row::default();
        for (r, n) in rows {
            let w = *n as f64 / total as f64;
            out.tail_mrr += w * r.tail_mrr;
            out.tail_h1 += w * r.tail_h1;
            out.tail_h3 += w * r.tail_h3;
            out.tail_h10 += w * r.tail_h10;
            out.mrr += w * r.mrr;
            out.h10 += w * r.h10;
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "tail_mrr": self.tail_mrr, "tail_hits_at_1": self.tail_h1,
            "tail_hits_at_3": self.tail_h3, "tail_hits_at_10": self.tail_h10,
            "mrr": self.mrr, "hits_at_10": self.h10,
        })
    }
}

fn print_row(round: usize, who: &str, r: &Row) {
    println!(
        "{round:>5}  {who:<6}  {:.4}  {:.4}  {:.4}  {:.4}   {:.4}  {:.4}",
        r.tail_mrr, r.tail_h1, r.tail_h3, r.tail_h10, r.mrr, r.h10
    );
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let cfg = args.cfg.clone();
    let (ds, parts) = common::split_by_relation(&args.dataset, args.clients, args.seed)?;
    let bound = init_bound(&cfg);
    println!(
        "{}: {} clients by relation, seed {}; {:?} negative pool; {cfg:?}; init bound ±{bound}",
        args.dataset.display(),
        parts.len(),
        args.seed,
        args.pool
    );

    // The coordinator's table, filled client by client as FedEStrategy does, uniform in the
    // trainer's initialisation bound.
    let dim = cfg.dim;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut table = EntityTable::new(dim);
    for p in &parts {
        for k in p.entities.names() {
            table.insert_with(k, |row| {
                for v in row {
                    *v = rng.random_range(-bound..bound);
                }
            });
        }
    }
    let all_keys: Vec<String> = ds.entities.names().to_vec();
    let rows_of = |table: &EntityTable, keys: &[String]| -> Result<Matrix> {
        let a = table.rows_for(keys)?;
        Ok(Matrix::from_vec(keys.len(), dim, a.data))
    };

    let mut clients = Vec::new();
    for part in parts {
        let keys = part.entities.names().to_vec();
        let filter = common::own_filter(&part);
        let (train, n_rows) = match args.pool {
            Pool::Own => (part.train.clone(), keys.len()),
            Pool::All => (
                part.train
                    .iter()
                    .map(|t| Triple {
                        h: part.entity_ids[t.h as usize],
                        r: t.r,
                        t: part.entity_ids[t.t as usize],
                    })
                    .collect(),
                all_keys.len(),
            ),
        };
        // Relations start by the config's rule and stay local; entity rows come from the
        // coordinator every round.
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let model = TransE::init(n_rows, part.relations.len(), &cfg, &mut rng);
        let mut trainer = TransETrainer::from_model(model, cfg.clone());
        trainer.set_known_triples(&train);
        common::print_share(&part);
        clients.push(Client {
            part,
            filter,
            keys,
            train,
            trainer,
        });
    }

    let mut out = args
        .json
        .as_ref()
        .map(|p| std::fs::File::create(p).with_context(|| format!("creating {}", p.display())))
        .transpose()?;
    println!("round  client  tail: MRR     H@1     H@3     H@10   both: MRR   H@10");
    for round in 1..=args.rounds {
        let t0 = Instant::now();
        for c in &mut clients {
            let rows = match args.pool {
                Pool::Own => rows_of(&table, &c.keys)?,
                Pool::All => rows_of(&table, &all_keys)?,
            };
            c.trainer.set_entities(rows);
        }
        // The clients train concurrently, as separate organisations do; each has its own
        // seeded generator, so the result does not depend on scheduling.
        let pool = args.pool;
        let updates: Vec<(Vec<String>, NamedArray)> = std::thread::scope(|s| {
            let handles: Vec<_> = clients
                .iter_mut()
                .map(|c| {
                    s.spawn(move || {
                        for _ in 0..c.trainer.config().epochs {
                            c.trainer.train_epoch(&c.train);
                        }
                        let e = &c.trainer.model().entities;
                        let own = match pool {
                            Pool::Own => e.clone(),
                            Pool::All => e.select_rows(&c.part.entity_ids),
                        };
                        (
                            c.keys.clone(),
                            NamedArray::new(ENTITIES, vec![own.rows, own.cols], own.data),
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
        let train_secs = t0.elapsed().as_secs_f64();
        if !args.eval_rounds.contains(&round) {
            println!("{round:>5}  (trained in {train_secs:.1} s, not evaluated)");
            continue;
        }
        // Evaluate as FedE does: the new global rows with each client's own relations.
        let t1 = Instant::now();
        let mut rows = Vec::with_capacity(clients.len());
        for c in &clients {
            let m = evaluate(
                &rows_of(&table, &c.keys)?,
                &c.trainer.model().relations,
                cfg.norm,
                &c.part.test,
                &c.filter,
            );
            rows.push((Row::of(&m), c.part.test.len()));
        }
        let agg = Row::weighted(&rows);
        let eval_secs = t1.elapsed().as_secs_f64();
        for (c, (r, _)) in clients.iter().zip(&rows) {
            print_row(round, &format!("c{}", c.part.client), r);
        }
        print_row(round, "all", &agg);
        println!("       (train {train_secs:.1} s, evaluation {eval_secs:.1} s)");
        if let Some(f) = out.as_mut() {
            let rec = json!({
                "round": round,
                "aggregate": agg.json(),
                "clients": rows.iter().map(|(r, n)| json!({"test": n, "figures": r.json()})).collect::<Vec<_>>(),
                "train_seconds": train_secs,
                "eval_seconds": eval_secs,
            });
            writeln!(f, "{rec}")?;
            f.flush()?;
        }
    }
    Ok(())
}
