//! Stage-2 evaluation of one organisation's table (`pipeline::evaluate_table`: KNN@10, MLP
//! probe, relation refit + link prediction), fast against reference implementations, paired
//! in one process: each run times the reference path and then the fast path on the same table,
//! task by task, and the whole `evaluate_table` ratio is taken per run. Prints medians with
//! min–max and both sets of figures.
//!
//! `cargo run --release -p simskip --example eval_speed -- DATA_DIR [--rows N] [--epochs E]
//! [--runs R] [--seeds S]`
//!
//! * `--rows N`: keep the entities with ids below N and the triples among them (a
//!   12k-entity table from wordnet-40k, say); default all.
//! * `--epochs E`: TransE epochs for the table evaluated (default 20, PyKEEN-style settings).
//! * `--runs R`: paired runs (default 3).
//! * `--seeds S`: probe seeds 0..S per path for the quality comparison (default 3; seed 0 is
//!   the probe of the evaluate_table runs).

use std::path::PathBuf;
use std::time::Instant;

use simskip::pipeline::evaluate::{evaluate_table, evaluate_table_reference, EvalContext};
use simskip::settings::EvalSettings;
use simskip_data::{KgDataset, Labels, Triple};
use simskip_kge::{refit_relations, Norm, TransEConfig, TransETrainer};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot parse '{v}'"))
        })
}

/// The sub-graph of entities `0..rows` (ids are assigned in first-appearance order, so this is
/// a connected-ish prefix of the graph).
fn truncate(ds: &KgDataset, rows: usize) -> KgDataset {
    let keep = |t: &Triple| (t.h as usize) < rows && (t.t as usize) < rows;
    let mut out = ds.clone();
    out.entities = simskip_data::Vocab::from_names(ds.entities.names()[..rows].to_vec());
    out.train.retain(keep);
    out.valid.retain(keep);
    out.test.retain(keep);
    out.labels = ds.labels.as_ref().map(|l| Labels {
        classes: l.classes.clone(),
        of: l.of[..rows].to_vec(),
    });
    out
}

fn summary(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    format!("{:.3} ({:.3}–{:.3})", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn mean_spread(v: &[f64]) -> String {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{mean:.4} ({lo:.4}–{hi:.4})")
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .expect("usage: eval_speed DATA_DIR [--rows N] ..."),
    );
    let full = KgDataset::load(&dir).expect("load dataset");
    let rows: usize = arg(&args, "--rows", full.num_entities());
    let epochs: usize = arg(&args, "--epochs", 20);
    let runs: usize = arg(&args, "--runs", 3);
    let seeds: u64 = arg(&args, "--seeds", 3).max(1);
    let ds = if rows < full.num_entities() {
        truncate(&full, rows)
    } else {
        full
    };
    let cfg = TransEConfig {
        epochs,
        ..TransEConfig::default()
    };
    let (x, train_s) = timed(|| {
        let mut t = TransETrainer::new(ds.num_entities(), ds.num_relations(), cfg.clone());
        t.train(&ds.train);
        t.into_model().entities
    });
    let ctx = EvalContext::new(&ds, EvalSettings::default(), Norm::L1);
    let split = ctx
        .split
        .as_ref()
        .expect("the benchmark needs a labelled dataset");
    println!(
        "{}: {} entities x {} dims (TransE, {epochs} epochs, {train_s:.1} s), {} labelled \
         ({} train / {} valid / {} test), {} test triples, {} threads, {runs} paired runs",
        dir.display(),
        x.rows,
        x.cols,
        split.train.len() + split.valid.len() + split.test.len(),
        split.train.len(),
        split.valid.len(),
        split.test.len(),
        ds.test.len(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .to_string()
        })
    );
    let labels = ds.labels.as_ref().expect("labelled");
    let classes = labels.classes.len();
    let probe_cfg = &ctx.settings.probe;

    // task by task (the profile), then the whole evaluate_table, reference then fast, per run
    let mut t: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut whole_ratio = Vec::new();
    let mut figures = Vec::new();
    for run in 0..runs {
        if run == 0 {
            // the profile: each task alone, reference then fast
            let k = ctx.settings.knn_k;
            let (_, s) = timed(|| {
                simskip_eval::reference::knn_precision_at_k(&x, &labels.of, &split.test, k)
            });
            t.entry("knn reference").or_default().push(s);
            let (_, s) = timed(|| simskip_eval::knn_precision_at_k(&x, &labels.of, &split.test, k));
            t.entry("knn fast").or_default().push(s);
            let (_, s) =
                timed(|| simskip_eval::reference::probe(&x, &labels.of, classes, split, probe_cfg));
            t.entry("probe reference").or_default().push(s);
            let (_, s) = timed(|| simskip_eval::probe(&x, &labels.of, classes, split, probe_cfg));
            t.entry("probe fast").or_default().push(s);
            let (rel, s) = timed(|| refit_relations(&x, &ds.train, ds.num_relations(), Norm::L1));
            t.entry("refit").or_default().push(s);
            let (_, s) = timed(|| {
                simskip_kge::linkpred::reference::evaluate(
                    &x,
                    &rel,
                    Norm::L1,
                    &ds.test,
                    &ctx.filter,
                )
            });
            t.entry("link prediction reference").or_default().push(s);
            let (_, s) = timed(|| simskip_kge::evaluate(&x, &rel, Norm::L1, &ds.test, &ctx.filter));
            t.entry("link prediction fast").or_default().push(s);
        }
        let (old, so) = timed(|| evaluate_table_reference(&ctx, &x).expect("reference"));
        let (new, sn) = timed(|| evaluate_table(&ctx, &x).expect("fast"));
        t.entry("evaluate_table reference").or_default().push(so);
        t.entry("evaluate_table fast").or_default().push(sn);
        whole_ratio.push(so / sn);
        figures.push((old, new));
    }
    println!("\nseconds per call (single tasks: run 1 only; evaluate_table: median (min–max) over {runs} runs):");
    for (name, v) in &t {
        println!("  {name:<28} {}", summary(v));
    }
    println!(
        "\nevaluate_table speed-up (reference / fast, paired per run): {}",
        summary(&whole_ratio)
    );
    let (old, new) = &figures[0];
    println!("figures reference: {old:?}\nfigures fast:      {new:?}");

    // probe quality over seeds
    // seed 0 is the evaluate_table runs' probe; seeds 1.. are trained here
    let (mut oa, mut of, mut na, mut nf) = (
        vec![old.probe_accuracy.unwrap_or(f64::NAN)],
        vec![old.probe_macro_f1.unwrap_or(f64::NAN)],
        vec![new.probe_accuracy.unwrap_or(f64::NAN)],
        vec![new.probe_macro_f1.unwrap_or(f64::NAN)],
    );
    for seed in 1..seeds {
        let cfg = simskip_eval::ProbeConfig {
            seed,
            ..probe_cfg.clone()
        };
        let r =
            simskip_eval::reference::probe(&x, &labels.of, classes, split, &cfg).expect("probe");
        oa.push(r.accuracy);
        of.push(r.macro_f1);
        let r = simskip_eval::probe(&x, &labels.of, classes, split, &cfg).expect("probe");
        na.push(r.accuracy);
        nf.push(r.macro_f1);
    }
    println!(
        "\nprobe over seeds 0..{seeds}, mean (min–max):\n  reference accuracy {}  macro-F1 {}\n  fast      accuracy {}  macro-F1 {}",
        mean_spread(&oa),
        mean_spread(&of),
        mean_spread(&na),
        mean_spread(&nf)
    );
}
