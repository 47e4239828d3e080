//! `cargo xtask bench`: our commands and their comparisons, side by side in one run, medians of
//! several runs, ratios against targets; the table goes to docs/benchmarks.md.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use xshell::{Shell, cmd};

use crate::measure::{self, Sample};

/// One row of the results table.
struct Row {
    what: String,
    ours: String,
    theirs: String,
    ratio: f64,
    target: String,
    pass: bool,
}

fn secs(s: &Sample) -> String {
    format!("{:.2} s", s.wall.as_secs_f64())
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
    let ratio = o.wall.as_secs_f64() / t.wall.as_secs_f64();
    let rss_mib = o.max_rss_kib as f64 / 1024.0;
    Ok(vec![
        Row {
            what: format!("build {size_mib} MiB model (hash + store)"),
            ours: secs(&o),
            theirs: format!(
                "{} (`cp -r` {} then `sha256sum` {})",
                secs(&t),
                secs(&measure::median(&cps)),
                secs(&measure::median(&sums))
            ),
            ratio,
            target: "<= 0.8".into(),
            pass: ratio <= 0.8,
        },
        Row {
            what: format!("build peak memory, {size_mib} MiB model"),
            ours: format!("{rss_mib:.1} MiB"),
            theirs: "-".into(),
            ratio: rss_mib / 128.0,
            target: "<= 128 MiB".into(),
            pass: rss_mib <= 128.0,
        },
    ])
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let size_mib: u64 = crate::flag_value(args, "--size-mib")?.unwrap_or(1024);
    let runs: usize = crate::flag_value(args, "--runs")?.unwrap_or(5);
    let sh = Shell::new()?;
    sh.change_dir(crate::root());
    cmd!(sh, "cargo build --release --locked -p modelpack-cli").run()?;
    let bin = crate::target_dir().join("release/modelpack");
    let work = crate::target_dir().join("bench");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;

    println!("bench: build ({size_mib} MiB, {runs} runs)");
    let rows = bench_build(&bin, &work, size_mib, runs)?;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| what | modelpack | comparison | ratio | target | met |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {:.2} | {} | {} |",
            r.what,
            r.ours,
            r.theirs,
            r.ratio,
            r.target,
            if r.pass { "yes" } else { "**no**" }
        );
    }
    print!("{table}");
    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let doc = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (do not edit by hand). Medians of {runs} runs, \
our command and the comparison alternating in one run, page cache warm for both, `sync` between runs. \
Ratio = modelpack / comparison (for memory: peak RSS / target).\n\nMachine: {machine}.\n\n{table}"
    );
    let path = crate::root().join("docs/benchmarks.md");
    fs::create_dir_all(crate::root().join("docs"))?;
    fs::write(&path, doc).with_context(|| format!("write {}", path.display()))?;
    println!("bench: wrote {}", path.display());
    let _ = fs::remove_dir_all(&work);
    Ok(())
}
