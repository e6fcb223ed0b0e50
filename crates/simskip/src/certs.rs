//! `simskip certs`: provision the federation's certificates (CA, coordinator, organisations).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use simskip_fed::tls::{provision, ProvisionSpec, DEFAULT_VALIDITY_DAYS};

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Output folder: ca.pem and ca.key (keep these), coordinator/ and one folder per organisation.
    #[arg(long)]
    pub out: PathBuf,
    /// Federation name (the subject O of every certificate).
    #[arg(long, default_value = "simskip")]
    pub federation: String,
    /// DNS name or IP address the organisations dial to reach the coordinator (repeatable).
    #[arg(long = "coordinator-host", value_name = "HOST", required = true)]
    pub coordinator_hosts: Vec<String>,
    /// Organisation name (repeatable): letters, digits, '-', '_', '.'.
    #[arg(long = "org", value_name = "NAME", required = true)]
    pub organisations: Vec<String>,
    /// Validity of every certificate, in days from now.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    pub days: u32,
    /// Replace an existing CA in --out (every certificate it signed stops being trusted).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: CertsArgs) -> Result<()> {
    let spec = ProvisionSpec {
        federation: args.federation,
        coordinator_hosts: args.coordinator_hosts,
        organisations: args.organisations,
        validity_days: args.days,
        overwrite_ca: args.force,
    };
    let done = provision(&args.out, &spec).context("simskip certs")?;
    println!(
        "CA (keep with the operator): {} {}",
        done.ca_cert.display(),
        done.ca_key.display()
    );
    println!("coordinator: {}", done.coordinator.cert.display());
    for org in &done.organisations {
        println!("organisation {}: {}", org.name, org.files.cert.display());
    }
    Ok(())
}
