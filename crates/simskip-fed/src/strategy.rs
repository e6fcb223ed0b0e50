//! Aggregation strategies: what each client receives and how results are combined. They
//! depend only on the common types and the pure aggregation functions.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use simskip_data::NamedArray;

use crate::aggregate::{
    check_fede_update, fedavg_robust, fede_aggregate_robust, AggregateError, EntityTable,
};
use crate::robust::Robustness;
use crate::secagg::{SecureRows, SecureSum};
use crate::types::{ClientInfo, ClientResult, GlobalSnapshot, Payload, StageKind, ENTITIES};

/// One stage's aggregation strategy. The round state machine calls these; none of them
/// touches the network or the clock. `aggregate_fit` runs off the async runtime and outside
/// the coordinator's lock, so a strategy must be `Send`.
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

    /// A round (FIT, EVALUATE or FINISH_STAGE) of this stage starts: what the strategy decides
    /// per round is fixed here, for every task and result of the round (also after a resume).
    fn on_round_start(&mut self) {}

    /// What a task for `client` carries (the current global model or its part of it), for
    /// FIT, EVALUATE and FINISH_STAGE alike. Cheap: it shares the global state, never copies it.
    fn payload(&self, client: &ClientInfo) -> Result<Payload, AggregateError>;

    /// The most bytes a FIT result of `client` may carry: its arrays as the task announced
    /// them. A push announcing more is refused before any of it is read.
    fn fit_result_bytes(&self, client: &ClientInfo) -> u64;

    /// Validates a FIT result when it arrives; an error records the result as a failure.
    fn check_fit_result(
        &self,
        _client: &ClientInfo,
        _arrays: &[NamedArray],
    ) -> Result<(), AggregateError> {
        Ok(())
    }

    /// Folds a round's successful FIT results into the global state.
    fn aggregate_fit(&mut self, results: Vec<ClientResult>) -> Result<(), AggregateError>;

    /// Secure aggregation: the length of the flat vector the organisations sum (the global
    /// model's arrays, concatenated in order). `None`: the stage cannot aggregate securely.
    fn secure_len(&self) -> Option<usize> {
        None
    }

    /// Secure aggregation of rows (FedE): where each row of `client`'s FIT result sits in the
    /// round's shared row space. `None`: the stage sums one flat vector.
    fn secure_rows(&self, _client: &ClientInfo) -> Option<SecureRows> {
        None
    }

    /// Secure aggregation: takes the round's unmasked sum (flat, in the order of
    /// [`Strategy::secure_len`]) into the global state.
    fn aggregate_secure(&mut self, _sum: SecureSum) -> Result<(), AggregateError> {
        Err(AggregateError::Secure(format!(
            "a {} stage does not aggregate securely",
            self.kind().as_str()
        )))
    }

    /// The current global state.
    fn global(&self) -> GlobalSnapshot;

    /// Replaces the global state with a checkpoint of it (a [`Strategy::global`] saved
    /// earlier in the same run), to resume the run after a restart.
    fn restore(&mut self, global: GlobalSnapshot) -> Result<(), AggregateError>;
}

/// FedAvg over a list of named arrays: every client receives all of them and the new global
/// is the example-weighted average of the results.
#[derive(Debug, Clone)]
pub struct FedAvgStrategy {
    /// Shared with every task that carries it; replaced, never mutated, by aggregation.
    global: Arc<[NamedArray]>,
    rule: Robustness,
    /// Arrays that stay with each organisation (FedBN's BatchNorm): never averaged, they keep
    /// their initial global values, which the clients do not install.
    local: Vec<String>,
}

impl FedAvgStrategy {
    /// `initial`: the global model's arrays before the first round. Combines by the
    /// example-weighted mean unless [`FedAvgStrategy::with_rule`] says otherwise.
    pub fn new(initial: Vec<NamedArray>) -> Self {
        Self {
            global: Arc::from(initial),
            rule: Robustness::default(),
            local: Vec::new(),
        }
    }

    /// The arrays named `names` are local to each organisation: aggregation leaves them as
    /// they are (a client's values of them are checked like the rest, then dropped).
    pub fn with_local_arrays(mut self, names: Vec<String>) -> Self {
        self.local = names;
        self
    }

    /// Combines the round's updates by `rule`.
    pub fn with_rule(mut self, rule: Robustness) -> Self {
        self.rule = rule;
        self
    }

    pub fn arrays(&self) -> &[NamedArray] {
        &self.global
    }
}

impl Strategy for FedAvgStrategy {
    fn kind(&self) -> StageKind {
        StageKind::FedAvg
    }

    fn payload(&self, _client: &ClientInfo) -> Result<Payload, AggregateError> {
        Ok(Payload::Arrays(self.global.clone()))
    }

    fn fit_result_bytes(&self, _client: &ClientInfo) -> u64 {
        self.global.iter().map(|a| a.data.len() as u64 * 4).sum()
    }

    fn secure_len(&self) -> Option<usize> {
        Some(self.global.iter().map(|a| a.data.len()).sum())
    }

    fn aggregate_secure(&mut self, sum: SecureSum) -> Result<(), AggregateError> {
        let weighted_mean = sum.mean();
        let len: usize = self.global.iter().map(|a| a.data.len()).sum();
        if weighted_mean.len() != len {
            return Err(AggregateError::Secure(format!(
                "the unmasked sum has {} values, the model {len}",
                weighted_mean.len()
            )));
        }
        let mut rest = weighted_mean.as_slice();
        let mut next = Vec::with_capacity(self.global.len());
        for g in self.global.iter() {
            let (mine, tail) = rest.split_at(g.data.len());
            rest = tail;
            let a = NamedArray::new(
                g.name.clone(),
                g.shape.clone(),
                mine.iter().map(|&v| v as f32).collect(),
            );
            check_finite(&a)?;
            next.push(a);
        }
        self.global = Arc::from(next);
        Ok(())
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
        for g in self.global.iter() {
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
            check_finite(a)?;
        }
        Ok(())
    }

    fn aggregate_fit(&mut self, results: Vec<ClientResult>) -> Result<(), AggregateError> {
        let inputs: Vec<(Vec<NamedArray>, u64)> = results
            .into_iter()
            .map(|r| (r.arrays, r.num_examples))
            .collect();
        // The output keeps the global order whatever order clients send.
        let mut out = fedavg_robust(&self.global, &inputs, &self.rule)?;
        for (new, old) in out.iter_mut().zip(self.global.iter()) {
            if self.local.contains(&old.name) {
                *new = old.clone();
            }
        }
        self.global = Arc::from(out);
        Ok(())
    }

    fn global(&self) -> GlobalSnapshot {
        GlobalSnapshot {
            arrays: self.global.to_vec(),
            keys: None,
        }
    }

    fn restore(&mut self, global: GlobalSnapshot) -> Result<(), AggregateError> {
        // A checkpoint may list the arrays in another order (safetensors sorts them).
        let names = |a: &[NamedArray]| {
            let mut n: Vec<String> = a.iter().map(|a| a.name.clone()).collect();
            n.sort();
            n
        };
        if names(&global.arrays) != names(&self.global) {
            return Err(AggregateError::Names {
                input: 0,
                expected: names(&self.global),
                got: names(&global.arrays),
            });
        }
        let mut by_name: std::collections::HashMap<String, NamedArray> = global
            .arrays
            .into_iter()
            .map(|a| (a.name.clone(), a))
            .collect();
        let mut arrays = Vec::with_capacity(self.global.len());
        for g in self.global.iter() {
            let a = by_name.remove(&g.name).expect("same names");
            if g.shape != a.shape {
                return Err(AggregateError::Shape {
                    input: 0,
                    name: g.name.clone(),
                    expected: g.shape.clone(),
                    got: a.shape.clone(),
                });
            }
            check_finite(&a)?;
            arrays.push(a);
        }
        self.global = Arc::from(arrays);
        Ok(())
    }
}

/// A non-finite value would poison the global model for every organisation.
fn check_finite(a: &NamedArray) -> Result<(), AggregateError> {
    match a.data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(AggregateError::NonFinite {
            name: a.name.clone(),
            index: i,
        }),
    }
}

/// FedE over a global entity table: each client receives and returns only the rows of the
/// entities it holds, as an array "entities" of shape `[n_keys, dim]` in the order of its
/// registered keys; each entity becomes the mean of the rows sent for it.
#[derive(Debug, Clone)]
pub struct FedEStrategy {
    /// Shared with the tasks streaming its rows; aggregation copies it only if one still is.
    table: Arc<EntityTable>,
    rng: StdRng,
    init_bound: f32,
    rule: Robustness,
    /// Rows travel only for entities held by at least this many organisations (1: all).
    min_holders: u32,
    /// Every organisation's registered keys, by name (a re-registration replaces its own).
    members: HashMap<String, Arc<Vec<String>>>,
    /// Holders per key, counted when the current round started: fixed during a round, so a
    /// task and its result select the same rows whoever registers meanwhile.
    holders: Arc<HashMap<String, u32>>,
    /// The rows that travel this round (held by at least `min_holders`), in table order: each
    /// key's slot in the row space a secure round sums over. Fixed with `holders`.
    shared_slots: Arc<HashMap<String, u32>>,
}

impl FedEStrategy {
    /// Rows of new keys start uniform in `±init_bound` (the TransE configuration's
    /// initialisation), drawn from a `StdRng` seeded with `seed` in the order clients
    /// register their keys.
    pub fn new(dim: usize, init_bound: f32, seed: u64) -> Self {
        Self::with_table(EntityTable::new(dim), init_bound, seed)
    }

    /// Starts from an existing table (e.g. a checkpoint); unknown keys are initialised as in
    /// [`FedEStrategy::new`].
    pub fn with_table(table: EntityTable, init_bound: f32, seed: u64) -> Self {
        Self {
            table: Arc::new(table),
            rng: StdRng::seed_from_u64(seed),
            init_bound,
            rule: Robustness::default(),
            min_holders: 1,
            members: HashMap::new(),
            holders: Arc::default(),
            shared_slots: Arc::default(),
        }
    }

    /// Rows travel only for entities held by at least `min_holders` organisations: an entity
    /// fewer hold is trained at home and never leaves (its row on the coordinator stays at
    /// its initial value). 1 (the default): every row travels, as in FedE.
    pub fn with_min_holders(mut self, min_holders: u32) -> Self {
        self.min_holders = min_holders.max(1);
        self
    }

    fn recount_holders(&mut self) {
        let mut holders: HashMap<String, u32> = HashMap::new();
        for keys in self.members.values() {
            for k in keys.iter() {
                *holders.entry(k.clone()).or_default() += 1;
            }
        }
        let mut slots = HashMap::new();
        if self.min_holders > 1 {
            for k in self.table.keys() {
                if holders.get(k).copied().unwrap_or(0) >= self.min_holders {
                    slots.insert(k.clone(), slots.len() as u32);
                }
            }
        }
        self.holders = Arc::new(holders);
        self.shared_slots = Arc::new(slots);
    }

    /// The keys of `client` whose rows travel, and their positions (`None`: all of them).
    fn travelling(&self, client: &ClientInfo) -> (Arc<Vec<String>>, Option<Arc<[u32]>>) {
        if self.min_holders <= 1 {
            return (client.entity_keys.clone(), None);
        }
        let (positions, keys): (Vec<u32>, Vec<String>) = client
            .entity_keys
            .iter()
            .enumerate()
            .filter(|(_, k)| self.holders.get(*k).copied().unwrap_or(0) >= self.min_holders)
            .map(|(i, k)| (i as u32, k.clone()))
            .unzip();
        (Arc::new(keys), Some(Arc::from(positions)))
    }

    /// Combines each entity's rows by `rule` (the plain mean over holders by default), over
    /// the entities held by at least `rule.min_holders` organisations.
    pub fn with_rule(mut self, rule: Robustness) -> Self {
        self.min_holders = rule.min_holders.max(1);
        self.rule = rule;
        self
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
        self.members
            .insert(client.name.clone(), client.entity_keys.clone());
        let b = self.init_bound;
        let table = Arc::make_mut(&mut self.table);
        for k in client.entity_keys.iter() {
            let rng = &mut self.rng;
            table.insert_with(k, |row| {
                for v in row {
                    *v = rng.random_range(-b..b);
                }
            });
        }
        Ok(())
    }

    fn on_round_start(&mut self) {
        self.recount_holders();
    }

    fn payload(&self, client: &ClientInfo) -> Result<Payload, AggregateError> {
        if let Some(k) = client.entity_keys.iter().find(|k| !self.table.contains(k)) {
            return Err(AggregateError::UnknownEntity(k.clone()));
        }
        let (keys, positions) = self.travelling(client);
        Ok(Payload::Rows {
            table: self.table.clone(),
            keys,
            positions,
        })
    }

    fn fit_result_bytes(&self, client: &ClientInfo) -> u64 {
        self.travelling(client).0.len() as u64 * self.table.dim() as u64 * 4
    }

    fn check_fit_result(
        &self,
        client: &ClientInfo,
        arrays: &[NamedArray],
    ) -> Result<(), AggregateError> {
        match arrays {
            [rows] if rows.name == ENTITIES => {
                check_fede_update(&self.table, 0, &self.travelling(client).0, rows)?;
                check_finite(rows)
            }
            _ => Err(AggregateError::Names {
                input: 0,
                expected: vec![ENTITIES.to_string()],
                got: arrays.iter().map(|a| a.name.clone()).collect(),
            }),
        }
    }

    fn aggregate_fit(&mut self, results: Vec<ClientResult>) -> Result<(), AggregateError> {
        let updates: Vec<(Vec<String>, NamedArray)> = results
            .into_iter()
            .filter_map(|r| {
                let keys = self.travelling(&r.client).0;
                let rows = r.arrays.into_iter().find(|a| a.name == ENTITIES)?;
                Some((Arc::unwrap_or_clone(keys), rows))
            })
            .collect();
        if updates.is_empty() {
            return Err(AggregateError::Empty);
        }
        fede_aggregate_robust(Arc::make_mut(&mut self.table), &updates, &self.rule)?;
        Ok(())
    }

    /// Only with `min_holders >= 2`: a row every organisation sums would otherwise include
    /// entities one organisation holds alone, whose "sum" is that organisation's row.
    fn secure_len(&self) -> Option<usize> {
        (self.min_holders > 1).then(|| self.shared_slots.len() * self.table.dim())
    }

    fn secure_rows(&self, client: &ClientInfo) -> Option<SecureRows> {
        if self.min_holders <= 1 {
            return None;
        }
        let slots = self
            .travelling(client)
            .0
            .iter()
            .map(|k| self.shared_slots.get(k).copied())
            .collect::<Option<Vec<u32>>>()?;
        Some(SecureRows {
            total: self.shared_slots.len() as u32,
            slots,
        })
    }

    /// Each shared row becomes the sum over its surviving holders divided by their number
    /// (FedE's unweighted mean); a row none of them holds keeps its value.
    fn aggregate_secure(&mut self, sum: SecureSum) -> Result<(), AggregateError> {
        let dim = self.table.dim();
        let rows = self.shared_slots.len();
        if sum.weighted_sum.len() != rows * dim {
            return Err(AggregateError::Secure(format!(
                "the unmasked sum has {} values, the round's shared rows {}",
                sum.weighted_sum.len(),
                rows * dim
            )));
        }
        let mut count = vec![0u32; rows];
        for name in &sum.survivors {
            let Some(keys) = self.members.get(name) else {
                continue;
            };
            for k in keys.iter() {
                if let Some(&slot) = self.shared_slots.get(k) {
                    count[slot as usize] += 1;
                }
            }
        }
        let mut next = Vec::with_capacity(rows);
        for (k, &slot) in self.shared_slots.iter() {
            let n = count[slot as usize];
            if n == 0 {
                continue;
            }
            let s = &sum.weighted_sum[slot as usize * dim..(slot as usize + 1) * dim];
            let row: Vec<f32> = s.iter().map(|v| (v / n as f64) as f32).collect();
            if row.iter().any(|v| !v.is_finite()) {
                return Err(AggregateError::Secure(format!(
                    "the unmasked row of {k:?} is not finite"
                )));
            }
            next.push((k, row));
        }
        let table = Arc::make_mut(&mut self.table);
        for (k, row) in next {
            if let Some(r) = table.row_mut(k) {
                r.copy_from_slice(&row);
            }
        }
        Ok(())
    }

    fn global(&self) -> GlobalSnapshot {
        GlobalSnapshot {
            arrays: vec![self.table.to_named_array()],
            keys: Some(self.table.keys().to_vec()),
        }
    }

    fn restore(&mut self, global: GlobalSnapshot) -> Result<(), AggregateError> {
        let dim = self.table.dim();
        let bad = |m: String| Err(AggregateError::Checkpoint(m));
        let Some(keys) = global.keys else {
            return bad("a FedE table needs the key of each row".into());
        };
        let [rows] = &global.arrays[..] else {
            return bad(format!(
                "a FedE table is one array, not {}",
                global.arrays.len()
            ));
        };
        if rows.name != ENTITIES || rows.shape != [keys.len(), dim] {
            return bad(format!(
                "expected {ENTITIES:?} of shape [{}, {dim}], got {:?} of shape {:?}",
                keys.len(),
                rows.name,
                rows.shape
            ));
        }
        check_finite(rows)?;
        let Some(table) = EntityTable::from_rows(keys, dim, rows.data.clone()) else {
            return bad("duplicate keys".into());
        };
        self.table = Arc::new(table);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, keys: &[&str]) -> ClientInfo {
        ClientInfo {
            name: name.into(),
            session: format!("s-{name}"),
            num_examples: 1,
            entity_keys: Arc::new(keys.iter().map(|k| k.to_string()).collect()),
        }
    }

    #[test]
    fn fedavg_leaves_local_arrays_alone_and_averages_the_rest() {
        let global = vec![
            NamedArray::new("bn", vec![2], vec![1.0, 1.0]),
            NamedArray::new("w", vec![2], vec![0.0, 0.0]),
        ];
        let result = |name: &str, bn: f32, w: f32| ClientResult {
            client: client(name, &[]),
            num_examples: 1,
            arrays: vec![
                NamedArray::new("w", vec![2], vec![w, w]),
                NamedArray::new("bn", vec![2], vec![bn, bn]),
            ],
            metrics: Default::default(),
        };
        let mut fedbn = FedAvgStrategy::new(global.clone()).with_local_arrays(vec!["bn".into()]);
        let mut plain = FedAvgStrategy::new(global);
        for s in [&mut fedbn, &mut plain] {
            s.aggregate_fit(vec![result("a", 5.0, 2.0), result("b", 7.0, 4.0)])
                .unwrap();
        }
        let get = |s: &FedAvgStrategy, n: &str| {
            s.arrays()
                .iter()
                .find(|a| a.name == n)
                .unwrap()
                .data
                .clone()
        };
        assert_eq!(get(&fedbn, "bn"), vec![1.0, 1.0]);
        assert_eq!(get(&fedbn, "w"), vec![3.0, 3.0]);
        assert_eq!(get(&plain, "bn"), vec![6.0, 6.0]);
        assert_eq!(get(&plain, "w"), vec![3.0, 3.0]);
    }

    #[test]
    fn with_min_holders_only_shared_rows_travel_and_private_rows_stay_untouched() {
        let mut s = FedEStrategy::new(2, 0.5, 7).with_rule(Robustness {
            min_holders: 2,
            ..Robustness::default()
        });
        let a = client("a", &["x", "shared", "y"]);
        let b = client("b", &["shared", "z"]);
        s.on_client_registered(&a).unwrap();
        s.on_client_registered(&b).unwrap();
        s.on_round_start();
        let private_x = s.table().row("x").unwrap().to_vec();
        let Payload::Rows {
            keys, positions, ..
        } = s.payload(&a).unwrap()
        else {
            panic!("FedE sends rows")
        };
        assert_eq!(*keys, vec!["shared".to_string()]);
        assert_eq!(positions.as_deref(), Some(&[1u32][..]));
        assert_eq!(s.fit_result_bytes(&a), 2 * 4);
        // a's full table is refused: only the shared row may come back.
        let full = NamedArray::new(ENTITIES, vec![3, 2], vec![1.0; 6]);
        assert!(s.check_fit_result(&a, &[full]).is_err());
        let mine = |v: f32| NamedArray::new(ENTITIES, vec![1, 2], vec![v; 2]);
        s.check_fit_result(&a, &[mine(1.0)]).unwrap();
        s.aggregate_fit(vec![
            ClientResult {
                client: a.clone(),
                arrays: vec![mine(1.0)],
                num_examples: 1,
                metrics: Default::default(),
            },
            ClientResult {
                client: b.clone(),
                arrays: vec![mine(3.0)],
                num_examples: 1,
                metrics: Default::default(),
            },
        ])
        .unwrap();
        assert_eq!(s.table().row("shared").unwrap(), &[2.0, 2.0]);
        // The private rows never moved on the coordinator (nobody sent them).
        assert_eq!(s.table().row("x").unwrap(), &private_x[..]);

        // A third holder of "y" registering mid-round makes it shared from the next round on.
        let c = client("c", &["y"]);
        s.on_client_registered(&c).unwrap();
        assert_eq!(s.travelling(&a).1.unwrap().to_vec(), vec![1]);
        s.on_round_start();
        assert_eq!(s.travelling(&a).1.unwrap().to_vec(), vec![1, 2]);

        // min_holders 1 (the default): every row, no selection.
        let all = FedEStrategy::new(2, 0.5, 7);
        assert_eq!(all.travelling(&a).1, None);
    }
}
