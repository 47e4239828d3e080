//! The OCI image layout on disk: directories, `index.json` with its lock, garbage collection and
//! consistency checks.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use modelpack_spec::annotations::ANNOTATION_REF_NAME;
use modelpack_spec::media_type::MEDIA_TYPE_OCI_INDEX;
use modelpack_spec::oci_spec::image::{Descriptor, ImageIndex, MediaType};
use modelpack_spec::{Digest, Reference};
use serde_json::Value;

use crate::error::{Error, IoContext, PathIoError, Result};
use crate::ingest::{Ingest, Resumable, blob_path_in, create_new_private, sha256_file};

/// Environment variable that names the store folder.
pub const STORE_ENV: &str = "MODELPACK_STORE";

/// The most bytes of a manifest or index read into memory.
const MAX_MANIFEST_SIZE: u64 = modelpack_spec::MAX_DOCUMENT_SIZE as u64;

/// The store folder to use: `$MODELPACK_STORE`, else `$XDG_DATA_HOME/modelpack`, else
/// `~/.local/share/modelpack`.
pub fn default_root() -> PathBuf {
    if let Some(dir) = std::env::var_os(STORE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("modelpack");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/share/modelpack")
}

/// A local OCI image layout holding blobs and named manifests.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    blobs: PathBuf,
    ingest: PathBuf,
}

/// One entry of `index.json`.
#[derive(Debug, Clone)]
pub struct StoreEntry {
    /// The name (`org.opencontainers.image.ref.name`), absent for untagged manifests.
    pub name: Option<String>,
    /// The manifest's descriptor.
    pub descriptor: Descriptor,
}

/// What [`Store::link_blob`] managed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The blob was there already.
    AlreadyPresent,
    /// The blob is a hard link to the source file.
    HardLinked,
}

/// What [`Store::prune`] removed (or would remove).
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Unreferenced blobs, with their sizes.
    pub blobs: Vec<(Digest, u64)>,
    /// Temporary files no process holds.
    pub stale_ingests: Vec<PathBuf>,
}

impl PruneReport {
    /// Bytes freed.
    pub fn bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, size)| size).sum()
    }
}

/// What [`Store::check`] found wrong; empty when the store is consistent.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Blobs checked.
    pub blobs_checked: usize,
    /// One line per problem.
    pub problems: Vec<String>,
}

/// A shared hold on the store that keeps [`Store::prune`] away while blobs are written but not
/// yet named in `index.json`. Released on drop.
#[derive(Debug)]
pub struct GcGuard {
    _file: File,
}

/// A private store inside a store; see [`Store::scratch`].
#[derive(Debug)]
pub struct ScratchStore {
    store: Store,
    lock_path: PathBuf,
    _lock: File,
}

impl ScratchStore {
    /// The scratch store itself.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Removes the scratch store and everything in it.
    pub fn remove(self) -> Result<()> {
        let root = self.store.root().to_owned();
        fs::remove_dir_all(&root).at(&root)?;
        let _ = fs::remove_file(&self.lock_path);
        Ok(())
    }
}

fn private_dir(path: &Path) -> Result<()> {
    Ok(fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .at(path)?)
}

impl Store {
    /// Opens the layout at `root`, creating it (mode 0700) if it does not exist.
    pub fn open(root: &Path) -> Result<Store> {
        let store = Store {
            root: root.to_owned(),
            blobs: root.join("blobs"),
            ingest: root.join("ingest"),
        };
        let fresh = !root.join("oci-layout").exists();
        private_dir(root)?;
        private_dir(&store.blobs.join("sha256"))?;
        private_dir(&store.ingest)?;
        if fresh {
            let _lock = store.index_lock()?;
            if !root.join("oci-layout").exists() {
                store.write_atomic(
                    "index.json",
                    &modelpack_spec::to_canonical_json(&serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": MEDIA_TYPE_OCI_INDEX,
                        "manifests": [],
                    })),
                )?;
                store.write_atomic("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            }
        }
        Ok(store)
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path_in(&self.blobs, digest)
    }

    /// True when the blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::BlobNotFound(digest.clone())
            } else {
                PathIoError { path, source: e }.into()
            }
        })
    }

    /// Reads a small blob (a manifest, a config) into memory, refusing it above `limit` bytes and
    /// verifying its digest.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let mut file = self.open_blob(digest)?;
        let size = file.metadata().at(&path)?.len();
        if size > limit {
            return Err(Error::TooLarge {
                digest: digest.clone(),
                size,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        Read::by_ref(&mut file)
            .take(limit)
            .read_to_end(&mut bytes)
            .at(&path)?;
        let actual = Digest::sha256_of(&bytes);
        if &actual != digest {
            return Err(Error::DigestMismatch {
                path,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores small bytes as a blob and returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::sha256_of(bytes);
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut ingest = self.ingest()?;
        let path = ingest.path().to_owned();
        ingest.file().write_all(bytes).at(&path)?;
        ingest.commit(&digest)?;
        Ok(digest)
    }

    /// Starts writing a new blob.
    pub fn ingest(&self) -> Result<Ingest> {
        Ingest::create(&self.ingest, &self.blobs)
    }

    /// Opens (or continues) the partial download of `digest`, waiting for any other process
    /// fetching the same blob.
    pub fn resumable(&self, digest: &Digest) -> Result<Resumable> {
        Resumable::open(&self.ingest, &self.blobs, digest)
    }

    /// Starts a blob as a copy-on-write clone of `src` (reflink), if the file system can; the
    /// caller hashes the clone and commits it. `None` when cloning is not supported here.
    pub fn reflink_ingest(&self, src: &Path) -> Result<Option<Ingest>> {
        let mut ingest = self.ingest()?;
        let path = ingest.path().to_owned();
        // reflink needs a destination that does not exist yet.
        fs::remove_file(&path).at(&path)?;
        match reflink_copy::reflink(src, &path) {
            Ok(()) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .at(&path)?;
                file.lock().at(&path)?;
                *ingest.file() = file;
                Ok(Some(ingest))
            }
            Err(_) => {
                // Leave an empty file for the guard to remove.
                let _ = create_new_private(&path);
                Ok(None)
            }
        }
    }

    /// Makes the blob `digest` a hard link to `src`, whose bytes the caller hashed. The store then
    /// shares the file with its owner: editing the source corrupts the blob (`check` finds it).
    pub fn link_blob(&self, src: &Path, digest: &Digest) -> Result<LinkOutcome> {
        let target = self.blob_path(digest);
        if target.exists() {
            return Ok(LinkOutcome::AlreadyPresent);
        }
        fs::hard_link(src, &target).at(&target)?;
        Ok(LinkOutcome::HardLinked)
    }

    /// A private store inside this one (`scratch/NAME`), locked while the handle lives, for
    /// blobs fetched on behalf of something that must not end up in this store (`pull -o`).
    /// Its downloads resume like the store's own; a second process asking for the same name
    /// waits for the first. `prune` removes scratch stores no process holds.
    pub fn scratch(&self, name: &str) -> Result<ScratchStore> {
        let dir = self.root.join("scratch");
        private_dir(&dir)?;
        let lock_path = dir.join(format!("{name}.lock"));
        let lock = open_lock_file(&lock_path)?;
        lock.lock().at(&lock_path)?;
        let store = Store::open(&dir.join(name))?;
        Ok(ScratchStore {
            store,
            lock_path,
            _lock: lock,
        })
    }

    /// Takes a shared hold that keeps `prune` from collecting blobs being written.
    pub fn gc_guard(&self) -> Result<GcGuard> {
        let path = self.root.join("gc.lock");
        let file = open_lock_file(&path)?;
        file.lock_shared().at(&path)?;
        Ok(GcGuard { _file: file })
    }

    fn index_lock(&self) -> Result<File> {
        let path = self.root.join("index.lock");
        let file = open_lock_file(&path)?;
        file.lock().at(&path)?;
        Ok(file)
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let target = self.root.join(name);
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .tempfile_in(&self.root)
            .at(&self.root)?;
        tmp.write_all(bytes).at(tmp.path())?;
        tmp.as_file().sync_all().at(tmp.path())?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .at(tmp.path())?;
        tmp.persist(&target).map_err(|e| e.error).at(&target)?;
        Ok(())
    }

    fn read_index(&self) -> Result<ImageIndex> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).at(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Every entry of `index.json`.
    pub fn entries(&self) -> Result<Vec<StoreEntry>> {
        Ok(self
            .read_index()?
            .manifests()
            .iter()
            .map(|d| StoreEntry {
                name: d
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_REF_NAME))
                    .cloned(),
                descriptor: d.clone(),
            })
            .collect())
    }

    /// The name under which `reference` is kept in `index.json` (its familiar form).
    pub fn name_of(reference: &Reference) -> String {
        reference
            .with_tag(reference.tag().unwrap_or(modelpack_spec::DEFAULT_TAG))
            .map_or_else(|_| reference.familiar(), |r| r.familiar())
    }

    /// The manifest descriptor `reference` names: by digest if it has one, else by name.
    pub fn resolve(&self, reference: &Reference) -> Result<Descriptor> {
        if let Some(digest) = reference.digest() {
            return self
                .entries()?
                .into_iter()
                .find(|e| e.descriptor.digest().to_string() == digest.as_str())
                .map(|e| e.descriptor)
                .ok_or_else(|| Error::RefNotFound(reference.familiar()));
        }
        self.resolve_name(&Self::name_of(reference))
    }

    /// The manifest descriptor named exactly `name` in `index.json` (for OCI layouts whose
    /// names are bare tags).
    pub fn resolve_name(&self, name: &str) -> Result<Descriptor> {
        self.entries()?
            .into_iter()
            .find(|e| e.name.as_deref() == Some(name))
            .map(|e| e.descriptor)
            .ok_or_else(|| Error::RefNotFound(name.to_owned()))
    }

    /// Names `descriptor` (a manifest already in the store) as `reference`, replacing what the
    /// name pointed at before.
    pub fn tag(&self, reference: &Reference, descriptor: &Descriptor) -> Result<()> {
        self.tag_name(&Self::name_of(reference), descriptor)
    }

    /// Names `descriptor` exactly `name` (`org.opencontainers.image.ref.name`).
    pub fn tag_name(&self, name: &str, descriptor: &Descriptor) -> Result<()> {
        let digest = Digest::from_str(descriptor.digest().as_ref())?;
        if !self.has_blob(&digest) {
            return Err(Error::BlobNotFound(digest));
        }
        let _lock = self.index_lock()?;
        let mut index = self.read_index()?;
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d) != Some(name))
            .cloned()
            .collect();
        let mut entry = descriptor.clone();
        let mut annotations = entry.annotations().clone().unwrap_or_default();
        annotations.insert(ANNOTATION_REF_NAME.to_owned(), name.to_owned());
        entry.set_annotations(Some(annotations));
        manifests.push(entry);
        index.set_manifests(manifests);
        index.set_media_type(Some(MediaType::ImageIndex));
        self.write_atomic("index.json", &modelpack_spec::to_canonical_json(&index))
    }

    /// Removes the name `reference` (or, for a digest reference, every entry of that manifest);
    /// blobs stay until [`Store::prune`]. Returns the removed entries.
    pub fn untag(&self, reference: &Reference) -> Result<Vec<Descriptor>> {
        let _lock = self.index_lock()?;
        let mut index = self.read_index()?;
        let name = Self::name_of(reference);
        let (removed, kept): (Vec<Descriptor>, Vec<Descriptor>) = index
            .manifests()
            .iter()
            .cloned()
            .partition(|d| match reference.digest() {
                Some(digest) => d.digest().to_string() == digest.as_str(),
                None => ref_name(d) == Some(name.as_str()),
            });
        if removed.is_empty() {
            return Err(Error::RefNotFound(reference.familiar()));
        }
        index.set_manifests(kept);
        self.write_atomic("index.json", &modelpack_spec::to_canonical_json(&index))?;
        Ok(removed)
    }

    /// Digests of every blob reachable from `index.json`.
    fn reachable(&self) -> Result<HashSet<Digest>> {
        let mut seen = HashSet::new();
        let mut stack: Vec<Digest> = Vec::new();
        for entry in self.entries()? {
            stack.push(entry.descriptor.digest().to_string().parse()?);
        }
        while let Some(digest) = stack.pop() {
            if !seen.insert(digest.clone()) {
                continue;
            }
            let Ok(bytes) = self.read_blob(&digest, MAX_MANIFEST_SIZE) else {
                continue;
            };
            let Ok(doc) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            if doc.get("schemaVersion").is_none() {
                continue;
            }
            collect_digests(&doc, &mut stack);
        }
        Ok(seen)
    }

    fn blob_files(&self) -> Result<Vec<(Digest, PathBuf)>> {
        let mut out = Vec::new();
        for alg_entry in fs::read_dir(&self.blobs).at(&self.blobs)? {
            let alg_entry = alg_entry.at(&self.blobs)?;
            let alg = alg_entry.file_name().to_string_lossy().into_owned();
            let dir = alg_entry.path();
            if !dir.is_dir() {
                continue;
            }
            for blob in fs::read_dir(&dir).at(&dir)? {
                let blob = blob.at(&dir)?;
                let name = blob.file_name().to_string_lossy().into_owned();
                match format!("{alg}:{name}").parse::<Digest>() {
                    Ok(d) => out.push((d, blob.path())),
                    Err(_) => out.push((Digest::sha256_of(name.as_bytes()), blob.path())),
                }
            }
        }
        Ok(out)
    }

    /// Removes blobs no entry of `index.json` reaches, and temporary files no process holds.
    /// With `dry_run`, only reports what it would remove. Waits for writers to finish.
    pub fn prune(&self, dry_run: bool) -> Result<PruneReport> {
        let gc_path = self.root.join("gc.lock");
        let gc = open_lock_file(&gc_path)?;
        gc.lock().at(&gc_path)?;
        let reachable = self.reachable()?;
        let mut report = PruneReport::default();
        for (digest, path) in self.blob_files()? {
            if reachable.contains(&digest) {
                continue;
            }
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                fs::remove_file(&path).at(&path)?;
            }
            report.blobs.push((digest, size));
        }
        for entry in fs::read_dir(&self.ingest).at(&self.ingest)? {
            let path = entry.at(&self.ingest)?.path();
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if file.try_lock().is_ok() {
                if !dry_run {
                    fs::remove_file(&path).at(&path)?;
                }
                report.stale_ingests.push(path);
            }
        }
        let scratch = self.root.join("scratch");
        for entry in fs::read_dir(&scratch).into_iter().flatten().flatten() {
            let lock_path = entry.path();
            if lock_path.extension().is_none_or(|e| e != "lock") {
                continue;
            }
            let Ok(file) = File::open(&lock_path) else {
                continue;
            };
            if file.try_lock().is_ok() {
                let dir = lock_path.with_extension("");
                if !dry_run {
                    if dir.exists() {
                        fs::remove_dir_all(&dir).at(&dir)?;
                    }
                    fs::remove_file(&lock_path).at(&lock_path)?;
                }
                report.stale_ingests.push(dir);
            }
        }
        report.blobs.sort();
        Ok(report)
    }

    /// Verifies every blob against its digest and that every entry reaches only present blobs.
    pub fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let mut present = HashSet::new();
        for (digest, path) in self.blob_files()? {
            report.blobs_checked += 1;
            let expected = format!(
                "{}:{}",
                path.parent()
                    .and_then(Path::file_name)
                    .map(|s| s.to_string_lossy())
                    .unwrap_or_default(),
                path.file_name()
                    .map(|s| s.to_string_lossy())
                    .unwrap_or_default()
            );
            if expected != digest.as_str() {
                report
                    .problems
                    .push(format!("{}: not named by a digest", path.display()));
                continue;
            }
            if !digest.is_sha256() {
                // We compute sha256 only; other algorithms are kept, unverified.
                present.insert(digest);
                continue;
            }
            match sha256_file(&path) {
                Ok((actual, _)) if actual == digest => {
                    present.insert(digest);
                }
                Ok((actual, _)) => report
                    .problems
                    .push(format!("blob {digest}: content hashes to {actual}")),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
        for entry in self.entries()? {
            let root: Digest = entry.descriptor.digest().to_string().parse()?;
            let mut stack = vec![root];
            let mut seen = HashSet::new();
            while let Some(digest) = stack.pop() {
                if !seen.insert(digest.clone()) {
                    continue;
                }
                if !present.contains(&digest) {
                    report.problems.push(format!(
                        "{}: references missing or corrupt blob {digest}",
                        entry.name.as_deref().unwrap_or("(untagged)")
                    ));
                    continue;
                }
                if let Ok(bytes) = self.read_blob(&digest, MAX_MANIFEST_SIZE)
                    && let Ok(doc) = serde_json::from_slice::<Value>(&bytes)
                    && doc.get("schemaVersion").is_some()
                {
                    collect_digests(&doc, &mut stack);
                }
            }
        }
        Ok(report)
    }
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REF_NAME))
        .map(String::as_str)
}

fn open_lock_file(path: &Path) -> Result<File> {
    Ok(crate::ingest::open_private(path).at(path)?)
}

/// Pushes every `digest` field of the descriptors in a manifest or index (config, layers,
/// manifests, subject) onto `out`.
fn collect_digests(doc: &Value, out: &mut Vec<Digest>) {
    let mut push = |d: &Value| {
        if let Some(digest) = d
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
        {
            out.push(digest);
        }
    };
    if let Some(config) = doc.get("config") {
        push(config);
    }
    if let Some(subject) = doc.get("subject") {
        push(subject);
    }
    let pinned = doc["annotations"][modelpack_spec::annotations::ANNOTATION_CHUNK_INDEX_DIGEST]
        .as_str()
        .and_then(|s| s.parse().ok());
    for key in ["layers", "manifests", "blobs"] {
        for d in doc.get(key).and_then(Value::as_array).into_iter().flatten() {
            push(d);
        }
    }
    out.extend(pinned);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_resolve_untag_prune() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let layer = store.put_bytes(b"layer").expect("put");
        let orphan = store.put_bytes(b"orphan").expect("put");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": modelpack_spec::media_type::MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": modelpack_spec::media_type::MEDIA_TYPE_OCI_EMPTY, "digest": store.put_bytes(b"{}").expect("put").to_string(), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": layer.to_string(), "size": 5}],
        });
        let bytes = serde_json::to_vec(&manifest).expect("json");
        let digest = store.put_bytes(&bytes).expect("put");
        let desc = modelpack_spec::descriptor(
            modelpack_spec::media_type::MEDIA_TYPE_OCI_MANIFEST,
            &digest,
            bytes.len() as u64,
            None,
        )
        .expect("descriptor");
        let name: Reference = "m:v1".parse().expect("ref");
        store.tag(&name, &desc).expect("tag");
        assert_eq!(
            store.resolve(&name).expect("resolve").digest(),
            desc.digest()
        );
        assert_eq!(
            store.entries().expect("entries")[0].name.as_deref(),
            Some("m:v1")
        );

        let report = store.prune(false).expect("prune");
        assert_eq!(
            report.blobs.iter().map(|b| &b.0).collect::<Vec<_>>(),
            [&orphan]
        );
        assert!(store.has_blob(&layer));
        assert!(store.check().expect("check").problems.is_empty());

        store.untag(&name).expect("untag");
        assert!(store.resolve(&name).expect_err("gone").is_not_found());
        let report = store.prune(true).expect("dry run");
        assert_eq!(report.blobs.len(), 3);
        assert!(store.has_blob(&layer), "dry run removes nothing");
    }

    #[test]
    fn check_finds_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let digest = store.put_bytes(b"content").expect("put");
        fs::write(store.blob_path(&digest), b"tampered").expect("write");
        let report = store.check().expect("check");
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            store
                .read_blob(&digest, 100)
                .expect_err("mismatch")
                .is_digest_mismatch()
        );
    }

    #[test]
    fn dropped_ingest_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut ingest = store.ingest().expect("ingest");
        ingest.file().write_all(b"partial").expect("write");
        let path = ingest.path().to_owned();
        drop(ingest);
        assert!(!path.exists());
    }
}
