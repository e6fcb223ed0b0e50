//! The gate on every task an organisation cares about: whether a refined table replaces the
//! input is decided on held-out (validation) data, task by task. The refined table is kept
//! only when it beats the input on the primary signal AND is not worse than the input by more
//! than the tolerance on any other watched task; otherwise the input is kept. The decision
//! lists every score, so an organisation sees why.
//!
//! Watched tasks, each on validation data only (test labels and test triples are never read):
//! validation KNN@k and the MLP probe's validation accuracy and macro-F1 where labels exist,
//! link-prediction MRR on the validation triples with relations refit on the frozen table,
//! and the label-free graph signal (neighbour retrieval on validation triples).

use anyhow::Result;
use serde::Serialize;
use simskip_data::Matrix;
use simskip_eval::{probe, LabelSplit};
use simskip_kge::refit_relations;

use super::evaluate::EvalContext;
use super::refine::validation_signal;
use crate::settings::{GateSettings, SignalKind};

/// One watched task's validation scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskScore {
    pub task: String,
    pub input: f64,
    pub refined: f64,
}

/// What the gate decided, and on what.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateDecision {
    /// The primary signal (the first score).
    pub signal: String,
    pub keep_refined: bool,
    pub tolerance: f64,
    pub scores: Vec<TaskScore>,
    pub reason: String,
}

/// The rule, on scores alone: `scores[0]` is the primary signal.
pub fn decide(scores: Vec<TaskScore>, tolerance: f64) -> GateDecision {
    let signal = scores.first().map_or(String::new(), |s| s.task.clone());
    let Some(primary) = scores.first() else {
        return GateDecision {
            signal,
            keep_refined: false,
            tolerance,
            scores,
            reason: "no task could be scored: the input is kept".into(),
        };
    };
    let (keep_refined, reason) = if !simskip_refine::beats(primary.refined, primary.input) {
        (
            false,
            format!(
                "{}: refined {:.4} does not beat input {:.4}",
                primary.task, primary.refined, primary.input
            ),
        )
    } else if let Some(worse) = scores[1..]
        .iter()
        // A task the input could not be scored on cannot be made worse; one the refined
        // table cannot be scored on is a regression.
        .find(|s| {
            !s.input.is_nan()
                && s.refined
                    .partial_cmp(&(s.input - tolerance))
                    .is_none_or(|o| o.is_lt())
        })
    {
        (
            false,
            format!(
                "{}: refined {:.4} is worse than input {:.4} by more than {tolerance}",
                worse.task, worse.refined, worse.input
            ),
        )
    } else {
        (
            true,
            format!(
                "{} improves ({:.4} -> {:.4}) and no watched task falls by more than {tolerance}",
                primary.task, primary.input, primary.refined
            ),
        )
    };
    GateDecision {
        signal,
        keep_refined,
        tolerance,
        scores,
        reason,
    }
}

/// Scores `input` and `refined` on every watched task and decides.
pub fn gate(
    ctx: &EvalContext<'_>,
    settings: &GateSettings,
    input: &Matrix,
    refined: &Matrix,
) -> Result<GateDecision> {
    let input = watched_scores(ctx, settings, input)?;
    against(&input, ctx, settings, refined)
}

/// Scores `refined` on every watched task and decides against the input's scores (from
/// [`watched_scores`]): a caller judging several candidates scores the input once.
pub fn against(
    input: &[(String, f64)],
    ctx: &EvalContext<'_>,
    settings: &GateSettings,
    refined: &Matrix,
) -> Result<GateDecision> {
    let refined = watched_scores(ctx, settings, refined)?;
    let scores = input
        .iter()
        .zip(refined)
        .map(|((task, input), (_, refined))| TaskScore {
            task: task.clone(),
            input: *input,
            refined,
        })
        .collect();
    Ok(decide(scores, settings.tolerance))
}

/// One table's validation score on every watched task, the primary signal first.
pub fn watched_scores(
    ctx: &EvalContext<'_>,
    settings: &GateSettings,
    x: &Matrix,
) -> Result<Vec<(String, f64)>> {
    let mut scores = Vec::new();
    let (primary, score) = validation_signal(ctx, settings.signal)?;
    scores.push((primary, score(x)));
    if settings.watch_all {
        let primary_kind = resolved(ctx, settings.signal);
        if let (Some(masked), Some(split)) = (ctx.labels_without_test(), ctx.split.as_ref()) {
            if primary_kind != SignalKind::Knn {
                let (name, knn) = validation_signal(ctx, SignalKind::Knn)?;
                scores.push((name, knn(x)));
            }
            if ctx.settings.run_probe {
                // The probe is selected on the validation entities and reported on them too
                // (the test entities' labels stay hidden): every table gets the same protocol.
                let on_valid = LabelSplit {
                    train: split.train.clone(),
                    valid: split.valid.clone(),
                    test: split.valid.clone(),
                };
                let classes = ctx.ds.labels.as_ref().map_or(0, |l| l.classes.len());
                let result = probe(x, &masked, classes, &on_valid, &ctx.settings.probe);
                let pick =
                    |f: fn(&simskip_eval::ProbeResult) -> f64| result.as_ref().map_or(f64::NAN, f);
                scores.push(("validation probe accuracy".into(), pick(|r| r.accuracy)));
                scores.push(("validation probe macro-F1".into(), pick(|r| r.macro_f1)));
            }
        }
        if ctx.settings.run_link_prediction && !ctx.ds.valid.is_empty() {
            let relations = refit_relations(x, &ctx.ds.train, ctx.ds.num_relations(), ctx.norm);
            let mrr =
                simskip_kge::evaluate(x, &relations, ctx.norm, &ctx.ds.valid, &ctx.filter).mrr;
            scores.push((
                "validation link-prediction MRR (relations refit)".into(),
                mrr,
            ));
        }
        if primary_kind != SignalKind::Graph && !ctx.ds.valid.is_empty() {
            let (name, graph) = validation_signal(ctx, SignalKind::Graph)?;
            scores.push((name, graph(x)));
        }
    }
    Ok(scores)
}

/// `Auto` resolved as [`validation_signal`] resolves it.
fn resolved(ctx: &EvalContext<'_>, kind: SignalKind) -> SignalKind {
    match kind {
        SignalKind::Auto if ctx.split.is_some() => SignalKind::Knn,
        SignalKind::Auto => SignalKind::Graph,
        k => k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(task: &str, input: f64, refined: f64) -> TaskScore {
        TaskScore {
            task: task.into(),
            input,
            refined,
        }
    }

    #[test]
    fn refined_is_kept_only_when_it_wins_and_nothing_falls_beyond_the_tolerance() {
        // Wins on the primary signal, small dips elsewhere within the tolerance: kept.
        let d = decide(
            vec![
                s("knn", 0.50, 0.52),
                s("f1", 0.30, 0.297),
                s("lp", 0.10, 0.11),
            ],
            0.005,
        );
        assert!(d.keep_refined, "{}", d.reason);
        // The default simulation's case: KNN rises, probe F1 falls .265 -> .184: input kept.
        let d = decide(vec![s("knn", 0.50, 0.508), s("f1", 0.265, 0.184)], 0.005);
        assert!(!d.keep_refined);
        assert!(d.reason.starts_with("f1"), "{}", d.reason);
        // No win on the primary signal: input kept, whatever else improves.
        let d = decide(vec![s("knn", 0.50, 0.50), s("f1", 0.2, 0.9)], 0.005);
        assert!(!d.keep_refined);
        // A refined table that cannot be scored on a task is a regression; an input that
        // cannot be scored is no bar.
        assert!(!decide(vec![s("knn", 0.5, 0.6), s("lp", 0.1, f64::NAN)], 0.005).keep_refined);
        assert!(decide(vec![s("knn", 0.5, 0.6), s("lp", f64::NAN, 0.1)], 0.005).keep_refined);
        assert!(!decide(vec![], 0.005).keep_refined);
        assert_eq!(decide(vec![s("knn", 0.5, 0.6)], 0.0).scores.len(), 1);
    }
}
