//! containerd 2.x for the containerd checks: Debian's development suite (`sid`) packages it and
//! its binaries run on Debian 12 with Debian 12's runc. The package is fetched with a private
//! apt sources folder and state (the system's apt configuration and package database are not
//! touched), unpacked with `dpkg -x` under `target/containerd2/root`, and reused while the
//! unpacked `containerd` is there.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian's archive keyring, which signs the development suite too.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The cache folder: `target/containerd2`.
pub fn dir() -> PathBuf {
    crate::target_dir().join("containerd2")
}

/// The folder holding the unpacked `containerd`, `ctr` and `containerd-shim-runc-v2`.
pub fn bin_dir() -> PathBuf {
    dir().join("root/usr/bin")
}

/// The first Debian archive URI of the system's apt sources (deb822 `.sources` files and
/// one-line `sources.list` files), skipping the security archive.
pub fn mirror_uri() -> anyhow::Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            uri_deb822(&text)
        } else if name.ends_with(".list") {
            uri_one_line(&text)
        } else {
            None
        };
        if let Some(uri) = found {
            return Ok(uri);
        }
    }
    bail!("no Debian archive in /etc/apt/sources.list or /etc/apt/sources.list.d")
}

fn is_archive(uri: &str, suites: &str) -> bool {
    !uri.contains("security") && !suites.contains("security")
}

/// deb822: stanzas separated by blank lines; `Types`, `URIs`, `Suites` fields.
fn uri_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let (Some(types), Some(uris)) = (field("Types:"), field("URIs:")) else {
            continue;
        };
        if field("Enabled:").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        let suites = field("Suites:").unwrap_or_default();
        if !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        if let Some(uri) = uris.split_whitespace().find(|u| is_archive(u, suites)) {
            return Some(uri.to_owned());
        }
    }
    None
}

/// One-line format: `deb [options] URI SUITE COMPONENT...`.
fn uri_one_line(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            rest = rest.split_once(']')?.1.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if is_archive(uri, suite) {
            return Some(uri.to_owned());
        }
    }
    None
}

fn apt(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let options = [
        "-q".to_owned(),
        "-o".to_owned(),
        "Dir::Etc::SourceList=/dev/null".to_owned(),
        "-o".to_owned(),
        format!("Dir::Etc::SourceParts={}", dir.join("etc").display()),
        "-o".to_owned(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        "-o".to_owned(),
        format!("Dir::Cache={}", dir.join("cache").display()),
        "-o".to_owned(),
        "APT::Get::List-Cleanup=0".to_owned(),
        // The download lands in a folder the `_apt` user cannot write.
        "-o".to_owned(),
        "APT::Sandbox::User=root".to_owned(),
    ];
    let mut cmd = Command::new("apt-get");
    cmd.args(options)
        .args(args)
        .current_dir(dir)
        .env("DEBIAN_FRONTEND", "noninteractive");
    crate::containerd::output_ok(cmd, "apt-get", &args.join(" "))?;
    Ok(())
}

/// Makes sure `target/containerd2/root/usr/bin` holds containerd 2.x; returns that folder.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let bin = bin_dir();
    let wanted = ["containerd", "ctr", "containerd-shim-runc-v2"];
    if wanted.iter().all(|b| bin.join(b).exists()) {
        return Ok(bin);
    }
    if !crate::setup::is_root() {
        bail!(
            "containerd 2.x is not unpacked under {} and not root",
            bin.display()
        );
    }
    let dir = dir();
    println!(
        "setup: fetching containerd 2.x (Debian sid) into {}",
        dir.display()
    );
    for sub in ["etc", "lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let uri = mirror_uri()?;
    fs::write(
        dir.join("etc/sid.sources"),
        format!("Types: deb\nURIs: {uri}\nSuites: sid\nComponents: main\nSigned-By: {KEYRING}\n"),
    )?;
    apt(&dir, &["update"])?;
    for old in fs::read_dir(&dir)?.flatten() {
        if old.file_name().to_string_lossy().ends_with(".deb") {
            fs::remove_file(old.path())?;
        }
    }
    apt(&dir, &["download", "containerd"])?;
    let deb = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("containerd_"))
        })
        .context("apt-get download left no containerd_*.deb")?;
    // Unpack into a fresh folder, then move it into place: a cut unpack is never reused.
    let staging = dir.join("root.partial");
    let _ = fs::remove_dir_all(&staging);
    let out = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&staging)
        .output()
        .context("cannot run dpkg")?;
    if !out.status.success() {
        bail!("dpkg -x failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = fs::remove_dir_all(dir.join("root"));
    fs::rename(&staging, dir.join("root"))?;
    for b in wanted {
        if !bin.join(b).exists() {
            bail!("{} has no usr/bin/{b}", deb.display());
        }
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_archive_from_both_formats() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.test/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            uri_deb822(deb822).as_deref(),
            Some("http://mirror.test/debian")
        );
        let security_first = "Types: deb-src\nURIs: http://src.test/debian\nSuites: bookworm\n\n\
                              Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n\n\
                              Types: deb\nURIs: http://other.test/debian\nSuites: bookworm\n";
        assert_eq!(
            uri_deb822(security_first).as_deref(),
            Some("http://other.test/debian")
        );
        let list = "# deb http://old.test/debian bookworm main\n\
                    deb http://security.test/debian-security bookworm-security main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.test/debian bookworm main\n";
        assert_eq!(
            uri_one_line(list).as_deref(),
            Some("http://mirror.test/debian")
        );
        assert_eq!(
            uri_one_line("deb-src http://x.test/debian sid main\n"),
            None
        );
    }
}
