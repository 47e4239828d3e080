//! `cargo xtask e2e [--containerd 1.6|2|all]`: the containerd checks, as root, against real
//! parts only: our own containerd (1.6 from Debian 12, 2.x from Debian sid, or both in turn,
//! each configured with the snippet docs/containerd.md shows for it), `docker-registry` on
//! loopback, `modelpack-snapshotter` and runc. Every step runs on every version.
//!
//! 1. an ordinary image (busybox, built here from `busybox-static`) pulled and run through the
//!    modelpack snapshotter (and, with the same config, into the default overlayfs);
//! 2. a model (256 MiB weight, configs, docs) built, pushed and pulled into containerd lazily:
//!    the registry serves a few KiB before any read; the committed chain is listed and
//!    survives a garbage collection;
//! 3. a container with the model at /models hashes every file and gets the source digests;
//! 4. after `kill -9` of the snapshotter and a restart, a new container still reads it right;
//! 5. the snapshotter behind the fault-injecting proxy of `tests/e2e/fault.rs`: under 503, 429,
//!    resets and stalls a container still reads the right bytes; when the registry corrupts a
//!    blob the container's read fails (never the wrong bytes) and succeeds once the fault clears;
//! 6. a registry the snapshotter cannot use: a restart that cannot remount refuses to start
//!    (and starts, reporting the failures, when allowed); a pull it cannot serve lazily fails
//!    in one line, logs `remote-snapshot-prepared=false` and leaves no snapshot or image;
//! 7. a capped cache: the snapshotter restarted with `--cache-max-bytes` (256 MiB) serves a
//!    1 GiB model to two containers in turn; its cache folder never holds more than the cap plus
//!    one readahead window, every digest is right, evictions and refetches are counted; once
//!    containerd no longer has the model, `modelpack snapshotter gc` removes its cache;
//! 8. everything started is stopped by PID and unmounted, also on failure (the guards' Drop).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sha2::{Digest as _, Sha256};

use crate::containerd::{self, Containerd, NAMESPACE, SNAPSHOTTER, Snapshotter, Version};
use modelpack_testkit::fault::{Fault, FaultProxy, Rule};
use modelpack_testkit::link::Link;
use modelpack_testkit::registry::Registry;

/// Bytes the registry may serve for a lazy pull before anything reads the model.
const LAZY_PULL_BUDGET: u64 = 128 << 10;

/// Built binaries to test: `modelpack` and `modelpack-snapshotter`.
#[derive(Debug, Clone)]
pub struct Bins {
    pub modelpack: PathBuf,
    pub snapshotter: PathBuf,
}

impl Bins {
    /// The binaries of `profile` (`debug` or `release`).
    pub fn of(profile: &str) -> Bins {
        let dir = crate::target_dir().join(profile);
        Bins {
            modelpack: dir.join("modelpack"),
            snapshotter: dir.join("modelpack-snapshotter"),
        }
    }
}

/// The versions `--containerd 1.6|2|all` names (default `all`).
pub fn versions(args: &[String]) -> anyhow::Result<Vec<Version>> {
    let which: String = crate::flag_value(args, "--containerd")?.unwrap_or_else(|| "all".into());
    Version::parse_list(&which)
        .with_context(|| format!("--containerd takes 1.6, 2 or all, not {which:?}"))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let versions = versions(args)?;
    crate::setup::run()?;
    let sh = xshell::Shell::new()?;
    sh.change_dir(crate::root());
    // The two binaries the checks drive (`--no-build`: the debug ones already built).
    if !args.iter().any(|a| a == "--no-build") {
        xshell::cmd!(
            sh,
            "cargo build --locked -p modelpack-cli -p modelpack-snapshotter -p modelpack-csi"
        )
        .run()?;
    }
    check(&Bins::of("debug"), &versions)?;
    let names: Vec<&str> = versions.iter().map(|v| v.name()).collect();
    println!(
        "xtask e2e: all containerd checks passed on containerd {}",
        names.join(" and ")
    );
    Ok(())
}

/// sha256 of every regular file under `dir`, by relative path.
pub fn tree_digests(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if entry.file_type()?.is_file() {
                let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                let mut hasher = Sha256::new();
                std::io::copy(&mut fs::File::open(&path)?, &mut hasher)?;
                out.insert(rel, hex::encode(hasher.finalize()));
            }
        }
    }
    Ok(out)
}

/// Runs `modelpack ARGS` with the store at `store`; returns stdout, fails with stderr.
pub fn modelpack(bin: &Path, store: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("MODELPACK_STORE", store)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "modelpack {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A model tree for the checks: one big weight and small files.
pub fn make_model(dir: &Path, weight_mib: u64) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("docs"))?;
    crate::measure::write_random(&dir.join("model.safetensors"), weight_mib << 20, 11)?;
    fs::write(
        dir.join("config.json"),
        br#"{"model_type":"e2e","hidden_size":4096,"num_hidden_layers":32}"#,
    )?;
    fs::write(
        dir.join("tokenizer.json"),
        br#"{"version":"1.0","model":{"type":"BPE","vocab":{"a":0,"b":1}}}"#,
    )?;
    fs::write(
        dir.join("docs/README.md"),
        b"# e2e model\n\nServed lazily.\n",
    )?;
    Ok(())
}

/// Writes a model of one random weight, `weight` of `size` bytes from `seed`, and a
/// `config.json` of `model_type` into `dir`: the weight's digest.
pub fn one_weight_model(
    dir: &Path,
    (weight, size, seed): (&str, u64, u64),
    model_type: &str,
) -> anyhow::Result<String> {
    fs::create_dir_all(dir)?;
    crate::measure::write_random(&dir.join(weight), size, seed)?;
    fs::write(
        dir.join("config.json"),
        format!(r#"{{"model_type":"{model_type}"}}"#),
    )?;
    tree_digests(dir)?
        .remove(weight)
        .context("the weight's digest")
}

/// Digests a container computes over /models, by relative path.
fn container_digests(
    ctd: &Containerd,
    image: &str,
    id: &str,
    dir: &Path,
) -> anyhow::Result<BTreeMap<String, String>> {
    let out = ctd.run_with_models_ok(
        image,
        id,
        dir,
        &[
            "sh",
            "-c",
            "cd /models && find . -type f | sort | xargs sha256sum",
        ],
    )?;
    let mut digests = BTreeMap::new();
    for line in out.lines() {
        let Some((digest, path)) = line.split_once("  ") else {
            continue;
        };
        digests.insert(
            path.trim_start_matches("./").to_owned(),
            digest.trim().to_owned(),
        );
    }
    Ok(digests)
}

/// Everything a containerd check needs, started; dropped in reverse order of need.
pub struct Rig {
    // Field order is drop order: mounts first, then containerd, then the snapshotter and the
    // registry, then the scratch folder.
    pub mounted: Vec<PathBuf>,
    pub containerd: Containerd,
    pub snapshotter: Snapshotter,
    pub link: Link,
    pub registry: Registry,
    pub scratch: tempfile::TempDir,
    pub bins: Bins,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for dir in &self.mounted {
            let _ = Command::new(&self.bins.modelpack)
                .args(["containerd", "umount", "-q", "--namespace", NAMESPACE])
                .arg("--address")
                .arg(&self.containerd.socket)
                .arg(dir)
                .output();
            containerd::detach_all(dir);
        }
    }
}

impl Rig {
    /// [`Rig::start_on`] containerd 1.6.
    pub fn start(bins: &Bins) -> anyhow::Result<Rig> {
        Rig::start_on(bins, Version::V1_6)
    }

    /// Starts registry, counting link, snapshotter and containerd `version` under a scratch
    /// folder.
    pub fn start_on(bins: &Bins, version: Version) -> anyhow::Result<Rig> {
        let scratch = tempfile::Builder::new().prefix("mp-e2e-").tempdir()?;
        let registry = crate::services::registry(&scratch.path().join("registry"))?;
        let link = Link::start(registry.port, None);
        // Empty: step 3c writes a hosts.toml for a registry name only it uses.
        let hosts = scratch.path().join("certs.d");
        fs::create_dir_all(&hosts)?;
        let snapshotter = Snapshotter::start(
            &bins.snapshotter,
            &scratch.path().join("snap"),
            &[
                "--log-level",
                "info,modelpack_snapshotter=debug",
                "--hosts-dir",
                &hosts.display().to_string(),
            ],
        )?;
        let containerd = Containerd::start(version, &scratch.path().join("ctd"), &snapshotter)?;
        containerd.wait_for_snapshotter()?;
        Ok(Rig {
            mounted: Vec::new(),
            containerd,
            snapshotter,
            link,
            registry,
            scratch,
            bins: bins.clone(),
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.scratch.path().join(rel)
    }

    /// `modelpack build -q DIR -t REFERENCE`, then `push` it (plain HTTP).
    pub fn build_and_push(&self, dir: &Path, reference: &str) -> anyhow::Result<()> {
        self.modelpack(&["build", "-q", &dir.display().to_string(), "-t", reference])?;
        self.modelpack(&["push", "-q", "--plain-http", reference])?;
        Ok(())
    }

    /// `modelpack ARGS` against this rig's store.
    pub fn modelpack(&self, args: &[&str]) -> anyhow::Result<String> {
        modelpack(&self.bins.modelpack, &self.path("store"), args)
    }

    /// `modelpack containerd SUB ARGS` against this rig's containerd.
    pub fn modelpack_containerd(&self, sub: &str, args: &[&str]) -> anyhow::Result<String> {
        let socket = self.containerd.socket.display().to_string();
        let mut all = vec![
            "containerd",
            sub,
            "--address",
            &socket,
            "--namespace",
            NAMESPACE,
        ];
        all.extend_from_slice(args);
        self.modelpack(&all)
    }

    /// Builds the busybox image, pushes it and pulls it through the snapshotter.
    pub fn busybox(&self) -> anyhow::Result<String> {
        let layout = self.path("busybox");
        containerd::busybox_layout(&layout)?;
        let image = containerd::push_busybox(&layout, &self.registry.host(), "e2e/busybox")?;
        self.containerd.ctr_ok(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            &image,
        ])?;
        Ok(image)
    }

    /// `modelpack snapshotter status --format json` of this rig's snapshotter.
    pub fn snapshotter_status(&self) -> anyhow::Result<serde_json::Value> {
        let socket = self.snapshotter.socket.display().to_string();
        let out = self.modelpack(&[
            "snapshotter",
            "status",
            "--format",
            "json",
            "--address",
            &socket,
        ])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `modelpack containerd pull` of `reference` (plain HTTP), then its view mounted at `dir`.
    pub fn pull_and_mount(&mut self, reference: &str, dir: &Path) -> anyhow::Result<()> {
        self.modelpack_containerd("pull", &["--plain-http", reference])?;
        self.mount_model(reference, dir)
    }

    /// Mounts a pulled model at `dir` (remembered for the cleanup).
    pub fn mount_model(&mut self, reference: &str, dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(dir)?;
        self.mounted.push(dir.to_owned());
        self.modelpack_containerd("mount", &[reference, &dir.display().to_string()])?;
        Ok(())
    }
}

/// The checks, on each of `versions` in turn (a fresh rig each).
pub fn check(bins: &Bins, versions: &[Version]) -> anyhow::Result<()> {
    ensure!(
        bins.snapshotter.exists() && bins.modelpack.exists(),
        "build the binaries first (cargo build --workspace --bins)"
    );
    let root = modelpack_testkit::sys::is_root();
    ensure!(
        root,
        "the containerd checks need root (containerd, mounts, runc)"
    );
    for &version in versions {
        let started = Instant::now();
        check_on(bins, version)
            .with_context(|| format!("the containerd {} checks failed", version.name()))?;
        println!(
            "### containerd {}: all checks passed in {:.0?}",
            version.name(),
            started.elapsed()
        );
    }
    Ok(())
}

/// The checks on one containerd version.
fn check_on(bins: &Bins, version: Version) -> anyhow::Result<()> {
    let mut rig = Rig::start_on(bins, version)?;
    println!(
        "### containerd {} ({}), configured with the docs/containerd.md snippet",
        version.name(),
        rig.containerd.version_text()
    );
    let result = checks(&mut rig);
    if result.is_err() {
        eprintln!(
            "--- snapshotter log ---\n{}\n--- containerd log (tail) ---\n{}",
            rig.snapshotter.log_text(),
            tail(
                &fs::read_to_string(&rig.containerd.log).unwrap_or_default(),
                40
            )
        );
    }
    result
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The main model of steps 2 to 6: its reference, its files' digests and its mounted view.
pub struct Model {
    pub reference: String,
    pub source: BTreeMap<String, String>,
    pub view: PathBuf,
}

/// Every step, in order; each takes the rig (whose containerd knows its version).
fn checks(rig: &mut Rig) -> anyhow::Result<()> {
    let image = ordinary_image(rig)?;
    let model = lazy_pull(rig)?;
    container_reads(rig, &image, &model)?;
    other_writers_in_containerd(rig, &image)?;
    mirror_in_containerd(rig)?;
    restart_snapshotter(rig, &image, &model)?;
    // The link stays up: the snapshots read through it must remount at the restarts that follow.
    let (_link, _) = crate::e2e_restart::reads_survive_restarts(rig, &image)?;
    // The proxy stays up: the snapshots fetched through it must remount in step 6.
    let _proxy = faults_under_the_snapshotter(rig, &image)?;
    unusable_registry(rig, &model)?;
    capped_cache_in_containerd(rig, &image)?;
    crate::e2e_creds::rotated_credentials(rig, &image)?;
    crate::e2e_cri::cri_through_the_snapshotter(rig)?;
    crate::e2e_csi::csi_in_containerd(rig, &image)
}

/// Step 1: busybox pulled (`ctr image pull --snapshotter`) and run on the modelpack
/// snapshotter; the same config still unpacks into the default snapshotter. Returns the image.
fn ordinary_image(rig: &mut Rig) -> anyhow::Result<String> {
    println!("== 1. an ordinary image through the modelpack snapshotter");
    let image = rig.busybox()?;
    let out = rig.containerd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        &image,
        "e2e-hello",
        "echo",
        "hello from busybox on modelpack",
    ])?;
    ensure!(
        out.contains("hello from busybox on modelpack"),
        "the container printed {out:?}"
    );
    // The doc's config must not take the default snapshotter away (on 2.x the transfer
    // service's unpack list replaces its default).
    rig.containerd
        .ctr_ok(&["image", "pull", "--plain-http", &image])?;
    let on_overlayfs = rig
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"])?;
    ensure!(
        on_overlayfs
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == "Committed")),
        "ctr image pull without --snapshotter unpacked nothing into overlayfs:\n{on_overlayfs}"
    );
    let out = rig.containerd.ctr_ok(&[
        "run",
        "--rm",
        &image,
        "e2e-hello-overlayfs",
        "echo",
        "hello from busybox on overlayfs",
    ])?;
    ensure!(
        out.contains("hello from busybox on overlayfs"),
        "the container on the default snapshotter printed {out:?}"
    );
    println!("   ok: ctr run printed what the container ran (modelpack, and overlayfs)");
    Ok(image)
}

/// Committed snapshots on the modelpack snapshotter, and the listing.
fn committed(rig: &Rig) -> anyhow::Result<(usize, String)> {
    let listed = rig
        .containerd
        .ctr_ok(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])?;
    let n = listed
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "Committed"))
        .count();
    Ok((n, listed))
}

/// Step 2: the model built, pushed and pulled lazily; its chain is committed and survives a GC.
fn lazy_pull(rig: &mut Rig) -> anyhow::Result<Model> {
    println!("== 2. a model pulled into containerd lazily");
    let model = rig.path("model");
    make_model(&model, 256)?;
    let source = tree_digests(&model)?;
    let reference = format!("{}/e2e/model:v1", rig.link.host());
    rig.build_and_push(&model, &reference)?;
    let before = rig.link.served();
    rig.modelpack_containerd("pull", &["--plain-http", &reference])?;
    let lazy_bytes = rig.link.served() - before;
    println!("   registry bytes served by the lazy pull, before any read: {lazy_bytes}");
    ensure!(
        lazy_bytes < LAZY_PULL_BUDGET,
        "the lazy pull moved {lazy_bytes} bytes (budget {LAZY_PULL_BUDGET})"
    );
    ensure!(
        rig.snapshotter
            .log_text()
            .matches("remote-snapshot-prepared=true")
            .count()
            >= source.len(),
        "the snapshotter did not log remote-snapshot-prepared=true per layer"
    );
    let (committed_before, listed) = committed(rig)?;
    ensure!(
        committed_before > source.len(),
        "expected the busybox layer and {} model layers committed:\n{listed}",
        source.len()
    );
    // A garbage collection must not take the chain (the image record holds it).
    rig.containerd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "prepare",
        "e2e-gc-trigger",
        "",
    ])?;
    rig.containerd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAPSHOTTER,
        "rm",
        "e2e-gc-trigger",
    ])?;
    std::thread::sleep(Duration::from_secs(1));
    let (committed_after, after_gc) = committed(rig)?;
    ensure!(
        committed_after == committed_before,
        "garbage collection removed snapshots:\nbefore:\n{listed}\nafter:\n{after_gc}"
    );
    println!("   ok: {committed_before} committed snapshots listed, kept through a GC");
    Ok(Model {
        reference,
        source,
        view: rig.path("view"),
    })
}

/// Step 3: the model mounted at its view; a container hashes every file.
fn container_reads(rig: &mut Rig, image: &str, model: &Model) -> anyhow::Result<()> {
    println!("== 3. a container reads the model at /models");
    let (reference, source, view) = (&model.reference, &model.source, &model.view);
    rig.mount_model(reference, view)?;
    let read = container_digests(&rig.containerd, image, "e2e-read", view)?;
    ensure!(
        &read == source,
        "the container read other bytes:\n{read:#?}\nexpected:\n{source:#?}"
    );
    let status = rig.snapshotter_status()?;
    ensure!(
        status["mounted"].as_u64() == Some(source.len() as u64),
        "snapshotter status: {status}"
    );
    println!(
        "   ok: {} files, digests match; snapshotter fetched {} bytes",
        read.len(),
        status["fetchedBytes"]
    );
    Ok(())
}

/// Step 4: kill -9 of the snapshotter and a start; containerd reaches it again, the layers are
/// remounted, and a new container on a fresh view reads the model right.
fn restart_snapshotter(rig: &mut Rig, image: &str, model: &Model) -> anyhow::Result<()> {
    println!("== 4. kill -9 the snapshotter, start it again");
    let (reference, source, view) = (&model.reference, &model.source, &model.view);
    rig.snapshotter.restart()?;
    rig.containerd.wait_for_snapshotter()?;
    ensure!(
        rig.snapshotter
            .log_text()
            .contains("remounted remote snapshot"),
        "the restarted snapshotter did not remount the model layers"
    );
    rig.modelpack_containerd("umount", &[&view.display().to_string()])?;
    rig.mounted.retain(|d| d != view);
    rig.mount_model(reference, view)?;
    let read = container_digests(&rig.containerd, image, "e2e-read-again", view)?;
    ensure!(
        &read == source,
        "after the restart the container read other bytes"
    );
    println!("   ok: a new container reads the model correctly");
    Ok(())
}

/// Step 6: a registry the snapshotter cannot use: a restart that cannot remount is refused,
/// then allowed with the failures reported; a pull it cannot serve lazily fails cleanly.
fn unusable_registry(rig: &mut Rig, model: &Model) -> anyhow::Result<()> {
    let source = &model.source;
    println!(
        "== 6. a registry the snapshotter cannot use: restart refused, then allowed; fallback"
    );
    let bad_config = rig.path("snap/unusable-registry.toml");
    fs::write(
        &bad_config,
        format!(
            "[registry.\"{}\"]\nca_file = \"/nonexistent/modelpack-e2e-ca.pem\"\n",
            rig.link.host()
        ),
    )?;
    let bad = bad_config.display().to_string();
    let refused = rig.snapshotter.run_to_exit(&["--config", &bad])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("cannot mount remote snapshot"),
        "a restart that cannot remount must refuse to start; it said: {stderr}"
    );
    rig.snapshotter
        .restart_with(&["--config", &bad, "--allow-invalid-mounts-on-restart"])?;
    rig.containerd.wait_for_snapshotter()?;
    let status = rig.snapshotter_status()?;
    ensure!(
        status["failed"].as_u64() == Some(source.len() as u64),
        "the layers that could not be remounted are not reported: {status}"
    );
    let small = rig.path("model-small");
    fs::create_dir_all(&small)?;
    fs::write(small.join("config.json"), br#"{"model_type":"fallback"}"#)?;
    let small_ref = format!("{}/e2e/small:v1", rig.link.host());
    rig.build_and_push(&small, &small_ref)?;
    let message = match rig.modelpack_containerd("pull", &["--plain-http", &small_ref]) {
        Ok(out) => bail!("a pull the snapshotter cannot serve succeeded: {out}"),
        Err(e) => e.to_string(),
    };
    ensure!(
        message.contains("did not serve layer config.json"),
        "unclear error: {message}"
    );
    ensure!(
        rig.snapshotter
            .log_text()
            .contains("remote-snapshot-prepared=false"),
        "the snapshotter did not log remote-snapshot-prepared=false"
    );
    let (_, listed) = committed(rig)?;
    ensure!(
        !listed.contains("extract-"),
        "the failed pull left a snapshot behind:\n{listed}"
    );
    let images = rig.containerd.ctr_ok(&["images", "ls", "-q"])?;
    ensure!(
        images.lines().all(|l| l != small_ref),
        "the failed pull recorded an image"
    );
    println!(
        "   ok: refused, then started with the failures reported; the pull failed in one line"
    );
    Ok(())
}

/// Step 7: a 1 GiB model read twice by containers through a snapshotter whose cache is capped
/// at 256 MiB; then the cache of a model containerd removed is garbage collected.
fn capped_cache_in_containerd(rig: &mut Rig, image: &str) -> anyhow::Result<()> {
    const CAP: u64 = 256 << 20;
    // Readahead's largest window: 32 chunks of 2 MiB.
    const WINDOW: u64 = 64 << 20;
    println!(
        "== 7. a capped cache: a 1 GiB model read twice by containers, cache capped at 256 MiB"
    );
    rig.snapshotter.restart_with(&[
        "--log-level",
        "info,modelpack_snapshotter=debug",
        "--cache-max-bytes",
        &CAP.to_string(),
    ])?;
    rig.containerd.wait_for_snapshotter()?;
    let model = rig.path("model-large");
    make_model(&model, 1024)?;
    let source = tree_digests(&model)?;
    let reference = format!("{}/e2e/large:v1", rig.registry.host());
    rig.build_and_push(&model, &reference)?;
    let view = rig.path("view-large");
    rig.pull_and_mount(&reference, &view)?;
    let cache = rig.snapshotter.root.join("cache");
    let sampler = modelpack_testkit::disk::PeakUsage::start(cache.clone());
    let mut reads = Vec::new();
    for pass in 0..2 {
        // The second container must read through the snapshotter, not the page cache.
        let _ = fs::write("/proc/sys/vm/drop_caches", "1");
        reads.push(container_digests(
            &rig.containerd,
            image,
            &format!("e2e-large-{pass}"),
            &view,
        ));
    }
    let peak = sampler.peak();
    drop(sampler);
    for read in reads {
        let read = read?;
        ensure!(
            read == source,
            "under the cap a container read other bytes:\n{read:#?}"
        );
    }
    ensure!(
        peak <= CAP + WINDOW,
        "the cache folder held {peak} bytes, over the cap {CAP} plus one readahead window"
    );
    let status = rig.snapshotter_status()?;
    let stats = &status["cache"];
    ensure!(
        stats["maxBytes"].as_u64() == Some(CAP)
            && stats["bytes"].as_u64().is_some_and(|b| b <= CAP)
            && stats["evictions"].as_u64().is_some_and(|e| e >= 384)
            && stats["refetches"].as_u64().is_some_and(|r| r > 0),
        "the cache numbers do not show the evictions and refetches: {status}"
    );
    println!(
        "   ok: both containers read every file right; cache folder peak {} MiB; {} evictions, {} refetches",
        peak >> 20,
        stats["evictions"],
        stats["refetches"]
    );

    // containerd forgets the model: its cache goes, the other models' stays.
    let weight = |dir: &Path| -> anyhow::Result<PathBuf> {
        let digests = tree_digests(dir)?;
        let hex = digests
            .get("model.safetensors")
            .context("the weight's digest")?;
        // `sha256-<hex>[-c..][-i<index tag>].data`: the file of that blob, whatever index.
        let prefix = format!("sha256-{hex}");
        fs::read_dir(&cache)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".data"))
            })
            .with_context(|| format!("no cache file for {prefix} in {}", cache.display()))
    };
    let (large, kept) = (weight(&model)?, weight(&rig.path("model"))?);
    ensure!(large.exists() && kept.exists(), "no cache files to collect");
    rig.modelpack_containerd("umount", &[&view.display().to_string()])?;
    rig.mounted.retain(|d| d != &view);
    let images = rig.containerd.ctr_ok(&["images", "ls", "-q"])?;
    let name = images
        .lines()
        .find(|l| l.contains("e2e/large"))
        .context("the large model's image is not listed")?
        .to_owned();
    rig.containerd.ctr_ok(&["images", "rm", "--sync", &name])?;
    let socket = rig.snapshotter.socket.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut report = String::new();
    while large.exists() {
        ensure!(
            Instant::now() < deadline,
            "the cache of a model containerd removed is still there: {report}"
        );
        report = rig.modelpack(&[
            "snapshotter",
            "gc",
            "--format",
            "json",
            "--address",
            &socket,
        ])?;
        std::thread::sleep(Duration::from_millis(500));
    }
    ensure!(
        kept.exists(),
        "gc removed the cache of a model containerd still has"
    );
    if report.is_empty() {
        report = "by containerd's own Cleanup".into();
    }
    println!("   ok: once containerd removed the model, its cache was collected ({report})");
    Ok(())
}

/// Step 3b: artifacts in other writers' shapes go into containerd and are read by a container:
/// modctl's legacy `cnai` names, and tar layers without any name annotation (the spec's
/// example). They come from the registry directly, not through the link step 6 breaks.
fn other_writers_in_containerd(rig: &mut Rig, image: &str) -> anyhow::Result<()> {
    println!(
        "== 3b. other writers' shapes in containerd: cnai names, modctl's (no title), tar layers without names"
    );
    let model = rig.path("model-foreign");
    fs::create_dir_all(model.join("docs"))?;
    fs::write(model.join("config.json"), br#"{"model_type":"foreign"}"#)?;
    fs::write(model.join("docs/README.md"), b"# foreign\n")?;
    fs::write(model.join("tokenizer.json"), br#"{"version":"1.0"}"#)?;
    let source = tree_digests(&model)?;
    let host = rig.registry.host();
    let dir = model.display().to_string();
    let cnai = format!("{host}/e2e/cnai:v1");
    rig.modelpack(&[
        "build",
        "-q",
        &dir,
        "-t",
        &cnai,
        "--media-type-prefix",
        "cnai",
    ])?;
    rig.modelpack(&["push", "-q", "--plain-http", &cnai])?;
    // Another writer's manifest made from one of ours: `edit` changes each layer's annotations.
    let respin = |from: &str,
                  to: &str,
                  edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)|
     -> anyhow::Result<()> {
        let fetched = rig.path("respun-manifest.json");
        let path = fetched.display().to_string();
        rig.modelpack(&["manifest", "fetch", from, "--plain-http", "-o", &path])?;
        let mut manifest: serde_json::Value = serde_json::from_slice(&fs::read(&fetched)?)?;
        for layer in manifest["layers"].as_array_mut().into_iter().flatten() {
            if let Some(o) = layer.as_object_mut() {
                edit(o);
            }
        }
        fs::write(&fetched, serde_json::to_vec(&manifest)?)?;
        rig.modelpack(&["manifest", "push", to, &path, "--plain-http"])?;
        Ok(())
    };
    // modctl's newest shape: cnai names, filepath and file metadata, no OCI title.
    let modctl = format!("{host}/e2e/cnai:modctl");
    respin(&cnai, &modctl, &|layer| {
        if let Some(a) = layer.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.remove("org.opencontainers.image.title");
        }
    })?;
    // Tar layers, then the same manifest with every layer annotation removed.
    let tarred = format!("{host}/e2e/tarred:v1");
    rig.modelpack(&["build", "-q", &dir, "-t", &tarred, "--layer-format", "tar"])?;
    rig.modelpack(&["push", "-q", "--plain-http", &tarred])?;
    let unnamed = format!("{host}/e2e/tarred:unnamed");
    respin(&tarred, &unnamed, &|layer| {
        layer.remove("annotations");
    })?;
    for (i, reference) in [cnai, modctl, unnamed].iter().enumerate() {
        let view = rig.path(&format!("view-foreign-{i}"));
        rig.pull_and_mount(reference, &view)?;
        let read = container_digests(&rig.containerd, image, &format!("e2e-foreign-{i}"), &view)?;
        ensure!(
            read == source,
            "{reference}: the container read other files:\n{read:#?}\nexpected:\n{source:#?}"
        );
        rig.modelpack_containerd("umount", &[&view.display().to_string()])?;
        rig.mounted.retain(|d| d != &view);
    }
    println!("   ok: each read by a container, digests match");
    Ok(())
}

/// Runs `sha256sum FILE` in a container with `dir` at /models; returns its exit status and
/// output (stdout and stderr).
fn container_sha256(
    ctd: &Containerd,
    image: &str,
    id: &str,
    dir: &Path,
    file: &str,
) -> anyhow::Result<(bool, String)> {
    let out = ctd
        .run_with_models(image, id, dir, &["sha256sum", &format!("/models/{file}")])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Step 5: the snapshotter fetching through the fault proxy (returned, passing everything
/// through, for the remounts that follow).
fn faults_under_the_snapshotter(rig: &mut Rig, image: &str) -> anyhow::Result<FaultProxy> {
    println!("== 5. the snapshotter behind a fault-injecting proxy");
    let proxy = FaultProxy::start(rig.registry.port);
    let model = rig.path("model-faults");
    make_model(&model, 16)?;
    let source = tree_digests(&model)?;
    let reference = format!("{}/e2e/faults:v1", proxy.host());
    rig.build_and_push(&model, &reference)?;

    // Transient faults on the manifest and the blobs: retried, right bytes.
    proxy.add(Rule::new(Some("GET"), "/manifests/", 1, Fault::Status(503)));
    proxy.add(Rule::new(
        Some("GET"),
        "/blobs/",
        1,
        Fault::ResetAfter(64 << 10),
    ));
    proxy.add(Rule::new(Some("GET"), "/blobs/", 1, Fault::TooMany(1)));
    proxy.add(Rule::new(Some("GET"), "/blobs/", 1, Fault::Status(502)));
    proxy.add(Rule::new(
        Some("GET"),
        "/blobs/",
        1,
        Fault::Stall(Duration::from_secs(1)),
    ));
    let view = rig.path("view-faults");
    rig.pull_and_mount(&reference, &view)?;
    let read = container_digests(&rig.containerd, image, "e2e-faults", &view)?;
    ensure!(
        read == source,
        "under transient faults the container read other bytes:\n{read:#?}"
    );
    ensure!(
        proxy.pending().is_empty(),
        "faults never hit: {:?}",
        proxy.pending()
    );
    println!(
        "   ok: {} transient faults retried; the container read every file right",
        proxy.applied()
    );

    // A registry that corrupts a weight: the read fails, the bytes never reach the container.
    proxy.clear();
    let other = rig.path("model-corrupt");
    let weight = one_weight_model(&other, ("w.safetensors", 8 << 20, 12), "corrupt")?;
    let corrupt_ref = format!("{}/e2e/corrupt:v1", proxy.host());
    rig.build_and_push(&other, &corrupt_ref)?;
    let corrupt_view = rig.path("view-corrupt");
    rig.pull_and_mount(&corrupt_ref, &corrupt_view)?;
    let applied_before = proxy.applied();
    proxy.add(Rule::new(
        Some("GET"),
        &format!("/blobs/sha256:{weight}"),
        usize::MAX,
        Fault::FlipByte(1000),
    ));
    let (ok, out) = container_sha256(
        &rig.containerd,
        image,
        "e2e-corrupt",
        &corrupt_view,
        "w.safetensors",
    )?;
    ensure!(
        !ok && !out.contains(&weight),
        "a corrupting registry: the container's read did not fail: {out}"
    );
    ensure!(
        proxy.applied() > applied_before,
        "the corruption was never applied (the weight was read from elsewhere)"
    );
    println!(
        "   ok: corrupted in transit, the read failed in the container ({})",
        out.lines().last().unwrap_or_default().trim()
    );
    proxy.clear();
    let (ok, out) = container_sha256(
        &rig.containerd,
        image,
        "e2e-corrupt-again",
        &corrupt_view,
        "w.safetensors",
    )?;
    ensure!(
        ok && out.contains(&weight),
        "after the fault cleared the read still fails: {out}"
    );
    println!("   ok: once the fault cleared, the same file read right");
    one_resolve_per_model_and_chains_in_parallel(rig, &proxy)?;
    Ok(proxy)
}

/// A small model of four layers pushed through `host`; returns (reference, manifest digest).
fn pushed_small_model(
    rig: &Rig,
    host: &str,
    name: &str,
    seed: u64,
) -> anyhow::Result<(String, String)> {
    let dir = rig.path(&format!("model-{name}"));
    fs::create_dir_all(dir.join("docs"))?;
    crate::measure::write_random(&dir.join("w.safetensors"), 4 << 20, seed)?;
    fs::write(
        dir.join("config.json"),
        format!(r#"{{"model_type":"{name}"}}"#),
    )?;
    fs::write(dir.join("tokenizer.json"), br#"{"version":"1.0"}"#)?;
    fs::write(dir.join("docs/README.md"), format!("# {name}\n"))?;
    let reference = format!("{host}/e2e/{name}:v1");
    rig.build_and_push(&dir, &reference)?;
    let info: serde_json::Value =
        serde_json::from_str(&rig.modelpack(&["inspect", &reference, "--format", "json"])?)?;
    let digest = info["digest"]
        .as_str()
        .context("inspect gave no digest")?
        .to_owned();
    Ok((reference, digest))
}

/// Every layer of a model mounts from one resolve (the manifest fetched once by the
/// snapshotter, however many layers), and Prepares of different models do not wait for each
/// other: while one model's resolve is stalled at the registry, another is pulled.
fn one_resolve_per_model_and_chains_in_parallel(
    rig: &mut Rig,
    proxy: &FaultProxy,
) -> anyhow::Result<()> {
    println!("== 5b. one resolve per model; two models prepared in parallel");
    let (slow_ref, slow_digest) = pushed_small_model(rig, &proxy.host(), "stalled", 21)?;
    let (fast_ref, fast_digest) = pushed_small_model(rig, &proxy.host(), "parallel", 22)?;
    let seen_before = proxy.requests().len();
    let log_before = rig.snapshotter.log_text().len();
    // The snapshotter resolves by digest (the client by tag): stall only the former.
    let stalled = format!("/e2e/stalled/manifests/{slow_digest}");
    proxy.add(Rule::new(
        Some("GET"),
        &stalled,
        1,
        Fault::Stall(Duration::from_secs(8)),
    ));
    let socket = rig.containerd.socket.display().to_string();
    let mut slow = Command::new(&rig.bins.modelpack)
        .args([
            "containerd",
            "pull",
            "-q",
            "--plain-http",
            "--address",
            &socket,
        ])
        .args(["--namespace", NAMESPACE, &slow_ref])
        .env("MODELPACK_STORE", rig.path("store"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the stalled pull")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.requests().iter().any(|r| r.contains(&stalled)) {
        if Instant::now() > deadline || slow.try_wait()?.is_some() {
            let _ = slow.kill();
            let _ = slow.wait();
            bail!("the stalled model's resolve never reached the registry");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let fast = rig.modelpack_containerd("pull", &["--plain-http", &fast_ref]);
    let fast_took = started.elapsed();
    let slow_still_running = slow.try_wait()?.is_none();
    let slow_out = slow.wait_with_output()?;
    fast?;
    ensure!(
        slow_out.status.success(),
        "the stalled pull failed: {}",
        String::from_utf8_lossy(&slow_out.stderr)
    );
    if !slow_still_running {
        // containerd may hold the second pull's calls back itself: a garbage collection that
        // became due waits for the Prepare in flight (the stalled one) and blocks the metadata
        // store meanwhile (seen on 2.1.9). What the snapshotter owns is that it served each of
        // the second model's Prepares at once when it got them: only the stalled model's mount
        // may take long.
        let log = rig.snapshotter.log_text();
        let log = log.get(log_before..).unwrap_or_default();
        let slow_mounts: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("remote layer mounted"))
            .filter_map(|l| l.split("took=").nth(1))
            .filter(|took| {
                took.ends_with('s') && !["ms", "µs", "ns"].iter().any(|u| took.ends_with(u))
            })
            .collect();
        ensure!(
            slow_mounts.len() <= 1,
            "the second model's pull waited for the first model's stalled Prepare ({fast_took:?}); \
             mounts that took seconds: {slow_mounts:?}"
        );
        println!(
            "   note: containerd held the second pull back for {fast_took:.1?} (its own metadata \
             lock, a garbage collection waiting for the stalled Prepare); the snapshotter served \
             it at once"
        );
    }
    // Each model's manifest: once by tag (the client), once by digest (the snapshotter), for
    // all four layers.
    let seen = proxy.requests();
    for (name, digest) in [("stalled", &slow_digest), ("parallel", &fast_digest)] {
        let by_digest = seen[seen_before..]
            .iter()
            .filter(|r| {
                r.starts_with("GET") && r.contains(&format!("/e2e/{name}/manifests/{digest}"))
            })
            .count();
        ensure!(
            by_digest == 1,
            "the snapshotter fetched the {name} manifest {by_digest} times for its 4 layers"
        );
    }
    println!(
        "   ok: a model pulled in {fast_took:?} while another's resolve was stalled; one manifest fetch per model"
    );
    Ok(())
}

/// Step 3c: a pull-through mirror named in the hosts.toml of a registry (the snapshotter's
/// `--hosts-dir`, the CLI's too) serves the model's lazy reads; its tag resolves at the
/// upstream (the mirror may only pull). The model is removed again afterwards, so later
/// restarts do not need the mirror.
fn mirror_in_containerd(rig: &mut Rig) -> anyhow::Result<()> {
    use modelpack_testkit::registry::{RegistryOptions, write_hosts_toml};
    println!("== 3c. a registry mirror from hosts.toml under the snapshotter");
    let upstream = Link::start(rig.registry.port, None);
    let remote = format!("http://127.0.0.1:{}", rig.registry.port);
    let mirror_dir = rig.path("mirror");
    let mirror = Registry::start(RegistryOptions {
        dir: Some(&mirror_dir),
        proxy_of: Some(&remote),
        ..RegistryOptions::default()
    })
    .context("cannot start the mirror registry")?;
    let mirror_link = Link::start(mirror.port, None);
    let hosts = rig.path("certs.d");
    write_hosts_toml(
        &hosts,
        &upstream.host(),
        &upstream.host(),
        &mirror_link.host(),
        "[\"pull\"]",
    )?;
    let dir = rig.path("model-mirror");
    make_model(&dir, 16)?;
    rig.build_and_push(&dir, &format!("{}/e2e/mirror:v1", rig.registry.host()))?;
    let reference = format!("{}/e2e/mirror:v1", upstream.host());
    let hosts_arg = hosts.display().to_string();
    let log_before = rig.snapshotter.log_text().len();
    rig.modelpack_containerd("pull", &["--hosts-dir", &hosts_arg, &reference])?;
    let view = rig.path("view-mirror");
    rig.mount_model(&reference, &view)?;
    let read = tree_digests(&view)?;
    ensure!(
        read == tree_digests(&dir)?,
        "read through the mirror: other files:\n{read:#?}"
    );
    let (from_mirror, from_upstream) = (mirror_link.served(), upstream.served());
    ensure!(
        from_mirror >= 16 << 20,
        "the mirror served only {from_mirror} bytes"
    );
    // Beyond manifests, the upstream may serve only requests the mirror failed and the
    // snapshotter logged as such (docker-registry's pull-through cache now and then answers
    // 500 to a blob it is still fetching itself).
    let mirror_url = format!("mirror=http://{}/v2", mirror_link.host());
    let fallbacks = rig.snapshotter.log_text()[log_before..]
        .lines()
        .filter(|l| l.contains("registry mirror failed") && l.contains(&mirror_url))
        .count();
    ensure!(
        from_upstream < 1 << 20 || fallbacks > 0,
        "the upstream served {from_upstream} bytes: more than manifests, and the mirror never failed"
    );
    if fallbacks > 0 {
        println!("   note: the mirror failed {fallbacks} time(s); those reads went upstream");
    }
    rig.modelpack_containerd("umount", &[&view.display().to_string()])?;
    rig.mounted.retain(|d| d != &view);
    rig.containerd
        .ctr_ok(&["images", "rm", "--sync", &reference])?;
    println!(
        "   ok: digests match; {from_mirror} bytes from the mirror, {from_upstream} from the upstream"
    );
    Ok(())
}
