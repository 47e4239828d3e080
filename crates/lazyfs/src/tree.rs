//! The inode tree of a mounted model: folders implied by paths, raw-layer files backed by lazy
//! blobs, tar-layer entries unpacked (verified) into the cache.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use std::time::{Duration, SystemTime};

use fuser::FileType;

use crate::layer::{DeferredLayer, LazyFile};

/// A file time.
pub(crate) type Timestamp = SystemTime;

/// What an entry shows besides its content: size, permission bits, and owner and time where
/// recorded (the mount's owner and start time otherwise).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attrs {
    pub size: u64,
    pub mode: u16,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<Timestamp>,
}

impl Attrs {
    /// `size` bytes with `mode`, owned by the mount's owner, timed at its start.
    pub(crate) fn new(size: u64, mode: u16) -> Attrs {
        Attrs {
            size,
            mode,
            ..Attrs::default()
        }
    }

    /// The same, with a recorded time (if any).
    pub(crate) fn at(self, mtime: Option<Timestamp>) -> Attrs {
        Attrs { mtime, ..self }
    }
}

/// The time `secs` seconds and `nanos` nanoseconds from the epoch (before it when negative).
pub(crate) fn time(secs: i64, nanos: u32) -> Timestamp {
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

/// Where a file's bytes are.
pub(crate) enum Content {
    /// A raw layer, or a file inside a tar layer, read lazily.
    Lazy(LazyFile),
    /// A file unpacked from a tar layer into the cache.
    Local(PathBuf),
    /// The one file of a tar layer that is unpacked on first read.
    Deferred(std::sync::Arc<DeferredLayer>),
    /// The status file.
    Status,
}

/// What an inode is.
pub(crate) enum Kind {
    Dir(BTreeMap<OsString, u64>),
    File(Content),
    Symlink(String),
}

/// One inode.
pub(crate) struct Node {
    pub parent: u64,
    pub kind: Kind,
    pub size: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub path: String,
}

impl Node {
    pub(crate) fn file_type(&self) -> FileType {
        match self.kind {
            Kind::Dir(_) => FileType::Directory,
            Kind::File(_) => FileType::RegularFile,
            Kind::Symlink(_) => FileType::Symlink,
        }
    }
}

/// Every inode; index = ino - 1.
pub(crate) struct Tree {
    pub nodes: Vec<Node>,
    uid: u32,
    gid: u32,
    now: Timestamp,
}

/// The root inode.
pub(crate) const ROOT: u64 = 1;

impl Tree {
    pub(crate) fn new(uid: u32, gid: u32, now: Timestamp) -> Tree {
        Tree {
            nodes: vec![Node {
                parent: ROOT,
                kind: Kind::Dir(BTreeMap::new()),
                size: 0,
                mode: 0o755,
                uid,
                gid,
                mtime: now,
                path: String::new(),
            }],
            uid,
            gid,
            now,
        }
    }

    /// Every node with its inode number.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Node)> {
        (1..).zip(&self.nodes)
    }

    pub(crate) fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(ino.checked_sub(1)? as usize)
    }

    fn child(&self, parent: u64, name: &str) -> Option<u64> {
        match &self.get(parent)?.kind {
            Kind::Dir(children) => children.get(&OsString::from(name)).copied(),
            _ => None,
        }
    }

    /// The folder for `dir_path` (created with default attributes if missing).
    fn ensure_dir(&mut self, dir_path: &str) -> Option<u64> {
        let mut ino = ROOT;
        let mut path = String::new();
        for component in dir_path.split('/').filter(|c| !c.is_empty()) {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(component);
            ino = match self.child(ino, component) {
                Some(existing) => match self.get(existing)?.kind {
                    Kind::Dir(_) => existing,
                    _ => return None,
                },
                None => self.insert(
                    ino,
                    component,
                    Kind::Dir(BTreeMap::new()),
                    Attrs::new(0, 0o755),
                    &path,
                ),
            };
        }
        Some(ino)
    }

    fn insert(&mut self, parent: u64, name: &str, kind: Kind, attrs: Attrs, path: &str) -> u64 {
        let ino = self.nodes.len() as u64 + 1;
        self.nodes.push(Node {
            parent,
            kind,
            size: attrs.size,
            mode: attrs.mode,
            uid: attrs.uid.unwrap_or(self.uid),
            gid: attrs.gid.unwrap_or(self.gid),
            mtime: attrs.mtime.unwrap_or(self.now),
            path: path.to_owned(),
        });
        if let Some(Node {
            kind: Kind::Dir(children),
            ..
        }) = self.nodes.get_mut(parent as usize - 1)
        {
            children.insert(OsString::from(name), ino);
        }
        ino
    }

    /// Adds a file or symlink at `path`; false when the path clashes with another entry.
    pub(crate) fn add(&mut self, path: &str, kind: Kind, attrs: Attrs) -> bool {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let Some(parent) = self.ensure_dir(dir) else {
            return false;
        };
        if self.child(parent, name).is_some() {
            return false;
        }
        self.insert(parent, name, kind, attrs, path);
        true
    }

    /// Sets a folder's mode and time (from a tar directory entry).
    pub(crate) fn set_dir_attrs(&mut self, path: &str, mode: u16, mtime: Option<Timestamp>) {
        if let Some(ino) = self.ensure_dir(path)
            && let Some(node) = self.nodes.get_mut(ino as usize - 1)
        {
            node.mode = mode;
            if let Some(t) = mtime {
                node.mtime = t;
            }
        }
    }
}
