//! Keeping remote layers' FUSE connections across a restart: the daemon gives a duplicate of
//! each mount's `/dev/fuse` descriptor to a small holder process (`modelpack-snapshotter
//! fuse-holder`, started on demand in its own process group), and its successor adopts them
//! (see `modelpack_lazyfs::HolderProcess`). Containers reading a layer wait while no daemon
//! runs, and go on when the next one is up.

pub use modelpack_lazyfs::HolderProcess as FuseHolder;
