//! Training throughput of SimSkip at d = 128, batch 256.
//!
//! `cargo run --release -p simskip-refine --example throughput [EMBEDDINGS_TSV|-] [EPOCHS] [FAST_THREADS] [fast|candle|both]`
//!
//! Prints the candle and the fast backend side by side.
//!
//! Without a path, uses random-but-seeded 40,000 × 128 standard-normal data. With a path, reads
//! a whitespace/tab-separated table of floats (an optional first non-numeric column, e.g. the
//! entity name, is skipped).

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use simskip_data::Matrix;
use simskip_refine::bench::training_samples_per_second;
use simskip_refine::{Backend, SimSkipConfig};

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
    // Optional third argument: threads of the fast backend (0 = rayon's count).
    let fast_threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let base = SimSkipConfig {
        batch_size: 256,
        fast_threads,
        ..SimSkipConfig::default()
    };
    println!(
        "table {} x {}, batch {}, {} epochs, {} rayon threads, CANDLE_NUM_THREADS {}",
        x.rows,
        x.cols,
        base.batch_size,
        epochs,
        rayon_threads(),
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    let samples = (x.rows / base.batch_size * base.batch_size
        + if x.rows % base.batch_size >= 2 {
            x.rows % base.batch_size
        } else {
            0
        })
        * epochs;
    println!(
        "{:<8} {:>14} {:>18}",
        "backend", "samples/s", "samples/CPU-s"
    );
    // Fast first: candle's worker threads keep spinning for a while after its last op and would
    // steal CPU from whatever runs next. Optional fourth argument: `fast` or `candle` only.
    let which = args.get(4).map(String::as_str).unwrap_or("both");
    let backends: &[Backend] = match which {
        "fast" => &[Backend::Fast],
        "candle" => &[Backend::Candle],
        _ => &[Backend::Fast, Backend::Candle],
    };
    for &backend in backends {
        let cfg = SimSkipConfig {
            backend,
            ..base.clone()
        };
        let cpu0 = process_cpu_seconds();
        let sps = training_samples_per_second(&x, &cfg, epochs).expect("training");
        let per_cpu = match (cpu0, process_cpu_seconds()) {
            (Some(a), Some(b)) => format!("{:.0}", samples as f64 / (b - a)),
            _ => "-".into(),
        };
        println!(
            "{:<8} {:>14.0} {:>18}",
            format!("{backend:?}"),
            sps,
            per_cpu
        );
    }
    println!(
        "(samples/s is wall time; samples/CPU-s uses process CPU time, the machine may be shared)"
    );
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
