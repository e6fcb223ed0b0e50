//! FedE traffic per round when only shared entities travel: for a graph split over clients by
//! relation (the product's partitioner), the bytes each organisation downloads and uploads per
//! FedE round (d = 128, f32) with every row exchanged (`aggregation.min_holders = 1`, FedE) and
//! with only the rows of entities held by at least 2 organisations (`min_holders = 2`), and how
//! many entities never leave their holder; and with `secure_aggregation` on the stage, where
//! each organisation downloads its shared rows (f32) and uploads a masked vector over every
//! shared entity of the federation (64-bit ring elements; the protocol's keys and sealed shares
//! add under 1 KiB per organisation). No training: the figures follow from the split.
//!
//! cargo run --release -p simskip --example fede_traffic -- [DATASET...] [--clients 3] [--dim 128]

use std::collections::HashMap;

use anyhow::{Context, Result};
use simskip_data::{partition, KgDataset, PartitionBy, PartitionConfig};

fn main() -> Result<()> {
    let mut datasets = Vec::new();
    let mut clients = 3usize;
    let mut dim = 128usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--clients" => clients = args.next().context("--clients N")?.parse()?,
            "--dim" => dim = args.next().context("--dim D")?.parse()?,
            other => datasets.push(other.to_string()),
        }
    }
    if datasets.is_empty() {
        datasets = vec![
            "../shared/datasets/wordnet-40k".into(),
            "../shared/datasets/fb15k-237".into(),
        ];
    }
    let mib = |rows: usize| (2 * rows * dim * 4) as f64 / (1 << 20) as f64;
    // Down: the organisation's shared rows as f32; up: every shared entity's slot as u64.
    let secure_mib =
        |own: usize, all: usize| (own * dim * 4 + (all * dim + 1) * 8) as f64 / (1 << 20) as f64;
    for path in datasets {
        let ds = KgDataset::load(std::path::Path::new(&path)).with_context(|| path.clone())?;
        let parts = partition(
            &ds,
            &PartitionConfig::new(clients, PartitionBy::Relation, 0),
        )?;
        let mut holders: HashMap<&str, u32> = HashMap::new();
        for p in &parts {
            for n in p.entities.names() {
                *holders.entry(n.as_str()).or_default() += 1;
            }
        }
        println!(
            "{path}: {} entities, {clients} organisations by relation, d = {dim}; MiB down + up per FedE round",
            ds.num_entities()
        );
        let shared_entities = holders.values().filter(|&&h| h >= 2).count();
        println!("org   entities  shared   all rows  shared only  saved  never leave  secure sums");
        let (mut all, mut shared, mut secure) = (0usize, 0usize, 0.0f64);
        for p in &parts {
            let n = p.entities.len();
            let s = p
                .entities
                .names()
                .iter()
                .filter(|k| holders[k.as_str()] >= 2)
                .count();
            all += n;
            shared += s;
            secure += secure_mib(s, shared_entities);
            println!(
                "{:>3} {:>10} {:>7} {:>10.1} {:>12.1} {:>5.1}% {:>11} {:>12.1}",
                p.client,
                n,
                s,
                mib(n),
                mib(s),
                100.0 * (1.0 - s as f64 / n as f64),
                n - s,
                secure_mib(s, shared_entities)
            );
        }
        println!(
            "all {:>10} {:>7} {:>10.1} {:>12.1} {:>5.1}% {:>11} {:>12.1}\n",
            all,
            shared,
            mib(all),
            mib(shared),
            100.0 * (1.0 - shared as f64 / all as f64),
            all - shared,
            secure
        );
    }
    Ok(())
}
