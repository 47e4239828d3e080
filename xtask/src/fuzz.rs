//! `cargo xtask fuzz [--time SECS]`: every cargo-fuzz target in `fuzz/` for SECS seconds each
//! (default 60), seeded from `fuzz/corpus/<target>`; new inputs go to `target/fuzz-corpus/`, a
//! crash stops the run and leaves its input in `target/fuzz-artifacts/<target>/` (copy it into
//! `fuzz/corpus/<target>/`: `cargo test` replays that corpus, so it becomes a regression test).
//!
//! cargo-fuzz is installed from crates.io when missing. The machines have one (stable) Rust
//! toolchain; cargo-fuzz needs the sanitizer and coverage `-Z` flags, so it runs with
//! `RUSTC_BOOTSTRAP=1`.

use anyhow::Context as _;
use xshell::{Shell, cmd};

/// The targets, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "manifest",
    "config",
    "modelfile",
    "tar_index",
    "zstd_seek_table",
];

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let secs: u64 = crate::flag_value(args, "--time")?.unwrap_or(60);
    fuzz_all(secs)
}

/// Runs every target for `secs` seconds.
pub fn fuzz_all(secs: u64) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(crate::root());
    if cmd!(sh, "cargo fuzz --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        println!("fuzz: installing cargo-fuzz");
        cmd!(sh, "cargo install cargo-fuzz --locked")
            .run()
            .context("cannot install cargo-fuzz")?;
    }
    let scratch = crate::target_dir().join("fuzz-corpus");
    let artifacts = crate::target_dir().join("fuzz-artifacts");
    let max_time = format!("-max_total_time={secs}");
    for target in TARGETS {
        let new_inputs = scratch.join(target);
        let crashes = artifacts.join(target);
        std::fs::create_dir_all(&new_inputs)?;
        std::fs::create_dir_all(&crashes)?;
        let seeds = crate::root().join("fuzz/corpus").join(target);
        let prefix = format!("-artifact_prefix={}/", crashes.display());
        println!("fuzz: {target} for {secs} s");
        cmd!(
            sh,
            "cargo fuzz run {target} {new_inputs} {seeds} -- {max_time} {prefix} -rss_limit_mb=2048 -timeout=10"
        )
        .env("RUSTC_BOOTSTRAP", "1")
        .run()
        .with_context(|| {
            format!(
                "fuzz target {target} found a crash; its input is in {}",
                crashes.display()
            )
        })?;
    }
    println!(
        "fuzz: {} targets ran {secs} s each without a crash",
        TARGETS.len()
    );
    Ok(())
}
