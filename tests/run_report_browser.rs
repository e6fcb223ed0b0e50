//! The HTML run report as a person sees it: a tiny federation's coordinator folder turned into
//! a page by `simskip report`, loaded in headless Chromium, and every chart found in the DOM
//! the browser built (an inline SVG with its title and drawn marks). Skips, saying why, where
//! Chromium is not installed (the Debian package `chromium`; scripts/test.sh installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new(name)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if found {
            return Some(PathBuf::from(name));
        }
    }
    None
}

/// The DOM Chromium builds from `page`, serialised.
fn dump_dom(browser: &Path, page: &Path, profile: &Path) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// (title, number of drawn marks) of every inline SVG in `dom`.
fn charts(dom: &str) -> Vec<(String, usize)> {
    dom.split("<svg")
        .skip(1)
        .map(|rest| {
            let svg = &rest[..rest.find("</svg>").expect("closed svg")];
            let title = svg
                .split_once("<title>")
                .and_then(|(_, t)| t.split_once("</title>"))
                .map(|(t, _)| t.replace("&amp;", "&").replace("&#39;", "'"))
                .unwrap_or_default();
            let marks = svg.matches("<polyline").count() + svg.matches("<rect").count();
            (title, marks)
        })
        .collect()
}

#[test]
fn report_page_shows_every_chart_in_a_browser() {
    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED run_report_browser: chromium is not installed (apt-get install chromium)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-simulate.toml");
    let simskip = env!("CARGO_BIN_EXE_simskip");
    let run = Command::new(simskip)
        .current_dir(tmp.path())
        .arg("simulate")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // `simskip report` on the coordinator folder alone, the organisations named explicitly.
    let out = tmp.path().join("run");
    let page = tmp.path().join("page.html");
    let mut report = Command::new(simskip);
    report
        .current_dir(tmp.path())
        .arg("report")
        .arg(out.join("coordinator"))
        .arg("--out")
        .arg(&page);
    for k in 0..3 {
        report.arg("--org").arg(format!(
            "org-{k}={}",
            out.join(format!("org-{k}-output")).display()
        ));
    }
    let status = report.status().unwrap();
    assert!(status.success());

    let profile = tmp.path().join("chromium-profile");
    std::fs::create_dir(&profile).unwrap();
    let dom = dump_dom(&browser, &page, &profile);
    let found = charts(&dom);
    let titles: Vec<&str> = found.iter().map(|(t, _)| t.as_str()).collect();
    for expected in [
        "FedE test MRR per round",
        "FedE test Hits@10 per round",
        "SimSkip training loss per round",
        "KNN@10: input vs refined",
        "probe accuracy: input vs refined",
        "probe macro-F1: input vs refined",
        "link prediction MRR: input vs refined",
        "Gate: validation score of input and refined table",
        "Round durations",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(expected)),
            "no chart {expected:?} in the page; charts: {titles:?}"
        );
    }
    for (title, marks) in &found {
        assert!(*marks > 0, "chart {title:?} draws nothing");
    }
    // The gate table names each organisation's decision.
    for k in 0..3 {
        assert!(dom.contains(&format!("org-{k}")), "org-{k} in the page");
    }
}
