//! Training throughput of SimSkip at d = 128, batch 256.
//!
//! `cargo run --release -p simskip-refine --example throughput [EMBEDDINGS_TSV] [EPOCHS]`
//!
//! Without a path, uses random-but-seeded 40,000 × 128 standard-normal data. With a path, reads
//! a whitespace/tab-separated table of floats (an optional first non-numeric column, e.g. the
//! entity name, is skipped).

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use simskip_data::Matrix;
use simskip_refine::bench::training_samples_per_second;
use simskip_refine::SimSkipConfig;

fn read_table(path: &str) -> Matrix {
    let text = std::fs::read_to_string(path).expect("read embeddings");
    let mut data = Vec::new();
    let mut rows = 0;
    let mut cols = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let vals: Vec<f32> = line
            .split(['\t', ' ', ','])
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        if rows == 0 {
            cols = vals.len();
        }
        assert_eq!(vals.len(), cols, "ragged row {rows}");
        data.extend(vals);
        rows += 1;
    }
    Matrix::from_vec(rows, cols, data)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let x = match args.get(1).filter(|a| a.as_str() != "-") {
        Some(path) => read_table(path),
        None => {
            let mut rng = StdRng::seed_from_u64(7);
            let data = (0..40_000 * 128)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Matrix::from_vec(40_000, 128, data)
        }
    };
    let epochs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let cfg = SimSkipConfig {
        batch_size: 256,
        ..SimSkipConfig::default()
    };
    println!(
        "table {} x {}, batch {}, {} epochs, {} rayon threads",
        x.rows,
        x.cols,
        cfg.batch_size,
        epochs,
        rayon_threads()
    );
    let cpu0 = process_cpu_seconds();
    let sps = training_samples_per_second(&x, &cfg, epochs).expect("training");
    println!("training samples per second: {sps:.0}");
    if let (Some(a), Some(b)) = (cpu0, process_cpu_seconds()) {
        let samples = (x.rows / cfg.batch_size * cfg.batch_size
            + if x.rows % cfg.batch_size >= 2 {
                x.rows % cfg.batch_size
            } else {
                0
            })
            * epochs;
        println!(
            "process CPU time {:.2}s: {:.0} samples per CPU-second (the machine may be shared)",
            b - a,
            samples as f64 / (b - a)
        );
    }
}

/// User + system CPU time of this process (Linux `/proc/self/stat`, 100 ticks/s assumed).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
}
