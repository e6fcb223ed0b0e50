//! `simskip simulate` as a user runs it: from any folder (the bundled graph and the daemons
//! come with the binary), with its own environment kept to itself, never clearing a folder it
//! did not make, and failing at once, with the coordinator's own message, on a configuration
//! the coordinator rejects.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use simskip::node::RunFigures;
use simskip::simulate::RUN_MARKER;

fn tiny_config() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-simulate.toml");
    std::fs::read_to_string(path).unwrap()
}

/// `simskip ARGS` run in `cwd`.
fn simskip(cwd: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_simskip"));
    command.current_dir(cwd).args(args);
    command
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(listing(&path));
        }
        all.push(path);
    }
    all.sort();
    all
}

#[test]
fn simulate_runs_from_any_folder_and_keeps_its_environment_to_itself() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tiny.toml"), tiny_config()).unwrap();
    // The file asks for 3 organisations; the variable configures the simulation to 2. Passed
    // on to a daemon, it would be refused there as an unknown `simulate` section.
    let out = simskip(tmp.path(), &["simulate", "tiny.toml"])
        .env("SIMSKIP_SIMULATE__CLIENTS", "2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let run = tmp.path().join("run");
    assert!(run.join(RUN_MARKER).is_file(), "the run folder is marked");
    let figures = RunFigures::read(&run.join("coordinator")).unwrap();
    for stage in ["fede", "simskip"] {
        let clients: Vec<&String> = figures.stages[stage].clients.keys().collect();
        assert_eq!(clients, ["org-0", "org-1"], "stage {stage}");
    }
    for k in 0..2 {
        let org = run.join(format!("org-{k}-output"));
        assert!(org.join("fede/entities.npy").is_file(), "org-{k} stage 1");
        assert!(
            org.join("simskip/entities.npy").is_file(),
            "org-{k} stage 2"
        );
        assert!(org.join("simskip/gate.json").is_file(), "org-{k} gate");
    }
    assert!(!run.join("org-2-output").exists());
    let page = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(page.contains("<svg"), "the report has charts");
}

#[test]
fn out_refuses_a_foreign_folder_and_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tiny.toml"), tiny_config()).unwrap();
    let foreign = tmp.path().join("photos");
    std::fs::create_dir_all(foreign.join("2024")).unwrap();
    std::fs::write(foreign.join("2024/beach.jpg"), "jpeg").unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let before = listing(&foreign);

    let out = simskip(tmp.path(), &["simulate", "tiny.toml", "--out", "photos"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("photos") && stderr.contains(RUN_MARKER),
        "{stderr}"
    );
    assert_eq!(listing(&foreign), before, "nothing added or removed");
    assert_eq!(
        std::fs::read_to_string(foreign.join("2024/beach.jpg")).unwrap(),
        "jpeg"
    );
}

#[test]
fn a_configuration_the_coordinator_rejects_fails_at_once_with_its_message() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config().replace("dim = 16", "dim = 0");
    assert!(config.contains("dim = 0"));
    std::fs::write(tmp.path().join("dim0.toml"), &config).unwrap();

    // The coordinator's own verdict on this model.
    std::fs::write(
        tmp.path().join("server.toml"),
        "[[server.stages]]\nname = \"fede\"\nkind = \"fede\"\nrounds = 1\ndim = 0\n",
    )
    .unwrap();
    let server = simskip(
        tmp.path(),
        &[
            "server",
            "--config",
            "server.toml",
            "--listen",
            "127.0.0.1:0",
        ],
    )
    .output()
    .unwrap();
    assert!(!server.status.success(), "{}", text(&server));
    let server_stderr = String::from_utf8_lossy(&server.stderr);
    let verdict = server_stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or_else(|| panic!("no error line: {server_stderr}"))
        .trim()
        .to_owned();

    // A previous run in the output folder: a failed configuration must not clear it.
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("coordinator")).unwrap();
    std::fs::write(run.join(RUN_MARKER), "").unwrap();
    std::fs::write(run.join("coordinator/metrics.jsonl"), "{}\n").unwrap();
    let before = listing(&run);

    let out = simskip(tmp.path(), &["simulate", "dim0.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The verdict without the key path, which differs by the simulation file's nesting.
    let tail = verdict.rsplit(": ").next().unwrap();
    let tail = tail.split(" for key").next().unwrap();
    assert!(
        stderr.contains("dim = 0") && stderr.contains(tail),
        "the coordinator's message {verdict:?} is reported:\n{stderr}"
    );
    assert_eq!(listing(&run), before, "the previous run is untouched");
}
