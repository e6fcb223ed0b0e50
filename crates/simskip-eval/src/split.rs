//! A fixed, seeded, stratified train/valid/test split of the labelled entities.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use simskip_data::Labels;

/// Entity ids of each part, ascending. Disjoint; together they are exactly the labelled
/// entities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSplit {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
    pub test: Vec<u32>,
}

/// Split the labelled entities of `labels` into train/valid/test (callers use 0.6/0.2/0.2, i.e.
/// `valid_fraction = test_fraction = 0.2`). Unlabelled entities appear in no part.
///
/// The sizes are exact: `test.len() == round(n·test_fraction)`,
/// `valid.len() == min(round(n·valid_fraction), n - test.len())`, the rest is train, where `n`
/// is the number of labelled entities. The split is stratified: each class gives
/// `floor(n_c·fraction)` members to a part, and the leftover places of the part go one each to
/// the classes with the largest remainders (ties in a seeded random order), so each class's
/// share is within one entity of proportional. Which members of a class go where is a seeded
/// shuffle. The same `labels` and `seed` always give the same split (for a given `rand` version).
///
/// Panics unless both fractions are in `[0, 1]` and sum to at most 1 (a programming error).
pub fn label_split(
    labels: &Labels,
    seed: u64,
    valid_fraction: f64,
    test_fraction: f64,
) -> LabelSplit {
    assert!(
        (0.0..=1.0).contains(&valid_fraction)
            && (0.0..=1.0).contains(&test_fraction)
            && valid_fraction + test_fraction <= 1.0 + 1e-12,
        "label_split: fractions must be in [0, 1] and sum to at most 1 (valid {valid_fraction}, test {test_fraction})"
    );
    let num_classes = labels
        .of
        .iter()
        .flatten()
        .map(|&c| c as usize + 1)
        .max()
        .unwrap_or(0)
        .max(labels.classes.len());
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); num_classes];
    for (e, c) in labels.of.iter().enumerate() {
        if let Some(c) = c {
            members[*c as usize].push(e as u32);
        }
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for m in &mut members {
        m.shuffle(&mut rng);
    }
    let sizes: Vec<usize> = members.iter().map(Vec::len).collect();
    let n: usize = sizes.iter().sum();

    let n_test = ((n as f64) * test_fraction).round() as usize;
    let n_test = n_test.min(n);
    let n_valid = (((n as f64) * valid_fraction).round() as usize).min(n - n_test);

    let test_q = apportion(&sizes, &sizes, test_fraction, n_test, &mut rng);
    let room: Vec<usize> = sizes.iter().zip(&test_q).map(|(s, q)| s - q).collect();
    let valid_q = apportion(&sizes, &room, valid_fraction, n_valid, &mut rng);

    let mut split = LabelSplit {
        train: Vec::with_capacity(n - n_test - n_valid),
        valid: Vec::with_capacity(n_valid),
        test: Vec::with_capacity(n_test),
    };
    for (c, m) in members.iter().enumerate() {
        let (t, rest) = m.split_at(test_q[c]);
        let (v, tr) = rest.split_at(valid_q[c]);
        split.test.extend_from_slice(t);
        split.valid.extend_from_slice(v);
        split.train.extend_from_slice(tr);
    }
    split.train.sort_unstable();
    split.valid.sort_unstable();
    split.test.sort_unstable();
    split
}

/// Largest-remainder apportionment of `target` places over classes of `sizes`, proportional to
/// `fraction`, never giving a class more than `cap[c]`.
fn apportion(
    sizes: &[usize],
    cap: &[usize],
    fraction: f64,
    target: usize,
    rng: &mut StdRng,
) -> Vec<usize> {
    let exact: Vec<f64> = sizes.iter().map(|&s| s as f64 * fraction).collect();
    let mut quota: Vec<usize> = exact
        .iter()
        .zip(cap)
        .map(|(&x, &cap)| (x.floor() as usize).min(cap))
        .collect();
    let given: usize = quota.iter().sum();
    debug_assert!(given <= target, "apportion: floors exceed the target");
    let mut left = target.saturating_sub(given);
    let keys: Vec<u64> = (0..sizes.len()).map(|_| rng.random()).collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(keys[a].cmp(&keys[b]))
    });
    while left > 0 {
        let mut progressed = false;
        for &c in &order {
            if left > 0 && quota[c] < cap[c] {
                quota[c] += 1;
                left -= 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    quota
}

#[cfg(test)]
mod tests {
    use super::*;
    use simskip_data::Vocab;

    /// 100 entities: classes 0..4 with 40/30/20/9 members, entity 99 and every 7th-from-3
    /// overwritten as unlabelled.
    fn toy_labels() -> Labels {
        let classes = Vocab::from_names(["a", "b", "c", "d"].map(String::from));
        let mut of: Vec<Option<u32>> = (0..100)
            .map(|e| {
                Some(match e {
                    0..40 => 0,
                    40..70 => 1,
                    70..90 => 2,
                    _ => 3,
                })
            })
            .collect();
        for e in (3..100).step_by(7) {
            of[e] = None;
        }
        of[99] = None;
        Labels { classes, of }
    }

    #[test]
    fn disjoint_covering_sized_and_deterministic() {
        let labels = toy_labels();
        let n = labels.labelled().len();
        let s = label_split(&labels, 7, 0.2, 0.2);
        let mut all: Vec<u32> = s
            .train
            .iter()
            .chain(&s.valid)
            .chain(&s.test)
            .copied()
            .collect();
        all.sort_unstable();
        // covering and disjoint: the union, with repeats, is exactly the labelled set
        assert_eq!(all, labels.labelled());
        assert_eq!(s.test.len(), (n as f64 * 0.2).round() as usize);
        assert_eq!(s.valid.len(), (n as f64 * 0.2).round() as usize);
        // stratified: each class's share of test within one of proportional
        for c in 0..4u32 {
            let n_c = labels.of.iter().filter(|&&l| l == Some(c)).count() as f64;
            let t_c = s
                .test
                .iter()
                .filter(|&&e| labels.of[e as usize] == Some(c))
                .count() as f64;
            assert!(
                (t_c - 0.2 * n_c).abs() < 1.0 + 1e-9,
                "class {c}: {t_c} of {n_c}"
            );
        }
        assert_eq!(s, label_split(&labels, 7, 0.2, 0.2));
        assert_ne!(s, label_split(&labels, 8, 0.2, 0.2));
    }

    #[test]
    fn extreme_fractions() {
        let labels = toy_labels();
        let n = labels.labelled().len();
        let s = label_split(&labels, 1, 0.0, 0.0);
        assert_eq!((s.train.len(), s.valid.len(), s.test.len()), (n, 0, 0));
        let s = label_split(&labels, 1, 0.5, 0.5);
        assert_eq!(s.train.len(), 0);
        assert_eq!(s.valid.len() + s.test.len(), n);
    }

    #[test]
    #[should_panic(expected = "fractions")]
    fn bad_fractions_panic() {
        label_split(&toy_labels(), 1, 0.7, 0.7);
    }
}
