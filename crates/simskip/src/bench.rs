//! `simskip bench`: the throughput and quality figures quoted in the README, measured in one
//! process run so their ratios are comparable.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use simskip_data::KgDataset;
use simskip_kge::{LinkPredictionMetrics, TransEConfig};
use simskip_refine::SimSkipConfig;

use crate::pipeline::train_transe;
use crate::report::{print_link_prediction, write_json};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// UMLS graph folder (TransE quality and epochs per second).
    #[arg(long, default_value = "data/umls")]
    pub umls: PathBuf,
    /// WordNet-40k graph folder (SimSkip throughput on its TransE embeddings); skipped if absent.
    #[arg(long, default_value = "../shared/datasets/wordnet-40k")]
    pub wordnet40k: PathBuf,
    /// TransE epochs on WordNet-40k before measuring SimSkip on its table.
    #[arg(long, default_value_t = 5)]
    pub wordnet_epochs: usize,
    /// SimSkip epochs timed.
    #[arg(long, default_value_t = 3)]
    pub simskip_epochs: usize,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "bench-report.json")]
    pub report: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub umls_transe_train_seconds_100_epochs: f64,
    pub umls_transe_epochs_per_second: f64,
    pub umls_test: LinkPredictionMetrics,
    pub umls_linkpred_queries_per_second: f64,
    pub simskip_samples_per_second: Option<f64>,
    pub simskip_input: Option<String>,
}

/// The reference setting of the README's figure (PyKEEN's, the earlier default): d 128, L1,
/// margin 1, one negative, batch 256, Adam lr .01, 100 epochs, unit-norm entities.
pub fn umls_reference_config() -> TransEConfig {
    TransEConfig::pykeen_reference()
}

pub fn run(_settings: &Settings, args: BenchArgs) -> Result<()> {
    let umls =
        KgDataset::load(&args.umls).with_context(|| format!("loading {}", args.umls.display()))?;
    let cfg = umls_reference_config();
    let outcome = train_transe(&umls, &cfg, &mut |_, _| {});
    let qps = simskip_kge::bench::linkpred_queries_per_second_on(&outcome.model, &umls);
    println!(
        "TransE on UMLS, d=128, batch 256, 1 negative, L1, margin 1, Adam lr .01, 100 epochs:"
    );
    println!(
        "  training {:.2} s ({:.1} epochs/s); link prediction {:.0} ranking queries/s",
        outcome.report.train_seconds, outcome.report.epochs_per_second, qps
    );
    print_link_prediction(&[("test", &outcome.report.test)]);

    let (simskip_sps, simskip_input) = if args.wordnet40k.join("train.tsv").is_file() {
        let wn = KgDataset::load(&args.wordnet40k)?;
        let wn_cfg = TransEConfig {
            epochs: args.wordnet_epochs,
            ..umls_reference_config()
        };
        let table = train_transe(&wn, &wn_cfg, &mut |_, _| {}).model.entities;
        let sk = SimSkipConfig {
            batch_size: 256,
            ..SimSkipConfig::default()
        };
        let sps =
            simskip_refine::bench::training_samples_per_second(&table, &sk, args.simskip_epochs)?;
        println!(
            "SimSkip d=128, batch 256, on WordNet-40k TransE embeddings ({} x {}): {:.0} training samples/s",
            table.rows, table.cols, sps
        );
        (Some(sps), Some(args.wordnet40k.display().to_string()))
    } else {
        println!(
            "SimSkip throughput skipped: {} not found",
            args.wordnet40k.display()
        );
        (None, None)
    };
    let report = BenchReport {
        umls_transe_train_seconds_100_epochs: outcome.report.train_seconds,
        umls_transe_epochs_per_second: outcome.report.epochs_per_second,
        umls_test: outcome.report.test,
        umls_linkpred_queries_per_second: qps,
        simskip_samples_per_second: simskip_sps,
        simskip_input,
    };
    write_json(&args.report, &report)?;
    println!("wrote {}", args.report.display());
    Ok(())
}
