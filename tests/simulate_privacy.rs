//! `simskip simulate` runs the privacy settings by configuration alone: differential privacy
//! on both stages (FedE per row, SimSkip per update) and both stages summed under secure
//! aggregation (FedE per entity over its holders, SimSkip as one weighted sum), over real
//! processes with mutual TLS and blinded keys. The run's records (the coordinator's
//! `metrics.jsonl`, parsed into its typed round records) show what was spent and that every
//! secure round closed with every organisation.

use std::path::Path;
use std::process::Command;

use simskip::node::RunFigures;
use simskip_fed::rounds::{RoundRecord, DP_DELTA, DP_EPSILON, DP_SAMPLING_RATE};
use simskip_fed::TaskKind;

const FEDE_SIGMA: f64 = 1.5;
const SIMSKIP_SIGMA: f64 = 2.0;
const DELTA: f64 = 1e-5;

/// The tiny federation of the CLI tests (3 organisations, 2 FedE and 2 SimSkip rounds, width
/// 16) with a `privacy` and a `secure_aggregation` table on each stage (FedE exchanging rows of
/// shared entities only, as secure per-entity sums require).
fn private_config() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-simulate.toml");
    let tiny = std::fs::read_to_string(path).unwrap();
    let fede = "[server.server.stages.transe]\nepochs = 1\nnegatives = 16\n";
    let simskip = "[server.server.stages.simskip]\nepochs = 1\npositives = \"neighbour\"\n";
    assert!(tiny.contains(fede) && tiny.contains(simskip), "{tiny}");
    tiny.replace(
        fede,
        &format!(
            "{fede}[server.server.stages.aggregation]\nmin_holders = 2\n\
             [server.server.stages.secure_aggregation]\nfrac_bits = 24\n\
             [server.server.stages.privacy]\nnoise_multiplier = {FEDE_SIGMA:?}\n\
             clip_norm = 0.5\ndelta = {DELTA:?}\n"
        ),
    )
    .replace(
        simskip,
        &format!(
            "{simskip}[server.server.stages.secure_aggregation]\nfrac_bits = 24\n\
             [server.server.stages.privacy]\nnoise_multiplier = {SIMSKIP_SIGMA:?}\n\
             clip_norm = 1.0\ndelta = {DELTA:?}\n"
        ),
    )
}

fn fits<'a>(records: &'a [RoundRecord], stage: &str) -> Vec<&'a RoundRecord> {
    records
        .iter()
        .filter(|r| r.stage == stage && r.kind == TaskKind::Fit)
        .collect()
}

/// Epsilon after each FIT round grows, and is the accountant's for the rates charged so far.
fn assert_epsilon_per_round(fits: &[&RoundRecord], sigma: f64) {
    assert_eq!(fits.len(), 2);
    let mut last = 0.0;
    for (k, r) in fits.iter().enumerate() {
        let eps = r.metrics[DP_EPSILON];
        assert_eq!(r.metrics[DP_DELTA], DELTA);
        // Every organisation takes part in every round.
        assert_eq!(r.metrics[DP_SAMPLING_RATE], 1.0, "{r:?}");
        let expected = simskip_fed::accountant::epsilon(1.0, sigma, k as u64 + 1, DELTA).unwrap();
        assert!(
            (eps - expected).abs() <= 1e-9 * expected,
            "{} round {}: epsilon {eps}, accountant {expected}",
            r.stage,
            r.round
        );
        assert!(
            eps > last,
            "{} round {}: {eps} after {last}",
            r.stage,
            r.round
        );
        last = eps;
    }
}

#[test]
fn simulate_runs_dp_on_both_stages_and_secure_aggregation_by_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("private.toml"), private_config()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_simskip"))
        .current_dir(tmp.path())
        .args(["simulate", "private.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let run = tmp.path().join("run");
    let coordinator = run.join("coordinator");
    let records: Vec<RoundRecord> = std::fs::read_to_string(coordinator.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let orgs = ["org-0", "org-1", "org-2"];

    let fede = fits(&records, "fede");
    assert_epsilon_per_round(&fede, FEDE_SIGMA);
    let simskip = fits(&records, "simskip");
    assert_epsilon_per_round(&simskip, SIMSKIP_SIGMA);
    for r in fede.iter().chain(&simskip) {
        // Closed by the protocol, with every organisation's masked input in the sum.
        assert!(r.aggregated && !r.timed_out, "{r:?}");
        assert_eq!(r.num_clients, 3, "{r:?}");
        assert_eq!(r.clients.keys().collect::<Vec<_>>(), orgs, "{r:?}");
        assert!(r.missing.is_empty() && r.failures.is_empty(), "{r:?}");
        assert_eq!(
            r.note.as_deref(),
            Some("secure aggregation: the sum of 3 organisations"),
            "{r:?}"
        );
        // Each organisation measured how often its update hit the clip bound.
        for c in r.clients.values() {
            let clipped = c.metrics[simskip_fed::client::DP_CLIPPED_FRACTION];
            assert!((0.0..=1.0).contains(&clipped), "{r:?}");
        }
    }

    // The final table's privacy line comes from the same records.
    let figures = RunFigures::read(&coordinator).unwrap();
    for (stage, last) in [("fede", fede[1]), ("simskip", simskip[1])] {
        let spent = figures.stages[stage].privacy.expect("epsilon reported");
        assert_eq!(spent.round, 2);
        assert_eq!(spent.epsilon, last.metrics[DP_EPSILON]);
    }
    // The global models and every organisation's tables were written, finite.
    for stage in ["fede", "simskip"] {
        assert!(coordinator.join(stage).join("global.safetensors").is_file());
    }
    for k in 0..3 {
        let org = run.join(format!("org-{k}-output"));
        for stage in ["fede", "simskip"] {
            let table = simskip_data::Embeddings::read(&org.join(stage).join("entities.npy"))
                .unwrap_or_else(|e| panic!("org-{k} {stage}: {e}"));
            assert!(!table.names.is_empty(), "org-{k} {stage}");
            assert!(
                table.matrix.data.iter().all(|v| v.is_finite()),
                "org-{k} {stage}"
            );
        }
    }
}
