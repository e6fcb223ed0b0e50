//! Writing figures: aligned tables on stdout, JSON files written atomically.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use simskip_kge::LinkPredictionMetrics;

pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    simskip_data::fsutil::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Filtered link-prediction figures, one row per split.
pub fn print_link_prediction(rows: &[(&str, &LinkPredictionMetrics)]) {
    println!(
        "{:<8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9}",
        "split", "triples", "MRR", "H@1", "H@3", "H@10", "tail MRR", "tail H@10"
    );
    for (name, m) in rows {
        println!(
            "{:<8} {:>7} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>9.4} {:>9.4}",
            name,
            m.count,
            m.mrr,
            m.hits_at_1,
            m.hits_at_3,
            m.hits_at_10,
            m.tail.mrr,
            m.tail.hits_at_10
        );
    }
}
