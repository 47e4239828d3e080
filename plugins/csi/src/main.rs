//! `modelpack-csi`: the Kubernetes CSI node plugin (see `docs/kubernetes.md`), and `call`, a
//! CSI client for its socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use modelpack_csi::node::{NodeConfig, Volumes};
use modelpack_csi::proto::identity_server::IdentityServer;
use modelpack_csi::proto::node_server::NodeServer;
use modelpack_csi::server::Plugin;
use tracing::info;

/// CSI node plugin serving ModelPack models as lazy, verified, read-only volumes.
#[derive(Debug, Parser)]
#[command(name = "modelpack-csi", version)]
struct Args {
    /// The socket to serve CSI on (a path or unix://PATH)
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/csi/csi.sock",
        global = true
    )]
    endpoint: String,
    /// This node's name (NodeGetInfo)
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_id: Option<String>,
    /// State folder: model mounts, volume records, whole blobs
    #[arg(long, value_name = "DIR", default_value = "/var/lib/modelpack-csi")]
    state_dir: PathBuf,
    /// Chunk cache folder [default: STATE/cache]; the snapshotter's folder shares its cache
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Cap the chunk cache at BYTES (least recently used chunks evicted)
    #[arg(long, value_name = "BYTES")]
    cache_max_bytes: Option<u64>,
    /// containerd's registry hosts folder (REGISTRY/hosts.toml: mirrors, TLS) [default:
    /// /etc/containerd/certs.d when it exists; "" for none]
    #[arg(long, value_name = "DIR")]
    hosts_dir: Option<String>,
    /// A registry spoken to over plain HTTP (repeatable; loopback registries always are)
    #[arg(long, value_name = "HOST")]
    plain_http: Vec<String>,
    /// A registry whose TLS certificate is not verified (repeatable)
    #[arg(long, value_name = "HOST")]
    insecure: Vec<String>,
    /// Seconds a publish may spend resolving a model before it answers UNAVAILABLE
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    resolve_timeout: u64,
    /// Files of at most BYTES are fetched as soon as a model mounts (0: none)
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    prefetch_small: u64,
    /// Serve Prometheus metrics at HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    metrics_address: Option<String>,
    /// Socket of the process that keeps the models' FUSE connections while the plugin
    /// restarts (this binary's `fuse-holder`, started when none answers) [default:
    /// STATE/fuse-holder.sock; "" for none: a restart then cuts every read in flight]
    #[arg(long, value_name = "SOCKET")]
    fuse_holder: Option<String>,
    /// The holder runs elsewhere (a sidecar container: `modelpack-csi fuse-holder --socket
    /// SOCKET --idle-exit 0`); never start one
    #[arg(long)]
    fuse_holder_external: bool,
    /// Log filter (also RUST_LOG), e.g. info or debug
    #[arg(long, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Call one CSI RPC on the plugin at --endpoint and print the answer as JSON (an error:
    /// {"code", "message"} and exit status 1)
    Call {
        /// The RPC, e.g. NodePublishVolume
        method: String,
        /// The request as JSON (proto field names; absent fields default); `-` reads it from
        /// stdin, which keeps secrets off the command line
        #[arg(default_value = "{}")]
        request: String,
    },
    /// Keep the models' FUSE connections across the plugin's restarts (the plugin starts it
    /// when none answers; a sidecar container may run it instead)
    FuseHolder {
        /// Socket to listen on
        #[arg(long, value_name = "SOCKET")]
        socket: PathBuf,
        /// Exit once nothing was held for SECONDS (0: never, for a sidecar)
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
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    if let Some(Command::FuseHolder { socket, idle_exit }) = &args.command {
        let idle_exit = Some(Duration::from_secs(*idle_exit)).filter(|d| !d.is_zero());
        return match modelpack_lazyfs::serve_holder(socket, idle_exit) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("modelpack-csi fuse-holder: {e}");
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
            eprintln!("modelpack-csi: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let socket = socket_path(&args.endpoint);
    let result = match &args.command {
        Some(Command::Call { method, request }) => {
            return runtime.block_on(call(&socket, method, request));
        }
        Some(Command::FuseHolder { .. }) => return std::process::ExitCode::SUCCESS,
        None => runtime.block_on(serve(args, socket)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelpack-csi: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `unix:///csi/csi.sock` or `/csi/csi.sock` (kubelet and the sidecars use the first form).
fn socket_path(endpoint: &str) -> PathBuf {
    PathBuf::from(
        endpoint
            .strip_prefix("unix://")
            .unwrap_or(endpoint)
            .to_owned(),
    )
}

async fn call(socket: &Path, method: &str, request: &str) -> std::process::ExitCode {
    let outcome = async {
        let stdin;
        let request = if request == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| {
                modelpack_csi::client::CallError::Request(format!("cannot read stdin: {e}"))
            })?;
            stdin = text;
            stdin.as_str()
        } else {
            request
        };
        let request: serde_json::Value = serde_json::from_str(request).map_err(|e| {
            modelpack_csi::client::CallError::Request(format!("request is not JSON: {e}"))
        })?;
        let channel = modelpack_csi::client::connect(socket).await?;
        modelpack_csi::client::call(channel, method, &request).await
    }
    .await;
    match outcome {
        Ok(answer) => {
            println!("{answer}");
            std::process::ExitCode::SUCCESS
        }
        Err(modelpack_csi::client::CallError::Status(status)) => {
            println!(
                "{}",
                serde_json::json!({"code": format!("{:?}", status.code()), "message": status.message()})
            );
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("modelpack-csi call: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn serve(args: Args, socket: PathBuf) -> anyhow::Result<()> {
    let node_id = args
        .node_id
        .context("give --node-id (or NODE_NAME, from the pod's spec.nodeName)")?;
    let hosts_dir = match args.hosts_dir {
        Some(dir) if dir.is_empty() => None,
        Some(dir) => {
            let dir = PathBuf::from(dir);
            anyhow::ensure!(dir.is_dir(), "hosts_dir {}: no such folder", dir.display());
            Some(dir)
        }
        None => Some(PathBuf::from("/etc/containerd/certs.d")).filter(|d| d.is_dir()),
    };
    let fuse_holder = match args.fuse_holder {
        Some(socket) if socket.is_empty() => None,
        Some(socket) => Some(PathBuf::from(socket)),
        None => Some(args.state_dir.join("fuse-holder.sock")),
    }
    .map(|socket| {
        if args.fuse_holder_external {
            return modelpack_lazyfs::HolderProcess::external(&socket);
        }
        modelpack_lazyfs::HolderProcess::new(
            &socket,
            &args.state_dir,
            "/proc/self/exe",
            [
                std::ffi::OsString::from("fuse-holder"),
                "--socket".into(),
                socket.clone().into(),
            ],
        )
    });
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let config = NodeConfig {
        fuse_holder,
        node_id,
        cache_dir: args
            .cache_dir
            .unwrap_or_else(|| args.state_dir.join("cache")),
        state_dir: args.state_dir,
        cache_max_bytes: args.cache_max_bytes.filter(|&m| m > 0),
        hosts_dir,
        plain_http: args.plain_http,
        insecure: args.insecure,
        resolve_timeout: Duration::from_secs(args.resolve_timeout.max(1)),
        prefetch_small: args.prefetch_small,
    };
    let volumes = Arc::new(Volumes::open(config)?);
    // Every way out from here goes through `Volumes::shutdown`: a restore may have adopted
    // connections, and dropping them (an early return) would answer their readers with EIO.
    let result = restore_and_serve(&args.metrics_address, &socket, &volumes).await;
    let left = volumes.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    if left > 0 {
        // Nothing more is dropped (see Volumes::shutdown): readers wait for the next process.
        info!(
            models = left,
            "left the FUSE connections to the holder for the next start"
        );
        if let Err(e) = &result {
            eprintln!("modelpack-csi: {e:#}");
        }
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    }
    result
}

/// Takes back the volumes of an earlier run, then serves CSI on `socket` until SIGTERM or
/// SIGINT.
async fn restore_and_serve(
    metrics_address: &Option<String>,
    socket: &std::path::Path,
    volumes: &Arc<Volumes>,
) -> anyhow::Result<()> {
    let (restored, failed) = volumes.restore().await?;
    if restored + failed > 0 {
        info!(restored, failed, "volumes of the earlier run taken back");
    }

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
    if let Some(address) = metrics_address {
        modelpack_csi::metrics::serve(address, volumes.clone())
            .await
            .with_context(|| format!("cannot serve metrics at {address}"))?;
        info!(address = %address, "serving metrics");
    }
    info!(socket = %socket.display(), driver = modelpack_csi::server::DRIVER_NAME, "serving");
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
    let plugin = Plugin::new(volumes.clone());
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(plugin.clone()))
        .add_service(NodeServer::new(plugin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("serving gRPC")
}
