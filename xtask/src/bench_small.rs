//! The many-small-files rows of `cargo xtask bench`: a model of [`FILES`] files of 2 KiB each
//! (random bytes, a few subfolders), pulled (`pull -o`, `pull`) and pushed against oras-py,
//! and read whole through a fresh `modelpack mount` against `pull -o`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::bench::{
    Case, MountProcess, ORAS_PULL, Row, Side, Target, compare, modelpack, row, timed_once,
};
use crate::measure::{self, Sample};

/// Files of the small-file model (2,000 in subfolders, plus `config.json`).
pub const FILES: usize = 2001;
/// Size of each generated file.
const FILE_SIZE: u64 = 2 << 10;
/// Subfolders the generated files are spread over.
const FOLDERS: usize = 4;

/// oras-py's push of every file under a folder (paths relative to it, as `oras push` takes them).
const ORAS_PUSH: &str = "import os, sys, oras.client\nc = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)\nos.chdir(sys.argv[3])\nfiles = sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs)\nc.push(target=sys.argv[2], files=files)\n";

/// Writes the small-file model into `dir`: `config.json` and `files - 1` files of 2 KiB of
/// seeded random bytes over [`FOLDERS`] subfolders.
pub fn make_model(dir: &Path, files: usize) -> anyhow::Result<()> {
    for f in 0..FOLDERS {
        fs::create_dir_all(dir.join(format!("part-{f}")))?;
    }
    for i in 0..files.saturating_sub(1) {
        let path = dir.join(format!("part-{}/chunk-{i:05}.bin", i % FOLDERS));
        measure::write_random(&path, FILE_SIZE, 10_000 + i as u64)?;
    }
    fs::write(dir.join("config.json"), br#"{"model_type":"bench-small"}"#)?;
    Ok(())
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

/// Reads every file under `dir` once, whole; returns how many there were.
fn read_every_file(dir: &Path) -> anyhow::Result<usize> {
    let files = files_under(dir)?;
    for f in &files {
        fs::read(f)?;
    }
    Ok(files.len())
}

/// The small-file rows against a fresh registry under `work`, for the model generated in
/// `model` with `files` files.
pub fn bench(
    bin: &Path,
    work: &Path,
    model: &Path,
    files: usize,
    runs: usize,
) -> anyhow::Result<Vec<Row>> {
    let kib = FILE_SIZE >> 10;
    println!("bench: many small files ({files} x {kib} KiB, {runs} runs)");
    let registry = crate::services::registry(&work.join("registry"))?;
    let host = registry.host();
    let python = crate::setup::oras_venv().join("bin/python");
    let store = work.join("store");
    let _aside = crate::bench::SetAside::new(work.join("set-aside"))?;
    let reference = format!("{host}/bench/small:v1");
    let model_arg = model.to_str().unwrap_or_default();
    modelpack(bin, &store, &["build", "-q", model_arg, "-t", &reference])?;
    modelpack(bin, &store, &["push", "-q", &reference, "--plain-http"])?;
    let label = format!("{files} x {kib} KiB files");

    let oras_out = work.join("oras-out");
    let oras_pull = || {
        let mut c = Command::new(&python);
        c.args(["-c", ORAS_PULL, &host, &reference]).arg(&oras_out);
        c
    };
    let folder_store = work.join("folder-store");
    let folder = work.join("folder-out");
    let pull_o = || crate::bench::pull_o_command(bin, &folder_store, &reference, &folder);
    let pull_store = work.join("pull-store");
    let oras: Side = (&[&oras_out], &|_| oras_pull());
    let mut rows = compare(
        runs,
        [
            Case {
                what: format!("pull -o {label} (into a folder)"),
                against: ("oras-py", Target::AtMost(0.4)),
                ours: (&[&folder_store, &folder], &|_| pull_o()),
                theirs: oras,
            },
            Case {
                what: format!("pull {label} (into the store)"),
                against: ("oras-py", Target::AtMost(0.4)),
                ours: (&[&pull_store], &|_| {
                    crate::bench::pull_command(bin, &pull_store, &reference)
                }),
                theirs: oras,
            },
            Case {
                what: format!("push {label}"),
                against: ("oras-py", Target::AtMost(0.4)),
                ours: (&[], &|run| {
                    let to = format!("{host}/small-ours-{run}/m:v1");
                    crate::bench::push_from_command(bin, &store, &reference, &to)
                }),
                theirs: (&[], &|run| {
                    let mut c = Command::new(&python);
                    c.args([
                        "-c",
                        ORAS_PUSH,
                        &host,
                        &format!("{host}/small-oras-{run}/m:v1"),
                    ])
                    .arg(model);
                    c
                }),
            },
        ],
    )?;

    // The machine's limit for the same requests: one `curl` with 8 transfers in flight over
    // kept-alive connections, every layer blob into a file of a folder (no verification, no
    // manifest), against `pull -o`.
    let curl_dir = work.join("curl-out");
    let curl_config = work.join("curl-small.cfg");
    let lines: String = crate::bench::layer_digests(bin, &reference)?
        .iter()
        .map(|d| {
            let url = crate::bench::blob_url(&reference, d);
            let file = curl_dir.join(d.trim_start_matches("sha256:"));
            format!("url = \"{url}\"\noutput = \"{}\"\n", file.display())
        })
        .collect();
    fs::write(&curl_config, lines)?;
    let (ours, curl) = crate::bench::timed_pair(
        runs,
        (&[&folder_store, &folder], |_| pull_o()),
        (&[&curl_dir], |_| {
            let mut c = Command::new("curl");
            c.args([
                "-s",
                "-f",
                "-Z",
                "--parallel-max",
                "8",
                "--create-dirs",
                "-K",
            ])
            .arg(&curl_config);
            c
        }),
    )?;
    let _ = fs::remove_dir_all(&curl_dir);
    rows.push(row(
        format!("pull -o {label}, against the machine's limit"),
        &ours,
        &curl,
        "one `curl -Z --parallel-max 8` of every layer blob into files",
    ));

    // Every file read once through a fresh mount (fresh store, from starting `mount`), against
    // `pull -o` of the same model; alternating.
    let mount_store = work.join("mount-store");
    let mnt = work.join("mnt");
    let (mut mounted, mut pulled) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for pull_turn in [run % 2 == 1, run % 2 == 0] {
            if pull_turn {
                pulled.push(timed_once(&[&folder_store, &folder], pull_o())?);
                continue;
            }
            crate::bench::clear(&mount_store);
            measure::sync();
            let started = Instant::now();
            let mount = MountProcess::start(bin, &mount_store, &reference, &mnt)?;
            let read = read_every_file(&mount.dir)?;
            let wall = started.elapsed();
            let max_rss_kib = measure::vm_hwm_kib(mount.child.id()).unwrap_or(0);
            drop(mount);
            anyhow::ensure!(read == files, "the mount shows {read} files, not {files}");
            mounted.push(Sample { wall, max_rss_kib });
        }
    }
    let _ = fs::remove_dir_all(&mount_store);
    rows.push(
        row(
            format!(
                "mount: read each of {label} once through a fresh mount (from starting `mount`)"
            ),
            &measure::median(&mounted),
            &measure::median(&pulled),
            "`modelpack pull -o`",
        )
        .at_most(2.0),
    );
    for d in [&oras_out, &folder, &folder_store, &pull_store] {
        let _ = fs::remove_dir_all(d);
    }
    Ok(rows)
}
