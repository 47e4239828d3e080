//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use xshell::{Shell, cmd};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    // `--containerd 1.6|2|all` as for `cargo xtask e2e`; both versions unless told.
    let versions = crate::e2e::versions(args)?;
    crate::setup::run()?;
    let sh = Shell::new()?;
    sh.change_dir(crate::root());
    cmd!(sh, "cargo fmt --all -- --check").run()?;
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --locked -- -D warnings"
    )
    .run()?;
    // The end-to-end tests drive the built binaries.
    cmd!(sh, "cargo build --workspace --bins --locked").run()?;
    let bin = crate::target_dir().join("debug/modelpack");
    cmd!(sh, "cargo test --workspace --locked")
        .env("MODELPACK_BIN", &bin)
        .env("MODELPACK_E2E", "1")
        .env(
            "MODELPACK_ORAS_PYTHON",
            crate::setup::oras_venv().join("bin/python"),
        )
        .run()?;
    // The containerd checks on 1.6 and 2.x (they need root: containerd, mounts, runc; CI runs
    // as root).
    let root = modelpack_testkit::sys::is_root();
    if root {
        crate::e2e::check(&crate::e2e::Bins::of("debug"), &versions)?;
    } else if std::env::var_os("CI").is_some() {
        anyhow::bail!("CI must run cargo xtask test as root: the containerd checks need it");
    } else {
        println!("note: not root, the containerd checks (cargo xtask e2e) were skipped");
    }
    // Fuzzing, a short fixed time per target (`cargo xtask fuzz --time N` for longer runs).
    crate::fuzz::fuzz_all(20)?;
    println!("xtask test: all checks passed");
    Ok(())
}
