//! The downstream tasks on one embedding table of a graph's entities: KNN same-label
//! precision@10 and the MLP probe on a fixed seeded split of the labelled entities, and link
//! prediction with relation vectors refit on the frozen table.

use anyhow::Result;
use simskip_data::{KgDataset, Matrix, Triple};
use simskip_eval::{
    knn_precision_at_k, label_split, probe, LabelSplit, ProbeConfig, ProbeResult, TaskFigures,
};
use simskip_kge::{refit_relations, FilterIndex, LinkPredictionMetrics, Norm};

use crate::settings::EvalSettings;

/// What every evaluation of tables over one graph shares: the label split and filter index.
pub struct EvalContext<'a> {
    pub ds: &'a KgDataset,
    pub settings: EvalSettings,
    pub norm: Norm,
    pub split: Option<LabelSplit>,
    pub filter: FilterIndex,
}

impl<'a> EvalContext<'a> {
    pub fn new(ds: &'a KgDataset, settings: EvalSettings, norm: Norm) -> Self {
        let split = ds
            .labels
            .as_ref()
            .map(|labels| label_split(labels, settings.split_seed, 0.2, 0.2));
        Self {
            ds,
            settings,
            norm,
            split,
            filter: FilterIndex::from_dataset(ds),
        }
    }

    /// Labels with the test entities' labels hidden: what model selection may look at.
    pub fn labels_without_test(&self) -> Option<Vec<Option<u32>>> {
        let (labels, split) = (self.ds.labels.as_ref()?, self.split.as_ref()?);
        let mut of = labels.of.clone();
        for &e in &split.test {
            of[e as usize] = None;
        }
        Some(of)
    }
}

/// All enabled tasks on `x` (rows aligned with `ctx.ds.entities`), on held-out test data.
pub fn evaluate_table(ctx: &EvalContext<'_>, x: &Matrix) -> Result<TaskFigures> {
    evaluate_with(ctx, x, &Tasks::FAST)
}

/// [`evaluate_table`] with the straightforward implementations (`simskip_eval::reference`,
/// `simskip_kge::linkpred::reference`): the baseline of the `eval_speed` benchmark and the
/// oracle of the tests. Same figures up to float rounding and the probe's seed noise.
pub fn evaluate_table_reference(ctx: &EvalContext<'_>, x: &Matrix) -> Result<TaskFigures> {
    evaluate_with(ctx, x, &Tasks::REFERENCE)
}

type Knn = fn(&Matrix, &[Option<u32>], &[u32], usize) -> f64;
type Probe = fn(
    &Matrix,
    &[Option<u32>],
    usize,
    &LabelSplit,
    &ProbeConfig,
) -> simskip_eval::Result<ProbeResult>;
type LinkPrediction = fn(&Matrix, &Matrix, Norm, &[Triple], &FilterIndex) -> LinkPredictionMetrics;

/// One implementation of each task.
struct Tasks {
    knn: Knn,
    probe: Probe,
    link_prediction: LinkPrediction,
}

impl Tasks {
    const FAST: Tasks = Tasks {
        knn: knn_precision_at_k,
        probe,
        link_prediction: simskip_kge::evaluate,
    };
    const REFERENCE: Tasks = Tasks {
        knn: simskip_eval::reference::knn_precision_at_k,
        probe: simskip_eval::reference::probe,
        link_prediction: simskip_kge::linkpred::reference::evaluate,
    };
}

fn evaluate_with(ctx: &EvalContext<'_>, x: &Matrix, tasks: &Tasks) -> Result<TaskFigures> {
    let mut figures = TaskFigures::default();
    if let (Some(labels), Some(split)) = (ctx.ds.labels.as_ref(), ctx.split.as_ref()) {
        figures.knn_at_10 = Some((tasks.knn)(x, &labels.of, &split.test, ctx.settings.knn_k));
        if ctx.settings.run_probe {
            let result = (tasks.probe)(
                x,
                &labels.of,
                labels.classes.len(),
                split,
                &ctx.settings.probe,
            )?;
            figures.probe_accuracy = Some(result.accuracy);
            figures.probe_macro_f1 = Some(result.macro_f1);
        }
    }
    if ctx.settings.run_link_prediction && !ctx.ds.test.is_empty() {
        let relations = refit_relations(x, &ctx.ds.train, ctx.ds.num_relations(), ctx.norm);
        let lp = (tasks.link_prediction)(x, &relations, ctx.norm, &ctx.ds.test, &ctx.filter);
        figures.lp_mrr = Some(lp.mrr);
        figures.lp_hits_at_10 = Some(lp.hits_at_10);
    }
    Ok(figures)
}
