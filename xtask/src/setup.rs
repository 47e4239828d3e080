//! `cargo xtask setup`: install the Debian packages the project needs, only when missing, and
//! fetch containerd 2.x into `target/containerd2` for the containerd checks.

use anyhow::{Context as _, bail};
use xshell::{Shell, cmd};

/// Every Debian package the tests, the demo and the benchmarks use.
pub const PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "fuse3",
    "containerd",
    "runc",
    "docker-registry",
    "skopeo",
    "apache2-utils",
    "busybox-static",
    "python3-venv",
    "iproute2",
    "curl",
    "openssl",
];

fn installed(sh: &Shell, package: &str) -> bool {
    let format = "-f=${Status}";
    cmd!(sh, "dpkg-query -W {format} {package}")
        .quiet()
        .ignore_stderr()
        .read()
        .is_ok_and(|s| s.contains("install ok installed"))
}

/// Where oras-py lives: a venv under the target directory.
pub fn oras_venv() -> std::path::PathBuf {
    crate::target_dir().join("oras-venv")
}

/// Creates the oras-py venv (PyPI package `oras`) for the interop tests and benchmarks.
fn oras_py(sh: &Shell) -> anyhow::Result<()> {
    let venv = oras_venv();
    let python = venv.join("bin/python");
    if cmd!(sh, "{python} -c 'import oras.client'")
        .quiet()
        .ignore_stderr()
        .run()
        .is_ok()
    {
        return Ok(());
    }
    println!("setup: installing oras-py into {}", venv.display());
    cmd!(sh, "python3 -m venv {venv}")
        .run()
        .context("python3 -m venv failed")?;
    let pip = venv.join("bin/pip");
    cmd!(sh, "{pip} install -q oras")
        .run()
        .context("pip install oras failed")?;
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    let sh = Shell::new()?;
    install_packages(&sh)?;
    oras_py(&sh)?;
    // containerd 2.x for the containerd checks (not a system package: unpacked privately).
    if is_root() {
        crate::containerd2::ensure()?;
    }
    Ok(())
}

/// Installed only when no `kubectl` is on PATH (another package may provide one): the CSI
/// deployment manifests are checked with `kubectl label --local`.
const KUBECTL_PACKAGE: &str = "kubernetes-client";

fn have_command(name: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn install_packages(sh: &Shell) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(sh, p))
        .collect();
    if !have_command("kubectl") {
        missing.push(KUBECTL_PACKAGE);
    }
    if missing.is_empty() {
        println!("setup: every package is installed");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "setup: missing packages {} and not root; run as root or install them",
            missing.join(" ")
        );
    }
    println!("setup: installing {}", missing.join(" "));
    cmd!(sh, "apt-get update -q")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .context("apt-get update failed")?;
    cmd!(
        sh,
        "apt-get install -y -q --no-install-recommends {missing...}"
    )
    .env("DEBIAN_FRONTEND", "noninteractive")
    .run()
    .context("apt-get install failed")?;
    Ok(())
}

pub use modelpack_testkit::sys::is_root;
