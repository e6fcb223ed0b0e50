use super::*;
use crate::privacy::ClientDp;
use crate::strategy::{FedAvgStrategy, FedEStrategy};
use crate::types::ENTITIES;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

fn stage(name: &str, kind: StageKind, rounds: u32, eval_every: u32) -> StageSpec {
    StageSpec {
        name: name.into(),
        rounds,
        eval_every,
        params: StageParams::defaults(kind, 4),
        privacy: None,
        secure: None,
    }
}

/// Advances time, running any aggregation the state machine hands out inline (the service
/// runs it on the blocking pool; the outcome is the same).
fn tick(r: &mut Rounds, now: Duration) -> Vec<Event> {
    let mut events = r.tick(now);
    while let Some(job) = r.take_aggregation() {
        assert!(r.is_aggregating());
        r.on_aggregated(job.run(), 0.25);
        events.extend(r.tick(now));
    }
    events
}

fn arrays(t: &Task) -> Vec<NamedArray> {
    t.payload.to_arrays().unwrap()
}

fn config(
    min_clients: usize,
    min_fit: usize,
    fraction: f64,
    stages: Vec<StageSpec>,
) -> RoundsConfig {
    RoundsConfig {
        run_id: "run1".into(),
        min_clients,
        fraction_fit: fraction,
        min_fit_clients: min_fit,
        round_timeout: ms(1000),
        heartbeat_timeout: ms(5000),
        quorum_timeout: ms(30_000),
        seed: 7,
        stages,
    }
}

fn w(v: f32) -> Vec<NamedArray> {
    vec![NamedArray::new("w", vec![1], vec![v])]
}

fn fedavg_rounds(min_clients: usize, min_fit: usize, rounds: u32, eval_every: u32) -> Rounds {
    Rounds::new(
        config(
            min_clients,
            min_fit,
            1.0,
            vec![stage("s", StageKind::FedAvg, rounds, eval_every)],
        ),
        vec![Box::new(FedAvgStrategy::new(w(0.0)))],
    )
    .unwrap()
}

fn register(r: &mut Rounds, names: &[&str], now: Duration) -> Vec<String> {
    names
        .iter()
        // Declares more examples than any test result claims (claims are capped by it).
        .map(|n| r.on_register(n, "", 1000, vec![], now).unwrap().session)
        .collect()
}

fn report(task: &Task, session: &str, value: f32, n: u64) -> Report {
    Report {
        run_id: task.run_id.clone(),
        session: session.into(),
        round: task.round,
        task_id: task.task_id.clone(),
        kind: task.kind,
        num_examples: n,
        metrics: BTreeMap::from([("loss".to_string(), value as f64)]),
        arrays: if task.kind == TaskKind::Fit {
            w(value)
        } else {
            vec![]
        },
        error: None,
        secagg: None,
    }
}

fn completed(events: &[Event]) -> Vec<RoundRecord> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::RoundCompleted(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn global(r: &Rounds) -> f32 {
    r.strategy(0).unwrap().global().arrays[0].data[0]
}

#[test]
fn normal_round() {
    let mut r = fedavg_rounds(3, 2, 2, 0);
    let s = register(&mut r, &["a", "b", "c"], ms(0));
    let ev = tick(&mut r, ms(0));
    assert!(ev.iter().any(|e| matches!(e, Event::RoundStarted { round: 1, kind: TaskKind::Fit, clients, .. } if clients.len() == 3)));
    for (i, sess) in s.iter().enumerate() {
        let t = r.task_for(sess, ms(10)).unwrap().into_task().unwrap();
        assert_eq!((t.kind, t.round, t.stage.rounds), (TaskKind::Fit, 1, 2));
        assert_eq!(arrays(&t), w(0.0));
        assert_eq!(t.stage.params, StageParams::defaults(StageKind::FedAvg, 4));
        let n = [1, 1, 2][i];
        assert_eq!(
            r.on_result(report(&t, sess, (i + 1) as f32, n), ms(20)),
            ResultOutcome::Accepted
        );
    }
    let ev = tick(&mut r, ms(30));
    let rec = completed(&ev);
    assert_eq!(rec.len(), 1);
    assert!(rec[0].aggregated && !rec[0].timed_out);
    assert_eq!(rec[0].num_clients, 3);
    // (1*1 + 1*2 + 2*3) / 4
    assert_eq!(rec[0].metrics["loss"], 2.25);
    assert!(ev.iter().any(|e| matches!(e, Event::GlobalUpdated { round: 1, global, .. } if global.arrays[0].data == vec![2.25])));
    assert_eq!(global(&r), 2.25);
    // Round 2 starts and carries the new global.
    assert_eq!(r.current(), Some((0, 2, TaskKind::Fit)));
    let t = r.task_for(&s[0], ms(40)).unwrap().into_task().unwrap();
    assert_eq!(arrays(&t), w(2.25));
}

#[test]
fn timeout_with_missing_client_still_aggregates() {
    let mut r = fedavg_rounds(3, 2, 2, 0);
    let s = register(&mut r, &["a", "b", "c"], ms(0));
    tick(&mut r, ms(0));
    for (i, sess) in s.iter().take(2).enumerate() {
        let t = r.task_for(sess, ms(10)).unwrap().into_task().unwrap();
        r.on_result(report(&t, sess, (i * 2) as f32, 1), ms(20));
    }
    assert!(completed(&tick(&mut r, ms(500))).is_empty());
    let rec = completed(&tick(&mut r, ms(1000)));
    assert_eq!(rec.len(), 1);
    assert!(rec[0].aggregated && rec[0].timed_out);
    assert_eq!(rec[0].missing, vec!["c".to_string()]);
    assert_eq!(global(&r), 1.0);
}

#[test]
fn too_few_answers_means_no_aggregation_and_the_run_moves_on() {
    let mut r = fedavg_rounds(3, 2, 2, 0);
    let s = register(&mut r, &["a", "b", "c"], ms(0));
    tick(&mut r, ms(0));
    let t = r.task_for(&s[0], ms(10)).unwrap().into_task().unwrap();
    r.on_result(report(&t, &s[0], 5.0, 1), ms(20));
    let ev = tick(&mut r, ms(1000));
    let rec = completed(&ev);
    assert!(!rec[0].aggregated);
    assert!(rec[0].note.as_deref().unwrap().contains("only 1"));
    assert!(!ev.iter().any(|e| matches!(e, Event::GlobalUpdated { .. })));
    assert_eq!(global(&r), 0.0);
    assert_eq!(r.current(), Some((0, 2, TaskKind::Fit)));
}

#[test]
fn late_duplicate_and_foreign_results_are_ignored() {
    let mut r = fedavg_rounds(3, 2, 3, 0);
    let s = register(&mut r, &["a", "b", "c"], ms(0));
    tick(&mut r, ms(0));
    let tasks: Vec<Task> = s
        .iter()
        .map(|x| r.task_for(x, ms(1)).unwrap().into_task().unwrap())
        .collect();
    assert_eq!(
        r.on_result(report(&tasks[0], &s[0], 1.0, 1), ms(2)),
        ResultOutcome::Accepted
    );
    // Duplicate.
    assert!(matches!(
        r.on_result(report(&tasks[0], &s[0], 100.0, 1), ms(3)),
        ResultOutcome::Ignored(IgnoreReason::Duplicate(_))
    ));
    // Wrong run id.
    let mut foreign = report(&tasks[1], &s[1], 100.0, 1);
    foreign.run_id = "other".into();
    assert!(matches!(
        r.on_result(foreign, ms(3)),
        ResultOutcome::Ignored(IgnoreReason::WrongRunId { .. })
    ));
    // A task issued to someone else.
    assert!(matches!(
        r.on_result(report(&tasks[2], &s[1], 100.0, 1), ms(3)),
        ResultOutcome::Ignored(IgnoreReason::UnknownTask(_))
    ));
    // Unknown session.
    assert!(matches!(
        r.on_result(report(&tasks[1], "nobody", 100.0, 1), ms(3)),
        ResultOutcome::Ignored(IgnoreReason::UnknownSession(_))
    ));
    assert_eq!(
        r.on_result(report(&tasks[1], &s[1], 3.0, 1), ms(4)),
        ResultOutcome::Accepted
    );
    // Round 1 closes on timeout without c; c's late answer then lands in round 2.
    let rec = completed(&tick(&mut r, ms(1000)));
    assert_eq!(rec[0].num_clients, 2);
    assert_eq!(global(&r), 2.0);
    assert!(matches!(
        r.on_result(report(&tasks[2], &s[2], 100.0, 1), ms(1001)),
        ResultOutcome::Ignored(IgnoreReason::NotCurrentRound { round: 1, .. })
    ));
    assert_eq!(r.ignored_results(), 5);
    assert!(completed(&tick(&mut r, ms(1002))).is_empty());
    assert_eq!(global(&r), 2.0);
}

#[test]
fn waits_for_min_clients() {
    let mut r = fedavg_rounds(3, 1, 1, 0);
    let s = register(&mut r, &["a", "b"], ms(0));
    assert!(!tick(&mut r, ms(10))
        .iter()
        .any(|e| matches!(e, Event::RoundStarted { .. })));
    assert!(matches!(r.task_for(&s[0], ms(20)).unwrap(), Poll::Wait));
    register(&mut r, &["c"], ms(30));
    assert!(tick(&mut r, ms(40))
        .iter()
        .any(|e| matches!(e, Event::RoundStarted { .. })));
    assert!(r.task_for(&s[0], ms(50)).unwrap().into_task().is_some());
}

fn drive(r: &mut Rounds, sessions: &[String], now: Duration) -> Vec<Event> {
    for s in sessions {
        if let Ok(Poll::Task(t)) = r.task_for(s, now) {
            r.on_result(report(&t, s, 1.0, 1), now);
        }
    }
    tick(r, now)
}

#[test]
fn evaluates_every_k_rounds_and_after_the_last() {
    let mut r = Rounds::new(
        config(
            2,
            1,
            1.0,
            vec![
                stage("one", StageKind::FedAvg, 5, 2),
                stage("two", StageKind::FedAvg, 1, 0),
            ],
        ),
        vec![
            Box::new(FedAvgStrategy::new(w(0.0))),
            Box::new(FedAvgStrategy::new(w(0.0))),
        ],
    )
    .unwrap();
    let s = register(&mut r, &["a", "b"], ms(0));
    tick(&mut r, ms(0));
    let mut seq = Vec::new();
    for i in 1..50 {
        for e in drive(&mut r, &s, ms(i)) {
            if let Event::RoundCompleted(rec) = e {
                seq.push(format!("{}:{}{}", rec.stage, rec.kind.as_str(), rec.round));
            }
        }
        if r.is_done() {
            break;
        }
    }
    assert_eq!(
        seq,
        [
            "one:fit1",
            "one:fit2",
            "one:evaluate2",
            "one:fit3",
            "one:fit4",
            "one:evaluate4",
            "one:fit5",
            "one:evaluate5",
            "one:finish_stage5",
            "two:fit1",
            "two:evaluate1",
            "two:finish_stage1"
        ]
    );
    assert!(r.is_done());
    assert!(!r.all_alive_told_done());
    for x in &s {
        assert!(matches!(r.task_for(x, ms(100)).unwrap(), Poll::Done));
    }
    assert!(r.all_alive_told_done());
}

/// a, b and c register at 0 under a long round timeout, so only the heartbeat rule can
/// release c; at 4 s, a and b answer FIT round 1 (2.0 and 4.0, one example each) and c stays
/// silent. The sessions of a, b and c.
fn c_falls_silent_in_round_one(r: &mut Rounds) -> Vec<String> {
    r.cfg.round_timeout = ms(60_000);
    let s = register(r, &["a", "b", "c"], ms(0));
    tick(r, ms(0));
    let ta = r.task_for(&s[0], ms(4000)).unwrap().into_task().unwrap();
    let tb = r.task_for(&s[1], ms(4000)).unwrap().into_task().unwrap();
    r.on_result(report(&ta, &s[0], 2.0, 1), ms(4000));
    r.on_result(report(&tb, &s[1], 4.0, 1), ms(4000));
    s
}

#[test]
fn silent_client_is_marked_dead_and_dropped_from_the_round() {
    let mut r = fedavg_rounds(2, 2, 2, 0);
    let s = c_falls_silent_in_round_one(&mut r);
    assert!(
        completed(&tick(&mut r, ms(4000))).is_empty(),
        "still waiting for c"
    );
    let ev = tick(&mut r, ms(5001));
    assert!(ev.contains(&Event::ClientDead { name: "c".into() }));
    let rec = completed(&ev);
    assert!(rec[0].aggregated && !rec[0].timed_out);
    assert_eq!(rec[0].missing, vec!["c".to_string()]);
    assert_eq!(global(&r), 3.0);
    assert_eq!(r.alive_clients(), vec!["a".to_string(), "b".to_string()]);
    assert!(matches!(
        r.task_for(&s[2], ms(5002)),
        Err(RoundsError::UnknownSession(_))
    ));
    assert!(!r.on_heartbeat(&s[2], ms(5002)).known);
}

#[test]
fn reregistering_client_gets_a_new_session_and_the_current_model() {
    let mut r = fedavg_rounds(3, 2, 3, 0);
    r.cfg.round_timeout = ms(60_000);
    let s = register(&mut r, &["a", "b", "c"], ms(0));
    tick(&mut r, ms(0));
    let tc = r.task_for(&s[2], ms(1)).unwrap().into_task().unwrap();
    // c crashes mid-round and comes back.
    let s2 = r
        .on_register("c", "run1", 1, vec![], ms(2))
        .unwrap()
        .session;
    assert_ne!(s2, s[2]);
    let ev = tick(&mut r, ms(2));
    assert!(ev.contains(&Event::ClientRegistered {
        name: "c".into(),
        session: s2.clone(),
        rejoined: true
    }));
    // Its old task no longer counts; the new session gets nothing this round.
    assert!(matches!(r.task_for(&s2, ms(3)).unwrap(), Poll::Wait));
    assert!(matches!(
        r.on_result(report(&tc, &s[2], 100.0, 1), ms(3)),
        ResultOutcome::Ignored(IgnoreReason::UnknownSession(_))
    ));
    for (x, v) in [(&s[0], 1.0), (&s[1], 3.0)] {
        let t = r.task_for(x, ms(4)).unwrap().into_task().unwrap();
        r.on_result(report(&t, x, v, 1), ms(4));
    }
    let rec = completed(&tick(&mut r, ms(5)));
    assert!(
        rec[0].aggregated && !rec[0].timed_out,
        "the round did not wait for c's old task"
    );
    let t = r.task_for(&s2, ms(6)).unwrap().into_task().unwrap();
    assert_eq!((t.round, arrays(&t)), (2, w(2.0)));
    assert_eq!(
        r.on_result(report(&t, &s2, 2.0, 1), ms(7)),
        ResultOutcome::Accepted
    );
    assert!(r.on_register("c", "other-run", 1, vec![], ms(8)).is_err());
}

#[test]
fn client_errors_and_bad_arrays_count_as_failures() {
    let mut r = fedavg_rounds(2, 1, 1, 0);
    let s = register(&mut r, &["a", "b"], ms(0));
    tick(&mut r, ms(0));
    let ta = r.task_for(&s[0], ms(1)).unwrap().into_task().unwrap();
    let tb = r.task_for(&s[1], ms(1)).unwrap().into_task().unwrap();
    let mut bad = report(&ta, &s[0], 1.0, 1);
    bad.arrays = vec![NamedArray::new("w", vec![2], vec![1.0, 2.0])];
    assert!(matches!(r.on_result(bad, ms(2)), ResultOutcome::Failure(_)));
    let mut err = report(&tb, &s[1], 1.0, 1);
    err.error = Some("out of memory".into());
    assert!(matches!(r.on_result(err, ms(2)), ResultOutcome::Failure(_)));
    let rec = completed(&tick(&mut r, ms(3)));
    assert!(!rec[0].aggregated);
    assert_eq!(rec[0].failures.len(), 2);
}

#[test]
fn fede_rows_travel_in_key_order_and_average_over_holders() {
    let mut r = Rounds::new(
        config(2, 2, 1.0, vec![stage("kge", StageKind::FedE, 1, 0)]),
        vec![Box::new(FedEStrategy::new(4, 3.0, 1))],
    )
    .unwrap();
    let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let sa = r
        .on_register("a", "", 10, keys(&["x", "y"]), ms(0))
        .unwrap()
        .session;
    let sb = r
        .on_register("b", "", 10, keys(&["z", "y"]), ms(0))
        .unwrap()
        .session;
    tick(&mut r, ms(0));
    let before = r.strategy(0).unwrap().global();
    assert_eq!(before.keys.as_deref().unwrap(), &keys(&["x", "y", "z"])[..]);
    let bound = 3.0;
    assert!(before.arrays[0].data.iter().all(|v| v.abs() <= bound));
    let row = |g: &GlobalSnapshot, i: usize| g.arrays[0].data[i * 4..(i + 1) * 4].to_vec();
    let ta = r.task_for(&sa, ms(1)).unwrap().into_task().unwrap();
    let tb = r.task_for(&sb, ms(1)).unwrap().into_task().unwrap();
    assert_eq!(arrays(&ta)[0].name, ENTITIES);
    assert_eq!(arrays(&ta)[0].shape, vec![2, 4]);
    assert_eq!(arrays(&ta)[0].data[..4], row(&before, 0)[..]);
    assert_eq!(arrays(&tb)[0].data[..4], row(&before, 2)[..]);
    // a adds 1, b adds 3 to each row it holds.
    for (t, s, d) in [(&ta, &sa, 1.0), (&tb, &sb, 3.0)] {
        let mut rep = report(t, s, 0.0, 10);
        let mut rows = arrays(t)[0].clone();
        rows.data.iter_mut().for_each(|v| *v += d);
        rep.arrays = vec![rows];
        assert_eq!(r.on_result(rep, ms(2)), ResultOutcome::Accepted);
    }
    tick(&mut r, ms(3));
    let after = r.strategy(0).unwrap().global();
    let add = |a: Vec<f32>, d: f32| a.into_iter().map(|v| v + d).collect::<Vec<_>>();
    assert_eq!(row(&after, 0), add(row(&before, 0), 1.0));
    assert_eq!(row(&after, 1), add(row(&before, 1), 2.0));
    assert_eq!(row(&after, 2), add(row(&before, 2), 3.0));
    // Evaluate then FINISH_STAGE carries each client's own rows.
    for x in [&sa, &sb] {
        let t = r.task_for(x, ms(4)).unwrap().into_task().unwrap();
        assert_eq!(t.kind, TaskKind::Evaluate);
        r.on_result(report(&t, x, 0.5, 10), ms(4));
    }
    tick(&mut r, ms(5));
    let t = r.task_for(&sb, ms(6)).unwrap().into_task().unwrap();
    assert_eq!(t.kind, TaskKind::FinishStage);
    assert_eq!(arrays(&t)[0].data[..4], row(&after, 2)[..]);
}

#[test]
fn config_is_validated() {
    let ok = config(1, 1, 1.0, vec![stage("s", StageKind::FedAvg, 1, 0)]);
    assert!(Rounds::new(ok.clone(), vec![Box::new(FedEStrategy::new(2, 1.0, 0))]).is_err());
    assert!(Rounds::new(ok.clone(), vec![]).is_err());
    let mut bad = ok.clone();
    bad.fraction_fit = 0.0;
    assert!(Rounds::new(bad, vec![Box::new(FedAvgStrategy::new(w(0.0)))]).is_err());
}

#[test]
fn fraction_fit_selects_a_seeded_subset() {
    let mk = || {
        let mut r = Rounds::new(
            config(4, 2, 0.25, vec![stage("s", StageKind::FedAvg, 1, 0)]),
            vec![Box::new(FedAvgStrategy::new(w(0.0)))],
        )
        .unwrap();
        register(&mut r, &["a", "b", "c", "d", "e", "f"], ms(0));
        tick(&mut r, ms(0))
            .into_iter()
            .find_map(|e| match e {
                Event::RoundStarted { clients, .. } => Some(clients),
                _ => None,
            })
            .unwrap()
    };
    let sel = mk();
    assert_eq!(sel.len(), 2);
    assert_eq!(sel, mk());
}

#[test]
fn a_dead_client_does_not_hold_back_later_rounds_below_min_clients() {
    // min_clients 3 starts the run; once one of the three dies, rounds go on with the two
    // others (min_fit_clients 2) instead of waiting for a third client forever.
    let mut r = fedavg_rounds(3, 2, 3, 0);
    let s = c_falls_silent_in_round_one(&mut r);
    let ev = tick(&mut r, ms(5001));
    assert!(ev.contains(&Event::ClientDead { name: "c".into() }));
    assert_eq!(completed(&ev)[0].round, 1);
    // Round 2 is under way with a and b only.
    let ta = r.task_for(&s[0], ms(5002)).unwrap().into_task().unwrap();
    assert_eq!((ta.round, ta.kind), (2, TaskKind::Fit));
    // Before the run starts, min_clients still holds.
    let mut fresh = fedavg_rounds(3, 2, 1, 0);
    let s2 = register(&mut fresh, &["a", "b"], ms(0));
    fresh.tick(ms(0));
    assert!(fresh.task_for(&s2[0], ms(1)).unwrap().into_task().is_none());
}

#[test]
fn claimed_example_counts_are_capped_and_non_finite_metrics_refused() {
    let mut r = fedavg_rounds(2, 2, 1, 0);
    // Both declare 1 example at registration.
    let s: Vec<String> = ["honest", "greedy"]
        .iter()
        .map(|n| r.on_register(n, "", 1, vec![], ms(0)).unwrap().session)
        .collect();
    tick(&mut r, ms(0));
    let th = r.task_for(&s[0], ms(1)).unwrap().into_task().unwrap();
    let tg = r.task_for(&s[1], ms(1)).unwrap().into_task().unwrap();
    assert_eq!(
        r.on_result(report(&th, &s[0], 1.0, 1), ms(2)),
        ResultOutcome::Accepted
    );
    // Claims 10^12 examples: counted as the 1 it declared, so the mean stays (1 + 3) / 2.
    assert_eq!(
        r.on_result(report(&tg, &s[1], 3.0, 1_000_000_000_000), ms(2)),
        ResultOutcome::Accepted
    );
    let rec = completed(&tick(&mut r, ms(3)));
    assert_eq!(rec[0].clients["greedy"].num_examples, 1);
    assert_eq!(global(&r), 2.0);

    let mut r = fedavg_rounds(2, 2, 1, 0);
    let s = register(&mut r, &["a", "b"], ms(0));
    tick(&mut r, ms(0));
    let ta = r.task_for(&s[0], ms(1)).unwrap().into_task().unwrap();
    let mut nan = report(&ta, &s[0], 1.0, 1);
    nan.metrics.insert("loss".into(), f64::NAN);
    assert!(matches!(r.on_result(nan, ms(2)), ResultOutcome::Failure(m) if m.contains("loss")));
}

#[test]
fn non_finite_weights_are_a_failure_never_a_change_to_the_global_model() {
    let mut r = fedavg_rounds(2, 1, 1, 0);
    let s = register(&mut r, &["a", "b"], ms(0));
    tick(&mut r, ms(0));
    let ta = r.task_for(&s[0], ms(1)).unwrap().into_task().unwrap();
    let tb = r.task_for(&s[1], ms(1)).unwrap().into_task().unwrap();
    assert_eq!(
        r.on_result(report(&ta, &s[0], 4.0, 1), ms(2)),
        ResultOutcome::Accepted
    );
    let mut poisoned = report(&tb, &s[1], 1.0, 1);
    poisoned.arrays = vec![NamedArray::new("w", vec![1], vec![f32::NAN])];
    assert!(matches!(
        r.on_result(poisoned, ms(2)),
        ResultOutcome::Failure(_)
    ));
    let rec = completed(&tick(&mut r, ms(3)));
    assert!(rec[0].failures.contains_key("b"));
    assert_eq!(global(&r), 4.0, "the honest client's update alone");
}

#[test]
fn run_is_aborted_when_it_cannot_reach_its_minimum_clients() {
    // Never enough clients to start: aborted once the quorum deadline passes, not before.
    let mut r = fedavg_rounds(3, 2, 2, 0);
    let s = register(&mut r, &["a", "b"], ms(0));
    tick(&mut r, ms(0));
    // The two heartbeat; the third never comes.
    for t in (1000..30_000).step_by(1000) {
        r.on_heartbeat(&s[0], ms(t));
        r.on_heartbeat(&s[1], ms(t));
        tick(&mut r, ms(t));
        assert!(r.aborted().is_none(), "aborted early at {t} ms");
    }
    let ev = tick(&mut r, ms(30_000));
    assert!(ev.iter().any(|e| matches!(e, Event::Aborted { .. })));
    let reason = r.aborted().expect("aborted");
    assert!(reason.contains("2 of the 3"), "{reason}");
    assert!(r.done_at().is_some());

    // Under way, the deadline counts from the moment the run became short of clients: b
    // goes silent at 20 ms, is declared dead 5 s later, and the run is aborted 30 s after that.
    let mut r = fedavg_rounds(2, 2, 1000, 0);
    let s = register(&mut r, &["a", "b"], ms(0));
    tick(&mut r, ms(0));
    for (i, sess) in s.iter().enumerate() {
        let t = r.task_for(sess, ms(10)).unwrap().into_task().unwrap();
        r.on_result(report(&t, sess, i as f32, 1), ms(20));
    }
    tick(&mut r, ms(20));
    assert_eq!(r.records().len(), 1);
    let mut aborted_at = None;
    for t in (100..=60_000).step_by(100) {
        r.on_heartbeat(&s[0], ms(t));
        tick(&mut r, ms(t));
        if r.aborted().is_some() {
            aborted_at = Some(t);
            break;
        }
    }
    let at = aborted_at.expect("aborted within 60 s");
    assert!((35_000..=36_200).contains(&at), "aborted at {at} ms");
    let reason = r.aborted().unwrap();
    assert!(reason.contains("1 of the 2"), "{reason}");
}

fn dp_stage(rounds: u32) -> StageSpec {
    StageSpec {
        privacy: Some(DpConfig {
            noise_multiplier: 2.0,
            clip_norm: 0.5,
            delta: 1e-5,
        }),
        ..stage("s", StageKind::FedAvg, rounds, 0)
    }
}

/// Plays `rounds` FIT rounds in which every selected client answers; returns their records.
fn play_fit_rounds(r: &mut Rounds, sessions: &[String], rounds: u32, t0: u64) -> Vec<RoundRecord> {
    let mut records = Vec::new();
    for k in 0..rounds as u64 {
        let now = t0 + 100 * k;
        tick(r, ms(now));
        for sess in sessions {
            let Some(t) = r.task_for(sess, ms(now + 10)).unwrap().into_task() else {
                continue;
            };
            assert_eq!(t.kind, TaskKind::Fit);
            // Without secure aggregation each upload carries the whole noise.
            assert_eq!(
                t.stage.privacy,
                Some(ClientDp {
                    noise_multiplier: 2.0,
                    clip_norm: 0.5,
                    noise_shares: 1
                })
            );
            r.on_result(report(&t, sess, 1.0, 1), ms(now + 20));
        }
        records.extend(
            completed(&tick(r, ms(now + 30)))
                .into_iter()
                .filter(|rec| rec.kind == TaskKind::Fit),
        );
    }
    records
}

#[test]
fn a_dp_stage_records_the_epsilon_spent_after_every_fit_round() {
    // 2 of 4 organisations per round: q = 0.5.
    let cfg = config(4, 2, 0.5, vec![dp_stage(3)]);
    let mut r = Rounds::new(cfg.clone(), vec![Box::new(FedAvgStrategy::new(w(0.0)))]).unwrap();
    let s = register(&mut r, &["a", "b", "c", "d"], ms(0));
    let records = play_fit_rounds(&mut r, &s, 2, 0);
    assert_eq!(records.len(), 2);
    for (steps, rec) in (1..).zip(&records) {
        let want = crate::accountant::epsilon(0.5, 2.0, steps, 1e-5).unwrap();
        assert_eq!(rec.metrics[DP_SAMPLING_RATE], 0.5);
        assert_eq!(rec.metrics[DP_DELTA], 1e-5);
        assert!((rec.metrics[DP_EPSILON] - want).abs() < 1e-12, "{rec:?}");
    }
    assert!(records[1].metrics[DP_EPSILON] > records[0].metrics[DP_EPSILON]);

    // A resumed run goes on from what the records say was spent.
    let mut resumed = Rounds::resume(
        cfg,
        vec![Box::new(FedAvgStrategy::new(w(0.0)))],
        ResumePoint {
            records: r.records().to_vec(),
            now: ms(1000),
        },
    )
    .unwrap();
    let s = register(&mut resumed, &["a", "b", "c", "d"], ms(1000));
    let more = play_fit_rounds(&mut resumed, &s, 1, 1000);
    let want = crate::accountant::epsilon(0.5, 2.0, 3, 1e-5).unwrap();
    assert!((more[0].metrics[DP_EPSILON] - want).abs() < 1e-12);

    // A stage without DP records none.
    let mut plain = fedavg_rounds(2, 2, 1, 0);
    let s = register(&mut plain, &["a", "b"], ms(0));
    tick(&mut plain, ms(0));
    for sess in &s {
        let t = plain.task_for(sess, ms(10)).unwrap().into_task().unwrap();
        assert_eq!(t.stage.privacy, None);
        plain.on_result(report(&t, sess, 1.0, 1), ms(20));
    }
    let rec = completed(&tick(&mut plain, ms(30)));
    assert!(!rec[0].metrics.contains_key(DP_EPSILON));
}

#[test]
fn bad_dp_settings_are_refused_with_one_line() {
    let mut st = dp_stage(1);
    st.privacy = Some(DpConfig {
        noise_multiplier: -1.0,
        clip_norm: 0.5,
        delta: 1e-5,
    });
    let e = Rounds::new(
        config(2, 2, 1.0, vec![st]),
        vec![Box::new(FedAvgStrategy::new(w(0.0)))],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("privacy.noise_multiplier = -1"), "{e}");
    assert_eq!(e.lines().count(), 1);
}
