//! Classification figures: accuracy and macro-F1.
//!
//! Convention for macro-F1 (sklearn's default `f1_score(average="macro")` with no `labels=`):
//! the mean is taken over the classes that occur in `truth` OR in `pred`; a class that occurs in
//! neither is left out, since it carries no information about the classifier. The F1 of a class
//! is `2·TP / (2·TP + FP + FN)`, which is 0 whenever it has no true positive (including a class
//! that is only ever predicted, never true, and one that is true but never predicted).

/// Fraction of positions where `pred` equals `truth`; NaN for empty inputs.
///
/// Panics if the lengths differ (a programming error).
pub fn accuracy(pred: &[u32], truth: &[u32]) -> f64 {
    assert_eq!(pred.len(), truth.len(), "accuracy: pred and truth lengths");
    if truth.is_empty() {
        return f64::NAN;
    }
    let hits = pred.iter().zip(truth).filter(|(p, t)| p == t).count();
    hits as f64 / truth.len() as f64
}

/// Macro-averaged F1 over the classes present in `truth` or `pred` (see the module docs);
/// NaN for empty inputs.
///
/// Panics if the lengths differ or a class id is `>= num_classes` (programming errors).
pub fn macro_f1(pred: &[u32], truth: &[u32], num_classes: usize) -> f64 {
    assert_eq!(pred.len(), truth.len(), "macro_f1: pred and truth lengths");
    if truth.is_empty() {
        return f64::NAN;
    }
    let mut tp = vec![0u64; num_classes];
    let mut fp = vec![0u64; num_classes];
    let mut fn_ = vec![0u64; num_classes];
    for (&p, &t) in pred.iter().zip(truth) {
        assert!(
            (p as usize) < num_classes && (t as usize) < num_classes,
            "macro_f1: class id out of range (pred {p}, truth {t}, num_classes {num_classes})"
        );
        if p == t {
            tp[p as usize] += 1;
        } else {
            fp[p as usize] += 1;
            fn_[t as usize] += 1;
        }
    }
    let mut sum = 0.0;
    let mut present = 0usize;
    for c in 0..num_classes {
        let denom = 2 * tp[c] + fp[c] + fn_[c];
        if denom == 0 {
            continue; // neither true nor predicted anywhere
        }
        present += 1;
        sum += 2.0 * tp[c] as f64 / denom as f64;
    }
    sum / present as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_example() {
        // idx:    0  1  2  3  4  5  6
        let truth = [0, 0, 0, 1, 1, 2, 2];
        let pred = [0, 0, 1, 1, 3, 2, 2];
        // class 0: TP 2 (0,1), FP 0, FN 1 (2)      -> F1 = 4/(4+0+1) = 0.8
        // class 1: TP 1 (3),   FP 1 (2), FN 1 (4)  -> F1 = 2/(2+1+1) = 0.5
        // class 2: TP 2 (5,6), FP 0, FN 0          -> F1 = 4/4       = 1.0
        // class 3: TP 0,       FP 1 (4), FN 0      -> F1 = 0         (only predicted)
        // class 4: in neither truth nor pred       -> left out
        // macro = (0.8 + 0.5 + 1.0 + 0.0) / 4 = 0.575; accuracy = 5/7
        assert!((accuracy(&pred, &truth) - 5.0 / 7.0).abs() < 1e-12);
        assert!((macro_f1(&pred, &truth, 5) - 0.575).abs() < 1e-12);
    }

    #[test]
    fn perfect_and_all_wrong() {
        let truth = [3, 1, 1, 0];
        assert_eq!(accuracy(&truth, &truth), 1.0);
        assert_eq!(macro_f1(&truth, &truth, 4), 1.0);
        let wrong = [1, 0, 0, 3];
        assert_eq!(accuracy(&wrong, &truth), 0.0);
        assert_eq!(macro_f1(&wrong, &truth, 4), 0.0);
    }

    #[test]
    fn empty_is_nan() {
        assert!(accuracy(&[], &[]).is_nan());
        assert!(macro_f1(&[], &[], 3).is_nan());
    }

    #[test]
    #[should_panic(expected = "lengths")]
    fn length_mismatch_panics() {
        accuracy(&[0, 1], &[0]);
    }
}
