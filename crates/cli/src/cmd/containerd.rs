//! `modelpack containerd pull|mount|umount` and `modelpack snapshotter status|gc`: the CLI side
//! of the containerd integration (the logic is in `modelpack-containerd`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use modelpack_containerd::{Artifact, Containerd, DEFAULT_ADDRESS, DEFAULT_SNAPSHOTTER};
use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat};
use crate::display;
use crate::remote::RegistryArgs;

/// Default socket of modelpack-snapshotter.
const DEFAULT_SNAPSHOTTER_ADDRESS: &str = "/run/modelpack-snapshotter/modelpack-snapshotter.sock";

#[derive(Debug, Subcommand)]
pub enum ContainerdCommand {
    /// Pull a model into containerd, lazily: layers become snapshots the modelpack snapshotter
    /// serves on demand
    Pull(PullArgs),
    /// Mount a pulled model read-only at DIR (a containerd View), ready for
    /// `ctr run --mount type=bind,src=DIR,dst=/models,options=rbind:ro`
    Mount(MountArgs),
    /// Unmount DIR and remove its View
    Umount(UmountArgs),
}

/// Where containerd is, and which snapshotter to use.
#[derive(Debug, Args, Clone)]
pub struct ContainerdArgs {
    /// containerd socket
    #[arg(long, default_value = DEFAULT_ADDRESS, value_name = "SOCKET")]
    pub address: PathBuf,
    /// containerd namespace
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// Snapshotter name in containerd's config
    #[arg(long, default_value = DEFAULT_SNAPSHOTTER)]
    pub snapshotter: String,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Model reference, e.g. localhost:5000/models/llama:v1
    pub reference: String,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Model reference as pulled
    pub reference: String,
    /// Folder to mount the model at
    pub dir: PathBuf,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    /// Folder a model is mounted at
    pub dir: PathBuf,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotterCommand {
    /// Totals and every lazily served layer with its fetch progress
    Status(StatusArgs),
    /// Remove the cache of layers containerd no longer has (chunk caches, unpacked tar layers)
    Gc(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The snapshotter's socket
    #[arg(long, default_value = DEFAULT_SNAPSHOTTER_ADDRESS, value_name = "SOCKET")]
    pub address: PathBuf,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

pub fn run(global: &GlobalArgs, command: ContainerdCommand) -> anyhow::Result<ExitCode> {
    match command {
        ContainerdCommand::Pull(a) => pull(global, a),
        ContainerdCommand::Mount(a) => mount(global, a),
        ContainerdCommand::Umount(a) => umount(global, a),
    }
}

async fn connect(args: &ContainerdArgs) -> anyhow::Result<Containerd> {
    // `anyhow` context is added by the callers.
    Ok(Containerd::connect(&args.address, &args.namespace).await?)
}

fn pull(global: &GlobalArgs, args: PullArgs) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let loaded = super::load_remote(&args.registry, &args.reference)?;
    let reference = &loaded.reference;
    let name = reference.to_string();
    let repository = format!("{}/{}", reference.registry(), reference.repository());
    let media_type = loaded.descriptor.media_type().to_string();
    let artifact = Artifact {
        name: &name,
        repository: &repository,
        manifest_bytes: &loaded.manifest_bytes,
        manifest_media_type: &media_type,
        manifest: &loaded.manifest,
        config_bytes: &loaded.config_bytes,
        diff_ids: &loaded.config.modelfs.diff_ids,
    };
    let rt = crate::remote::runtime()?;
    let pulled = rt.block_on(async {
        let ctd = connect(&args.containerd).await?;
        modelpack_containerd::pull(&ctd, &artifact, &args.containerd.snapshotter)
            .await
            .with_context(|| format!("cannot pull {} into containerd", reference.familiar()))
    })?;
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "image": name,
            "digest": pulled.manifest_digest.to_string(),
            "snapshotter": args.containerd.snapshotter,
            "namespace": args.containerd.namespace,
            "layers": pulled.layers.iter().map(|(path, chain)| json!({
                "path": path,
                "snapshot": chain.to_string(),
            })).collect::<Vec<_>>(),
        }))?,
        OutputFormat::Text if !global.quiet => {
            for (path, chain) in &pulled.layers {
                println!("{chain}  {path}");
            }
            println!(
                "pulled {name} ({}) lazily into containerd: {} layers, in {:.2?}",
                pulled.manifest_digest,
                pulled.layers.len(),
                started.elapsed()
            );
        }
        OutputFormat::Text => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn image_name(text: &str) -> anyhow::Result<String> {
    Ok(super::parse_reference(text)?.to_string())
}

fn mount(global: &GlobalArgs, args: MountArgs) -> anyhow::Result<ExitCode> {
    let name = image_name(&args.reference)?;
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        let ctd = connect(&args.containerd).await?;
        anyhow::Ok(
            modelpack_containerd::mount(&ctd, &name, &args.containerd.snapshotter, &args.dir)
                .await?,
        )
    })
    .with_context(|| format!("cannot mount {name} at {}", args.dir.display()))?;
    if !global.quiet {
        println!("mounted {name} at {}", args.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn umount(global: &GlobalArgs, args: UmountArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        let ctd = connect(&args.containerd).await?;
        anyhow::Ok(
            modelpack_containerd::unmount(&ctd, &args.containerd.snapshotter, &args.dir).await?,
        )
    })
    .with_context(|| format!("cannot unmount {}", args.dir.display()))?;
    if !global.quiet {
        println!("unmounted {}", args.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn snapshotter(global: &GlobalArgs, command: SnapshotterCommand) -> anyhow::Result<ExitCode> {
    use modelpack_proto::control::{ListMountsRequest, StatusRequest};
    let args = match command {
        SnapshotterCommand::Status(args) => args,
        SnapshotterCommand::Gc(args) => return snapshotter_gc(global, &args),
    };
    let (status, mounts) = ask_snapshotter(&args.address, |mut client| async move {
        let status = client.status(StatusRequest {}).await?.into_inner();
        let mounts = client
            .list_mounts(ListMountsRequest {})
            .await?
            .into_inner()
            .mounts;
        anyhow::Ok((status, mounts))
    })?;
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "version": status.version,
            "root": status.root,
            "uptimeSeconds": status.uptime_seconds,
            "snapshots": status.snapshots,
            "mounted": status.mounted,
            "failed": status.failed,
            "fetchedBytes": status.fetched_bytes,
            "servedBytes": status.served_bytes,
            "cache": {
                "bytes": status.cache_bytes,
                "maxBytes": status.cache_max_bytes,
                "evictions": status.cache_evictions,
                "evictedBytes": status.cache_evicted_bytes,
                "refetches": status.cache_refetches,
            },
            "mirrorFallbacks": status.mirror_fallbacks,
            "mounts": mounts.iter().map(|m| json!({
                "name": m.name,
                "reference": m.reference,
                "manifestDigest": m.manifest_digest,
                "layerDigest": m.layer_digest,
                "path": m.path,
                "size": m.size,
                "mountpoint": m.mountpoint,
                "state": m.state,
                "error": m.error,
                "warning": m.warning,
                "fetchedBytes": m.fetched_bytes,
                "servedBytes": m.served_bytes,
                "fetches": m.fetches,
                "fetchMicros": m.fetch_micros,
            })).collect::<Vec<_>>(),
        }))?,
        OutputFormat::Text => {
            println!(
                "modelpack-snapshotter {} at {}, up {}s: {} snapshots, {} remote layers mounted, {} failed; fetched {}, served {}",
                status.version,
                status.root,
                status.uptime_seconds,
                status.snapshots,
                status.mounted,
                status.failed,
                display::bytes(status.fetched_bytes),
                display::bytes(status.served_bytes)
            );
            println!(
                "cache: {} of {}; {} chunks evicted ({}), {} fetched again",
                display::bytes(status.cache_bytes),
                if status.cache_max_bytes == 0 {
                    "no cap".to_owned()
                } else {
                    display::bytes(status.cache_max_bytes)
                },
                status.cache_evictions,
                display::bytes(status.cache_evicted_bytes),
                status.cache_refetches
            );
            for m in &mounts {
                let progress = if m.size > 0 {
                    format!(
                        "{:.0}%",
                        (m.fetched_bytes.min(m.size) as f64) * 100.0 / m.size as f64
                    )
                } else {
                    "-".to_owned()
                };
                println!(
                    "{:8} {:>5} fetched  {:>10}  {}  {}{}",
                    m.state,
                    progress,
                    display::bytes(m.size),
                    m.path,
                    m.name,
                    match (m.error.is_empty(), m.warning.is_empty()) {
                        (false, _) => format!("  ({})", m.error),
                        (true, false) => format!("  (warning: {})", m.warning),
                        (true, true) => String::new(),
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The snapshotter's control API client.
type Control = modelpack_proto::control::control_client::ControlClient<tonic::transport::Channel>;

/// Connects to the snapshotter's control API at `address` and runs `ask` with the client.
fn ask_snapshotter<T, F: std::future::Future<Output = anyhow::Result<T>>>(
    address: &std::path::Path,
    ask: impl FnOnce(Control) -> F,
) -> anyhow::Result<T> {
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        let channel = modelpack_proto::containerd_client::connect(address).await?;
        ask(Control::new(channel)).await
    })
    .with_context(|| {
        format!(
            "cannot reach modelpack-snapshotter at {}",
            address.display()
        )
    })
}

/// `modelpack snapshotter gc`: asks the snapshotter to remove the cache of layers no snapshot
/// uses any more.
fn snapshotter_gc(global: &GlobalArgs, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    use modelpack_proto::control::GcRequest;
    let report = ask_snapshotter(&args.address, |mut client| async move {
        anyhow::Ok(client.gc(GcRequest {}).await?.into_inner())
    })?;
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "blobs": report.blobs,
            "trees": report.trees,
            "bytesFreed": report.bytes_freed,
            "cacheBytes": report.cache_bytes,
        }))?,
        OutputFormat::Text if !global.quiet => println!(
            "removed the cache of {} layers and {} unpacked trees: {} freed, {} cached",
            report.blobs,
            report.trees,
            display::bytes(report.bytes_freed),
            display::bytes(report.cache_bytes)
        ),
        OutputFormat::Text => {}
    }
    Ok(ExitCode::SUCCESS)
}
