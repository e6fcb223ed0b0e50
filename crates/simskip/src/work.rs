//! What a client does with its private graph when the coordinator asks: FedE rounds of local
//! TransE (relations never leave), then local SimSkip copies of the federated model, and the
//! evaluation tasks on input and refined tables. Only entity rows (stage 1), model weights
//! (stage 2) and figures are returned; triples, labels and embeddings stay here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use simskip_data::{Embeddings, KgDataset, Matrix, NamedArray};
use simskip_eval::TaskFigures;
use simskip_fed::client::{ClientWork, EvalOutput, FitOutput, StageInfo};
use simskip_fed::rounds::StageKind;
use simskip_kge::{FilterIndex, TransE, TransETrainer};
use simskip_refine::{Neighbours, Positives, SimSkipTrainer};

use crate::pipeline::refine::{training_neighbours, validation_signal};
use crate::pipeline::{evaluate_table, EvalContext};
use crate::settings::Settings;

/// The array name of an entity table slice in FedE tasks.
pub const ENTITIES: &str = "entities";

/// A file in the output folder naming the stage-1 table, so a restarted client resumes stage 2.
const STAGE2_INPUT_RECORD: &str = "stage2-input.txt";

/// A client's private state across the run.
pub struct FederatedWork {
    ds: KgDataset,
    out_dir: PathBuf,
    settings: Settings,
    filter: FilterIndex,
    /// Stage 1 state: the local TransE (relation rows and optimiser state stay here).
    transe: Option<TransETrainer>,
    /// The stage-2 input: stage-1 entity rows, or a table the client was given.
    input: Option<Matrix>,
    simskip: Option<SimSkipTrainer>,
    neighbours: Option<Neighbours>,
}

impl FederatedWork {
    /// `input_embeddings`: a table for stage 2 when there is no stage 1 (rows matched by name).
    pub fn new(
        ds: KgDataset,
        out_dir: PathBuf,
        settings: Settings,
        input_embeddings: Option<&std::path::Path>,
    ) -> Result<Self> {
        // A restarted client picks its stage-1 table back up from its own output folder.
        let recorded = out_dir.join(STAGE2_INPUT_RECORD);
        let input = match input_embeddings {
            Some(path) => Some(crate::cli::load_table(path, &ds)?),
            None if recorded.is_file() => {
                let path = std::fs::read_to_string(&recorded)
                    .with_context(|| format!("reading {}", recorded.display()))?;
                Some(crate::cli::load_table(
                    std::path::Path::new(path.trim()),
                    &ds,
                )?)
            }
            None => None,
        };
        Ok(Self {
            filter: FilterIndex::from_dataset(&ds),
            ds,
            out_dir,
            settings,
            transe: None,
            input,
            simskip: None,
            neighbours: None,
        })
    }

    fn eval_context(&self) -> EvalContext<'_> {
        EvalContext::new(
            &self.ds,
            self.settings.eval.clone(),
            self.settings.transe.norm,
        )
    }

    /// Install the coordinator's rows of our entities into the local TransE, creating it on
    /// the first round (relations start random and stay local).
    fn install_entity_rows(
        &mut self,
        global: Vec<NamedArray>,
        config: &BTreeMap<String, String>,
    ) -> Result<()> {
        let rows = take_array(global, ENTITIES)?;
        let (n, d) = match rows.shape[..] {
            [n, d] => (n, d),
            _ => bail!(
                "coordinator sent 'entities' of shape {:?}, expected [rows, dim]",
                rows.shape
            ),
        };
        if n != self.ds.num_entities() {
            bail!(
                "coordinator sent {n} entity rows, this client holds {}",
                self.ds.num_entities()
            );
        }
        let rows = Matrix::from_vec(n, d, rows.data);
        match &mut self.transe {
            Some(trainer) => trainer.set_entities(rows),
            None => {
                let mut cfg = self.settings.transe.clone();
                apply_transe_overrides(&mut cfg, config)?;
                cfg.dim = d;
                let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(cfg.seed);
                let mut model = TransE::random(n, self.ds.num_relations(), d, cfg.norm, &mut rng);
                model.entities = rows;
                self.transe = Some(TransETrainer::from_model(model, cfg));
            }
        }
        Ok(())
    }

    fn stage2_input(&self) -> Result<&Matrix> {
        self.input
            .as_ref()
            .ok_or_else(|| anyhow!("stage 2 needs input embeddings: run a FedE stage first or give the client an embeddings file"))
    }

    fn install_model(
        &mut self,
        global: &[NamedArray],
        config: &BTreeMap<String, String>,
    ) -> Result<()> {
        let dim = self.stage2_input()?.cols;
        if self.simskip.is_none() {
            let mut cfg = self.settings.simskip.clone();
            apply_simskip_overrides(&mut cfg, config)?;
            if cfg.positives == Positives::Neighbour {
                self.neighbours = Some(training_neighbours(&self.ds)?);
            }
            self.simskip = Some(SimSkipTrainer::new(dim, cfg)?);
        }
        let trainer = self.simskip.as_mut().expect("created above");
        if !global.is_empty() {
            trainer.import(global)?;
        }
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
}

impl ClientWork for FederatedWork {
    fn entity_keys(&self) -> Vec<String> {
        self.ds.entities.names().to_vec()
    }

    fn num_examples(&self) -> u64 {
        self.ds.train.len() as u64
    }

    fn fit(
        &mut self,
        stage: &StageInfo,
        _round: u32,
        global: Vec<NamedArray>,
        config: &BTreeMap<String, String>,
    ) -> Result<FitOutput> {
        match stage.kind {
            StageKind::FedE => {
                self.install_entity_rows(global, config)?;
                let epochs = local_epochs(config, self.settings.transe.epochs)?;
                let trainer = self.transe.as_mut().expect("installed");
                let mut loss = f32::NAN;
                for _ in 0..epochs {
                    loss = trainer.train_epoch(&self.ds.train);
                }
                let e = &trainer.model().entities;
                Ok(FitOutput {
                    arrays: vec![NamedArray::new(
                        ENTITIES,
                        vec![e.rows, e.cols],
                        e.data.clone(),
                    )],
                    num_examples: self.ds.train.len() as u64,
                    metrics: BTreeMap::from([("loss".to_owned(), loss as f64)]),
                })
            }
            StageKind::FedAvg => {
                self.install_model(&global, config)?;
                let epochs = local_epochs(config, 1)?;
                let x = self.input.as_ref().expect("checked by install_model");
                let trainer = self.simskip.as_mut().expect("installed");
                let mut loss = f32::NAN;
                let mut samples = 0;
                for _ in 0..epochs {
                    let stats = trainer.train_epoch(x, self.neighbours.as_ref())?;
                    loss = stats.loss;
                    samples = stats.samples;
                }
                Ok(FitOutput {
                    arrays: trainer.export(),
                    num_examples: samples.max(1) as u64,
                    metrics: BTreeMap::from([("loss".to_owned(), loss as f64)]),
                })
            }
        }
    }

    fn evaluate(
        &mut self,
        stage: &StageInfo,
        _round: u32,
        global: Vec<NamedArray>,
        config: &BTreeMap<String, String>,
    ) -> Result<EvalOutput> {
        match stage.kind {
            StageKind::FedE => {
                self.install_entity_rows(global, config)?;
                let model = self.transe.as_ref().expect("installed").model();
                let mut metrics = BTreeMap::new();
                for (split, triples) in [("valid", &self.ds.valid), ("test", &self.ds.test)] {
                    let m = simskip_kge::evaluate(
                        &model.entities,
                        &model.relations,
                        model.norm,
                        triples,
                        &self.filter,
                    );
                    metrics.insert(format!("{split}.mrr"), m.mrr);
                    metrics.insert(format!("{split}.hits_at_1"), m.hits_at_1);
                    metrics.insert(format!("{split}.hits_at_10"), m.hits_at_10);
                    metrics.insert(format!("{split}.tail_mrr"), m.tail.mrr);
                }
                Ok(EvalOutput {
                    num_examples: self.ds.test.len() as u64,
                    metrics,
                })
            }
            StageKind::FedAvg => {
                self.install_model(&global, config)?;
                let x = self.stage2_input()?;
                let refined = self.simskip.as_ref().expect("installed").refine(x)?;
                let ctx = self.eval_context();
                let mut metrics = BTreeMap::new();
                flatten("input", &evaluate_table(&ctx, x)?, &mut metrics);
                flatten("refined", &evaluate_table(&ctx, &refined)?, &mut metrics);
                Ok(EvalOutput {
                    num_examples: self.ds.num_entities() as u64,
                    metrics,
                })
            }
        }
    }

    fn finish_stage(
        &mut self,
        stage: &StageInfo,
        global: Vec<NamedArray>,
        config: &BTreeMap<String, String>,
    ) -> Result<()> {
        match stage.kind {
            StageKind::FedE => {
                self.install_entity_rows(global, config)?;
                let entities = self
                    .transe
                    .as_ref()
                    .expect("installed")
                    .model()
                    .entities
                    .clone();
                let path = self.write_table(&stage.name, &entities)?;
                simskip_data::fsutil::write_atomic(
                    &self.out_dir.join(STAGE2_INPUT_RECORD),
                    path.display().to_string().as_bytes(),
                )?;
                tracing::info!(path = %path.display(), "wrote stage-1 entity embeddings");
                self.input = Some(entities);
            }
            StageKind::FedAvg => {
                self.install_model(&global, config)?;
                let x = self.stage2_input()?.clone();
                let refined = self.simskip.as_ref().expect("installed").refine(&x)?;
                // The federated model is shared; whether it helps this organisation's table is
                // decided here, on this client's own held-out data.
                let ctx = self.eval_context();
                let (signal, score) = validation_signal(&ctx, self.settings.gate.signal)?;
                let (input_score, refined_score) = (score(&x), score(&refined));
                let keep_refined = !self.settings.gate.enabled || refined_score > input_score;
                let output = if keep_refined { refined } else { x };
                let path = self.write_table(&stage.name, &output)?;
                let decision = serde_json::json!({
                    "signal": signal,
                    "input": input_score,
                    "refined": refined_score,
                    "gate": self.settings.gate.enabled,
                    "output": if keep_refined { "refined" } else { "input" },
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
            out.insert(format!("{prefix}.{name}"), v);
        }
    }
}

fn take_array(arrays: Vec<NamedArray>, name: &str) -> Result<NamedArray> {
    arrays
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| anyhow!("coordinator sent no '{name}' array"))
}

fn parse<T: std::str::FromStr>(config: &BTreeMap<String, String>, key: &str) -> Result<Option<T>> {
    config
        .get(key)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| anyhow!("task config '{key}': cannot parse '{v}'"))
        })
        .transpose()
}

/// Replace `field` with the task config's value of `key`, when the coordinator sent one.
fn override_from<T: std::str::FromStr>(
    config: &BTreeMap<String, String>,
    key: &str,
    field: &mut T,
) -> Result<()> {
    if let Some(v) = parse(config, key)? {
        *field = v;
    }
    Ok(())
}

fn local_epochs(config: &BTreeMap<String, String>, default: usize) -> Result<usize> {
    Ok(parse(config, "local_epochs")?.unwrap_or(default))
}

/// The coordinator's task config overrides the client's own training settings, so one run
/// trains alike everywhere.
fn apply_transe_overrides(
    cfg: &mut simskip_kge::TransEConfig,
    config: &BTreeMap<String, String>,
) -> Result<()> {
    override_from(config, "lr", &mut cfg.lr)?;
    override_from(config, "batch_size", &mut cfg.batch_size)?;
    override_from(config, "negatives", &mut cfg.negatives)?;
    override_from(config, "seed", &mut cfg.seed)?;
    override_from(config, "normalize_entities", &mut cfg.normalize_entities)?;
    if let Some(v) = config.get("loss") {
        cfg.loss = match v.as_str() {
            "margin_ranking" => simskip_kge::Loss::MarginRanking {
                margin: parse(config, "margin")?.unwrap_or(1.0),
            },
            "self_adversarial" => simskip_kge::Loss::SelfAdversarial {
                gamma: parse(config, "gamma")?.unwrap_or(10.0),
                temperature: parse(config, "adversarial_temperature")?.unwrap_or(1.0),
            },
            other => bail!(
                "task config 'loss': unknown loss '{other}' (margin_ranking, self_adversarial)"
            ),
        };
    }
    Ok(())
}

fn apply_simskip_overrides(
    cfg: &mut simskip_refine::SimSkipConfig,
    config: &BTreeMap<String, String>,
) -> Result<()> {
    override_from(config, "lr", &mut cfg.lr)?;
    override_from(config, "batch_size", &mut cfg.batch_size)?;
    override_from(config, "temperature", &mut cfg.temperature)?;
    override_from(config, "seed", &mut cfg.seed)?;
    override_from(config, "skip", &mut cfg.skip)?;
    if let Some(v) = config.get("augmentation") {
        cfg.augmentation =
            serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                anyhow!("task config 'augmentation': unknown '{v}' (mask, noise, both)")
            })?;
    }
    if let Some(v) = config.get("positives") {
        cfg.positives = serde_json::from_value(serde_json::Value::String(v.clone()))
            .map_err(|_| anyhow!("task config 'positives': unknown '{v}' (augment, neighbour)"))?;
    }
    cfg.validate()?;
    Ok(())
}
