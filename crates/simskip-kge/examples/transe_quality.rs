//! TransE quality per second: trains one setting on a dataset for several seeds and prints
//! filtered test MRR and Hits@1/3/10 (both sides and tail only, realistic rank), training
//! seconds (wall and CPU of the process), as mean and sample standard deviation over the
//! seeds, then one JSON line with every run.
//!
//! cargo run -p simskip-kge --release --example transe_quality -- [--data DIR] [--seeds N]
//!     [--first-seed S] [--threads T] [--epochs E] [--dim D] [--negatives K] [--batch B]
//!     [--lr LR] [--norm l1|l2] [--loss margin:M | adv:GAMMA:TEMPERATURE]
//!     [--normalize true|false] [--preset default|fede] [--eval test|valid]
//!
//! Flags start from `--preset` (the library's `TransEConfig::default()` unless `fede`).

use std::path::PathBuf;
use std::time::Instant;

use simskip_data::KgDataset;
use simskip_kge::linkpred::{evaluate, FilterIndex};
use simskip_kge::{Loss, Norm, TransEConfig, TransETrainer};

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc (Linux); NaN elsewhere.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let Some(after) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // Fields 14 and 15 of stat are utime and stime; `after` starts at field 3. 100 Hz ticks.
    (ticks(11) + ticks(12)) / 100.0
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

fn main() {
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/umls"));
    let mut seeds = 5u64;
    let mut first_seed = 0u64;
    let mut eval_valid = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = args
        .iter()
        .position(|a| a == "--preset")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    let mut cfg = match preset {
        Some("fede") => TransEConfig::fede_defaults(),
        Some("default") | None => TransEConfig::default(),
        Some(other) => panic!("--preset {other}: expected default or fede"),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"))
            .as_str();
        let num = |v: &str| -> f64 { v.parse().unwrap_or_else(|_| panic!("{flag} {v}")) };
        match flag.as_str() {
            "--data" => dir = PathBuf::from(v),
            "--seeds" => seeds = num(v) as u64,
            "--first-seed" => first_seed = num(v) as u64,
            "--threads" => cfg.threads = num(v) as usize,
            "--epochs" => cfg.epochs = num(v) as usize,
            "--dim" => cfg.dim = num(v) as usize,
            "--negatives" => cfg.negatives = num(v) as usize,
            "--batch" => cfg.batch_size = num(v) as usize,
            "--lr" => cfg.lr = num(v) as f32,
            "--norm" => {
                cfg.norm = match v {
                    "l1" => Norm::L1,
                    "l2" => Norm::L2,
                    _ => panic!("--norm {v}: expected l1 or l2"),
                }
            }
            "--loss" => {
                let p: Vec<&str> = v.split(':').collect();
                cfg.loss = match p.as_slice() {
                    ["margin", m] => Loss::MarginRanking {
                        margin: num(m) as f32,
                    },
                    ["adv", g, t] => Loss::SelfAdversarial {
                        gamma: num(g) as f32,
                        temperature: num(t) as f32,
                    },
                    _ => panic!("--loss {v}: expected margin:M or adv:GAMMA:T"),
                };
                cfg.init = simskip_kge::EmbeddingInit::Auto;
            }
            "--normalize" => cfg.normalize_entities = v == "true",
            "--preset" => {}
            "--eval" => eval_valid = v == "valid",
            _ => panic!("unknown flag {flag}"),
        }
    }
    if let Err(e) = cfg.validate() {
        panic!("{e}");
    }
    let ds = KgDataset::load(&dir).expect("load dataset");
    let filter = FilterIndex::from_dataset(&ds);
    let queries = if eval_valid { &ds.valid } else { &ds.test };
    println!(
        "{}: {} entities, {} relations, {} train; {} {} triples; seeds {first_seed}..{}; {cfg:?}",
        dir.display(),
        ds.num_entities(),
        ds.num_relations(),
        ds.train.len(),
        queries.len(),
        if eval_valid { "valid" } else { "test" },
        first_seed + seeds - 1,
    );
    let mut runs = Vec::new();
    for seed in first_seed..first_seed + seeds {
        let cfg = TransEConfig {
            seed,
            ..cfg.clone()
        };
        let (wall0, cpu0) = (Instant::now(), cpu_seconds());
        let mut trainer = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg);
        trainer.train(&ds.train);
        let (wall, cpu) = (wall0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        let m = trainer.model();
        let r = evaluate(&m.entities, &m.relations, m.norm, queries, &filter);
        println!(
            "seed {seed}: MRR {:.4} H@1 {:.4} H@3 {:.4} H@10 {:.4} | tail MRR {:.4} H@10 {:.4} | train {wall:.2} s wall, {cpu:.2} s CPU",
            r.mrr, r.hits_at_1, r.hits_at_3, r.hits_at_10, r.tail.mrr, r.tail.hits_at_10
        );
        runs.push((r, wall, cpu));
    }
    let col = |f: &dyn Fn(&(simskip_kge::LinkPredictionMetrics, f64, f64)) -> f64| {
        mean_sd(&runs.iter().map(f).collect::<Vec<_>>())
    };
    let stats = [
        ("MRR", col(&|r| r.0.mrr)),
        ("H@1", col(&|r| r.0.hits_at_1)),
        ("H@3", col(&|r| r.0.hits_at_3)),
        ("H@10", col(&|r| r.0.hits_at_10)),
        ("tail MRR", col(&|r| r.0.tail.mrr)),
        ("tail H@10", col(&|r| r.0.tail.hits_at_10)),
    ];
    let line: Vec<String> = stats
        .iter()
        .map(|(n, (m, s))| format!("{n} {m:.4} ± {s:.4}"))
        .collect();
    let (w, ws) = col(&|r| r.1);
    let (c, cs) = col(&|r| r.2);
    println!(
        "mean ± sd over {} seeds: {} | train {w:.2} ± {ws:.2} s wall, {c:.2} ± {cs:.2} s CPU",
        runs.len(),
        line.join("  ")
    );
    let json: Vec<String> = runs
        .iter()
        .map(|(r, w, c)| {
            format!(
                "{{\"mrr\":{:.5},\"h1\":{:.5},\"h3\":{:.5},\"h10\":{:.5},\"tail_mrr\":{:.5},\"tail_h10\":{:.5},\"wall_s\":{w:.3},\"cpu_s\":{c:.3}}}",
                r.mrr, r.hits_at_1, r.hits_at_3, r.hits_at_10, r.tail.mrr, r.tail.hits_at_10
            )
        })
        .collect();
    println!("JSON [{}]", json.join(","));
}
