//! The containerd rows of `cargo xtask bench`: time from `modelpack containerd pull` to a
//! container having read the model's `config.json` (lazy), against a full `modelpack pull -o`
//! then a bind mount, against `ctr content fetch` of the artifact, and against the same container
//! reading a local copy of the model (the floor: no registry at all). Same registry, same model,
//! alternating, medians; once per containerd version (1.6 and 2.x, each configured as
//! docs/containerd.md shows).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::ensure;

use crate::containerd::Version;
use crate::e2e::{Bins, Rig};

/// (lazy, full pull + bind, ctr content fetch, local folder) medians.
pub struct Times {
    pub lazy: Duration,
    pub full: Duration,
    pub content_fetch: Duration,
    pub local: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs a container that reads `/models/config.json` from `dir`; returns once the container has
/// printed it (the clock stops there; ctr's clean-up after the exit is not counted).
fn read_config_in_container(
    rig: &Rig,
    image: &str,
    id: &str,
    dir: &Path,
    started: Instant,
) -> anyhow::Result<Duration> {
    use std::io::BufRead as _;
    let mut child = rig
        .containerd
        .run_with_models(image, id, dir, &["cat", "/models/config.json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut read_at = None;
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            if read_at.is_none() && line?.contains("model_type") {
                read_at = Some(started.elapsed());
            }
        }
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "ctr run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    read_at.ok_or_else(|| anyhow::anyhow!("the container did not print config.json"))
}

/// One timed run of `kind`: from a synced start, `prepare` (its steps' times, as the start of
/// the log line), then a container reading `/models/config.json` from `dir`; the time to that
/// read, logged.
fn timed_read(
    rig: &mut Rig,
    image: &str,
    (kind, run): (&str, usize),
    dir: &Path,
    prepare: impl FnOnce(&mut Rig, Instant) -> anyhow::Result<String>,
) -> anyhow::Result<Duration> {
    crate::measure::sync();
    let started = Instant::now();
    let steps = prepare(rig, started)?;
    let read = read_config_in_container(rig, image, &format!("bench-{kind}-{run}"), dir, started)?;
    println!("   {kind} run {run}: {steps}config.json read in a container {read:.2?}");
    Ok(read)
}

/// Runs the comparison on containerd `version` with a model whose weight is `size_mib`.
pub fn run(bins: &Bins, version: Version, size_mib: u64, runs: usize) -> anyhow::Result<Times> {
    let mut rig = Rig::start_on(bins, version)?;
    let image = rig.busybox()?;
    let model = rig.path("model");
    crate::e2e::make_model(&model, size_mib)?;
    let reference = format!("{}/bench/model:v1", rig.registry.host());
    rig.build_and_push(&model, &reference)?;
    // The model stays as the local folder the last comparison binds.
    let manifest = rig.modelpack(&["manifest", "fetch", "--plain-http", &reference])?;
    let manifest: serde_json::Value = serde_json::from_str(&manifest)?;
    let mut blobs: Vec<String> = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect();
    if let Some(c) = manifest["config"]["digest"].as_str() {
        blobs.push(c.to_owned());
    }
    blobs.push(
        rig.modelpack(&["resolve", "--plain-http", &reference])?
            .trim()
            .to_owned(),
    );
    let view = rig.path("view");
    let full = rig.path("full");
    let (mut lazy_t, mut full_t, mut fetch_t, mut local_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        // Lazy: pull into containerd, mount the view, a container reads config.json.
        lazy_t.push(timed_read(
            &mut rig,
            &image,
            ("lazy", run),
            &view,
            |rig, started| {
                rig.modelpack_containerd("pull", &["--plain-http", &reference])?;
                let pulled = started.elapsed();
                rig.mount_model(&reference, &view)?;
                let mounted = started.elapsed();
                Ok(format!("pulled {pulled:.2?}, view mounted {mounted:.2?}, "))
            },
        )?);
        rig.modelpack_containerd("umount", &[&view.display().to_string()])?;
        rig.mounted.retain(|d| d != &view);
        rig.containerd
            .ctr_ok(&["images", "rm", "--sync", &reference])?;
        // The snapshotter's chunk cache stays warm between runs; drop it so each run is cold.
        let _ = fs::remove_dir_all(rig.snapshotter.root.join("cache"));
        let _ = fs::remove_dir_all(rig.snapshotter.root.join("store"));
        rig.snapshotter.restart()?;
        rig.containerd.wait_for_snapshotter()?;

        // Full: download the whole model, bind it, a container reads config.json.
        let _ = fs::remove_dir_all(&full);
        full_t.push(timed_read(
            &mut rig,
            &image,
            ("full", run),
            &full,
            |rig, started| {
                let out = full.display().to_string();
                rig.modelpack(&["pull", "-q", "--plain-http", &reference, "-o", &out])?;
                Ok(format!("pulled {:.2?}, ", started.elapsed()))
            },
        )?);
        fs::remove_dir_all(&full)?;

        // The same container reading the local copy of the model: no registry, no pull.
        local_t.push(timed_read(
            &mut rig,
            &image,
            ("local", run),
            &model,
            |_, _| Ok(String::new()),
        )?);

        // containerd's own fetch of the artifact's blobs (no container).
        crate::measure::sync();
        let started = Instant::now();
        rig.containerd
            .ctr_ok(&["content", "fetch", "--plain-http", &reference])?;
        fetch_t.push(started.elapsed());
        let mut rm = vec!["content", "rm"];
        rm.extend(blobs.iter().map(String::as_str));
        let _ = rig.containerd.ctr_ok(&rm);
        // containerd deletes content in a garbage collection after the command returns; let it
        // finish so the next run's fsyncs do not queue behind it.
        std::thread::sleep(Duration::from_secs(2));
        crate::measure::sync();
    }
    Ok(Times {
        lazy: median(lazy_t),
        full: median(full_t),
        content_fetch: median(fetch_t),
        local: median(local_t),
    })
}
