//! The registry the benchmarks, the demo and the containerd checks start (the launcher, the
//! proxies and the process guards themselves are `modelpack-testkit`'s, shared with the
//! end-to-end tests).

use std::path::Path;

use anyhow::Context as _;
use modelpack_testkit::registry::{Registry, RegistryOptions};

/// A CNCF distribution registry on loopback, storing under `dir`; stopped by PID when dropped.
pub fn registry(dir: &Path) -> anyhow::Result<Registry> {
    Registry::start(RegistryOptions {
        dir: Some(dir),
        ..RegistryOptions::default()
    })
    .context("cannot start docker-registry (cargo xtask setup installs it)")
}
