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
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
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
