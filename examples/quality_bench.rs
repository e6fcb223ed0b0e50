//! The quality benchmark: does refinement pay off for every organisation?
//!
//! For each dataset and seed, in one process (no network), with the product's own pipeline:
//!
//! * **central**: TransE on the whole graph (`simskip embed`'s defaults), SimSkip with
//!   epoch selection (`simskip refine`'s defaults), then the gate on every watched task
//!   ([`simskip::pipeline::gate`]); input versus kept table.
//! * **federated** (`relation` / `triples` split over 3 and 5 organisations): FedE with the
//!   default run's settings (rows averaged over the organisations holding each entity), then
//!   the default run's federated SimSkip stage driven through each organisation's own
//!   [`FederatedWork`] (local epochs, FedAvg by [`simskip::node::simskip_strategy`], the final
//!   gate), once per personalisation on the same partitions and the same FedE tables.
//!
//! Every table is scored on held-out test data: KNN@10 and the MLP probe's accuracy and
//! macro-F1 where labels exist, link-prediction MRR (relations refit on the frozen table)
//! always. Per organisation and aggregated (mean over organisations), mean and spread
//! (sample standard deviation) over seeds.
//!
//! cargo run --release -p simskip --example quality_bench -- [--data DIR,DIR..] [--seeds 0,1,2]
//!     [--splits central,relation-3,relation-5,triples-3,triples-5]
//!     [--personalization fedavg,fedbn,fine_tune,fedprox] [--fede-rounds N]
//!     [--simskip-rounds N] [--transe-epochs N] [--fine-tune-epochs N] [--mu X]
//!     [--search-candidates N] [--search-epochs N] [--json PATH]
//!
//! A personalisation name with the suffix `+search` (e.g. `fedavg+search`) also runs each
//! organisation's settings search ([`simskip::pipeline::search`]) at the end of the stage;
//! with any such name, the central split also runs `central+search` on the same input.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use simskip::node::{simskip_strategy, ServerFile};
use simskip::pipeline::gate::gate;
use simskip::pipeline::search::SearchSettings;
use simskip::pipeline::{evaluate_table, refine_table, train_transe, EvalContext};
use simskip::settings::GateSettings;
use simskip::settings::Settings;
use simskip::work::{FederatedWork, WorkSettings};
use simskip_data::{partition, KgDataset, Matrix, NamedArray, PartitionBy, PartitionConfig};
use simskip_eval::TaskFigures;
use simskip_fed::aggregate::{fede_aggregate, EntityTable};
use simskip_fed::types::{ClientInfo, ClientResult};
use simskip_fed::{
    ClientWork, Personalization, SimSkipParams, StageInfo, StageParams, Strategy, ENTITIES,
};
use simskip_kge::{TransE, TransEConfig, TransETrainer};

const TASKS: [&str; 4] = ["knn_at_10", "probe_accuracy", "probe_macro_f1", "lp_mrr"];

struct Args {
    data: Vec<PathBuf>,
    seeds: Vec<u64>,
    splits: Vec<String>,
    personalization: Vec<String>,
    fede_rounds: Option<u32>,
    simskip_rounds: Option<u32>,
    transe_epochs: Option<usize>,
    fine_tune_epochs: usize,
    mu: f32,
    search: SearchSettings,
    json: PathBuf,
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        data: vec![
            "data/wordnet-5k".into(),
            "../shared/datasets/umls".into(),
            "../shared/datasets/wordnet-40k".into(),
        ],
        seeds: vec![0, 1, 2],
        splits: list("central,relation-3,relation-5,triples-3,triples-5"),
        personalization: list("fedavg,fedbn,fine_tune,fedprox"),
        fede_rounds: None,
        simskip_rounds: None,
        transe_epochs: None,
        fine_tune_epochs: 5,
        mu: 0.01,
        search: SearchSettings {
            candidates: 8,
            ..SearchSettings::default()
        },
        json: "quality-bench.json".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => a.data = list(&value()?).into_iter().map(PathBuf::from).collect(),
            "--seeds" => {
                a.seeds = list(&value()?)
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--splits" => a.splits = list(&value()?),
            "--personalization" => a.personalization = list(&value()?),
            "--fede-rounds" => a.fede_rounds = Some(value()?.parse()?),
            "--simskip-rounds" => a.simskip_rounds = Some(value()?.parse()?),
            "--transe-epochs" => a.transe_epochs = Some(value()?.parse()?),
            "--fine-tune-epochs" => a.fine_tune_epochs = value()?.parse()?,
            "--mu" => a.mu = value()?.parse()?,
            "--search-candidates" => a.search.candidates = value()?.parse()?,
            "--search-epochs" => a.search.epochs = value()?.parse()?,
            "--json" => a.json = value()?.into(),
            other => {
                bail!("unknown argument {other:?} (see the header of examples/quality_bench.rs)")
            }
        }
    }
    for s in &a.splits {
        split_of(s)?;
    }
    for p in &a.personalization {
        personalization_of(p, &a)?;
    }
    a.search.validate()?;
    Ok(a)
}

/// `central` or `relation-K` / `triples-K`.
fn split_of(name: &str) -> Result<Option<(PartitionBy, usize)>> {
    if name == "central" {
        return Ok(None);
    }
    let (by, k) = name
        .split_once('-')
        .with_context(|| format!("split {name:?}: central, relation-K or triples-K"))?;
    let by = match by {
        "relation" => PartitionBy::Relation,
        "triples" => PartitionBy::Triples,
        _ => bail!("split {name:?}: central, relation-K or triples-K"),
    };
    Ok(Some((
        by,
        k.parse().with_context(|| format!("split {name:?}"))?,
    )))
}

/// The personalisation of `name`, and whether its name asks for the settings search.
fn personalization_of(name: &str, a: &Args) -> Result<(Personalization, bool)> {
    let (name, search) = match name.strip_suffix("+search") {
        Some(base) => (base, true),
        None => (name, false),
    };
    let p = match name {
        "fedavg" => Personalization::FedAvg,
        "fedbn" => Personalization::FedBn,
        "fine_tune" => Personalization::FineTune {
            epochs: a.fine_tune_epochs,
        },
        "fedprox" => Personalization::FedProx { mu: a.mu },
        _ => bail!("personalization {name:?}: fedavg, fedbn, fine_tune or fedprox (each with an optional +search)"),
    };
    p.validate()?;
    Ok((p, search))
}

/// The default run's FedE and SimSkip stages (settings and rounds).
struct Stages {
    fede: TransEConfig,
    fede_rounds: u32,
    simskip: SimSkipParams,
    simskip_rounds: u32,
}

fn default_stages(a: &Args) -> Result<Stages> {
    let server = ServerFile::default().server;
    let mut fede = None;
    let mut simskip = None;
    for s in &server.stages {
        match &s.params {
            StageParams::FedE(c) => fede = Some((c.clone(), s.rounds)),
            StageParams::SimSkip(p) => simskip = Some((p.clone(), s.rounds)),
        }
    }
    let ((fede, fr), (simskip, sr)) = (
        fede.context("no FedE stage")?,
        simskip.context("no SimSkip stage")?,
    );
    Ok(Stages {
        fede,
        fede_rounds: a.fede_rounds.unwrap_or(fr),
        simskip,
        simskip_rounds: a.simskip_rounds.unwrap_or(sr),
    })
}

/// One organisation's (or the central) figures for input and kept table.
#[derive(Clone, Debug)]
struct OrgResult {
    input: TaskFigures,
    kept: TaskFigures,
    kept_refined: bool,
    reason: String,
    /// Wall time of the settings search (0 without one).
    search_seconds: f64,
}

fn figure(f: &TaskFigures, task: &str) -> Option<f64> {
    match task {
        "knn_at_10" => f.knn_at_10,
        "probe_accuracy" => f.probe_accuracy,
        "probe_macro_f1" => f.probe_macro_f1,
        "lp_mrr" => f.lp_mrr,
        _ => None,
    }
}

/// The central run, and with `search` also the central run followed by the settings search on
/// the same input (the first run's output is the search's incumbent).
fn central(ds: &KgDataset, seed: u64, a: &Args, search: bool) -> Result<Vec<(String, OrgResult)>> {
    let settings = Settings::default();
    let transe = TransEConfig {
        seed,
        epochs: a.transe_epochs.unwrap_or(settings.transe.epochs),
        ..settings.transe.clone()
    };
    let embedded = train_transe(ds, &transe, &mut |_, _| {});
    let x = embedded.model.entities;
    let ctx = EvalContext::new(ds, settings.eval.clone(), transe.norm);
    let cfg = simskip_refine::SimSkipConfig {
        seed,
        ..settings.simskip.clone()
    };
    let outcome = refine_table(&ctx, &x, &cfg, &settings.gate, &mut |_, _, _| {})?;
    let decision = gate(&ctx, &settings.gate, &x, &outcome.output)?;
    let kept = if decision.keep_refined {
        &outcome.output
    } else {
        &x
    };
    let input = evaluate_table(&ctx, &x)?;
    let mut rows = vec![(
        "central".to_owned(),
        OrgResult {
            input: input.clone(),
            kept: evaluate_table(&ctx, kept)?,
            kept_refined: decision.keep_refined,
            reason: format!(
                "epoch selection: {}; gate: {}",
                outcome.report.chosen, decision.reason
            ),
            search_seconds: 0.0,
        },
    )];
    if search {
        let gate_settings = GateSettings {
            search: SearchSettings {
                seed,
                ..a.search.clone()
            },
            ..settings.gate.clone()
        };
        let s = simskip::pipeline::search::search(
            &ctx,
            &x,
            &cfg,
            None,
            None,
            Some((&outcome.output, &decision)),
            &gate_settings,
        )?;
        rows.push((
            "central+search".to_owned(),
            OrgResult {
                input,
                kept: evaluate_table(&ctx, &s.output)?,
                kept_refined: s.chosen.is_some(),
                reason: s.summary(),
                search_seconds: s.seconds,
            },
        ));
    }
    Ok(rows)
}

/// FedE in one process, as `examples/federation_figures.rs` runs it: the coordinator's table
/// starts uniform in the client's init bound; every round each organisation installs the
/// global rows of its entities, trains its local epochs with its private relations, and the
/// rows are averaged over the organisations holding each entity. Returns each organisation's
/// final rows.
fn fede(parts: &[KgDataset], cfg: &TransEConfig, rounds: u32, seed: u64) -> Result<Vec<Matrix>> {
    let dim = cfg.dim;
    let bound = simskip_kge::init_bound(cfg);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut table = EntityTable::new(dim);
    for p in parts {
        for k in p.entities.names() {
            table.insert_with(k, |row| {
                for v in row {
                    *v = rng.random_range(-bound..bound);
                }
            });
        }
    }
    let rows_of = |table: &EntityTable, p: &KgDataset| -> Result<Matrix> {
        let a = table.rows_for(p.entities.names())?;
        Ok(Matrix::from_vec(p.num_entities(), dim, a.data))
    };
    let one_epoch = TransEConfig {
        epochs: 1,
        seed,
        ..cfg.clone()
    };
    let mut locals = Vec::new();
    for p in parts {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = TransE::init(p.num_entities(), p.num_relations(), &one_epoch, &mut rng);
        model.entities = rows_of(&table, p)?;
        locals.push(TransETrainer::from_model(model, one_epoch.clone()));
    }
    for _ in 0..rounds {
        let mut updates = Vec::with_capacity(parts.len());
        for (p, t) in parts.iter().zip(&mut locals) {
            t.set_entities(rows_of(&table, p)?);
            for _ in 0..cfg.epochs {
                t.train_epoch(&p.train);
            }
            let e = &t.model().entities;
            updates.push((
                p.entities.names().to_vec(),
                NamedArray::new(ENTITIES, vec![e.rows, e.cols], e.data.clone()),
            ));
        }
        fede_aggregate(&mut table, &updates)?;
    }
    parts.iter().map(|p| rows_of(&table, p)).collect()
}

/// The federated SimSkip stage through each organisation's own work, in one process.
fn federated_simskip(
    parts: &[KgDataset],
    inputs: &[Matrix],
    stages: &Stages,
    personalization: Personalization,
    search: Option<&SearchSettings>,
    seed: u64,
) -> Result<Vec<OrgResult>> {
    let params = SimSkipParams {
        personalization,
        config: simskip_refine::SimSkipConfig {
            seed,
            ..stages.simskip.config.clone()
        },
        ..stages.simskip.clone()
    };
    let stage = StageInfo {
        index: 1,
        name: "simskip".into(),
        rounds: stages.simskip_rounds,
        params: StageParams::SimSkip(params.clone()),
        privacy: None,
    };
    let tmp = tempfile::tempdir()?;
    let defaults = WorkSettings::default();
    let settings = WorkSettings {
        compute: simskip::work::ComputeSettings {
            threads: 1,
            ..Default::default()
        },
        gate: GateSettings {
            search: search.map_or_else(SearchSettings::default, |s| SearchSettings {
                seed,
                ..s.clone()
            }),
            ..defaults.gate.clone()
        },
        ..defaults
    };
    let mut orgs = Vec::new();
    for (k, (p, x)) in parts.iter().zip(inputs).enumerate() {
        orgs.push(FederatedWork::with_table(
            p.clone(),
            tmp.path().join(format!("org-{k}")),
            settings.clone(),
            x.clone(),
            stages.fede.norm,
        )?);
    }
    let mut strategy = simskip_strategy(&params, seed)?;
    let infos: Vec<ClientInfo> = orgs
        .iter()
        .enumerate()
        .map(|(k, o)| ClientInfo {
            name: format!("org-{k}"),
            session: format!("s{k}"),
            num_examples: o.num_examples(),
            entity_keys: Default::default(),
        })
        .collect();
    let global = |s: &simskip_fed::FedAvgStrategy| s.arrays().to_vec();
    for round in 1..=stages.simskip_rounds {
        let mut results = Vec::new();
        for (o, info) in orgs.iter_mut().zip(&infos) {
            let out = ClientWork::fit(o, &stage, round, global(&strategy))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            strategy.check_fit_result(info, &out.arrays)?;
            results.push(ClientResult {
                client: info.clone(),
                num_examples: out.num_examples,
                arrays: out.arrays,
                metrics: out.metrics,
            });
        }
        strategy.aggregate_fit(results)?;
    }
    let mut out = Vec::new();
    for (k, (o, p)) in orgs.iter_mut().zip(parts).enumerate() {
        ClientWork::finish_stage(o, &stage, global(&strategy))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let dir = tmp.path().join(format!("org-{k}")).join("simskip");
        let kept = simskip::cli::load_table(&dir.join("entities.npy"), p)?;
        let decision: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("gate.json"))?)?;
        let ctx = EvalContext::new(p, settings.eval.clone(), stages.fede.norm);
        out.push(OrgResult {
            input: evaluate_table(&ctx, &inputs[k])?,
            kept: evaluate_table(&ctx, &kept)?,
            kept_refined: decision["output"] == "refined",
            reason: decision["reason"].as_str().unwrap_or_default().to_owned(),
            search_seconds: decision["search"]["seconds"].as_f64().unwrap_or(0.0),
        });
    }
    Ok(out)
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

/// Rows of one configuration: per organisation ("org-k") and "aggregate", each task's input
/// and kept figures per seed.
type Runs = BTreeMap<String, Vec<OrgResult>>;

/// Mean over organisations of each task (the aggregate row of one seed).
fn aggregate(orgs: &[OrgResult]) -> OrgResult {
    fn input_of(o: &OrgResult) -> &TaskFigures {
        &o.input
    }
    fn kept_of(o: &OrgResult) -> &TaskFigures {
        &o.kept
    }
    fn mean_of(orgs: &[OrgResult], pick: fn(&OrgResult) -> &TaskFigures) -> TaskFigures {
        let avg = |task: &str| -> Option<f64> {
            let v: Vec<f64> = orgs.iter().filter_map(|o| figure(pick(o), task)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        TaskFigures {
            knn_at_10: avg("knn_at_10"),
            probe_accuracy: avg("probe_accuracy"),
            probe_macro_f1: avg("probe_macro_f1"),
            lp_mrr: avg("lp_mrr"),
            lp_hits_at_10: None,
        }
    }
    OrgResult {
        input: mean_of(orgs, input_of),
        kept: mean_of(orgs, kept_of),
        kept_refined: orgs.iter().any(|o| o.kept_refined),
        search_seconds: orgs.iter().map(|o| o.search_seconds).sum::<f64>() / orgs.len() as f64,
        reason: format!(
            "{} of {} kept the refined table",
            orgs.iter().filter(|o| o.kept_refined).count(),
            orgs.len()
        ),
    }
}

/// Prints and returns the summary of one configuration: per row and task, input and kept
/// mean ± sd over seeds, the mean change, and whether it is worse beyond seed noise (mean
/// change below minus the seeds' spread of the change, and at least 0.005).
fn summarise(title: &str, runs: &Runs) -> Value {
    println!("  {title}");
    let mut rows = serde_json::Map::new();
    for (row, seeds) in runs {
        let refined = seeds.iter().filter(|o| o.kept_refined).count();
        let mut line = format!("    {row:<10} kept refined {refined}/{}:", seeds.len());
        let search: Vec<f64> = seeds.iter().map(|o| o.search_seconds).collect();
        let (search_mean, search_sd) = mean_sd(&search);
        if search_mean > 0.0 {
            line.push_str(&format!(" search {search_mean:.1}±{search_sd:.1} s;"));
        }
        let mut tasks = serde_json::Map::new();
        for task in TASKS {
            let pairs: Vec<(f64, f64)> = seeds
                .iter()
                .filter_map(|o| Some((figure(&o.input, task)?, figure(&o.kept, task)?)))
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let inp: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let kept: Vec<f64> = pairs.iter().map(|p| p.1).collect();
            let delta: Vec<f64> = pairs.iter().map(|p| p.1 - p.0).collect();
            let ((im, isd), (km, ksd), (dm, dsd)) =
                (mean_sd(&inp), mean_sd(&kept), mean_sd(&delta));
            let worse = dm < -(dsd.max(0.005));
            line.push_str(&format!(
                "  {task} {im:.3}±{isd:.3} -> {km:.3}±{ksd:.3} ({:+.1} pts){}",
                100.0 * dm,
                if worse { " WORSE" } else { "" }
            ));
            tasks.insert(
                task.into(),
                json!({"input_mean": im, "input_sd": isd, "kept_mean": km, "kept_sd": ksd,
                       "delta_mean": dm, "delta_sd": dsd, "worse_beyond_noise": worse,
                       "input": inp, "kept": kept}),
            );
        }
        println!("{line}");
        rows.insert(
            row.clone(),
            json!({"kept_refined": refined, "seeds": seeds.len(), "tasks": tasks,
                   "search_seconds_mean": search_mean, "search_seconds_sd": search_sd,
                   "reasons": seeds.iter().map(|o| o.reason.clone()).collect::<Vec<_>>()}),
        );
    }
    Value::Object(rows)
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let stages = default_stages(&a)?;
    let started = Instant::now();
    let mut out = serde_json::Map::new();
    println!(
        "quality benchmark: seeds {:?}, FedE {} rounds x {} local epochs, SimSkip {} rounds x {} local epochs ({:?} positives); machine shared, times are wall clock",
        a.seeds,
        stages.fede_rounds,
        stages.fede.epochs,
        stages.simskip_rounds,
        stages.simskip.config.epochs,
        stages.simskip.config.positives
    );
    for dir in &a.data {
        let ds = KgDataset::load(dir).with_context(|| format!("loading {}", dir.display()))?;
        let name = dir.file_name().map_or(dir.display().to_string(), |n| {
            n.to_string_lossy().into_owned()
        });
        println!(
            "\n== {name}: {} entities, {} relations, {} train triples, labels: {}",
            ds.num_entities(),
            ds.num_relations(),
            ds.train.len(),
            if ds.labels.is_some() {
                "yes"
            } else {
                "no (LP only)"
            }
        );
        let mut per_dataset = serde_json::Map::new();
        for split in &a.splits {
            let t0 = Instant::now();
            // configuration name -> row -> per-seed results
            let mut configs: BTreeMap<String, Runs> = BTreeMap::new();
            for &seed in &a.seeds {
                match split_of(split)? {
                    None => {
                        let search = a.personalization.iter().any(|p| p.ends_with("+search"));
                        for (config, r) in central(&ds, seed, &a, search)? {
                            configs
                                .entry(config.clone())
                                .or_default()
                                .entry(config)
                                .or_default()
                                .push(r);
                        }
                    }
                    Some((by, k)) => {
                        let parts = partition(&ds, &PartitionConfig::new(k, by, seed))?;
                        let parts: Vec<KgDataset> = parts
                            .iter()
                            .map(|p| p.to_dataset(format!("client-{}", p.client)))
                            .collect();
                        let inputs = fede(&parts, &stages.fede, stages.fede_rounds, seed)?;
                        for pname in &a.personalization {
                            let (p, search) = personalization_of(pname, &a)?;
                            let search = search.then_some(&a.search);
                            let orgs =
                                federated_simskip(&parts, &inputs, &stages, p, search, seed)?;
                            let runs = configs.entry(pname.clone()).or_default();
                            runs.entry("aggregate".into())
                                .or_default()
                                .push(aggregate(&orgs));
                            for (i, o) in orgs.into_iter().enumerate() {
                                runs.entry(format!("org-{i}")).or_default().push(o);
                            }
                        }
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "\n {name} / {split} ({} seeds, {secs:.0} s):",
                a.seeds.len()
            );
            let mut split_json = serde_json::Map::new();
            for (config, runs) in &configs {
                split_json.insert(config.clone(), summarise(config, runs));
            }
            split_json.insert("seconds".into(), json!(secs));
            per_dataset.insert(split.clone(), Value::Object(split_json));
        }
        out.insert(name, Value::Object(per_dataset));
    }
    let total = started.elapsed().as_secs_f64();
    println!("\ntotal wall time: {total:.0} s");
    out.insert("total_seconds".into(), json!(total));
    out.insert(
        "settings".into(),
        json!({"seeds": a.seeds, "fede_rounds": stages.fede_rounds,
               "fede_local_epochs": stages.fede.epochs, "simskip_rounds": stages.simskip_rounds,
               "simskip_local_epochs": stages.simskip.config.epochs,
               "fine_tune_epochs": a.fine_tune_epochs, "mu": a.mu,
               "search_candidates": a.search.candidates, "search_epochs": a.search.epochs,
               "worse_rule": "mean change over seeds below -max(sd of the change, 0.005)"}),
    );
    std::fs::write(
        &a.json,
        serde_json::to_string_pretty(&Value::Object(out))? + "\n",
    )
    .with_context(|| format!("writing {}", a.json.display()))?;
    println!("wrote {}", a.json.display());
    Ok(())
}
