//! Terminal output: progress bars on a terminal (quiet otherwise), sizes and rates for humans,
//! JSON for scripts, and Ctrl-C handling.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static CANCELLED: AtomicBool = AtomicBool::new(false);
static CANCELLABLE: AtomicBool = AtomicBool::new(false);

/// First Ctrl-C: ask a cancellable operation to stop and clean up (or exit at once if none
/// runs); second Ctrl-C: exit at once.
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        if CANCELLABLE.load(Ordering::SeqCst) && !CANCELLED.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopping: cleaning up (Ctrl-C again to exit now)");
            return;
        }
        std::process::exit(130);
    });
}

/// The flag a cancellable operation polls; registering it makes Ctrl-C set it.
pub fn cancel_flag() -> &'static AtomicBool {
    CANCELLABLE.store(true, Ordering::SeqCst);
    &CANCELLED
}

/// True after Ctrl-C.
pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `bytes in time (rate)`.
pub fn summary(n: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-6);
    format!(
        "{} in {:.2}s ({}/s)",
        bytes(n),
        secs,
        bytes((n as f64 / secs) as u64)
    )
}

/// A byte progress bar on stderr when it is a terminal and not quiet; hidden otherwise.
pub fn byte_bar(total: u64, quiet: bool, message: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows as aligned columns.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   ", w = *w));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|s| (*s).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
    }
}
