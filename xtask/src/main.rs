//! `cargo xtask`: project automation in Rust instead of shell scripts.
//!
//! - `setup`: install the Debian packages the project needs (idempotent);
//! - `test`: setup, formatting, clippy, every test (unit, conformance, end-to-end, e2e);
//! - `e2e`: the containerd checks against a private containerd (1.6 and 2.x), registry and
//!   snapshotter;
//! - `fuzz`: the cargo-fuzz targets, a fixed time each;
//! - `bench`: our commands and their comparisons side by side, written to docs/benchmarks.md;
//! - `demo`: the main job end to end on a generated sample model.

mod bench;
mod bench_containerd;
mod bench_small;
mod containerd;
mod containerd2;
mod demo;
mod e2e;
mod e2e_creds;
mod e2e_cri;
mod e2e_csi;
mod e2e_restart;
mod fuzz;
mod measure;
mod services;
mod setup;
mod test;
#[cfg(test)]
mod tidy;

use std::path::{Path, PathBuf};

use anyhow::bail;

const USAGE: &str = "usage: cargo xtask <setup|test|e2e|fuzz|bench|demo> [options]

  setup            install the Debian packages the project needs (as root; idempotent)
  test [--containerd 1.6|2|all]
                   setup, fmt check, clippy, and every test (e2e included, as root)
  e2e [--containerd 1.6|2|all] [--no-build]
                   the containerd checks: own containerd, registry, snapshotter, runc (root),
                   on containerd 1.6 (Debian 12), 2.x (Debian sid, fetched into
                   target/containerd2) or both (default); --no-build: with the
                   debug binaries already built
  e2e-cri [--containerd 1.6|2|all] [--no-build]
                   the CRI check alone (containerd's CRI plugin on the snapshotter)
  fuzz [--time SECS]
                   every cargo-fuzz target for SECS seconds (default 60)
  bench [--size-mib N] [--runs N] [--big-mib N] [--repeat N] [--small-files N]
        [--only transfer|small|containerd|mount|headers]
                   run the benchmarks and write docs/benchmarks.md (the table of record
                   comes from --repeat 3); --only: those rows, printed, not written
  demo             build, inspect, extract and verify a sample model";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = &args[1..];
    match task.as_str() {
        "setup" => setup::run(),
        "test" => test::run(rest),
        "e2e" => e2e::run(rest),
        "e2e-cri" => e2e_cri::run(rest),
        "fuzz" => fuzz::run(rest),
        "bench" => bench::run(rest),
        "demo" => demo::run(),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task {other:?}\n{USAGE}"),
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Installs what is missing, builds the release `modelpack` and `modelpack-snapshotter`, and
/// returns the `modelpack` binary and a fresh work folder `target/NAME` (the bench and the demo).
pub fn release_build(name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    setup::run()?;
    let sh = xshell::Shell::new()?;
    sh.change_dir(root());
    xshell::cmd!(
        sh,
        "cargo build --release --locked -p modelpack-cli -p modelpack-snapshotter"
    )
    .run()?;
    let work = target_dir().join(name);
    let _ = std::fs::remove_dir_all(&work);
    Ok((target_dir().join("release/modelpack"), work))
}

/// Reads `--name value` from `args`.
pub fn flag_value<T: std::str::FromStr>(args: &[String], name: &str) -> anyhow::Result<Option<T>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let Some(v) = args.get(i + 1) else {
                bail!("{name} needs a value");
            };
            match v.parse() {
                Ok(v) => Ok(Some(v)),
                Err(_) => bail!("{name}: cannot parse {v:?}"),
            }
        }
    }
}
