//! What a client does with its private graph when the coordinator asks: FedE rounds of local
//! TransE (relations never leave), then local SimSkip copies of the federated model, and the
//! evaluation tasks on input and refined tables. Only entity rows (stage 1), model weights
//! (stage 2) and figures are returned; triples, labels and embeddings stay here.
//!
//! Every task carries its stage's typed parameters ([`StageParams`]): the organisation trains
//! exactly what the coordinator configured, with its own compute settings
//! ([`ComputeSettings`]), and judges the result on its own held-out data ([`GateSettings`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use simskip_data::{Embeddings, KgDataset, Matrix, NamedArray};
use simskip_eval::TaskFigures;
use simskip_fed::client::{ClientWork, EvalOutput, FitOutput};
use simskip_fed::{SimSkipParams, StageInfo, StageParams, WorkError, ENTITIES};
use simskip_kge::{FilterIndex, Norm, TransE, TransEConfig, TransETrainer};
use simskip_refine::{Backend, Neighbours, Positives, SimSkipConfig, SimSkipTrainer};

use crate::pipeline::refine::training_neighbours;
use crate::pipeline::{evaluate_table, EvalContext};
use crate::private_state::{KeptFedE, PrivateState, Stage2Record};
use crate::settings::{EvalSettings, GateSettings};

/// How this organisation computes: its own choice, never sent to or by the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeSettings {
    /// Implementation of the SimSkip training step.
    pub simskip_backend: Backend,
    /// Threads of the fast SimSkip backend (0: all cores, 1: the calling thread).
    pub threads: usize,
}

/// The organisation's own settings for the federated work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkSettings {
    pub compute: ComputeSettings,
    pub gate: GateSettings,
    pub eval: EvalSettings,
}

/// A stage-1 table in memory.
struct Stage2Input {
    table: Matrix,
    norm: Norm,
}

/// A FedE stage under way: the local TransE (relation rows and optimiser state stay here).
struct Embedding {
    stage: usize,
    stage_name: String,
    transe: TransETrainer,
}

/// A SimSkip stage under way: the local copy of the shared model, built from the stage's
/// parameters, and the table it refines.
struct Refining {
    stage: usize,
    params: SimSkipParams,
    input: Stage2Input,
    trainer: SimSkipTrainer,
    neighbours: Option<Neighbours>,
}

/// Where this organisation is in the run.
enum Progress {
    /// No stage-1 table yet.
    Start,
    Embedding(Box<Embedding>),
    /// A stage-1 table exists (from a FedE stage, a given file, or a restart).
    Embedded(Stage2Input),
    Refining(Box<Refining>),
}

/// A client's private state across the run.
pub struct FederatedWork {
    ds: KgDataset,
    out_dir: PathBuf,
    settings: WorkSettings,
    filter: FilterIndex,
    progress: Progress,
    /// What this organisation keeps in its folder to carry on after its own crash.
    state: PrivateState,
    /// The FedE model kept before a restart, until the stage it belongs to uses it.
    kept_fede: Option<KeptFedE>,
}

impl FederatedWork {
    /// `input_embeddings`: a table for stage 2 when there is no stage 1 (rows matched by name).
    /// A restarted client picks its stage-1 table back up from its own output folder, or,
    /// without one, the FedE model it kept after its latest task.
    pub fn new(
        ds: KgDataset,
        out_dir: PathBuf,
        settings: WorkSettings,
        input_embeddings: Option<&Path>,
    ) -> Result<Self> {
        let state = PrivateState::new(&out_dir);
        let mut kept_fede = None;
        let progress = match input_embeddings {
            Some(path) => Progress::Embedded(Stage2Input {
                table: crate::cli::load_table(path, &ds)?,
                norm: TransEConfig::default().norm,
            }),
            None => match state.stage2_record()? {
                Some(record) => Progress::Embedded(Stage2Input {
                    table: crate::cli::load_table(&record.path, &ds)?,
                    norm: record.norm,
                }),
                None => {
                    kept_fede = state.fede(ds.num_entities(), ds.num_relations())?;
                    if let Some(k) = &kept_fede {
                        tracing::info!(
                            stage = %k.stage_name,
                            "resuming from the FedE model kept in {}",
                            state.fede_path().display()
                        );
                    }
                    Progress::Start
                }
            },
        };
        Ok(Self {
            filter: FilterIndex::from_dataset(&ds),
            ds,
            out_dir,
            settings,
            progress,
            state,
            kept_fede,
        })
    }

    /// An organisation whose stage-2 table is given in memory (rows aligned with `ds`'s
    /// entities), for a federation run in one process.
    pub fn with_table(
        ds: KgDataset,
        out_dir: PathBuf,
        settings: WorkSettings,
        table: Matrix,
        norm: Norm,
    ) -> Result<Self> {
        anyhow::ensure!(
            table.rows == ds.num_entities(),
            "a table of {} rows for {} entities",
            table.rows,
            ds.num_entities()
        );
        Ok(Self {
            filter: FilterIndex::from_dataset(&ds),
            ds,
            state: PrivateState::new(&out_dir),
            out_dir,
            settings,
            progress: Progress::Embedded(Stage2Input { table, norm }),
            kept_fede: None,
        })
    }

    /// The local TransE of this FedE stage with the coordinator's rows of our entities
    /// installed; created on the stage's first task (relations start random and stay local).
    fn embedding(
        &mut self,
        stage: &StageInfo,
        cfg: &TransEConfig,
        global: Vec<NamedArray>,
    ) -> Result<&mut TransETrainer> {
        let rows = entity_rows(global, self.ds.num_entities(), cfg.dim)?;
        match &mut self.progress {
            Progress::Embedding(e) if e.stage == stage.index => e.transe.set_entities(rows),
            _ => {
                // After a restart the local relations come back from the kept model; they
                // never travel, so nobody else could return them.
                let mut model = match self.kept_fede.take() {
                    Some(k) if k.is_for(stage, cfg.dim) && k.model.norm == cfg.norm => k.model,
                    _ => {
                        let mut rng =
                            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.seed);
                        TransE::init(
                            self.ds.num_entities(),
                            self.ds.num_relations(),
                            cfg,
                            &mut rng,
                        )
                    }
                };
                model.entities = rows;
                self.progress = Progress::Embedding(Box::new(Embedding {
                    stage: stage.index,
                    stage_name: stage.name.clone(),
                    transe: TransETrainer::from_model(model, cfg.clone()),
                }));
            }
        }
        match &mut self.progress {
            Progress::Embedding(e) => Ok(&mut e.transe),
            _ => unreachable!("set just above"),
        }
    }

    /// The local copy of this SimSkip stage's model with the global weights installed; built
    /// from the stage's parameters on its first task. Refuses a model whose width is not this
    /// organisation's table's, and weights that do not fit the model.
    fn refining(
        &mut self,
        stage: &StageInfo,
        params: &SimSkipParams,
        global: &[NamedArray],
    ) -> Result<&mut Refining> {
        let current = matches!(&self.progress,
            Progress::Refining(r) if r.stage == stage.index && r.params == *params);
        if !current {
            // The FedE stage's FINISH task never reached this organisation (it was away when
            // that round closed, and perhaps restarted since): its stage-1 table is the latest
            // FedE model it holds or kept, rather than sitting out the stage.
            let latest = match &self.progress {
                Progress::Embedding(e) => Some((e.stage_name.clone(), e.transe.model().clone())),
                Progress::Start => self.kept_fede.take().map(|k| (k.stage_name, k.model)),
                Progress::Embedded(_) | Progress::Refining(_) => None,
            };
            if let Some((fede_stage, model)) = latest {
                tracing::warn!(
                    stage = %stage.name,
                    "no stage-1 table: refining the latest FedE rows this organisation holds"
                );
                self.adopt_stage1(&fede_stage, model.entities, model.norm)?;
            }
            let table_dim = match &self.progress {
                Progress::Embedded(i) => i.table.cols,
                Progress::Refining(r) => r.input.table.cols,
                Progress::Start | Progress::Embedding(_) => bail!(
                    "stage {:?} refines a stage-1 table, and this organisation has none: run a FedE stage first or give the client an embeddings file",
                    stage.name
                ),
            };
            if table_dim != params.dim {
                bail!(
                    "stage {:?} trains a {}-wide model, but this organisation's table is {table_dim}-wide",
                    stage.name,
                    params.dim
                );
            }
            let cfg = SimSkipConfig {
                backend: self.settings.compute.simskip_backend,
                fast_threads: self.settings.compute.threads,
                ..params.config.clone()
            };
            let neighbours = match cfg.positives {
                Positives::Neighbour => Some(training_neighbours(&self.ds)?),
                Positives::Augment => None,
            };
            let mut trainer = SimSkipTrainer::new(params.dim, cfg)?;
            // After a restart: the last global model this organisation received, until the
            // task brings the coordinator's.
            if let Some(kept) = self.state.simskip_global(stage)? {
                match trainer.import(&kept) {
                    Ok(()) => {
                        tracing::info!(stage = %stage.name, "resumed from the kept global model")
                    }
                    Err(e) => {
                        tracing::warn!(stage = %stage.name, "the kept global model does not fit: {e:#}")
                    }
                }
            }
            let input = match std::mem::replace(&mut self.progress, Progress::Start) {
                Progress::Embedded(i) => i,
                Progress::Refining(r) => r.input,
                _ => unreachable!("checked above"),
            };
            self.progress = Progress::Refining(Box::new(Refining {
                stage: stage.index,
                params: params.clone(),
                input,
                trainer,
                neighbours,
            }));
        }
        let Progress::Refining(r) = &mut self.progress else {
            unreachable!("set just above")
        };
        if !global.is_empty() {
            let installed = if params.personalization.keeps_batch_norm_local() {
                // FedBN: this organisation's BatchNorm stays its own.
                r.trainer
                    .import_keeping(global, |p| p.spec().kind.is_batch_norm())
            } else {
                r.trainer.import(global)
            };
            installed.with_context(|| format!("the global model of stage {:?}", stage.name))?;
            self.state.keep_simskip_global(stage, global)?;
        }
        // FedProx: local training is anchored at the global model just installed.
        r.trainer
            .anchor_proximal(params.personalization.proximal_mu())
            .with_context(|| format!("stage {:?}", stage.name))?;
        Ok(r)
    }

    /// Makes `table` this organisation's stage-1 table: written to `<stage>/entities.npy`
    /// and named in the stage-2 record, so later restarts start from it too.
    fn adopt_stage1(&mut self, stage_name: &str, table: Matrix, norm: Norm) -> Result<()> {
        let path = self.write_table(stage_name, &table)?;
        self.state.write_stage2_record(&Stage2Record {
            path: path.clone(),
            norm,
        })?;
        tracing::info!(path = %path.display(), "wrote stage-1 entity embeddings");
        self.progress = Progress::Embedded(Stage2Input { table, norm });
        Ok(())
    }

    fn write_table(&self, sub: &str, x: &Matrix) -> Result<PathBuf> {
        let dir = self.out_dir.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let emb = Embeddings::new(self.ds.entities.clone(), x.clone())?;
        let path = dir.join("entities.npy");
        emb.write_npy(&path)?;
        emb.write_safetensors(&dir.join("entities.safetensors"))?;
        Ok(path)
    }

    fn fit(&mut self, stage: &StageInfo, global: Vec<NamedArray>) -> Result<FitOutput> {
        let num_triples = self.ds.train.len() as u64;
        let num_entities = self.ds.num_entities() as u64;
        match &stage.params {
            StageParams::FedE(cfg) => {
                self.embedding(stage, cfg, global)?;
                let Progress::Embedding(embedding) = &mut self.progress else {
                    unreachable!("embedding() left this state")
                };
                let mut loss = f32::NAN;
                for _ in 0..cfg.epochs {
                    loss = embedding.transe.train_epoch(&self.ds.train);
                }
                self.state.keep_fede(stage, embedding.transe.model())?;
                let e = &embedding.transe.model().entities;
                Ok(FitOutput {
                    arrays: vec![NamedArray::new(
                        ENTITIES,
                        vec![e.rows, e.cols],
                        e.data.clone(),
                    )],
                    num_examples: num_triples,
                    metrics: BTreeMap::from([("loss".to_owned(), loss as f64)]),
                })
            }
            StageParams::SimSkip(p) => {
                let r = self.refining(stage, p, &global)?;
                let mut loss = f32::NAN;
                for _ in 0..p.config.epochs {
                    loss = r
                        .trainer
                        .train_epoch(&r.input.table, r.neighbours.as_ref())?
                        .loss;
                }
                Ok(FitOutput {
                    arrays: r.trainer.export(),
                    // One sample per entity row per epoch: the FedAvg weight.
                    num_examples: num_entities,
                    metrics: BTreeMap::from([("loss".to_owned(), loss as f64)]),
                })
            }
        }
    }

    fn evaluate(&mut self, stage: &StageInfo, global: Vec<NamedArray>) -> Result<EvalOutput> {
        match &stage.params {
            StageParams::FedE(cfg) => {
                self.embedding(stage, cfg, global)?;
                let Progress::Embedding(e) = &self.progress else {
                    unreachable!("embedding() left this state")
                };
                let model = e.transe.model();
                self.state.keep_fede(stage, model)?;
                let mut metrics = BTreeMap::new();
                for (split, triples) in [("valid", &self.ds.valid), ("test", &self.ds.test)] {
                    let m = simskip_kge::evaluate(
                        &model.entities,
                        &model.relations,
                        model.norm,
                        triples,
                        &self.filter,
                    );
                    for (name, v) in [
                        ("mrr", m.mrr),
                        ("hits_at_1", m.hits_at_1),
                        ("hits_at_3", m.hits_at_3),
                        ("hits_at_10", m.hits_at_10),
                        ("tail_mrr", m.tail.mrr),
                    ] {
                        metrics.insert(format!("{split}.{name}"), v);
                    }
                }
                Ok(EvalOutput {
                    num_examples: self.ds.test.len() as u64,
                    metrics,
                })
            }
            StageParams::SimSkip(p) => {
                let r = self.refining(stage, p, &global)?;
                let refined = r.trainer.refine(&r.input.table)?;
                let norm = r.input.norm;
                let Progress::Refining(r) = &self.progress else {
                    unreachable!("refining() left this state")
                };
                let ctx = EvalContext::new(&self.ds, self.settings.eval.clone(), norm);
                let mut metrics = BTreeMap::new();
                flatten(
                    "input",
                    &evaluate_table(&ctx, &r.input.table)?,
                    &mut metrics,
                );
                flatten("refined", &evaluate_table(&ctx, &refined)?, &mut metrics);
                Ok(EvalOutput {
                    num_examples: self.ds.num_entities() as u64,
                    metrics,
                })
            }
        }
    }

    fn finish_stage(&mut self, stage: &StageInfo, global: Vec<NamedArray>) -> Result<()> {
        match &stage.params {
            StageParams::FedE(cfg) => {
                let model = self.embedding(stage, cfg, global)?.model().clone();
                self.state.keep_fede(stage, &model)?;
                self.adopt_stage1(&stage.name, model.entities, model.norm)?;
            }
            StageParams::SimSkip(p) => {
                let r = self.refining(stage, p, &global)?;
                // Fine-tuning: the final global model trains on this organisation's own table
                // before the gate judges it (without the proximal term: it is the last visit).
                let fine_tune = p.personalization.fine_tune_epochs();
                if fine_tune > 0 {
                    r.trainer.anchor_proximal(None)?;
                    for _ in 0..fine_tune {
                        r.trainer
                            .train_epoch(&r.input.table, r.neighbours.as_ref())?;
                    }
                }
                let refined = r.trainer.refine(&r.input.table)?;
                let norm = r.input.norm;
                let Progress::Refining(r) = &self.progress else {
                    unreachable!("refining() left this state")
                };
                let input = &r.input.table;
                // The federated model is shared; whether it helps this organisation's table is
                // decided here, on this client's own held-out data.
                let ctx = EvalContext::new(&self.ds, self.settings.eval.clone(), norm);
                let gate = crate::pipeline::gate::gate(&ctx, &self.settings.gate, input, &refined)?;
                // With a settings search, the federated output is one candidate among the
                // organisation's own fine-tunings of the federated model.
                let search = if self.settings.gate.enabled && self.settings.gate.search.enabled() {
                    let outcome = crate::pipeline::search::search(
                        &ctx,
                        input,
                        // The stage's settings with this organisation's backend and threads.
                        r.trainer.config(),
                        Some(&r.trainer.export()),
                        r.neighbours.as_ref(),
                        Some((&refined, &gate)),
                        &self.settings.gate,
                    )?;
                    tracing::info!(stage = %stage.name, "{}", outcome.summary());
                    Some(outcome)
                } else {
                    None
                };
                let (keep_refined, output) = match &search {
                    Some(s) => (s.chosen.is_some(), &s.output),
                    None if !self.settings.gate.enabled || gate.keep_refined => (true, &refined),
                    None => (false, input),
                };
                let path = self.write_table(&stage.name, output)?;
                // After fine-tuning or a search, the kept table is no longer the federated
                // model's output that the last evaluation scored: the organisation scores what
                // it keeps.
                let mut kept_figures = BTreeMap::new();
                if fine_tune > 0 || search.is_some() {
                    flatten("", &evaluate_table(&ctx, output)?, &mut kept_figures);
                }
                let primary = &gate.scores[0];
                let decision = serde_json::json!({
                    "signal": gate.signal,
                    "input": primary.input,
                    "refined": primary.refined,
                    "gate": self.settings.gate.enabled,
                    "output": if keep_refined { "refined" } else { "input" },
                    "reason": match &search {
                        Some(s) => format!("{}; the federated output alone: {}", s.summary(), gate.reason),
                        None => gate.reason.clone(),
                    },
                    "tolerance": gate.tolerance,
                    "scores": gate.scores,
                    "fine_tune_epochs": fine_tune,
                    "kept_figures": kept_figures,
                    "search": search,
                });
                crate::report::write_json(
                    &self.out_dir.join(&stage.name).join("gate.json"),
                    &decision,
                )?;
                tracing::info!(path = %path.display(), %decision, "wrote refined entity embeddings");
            }
        }
        Ok(())
    }
}

/// The federation library carries the organisation's errors as messages; keep the chain.
fn work_error(e: anyhow::Error) -> WorkError {
    format!("{e:#}").into()
}

impl ClientWork for FederatedWork {
    fn entity_keys(&self) -> Vec<String> {
        self.ds.entities.names().to_vec()
    }

    fn kept_rows(&self, stage: &StageInfo) -> Option<Vec<f32>> {
        let StageParams::FedE(cfg) = &stage.params else {
            return None;
        };
        self.kept_fede
            .as_ref()
            .filter(|k| k.is_for(stage, cfg.dim))
            .map(|k| k.model.entities.data.clone())
    }

    /// The most this organisation ever reports: FedE weighs by training triples, SimSkip by
    /// entity rows. The coordinator caps every claim by it.
    fn num_examples(&self) -> u64 {
        self.ds.train.len().max(self.ds.num_entities()) as u64
    }

    fn fit(
        &mut self,
        stage: &StageInfo,
        _round: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        FederatedWork::fit(self, stage, global).map_err(work_error)
    }

    fn evaluate(
        &mut self,
        stage: &StageInfo,
        _round: u32,
        global: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        FederatedWork::evaluate(self, stage, global).map_err(work_error)
    }

    fn finish_stage(
        &mut self,
        stage: &StageInfo,
        global: Vec<NamedArray>,
    ) -> Result<(), WorkError> {
        FederatedWork::finish_stage(self, stage, global).map_err(work_error)
    }
}

/// The coordinator's rows of this organisation's entities, checked before they are used:
/// one `[entities, dim]` array of finite values.
fn entity_rows(global: Vec<NamedArray>, entities: usize, dim: usize) -> Result<Matrix> {
    let rows = global
        .into_iter()
        .find(|a| a.name == ENTITIES)
        .ok_or_else(|| anyhow!("the coordinator sent no '{ENTITIES}' array"))?;
    if rows.shape != [entities, dim] || rows.data.len() != entities * dim {
        bail!(
            "the coordinator sent '{ENTITIES}' of shape {:?}; this organisation holds {entities} entities of dim {dim}",
            rows.shape
        );
    }
    if let Some(i) = rows.data.iter().position(|v| !v.is_finite()) {
        bail!(
            "the coordinator sent a non-finite value in '{ENTITIES}' (row {}): refused",
            i / dim
        );
    }
    Ok(Matrix::from_vec(entities, dim, rows.data))
}

fn flatten(prefix: &str, f: &TaskFigures, out: &mut BTreeMap<String, f64>) {
    let pairs = [
        ("knn_at_10", f.knn_at_10),
        ("probe_accuracy", f.probe_accuracy),
        ("probe_macro_f1", f.probe_macro_f1),
        ("lp_mrr", f.lp_mrr),
        ("lp_hits_at_10", f.lp_hits_at_10),
    ];
    for (name, value) in pairs {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            let key = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}.{name}")
            };
            out.insert(key, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simskip_fed::StageKind;

    /// An organisation holding bundled WordNet-5k with a given `dim`-wide stage-2 table.
    fn organisation(dim: usize, out: &Path) -> FederatedWork {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/wordnet-5k");
        let ds = KgDataset::load(&root).unwrap();
        let n = ds.num_entities();
        let table = Matrix::from_vec(n, dim, (0..n * dim).map(|i| (i % 7) as f32 * 0.1).collect());
        let path = out.join("input.npy");
        Embeddings::new(ds.entities.clone(), table)
            .unwrap()
            .write_npy(&path)
            .unwrap();
        FederatedWork::new(ds, out.join("org"), WorkSettings::default(), Some(&path)).unwrap()
    }

    fn simskip_stage(dim: usize) -> StageInfo {
        StageInfo {
            index: 1,
            name: "simskip".into(),
            rounds: 1,
            params: StageParams::defaults(StageKind::FedAvg, dim),
            privacy: None,
        }
    }

    #[test]
    fn a_task_for_another_architecture_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut org = organisation(8, dir.path());
        // The stage trains a 16-wide model; this organisation's table is 8-wide.
        let e = ClientWork::fit(&mut org, &simskip_stage(16), 1, vec![]).unwrap_err();
        assert!(e.to_string().contains("16-wide model"), "{e}");
        let weights = |dim| {
            SimSkipTrainer::new(dim, SimSkipConfig::default())
                .unwrap()
                .export()
        };
        // Right width, but weights of a 16-wide model: refused before training.
        let e = ClientWork::fit(&mut org, &simskip_stage(8), 1, weights(16)).unwrap_err();
        assert!(e.to_string().contains("global model"), "{e}");
        // Weights of the stage's own architecture train, and come back in the same shapes.
        let own = weights(8);
        let out = ClientWork::fit(&mut org, &simskip_stage(8), 1, own.clone()).unwrap();
        let shapes = |a: &[NamedArray]| {
            a.iter()
                .map(|x| (x.name.clone(), x.shape.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(shapes(&out.arrays), shapes(&own));
        assert_ne!(out.arrays, own, "a local epoch changes the weights");
    }

    fn stage_with(dim: usize, personalization: simskip_fed::Personalization) -> StageInfo {
        let mut stage = simskip_stage(dim);
        if let StageParams::SimSkip(p) = &mut stage.params {
            p.personalization = personalization;
        }
        stage
    }

    #[test]
    fn fedbn_installs_the_global_model_but_keeps_this_organisations_batch_norm() {
        use simskip_refine::Param;
        let dir = tempfile::tempdir().unwrap();
        let mut org = organisation(8, dir.path());
        let stage = stage_with(8, simskip_fed::Personalization::FedBn);
        let initial = SimSkipTrainer::new(8, SimSkipConfig::default())
            .unwrap()
            .export();
        // A round trains the local copy: its BatchNorm statistics move.
        ClientWork::fit(&mut org, &stage, 1, initial.clone()).unwrap();
        let Progress::Refining(r) = &org.progress else {
            panic!("refining")
        };
        let local_mean = r.trainer.weights().get(Param::Bn1RunningMean).to_vec();
        // The next global model: every value 0.25 (BatchNorm included).
        let global: Vec<NamedArray> = initial
            .iter()
            .map(|a| NamedArray::new(a.name.clone(), a.shape.clone(), vec![0.25; a.data.len()]))
            .collect();
        let StageParams::SimSkip(params) = stage.params.clone() else {
            unreachable!()
        };
        let r = org.refining(&stage, &params, &global).unwrap();
        let w = r.trainer.weights();
        assert_eq!(w.get(Param::Bn1RunningMean), local_mean.as_slice());
        assert!(w.get(Param::Bn2Weight).iter().all(|&v| v != 0.25));
        assert!(w.get(Param::OutWeight).iter().all(|&v| v == 0.25));
        assert!(w.get(Param::Linear1Weight).iter().all(|&v| v == 0.25));
    }

    #[test]
    fn fedprox_on_the_candle_backend_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/wordnet-5k");
        let ds = KgDataset::load(&root).unwrap();
        let n = ds.num_entities();
        let table = Matrix::from_vec(n, 8, (0..n * 8).map(|i| (i % 5) as f32 * 0.1).collect());
        let settings = WorkSettings {
            compute: ComputeSettings {
                simskip_backend: simskip_refine::Backend::Candle,
                threads: 1,
            },
            ..WorkSettings::default()
        };
        let mut org =
            FederatedWork::with_table(ds, dir.path().join("org"), settings, table, Norm::L1)
                .unwrap();
        let stage = stage_with(8, simskip_fed::Personalization::FedProx { mu: 0.01 });
        let e = ClientWork::fit(&mut org, &stage, 1, vec![]).unwrap_err();
        assert!(e.to_string().contains("simskip_backend"), "{e}");
    }

    fn wordnet() -> KgDataset {
        KgDataset::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/wordnet-5k"))
            .unwrap()
    }

    fn fede_stage(dim: usize) -> StageInfo {
        let StageParams::FedE(mut cfg) = StageParams::defaults(StageKind::FedE, dim) else {
            unreachable!()
        };
        cfg.epochs = 1;
        StageInfo {
            index: 0,
            name: "fede".into(),
            rounds: 1,
            params: StageParams::FedE(cfg),
            privacy: None,
        }
    }

    /// The coordinator's rows of all `n` entities, `dim` wide, drawn from `seed`.
    fn global_rows(n: usize, dim: usize, seed: u64) -> Vec<NamedArray> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data = (0..n * dim).map(|_| rng.random_range(-0.5..0.5)).collect();
        vec![NamedArray::new(ENTITIES, vec![n, dim], data)]
    }

    #[test]
    fn a_client_restarted_in_fede_keeps_its_relations_and_its_whole_table() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("org");
        let start = || FederatedWork::new(wordnet(), out.clone(), WorkSettings::default(), None);
        let stage = fede_stage(8);
        let mut org = start().unwrap();
        let n = org.ds.num_entities();
        let fitted = ClientWork::fit(&mut org, &stage, 1, global_rows(n, 8, 1)).unwrap();
        let rows = global_rows(n, 8, 2);
        let before = ClientWork::evaluate(&mut org, &stage, 1, rows.clone()).unwrap();
        drop(org); // the process dies

        // Restarted: the same link-prediction figures for the same rows from the coordinator,
        // since the local relations (which never travel) came back from the private folder.
        let mut restarted = start().unwrap();
        // The rows its last task left (they fill the rows that stay home).
        assert_eq!(
            ClientWork::kept_rows(&restarted, &stage),
            Some(rows[0].data.clone())
        );
        assert_eq!(ClientWork::kept_rows(&restarted, &fede_stage(16)), None);
        let after = ClientWork::evaluate(&mut restarted, &stage, 1, rows.clone()).unwrap();
        assert_eq!(after, before);
        // Without its folder, an organisation starts with other relations, and other figures.
        let fresh_dir = tempfile::tempdir().unwrap();
        let mut fresh = FederatedWork::new(
            wordnet(),
            fresh_dir.path().into(),
            WorkSettings::default(),
            None,
        )
        .unwrap();
        let other = ClientWork::evaluate(&mut fresh, &stage, 1, rows).unwrap();
        assert_ne!(other.metrics, before.metrics);
        assert_eq!(fitted.arrays[0].shape, vec![n, 8]);
    }

    #[test]
    fn a_client_away_for_the_fede_finish_refines_the_rows_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("org");
        let start = || FederatedWork::new(wordnet(), out.clone(), WorkSettings::default(), None);
        let mut org = start().unwrap();
        let n = org.ds.num_entities();
        let fitted = ClientWork::fit(&mut org, &fede_stage(8), 3, global_rows(n, 8, 1)).unwrap();
        drop(org); // killed before the FedE stage's FINISH reached it

        // Restarted in the SimSkip stage: it takes part, refining the table it kept.
        let mut restarted = start().unwrap();
        let stage = simskip_stage(8);
        let out_fit = ClientWork::fit(&mut restarted, &stage, 1, vec![]).unwrap();
        assert!(!out_fit.arrays.is_empty());
        // The table is now its stage-1 table, on disk for later restarts too.
        let stage1 = Embeddings::read(&out.join("fede/entities.npy")).unwrap();
        assert_eq!(stage1.matrix.data, fitted.arrays[0].data);
        let again = start().unwrap();
        let Progress::Embedded(input) = &again.progress else {
            panic!("a restart after that starts from the stage-1 table")
        };
        assert_eq!(input.table.data, fitted.arrays[0].data);
        // An organisation with no FedE model at all still cannot refine.
        let empty = tempfile::tempdir().unwrap();
        let mut none = FederatedWork::new(
            wordnet(),
            empty.path().into(),
            WorkSettings::default(),
            None,
        )
        .unwrap();
        let e = ClientWork::fit(&mut none, &stage, 1, vec![]).unwrap_err();
        assert!(e.to_string().contains("has none"), "{e}");
    }

    #[test]
    fn a_client_restarted_in_simskip_resumes_from_the_last_global_model() {
        let dir = tempfile::tempdir().unwrap();
        let stage = simskip_stage(8);
        let mut org = organisation(8, dir.path());
        let initial = SimSkipTrainer::new(8, SimSkipConfig::default())
            .unwrap()
            .export();
        // A global model unlike any fresh trainer's: one round of local training.
        let global = ClientWork::fit(&mut org, &stage, 1, initial.clone())
            .unwrap()
            .arrays;
        assert_ne!(global, initial);
        ClientWork::fit(&mut org, &stage, 2, global.clone()).unwrap();
        drop(org);

        // Restarted, with a task that brings no weights: the model is the last global one it
        // received, not a fresh one (nor its own local update).
        let mut restarted = organisation(8, dir.path());
        let StageParams::SimSkip(params) = &stage.params else {
            unreachable!()
        };
        let r = restarted.refining(&stage, params, &[]).unwrap();
        assert_eq!(r.trainer.export(), global);
        // Another stage's kept model is not used.
        let mut other_stage = stage.clone();
        other_stage.index = 2;
        let mut restarted = organisation(8, dir.path());
        let r = restarted.refining(&other_stage, params, &[]).unwrap();
        assert_ne!(r.trainer.export(), global);
    }

    #[test]
    fn received_rows_are_checked_before_use() {
        let ok = || vec![NamedArray::new(ENTITIES, vec![2, 3], vec![0.5; 6])];
        assert_eq!(entity_rows(ok(), 2, 3).unwrap().data, vec![0.5; 6]);
        let e = entity_rows(ok(), 3, 3).unwrap_err().to_string();
        assert!(e.contains("shape [2, 3]"), "{e}");
        let mut bad = ok();
        bad[0].data[4] = f32::NAN;
        let e = entity_rows(bad, 2, 3).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("row 1"), "{e}");
        assert!(entity_rows(vec![], 2, 3).is_err());
    }
}
