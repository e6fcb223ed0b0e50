//! What mutual TLS costs a whole federation: the default simulation (bundled WordNet-5k, 3
//! organisations as processes on loopback, both stages) run in pairs, once with mutual TLS
//! (the default) and once in plain text, alternating which goes first. Per run: wall time,
//! sum of round durations, and the median FIT round of each stage; per pair the ratio
//! mTLS / plain. Prints the median and range of the ratios.
//!
//! cargo build --release -p simskip --bins
//! cargo run --release -p simskip --example mtls_cost -- [--pairs 3] [--out DIR] [--quick]
//!
//! `--quick` shortens the stages (FedE 6 rounds, SimSkip 3) for a smoke run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use simskip::simulate::{simulate, NodeProgram, SimulateAuth, SimulateFile};
use simskip_fed::rounds::RoundRecord;
use simskip_fed::TaskKind;

struct Run {
    wall: f64,
    rounds_sum: f64,
    fit_median: Vec<(String, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn one(auth: SimulateAuth, out: PathBuf, quick: bool, program: &NodeProgram) -> Result<Run> {
    let mut file = SimulateFile::default();
    file.simulate.out_dir = out.clone();
    file.simulate.auth = auth;
    if quick {
        file.server.server.stages[0].rounds = 6;
        file.server.server.stages[0].eval_every = 3;
        file.server.server.stages[1].rounds = 3;
        file.server.server.stages[1].eval_every = 3;
    }
    let t0 = Instant::now();
    simulate(&file, program).with_context(|| format!("simulation {auth:?}"))?;
    let wall = t0.elapsed().as_secs_f64();
    let records: Vec<RoundRecord> = std::fs::read_to_string(out.join("coordinator/metrics.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let secs = |r: &RoundRecord| r.ended_secs - r.started_secs;
    let mut fit_median = Vec::new();
    for stage in ["fede", "simskip"] {
        let fits: Vec<f64> = records
            .iter()
            .filter(|r| r.stage == stage && r.kind == TaskKind::Fit)
            .map(secs)
            .collect();
        fit_median.push((stage.to_string(), median(fits)));
    }
    Ok(Run {
        wall,
        rounds_sum: records.iter().map(secs).sum(),
        fit_median,
    })
}

fn main() -> Result<()> {
    let mut pairs = 3usize;
    let mut out = std::env::temp_dir().join("simskip-mtls-cost");
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pairs" => pairs = args.next().context("--pairs N")?.parse()?,
            "--out" => out = args.next().context("--out DIR")?.into(),
            "--quick" => quick = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    // The daemons are the release `simskip` next to this example's folder.
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("simskip"))
        .context("locating target/<profile>/simskip")?;
    if !path.is_file() {
        bail!(
            "{} not found: cargo build --release -p simskip --bins",
            path.display()
        );
    }
    let program = NodeProgram { path };
    let mut ratios_wall = Vec::new();
    let mut ratios_rounds = Vec::new();
    let mut ratios_fit: Vec<Vec<f64>> = vec![Vec::new(), Vec::new()];
    println!("pair  mode      wall s  rounds s  fede fit s  simskip fit s");
    for p in 0..pairs {
        let order = if p % 2 == 0 {
            [SimulateAuth::Mtls, SimulateAuth::Insecure]
        } else {
            [SimulateAuth::Insecure, SimulateAuth::Mtls]
        };
        let mut got = Vec::new();
        for auth in order {
            let run = one(auth, out.join(format!("pair{p}-{auth:?}")), quick, &program)?;
            println!(
                "{p:>4}  {:<8} {:>7.1} {:>9.1} {:>11.3} {:>14.3}",
                format!("{auth:?}"),
                run.wall,
                run.rounds_sum,
                run.fit_median[0].1,
                run.fit_median[1].1
            );
            got.push((auth, run));
        }
        let m = &got
            .iter()
            .find(|(a, _)| *a == SimulateAuth::Mtls)
            .unwrap()
            .1;
        let i = &got
            .iter()
            .find(|(a, _)| *a == SimulateAuth::Insecure)
            .unwrap()
            .1;
        ratios_wall.push(m.wall / i.wall);
        ratios_rounds.push(m.rounds_sum / i.rounds_sum);
        for (ratios, (mf, pf)) in ratios_fit
            .iter_mut()
            .zip(m.fit_median.iter().zip(&i.fit_median))
        {
            ratios.push(mf.1 / pf.1);
        }
    }
    let show = |name: &str, v: &[f64]| {
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(f64::MIN, f64::max);
        println!(
            "mTLS / plain, {name}: median {:.3} (range {lo:.3}-{hi:.3}, {} pairs)",
            median(v.to_vec()),
            v.len()
        );
    };
    show("wall time", &ratios_wall);
    show("sum of round durations", &ratios_rounds);
    show("median FedE FIT round", &ratios_fit[0]);
    show("median SimSkip FIT round", &ratios_fit[1]);
    Ok(())
}
