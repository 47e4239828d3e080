//! The node's volumes and the models mounted for them.
//!
//! One lazyfs mount per model digest, under `STATE/models/`, shared by every volume of that
//! model on the node and bound read-only onto each volume's target path. The chunk cache is
//! keyed by blob digest, so two pods of one model cause one download. When the last volume of
//! a model is unpublished its mount goes (the kernel lets go once no container holds it); its
//! verified chunks stay in the cache folder for the next pod, until the cache cap evicts them.
//! The volumes are recorded in `STATE/volumes.json` (no secrets), so a restarted plugin knows
//! what it published (see [`Volumes::restore`]). Every publish is checked at the registry with
//! the caller's credentials (a manifest HEAD by digest, positive answers cached briefly), and a
//! model's mount reads with its own client, whose credentials a publish's secret replaces.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelpack_daemon as daemon;
use modelpack_lazyfs::{
    CacheBudget, CacheStats, Handover, HolderProcess, MountOptions, MountedModel, Resolved, Verify,
};
use modelpack_registry::{Client, ClientOptions, Credential, Repository, RetryPolicy};
use modelpack_spec::{Digest, Reference};
use modelpack_store::Store;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tracing::{info, warn};

use crate::error::Error;
use crate::mounts;
use crate::volume::Publish;

/// How the node plugin works: where its state lives, how it reaches registries.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's ID (the Kubernetes node name), answered by NodeGetInfo.
    pub node_id: String,
    /// The plugin's state: model mounts, the volume records, the store of whole blobs.
    pub state_dir: PathBuf,
    /// The chunk cache folder (the snapshotter's, to share one cache with it).
    pub cache_dir: PathBuf,
    /// The cache cap in bytes (least recently used chunks are evicted beyond it).
    pub cache_max_bytes: Option<u64>,
    /// containerd's registry hosts folder (`REGISTRY/hosts.toml`: mirrors, TLS).
    pub hosts_dir: Option<PathBuf>,
    /// Registries spoken to over plain HTTP (loopback registries always are).
    pub plain_http: Vec<String>,
    /// Registries whose TLS certificates are not verified.
    pub insecure: Vec<String>,
    /// How long a publish may spend resolving a model before it answers UNAVAILABLE.
    pub resolve_timeout: Duration,
    /// Files of at most this many bytes are fetched as soon as a model mounts (configs,
    /// tokenizers); 0: none.
    pub prefetch_small: u64,
    /// The process that keeps the models' FUSE connections while the plugin restarts (started
    /// when none answers); `None`: a restart cuts every read in flight.
    pub fuse_holder: Option<HolderProcess>,
}

/// One published volume, as recorded (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    /// The CO's volume ID.
    pub volume_id: String,
    /// The target path it is bound at.
    pub target: PathBuf,
    /// The reference as asked for.
    pub reference: String,
    /// The manifest digest it resolved to at publish (the volume never changes after).
    pub digest: Digest,
    /// An inline volume.
    pub ephemeral: bool,
    /// `namespace/name` of its pod, if known.
    pub pod: Option<String>,
    /// The whole model was asked to be fetched in the background.
    #[serde(default)]
    pub prefetch: bool,
    /// Published with a `nodePublishSecretRef` (whose content is never recorded): after a
    /// restart the model lacks those credentials until a publish brings them again.
    #[serde(default)]
    pub with_secret: bool,
}

/// One model served on the node.
struct Model {
    mounted: MountedModel,
    dir: PathBuf,
    /// `REGISTRY/REPO@DIGEST`.
    reference: String,
    /// `REGISTRY/REPO` it reads from: only a publish naming this same repository may hand
    /// it credentials (another repository's, even for the same digest, never reach it).
    repository: String,
    prefetch: bool,
    /// The holder keeps its connection: it survives a restart of the plugin.
    held: bool,
    /// The client its lazy mount reads with: its own, so that the credentials of a publish
    /// can be swapped in for this model alone ([`Client::set_credential`]).
    read: Client,
    /// Fingerprint of the credentials `read` holds; `None`: the node's Docker config.
    credential: Option<[u8; 32]>,
    /// Mounted again by a restarted plugin for volumes published with a secret, which the
    /// plugin does not keep: reads of uncached bytes may be refused until a publish brings
    /// working credentials again.
    awaiting_credentials: bool,
}

#[derive(Default)]
struct State {
    models: HashMap<Digest, Model>,
    volumes: BTreeMap<PathBuf, Volume>,
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Publishes that succeeded (repeats included).
    pub publishes: AtomicU64,
    /// Publishes that failed.
    pub publish_errors: AtomicU64,
    /// Time spent in successful publishes, microseconds.
    pub publish_micros: AtomicU64,
    /// Unpublishes.
    pub unpublishes: AtomicU64,
    /// Lazy mounts of models made.
    pub mounts: AtomicU64,
}

/// One model's numbers, for the metrics and the volume stats.
#[derive(Debug, Clone)]
pub struct ModelRow {
    /// `REGISTRY/REPO@DIGEST`.
    pub reference: String,
    /// The manifest digest.
    pub digest: Digest,
    /// Volumes using it.
    pub volumes: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Of which are local and verified.
    pub local_bytes: u64,
    /// Bytes fetched from the registry by this mount.
    pub fetched_bytes: u64,
    /// Whether the whole model is being prefetched.
    pub prefetch: bool,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone)]
pub struct VolumeStats {
    /// Bytes of the model.
    pub total: u64,
    /// Bytes of it cached on the node, verified.
    pub local: u64,
    /// Why the volume is not healthy, if it is not.
    pub abnormal: Option<String>,
}

#[derive(Clone)]
struct Clients {
    /// Short retries: a publish must answer before kubelet's deadline.
    resolve: Client,
    /// The standard policy, for each model's own read client: reads of a running pod ride
    /// out a registry hiccup.
    read_options: ClientOptions,
    /// The credentials of the publish's secret for this registry, if it has some.
    credential: Option<Credential>,
    /// Their fingerprint (a hash, never the secret); `None`: the node's Docker config.
    fingerprint: Option<[u8; 32]>,
    /// The publish brought a secret (which may have no entry for this registry).
    with_secret: bool,
}

/// A positive access check: (credential fingerprint, `REGISTRY/REPO`, manifest digest).
type AccessKey = (Option<[u8; 32]>, String, Digest);

/// How long a positive access check is trusted.
const ACCESS_TTL: Duration = Duration::from_secs(600);
/// How long a `stat` of a FUSE path may take before the mount counts as dead.
const STAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Registry host and the hash of the secret (never the secret) the clients were made with.
type ClientKey = (String, Option<[u8; 32]>);

/// The node's published volumes and the models mounted for them.
pub struct Volumes {
    config: NodeConfig,
    store: Store,
    cache: Arc<CacheBudget>,
    clients: Mutex<HashMap<ClientKey, Clients>>,
    /// Positive answers of the registry to "may these credentials read this manifest".
    access: Mutex<HashMap<AccessKey, Instant>>,
    /// One lock per model digest, held while the model is checked, mounted, bound or
    /// released: concurrent publishes of one model collapse into one mount. Taken before
    /// `state`, never while holding it.
    model_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per target path, taken first by every publish and unpublish of it (before its
    /// model's lock): they never interleave at one target.
    target_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Short bookkeeping only: no network or FUSE work is done while it is held.
    state: tokio::sync::Mutex<State>,
    next_mount: AtomicU64,
    /// Counters for the metrics.
    pub stats: Stats,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes")
            .field("state_dir", &self.config.state_dir)
            .finish_non_exhaustive()
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

const VOLUMES_FILE: &str = "volumes.json";
const CLIENTS_KEPT: usize = 256;

impl Volumes {
    /// Opens the state folder (created), the store in it and the cache folder. Without a FUSE
    /// holder, mounts left by an earlier process under `STATE/models` are detached; with one,
    /// [`Volumes::restore`] first adopts those it can.
    pub fn open(config: NodeConfig) -> Result<Volumes, Error> {
        let models = config.state_dir.join("models");
        std::fs::create_dir_all(&models).map_err(|e| internal("state folder", e))?;
        if config.fuse_holder.is_none() {
            detach_stale(&models, &HashMap::new());
        }
        let store =
            Store::open(&config.state_dir.join("store")).map_err(|e| internal("store", e))?;
        let cache = CacheBudget::open(&config.cache_dir, config.cache_max_bytes)
            .map_err(|e| internal("cache", e))?;
        Ok(Volumes {
            config,
            store,
            cache,
            clients: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
            model_locks: Mutex::new(HashMap::new()),
            target_locks: Mutex::new(HashMap::new()),
            state: tokio::sync::Mutex::new(State::default()),
            next_mount: AtomicU64::new(0),
            stats: Stats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The cache folder's numbers.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn clients(&self, host: &str, docker_config: Option<&str>) -> Result<Clients, Error> {
        let secret_hash = docker_config.map(|c| <[u8; 32]>::from(sha2::Sha256::digest(c)));
        let key = (host.to_owned(), secret_hash);
        if let Some(c) = lock(&self.clients).get(&key) {
            return Ok(c.clone());
        }
        let credential: Option<Credential> = match docker_config {
            Some(config) => crate::secrets::credential_for(config, host)?,
            None => None,
        };
        let fingerprint = credential.as_ref().map(fingerprint);
        let base = ClientOptions {
            plain_http: modelpack_registry::is_loopback(host)
                || self.config.plain_http.iter().any(|h| h == host),
            insecure: self.config.insecure.iter().any(|h| h == host),
            hosts_dir: self.config.hosts_dir.clone(),
            credential: credential.clone(),
            ..ClientOptions::new()
        };
        let timeout = self.config.resolve_timeout;
        let resolve = Client::new(ClientOptions {
            io_timeout: timeout,
            retry: RetryPolicy {
                attempts: 3,
                base: Duration::from_millis(200),
                cap: Duration::from_secs(2),
                deadline: timeout,
            },
            ..base.clone()
        })
        .map_err(|e| Error::InvalidArgument(format!("registry {host}: {e}")))?;
        let clients = Clients {
            resolve,
            read_options: base,
            credential,
            fingerprint,
            with_secret: docker_config.is_some(),
        };
        let mut all = lock(&self.clients);
        if all.len() >= CLIENTS_KEPT {
            all.clear();
        }
        all.insert(key, clients.clone());
        Ok(clients)
    }

    /// Publishes a volume: resolves the model (a tag once, to its digest), checks at the
    /// registry that the caller's credentials may read it, mounts it lazily if the node does
    /// not serve it yet (or its mount died), binds it read-only at the target. Returns once
    /// the tree is there; file bytes arrive on first read. Publishing the same volume at the
    /// same target again is a success, and hands the model the credentials it brings.
    pub async fn publish(&self, p: Publish) -> Result<(), Error> {
        self.publish_as(p, None).await
    }

    /// [`Volumes::publish`]; `restoring`: `Some(with_secret)` when a restarted plugin
    /// publishes a recorded volume again (no access check: the secret is not known, and the
    /// pod was let in before).
    async fn publish_as(&self, p: Publish, restoring: Option<bool>) -> Result<(), Error> {
        let started = Instant::now();
        let result = self.publish_inner(&p, restoring).await;
        match &result {
            Ok(()) => {
                self.stats.publishes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .publish_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                warn!(volume = %p.volume_id, target = %p.target.display(), "publish failed: {e}");
            }
        }
        result
    }

    /// The record at `target`, if it is `volume_id`'s; another volume there is an error.
    async fn recorded(&self, target: &Path, volume_id: &str) -> Result<Option<Volume>, Error> {
        let state = self.state.lock().await;
        match state.volumes.get(target) {
            Some(v) if v.volume_id != volume_id => Err(Error::AlreadyExists(format!(
                "{} already serves volume {}",
                target.display(),
                v.volume_id
            ))),
            other => Ok(other.cloned()),
        }
    }

    async fn publish_inner(&self, p: &Publish, restoring: Option<bool>) -> Result<(), Error> {
        let target_lock = self.target_lock(&p.target);
        let _target = target_lock.lock().await;
        let recorded = self.recorded(&p.target, &p.volume_id).await?;
        let clients = self.clients(p.reference.registry(), p.docker_config.as_deref())?;
        // A recorded volume keeps the digest it was published with.
        let (digest, resolved) = match (&recorded, p.reference.digest()) {
            (Some(v), _) => (v.digest.clone(), None),
            (None, Some(d)) => (d.clone(), None),
            (None, None) => {
                let resolved = self.resolve(&clients, &p.reference).await?;
                (resolved.digest.clone(), Some(resolved))
            }
        };
        if restoring.is_none() {
            self.authorize(&clients, &p.reference, &digest).await?;
        }
        let model_lock = self.model_lock(&digest);
        let _model = model_lock.lock().await;
        let recorded = self.recorded(&p.target, &p.volume_id).await?;
        if let Some(v) = &recorded
            && v.digest != digest
        {
            return Err(Error::AlreadyExists(format!(
                "{} already serves volume {} of another model",
                p.target.display(),
                v.volume_id
            )));
        }
        let served = self.state.lock().await.models.contains_key(&digest);
        if recorded.is_some()
            && served
            && mounts::is_mount_point(&p.target)
            && answers(&p.target).await
        {
            // A republish (kubelet does so periodically with requiresRepublish): the bind
            // serves; refresh the model's credentials.
            if restoring.is_none() {
                self.use_credentials(&digest, &p.reference, &clients).await;
            }
            return Ok(());
        }
        let (dir, mounted_now) = self
            .live_model(&digest, &p.reference, resolved, &clients, p.prefetch)
            .await?;
        match restoring {
            None => self.use_credentials(&digest, &p.reference, &clients).await,
            Some(with_secret) => {
                if with_secret
                    && let Some(model) = self.state.lock().await.models.get_mut(&digest)
                    && mounted_now
                {
                    model.awaiting_credentials = true;
                }
            }
        }
        let (source, target, create) = (dir.clone(), p.target.clone(), restoring.is_none());
        let bound = tokio::task::spawn_blocking(move || bind(&source, &target, create))
            .await
            .map_err(|e| internal("binding", e))
            .and_then(|r| r);
        let mut state = self.state.lock().await;
        if let Err(e) = bound {
            if mounted_now
                && !state.volumes.values().any(|v| v.digest == digest)
                && let Some(model) = state.models.remove(&digest)
            {
                self.release(model);
            }
            return Err(e);
        }
        let reference = state
            .models
            .get(&digest)
            .map_or_else(|| digest.to_string(), |m| m.reference.clone());
        if let Some(model) = state.models.get(&digest)
            && model.prefetch != p.prefetch
            && p.prefetch
        {
            info!(model = %reference, "already mounted without prefetch; its bytes arrive on first read");
        }
        info!(
            volume = %p.volume_id,
            model = %reference,
            target = %p.target.display(),
            pod = p.pod.as_deref().unwrap_or("-"),
            "published"
        );
        let with_secret = p.docker_config.is_some()
            || restoring == Some(true)
            || recorded.as_ref().is_some_and(|v| v.with_secret);
        state.volumes.insert(
            p.target.clone(),
            Volume {
                volume_id: p.volume_id.clone(),
                target: p.target.clone(),
                reference: recorded
                    .map_or_else(|| p.reference.to_string(), |v| v.reference.clone()),
                digest: digest.clone(),
                ephemeral: p.ephemeral,
                pod: p.pod.clone(),
                prefetch: p.prefetch,
                with_secret,
            },
        );
        self.save(&state);
        Ok(())
    }

    /// The lock of target `target` (see `Volumes::target_locks`).
    fn target_lock(&self, target: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.target_locks);
        if locks.len() >= CLIENTS_KEPT {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(target.to_owned()).or_default().clone()
    }

    /// The lock of model `digest` (see `Volumes::model_locks`).
    fn model_lock(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.model_locks);
        if locks.len() >= CLIENTS_KEPT {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(digest.clone()).or_default().clone()
    }

    /// The folder of a live mount of model `digest` (mounted now when there is none, or when
    /// the one there stopped answering), and whether it was mounted now. The caller holds the
    /// model's lock.
    async fn live_model(
        &self,
        digest: &Digest,
        reference: &Reference,
        resolved: Option<Resolved>,
        clients: &Clients,
        prefetch: bool,
    ) -> Result<(PathBuf, bool), Error> {
        let existing = self
            .state
            .lock()
            .await
            .models
            .get(digest)
            .map(|m| m.dir.clone());
        if let Some(dir) = existing {
            if mounts::is_mount_point(&dir) && answers(&dir).await {
                return Ok((dir, false));
            }
            // Its FUSE connection was aborted (or its server hangs, or it was unmounted behind
            // our back): replace it. The dead binds of its other volumes are bound again when
            // kubelet republishes them.
            warn!(dir = %dir.display(), "the model's lazy mount is gone or does not answer; mounting it again");
            let dead = self.state.lock().await.models.remove(digest);
            if let Some(model) = dead {
                let _ = mounts::detach(&model.dir);
                self.release(model);
            }
        }
        let resolved = match resolved {
            Some(r) => r,
            None => {
                self.resolve(clients, &reference.with_digest(digest.clone()))
                    .await?
            }
        };
        let model = self
            .mount_model(reference, resolved, clients, prefetch)
            .await?;
        let dir = model.dir.clone();
        self.state.lock().await.models.insert(digest.clone(), model);
        Ok((dir, true))
    }

    /// Checks at the registry that `clients`' credentials (the publish's secret, else the
    /// node's Docker config) may read manifest `digest` of `reference`'s repository: a HEAD by
    /// digest, whatever the node has mounted or stored. Positive answers are trusted for
    /// [`ACCESS_TTL`] per (credential fingerprint, repository, digest).
    async fn authorize(
        &self,
        clients: &Clients,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<(), Error> {
        let key: AccessKey = (
            clients.fingerprint,
            format!("{}/{}", reference.registry(), reference.repository()),
            digest.clone(),
        );
        if lock(&self.access)
            .get(&key)
            .is_some_and(|at| at.elapsed() < ACCESS_TTL)
        {
            return Ok(());
        }
        let by_digest = reference.with_digest(digest.clone());
        let text = by_digest.to_string();
        let whose = if clients.fingerprint.is_some() {
            "the volume's nodePublishSecretRef".to_owned()
        } else if clients.with_secret {
            format!(
                "the node's Docker config (the volume's nodePublishSecretRef has no entry for registry {})",
                reference.registry()
            )
        } else {
            "the node's Docker config (the volume has no nodePublishSecretRef)".to_owned()
        };
        let repository = Repository::new(&clients.resolve, &by_digest);
        let limit = self.config.resolve_timeout + Duration::from_secs(5);
        // At the registry's own server: a mirror's answer would say nothing of these
        // credentials.
        let answer = tokio::time::timeout(limit, repository.head_manifest_at_server(digest)).await;
        match answer {
            Ok(Ok(true)) => {
                let mut access = lock(&self.access);
                if access.len() >= CLIENTS_KEPT * 16 {
                    access.retain(|_, at| at.elapsed() < ACCESS_TTL);
                }
                access.insert(key, Instant::now());
                Ok(())
            }
            Ok(Ok(false)) => Err(Error::NotFound(format!(
                "model {text}: the registry has no such manifest for the credentials of {whose}"
            ))),
            Ok(Err(e)) if e.is_not_found() => Err(Error::NotFound(format!(
                "model {text}: the registry has no such manifest for the credentials of {whose}: {e}"
            ))),
            Ok(Err(e)) if e.is_unauthorized() => Err(Error::PermissionDenied(format!(
                "model {text}: the registry refused read access with the credentials of {whose}: {e}"
            ))),
            Ok(Err(e)) => Err(Error::Unavailable(format!(
                "model {text}: cannot check read access at the registry now: {e}"
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "model {text}: cannot check read access: the registry did not answer within {limit:?}"
            ))),
        }
    }

    /// After a publish of model `digest` passed the access check with `clients`: a model that
    /// reads with other credentials than the publish's secret gets the secret's (they were just
    /// shown to work), and one waiting for credentials since a restart is whole again once its
    /// client holds credentials that passed.
    /// A publish that named another registry or repository (with the same digest) hands the
    /// model nothing: its credentials are for that repository alone.
    async fn use_credentials(&self, digest: &Digest, reference: &Reference, clients: &Clients) {
        let mut state = self.state.lock().await;
        let Some(model) = state.models.get_mut(digest) else {
            return;
        };
        if model.repository != repository_of(reference) {
            return;
        }
        if clients.fingerprint.is_some() && model.credential != clients.fingerprint {
            model
                .read
                .set_credential(reference.registry(), clients.credential.clone());
            model.credential = clients.fingerprint;
            info!(model = %model.reference, "the model now reads with the credentials of this volume's secret");
        }
        if model.awaiting_credentials && model.credential == clients.fingerprint {
            info!(model = %model.reference, "the model has working registry credentials again");
            model.awaiting_credentials = false;
        }
    }

    /// The manifest and chunk index of `reference`, within the resolve timeout.
    async fn resolve(&self, clients: &Clients, reference: &Reference) -> Result<Resolved, Error> {
        let repository = Repository::new(&clients.resolve, reference);
        let text = reference.to_string();
        let limit = self.config.resolve_timeout + Duration::from_secs(5);
        match tokio::time::timeout(
            limit,
            modelpack_lazyfs::resolve(&repository, &reference.tag_or_digest(), &self.store),
        )
        .await
        {
            Ok(Ok(resolved)) => Ok(resolved),
            Ok(Err(e)) => Err(Error::resolving(&text, &e)),
            Err(_) => Err(Error::Unavailable(format!(
                "model {text}: the registry did not answer within {limit:?}"
            ))),
        }
    }

    async fn mount_model(
        &self,
        reference: &Reference,
        resolved: Resolved,
        clients: &Clients,
        prefetch: bool,
    ) -> Result<Model, Error> {
        let digest = resolved.digest.clone();
        let n = self.next_mount.fetch_add(1, Ordering::Relaxed);
        // A fresh folder per mount: an old mount of the same model may still be going away.
        let dir = self.config.state_dir.join("models").join(format!(
            "{}-{}.{n}",
            digest.algorithm(),
            digest.encoded()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| internal("model folder", e))?;
        self.mount_model_at(reference, resolved, clients, prefetch, dir, None)
            .await
    }

    /// Mounts the model at `dir`, or adopts `adopt`, a predecessor's connection mounted there
    /// (the tree is built with the same options, so inode numbers agree); then gives the
    /// connection to the holder.
    async fn mount_model_at(
        &self,
        reference: &Reference,
        resolved: Resolved,
        clients: &Clients,
        prefetch: bool,
        dir: PathBuf,
        adopt: Option<Arc<Handover>>,
    ) -> Result<Model, Error> {
        let digest = resolved.digest.clone();
        let by_digest = reference.with_digest(digest.clone());
        let adopting = adopt.is_some();
        let read = Client::new(clients.read_options.clone()).map_err(|e| {
            Error::InvalidArgument(format!("registry {}: {e}", reference.registry()))
        })?;
        let mut opts = MountOptions::new(
            Repository::new(&read, &by_digest),
            digest.to_string(),
            self.store.clone(),
            self.config.cache_dir.clone(),
        );
        opts.resolved = Some(Arc::new(resolved));
        opts.cache = Some(self.cache.clone());
        opts.verify = Verify::Full;
        opts.allow_other = true;
        opts.prefetch = prefetch;
        opts.prefetch_small = self.config.prefetch_small;
        opts.status_file = true;
        opts.adopt = adopt;
        opts.for_successor = self.config.fuse_holder.is_some();
        let mounted = match modelpack_lazyfs::mount(opts, &dir).await {
            Ok(m) => m,
            Err(e) => {
                if !adopting {
                    let _ = std::fs::remove_dir(&dir);
                }
                return Err(Error::resolving(&by_digest.to_string(), &e));
            }
        };
        self.stats.mounts.fetch_add(1, Ordering::Relaxed);
        if adopting {
            info!(model = %by_digest, dir = %dir.display(), "adopted the predecessor's FUSE connection");
        } else {
            info!(model = %by_digest, dir = %dir.display(), prefetch, "mounted");
        }
        let held = self.hold(&dir, &mounted).await;
        Ok(Model {
            mounted,
            dir,
            reference: by_digest.to_string(),
            repository: repository_of(reference),
            prefetch,
            held,
            read,
            credential: clients.fingerprint,
            awaiting_credentials: false,
        })
    }

    /// Gives the holder (if any) the connection of the model mounted at `dir`; true when it
    /// keeps it.
    async fn hold(&self, dir: &Path, mounted: &MountedModel) -> bool {
        match &self.config.fuse_holder {
            Some(holder) => holder.hold_connection(dir, mounted.connection()).await,
            None => false,
        }
    }

    /// Unmounts `model` in the background, after the holder let go of its connection: the
    /// kernel ends the session only once no container holds the mount, and nothing should wait
    /// for that.
    fn release(&self, model: Model) {
        let holder = self.config.fuse_holder.clone().filter(|_| model.held);
        tokio::spawn(async move {
            if let Some(holder) = holder {
                holder.release(&model.dir).await;
            }
            unmount_model(model).await;
        });
    }

    /// Unpublishes the volume at `target`: removes its bind and the folder, and, when it was the
    /// model's last volume, the model's mount (its cached chunks stay). A target that serves
    /// nothing is a success.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), Error> {
        if volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let target_lock = self.target_lock(target);
        let _target = target_lock.lock().await;
        let digest = {
            let state = self.state.lock().await;
            match state.volumes.get(target) {
                Some(v) if v.volume_id != volume_id => {
                    // Not the volume recorded there: it stays as it is.
                    warn!(recorded = %v.volume_id, asked = %volume_id, target = %target.display(), "unpublish names another volume ID than the one published there; left alone");
                    return Ok(());
                }
                Some(v) => Some(v.digest.clone()),
                None => None,
            }
        };
        // The model's lock: no publish of the model binds it meanwhile.
        let model_lock = digest.as_ref().map(|d| self.model_lock(d));
        let _model = match &model_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        let path = target.to_owned();
        tokio::task::spawn_blocking(move || mounts::detach_all_at(&path))
            .await
            .map_err(|e| internal("unmounting the target", e))?
            .map_err(|e| internal("unmounting the target", e))?;
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(target = %target.display(), "cannot remove the target folder: {e}"),
        }
        self.stats.unpublishes.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().await;
        let Some(volume) = state.volumes.remove(target) else {
            return Ok(());
        };
        info!(volume = %volume.volume_id, target = %target.display(), "unpublished");
        if !state.volumes.values().any(|v| v.digest == volume.digest)
            && let Some(model) = state.models.remove(&volume.digest)
        {
            info!(model = %model.reference, "last volume gone; unmounting (cached chunks stay)");
            self.release(model);
        }
        self.save(&state);
        Ok(())
    }

    /// The numbers of the volume at `path`.
    pub async fn volume_stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats, Error> {
        if volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let (total, local, awaiting) = {
            let state = self.state.lock().await;
            let volume = state
                .volumes
                .get(path)
                .filter(|v| v.volume_id == volume_id)
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "no volume {volume_id} is published at {}",
                        path.display()
                    ))
                })?;
            let Some(model) = state.models.get(&volume.digest) else {
                return Ok(VolumeStats {
                    total: 0,
                    local: 0,
                    abnormal: Some("the model is not mounted (the plugin restarted)".into()),
                });
            };
            let (total, local) = model_bytes(&model.mounted);
            (total, local, model.awaiting_credentials)
        };
        // FUSE paths are stat'ed without the lock, in a blocking thread, with a time limit.
        let abnormal = if !mounts::is_mount_point(path) {
            Some(format!("{} is no longer mounted", path.display()))
        } else if let Some(why) = match probe(path).await {
            Probe::Alive => None,
            Probe::Dead => Some("the lazy file system's connection is gone".to_owned()),
            Probe::Slow => Some(format!(
                "the lazy file system does not answer within {STAT_TIMEOUT:?}"
            )),
        } {
            Some(why)
        } else if awaiting && local < total {
            Some(
                "the plugin restarted and has no registry credentials for this private model \
                 yet: reads of bytes not cached on the node fail until kubelet publishes the \
                 volume again with its nodePublishSecretRef (requiresRepublish)"
                    .into(),
            )
        } else {
            None
        };
        Ok(VolumeStats {
            total,
            local,
            abnormal,
        })
    }

    /// Every model served, with its numbers.
    pub async fn model_rows(&self) -> Vec<ModelRow> {
        let state = self.state.lock().await;
        let mut rows: Vec<ModelRow> = state
            .models
            .iter()
            .map(|(digest, model)| {
                let (bytes, local_bytes) = model_bytes(&model.mounted);
                ModelRow {
                    reference: model.reference.clone(),
                    digest: digest.clone(),
                    volumes: state
                        .volumes
                        .values()
                        .filter(|v| &v.digest == digest)
                        .count() as u64,
                    bytes,
                    local_bytes,
                    fetched_bytes: model
                        .mounted
                        .counters()
                        .fetched_bytes
                        .load(Ordering::Relaxed),
                    prefetch: model.prefetch,
                }
            })
            .collect();
        rows.sort_by(|a, b| a.reference.cmp(&b.reference));
        rows
    }

    /// Volumes published now.
    pub async fn volume_count(&self) -> usize {
        self.state.lock().await.volumes.len()
    }

    /// Writes the volume records (temporary file, then rename); a failure is logged: the
    /// records serve a restart, not the volumes themselves.
    fn save(&self, state: &State) {
        let path = self.config.state_dir.join(VOLUMES_FILE);
        let tmp = path.with_extension("json.tmp");
        let volumes: Vec<&Volume> = state.volumes.values().collect();
        let written = serde_json::to_vec_pretty(&volumes)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                use std::io::Write as _;
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&bytes)?;
                // On disk before it replaces the old records: a crash leaves one or the other.
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| {
                // The rename itself, durable.
                std::fs::File::open(&self.config.state_dir)?.sync_all()
            });
        if let Err(e) = written {
            warn!(path = %path.display(), "cannot record the volumes: {e}");
        }
    }

    /// After a restart: takes back the volumes an earlier process published. A model whose
    /// FUSE connection the holder kept, still mounted under `STATE/models`, is adopted: its
    /// binds at the targets never died, running containers only waited and read on, and
    /// reads the predecessor left unanswered are sent again. Every other model's mount died
    /// with that process, so each recorded target's dead bind is detached and the model is
    /// mounted again (by the digest recorded at publish, with the node's credentials) and
    /// bound again: new containers of those pods read again, and unpublish works. A volume
    /// that cannot be restored stays recorded (so its unpublish succeeds) and is reported.
    pub async fn restore(&self) -> Result<(usize, usize), Error> {
        let models_dir = self.config.state_dir.join("models");
        let path = self.config.state_dir.join(VOLUMES_FILE);
        let volumes: Vec<Volume> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), "unreadable volume records, ignored: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        // kubelet removed the pod's volume folder meanwhile (the pod is gone): nothing to
        // restore, nothing is created there again, and no model is kept or adopted for it.
        let (volumes, gone): (Vec<Volume>, Vec<Volume>) = volumes
            .into_iter()
            .partition(|v| v.target.parent().is_some_and(Path::is_dir));
        for volume in &gone {
            info!(volume = %volume.volume_id, target = %volume.target.display(), "the target's folder is gone; record dropped");
        }
        // Connections a predecessor left with the holder, for models still mounted and used.
        // No mount point is stat'ed before it is adopted: that would wait for its server.
        let mut digests = std::collections::HashSet::new();
        let held = daemon::take_held(self.config.fuse_holder.as_ref(), |dir, handover| {
            dir.parent() == Some(models_dir.as_path())
                && modelpack_lazyfs::mountinfo::at(dir).is_some_and(|m| m.dev == handover.state.dev)
                && parse_model_dir(dir).is_some_and(|(d, _)| {
                    volumes.iter().any(|v| v.digest == d) && digests.insert(d)
                })
        })
        .await
        .map_err(|e| Error::Internal(format!("cannot take the FUSE connections back: {e}")))?;
        if self.config.fuse_holder.is_some() {
            detach_stale(&models_dir, &held);
        }
        // Mount numbers go on past the adopted folders'.
        for dir in held.keys() {
            if let Some((_, n)) = parse_model_dir(dir) {
                self.next_mount.fetch_max(n + 1, Ordering::Relaxed);
            }
        }
        let mut adopted: HashMap<Digest, (u32, u32)> = HashMap::new();
        for (dir, handover) in held {
            let Some((digest, _)) = parse_model_dir(&dir) else {
                continue;
            };
            let dev = handover.state.dev;
            let started = Instant::now();
            match self.adopt(&volumes, &digest, dir.clone(), handover).await {
                Ok(model) => {
                    info!(model = %model.reference, took = ?started.elapsed(), "model taken over");
                    self.state.lock().await.models.insert(digest.clone(), model);
                    adopted.insert(digest, dev);
                }
                Err(e) => {
                    // Its readers get ENOTCONN; the model is mounted afresh below.
                    warn!(dir = %dir.display(), "cannot adopt the FUSE connection; mounting afresh: {e}");
                    if let Some(holder) = &self.config.fuse_holder {
                        holder.release(&dir).await;
                    }
                    let _ = mounts::detach(&dir);
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
        let (mut restored, mut failed) = (0, 0);
        for volume in volumes {
            // A bind of an adopted model: it never died.
            if let Some(dev) = adopted.get(&volume.digest)
                && modelpack_lazyfs::mountinfo::at(&volume.target).is_some_and(|m| m.dev == *dev)
            {
                info!(volume = %volume.volume_id, target = %volume.target.display(), "volume kept");
                let mut state = self.state.lock().await;
                state.volumes.insert(volume.target.clone(), volume);
                self.save(&state);
                restored += 1;
                continue;
            }
            if !answers(&volume.target).await {
                let _ = mounts::detach_all_at(&volume.target);
            }
            let again = volume
                .reference
                .parse::<Reference>()
                .map_err(|e| Error::InvalidArgument(e.to_string()))
                .map(|r| Publish {
                    volume_id: volume.volume_id.clone(),
                    target: volume.target.clone(),
                    reference: r.with_digest(volume.digest.clone()),
                    prefetch: volume.prefetch,
                    ephemeral: volume.ephemeral,
                    pod: volume.pod.clone(),
                    docker_config: None,
                });
            let result = match again {
                Ok(p) => {
                    let _ = mounts::detach_all_at(&p.target);
                    self.publish_as(p, Some(volume.with_secret)).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => restored += 1,
                Err(e) => {
                    failed += 1;
                    warn!(volume = %volume.volume_id, target = %volume.target.display(), "cannot restore the volume: {e}");
                    let mut state = self.state.lock().await;
                    state.volumes.insert(volume.target.clone(), volume);
                    self.save(&state);
                }
            }
        }
        // Models no restored volume uses (an adopted one whose binds all went) are let go.
        let mut state = self.state.lock().await;
        let unused: Vec<Digest> = state
            .models
            .keys()
            .filter(|d| !state.volumes.values().any(|v| &v.digest == *d))
            .cloned()
            .collect();
        for digest in unused {
            if let Some(model) = state.models.remove(&digest) {
                info!(model = %model.reference, "no volume uses it after the restart; unmounting");
                self.release(model);
            }
        }
        self.save(&state);
        Ok((restored, failed))
    }

    /// Adopts `handover`, the connection of model `digest` mounted at `dir`, as recorded by
    /// `volumes` (resolved by digest, with the node's credentials).
    async fn adopt(
        &self,
        volumes: &[Volume],
        digest: &Digest,
        dir: PathBuf,
        handover: Arc<Handover>,
    ) -> Result<Model, Error> {
        let volume = volumes
            .iter()
            .find(|v| &v.digest == digest)
            .ok_or_else(|| Error::Internal(format!("no volume uses {digest}")))?;
        let reference = volume
            .reference
            .parse::<Reference>()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .with_digest(digest.clone());
        let clients = self.clients(reference.registry(), None)?;
        let resolved = self.resolve(&clients, &reference).await?;
        let prefetch = volumes.iter().any(|v| &v.digest == digest && v.prefetch);
        let mut model = self
            .mount_model_at(
                &reference,
                resolved,
                &clients,
                prefetch,
                dir,
                Some(handover),
            )
            .await?;
        // The secret its volumes were published with is not kept across a restart.
        model.awaiting_credentials = volumes.iter().any(|v| &v.digest == digest && v.with_secret);
        Ok(model)
    }

    /// At shutdown: abandons the models whose connection the holder keeps, for the next
    /// process to adopt (their readers wait meanwhile), and unmounts the others (their binds at
    /// the targets stay, dead, until kubelet unpublishes them or a restarted plugin restores
    /// them). Returns how many it abandoned: the process must then exit at once, dropping
    /// nothing (a read in flight, dropped, would answer EIO; unanswered, the next process has
    /// the kernel send it again).
    pub async fn shutdown(&self) -> usize {
        let models: Vec<Model> = {
            let mut state = self.state.lock().await;
            state.models.drain().map(|(_, m)| m).collect()
        };
        let mut left = 0;
        for model in models {
            if model.held {
                model.mounted.leave();
                left += 1;
            } else {
                unmount_model(model).await;
            }
        }
        left
    }
}

/// Creates `target` if needed (with its parents when `create_parents`; a restore never makes
/// folders kubelet removed) and binds `dir` at it read-only (replacing a dead bind).
fn bind(dir: &Path, target: &Path, create_parents: bool) -> Result<(), Error> {
    // First the old binds, from the mount table alone: a dead FUSE bind answers any stat or
    // mkdir of the target with ENOTCONN or EEXIST.
    mounts::detach_all_at(target).map_err(|e| internal("clearing the target", e))?;
    if create_parents && let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| internal("creating the target's parent", e))?;
    }
    match std::fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(internal("creating the target folder", e)),
    }
    mounts::bind_read_only(dir, target).map_err(|e| {
        internal(
            &format!("binding {} at {}", dir.display(), target.display()),
            e,
        )
    })
}

/// What a `stat` of a FUSE path said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// It answered (or failed with an error that does not mean a dead connection).
    Alive,
    /// `ENOTCONN`, `ENODEV`, `ECONNABORTED`: the FUSE connection is gone.
    Dead,
    /// No answer within [`STAT_TIMEOUT`]: slow or hung, but not known to be dead.
    Slow,
}

/// The probes in flight, one per path: a later probe of the path waits for the same `stat`
/// instead of leaving one more thread stuck on a hung mount.
type Probes = HashMap<PathBuf, tokio::sync::watch::Receiver<Option<Probe>>>;

fn probes() -> &'static Mutex<Probes> {
    static PROBES: std::sync::OnceLock<Mutex<Probes>> = std::sync::OnceLock::new();
    PROBES.get_or_init(Default::default)
}

/// `statfs`s `path` in a blocking thread (a FUSE path may hang), at most one at a time per
/// path, and waits at most [`STAT_TIMEOUT`] for the answer.
async fn probe(path: &Path) -> Probe {
    let mut answer = {
        let mut all = lock(probes());
        match all.get(path) {
            Some(rx) => rx.clone(),
            None => {
                let (tx, rx) = tokio::sync::watch::channel(None);
                all.insert(path.to_owned(), rx.clone());
                let path = path.to_owned();
                tokio::task::spawn_blocking(move || {
                    // statfs: always a request to the FUSE server (a stat of the root may be
                    // answered from cached attributes of a dead connection).
                    let probe = match rustix::fs::statfs(&path) {
                        Ok(_) => Probe::Alive,
                        Err(
                            rustix::io::Errno::NOTCONN
                            | rustix::io::Errno::NODEV
                            | rustix::io::Errno::CONNABORTED,
                        ) => Probe::Dead,
                        Err(_) => Probe::Alive,
                    };
                    lock(probes()).remove(&path);
                    let _ = tx.send(Some(probe));
                });
                rx
            }
        }
    };
    match tokio::time::timeout(STAT_TIMEOUT, answer.wait_for(Option::is_some)).await {
        Ok(Ok(probe)) => probe.unwrap_or(Probe::Slow),
        // The thread went without answering.
        Ok(Err(_)) => Probe::Alive,
        Err(_) => Probe::Slow,
    }
}

/// Whether `path` is not known to be dead: a `stat` of it answered, or did not within
/// [`STAT_TIMEOUT`] (a slow mount is not replaced), or failed otherwise than a dead FUSE
/// connection (`ENOTCONN`) does.
async fn answers(path: &Path) -> bool {
    probe(path).await != Probe::Dead
}

/// `REGISTRY/REPO` of `reference`.
fn repository_of(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// A fingerprint of `credential` (a hash: the secret itself is never kept beside it).
fn fingerprint(credential: &Credential) -> [u8; 32] {
    let mut hash = sha2::Sha256::new();
    hash.update(credential.username.as_bytes());
    hash.update([0]);
    hash.update(credential.secret.as_bytes());
    hash.update([u8::from(credential.identity_token)]);
    hash.finalize().into()
}

/// Unmounts `model` (detaches it when that fails) and removes its folder.
async fn unmount_model(model: Model) {
    let Model { mounted, dir, .. } = model;
    if let Err(e) = mounted.unmount().await {
        warn!(dir = %dir.display(), "unmount failed, detaching: {e}");
        let _ = mounts::detach(&dir);
    }
    let _ = std::fs::remove_dir(&dir);
}

/// Detaches the mounts under `models` (a predecessor's) but those in `keep`, and removes the
/// empty folders there.
fn detach_stale(models: &Path, keep: &HashMap<PathBuf, Arc<Handover>>) {
    for stale in mounts::under(models) {
        if keep.contains_key(&stale) || stale == models {
            continue;
        }
        warn!(path = %stale.display(), "detaching a mount left by an earlier run");
        let _ = mounts::detach(&stale);
    }
    if let Ok(entries) = std::fs::read_dir(models) {
        for entry in entries.flatten() {
            if !keep.contains_key(&entry.path()) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// The digest and mount number of a model folder's name (`ALGORITHM-HEX.N`).
fn parse_model_dir(dir: &Path) -> Option<(Digest, u64)> {
    let name = dir.file_name()?.to_str()?;
    let (digest, n) = name.rsplit_once('.')?;
    let (algorithm, encoded) = digest.rsplit_once('-')?;
    let digest = format!("{algorithm}:{encoded}").parse::<Digest>().ok()?;
    Some((digest, n.parse().ok()?))
}

/// (content bytes, local verified bytes) of a mount, from its per-file status.
fn model_bytes(mounted: &MountedModel) -> (u64, u64) {
    let status = mounted.status();
    let mut total = 0u64;
    let mut local = 0u64;
    for file in status["files"].as_array().into_iter().flatten() {
        let size = file["size"].as_u64().unwrap_or(0);
        let percent = file["local"].as_f64().unwrap_or(0.0);
        total += size;
        local += if percent >= 100.0 {
            size
        } else {
            (size as f64 * percent / 100.0) as u64
        };
    }
    (total, local)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_dead_connection_counts_as_dead() {
        // A live path, and one that fails otherwise than a dead FUSE connection does.
        assert_eq!(probe(Path::new("/")).await, Probe::Alive);
        assert_eq!(probe(Path::new("/no/such/path")).await, Probe::Alive);
        // Probes of one path at once share one statfs; none is left in flight after.
        let (a, b) = tokio::join!(probe(Path::new("/")), probe(Path::new("/")));
        assert_eq!((a, b), (Probe::Alive, Probe::Alive));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!lock(probes()).contains_key(Path::new("/")));
    }
}
