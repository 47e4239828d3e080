//! `modelpack-snapshotter`: a containerd proxy snapshotter. Ordinary image layers get overlayfs
//! snapshots; ModelPack layers prepared with our labels are committed at once and served on
//! demand from the registry through a lazyfs FUSE mount (see `docs/containerd.md`).

mod config;
mod control;
mod filter;
mod metadata;
mod metrics;
mod mounter;
mod mounts;
mod service;
mod snapshotter;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use modelpack_daemon as daemon;
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
    FuseHolder(daemon::FuseHolderArgs),
}

/// The name errors are printed under.
const PROGRAM: &str = "modelpack-snapshotter";

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::init_logging(&args.log_level);
    match &args.command {
        Some(Command::FuseHolder(holder)) => daemon::run_fuse_holder(PROGRAM, holder),
        None => daemon::block_on(PROGRAM, async {
            daemon::exit_code(PROGRAM, run(args).await)
        }),
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
    // Nothing more is dropped once connections were left (see Service::shutdown): readers
    // wait for the next daemon.
    let left = service.shutdown().await;
    daemon::finish(PROGRAM, &settings.address, result, left, |left| {
        info!(
            mounts = left,
            "left the FUSE connections to the holder for the next start"
        )
    })
}

/// Serves containerd's Snapshots API and the control API on the socket until SIGTERM or
/// SIGINT.
async fn serve(settings: &Settings, service: &Service) -> anyhow::Result<()> {
    let socket = &settings.address;
    let listener = daemon::bind_socket(
        socket,
        || info!(socket = %socket.display(), "removed a stale socket"),
    )?;
    if let Some(address) = &settings.metrics_address {
        metrics::serve(address.clone(), service.clone()).await?;
        info!(address = %address, "serving metrics");
    }
    info!(socket = %socket.display(), root = %settings.root.display(), "serving");

    let shutdown = async {
        daemon::terminated().await;
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
