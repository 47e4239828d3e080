//! `modelpack-snapshotter`: a containerd proxy snapshotter. Ordinary image layers get overlayfs
//! snapshots; ModelPack layers prepared with our labels are committed at once and served on
//! demand from the registry through a lazyfs FUSE mount (see `docs/containerd.md`).

mod config;
mod control;
mod filter;
mod holding;
mod metadata;
mod metrics;
mod mounter;
mod mounts;
mod service;
mod snapshotter;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use modelpack_proto::control::control_server::ControlServer;
use modelpack_proto::snapshots::snapshots_server::SnapshotsServer;
use tracing::info;

use crate::config::{Overrides, Settings, VerifyPolicy};
use crate::service::Service;

/// containerd proxy snapshotter serving ModelPack model layers on demand.
#[derive(Debug, Parser)]
#[command(
    name = "modelpack-snapshotter",
    version,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Socket to serve containerd's Snapshots API (and our control API) on
    #[arg(long, value_name = "SOCKET")]
    address: Option<PathBuf>,
    /// Root folder for metadata, snapshots and cache
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// TOML config file (default /etc/modelpack-snapshotter/config.toml when present)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Verification of layers without a chunk index
    #[arg(long, value_enum)]
    verify: Option<VerifyPolicy>,
    /// Cap the chunk cache at BYTES (least recently used chunks evicted)
    #[arg(long, value_name = "BYTES")]
    cache_max_bytes: Option<u64>,
    /// Serve Prometheus metrics at HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    metrics_address: Option<String>,
    /// containerd's registry hosts folder (REGISTRY/hosts.toml: mirrors, TLS) [default:
    /// /etc/containerd/certs.d when it exists; "" for none]
    #[arg(long, value_name = "DIR")]
    hosts_dir: Option<String>,
    /// Start even when some remote snapshots cannot be mounted again
    #[arg(long)]
    allow_invalid_mounts_on_restart: bool,
    /// Socket of the process that keeps FUSE connections across restarts (started when none
    /// answers) [default: ROOT/fuse-holder.sock; "" for none: a restart then cuts every lazy
    /// mount]
    #[arg(long, value_name = "SOCKET")]
    fuse_holder: Option<PathBuf>,
    /// Log filter (also RUST_LOG), e.g. info or debug
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// Other roles of the binary.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Keep FUSE connections for the daemon across its restarts (the daemon starts it)
    FuseHolder {
        /// Socket to listen on
        #[arg(long, value_name = "SOCKET")]
        socket: PathBuf,
        /// Exit once nothing was held for SECONDS (0: never)
        #[arg(long, value_name = "SECONDS", default_value_t = modelpack_lazyfs::HOLDER_IDLE_EXIT.as_secs())]
        idle_exit: u64,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log_level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colours only on a terminal (journald and log files get plain text), and never with
        // NO_COLOR set to a non-empty value (https://no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    if let Some(Command::FuseHolder { socket, idle_exit }) = &args.command {
        let idle_exit = Some(std::time::Duration::from_secs(*idle_exit)).filter(|d| !d.is_zero());
        return match modelpack_lazyfs::serve_holder(socket, idle_exit) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("modelpack-snapshotter fuse-holder: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("modelpack-snapshotter: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelpack-snapshotter: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let settings = Settings::load(
        args.config.as_deref(),
        Overrides {
            root: args.root,
            address: args.address,
            verify: args.verify,
            metrics_address: args.metrics_address,
            hosts_dir: args.hosts_dir.map(PathBuf::from),
            allow_invalid_mounts_on_restart: args.allow_invalid_mounts_on_restart,
            cache_max_bytes: args.cache_max_bytes,
            fuse_holder: args.fuse_holder,
        },
    )?;
    let service = Service::open(settings.clone())?;
    // Every way out from here goes through `Service::shutdown`: a restore may have adopted
    // connections, and dropping them (an early return) would answer their readers with EIO.
    let result = match service.restore().await {
        Ok(()) => serve(&settings, &service).await,
        Err(e) => Err(e),
    };
    let left = service.shutdown().await;
    let _ = std::fs::remove_file(&settings.address);
    if left > 0 {
        // Nothing more is dropped (see Service::shutdown): readers wait for the next daemon.
        info!(
            mounts = left,
            "left the FUSE connections to the holder for the next start"
        );
        if let Err(e) = &result {
            eprintln!("modelpack-snapshotter: {e:#}");
        }
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    }
    result
}

/// Serves containerd's Snapshots API and the control API on the socket until SIGTERM or
/// SIGINT.
async fn serve(settings: &Settings, service: &Service) -> anyhow::Result<()> {
    let socket = &settings.address;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => info!(socket = %socket.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    if let Some(address) = &settings.metrics_address {
        metrics::serve(address.clone(), service.clone()).await?;
        info!(address = %address, "serving metrics");
    }
    info!(socket = %socket.display(), root = %settings.root.display(), "serving");

    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("stopping");
    };
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(snapshotter::Server::new(
            std::sync::Arc::new(service.clone()),
        )))
        .add_service(ControlServer::new(service.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("serving gRPC")
}
