//! The HTML report of a federated run, for a person to look at: one self-contained page
//! (charts as inline SVG drawn with plotters, no script, no external file) built from the
//! coordinator's `metrics.jsonl` and the organisations' gate decisions (`<stage>/gate.json`).
//!
//! Charts: FedE test MRR and Hits@10 per round (each organisation and the example-weighted
//! aggregate), SimSkip training loss per round, input-versus-refined bars per task and
//! organisation at the last evaluation, the gate's validation scores, and round durations.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use plotters::prelude::*;
use serde::Deserialize;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A coordinator output folder (with metrics.jsonl), or a `simskip simulate` output folder.
    pub run_dir: PathBuf,
    /// An organisation's output folder, as NAME=DIR, for its gate decision (DIR/<stage>/gate.json).
    /// Repeatable. The organisations of a simulate folder are found without it.
    #[arg(long = "org", value_name = "NAME=DIR")]
    pub orgs: Vec<String>,
    /// Where to write the page [default: report.html in RUN_DIR].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a round record: {source}")]
    Record {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{path}: not a gate decision: {source}")]
    Gate {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("--org {0:?}: expected NAME=DIR")]
    OrgArg(String),
    #[error("{0}: no metrics.jsonl in it, nor in its coordinator/ folder")]
    NoMetrics(PathBuf),
    #[error("drawing chart {title:?}: {message}")]
    Chart { title: String, message: String },
    #[error(transparent)]
    Write(#[from] simskip_data::DataError),
}

pub type Result<T, E = ReportError> = std::result::Result<T, E>;

/// One organisation's answer in a round (the fields of `simskip_fed::ClientRecord` the report
/// uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientRound {
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// One line of `metrics.jsonl` (a serialised `simskip_fed::RoundRecord`; fields the report
/// does not use are ignored, so the format may grow).
#[derive(Debug, Clone, Deserialize)]
pub struct RoundLine {
    #[serde(default)]
    pub run_id: String,
    pub stage: String,
    /// "fede" or "fedavg".
    pub stage_kind: String,
    pub round: u32,
    /// "fit", "evaluate" or "finish_stage".
    pub kind: String,
    #[serde(default)]
    pub clients: BTreeMap<String, ClientRound>,
    #[serde(default)]
    pub failures: BTreeMap<String, String>,
    #[serde(default)]
    pub missing: Vec<String>,
    #[serde(default)]
    pub aggregated: bool,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub timed_out: bool,
    pub started_secs: f64,
    pub ended_secs: f64,
}

impl RoundLine {
    pub fn seconds(&self) -> f64 {
        (self.ended_secs - self.started_secs).max(0.0)
    }
}

/// An organisation's gate decision (`gate.json`, written by the client after the last
/// federated SimSkip round).
#[derive(Debug, Clone, Deserialize)]
pub struct GateDecision {
    pub signal: serde_json::Value,
    /// Validation score of the input table.
    pub input: f64,
    /// Validation score of the refined table.
    pub refined: f64,
    /// Whether the gate was on.
    pub gate: bool,
    /// "refined" or "input": the table the organisation kept.
    pub output: String,
}

/// Read `metrics.jsonl`.
pub fn read_rounds(path: &Path) -> Result<Vec<RoundLine>> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| ReportError::Record {
                path: path.to_owned(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// The gate decisions found in an organisation's output folder, by stage.
pub fn read_gates(org_dir: &Path) -> Result<BTreeMap<String, GateDecision>> {
    let mut gates = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(org_dir) else {
        return Ok(gates);
    };
    for entry in entries.flatten() {
        let path = entry.path().join("gate.json");
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Read {
            path: path.clone(),
            source,
        })?;
        let gate = serde_json::from_str(&text).map_err(|source| ReportError::Gate {
            path: path.clone(),
            source,
        })?;
        gates.insert(entry.file_name().to_string_lossy().into_owned(), gate);
    }
    Ok(gates)
}

/// What the page is drawn from.
#[derive(Debug, Clone, Default)]
pub struct RunData {
    pub rounds: Vec<RoundLine>,
    /// organisation -> stage -> decision.
    pub gates: BTreeMap<String, BTreeMap<String, GateDecision>>,
    /// Shown in the page's heading.
    pub source: String,
}

/// The coordinator folder of `dir` (itself, or a simulate folder's `coordinator/`), and the
/// organisation folders a simulate folder holds (`org-K-output`).
fn locate(dir: &Path) -> Result<(PathBuf, Vec<(String, PathBuf)>)> {
    if dir.join("metrics.jsonl").is_file() {
        return Ok((dir.to_owned(), Vec::new()));
    }
    let coordinator = dir.join("coordinator");
    if !coordinator.join("metrics.jsonl").is_file() {
        return Err(ReportError::NoMetrics(dir.to_owned()));
    }
    let mut orgs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(org) = name.strip_suffix("-output") {
                if entry.path().is_dir() {
                    orgs.push((org.to_owned(), entry.path()));
                }
            }
        }
    }
    orgs.sort();
    Ok((coordinator, orgs))
}

/// Read a run: `dir` as for `simskip report`, plus organisation folders named explicitly.
pub fn load(dir: &Path, orgs: &[(String, PathBuf)]) -> Result<RunData> {
    let (coordinator, found) = locate(dir)?;
    let rounds = read_rounds(&coordinator.join("metrics.jsonl"))?;
    let mut gates = BTreeMap::new();
    for (name, org_dir) in found.iter().chain(orgs) {
        let g = read_gates(org_dir)?;
        if !g.is_empty() {
            gates.insert(name.clone(), g);
        }
    }
    Ok(RunData {
        rounds,
        gates,
        source: dir.display().to_string(),
    })
}

fn parse_org(arg: &str) -> Result<(String, PathBuf)> {
    match arg.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(dir)))
        }
        _ => Err(ReportError::OrgArg(arg.to_owned())),
    }
}

/// `simskip report`.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let orgs = args
        .orgs
        .iter()
        .map(|a| parse_org(a))
        .collect::<Result<Vec<_>>>()?;
    let data = load(&args.run_dir, &orgs)?;
    let out = args.out.unwrap_or_else(|| args.run_dir.join("report.html"));
    write_page(&out, &data)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The report of a `simskip simulate` output folder, written as `report.html` in it.
pub fn write_for_simulation(out_dir: &Path) -> Result<PathBuf> {
    let data = load(out_dir, &[])?;
    let page = out_dir.join("report.html");
    write_page(&page, &data)?;
    Ok(page)
}

fn write_page(path: &Path, data: &RunData) -> Result<()> {
    let html = render_html(data)?;
    Ok(simskip_data::fsutil::write_atomic(path, html.as_bytes())?)
}

/// A line of a line chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    /// The aggregate is drawn thicker and black.
    emphasised: bool,
}

/// A group of bars (one per series) at one x position.
struct BarGroup {
    label: String,
    values: Vec<Option<f64>>,
}

// Two charts side by side on a laptop screen.
const WIDTH: u32 = 620;
const HEIGHT: u32 = 340;
const LABEL_FONT: (&str, u32) = ("sans-serif", 13);
const CAPTION_FONT: (&str, u32) = ("sans-serif", 19);

/// Rounds and record numbers are whole: label only the whole ticks.
fn whole(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[i % COLORS.len()]
}

fn chart_error(title: &str) -> impl Fn(String) -> ReportError + '_ {
    move |message| ReportError::Chart {
        title: title.to_owned(),
        message,
    }
}

/// `[lo, hi]` of the values, padded, never empty.
fn value_range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.08;
    (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

/// Put `title` into the SVG as its accessible name, so the chart is findable in the page.
fn titled(svg: String, title: &str) -> String {
    match svg.find('>') {
        Some(end) if svg.starts_with("<svg") => format!(
            "{} role=\"img\" aria-label=\"{}\"><title>{}</title>{}",
            &svg[..end],
            escape(title),
            escape(title),
            &svg[end + 1..]
        ),
        _ => svg,
    }
}

/// `y_decimals`: digits after the point on the y axis (scores 3, seconds 1).
fn line_chart(
    title: &str,
    x_desc: &str,
    (y_desc, y_decimals): (&str, usize),
    series: &[Series],
) -> Result<Chart> {
    let err = chart_error(title);
    // The aggregate in black, the organisations in palette order.
    let mut next = 0;
    let colors: Vec<RGBColor> = series
        .iter()
        .map(|s| {
            if s.emphasised {
                BLACK
            } else {
                next += 1;
                color(next - 1)
            }
        })
        .collect();
    let all = series.iter().flat_map(|s| s.points.iter());
    let (x_lo, x_hi) = value_range(all.clone().map(|p| p.0), false);
    let (y_lo, y_hi) = value_range(all.map(|p| p.1), false);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, CAPTION_FONT)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style(LABEL_FONT)
            .axis_desc_style(LABEL_FONT)
            .x_label_formatter(&whole)
            .y_label_formatter(&|y| format!("{y:.y_decimals$}"))
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (s, c) in series.iter().zip(&colors) {
            let style = c.stroke_width(if s.emphasised { 3 } else { 2 });
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(|e| err(e.to_string()))?;
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|&p| Circle::new(p, 3, style.color.filled())),
                )
                .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(Chart {
        title: title.to_owned(),
        svg: titled(svg, title),
        legend: series.iter().map(|s| s.name.clone()).zip(colors).collect(),
    })
}

fn bar_chart(
    title: &str,
    y_desc: &str,
    series_names: &[&str],
    groups: &[BarGroup],
) -> Result<Chart> {
    let err = chart_error(title);
    let n = groups.len().max(1);
    let (y_lo, y_hi) = value_range(
        groups
            .iter()
            .flat_map(|g| g.values.iter().flatten().copied()),
        true,
    );
    let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, CAPTION_FONT)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), y_lo..y_hi)
            .map_err(|e| err(e.to_string()))?;
        // Over a range n wide, n labels fall on the integers: the groups' centres.
        let label_of = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&label_of)
            .y_desc(y_desc)
            .label_style(LABEL_FONT)
            .axis_desc_style(LABEL_FONT)
            .y_label_formatter(&|y| format!("{y:.3}"))
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let k = series_names.len().max(1) as f64;
        let width = 0.8 / k;
        for s in 0..series_names.len() {
            let fill = color(s).filled();
            let bars = groups.iter().enumerate().filter_map(|(i, g)| {
                let v = (*g.values.get(s)?)?;
                let x0 = i as f64 - 0.4 + s as f64 * width;
                Some(Rectangle::new(
                    [(x0 + 0.01, y_lo.max(0.0).min(v)), (x0 + width - 0.01, v)],
                    fill,
                ))
            });
            chart.draw_series(bars).map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(Chart {
        title: title.to_owned(),
        svg: titled(svg, title),
        legend: series_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), color(i)))
            .collect(),
    })
}

/// The FedAvg-stage tasks compared input against refined, with their display names.
pub const TASKS: [(&str, &str); 4] = [
    ("knn_at_10", "KNN@10"),
    ("probe_accuracy", "probe accuracy"),
    ("probe_macro_f1", "probe macro-F1"),
    ("lp_mrr", "link prediction MRR"),
];

/// Per-round series of `key` in the evaluations of `stage_kind`: one per organisation, then
/// the aggregate.
fn eval_series(rounds: &[RoundLine], stage_kind: &str, kind: &str, key: &str) -> Vec<Series> {
    let picked: Vec<&RoundLine> = rounds
        .iter()
        .filter(|r| r.stage_kind == stage_kind && r.kind == kind)
        .collect();
    let mut per_org: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut aggregate = Vec::new();
    for r in &picked {
        for (org, c) in &r.clients {
            if let Some(&v) = c.metrics.get(key) {
                per_org
                    .entry(org.as_str())
                    .or_default()
                    .push((r.round as f64, v));
            }
        }
        if let Some(&v) = r.metrics.get(key) {
            aggregate.push((r.round as f64, v));
        }
    }
    let mut series: Vec<Series> = per_org
        .into_iter()
        .map(|(org, points)| Series {
            name: org.to_owned(),
            points,
            emphasised: false,
        })
        .collect();
    if !aggregate.is_empty() {
        series.push(Series {
            name: "aggregate (example-weighted)".into(),
            points: aggregate,
            emphasised: true,
        });
    }
    series
}

/// A chart for the page: its title, SVG, and legend (drawn in HTML under the chart, so it
/// never hides a line or a bar).
pub struct Chart {
    pub title: String,
    pub svg: String,
    pub legend: Vec<(String, RGBColor)>,
}

/// Every chart the data allows, in page order.
pub fn charts(data: &RunData) -> Result<Vec<Chart>> {
    let mut out = Vec::new();
    for (key, name) in [("test.mrr", "MRR"), ("test.hits_at_10", "Hits@10")] {
        let series = eval_series(&data.rounds, "fede", "evaluate", key);
        if !series.is_empty() {
            let title = format!("FedE test {name} per round");
            out.push(line_chart(&title, "round", (name, 3), &series)?);
        }
    }
    let loss = eval_series(&data.rounds, "fedavg", "fit", "loss");
    if !loss.is_empty() {
        out.push(line_chart(
            "SimSkip training loss per round",
            "round",
            ("NT-Xent loss", 3),
            &loss,
        )?);
    }
    if let Some(last) = data
        .rounds
        .iter()
        .rev()
        .find(|r| r.stage_kind == "fedavg" && r.kind == "evaluate")
    {
        for (task, name) in TASKS {
            let (input, refined) = (format!("input.{task}"), format!("refined.{task}"));
            let mut groups: Vec<BarGroup> = last
                .clients
                .iter()
                .map(|(org, c)| BarGroup {
                    label: org.clone(),
                    values: vec![
                        c.metrics.get(&input).copied(),
                        c.metrics.get(&refined).copied(),
                    ],
                })
                .collect();
            groups.push(BarGroup {
                label: "aggregate".into(),
                values: vec![
                    last.metrics.get(&input).copied(),
                    last.metrics.get(&refined).copied(),
                ],
            });
            if groups.iter().all(|g| g.values.iter().all(Option::is_none)) {
                continue;
            }
            let title = format!(
                "{name}: input vs refined ('{}' round {})",
                last.stage, last.round
            );
            out.push(bar_chart(&title, name, &["input", "refined"], &groups)?);
        }
    }
    let gate_groups: Vec<BarGroup> = data
        .gates
        .iter()
        .flat_map(|(org, by_stage)| {
            by_stage.iter().map(move |(stage, g)| BarGroup {
                label: if by_stage.len() > 1 {
                    format!("{org} {stage}: kept {}", g.output)
                } else {
                    format!("{org}: kept {}", g.output)
                },
                values: vec![Some(g.input), Some(g.refined)],
            })
        })
        .collect();
    if !gate_groups.is_empty() {
        out.push(bar_chart(
            "Gate: validation score of input and refined table",
            "validation score",
            &["input", "refined"],
            &gate_groups,
        )?);
    }
    if !data.rounds.is_empty() {
        let mut by_kind: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (i, r) in data.rounds.iter().enumerate() {
            by_kind
                .entry(format!("{} {}", r.stage, r.kind))
                .or_default()
                .push(((i + 1) as f64, r.seconds()));
        }
        let series: Vec<Series> = by_kind
            .into_iter()
            .map(|(name, points)| Series {
                name,
                points,
                emphasised: false,
            })
            .collect();
        out.push(line_chart(
            "Round durations",
            "round record (in order)",
            ("seconds", 1),
            &series,
        )?);
    }
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt(v: Option<&f64>) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.4}"))
}

/// The whole page.
pub fn render_html(data: &RunData) -> Result<String> {
    let charts = charts(data)?;
    let run_id = data.rounds.first().map(|r| r.run_id.as_str()).unwrap_or("");
    let total: f64 = data.rounds.last().map_or(0.0, |r| r.ended_secs);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>SimSkip run report {run}</title>\n<style>\
         body{{font-family:sans-serif;margin:24px;color:#222;max-width:1500px}}\
         h1{{font-size:22px}} h2{{font-size:18px;margin-top:28px}}\
         .charts{{display:flex;flex-wrap:wrap;gap:16px}}\
         figure{{margin:0;border:1px solid #ddd;padding:4px}}\
         table{{border-collapse:collapse;font-size:14px}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}\
         .muted{{color:#666}}\
         figcaption{{font-size:13px;padding:2px 8px 6px}}\
         .key{{margin-right:14px;white-space:nowrap}}\
         .key i{{display:inline-block;width:14px;height:10px;margin-right:5px}}</style></head><body>\n\
         <h1>SimSkip federation run {run}</h1>\n\
         <p class=\"muted\">From {src}: {n} round records, {total:.1} s of coordinator time.</p>\n",
        run = escape(run_id),
        src = escape(&data.source),
        n = data.rounds.len(),
    );

    // The last evaluation of each stage, as numbers.
    let mut stages: Vec<&str> = Vec::new();
    for r in &data.rounds {
        if !stages.contains(&r.stage.as_str()) {
            stages.push(&r.stage);
        }
    }
    for stage in stages {
        let Some(last) = data
            .rounds
            .iter()
            .rev()
            .find(|r| r.stage == stage && r.kind == "evaluate")
        else {
            continue;
        };
        let _ = write!(
            h,
            "<h2>Stage '{}' ({}): evaluation after round {}</h2>\n<table><tr><th>organisation</th>",
            escape(stage),
            escape(&last.stage_kind),
            last.round
        );
        let rows: Vec<(&str, &BTreeMap<String, f64>)> = last
            .clients
            .iter()
            .map(|(o, c)| (o.as_str(), &c.metrics))
            .chain([("aggregate", &last.metrics)])
            .collect();
        if last.stage_kind == "fedavg" {
            h.push_str("<th>table</th>");
            for (_, name) in TASKS {
                let _ = write!(h, "<th>{}</th>", escape(name));
            }
            h.push_str("</tr>\n");
            for (org, m) in rows {
                for table in ["input", "refined"] {
                    let _ = write!(h, "<tr><td>{}</td><td>{table}</td>", escape(org));
                    for (task, _) in TASKS {
                        let _ = write!(h, "<td>{}</td>", fmt(m.get(&format!("{table}.{task}"))));
                    }
                    h.push_str("</tr>\n");
                }
            }
        } else {
            let keys = [
                ("valid.mrr", "valid MRR"),
                ("test.mrr", "test MRR"),
                ("test.hits_at_1", "test Hits@1"),
                ("test.hits_at_10", "test Hits@10"),
            ];
            for (_, name) in keys {
                let _ = write!(h, "<th>{name}</th>");
            }
            h.push_str("</tr>\n");
            for (org, m) in rows {
                let _ = write!(h, "<tr><td>{}</td>", escape(org));
                for (key, _) in keys {
                    let _ = write!(h, "<td>{}</td>", fmt(m.get(key)));
                }
                h.push_str("</tr>\n");
            }
        }
        h.push_str("</table>\n");
    }

    if !data.gates.is_empty() {
        h.push_str(
            "<h2>Gate decisions</h2>\n<table><tr><th>organisation</th><th>stage</th>\
             <th>signal</th><th>input</th><th>refined</th><th>gate on</th><th>kept</th></tr>\n",
        );
        for (org, by_stage) in &data.gates {
            for (stage, g) in by_stage {
                let signal = match &g.signal {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td>\
                     <td>{}</td><td>{}</td></tr>",
                    escape(org),
                    escape(stage),
                    escape(&signal),
                    g.input,
                    g.refined,
                    if g.gate { "yes" } else { "no" },
                    escape(&g.output)
                );
            }
        }
        h.push_str("</table>\n");
    }

    let failed: Vec<&RoundLine> = data
        .rounds
        .iter()
        .filter(|r| !r.failures.is_empty() || !r.missing.is_empty() || r.timed_out)
        .collect();
    if !failed.is_empty() {
        h.push_str("<h2>Rounds with failed or missing clients</h2>\n<ul>\n");
        for r in failed {
            let _ = writeln!(
                h,
                "<li>{} {} round {}: missing [{}], failed [{}]{}</li>",
                escape(&r.stage),
                escape(&r.kind),
                r.round,
                escape(&r.missing.join(", ")),
                escape(
                    &r.failures
                        .iter()
                        .map(|(c, e)| format!("{c}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                if r.timed_out { " (timed out)" } else { "" }
            );
        }
        h.push_str("</ul>\n");
    }

    h.push_str("<h2>Charts</h2>\n<div class=\"charts\">\n");
    for c in &charts {
        let _ = write!(
            h,
            "<figure data-chart=\"{}\">{}<figcaption>",
            escape(&c.title),
            c.svg
        );
        for (name, RGBColor(r, g, b)) in &c.legend {
            let _ = write!(
                h,
                "<span class=\"key\"><i style=\"background:rgb({r},{g},{b})\"></i>{}</span>",
                escape(name)
            );
        }
        h.push_str("</figcaption></figure>\n");
    }
    h.push_str("</div>\n</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stage: &str, kind: &str, task: &str, round: u32, value: f64) -> String {
        let metrics = |v: f64| match (kind, task) {
            ("fede", "evaluate") => {
                serde_json::json!({ "test.mrr": v, "test.hits_at_10": 2.0 * v })
            }
            ("fedavg", "fit") => serde_json::json!({ "loss": 6.0 - v }),
            _ => serde_json::json!({ "input.knn_at_10": v, "refined.knn_at_10": v + 0.01 }),
        };
        serde_json::json!({
            "run_id": "run-test", "stage_index": 0, "stage": stage, "stage_kind": kind,
            "round": round, "kind": task, "selected": ["org-a", "org-b"], "num_clients": 2,
            "clients": {
                "org-a": { "num_examples": 10, "metrics": metrics(value) },
                "org-b": { "num_examples": 30, "metrics": metrics(value / 2.0) },
            },
            "failures": {}, "missing": [], "aggregated": true, "note": null,
            "metrics": metrics(0.6 * value), "timed_out": false,
            "started_secs": round as f64, "ended_secs": round as f64 + 0.5,
            "coordinator": { "serialize_secs": 0.0, "aggregate_secs": 0.0, "total_secs": 0.0 },
        })
        .to_string()
    }

    #[test]
    fn page_has_a_chart_per_figure_and_a_row_per_decision() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            record("fede", "fede", "fit", 1, 0.0),
            record("fede", "fede", "evaluate", 1, 0.1),
            record("fede", "fede", "evaluate", 2, 0.2),
            record("simskip", "fedavg", "fit", 1, 0.1),
            record("simskip", "fedavg", "fit", 2, 0.3),
            record("simskip", "fedavg", "evaluate", 2, 0.4),
        ];
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let org = dir.path().join("org-a-out");
        std::fs::create_dir_all(org.join("simskip")).unwrap();
        std::fs::write(
            org.join("simskip/gate.json"),
            r#"{"signal":"validation KNN@10","input":0.3,"refined":0.35,"gate":true,"output":"refined"}"#,
        )
        .unwrap();
        let data = load(dir.path(), &[("org-a".into(), org)]).unwrap();
        assert_eq!(data.rounds.len(), 6);
        let titles: Vec<String> = charts(&data)
            .unwrap()
            .into_iter()
            .map(|c| c.title)
            .collect();
        assert_eq!(
            titles,
            [
                "FedE test MRR per round",
                "FedE test Hits@10 per round",
                "SimSkip training loss per round",
                "KNN@10: input vs refined ('simskip' round 2)",
                "Gate: validation score of input and refined table",
                "Round durations",
            ]
        );
        let page = render_html(&data).unwrap();
        assert_eq!(page.matches("<svg").count(), 6);
        assert!(page.contains("<td>org-a</td><td>simskip</td><td>validation KNN@10</td>"));
    }

    #[test]
    fn a_malformed_record_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            format!("{}\nnot json\n", record("f", "fede", "fit", 1, 0.1)),
        )
        .unwrap();
        match read_rounds(&path) {
            Err(ReportError::Record { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            load(&dir.path().join("nothing"), &[]),
            Err(ReportError::NoMetrics(_))
        ));
        assert!(matches!(parse_org("org-a"), Err(ReportError::OrgArg(_))));
    }
}
