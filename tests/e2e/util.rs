//! Helpers for the end-to-end tests: find and run the built binary, hash trees, craft stores.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

/// The `modelpack` binary under test: `$MODELPACK_BIN`, else the workspace's debug build.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MODELPACK_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let path = target.join("debug/modelpack");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p modelpack-cli` or `cargo xtask test`",
        path.display()
    );
    path
}

/// True when `cargo xtask test` runs us, so tools it installs must be present.
pub fn strict() -> bool {
    std::env::var_os("MODELPACK_E2E").is_some()
}

/// True when `tool` is on PATH. Under `cargo xtask test` a missing tool fails the test.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || !strict(),
        "{tool} is required under cargo xtask test (xtask setup installs it)"
    );
    if !found {
        eprintln!("note: {tool} not installed; this check is skipped outside cargo xtask test");
    }
    found
}

/// `size` pseudo-random bytes (xorshift64 from `seed`): test weights that do not compress and
/// differ per seed.
pub fn pseudo_random(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(size);
    data
}

/// A scratch folder with a store in it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// Runs `modelpack --store STORE args...`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.arg("--store").arg(self.store()).args(args);
        cmd.env_remove("SOURCE_DATE_EPOCH");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run modelpack")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_success(&out, args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and asserts failure with exit code 1 and one `error:` line; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} should exit 1; stderr: {stderr}"
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: expected one error line, got: {stderr}"
        );
        errors[0].to_owned()
    }
}

pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "modelpack {args:?} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> String {
    let mut file = fs::File::open(path).expect("open");
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).expect("hash");
    hex::encode(hasher.finalize())
}

/// What a tree holds: for each path, its content hash (or link target) and permission bits.
pub fn tree(dir: &Path) -> BTreeMap<String, (String, u32)> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let entry = entry.expect("walk");
        let rel = entry
            .path()
            .strip_prefix(dir)
            .expect("prefix")
            .to_string_lossy()
            .into_owned();
        let meta = entry.path().symlink_metadata().expect("lstat");
        let content = if meta.file_type().is_symlink() {
            format!(
                "-> {}",
                fs::read_link(entry.path()).expect("readlink").display()
            )
        } else if meta.is_dir() {
            continue;
        } else {
            sha256_file(entry.path())
        };
        out.insert(rel, (content, meta.permissions().mode() & 0o777));
    }
    out
}

/// Modification times (seconds) of the regular files in a tree.
pub fn mtimes(dir: &Path) -> BTreeMap<String, i64> {
    walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| e.expect("walk"))
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e
                .path()
                .strip_prefix(dir)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            (rel, e.metadata().expect("stat").mtime())
        })
        .collect()
}

/// Everything in a folder, names only (to show nothing was written).
pub fn listing(dir: &Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    walkdir::WalkDir::new(dir)
        .min_depth(1)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.expect("walk").path().display().to_string())
        .collect()
}

/// Writes a blob straight into an OCI layout store and returns its digest.
pub fn put_blob(store: &Path, bytes: &[u8]) -> String {
    let hex = sha256_hex(bytes);
    let dir = store.join("blobs/sha256");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(&hex), bytes).expect("write blob");
    format!("sha256:{hex}")
}

/// Names a manifest in an OCI layout store by editing index.json as any OCI tool would.
pub fn tag_manifest(store: &Path, name: &str, manifest: &[u8]) {
    let digest = put_blob(store, manifest);
    let index_path = store.join("index.json");
    let mut index: serde_json::Value = fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"]
        .as_array_mut()
        .expect("manifests")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
    if !store.join("oci-layout").exists() {
        fs::write(
            store.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("layout");
    }
    fs::write(index_path, serde_json::to_vec(&index).expect("json")).expect("write index");
}

/// A model manifest over the given layers (descriptor JSON values) with a matching config.
pub fn model_manifest(store: &Path, layers: &[serde_json::Value], diff_ids: &[String]) -> Vec<u8> {
    let config = serde_json::json!({
        "descriptor": {"name": "crafted"},
        "config": {},
        "modelfs": {"type": "layers", "diffIds": diff_ids},
    });
    let config_bytes = serde_json::to_vec(&config).expect("json");
    let config_digest = put_blob(store, &config_bytes);
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.cncf.model.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layers,
    }))
    .expect("json")
}

/// Peak resident memory (KiB) of a command run to completion, and whether it succeeded.
///
/// Sampled from `/proc/PID/status` (`VmHWM`, monotonic) every 5 ms: `wait4`'s `ru_maxrss` would
/// include this test process's memory, which a vforked child inherits at exec.
pub fn peak_rss_kib(cmd: &mut Command) -> (bool, u64) {
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            return (status.success(), peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("nothing listens on port {port}");
}

/// A child process stopped (by PID) when dropped, also when a test fails.
pub struct Guard {
    pub child: std::process::Child,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: signalling our own child by its PID.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real CNCF distribution registry (Debian's `docker-registry`) on loopback.
pub struct Registry {
    pub port: u16,
    _dir: tempfile::TempDir,
    _guard: Guard,
}

impl Registry {
    /// Starts one; `htpasswd` is the content of an htpasswd file to require basic auth.
    pub fn start(htpasswd: Option<&str>) -> Option<Registry> {
        Registry::start_with(htpasswd, None)
    }

    /// Starts one serving HTTPS with `tls` = (certificate PEM, key PEM).
    pub fn start_tls(cert: &Path, key: &Path) -> Option<Registry> {
        Registry::start_with(None, Some((cert, key)))
    }

    fn start_with(htpasswd: Option<&str>, tls: Option<(&Path, &Path)>) -> Option<Registry> {
        if !have_tool("docker-registry") {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let auth = match htpasswd {
            Some(content) => {
                let path = dir.path().join("htpasswd");
                fs::write(&path, content).expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: modelpack-test\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
            dir.path().join("data").display(),
            tls = tls.map_or_else(String::new, |(cert, key)| format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ))
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let guard = Guard { child };
        wait_for_port(port);
        Some(Registry {
            port,
            _dir: dir,
            _guard: guard,
        })
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A TCP proxy in front of a server on loopback that counts the bytes the server sends and can
/// slow every connection down (to make a transfer last long enough to kill).
pub struct Proxy {
    pub port: u16,
    pub served: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// When set, one byte in the middle of every large server-to-client read is flipped (past any
    /// response header, inside blob bodies).
    pub corrupt: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When set, new connections are dropped at once and open ones are cut (the registry looks
    /// down).
    pub down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Starts a proxy to `upstream_port`; `bytes_per_sec` caps each connection when given.
    pub fn start(upstream_port: u16, bytes_per_sec: Option<u64>) -> Proxy {
        use std::io::{Read as _, Write as _};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let (served2, stop2, corrupt2, down2) =
            (served.clone(), stop.clone(), corrupt.clone(), down.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                if down2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", upstream_port))
                else {
                    continue;
                };
                let (mut c_read, mut u_write) = (
                    client.try_clone().expect("clone"),
                    upstream.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut u_write);
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut u_read, mut c_write) = (upstream, client);
                let served = served2.clone();
                let stop = stop2.clone();
                let corrupt = corrupt2.clone();
                let down = down2.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let started = std::time::Instant::now();
                    let mut sent = 0u64;
                    loop {
                        if stop.load(Ordering::SeqCst) || down.load(Ordering::SeqCst) {
                            break;
                        }
                        let n = match u_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if down.load(Ordering::SeqCst) {
                            break;
                        }
                        if corrupt.load(Ordering::SeqCst) && n >= 32 * 1024 {
                            buf[n / 2] ^= 0xff;
                        }
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        served.fetch_add(n as u64, Ordering::SeqCst);
                        sent += n as u64;
                        if let Some(rate) = bytes_per_sec {
                            let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
                            if let Some(wait) = due.checked_sub(started.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy {
            port,
            served,
            corrupt,
            down,
            stop,
        }
    }

    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The Python with oras-py installed (`cargo xtask setup` makes `target/oras-venv`).
pub fn oras_python() -> Option<PathBuf> {
    let path = std::env::var_os("MODELPACK_ORAS_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/oras-venv/bin/python"),
        PathBuf::from,
    );
    let ok = Command::new(&path)
        .args(["-c", "import oras.client"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || !strict(),
        "oras-py is required under cargo xtask test ({})",
        path.display()
    );
    ok.then_some(path)
}

/// A `modelpack mount` running in the background, unmounted and stopped (by PID) on drop.
pub struct Mount {
    pub dir: PathBuf,
    guard: Option<Guard>,
}

impl Mount {
    /// Starts `modelpack mount REF DIR --plain-http` with the scratch store, and waits until it
    /// serves.
    pub fn start(s: &Scratch, reference: &str, dir: &Path, extra: &[&str]) -> Mount {
        fs::create_dir_all(dir).expect("mkdir");
        let child = Command::new(bin())
            .arg("--store")
            .arg(s.store())
            .args(["mount", reference])
            .arg(dir)
            .args(["--plain-http"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start mount");
        let mount = Mount {
            dir: dir.to_owned(),
            guard: Some(Guard { child }),
        };
        for _ in 0..400 {
            if mount.is_mounted() {
                return mount;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("{} did not mount", dir.display());
    }

    pub fn is_mounted(&self) -> bool {
        let target = self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone());
        fs::read_to_string("/proc/mounts").is_ok_and(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(target.to_str().unwrap_or_default()))
        })
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.dir.join(".modelpack-status")).expect("status"))
            .expect("status JSON")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // SIGTERM: the mount unmounts itself; then make sure nothing is left mounted.
        drop(self.guard.take());
        if self.is_mounted() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .status();
        }
        if self.is_mounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// True when this machine can mount FUSE file systems (root and /dev/fuse). Under
/// `cargo xtask test` (CI runs as root) it must.
pub fn can_fuse() -> bool {
    let ok = is_root() && Path::new("/dev/fuse").exists() && have_tool("fusermount3");
    assert!(
        ok || !strict(),
        "FUSE tests need root and /dev/fuse under cargo xtask test"
    );
    if !ok {
        eprintln!("note: no FUSE here; mount tests are skipped outside cargo xtask test");
    }
    ok
}

/// True when the tests run as root.
pub fn is_root() -> bool {
    #[allow(unsafe_code)]
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    uid == 0
}

/// A small tmpfs a test mounted, unmounted (lazily) when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a 4 MiB tmpfs at `dir` (created); needs root.
    pub fn mount_small(dir: &Path) -> Tmpfs {
        fs::create_dir_all(dir).expect("mkdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "modelpack-e2e-tiny"])
            .arg(dir)
            .status()
            .expect("mount tmpfs");
        assert!(status.success(), "cannot mount a tmpfs");
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
