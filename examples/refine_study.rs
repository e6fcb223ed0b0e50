//! The WordNet-5k refinement study: TransE (d=128) from the embed pipeline, then SimSkip with
//! the paper's augmentations and with neighbour positives, each with and without the gate;
//! test KNN@10, probe accuracy / macro-F1 and link prediction beside the input.
//!
//! cargo run --release -p simskip --example refine_study [-- DATASET [TRANSE_EPOCHS] [SIMSKIP_EPOCHS]]

use std::path::PathBuf;

use anyhow::Result;
use simskip::pipeline::{evaluate_table, refine_table, train_transe, EvalContext};
use simskip::settings::{EvalSettings, GateSettings};
use simskip_data::KgDataset;
use simskip_eval::render_table;
use simskip_kge::TransEConfig;
use simskip_refine::{Augmentation, Positives, SimSkipConfig};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dataset = PathBuf::from(args.next().unwrap_or_else(|| "data/wordnet-5k".into()));
    let transe_epochs: usize = args.next().map_or(Ok(100), |s| s.parse())?;
    let simskip_epochs: usize = args.next().map_or(Ok(50), |s| s.parse())?;
    let ds = KgDataset::load(&dataset)?;
    let transe = TransEConfig {
        epochs: transe_epochs,
        ..TransEConfig::default()
    };
    let embedded = train_transe(&ds, &transe, &mut |_, _| {});
    println!(
        "TransE d={} on {}: {:.1} s, test MRR {:.4}, H@10 {:.4}",
        transe.dim,
        dataset.display(),
        embedded.report.train_seconds,
        embedded.report.test.mrr,
        embedded.report.test.hits_at_10
    );
    let x = embedded.model.entities;
    let ctx = EvalContext::new(&ds, EvalSettings::default(), transe.norm);
    let mut rows = vec![("input".to_owned(), evaluate_table(&ctx, &x)?)];
    let variants = [
        ("mask", Augmentation::Mask, Positives::Augment),
        ("noise", Augmentation::Noise, Positives::Augment),
        ("mask+noise", Augmentation::Both, Positives::Augment),
        ("neighbour+mask", Augmentation::Mask, Positives::Neighbour),
    ];
    for (name, augmentation, positives) in variants {
        for gate in [false, true] {
            let cfg = SimSkipConfig {
                augmentation,
                positives,
                epochs: simskip_epochs,
                ..SimSkipConfig::default()
            };
            let gate_settings = GateSettings {
                enabled: gate,
                ..GateSettings::default()
            };
            let outcome = refine_table(&ctx, &x, &cfg, &gate_settings, &mut |_, _, _| {})?;
            let label = format!(
                "{name} gate={} ({})",
                if gate { "on" } else { "off" },
                outcome.report.chosen
            );
            rows.push((label, evaluate_table(&ctx, &outcome.output)?));
        }
    }
    let refs: Vec<(String, &simskip_eval::TaskFigures)> =
        rows.iter().map(|(n, f)| (n.clone(), f)).collect();
    print!("{}", render_table(&refs));
    Ok(())
}
