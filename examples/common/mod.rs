//! What the federation examples share: reading their flags, splitting a dataset over
//! organisations by relation with the product's partitioner, and the FedE settings of the
//! default run. Included by each example with `#[path = "common/mod.rs"] mod common;`.
// Each example uses the part it needs.
#![allow(dead_code)]

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use simskip_data::{partition, ClientPartition, KgDataset, PartitionBy, PartitionConfig};
use simskip_fed::StageParams;
use simskip_kge::{FilterIndex, TransEConfig};

/// The command line after the program name, read as `--flag value` pairs.
pub struct Flags {
    args: std::iter::Skip<std::env::Args>,
    /// The example's file name, for the error on an unknown flag.
    example: &'static str,
}

impl Flags {
    pub fn from_env(example: &'static str) -> Self {
        Self {
            args: std::env::args().skip(1),
            example,
        }
    }

    /// The next flag, if any.
    pub fn next_flag(&mut self) -> Option<String> {
        self.args.next()
    }

    /// The value after `flag`.
    pub fn value(&mut self, flag: &str) -> Result<String> {
        self.args
            .next()
            .with_context(|| format!("{flag} needs a value"))
    }

    /// The value after `flag`, parsed.
    pub fn parse<T>(&mut self, flag: &str) -> Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(self.value(flag)?.parse()?)
    }

    /// The value after `flag`: comma-separated `what`, each parsed.
    pub fn list<T: FromStr>(&mut self, flag: &str, what: &str) -> Result<Vec<T>>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.value(flag)?
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{flag}: comma-separated {what}"))
    }

    /// The error for a flag the example does not know.
    pub fn unknown(&self, flag: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "unknown argument {flag:?} (see the header of examples/{})",
            self.example
        )
    }
}

/// The dataset in `dir` and its split over `clients` organisations by relation, as the
/// product splits it.
pub fn split_by_relation(
    dir: &Path,
    clients: usize,
    seed: u64,
) -> Result<(KgDataset, Vec<ClientPartition>)> {
    let ds = KgDataset::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let parts = partition(
        &ds,
        &PartitionConfig::new(clients, PartitionBy::Relation, seed),
    )?;
    Ok((ds, parts))
}

/// The filter of an organisation's link prediction: all of its own triples.
pub fn own_filter(part: &ClientPartition) -> FilterIndex {
    FilterIndex::new(part.train.iter().chain(&part.valid).chain(&part.test))
}

/// One line on an organisation's share: its entities, relations and triples.
pub fn print_share(part: &ClientPartition) {
    println!(
        "  client {}: {} entities, {} relations, train/valid/test {}/{}/{}",
        part.client,
        part.entities.len(),
        part.relations.len(),
        part.train.len(),
        part.valid.len(),
        part.test.len()
    );
}

/// The FedE settings of the default run (the coordinator's default FedE stage) at width
/// `dim`, one epoch at a time (the examples count local epochs themselves).
pub fn default_fede_config(dim: usize, seed: u64) -> Result<TransEConfig> {
    let server = simskip::node::ServerFile::default().server;
    let Some(StageParams::FedE(cfg)) = server
        .stages
        .iter()
        .map(|s| &s.params)
        .find(|p| matches!(p, StageParams::FedE(_)))
    else {
        bail!("the default run has no FedE stage");
    };
    Ok(TransEConfig {
        dim,
        epochs: 1,
        seed,
        ..cfg.clone()
    })
}
