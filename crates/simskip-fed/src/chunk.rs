//! Cutting named arrays into gRPC-sized chunks and putting them back together.
//!
//! A payload is a list of [`ArrayHeader`]s (sent once, in the task or result header)
//! followed by [`TensorChunk`]s carrying the little-endian f32 bytes, array by array and
//! offset by offset, each at most `chunk_bytes` long. [`Assembler`] checks every chunk
//! against the announced headers and reports problems as [`ChunkError`]s.

use std::sync::Arc;

use simskip_data::NamedArray;

use crate::proto::{ArrayHeader, TensorChunk};
use crate::types::{Payload, ENTITIES};

/// The only dtype on the wire for now.
pub const DTYPE_F32: &str = "f32";
/// Default chunk payload: 1 MiB, well under gRPC's 4 MiB default message limit.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// gRPC's default (and our default) maximum message size.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// What can be wrong with a chunked payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChunkError {
    #[error("array {name:?}: unsupported dtype {dtype:?} (only \"f32\")")]
    Dtype { name: String, dtype: String },
    #[error("array {name:?}: header says {num_bytes} bytes but shape {shape:?} needs {expected}")]
    HeaderSize {
        name: String,
        shape: Vec<u64>,
        num_bytes: u64,
        expected: u64,
    },
    #[error("chunk for unknown array index {index} (payload has {count} arrays)")]
    UnknownArray { index: u32, count: usize },
    #[error("array {name:?}: chunk at offset {got}, expected offset {expected} (out of order)")]
    OutOfOrder {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("chunk for array {name:?} arrived before array {pending:?} was complete")]
    ArrayOrder { name: String, pending: String },
    #[error(
        "array {name:?}: chunk of {len} bytes at offset {offset} overruns its {num_bytes} bytes"
    )]
    Overrun {
        name: String,
        offset: u64,
        len: usize,
        num_bytes: u64,
    },
    #[error("array {name:?}: received {received} of {num_bytes} bytes")]
    Incomplete {
        name: String,
        received: u64,
        num_bytes: u64,
    },
    #[error("chunk carries run id {got:?}, expected {expected:?}")]
    RunId { expected: String, got: String },
    #[error("chunk carries round {got}, expected {expected}")]
    Round { expected: u32, got: u32 },
    #[error("payload of {0} bytes does not fit this machine's memory")]
    TooLarge(u64),
}

/// The header announcing `array`.
pub fn array_header(array: &NamedArray) -> ArrayHeader {
    ArrayHeader {
        name: array.name.clone(),
        shape: array.shape.iter().map(|&d| d as u64).collect(),
        dtype: DTYPE_F32.to_string(),
        num_bytes: (array.data.len() * 4) as u64,
    }
}

/// Chunk sizes are rounded down to a multiple of 4 (whole f32s), at least 4.
fn effective_chunk_bytes(chunk_bytes: usize) -> usize {
    (chunk_bytes / 4).max(1) * 4
}

/// The headers announcing a payload's arrays.
pub fn payload_headers(payload: &Payload) -> Vec<ArrayHeader> {
    match payload {
        Payload::Arrays(arrays) => arrays.iter().map(array_header).collect(),
        Payload::Rows { table, keys, .. } => {
            let shape = [keys.len() as u64, table.dim() as u64];
            vec![ArrayHeader {
                name: ENTITIES.to_string(),
                shape: shape.to_vec(),
                dtype: DTYPE_F32.to_string(),
                num_bytes: shape[0] * shape[1] * 4,
            }]
        }
    }
}

/// A payload's tensor chunks, each built only when asked for: the encoder holds the shared
/// payload, never a second copy of it, so a task or result streams in the memory of one chunk.
/// Every chunk's `data` is at most `chunk_bytes` (rounded down to whole f32s) and carries
/// `run_id` and `round`. Empty arrays get no chunk.
pub struct PayloadChunks {
    payload: Payload,
    run_id: String,
    round: u32,
    floats_per_chunk: usize,
    array: usize,
    /// Next float of the current array.
    at: usize,
}

impl PayloadChunks {
    pub fn new(payload: Payload, chunk_bytes: usize, run_id: &str, round: u32) -> Self {
        Self {
            payload,
            run_id: run_id.to_string(),
            round,
            floats_per_chunk: effective_chunk_bytes(chunk_bytes) / 4,
            array: 0,
            at: 0,
        }
    }

    fn array_len(&self, index: usize) -> Option<usize> {
        match &self.payload {
            Payload::Arrays(a) => a.get(index).map(|a| a.data.len()),
            Payload::Rows { table, keys, .. } => (index == 0).then(|| keys.len() * table.dim()),
        }
    }

    /// Appends floats `[start, end)` of array `index` to `out` as little-endian bytes.
    fn write_range(&self, index: usize, start: usize, end: usize, out: &mut Vec<u8>) {
        let mut put = |floats: &[f32]| {
            for f in floats {
                out.extend_from_slice(&f.to_le_bytes());
            }
        };
        match &self.payload {
            Payload::Arrays(a) => put(&a[index].data[start..end]),
            Payload::Rows { table, keys, .. } => {
                let dim = table.dim();
                let mut i = start;
                while i < end {
                    let (row, col) = (i / dim, i % dim);
                    let take = (dim - col).min(end - i);
                    // Keys were checked against the table when the payload was made.
                    let values = table.row(&keys[row]).unwrap_or(&[]);
                    put(&values[col..col + take]);
                    i += take;
                }
            }
        }
    }
}

impl Iterator for PayloadChunks {
    type Item = TensorChunk;

    fn next(&mut self) -> Option<TensorChunk> {
        loop {
            let len = self.array_len(self.array)?;
            if self.at >= len {
                self.array += 1;
                self.at = 0;
                continue;
            }
            let end = (self.at + self.floats_per_chunk).min(len);
            let mut data = Vec::with_capacity((end - self.at) * 4);
            self.write_range(self.array, self.at, end, &mut data);
            let chunk = TensorChunk {
                run_id: self.run_id.clone(),
                round: self.round,
                array_index: self.array as u32,
                offset: (self.at * 4) as u64,
                data,
            };
            self.at = end;
            return Some(chunk);
        }
    }
}

/// Headers and all chunks for `arrays` at once (tests and small payloads; the services
/// stream [`PayloadChunks`] instead).
pub fn encode_arrays(
    arrays: &[NamedArray],
    chunk_bytes: usize,
    run_id: &str,
    round: u32,
) -> (Vec<ArrayHeader>, Vec<TensorChunk>) {
    let payload = Payload::Arrays(Arc::from(arrays.to_vec()));
    let headers = payload_headers(&payload);
    (
        headers,
        PayloadChunks::new(payload, chunk_bytes, run_id, round).collect(),
    )
}

struct Slot {
    name: String,
    shape: Vec<usize>,
    num_bytes: u64,
    bytes: Vec<u8>,
}

/// Rebuilds the arrays announced by a list of headers from their chunks, validating as it
/// goes. Feed chunks with [`Assembler::push`], then call [`Assembler::finish`].
pub struct Assembler {
    slots: Vec<Slot>,
    /// First array not yet complete.
    current: usize,
    expect: Option<(String, u32)>,
}

impl Assembler {
    /// Validates the headers (dtype, byte counts) and prepares the buffers.
    pub fn new(headers: &[ArrayHeader]) -> Result<Self, ChunkError> {
        let mut slots = Vec::with_capacity(headers.len());
        for h in headers {
            if h.dtype != DTYPE_F32 {
                return Err(ChunkError::Dtype {
                    name: h.name.clone(),
                    dtype: h.dtype.clone(),
                });
            }
            let expected = h
                .shape
                .iter()
                .try_fold(4u64, |acc, &d| acc.checked_mul(d))
                .ok_or(ChunkError::TooLarge(u64::MAX))?;
            if expected != h.num_bytes {
                return Err(ChunkError::HeaderSize {
                    name: h.name.clone(),
                    shape: h.shape.clone(),
                    num_bytes: h.num_bytes,
                    expected,
                });
            }
            let n = usize::try_from(h.num_bytes).map_err(|_| ChunkError::TooLarge(h.num_bytes))?;
            slots.push(Slot {
                name: h.name.clone(),
                shape: h.shape.iter().map(|&d| d as usize).collect(),
                num_bytes: h.num_bytes,
                // Reserve lazily: a bogus header must not make us allocate gigabytes up front.
                bytes: Vec::with_capacity(n.min(64 << 20)),
            });
        }
        let mut a = Self {
            slots,
            current: 0,
            expect: None,
        };
        a.skip_complete();
        Ok(a)
    }

    /// Also check that every chunk carries this run id and round.
    pub fn expect_run(mut self, run_id: impl Into<String>, round: u32) -> Self {
        self.expect = Some((run_id.into(), round));
        self
    }

    fn skip_complete(&mut self) {
        while self.current < self.slots.len()
            && self.slots[self.current].bytes.len() as u64 == self.slots[self.current].num_bytes
        {
            self.current += 1;
        }
    }

    /// Appends one chunk.
    pub fn push(&mut self, chunk: TensorChunk) -> Result<(), ChunkError> {
        if let Some((run_id, round)) = &self.expect {
            if &chunk.run_id != run_id {
                return Err(ChunkError::RunId {
                    expected: run_id.clone(),
                    got: chunk.run_id,
                });
            }
            if chunk.round != *round {
                return Err(ChunkError::Round {
                    expected: *round,
                    got: chunk.round,
                });
            }
        }
        let index = chunk.array_index as usize;
        if index >= self.slots.len() {
            return Err(ChunkError::UnknownArray {
                index: chunk.array_index,
                count: self.slots.len(),
            });
        }
        if index > self.current {
            return Err(ChunkError::ArrayOrder {
                name: self.slots[index].name.clone(),
                pending: self.slots[self.current].name.clone(),
            });
        }
        let slot = &mut self.slots[index];
        let received = slot.bytes.len() as u64;
        if index < self.current || chunk.offset != received {
            return Err(ChunkError::OutOfOrder {
                name: slot.name.clone(),
                expected: received,
                got: chunk.offset,
            });
        }
        if received + chunk.data.len() as u64 > slot.num_bytes {
            return Err(ChunkError::Overrun {
                name: slot.name.clone(),
                offset: chunk.offset,
                len: chunk.data.len(),
                num_bytes: slot.num_bytes,
            });
        }
        slot.bytes.extend_from_slice(&chunk.data);
        self.skip_complete();
        Ok(())
    }

    /// True once every announced byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.current == self.slots.len()
    }

    /// The arrays, in header order; fails if any is incomplete.
    pub fn finish(self) -> Result<Vec<NamedArray>, ChunkError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in self.slots {
            if slot.bytes.len() as u64 != slot.num_bytes {
                return Err(ChunkError::Incomplete {
                    name: slot.name,
                    received: slot.bytes.len() as u64,
                    num_bytes: slot.num_bytes,
                });
            }
            let data: Vec<f32> = slot
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            out.push(NamedArray::new(slot.name, slot.shape, data));
        }
        Ok(out)
    }
}

/// Decodes a complete list of chunks (convenience over [`Assembler`]).
pub fn decode_arrays(
    headers: &[ArrayHeader],
    chunks: impl IntoIterator<Item = TensorChunk>,
) -> Result<Vec<NamedArray>, ChunkError> {
    let mut a = Assembler::new(headers)?;
    for c in chunks {
        a.push(c)?;
    }
    a.finish()
}

/// Splits entity keys into groups whose encoded size stays near `chunk_bytes`
/// (each key costs its length plus a few bytes of protobuf framing).
pub fn chunk_keys(keys: &[String], chunk_bytes: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0usize;
    for k in keys {
        let cost = k.len() + 6;
        if !cur.is_empty() && size + cost > chunk_bytes {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += cost;
        cur.push(k.clone());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: usize, cols: usize) -> NamedArray {
        let data = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.25).collect();
        NamedArray::new("entities", vec![rows, cols], data)
    }

    #[test]
    fn round_trip_larger_than_4_mib() {
        let big = table(40_000, 32);
        assert!(big.data.len() * 4 > DEFAULT_MAX_MESSAGE_BYTES);
        let small = NamedArray::new("bn.running_mean", vec![3], vec![1.0, -2.0, 3.5]);
        let empty = NamedArray::new("empty", vec![0, 4], vec![]);
        let arrays = vec![big, empty, small];
        let (headers, chunks) = encode_arrays(&arrays, DEFAULT_CHUNK_BYTES, "run", 3);
        assert!(chunks.len() >= 5);
        assert!(chunks.iter().all(|c| c.data.len() <= DEFAULT_CHUNK_BYTES));
        let mut a = Assembler::new(&headers).unwrap().expect_run("run", 3);
        for c in chunks {
            a.push(c).unwrap();
        }
        assert!(a.is_complete());
        assert_eq!(a.finish().unwrap(), arrays);
    }

    #[test]
    fn table_rows_stream_lazily_and_equal_the_materialised_rows() {
        use crate::aggregate::EntityTable;
        let dim = 5;
        let keys: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        let data: Vec<f32> = (0..keys.len() * dim).map(|i| i as f32 * 0.5).collect();
        let table = Arc::new(EntityTable::from_rows(keys.clone(), dim, data).unwrap());
        // A client holding every third entity, in its own order.
        let mine: Arc<Vec<String>> = Arc::new(keys.iter().rev().step_by(3).cloned().collect());
        let payload = Payload::Rows {
            positions: None,
            table: table.clone(),
            keys: mine.clone(),
        };
        let headers = payload_headers(&payload);
        // 12 bytes = 3 floats: chunks cut rows in the middle.
        let chunks: Vec<TensorChunk> = PayloadChunks::new(payload, 12, "run", 3).collect();
        assert!(chunks.iter().all(|c| c.data.len() <= 12));
        let decoded = decode_arrays(&headers, chunks).unwrap();
        assert_eq!(decoded, vec![table.rows_for(&mine).unwrap()]);
    }

    #[test]
    fn odd_chunk_size_rounds_to_whole_floats() {
        let t = table(10, 3);
        let (h, c) = encode_arrays(std::slice::from_ref(&t), 10, "r", 0);
        assert!(c
            .iter()
            .all(|c| c.data.len() == 8 || c.data.len() == 120 % 8));
        assert_eq!(decode_arrays(&h, c).unwrap(), vec![t]);
    }

    #[test]
    fn errors_are_typed() {
        let arrays = vec![table(4, 4), table(2, 2)];
        let (headers, chunks) = encode_arrays(&arrays, 16, "run", 1);

        let mut bad = headers.clone();
        bad[0].dtype = "f16".into();
        assert!(matches!(
            Assembler::new(&bad),
            Err(ChunkError::Dtype { .. })
        ));

        let mut bad = headers.clone();
        bad[1].num_bytes = 12;
        assert!(matches!(
            Assembler::new(&bad),
            Err(ChunkError::HeaderSize { .. })
        ));

        let mut a = Assembler::new(&headers).unwrap();
        let mut c = chunks[0].clone();
        c.array_index = 7;
        assert!(matches!(a.push(c), Err(ChunkError::UnknownArray { .. })));

        let mut a = Assembler::new(&headers).unwrap();
        assert!(matches!(
            a.push(chunks[1].clone()),
            Err(ChunkError::OutOfOrder {
                expected: 0,
                got: 16,
                ..
            })
        ));

        let mut a = Assembler::new(&headers).unwrap();
        let last = chunks.last().unwrap().clone();
        assert!(matches!(a.push(last), Err(ChunkError::ArrayOrder { .. })));

        let mut a = Assembler::new(&headers).unwrap();
        let mut c = chunks[0].clone();
        c.data = vec![0; 80];
        assert!(matches!(a.push(c), Err(ChunkError::Overrun { .. })));

        let mut a = Assembler::new(&headers).unwrap();
        a.push(chunks[0].clone()).unwrap();
        assert!(matches!(a.finish(), Err(ChunkError::Incomplete { .. })));

        let mut a = Assembler::new(&headers).unwrap().expect_run("other", 1);
        assert!(matches!(
            a.push(chunks[0].clone()),
            Err(ChunkError::RunId { .. })
        ));
        let mut a = Assembler::new(&headers).unwrap().expect_run("run", 2);
        assert!(matches!(
            a.push(chunks[0].clone()),
            Err(ChunkError::Round { .. })
        ));
    }

    #[test]
    fn keys_are_chunked() {
        let keys: Vec<String> = (0..1000).map(|i| format!("entity_{i:05}")).collect();
        let groups = chunk_keys(&keys, 1000);
        assert!(groups.len() > 10);
        assert!(groups
            .iter()
            .all(|g| g.iter().map(|k| k.len() + 6).sum::<usize>() <= 1000));
        assert_eq!(groups.concat(), keys);
    }
}
