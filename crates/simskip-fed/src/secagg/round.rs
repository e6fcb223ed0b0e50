//! Secure aggregation inside a federation round: the stage's setting, the organisation's
//! state across the four steps ([`ClientRound`]) and the coordinator's ([`SecureFit`]),
//! which the round state machine drives.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use simskip_data::NamedArray;

use super::fixed::FRAC_BITS_RANGE;
use super::{
    ClientId, Coordinator, FixedPoint, SecAggClient, SecAggError, SecAggReply, SecAggSettings,
    SecAggTask,
};

/// A stage's `[server.stages.secure_aggregation]` table: the SimSkip FedAvg stage sums the
/// organisations' example-weighted updates under masks, so the coordinator sees only the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecureAggregation {
    /// Organisations whose answers are needed to unmask; at least this many of the round's
    /// must survive to its end. `None`: a majority of the round's selected organisations
    /// (and at least 2).
    pub threshold: Option<u32>,
    /// Fixed-point precision: fractional bits of every encoded coordinate, in 8..=40.
    pub frac_bits: u32,
}

/// The default precision: 2^-24 (about 6e-8) per coordinate of `examples * update`.
pub const DEFAULT_FRAC_BITS: u32 = 24;

impl Default for SecureAggregation {
    fn default() -> Self {
        SecureAggregation {
            threshold: None,
            frac_bits: DEFAULT_FRAC_BITS,
        }
    }
}

impl SecureAggregation {
    /// Checks the values; the error names the key and value.
    pub fn validate(&self) -> Result<(), String> {
        if !FRAC_BITS_RANGE.contains(&self.frac_bits) {
            return Err(format!(
                "secure_aggregation.frac_bits = {}: must be in {}..={}",
                self.frac_bits,
                FRAC_BITS_RANGE.start(),
                FRAC_BITS_RANGE.end()
            ));
        }
        if let Some(t) = self.threshold {
            if t < 2 {
                return Err(format!(
                    "secure_aggregation.threshold = {t}: must be at least 2"
                ));
            }
        }
        Ok(())
    }

    /// The threshold for a round of `clients` selected organisations.
    pub fn threshold_for(&self, clients: usize) -> usize {
        match self.threshold {
            Some(t) => t as usize,
            None => (clients / 2 + 1).max(2),
        }
    }
}

/// Per-entity secure sums (FedE): every organisation of the round masks a vector over all
/// `total` rows that travel in the round, with its own rows at their `slots` and zeros
/// elsewhere. Each row of the unmasked sum is then the sum over that entity's holders, and no
/// organisation learns which others hold which entity (pairs mask every slot, not only the
/// entities both hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureRows {
    /// Rows in the round's shared row space.
    pub total: u32,
    /// For each row of the organisation's FIT result, in order: its slot in `0..total`.
    pub slots: Vec<u32>,
}

/// The most ring elements an organisation agrees to mask in one round (1 GiB of them): a
/// coordinator cannot make it allocate more by announcing a huge row space.
pub const MAX_SECURE_VALUES: usize = 1 << 27;

impl SecureRows {
    /// Places `rows` (`slots.len()` rows of `width`) at their slots of a zeroed
    /// `total x width` vector; refuses a layout that does not fit the rows.
    pub fn scatter(&self, rows: &[f32], width: usize) -> Result<Vec<f32>, String> {
        if width == 0 || rows.len() != self.slots.len() * width {
            return Err(format!(
                "{} values for {} rows of width {width}",
                rows.len(),
                self.slots.len()
            ));
        }
        let total = self.total as usize;
        if total.saturating_mul(width) > MAX_SECURE_VALUES {
            return Err(format!(
                "{total} rows of width {width} exceed the {MAX_SECURE_VALUES} values a round may mask"
            ));
        }
        let mut out = vec![0.0f32; total * width];
        let mut seen = vec![false; total];
        for (row, &slot) in rows.chunks_exact(width).zip(&self.slots) {
            let slot = slot as usize;
            if slot >= total {
                return Err(format!("slot {slot} outside the {total} rows"));
            }
            if std::mem::replace(&mut seen[slot], true) {
                return Err(format!("slot {slot} named twice"));
            }
            out[slot * width..(slot + 1) * width].copy_from_slice(row);
        }
        Ok(out)
    }
}

/// What the coordinator of a secure FIT round learns: the survivors' (example-weighted, or
/// per-entity for FedE) sum, their total examples and who they are.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSum {
    pub weighted_sum: Vec<f64>,
    pub total_examples: u64,
    /// The organisations whose masked input is in the sum.
    pub survivors: Vec<String>,
}

impl SecureSum {
    /// The example-weighted mean.
    pub fn mean(&self) -> Vec<f64> {
        super::weighted_mean(&self.weighted_sum, self.total_examples)
    }
}

/// An organisation's side of one secure FIT round: its trained update, flattened in the
/// global model's array order, and its protocol state.
#[derive(Debug)]
pub struct ClientRound {
    client: SecAggClient,
    update: Vec<f32>,
    examples: u64,
}

impl ClientRound {
    /// After training: checks the update has the global model's arrays, names and shapes,
    /// draws fresh keys (from the operating system's generator) and answers the BEGIN step.
    pub fn begin(
        task: &SecAggTask,
        context: &[u8],
        global: &[(String, Vec<usize>)],
        update: &[NamedArray],
        examples: u64,
    ) -> Result<(Self, SecAggReply), String> {
        let SecAggTask::Begin {
            client,
            threshold,
            frac_bits,
            ref rows,
        } = *task
        else {
            return Err(format!("expected the begin step, got {}", task.step()));
        };
        let fixed_point = FixedPoint::new(frac_bits)
            .ok_or_else(|| format!("frac_bits = {frac_bits} outside {FRAC_BITS_RANGE:?}"))?;
        if update.len() != global.len() {
            return Err(format!(
                "the update has {} arrays, the global model {}",
                update.len(),
                global.len()
            ));
        }
        let mut flat = Vec::new();
        for (name, shape) in global {
            let a = update
                .iter()
                .find(|a| &a.name == name)
                .ok_or_else(|| format!("the update has no array {name:?}"))?;
            if &a.shape != shape {
                return Err(format!(
                    "array {name:?} has shape {:?}, the global model {shape:?}",
                    a.shape
                ));
            }
            flat.extend_from_slice(&a.data);
        }
        // FedE: one row per entity, summed over its holders unweighted (FedE's mean), so
        // every organisation counts once.
        let (flat, examples) = match rows {
            None => (flat, examples),
            Some(rows) => {
                let width = match global {
                    [(_, shape)] if shape.len() == 2 => shape[1],
                    _ => return Err("per-entity sums need one array of rows".to_string()),
                };
                (rows.scatter(&flat, width)?, 1)
            }
        };
        let settings = SecAggSettings {
            threshold,
            fixed_point,
        };
        let mut rng = StdRng::from_os_rng();
        let (client, keys) = SecAggClient::new(client, settings, context, &mut rng);
        Ok((
            ClientRound {
                client,
                update: flat,
                examples,
            },
            SecAggReply::Keys(keys),
        ))
    }

    /// Answers a later step.
    pub fn step(&mut self, task: &SecAggTask) -> Result<SecAggReply, SecAggError> {
        match task {
            SecAggTask::Begin { .. } => Err(SecAggError::OutOfOrder {
                at: "a started aggregation",
                got: "begin",
            }),
            SecAggTask::Roster(roster) => {
                let mut rng = StdRng::from_os_rng();
                Ok(SecAggReply::Shares(
                    self.client.share_keys(roster, &mut rng)?,
                ))
            }
            SecAggTask::Inbox(inbox) => Ok(SecAggReply::Masked(self.client.masked_input(
                inbox,
                &self.update,
                self.examples,
            )?)),
            SecAggTask::Unmask(request) => Ok(SecAggReply::Unmask(self.client.unmask(request)?)),
        }
    }
}

/// The steps of a secure FIT round, as the coordinator collects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitStep {
    /// Training, then keys.
    Keys,
    Shares,
    MaskedInputs,
    Unmask,
}

/// The coordinator's side of one secure FIT round: organisation names to protocol ids, the
/// protocol's coordinator, and what each participant of the current step is asked.
#[derive(Debug)]
pub struct SecureFit {
    coordinator: Coordinator,
    ids: BTreeMap<String, ClientId>,
    step: FitStep,
    /// The current step's question to each participant.
    asks: BTreeMap<String, SecAggTask>,
    answered: BTreeSet<String>,
}

impl SecureFit {
    /// A round of `selected` organisations (ids in their order) on a `dim`-long model; for
    /// per-entity sums (FedE), `rows` gives each organisation's layout in that space.
    pub fn new(
        config: &SecureAggregation,
        context: &[u8],
        dim: usize,
        selected: &[String],
        rows: &BTreeMap<String, SecureRows>,
    ) -> Result<Self, SecAggError> {
        let threshold = config.threshold_for(selected.len());
        if threshold < 2 || threshold > selected.len() {
            return Err(SecAggError::Threshold {
                threshold,
                clients: selected.len(),
            });
        }
        let fixed_point = FixedPoint::new(config.frac_bits).ok_or(SecAggError::BadRoster(
            "precision outside its range (configuration not validated)",
        ))?;
        let settings = SecAggSettings {
            threshold,
            fixed_point,
        };
        let ids: BTreeMap<String, ClientId> = selected
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as ClientId))
            .collect();
        let asks = ids
            .iter()
            .map(|(n, &client)| {
                (
                    n.clone(),
                    SecAggTask::Begin {
                        client,
                        threshold,
                        frac_bits: config.frac_bits,
                        rows: rows.get(n).cloned(),
                    },
                )
            })
            .collect();
        Ok(SecureFit {
            coordinator: Coordinator::new(settings, context, dim),
            ids,
            step: FitStep::Keys,
            asks,
            answered: BTreeSet::new(),
        })
    }

    pub fn step(&self) -> FitStep {
        self.step
    }

    /// What `name` is asked in the current step, if it takes part.
    pub fn ask(&self, name: &str) -> Option<&SecAggTask> {
        self.asks.get(name)
    }

    /// The participants of the current step.
    pub fn participants(&self) -> Vec<String> {
        self.asks.keys().cloned().collect()
    }

    /// Takes `name`'s answer to the current step.
    pub fn on_reply(&mut self, name: &str, reply: SecAggReply) -> Result<(), SecAggError> {
        let &id = self
            .ids
            .get(name)
            .filter(|_| self.asks.contains_key(name))
            .ok_or(SecAggError::RefusedUnmask("not a participant of this step"))?;
        if self.answered.contains(name) {
            return Err(SecAggError::Duplicate(id));
        }
        let mismatch = |reply: &SecAggReply| SecAggError::OutOfOrder {
            at: self.step_name(),
            got: reply.step(),
        };
        match (self.step, reply) {
            (FitStep::Keys, SecAggReply::Keys(keys)) if keys.client == id => {
                self.coordinator.on_keys(keys)?
            }
            (FitStep::Shares, SecAggReply::Shares(sealed)) => {
                self.coordinator.on_shares(id, sealed)?
            }
            (FitStep::MaskedInputs, SecAggReply::Masked(m)) if m.client == id => {
                self.coordinator.on_masked_input(m)?
            }
            (FitStep::Unmask, SecAggReply::Unmask(r)) if r.from == id => {
                self.coordinator.on_unmask_response(r)?
            }
            (_, reply) => return Err(mismatch(&reply)),
        }
        self.answered.insert(name.to_string());
        Ok(())
    }

    fn step_name(&self) -> &'static str {
        match self.step {
            FitStep::Keys => "keys",
            FitStep::Shares => "shares",
            FitStep::MaskedInputs => "masked input",
            FitStep::Unmask => "unmask",
        }
    }

    /// Whether every participant of the current step answered.
    pub fn all_answered(&self) -> bool {
        self.asks.keys().all(|n| self.answered.contains(n))
    }

    /// Closes the current step and opens the next. `Ok(false)`: the last step (unmask) is
    /// closed, and [`SecureFit::finish`] removes the masks.
    pub fn advance(&mut self) -> Result<bool, SecAggError> {
        let name_of: BTreeMap<ClientId, String> =
            self.ids.iter().map(|(n, &i)| (i, n.clone())).collect();
        let next: BTreeMap<String, SecAggTask> = match self.step {
            FitStep::Keys => {
                let roster = self.coordinator.roster()?;
                self.step = FitStep::Shares;
                roster
                    .iter()
                    .map(|k| {
                        (
                            name_of[&k.client].clone(),
                            SecAggTask::Roster(roster.clone()),
                        )
                    })
                    .collect()
            }
            FitStep::Shares => {
                self.coordinator.close_shares()?;
                self.step = FitStep::MaskedInputs;
                self.coordinator
                    .shared()
                    .into_iter()
                    .map(|c| {
                        (
                            name_of[&c].clone(),
                            SecAggTask::Inbox(self.coordinator.inbox(c)),
                        )
                    })
                    .collect()
            }
            FitStep::MaskedInputs => {
                let request = self.coordinator.unmask_request()?;
                self.step = FitStep::Unmask;
                request
                    .survivors
                    .iter()
                    .map(|c| (name_of[c].clone(), SecAggTask::Unmask(request.clone())))
                    .collect()
            }
            FitStep::Unmask => {
                if !self.coordinator.can_finish() {
                    // Reports how many answered against the threshold.
                    self.coordinator.finish()?;
                }
                return Ok(false);
            }
        };
        self.asks = next;
        self.answered.clear();
        Ok(true)
    }

    /// The organisations whose masked input is in the sum (after the masked-input step).
    pub fn survivors(&self) -> Vec<String> {
        match self.step {
            FitStep::Unmask => self.asks.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Ring elements a masked input of this round carries, while masked inputs are collected
    /// (`None` at any other step): a push announcing another length is refused unread.
    pub fn masked_len(&self) -> Option<usize> {
        (self.step == FitStep::MaskedInputs).then(|| self.coordinator.masked_len())
    }

    /// Removes the masks (after [`SecureFit::advance`] said done): the survivors' sum.
    pub fn finish(&self) -> Result<SecureSum, SecAggError> {
        let sum = self.coordinator.finish()?;
        let name_of: BTreeMap<ClientId, &String> = self.ids.iter().map(|(n, &i)| (i, n)).collect();
        Ok(SecureSum {
            weighted_sum: sum.weighted_sum,
            total_examples: sum.total_examples,
            survivors: sum
                .survivors
                .iter()
                .filter_map(|c| name_of.get(c).map(|n| (*n).clone()))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coordinator's row layout is checked before anything is masked: it cannot make an
    /// organisation put a row twice, outside the space, or allocate beyond the bound.
    #[test]
    fn row_layouts_place_rows_and_refuse_what_does_not_fit() {
        let rows = SecureRows {
            total: 4,
            slots: vec![3, 0],
        };
        let placed = rows.scatter(&[1.0, 2.0, 3.0, 4.0], 2).unwrap();
        assert_eq!(placed, vec![3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
        let bad = |total: u32, slots: Vec<u32>, values: usize| {
            SecureRows { total, slots }
                .scatter(&vec![1.0; values], 2)
                .unwrap_err()
        };
        assert!(bad(4, vec![1, 1], 4).contains("named twice"));
        assert!(bad(4, vec![0, 4], 4).contains("outside"));
        assert!(bad(4, vec![0, 1], 6).contains("6 values for 2 rows"));
        assert!(bad(u32::MAX, vec![0], 2).contains("exceed"));
    }

    #[test]
    fn a_flat_begin_step_with_rows_needs_one_array_of_rows() {
        let task = SecAggTask::Begin {
            client: 0,
            threshold: 2,
            frac_bits: 24,
            rows: Some(SecureRows {
                total: 2,
                slots: vec![0],
            }),
        };
        let layout = vec![("w".to_string(), vec![3])];
        let update = vec![NamedArray::new("w", vec![3], vec![0.0; 3])];
        let e = ClientRound::begin(&task, b"ctx", &layout, &update, 1).unwrap_err();
        assert!(e.contains("one array of rows"), "{e}");
    }
}
