//! A real CNCF distribution registry (Debian's `docker-registry`) on loopback, stopped by PID
//! when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::process::ChildGuard;

/// How to start a registry.
#[derive(Debug, Default, Clone, Copy)]
pub struct RegistryOptions<'a> {
    /// The content of an htpasswd file: basic auth is then required.
    pub htpasswd: Option<&'a str>,
    /// (certificate PEM, key PEM): serve HTTPS.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Keep config and data here (created) instead of a temporary folder.
    pub dir: Option<&'a Path>,
    /// Run as a pull-through cache (a mirror) of the registry at this URL
    /// (`http://127.0.0.1:PORT`): its `proxy: remoteurl:` setting. Such a registry refuses pushes.
    pub proxy_of: Option<&'a str>,
}

/// A running registry.
#[derive(Debug)]
pub struct Registry {
    /// The port it listens on (loopback).
    pub port: u16,
    dir: PathBuf,
    guard: ChildGuard,
    _temp: Option<tempfile::TempDir>,
}

impl Registry {
    /// Starts one and waits until it accepts connections.
    pub fn start(opts: RegistryOptions<'_>) -> std::io::Result<Registry> {
        let temp = match opts.dir {
            Some(_) => None,
            None => Some(tempfile::tempdir()?),
        };
        let dir = opts
            .dir
            .map(Path::to_owned)
            .or_else(|| temp.as_ref().map(|t| t.path().to_owned()))
            .unwrap_or_default();
        std::fs::create_dir_all(&dir)?;
        let port = crate::sys::free_port();
        let auth = match opts.htpasswd {
            Some(content) => {
                let path = dir.join("htpasswd");
                std::fs::write(&path, content)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: modelpack-test\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        let tls = opts.tls.map_or_else(String::new, |(cert, key)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            )
        });
        let proxy = opts
            .proxy_of
            .map_or_else(String::new, |url| format!("proxy:\n  remoteurl: {url}\n"));
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}{proxy}",
            dir.join("data").display(),
        );
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let registry = Registry {
            port,
            guard: serve(&config_path, port)?,
            dir,
            _temp: temp,
        };
        Ok(registry)
    }

    /// Runs the registry's garbage collector as its documentation says: with the registry
    /// stopped (`docker-registry garbage-collect CONFIG`), then starts it again on the same port
    /// and data. Blobs no manifest references are deleted.
    pub fn garbage_collect(&mut self) -> std::io::Result<()> {
        self.guard.stop();
        let config_path = self.dir.join("config.yml");
        let status = Command::new("docker-registry")
            .arg("garbage-collect")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "docker-registry garbage-collect exited with {status}"
            )));
        }
        self.guard = serve(&config_path, self.port)?;
        Ok(())
    }

    /// Replaces the htpasswd file (the registry reads it at start only) and starts the
    /// registry again on the same port and data: credentials rotated.
    pub fn replace_htpasswd(&mut self, content: &str) -> std::io::Result<()> {
        self.guard.stop();
        std::fs::write(self.dir.join("htpasswd"), content)?;
        self.guard = serve(&self.dir.join("config.yml"), self.port)?;
        Ok(())
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The folder holding its config (`config.yml`) and data (`data/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

/// Writes containerd's `hosts.toml` for `registry` under the hosts folder `hosts_dir`: `server`
/// as the upstream and one mirror `mirror` (both `HOST:PORT`, plain HTTP) with `capabilities`
/// (a TOML array such as `["pull"]`).
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry: &str,
    server: &str,
    mirror: &str,
    capabilities: &str,
) -> std::io::Result<()> {
    let folder = hosts_dir.join(registry);
    std::fs::create_dir_all(&folder)?;
    std::fs::write(
        folder.join("hosts.toml"),
        format!(
            "server = \"http://{server}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = {capabilities}\n"
        ),
    )
}

/// Starts `docker-registry serve CONFIG` and waits until it listens on `port`.
fn serve(config_path: &Path, port: u16) -> std::io::Result<ChildGuard> {
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let guard = ChildGuard::new(child);
    crate::sys::wait_for_port(port)?;
    Ok(guard)
}
