//! `modelpack-csi`: the Kubernetes CSI node plugin (see `docs/kubernetes.md`), and `call`, a
//! CSI client for its socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use modelpack_csi::node::{NodeConfig, Volumes};
use modelpack_csi::proto::identity_server::IdentityServer;
use modelpack_csi::proto::node_server::NodeServer;
use modelpack_csi::server::Plugin;
use modelpack_daemon as daemon;
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
    FuseHolder(daemon::FuseHolderArgs),
}

/// The name errors are printed under.
const PROGRAM: &str = "modelpack-csi";

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::init_logging(&args.log_level);
    let endpoint = socket_path(&args.endpoint);
    match &args.command {
        Some(Command::FuseHolder(holder)) => daemon::run_fuse_holder(PROGRAM, holder),
        Some(Command::Call { method, request }) => {
            daemon::block_on(PROGRAM, call(&endpoint, method, request))
        }
        None => daemon::block_on(PROGRAM, async {
            daemon::exit_code(PROGRAM, serve(args, endpoint).await)
        }),
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

async fn call(socket: &Path, method: &str, request: &str) -> ExitCode {
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
            ExitCode::SUCCESS
        }
        Err(modelpack_csi::client::CallError::Status(status)) => {
            println!(
                "{}",
                serde_json::json!({"code": format!("{:?}", status.code()), "message": status.message()})
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("modelpack-csi call: {e}");
            ExitCode::from(2)
        }
    }
}

async fn serve(args: Args, socket: PathBuf) -> anyhow::Result<()> {
    let node_id = args
        .node_id
        .context("give --node-id (or NODE_NAME, from the pod's spec.nodeName)")?;
    let hosts_dir = daemon::hosts_dir(args.hosts_dir.map(PathBuf::from))?;
    let fuse_holder = daemon::holder_socket(args.fuse_holder.map(PathBuf::from), &args.state_dir)
        .map(|socket| {
            if args.fuse_holder_external {
                return modelpack_lazyfs::HolderProcess::external(&socket);
            }
            daemon::holder_process(&socket, &args.state_dir)
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
    // Nothing more is dropped once connections were left (see Volumes::shutdown): readers
    // wait for the next process.
    let left = volumes.shutdown().await;
    daemon::finish(PROGRAM, &socket, result, left, |left| {
        info!(
            models = left,
            "left the FUSE connections to the holder for the next start"
        )
    })
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

    let listener = daemon::bind_socket(
        socket,
        || info!(socket = %socket.display(), "removed a stale socket"),
    )?;
    if let Some(address) = metrics_address {
        modelpack_csi::metrics::serve(address, volumes.clone())
            .await
            .with_context(|| format!("cannot serve metrics at {address}"))?;
        info!(address = %address, "serving metrics");
    }
    info!(socket = %socket.display(), driver = modelpack_csi::server::DRIVER_NAME, "serving");
    let shutdown = async {
        daemon::terminated().await;
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
