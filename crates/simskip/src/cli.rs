//! The `simskip` command line: parsing, and one function per subcommand that loads files,
//! calls the pipeline and writes the table (stdout) and the JSON report (a file).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use simskip_data::partition::{partition, write_partitions, PartitionBy, PartitionConfig};
use simskip_data::{Embeddings, KgDataset, Matrix};
use simskip_eval::{render_table, Comparison};
use simskip_refine::{Augmentation, Positives};

use crate::pipeline::{evaluate_table, refine_table, train_transe, EvalContext};
use crate::progress::bar;
use crate::report::{print_link_prediction, write_json};
use crate::settings::{self, Settings, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "simskip",
    version,
    about = "Refine knowledge-graph embeddings with SimSkip, alone or federated"
)]
pub struct Cli {
    /// Settings file (TOML), layered under SIMSKIP_SECTION__KEY environment variables and flags.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train TransE entity embeddings on a graph folder (train/valid/test.tsv).
    Embed(EmbedArgs),
    /// Refine an embedding table with SimSkip, gated on held-out data.
    Refine(RefineArgs),
    /// Downstream tasks on an input table and, optionally, its refined version.
    Eval(EvalArgs),
    /// Split a graph into private client folders.
    Partition(PartitionArgs),
    /// Measure training and evaluation throughput.
    Bench(crate::bench::BenchArgs),
    /// Run a whole federation (one server, N clients as processes) on bundled data.
    Simulate(crate::simulate::SimulateArgs),
    /// Provision the federation CA and the mutual-TLS certificates of every party.
    Certs(crate::certs::CertsArgs),
    /// Make a per-organisation token (`tokens` mode): prints the token, for the organisation
    /// only, and its SHA-256, for the coordinator's `[[server.auth.organisations]]`.
    Token(crate::certs::TokenArgs),
    /// Make the organisations' federation secret for blinded entity keys (made by an
    /// organisation, shared among them, never with the coordinator).
    Secret(crate::certs::SecretArgs),
    /// The federation coordinator (the same as the `simskip-server` command).
    Server(crate::node::ServerArgs),
    /// An organisation's daemon (the same as the `simskip-client` command).
    Client(crate::node::ClientArgs),
    /// Write an HTML report with charts for a finished run (a coordinator output folder).
    Report(crate::run_report::ReportArgs),
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Graph folder with train.tsv, valid.tsv, test.tsv.
    pub dataset: PathBuf,
    /// Output folder: entities.npy (+ .ids.txt), entities.safetensors, relations.npy, report.json.
    #[arg(long, short)]
    pub out: PathBuf,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub dim: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AugmentationArg {
    Mask,
    Noise,
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PositivesArg {
    Augment,
    Neighbour,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SignalArg {
    Auto,
    Knn,
    Probe,
    Graph,
}

#[derive(Debug, Args)]
pub struct RefineArgs {
    /// Graph folder the table's entities belong to (for neighbours and validation data).
    pub dataset: PathBuf,
    /// Input embeddings: .npy, .safetensors or text.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output folder: refined.npy (+ .ids.txt), refined.safetensors, model.safetensors, report.json.
    #[arg(long, short)]
    pub out: PathBuf,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, value_enum)]
    pub augmentation: Option<AugmentationArg>,
    #[arg(long, value_enum)]
    pub positives: Option<PositivesArg>,
    /// Output the last epoch even if it is worse than the input on validation data.
    #[arg(long)]
    pub no_gate: bool,
    #[arg(long, value_enum)]
    pub signal: Option<SignalArg>,
    /// The SimSkip-minus ablation: no skip connection.
    #[arg(long)]
    pub no_skip: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also run the downstream tasks on input and output and print them.
    #[arg(long)]
    pub eval: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Graph folder the tables' entities belong to.
    pub dataset: PathBuf,
    /// The input table.
    #[arg(long, short)]
    pub input: PathBuf,
    /// The refined table, evaluated beside the input.
    #[arg(long, short)]
    pub refined: Option<PathBuf>,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "eval-report.json")]
    pub report: PathBuf,
    /// Skip the MLP probe.
    #[arg(long)]
    pub no_probe: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PartitionByArg {
    Relation,
    Triples,
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    /// Graph folder to split.
    pub dataset: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    #[arg(long, value_enum, default_value = "relation")]
    pub by: PartitionByArg,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder; one private folder client-K per client is written under it.
    #[arg(long, short)]
    pub out: PathBuf,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed(args) => embed(&load_settings(cli.config.as_deref())?, args),
        Command::Refine(args) => refine(load_settings(cli.config.as_deref())?, args),
        Command::Eval(args) => eval(&load_settings(cli.config.as_deref())?, args),
        Command::Partition(args) => partition_cmd(args),
        Command::Bench(args) => crate::bench::run(&load_settings(cli.config.as_deref())?, args),
        Command::Simulate(args) => crate::simulate::run(args),
        Command::Certs(args) => crate::certs::run(args),
        Command::Token(args) => crate::certs::token(args),
        Command::Secret(args) => crate::certs::secret(args),
        // `--config` given before the subcommand counts as the daemon's own.
        Command::Server(mut args) => {
            args.config = args.config.or(cli.config);
            crate::node::run_server(args)
        }
        Command::Client(mut args) => {
            args.config = args.config.or(cli.config);
            crate::node::run_client(args)
        }
        Command::Report(args) => crate::run_report::run(args),
    }
}

pub fn load_settings(file: Option<&Path>) -> Result<Settings> {
    Ok(settings::load::<Settings>(file)?)
}

fn load_dataset(dir: &Path) -> Result<KgDataset> {
    KgDataset::load(dir).with_context(|| format!("loading graph folder {}", dir.display()))
}

/// Read a table and align its rows to the graph's entities.
pub fn load_table(path: &Path, ds: &KgDataset) -> Result<Matrix> {
    let emb = Embeddings::read(path)?;
    Ok(emb.align_to(&ds.entities)?)
}

fn embed(settings: &Settings, args: EmbedArgs) -> Result<()> {
    let mut cfg = settings.transe.clone();
    cfg.epochs = args.epochs.unwrap_or(cfg.epochs);
    cfg.dim = args.dim.unwrap_or(cfg.dim);
    cfg.seed = args.seed.unwrap_or(cfg.seed);
    let ds = load_dataset(&args.dataset)?;
    let pb = bar(cfg.epochs as u64, "transe");
    let outcome = train_transe(&ds, &cfg, &mut |_, loss| {
        pb.set_message(format!("loss {loss:.4}"));
        pb.inc(1);
    });
    pb.finish_and_clear();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let entities = Embeddings::new(ds.entities.clone(), outcome.model.entities.clone())?;
    entities.write_npy(&args.out.join("entities.npy"))?;
    entities.write_safetensors(&args.out.join("entities.safetensors"))?;
    Embeddings::new(ds.relations.clone(), outcome.model.relations.clone())?
        .write_npy(&args.out.join("relations.npy"))?;
    println!(
        "TransE on {} ({} entities, {} relations, {} train triples): {:.2} s, {:.1} epochs/s",
        args.dataset.display(),
        ds.num_entities(),
        ds.num_relations(),
        ds.train.len(),
        outcome.report.train_seconds,
        outcome.report.epochs_per_second
    );
    print_link_prediction(&[
        ("valid", &outcome.report.valid),
        ("test", &outcome.report.test),
    ]);
    write_json(&args.out.join("report.json"), &outcome.report)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn refine(mut settings: Settings, args: RefineArgs) -> Result<()> {
    let cfg = &mut settings.simskip;
    cfg.epochs = args.epochs.unwrap_or(cfg.epochs);
    cfg.seed = args.seed.unwrap_or(cfg.seed);
    if args.no_skip {
        cfg.skip = false;
    }
    if let Some(a) = args.augmentation {
        cfg.augmentation = match a {
            AugmentationArg::Mask => Augmentation::Mask,
            AugmentationArg::Noise => Augmentation::Noise,
            AugmentationArg::Both => Augmentation::Both,
        };
    }
    if let Some(p) = args.positives {
        cfg.positives = match p {
            PositivesArg::Augment => Positives::Augment,
            PositivesArg::Neighbour => Positives::Neighbour,
        };
    }
    if args.no_gate {
        settings.gate.enabled = false;
    }
    if let Some(s) = args.signal {
        settings.gate.signal = match s {
            SignalArg::Auto => SignalKind::Auto,
            SignalArg::Knn => SignalKind::Knn,
            SignalArg::Probe => SignalKind::Probe,
            SignalArg::Graph => SignalKind::Graph,
        };
    }
    settings.gate.validate()?;
    let ds = load_dataset(&args.dataset)?;
    let x = load_table(&args.input, &ds)?;
    let ctx = EvalContext::new(&ds, settings.eval.clone(), settings.transe.norm);
    let pb = bar(settings.simskip.epochs as u64, "simskip");
    let outcome = refine_table(
        &ctx,
        &x,
        &settings.simskip,
        &settings.gate,
        &mut |_, loss, score| {
            pb.set_message(match score {
                Some(s) => format!("loss {loss:.4} val {s:.4}"),
                None => format!("loss {loss:.4}"),
            });
            pb.inc(1);
        },
    )?;
    pb.finish_and_clear();
    // With a settings search, the run above is the incumbent among the grid's candidates.
    let search = if settings.gate.enabled && settings.gate.search.enabled() {
        let incumbent = if outcome.report.chosen == "input" {
            None
        } else {
            let decision = crate::pipeline::gate::gate(&ctx, &settings.gate, &x, &outcome.output)?;
            Some((&outcome.output, decision))
        };
        let s = crate::pipeline::search::search(
            &ctx,
            &x,
            &settings.simskip,
            None,
            None,
            incumbent.as_ref().map(|(t, d)| (*t, d)),
            &settings.gate,
        )?;
        println!("{}", s.summary());
        Some(s)
    } else {
        None
    };
    let output = search.as_ref().map_or(&outcome.output, |s| &s.output);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let refined = Embeddings::new(ds.entities.clone(), output.clone())?;
    refined.write_npy(&args.out.join("refined.npy"))?;
    refined.write_safetensors(&args.out.join("refined.safetensors"))?;
    let weights = search
        .as_ref()
        .and_then(|s| s.weights.as_ref())
        .unwrap_or(&outcome.weights);
    simskip_data::tensors::write_named_safetensors(
        &args.out.join("model.safetensors"),
        weights,
        &Default::default(),
    )?;
    let r = &outcome.report;
    println!(
        "SimSkip ({:?} augmentation, {:?} positives, skip {}) for {} epochs in {:.2} s",
        r.config.augmentation, r.config.positives, r.config.skip, r.config.epochs, r.train_seconds
    );
    match (&r.signal, &r.selection) {
        (Some(signal), Some(sel)) => println!(
            "gate on {signal}: input {:.4}, best {:.4} -> output is the {}",
            sel.input_score, sel.best_score, r.chosen
        ),
        _ => println!("gate off: output is the last epoch"),
    }
    let mut json = serde_json::json!({ "refine": r, "search": search });
    if args.eval {
        let comparison = Comparison {
            input: evaluate_table(&ctx, &x)?,
            refined: evaluate_table(&ctx, output)?,
        };
        print!("{}", comparison.render());
        json["eval"] = serde_json::to_value(&comparison)?;
    }
    write_json(&args.out.join("report.json"), &json)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

fn eval(settings: &Settings, args: EvalArgs) -> Result<()> {
    let ds = load_dataset(&args.dataset)?;
    let mut eval_settings = settings.eval.clone();
    if args.no_probe {
        eval_settings.run_probe = false;
    }
    let ctx = EvalContext::new(&ds, eval_settings, settings.transe.norm);
    let input = evaluate_table(&ctx, &load_table(&args.input, &ds)?)?;
    let refined = match &args.refined {
        Some(path) => Some(evaluate_table(&ctx, &load_table(path, &ds)?)?),
        None => None,
    };
    let mut rows = vec![("input".to_owned(), &input)];
    if let Some(r) = &refined {
        rows.push(("refined".to_owned(), r));
    }
    print!("{}", render_table(&rows));
    write_json(
        &args.report,
        &serde_json::json!({ "dataset": args.dataset, "input": input, "refined": refined }),
    )?;
    println!("wrote {}", args.report.display());
    Ok(())
}

fn partition_cmd(args: PartitionArgs) -> Result<()> {
    let ds = load_dataset(&args.dataset)?;
    let by = match args.by {
        PartitionByArg::Relation => PartitionBy::Relation,
        PartitionByArg::Triples => PartitionBy::Triples,
    };
    let parts = partition(&ds, &PartitionConfig::new(args.clients, by, args.seed))?;
    let dirs = write_partitions(&parts, &args.out)?;
    for (dir, part) in dirs.iter().zip(&parts) {
        println!("{}: {} triples", dir.display(), part.num_triples());
    }
    Ok(())
}
