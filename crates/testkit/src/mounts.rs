//! The mount table as the kernel gives it (`/proc/self/mountinfo`), with its octal escapes
//! (space, tab, newline, backslash) undone, and lazy detaching of what a test left mounted.

use std::path::{Path, PathBuf};

use rustix::mount::{UnmountFlags, unmount};

use modelpack_mountinfo as mountinfo;

/// Every mount point, in table order.
pub fn mount_points() -> Vec<PathBuf> {
    mountinfo::entries()
        .into_iter()
        .map(|e| e.mount_point)
        .collect()
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mountinfo::under(dir)
}

/// True when `path` (resolved) is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mountinfo::is_mount_point(&path)
}

/// Detaches the mount at `path` (lazy unmount).
pub fn detach(path: &Path) -> std::io::Result<()> {
    unmount(path, UnmountFlags::DETACH).map_err(std::io::Error::from)
}

/// Detaches every mount under `dir`, deepest first.
pub fn detach_all(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = detach(&m);
    }
}

/// Detaches every mount under (and at) its folder when dropped: a test that fails half-way
/// leaves no mount behind.
#[derive(Debug)]
pub struct DetachOnDrop(pub PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        detach_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_mounted() {
        assert!(is_mounted(Path::new("/")));
    }
}
