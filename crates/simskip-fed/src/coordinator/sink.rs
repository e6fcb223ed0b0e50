//! Where a run's events go: one log line each, the database ([`Store`]), and the run's files.
//! Every closed round is committed to the database first (with the checkpoint of the global
//! model a FIT round produced, in the same transaction), and only then appended to
//! `out_dir/metrics.jsonl` and `out_dir/metrics.csv`: the files never hold a round the
//! database does not, and a resumed run rewrites them from the database, so each round
//! appears in them exactly once. Every aggregated global model is also written atomically to
//! `out_dir/<stage>/global.safetensors` (plus `out_dir/<stage>/entities.txt`, the key of each
//! row of "entities", for FedE stages).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::coordinator::rounds::{Event, RoundRecord};
use crate::coordinator::store::{CommitCost, Store};
use crate::error::FedError;
use crate::types::{GlobalSnapshot, TaskKind};

/// One structured log line per event.
pub(crate) fn log_event(e: &Event) {
    match e {
        Event::ClientRegistered { name, rejoined, .. } => {
            tracing::info!(client = %name, rejoined, "client registered")
        }
        Event::ClientDead { name } => tracing::warn!(client = %name, "client silent: marked dead"),
        Event::StageStarted { stage, .. } => tracing::info!(%stage, "stage started"),
        Event::RoundStarted {
            round,
            kind,
            clients,
            ..
        } => tracing::info!(
            round,
            kind = kind.as_str(),
            clients = clients.len(),
            "round started"
        ),
        // The one line of a closed round: its figures as fields, the aggregated metrics as
        // one JSON object (the same as in metrics.jsonl).
        Event::RoundCompleted(r) => tracing::info!(
            run_id = %r.run_id,
            stage = %r.stage,
            round = r.round,
            kind = r.kind.as_str(),
            clients = r.num_clients,
            selected = r.selected.len(),
            failed = r.failures.len(),
            missing = r.missing.len(),
            aggregated = r.aggregated,
            timed_out = r.timed_out,
            secs = r.ended_secs - r.started_secs,
            aggregate_secs = r.coordinator.aggregate_secs,
            metrics = %serde_json::to_string(&r.metrics).unwrap_or_default(),
            note = r.note.as_deref().unwrap_or(""),
            "round closed"
        ),
        Event::GlobalUpdated { .. } => {}
        Event::StageFinished { stage, .. } => tracing::info!(%stage, "stage finished"),
        Event::Done => tracing::info!("run done"),
        Event::Aborted { reason } => tracing::error!(%reason, "run aborted"),
    }
}

/// Commits rounds, appends records and writes global models; runs on its own thread.
pub(crate) struct Sink {
    out_dir: PathBuf,
    run_id: String,
    store: Store,
    /// A FIT round that aggregated: committed with the global model that follows it.
    pending: Option<RoundRecord>,
    jsonl: File,
    csv: File,
    /// What each commit cost, in order.
    pub(crate) costs: Vec<CommitCost>,
}

const CSV_HEADER: &str = "run_id,stage,round,kind,client,metric,value\n";

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The rows of `rec` in `metrics.csv`.
fn csv_rows(rec: &RoundRecord) -> String {
    let prefix = format!(
        "{},{},{},{}",
        csv_field(&rec.run_id),
        csv_field(&rec.stage),
        rec.round,
        rec.kind.as_str()
    );
    let mut rows = String::new();
    for (client, c) in &rec.clients {
        let client = csv_field(client);
        rows += &format!("{prefix},{client},num_examples,{}\n", c.num_examples);
        for (m, v) in &c.metrics {
            rows += &format!("{prefix},{client},{},{v}\n", csv_field(m));
        }
    }
    rows += &format!("{prefix},aggregate,num_clients,{}\n", rec.num_clients);
    for (m, v) in &rec.metrics {
        rows += &format!("{prefix},aggregate,{},{v}\n", csv_field(m));
    }
    rows += &format!(
        "{prefix},aggregate,coordinator_secs,{}\n",
        rec.coordinator.total_secs
    );
    rows
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FedError + 'a {
    move |source| FedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Rewrites `metrics.jsonl` and `metrics.csv` from `records` (atomically).
pub(crate) fn export_metrics(out_dir: &Path, records: &[RoundRecord]) -> Result<(), FedError> {
    let out = |e: &dyn std::fmt::Display| FedError::Output(e.to_string());
    let mut jsonl = String::new();
    let mut csv = String::from(CSV_HEADER);
    for rec in records {
        jsonl += &serde_json::to_string(rec).map_err(|e| out(&e))?;
        jsonl.push('\n');
        csv += &csv_rows(rec);
    }
    simskip_data::fsutil::write_atomic(&out_dir.join("metrics.jsonl"), jsonl.as_bytes())
        .map_err(|e| out(&e))?;
    simskip_data::fsutil::write_atomic(&out_dir.join("metrics.csv"), csv.as_bytes())
        .map_err(|e| out(&e))
}

impl Sink {
    pub(crate) fn open(out_dir: &Path, run_id: &str, store: Store) -> Result<Self, FedError> {
        std::fs::create_dir_all(out_dir).map_err(io("creating", out_dir))?;
        let open = |name: &str| -> Result<(File, bool), FedError> {
            let p = out_dir.join(name);
            let fresh = std::fs::metadata(&p).map_or(true, |m| m.len() == 0);
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(io("opening", &p))?;
            Ok((f, fresh))
        };
        let (jsonl, _) = open("metrics.jsonl")?;
        let (mut csv, fresh) = open("metrics.csv")?;
        if fresh {
            csv.write_all(CSV_HEADER.as_bytes())
                .map_err(io("writing", &out_dir.join("metrics.csv")))?;
        }
        Ok(Self {
            out_dir: out_dir.to_path_buf(),
            run_id: run_id.to_string(),
            store,
            pending: None,
            jsonl,
            csv,
            costs: Vec::new(),
        })
    }

    pub(crate) fn handle(&mut self, e: Event) -> Result<(), FedError> {
        match e {
            Event::RoundCompleted(rec) => {
                if rec.kind == TaskKind::Fit && rec.aggregated {
                    // Its global model comes with the next event.
                    self.pending = Some(rec);
                } else {
                    self.commit(rec, None)?;
                }
            }
            Event::GlobalUpdated {
                stage,
                round,
                global,
                ..
            } => {
                let rec = self.pending.take().ok_or_else(|| {
                    FedError::Output(format!(
                        "the global model of round {round} of stage {stage:?} came without its round"
                    ))
                })?;
                self.commit(rec, Some(&global))?;
                self.write_global(&stage, round, &global)?;
            }
            Event::ClientRegistered { name, .. } => {
                self.store.note_registration(&self.run_id, &name)?;
            }
            Event::Done => self.store.finish_run(&self.run_id)?,
            _ => {}
        }
        Ok(())
    }

    /// Commits `rec` (and its checkpoint) to the database, then appends it to the files.
    fn commit(
        &mut self,
        rec: RoundRecord,
        global: Option<&GlobalSnapshot>,
    ) -> Result<(), FedError> {
        let cost = self.store.commit_round(&rec, global)?;
        tracing::debug!(
            round = rec.round,
            kind = rec.kind.as_str(),
            checkpoint_ms = cost.checkpoint_ms,
            transaction_ms = cost.transaction_ms,
            "round committed"
        );
        self.costs.push(cost);
        let out = |e: &dyn std::fmt::Display| FedError::Output(e.to_string());
        let line = serde_json::to_string(&rec).map_err(|e| out(&e))?;
        writeln!(self.jsonl, "{line}").map_err(|e| out(&e))?;
        self.jsonl.flush().map_err(|e| out(&e))?;
        self.csv
            .write_all(csv_rows(&rec).as_bytes())
            .map_err(|e| out(&e))?;
        self.csv.flush().map_err(|e| out(&e))
    }

    fn write_global(
        &self,
        stage: &str,
        round: u32,
        global: &GlobalSnapshot,
    ) -> Result<(), FedError> {
        let out = |e: &dyn std::fmt::Display| FedError::Output(e.to_string());
        let dir = self.out_dir.join(stage);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let meta = BTreeMap::from([
            ("run_id".to_string(), self.run_id.clone()),
            ("stage".to_string(), stage.to_string()),
            ("round".to_string(), round.to_string()),
        ]);
        if let Some(keys) = &global.keys {
            let mut text = keys.join("\n");
            text.push('\n');
            simskip_data::fsutil::write_atomic(&dir.join("entities.txt"), text.as_bytes())
                .map_err(|e| out(&e))?;
        }
        simskip_data::tensors::write_named_safetensors(
            &dir.join("global.safetensors"),
            &global.arrays,
            &meta,
        )
        .map_err(|e| out(&e))
    }
}
