//! Conversions between the state machine's types and the protobuf messages.

use crate::chunk::encode_arrays;
use crate::proto;
use crate::rounds::{StageKind, TaskKind};
use simskip_data::NamedArray;

pub(crate) fn task_kind_to_proto(k: TaskKind) -> proto::TaskKind {
    match k {
        TaskKind::Fit => proto::TaskKind::Fit,
        TaskKind::Evaluate => proto::TaskKind::Evaluate,
        TaskKind::FinishStage => proto::TaskKind::FinishStage,
        TaskKind::Wait => proto::TaskKind::Wait,
        TaskKind::Done => proto::TaskKind::Done,
    }
}

pub(crate) fn task_kind_from_proto(k: i32) -> Option<TaskKind> {
    match proto::TaskKind::try_from(k).ok()? {
        proto::TaskKind::Fit => Some(TaskKind::Fit),
        proto::TaskKind::Evaluate => Some(TaskKind::Evaluate),
        proto::TaskKind::FinishStage => Some(TaskKind::FinishStage),
        proto::TaskKind::Wait => Some(TaskKind::Wait),
        proto::TaskKind::Done => Some(TaskKind::Done),
        proto::TaskKind::Unspecified => None,
    }
}

pub(crate) fn stage_kind_to_proto(k: StageKind) -> proto::StageKind {
    match k {
        StageKind::FedE => proto::StageKind::Fede,
        StageKind::FedAvg => proto::StageKind::Fedavg,
    }
}

pub(crate) fn stage_kind_from_proto(k: i32) -> Option<StageKind> {
    match proto::StageKind::try_from(k).ok()? {
        proto::StageKind::Fede => Some(StageKind::FedE),
        proto::StageKind::Fedavg => Some(StageKind::FedAvg),
        proto::StageKind::Unspecified => None,
    }
}

/// The messages of a result: header, then tensor chunks.
pub(crate) fn result_messages(
    mut header: proto::ResultHeader,
    arrays: &[NamedArray],
    chunk_bytes: usize,
) -> Vec<proto::ResultChunk> {
    use proto::result_chunk::Part;
    let (headers, chunks) = encode_arrays(arrays, chunk_bytes, &header.run_id, header.round);
    header.arrays = headers;
    let mut out = Vec::with_capacity(chunks.len() + 1);
    out.push(proto::ResultChunk {
        part: Some(Part::Header(header)),
    });
    out.extend(chunks.into_iter().map(|c| proto::ResultChunk {
        part: Some(Part::Tensor(c)),
    }));
    out
}

/// The messages of a task: header, then tensor chunks.
pub(crate) fn task_messages(
    mut header: proto::TaskHeader,
    arrays: &[NamedArray],
    chunk_bytes: usize,
) -> Vec<proto::TaskChunk> {
    use proto::task_chunk::Part;
    let (headers, chunks) = encode_arrays(arrays, chunk_bytes, &header.run_id, header.round);
    header.arrays = headers;
    let mut out = Vec::with_capacity(chunks.len() + 1);
    out.push(proto::TaskChunk {
        part: Some(Part::Header(header)),
    });
    out.extend(chunks.into_iter().map(|c| proto::TaskChunk {
        part: Some(Part::Tensor(c)),
    }));
    out
}
