//! Pure aggregation: FedAvg over named arrays, FedE over a keyed entity table, and
//! example-weighted metric averages. Sums are accumulated in f64.

use std::collections::{BTreeMap, HashMap};

use simskip_data::NamedArray;

use crate::robust::Robustness;
use crate::types::ENTITIES;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("nothing to aggregate")]
    Empty,
    #[error("total example weight is zero")]
    ZeroWeight,
    #[error("input {input}: arrays {got:?} do not match {expected:?}")]
    Names {
        input: usize,
        expected: Vec<String>,
        got: Vec<String>,
    },
    #[error("input {input}: array {name:?} has shape {got:?}, expected {expected:?}")]
    Shape {
        input: usize,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("update {update}: {rows} has {got_rows} rows of width {got_dim} for {keys} keys of width {dim}")]
    Rows {
        update: usize,
        rows: String,
        got_rows: usize,
        got_dim: usize,
        keys: usize,
        dim: usize,
    },
    #[error("unknown entity {0:?}")]
    UnknownEntity(String),
    #[error("array {name:?} holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    /// A checkpoint that does not fit the strategy it should restore.
    #[error("checkpoint does not fit the strategy: {0}")]
    Checkpoint(String),
    /// Secure aggregation could not unmask the round's sum, or the stage cannot take one.
    #[error("secure aggregation: {0}")]
    Secure(String),
}

/// Checks that FedAvg inputs exist and all hold the same array names with the same shapes.
pub fn check_fedavg_inputs(inputs: &[(Vec<NamedArray>, u64)]) -> Result<(), AggregateError> {
    let (first, _) = inputs.first().ok_or(AggregateError::Empty)?;
    let names: Vec<String> = first.iter().map(|a| a.name.clone()).collect();
    for (i, (arrays, _)) in inputs.iter().enumerate() {
        let by_name: HashMap<&str, &NamedArray> =
            arrays.iter().map(|a| (a.name.as_str(), a)).collect();
        if arrays.len() != first.len()
            || by_name.len() != arrays.len()
            || first.iter().any(|a| !by_name.contains_key(a.name.as_str()))
        {
            return Err(AggregateError::Names {
                input: i,
                expected: names,
                got: arrays.iter().map(|a| a.name.clone()).collect(),
            });
        }
        for a in first {
            let b = by_name[a.name.as_str()];
            if a.shape != b.shape || b.data.len() != a.data.len() {
                return Err(AggregateError::Shape {
                    input: i,
                    name: a.name.clone(),
                    expected: a.shape.clone(),
                    got: b.shape.clone(),
                });
            }
        }
    }
    Ok(())
}

/// FedAvg: `sum_k n_k * w_k / sum_k n_k` for every named array (weights, biases and
/// batch-norm running statistics alike). Arrays are matched by name; the output follows the
/// first input's order. Errors on no input, zero total weight, or when the inputs do not
/// hold the same names with the same shapes.
pub fn fedavg(inputs: &[(Vec<NamedArray>, u64)]) -> Result<Vec<NamedArray>, AggregateError> {
    check_fedavg_inputs(inputs)?;
    // u128: a sum of u64 counts cannot overflow it.
    let total: u128 = inputs.iter().map(|(_, n)| u128::from(*n)).sum();
    if total == 0 {
        return Err(AggregateError::ZeroWeight);
    }
    let first = &inputs[0].0;
    let mut out = Vec::with_capacity(first.len());
    for a in first {
        let mut acc = vec![0f64; a.data.len()];
        for (arrays, n) in inputs {
            if *n == 0 {
                continue;
            }
            let w = *n as f64 / total as f64;
            let b = arrays.iter().find(|b| b.name == a.name).expect("checked");
            for (s, &v) in acc.iter_mut().zip(&b.data) {
                *s += w * v as f64;
            }
        }
        out.push(NamedArray::new(
            a.name.clone(),
            a.shape.clone(),
            acc.into_iter().map(|v| v as f32).collect(),
        ));
    }
    Ok(out)
}

/// FedAvg under a [`Robustness`] rule: each client's update relative to `global` is clipped
/// (when asked), then every coordinate is combined by the rule (the mean weighted by example
/// counts, or the unweighted median / trimmed mean). The output follows `global`'s order.
/// With the plain rule this is [`fedavg`].
pub fn fedavg_robust(
    global: &[NamedArray],
    inputs: &[(Vec<NamedArray>, u64)],
    rule: &Robustness,
) -> Result<Vec<NamedArray>, AggregateError> {
    if rule.is_plain() {
        let mut out = fedavg(inputs)?;
        out.sort_by_key(|a| {
            global
                .iter()
                .position(|g| g.name == a.name)
                .unwrap_or(usize::MAX)
        });
        return Ok(out);
    }
    check_fedavg_inputs(inputs)?;
    // Each input's arrays in the global order.
    let mut aligned: Vec<Vec<&NamedArray>> = Vec::with_capacity(inputs.len());
    for (i, (arrays, _)) in inputs.iter().enumerate() {
        let mut row = Vec::with_capacity(global.len());
        for g in global {
            let a = arrays
                .iter()
                .find(|a| a.name == g.name && a.data.len() == g.data.len())
                .ok_or_else(|| AggregateError::Names {
                    input: i,
                    expected: global.iter().map(|g| g.name.clone()).collect(),
                    got: arrays.iter().map(|a| a.name.clone()).collect(),
                })?;
            row.push(a);
        }
        aligned.push(row);
    }
    let scales: Vec<f64> = aligned
        .iter()
        .map(|arrays| {
            let sq: f64 = arrays
                .iter()
                .zip(global)
                .flat_map(|(a, g)| a.data.iter().zip(&g.data))
                .map(|(&v, &g)| (v as f64 - g as f64).powi(2))
                .sum();
            rule.clip_scale(sq)
        })
        .collect();
    let weights: Vec<f64> = inputs.iter().map(|(_, n)| *n as f64).collect();
    let mut values = vec![0f64; inputs.len()];
    let out = global
        .iter()
        .enumerate()
        .map(|(j, g)| {
            let data = (0..g.data.len())
                .map(|i| {
                    let base = g.data[i] as f64;
                    for (k, arrays) in aligned.iter().enumerate() {
                        values[k] = base + scales[k] * (arrays[j].data[i] as f64 - base);
                    }
                    rule.combine(&mut values, &weights) as f32
                })
                .collect();
            NamedArray::new(g.name.clone(), g.shape.clone(), data)
        })
        .collect();
    Ok(out)
}

/// The coordinator's global FedE entity table, keyed by entity name, rows in insertion order.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityTable {
    keys: Vec<String>,
    index: HashMap<String, usize>,
    dim: usize,
    data: Vec<f32>,
}

impl EntityTable {
    pub fn new(dim: usize) -> Self {
        Self {
            keys: Vec::new(),
            index: HashMap::new(),
            dim,
            data: Vec::new(),
        }
    }

    /// A table from keys and their `keys.len() x dim` rows; `None` on a length mismatch or
    /// duplicate key.
    pub fn from_rows(keys: Vec<String>, dim: usize, data: Vec<f32>) -> Option<Self> {
        if data.len() != keys.len() * dim {
            return None;
        }
        let index: HashMap<String, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        if index.len() != keys.len() {
            return None;
        }
        Some(Self {
            keys,
            index,
            dim,
            data,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// Keys in row order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }
    pub fn row(&self, key: &str) -> Option<&[f32]> {
        let i = *self.index.get(key)?;
        Some(&self.data[i * self.dim..(i + 1) * self.dim])
    }
    pub fn row_mut(&mut self, key: &str) -> Option<&mut [f32]> {
        let i = *self.index.get(key)?;
        Some(&mut self.data[i * self.dim..(i + 1) * self.dim])
    }
    /// All rows, `len() x dim`, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Adds `key` with the row `init` fills in (starting from zeros) unless it exists.
    /// Returns true when the key was new.
    pub fn insert_with(&mut self, key: &str, init: impl FnOnce(&mut [f32])) -> bool {
        if self.index.contains_key(key) {
            return false;
        }
        let start = self.data.len();
        self.data.resize(start + self.dim, 0.0);
        init(&mut self.data[start..]);
        self.index.insert(key.to_string(), self.keys.len());
        self.keys.push(key.to_string());
        true
    }

    /// The rows of `keys`, in that order, as a `[keys.len(), dim]` array named "entities".
    pub fn rows_for(&self, keys: &[String]) -> Result<NamedArray, AggregateError> {
        let mut data = Vec::with_capacity(keys.len() * self.dim);
        for k in keys {
            data.extend_from_slice(
                self.row(k)
                    .ok_or_else(|| AggregateError::UnknownEntity(k.clone()))?,
            );
        }
        Ok(NamedArray::new(ENTITIES, vec![keys.len(), self.dim], data))
    }

    /// The whole table as a `[len, dim]` array named "entities" (row order = `keys()`).
    pub fn to_named_array(&self) -> NamedArray {
        NamedArray::new(ENTITIES, vec![self.keys.len(), self.dim], self.data.clone())
    }
}

/// Checks one FedE update: `rows` must be `[keys.len(), table.dim]` and every key known.
pub fn check_fede_update(
    table: &EntityTable,
    update: usize,
    keys: &[String],
    rows: &NamedArray,
) -> Result<(), AggregateError> {
    let (got_rows, got_dim) = match rows.shape.as_slice() {
        [r, d] => (*r, *d),
        [r] if *r == 0 => (0, table.dim),
        _ => (usize::MAX, usize::MAX),
    };
    if got_rows != keys.len() || got_dim != table.dim || rows.data.len() != keys.len() * table.dim {
        return Err(AggregateError::Rows {
            update,
            rows: rows.name.clone(),
            got_rows,
            got_dim,
            keys: keys.len(),
            dim: table.dim,
        });
    }
    if let Some(k) = keys.iter().find(|k| !table.contains(k)) {
        return Err(AggregateError::UnknownEntity(k.clone()));
    }
    Ok(())
}

/// FedE aggregation: every entity some client sent becomes the plain mean of the rows sent
/// for it (the existence-weighted average of FedE); entities nobody sent keep their value.
/// All updates are validated before the table changes. Returns how many entities changed.
pub fn fede_aggregate(
    table: &mut EntityTable,
    updates: &[(Vec<String>, NamedArray)],
) -> Result<usize, AggregateError> {
    for (u, (keys, rows)) in updates.iter().enumerate() {
        check_fede_update(table, u, keys, rows)?;
    }
    let dim = table.dim;
    let mut sums: HashMap<usize, (Vec<f64>, u32)> = HashMap::new();
    for (keys, rows) in updates {
        for (r, k) in keys.iter().enumerate() {
            let i = table.index[k.as_str()];
            let (sum, count) = sums.entry(i).or_insert_with(|| (vec![0.0; dim], 0));
            for (s, &v) in sum.iter_mut().zip(&rows.data[r * dim..(r + 1) * dim]) {
                *s += v as f64;
            }
            *count += 1;
        }
    }
    for (&i, (sum, count)) in &sums {
        for (dst, s) in table.data[i * dim..(i + 1) * dim].iter_mut().zip(sum) {
            *dst = (s / *count as f64) as f32;
        }
    }
    Ok(sums.len())
}

/// FedE aggregation under a [`Robustness`] rule, per entity over the clients that sent a row
/// for it: each row's difference to the global row is clipped (when asked), then every
/// coordinate is combined by the rule with equal weights. Validates all updates first. With
/// the plain rule this is [`fede_aggregate`].
pub fn fede_aggregate_robust(
    table: &mut EntityTable,
    updates: &[(Vec<String>, NamedArray)],
    rule: &Robustness,
) -> Result<usize, AggregateError> {
    if rule.is_plain() {
        return fede_aggregate(table, updates);
    }
    for (u, (keys, rows)) in updates.iter().enumerate() {
        check_fede_update(table, u, keys, rows)?;
    }
    let dim = table.dim;
    let mut holders: HashMap<usize, Vec<&[f32]>> = HashMap::new();
    for (keys, rows) in updates {
        for (r, k) in keys.iter().enumerate() {
            holders
                .entry(table.index[k.as_str()])
                .or_default()
                .push(&rows.data[r * dim..(r + 1) * dim]);
        }
    }
    let mut values = Vec::new();
    let mut weights = Vec::new();
    for (&i, rows) in &holders {
        let global: Vec<f64> = table.data[i * dim..(i + 1) * dim]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let scales: Vec<f64> = rows
            .iter()
            .map(|row| {
                let sq = row
                    .iter()
                    .zip(&global)
                    .map(|(&v, g)| (v as f64 - g).powi(2))
                    .sum();
                rule.clip_scale(sq)
            })
            .collect();
        weights.clear();
        weights.resize(rows.len(), 1.0);
        for (c, g) in global.iter().enumerate() {
            values.clear();
            values.extend(
                rows.iter()
                    .zip(&scales)
                    .map(|(row, s)| g + s * (row[c] as f64 - g)),
            );
            table.data[i * dim + c] = rule.combine(&mut values, &weights) as f32;
        }
    }
    Ok(holders.len())
}

/// Example-weighted mean of each metric over the clients that report it. A metric whose
/// reporters all have zero examples gets their plain mean.
pub fn weighted_metrics(inputs: &[(u64, BTreeMap<String, f64>)]) -> BTreeMap<String, f64> {
    let mut acc: BTreeMap<&str, (f64, f64, f64, f64)> = BTreeMap::new();
    for (n, metrics) in inputs {
        for (k, &v) in metrics {
            let e = acc.entry(k.as_str()).or_default();
            e.0 += *n as f64 * v;
            e.1 += *n as f64;
            e.2 += v;
            e.3 += 1.0;
        }
    }
    acc.into_iter()
        .map(|(k, (ws, w, s, c))| (k.to_string(), if w > 0.0 { ws / w } else { s / c }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::robust::Combine;

    #[test]
    fn robust_fedavg_keeps_a_hostile_update_within_its_bound() {
        let g = vec![NamedArray::new("w", vec![2], vec![0.0, 0.0])];
        let a = |x: f32, y: f32| vec![NamedArray::new("w", vec![2], vec![x, y])];
        let inputs = [
            (a(1.0, 1.0), 1),
            (a(2.0, 2.0), 1),
            (a(3.0, 3.0), 1),
            (a(1e6, -1e6), 1),
        ];
        let median = Robustness {
            combine: Combine::Median,
            ..Robustness::default()
        };
        // The median of each coordinate stays between the honest values.
        let out = fedavg_robust(&g, &inputs, &median).unwrap();
        assert_eq!(out[0].data, vec![2.5, 1.5]);
        // Clipped to norm 1 around the global, the hostile update moves the mean by <= 1/4.
        let clipped = Robustness {
            clip_norm: Some(1.0),
            ..Robustness::default()
        };
        let out = fedavg_robust(&g, &inputs, &clipped).unwrap();
        // Each honest update (k, k) is longer than 1 and clipped to (1/sqrt 2, 1/sqrt 2).
        let half = std::f32::consts::FRAC_1_SQRT_2;
        let honest_only = 3.0 * half / 4.0;
        assert!((out[0].data[0] - (honest_only + half / 4.0)).abs() < 1e-5);
        assert!((out[0].data[1] - (honest_only - half / 4.0)).abs() < 1e-5);
        // The plain rule is FedAvg.
        let plain = fedavg_robust(&g, &inputs[..3], &Robustness::default()).unwrap();
        assert_eq!(plain, fedavg(&inputs[..3]).unwrap());
    }

    #[test]
    fn robust_fede_combines_each_entity_over_its_holders() {
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut t = EntityTable::from_rows(k(&["a", "b"]), 1, vec![0.0, 0.0]).unwrap();
        let rows = |v: Vec<f32>| NamedArray::new(ENTITIES, vec![v.len(), 1], v);
        let updates = [
            (k(&["a", "b"]), rows(vec![1.0, 5.0])),
            (k(&["a"]), rows(vec![2.0])),
            (k(&["a"]), rows(vec![1e9])),
        ];
        let median = Robustness {
            combine: Combine::Median,
            ..Robustness::default()
        };
        assert_eq!(fede_aggregate_robust(&mut t, &updates, &median).unwrap(), 2);
        assert_eq!(t.row("a").unwrap(), &[2.0]);
        assert_eq!(t.row("b").unwrap(), &[5.0]);
    }

    #[test]
    fn example_counts_near_u64_max_do_not_overflow() {
        let a = |v: f32| vec![NamedArray::new("w", vec![1], vec![v])];
        let out = fedavg(&[(a(1.0), u64::MAX), (a(3.0), u64::MAX)]).unwrap();
        assert_eq!(out[0].data, vec![2.0]);
    }

    fn arr(name: &str, shape: Vec<usize>, data: Vec<f32>) -> NamedArray {
        NamedArray::new(name, shape, data)
    }

    #[test]
    fn fedavg_weights_by_examples() {
        // weights 1 and 3: (1*a + 3*b) / 4
        let a = vec![
            arr("w", vec![2], vec![1.0, 2.0]),
            arr("bn.running_var", vec![1], vec![4.0]),
        ];
        let b = vec![
            arr("bn.running_var", vec![1], vec![8.0]),
            arr("w", vec![2], vec![5.0, -2.0]),
        ];
        let out = fedavg(&[(a, 1), (b, 3)]).unwrap();
        assert_eq!(out[0].name, "w");
        assert_eq!(out[0].data, vec![4.0, -1.0]);
        assert_eq!(out[1].name, "bn.running_var");
        assert_eq!(out[1].data, vec![7.0]);
    }

    #[test]
    fn fedavg_errors() {
        assert_eq!(fedavg(&[]), Err(AggregateError::Empty));
        let a = vec![arr("w", vec![2], vec![1.0, 2.0])];
        assert_eq!(
            fedavg(&[(a.clone(), 0), (a.clone(), 0)]),
            Err(AggregateError::ZeroWeight)
        );
        let b = vec![arr("v", vec![2], vec![1.0, 2.0])];
        assert!(matches!(
            fedavg(&[(a.clone(), 1), (b, 1)]),
            Err(AggregateError::Names { input: 1, .. })
        ));
        let c = vec![arr("w", vec![1, 2], vec![1.0, 2.0])];
        assert!(matches!(
            fedavg(&[(a, 1), (c, 1)]),
            Err(AggregateError::Shape { input: 1, .. })
        ));
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fede_means_over_holders_only() {
        let mut t = EntityTable::from_rows(
            keys(&["a", "b", "c"]),
            2,
            vec![0.0, 0.0, 10.0, 10.0, 100.0, 100.0],
        )
        .unwrap();
        // client 1 holds a, b; client 2 holds b only (different order of rows is by its keys)
        let u1 = (
            keys(&["b", "a"]),
            arr(ENTITIES, vec![2, 2], vec![2.0, 4.0, 1.0, 1.0]),
        );
        let u2 = (keys(&["b"]), arr(ENTITIES, vec![1, 2], vec![6.0, 0.0]));
        assert_eq!(fede_aggregate(&mut t, &[u1, u2]).unwrap(), 2);
        assert_eq!(t.row("a").unwrap(), &[1.0, 1.0]);
        assert_eq!(t.row("b").unwrap(), &[4.0, 2.0]);
        assert_eq!(t.row("c").unwrap(), &[100.0, 100.0]);
        let rows = t.rows_for(&keys(&["c", "a"])).unwrap();
        assert_eq!(rows.shape, vec![2, 2]);
        assert_eq!(rows.data, vec![100.0, 100.0, 1.0, 1.0]);
    }

    #[test]
    fn fede_validates_before_changing() {
        let mut t = EntityTable::new(2);
        assert!(t.insert_with("a", |r| r.fill(1.0)));
        assert!(!t.insert_with("a", |r| r.fill(9.0)));
        let good = (keys(&["a"]), arr(ENTITIES, vec![1, 2], vec![3.0, 3.0]));
        let bad = (keys(&["a"]), arr(ENTITIES, vec![1, 3], vec![3.0, 3.0, 3.0]));
        assert!(matches!(
            fede_aggregate(&mut t, &[good.clone(), bad]),
            Err(AggregateError::Rows { update: 1, .. })
        ));
        let unknown = (keys(&["z"]), arr(ENTITIES, vec![1, 2], vec![3.0, 3.0]));
        assert_eq!(
            fede_aggregate(&mut t, &[good, unknown]),
            Err(AggregateError::UnknownEntity("z".into()))
        );
        assert_eq!(t.row("a").unwrap(), &[1.0, 1.0]);
        assert!(t.rows_for(&keys(&["q"])).is_err());
    }

    #[test]
    fn metrics_weighted_by_examples_over_reporters() {
        let m = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let out = weighted_metrics(&[
            (1, m(&[("loss", 1.0), ("acc", 0.5)])),
            (3, m(&[("loss", 3.0)])),
            (0, m(&[("zero", 2.0)])),
            (0, m(&[("zero", 4.0)])),
        ]);
        assert_eq!(out["loss"], 2.5);
        assert_eq!(out["acc"], 0.5);
        assert_eq!(out["zero"], 3.0);
    }
}
