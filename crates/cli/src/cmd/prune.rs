//! `modelpack prune`: collect unreferenced blobs and stale temporary files.

use std::process::ExitCode;

use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat, PruneArgs};
use crate::display;

pub fn run(global: &GlobalArgs, args: PruneArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    let report = store.prune(args.dry_run)?;
    match args.output {
        OutputFormat::Json => display::print_json(&json!({
            "dryRun": args.dry_run,
            "blobs": report.blobs.iter().map(|(d, s)| json!({"digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
            "staleTemporaryFiles": report.stale_ingests.len(),
            "bytes": report.bytes(),
        }))?,
        OutputFormat::Text => {
            let verb = if args.dry_run {
                "Would remove"
            } else {
                "Removed"
            };
            if !global.quiet {
                for (digest, size) in &report.blobs {
                    println!("{verb} {digest} ({})", display::bytes(*size));
                }
            }
            println!(
                "{verb} {} blobs ({}) and {} stale temporary files",
                report.blobs.len(),
                display::bytes(report.bytes()),
                report.stale_ingests.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
