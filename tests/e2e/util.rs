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

pub use modelpack_testkit::data::pseudo_random;

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
    /// `build DIR -t REFERENCE`, then `push REFERENCE --plain-http`.
    pub fn build_and_push(&self, dir: impl AsRef<Path>, reference: &str) {
        let dir = dir.as_ref().to_str().expect("utf8");
        self.ok(&["build", dir, "-t", reference]);
        self.ok(&["push", reference, "--plain-http"]);
    }

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

pub use modelpack_testkit::link::Link as Proxy;
pub use modelpack_testkit::process::ChildGuard as Guard;
pub use modelpack_testkit::sys::{free_port, is_root};

/// A real CNCF distribution registry (Debian's `docker-registry`) on loopback; `None` when it
/// is not installed (a failure under `cargo xtask test`).
pub struct Registry(modelpack_testkit::registry::Registry);

impl std::ops::Deref for Registry {
    type Target = modelpack_testkit::registry::Registry;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Registry {
    /// Starts one; `htpasswd` is the content of an htpasswd file to require basic auth.
    pub fn start(htpasswd: Option<&str>) -> Option<Registry> {
        Registry::start_with(modelpack_testkit::registry::RegistryOptions {
            htpasswd,
            ..Default::default()
        })
    }

    /// Starts one serving HTTPS with `tls` = (certificate PEM, key PEM).
    pub fn start_tls(cert: &Path, key: &Path) -> Option<Registry> {
        Registry::start_with(modelpack_testkit::registry::RegistryOptions {
            tls: Some((cert, key)),
            ..Default::default()
        })
    }

    fn start_with(opts: modelpack_testkit::registry::RegistryOptions<'_>) -> Option<Registry> {
        if !have_tool("docker-registry") {
            return None;
        }
        Some(Registry(
            modelpack_testkit::registry::Registry::start(opts).expect("start docker-registry"),
        ))
    }
}

/// The files of `reference` as `pull -o` writes them into a fresh folder (by a fresh store).
pub fn pulled_tree(reference: &str) -> BTreeMap<String, (String, u32)> {
    let reader = Scratch::new();
    let out = reader.path("out");
    reader.ok(&[
        "pull",
        reference,
        "--plain-http",
        "-o",
        out.to_str().expect("utf8"),
    ]);
    tree(&out)
}

/// The manifest `skopeo inspect --raw IMAGE` prints, and its digest (`sha256:...`).
pub fn skopeo_manifest(image: &str) -> (Vec<u8>, String) {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", image])
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = format!("sha256:{}", sha256_hex(&out.stdout));
    (out.stdout, digest)
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
            guard: Some(Guard::new(child)),
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
        modelpack_testkit::mounts::is_mounted(&self.dir)
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
