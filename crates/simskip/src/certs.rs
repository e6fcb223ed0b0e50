//! `simskip certs`: provision the federation's certificates (CA, coordinator, organisations);
//! `simskip token`: a per-organisation token for the lighter `tokens` mode.

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

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The organisation the token is for.
    #[arg(long = "org", value_name = "NAME")]
    pub organisation: String,
    /// Write the token to this file (mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn token(args: TokenArgs) -> Result<()> {
    simskip_fed::tls::validate_organisation_name(&args.organisation)
        .context("simskip token --org")?;
    let (token, digest) = simskip_fed::auth::new_token();
    match &args.out {
        Some(path) => {
            write_private(path, &token)?;
            println!(
                "token for {}: written to {}",
                args.organisation,
                path.display()
            );
        }
        None => println!(
            "token for {} (give it to that organisation only): {token}",
            args.organisation
        ),
    }
    println!("for the coordinator's settings:");
    println!("[[server.auth.organisations]]");
    println!("name = {:?}", args.organisation);
    println!("token_sha256 = {digest:?}");
    Ok(())
}

/// Creates `path` new with mode 0600, so the token never sits in a file others can read.
fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    writeln!(file, "{text}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct SecretArgs {
    /// Write the secret here (mode 0600; the file must not exist). Copy it to every
    /// organisation, out of band, and never to the coordinator.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `simskip secret`: a federation secret for blinded entity keys (`[client.blind_keys]`).
pub fn secret(args: SecretArgs) -> Result<()> {
    write_private(&args.out, &simskip_fed::blind::new_secret())?;
    println!(
        "federation secret written to {} (give it to every organisation, never to the coordinator)",
        args.out.display()
    );
    Ok(())
}
