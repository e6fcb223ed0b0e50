//! `simskip-client`: an organisation's daemon; trains on private data, shares only weights.
use clap::Parser;

fn main() -> std::process::ExitCode {
    simskip::logging::init();
    let args = simskip::node::ClientArgs::parse();
    match simskip::node::run_client(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
