//! Snapshot metadata, persisted crash-safely as one JSON document under the root.
//!
//! Every change rewrites `metadata.json` through a temporary file, fsync and rename, so a crash
//! leaves either the old or the new document. Snapshot folders are created before the record that
//! names them and removed after it, so a crash can only leave folders no record names, and
//! [`crate::service::Service::cleanup`] (and the start-up pass) removes those.

use modelpack_spec::Digest;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What kind of snapshot a record is (containerd's kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable, not yet committed.
    Active,
    /// Immutable, may be a parent.
    Committed,
}

/// Where a remote snapshot's layer comes from; all it takes to mount it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// Repository reference (registry/name, tag optional).
    pub reference: String,
    /// Manifest digest.
    pub manifest_digest: Digest,
    /// Layer digest.
    pub layer_digest: Digest,
    /// Layer media type.
    pub media_type: String,
    /// File path of the layer in the model.
    pub path: String,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Folder number under `snapshots/`.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent key ("" for none).
    #[serde(default)]
    pub parent: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: i64,
    /// Last update, nanoseconds since the epoch.
    pub updated_ns: i64,
    /// Set for lazily served layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    version: u32,
    next_id: u64,
    snapshots: BTreeMap<String, Record>,
}

/// The metadata, in memory and on disk.
#[derive(Debug)]
pub struct Metadata {
    path: PathBuf,
    doc: Document,
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl Metadata {
    /// Loads `ROOT/metadata.json`, or starts empty.
    pub fn open(root: &Path) -> std::io::Result<Metadata> {
        let path = root.join("metadata.json");
        let doc = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Document {
                version: 1,
                next_id: 1,
                snapshots: BTreeMap::new(),
            },
            Err(e) => return Err(e),
        };
        Ok(Metadata { path, doc })
    }

    /// Writes the document atomically and durably.
    pub fn save(&self) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut tmp, &self.doc)?;
        tmp.flush()?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// A fresh folder number.
    pub fn next_id(&mut self) -> u64 {
        let id = self.doc.next_id.max(1);
        self.doc.next_id = id + 1;
        id
    }

    /// The record under `key`.
    pub fn get(&self, key: &str) -> Option<&Record> {
        self.doc.snapshots.get(key)
    }

    /// Mutable record under `key`.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Record> {
        self.doc.snapshots.get_mut(key)
    }

    /// Adds or replaces a record.
    pub fn insert(&mut self, key: String, record: Record) {
        self.doc.snapshots.insert(key, record);
    }

    /// Removes a record.
    pub fn remove(&mut self, key: &str) -> Option<Record> {
        self.doc.snapshots.remove(key)
    }

    /// Every record.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.doc.snapshots.iter()
    }

    /// True when some snapshot has `key` as its parent.
    pub fn has_children(&self, key: &str) -> bool {
        self.doc.snapshots.values().any(|r| r.parent == key)
    }

    /// The parent chain of `parent` (nearest first), as records; stops at a missing link.
    pub fn chain(&self, parent: &str) -> Vec<&Record> {
        let mut out = Vec::new();
        let mut next = parent;
        while !next.is_empty() {
            match self.doc.snapshots.get(next) {
                Some(r) if out.len() < 4096 => {
                    out.push(r);
                    next = &r.parent;
                }
                _ => break,
            }
        }
        out
    }

    /// Folder numbers in use.
    pub fn ids(&self) -> std::collections::HashSet<u64> {
        self.doc.snapshots.values().map(|r| r.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: Kind, parent: &str) -> Record {
        Record {
            id,
            kind,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created_ns: 1,
            updated_ns: 1,
            remote: None,
        }
    }

    #[test]
    fn survives_a_reopen_and_walks_chains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = Metadata::open(dir.path()).expect("open");
        let a = m.next_id();
        let b = m.next_id();
        assert_ne!(a, b);
        m.insert("a".into(), record(a, Kind::Committed, ""));
        m.insert("b".into(), record(b, Kind::Active, "a"));
        m.save().expect("save");
        let mut m = Metadata::open(dir.path()).expect("reopen");
        assert_eq!(m.get("b").map(|r| r.kind), Some(Kind::Active));
        assert!(m.has_children("a"));
        assert_eq!(
            m.chain("b").iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![b, a]
        );
        assert!(m.next_id() > b);
    }

    #[test]
    fn a_corrupt_document_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("metadata.json"), b"{not json").expect("write");
        assert!(Metadata::open(dir.path()).is_err());
    }
}
