//! A member that claims entity keys it does not hold, against a real coordinator on loopback.
//!
//! Members hold the federation secret, so a member that guesses the names of entities another
//! organisation holds can register their blinded keys. With `min_holders = 2` each such entity
//! is then "shared" (the victim and the attacker hold it), its row travels, and the attacker
//! receives its mean over the two holders. FedE averages rows without weights, so from that
//! mean and its own upload the attacker recovers the victim's row: `2 * mean - own`.
//!
//! * Without a `privacy` table the recovery is exact (FedE's known leak, shown here as it is).
//! * With one, every holder clips and noises each row's update before it leaves, so what the
//!   attacker recovers is the victim's row plus that noise, and the run's records report the
//!   epsilon spent.
//!
//! The attacker speaks the protocol by hand on the project's generated gRPC client: it
//! registers the claimed keys, and it uploads exactly what it chooses (no clipping, no noise of
//! its own), the strongest position a member has. The victim and an honest third organisation
//! run the project's client library with blinded keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::NamedArray;
use simskip_fed::blind::{BlindKeys, KeyBlinder};
use simskip_fed::chunk::encode_arrays;
use simskip_fed::client::DP_CLIPPED_FRACTION;
use simskip_fed::privacy::DpConfig;
use simskip_fed::proto::coordinator_client::CoordinatorClient;
use simskip_fed::proto::{self, register_request, result_chunk};
use simskip_fed::rounds::{RoundRecord, DP_EPSILON};
use simskip_fed::{
    run_client, serve, ClientConfig, ClientWork, EvalOutput, FedEStrategy, FitOutput, Robustness,
    RunSummary, ServerConfig, StageConfig, StageInfo, StageKind, StageParams, Strategy, TaskKind,
    WorkError, ENTITIES,
};
use tonic::transport::Channel;

const DIM: usize = 8;
/// Entities only the victim holds (the attacker guesses all their names).
const PRIVATE: usize = 32;
/// Entities the victim and the honest organisation both hold.
const SHARED: usize = 4;
const ROUNDS: u32 = 2;

/// Per FIT round: the rows it received and the rows it produced, in its key order.
type Fits = Arc<Mutex<Vec<(Vec<f32>, Vec<f32>)>>>;

/// An organisation whose training moves each row it holds by a fixed amount of L2 norm
/// `step` (a direction drawn per row and round from `seed`), and records each FIT.
struct Org {
    names: Vec<String>,
    step: f32,
    rng: StdRng,
    fits: Fits,
}

impl ClientWork for Org {
    fn entity_keys(&self) -> Vec<String> {
        self.names.clone()
    }
    fn num_examples(&self) -> u64 {
        10
    }
    fn fit(
        &mut self,
        _: &StageInfo,
        _: u32,
        global: Vec<NamedArray>,
    ) -> Result<FitOutput, WorkError> {
        let received = global[0].data.clone();
        let mut rows = global[0].clone();
        for row in rows.data.chunks_exact_mut(DIM) {
            let dir: Vec<f32> = (0..DIM)
                .map(|_| self.rng.random_range(-1.0f32..1.0))
                .collect();
            let norm = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (v, d) in row.iter_mut().zip(&dir) {
                *v += self.step * d / norm;
            }
        }
        self.fits
            .lock()
            .unwrap()
            .push((received, rows.data.clone()));
        Ok(FitOutput {
            arrays: vec![rows],
            num_examples: 10,
            metrics: BTreeMap::new(),
        })
    }
    fn evaluate(
        &mut self,
        _: &StageInfo,
        _: u32,
        _: Vec<NamedArray>,
    ) -> Result<EvalOutput, WorkError> {
        Ok(EvalOutput {
            num_examples: 10,
            metrics: BTreeMap::new(),
        })
    }
    fn finish_stage(&mut self, _: &StageInfo, _: Vec<NamedArray>) -> Result<(), WorkError> {
        Ok(())
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The attacker: a member speaking the protocol by hand.
struct Attacker {
    client: CoordinatorClient<Channel>,
    session: String,
}

impl Attacker {
    async fn register(port: u16, name: &str, keys: Vec<String>) -> Self {
        let mut client = CoordinatorClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let messages = vec![
            proto::RegisterRequest {
                part: Some(register_request::Part::Header(proto::RegisterHeader {
                    client_name: name.into(),
                    num_examples: 10,
                    num_entity_keys: keys.len() as u64,
                    ..Default::default()
                })),
            },
            proto::RegisterRequest {
                part: Some(register_request::Part::EntityKeys(proto::EntityKeys {
                    keys,
                })),
            },
        ];
        let session = client
            .register(tokio_stream::iter(messages))
            .await
            .unwrap()
            .into_inner()
            .session_id;
        Self { client, session }
    }

    /// The next FIT or FINISH_STAGE task (`None` once the run is done) and its rows; EVALUATE
    /// tasks on the way are answered.
    async fn next_task(&mut self) -> Option<(proto::TaskHeader, Vec<NamedArray>)> {
        loop {
            let (h, rows) = support::poll_task_by_hand(&mut self.client, &self.session).await;
            match proto::TaskKind::try_from(h.kind).unwrap() {
                proto::TaskKind::Fit | proto::TaskKind::FinishStage => return Some((h, rows)),
                proto::TaskKind::Done | proto::TaskKind::Stop => return None,
                // Answered like any member, so no round waits for it.
                proto::TaskKind::Evaluate => self.answer(&h, &[]).await,
                // WAIT: ask again shortly.
                _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    async fn answer(&mut self, task: &proto::TaskHeader, arrays: &[NamedArray]) {
        let (headers, chunks) = encode_arrays(arrays, 1 << 12, &task.run_id, task.round);
        let header = proto::ResultChunk {
            part: Some(result_chunk::Part::Header(proto::ResultHeader {
                run_id: task.run_id.clone(),
                round: task.round,
                task_id: task.task_id.clone(),
                session_id: self.session.clone(),
                kind: task.kind,
                num_examples: 10,
                arrays: headers,
                ..Default::default()
            })),
        };
        let messages: Vec<proto::ResultChunk> = std::iter::once(header)
            .chain(chunks.into_iter().map(|t| proto::ResultChunk {
                part: Some(result_chunk::Part::Tensor(t)),
            }))
            .collect();
        let reply = self
            .client
            .push_result(tokio_stream::iter(messages))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status,
            proto::ResultStatus::Accepted as i32,
            "{reply:?}"
        );
    }

    /// Plays the run: at every FIT it uploads the rows it received unchanged (an update of
    /// zero, indistinguishable from an organisation that learnt nothing). Returns, per FIT
    /// round, (what it uploaded, the means it received next), its rows in its key order.
    async fn play(mut self) -> Vec<(Vec<f32>, Vec<f32>)> {
        let mut uploaded: Option<Vec<f32>> = None;
        let mut views = Vec::new();
        while let Some((task, arrays)) = self.next_task().await {
            let rows = arrays
                .iter()
                .find(|a| a.name == ENTITIES)
                .expect("FedE tasks carry the rows")
                .clone();
            if let Some(own) = uploaded.take() {
                views.push((own, rows.data.clone()));
            }
            if task.kind == proto::TaskKind::Fit as i32 {
                uploaded = Some(rows.data.clone());
                self.answer(&task, &[rows]).await;
            } else {
                self.answer(&task, &[]).await;
            }
        }
        views
    }
}

/// What one run leaves: the coordinator's summary, the attacker's view and the victim's fits.
struct Outcome {
    summary: RunSummary,
    /// Per FIT round: the victim's true rows of the claimed entities, and the attacker's
    /// recovery `2 * mean - own` of them, row-major, `PRIVATE` rows of `DIM`.
    pairs: Vec<(Vec<f32>, Vec<f32>)>,
}

async fn run(dir: &Path, privacy: Option<DpConfig>, victim_step: f32) -> Outcome {
    let secret = dir.join("federation.secret");
    std::fs::write(&secret, simskip_fed::blind::new_secret()).unwrap();
    let params = StageParams::defaults(StageKind::FedE, DIM);
    let bound = match &params {
        StageParams::FedE(t) => simskip_kge::init_bound(t),
        _ => unreachable!(),
    };
    let aggregation = Robustness {
        min_holders: 2,
        ..Default::default()
    };
    let fede = StageConfig {
        aggregation: aggregation.clone(),
        privacy,
        ..support::stage("fede", ROUNDS, 0, params)
    };
    let cfg = ServerConfig {
        round_timeout_secs: 60.0,
        heartbeat_timeout_secs: 30.0,
        ..support::server_config("claimed-keys", &dir.join("out"), vec![fede], 3, 3)
    };
    let (listener, port) = support::loopback_listener().await;
    let strategies: Vec<Box<dyn Strategy>> = vec![Box::new(
        FedEStrategy::new(DIM, bound, 1).with_rule(aggregation),
    )];
    let server = tokio::spawn(serve(cfg, listener, strategies, std::future::pending()));

    let victim_names: Vec<String> = names("shared", SHARED)
        .into_iter()
        .chain(names("private", PRIVATE))
        .collect();
    let honest_names: Vec<String> = names("shared", SHARED)
        .into_iter()
        .chain(names("honest-only", 3))
        .collect();
    let victim_fits = Fits::default();
    let mut honest = Vec::new();
    for (name, held, step, seed, fits) in [
        ("victim", victim_names, victim_step, 7, victim_fits.clone()),
        ("honest", honest_names, 0.1, 8, Fits::default()),
    ] {
        let config = ClientConfig {
            blind_keys: Some(BlindKeys {
                secret_file: secret.clone(),
            }),
            ..support::client_config(port, name)
        };
        let work = Org {
            names: held,
            step,
            rng: StdRng::seed_from_u64(seed),
            fits,
        };
        honest.push(tokio::spawn(run_client(config, work)));
    }
    // The attacker holds the federation secret, as every member does, and guesses the
    // victim's entity names: it registers their blinded keys as its own.
    let blinder = KeyBlinder::from_file(&secret).unwrap();
    let attacker = Attacker::register(
        port,
        "attacker",
        blinder.blind_all(&names("private", PRIVATE)),
    )
    .await;
    let views = attacker.play().await;
    for h in honest {
        h.await.unwrap().unwrap();
    }
    let summary = server.await.unwrap().unwrap();

    let fits = victim_fits.lock().unwrap().clone();
    assert_eq!(fits.len(), ROUNDS as usize);
    assert_eq!(views.len(), ROUNDS as usize, "the attacker saw every round");
    let pairs = fits
        .iter()
        .zip(&views)
        .map(|((_, produced), (own, means))| {
            let truth = produced[SHARED * DIM..].to_vec();
            let recovered = means.iter().zip(own).map(|(m, o)| 2.0 * m - o).collect();
            (truth, recovered)
        })
        .collect();
    Outcome { summary, pairs }
}

fn fit_records(summary: &RunSummary) -> Vec<&RoundRecord> {
    summary
        .records
        .iter()
        .filter(|r| r.kind == TaskKind::Fit)
        .collect()
}

/// Every FIT round closed with all three organisations, none by its timeout.
fn assert_all_answered(summary: &RunSummary) {
    assert!(summary.completed);
    for r in &summary.records {
        assert!(!r.timed_out, "{r:?}");
    }
    let fits = fit_records(summary);
    assert_eq!(fits.len(), ROUNDS as usize);
    for r in fits {
        assert!(r.aggregated && !r.timed_out, "{r:?}");
        assert_eq!(r.num_clients, 3, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_claiming_guessed_keys_recovers_the_holders_rows_without_dp() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), None, 0.3).await;
    assert_all_answered(&out.summary);
    // FedE's known leak, shown as it is: the victim's private rows, to float rounding.
    for (round, (truth, recovered)) in out.pairs.iter().enumerate() {
        assert_eq!(truth.len(), PRIVATE * DIM);
        let worst = truth
            .iter()
            .zip(recovered)
            .map(|(t, r)| (t - r).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "round {}: off by {worst}", round + 1);
    }
    assert!(fit_records(&out.summary)
        .iter()
        .all(|r| !r.metrics.contains_key(DP_EPSILON)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_dp_on_fede_a_claiming_member_recovers_rows_only_to_the_noise_scale() {
    let dir = tempfile::tempdir().unwrap();
    let dp = DpConfig {
        noise_multiplier: 1.0,
        clip_norm: 0.5,
        delta: 1e-5,
    };
    // The victim's updates stay inside the clip bound, so the recovery error is the noise
    // alone (clipping would only add to it).
    let out = run(dir.path(), Some(dp.clone()), 0.25).await;
    assert_all_answered(&out.summary);

    // Each coordinate of the victim's upload carries independent N(0, s^2) noise,
    // s = sigma * C, and the attacker's own upload none, so the recovery error e over the
    // N = ROUNDS * PRIVATE * DIM = 512 coordinates has sum(e^2) / s^2 ~ chi-square(N). By the
    // Chernoff bound P(chi2_N <= aN) <= (a e^(1-a))^(N/2): for a = 1/2 about 4e-22, and
    // P(chi2_N >= 2N) <= (2/e)^(N/2), about 1e-34; so asserting mean(e^2) in [s^2/2, 2 s^2]
    // fails falsely with probability below 1e-21.
    let s = dp.noise_multiplier * dp.clip_norm;
    let errors: Vec<f64> = out
        .pairs
        .iter()
        .flat_map(|(truth, recovered)| {
            truth
                .iter()
                .zip(recovered)
                .map(|(t, r)| (*r as f64) - (*t as f64))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(errors.len(), ROUNDS as usize * PRIVATE * DIM);
    let mse = errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64;
    assert!(
        (s * s / 2.0..=2.0 * s * s).contains(&mse),
        "mean squared recovery error {mse} for noise variance {}",
        s * s
    );
    // The victim's own records: no update clipped (the error above is the noise alone).
    for r in fit_records(&out.summary) {
        assert_eq!(r.clients["victim"].metrics[DP_CLIPPED_FRACTION], 0.0);
    }

    // The records report the epsilon spent, growing every round: the accountant's value for
    // every organisation in every round (q = 1), sigma, the rounds so far, at delta.
    let mut last = 0.0;
    for (k, r) in fit_records(&out.summary).into_iter().enumerate() {
        let eps = r.metrics[DP_EPSILON];
        let expected =
            simskip_fed::accountant::epsilon(1.0, dp.noise_multiplier, k as u64 + 1, dp.delta)
                .unwrap();
        assert!(
            (eps - expected).abs() <= 1e-9 * expected,
            "{eps} {expected}"
        );
        assert!(eps > last, "round {}: {eps} after {last}", r.round);
        last = eps;
    }
}
