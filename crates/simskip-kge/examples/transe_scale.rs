//! TransE epoch time on a synthetic graph (by default 1,000,000 entities, 1,000 relations,
//! 5,000,000 triples), generated here from a seed: heads, relations and tails uniform, so
//! row accesses are as cache-unfriendly as they get (real graphs, with hub entities, are
//! kinder). Trains `--epochs` epochs with each thread count of `--threads` (a fresh trainer
//! for each) and prints every epoch's time and the median per thread count. Peak memory:
//! run it under `/usr/bin/time -v` (scripts/transe-scale.sh does).
//!
//! cargo run -p simskip-kge --release --example transe_scale -- [--entities N]
//!     [--relations R] [--triples M] [--epochs E] [--threads 1,2] [--dim D]
//!     [--negatives K] [--seed S]

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::Triple;
use simskip_kge::{TransEConfig, TransETrainer};

fn main() {
    let mut entities = 1_000_000u32;
    let mut relations = 1_000u32;
    let mut triples = 5_000_000usize;
    let mut epochs = 3usize;
    let mut threads = vec![1usize, 2];
    let mut cfg = TransEConfig::default();
    let mut seed = 0u64;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let num = |v: &str| -> usize { v.parse().unwrap_or_else(|_| panic!("{flag} {v}")) };
        match flag.as_str() {
            "--entities" => entities = num(&v) as u32,
            "--relations" => relations = num(&v) as u32,
            "--triples" => triples = num(&v),
            "--epochs" => epochs = num(&v),
            "--threads" => threads = v.split(',').map(num).collect(),
            "--dim" => cfg.dim = num(&v),
            "--negatives" => cfg.negatives = num(&v),
            "--seed" => seed = num(&v) as u64,
            _ => panic!("unknown flag {flag}"),
        }
    }
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let graph: Vec<Triple> = (0..triples)
        .map(|_| Triple {
            h: rng.random_range(0..entities),
            r: rng.random_range(0..relations),
            t: rng.random_range(0..entities),
        })
        .collect();
    println!(
        "synthetic graph: {entities} entities, {relations} relations, {triples} triples (uniform, seed {seed}), generated in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for &t in &threads {
        let cfg = TransEConfig {
            threads: t,
            seed,
            ..cfg.clone()
        };
        if let Err(e) = cfg.validate() {
            panic!("{e}");
        }
        println!(
            "TransE d {} {:?} {:?}, {} negative(s), batch {}, {t} thread(s):",
            cfg.dim, cfg.norm, cfg.loss, cfg.negatives, cfg.batch_size
        );
        let start = Instant::now();
        let mut trainer = TransETrainer::new(entities as usize, relations as usize, cfg);
        println!("  init {:.1} s", start.elapsed().as_secs_f64());
        let mut secs = Vec::new();
        for e in 1..=epochs {
            let start = Instant::now();
            let loss = trainer.train_epoch(&graph);
            let s = start.elapsed().as_secs_f64();
            println!(
                "  epoch {e}: {s:.2} s ({:.3} us per triple), loss {loss:.4}",
                s * 1e6 / triples as f64
            );
            secs.push(s);
        }
        secs.sort_by(f64::total_cmp);
        let median = secs[secs.len() / 2];
        println!(
            "  {t} thread(s): median epoch {median:.2} s over {epochs} (min {:.2}, max {:.2}); {:.3} us per triple",
            secs[0],
            secs[secs.len() - 1],
            median * 1e6 / triples as f64
        );
    }
}
