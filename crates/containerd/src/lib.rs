//! Drives containerd for ModelPack artifacts, which containerd will not unpack itself (their
//! config lists `modelfs.diffIds`, not `rootfs.diff_ids`):
//!
//! - [`pull`] writes the manifest and config into containerd's content store, prepares one
//!   snapshot per layer through containerd's Snapshots service with the labels of
//!   [`modelpack_spec::labels`] (the modelpack snapshotter commits each at once and serves it
//!   lazily), and records the image with GC labels that keep the whole chain;
//! - [`mount`] makes a read-only View of the chain and mounts it at a folder, ready to bind into
//!   containers; [`unmount`] undoes it.
//!
//! Everything runs in a containerd namespace and, while it builds, under a lease (gRPC header
//! `containerd-lease`), so a concurrent garbage collection cannot take half a pull away.
#![deny(missing_docs, missing_debug_implementations)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots as snap;
use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    GetImageRequest, Image, InfoRequest, ReadContentRequest, UpdateImageRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::types::{Descriptor, Mount};
use futures_util::StreamExt as _;
use modelpack_spec::{Digest, ModelManifest, labels};
use sha2::Digest as _;
use tonic::Code;
use tonic::transport::Channel;

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Our snapshotter's name in containerd's config (`[proxy_plugins.modelpack]`).
pub const DEFAULT_SNAPSHOTTER: &str = "modelpack";
/// Label on the config content that holds the snapshot chain (containerd's GC reference).
fn gc_snapshot_label(snapshotter: &str) -> String {
    format!("{}{snapshotter}", labels::GC_REF_SNAPSHOT_PREFIX)
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// containerd could not be reached.
    #[error("cannot reach containerd at {address}: {source}")]
    Connect {
        /// Socket path.
        address: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// containerd answered with an error.
    #[error("containerd {op}: {}", .status.message())]
    Api {
        /// The call.
        op: &'static str,
        /// The answer.
        status: tonic::Status,
    },
    /// The snapshotter did not serve a layer lazily.
    #[error(
        "snapshotter {snapshotter:?} did not serve layer {path} ({digest}) lazily; is it the \
         modelpack snapshotter, and can it reach the registry? (its log says \
         remote-snapshot-prepared=false with the reason)"
    )]
    NotRemote {
        /// Snapshotter name.
        snapshotter: String,
        /// The layer's file path.
        path: String,
        /// The layer digest.
        digest: Digest,
    },
    /// The artifact cannot be laid out as snapshots.
    #[error("{0}")]
    Invalid(String),
    /// Mounting or unmounting the view failed.
    #[error("{0}")]
    Mount(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn api(op: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |status| Error::Api { op, status }
}

/// A connection to containerd, in one namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
}

impl Containerd {
    /// Connects to the socket at `address`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Containerd> {
        let channel = containerd_client::connect(address)
            .await
            .map_err(|source| Error::Connect {
                address: address.to_owned(),
                source,
            })?;
        Ok(Containerd {
            channel,
            namespace: namespace.to_owned(),
        })
    }

    /// A request carrying the namespace and, if given, the lease.
    fn request<T>(&self, message: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let md = request.metadata_mut();
        if let Ok(ns) = self.namespace.parse() {
            md.insert("containerd-namespace", ns);
        }
        if let Some(lease) = lease
            && let Ok(value) = lease.parse()
        {
            md.insert("containerd-lease", value);
        }
        request
    }

    fn snapshots(&self) -> snap::snapshots_client::SnapshotsClient<Channel> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    fn content(&self) -> containerd_client::services::v1::content_client::ContentClient<Channel> {
        containerd_client::services::v1::content_client::ContentClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
    }

    fn images(&self) -> containerd_client::services::v1::images_client::ImagesClient<Channel> {
        containerd_client::services::v1::images_client::ImagesClient::new(self.channel.clone())
    }

    fn leases(&self) -> containerd_client::services::v1::leases_client::LeasesClient<Channel> {
        containerd_client::services::v1::leases_client::LeasesClient::new(self.channel.clone())
    }

    /// Creates a lease that expires by itself after an hour (in case we die holding it).
    async fn create_lease(&self, id: &str) -> Result<()> {
        let expire = chrono_free_rfc3339(
            std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
        );
        let mut labels = HashMap::new();
        labels.insert(labels::GC_EXPIRE.to_owned(), expire);
        self.leases()
            .create(self.request(
                CreateLeaseRequest {
                    id: id.to_owned(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(api("create lease"))?;
        Ok(())
    }

    async fn delete_lease(&self, id: &str) {
        if let Err(e) = self
            .leases()
            .delete(self.request(
                DeleteLeaseRequest {
                    id: id.to_owned(),
                    sync: false,
                },
                None,
            ))
            .await
        {
            tracing::warn!(lease = id, error = %e.message(), "cannot delete lease; it expires by itself");
        }
    }

    /// Writes `data` as content `digest` with `labels` (or just sets the labels when present).
    async fn write_content(
        &self,
        digest: &Digest,
        data: &[u8],
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<()> {
        let exists = self
            .content()
            .info(self.request(
                InfoRequest {
                    digest: digest.to_string(),
                },
                Some(lease),
            ))
            .await;
        match exists {
            Ok(_) => return self.set_content_labels(digest, labels).await,
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(api("content info")(s)),
        }
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let reference = format!("modelpack-{}-{nonce}", digest.encoded());
        let total = data.len() as i64;
        let messages = vec![
            WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: reference.clone(),
                total,
                expected: digest.to_string(),
                offset: 0,
                data: data.to_vec(),
                labels: HashMap::new(),
            },
            WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: reference,
                total,
                expected: digest.to_string(),
                offset: total,
                data: Vec::new(),
                labels,
            },
        ];
        let response = self
            .content()
            .write(self.request(tokio_stream::iter(messages), Some(lease)))
            .await;
        let mut stream = match response {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(api("content write")(s)),
        };
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(api("content write")(s)),
            }
        }
        Ok(())
    }

    async fn set_content_labels(
        &self,
        digest: &Digest,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.request(
                containerd_client::services::v1::UpdateRequest {
                    info: Some(containerd_client::services::v1::Info {
                        digest: digest.to_string(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                None,
            ))
            .await
            .map_err(api("content update"))?;
        Ok(())
    }

    /// Reads a small content blob (a manifest or config) whole.
    async fn read_content(&self, digest: &str) -> Result<Vec<u8>> {
        let mut stream = self
            .content()
            .read(self.request(
                ReadContentRequest {
                    digest: digest.to_owned(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
            .map_err(api("content read"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(api("content read"))?;
            out.extend_from_slice(&chunk.data);
            if out.len() > modelpack_spec::MAX_DOCUMENT_SIZE {
                return Err(Error::Invalid(format!(
                    "content {digest} is larger than a manifest may be"
                )));
            }
        }
        Ok(out)
    }

    /// Creates the image record, or points the existing one at `target`.
    async fn put_image(&self, name: &str, target: Descriptor) -> Result<()> {
        let image = Image {
            name: name.to_owned(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let created = self
            .images()
            .create(self.request(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                None,
            ))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                self.images()
                    .update(self.request(
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["target".into()],
                            }),
                            source_date_epoch: None,
                        },
                        None,
                    ))
                    .await
                    .map_err(api("image update"))?;
                Ok(())
            }
            Err(s) => Err(api("image create")(s)),
        }
    }

    /// Stat of a snapshot, `None` when it does not exist.
    async fn stat(&self, snapshotter: &str, key: &str) -> Result<Option<snap::Info>> {
        match self
            .snapshots()
            .stat(self.request(
                snap::StatSnapshotRequest {
                    snapshotter: snapshotter.to_owned(),
                    key: key.to_owned(),
                },
                None,
            ))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(api("snapshot stat")(s)),
        }
    }

    async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        match self
            .snapshots()
            .remove(self.request(
                snap::RemoveSnapshotRequest {
                    snapshotter: snapshotter.to_owned(),
                    key: key.to_owned(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(api("snapshot remove")(s)),
        }
    }
}

/// RFC 3339 in UTC without a date crate (containerd parses it for `gc.expire`).
fn chrono_free_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Days since the epoch to a civil date (proleptic Gregorian, 400-year eras).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// A model artifact as fetched from its registry (documents verified by the caller).
#[derive(Debug)]
pub struct Artifact<'a> {
    /// Full reference (`registry/repository:tag`), the image name in containerd.
    pub name: &'a str,
    /// Repository reference the snapshotter fetches layers from.
    pub repository: &'a str,
    /// The manifest bytes.
    pub manifest_bytes: &'a [u8],
    /// The manifest's media type.
    pub manifest_media_type: &'a str,
    /// The parsed manifest.
    pub manifest: &'a ModelManifest,
    /// The config bytes.
    pub config_bytes: &'a [u8],
    /// The config's `modelfs.diffIds`.
    pub diff_ids: &'a [Digest],
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    /// Manifest digest.
    pub manifest_digest: Digest,
    /// Chain ID of each layer, in order, with its path.
    pub layers: Vec<(String, Digest)>,
}

/// Pulls `artifact` into containerd lazily through `snapshotter`.
pub async fn pull(ctd: &Containerd, artifact: &Artifact<'_>, snapshotter: &str) -> Result<Pulled> {
    let manifest = artifact.manifest;
    let layers = manifest.layers();
    if layers.is_empty() {
        return Err(Error::Invalid("the artifact has no layers".into()));
    }
    if artifact.diff_ids.len() != layers.len() {
        return Err(Error::Invalid(format!(
            "the config lists {} diffIds for {} layers",
            artifact.diff_ids.len(),
            layers.len()
        )));
    }
    let chain = labels::chain_ids(artifact.diff_ids);
    let manifest_digest = Digest::sha256_of(artifact.manifest_bytes);
    let config_digest = Digest::sha256_of(artifact.config_bytes);
    if &config_digest != manifest.config_digest() {
        return Err(Error::Invalid(format!(
            "config bytes do not match {}",
            manifest.config_digest()
        )));
    }
    for (key, value) in [
        (labels::REFERENCE, artifact.repository),
        (labels::MANIFEST_DIGEST, manifest_digest.as_str()),
    ] {
        if !labels::fits(key, value) {
            return Err(Error::Invalid(format!(
                "label {key} would exceed 4096 bytes"
            )));
        }
    }

    let lease = format!(
        "modelpack-pull-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    ctd.create_lease(&lease).await?;
    let result = pull_under_lease(
        ctd,
        artifact,
        snapshotter,
        &chain,
        &manifest_digest,
        &config_digest,
        &lease,
    )
    .await;
    ctd.delete_lease(&lease).await;
    result?;
    Ok(Pulled {
        manifest_digest,
        layers: layers
            .iter()
            .zip(chain)
            .map(|(l, c)| (l.path.as_str().to_owned(), c))
            .collect(),
    })
}

async fn pull_under_lease(
    ctd: &Containerd,
    artifact: &Artifact<'_>,
    snapshotter: &str,
    chain: &[Digest],
    manifest_digest: &Digest,
    config_digest: &Digest,
    lease: &str,
) -> Result<()> {
    // The layer chain and the two content writes are independent (the chain's top is known from
    // the diffIds before any layer exists): they go to containerd at once, on one connection.
    // Only the image record waits for both, so it never names content or snapshots not yet there.
    let top = chain.last().map(ToString::to_string).unwrap_or_default();
    let mut config_labels = HashMap::new();
    config_labels.insert(gc_snapshot_label(snapshotter), top);
    let mut manifest_labels = HashMap::new();
    manifest_labels.insert(labels::GC_REF_CONFIG.to_owned(), config_digest.to_string());
    // Config holds the chain; manifest holds the config; the image holds the manifest.
    let content = async {
        ctd.write_content(config_digest, artifact.config_bytes, config_labels, lease)
            .await?;
        ctd.write_content(
            manifest_digest,
            artifact.manifest_bytes,
            manifest_labels,
            lease,
        )
        .await
    };
    tokio::try_join!(
        prepare_chain(ctd, artifact, snapshotter, chain, manifest_digest, lease),
        content
    )?;
    ctd.put_image(
        artifact.name,
        Descriptor {
            media_type: artifact.manifest_media_type.to_owned(),
            digest: manifest_digest.to_string(),
            size: artifact.manifest_bytes.len() as i64,
            annotations: HashMap::new(),
        },
    )
    .await
}

/// Prepares each layer's snapshot on top of the previous one, with the labels that make the
/// snapshotter mount it remotely. A layer whose chain ID exists already is answered
/// ALREADY_EXISTS by containerd itself (which also adds it to the lease), so no Stat is needed
/// first.
async fn prepare_chain(
    ctd: &Containerd,
    artifact: &Artifact<'_>,
    snapshotter: &str,
    chain: &[Digest],
    manifest_digest: &Digest,
    lease: &str,
) -> Result<()> {
    let layers = artifact.manifest.layers();
    let nonce = lease.trim_start_matches("modelpack-pull-");
    for (i, layer) in layers.iter().enumerate() {
        let target = chain[i].to_string();
        let mut snapshot_labels = HashMap::new();
        snapshot_labels.insert(labels::SNAPSHOT_REF.to_owned(), target.clone());
        snapshot_labels.insert(labels::REFERENCE.to_owned(), artifact.repository.to_owned());
        snapshot_labels.insert(
            labels::MANIFEST_DIGEST.to_owned(),
            manifest_digest.to_string(),
        );
        snapshot_labels.insert(labels::LAYER_DIGEST.to_owned(), layer.digest.to_string());
        let media_type = layer.descriptor.media_type().to_string();
        if labels::fits(labels::MEDIA_TYPE, &media_type) {
            snapshot_labels.insert(labels::MEDIA_TYPE.to_owned(), media_type);
        }
        if labels::fits(labels::FILE_PATH, layer.path.as_str()) {
            snapshot_labels.insert(labels::FILE_PATH.to_owned(), layer.path.as_str().to_owned());
        }
        let parent = if i == 0 {
            String::new()
        } else {
            chain[i - 1].to_string()
        };
        let key = format!("extract-{nonce}-{i} {target}");
        let prepared = ctd
            .snapshots()
            .prepare(ctd.request(
                snap::PrepareSnapshotRequest {
                    snapshotter: snapshotter.to_owned(),
                    key: key.clone(),
                    parent,
                    labels: snapshot_labels,
                },
                Some(lease),
            ))
            .await;
        match prepared {
            Err(s) if s.code() == Code::AlreadyExists => {
                tracing::debug!(path = %layer.path, chain = %target, "layer served lazily");
            }
            Ok(_) => {
                ctd.remove_snapshot(snapshotter, &key).await?;
                return Err(Error::NotRemote {
                    snapshotter: snapshotter.to_owned(),
                    path: layer.path.as_str().to_owned(),
                    digest: layer.digest.clone(),
                });
            }
            Err(s) => return Err(api("snapshot prepare")(s)),
        }
        // containerd answers ALREADY_EXISTS only after it has recorded the snapshotter's
        // committed target under this parent, so no second Stat is needed.
    }
    Ok(())
}

/// The key of the View that [`mount`] makes for `dir`.
pub fn view_key(dir: &Path) -> String {
    let hash = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    format!("modelpack-mount-{}", &hex::encode(hash)[..24])
}

/// The top chain ID of an image pulled by [`pull`].
pub async fn top_snapshot(ctd: &Containerd, image: &str, snapshotter: &str) -> Result<String> {
    let got = ctd
        .images()
        .get(ctd.request(
            GetImageRequest {
                name: image.to_owned(),
            },
            None,
        ))
        .await;
    let image_record = match got {
        Ok(r) => r.into_inner().image,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(api("image get")(s)),
    }
    .ok_or_else(|| {
        Error::Invalid(format!(
            "no image {image} in containerd namespace {}; run `modelpack containerd pull` first",
            ctd.namespace
        ))
    })?;
    let target = image_record
        .target
        .ok_or_else(|| Error::Invalid(format!("image {image} has no target")))?;
    let manifest_bytes = ctd.read_content(&target.digest).await?;
    if Digest::sha256_of(&manifest_bytes).as_str() != target.digest {
        return Err(Error::Invalid(format!(
            "manifest {} does not match its digest",
            target.digest
        )));
    }
    let manifest = ModelManifest::from_slice(&manifest_bytes).map_err(|r| {
        Error::Invalid(format!(
            "image {image} is not a ModelPack artifact: {}",
            r.error_summary()
        ))
    })?;
    let info = ctd
        .content()
        .info(ctd.request(
            InfoRequest {
                digest: manifest.config_digest().to_string(),
            },
            None,
        ))
        .await
        .map_err(api("content info"))?
        .into_inner()
        .info
        .unwrap_or_default();
    info.labels
        .get(&gc_snapshot_label(snapshotter))
        .cloned()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "image {image} was not pulled with snapshotter {snapshotter:?}"
            ))
        })
}

/// Makes a read-only View of `image`'s snapshot chain and mounts it at `dir`.
pub async fn mount(ctd: &Containerd, image: &str, snapshotter: &str, dir: &Path) -> Result<()> {
    let dir =
        std::fs::canonicalize(dir).map_err(|e| Error::Mount(format!("{}: {e}", dir.display())))?;
    if !dir.is_dir() {
        return Err(Error::Mount(format!("{} is not a folder", dir.display())));
    }
    let top = top_snapshot(ctd, image, snapshotter).await?;
    let key = view_key(&dir);
    if ctd.stat(snapshotter, &key).await?.is_some() {
        return Err(Error::Mount(format!(
            "{} already has a model view; run `modelpack containerd umount {}` first",
            dir.display(),
            dir.display()
        )));
    }
    let mut view_labels = HashMap::new();
    view_labels.insert(
        labels::GC_ROOT.to_owned(),
        chrono_free_rfc3339(std::time::SystemTime::now()),
    );
    view_labels.insert(labels::MOUNT.to_owned(), dir.display().to_string());
    let mounts = ctd
        .snapshots()
        .view(ctd.request(
            snap::ViewSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                key: key.clone(),
                parent: top,
                labels: view_labels,
            },
            None,
        ))
        .await
        .map_err(api("snapshot view"))?
        .into_inner()
        .mounts;
    if let Err(e) = apply_mounts(&mounts, &dir) {
        ctd.remove_snapshot(snapshotter, &key).await?;
        return Err(e);
    }
    Ok(())
}

/// Unmounts what [`mount`] mounted at `dir` and removes its View.
pub async fn unmount(ctd: &Containerd, snapshotter: &str, dir: &Path) -> Result<()> {
    let dir =
        std::fs::canonicalize(dir).map_err(|e| Error::Mount(format!("{}: {e}", dir.display())))?;
    let key = view_key(&dir);
    let known = ctd.stat(snapshotter, &key).await?.is_some();
    let status = std::process::Command::new("umount")
        .arg(&dir)
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| Error::Mount(format!("cannot run umount: {e}")))?;
    if !status.status.success() && !known {
        return Err(Error::Mount(format!(
            "{} is not a model view: {}",
            dir.display(),
            String::from_utf8_lossy(&status.stderr).trim()
        )));
    }
    if !status.status.success() {
        return Err(Error::Mount(format!(
            "cannot unmount {}: {}",
            dir.display(),
            String::from_utf8_lossy(&status.stderr).trim()
        )));
    }
    ctd.remove_snapshot(snapshotter, &key).await
}

/// Longest mount option string the kernel takes (one page).
const MAX_MOUNT_OPTIONS: usize = 4096;

/// Joins mount options; when they exceed a page (an overlay over many layers), rewrites the
/// folders in `lowerdir=`/`upperdir=`/`workdir=` relative to their common parent and returns that
/// parent, to run `mount` in (the kernel resolves relative paths from the caller's folder).
fn compact_paths(options: &[String]) -> (Option<PathBuf>, String) {
    let joined = options.join(",");
    if joined.len() < MAX_MOUNT_OPTIONS {
        return (None, joined);
    }
    let mut dirs: Vec<&str> = Vec::new();
    for o in options {
        if let Some(list) = o.strip_prefix("lowerdir=") {
            dirs.extend(list.split(':'));
        } else if let Some(d) = o.strip_prefix("upperdir=").or(o.strip_prefix("workdir=")) {
            dirs.push(d);
        }
    }
    let Some(first) = dirs.first() else {
        return (None, joined);
    };
    let mut common = Path::new(first).parent().map(Path::to_path_buf);
    while let Some(c) = &common {
        if dirs.iter().all(|d| Path::new(d).starts_with(c)) {
            break;
        }
        common = c.parent().map(Path::to_path_buf);
    }
    let Some(common) = common.filter(|c| c.parent().is_some()) else {
        return (None, joined);
    };
    let relative = |d: &str| {
        Path::new(d)
            .strip_prefix(&common)
            .map_or_else(|_| d.to_owned(), |r| r.display().to_string())
    };
    let rewritten: Vec<String> = options
        .iter()
        .map(|o| {
            if let Some(list) = o.strip_prefix("lowerdir=") {
                let parts: Vec<String> = list.split(':').map(relative).collect();
                format!("lowerdir={}", parts.join(":"))
            } else if let Some(d) = o.strip_prefix("upperdir=") {
                format!("upperdir={}", relative(d))
            } else if let Some(d) = o.strip_prefix("workdir=") {
                format!("workdir={}", relative(d))
            } else {
                o.clone()
            }
        })
        .collect();
    (Some(common), rewritten.join(","))
}

/// Mounts containerd's mount list at `dir` (bind or overlay, as snapshotters return them).
fn apply_mounts(mounts: &[Mount], dir: &Path) -> Result<()> {
    let [m] = mounts else {
        return Err(Error::Mount(format!(
            "expected one mount from the snapshotter, got {}",
            mounts.len()
        )));
    };
    let mut command = std::process::Command::new("mount");
    let options: Vec<&str> = m.options.iter().map(String::as_str).collect();
    match m.r#type.as_str() {
        "bind" => {
            command.arg("--rbind");
            let bind_options: Vec<&str> = options
                .iter()
                .copied()
                .filter(|o| *o != "rbind" && *o != "bind")
                .collect();
            if !bind_options.is_empty() {
                command.arg("-o").arg(bind_options.join(","));
            }
            command.arg(&m.source).arg(dir);
        }
        kind => {
            let (cwd, options) = compact_paths(&m.options);
            if let Some(cwd) = cwd {
                command.current_dir(cwd);
            }
            command
                .arg("-t")
                .arg(kind)
                .arg("-o")
                .arg(options)
                .arg(&m.source)
                .arg(dir);
        }
    }
    let out = command
        .output()
        .map_err(|e| Error::Mount(format!("cannot run mount: {e}")))?;
    if !out.status.success() {
        return Err(Error::Mount(format!(
            "mounting the model view at {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // A bind mount ignores `ro` on the first call; remount to make it read-only.
    if m.r#type == "bind" && options.contains(&"ro") {
        let out = std::process::Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir)
            .output()
            .map_err(|e| Error::Mount(format!("cannot run mount: {e}")))?;
        if !out.status.success() {
            let _ = std::process::Command::new("umount").arg(dir).output();
            return Err(Error::Mount(format!(
                "making {} read-only failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_without_a_date_crate() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(chrono_free_rfc3339(t), "2026-11-18T11:06:40Z");
        assert_eq!(
            chrono_free_rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00Z"
        );
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(chrono_free_rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn long_overlay_options_become_relative_to_their_common_parent() {
        let short = vec!["lowerdir=/a/1/fs:/a/2/fs".to_owned()];
        assert_eq!(
            compact_paths(&short),
            (None, "lowerdir=/a/1/fs:/a/2/fs".to_owned())
        );
        let lowers: Vec<String> = (0..200)
            .map(|i| format!("/var/lib/modelpack-snapshotter/snapshots/{i}/fs"))
            .collect();
        let long = vec![format!("lowerdir={}", lowers.join(":"))];
        let (cwd, options) = compact_paths(&long);
        assert_eq!(
            cwd.as_deref(),
            Some(Path::new("/var/lib/modelpack-snapshotter/snapshots"))
        );
        assert!(options.starts_with("lowerdir=0/fs:1/fs:"));
        assert!(options.len() < MAX_MOUNT_OPTIONS);
    }

    #[test]
    fn view_keys_are_stable_and_distinct() {
        assert_eq!(view_key(Path::new("/a")), view_key(Path::new("/a")));
        assert_ne!(view_key(Path::new("/a")), view_key(Path::new("/b")));
        assert!(view_key(Path::new("/a")).starts_with("modelpack-mount-"));
    }
}
