//! The round state machine driving secure aggregation, with every organisation played by the
//! real protocol client in process.

use super::*;
use crate::secagg::ClientRound;
use crate::strategy::FedAvgStrategy;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

const DIM: usize = 6;

fn secure_rounds(min_fit: usize, threshold: Option<u32>) -> Rounds {
    let cfg = RoundsConfig {
        run_id: "run-secure".into(),
        min_clients: 3,
        fraction_fit: 1.0,
        min_fit_clients: min_fit,
        round_timeout: ms(1000),
        heartbeat_timeout: ms(60_000),
        quorum_timeout: ms(60_000),
        seed: 3,
        stages: vec![StageSpec {
            name: "simskip".into(),
            rounds: 1,
            eval_every: 0,
            params: StageParams::defaults(StageKind::FedAvg, 4),
            privacy: None,
            secure: Some(SecureAggregation {
                threshold,
                ..Default::default()
            }),
        }],
    };
    let global = vec![
        NamedArray::new("w", vec![2, 2], vec![0.0; 4]),
        NamedArray::new("b", vec![2], vec![0.0; 2]),
    ];
    Rounds::new(cfg, vec![Box::new(FedAvgStrategy::new(global))]).unwrap()
}

/// An organisation: its update (the global model plus `shift`), examples and protocol state.
struct Org {
    name: &'static str,
    session: String,
    shift: f32,
    examples: u64,
    state: Option<ClientRound>,
    /// Stops answering after this step (its masked input or unmask answer never arrives).
    drops_at: Option<&'static str>,
    gone: bool,
}

fn update(global: &[NamedArray], shift: f32) -> Vec<NamedArray> {
    global
        .iter()
        .map(|a| {
            let data = a
                .data
                .iter()
                .enumerate()
                .map(|(i, v)| v + shift * (i as f32 + 1.0))
                .collect();
            NamedArray::new(a.name.clone(), a.shape.clone(), data)
        })
        .collect()
}

/// Plays every organisation's side of the current step, then lets the step close (all
/// answered, or on its timeout when someone dropped).
fn play_step(r: &mut Rounds, orgs: &mut [Org], now: &mut Duration) -> Vec<Event> {
    for org in orgs.iter_mut().filter(|o| !o.gone) {
        let Poll::Task(task) = r.task_for(&org.session, *now).unwrap() else {
            continue;
        };
        // Once the secure round has closed (for instance failed early), later tasks are the
        // stage's EVALUATE or FINISH: not part of the protocol played here.
        let Some(step) = task.secagg.clone() else {
            continue;
        };
        let (reply, examples, metrics) = match &step {
            SecAggTask::Begin { .. } => {
                let global = task.payload.to_arrays().unwrap();
                let layout: Vec<_> = global
                    .iter()
                    .map(|a| (a.name.clone(), a.shape.clone()))
                    .collect();
                let context = secagg::context(&task.run_id, task.stage.index, task.round);
                let (state, keys) = ClientRound::begin(
                    &step,
                    &context,
                    &layout,
                    &update(&global, org.shift),
                    org.examples,
                )
                .unwrap();
                org.state = Some(state);
                (
                    keys,
                    org.examples,
                    BTreeMap::from([("loss".to_string(), org.shift as f64)]),
                )
            }
            other => {
                assert!(task.payload.to_arrays().unwrap().is_empty());
                let reply = org.state.as_mut().unwrap().step(other).unwrap();
                (reply, 0, BTreeMap::new())
            }
        };
        let step_name = reply.step();
        if org.drops_at == Some(step_name) {
            org.gone = true;
            continue;
        }
        let outcome = r.on_result(
            Report {
                run_id: task.run_id.clone(),
                session: org.session.clone(),
                round: task.round,
                task_id: task.task_id.clone(),
                kind: task.kind,
                num_examples: examples,
                metrics,
                arrays: Vec::new(),
                error: None,
                secagg: Some(reply),
            },
            *now,
        );
        assert_eq!(
            outcome,
            ResultOutcome::Accepted,
            "{} at {step_name}",
            org.name
        );
    }
    *now += ms(10);
    let mut events = r.tick(*now);
    if orgs.iter().any(|o| o.gone) && r.current().is_some() {
        // Someone is missing: the step closes on its timeout.
        *now += ms(1000);
        events.extend(r.tick(*now));
    }
    while let Some(job) = r.take_aggregation() {
        r.on_aggregated(job.run(), 0.0);
        events.extend(r.tick(*now));
    }
    events
}

fn orgs(r: &mut Rounds, spec: &[(&'static str, f32, u64, Option<&'static str>)]) -> Vec<Org> {
    spec.iter()
        .map(|&(name, shift, examples, drops_at)| Org {
            name,
            session: r
                .on_register(name, "", 10_000, vec![], ms(0))
                .unwrap()
                .session,
            shift,
            examples,
            state: None,
            drops_at,
            gone: false,
        })
        .collect()
}

fn fit_record(events: &[Event]) -> RoundRecord {
    events
        .iter()
        .find_map(|e| match e {
            Event::RoundCompleted(rec) if rec.kind == TaskKind::Fit => Some(rec.clone()),
            _ => None,
        })
        .expect("the FIT round closed")
}

/// The example-weighted mean of the survivors' shifts, as plain FedAvg would give.
fn plain_mean(orgs: &[Org], survivors: &[&str]) -> f64 {
    let (mut sum, mut total) = (0.0, 0.0);
    for o in orgs.iter().filter(|o| survivors.contains(&o.name)) {
        sum += o.shift as f64 * o.examples as f64;
        total += o.examples as f64;
    }
    sum / total
}

fn assert_global_is(r: &Rounds, mean_shift: f64) {
    let global = r.strategy(0).unwrap().global().arrays;
    // Each coordinate i of an array is shift * (i + 1); the fixed-point error is far below
    // 1e-6 for these sizes (three organisations, 2^-24 steps, thousands of examples).
    for a in &global {
        for (i, v) in a.data.iter().enumerate() {
            let want = mean_shift * (i as f64 + 1.0);
            assert!(
                (*v as f64 - want).abs() < 1e-6,
                "{}[{i}] = {v}, plain FedAvg gives {want}",
                a.name
            );
        }
    }
}

/// One secure FIT round (its four protocol steps) of a (shift 1, 1,000 examples), b (-2,
/// 3,000) and c (0.5, 2,000), b dropping after `b_drops_at` if given: the state machine
/// after it, the organisations and the round's record.
fn secure_fit_round(
    min_fit: usize,
    threshold: Option<u32>,
    b_drops_at: Option<&'static str>,
) -> (Rounds, Vec<Org>, RoundRecord) {
    let mut r = secure_rounds(min_fit, threshold);
    let mut orgs = orgs(
        &mut r,
        &[
            ("a", 1.0, 1000, None),
            ("b", -2.0, 3000, b_drops_at),
            ("c", 0.5, 2000, None),
        ],
    );
    let mut now = ms(0);
    r.tick(now);
    let mut events = Vec::new();
    for _ in 0..4 {
        events.extend(play_step(&mut r, &mut orgs, &mut now));
    }
    let rec = fit_record(&events);
    (r, orgs, rec)
}

#[test]
fn a_secure_round_gives_the_plain_fedavg_model_and_hands_out_no_update() {
    let (r, orgs, rec) = secure_fit_round(3, None, None);
    assert!(rec.aggregated, "{:?}", rec.note);
    assert_eq!(rec.num_clients, 3);
    assert!(rec.missing.is_empty() && rec.failures.is_empty());
    assert_global_is(&r, plain_mean(&orgs, &["a", "b", "c"]));
    // The training metrics are still weighted by the declared examples.
    let loss = (1000.0 * 1.0 + 3000.0 * -2.0 + 2000.0 * 0.5) / 6000.0;
    assert!((rec.metrics["loss"] - loss).abs() < 1e-12);
}

#[test]
fn an_organisation_dropping_after_masking_leaves_the_sum_of_the_survivors() {
    let (r, orgs, rec) = secure_fit_round(2, Some(2), Some("masked input"));
    assert!(rec.aggregated, "{:?}", rec.note);
    assert_eq!(rec.num_clients, 2);
    assert_eq!(rec.missing, vec!["b".to_string()]);
    assert_global_is(&r, plain_mean(&orgs, &["a", "c"]));
}

#[test]
fn too_many_dropouts_fail_the_round_without_touching_the_model() {
    let (r, _, rec) = secure_fit_round(2, Some(3), Some("masked input"));
    assert!(!rec.aggregated);
    assert!(
        rec.note
            .as_deref()
            .unwrap()
            .starts_with("secure aggregation failed"),
        "{:?}",
        rec.note
    );
    assert_global_is(&r, 0.0);
}

#[test]
fn a_plain_update_in_a_secure_round_is_refused_unread_and_counted_as_a_failure() {
    let mut r = secure_rounds(3, None);
    let orgs = orgs(
        &mut r,
        &[
            ("a", 1.0, 1, None),
            ("b", 1.0, 1, None),
            ("c", 1.0, 1, None),
        ],
    );
    r.tick(ms(0));
    let task = r
        .task_for(&orgs[0].session, ms(1))
        .unwrap()
        .into_task()
        .unwrap();
    // The push of an unmasked update is refused before any byte of it is read...
    assert!(matches!(
        r.admit_push(&orgs[0].session, &task.task_id, 4 * DIM as u64),
        Err(IgnoreReason::TooLarge { limit: 0, .. })
    ));
    // ...and a result that carries arrays anyway is a failure, not an input.
    let outcome = r.on_result(
        Report {
            run_id: task.run_id.clone(),
            session: orgs[0].session.clone(),
            round: task.round,
            task_id: task.task_id.clone(),
            kind: task.kind,
            num_examples: 1,
            metrics: BTreeMap::new(),
            arrays: task.payload.to_arrays().unwrap(),
            error: None,
            secagg: None,
        },
        ms(2),
    );
    assert!(matches!(outcome, ResultOutcome::Failure(e) if e.contains("no arrays")));
}
