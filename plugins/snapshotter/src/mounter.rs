//! What serves a remote layer: the service asks a [`LayerMounter`] for a [`ServedLayer`] at a
//! folder. The daemon's is [`Lazyfs`] (lazyfs mounts, one resolve per model); the service's unit
//! tests use a stand-in, so its locking and bookkeeping are tested without FUSE or a registry.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use modelpack_lazyfs::{
    CacheBudget, Counters, Handover, MountOptions, MountedModel, Resolved, SessionState, Verify,
};
use modelpack_registry::{Client, ClientOptions, Repository};
use modelpack_spec::{Digest, Reference};
use modelpack_store::Store;

use crate::config::{Settings, VerifyPolicy};
use crate::metadata::RemoteLayer;
use crate::service::lock;

/// One layer being served at a folder.
#[tonic::async_trait]
pub trait ServedLayer: Send + Sync + std::fmt::Debug {
    /// Bytes of file content it serves.
    fn content_size(&self) -> u64;
    /// Its live counters.
    fn counters(&self) -> Arc<Counters>;
    /// What it works around, if anything (an unusable chunk index), for the status.
    fn warning(&self) -> Option<String> {
        None
    }
    /// Stops serving it.
    async fn unmount(self: Box<Self>) -> std::io::Result<()>;
    /// Its FUSE connection, for the holder that keeps it across a restart.
    fn connection(&self) -> Option<(BorrowedFd<'_>, SessionState)> {
        None
    }
    /// Abandons it without unmounting, right before the process exits (a successor adopts the
    /// connection the holder keeps).
    fn leave(self: Box<Self>) {}
}

/// Serves remote layers.
#[tonic::async_trait]
pub trait LayerMounter: Send + Sync + std::fmt::Debug + 'static {
    /// Serves `layer` at `dir` (which exists), or says why not; with `adopt`, on that
    /// connection, already mounted at `dir` by a predecessor.
    async fn mount(
        &self,
        layer: &RemoteLayer,
        dir: &Path,
        adopt: Option<Arc<Handover>>,
    ) -> Result<Box<dyn ServedLayer>, String>;
}

#[tonic::async_trait]
impl ServedLayer for MountedModel {
    fn content_size(&self) -> u64 {
        MountedModel::content_size(self)
    }

    fn counters(&self) -> Arc<Counters> {
        MountedModel::counters(self)
    }

    fn warning(&self) -> Option<String> {
        self.index_warning()
    }

    async fn unmount(self: Box<Self>) -> std::io::Result<()> {
        MountedModel::unmount(*self).await
    }

    fn connection(&self) -> Option<(BorrowedFd<'_>, SessionState)> {
        MountedModel::connection(self)
    }

    fn leave(self: Box<Self>) {
        MountedModel::leave(*self)
    }
}

/// The daemon's mounter: one lazyfs mount per layer, every layer of a model from one resolve.
#[derive(Debug)]
pub struct Lazyfs {
    settings: Settings,
    store: Store,
    /// The cache folder's accountant, shared by every layer's mount (one cap for them all).
    cache: Arc<CacheBudget>,
    clients: Mutex<HashMap<String, Client>>,
    /// Each model's manifest and chunk index, resolved once for all of its layers (keyed by
    /// manifest digest; a digest names immutable content, so an entry never goes stale).
    resolved: Mutex<HashMap<Digest, Arc<tokio::sync::OnceCell<Arc<Resolved>>>>>,
}

/// Models whose resolve (manifest and chunk index) is kept for their next layers.
const RESOLVED_CACHE: usize = 64;

impl Lazyfs {
    /// A mounter with `settings`' registries and policies; whole blobs land in `store`, chunks
    /// in `cache`'s folder.
    pub fn new(settings: Settings, store: Store, cache: Arc<CacheBudget>) -> Lazyfs {
        Lazyfs {
            settings,
            store,
            cache,
            clients: Mutex::new(HashMap::new()),
            resolved: Mutex::new(HashMap::new()),
        }
    }

    fn client_for(&self, host: &str) -> Result<Client, String> {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(host) {
            return Ok(c.clone());
        }
        let entry = self.settings.registry(host);
        let client = Client::new(ClientOptions {
            plain_http: entry.plain_http,
            insecure: entry.insecure,
            ca_file: entry.ca_file,
            hosts_dir: self.settings.hosts_dir.clone(),
            ..ClientOptions::new()
        })
        .map_err(|e| e.to_string())?;
        clients.insert(host.to_owned(), client.clone());
        Ok(client)
    }

    /// The model `manifest` in `repository`, resolved once for all its layers: concurrent
    /// Prepares of one model wait for the same resolve; a failed resolve is tried again next time.
    async fn resolved(
        &self,
        repository: &Repository,
        manifest: &Digest,
    ) -> Result<Arc<Resolved>, String> {
        let cell = {
            let mut cache = lock(&self.resolved);
            // Bounded: a node sees few models at once; past the bound, start afresh.
            if cache.len() >= RESOLVED_CACHE && !cache.contains_key(manifest) {
                cache.clear();
            }
            cache.entry(manifest.clone()).or_default().clone()
        };
        let resolved = cell
            .get_or_try_init(|| async {
                modelpack_lazyfs::resolve(repository, manifest.as_str(), &self.store)
                    .await
                    .map(Arc::new)
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(resolved.clone())
    }
}

#[tonic::async_trait]
impl LayerMounter for Lazyfs {
    async fn mount(
        &self,
        layer: &RemoteLayer,
        dir: &Path,
        adopt: Option<Arc<Handover>>,
    ) -> Result<Box<dyn ServedLayer>, String> {
        let reference: Reference = layer
            .reference
            .parse()
            .map_err(|e| format!("reference {:?}: {e}", layer.reference))?;
        let client = self.client_for(reference.registry())?;
        let repository = Repository::new(&client, &reference);
        let resolved = self.resolved(&repository, &layer.manifest_digest).await?;
        let mut opts = MountOptions::new(
            repository,
            layer.manifest_digest.to_string(),
            self.store.clone(),
            self.settings.cache_dir.clone(),
        );
        opts.resolved = Some(resolved);
        opts.cache = Some(self.cache.clone());
        opts.verify = match self.settings.verify {
            VerifyPolicy::Full => Verify::Full,
            VerifyPolicy::Background => Verify::Background,
            VerifyPolicy::None => Verify::None,
        };
        opts.allow_other = true;
        opts.prefetch = self.settings.prefetch;
        opts.prefetch_small = self.settings.prefetch_small;
        opts.layers = Some(vec![layer.layer_digest.clone()]);
        opts.status_file = false;
        opts.adopt = adopt;
        opts.for_successor = self.settings.fuse_holder.is_some();
        let model = modelpack_lazyfs::mount(opts, dir)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Box::new(model))
    }
}
