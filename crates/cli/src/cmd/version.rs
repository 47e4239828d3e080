//! `modelpack version`: the version, the git commit it was built from (when the build knew it)
//! and the target it was compiled for, as text or JSON.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat};

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// What `version` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BuildInfo {
    version: &'static str,
    /// `MODELPACK_GIT_COMMIT` at compile time, when the build set it.
    git_commit: Option<&'static str>,
    target: String,
}

impl BuildInfo {
    /// This binary's.
    fn current() -> BuildInfo {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION"),
            git_commit: option_env!("MODELPACK_GIT_COMMIT").filter(|c| !c.trim().is_empty()),
            target: target(),
        }
    }

    /// oras-style lines: `Version:`, `Git commit:` (when known), `Target:`.
    fn text(&self) -> String {
        let mut out = format!("Version:     {}\n", self.version);
        if let Some(commit) = self.git_commit {
            out.push_str(&format!("Git commit:  {}\n", commit.trim()));
        }
        out.push_str(&format!("Target:      {}\n", self.target));
        out
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "version": self.version,
            "gitCommit": self.git_commit.map(str::trim),
            "target": self.target,
        })
    }
}

/// The compilation target as `ARCH-OS[-ENV]`, e.g. `x86_64-linux-gnu`.
fn target() -> String {
    let env = if cfg!(target_env = "gnu") {
        "gnu"
    } else if cfg!(target_env = "musl") {
        "musl"
    } else {
        ""
    };
    [std::env::consts::ARCH, std::env::consts::OS, env]
        .iter()
        .filter(|part| !part.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("-")
}

/// Prints the build information; with `-q` only the version number.
pub fn run(global: &GlobalArgs, args: VersionArgs) -> anyhow::Result<ExitCode> {
    let info = BuildInfo::current();
    match args.output {
        OutputFormat::Json => crate::display::print_json(&info.json())?,
        OutputFormat::Text if global.quiet => println!("{}", info.version),
        OutputFormat::Text => print!("{}", info.text()),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_oras_style_lines_and_skips_an_unknown_commit() {
        let info = BuildInfo {
            version: "1.2.3",
            git_commit: None,
            target: "x86_64-linux-gnu".into(),
        };
        assert_eq!(
            info.text(),
            "Version:     1.2.3\nTarget:      x86_64-linux-gnu\n"
        );
        let with_commit = BuildInfo {
            git_commit: Some("abc123\n"),
            ..info
        };
        assert!(with_commit.text().contains("Git commit:  abc123\n"));
        assert_eq!(with_commit.json()["gitCommit"], "abc123");
    }

    #[test]
    fn current_build_reports_the_crate_version_and_target() {
        let info = BuildInfo::current();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(
            info.target.starts_with(std::env::consts::ARCH),
            "{}",
            info.target
        );
        assert!(
            info.target.contains(std::env::consts::OS),
            "{}",
            info.target
        );
        let json = info.json();
        assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
        assert!(
            json.get("gitCommit").is_some(),
            "gitCommit is always present"
        );
    }
}
