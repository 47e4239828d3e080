//! The snapshotter: a complete overlayfs snapshotter for image layers, whose committed
//! snapshots may also be remote ModelPack layers, each served by a lazyfs FUSE mount.
//!
//! Layout under the root: `metadata.json` (see [`crate::metadata`]), `snapshots/<id>/fs` (the
//! upper folder, or the FUSE mount point of a remote layer), `snapshots/<id>/work` (overlay's
//! work folder), `store/` (whole blobs fetched for verification) and `cache/` (chunk cache).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelpack_lazyfs::{Counters, MountOptions, MountedModel, Resolved, Verify};
use modelpack_proto::containerd_client::types::Mount;
use modelpack_proto::snapshots as pb;
use modelpack_registry::{Client, ClientOptions, Repository};
use modelpack_spec::{Digest, Reference, labels};
use modelpack_store::Store;
use tracing::{info, warn};

use crate::config::{Settings, VerifyPolicy};
use crate::filter;
use crate::metadata::{Kind, Metadata, Record, RemoteLayer, now_ns};
use crate::mounts;
use crate::snapshotter::{SnapshotError, Snapshotter};

/// How long a remote mount may take (manifest, chunk index, FUSE mount) before Prepare falls
/// back to an ordinary snapshot.
const REMOTE_MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Models whose resolve (manifest and chunk index) is kept for their next layers.
const RESOLVED_CACHE: usize = 64;

/// A remote snapshot's mount, or why it has none.
#[derive(Debug)]
pub enum MountState {
    /// Served.
    Mounted {
        /// The mount.
        model: MountedModel,
        /// Its counters.
        counters: Arc<Counters>,
    },
    /// Not served (the reason).
    Failed(String),
}

/// A remote snapshot as the daemon holds it.
#[derive(Debug)]
pub struct RemoteMount {
    /// Where it comes from.
    pub layer: RemoteLayer,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Mounted or failed.
    pub state: MountState,
}

/// Daemon-wide counters (Prometheus).
#[derive(Debug, Default)]
pub struct Stats {
    /// Remote Prepares that mounted.
    pub remote_prepared: AtomicU64,
    /// Remote Prepares that fell back to an ordinary snapshot.
    pub remote_fallbacks: AtomicU64,
    /// Total time spent mounting remote layers, microseconds.
    pub mount_micros: AtomicU64,
    /// Remote mounts made (including remounts on start).
    pub mounts: AtomicU64,
}

/// The snapshotter, shared by the gRPC services.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    meta: tokio::sync::Mutex<Metadata>,
    /// One lock per target chain ID being prepared remotely: two Prepares of one chain take
    /// turns (the second finds it committed), other chains proceed in parallel; the metadata
    /// lock is not held while a layer mounts.
    preparing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Each model's manifest and chunk index, resolved once for all of its layers (keyed by
    /// manifest digest; a digest names immutable content, so an entry never goes stale).
    resolved: Mutex<HashMap<Digest, Arc<tokio::sync::OnceCell<Arc<Resolved>>>>>,
    /// Folder numbers of remote snapshots being mounted (no record names them yet).
    reserved: Mutex<std::collections::HashSet<u64>>,
    remote: Mutex<BTreeMap<String, RemoteMount>>,
    clients: Mutex<HashMap<String, Client>>,
    store: Store,
    started: Instant,
    stats: Stats,
}

/// Writes the metadata (temporary file, fsync, rename, fsync of the folder) with the lock held,
/// as the order of saves must be the order of changes, but off the async worker: the fsyncs may
/// take milliseconds, and other calls' tasks move to another worker meanwhile.
fn save(meta: &Metadata) -> std::io::Result<()> {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
            tokio::task::block_in_place(|| meta.save())
        }
        _ => meta.save(),
    }
}

/// Locks `m`, also after a panic elsewhere poisoned it (the data stays consistent: every
/// critical section here is a plain map update).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::View => "view",
        Kind::Active => "active",
        Kind::Committed => "committed",
    }
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn info_of(name: &str, r: &Record) -> pb::Info {
    pb::Info {
        name: name.to_owned(),
        parent: r.parent.clone(),
        kind: match r.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(r.created_ns)),
        updated_at: Some(timestamp(r.updated_ns)),
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The remote layer the labels of a Prepare describe, if they describe one (an error when
/// they name one with a malformed digest).
pub fn remote_layer(labels: &HashMap<String, String>) -> Option<Result<RemoteLayer, String>> {
    let reference = labels.get(labels::REFERENCE)?;
    let manifest = labels.get(labels::MANIFEST_DIGEST)?;
    let layer = labels.get(labels::LAYER_DIGEST)?;
    let parse = |what: &str, text: &str| {
        text.parse::<Digest>()
            .map_err(|e| format!("{what} digest {text:?}: {e}"))
    };
    Some((|| {
        Ok(RemoteLayer {
            reference: reference.clone(),
            manifest_digest: parse("manifest", manifest)?,
            layer_digest: parse("layer", layer)?,
            media_type: labels.get(labels::MEDIA_TYPE).cloned().unwrap_or_default(),
            path: labels.get(labels::FILE_PATH).cloned().unwrap_or_default(),
        })
    })())
}

fn bind(source: &Path, writable: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![if writable { "rw" } else { "ro" }.into(), "rbind".into()],
    }
}

fn overlay(options: Vec<String>) -> Mount {
    Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }
}

fn lowerdir(dirs: &[PathBuf]) -> String {
    let joined: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    format!("lowerdir={}", joined.join(":"))
}

impl Service {
    /// Opens the root (creating it), loads the metadata.
    pub fn open(settings: Settings) -> anyhow::Result<Service> {
        use anyhow::Context as _;
        use std::os::unix::fs::DirBuilderExt as _;
        for dir in [&settings.root, &settings.root.join("snapshots")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.cache_dir)
            .with_context(|| format!("cannot create {}", settings.cache_dir.display()))?;
        let store = Store::open(&settings.root.join("store"))
            .with_context(|| format!("cannot open {}", settings.root.join("store").display()))?;
        let meta = Metadata::open(&settings.root).with_context(|| {
            format!("cannot read the metadata under {}", settings.root.display())
        })?;
        Ok(Service {
            inner: Arc::new(Inner {
                settings,
                meta: tokio::sync::Mutex::new(meta),
                preparing: Mutex::new(HashMap::new()),
                resolved: Mutex::new(HashMap::new()),
                reserved: Mutex::new(std::collections::HashSet::new()),
                remote: Mutex::new(BTreeMap::new()),
                clients: Mutex::new(HashMap::new()),
                store,
                started: Instant::now(),
                stats: Stats::default(),
            }),
        })
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Daemon-wide counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Number of snapshots in the metadata.
    pub async fn snapshot_count(&self) -> usize {
        self.inner.meta.lock().await.iter().count()
    }

    /// Calls `f` with the remote mounts.
    pub fn with_remote<T>(&self, f: impl FnOnce(&BTreeMap<String, RemoteMount>) -> T) -> T {
        let guard = lock(&self.inner.remote);
        f(&guard)
    }

    fn remote_mut<T>(&self, f: impl FnOnce(&mut BTreeMap<String, RemoteMount>) -> T) -> T {
        let mut guard = lock(&self.inner.remote);
        f(&mut guard)
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.inner
            .settings
            .root
            .join("snapshots")
            .join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    /// The mounts that present `key`.
    fn mounts_of(&self, meta: &Metadata, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let rec = meta.get(key).ok_or_else(|| SnapshotError::missing(key))?;
        let mut lowers: Vec<PathBuf> = meta
            .chain(&rec.parent)
            .iter()
            .map(|p| self.fs_dir(p.id))
            .collect();
        let own = self.fs_dir(rec.id);
        Ok(match rec.kind {
            Kind::Active if lowers.is_empty() => vec![bind(&own, true)],
            Kind::Active => vec![overlay(vec![
                format!(
                    "workdir={}",
                    self.snapshot_dir(rec.id).join("work").display()
                ),
                format!("upperdir={}", own.display()),
                lowerdir(&lowers),
            ])],
            Kind::View | Kind::Committed => {
                if rec.kind == Kind::Committed {
                    lowers.insert(0, own.clone());
                }
                match lowers.len() {
                    0 => vec![bind(&own, false)],
                    1 => vec![bind(&lowers[0], false)],
                    _ => vec![overlay(vec![lowerdir(&lowers)])],
                }
            }
        })
    }

    /// Creates an ordinary active snapshot or view and returns its mounts.
    async fn create(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "snapshot key is empty".into(),
            ));
        }
        let mut meta = self.inner.meta.lock().await;
        if meta.get(key).is_some() {
            return Err(SnapshotError::AlreadyExists(format!(
                "snapshot {key} already exists"
            )));
        }
        if !parent.is_empty() {
            match meta.get(parent) {
                None => {
                    return Err(SnapshotError::NotFound(format!(
                        "parent snapshot {parent} does not exist"
                    )));
                }
                Some(p) if p.kind != Kind::Committed => {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "parent snapshot {parent} is not committed"
                    )));
                }
                Some(_) => {}
            }
        }
        let id = meta.next_id();
        let dir = self.snapshot_dir(id);
        let made = std::fs::create_dir_all(dir.join("fs")).and_then(|()| {
            if kind == Kind::Active {
                std::fs::create_dir_all(dir.join("work"))
            } else {
                Ok(())
            }
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(SnapshotError::internal(
                "cannot create the snapshot folder",
                e,
            ));
        }
        let now = now_ns();
        meta.insert(
            key.to_owned(),
            Record {
                id,
                kind,
                parent: parent.to_owned(),
                labels: labels.into_iter().collect(),
                created_ns: now,
                updated_ns: now,
                remote: None,
            },
        );
        if let Err(e) = save(&meta) {
            meta.remove(key);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(SnapshotError::internal("cannot save the metadata", e));
        }
        self.mounts_of(&meta, key)
    }

    fn client_for(&self, host: &str) -> Result<Client, String> {
        let mut clients = lock(&self.inner.clients);
        if let Some(c) = clients.get(host) {
            return Ok(c.clone());
        }
        let entry = self.inner.settings.registry(host);
        let client = Client::new(ClientOptions {
            plain_http: entry.plain_http,
            insecure: entry.insecure,
            ca_file: entry.ca_file,
            ..ClientOptions::new()
        })
        .map_err(|e| e.to_string())?;
        clients.insert(host.to_owned(), client.clone());
        Ok(client)
    }

    /// Mounts one remote layer at `dir`.
    async fn mount_layer(&self, layer: &RemoteLayer, dir: &Path) -> Result<MountState, String> {
        let reference: Reference = layer
            .reference
            .parse()
            .map_err(|e| format!("reference {:?}: {e}", layer.reference))?;
        let client = self.client_for(reference.registry())?;
        let repository = Repository::new(&client, &reference);
        let resolved = self.resolved(&repository, &layer.manifest_digest).await?;
        let settings = &self.inner.settings;
        let mut opts = MountOptions::new(
            repository,
            layer.manifest_digest.to_string(),
            self.inner.store.clone(),
            settings.cache_dir.clone(),
        );
        opts.resolved = Some(resolved);
        opts.verify = match settings.verify {
            VerifyPolicy::Full => Verify::Full,
            VerifyPolicy::Background => Verify::Background,
            VerifyPolicy::None => Verify::None,
        };
        opts.allow_other = true;
        opts.prefetch = settings.prefetch;
        opts.prefetch_small = settings.prefetch_small;
        opts.layers = Some(vec![layer.layer_digest.clone()]);
        opts.status_file = false;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let started = Instant::now();
        let model = tokio::time::timeout(REMOTE_MOUNT_TIMEOUT, modelpack_lazyfs::mount(opts, dir))
            .await
            .map_err(|_| format!("mounting took longer than {REMOTE_MOUNT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let stats = &self.inner.stats;
        stats.mounts.fetch_add(1, Ordering::Relaxed);
        stats
            .mount_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let counters = model.counters();
        tracing::debug!(path = %layer.path, took = ?started.elapsed(), "remote layer mounted");
        Ok(MountState::Mounted { model, counters })
    }

    /// The lock of the chain `target` (created on first use).
    fn chain_lock(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.inner.preparing);
        locks.entry(target.to_owned()).or_default().clone()
    }

    /// Forgets the lock of `target` once nobody else waits for it.
    fn release_chain_lock(&self, target: &str, chain: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = lock(&self.inner.preparing);
        // Ours and the map's: nobody else holds or waits for it.
        if Arc::strong_count(&chain) == 2 {
            locks.remove(target);
        }
    }

    /// The model `manifest` in `repository`, resolved once for all its layers: concurrent
    /// Prepares of one model wait for the same resolve; a failed resolve is tried again next time.
    async fn resolved(
        &self,
        repository: &Repository,
        manifest: &Digest,
    ) -> Result<Arc<Resolved>, String> {
        let cell = {
            let mut cache = lock(&self.inner.resolved);
            // Bounded: a node sees few models at once; past the bound, start afresh.
            if cache.len() >= RESOLVED_CACHE && !cache.contains_key(manifest) {
                cache.clear();
            }
            cache.entry(manifest.clone()).or_default().clone()
        };
        let resolved = cell
            .get_or_try_init(|| async {
                modelpack_lazyfs::resolve(repository, manifest.as_str(), &self.inner.store)
                    .await
                    .map(Arc::new)
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(resolved.clone())
    }

    fn reserved_mut<T>(&self, f: impl FnOnce(&mut std::collections::HashSet<u64>) -> T) -> T {
        let mut guard = lock(&self.inner.reserved);
        f(&mut guard)
    }

    /// Commits a remote snapshot named `target` (mounting its layer), unless one exists. The
    /// metadata lock is not held while the layer mounts, so ordinary calls go on meanwhile.
    async fn prepare_remote(
        &self,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
        layer: RemoteLayer,
    ) -> Result<(), String> {
        let chain = self.chain_lock(target);
        let this_chain = chain.clone().lock_owned().await;
        let result = self.prepare_locked(target, parent, labels, layer).await;
        drop(this_chain);
        self.release_chain_lock(target, chain);
        result
    }

    async fn prepare_locked(
        &self,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
        layer: RemoteLayer,
    ) -> Result<(), String> {
        let id = {
            let mut meta = self.inner.meta.lock().await;
            if let Some(existing) = meta.get(target) {
                return if existing.kind == Kind::Committed {
                    Ok(())
                } else {
                    Err(format!("{target} exists and is not committed"))
                };
            }
            if !parent.is_empty() && meta.get(parent).map(|p| p.kind) != Some(Kind::Committed) {
                return Err(format!("parent {parent} is not a committed snapshot"));
            }
            let id = meta.next_id();
            self.reserved_mut(|r| r.insert(id));
            id
        };
        let result = self
            .mount_and_record(id, target, parent, labels, layer)
            .await;
        self.reserved_mut(|r| r.remove(&id));
        result
    }

    async fn mount_and_record(
        &self,
        id: u64,
        target: &str,
        parent: &str,
        labels: &HashMap<String, String>,
        layer: RemoteLayer,
    ) -> Result<(), String> {
        let dir = self.snapshot_dir(id);
        let fs = dir.join("fs");
        let state = match self.mount_layer(&layer, &fs).await {
            Ok(state) => state,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut labels: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.insert(labels::REMOTE.to_owned(), "true".to_owned());
        let now = now_ns();
        let mut meta = self.inner.meta.lock().await;
        let parent_gone = !parent.is_empty() && meta.get(parent).is_none();
        if meta.get(target).is_some() || parent_gone {
            drop(meta);
            unmount(state, &fs).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "{target} or its parent changed while its layer was mounting"
            ));
        }
        meta.insert(
            target.to_owned(),
            Record {
                id,
                kind: Kind::Committed,
                parent: parent.to_owned(),
                labels,
                created_ns: now,
                updated_ns: now,
                remote: Some(layer.clone()),
            },
        );
        if let Err(e) = save(&meta) {
            meta.remove(target);
            drop(meta);
            unmount(state, &fs).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("cannot save the metadata: {e}"));
        }
        self.remote_mut(|m| {
            m.insert(
                target.to_owned(),
                RemoteMount {
                    layer,
                    mountpoint: fs,
                    state,
                },
            )
        });
        Ok(())
    }

    /// Start-up: detaches mounts a dead predecessor left, removes folders no record names, and
    /// mounts every remote snapshot again. Fails on the first snapshot it cannot mount unless
    /// `allow_invalid_mounts_on_restart` is set; then it reports them and goes on.
    pub async fn restore(&self) -> anyhow::Result<()> {
        let snapshots = self.inner.settings.root.join("snapshots");
        for stale in mounts::under(&snapshots) {
            match mounts::detach(&stale) {
                Ok(()) => info!(mountpoint = %stale.display(), "detached a stale mount"),
                Err(e) => {
                    warn!(mountpoint = %stale.display(), error = %e, "cannot detach a stale mount")
                }
            }
        }
        self.remove_orphans().await;
        let remote: Vec<(String, RemoteLayer, u64)> = {
            let meta = self.inner.meta.lock().await;
            meta.iter()
                .filter_map(|(k, r)| r.remote.clone().map(|l| (k.clone(), l, r.id)))
                .collect()
        };
        let mut failed = 0;
        for (name, layer, id) in remote {
            let fs = self.fs_dir(id);
            let state = match self.mount_layer(&layer, &fs).await {
                Ok(state) => {
                    info!(snapshot = %name, path = %layer.path, "remounted remote snapshot");
                    state
                }
                Err(e) => {
                    failed += 1;
                    warn!(snapshot = %name, path = %layer.path, error = %e, "cannot remount remote snapshot");
                    if !self.inner.settings.allow_invalid_mounts_on_restart {
                        self.shutdown().await;
                        anyhow::bail!(
                            "cannot mount remote snapshot {name} ({}) again: {e} \
                             (start with --allow-invalid-mounts-on-restart to continue without it)",
                            layer.path
                        );
                    }
                    MountState::Failed(e)
                }
            };
            self.remote_mut(|m| {
                m.insert(
                    name,
                    RemoteMount {
                        layer,
                        mountpoint: fs,
                        state,
                    },
                )
            });
        }
        if failed > 0 {
            warn!(
                failed,
                "some remote snapshots are not served; remove them with `ctr snapshots rm`"
            );
        }
        Ok(())
    }

    /// Removes snapshot folders that no record names.
    async fn remove_orphans(&self) {
        let meta = self.inner.meta.lock().await;
        let mut ids = meta.ids();
        ids.extend(self.reserved_mut(|r| r.clone()));
        let snapshots = self.inner.settings.root.join("snapshots");
        let Ok(entries) = std::fs::read_dir(&snapshots) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if keep {
                continue;
            }
            let path = entry.path();
            for m in mounts::under(&path) {
                let _ = mounts::detach(&m);
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => info!(folder = %path.display(), "removed an orphaned snapshot folder"),
                Err(e) => {
                    warn!(folder = %path.display(), error = %e, "cannot remove an orphaned snapshot folder")
                }
            }
        }
    }

    /// Unmounts every remote snapshot (on exit).
    pub async fn shutdown(&self) {
        let all = self.remote_mut(std::mem::take);
        for (_, mount) in all {
            unmount(mount.state, &mount.mountpoint).await;
        }
    }
}

/// Unmounts a remote layer; detaches it lazily when busy (a container still has it open).
async fn unmount(state: MountState, dir: &Path) {
    if let MountState::Mounted { model, .. } = state
        && let Err(e) = model.unmount().await
    {
        warn!(mountpoint = %dir.display(), error = %e, "unmount failed; detaching");
    }
    if mounts::is_mount_point(dir) {
        let _ = mounts::detach(dir);
    }
}

/// Disk usage of a folder: (bytes in blocks, inodes), hard links counted once.
fn usage_of(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let (mut size, mut inodes) = (0i64, 0i64);
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        inodes += 1;
        size += (meta.blocks() * 512) as i64;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    (size, inodes)
}

#[tonic::async_trait]
impl Snapshotter for Service {
    async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if let Some(target) = labels.get(labels::SNAPSHOT_REF)
            && let Some(layer) = remote_layer(&labels)
        {
            let path = layer.as_ref().map(|l| l.path.clone()).unwrap_or_default();
            let prepared = match layer {
                Ok(layer) => self.prepare_remote(target, parent, &labels, layer).await,
                Err(e) => Err(e),
            };
            match prepared {
                Ok(()) => {
                    self.inner
                        .stats
                        .remote_prepared
                        .fetch_add(1, Ordering::Relaxed);
                    info!(key = %key, target = %target, path = %path, "remote-snapshot-prepared=true");
                    return Err(SnapshotError::AlreadyExists(format!(
                        "target snapshot {target:?}: already exists"
                    )));
                }
                Err(e) => {
                    self.inner
                        .stats
                        .remote_fallbacks
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(key = %key, target = %target, path = %path, error = %e, "remote-snapshot-prepared=false");
                }
            }
        }
        self.create(key, parent, labels, Kind::Active).await
    }

    async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(key, parent, labels, Kind::View).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let meta = self.inner.meta.lock().await;
        self.mounts_of(&meta, key)
    }

    async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let mut meta = self.inner.meta.lock().await;
        match meta.get(key) {
            None => return Err(SnapshotError::missing(key)),
            Some(rec) if rec.kind != Kind::Active => {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            Some(_) => {}
        }
        if meta.get(name).is_some() {
            return Err(SnapshotError::AlreadyExists(format!(
                "snapshot {name} already exists"
            )));
        }
        let Some(mut rec) = meta.remove(key) else {
            return Err(SnapshotError::missing(key));
        };
        let before = rec.clone();
        rec.kind = Kind::Committed;
        rec.labels.extend(labels);
        rec.updated_ns = now_ns();
        meta.insert(name.to_owned(), rec);
        if let Err(e) = save(&meta) {
            meta.remove(name);
            meta.insert(key.to_owned(), before);
            return Err(SnapshotError::internal("cannot save the metadata", e));
        }
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let rec = {
            let mut meta = self.inner.meta.lock().await;
            if meta.get(key).is_none() {
                return Err(SnapshotError::missing(key));
            }
            if meta.has_children(key) {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} has children"
                )));
            }
            let Some(rec) = meta.remove(key) else {
                return Err(SnapshotError::missing(key));
            };
            if let Err(e) = save(&meta) {
                meta.insert(key.to_owned(), rec);
                return Err(SnapshotError::internal("cannot save the metadata", e));
            }
            rec
        };
        let dir = self.snapshot_dir(rec.id);
        if rec.remote.is_some()
            && let Some(mount) = self.remote_mut(|m| m.remove(key))
        {
            unmount(mount.state, &mount.mountpoint).await;
        }
        if mounts::is_mount_point(&dir.join("fs")) {
            let _ = mounts::detach(&dir.join("fs"));
        }
        if let Err(e) = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        {
            warn!(key = %key, error = %e, "snapshot folder not removed; Cleanup will retry");
        }
        Ok(())
    }

    async fn stat(&self, key: &str) -> Result<pb::Info, SnapshotError> {
        let meta = self.inner.meta.lock().await;
        let rec = meta.get(key).ok_or_else(|| SnapshotError::missing(key))?;
        Ok(info_of(key, rec))
    }

    async fn update(&self, info: pb::Info, paths: Vec<String>) -> Result<pb::Info, SnapshotError> {
        let mut meta = self.inner.meta.lock().await;
        let rec = meta
            .get_mut(&info.name)
            .ok_or_else(|| SnapshotError::missing(&info.name))?;
        let before = rec.clone();
        if paths.is_empty() {
            rec.labels = info.labels.into_iter().collect();
        } else {
            for path in &paths {
                if path == "labels" {
                    rec.labels = info.labels.clone().into_iter().collect();
                } else if let Some(key) = path.strip_prefix("labels.") {
                    match info.labels.get(key) {
                        Some(v) => rec.labels.insert(key.to_owned(), v.clone()),
                        None => rec.labels.remove(key),
                    };
                } else {
                    *rec = before;
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update field {path:?} of a snapshot"
                    )));
                }
            }
        }
        rec.updated_ns = now_ns();
        let updated = info_of(&info.name, rec);
        if let Err(e) = save(&meta) {
            if let Some(rec) = meta.get_mut(&info.name) {
                *rec = before;
            }
            return Err(SnapshotError::internal("cannot save the metadata", e));
        }
        Ok(updated)
    }

    async fn list(&self, filters: Vec<String>) -> Result<Vec<pb::Info>, SnapshotError> {
        let meta = self.inner.meta.lock().await;
        Ok(meta
            .iter()
            .filter(|(name, rec)| {
                filter::matches(
                    &filters,
                    &filter::Subject {
                        name,
                        parent: &rec.parent,
                        kind: kind_name(rec.kind),
                        labels: &rec.labels,
                    },
                )
            })
            .map(|(name, rec)| info_of(name, rec))
            .collect())
    }

    async fn usage(&self, key: &str) -> Result<(i64, i64), SnapshotError> {
        let (kind, dir) = {
            let meta = self.inner.meta.lock().await;
            let rec = meta.get(key).ok_or_else(|| SnapshotError::missing(key))?;
            (rec.kind, self.fs_dir(rec.id))
        };
        if kind == Kind::View {
            return Ok((0, 0));
        }
        tokio::task::spawn_blocking(move || usage_of(&dir))
            .await
            .map_err(|e| SnapshotError::internal("usage", e))
    }

    async fn cleanup(&self) -> Result<(), SnapshotError> {
        self.remove_orphans().await;
        Ok(())
    }
}
