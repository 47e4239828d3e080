//! Mount system calls (through rustix) and the host's mount table: the read-only bind of a
//! model's folder onto a target path, and its removal.

use std::path::Path;

use rustix::mount::{MountFlags, UnmountFlags};

/// Binds `source` at `target` and makes that bind read-only (nosuid, nodev, as the FUSE mount
/// under it). On failure nothing is left mounted at `target`.
pub fn bind_read_only(source: &Path, target: &Path) -> std::io::Result<()> {
    rustix::mount::mount_bind(source, target)?;
    let flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV;
    if let Err(e) = rustix::mount::mount_remount(target, flags, "") {
        let _ = detach(target);
        return Err(e.into());
    }
    Ok(())
}

/// Lazily unmounts `path` (it goes once nothing uses it); a path that is not a mount point is
/// no error.
pub fn detach(path: &Path) -> std::io::Result<()> {
    match rustix::mount::unmount(path, UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Detaches every mount stacked at `path` (a bind made twice leaves two).
pub fn detach_all_at(path: &Path) -> std::io::Result<()> {
    for _ in 0..16 {
        if !is_mount_point(path) {
            return Ok(());
        }
        detach(path)?;
    }
    Ok(())
}

pub use modelpack_lazyfs::mountinfo::{is_mount_point, under};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_mounted() {
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/no/such/dir")));
    }
}
