//! `cargo xtask bench`: our commands and their comparisons, side by side in one run, medians of
//! several runs, ratios against targets; the table goes to docs/benchmarks.md.

use modelpack_testkit::process::{Signal, signal_pid};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::measure::{self, Sample};

/// One row of the results table, from one run of the suite.
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) ours: String,
    pub(crate) theirs: String,
    pub(crate) ratio: f64,
    pub(crate) target: String,
    pub(crate) pass: bool,
}

impl Row {
    /// A row with no target: its ratio is for information.
    fn info(what: String, ours: String, theirs: String, ratio: f64) -> Row {
        Row {
            what,
            ours,
            theirs,
            ratio,
            target: "-".into(),
            pass: true,
        }
    }

    /// An amount of ours with no comparison: `ours` shows `mib` MiB, which must stay within
    /// `limit_mib` MiB (the ratio is of the two).
    fn within_mib(what: String, ours: String, mib: f64, limit_mib: u64) -> Row {
        let limit = limit_mib as f64;
        Row {
            target: format!("<= {limit_mib} MiB"),
            pass: mib <= limit,
            ..Row::info(what, ours, "-".into(), mib / limit)
        }
    }

    /// This row with `target` on its ratio.
    fn meeting(self, target: Target) -> Row {
        let (text, max) = match target {
            Target::AtMost(max) => (format!("<= {max}"), max),
            Target::Faster(times) => (
                format!("<= {:.2} (>= {:.0}x faster)", 1.0 / times, times),
                1.0 / times,
            ),
        };
        Row {
            target: text,
            pass: self.ratio <= max,
            ..self
        }
    }

    /// This row with the target that its ratio be at most `max`.
    pub(crate) fn at_most(self, max: f64) -> Row {
        self.meeting(Target::AtMost(max))
    }
}

/// What a row's ratio must meet.
#[derive(Clone, Copy)]
pub(crate) enum Target {
    /// At most this ratio.
    AtMost(f64),
    /// Ours at least this many times faster than the comparison.
    Faster(f64),
}

fn secs(d: std::time::Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The row of two times, in seconds, the comparison labelled `theirs_label`; no target yet.
fn seconds_row(
    what: String,
    ours: std::time::Duration,
    theirs: std::time::Duration,
    theirs_label: &str,
) -> Row {
    Row::info(
        what,
        secs(ours),
        format!("{} ({theirs_label})", secs(theirs)),
        ours.as_secs_f64() / theirs.as_secs_f64(),
    )
}

/// Generates the benchmark model: one large weight plus small configs.
fn make_model(dir: &Path, size_mib: u64) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    measure::write_random(&dir.join("model.safetensors"), size_mib << 20, 1)?;
    fs::write(
        dir.join("config.json"),
        br#"{"model_type":"bench","torch_dtype":"bfloat16"}"#,
    )?;
    fs::write(dir.join("tokenizer.json"), vec![b'x'; 2 << 20])?;
    fs::write(dir.join("README.md"), b"benchmark model\n")?;
    Ok(())
}

fn bench_build(bin: &Path, work: &Path, size_mib: u64, runs: usize) -> anyhow::Result<Vec<Row>> {
    let model = work.join("model");
    make_model(&model, size_mib)?;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut cps = Vec::new();
    let mut sums = Vec::new();
    for run in 0..runs {
        let store = work.join("store");
        let copy = work.join("copy");
        let _ = fs::remove_dir_all(&store);
        let _ = fs::remove_dir_all(&copy);
        measure::sync();
        ours.push(measure::run(
            Command::new(bin)
                .args(["build", "-q", "-t", "bench:latest", "--store"])
                .arg(&store)
                .arg(&model)
                .stdout(std::process::Stdio::null()),
        )?);
        measure::sync();
        // cp, then sha256sum of the same files: the two-pass way.
        let started = std::time::Instant::now();
        let cp = measure::run(Command::new("cp").arg("-r").arg(&model).arg(&copy))?;
        let files: Vec<PathBuf> = fs::read_dir(&copy)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        let sum = measure::run(
            Command::new("sha256sum")
                .args(&files)
                .stdout(std::process::Stdio::null()),
        )?;
        theirs.push(Sample {
            wall: started.elapsed(),
            max_rss_kib: cp.max_rss_kib.max(sum.max_rss_kib),
        });
        cps.push(cp);
        sums.push(sum);
        println!(
            "  run {}: build {:.2}s, cp+sha256sum {:.2}s",
            run + 1,
            ours[run].wall.as_secs_f64(),
            theirs[run].wall.as_secs_f64()
        );
    }
    let (o, t) = (measure::median(&ours), measure::median(&theirs));
    let rss_mib = o.max_rss_kib as f64 / 1024.0;
    let parts = format!(
        "`cp -r` {} then `sha256sum` {}",
        secs(measure::median(&cps).wall),
        secs(measure::median(&sums).wall)
    );
    Ok(vec![
        seconds_row(
            format!("build {size_mib} MiB model (hash + store)"),
            o.wall,
            t.wall,
            &parts,
        )
        .at_most(0.8),
        Row::within_mib(
            format!("build peak memory, {size_mib} MiB model"),
            format!("{rss_mib:.1} MiB"),
            rss_mib,
            128,
        ),
    ])
}

fn digest_of_layer0(bin: &Path, store: &Path, name: &str) -> anyhow::Result<String> {
    let out = store_command(bin, store, &["inspect", name, "--format", "json"]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("inspect JSON")?;
    v["layers"][0]["digest"]
        .as_str()
        .map(str::to_owned)
        .context("no layer digest")
}

/// The layer digests of `reference`, from its manifest in the registry.
pub(crate) fn layer_digests(bin: &Path, reference: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new(bin)
        .args(["manifest", "fetch", "--plain-http", reference])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "manifest fetch {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("manifest JSON")?;
    let digests: Vec<String> = v["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(!digests.is_empty(), "{reference} has no layers");
    Ok(digests)
}

/// The registry URL of `digest` in the repository of `reference` (`HOST/REPO:TAG`).
pub(crate) fn blob_url(reference: &str, digest: &str) -> String {
    let (host, rest) = reference.split_once('/').unwrap_or((reference, ""));
    let repo = rest.rsplit_once(':').map_or(rest, |(repo, _)| repo);
    format!("http://{host}/v2/{repo}/blobs/{digest}")
}

fn make_multi_model(dir: &Path, shard_mib: u64) -> anyhow::Result<()> {
    fs::create_dir_all(dir.join("tokenizer"))?;
    for i in 0..8u64 {
        measure::write_random(
            &dir.join(format!("model-{:05}-of-00008.safetensors", i + 1)),
            shard_mib << 20,
            100 + i,
        )?;
    }
    for i in 0..20u64 {
        let size = 1024 * (i + 1) * 3;
        measure::write_random(
            &dir.join(format!("tokenizer/part-{i:02}.json")),
            size,
            500 + i,
        )?;
    }
    fs::write(dir.join("config.json"), br#"{"model_type":"bench"}"#)?;
    Ok(())
}

/// `sh -c SCRIPT` with `args` as `$1`, `$2`...
fn sh(script: &str, args: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).arg("sh").args(args);
    c
}

/// `modelpack --store STORE ARGS`.
fn store_command(bin: &Path, store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.arg("--store").arg(store).args(args);
    c
}

/// Runs `modelpack --store STORE ARGS`, quietly; fails when it does.
pub(crate) fn modelpack(bin: &Path, store: &Path, args: &[&str]) -> anyhow::Result<()> {
    let st = store_command(bin, store, args)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "modelpack {args:?} failed");
    Ok(())
}

/// `modelpack pull` of `reference` into `store`.
pub(crate) fn pull_command(bin: &Path, store: &Path, reference: &str) -> Command {
    store_command(bin, store, &["pull", "--plain-http", reference])
}

/// `modelpack pull -o OUT` of `reference`, with `store` (a scratch store goes inside it).
pub(crate) fn pull_o_command(bin: &Path, store: &Path, reference: &str, out: &Path) -> Command {
    let mut c = store_command(bin, store, &["pull", "--plain-http", reference, "-o"]);
    c.arg(out);
    c
}

/// `modelpack push --from FROM TO`: a copy of `from` from the registry to `to`.
pub(crate) fn push_from_command(bin: &Path, store: &Path, from: &str, to: &str) -> Command {
    store_command(bin, store, &["push", "--plain-http", "--from", from, to])
}

/// Starts a registry in `work/registry`, writes the single-weight model (one `size_mib` MiB
/// weight) into `work/single`, builds it into the store `work/store` as `HOST/bench/single:v1`
/// and pushes it; returns the registry and that reference.
fn push_single(
    bin: &Path,
    work: &Path,
    size_mib: u64,
) -> anyhow::Result<(modelpack_testkit::registry::Registry, String)> {
    let registry = crate::services::registry(&work.join("registry"))?;
    let dir = work.join("single");
    fs::create_dir_all(&dir)?;
    measure::write_random(&dir.join("model.safetensors"), size_mib << 20, 11)?;
    let reference = format!("{}/bench/single:v1", registry.host());
    let store = work.join("store");
    let dir = dir.to_str().unwrap_or_default();
    modelpack(bin, &store, &["build", dir, "-t", &reference])?;
    modelpack(bin, &store, &["push", &reference, "--plain-http"])?;
    Ok((registry, reference))
}

pub(crate) const ORAS_PULL: &str = "import sys, oras.client\nc = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)\nc.pull(target=sys.argv[2], outdir=sys.argv[3])\n";

/// The folder earlier outputs are moved into while a [`SetAside`] lives.
static SET_ASIDE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// While it lives, [`clear`] moves earlier runs' outputs aside instead of deleting them; they
/// are deleted when it is dropped. For rows of thousands of small files: this machine's root
/// file system is ext4 without a journal, where every inode freed in the last 30 s is skipped
/// one by one when a new one is allocated (ext4's `recently_deleted`), so deleting one run's
/// 2,001 files put seconds of system time into whichever run came next, ours or the
/// comparison's, and the rows measured the deletion more than either tool.
pub(crate) struct SetAside(PathBuf);

impl SetAside {
    /// Moves outputs into `dir` until dropped.
    pub(crate) fn new(dir: PathBuf) -> anyhow::Result<SetAside> {
        fs::create_dir_all(&dir)?;
        if let Ok(mut slot) = SET_ASIDE.lock() {
            *slot = Some(dir.clone());
        }
        Ok(SetAside(dir))
    }
}

impl Drop for SetAside {
    fn drop(&mut self) {
        if let Ok(mut slot) = SET_ASIDE.lock() {
            *slot = None;
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Removes `path` (a folder or a file), or moves it aside while a [`SetAside`] lives.
pub(crate) fn clear(path: &Path) {
    static MOVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let aside = SET_ASIDE.lock().ok().and_then(|slot| slot.clone());
    if let Some(dir) = aside
        && path.exists()
    {
        let n = MOVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if fs::rename(path, dir.join(n.to_string())).is_ok() {
            return;
        }
    }
    let _ = fs::remove_dir_all(path);
    let _ = fs::remove_file(path);
}

/// Runs `cmd` once, timed, after clearing `outputs` ([`clear`]) and syncing.
pub(crate) fn timed_once(outputs: &[&Path], mut cmd: Command) -> anyhow::Result<Sample> {
    for o in outputs {
        clear(o);
    }
    measure::sync();
    cmd.stdout(std::process::Stdio::null());
    measure::run(&mut cmd)
}

/// Times a command `runs` times, cleaning `outputs` and syncing before each run.
pub(crate) fn timed(
    runs: usize,
    outputs: &[&Path],
    mut make: impl FnMut(usize) -> Command,
) -> anyhow::Result<Sample> {
    let samples = (0..runs)
        .map(|run| timed_once(outputs, make(run)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(measure::median(&samples))
}

/// Times two commands `runs` times each, interleaved (AB, BA, AB, ...) so that drift in the
/// machine's state (page cache, writeback, the host) falls on both alike.
pub(crate) fn timed_pair(
    runs: usize,
    (a_outputs, mut make_a): (&[&Path], impl FnMut(usize) -> Command),
    (b_outputs, mut make_b): (&[&Path], impl FnMut(usize) -> Command),
) -> anyhow::Result<(Sample, Sample)> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for b_turn in [run % 2 == 1, run % 2 == 0] {
            if b_turn {
                b.push(timed_once(b_outputs, make_b(run))?);
            } else {
                a.push(timed_once(a_outputs, make_a(run))?);
            }
        }
    }
    Ok((measure::median(&a), measure::median(&b)))
}

/// One command of a comparison: the outputs to remove before each run, and the command of a run.
pub(crate) type Side<'a> = (&'a [&'a Path], &'a dyn Fn(usize) -> Command);

/// One row comparing our command with another, timed alternately.
pub(crate) struct Case<'a> {
    pub(crate) what: String,
    /// What the comparison is, in the row, and the target of the ratio.
    pub(crate) against: (&'a str, Target),
    pub(crate) ours: Side<'a>,
    pub(crate) theirs: Side<'a>,
}

/// The rows of `cases`, in turn, each of [`timed_pair`] over `runs`.
pub(crate) fn compare<'a>(
    runs: usize,
    cases: impl IntoIterator<Item = Case<'a>>,
) -> anyhow::Result<Vec<Row>> {
    cases
        .into_iter()
        .map(|c| {
            let (ours, theirs) = timed_pair(runs, c.ours, c.theirs)?;
            let (label, target) = c.against;
            Ok(row(c.what, &ours, &theirs, label).meeting(target))
        })
        .collect()
}

/// The row of two timed commands, ours with its peak memory; no target yet.
pub(crate) fn row(what: String, ours: &Sample, theirs: &Sample, theirs_label: &str) -> Row {
    Row {
        ours: format!(
            "{} ({:.0} MiB RSS)",
            secs(ours.wall),
            ours.max_rss_kib as f64 / 1024.0
        ),
        ..seconds_row(what, ours.wall, theirs.wall, theirs_label)
    }
}

fn bench_transfer(s: &Suite, work: &Path) -> anyhow::Result<Vec<Row>> {
    let Suite {
        bin,
        size_mib,
        runs,
        big_mib,
        ..
    } = *s;
    let (registry, single_ref) = push_single(bin, work, size_mib)?;
    let host = registry.host();
    let python = crate::setup::oras_venv().join("bin/python");
    let store = work.join("store");
    let multi = work.join("multi");
    make_multi_model(&multi, (size_mib / 8).max(1))?;
    let mp = |args: &[&str]| modelpack(bin, &store, args);
    let multi_ref = format!("{host}/bench/multi:v1");
    mp(&[
        "build",
        multi.to_str().unwrap_or_default(),
        "-t",
        &multi_ref,
    ])?;
    mp(&["push", &multi_ref, "--plain-http"])?;
    let blob = digest_of_layer0(bin, &store, &single_ref)?;
    let blob_file = store
        .join("blobs/sha256")
        .join(blob.trim_start_matches("sha256:"));
    let mut rows = Vec::new();

    println!("bench: push {size_mib} MiB");
    let push_ours = timed(runs, &[], |run| {
        push_from_command(
            bin,
            &store,
            &single_ref,
            &format!("{host}/push-ours-{run}/m:v1"),
        )
    })?;
    let push_curl = {
        let mut samples = Vec::new();
        for run in 0..runs {
            measure::sync();
            let started = std::time::Instant::now();
            let out = Command::new("curl")
                .args(["-s", "-X", "POST", "-D", "-", "-o", "/dev/null"])
                .arg(format!("http://{host}/v2/push-curl-{run}/m/blobs/uploads/"))
                .output()?;
            let headers = String::from_utf8_lossy(&out.stdout);
            let location = headers
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Location: ")
                        .or_else(|| l.strip_prefix("location: "))
                })
                .context("no Location from the registry")?
                .trim()
                .to_owned();
            let url = if location.starts_with("http") {
                location
            } else {
                format!("http://{host}{location}")
            };
            let sep = if url.contains('?') { '&' } else { '?' };
            let put = measure::run(
                Command::new("curl")
                    .args(["-s", "-f", "-T"])
                    .arg(&blob_file)
                    .arg(format!("{url}{sep}digest={blob}"))
                    .stdout(std::process::Stdio::null()),
            )?;
            samples.push(Sample {
                wall: started.elapsed(),
                max_rss_kib: put.max_rss_kib,
            });
        }
        measure::median(&samples)
    };
    rows.push(
        row(
            format!("push {size_mib} MiB single-blob model"),
            &push_ours,
            &push_curl,
            "monolithic `curl -T`",
        )
        .at_most(1.15),
    );

    println!("bench: pull {size_mib} MiB");
    let pull_store = work.join("pull-store");
    let pulled_file = work.join("curl-blob");
    let oras_out = work.join("oras-out");
    // `modelpack pull` into the scratch store, and oras-py's pull into a folder.
    let our_pull = |reference: &str| pull_command(bin, &pull_store, reference);
    let oras_pull = |host: &str, reference: &str| {
        let mut c = Command::new(&python);
        c.args(["-c", ORAS_PULL, host, reference]).arg(&oras_out);
        c
    };
    let blob_url = format!("http://{host}/v2/bench/single/blobs/{blob}");
    let curl_o = |_| {
        let mut c = Command::new("curl");
        c.args(["-s", "-f", "-o"]).arg(&pulled_file).arg(&blob_url);
        c
    };
    let (pull_ours, pull_curl) = timed_pair(
        runs,
        (&[&pull_store], |_| our_pull(&single_ref)),
        (&[&pulled_file], curl_o),
    )?;
    rows.push(
        row(
            format!("pull {size_mib} MiB single-blob model (verified, into the store)"),
            &pull_ours,
            &pull_curl,
            "`curl -o file`",
        )
        .at_most(1.3),
    );
    // `pull -o`: the same engine into a folder (a scratch store inside a fresh store).
    let folder_store = work.join("folder-store");
    let folder = work.join("folder-out");
    let our_pull_o = |reference: &str| pull_o_command(bin, &folder_store, reference, &folder);
    rows.extend(compare(
        runs,
        [
            // The same bytes written and verified by the shell's tools: the floor of a
            // verified pull.
            Case {
                what: format!("pull {size_mib} MiB single-blob model (verified, into the store)"),
                against: ("`curl | tee FILE | sha256sum`", Target::AtMost(0.6)),
                ours: (&[&pull_store], &|_| our_pull(&single_ref)),
                theirs: (&[&pulled_file], &|_| {
                    let pipe = r#"curl -s -f "$1" | tee "$2" | sha256sum"#;
                    sh(pipe, &[blob_url.as_ref(), pulled_file.as_ref()])
                }),
            },
            Case {
                what: format!("pull -o {size_mib} MiB single-blob model (verified, into a folder)"),
                against: ("`curl -o file`", Target::AtMost(1.3)),
                ours: (&[&folder_store, &folder], &|_| our_pull_o(&single_ref)),
                theirs: (&[&pulled_file], &curl_o),
            },
        ],
    )?);
    let pull_oras = timed(runs, &[&oras_out], |_| oras_pull(&host, &single_ref))?;
    rows.push(seconds_row(
        format!("pull {size_mib} MiB single-blob model"),
        pull_ours.wall,
        pull_oras.wall,
        "oras-py",
    ));

    println!("bench: pull multi-file");
    // The machine's limit for the same bytes: 8 `curl -o` at a time, one per blob, no checks.
    let curl_dir = work.join("curl-multi");
    let list = work.join("curl-multi.list");
    let lines: String = layer_digests(bin, &multi_ref)?
        .iter()
        .map(|d| {
            format!(
                "{} http://{host}/v2/bench/multi/blobs/{d}\n",
                d.trim_start_matches("sha256:")
            )
        })
        .collect();
    fs::write(&list, lines)?;
    // `pull` into the store and `pull -o` into a folder, each against oras-py's pull, of
    // `reference` through `host`; `name` makes a row's name of the command's.
    let against_oras = |runs: usize,
                        host: &str,
                        reference: &str,
                        name: &dyn Fn(&str) -> String,
                        target: Target| {
        let oras: Side = (&[&oras_out], &|_| oras_pull(host, reference));
        compare(
            runs,
            [
                Case {
                    what: name("pull"),
                    against: ("oras-py", target),
                    ours: (&[&pull_store], &|_| our_pull(reference)),
                    theirs: oras,
                },
                Case {
                    what: name("pull -o"),
                    against: ("oras-py", target),
                    ours: (&[&folder_store, &folder], &|_| our_pull_o(reference)),
                    theirs: oras,
                },
            ],
        )
    };
    let multi = format!(
        "multi-file model (8 x {} MiB + 21 small files)",
        size_mib / 8
    );
    rows.extend(against_oras(
        runs,
        &host,
        &multi_ref,
        &|pull| format!("{pull} {multi}"),
        Target::AtMost(0.5),
    )?);
    rows.extend(compare(
        runs,
        [Case {
            what: format!("pull {multi}, against the machine's limit"),
            against: ("8 parallel `curl -o`, one per blob", Target::AtMost(2.0)),
            ours: (&[&pull_store], &|_| our_pull(&multi_ref)),
            theirs: (&[&curl_dir], &|_| {
                let script = r#"mkdir -p "$1" && cd "$1" && xargs -P 8 -n 2 curl -s -f -o < "$2""#;
                sh(script, &[curl_dir.as_ref(), list.as_ref()])
            }),
        }],
    )?);
    let _ = fs::remove_dir_all(&curl_dir);

    println!("bench: slow link (10 ms each way, 50 MB/s per connection)");
    let slow = modelpack_testkit::link::Link::slow(
        registry.port,
        std::time::Duration::from_millis(10),
        Some(50_000_000),
    );
    for (label, reference) in [("single-blob", &single_ref), ("multi-file", &multi_ref)] {
        let via = reference.replacen(&host, &slow.host(), 1);
        rows.extend(against_oras(
            runs.min(3),
            &slow.host(),
            &via,
            &|pull| format!("slow-link {pull}, {label} {size_mib} MiB model"),
            Target::Faster(3.0),
        )?);
    }
    drop(slow);

    println!("bench: memory, {big_mib} MiB model");
    let big = work.join("big");
    fs::create_dir_all(&big)?;
    measure::write_random(&big.join("model.safetensors"), big_mib << 20, 21)?;
    let big_ref = format!("{host}/bench/big:v1");
    mp(&["build", big.to_str().unwrap_or_default(), "-t", &big_ref])?;
    let _ = fs::remove_file(big.join("model.safetensors"));
    let push_big = timed(1, &[], |_| {
        store_command(bin, &store, &["push", "--plain-http", &big_ref])
    })?;
    let pull_big = timed(1, &[&pull_store], |_| our_pull(&big_ref))?;
    let _ = fs::remove_dir_all(&pull_store);
    let mem_row = |what: String, small: &Sample, large: &Sample| {
        let (a, b) = (
            small.max_rss_kib as f64 / 1024.0,
            large.max_rss_kib as f64 / 1024.0,
        );
        Row {
            target: "<= 128 MiB, flat".into(),
            pass: b <= 128.0 && a <= 128.0 && b <= a * 1.5 + 8.0,
            ..Row::within_mib(
                what,
                format!("{a:.0} MiB ({size_mib} MiB) / {b:.0} MiB ({big_mib} MiB)"),
                b,
                128,
            )
        }
    };
    rows.push(mem_row("push peak memory".into(), &push_ours, &push_big));
    rows.push(mem_row("pull peak memory".into(), &pull_ours, &pull_big));
    rows.extend(bench_mount(
        bin,
        work,
        &registry,
        (&single_ref, size_mib),
        Some(&pull_ours),
        runs,
    )?);
    rows.push(bench_mount_memory(bin, work, &big_ref, big_mib)?);
    Ok(rows)
}

/// The mount's status at `dir` (`.modelpack-status`) and, in it, the entry of `path`.
fn file_status(dir: &Path, path: &str) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let status: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(".modelpack-status"))?)?;
    let file = status["files"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["path"] == path)
        .cloned()
        .unwrap_or_default();
    Ok((status, file))
}

/// Waits until the mount at `dir` reports `path` 100% local and no longer open (the kernel
/// releases a closed file asynchronously; a re-open before that shares the page-cache open).
fn wait_fully_local(dir: &Path, path: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, file) = file_status(dir, path)?;
        let local = file["local"].as_f64().unwrap_or_default();
        let open = file["openCached"].as_u64().unwrap_or(0);
        if local >= 100.0 && open == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{path} is not fully cached after a whole read: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// True when the mount at `dir` reports an open of `path` in kernel passthrough.
fn open_in_passthrough(dir: &Path, path: &str) -> anyhow::Result<bool> {
    let (_, file) = file_status(dir, path)?;
    Ok(file["openPassthrough"].as_u64().is_some_and(|n| n > 0))
}

/// A running `modelpack mount`, stopped by PID (SIGTERM unmounts) when dropped.
pub(crate) struct MountProcess {
    pub(crate) child: std::process::Child,
    pub(crate) dir: PathBuf,
}

impl MountProcess {
    pub(crate) fn start(
        bin: &Path,
        store: &Path,
        reference: &str,
        dir: &Path,
    ) -> anyhow::Result<MountProcess> {
        fs::create_dir_all(dir)?;
        let child = store_command(bin, store, &["-q", "mount", reference])
            .arg(dir)
            .arg("--plain-http")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mount = MountProcess {
            child,
            dir: dir.to_owned(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if mounted(dir) {
                return Ok(mount);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        anyhow::bail!("{} did not mount", dir.display())
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        let _ = signal_pid(self.child.id(), Signal::TERM);
        let _ = self.child.wait();
        if mounted(&self.dir) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .status();
        }
    }
}

fn mounted(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap_or_default()))
    })
}

/// Reads a whole file in 1 MiB pieces; returns the time it took.
pub(crate) fn read_all(path: &Path) -> anyhow::Result<std::time::Duration> {
    read_all_in(path, 1 << 20)
}

/// Reads a whole file in pieces of `piece` bytes; returns the time it took.
fn read_all_in(path: &Path, piece: usize) -> anyhow::Result<std::time::Duration> {
    use std::io::Read as _;
    let started = std::time::Instant::now();
    let mut file = fs::File::open(path)?;
    let mut buf = vec![0u8; piece];
    while file.read(&mut buf)? > 0 {}
    Ok(started.elapsed())
}

/// Timed reads of a warm file per run (their median counts): a warm read of 1 GiB takes tens
/// of milliseconds, where one read alone is mostly noise.
const WARM_READS: usize = 3;

/// The read size of `cat`, `cp` and `sha256sum`: the kernel's readahead then asks the mount for
/// ranges that do not start on its chunks.
const SMALL_READ: usize = 128 << 10;

fn median_duration(mut v: Vec<std::time::Duration>) -> std::time::Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn bench_lazy(
    bin: &Path,
    work: &Path,
    registry: &modelpack_testkit::registry::Registry,
    (single_ref, size_mib): (&str, u64),
    full_pull: &Sample,
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    println!("bench: lazy mount");
    // Everything through a counting proxy (no latency, no cap), so fetched bytes are measured.
    let proxy = modelpack_testkit::link::Link::start(registry.port, None);
    let via = single_ref.replacen(&registry.host(), &proxy.host(), 1);
    let weight = "model.safetensors";
    let mut first = Vec::new();
    let mut one_mib = Vec::new();
    let mut cold = Vec::new();
    let mut cold_small_reads = Vec::new();
    let mut warm = Vec::new();
    let mut passthrough = Vec::new();
    // The machine's limit for the cold read: one ranged `curl` of the blob into a file.
    let weight_url = blob_url(single_ref, &layer_digests(bin, single_ref)?[0]);
    let curl_file = work.join("curl-ranged");
    let ranged_curl = || {
        let mut c = Command::new("curl");
        c.args(["-s", "-f", "-H", "Range: bytes=0-", "-o"])
            .arg(&curl_file)
            .arg(&weight_url);
        timed_once(&[&curl_file], c)
    };
    let mut curl = Vec::new();
    for run in 0..runs {
        let store = work.join(format!("mount-store-{run}"));
        let _ = fs::remove_dir_all(&store);
        let dir = work.join("mnt");
        measure::sync();
        // Timings go straight to the registry, as the pull they are compared with does; only
        // the byte count below goes through the counting proxy.
        let started = std::time::Instant::now();
        let mount = MountProcess::start(bin, &store, single_ref, &dir)?;
        let mut file = fs::File::open(dir.join(weight))?;
        let mut buf = vec![0u8; 4096];
        file.read_exact(&mut buf)?;
        first.push(started.elapsed());
        drop(file);
        drop(mount);
        // A fresh mount and cache: one 1 MiB read in the middle (no readahead for a lone read).
        let _ = fs::remove_dir_all(&store);
        let mount = MountProcess::start(bin, &store, &via, &dir)?;
        let before = proxy.served();
        let mut file = fs::File::open(dir.join(weight))?;
        let mut mib = vec![0u8; 1 << 20];
        file.seek(SeekFrom::Start((size_mib / 2) << 20))?;
        file.read_exact(&mut mib)?;
        one_mib.push(proxy.served() - before);
        drop(file);
        drop(mount);
        // Cold: a fresh mount and cache, the whole weight in order; the ranged curl before it
        // in odd runs, after it in even ones.
        let _ = fs::remove_dir_all(&store);
        if run % 2 == 1 {
            curl.push(ranged_curl()?);
        }
        measure::sync();
        let mount = MountProcess::start(bin, &store, single_ref, &dir)?;
        cold.push(read_all(&dir.join(weight))?);
        if run % 2 == 0 {
            curl.push(ranged_curl()?);
        }
        // Warm: once the mount reports the weight fully cached and the cold reader's handle
        // released, read it again (kernel passthrough when the mount offers it).
        wait_fully_local(&dir, weight)?;
        // The cache file was just written: let its writeback finish first, and read it once
        // untimed, as the local file it is compared with is. Then the median of three reads,
        // as for the local file: a page read once may still be reclaimed first on a machine
        // whose memory is full of page cache, one read more often is not.
        measure::sync();
        let _ = read_all(&dir.join(weight))?;
        let mut reads = Vec::with_capacity(WARM_READS);
        for _ in 0..WARM_READS {
            let started = std::time::Instant::now();
            let mut file = fs::File::open(dir.join(weight))?;
            if reads.is_empty() {
                passthrough.push(open_in_passthrough(&dir, weight)?);
            }
            let mut buf = vec![0u8; 1 << 20];
            while file.read(&mut buf)? > 0 {}
            reads.push(started.elapsed());
        }
        warm.push(median_duration(reads));
        drop(mount);
        let _ = fs::remove_dir_all(&store);
        // Cold again, read as `cat` reads.
        measure::sync();
        let mount = MountProcess::start(bin, &store, single_ref, &dir)?;
        cold_small_reads.push(read_all_in(&dir.join(weight), SMALL_READ)?);
        drop(mount);
        let _ = fs::remove_dir_all(&store);
    }
    // Local disk, page cache warm: the same bytes from the bench's own copy.
    let local_file = work.join("single").join(weight);
    let _ = read_all(&local_file)?;
    let local = median_duration(
        (0..runs.max(WARM_READS))
            .map(|_| read_all(&local_file))
            .collect::<anyhow::Result<_>>()?,
    );
    let (first, cold, cold_small_reads, warm) = (
        median_duration(first),
        median_duration(cold),
        median_duration(cold_small_reads),
        median_duration(warm),
    );
    one_mib.sort_unstable();
    let fetched = one_mib.get(one_mib.len() / 2).copied().unwrap_or(0);
    let _ = fs::remove_file(&curl_file);
    let curl = measure::median(&curl).wall;
    let full_pull_label = "full `modelpack pull`";
    Ok(vec![
        Row {
            ours: format!("{:.3} s", first.as_secs_f64()),
            ..seconds_row(
                format!("mount: first 4 KiB of a {size_mib} MiB weight (from starting `mount`)"),
                first,
                full_pull.wall,
                full_pull_label,
            )
            .at_most(0.05)
        },
        fetched_row(
            format!(
                "mount: bytes fetched to read 1 MiB at offset {} MiB",
                size_mib / 2
            ),
            fetched,
            4,
        ),
        seconds_row(
            format!("mount: cold sequential read of the {size_mib} MiB weight"),
            cold,
            full_pull.wall,
            full_pull_label,
        )
        .at_most(1.3),
        seconds_row(
            format!(
                "mount: cold sequential read of the {size_mib} MiB weight, against the machine's limit"
            ),
            cold,
            curl,
            "ranged `curl -o file` of the blob, `Range: bytes=0-`",
        ),
        seconds_row(
            format!(
                "mount: cold sequential read of the {size_mib} MiB weight in {} KiB reads (as `cat` and `cp` read)",
                SMALL_READ >> 10
            ),
            cold_small_reads,
            full_pull.wall,
            full_pull_label,
        ),
        Row {
            target: "<= 1.25 (>= 0.8x local speed)".into(),
            ..Row::info(
                format!(
                    "mount: warm re-read of the {size_mib} MiB weight, once fully cached (after one untimed re-read; median of 3 reads)"
                ),
                secs(warm),
                format!(
                    "{} (local disk, page cache warm); kernel passthrough in {} of {} runs",
                    secs(local),
                    passthrough.iter().filter(|&&p| p).count(),
                    passthrough.len()
                ),
                warm.as_secs_f64() / local.as_secs_f64(),
            )
            .at_most(1.25)
        },
    ])
}

/// Peak memory of the mount process while a reader streams the `big_mib` MiB model.
fn bench_mount_memory(bin: &Path, work: &Path, big_ref: &str, big_mib: u64) -> anyhow::Result<Row> {
    let weight = "model.safetensors";
    let store = work.join("mount-store-big");
    let _ = fs::remove_dir_all(&store);
    let dir = work.join("mnt");
    let mount = MountProcess::start(bin, &store, big_ref, &dir)?;
    let pid = mount.child.id();
    let reader = {
        let path = dir.join(weight);
        std::thread::spawn(move || read_all(&path))
    };
    let mut peak = 0;
    while !reader.is_finished() {
        peak = peak.max(measure::vm_hwm_kib(pid).unwrap_or(0));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    peak = peak.max(measure::vm_hwm_kib(pid).unwrap_or(0));
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread failed"))??;
    drop(mount);
    let _ = fs::remove_dir_all(&store);
    let mib = peak as f64 / 1024.0;
    Ok(Row::within_mib(
        format!("mount peak memory while reading a {big_mib} MiB model"),
        format!("{mib:.0} MiB"),
        mib,
        128,
    ))
}

/// Shards of the header-read model, and the size of each (MiB).
const SHARDS: u64 = 8;
const SHARD_MIB: u64 = 128;

/// Writes a model of [`SHARDS`] safetensors-shaped weights of about `shard_mib` MiB each into
/// `dir`: an 8-byte little-endian header length, a JSON header naming 1 MiB BF16 tensors (padded
/// with spaces to a multiple of 8, as safetensors does), then the tensors' bytes.
fn make_shards_model(dir: &Path, shard_mib: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    fs::create_dir_all(dir)?;
    let tensors = shard_mib.saturating_sub(1).max(1);
    for shard in 0..SHARDS {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        for t in 0..tensors {
            header.insert(
                format!("model.layers.{shard}.mlp.part_{t:03}.weight"),
                serde_json::json!({
                    "dtype": "BF16",
                    "shape": [512, 1024],
                    "data_offsets": [t << 20, (t + 1) << 20],
                }),
            );
        }
        let mut json = serde_json::to_vec(&header)?;
        json.resize(json.len().next_multiple_of(8), b' ');
        let path = dir.join(format!("model-{:05}-of-{SHARDS:05}.safetensors", shard + 1));
        let size = 8 + json.len() as u64 + (tensors << 20);
        measure::write_random(&path, size, 700 + shard)?;
        let file = fs::OpenOptions::new().write(true).open(&path)?;
        file.write_all_at(&(json.len() as u64).to_le_bytes(), 0)?;
        file.write_all_at(&json, 8)?;
    }
    fs::write(dir.join("config.json"), br#"{"model_type":"bench"}"#)?;
    Ok(())
}

/// Reads a safetensors header as a loader does: 8 bytes of length, then the JSON header of
/// that length, which must parse.
fn read_safetensors_header(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let file = fs::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0)?;
    let len = u64::from_le_bytes(len);
    anyhow::ensure!(
        len <= 100 << 20,
        "{}: header of {len} bytes",
        path.display()
    );
    let mut json = vec![0u8; usize::try_from(len)?];
    file.read_exact_at(&mut json, 8)?;
    serde_json::from_slice::<serde_json::Value>(&json)
        .with_context(|| format!("{}: header is not JSON", path.display()))?;
    Ok(())
}

/// What `proxy` has served once it has served nothing new for half a second (readahead a read
/// started runs after its reply), waiting at most 20 s.
fn served_when_quiet(proxy: &modelpack_testkit::link::Link) -> u64 {
    let quiet = std::time::Duration::from_millis(500);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut seen = (proxy.served(), std::time::Instant::now());
    while seen.1.elapsed() < quiet && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let served = proxy.served();
        if served != seen.0 {
            seen = (served, std::time::Instant::now());
        }
    }
    seen.0
}

/// Median over `runs` fresh mounts (through a counting proxy, in fresh stores) of `reference`
/// of the bytes fetched by `read` of the mounted folder, readahead included.
fn fetched_by(
    bin: &Path,
    work: &Path,
    registry: &modelpack_testkit::registry::Registry,
    reference: &str,
    runs: usize,
    read: impl Fn(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let proxy = modelpack_testkit::link::Link::start(registry.port, None);
    let via = reference.replacen(&registry.host(), &proxy.host(), 1);
    let store = work.join("headers-store");
    let mut fetched = Vec::new();
    for _ in 0..runs {
        let _ = fs::remove_dir_all(&store);
        let mount = MountProcess::start(bin, &store, &via, &work.join("mnt"))?;
        let before = served_when_quiet(&proxy);
        read(&mount.dir)?;
        fetched.push(served_when_quiet(&proxy) - before);
        drop(mount);
    }
    let _ = fs::remove_dir_all(&store);
    fetched.sort_unstable();
    Ok(fetched.get(fetched.len() / 2).copied().unwrap_or(0))
}

/// A row of bytes fetched against a limit in MiB.
fn fetched_row(what: String, fetched: u64, limit_mib: u64) -> Row {
    let mib = fetched as f64 / (1 << 20) as f64;
    Row::within_mib(what, format!("{mib:.2} MiB"), mib, limit_mib)
}

/// What a loader's first look costs through a cold mount: a 4 KiB read at offset 0 of the
/// single weight, and the safetensors headers of [`SHARDS`] shards.
fn bench_headers(
    bin: &Path,
    work: &Path,
    registry: &modelpack_testkit::registry::Registry,
    (single_ref, size_mib): (&str, u64),
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    use std::io::Read as _;
    println!("bench: header reads through a cold mount");
    let weight = "model.safetensors";
    let first_4k = fetched_by(bin, work, registry, single_ref, runs, |dir| {
        let mut buf = vec![0u8; 4096];
        fs::File::open(dir.join(weight))?.read_exact(&mut buf)?;
        Ok(())
    })?;
    let shards = work.join("shards");
    make_shards_model(&shards, SHARD_MIB)?;
    let shards_ref = format!("{}/bench/shards:v1", registry.host());
    let store = work.join("shards-store");
    let dir = shards.to_str().unwrap_or_default();
    modelpack(bin, &store, &["build", dir, "-t", &shards_ref])?;
    modelpack(bin, &store, &["push", &shards_ref, "--plain-http"])?;
    let _ = fs::remove_dir_all(&store);
    let _ = fs::remove_dir_all(&shards);
    let headers = fetched_by(bin, work, registry, &shards_ref, runs, |dir| {
        (1..=SHARDS).try_for_each(|i| {
            read_safetensors_header(&dir.join(format!("model-{i:05}-of-{SHARDS:05}.safetensors")))
        })
    })?;
    Ok(vec![
        fetched_row(
            format!(
                "mount: bytes fetched by a 4 KiB read at offset 0 of a cold {size_mib} MiB weight"
            ),
            first_4k,
            4,
        ),
        fetched_row(
            format!(
                "mount: bytes fetched reading the safetensors headers of {SHARDS} cold {SHARD_MIB} MiB shards"
            ),
            headers,
            32,
        ),
    ])
}

/// `--only mount` and `--only headers`: a registry with the single-weight model pushed, then
/// the mount rows with the full pull they are compared with (`mount`), or only the header-read
/// rows (`headers`). The big-model memory row is left to the full run.
fn bench_mount_only(s: &Suite, work: &Path, mount_rows: bool) -> anyhow::Result<Vec<Row>> {
    let Suite {
        bin,
        size_mib,
        runs,
        ..
    } = *s;
    let (registry, single_ref) = push_single(bin, work, size_mib)?;
    let pull = if mount_rows {
        println!("bench: pull {size_mib} MiB");
        let pull_store = work.join("pull-store");
        let pull = timed(runs, &[&pull_store], |_| {
            pull_command(bin, &pull_store, &single_ref)
        })?;
        let _ = fs::remove_dir_all(&pull_store);
        Some(pull)
    } else {
        None
    };
    bench_mount(
        bin,
        work,
        &registry,
        (&single_ref, size_mib),
        pull.as_ref(),
        runs,
    )
}

/// The lazy-mount rows of the single weight: [`bench_lazy`]'s when the full pull they are
/// compared with is given, then the header-read rows.
fn bench_mount(
    bin: &Path,
    work: &Path,
    registry: &modelpack_testkit::registry::Registry,
    single: (&str, u64),
    full_pull: Option<&Sample>,
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = match full_pull {
        Some(pull) => bench_lazy(bin, work, registry, single, pull, runs)?,
        None => Vec::new(),
    };
    rows.extend(bench_headers(bin, work, registry, single, runs)?);
    Ok(rows)
}

/// The containerd rows (root only: containerd, mounts, runc).
fn bench_containerd(size_mib: u64, runs: usize) -> anyhow::Result<Vec<Row>> {
    if !modelpack_testkit::sys::is_root() {
        println!("bench: not root, containerd rows skipped");
        return Ok(Vec::new());
    }
    let mut rows = Vec::new();
    for version in crate::containerd::Version::ALL {
        // The 1.6 rows keep their names (the table of record's history); 2.x says its version.
        let name = match version {
            crate::containerd::Version::V1_6 => "containerd".to_owned(),
            other => format!("containerd {}.x", other.name()),
        };
        println!("bench: {name}, lazy vs full ({size_mib} MiB, {runs} runs)");
        let t = crate::bench_containerd::run(
            &crate::e2e::Bins::of("release"),
            version,
            size_mib,
            runs,
        )?;
        rows.push(
            seconds_row(
                format!(
                    "{name}: pull to a container reading config.json, {size_mib} MiB model (lazy vs `modelpack pull -o` + bind)"
                ),
                t.lazy,
                t.full,
                "full pull + bind",
            )
            .at_most(0.1),
        );
        rows.push(seconds_row(
            format!("{name}: same, against `ctr content fetch` of the artifact ({size_mib} MiB)"),
            t.lazy,
            t.content_fetch,
            "ctr content fetch, no container",
        ));
        rows.push(seconds_row(
            format!(
                "{name}: container reading config.json lazily vs the same container reading a local folder ({size_mib} MiB)"
            ),
            t.lazy,
            t.local,
            "a local copy of the model, bind-mounted",
        ));
    }
    Ok(rows)
}

/// The parts `--only` can name.
const ONLY: [&str; 5] = ["transfer", "small", "containerd", "mount", "headers"];

/// What one run of the suite measures, and with what.
struct Suite<'a> {
    bin: &'a Path,
    size_mib: u64,
    runs: usize,
    big_mib: u64,
    /// The small-file model (generated once for every repeat) and its file count.
    small: (&'a Path, usize),
    only: Option<&'a str>,
}

/// The rows of `part` working in `dir`, which is removed after.
fn in_scratch(
    dir: &Path,
    part: impl FnOnce(&Path) -> anyhow::Result<Vec<Row>>,
) -> anyhow::Result<Vec<Row>> {
    let rows = part(dir)?;
    let _ = fs::remove_dir_all(dir);
    Ok(rows)
}

/// Every row of one run of the suite (or of its `--only` part), working in `work`.
fn run_suite(s: &Suite, work: &Path) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    if s.only.is_none() {
        println!("bench: build ({} MiB, {} runs)", s.size_mib, s.runs);
        rows.extend(in_scratch(&work.join("build"), |dir| {
            bench_build(s.bin, dir, s.size_mib, s.runs)
        })?);
    }
    if matches!(s.only, None | Some("transfer")) {
        rows.extend(in_scratch(&work.join("transfer"), |dir| {
            bench_transfer(s, dir)
        })?);
    }
    if matches!(s.only, None | Some("small")) {
        let (model, files) = s.small;
        rows.extend(in_scratch(&work.join("small"), |dir| {
            crate::bench_small::bench(s.bin, dir, model, files, s.runs)
        })?);
    }
    match s.only {
        None | Some("containerd") => rows.extend(bench_containerd(s.size_mib, s.runs)?),
        Some(which @ ("mount" | "headers")) => {
            rows.extend(bench_mount_only(s, &work.join("mount"), which == "mount")?);
        }
        Some(_) => {}
    }
    Ok(rows)
}

/// One row of the table of record: a row's runs over the repeats of the suite.
struct Aggregate {
    what: String,
    ours: String,
    theirs: String,
    ratio: f64,
    ratio_min: f64,
    ratio_max: f64,
    target: String,
    /// Runs that met the target, of how many; `None` for a row without a target.
    met: Option<(usize, usize)>,
    pass: bool,
}

/// The leading number of a measured text ("1.16 s (28 MiB RSS)" is 1.16), to order the texts
/// of one row's runs; text without one sorts first.
fn leading_number(text: &str) -> f64 {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    text[..end].parse().unwrap_or(f64::NEG_INFINITY)
}

/// The text whose leading number is the median of `texts` (the upper one of an even count, as
/// [`measure::median`] takes).
fn median_text(mut texts: Vec<&str>) -> &str {
    texts.sort_by(|a, b| leading_number(a).total_cmp(&leading_number(b)));
    texts.get(texts.len() / 2).copied().unwrap_or("-")
}

/// Runs of `n` that must meet a target for the row to count as met: two thirds, rounded up.
fn needed(n: usize) -> usize {
    (2 * n).div_ceil(3)
}

/// Groups the rows of every repeat by their `what` (the k-th row of a name in a repeat with the
/// k-th of the others: the table has rows of one name against different comparisons), in the
/// order they first appear. A row is met when its median-ratio run met the target and at least
/// [`needed`] of its runs did.
fn aggregate(repeats: &[Vec<Row>]) -> Vec<Aggregate> {
    let mut keys: Vec<(String, usize)> = Vec::new();
    let mut groups: Vec<Vec<&Row>> = Vec::new();
    for rows in repeats {
        let mut seen: Vec<&str> = Vec::new();
        for r in rows {
            let nth = seen.iter().filter(|w| **w == r.what).count();
            seen.push(&r.what);
            let key = (r.what.clone(), nth);
            match keys.iter().position(|k| *k == key) {
                Some(i) => groups[i].push(r),
                None => {
                    keys.push(key);
                    groups.push(vec![r]);
                }
            }
        }
    }
    groups
        .into_iter()
        .map(|runs| {
            let mut by_ratio = runs.clone();
            by_ratio.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
            let median = by_ratio[by_ratio.len() / 2];
            let n = runs.len();
            let met_runs = runs.iter().filter(|r| r.pass).count();
            let has_target = median.target != "-";
            Aggregate {
                what: median.what.clone(),
                ours: median_text(runs.iter().map(|r| r.ours.as_str()).collect()).to_owned(),
                theirs: median_text(runs.iter().map(|r| r.theirs.as_str()).collect()).to_owned(),
                ratio: median.ratio,
                ratio_min: by_ratio[0].ratio,
                ratio_max: by_ratio[n - 1].ratio,
                target: median.target.clone(),
                met: has_target.then_some((met_runs, n)),
                pass: median.pass && met_runs >= needed(n),
            }
        })
        .collect()
}

/// The markdown table of `rows`.
fn table(rows: &[Aggregate]) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| what | modelpack (median) | comparison (median) | ratio median | ratio min-max | target | met (runs met / N) |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            None => "-".to_owned(),
            Some((m, n)) => format!("{} ({m}/{n})", if r.pass { "yes" } else { "**no**" }),
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {:.2} | {:.2}-{:.2} | {} | {met} |",
            r.what, r.ours, r.theirs, r.ratio, r.ratio_min, r.ratio_max, r.target
        );
    }
    table
}

/// Disk one run of the suite holds at its peak, in MiB: the big model as its source folder, in
/// the registry and in two stores; the single-weight model about five times over; a GiB for the
/// rest (small files, containerd's content store).
fn suite_needs_mib(size_mib: u64, big_mib: u64) -> u64 {
    4 * big_mib + 5 * size_mib + 1024
}

/// Free space of the file system holding `path`, in MiB (`df`).
fn free_mib(path: &Path) -> anyhow::Result<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-BM"])
        .arg(path)
        .output()
        .context("df")?;
    anyhow::ensure!(out.status.success(), "df {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().trim_end_matches('M').parse().ok())
        .with_context(|| format!("df {}: no free space in its answer", path.display()))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let size_mib: u64 = crate::flag_value(args, "--size-mib")?.unwrap_or(1024);
    let runs: usize = crate::flag_value(args, "--runs")?.unwrap_or(5);
    let big_mib: u64 = crate::flag_value(args, "--big-mib")?.unwrap_or(4096);
    let repeat: usize = crate::flag_value(args, "--repeat")?.unwrap_or(1);
    let small_files: usize =
        crate::flag_value(args, "--small-files")?.unwrap_or(crate::bench_small::FILES);
    anyhow::ensure!(
        repeat >= 1 && runs >= 1,
        "--repeat and --runs need at least 1"
    );
    // `--only transfer|small|containerd|mount|headers` runs just those rows and prints them
    // (the table of record is not touched).
    let only: Option<String> = crate::flag_value(args, "--only")?;
    if let Some(other) = only.as_deref().filter(|o| !ONLY.contains(o)) {
        anyhow::bail!("--only knows {}, not {other:?}", ONLY.join(", "));
    }
    let (bin, work) = crate::release_build("bench")?;
    fs::create_dir_all(&work)?;
    if only.is_none() {
        // Said at once rather than found out half an hour in, when a pull runs out of room.
        let (need, free) = (suite_needs_mib(size_mib, big_mib), free_mib(&work)?);
        anyhow::ensure!(
            free >= need,
            "{} has {free} MiB free; one run of the suite needs about {need} MiB",
            work.display()
        );
    }

    let small_model = work.join("small-model");
    if matches!(only.as_deref(), None | Some("small")) {
        crate::bench_small::make_model(&small_model, small_files)?;
    }
    let suite = Suite {
        bin: &bin,
        size_mib,
        runs,
        big_mib,
        small: (&small_model, small_files),
        only: only.as_deref(),
    };
    let mut repeats = Vec::new();
    for k in 0..repeat {
        println!("bench: suite run {} of {repeat}", k + 1);
        let dir = work.join(format!("repeat-{k}"));
        repeats.push(run_suite(&suite, &dir)?);
        let _ = fs::remove_dir_all(&dir);
    }

    let table = table(&aggregate(&repeats));
    print!("{table}");
    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let doc = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench --repeat {repeat}` (do not edit by hand). The whole suite ran \
{repeat} times; in each, every row is the median of {runs} runs, our command and the comparison alternating, \
page cache warm for both, `sync` between runs. Ratio = modelpack / comparison (for memory: peak RSS / target). \
Per row: the median of the {repeat} suite runs (times and ratio), the range of their ratios, and met = the \
median-ratio run met the target and at least {needed} of the {repeat} runs did. Rows \"against the machine's \
limit\" compare with plain tools moving the same bytes. In the rows of 2,001 small files, each \
run's outputs are moved aside and deleted after the last of those rows, not deleted before the next \
run: this machine's root is ext4 without a journal, where an inode freed in the last 30 s is skipped \
one by one at the next allocation, so a deletion put seconds into whichever run followed it, ours or \
the comparison's.\n\nMachine: {machine}.\n\n{table}",
        needed = needed(repeat)
    );
    if only.is_some() {
        return Ok(());
    }
    let path = crate::root().join("docs/benchmarks.md");
    fs::create_dir_all(crate::root().join("docs"))?;
    fs::write(&path, doc).with_context(|| format!("write {}", path.display()))?;
    println!("bench: wrote {}", path.display());
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(what: &str, ours: &str, ratio: f64, target: &str) -> Row {
        Row {
            what: what.into(),
            ours: ours.into(),
            theirs: format!("{:.2} s (x)", 1.0 / ratio),
            ratio,
            target: target.into(),
            pass: target == "-" || ratio <= 0.5,
        }
    }

    #[test]
    fn aggregates_by_name_and_occurrence() {
        let repeats = vec![
            vec![
                r("a", "1.00 s", 0.4, "<= 0.5"),
                r("a", "9.00 s", 0.9, "-"),
                r("b", "2.00 s", 0.6, "<= 0.5"),
            ],
            vec![
                r("a", "3.00 s", 0.45, "<= 0.5"),
                r("a", "8.00 s", 0.8, "-"),
                r("b", "2.50 s", 0.3, "<= 0.5"),
            ],
            vec![
                r("a", "2.00 s", 0.7, "<= 0.5"),
                r("a", "7.00 s", 0.7, "-"),
                r("b", "1.50 s", 0.2, "<= 0.5"),
            ],
        ];
        let rows = aggregate(&repeats);
        assert_eq!(rows.len(), 3);
        let a = &rows[0];
        assert_eq!((a.ratio, a.ratio_min, a.ratio_max), (0.45, 0.4, 0.7));
        assert_eq!(a.ours, "2.00 s");
        assert_eq!(a.met, Some((2, 3)));
        assert!(a.pass);
        assert_eq!(rows[1].met, None);
        assert_eq!(rows[1].ours, "8.00 s");
        // b: median 0.3 meets, and 2 of 3 runs did.
        assert!(rows[2].pass);
        assert_eq!(rows[2].met, Some((2, 3)));
        let t = table(&rows);
        assert!(t.contains("| a | 2.00 s | 2.22 s (x) | 0.45 | 0.40-0.70 | <= 0.5 | yes (2/3) |"));
        assert!(t.contains("| 0.70-0.90 | - | - |"));
    }

    #[test]
    fn met_needs_the_median_and_two_thirds() {
        assert_eq!((needed(1), needed(2), needed(3), needed(5)), (1, 2, 2, 4));
        // Median passes but only 1 of 3 runs: not met.
        let repeats: Vec<Vec<Row>> = [0.4, 0.6, 0.7]
            .iter()
            .map(|&x| vec![r("c", "1 s", x, "<= 0.5")])
            .collect();
        assert!(!aggregate(&repeats)[0].pass);
        let one = aggregate(&[vec![r("c", "1 s", 0.4, "<= 0.5")]]);
        assert!(one[0].pass);
        assert_eq!(one[0].met, Some((1, 1)));
    }
}
