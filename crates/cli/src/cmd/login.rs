//! `modelpack login` / `logout`: credentials in the Docker config, checked against the registry.

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use modelpack_registry::{Client, ClientOptions, Credential, credentials};

use crate::args::GlobalArgs;

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Registry host, e.g. localhost:5000
    pub registry: String,
    /// User name
    #[arg(short = 'u', long)]
    pub username: String,
    /// Password (hidden from the process list once parsed; --password-stdin never shows it)
    #[arg(short = 'p', long, conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from standard input
    #[arg(long)]
    pub password_stdin: bool,
    /// Use HTTP instead of HTTPS
    #[arg(long)]
    pub plain_http: bool,
    /// Do not verify the registry's TLS certificate
    #[arg(long)]
    pub insecure: bool,
    /// Trust this CA certificate (PEM) as well
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// Registry host
    pub registry: String,
}

pub fn login(global: &GlobalArgs, args: LoginArgs) -> anyhow::Result<ExitCode> {
    let secret = match (args.password, args.password_stdin) {
        (Some(p), _) => p,
        (None, true) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the password from standard input")?;
            s.trim_end_matches(['\n', '\r']).to_owned()
        }
        (None, false) => bail!("give the password with --password-stdin (or -p)"),
    };
    if secret.is_empty() {
        bail!("the password is empty");
    }
    let credential = Credential {
        username: args.username.clone(),
        secret,
        identity_token: false,
    };
    let client = Client::new(ClientOptions {
        plain_http: args.plain_http,
        insecure: args.insecure,
        ca_file: args.ca_file,
        credential: Some(credential.clone()),
        ..ClientOptions::new()
    })?;
    let rt = crate::remote::runtime()?;
    rt.block_on(client.ping(&args.registry))
        .with_context(|| format!("login to {} as {} failed", args.registry, args.username))?;
    credentials::store(&args.registry, &credential)?;
    if !global.quiet {
        println!("Login Succeeded ({} as {})", args.registry, args.username);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn logout(global: &GlobalArgs, args: LogoutArgs) -> anyhow::Result<ExitCode> {
    let removed = credentials::erase(&args.registry)?;
    if !global.quiet {
        if removed {
            println!("Removed credentials for {}", args.registry);
        } else {
            println!("No credentials stored for {}", args.registry);
        }
    }
    Ok(ExitCode::SUCCESS)
}
