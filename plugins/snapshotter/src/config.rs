//! Settings: defaults, overlaid by the TOML config file, overlaid by flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use modelpack_daemon as daemon;
use serde::Deserialize;

/// Default root folder (metadata, snapshots, cache).
pub const DEFAULT_ROOT: &str = "/var/lib/modelpack-snapshotter";
/// Default socket containerd dials.
pub const DEFAULT_ADDRESS: &str = "/run/modelpack-snapshotter/modelpack-snapshotter.sock";
/// Layers up to this size (configs, tokenizers) are fetched as soon as their snapshot mounts: a
/// model loader reads them first, and they cost little.
pub const DEFAULT_PREFETCH_SMALL: u64 = 1 << 20;
/// Default config file (read when present).
pub const DEFAULT_CONFIG: &str = "/etc/modelpack-snapshotter/config.toml";

/// The config file as written (every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Root folder.
    pub root: Option<PathBuf>,
    /// Socket path.
    pub address: Option<PathBuf>,
    /// Chunk cache folder (default `ROOT/cache`).
    pub cache_dir: Option<PathBuf>,
    /// Cap of the chunk cache in bytes (unbounded when absent).
    pub cache_max_bytes: Option<u64>,
    /// `full` (default) or `none`.
    pub verify: Option<VerifyPolicy>,
    /// Fetch whole layers in the background once mounted.
    pub prefetch: Option<bool>,
    /// Fetch layers of at most this many bytes as soon as they are mounted (0: off).
    pub prefetch_small: Option<u64>,
    /// Start even when some remote snapshots cannot be mounted again.
    pub allow_invalid_mounts_on_restart: Option<bool>,
    /// Socket of the process that keeps the FUSE connections across restarts (default
    /// `ROOT/fuse-holder.sock`; started when none answers); `""` for none.
    pub fuse_holder: Option<PathBuf>,
    /// `HOST:PORT` for Prometheus metrics (off when absent).
    pub metrics_address: Option<String>,
    /// containerd's registry hosts folder (`REGISTRY/hosts.toml`: mirrors, TLS); default
    /// [`daemon::DEFAULT_HOSTS_DIR`] when it exists, `""` for none.
    pub hosts_dir: Option<PathBuf>,
    /// Per-registry settings, keyed by host (`registry.example:5000`).
    #[serde(default)]
    pub registry: BTreeMap<String, RegistryHost>,
}

/// How to reach one registry host.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryHost {
    /// Speak HTTP instead of HTTPS.
    #[serde(default)]
    pub plain_http: bool,
    /// Do not verify TLS certificates.
    #[serde(default)]
    pub insecure: bool,
    /// Extra CA certificate (PEM).
    pub ca_file: Option<PathBuf>,
}

/// Verification policy for layers without a chunk index.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerifyPolicy {
    /// Fetch and verify a whole layer before serving any of it.
    Full,
    /// Serve at once; verify the whole layer in the background and fail reads if it does not.
    Background,
    /// Serve unverified chunks.
    None,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Root folder.
    pub root: PathBuf,
    /// Socket path.
    pub address: PathBuf,
    /// Chunk cache folder.
    pub cache_dir: PathBuf,
    /// Cap of the chunk cache in bytes.
    pub cache_max_bytes: Option<u64>,
    /// Verification policy.
    pub verify: VerifyPolicy,
    /// Background prefetch.
    pub prefetch: bool,
    /// Layers of at most this many bytes are fetched as soon as mounted.
    pub prefetch_small: u64,
    /// Keep going when remounting fails on start.
    pub allow_invalid_mounts_on_restart: bool,
    /// The FUSE connection holder's socket, if one is used.
    pub fuse_holder: Option<PathBuf>,
    /// Metrics listener.
    pub metrics_address: Option<String>,
    /// containerd's registry hosts folder, if any.
    pub hosts_dir: Option<PathBuf>,
    /// Registry hosts.
    pub registries: BTreeMap<String, RegistryHost>,
}

/// What the flags say (each overrides the file).
#[derive(Debug, Default)]
pub struct Overrides {
    pub root: Option<PathBuf>,
    pub address: Option<PathBuf>,
    pub verify: Option<VerifyPolicy>,
    pub metrics_address: Option<String>,
    pub hosts_dir: Option<PathBuf>,
    pub allow_invalid_mounts_on_restart: bool,
    pub cache_max_bytes: Option<u64>,
    pub fuse_holder: Option<PathBuf>,
}

impl Settings {
    /// Reads `config` (an explicit path must exist; the default path may not) and applies
    /// `flags` on top.
    pub fn load(config: Option<&Path>, flags: Overrides) -> anyhow::Result<Settings> {
        let file = match config {
            Some(path) => read(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read(Path::new(DEFAULT_CONFIG))?,
            None => FileConfig::default(),
        };
        let root = flags
            .root
            .or(file.root)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        let fuse_holder = daemon::holder_socket(flags.fuse_holder.or(file.fuse_holder), &root);
        if let Some(socket) = &fuse_holder {
            // sun_path: 108 bytes with the terminating NUL.
            anyhow::ensure!(
                socket.as_os_str().len() < 108,
                "fuse_holder {}: a unix socket path has at most 107 bytes",
                socket.display()
            );
        }
        Ok(Settings {
            fuse_holder,
            address: flags
                .address
                .or(file.address)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS)),
            cache_dir: file.cache_dir.unwrap_or_else(|| root.join("cache")),
            cache_max_bytes: flags
                .cache_max_bytes
                .or(file.cache_max_bytes)
                .filter(|&max| max > 0),
            root,
            verify: flags.verify.or(file.verify).unwrap_or(VerifyPolicy::Full),
            prefetch: file.prefetch.unwrap_or(false),
            prefetch_small: file.prefetch_small.unwrap_or(DEFAULT_PREFETCH_SMALL),
            allow_invalid_mounts_on_restart: flags.allow_invalid_mounts_on_restart
                || file.allow_invalid_mounts_on_restart.unwrap_or(false),
            metrics_address: flags.metrics_address.or(file.metrics_address),
            hosts_dir: daemon::hosts_dir(flags.hosts_dir.or(file.hosts_dir))?,
            registries: file.registry,
        })
    }

    /// Settings for `host`: its own entry, else plain HTTP for loopback hosts (as Docker treats
    /// them), else HTTPS.
    pub fn registry(&self, host: &str) -> RegistryHost {
        if let Some(entry) = self.registries.get(host) {
            return entry.clone();
        }
        RegistryHost {
            plain_http: modelpack_registry::is_loopback(host),
            ..RegistryHost::default()
        }
    }
}

fn read(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_hosts_get_their_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "root = \"/srv/a\"\nverify = \"none\"\n[registry.\"reg.example:5000\"]\nplain_http = true\n",
        )
        .expect("write");
        let s = Settings::load(Some(&path), Overrides::default()).expect("load");
        assert_eq!(s.root, PathBuf::from("/srv/a"));
        assert_eq!(s.cache_dir, PathBuf::from("/srv/a/cache"));
        assert_eq!(s.verify, VerifyPolicy::None);
        assert!(s.registry("reg.example:5000").plain_http);
        assert!(!s.registry("other.example").plain_http);
        assert!(s.registry("127.0.0.1:5000").plain_http);
        let s = Settings::load(
            Some(&path),
            Overrides {
                root: Some(PathBuf::from("/srv/b")),
                ..Overrides::default()
            },
        )
        .expect("load");
        assert_eq!(s.root, PathBuf::from("/srv/b"));
    }

    #[test]
    fn the_example_config_uncommented_gives_the_defaults() {
        // Every `#key = value` line of the shipped example, uncommented, must be a key the
        // daemon accepts, and the values shown must be the defaults.
        let example = include_str!("../config.example.toml");
        let top_level: String = example
            .lines()
            .take_while(|l| !l.starts_with("#[registry"))
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(top_level.contains("prefetch_small"), "{top_level}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, &top_level).expect("write");
        let s = Settings::load(Some(&path), Overrides::default()).expect("the example parses");
        std::fs::write(dir.path().join("empty.toml"), "").expect("write");
        let d = Settings::load(Some(&dir.path().join("empty.toml")), Overrides::default())
            .expect("an empty file parses");
        assert_eq!(s.root, d.root);
        assert_eq!(s.address, d.address);
        assert_eq!(s.cache_dir, d.cache_dir);
        assert_eq!(s.cache_max_bytes, None);
        assert_eq!(s.cache_max_bytes, d.cache_max_bytes);
        assert_eq!(s.verify, d.verify);
        assert_eq!(s.prefetch, d.prefetch);
        assert_eq!(s.prefetch_small, DEFAULT_PREFETCH_SMALL);
        assert_eq!(s.prefetch_small, d.prefetch_small);
        assert_eq!(
            s.allow_invalid_mounts_on_restart,
            d.allow_invalid_mounts_on_restart
        );
    }

    #[test]
    fn hosts_dir_comes_from_the_flag_or_the_file_and_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, format!("hosts_dir = \"{}\"\n", dir.path().display()))
            .expect("write");
        let s = Settings::load(Some(&path), Overrides::default()).expect("load");
        assert_eq!(s.hosts_dir.as_deref(), Some(dir.path()));
        let off = Overrides {
            hosts_dir: Some(PathBuf::new()),
            ..Overrides::default()
        };
        assert_eq!(
            Settings::load(Some(&path), off).expect("load").hosts_dir,
            None
        );
        std::fs::write(&path, "hosts_dir = \"/nonexistent/certs.d\"\n").expect("write");
        let err = Settings::load(Some(&path), Overrides::default()).expect_err("no folder");
        assert!(err.to_string().contains("/nonexistent/certs.d"), "{err}");
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "rooot = \"/x\"\n").expect("write");
        assert!(Settings::load(Some(&path), Overrides::default()).is_err());
        assert!(
            Settings::load(Some(&dir.path().join("absent.toml")), Overrides::default()).is_err()
        );
    }
}
