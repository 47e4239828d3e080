//! What remote commands share: registry flags to a client, a runtime, targets (registry
//! reference, `oci:DIR:TAG` layout, `store:NAME`), and progress rendering of transfer events.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use modelpack_registry::{Client, ClientOptions, Credential, Repository};
use modelpack_spec::Reference;
use modelpack_store::Store;
use modelpack_transfer::{Event, TransferOptions};

use crate::display;

/// How to reach a registry (oras's flag names).
#[derive(Debug, Args, Clone, Default)]
pub struct ConnectionArgs {
    /// Use HTTP instead of HTTPS
    #[arg(long)]
    pub plain_http: bool,
    /// Do not verify the registry's TLS certificate
    #[arg(long)]
    pub insecure: bool,
    /// Trust this CA certificate (PEM) as well
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// User name (else the Docker config's credentials)
    #[arg(short = 'u', long)]
    pub username: Option<String>,
    /// Password or token (prefer `login --password-stdin`)
    #[arg(short = 'p', long, requires = "username")]
    pub password: Option<String>,
    /// Upload in chunks of this many MiB (default: one streamed PUT per blob)
    #[arg(long, value_name = "MIB")]
    pub chunk_size: Option<u64>,
    /// containerd's registry hosts folder: REGISTRY/hosts.toml names mirrors and TLS settings
    /// [default: /etc/containerd/certs.d when it exists; "" for none]
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<String>,
}

/// containerd's usual hosts folder, used when it exists and `--hosts-dir` is not given.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

impl ConnectionArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        let credential = match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some(Credential {
                username: u.clone(),
                secret: p.clone(),
                identity_token: false,
            }),
            _ => None,
        };
        Ok(Client::new(ClientOptions {
            plain_http: self.plain_http,
            insecure: self.insecure,
            ca_file: self.ca_file.clone(),
            credential,
            hosts_dir: self.hosts_dir()?,
            ..ClientOptions::new()
        })?)
    }

    /// Parses `text` as a reference and opens its repository with these flags.
    pub fn open(&self, text: &str) -> anyhow::Result<(Reference, Repository)> {
        let reference = crate::cmd::parse_reference(text)?;
        let repository = Repository::new(&self.client()?, &reference);
        Ok((reference, repository))
    }

    /// The hosts folder to read: `--hosts-dir` (which must exist; empty: none), else
    /// [`DEFAULT_HOSTS_DIR`] when it exists.
    pub fn hosts_dir(&self) -> anyhow::Result<Option<PathBuf>> {
        match self.hosts_dir.as_deref() {
            Some("") => Ok(None),
            Some(dir) => {
                let dir = PathBuf::from(dir);
                anyhow::ensure!(
                    dir.is_dir(),
                    "--hosts-dir {}: no such folder",
                    dir.display()
                );
                Ok(Some(dir))
            }
            None => Ok(Some(PathBuf::from(DEFAULT_HOSTS_DIR)).filter(|d| d.is_dir())),
        }
    }

    pub fn transfer_options(
        &self,
        concurrency: usize,
        progress: modelpack_transfer::Progress,
    ) -> TransferOptions {
        let mut opts = TransferOptions::new(concurrency);
        opts.chunk_size = self.chunk_size.map(|m| m.max(1) << 20);
        opts.progress = progress;
        opts
    }
}

/// Registry flags plus how many transfers run at once.
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Blobs and connections in flight at once (blobs of at most 1 MiB: 8 times as many, at most 64)
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

impl RegistryArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        self.connection.client()
    }

    /// Parses `text` as a reference and opens its repository with these flags.
    pub fn open(&self, text: &str) -> anyhow::Result<(Reference, Repository)> {
        self.connection.open(text)
    }

    pub fn transfer_options(&self, progress: modelpack_transfer::Progress) -> TransferOptions {
        self.connection.transfer_options(self.concurrency, progress)
    }
}

/// A multi-threaded runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Pushes the manifest `digest` of `source` (the store, or a build's files) to `repo` under
/// `reference`'s tag, through the transfer engine's one walk; returns the pushed digest.
pub fn push_artifact<S: modelpack_transfer::Source>(
    source: &S,
    digest: &modelpack_spec::Digest,
    repo: &Repository,
    reference: &Reference,
    opts: &TransferOptions,
) -> anyhow::Result<modelpack_spec::Digest> {
    let copied = runtime()?
        .block_on(modelpack_transfer::copy(
            source,
            digest.as_str(),
            &modelpack_transfer::Remote::new(repo),
            reference.tag(),
            opts,
        ))
        .with_context(|| format!("cannot push {}", reference.familiar()))?;
    Ok(copied.digest)
}

/// Where content lives.
#[derive(Debug, Clone)]
pub enum Target {
    /// A registry repository and tag or digest.
    Registry(Reference),
    /// An OCI layout folder and the name inside it (`oci:DIR[:TAG]`).
    Layout(PathBuf, String),
    /// The local store (`store:NAME[:TAG]`).
    Store(Reference),
}

impl Target {
    pub fn parse(text: &str) -> anyhow::Result<Target> {
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = match rest.split_once(':') {
                Some((d, t)) => (d, t),
                None => (rest, "latest"),
            };
            if tag.is_empty() || tag.contains(char::is_whitespace) {
                anyhow::bail!("{text}: the part after the folder must be a tag");
            }
            return Ok(Target::Layout(PathBuf::from(dir), tag.to_owned()));
        }
        if let Some(rest) = text.strip_prefix("store:") {
            return Ok(Target::Store(rest.parse()?));
        }
        Ok(Target::Registry(text.parse()?))
    }
}

/// Renders transfer events as one byte bar, and counts what moved.
pub struct Renderer {
    pub bar: indicatif::ProgressBar,
    pub moved: Arc<AtomicU64>,
    pub resumed: Arc<AtomicU64>,
    pub started: Instant,
}

impl Renderer {
    pub fn new(quiet: bool, message: &str) -> Renderer {
        Renderer {
            bar: display::byte_bar(0, quiet, message),
            moved: Arc::new(AtomicU64::new(0)),
            resumed: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    pub fn progress(&self) -> modelpack_transfer::Progress {
        let bar = self.bar.clone();
        let moved = self.moved.clone();
        let resumed = self.resumed.clone();
        Arc::new(move |event| match event {
            Event::Total { bytes } => bar.set_length(bytes),
            Event::Bytes { bytes, .. } => {
                moved.fetch_add(bytes, Ordering::Relaxed);
                bar.inc(bytes);
            }
            Event::Resumed { bytes, .. } => {
                resumed.fetch_add(bytes, Ordering::Relaxed);
                bar.inc(bytes);
            }
            Event::BlobSkipped { size, .. } => bar.inc(size),
            Event::BlobStarted { .. } | Event::BlobDone { .. } => {}
        })
    }

    /// `N moved in T (rate)[, M resumed]`.
    pub fn finish(&self) -> String {
        self.bar.finish_and_clear();
        let moved = self.moved.load(Ordering::Relaxed);
        let resumed = self.resumed.load(Ordering::Relaxed);
        let mut line = display::summary(moved, self.started.elapsed());
        if resumed > 0 {
            line.push_str(&format!(
                ", {} resumed from an earlier attempt",
                display::bytes(resumed)
            ));
        }
        line
    }
}

/// Opens a layout folder as a store.
pub fn open_layout(dir: &std::path::Path) -> anyhow::Result<Store> {
    Store::open(dir).with_context(|| format!("cannot open the OCI layout {}", dir.display()))
}

/// A repository for `reference`.
pub fn repository(client: &Client, reference: &Reference) -> Repository {
    Repository::new(client, reference)
}

/// Hashes the file at `path` and uploads it to `repo` unless the registry has that blob already;
/// returns its digest and size.
pub fn push_file(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    path: &std::path::Path,
) -> anyhow::Result<(modelpack_spec::Digest, u64)> {
    let (digest, size) = modelpack_store::sha256_file(path)?;
    rt.block_on(async {
        if repo.blob_exists(&digest).await?.is_none() {
            repo.push_blob_file(&digest, path, size).await?;
        }
        anyhow::Ok(())
    })?;
    Ok((digest, size))
}
