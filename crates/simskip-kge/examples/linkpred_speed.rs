//! Ranking throughput of the batched link-prediction scorer against the reference scorer,
//! paired: both run on the same model and queries in the same process, alternately, `RUNS`
//! times each. Prints medians with min–max, in ranking queries (two per test triple) per
//! wall-second and per CPU-second (process user + system time, from `/proc/self/stat`), and
//! checks that both give the same ranks.
//!
//! `cargo run --release -p simskip-kge --example linkpred_speed -- DATA_DIR [TRIPLES] [RUNS] [l1|l2]`
//!
//! The model is TransE after one training epoch (the cost does not depend on the values).

use std::path::PathBuf;
use std::time::Instant;

use simskip_data::KgDataset;
use simskip_kge::linkpred::{query_ranks, reference, FilterIndex};
use simskip_kge::{Norm, TransEConfig, TransETrainer};

/// Process CPU time (user + system) in seconds, at clock-tick resolution.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the parenthesised command name; utime and stime are fields 14 and 15
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn summary(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:.0} ({:.0}–{:.0})", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: linkpred_speed DATA_DIR [TRIPLES] [RUNS] [l1|l2]"),
    );
    let triples: usize = args.next().map_or(500, |s| s.parse().expect("TRIPLES"));
    let runs: usize = args.next().map_or(5, |s| s.parse().expect("RUNS"));
    let norm = match args.next().as_deref() {
        None | Some("l1") => Norm::L1,
        Some("l2") => Norm::L2,
        Some(other) => panic!("norm must be l1 or l2, not {other}"),
    };
    let ds = KgDataset::load(&dir).expect("load dataset");
    let cfg = TransEConfig {
        norm,
        epochs: 1,
        ..TransEConfig::default()
    };
    let mut trainer = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg);
    trainer.train(&ds.train);
    let model = trainer.into_model();
    let filter = FilterIndex::from_dataset(&ds);
    let queries = &ds.test[..triples.min(ds.test.len())];
    let rankings = 2.0 * queries.len() as f64;
    println!(
        "{}: {} entities x {} dims, {:?}, {} test triples = {} rankings, {} runs each, {} threads",
        dir.display(),
        ds.num_entities(),
        model.dim(),
        norm,
        queries.len(),
        rankings,
        runs,
        rayon::current_num_threads()
    );
    let (mut old_wall, mut old_cpu, mut new_wall, mut new_cpu, mut ratio) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let (w, c) = (Instant::now(), cpu_seconds());
        let slow =
            reference::query_ranks(&model.entities, &model.relations, norm, queries, &filter);
        let (ow, oc) = (w.elapsed().as_secs_f64(), cpu_seconds() - c);
        let (w, c) = (Instant::now(), cpu_seconds());
        let fast = query_ranks(&model.entities, &model.relations, norm, queries, &filter);
        let (nw, nc) = (w.elapsed().as_secs_f64(), cpu_seconds() - c);
        assert_eq!(fast, slow, "the batched scorer changed a rank");
        old_wall.push(rankings / ow);
        old_cpu.push(rankings / oc.max(0.01));
        new_wall.push(rankings / nw);
        new_cpu.push(rankings / nc.max(0.01));
        ratio.push((rankings / nc.max(0.01)) / (rankings / oc.max(0.01)));
    }
    println!(
        "reference: {} rankings/wall-s, {} rankings/CPU-s",
        summary(&mut old_wall),
        summary(&mut old_cpu)
    );
    println!(
        "batched:   {} rankings/wall-s, {} rankings/CPU-s",
        summary(&mut new_wall),
        summary(&mut new_cpu)
    );
    ratio.sort_by(f64::total_cmp);
    println!(
        "speed-up per CPU-second (paired runs): median {:.1}x (min {:.1}x, max {:.1}x); ranks identical",
        ratio[ratio.len() / 2],
        ratio[0],
        ratio[ratio.len() - 1]
    );
}
