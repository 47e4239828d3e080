//! A private containerd, 1.6 (the system's, `/usr/bin`) or 2.x (Debian sid's, unpacked under
//! `target/containerd2`), with its own root, state and socket and CRI off, wired to a
//! `modelpack-snapshotter` by the config snippet docs/containerd.md shows for that version; plus
//! a busybox image built from Debian's `busybox-static` (no internet, no Docker). Everything is
//! stopped by PID and every mount under the scratch folders is detached when dropped, also when a
//! check fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use modelpack_testkit::process::{Signal, signal_pid};
use sha2::{Digest as _, Sha256};

/// The snapshotter's name in the containerd config.
pub const SNAPSHOTTER: &str = "modelpack";
/// The containerd namespace the checks use.
pub const NAMESPACE: &str = "modelpack-e2e";

pub use modelpack_testkit::mounts::detach_all;

/// Runs `cmd` (a call of `program`, no stdin) to the end: its stdout, or an error naming
/// `program` and `what` with its output.
pub fn output_ok(mut cmd: Command, program: &str, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn stop_child(child: &mut Child, grace: Duration) {
    let _ = signal_pid(child.id(), Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until something listens on the unix socket `path` (30 s), else fails with `log`.
pub fn wait_for_socket(path: &Path, what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tail = fs::read_to_string(log).unwrap_or_default();
    bail!(
        "{what} did not listen on {} within 30 s; its log:\n{tail}",
        path.display()
    )
}

/// A running `modelpack-snapshotter`.
pub struct Snapshotter {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
    bin: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, std::ffi::OsString)>,
    child: Option<Child>,
}

impl Snapshotter {
    /// Starts one with root and socket under `dir`.
    pub fn start(bin: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Snapshotter> {
        fs::create_dir_all(dir)?;
        let mut s = Snapshotter {
            socket: dir.join("snapshotter.sock"),
            root: dir.join("root"),
            log: dir.join("snapshotter.log"),
            bin: bin.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("--address")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        wait_for_socket(&self.socket, "modelpack-snapshotter", &self.log)
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it with SIGTERM, as `systemctl stop` would, and waits for it to exit by itself
    /// (an error when it does not within 30 s, or fails).
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal_pid(child.id(), Signal::TERM)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "the snapshotter exited with {status} on SIGTERM"
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("the snapshotter did not exit within 30 s of SIGTERM")
    }

    /// Runs `bin` from its next start on (an upgrade).
    pub fn set_binary(&mut self, bin: &Path) {
        self.bin = bin.to_owned();
    }

    /// Starts it (again, after [`Snapshotter::kill9`] or [`Snapshotter::terminate`]).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Starts it again on the same root and socket.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Sets `key` in its environment from the next start on.
    pub fn set_env(&mut self, key: &str, value: &std::ffi::OsStr) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts it again with other extra flags.
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.kill9();
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn()
    }

    /// Stops it (kill -9) and runs it in the foreground with `extra` flags until it exits by
    /// itself (a start that must fail), giving up after 60 s.
    pub fn run_to_exit(&mut self, extra: &[&str]) -> anyhow::Result<std::process::Output> {
        self.kill9();
        let mut child = Command::new(&self.bin)
            .arg("--address")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root)
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(child.wait_with_output()?);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop_child(&mut child, Duration::from_secs(5));
        bail!("modelpack-snapshotter {extra:?} did not exit within 60 s")
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(10));
        }
        detach_all(&self.root);
        // The FUSE holder it started (it would exit by itself once the mounts are gone).
        if let Some(pid) = fs::read_to_string(self.root.join("fuse-holder.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            // Still the holder of this root (not a PID reused since it exited).
            && fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&*self.root.to_string_lossy())
            })
        {
            let _ = signal_pid(pid, Signal::KILL);
        }
    }
}

/// The containerd versions the checks run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Debian 12's containerd 1.6 in `/usr/bin` (config `version = 2`).
    V1_6,
    /// Debian sid's containerd 2.x, unpacked under `target/containerd2` (config `version = 3`).
    V2,
}

/// The snapshotter socket and root the doc snippets name (the packaged defaults); the checks
/// put their private ones in their place.
const DOC_SOCKET: &str = "/run/modelpack-snapshotter/modelpack-snapshotter.sock";
const DOC_ROOT: &str = "/var/lib/modelpack-snapshotter";

impl Version {
    pub const ALL: [Version; 2] = [Version::V1_6, Version::V2];

    /// The name `--containerd` takes and the reports print.
    pub fn name(self) -> &'static str {
        match self {
            Version::V1_6 => "1.6",
            Version::V2 => "2",
        }
    }

    /// `1.6`, `2` or `all`.
    pub fn parse_list(s: &str) -> Option<Vec<Version>> {
        match s {
            "1.6" => Some(vec![Version::V1_6]),
            "2" => Some(vec![Version::V2]),
            "all" => Some(Version::ALL.to_vec()),
            _ => None,
        }
    }

    /// The folder holding this version's `containerd`, `ctr` and shim (fetched when missing).
    pub fn bin_dir(self) -> anyhow::Result<PathBuf> {
        match self {
            Version::V1_6 => Ok(PathBuf::from("/usr/bin")),
            Version::V2 => crate::containerd2::ensure(),
        }
    }

    /// The marker in docs/containerd.md that precedes this version's tested config block.
    pub fn doc_marker(self) -> &'static str {
        match self {
            Version::V1_6 => "<!-- tested: cargo xtask e2e --containerd 1.6 -->",
            Version::V2 => "<!-- tested: cargo xtask e2e --containerd 2 -->",
        }
    }

    /// The config snippet docs/containerd.md shows for this version, exactly.
    pub fn doc_snippet(self) -> anyhow::Result<String> {
        doc_block(self.doc_marker())
    }

    /// The config of a private containerd: the doc's snippet with our snapshotter's socket and
    /// root in place of the defaults, then its own root, state and sockets, CRI off.
    pub fn config(
        self,
        dir: &Path,
        socket: &Path,
        snapshotter_socket: &Path,
        snapshotter_root: &Path,
    ) -> anyhow::Result<String> {
        let snippet = self.doc_snippet()?;
        if !snippet.contains(DOC_SOCKET) {
            bail!(
                "the docs/containerd.md snippet for containerd {} does not name {DOC_SOCKET}",
                self.name()
            );
        }
        let snippet = snippet
            .replace(DOC_SOCKET, &snapshotter_socket.display().to_string())
            .replace(DOC_ROOT, &snapshotter_root.display().to_string());
        // Top-level keys first (TOML puts keys after a table header into that table).
        Ok(format!(
            "root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             {snippet}\n\
             [grpc]\n  address = \"{socket}\"\n\
             [ttrpc]\n  address = \"{socket}.ttrpc\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
        ))
    }
}

/// The ```toml block docs/containerd.md shows after `marker`, exactly.
pub fn doc_block(marker: &str) -> anyhow::Result<String> {
    let path = crate::root().join("docs/containerd.md");
    let doc = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    fenced_block_after(&doc, marker)
        .with_context(|| format!("docs/containerd.md has no ```toml block after {marker}"))
}

/// The body of the first ```toml block after the line holding `marker`.
pub fn fenced_block_after(doc: &str, marker: &str) -> Option<String> {
    let mut lines = doc.lines().skip_while(|l| !l.contains(marker)).skip(1);
    lines
        .find(|l| !l.trim().is_empty())
        .filter(|l| l.trim() == "```toml")?;
    let mut body = String::new();
    for line in lines {
        if line.trim() == "```" {
            return Some(body);
        }
        body.push_str(line);
        body.push('\n');
    }
    None
}

/// Starts `bin_dir`'s containerd with `config`, its output to `log`. It finds
/// `containerd-shim-runc-v2` on PATH: its own version's first (runc stays the system's, in
/// /usr/sbin).
pub fn spawn_containerd(bin_dir: &Path, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = fs::File::create(log)?;
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut dirs = vec![bin_dir.to_owned()];
    dirs.extend(std::env::split_paths(&path));
    Command::new(bin_dir.join("containerd"))
        .arg("--config")
        .arg(config)
        .env("PATH", std::env::join_paths(dirs)?)
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (cargo xtask setup installs it)",
                bin_dir.join("containerd").display()
            )
        })
}

/// A private containerd.
pub struct Containerd {
    pub version: Version,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// This version's `ctr`.
    ctr: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd `version` with everything under `dir`, wired to `snapshotter`.
    pub fn start(
        version: Version,
        dir: &Path,
        snapshotter: &Snapshotter,
    ) -> anyhow::Result<Containerd> {
        let bin_dir = version.bin_dir()?;
        fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config_path = dir.join("config.toml");
        fs::write(
            &config_path,
            version.config(dir, &socket, &snapshotter.socket, &snapshotter.root)?,
        )?;
        let log = dir.join("containerd.log");
        let child = spawn_containerd(&bin_dir, &config_path, &log)?;
        let c = Containerd {
            version,
            socket,
            dir: dir.to_owned(),
            log,
            ctr: bin_dir.join("ctr"),
            child,
        };
        wait_for_socket(&c.socket, "containerd", &c.log)?;
        Ok(c)
    }

    /// `containerd --version` of this instance's binary, e.g. `v1.6.20~ds1` or `2.1.9+unknown`.
    pub fn version_text(&self) -> String {
        let bin = self.ctr.with_file_name("containerd");
        Command::new(bin)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .nth(2)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| self.version.name().to_owned())
    }

    /// `ctr` against this containerd, in [`NAMESPACE`].
    pub fn ctr(&self) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("-a").arg(&self.socket).arg("-n").arg(NAMESPACE);
        c
    }

    /// Runs `ctr ARGS`, returning stdout; fails with stderr.
    pub fn ctr_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.ctr();
        cmd.args(args);
        output_ok(cmd, "ctr", &args.join(" "))
    }

    /// `ctr run --rm IMAGE ID COMMAND...` on the modelpack snapshotter, with `models` bind-mounted
    /// read-only at /models (how a container gets a model volume).
    pub fn run_with_models(
        &self,
        image: &str,
        id: &str,
        models: &Path,
        command: &[&str],
    ) -> Command {
        let mount = format!(
            "type=bind,src={},dst=/models,options=rbind:ro",
            models.display()
        );
        let mut cmd = self.ctr();
        cmd.args(["run", "--rm", "--snapshotter", SNAPSHOTTER, "--mount"])
            .arg(mount)
            .args([image, id])
            .args(command)
            .stdin(Stdio::null());
        cmd
    }

    /// [`Containerd::run_with_models`] to the end: its stdout, or an error with its output.
    pub fn run_with_models_ok(
        &self,
        image: &str,
        id: &str,
        models: &Path,
        command: &[&str],
    ) -> anyhow::Result<String> {
        let cmd = self.run_with_models(image, id, models, command);
        output_ok(
            cmd,
            "ctr",
            &format!("run {image} {id} {}", command.join(" ")),
        )
    }

    /// Waits until containerd reaches the snapshotter (its dialer backs off after a restart):
    /// a Prepare and Remove of a probe snapshot, which containerd must pass to the backend.
    pub fn wait_for_snapshotter(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe_key = format!("modelpack-probe-{}", std::process::id());
        loop {
            let probe = self
                .ctr_ok(&[
                    "snapshots",
                    "--snapshotter",
                    SNAPSHOTTER,
                    "prepare",
                    &probe_key,
                    "",
                ])
                .and_then(|_| {
                    self.ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "rm", &probe_key])
                });
            match probe {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers first: their shims outlive containerd otherwise.
        if let Ok(out) = self.ctr().args(["tasks", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self
                    .ctr()
                    .args(["tasks", "kill", "-s", "SIGKILL", id])
                    .output();
                let _ = self.ctr().args(["tasks", "delete", "-f", id]).output();
            }
        }
        if let Ok(out) = self.ctr().args(["containers", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr().args(["containers", "delete", id]).output();
            }
        }
        stop_child(&mut self.child, Duration::from_secs(10));
        detach_all(&self.dir);
    }
}

/// Writes an OCI image layout at `dir` holding a busybox image tagged `1`: one uncompressed
/// layer with `/bin/busybox` from `busybox-static` and a symlink per applet the checks use.
pub fn busybox_layout(dir: &Path) -> anyhow::Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing (cargo xtask setup installs busybox-static)");
    }
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let layer_path = dir.join("layer.tar");
    {
        let mut builder = tar::Builder::new(fs::File::create(&layer_path)?);
        builder.mode(tar::HeaderMode::Deterministic);
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "models"] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            builder.append_data(&mut h, d, std::io::empty())?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(fs::metadata(busybox)?.len());
        builder.append_data(&mut h, "bin/busybox", fs::File::open(busybox)?)?;
        for applet in [
            "sh",
            "echo",
            "cat",
            "ls",
            "find",
            "xargs",
            "sha256sum",
            "head",
            "wc",
            "sleep",
            "test",
            "true",
            "stat",
            "sort",
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            builder.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
        }
        builder.finish()?;
    }
    let layer = fs::read(&layer_path)?;
    fs::remove_file(&layer_path)?;
    let layer_digest = hex::encode(Sha256::digest(&layer));
    fs::write(blobs.join(&layer_digest), &layer)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = hex::encode(Sha256::digest(&config));
    fs::write(blobs.join(&config_digest), &config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = hex::encode(Sha256::digest(&manifest));
    fs::write(blobs.join(&manifest_digest), &manifest)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "1"},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// Pushes the busybox layout to `registry` (plain HTTP) as `NAME:1` with skopeo.
pub fn push_busybox(layout: &Path, registry: &str, name: &str) -> anyhow::Result<String> {
    let target = format!("{registry}/{name}:1");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{target}"))
        .output()
        .context("cannot run skopeo (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The doc's snippets are what the checks run: each is there, and the config built from it
    /// is TOML naming our snapshotter (and, for 2.x, the transfer service's unpack entry).
    #[test]
    fn doc_snippets_make_the_configs() {
        for version in Version::ALL {
            let text = version
                .config(
                    Path::new("/x/ctd"),
                    Path::new("/x/ctd.sock"),
                    Path::new("/x/snap.sock"),
                    Path::new("/x/snap"),
                )
                .expect("the doc has the snippet");
            let config: toml::Table = toml::from_str(&text).expect("the config is TOML");
            let plugin = &config["proxy_plugins"][SNAPSHOTTER];
            assert_eq!(plugin["type"].as_str(), Some("snapshot"), "{text}");
            assert_eq!(plugin["address"].as_str(), Some("/x/snap.sock"), "{text}");
            assert_eq!(config["grpc"]["address"].as_str(), Some("/x/ctd.sock"));
            assert_eq!(config["root"].as_str(), Some("/x/ctd/root"));
            match version {
                Version::V1_6 => assert_eq!(config["version"].as_integer(), Some(2)),
                Version::V2 => {
                    assert_eq!(config["version"].as_integer(), Some(3));
                    assert_eq!(plugin["exports"]["root"].as_str(), Some("/x/snap"));
                    let unpack =
                        config["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
                            .as_array()
                            .expect("unpack_config is an array");
                    assert!(
                        unpack
                            .iter()
                            .any(|u| u["snapshotter"].as_str() == Some(SNAPSHOTTER)),
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn finds_the_block_after_its_marker() {
        let doc = "a\n<!-- m -->\n\n```toml\nx = 1\n```\n```toml\ny = 2\n```\n";
        assert_eq!(
            fenced_block_after(doc, "<!-- m -->").as_deref(),
            Some("x = 1\n")
        );
        assert_eq!(
            fenced_block_after("<!-- m -->\ntext\n```toml\n```\n", "<!-- m -->"),
            None
        );
    }
}
