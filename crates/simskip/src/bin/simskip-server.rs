//! `simskip-server`: the federation coordinator.
use clap::Parser;

fn main() -> std::process::ExitCode {
    simskip::logging::init();
    let args = simskip::node::ServerArgs::parse();
    match simskip::node::run_server(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
