//! Helpers for the end-to-end tests: find and run the built binary, hash trees, craft stores.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

    /// `build DIR -t REFERENCE`, then `push REFERENCE --plain-http`.
    pub fn build_and_push(&self, dir: impl AsRef<Path>, reference: &str) {
        self.build_and_push_with(dir, reference, &[]);
    }

    /// `build DIR -t REFERENCE EXTRA...`, then `push REFERENCE --plain-http`.
    pub fn build_and_push_with(&self, dir: impl AsRef<Path>, reference: &str, extra: &[&str]) {
        let dir = dir.as_ref().to_str().expect("utf8");
        let mut args = vec!["build", dir, "-t", reference];
        args.extend(extra);
        self.ok(&args);
        self.ok(&["push", reference, "--plain-http"]);
    }

    /// `build DIR -t REFERENCE`, then `-q push REFERENCE --plain-http`; returns the pushed
    /// manifest digest.
    pub fn build_and_push_digest(&self, dir: impl AsRef<Path>, reference: &str) -> String {
        let dir = dir.as_ref().to_str().expect("utf8");
        self.ok(&["build", dir, "-t", reference]);
        self.ok(&["-q", "push", reference, "--plain-http"])
            .trim()
            .to_owned()
    }

    /// `manifest fetch REFERENCE --plain-http -o FILE`.
    pub fn fetch_manifest_to(&self, reference: &str, file: &Path) {
        self.ok(&[
            "manifest",
            "fetch",
            reference,
            "--plain-http",
            "-o",
            file.to_str().expect("utf8"),
        ]);
    }

    /// `manifest push REFERENCE FILE --plain-http`.
    pub fn push_manifest_from(&self, reference: &str, file: &Path) {
        self.ok(&[
            "manifest",
            "push",
            reference,
            file.to_str().expect("utf8"),
            "--plain-http",
        ]);
    }

    /// `modelpack --store STORE args...`, not started yet.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("--store").arg(self.store()).args(args);
        cmd
    }

    /// Starts `modelpack --store STORE args...` in the background with its output discarded.
    pub fn spawn_silenced(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    }

    /// Runs `modelpack --store STORE args...` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    /// Runs `modelpack --store STORE args...` to completion with `env` set (and
    /// `SOURCE_DATE_EPOCH` unset unless `env` sets it).
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
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

/// Asserts `out` (of `modelpack args...`) succeeded, showing its output otherwise.
pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "modelpack {args:?} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `["pull", REFERENCE, "--plain-http", "-o", OUT]`: the arguments that pull straight into a
/// folder, for `Scratch::ok` or `Scratch::fails`.
pub fn pull_to_args<'a>(reference: &'a str, out: &'a Path) -> [&'a str; 5] {
    [
        "pull",
        reference,
        "--plain-http",
        "-o",
        out.to_str().expect("utf8"),
    ]
}

/// A finished command's stdout followed by its stderr, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a (non-modelpack) tool to completion and asserts it succeeded, naming it as `what` and
/// showing its output otherwise.
pub fn checked_output(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", output_text(&out));
    out
}

/// Writes `files` (path under `dir`, contents) into `dir`, creating `dir` and parent folders.
pub fn write_files(dir: &Path, files: &[(&str, &[u8])]) {
    fs::create_dir_all(dir).expect("mkdir");
    for (rel, bytes) in files {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, bytes).expect("write");
    }
}

/// Writes `files` into the scratch folder `name` (see [`write_files`]) and returns the folder.
pub fn write_model_dir(s: &Scratch, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = s.path(name);
    write_files(&dir, files);
    dir
}

/// Writes a model into the scratch folder `model`: `model.safetensors` of `weight_size`
/// pseudo-random bytes from `seed`, and `files`. Returns the folder.
pub fn model_with_weight(
    s: &Scratch,
    weight_size: usize,
    seed: u64,
    files: &[(&str, &[u8])],
) -> PathBuf {
    let dir = write_model_dir(s, "model", files);
    fs::write(
        dir.join("model.safetensors"),
        pseudo_random(weight_size, seed),
    )
    .expect("write");
    dir
}

/// True when running as root; a test that needs root for `what` calls this and returns on
/// false. Under `cargo xtask test` (CI runs as root) not being root fails the test.
pub fn root_or_skip(what: &str) -> bool {
    let root = is_root();
    assert!(
        root || !strict(),
        "{what} needs root under cargo xtask test"
    );
    root
}

/// Calls `attempt` every `every` until it returns `Ok`, and returns that value; once `timeout`
/// has passed, a failed attempt panics with its `Err` text.
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        std::thread::sleep(every);
    }
}

/// Waits (polling every `every`) until `ready` is true; panics with `why()` after `timeout`.
pub fn wait_until(
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> bool,
    why: impl Fn() -> String,
) {
    poll_until(timeout, every, || if ready() { Ok(()) } else { Err(why()) });
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

/// The bytes of every layer a manifest (or `inspect --format json`) lists, summed.
pub fn layer_bytes(manifest: &serde_json::Value) -> u64 {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum()
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

/// The `org.cncf.model.file.metadata+json` value of a regular file `name` of `size` bytes (mode
/// 0644, root-owned, a fixed mtime).
pub fn file_metadata(name: &str, size: u64) -> serde_json::Value {
    serde_json::json!({"name": name, "mode": 420, "uid": 0, "gid": 0, "size": size,
        "mtime": "2025-01-02T03:04:05Z", "typeflag": 0})
}

/// Writes `bytes` as a blob into the store and returns its layer descriptor (of `media_type`,
/// naming `filepath`, with `meta` as file metadata when given) and digest.
pub fn annotated_layer(
    store: &Path,
    media_type: &str,
    bytes: &[u8],
    filepath: &str,
    meta: Option<serde_json::Value>,
) -> (serde_json::Value, String) {
    let digest = put_blob(store, bytes);
    let mut annotations = serde_json::json!({"org.cncf.model.filepath": filepath});
    if let Some(meta) = meta {
        annotations["org.cncf.model.file.metadata+json"] =
            serde_json::Value::String(meta.to_string());
    }
    (
        serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": bytes.len(),
            "annotations": annotations,
        }),
        digest,
    )
}

/// Names `name` in the scratch store a model manifest over crafted `layers` (descriptor, diff
/// ID), creating the store's layout first.
pub fn tag_crafted_model(s: &Scratch, name: &str, layers: &[(serde_json::Value, String)]) {
    s.ok(&["ls"]); // creates the layout
    let descs: Vec<serde_json::Value> = layers.iter().map(|l| l.0.clone()).collect();
    let diff_ids: Vec<String> = layers.iter().map(|l| l.1.clone()).collect();
    let manifest = model_manifest(&s.store(), &descs, &diff_ids);
    tag_manifest(&s.store(), name, &manifest);
}

/// Appends a regular file `name` (mode `mode`, `size` bytes read from `data`) to a tar.
pub fn append_tar_file<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    name: &str,
    mode: u32,
    size: u64,
    data: impl std::io::Read,
) {
    let mut header = tar::Header::new_ustar();
    header.set_path(name).expect("path");
    header.set_size(size);
    header.set_mode(mode);
    header.set_cksum();
    builder.append(&header, data).expect("append");
}

/// A tar holding one regular file `name` with `mode` and contents `data`.
pub fn tar_of_one_file(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    append_tar_file(&mut builder, name, mode, data.len() as u64, data);
    builder.into_inner().expect("tar")
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

    /// Starts one requiring basic auth for `user` with `password`; `None` when `htpasswd` is
    /// not installed either.
    pub fn start_with_login(user: &str, password: &str) -> Option<Registry> {
        if !have_tool("htpasswd") {
            return None;
        }
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("htpasswd");
        let htpasswd = String::from_utf8_lossy(&out.stdout).trim().to_owned() + "\n";
        Registry::start(Some(&htpasswd))
    }

    /// Starts one serving HTTPS with `tls` = (certificate PEM, key PEM).
    pub fn start_tls(cert: &Path, key: &Path) -> Option<Registry> {
        Registry::start_with(modelpack_testkit::registry::RegistryOptions {
            tls: Some((cert, key)),
            ..Default::default()
        })
    }

    /// Runs the registry's garbage collector (offline, as its documentation says) and starts
    /// it again on the same port.
    pub fn garbage_collect(&mut self) -> std::io::Result<()> {
        self.0.garbage_collect()
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
    reader.ok(&pull_to_args(reference, &out));
    tree(&out)
}

/// A running registry, and a scratch store with a model written into it (`dir`) that is to be
/// (or was) pushed as `reference`, `HOST/REPO:TAG` on that registry.
pub struct ModelOnRegistry<D> {
    pub registry: Registry,
    pub s: Scratch,
    pub dir: D,
    pub reference: String,
}

/// Starts a registry and writes a model with `write_model` into a fresh scratch; nothing is
/// built yet. `None` when `docker-registry` is not installed.
pub fn registry_and_model<D>(
    repo_and_tag: &str,
    write_model: impl FnOnce(&Scratch) -> D,
) -> Option<ModelOnRegistry<D>> {
    let registry = Registry::start(None)?;
    let s = Scratch::new();
    let dir = write_model(&s);
    let reference = format!("{}/{repo_and_tag}", registry.host());
    Some(ModelOnRegistry {
        registry,
        s,
        dir,
        reference,
    })
}

impl<D> ModelOnRegistry<D> {
    /// Borrows the parts: (registry, scratch, model folder, reference).
    pub fn parts(&self) -> (&Registry, &Scratch, &D, &str) {
        (&self.registry, &self.s, &self.dir, &self.reference)
    }

    /// A [`Proxy`] in front of the registry (throttled to `bytes_per_sec` per connection when
    /// given; it counts what it serves), and `reference` as named through it.
    pub fn through_proxy(&self, bytes_per_sec: Option<u64>) -> (Proxy, String) {
        let proxy = Proxy::start(self.registry.port, bytes_per_sec);
        let (_, repo_and_tag) = self.reference.split_once('/').expect("HOST/REPO:TAG");
        let via = format!("{}/{repo_and_tag}", proxy.host());
        (proxy, via)
    }
}

/// [`registry_and_model`], then the model built and pushed as `HOST/REPO:TAG`.
pub fn registry_with_pushed_model<D: AsRef<Path>>(
    repo_and_tag: &str,
    write_model: impl FnOnce(&Scratch) -> D,
) -> Option<ModelOnRegistry<D>> {
    let m = registry_and_model(repo_and_tag, write_model)?;
    m.s.build_and_push(&m.dir, &m.reference);
    Some(m)
}

/// When this machine can mount FUSE and a registry runs: [`registry_with_pushed_model`].
pub fn pushed_model_to_mount<D: AsRef<Path>>(
    repo_and_tag: &str,
    write_model: impl FnOnce(&Scratch) -> D,
) -> Option<ModelOnRegistry<D>> {
    if !can_fuse() {
        return None;
    }
    registry_with_pushed_model(repo_and_tag, write_model)
}

/// [`pushed_model_to_mount`], a counting [`Proxy`] in front of the registry, and the model
/// mounted through that proxy from a fresh store (`extra`: more `mount` flags).
pub fn mounted_through_proxy<D: AsRef<Path>>(
    repo_and_tag: &str,
    write_model: impl FnOnce(&Scratch) -> D,
    extra: &[&str],
) -> Option<(ModelOnRegistry<D>, Proxy, Mount)> {
    let m = pushed_model_to_mount(repo_and_tag, write_model)?;
    let (proxy, via) = m.through_proxy(None);
    let mount = Mount::in_fresh_store(&via, extra);
    Some((m, proxy, mount))
}

/// The manifest `skopeo inspect --raw IMAGE` prints, and its digest (`sha256:...`).
pub fn skopeo_manifest(image: &str) -> (Vec<u8>, String) {
    let out = checked_output(
        Command::new("skopeo").args(["inspect", "--raw", image]),
        "skopeo",
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
    /// The fresh store of [`Mount::in_fresh_store`], removed after the unmount.
    own_store: Option<Scratch>,
}

impl Mount {
    /// Starts `modelpack mount REF DIR --plain-http` with the scratch store, and waits until it
    /// serves.
    pub fn start(s: &Scratch, reference: &str, dir: &Path, extra: &[&str]) -> Mount {
        fs::create_dir_all(dir).expect("mkdir");
        let child = s
            .command(&["mount", reference])
            .arg(dir)
            .args(["--plain-http"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mount");
        let mount = Mount {
            dir: dir.to_owned(),
            guard: Some(Guard::new(child)),
            own_store: None,
        };
        for _ in 0..400 {
            if mount.is_mounted() {
                return mount;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("{} did not mount", dir.display());
    }

    /// [`Mount::start`] at `mnt` in a fresh scratch store that the mount owns.
    pub fn in_fresh_store(reference: &str, extra: &[&str]) -> Mount {
        let s = Scratch::new();
        let mut mount = Mount::start(&s, reference, &s.path("mnt"), extra);
        mount.own_store = Some(s);
        mount
    }

    /// The store of an [`Mount::in_fresh_store`] mount.
    pub fn store(&self) -> PathBuf {
        self.own_store
            .as_ref()
            .expect("a mount in a fresh store")
            .store()
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
