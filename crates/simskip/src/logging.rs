//! Logging to stderr, filtered by `RUST_LOG` (default `info`), so stdout stays for tables.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs written to files stay greppable.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
