//! The figures of one embedding table on the downstream tasks, and their rendering.

use serde::{Deserialize, Serialize};

/// One table's downstream figures; `None` when a task was not run (e.g. no labels, or link
/// prediction not wired in).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct TaskFigures {
    pub knn_at_10: Option<f64>,
    pub probe_accuracy: Option<f64>,
    pub probe_macro_f1: Option<f64>,
    pub lp_mrr: Option<f64>,
    pub lp_hits_at_10: Option<f64>,
}

/// The input table's figures next to the refined table's.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    pub input: TaskFigures,
    pub refined: TaskFigures,
}

impl Comparison {
    /// The two rows as a table, named "input" and "refined".
    pub fn render(&self) -> String {
        render_table(&[
            ("input".to_owned(), &self.input),
            ("refined".to_owned(), &self.refined),
        ])
    }
}

const HEADERS: [&str; 6] = [
    "name",
    "KNN@10",
    "probe acc",
    "probe F1",
    "LP MRR",
    "LP H@10",
];

/// An aligned plain-text table: a header line, a rule, one line per row. The name column is
/// left-aligned, the figures right-aligned with 4 decimals, `-` where a figure is `None`.
/// Columns are separated by two spaces; lines end with `\n` and carry no trailing spaces.
pub fn render_table(rows: &[(String, &TaskFigures)]) -> String {
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|(name, f)| {
            let v = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.4}"));
            [
                name.clone(),
                v(f.knn_at_10),
                v(f.probe_accuracy),
                v(f.probe_macro_f1),
                v(f.lp_mrr),
                v(f.lp_hits_at_10),
            ]
        })
        .collect();
    let mut width = HEADERS.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| -> String {
        let mut s = String::new();
        for (i, (c, &w)) in row.iter().zip(&width).enumerate() {
            let pad = w - c.chars().count();
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str("  ");
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        let mut s = s.trim_end().to_owned();
        s.push('\n');
        s
    };
    let mut out = line(&HEADERS.map(String::from));
    let total: usize = width.iter().sum::<usize>() + 2 * (width.len() - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_with_dashes() {
        let a = TaskFigures {
            knn_at_10: Some(0.41234),
            probe_accuracy: Some(0.5),
            probe_macro_f1: None,
            lp_mrr: Some(0.123456),
            lp_hits_at_10: None,
        };
        let b = TaskFigures {
            knn_at_10: Some(0.6),
            ..TaskFigures::default()
        };
        let s = render_table(&[("input".into(), &a), ("refined table".into(), &b)]);
        let expected = "\
name           KNN@10  probe acc  probe F1  LP MRR  LP H@10
-----------------------------------------------------------
input          0.4123     0.5000         -  0.1235        -
refined table  0.6000          -         -       -        -
";
        assert_eq!(s, expected, "\n{s}");
    }

    #[test]
    fn serde_round_trip() {
        let c = Comparison {
            input: TaskFigures {
                knn_at_10: Some(0.25),
                ..TaskFigures::default()
            },
            refined: TaskFigures {
                probe_accuracy: Some(0.75),
                lp_hits_at_10: Some(0.5),
                ..TaskFigures::default()
            },
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"lp_mrr\":null"));
        let back: Comparison = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        assert!(c.render().starts_with("name"));
    }
}
