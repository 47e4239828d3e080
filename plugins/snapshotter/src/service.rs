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

use modelpack_daemon as daemon;
use modelpack_lazyfs::{CacheBudget, CacheStats, Counters, GcReport, HolderProcess};
use modelpack_proto::containerd_client::types::Mount;
use modelpack_proto::snapshots as pb;
use modelpack_spec::{Digest, labels};
use modelpack_store::Store;
use tracing::{info, warn};

use crate::config::Settings;
use crate::filter;
use crate::metadata::{Kind, Metadata, Record, RemoteLayer, now_ns};
use crate::mounter::{LayerMounter, Lazyfs, ServedLayer};
use crate::mounts;
use crate::snapshotter::{SnapshotError, Snapshotter};

/// How long a remote mount may take (manifest, chunk index, FUSE mount) before Prepare falls
/// back to an ordinary snapshot.
const REMOTE_MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A remote snapshot's mount, or why it has none.
#[derive(Debug)]
pub enum MountState {
    /// Served.
    Mounted {
        /// The mount.
        model: Box<dyn ServedLayer>,
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
    /// The FUSE holder keeps its connection: it survives a restart of the daemon.
    pub held: bool,
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
    /// What serves remote layers (lazyfs; a stand-in in the unit tests).
    mounter: Arc<dyn LayerMounter>,
    /// The chunk cache's accountant (none with a stand-in mounter).
    cache: Option<Arc<CacheBudget>>,
    /// Keeps the FUSE connections across restarts (none when configured off).
    holder: Option<HolderProcess>,
    /// Folder numbers of remote snapshots being mounted (no record names them yet).
    reserved: Mutex<std::collections::HashSet<u64>>,
    remote: Mutex<BTreeMap<String, RemoteMount>>,
    started: Instant,
    stats: Stats,
}

/// The lock of one chain ID while a remote Prepare of it runs (or waits for it). Dropped, also
/// when the Prepare is cancelled, it forgets the lock once nobody else holds or waits for it.
struct ChainGuard<'a> {
    service: &'a Service,
    target: String,
    chain: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ChainGuard<'_> {
    fn drop(&mut self) {
        drop(self.held.take());
        let mut locks = lock(&self.service.inner.preparing);
        // Ours and the map's: nobody else holds or waits for it.
        if Arc::strong_count(&self.chain) == 2 {
            locks.remove(&self.target);
        }
    }
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
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
    let digests = parse("manifest", manifest).and_then(|m| Ok((m, parse("layer", layer)?)));
    Some(digests.map(|(manifest_digest, layer_digest)| RemoteLayer {
        reference: reference.clone(),
        manifest_digest,
        layer_digest,
        media_type: labels.get(labels::MEDIA_TYPE).cloned().unwrap_or_default(),
        path: labels.get(labels::FILE_PATH).cloned().unwrap_or_default(),
    }))
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
    /// Opens the root (creating it), loads the metadata; remote layers are served by lazyfs.
    pub fn open(settings: Settings) -> anyhow::Result<Service> {
        use anyhow::Context as _;
        let store = Store::open(&settings.root.join("store"))
            .with_context(|| format!("cannot open {}", settings.root.join("store").display()))?;
        let cache = CacheBudget::open(&settings.cache_dir, settings.cache_max_bytes)?;
        let mounter = Arc::new(Lazyfs::new(settings.clone(), store, cache.clone()));
        let holder = settings
            .fuse_holder
            .as_deref()
            .map(|socket| daemon::holder_process(socket, &settings.root));
        Service::build(settings, mounter, Some(cache), holder)
    }

    /// Opens the root (creating it), loads the metadata; remote layers are served by `mounter`
    /// (a stand-in: there is no chunk cache to account).
    #[cfg(test)]
    pub fn with_mounter(
        settings: Settings,
        mounter: Arc<dyn LayerMounter>,
    ) -> anyhow::Result<Service> {
        Service::build(settings, mounter, None, None)
    }

    /// Opens the root (creating it), loads the metadata; remote layers are served by `mounter`,
    /// whose chunk cache `cache` accounts.
    fn build(
        settings: Settings,
        mounter: Arc<dyn LayerMounter>,
        cache: Option<Arc<CacheBudget>>,
        holder: Option<HolderProcess>,
    ) -> anyhow::Result<Service> {
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
        let meta = Metadata::open(&settings.root).with_context(|| {
            format!("cannot read the metadata under {}", settings.root.display())
        })?;
        Ok(Service {
            inner: Arc::new(Inner {
                settings,
                meta: tokio::sync::Mutex::new(meta),
                preparing: Mutex::new(HashMap::new()),
                mounter,
                cache,
                holder,
                reserved: Mutex::new(std::collections::HashSet::new()),
                remote: Mutex::new(BTreeMap::new()),
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

    /// The chunk cache's numbers (none with a stand-in mounter).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.inner.cache.as_ref().map(|c| c.stats())
    }

    /// Removes the cache of layers no snapshot uses any more: chunk caches of layers no record
    /// names and no mount holds, and unpacked trees of models no record names (left alone while
    /// a remote Prepare is mounting: it may be unpacking). The metadata lock is held throughout,
    /// so no Prepare starts meanwhile.
    pub async fn gc_cache(&self) -> GcReport {
        let Some(cache) = self.inner.cache.clone() else {
            return GcReport::default();
        };
        let meta = self.inner.meta.lock().await;
        let mut layers = std::collections::HashSet::new();
        let mut manifests = std::collections::HashSet::new();
        for (_, rec) in meta.iter() {
            if let Some(remote) = &rec.remote {
                layers.insert(remote.layer_digest.clone());
                manifests.insert(remote.manifest_digest.encoded().to_owned());
            }
        }
        let mounting = self.reserved_mut(|r| !r.is_empty());
        let live_tree = |name: &str| manifests.contains(name.split('-').next().unwrap_or(name));
        let report = tokio::task::block_in_place(|| {
            cache.gc(
                &|d| layers.contains(d),
                (!mounting).then_some(&live_tree as &dyn Fn(&str) -> bool),
            )
        });
        drop(meta);
        info!(
            blobs = report.blobs,
            trees = report.trees,
            freed = report.bytes,
            "cache garbage collected"
        );
        report
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

    /// Mounts one remote layer at `dir` with the service's mounter, within the time limit; with
    /// `adopt`, serves a predecessor's connection already mounted there.
    async fn mount_layer(
        &self,
        layer: &RemoteLayer,
        dir: &Path,
        adopt: Option<Arc<modelpack_lazyfs::Handover>>,
    ) -> Result<MountState, String> {
        if adopt.is_none() {
            // Not on an adopted mount point: a stat there waits for the server (this process).
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let started = Instant::now();
        let model = tokio::time::timeout(
            REMOTE_MOUNT_TIMEOUT,
            self.inner.mounter.mount(layer, dir, adopt),
        )
        .await
        .map_err(|_| format!("mounting took longer than {REMOTE_MOUNT_TIMEOUT:?}"))??;
        let stats = &self.inner.stats;
        stats.mounts.fetch_add(1, Ordering::Relaxed);
        stats
            .mount_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let counters = model.counters();
        tracing::debug!(path = %layer.path, took = ?started.elapsed(), "remote layer mounted");
        Ok(MountState::Mounted { model, counters })
    }

    /// Gives the holder (if any) the connection of the layer mounted at `dir`; true when it
    /// keeps it.
    async fn hold(&self, dir: &Path, state: &MountState) -> bool {
        match (&self.inner.holder, state) {
            (Some(holder), MountState::Mounted { model, .. }) => {
                holder.hold_connection(dir, model.connection()).await
            }
            _ => false,
        }
    }

    /// Unmounts a remote layer, after the holder let go of its connection.
    async fn unmount_remote(&self, mount: RemoteMount) {
        if mount.held
            && let Some(holder) = &self.inner.holder
        {
            holder.release(&mount.mountpoint).await;
        }
        unmount(mount.state, &mount.mountpoint).await;
    }

    /// The lock of the chain `target` (created on first use).
    fn chain_lock(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.inner.preparing);
        locks.entry(target.to_owned()).or_default().clone()
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
        let mut chain = ChainGuard {
            service: self,
            target: target.to_owned(),
            chain: self.chain_lock(target),
            held: None,
        };
        chain.held = Some(chain.chain.clone().lock_owned().await);
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
        // The holder (started on first use) comes up while the layer mounts, not after it. A
        // mount that fails does not wait for it: the start ends by itself (within its timeout).
        let warm_holder = self.inner.holder.clone().map(|holder| {
            tokio::spawn(async move {
                holder.warm_up().await;
            })
        });
        let mounted = self.mount_layer(&layer, &fs, None).await;
        if mounted.is_ok()
            && let Some(warming) = warm_holder
        {
            let _ = warming.await;
        }
        let state = match mounted {
            Ok(state) => state,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let held = self.hold(&fs, &state).await;
        let mount = RemoteMount {
            layer: layer.clone(),
            mountpoint: fs.clone(),
            state,
            held,
        };
        let mut labels: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.insert(labels::REMOTE.to_owned(), "true".to_owned());
        let now = now_ns();
        let mut meta = self.inner.meta.lock().await;
        let parent_gone = !parent.is_empty() && meta.get(parent).is_none();
        if meta.get(target).is_some() || parent_gone {
            drop(meta);
            self.unmount_remote(mount).await;
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
            self.unmount_remote(mount).await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("cannot save the metadata: {e}"));
        }
        self.remote_mut(|m| m.insert(target.to_owned(), mount));
        Ok(())
    }

    /// Start-up: adopts the FUSE connections a predecessor left with the holder (those mounts
    /// never went away: their readers only waited), detaches other mounts a dead predecessor
    /// left, removes folders no record names, and mounts every other remote snapshot again.
    /// Fails on the first snapshot it cannot serve unless `allow_invalid_mounts_on_restart` is
    /// set; then it reports them and goes on.
    pub async fn restore(&self) -> anyhow::Result<()> {
        let snapshots = self.inner.settings.root.join("snapshots");
        let known: std::collections::HashSet<PathBuf> = {
            let meta = self.inner.meta.lock().await;
            meta.iter()
                .filter(|(_, r)| r.remote.is_some())
                .map(|(_, r)| self.fs_dir(r.id))
                .collect()
        };
        // Connections a predecessor left with the holder, for mounts that are still there.
        let mut held = daemon::take_held(self.inner.holder.as_ref(), |dir, handover| {
            let mounted = modelpack_lazyfs::mountinfo::at(dir);
            known.contains(dir) && mounted.is_some_and(|m| m.dev == handover.state.dev)
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot take the FUSE connections back: {e}"))?;
        for stale in mounts::under(&snapshots) {
            if held.contains_key(&stale) {
                continue;
            }
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
            let adopted = match held.remove(&fs) {
                Some(handover) => {
                    let started = Instant::now();
                    match self.mount_layer(&layer, &fs, Some(handover)).await {
                        Ok(state) => {
                            info!(snapshot = %name, path = %layer.path, took = ?started.elapsed(), "adopted the FUSE connection of a remote snapshot");
                            Some(state)
                        }
                        Err(e) => {
                            // Its readers get ENOTCONN; the layer is mounted afresh below.
                            warn!(snapshot = %name, path = %layer.path, error = %e, "cannot adopt the FUSE connection; mounting afresh");
                            if let Some(holder) = &self.inner.holder {
                                holder.release(&fs).await;
                            }
                            let _ = mounts::detach(&fs);
                            None
                        }
                    }
                }
                None => None,
            };
            let mounted = match adopted {
                Some(state) => Ok(state),
                None => self.mount_layer(&layer, &fs, None).await,
            };
            let state = match mounted {
                Ok(state) => {
                    info!(snapshot = %name, path = %layer.path, "remounted remote snapshot");
                    state
                }
                Err(e) => {
                    failed += 1;
                    warn!(snapshot = %name, path = %layer.path, error = %e, "cannot remount remote snapshot");
                    if !self.inner.settings.allow_invalid_mounts_on_restart {
                        anyhow::bail!(
                            "cannot mount remote snapshot {name} ({}) again: {e} \
                             (start with --allow-invalid-mounts-on-restart to continue without it)",
                            layer.path
                        );
                    }
                    MountState::Failed(e)
                }
            };
            let held = self.hold(&fs, &state).await;
            self.remote_mut(|m| {
                m.insert(
                    name,
                    RemoteMount {
                        layer,
                        mountpoint: fs,
                        state,
                        held,
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

    /// On exit: unmounts the remote snapshots the holder does not keep, and abandons the
    /// others mounted, for the next daemon to adopt (their readers wait meanwhile). Returns how
    /// many it abandoned: the process must then exit at once, without dropping anything (a read
    /// in flight, dropped, would answer EIO; unanswered, the next daemon has it sent again).
    pub async fn shutdown(&self) -> usize {
        let all = self.remote_mut(std::mem::take);
        let mut left = 0;
        for (_, mount) in all {
            match mount.state {
                MountState::Mounted { model, .. } if mount.held => {
                    model.leave();
                    left += 1;
                }
                _ => unmount(mount.state, &mount.mountpoint).await,
            }
        }
        left
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
            self.unmount_remote(mount).await;
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
        self.gc_cache().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The service's bookkeeping and locking with a stand-in mounter: no FUSE, no registry, no
    //! containerd.

    use std::sync::atomic::AtomicUsize;

    use tonic::{Code, Status};

    use super::*;
    use crate::config::Overrides;

    #[derive(Debug)]
    struct FakeLayer(Arc<Counters>);

    #[tonic::async_trait]
    impl ServedLayer for FakeLayer {
        fn content_size(&self) -> u64 {
            0
        }

        fn counters(&self) -> Arc<Counters> {
            self.0.clone()
        }

        async fn unmount(self: Box<Self>) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Counts mounts; optionally fails them, or holds each one until `gate` lets a second in.
    #[derive(Debug, Default)]
    struct FakeMounter {
        mounts: AtomicUsize,
        fail: bool,
        gate: Option<Arc<tokio::sync::Barrier>>,
    }

    #[tonic::async_trait]
    impl LayerMounter for FakeMounter {
        async fn mount(
            &self,
            _layer: &RemoteLayer,
            _dir: &Path,
            _adopt: Option<Arc<modelpack_lazyfs::Handover>>,
        ) -> Result<Box<dyn ServedLayer>, String> {
            self.mounts.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.wait().await;
            }
            if self.fail {
                return Err("the registry is gone".into());
            }
            Ok(Box::new(FakeLayer(Arc::new(Counters::default()))))
        }
    }

    fn service(dir: &Path, mounter: Arc<FakeMounter>) -> Service {
        let settings = Settings::load(
            None,
            Overrides {
                root: Some(dir.to_owned()),
                ..Overrides::default()
            },
        )
        .expect("settings");
        Service::with_mounter(settings, mounter).expect("service")
    }

    fn remote(chain: &str, layer: &[u8]) -> HashMap<String, String> {
        HashMap::from([
            (labels::SNAPSHOT_REF.to_owned(), chain.to_owned()),
            (
                labels::REFERENCE.to_owned(),
                "registry.invalid/team/model:v1".to_owned(),
            ),
            (
                labels::MANIFEST_DIGEST.to_owned(),
                Digest::sha256_of(b"manifest").to_string(),
            ),
            (
                labels::LAYER_DIGEST.to_owned(),
                Digest::sha256_of(layer).to_string(),
            ),
            (labels::FILE_PATH.to_owned(), "config.json".to_owned()),
        ])
    }

    fn code(result: Result<impl std::fmt::Debug, SnapshotError>) -> Code {
        Status::from(result.expect_err("an error")).code()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_prepare_commits_the_chain_and_the_next_one_finds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mounter = Arc::new(FakeMounter::default());
        let svc = service(dir.path(), mounter.clone());
        let labels = remote("chain-1", b"layer");
        assert_eq!(
            code(svc.prepare("extract-1", "", labels.clone()).await),
            Code::AlreadyExists
        );
        let info = svc.stat("chain-1").await.expect("committed");
        assert_eq!(info.kind, pb::Kind::Committed as i32);
        assert_eq!(
            info.labels.get(labels::REMOTE).map(String::as_str),
            Some("true")
        );
        assert_eq!(
            code(svc.prepare("extract-2", "", labels).await),
            Code::AlreadyExists
        );
        assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);
        assert_eq!(svc.list(Vec::new()).await.expect("list").len(), 1);
        svc.remove("chain-1").await.expect("remove");
        assert_eq!(code(svc.stat("chain-1").await), Code::NotFound);
        assert!(svc.with_remote(|m| m.is_empty()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_prepares_of_one_chain_mount_it_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mounter = Arc::new(FakeMounter::default());
        let svc = service(dir.path(), mounter.clone());
        let runs: Vec<_> = (0..2)
            .map(|i| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    svc.prepare(&format!("extract-{i}"), "", remote("chain", b"x"))
                        .await
                })
            })
            .collect();
        for run in runs {
            assert_eq!(code(run.await.expect("join")), Code::AlreadyExists);
        }
        assert_eq!(mounter.mounts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prepares_of_two_chains_mount_at_the_same_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Each mount waits until the other one has started: under one global lock neither
        // Prepare could finish.
        let mounter = Arc::new(FakeMounter {
            gate: Some(Arc::new(tokio::sync::Barrier::new(2))),
            ..FakeMounter::default()
        });
        let svc = service(dir.path(), mounter.clone());
        let both = async {
            tokio::join!(
                svc.prepare("extract-a", "", remote("chain-a", b"a")),
                svc.prepare("extract-b", "", remote("chain-b", b"b")),
            )
        };
        let (a, b) = tokio::time::timeout(Duration::from_secs(20), both)
            .await
            .expect("the two chains waited for each other");
        assert_eq!(code(a), Code::AlreadyExists);
        assert_eq!(code(b), Code::AlreadyExists);
        assert_eq!(mounter.mounts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gc_removes_the_cache_of_layers_no_snapshot_names_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = Settings::load(
            None,
            Overrides {
                root: Some(dir.path().to_owned()),
                ..Overrides::default()
            },
        )
        .expect("settings");
        let cache = CacheBudget::open(&settings.cache_dir, None).expect("cache");
        let svc = Service::build(
            settings.clone(),
            Arc::new(FakeMounter::default()),
            Some(cache),
            None,
        )
        .expect("service");
        assert_eq!(
            code(
                svc.prepare("extract-1", "", remote("chain-1", b"kept"))
                    .await
            ),
            Code::AlreadyExists
        );
        let manifest = Digest::sha256_of(b"manifest");
        let files = |layer: &[u8]| {
            let stem = format!("sha256-{}", Digest::sha256_of(layer).encoded());
            ["data", "chunks"].map(|ext| settings.cache_dir.join(format!("{stem}.{ext}")))
        };
        for path in files(b"kept").iter().chain(&files(b"gone")) {
            std::fs::write(path, b"\x01").expect("write");
        }
        let trees = settings.cache_dir.join("trees");
        let live_tree = trees.join(format!("{}-0123456789abcdef", manifest.encoded()));
        let dead_tree = trees.join(Digest::sha256_of(b"other").encoded());
        for tree in [&live_tree, &dead_tree] {
            std::fs::create_dir_all(tree).expect("mkdir");
        }
        let report = svc.gc_cache().await;
        assert_eq!((report.blobs, report.trees), (1, 1), "{report:?}");
        assert!(files(b"kept").iter().all(|p| p.exists()));
        assert!(files(b"gone").iter().all(|p| !p.exists()));
        assert!(live_tree.exists() && !dead_tree.exists());
        // Once containerd removed the snapshot, its cache goes too.
        svc.remove("chain-1").await.expect("remove");
        assert_eq!(svc.gc_cache().await.blobs, 1);
        assert!(files(b"kept").iter().all(|p| !p.exists()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_mount_falls_back_to_an_ordinary_active_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mounter = Arc::new(FakeMounter {
            fail: true,
            ..FakeMounter::default()
        });
        let svc = service(dir.path(), mounter);
        let mounts = svc
            .prepare("extract-1", "", remote("chain-1", b"layer"))
            .await
            .expect("an ordinary snapshot");
        assert_eq!(mounts.len(), 1);
        let info = svc.stat("extract-1").await.expect("active");
        assert_eq!(info.kind, pb::Kind::Active as i32);
        assert_eq!(code(svc.stat("chain-1").await), Code::NotFound);
        assert_eq!(svc.stats().remote_fallbacks.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ordinary_snapshots_and_their_errors_map_to_containerds_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = service(dir.path(), Arc::new(FakeMounter::default()));
        svc.prepare("a", "", HashMap::new()).await.expect("prepare");
        // An existing key, a missing parent, an empty key, a view of an active snapshot.
        let refused = [
            code(svc.prepare("a", "", HashMap::new()).await),
            code(svc.prepare("b", "nope", HashMap::new()).await),
            code(svc.prepare("", "", HashMap::new()).await),
            code(svc.view("v0", "a", HashMap::new()).await),
        ];
        assert_eq!(
            refused,
            [
                Code::AlreadyExists,
                Code::NotFound,
                Code::InvalidArgument,
                Code::FailedPrecondition
            ]
        );
        svc.commit("c", "a", HashMap::new()).await.expect("commit");
        assert_eq!(
            code(svc.commit("x", "missing", HashMap::new()).await),
            Code::NotFound
        );
        let mounts = svc.view("v", "c", HashMap::new()).await.expect("view");
        assert_eq!(mounts.len(), 1);
        assert_eq!(code(svc.remove("c").await), Code::FailedPrecondition);
        assert_eq!(code(svc.stat("nope").await), Code::NotFound);
        let mut info = svc.stat("c").await.expect("stat");
        info.labels.insert("k".into(), "v".into());
        let updated = svc
            .update(info.clone(), vec!["labels.k".into()])
            .await
            .expect("update");
        assert_eq!(updated.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            code(svc.update(info, vec!["parent".into()]).await),
            Code::InvalidArgument
        );
        svc.remove("v").await.expect("remove the view");
        svc.remove("c").await.expect("remove");
        assert!(svc.list(Vec::new()).await.expect("list").is_empty());
    }
}
