//! The host's mount table: finding mounts under a folder and detaching them.

use std::path::Path;

pub use modelpack_lazyfs::mountinfo::{is_mount_point, under};

/// Detaches the mount at `path` (lazy unmount: it goes away once nothing uses it). Used for
/// FUSE mounts whose server died with a previous process, and as the fallback when a clean
/// unmount finds the mount busy.
pub fn detach(path: &Path) -> std::io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(std::io::Error::from)
}
