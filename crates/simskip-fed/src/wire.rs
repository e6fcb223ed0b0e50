//! Every conversion between the protobuf messages and the domain types, in both directions,
//! for both ends. What arrives is validated here, once: a value the domain cannot hold is an
//! error naming the field, never a default.

use std::collections::BTreeMap;

use simskip_data::NamedArray;
use simskip_kge::{
    AdamAcrossRounds, Corruption, EmbeddingInit, Loss, NegativeFilter, Norm, TransEConfig,
};
use simskip_refine::{Augmentation, Positives, SimSkipConfig};

use crate::coordinator::rounds::{Poll, Report, ResultOutcome, Task};
use crate::params::{
    ParamsError, Personalization, SimSkipParams, StageParams, PARAMS_SCHEMA_VERSION,
};
use crate::privacy::ClientDp;
use crate::proto;
use crate::secagg::{
    self, AdvertisedKeys, MaskedInput, SealedShares, SecAggReply, SecAggTask, Share, UnmaskRequest,
    UnmaskResponse,
};
use crate::types::{Payload, StageInfo, StageKind, TaskKind};

/// A field of a received message that the domain cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("{message} has no {field}")]
    Missing {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message}.{field} = {value}: unknown value")]
    Unknown {
        message: &'static str,
        field: &'static str,
        value: i32,
    },
    #[error("{field} = {value}: does not fit this machine")]
    TooLarge { field: &'static str, value: u64 },
    #[error("stage parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("task of stage {stage:?} carries {got} parameters but the stage is {expected}")]
    KindMismatch {
        stage: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

fn usize_field(field: &'static str, value: u64) -> Result<usize, WireError> {
    usize::try_from(value).map_err(|_| WireError::TooLarge { field, value })
}

// --- kinds -----------------------------------------------------------------------------

pub(crate) fn task_kind_to_proto(k: TaskKind) -> proto::TaskKind {
    match k {
        TaskKind::Fit => proto::TaskKind::Fit,
        TaskKind::Evaluate => proto::TaskKind::Evaluate,
        TaskKind::FinishStage => proto::TaskKind::FinishStage,
    }
}

pub(crate) fn task_kind_from_proto(message: &'static str, k: i32) -> Result<TaskKind, WireError> {
    match proto::TaskKind::try_from(k) {
        Ok(proto::TaskKind::Fit) => Ok(TaskKind::Fit),
        Ok(proto::TaskKind::Evaluate) => Ok(TaskKind::Evaluate),
        Ok(proto::TaskKind::FinishStage) => Ok(TaskKind::FinishStage),
        _ => Err(WireError::Unknown {
            message,
            field: "kind",
            value: k,
        }),
    }
}

pub(crate) fn stage_kind_to_proto(k: StageKind) -> proto::StageKind {
    match k {
        StageKind::FedE => proto::StageKind::Fede,
        StageKind::FedAvg => proto::StageKind::Fedavg,
    }
}

pub(crate) fn stage_kind_from_proto(k: i32) -> Result<StageKind, WireError> {
    match proto::StageKind::try_from(k) {
        Ok(proto::StageKind::Fede) => Ok(StageKind::FedE),
        Ok(proto::StageKind::Fedavg) => Ok(StageKind::FedAvg),
        _ => Err(WireError::Unknown {
            message: "TaskHeader",
            field: "stage_kind",
            value: k,
        }),
    }
}

// --- stage parameters -------------------------------------------------------------------

pub(crate) fn params_to_proto(p: &StageParams) -> proto::StageParams {
    use proto::stage_params::Kind;
    let kind = match p {
        StageParams::FedE(c) => Kind::Fede(proto::FedEParams {
            dim: c.dim as u32,
            norm: match c.norm {
                Norm::L1 => proto::Norm::L1,
                Norm::L2 => proto::Norm::L2,
            } as i32,
            loss: Some(match c.loss {
                Loss::MarginRanking { margin } => {
                    proto::fed_e_params::Loss::MarginRanking(proto::MarginRankingLoss { margin })
                }
                Loss::SelfAdversarial { gamma, temperature } => {
                    proto::fed_e_params::Loss::SelfAdversarial(proto::SelfAdversarialLoss {
                        gamma,
                        temperature,
                    })
                }
            }),
            negatives: c.negatives as u32,
            batch_size: c.batch_size as u32,
            lr: c.lr,
            local_epochs: c.epochs as u32,
            seed: c.seed,
            normalize_entities: c.normalize_entities,
            init: match c.init {
                EmbeddingInit::Auto => proto::EmbeddingInit::Auto,
                EmbeddingInit::Bordes => proto::EmbeddingInit::Bordes,
                EmbeddingInit::GammaEpsilon { .. } => proto::EmbeddingInit::GammaEpsilon,
            } as i32,
            init_epsilon: match c.init {
                EmbeddingInit::GammaEpsilon { epsilon } => epsilon,
                _ => 0.0,
            },
            corruption: match c.corruption {
                Corruption::HeadOrTail => proto::Corruption::HeadOrTail,
                Corruption::TailOnly => proto::Corruption::TailOnly,
            } as i32,
            negative_filter: match c.negative_filter {
                NegativeFilter::None => proto::NegativeFilter::None,
                NegativeFilter::KnownTriples => proto::NegativeFilter::KnownTriples,
            } as i32,
            reset_adam_each_round: c.adam_across_rounds == AdamAcrossRounds::Reset,
        }),
        StageParams::SimSkip(s) => {
            let c = &s.config;
            Kind::Simskip(proto::SimSkipParams {
                dim: s.dim as u32,
                skip: c.skip,
                zero_init_residual: c.zero_init_residual,
                dropout: c.dropout,
                augmentation: match c.augmentation {
                    Augmentation::Mask => proto::Augmentation::Mask,
                    Augmentation::Noise => proto::Augmentation::Noise,
                    Augmentation::Both => proto::Augmentation::Both,
                } as i32,
                mask_prob: c.mask_prob,
                noise_var: c.noise_var,
                positives: match c.positives {
                    Positives::Augment => proto::Positives::Augment,
                    Positives::Neighbour => proto::Positives::Neighbour,
                } as i32,
                temperature: c.temperature,
                lr: c.lr,
                weight_decay: c.weight_decay,
                local_epochs: c.epochs as u32,
                batch_size: c.batch_size as u32,
                seed: c.seed,
                personalization: Some(personalization_to_proto(&s.personalization)),
                neighbour_share: c.neighbour_share,
            })
        }
    };
    proto::StageParams {
        schema_version: PARAMS_SCHEMA_VERSION,
        kind: Some(kind),
        privacy: None,
    }
}

fn privacy_to_proto(p: &ClientDp) -> proto::PrivacyParams {
    proto::PrivacyParams {
        noise_multiplier: p.noise_multiplier,
        clip_norm: p.clip_norm,
        noise_shares: p.noise_shares,
    }
}

/// Received DP settings, validated (an organisation never applies a NaN or zero bound).
fn privacy_from_proto(p: &proto::PrivacyParams) -> Result<ClientDp, WireError> {
    let dp = ClientDp {
        noise_multiplier: p.noise_multiplier,
        clip_norm: p.clip_norm,
        noise_shares: p.noise_shares,
    };
    dp.validate()?;
    Ok(dp)
}

/// Parses and validates received stage parameters. The fields that say how an organisation
/// computes (SimSkip's backend and threads) are not on the wire: they hold their defaults,
/// and the organisation's work applies its own.
pub(crate) fn params_from_proto(p: Option<&proto::StageParams>) -> Result<StageParams, WireError> {
    use proto::stage_params::Kind;
    let p = p.ok_or(WireError::Params(ParamsError::Missing))?;
    if p.schema_version != PARAMS_SCHEMA_VERSION {
        return Err(ParamsError::Version {
            got: p.schema_version,
            supported: PARAMS_SCHEMA_VERSION,
        }
        .into());
    }
    let unknown = |field: &'static str, value: i32| WireError::Unknown {
        message: "StageParams",
        field,
        value,
    };
    let params = match p.kind.as_ref().ok_or(ParamsError::Missing)? {
        Kind::Fede(f) => StageParams::FedE(TransEConfig {
            dim: f.dim as usize,
            norm: match proto::Norm::try_from(f.norm) {
                Ok(proto::Norm::L1) => Norm::L1,
                Ok(proto::Norm::L2) => Norm::L2,
                _ => return Err(unknown("norm", f.norm)),
            },
            loss: match f.loss.as_ref() {
                Some(proto::fed_e_params::Loss::MarginRanking(m)) => {
                    Loss::MarginRanking { margin: m.margin }
                }
                Some(proto::fed_e_params::Loss::SelfAdversarial(a)) => Loss::SelfAdversarial {
                    gamma: a.gamma,
                    temperature: a.temperature,
                },
                None => {
                    return Err(WireError::Missing {
                        message: "FedEParams",
                        field: "loss",
                    })
                }
            },
            negatives: f.negatives as usize,
            batch_size: f.batch_size as usize,
            lr: f.lr,
            epochs: f.local_epochs as usize,
            seed: f.seed,
            normalize_entities: f.normalize_entities,
            init: match proto::EmbeddingInit::try_from(f.init) {
                Ok(proto::EmbeddingInit::Auto) => EmbeddingInit::Auto,
                Ok(proto::EmbeddingInit::Bordes) => EmbeddingInit::Bordes,
                Ok(proto::EmbeddingInit::GammaEpsilon) => EmbeddingInit::GammaEpsilon {
                    epsilon: f.init_epsilon,
                },
                _ => return Err(unknown("init", f.init)),
            },
            corruption: match proto::Corruption::try_from(f.corruption) {
                Ok(proto::Corruption::HeadOrTail) => Corruption::HeadOrTail,
                Ok(proto::Corruption::TailOnly) => Corruption::TailOnly,
                _ => return Err(unknown("corruption", f.corruption)),
            },
            negative_filter: match proto::NegativeFilter::try_from(f.negative_filter) {
                Ok(proto::NegativeFilter::None) => NegativeFilter::None,
                Ok(proto::NegativeFilter::KnownTriples) => NegativeFilter::KnownTriples,
                _ => return Err(unknown("negative_filter", f.negative_filter)),
            },
            adam_across_rounds: if f.reset_adam_each_round {
                AdamAcrossRounds::Reset
            } else {
                AdamAcrossRounds::Keep
            },
            // How an organisation computes, not on the wire (see above).
            threads: 1,
        }),
        Kind::Simskip(s) => StageParams::SimSkip(SimSkipParams {
            dim: s.dim as usize,
            config: SimSkipConfig {
                skip: s.skip,
                zero_init_residual: s.zero_init_residual,
                dropout: s.dropout,
                augmentation: match proto::Augmentation::try_from(s.augmentation) {
                    Ok(proto::Augmentation::Mask) => Augmentation::Mask,
                    Ok(proto::Augmentation::Noise) => Augmentation::Noise,
                    Ok(proto::Augmentation::Both) => Augmentation::Both,
                    _ => return Err(unknown("augmentation", s.augmentation)),
                },
                mask_prob: s.mask_prob,
                noise_var: s.noise_var,
                positives: match proto::Positives::try_from(s.positives) {
                    Ok(proto::Positives::Augment) => Positives::Augment,
                    Ok(proto::Positives::Neighbour) => Positives::Neighbour,
                    _ => return Err(unknown("positives", s.positives)),
                },
                neighbour_share: s.neighbour_share,
                temperature: s.temperature,
                lr: s.lr,
                weight_decay: s.weight_decay,
                epochs: s.local_epochs as usize,
                batch_size: s.batch_size as usize,
                seed: s.seed,
                ..SimSkipConfig::default()
            },
            personalization: personalization_from_proto(s.personalization.as_ref())?,
        }),
    };
    params.validate()?;
    Ok(params)
}

fn personalization_to_proto(p: &Personalization) -> proto::Personalization {
    use proto::personalization::Kind;
    let kind = match *p {
        Personalization::FedAvg => Kind::Fedavg(proto::PlainFedAvg {}),
        Personalization::FedBn => Kind::Fedbn(proto::FedBn {}),
        Personalization::FineTune { epochs } => Kind::FineTune(proto::FineTune {
            epochs: epochs as u32,
        }),
        Personalization::FedProx { mu } => Kind::Fedprox(proto::FedProx { mu }),
    };
    proto::Personalization { kind: Some(kind) }
}

/// Absent is an error, not plain FedAvg: a sender of this schema version always says.
fn personalization_from_proto(
    p: Option<&proto::Personalization>,
) -> Result<Personalization, WireError> {
    use proto::personalization::Kind;
    let missing = WireError::Missing {
        message: "SimSkipParams",
        field: "personalization",
    };
    Ok(match p.and_then(|p| p.kind.as_ref()) {
        None => return Err(missing),
        Some(Kind::Fedavg(_)) => Personalization::FedAvg,
        Some(Kind::Fedbn(_)) => Personalization::FedBn,
        Some(Kind::FineTune(f)) => Personalization::FineTune {
            epochs: f.epochs as usize,
        },
        Some(Kind::Fedprox(f)) => Personalization::FedProx { mu: f.mu },
    })
}

// --- tasks ------------------------------------------------------------------------------

/// The header of a task (its arrays' headers are added by the encoder).
pub(crate) fn task_header(task: &Task) -> proto::TaskHeader {
    proto::TaskHeader {
        run_id: task.run_id.clone(),
        round: task.round,
        stage_index: task.stage.index as u32,
        stage_name: task.stage.name.clone(),
        stage_kind: stage_kind_to_proto(task.stage.kind()) as i32,
        kind: task_kind_to_proto(task.kind) as i32,
        task_id: task.task_id.clone(),
        arrays: Vec::new(),
        stage_rounds: task.stage.rounds,
        params: Some(proto::StageParams {
            privacy: task.stage.privacy.as_ref().map(privacy_to_proto),
            ..params_to_proto(&task.stage.params)
        }),
        row_selection: match &task.payload {
            Payload::Rows {
                positions: Some(p), ..
            } => Some(proto::RowSelection {
                positions: p.to_vec(),
            }),
            _ => None,
        },
        secagg: task.secagg.as_ref().map(secagg_task_to_proto),
    }
}

/// The header of a STOP answer to a poll: the coordinator is shutting down on request.
pub(crate) fn stop_header(run_id: &str) -> proto::TaskHeader {
    proto::TaskHeader {
        run_id: run_id.to_string(),
        kind: proto::TaskKind::Stop as i32,
        ..Default::default()
    }
}

/// The header of a WAIT or DONE answer to a poll.
pub(crate) fn idle_header(poll: &Poll, run_id: &str) -> proto::TaskHeader {
    let kind = match poll {
        Poll::Done => proto::TaskKind::Done,
        _ => proto::TaskKind::Wait,
    };
    proto::TaskHeader {
        run_id: run_id.to_string(),
        kind: kind as i32,
        ..Default::default()
    }
}

/// What a client makes of a task header (one per poll, consumed at once, so its size is moot).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PolledHeader {
    Wait,
    Done,
    /// The coordinator shuts down on request.
    Stop,
    Task(TaskHeader),
}

/// A received task's header, in domain types.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaskHeader {
    pub run_id: String,
    pub task_id: String,
    pub round: u32,
    pub kind: TaskKind,
    /// FedE: positions of the rows the task carries (`None`: all).
    pub rows: Option<Vec<u32>>,
    pub stage: StageInfo,
    /// Secure aggregation: the protocol step asked for.
    pub secagg: Option<SecAggTask>,
}

pub(crate) fn task_header_from_proto(h: &proto::TaskHeader) -> Result<PolledHeader, WireError> {
    match proto::TaskKind::try_from(h.kind) {
        Ok(proto::TaskKind::Wait) => return Ok(PolledHeader::Wait),
        Ok(proto::TaskKind::Done) => return Ok(PolledHeader::Done),
        Ok(proto::TaskKind::Stop) => return Ok(PolledHeader::Stop),
        _ => {}
    }
    let kind = task_kind_from_proto("TaskHeader", h.kind)?;
    let stage_kind = stage_kind_from_proto(h.stage_kind)?;
    let params = params_from_proto(h.params.as_ref())?;
    if params.kind() != stage_kind {
        return Err(WireError::KindMismatch {
            stage: h.stage_name.clone(),
            expected: stage_kind.as_str(),
            got: params.kind().as_str(),
        });
    }
    let privacy = h
        .params
        .as_ref()
        .and_then(|p| p.privacy.as_ref())
        .map(privacy_from_proto)
        .transpose()?;
    let rows = h.row_selection.as_ref().map(|r| r.positions.clone());
    if let Some(p) = &rows {
        if p.windows(2).any(|w| w[0] >= w[1]) {
            return Err(WireError::Invalid(
                "row_selection.positions must be strictly ascending".into(),
            ));
        }
    }
    let secagg = h.secagg.as_ref().map(secagg_task_from_proto).transpose()?;
    if secagg.is_some() && kind != TaskKind::Fit {
        return Err(WireError::Invalid(
            "only a FIT task carries a secure aggregation step".into(),
        ));
    }
    Ok(PolledHeader::Task(TaskHeader {
        secagg,
        run_id: h.run_id.clone(),
        task_id: h.task_id.clone(),
        round: h.round,
        kind,
        rows,
        stage: StageInfo {
            index: h.stage_index as usize,
            name: h.stage_name.clone(),
            rounds: h.stage_rounds,
            params,
            privacy,
        },
    }))
}

// --- results ----------------------------------------------------------------------------

/// The header of a client's answer to `task` (its arrays' headers are added by the encoder).
pub(crate) fn result_header(
    task: &TaskHeader,
    session: &str,
    num_examples: u64,
    metrics: BTreeMap<String, f64>,
    error: Option<String>,
) -> proto::ResultHeader {
    proto::ResultHeader {
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        session_id: session.to_string(),
        kind: task_kind_to_proto(task.kind) as i32,
        num_examples,
        metrics,
        arrays: Vec::new(),
        error: error.unwrap_or_default(),
        secagg: None,
    }
}

/// A received result in domain types.
pub(crate) fn report_from_proto(
    h: proto::ResultHeader,
    arrays: Vec<NamedArray>,
) -> Result<Report, WireError> {
    Ok(Report {
        kind: task_kind_from_proto("ResultHeader", h.kind)?,
        run_id: h.run_id,
        session: h.session_id,
        round: h.round,
        task_id: h.task_id,
        num_examples: h.num_examples,
        metrics: h.metrics,
        arrays,
        error: (!h.error.is_empty()).then_some(h.error),
        secagg: h.secagg.as_ref().map(secagg_reply_from_proto).transpose()?,
    })
}

pub(crate) fn push_reply(run_id: &str, round: u32, outcome: &ResultOutcome) -> proto::PushReply {
    let (status, message) = match outcome {
        ResultOutcome::Accepted => (proto::ResultStatus::Accepted, String::new()),
        ResultOutcome::Failure(m) => (proto::ResultStatus::FailureRecorded, m.clone()),
        ResultOutcome::Ignored(reason) => (proto::ResultStatus::Ignored, reason.to_string()),
    };
    proto::PushReply {
        run_id: run_id.to_string(),
        round,
        status: status as i32,
        message,
    }
}

// --- secure aggregation -----------------------------------------------------------------

fn bytes_n<const N: usize>(field: &'static str, b: &[u8]) -> Result<[u8; N], WireError> {
    b.try_into()
        .map_err(|_| WireError::Invalid(format!("{field} has {} bytes; expected {N}", b.len())))
}

fn keys_to_proto(k: &AdvertisedKeys) -> proto::SecAggKeys {
    proto::SecAggKeys {
        client_id: k.client,
        cipher_public: k.cipher_public.to_vec(),
        mask_public: k.mask_public.to_vec(),
    }
}

fn keys_from_proto(k: &proto::SecAggKeys) -> Result<AdvertisedKeys, WireError> {
    Ok(AdvertisedKeys {
        client: k.client_id,
        cipher_public: bytes_n("SecAggKeys.cipher_public", &k.cipher_public)?,
        mask_public: bytes_n("SecAggKeys.mask_public", &k.mask_public)?,
    })
}

fn sealed_to_proto(s: &SealedShares) -> proto::SealedShares {
    proto::SealedShares {
        from: s.from,
        to: s.to,
        nonce: s.nonce.to_vec(),
        ciphertext: s.ciphertext.clone(),
    }
}

fn sealed_from_proto(s: &proto::SealedShares) -> Result<SealedShares, WireError> {
    Ok(SealedShares {
        from: s.from,
        to: s.to,
        nonce: bytes_n("SealedShares.nonce", &s.nonce)?,
        ciphertext: s.ciphertext.clone(),
    })
}

fn shares_to_proto(shares: &[(secagg::ClientId, Share)]) -> Vec<proto::FieldShare> {
    shares
        .iter()
        .map(|(c, sh)| proto::FieldShare {
            client_id: *c,
            x: sh.x,
            y: sh.y.to_vec(),
        })
        .collect()
}

fn shares_from_proto(
    shares: &[proto::FieldShare],
) -> Result<Vec<(secagg::ClientId, Share)>, WireError> {
    shares
        .iter()
        .map(|f| {
            let y = f.y.as_slice().try_into().map_err(|_| {
                WireError::Invalid(format!(
                    "FieldShare.y has {} elements; expected {}",
                    f.y.len(),
                    secagg::shamir::LIMBS
                ))
            })?;
            Ok((f.client_id, Share { x: f.x, y }))
        })
        .collect()
}

pub(crate) fn secagg_task_to_proto(t: &SecAggTask) -> proto::SecAggTask {
    use proto::sec_agg_task::Step;
    let step = match t {
        SecAggTask::Begin {
            client,
            threshold,
            frac_bits,
            rows,
        } => Step::Begin(proto::SecAggBegin {
            client_id: *client,
            threshold: *threshold as u32,
            frac_bits: *frac_bits,
            rows: rows.as_ref().map(|r| proto::SecureRows {
                total: r.total,
                slots: r.slots.clone(),
            }),
        }),
        SecAggTask::Roster(keys) => Step::Roster(proto::SecAggRoster {
            keys: keys.iter().map(keys_to_proto).collect(),
        }),
        SecAggTask::Inbox(shares) => Step::Inbox(proto::SecAggInbox {
            shares: shares.iter().map(sealed_to_proto).collect(),
        }),
        SecAggTask::Unmask(r) => Step::Unmask(proto::SecAggUnmaskRequest {
            survivors: r.survivors.clone(),
            dropped: r.dropped.clone(),
        }),
    };
    proto::SecAggTask { step: Some(step) }
}

pub(crate) fn secagg_task_from_proto(t: &proto::SecAggTask) -> Result<SecAggTask, WireError> {
    use proto::sec_agg_task::Step;
    Ok(
        match t.step.as_ref().ok_or(WireError::Missing {
            message: "SecAggTask",
            field: "step",
        })? {
            Step::Begin(b) => SecAggTask::Begin {
                client: b.client_id,
                threshold: usize_field("SecAggBegin.threshold", b.threshold.into())?,
                frac_bits: b.frac_bits,
                rows: b.rows.as_ref().map(|r| secagg::SecureRows {
                    total: r.total,
                    slots: r.slots.clone(),
                }),
            },
            Step::Roster(r) => SecAggTask::Roster(
                r.keys
                    .iter()
                    .map(keys_from_proto)
                    .collect::<Result<_, _>>()?,
            ),
            Step::Inbox(i) => SecAggTask::Inbox(
                i.shares
                    .iter()
                    .map(sealed_from_proto)
                    .collect::<Result<_, _>>()?,
            ),
            Step::Unmask(u) => SecAggTask::Unmask(UnmaskRequest {
                survivors: u.survivors.clone(),
                dropped: u.dropped.clone(),
            }),
        },
    )
}

pub(crate) fn secagg_reply_to_proto(r: &SecAggReply) -> proto::SecAggReply {
    use proto::sec_agg_reply::Step;
    let step = match r {
        SecAggReply::Keys(k) => Step::Keys(keys_to_proto(k)),
        SecAggReply::Shares(s) => Step::Shares(proto::SecAggInbox {
            shares: s.iter().map(sealed_to_proto).collect(),
        }),
        // The values follow as chunks ([`masked_chunks`]): a masked FedE table is far larger
        // than one message.
        SecAggReply::Masked(m) => Step::Masked(proto::SecAggMaskedInput {
            client_id: m.client,
            values: Vec::new(),
            len: m.values.len() as u64,
        }),
        SecAggReply::Unmask(u) => Step::Unmask(proto::SecAggUnmaskResponse {
            from: u.from,
            self_mask_shares: shares_to_proto(&u.self_mask_shares),
            mask_key_shares: shares_to_proto(&u.mask_key_shares),
        }),
    };
    proto::SecAggReply { step: Some(step) }
}

pub(crate) fn secagg_reply_from_proto(r: &proto::SecAggReply) -> Result<SecAggReply, WireError> {
    use proto::sec_agg_reply::Step;
    Ok(
        match r.step.as_ref().ok_or(WireError::Missing {
            message: "SecAggReply",
            field: "step",
        })? {
            Step::Keys(k) => SecAggReply::Keys(keys_from_proto(k)?),
            Step::Shares(s) => SecAggReply::Shares(
                s.shares
                    .iter()
                    .map(sealed_from_proto)
                    .collect::<Result<_, _>>()?,
            ),
            Step::Masked(m) => SecAggReply::Masked(MaskedInput {
                client: m.client_id,
                values: m.values.clone(),
            }),
            Step::Unmask(u) => SecAggReply::Unmask(UnmaskResponse {
                from: u.from,
                self_mask_shares: shares_from_proto(&u.self_mask_shares)?,
                mask_key_shares: shares_from_proto(&u.mask_key_shares)?,
            }),
        },
    )
}

/// Ring elements of a masked input that follow a result header as chunks (0: none).
pub(crate) fn masked_len_announced(h: &proto::ResultHeader) -> u64 {
    match h.secagg.as_ref().and_then(|r| r.step.as_ref()) {
        Some(proto::sec_agg_reply::Step::Masked(m)) => m.len,
        _ => 0,
    }
}

/// A masked input's values as chunks of at most `chunk_bytes` (whole ring elements).
pub(crate) fn masked_chunks(
    values: Vec<u64>,
    chunk_bytes: usize,
) -> impl Iterator<Item = proto::SecAggMaskedChunk> {
    let per_chunk = (chunk_bytes / 8).max(1);
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        if offset >= values.len() {
            return None;
        }
        let end = (offset + per_chunk).min(values.len());
        let chunk = proto::SecAggMaskedChunk {
            offset: offset as u64,
            values: values[offset..end].to_vec(),
        };
        offset = end;
        Some(chunk)
    })
}

/// Puts a masked input back together from its chunks: in order, never beyond the announced
/// length (which the coordinator admitted before reading any).
#[derive(Debug)]
pub(crate) struct MaskedAssembler {
    announced: u64,
    values: Vec<u64>,
}

impl MaskedAssembler {
    pub(crate) fn new(announced: u64) -> Self {
        Self {
            announced,
            values: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, chunk: proto::SecAggMaskedChunk) -> Result<(), String> {
        if chunk.offset != self.values.len() as u64 {
            return Err(format!(
                "masked chunk at offset {}, expected {}",
                chunk.offset,
                self.values.len()
            ));
        }
        if self.values.len() as u64 + chunk.values.len() as u64 > self.announced {
            return Err(format!(
                "masked chunks overrun the announced {} values",
                self.announced
            ));
        }
        self.values.extend_from_slice(&chunk.values);
        Ok(())
    }

    /// The values, once all announced ones arrived.
    pub(crate) fn finish(self) -> Result<Vec<u64>, String> {
        if self.values.len() as u64 != self.announced {
            return Err(format!(
                "received {} of {} masked values",
                self.values.len(),
                self.announced
            ));
        }
        Ok(self.values)
    }
}

/// The coordinator's answer to a registration, in domain types.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RegisterReply {
    pub run_id: String,
    pub session: String,
    pub heartbeat_interval_ms: u64,
    pub poll_timeout_ms: u64,
    pub chunk_bytes: usize,
}

pub(crate) fn register_reply_from_proto(
    r: proto::RegisterReply,
) -> Result<RegisterReply, WireError> {
    if r.session_id.is_empty() {
        return Err(WireError::Missing {
            message: "RegisterReply",
            field: "session_id",
        });
    }
    Ok(RegisterReply {
        run_id: r.run_id,
        session: r.session_id,
        heartbeat_interval_ms: r.heartbeat_interval_ms,
        poll_timeout_ms: r.poll_timeout_ms,
        chunk_bytes: usize_field("RegisterReply.chunk_bytes", r.chunk_bytes)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::StageKind;

    #[test]
    fn params_round_trip_and_local_settings_stay_local() {
        for kind in [StageKind::FedE, StageKind::FedAvg] {
            let mut p = StageParams::defaults(kind, 24);
            match &mut p {
                StageParams::SimSkip(s) => s.config.skip = false,
                StageParams::FedE(t) => {
                    t.init = EmbeddingInit::GammaEpsilon { epsilon: 3.0 };
                    t.corruption = Corruption::TailOnly;
                    t.negative_filter = NegativeFilter::KnownTriples;
                    t.adam_across_rounds = AdamAcrossRounds::Reset;
                }
            }
            let back = params_from_proto(Some(&params_to_proto(&p))).unwrap();
            assert_eq!(back, p);
            // How an organisation computes never travels.
            if let StageParams::SimSkip(s) = &mut p {
                s.config.fast_threads = 3;
                let back = params_from_proto(Some(&params_to_proto(&p))).unwrap();
                assert_ne!(back, p);
            }
        }
    }

    #[test]
    fn received_params_are_validated_and_versioned() {
        let mut p = params_to_proto(&StageParams::defaults(StageKind::FedAvg, 8));
        if let Some(proto::stage_params::Kind::Simskip(s)) = &mut p.kind {
            s.batch_size = 0;
        }
        let e = params_from_proto(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("batch_size"), "{e}");
        // Every personalisation travels; a bad one is refused by name, a missing one too.
        for personalization in [
            Personalization::FedBn,
            Personalization::FineTune { epochs: 4 },
            Personalization::FedProx { mu: 0.01 },
        ] {
            let mut params = StageParams::defaults(StageKind::FedAvg, 8);
            if let StageParams::SimSkip(s) = &mut params {
                s.personalization = personalization;
            }
            let back = params_from_proto(Some(&params_to_proto(&params))).unwrap();
            assert_eq!(back, params);
        }
        let mut p = params_to_proto(&StageParams::defaults(StageKind::FedAvg, 8));
        if let Some(proto::stage_params::Kind::Simskip(s)) = &mut p.kind {
            s.personalization = Some(personalization_to_proto(&Personalization::FedProx {
                mu: f32::NAN,
            }));
        }
        let e = params_from_proto(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("personalization.mu"), "{e}");
        if let Some(proto::stage_params::Kind::Simskip(s)) = &mut p.kind {
            s.personalization = None;
        }
        let e = params_from_proto(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("personalization"), "{e}");
        // The share of neighbour positives travels, and a share outside [0, 1] is refused.
        let mut params = StageParams::defaults(StageKind::FedAvg, 8);
        if let StageParams::SimSkip(s) = &mut params {
            s.config.neighbour_share = 0.25;
        }
        let mut p = params_to_proto(&params);
        assert_eq!(params_from_proto(Some(&p)).unwrap(), params);
        if let Some(proto::stage_params::Kind::Simskip(s)) = &mut p.kind {
            s.neighbour_share = 1.5;
        }
        let e = params_from_proto(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("neighbour_share"), "{e}");
        let mut p = params_to_proto(&StageParams::defaults(StageKind::FedE, 8));
        p.schema_version = PARAMS_SCHEMA_VERSION + 1;
        assert!(matches!(
            params_from_proto(Some(&p)),
            Err(WireError::Params(ParamsError::Version { .. }))
        ));
        assert!(params_from_proto(None).is_err());
    }

    /// The DP settings travel with the task, and an organisation refuses unusable ones.
    #[test]
    fn privacy_settings_travel_with_the_task_and_are_validated() {
        let dp = ClientDp {
            noise_multiplier: 1.5,
            clip_norm: 0.25,
            noise_shares: 3,
        };
        let task = Task {
            run_id: "r".into(),
            task_id: "t1".into(),
            kind: TaskKind::Fit,
            stage: StageInfo {
                index: 0,
                name: "s".into(),
                rounds: 2,
                params: StageParams::defaults(StageKind::FedAvg, 8),
                privacy: Some(dp),
            },
            round: 1,
            payload: Payload::empty(),
            secagg: None,
        };
        let mut header = task_header(&task);
        let PolledHeader::Task(back) = task_header_from_proto(&header).unwrap() else {
            panic!("not a task")
        };
        assert_eq!(back.stage, task.stage);
        if let Some(p) = header.params.as_mut().and_then(|p| p.privacy.as_mut()) {
            p.clip_norm = f64::NAN;
        }
        let e = task_header_from_proto(&header).unwrap_err().to_string();
        assert!(e.contains("privacy.clip_norm = NaN"), "{e}");
    }
}
