//! `simskip`: train TransE, refine with SimSkip, evaluate, partition, benchmark, simulate.
use clap::Parser;

fn main() -> std::process::ExitCode {
    simskip::logging::init();
    let cli = simskip::cli::Cli::parse();
    match simskip::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
