//! Timing and peak memory of child processes, and generated test data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// What one run of a command cost.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub wall: Duration,
    pub max_rss_kib: u64,
}

/// The child's peak resident set so far (`VmHWM`), in KiB.
///
/// Read from /proc rather than `wait4`'s `ru_maxrss`: a child started with vfork inherits the
/// parent's high-water mark at exec, so `ru_maxrss` would report the parent's memory.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `command` to completion, returning wall time and the child's peak resident memory
/// (sampled every 5 ms; the mark is monotonic, so only the last milliseconds can escape).
pub fn run(command: &mut Command) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let pid = child.id();
    let mut max_rss_kib = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            max_rss_kib = max_rss_kib.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed();
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(Sample { wall, max_rss_kib })
}

/// Median of durations.
pub fn median(samples: &[Sample]) -> Sample {
    let mut walls: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
    walls.sort();
    let max_rss_kib = samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0);
    Sample {
        wall: walls.get(walls.len() / 2).copied().unwrap_or_default(),
        max_rss_kib,
    }
}

/// Writes `size` pseudo-random (incompressible) bytes to `path`, seeded so reruns match.
pub fn write_random(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            chunk.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// Flushes dirty pages so the next run starts from the same state.
pub fn sync() {
    let _ = Command::new("sync").status();
}
