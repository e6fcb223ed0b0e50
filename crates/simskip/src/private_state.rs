//! What an organisation's daemon keeps in its own output folder so that, after its own crash
//! (`kill -9`, a power cut), it carries on where it was instead of redoing finished stages:
//!
//! * `stage2-input.json`: the stage-1 table the SimSkip stage refines, and its distance;
//! * `state/fede.safetensors`: the FedE stage's whole entity table (the rows that travel and
//!   the rows that stay home) and its local relations, after this organisation's latest task;
//! * `state/simskip-global.safetensors`: the last global SimSkip model it received.
//!
//! Every file is written atomically: a crash leaves the previous version or the new one.
//! Each state file names the stage it belongs to (index and name), and is used only for that
//! stage. Nothing here leaves the organisation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use simskip_data::{read_named_safetensors, write_named_safetensors, Matrix, NamedArray};
use simskip_fed::StageInfo;
use simskip_kge::{Norm, TransE};

/// The file naming the stage-1 table, so a restarted client resumes stage 2.
const STAGE2_INPUT_RECORD: &str = "stage2-input.json";
const STATE_DIR: &str = "state";
const FEDE_FILE: &str = "fede.safetensors";
const SIMSKIP_GLOBAL_FILE: &str = "simskip-global.safetensors";
const ENTITIES_TENSOR: &str = "entities";
const RELATIONS_TENSOR: &str = "relations";
const STAGE_INDEX_KEY: &str = "stage_index";
const STAGE_NAME_KEY: &str = "stage_name";
const NORM_KEY: &str = "norm";

/// The table stage 2 refines, and the distance its link-prediction figures use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stage2Record {
    pub path: PathBuf,
    pub norm: Norm,
}

/// A FedE stage's local model as it was after this organisation's latest task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KeptFedE {
    pub stage: usize,
    pub stage_name: String,
    pub model: TransE,
}

impl KeptFedE {
    /// Whether this is `stage`'s model, of its width.
    pub fn is_for(&self, stage: &StageInfo, dim: usize) -> bool {
        self.stage == stage.index && self.stage_name == stage.name && self.model.dim() == dim
    }
}

/// The organisation's private folder, as far as resuming goes.
#[derive(Debug, Clone)]
pub(crate) struct PrivateState {
    out_dir: PathBuf,
}

impl PrivateState {
    pub fn new(out_dir: &Path) -> Self {
        Self {
            out_dir: out_dir.to_path_buf(),
        }
    }

    fn state_file(&self, name: &str) -> PathBuf {
        self.out_dir.join(STATE_DIR).join(name)
    }

    /// Where the files of the state are (the stage-1 record sits beside them, in the
    /// output folder itself).
    pub fn fede_path(&self) -> PathBuf {
        self.state_file(FEDE_FILE)
    }

    pub fn stage2_record(&self) -> Result<Option<Stage2Record>> {
        let path = self.out_dir.join(STAGE2_INPUT_RECORD);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let record = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a stage-2 record", path.display()))?;
        Ok(Some(record))
    }

    pub fn write_stage2_record(&self, record: &Stage2Record) -> Result<()> {
        std::fs::create_dir_all(&self.out_dir)
            .with_context(|| format!("creating {}", self.out_dir.display()))?;
        simskip_data::write_atomic(
            &self.out_dir.join(STAGE2_INPUT_RECORD),
            serde_json::to_string(record)?.as_bytes(),
        )?;
        Ok(())
    }

    /// The FedE model kept after the latest task, checked against this organisation's
    /// graph (`entities` rows, `relations` rows).
    pub fn fede(&self, entities: usize, relations: usize) -> Result<Option<KeptFedE>> {
        let path = self.fede_path();
        if !path.is_file() {
            return Ok(None);
        }
        let (arrays, meta) = read_named_safetensors(&path)?;
        let stage = stage_of(&meta, &path)?;
        let norm: Norm = serde_json::from_str(meta.get(NORM_KEY).map_or("", String::as_str))
            .with_context(|| format!("{}: no valid '{NORM_KEY}'", path.display()))?;
        let matrix = |name: &str, rows: usize| -> Result<Matrix> {
            let Some(a) = arrays.iter().find(|a| a.name == name) else {
                bail!("{}: no '{name}' tensor", path.display());
            };
            if a.shape.len() != 2 || a.shape[0] != rows {
                bail!(
                    "{}: '{name}' has shape {:?}; this organisation holds {rows} rows",
                    path.display(),
                    a.shape
                );
            }
            Ok(Matrix::from_vec(a.shape[0], a.shape[1], a.data.clone()))
        };
        let model = TransE {
            entities: matrix(ENTITIES_TENSOR, entities)?,
            relations: matrix(RELATIONS_TENSOR, relations)?,
            norm,
        };
        if model.entities.cols != model.relations.cols {
            bail!("{}: entities and relations differ in width", path.display());
        }
        Ok(Some(KeptFedE {
            stage: stage.0,
            stage_name: stage.1,
            model,
        }))
    }

    pub fn keep_fede(&self, stage: &StageInfo, model: &TransE) -> Result<()> {
        let arrays = [
            NamedArray::new(
                ENTITIES_TENSOR,
                vec![model.entities.rows, model.entities.cols],
                model.entities.data.clone(),
            ),
            NamedArray::new(
                RELATIONS_TENSOR,
                vec![model.relations.rows, model.relations.cols],
                model.relations.data.clone(),
            ),
        ];
        let mut meta = stage_meta(stage);
        meta.insert(NORM_KEY.into(), serde_json::to_string(&model.norm)?);
        self.write(FEDE_FILE, &arrays, &meta)
    }

    /// The last global model received in `stage`, if it was kept.
    pub fn simskip_global(&self, stage: &StageInfo) -> Result<Option<Vec<NamedArray>>> {
        let path = self.state_file(SIMSKIP_GLOBAL_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let (arrays, meta) = read_named_safetensors(&path)?;
        let kept = stage_of(&meta, &path)?;
        Ok((kept == (stage.index, stage.name.clone())).then_some(arrays))
    }

    pub fn keep_simskip_global(&self, stage: &StageInfo, arrays: &[NamedArray]) -> Result<()> {
        self.write(SIMSKIP_GLOBAL_FILE, arrays, &stage_meta(stage))
    }

    fn write(
        &self,
        name: &str,
        arrays: &[NamedArray],
        meta: &BTreeMap<String, String>,
    ) -> Result<()> {
        let path = self.state_file(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_named_safetensors(&path, arrays, meta)
            .with_context(|| format!("keeping {}", path.display()))
    }
}

fn stage_meta(stage: &StageInfo) -> BTreeMap<String, String> {
    BTreeMap::from([
        (STAGE_INDEX_KEY.into(), stage.index.to_string()),
        (STAGE_NAME_KEY.into(), stage.name.clone()),
    ])
}

fn stage_of(meta: &BTreeMap<String, String>, path: &Path) -> Result<(usize, String)> {
    let index = meta
        .get(STAGE_INDEX_KEY)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no valid '{STAGE_INDEX_KEY}'", path.display()))?;
    let name = meta
        .get(STAGE_NAME_KEY)
        .with_context(|| format!("{}: no '{STAGE_NAME_KEY}'", path.display()))?;
    Ok((index, name.clone()))
}
