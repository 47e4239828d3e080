//! Processes the benchmarks and the demo start: a loopback `docker-registry` and a userspace
//! proxy that makes a slow link (latency each way and a per-connection bandwidth cap). Each is
//! stopped by PID (or flag) when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A free TCP port on loopback.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..400 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// A CNCF distribution registry on loopback, storing under `dir`.
pub struct Registry {
    pub port: u16,
    child: Child,
}

impl Registry {
    pub fn start(dir: &Path) -> anyhow::Result<Registry> {
        let port = free_port()?;
        std::fs::create_dir_all(dir)?;
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start docker-registry (cargo xtask setup installs it)")?;
        let registry = Registry { port, child };
        wait_for_port(port)?;
        Ok(registry)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its PID.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A slow link: every chunk is delivered `latency` after it was read, in each direction, and each
/// connection's server-to-client stream is capped at `bytes_per_sec`.
pub struct SlowLink {
    pub port: u16,
    served: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    latency: Duration,
    rate: Option<f64>,
    stop: Arc<AtomicBool>,
    served: Option<Arc<std::sync::atomic::AtomicU64>>,
) {
    // Bounded: a full queue stops the reader, as a full TCP window would.
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(256);
    let reader_stop = stop.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if reader_stop.load(Ordering::Relaxed) {
                break;
            }
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + latency, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut sent = 0u64;
        for (due, chunk) in rx {
            if let Some(wait) = due
                .checked_duration_since(Instant::now())
                .filter(|w| !w.is_zero())
            {
                std::thread::sleep(wait);
            }
            if let Some(rate) = rate.filter(|r| r.is_finite()) {
                let allowed_at = started + Duration::from_secs_f64(sent as f64 / rate);
                if let Some(wait) = allowed_at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            if to.write_all(&chunk).is_err() || stop.load(Ordering::Relaxed) {
                break;
            }
            sent += chunk.len() as u64;
            if let Some(served) = &served {
                served.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl SlowLink {
    pub fn start(
        upstream_port: u16,
        latency: Duration,
        bytes_per_sec: f64,
    ) -> anyhow::Result<SlowLink> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let served2 = served.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                pipe(client, upstream, latency, None, stop2.clone(), None);
                pipe(
                    u2,
                    c2,
                    latency,
                    Some(bytes_per_sec),
                    stop2.clone(),
                    Some(served2.clone()),
                );
            }
        });
        Ok(SlowLink { port, served, stop })
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes the server sent through the link.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
