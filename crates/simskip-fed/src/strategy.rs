//! Aggregation strategies: what each client receives and how results are combined.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::NamedArray;

use crate::aggregate::{
    check_fede_update, fedavg, fede_aggregate, AggregateError, EntityTable, ENTITIES,
};
use crate::rounds::{ClientInfo, ClientResult, StageKind};

/// The global state of a stage, for saving: the arrays and, for a keyed table, the key of
/// each row of the "entities" array.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalSnapshot {
    pub arrays: Vec<NamedArray>,
    pub keys: Option<Vec<String>>,
}

/// One stage's aggregation strategy. The round state machine calls these; none of them
/// touches the network or the clock.
pub trait Strategy: Send {
    fn kind(&self) -> StageKind;

    /// A client registered (or re-registered); called for every stage's strategy so that
    /// keyed tables can grow as clients join.
    fn on_client_registered(&mut self, _client: &ClientInfo) -> Result<(), AggregateError> {
        Ok(())
    }

    /// The stage starts, with these clients alive.
    fn initial(&mut self, _clients: &[ClientInfo]) -> Result<(), AggregateError> {
        Ok(())
    }

    /// What a FIT task for `client` carries (the current global model or its part of it).
    fn fit_payload(&self, client: &ClientInfo) -> Result<Vec<NamedArray>, AggregateError>;

    /// What an EVALUATE task carries; the FIT payload by default.
    fn evaluate_payload(&self, client: &ClientInfo) -> Result<Vec<NamedArray>, AggregateError> {
        self.fit_payload(client)
    }

    /// What a FINISH_STAGE task carries (the final global weights); the FIT payload by default.
    fn finish_payload(&self, client: &ClientInfo) -> Result<Vec<NamedArray>, AggregateError> {
        self.fit_payload(client)
    }

    /// Validates a FIT result when it arrives; an error records the result as a failure.
    fn check_fit_result(
        &self,
        _client: &ClientInfo,
        _arrays: &[NamedArray],
    ) -> Result<(), AggregateError> {
        Ok(())
    }

    /// Folds a round's successful FIT results into the global state.
    fn aggregate_fit(&mut self, results: &[ClientResult]) -> Result<(), AggregateError>;

    /// The current global state.
    fn global(&self) -> GlobalSnapshot;
}

/// FedAvg over a list of named arrays: every client receives all of them and the new global
/// is the example-weighted average of the results.
#[derive(Debug, Clone)]
pub struct FedAvgStrategy {
    global: Vec<NamedArray>,
}

impl FedAvgStrategy {
    /// `initial`: the global model's arrays before the first round.
    pub fn new(initial: Vec<NamedArray>) -> Self {
        Self { global: initial }
    }

    pub fn arrays(&self) -> &[NamedArray] {
        &self.global
    }
}

impl Strategy for FedAvgStrategy {
    fn kind(&self) -> StageKind {
        StageKind::FedAvg
    }

    fn fit_payload(&self, _client: &ClientInfo) -> Result<Vec<NamedArray>, AggregateError> {
        Ok(self.global.clone())
    }

    fn check_fit_result(
        &self,
        _client: &ClientInfo,
        arrays: &[NamedArray],
    ) -> Result<(), AggregateError> {
        let names = || self.global.iter().map(|a| a.name.clone()).collect();
        if arrays.len() != self.global.len() {
            return Err(AggregateError::Names {
                input: 0,
                expected: names(),
                got: arrays.iter().map(|a| a.name.clone()).collect(),
            });
        }
        for g in &self.global {
            let Some(a) = arrays.iter().find(|a| a.name == g.name) else {
                return Err(AggregateError::Names {
                    input: 0,
                    expected: names(),
                    got: arrays.iter().map(|a| a.name.clone()).collect(),
                });
            };
            if a.shape != g.shape || a.data.len() != g.data.len() {
                return Err(AggregateError::Shape {
                    input: 0,
                    name: g.name.clone(),
                    expected: g.shape.clone(),
                    got: a.shape.clone(),
                });
            }
        }
        Ok(())
    }

    fn aggregate_fit(&mut self, results: &[ClientResult]) -> Result<(), AggregateError> {
        let inputs: Vec<(Vec<NamedArray>, u64)> = results
            .iter()
            .map(|r| (r.arrays.clone(), r.num_examples))
            .collect();
        let mut out = fedavg(&inputs)?;
        // Keep the global order stable whatever order clients send.
        out.sort_by_key(|a| {
            self.global
                .iter()
                .position(|g| g.name == a.name)
                .unwrap_or(usize::MAX)
        });
        self.global = out;
        Ok(())
    }

    fn global(&self) -> GlobalSnapshot {
        GlobalSnapshot {
            arrays: self.global.clone(),
            keys: None,
        }
    }
}

/// FedE over a global entity table: each client receives and returns only the rows of the
/// entities it holds, as an array "entities" of shape `[n_keys, dim]` in the order of its
/// registered keys; each entity becomes the mean of the rows sent for it.
#[derive(Debug, Clone)]
pub struct FedEStrategy {
    table: EntityTable,
    rng: StdRng,
    bound: f32,
}

impl FedEStrategy {
    /// Rows of new keys start uniform in `±6/sqrt(dim)` (TransE's initialisation), drawn
    /// from a `StdRng` seeded with `seed` in the order clients register their keys.
    pub fn new(dim: usize, seed: u64) -> Self {
        Self::with_table(EntityTable::new(dim), seed)
    }

    /// Starts from an existing table (e.g. a checkpoint); unknown keys are initialised as in
    /// [`FedEStrategy::new`].
    pub fn with_table(table: EntityTable, seed: u64) -> Self {
        let bound = 6.0 / (table.dim().max(1) as f32).sqrt();
        Self {
            table,
            rng: StdRng::seed_from_u64(seed),
            bound,
        }
    }

    pub fn table(&self) -> &EntityTable {
        &self.table
    }
}

impl Strategy for FedEStrategy {
    fn kind(&self) -> StageKind {
        StageKind::FedE
    }

    fn on_client_registered(&mut self, client: &ClientInfo) -> Result<(), AggregateError> {
        let b = self.bound;
        for k in client.entity_keys.iter() {
            let rng = &mut self.rng;
            self.table.insert_with(k, |row| {
                for v in row {
                    *v = rng.random_range(-b..b);
                }
            });
        }
        Ok(())
    }

    fn fit_payload(&self, client: &ClientInfo) -> Result<Vec<NamedArray>, AggregateError> {
        Ok(vec![self.table.rows_for(&client.entity_keys)?])
    }

    fn check_fit_result(
        &self,
        client: &ClientInfo,
        arrays: &[NamedArray],
    ) -> Result<(), AggregateError> {
        match arrays {
            [rows] if rows.name == ENTITIES => {
                check_fede_update(&self.table, 0, &client.entity_keys, rows)
            }
            _ => Err(AggregateError::Names {
                input: 0,
                expected: vec![ENTITIES.to_string()],
                got: arrays.iter().map(|a| a.name.clone()).collect(),
            }),
        }
    }

    fn aggregate_fit(&mut self, results: &[ClientResult]) -> Result<(), AggregateError> {
        let updates: Vec<(Vec<String>, NamedArray)> = results
            .iter()
            .filter_map(|r| {
                let rows = r.arrays.iter().find(|a| a.name == ENTITIES)?;
                Some((r.client.entity_keys.to_vec(), rows.clone()))
            })
            .collect();
        if updates.is_empty() {
            return Err(AggregateError::Empty);
        }
        fede_aggregate(&mut self.table, &updates)?;
        Ok(())
    }

    fn global(&self) -> GlobalSnapshot {
        GlobalSnapshot {
            arrays: vec![self.table.to_named_array()],
            keys: Some(self.table.keys().to_vec()),
        }
    }
}
