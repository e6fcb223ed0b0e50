//! The coordinator's durable state: an embedded SQLite database, `out_dir/coordinator.db`,
//! fed by the state machine's events on the output thread (the state machine itself does no
//! I/O). It holds:
//! * `runs`: each run's id, the fingerprint of its stages (SHA-256 of their serialized
//!   form), when it was created, whether it finished, and its round counter (`next_seq`);
//! * `rounds`: every closed round (stage, round, kind, the whole [`RoundRecord`] as JSON,
//!   when it closed), unique per (run, stage, round, kind): a round is never stored twice;
//! * `checkpoints`: for each aggregated FIT round, the stage's global model as a safetensors
//!   file under `out_dir/checkpoints/<run>/`, named in the database with its SHA-256;
//! * `organisations`: who registered, when first and last, how often;
//! * `resumes`: each restart that continued a run, from which round, and why it fell back.
//!
//! Closing a round commits its record, its checkpoint reference and the round counter in ONE
//! transaction (WAL, `synchronous = FULL`): after a crash, a round is either fully stored or
//! not at all, and a resumed run re-runs only the round that was open.
//!
//! Checkpoints are files, not BLOBs: a FedE table is megabytes to gigabytes per round; as a
//! BLOB it would pass through the WAL (written twice), bloat the database that every
//! operator command opens, and be readable only through SQLite. A safetensors file is
//! written once (atomically, synced) before the transaction that names it, is read by any
//! tool, and old ones can be pruned by deleting files. The SHA-256 in the database detects
//! a torn, truncated or tampered file when the run resumes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::coordinator::config::StageConfig;
use crate::coordinator::rounds::RoundRecord;
use crate::types::GlobalSnapshot;

/// The database's file name in the coordinator's `out_dir`.
pub const DB_FILE: &str = "coordinator.db";
/// Where checkpoints go, under the `out_dir`.
pub const CHECKPOINT_DIR: &str = "checkpoints";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coordinator database {}: {source}", path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error(
        "run {run_id:?} in {} was started with other stages (fingerprint {stored:.12}, this \
         configuration {given:.12}): restore its [[server.stages]] to resume it, or set \
         server.run_id to start a new run",
        db.display()
    )]
    StagesDiffer {
        run_id: String,
        db: PathBuf,
        stored: String,
        given: String,
    },
    #[error(
        "run {run_id:?} in {} is finished: set another server.run_id (or out_dir) to start a \
         new run",
        db.display()
    )]
    Finished { run_id: String, db: PathBuf },
    #[error("no run {run_id:?} in {}", db.display())]
    UnknownRun { run_id: String, db: PathBuf },
    #[error("no database in {}: the coordinator has not run there", dir.display())]
    NoDatabase { dir: PathBuf },
    #[error("run {run_id:?} has no checkpoint of {what}")]
    NoCheckpoint { run_id: String, what: String },
    #[error("stored round {seq} of run {run_id:?} does not read back: {reason}")]
    BadRecord {
        run_id: String,
        seq: i64,
        reason: String,
    },
}

/// One run, as the database knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub run_id: String,
    pub fingerprint: String,
    pub created_unix: i64,
    pub finished: bool,
    /// Rounds committed.
    pub rounds: u64,
}

/// A stored round.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRound {
    /// Position in the run, from 0.
    pub seq: i64,
    pub record: RoundRecord,
    pub closed_unix: i64,
    pub checkpoint: Option<CheckpointRef>,
}

/// A checkpoint named in the database: paths relative to the `out_dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRef {
    pub stage_index: usize,
    pub stage: String,
    pub round: u32,
    /// Position of its FIT round in the run.
    pub seq: i64,
    pub path: PathBuf,
    pub sha256: String,
    /// FedE: the key of each row, one a line.
    pub keys_path: Option<PathBuf>,
    pub keys_sha256: Option<String>,
    pub bytes: u64,
}

/// Why a checkpoint could not be used.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointFault {
    Missing,
    HashMismatch { expected: String, got: String },
    Unreadable(String),
}

impl std::fmt::Display for CheckpointFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointFault::Missing => write!(f, "the file is missing"),
            CheckpointFault::HashMismatch { expected, got } => write!(
                f,
                "SHA-256 {got:.12} differs from the recorded {expected:.12}"
            ),
            CheckpointFault::Unreadable(e) => write!(f, "unreadable: {e}"),
        }
    }
}

/// A checkpoint skipped when resuming, and the one used instead.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFallback {
    pub stage_index: usize,
    pub stage: String,
    /// The FIT round whose checkpoint was bad: it and every round after it run again.
    pub round: u32,
    pub path: PathBuf,
    pub fault: CheckpointFault,
    /// The stage's round whose checkpoint the run resumes from (`None`: its initial model).
    pub resumed_from: Option<u32>,
}

/// A run to continue.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    pub run_id: String,
    /// The committed rounds the run continues after.
    pub records: Vec<RoundRecord>,
    /// Per stage index, the global model of its last usable checkpoint (and that round).
    pub globals: BTreeMap<usize, (u32, GlobalSnapshot)>,
    /// Bad checkpoints skipped (see [`CheckpointFallback`]).
    pub fallbacks: Vec<CheckpointFallback>,
    /// Committed rounds dropped because they came after a bad checkpoint.
    pub discarded_rounds: usize,
}

/// What [`Store::start`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    New { run_id: String },
    Resumed(Resume),
}

/// What committing a round cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommitCost {
    /// Writing, syncing and hashing the checkpoint files.
    pub checkpoint_ms: f64,
    /// The transaction (record + checkpoint reference + round counter).
    pub transaction_ms: f64,
}

/// SHA-256 of the serialized stages: two configurations with the same fingerprint train the
/// same thing.
pub fn fingerprint(stages: &[StageConfig]) -> String {
    let text = serde_json::to_string(stages).expect("stages serialize");
    hex(&Sha256::digest(text.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A new, random run id.
pub fn random_run_id() -> String {
    format!("run-{:016x}", rand::random::<u64>())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    stages_json TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    seq INTEGER NOT NULL,
    stage_index INTEGER NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    record_json TEXT NOT NULL,
    closed_unix INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq),
    UNIQUE (run_id, stage_index, round, kind)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    stage_index INTEGER NOT NULL,
    stage TEXT NOT NULL,
    round INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    keys_path TEXT,
    keys_sha256 TEXT,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (run_id, stage_index, round)
);
CREATE TABLE IF NOT EXISTS organisations (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    name TEXT NOT NULL,
    first_seen_unix INTEGER NOT NULL,
    last_seen_unix INTEGER NOT NULL,
    registrations INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS resumes (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    at_unix INTEGER NOT NULL,
    from_rounds INTEGER NOT NULL,
    discarded_rounds INTEGER NOT NULL,
    fallbacks TEXT NOT NULL
);
";

/// The coordinator's database (see the module docs).
pub struct Store {
    conn: Connection,
    out_dir: PathBuf,
    db: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("db", &self.db).finish()
    }
}

impl Store {
    /// Opens (creating if needed) `out_dir/coordinator.db`.
    pub fn open(out_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(out_dir).map_err(|source| StoreError::Io {
            what: "creating",
            path: out_dir.to_path_buf(),
            source,
        })?;
        Self::connect(out_dir)
    }

    /// Opens an existing database (operator commands): an error if the coordinator never ran
    /// in `out_dir`.
    pub fn open_existing(out_dir: &Path) -> Result<Self, StoreError> {
        if !out_dir.join(DB_FILE).is_file() {
            return Err(StoreError::NoDatabase {
                dir: out_dir.to_path_buf(),
            });
        }
        Self::connect(out_dir)
    }

    fn connect(out_dir: &Path) -> Result<Self, StoreError> {
        let db = out_dir.join(DB_FILE);
        let conn = Connection::open(&db).map_err(|source| StoreError::Db {
            path: db.clone(),
            source,
        })?;
        let store = Self {
            conn,
            out_dir: out_dir.to_path_buf(),
            db,
        };
        store.db(|c| {
            c.busy_timeout(std::time::Duration::from_secs(10))?;
            // WAL: readers (operator commands) never block the coordinator; FULL: a
            // committed round survives a power cut, not only a process kill.
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "FULL")?;
            c.pragma_update(None, "foreign_keys", "ON")?;
            c.execute_batch(SCHEMA)
        })?;
        Ok(store)
    }

    fn db<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        f(&self.conn).map_err(|source| StoreError::Db {
            path: self.db.clone(),
            source,
        })
    }

    fn db_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.db.clone(),
            source,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db
    }

    /// Decides which run this coordinator runs (the resume rule):
    /// * `requested` names a run (non-empty `server.run_id`): that run is resumed if the
    ///   database holds it unfinished (its stages must have the same fingerprint), refused if
    ///   it is finished, and started anew otherwise;
    /// * `requested` is empty: the latest unfinished run is resumed if its stages have the
    ///   same fingerprint and refused otherwise; with no unfinished run a new run starts,
    ///   with a random id.
    pub fn start(&mut self, requested: &str, stages: &[StageConfig]) -> Result<Start, StoreError> {
        let fp = fingerprint(stages);
        let found: Option<(String, String, bool)> = if requested.is_empty() {
            self.db(|c| {
                c.query_row(
                    "SELECT run_id, fingerprint, finished FROM runs WHERE finished = 0 \
                     ORDER BY created_unix DESC, rowid DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
            })?
        } else {
            self.db(|c| {
                c.query_row(
                    "SELECT run_id, fingerprint, finished FROM runs WHERE run_id = ?1",
                    [requested],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
            })?
        };
        match found {
            Some((run_id, _, true)) => Err(StoreError::Finished {
                run_id,
                db: self.db.clone(),
            }),
            Some((run_id, stored, false)) if stored != fp => Err(StoreError::StagesDiffer {
                run_id,
                db: self.db.clone(),
                stored,
                given: fp,
            }),
            Some((run_id, _, false)) => Ok(Start::Resumed(self.resume(&run_id)?)),
            None => {
                let run_id = if requested.is_empty() {
                    random_run_id()
                } else {
                    requested.to_string()
                };
                let stages_json = serde_json::to_string(stages).expect("stages serialize");
                self.db(|c| {
                    c.execute(
                        "INSERT INTO runs (run_id, fingerprint, stages_json, created_unix) \
                         VALUES (?1, ?2, ?3, ?4)",
                        params![run_id, fp, stages_json, unix_now()],
                    )
                })?;
                Ok(Start::New { run_id })
            }
        }
    }

    /// Loads `run_id` to continue it: its committed rounds and, per stage, the last
    /// checkpoint whose hash verifies. A bad checkpoint sends the run back to the round
    /// before it: the rounds from it on are deleted (in one transaction) and run again.
    fn resume(&mut self, run_id: &str) -> Result<Resume, StoreError> {
        let stored = self.rounds(run_id)?;
        let mut keep = stored.len();
        let mut fallbacks: Vec<CheckpointFallback> = Vec::new();
        let checkpoints = self.checkpoints(run_id)?;
        let globals = 'verify: loop {
            let mut globals = BTreeMap::new();
            // Per stage, its checkpoints within the kept rounds, newest first.
            let mut by_stage: BTreeMap<usize, Vec<&CheckpointRef>> = BTreeMap::new();
            for c in checkpoints.iter().filter(|c| (c.seq as usize) < keep) {
                by_stage.entry(c.stage_index).or_default().push(c);
            }
            for (stage, mut list) in by_stage {
                list.sort_by_key(|c| std::cmp::Reverse(c.seq));
                let latest = list[0];
                match self.load_checkpoint(latest) {
                    Ok(g) => {
                        globals.insert(stage, (latest.round, g));
                    }
                    Err(fault) => {
                        fallbacks.push(CheckpointFallback {
                            stage_index: stage,
                            stage: latest.stage.clone(),
                            round: latest.round,
                            path: latest.path.clone(),
                            fault,
                            resumed_from: list.get(1).map(|c| c.round),
                        });
                        keep = latest.seq as usize;
                        continue 'verify;
                    }
                }
            }
            break globals;
        };
        let discarded = stored.len() - keep;
        let fallbacks_json = serde_json::to_string(
            &fallbacks
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "stage": f.stage, "round": f.round, "path": f.path,
                        "fault": f.fault.to_string(), "resumed_from": f.resumed_from,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .expect("JSON");
        let tx = self.conn.transaction().map_err(|e| StoreError::Db {
            path: self.db.clone(),
            source: e,
        })?;
        let done = (|| {
            if discarded > 0 {
                tx.execute(
                    "DELETE FROM checkpoints WHERE run_id = ?1 AND seq >= ?2",
                    params![run_id, keep as i64],
                )?;
                tx.execute(
                    "DELETE FROM rounds WHERE run_id = ?1 AND seq >= ?2",
                    params![run_id, keep as i64],
                )?;
                tx.execute(
                    "UPDATE runs SET next_seq = ?2 WHERE run_id = ?1",
                    params![run_id, keep as i64],
                )?;
            }
            tx.execute(
                "INSERT INTO resumes (run_id, at_unix, from_rounds, discarded_rounds, fallbacks) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    run_id,
                    unix_now(),
                    keep as i64,
                    discarded as i64,
                    fallbacks_json
                ],
            )?;
            tx.commit()
        })();
        done.map_err(|e| self.db_err(e))?;
        Ok(Resume {
            run_id: run_id.to_string(),
            records: stored.into_iter().take(keep).map(|r| r.record).collect(),
            globals,
            fallbacks,
            discarded_rounds: discarded,
        })
    }

    /// Commits a closed round: writes the checkpoint files (FIT rounds that aggregated: the
    /// stage's new global model), then, in one transaction, the record, the checkpoint's
    /// reference and the round counter.
    pub fn commit_round(
        &mut self,
        record: &RoundRecord,
        global: Option<&GlobalSnapshot>,
    ) -> Result<CommitCost, StoreError> {
        let run_id = record.run_id.as_str();
        let t0 = Instant::now();
        let checkpoint = match global {
            Some(g) => Some(self.write_checkpoint(record, g)?),
            None => None,
        };
        let checkpoint_ms = t0.elapsed().as_secs_f64() * 1e3;
        let json = serde_json::to_string(record).expect("records serialize");
        let t1 = Instant::now();
        let tx = self.conn.transaction().map_err(|e| StoreError::Db {
            path: self.db.clone(),
            source: e,
        })?;
        let done =
            (|| {
                let seq: i64 = tx.query_row(
                    "SELECT next_seq FROM runs WHERE run_id = ?1",
                    [run_id],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "INSERT INTO rounds (run_id, seq, stage_index, round, kind, record_json, \
                 closed_unix) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        run_id,
                        seq,
                        record.stage_index as i64,
                        record.round,
                        record.kind.as_str(),
                        json,
                        unix_now()
                    ],
                )?;
                if let Some(c) = &checkpoint {
                    tx.execute(
                    "INSERT OR REPLACE INTO checkpoints (run_id, stage_index, stage, round, seq, \
                     path, sha256, keys_path, keys_sha256, bytes) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        run_id,
                        c.stage_index as i64,
                        c.stage,
                        c.round,
                        seq,
                        c.path.to_string_lossy(),
                        c.sha256,
                        c.keys_path.as_ref().map(|p| p.to_string_lossy().into_owned()),
                        c.keys_sha256,
                        c.bytes as i64
                    ],
                )?;
                }
                tx.execute(
                    "UPDATE runs SET next_seq = ?2 WHERE run_id = ?1",
                    params![run_id, seq + 1],
                )?;
                tx.commit()
            })();
        done.map_err(|e| self.db_err(e))?;
        Ok(CommitCost {
            checkpoint_ms,
            transaction_ms: t1.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn write_checkpoint(
        &self,
        record: &RoundRecord,
        global: &GlobalSnapshot,
    ) -> Result<CheckpointRef, StoreError> {
        let rel_dir = Path::new(CHECKPOINT_DIR).join(&record.run_id);
        let dir = self.out_dir.join(&rel_dir);
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let base = format!("{}-r{:04}", record.stage, record.round);
        let rel = rel_dir.join(format!("{base}.safetensors"));
        let path = self.out_dir.join(&rel);
        let meta = BTreeMap::from([
            ("run_id".to_string(), record.run_id.clone()),
            ("stage".to_string(), record.stage.clone()),
            ("round".to_string(), record.round.to_string()),
        ]);
        let fail = |path: &Path, e: &dyn std::fmt::Display| StoreError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        simskip_data::tensors::write_named_safetensors(&path, &global.arrays, &meta)
            .map_err(|e| fail(&path, &e))?;
        let (sha256, mut bytes) = hash_file(&path).map_err(|e| fail(&path, &e))?;
        let (keys_path, keys_sha256) = match &global.keys {
            Some(keys) => {
                let rel = rel_dir.join(format!("{base}.keys.txt"));
                let path = self.out_dir.join(&rel);
                let mut text = keys.join("\n");
                text.push('\n');
                simskip_data::fsutil::write_atomic(&path, text.as_bytes())
                    .map_err(|e| fail(&path, &e))?;
                bytes += text.len() as u64;
                (Some(rel), Some(hex(&Sha256::digest(text.as_bytes()))))
            }
            None => (None, None),
        };
        Ok(CheckpointRef {
            stage_index: record.stage_index,
            stage: record.stage.clone(),
            round: record.round,
            seq: -1,
            path: rel,
            sha256,
            keys_path,
            keys_sha256,
            bytes,
        })
    }

    /// Reads a checkpoint back, verifying its hashes.
    pub fn load_checkpoint(&self, c: &CheckpointRef) -> Result<GlobalSnapshot, CheckpointFault> {
        let verify = |rel: &Path, expected: &str| -> Result<Vec<u8>, CheckpointFault> {
            let path = self.out_dir.join(rel);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CheckpointFault::Missing)
                }
                Err(e) => return Err(CheckpointFault::Unreadable(e.to_string())),
            };
            let got = hex(&Sha256::digest(&bytes));
            if got != expected {
                return Err(CheckpointFault::HashMismatch {
                    expected: expected.to_string(),
                    got,
                });
            }
            Ok(bytes)
        };
        verify(&c.path, &c.sha256)?;
        let (arrays, _) =
            simskip_data::tensors::read_named_safetensors(&self.out_dir.join(&c.path))
                .map_err(|e| CheckpointFault::Unreadable(e.to_string()))?;
        let keys = match (&c.keys_path, &c.keys_sha256) {
            (Some(p), Some(h)) => {
                let bytes = verify(p, h)?;
                let text = String::from_utf8(bytes)
                    .map_err(|e| CheckpointFault::Unreadable(e.to_string()))?;
                Some(text.lines().map(str::to_string).collect())
            }
            _ => None,
        };
        Ok(GlobalSnapshot { arrays, keys })
    }

    /// Absolute path of a checkpoint file.
    pub fn checkpoint_path(&self, c: &CheckpointRef) -> PathBuf {
        self.out_dir.join(&c.path)
    }

    /// Marks a run finished (it reached DONE): it will not be resumed.
    pub fn finish_run(&mut self, run_id: &str) -> Result<(), StoreError> {
        self.db(|c| {
            c.execute("UPDATE runs SET finished = 1 WHERE run_id = ?1", [run_id])
                .map(|_| ())
        })
    }

    /// Notes a registration of `name` in `run_id`.
    pub fn note_registration(&mut self, run_id: &str, name: &str) -> Result<(), StoreError> {
        let now = unix_now();
        self.db(|c| {
            c.execute(
                "INSERT INTO organisations (run_id, name, first_seen_unix, last_seen_unix, \
                 registrations) VALUES (?1, ?2, ?3, ?3, 1) \
                 ON CONFLICT (run_id, name) DO UPDATE SET last_seen_unix = ?3, \
                 registrations = registrations + 1",
                params![run_id, name, now],
            )
            .map(|_| ())
        })
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<RunInfo>, StoreError> {
        self.db(|c| {
            let mut st = c.prepare(
                "SELECT run_id, fingerprint, created_unix, finished, next_seq FROM runs \
                 ORDER BY created_unix, rowid",
            )?;
            let rows = st.query_map([], |r| {
                Ok(RunInfo {
                    run_id: r.get(0)?,
                    fingerprint: r.get(1)?,
                    created_unix: r.get(2)?,
                    finished: r.get(3)?,
                    rounds: r.get::<_, i64>(4)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// The organisations that registered in `run_id`: (name, registrations).
    pub fn organisations(&self, run_id: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.db(|c| {
            let mut st = c.prepare(
                "SELECT name, registrations FROM organisations WHERE run_id = ?1 ORDER BY name",
            )?;
            let rows = st.query_map([run_id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
    }

    /// How often `run_id` was resumed: (rounds it continued from, rounds discarded).
    pub fn resumes(&self, run_id: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        self.db(|c| {
            let mut st = c.prepare(
                "SELECT from_rounds, discarded_rounds FROM resumes WHERE run_id = ?1 \
                 ORDER BY rowid",
            )?;
            let rows = st.query_map([run_id], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?;
            rows.collect()
        })
    }

    /// The committed rounds of `run_id`, in order, with their checkpoints.
    pub fn rounds(&self, run_id: &str) -> Result<Vec<StoredRound>, StoreError> {
        let rows: Vec<(i64, String, i64)> = self.db(|c| {
            let mut st = c.prepare(
                "SELECT seq, record_json, closed_unix FROM rounds WHERE run_id = ?1 ORDER BY seq",
            )?;
            let rows = st.query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })?;
        let mut checkpoints: BTreeMap<i64, CheckpointRef> = self
            .checkpoints(run_id)?
            .into_iter()
            .map(|c| (c.seq, c))
            .collect();
        rows.into_iter()
            .map(|(seq, json, closed_unix)| {
                let record = serde_json::from_str(&json).map_err(|e| StoreError::BadRecord {
                    run_id: run_id.to_string(),
                    seq,
                    reason: e.to_string(),
                })?;
                Ok(StoredRound {
                    seq,
                    record,
                    closed_unix,
                    checkpoint: checkpoints.remove(&seq),
                })
            })
            .collect()
    }

    /// Every run's records, runs oldest first (the content of `metrics.jsonl`).
    pub fn all_records(&self) -> Result<Vec<RoundRecord>, StoreError> {
        let mut out = Vec::new();
        for run in self.runs()? {
            out.extend(self.rounds(&run.run_id)?.into_iter().map(|r| r.record));
        }
        Ok(out)
    }

    /// The checkpoints of `run_id`, in round order.
    pub fn checkpoints(&self, run_id: &str) -> Result<Vec<CheckpointRef>, StoreError> {
        self.db(|c| {
            let mut st = c.prepare(
                "SELECT stage_index, stage, round, seq, path, sha256, keys_path, keys_sha256, \
                 bytes FROM checkpoints WHERE run_id = ?1 ORDER BY seq",
            )?;
            let rows = st.query_map([run_id], |r| {
                Ok(CheckpointRef {
                    stage_index: r.get::<_, i64>(0)? as usize,
                    stage: r.get(1)?,
                    round: r.get(2)?,
                    seq: r.get(3)?,
                    path: PathBuf::from(r.get::<_, String>(4)?),
                    sha256: r.get(5)?,
                    keys_path: r.get::<_, Option<String>>(6)?.map(PathBuf::from),
                    keys_sha256: r.get(7)?,
                    bytes: r.get::<_, i64>(8)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// The checkpoint of `run_id` after FIT round `round` of `stage` (the only stage with
    /// such a checkpoint when `stage` is `None`).
    pub fn checkpoint_at(
        &self,
        run_id: &str,
        stage: Option<&str>,
        round: u32,
    ) -> Result<CheckpointRef, StoreError> {
        if !self.runs()?.iter().any(|r| r.run_id == run_id) {
            return Err(StoreError::UnknownRun {
                run_id: run_id.to_string(),
                db: self.db.clone(),
            });
        }
        let all: Vec<CheckpointRef> = self
            .checkpoints(run_id)?
            .into_iter()
            .filter(|c| c.round == round && stage.is_none_or(|s| s == c.stage))
            .collect();
        let what = match stage {
            Some(s) => format!("round {round} of stage {s:?}"),
            None => format!("round {round}"),
        };
        match &all[..] {
            [one] => Ok(one.clone()),
            [] => Err(StoreError::NoCheckpoint {
                run_id: run_id.to_string(),
                what,
            }),
            many => Err(StoreError::NoCheckpoint {
                run_id: run_id.to_string(),
                what: format!(
                    "{what} alone: stages {} have one; name the stage",
                    many.iter()
                        .map(|c| format!("{:?}", c.stage))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }
}

/// SHA-256 (hex) and size of a file.
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let bytes = std::fs::read(path)?;
    Ok((hex(&Sha256::digest(&bytes)), bytes.len() as u64))
}
