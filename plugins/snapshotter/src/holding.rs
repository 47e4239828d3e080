//! Keeping remote layers' FUSE connections across a restart: the daemon gives a duplicate of
//! each mount's `/dev/fuse` descriptor to a small holder process (`modelpack-snapshotter
//! fuse-holder`, started on demand in its own process group), and its successor adopts them
//! (see `modelpack_lazyfs::HolderProcess`). Containers reading a layer wait while no daemon
//! runs, and go on when the next one is up.

use std::path::Path;

pub use modelpack_lazyfs::HolderProcess as FuseHolder;

/// The holder at `socket`, started when none answers as this binary's `fuse-holder`
/// subcommand; its PID file and log go under `root`.
pub fn fuse_holder(socket: &Path, root: &Path) -> FuseHolder {
    FuseHolder::new(
        socket,
        root,
        "/proc/self/exe",
        [
            std::ffi::OsString::from("fuse-holder"),
            "--socket".into(),
            socket.into(),
        ],
    )
}
