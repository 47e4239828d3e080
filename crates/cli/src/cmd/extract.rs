//! `modelpack extract`: restore an artifact's tree from the store.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use modelpack_extract::{ExtractOptions, StoreSource};
use serde_json::json;

use crate::args::{ExtractArgs, GlobalArgs, OutputFormat};
use crate::display;

pub fn run(global: &GlobalArgs, args: ExtractArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    let loaded = super::load(&store, &args.reference)?;
    let started = Instant::now();
    let opts = ExtractOptions {
        patterns: &args.pattern,
        cancel: Some(display::cancel_flag()),
    };
    let report =
        modelpack_extract::extract(&loaded.manifest, &StoreSource(&store), &args.dir, &opts)
            .with_context(|| {
                format!(
                    "cannot extract {} into {}",
                    loaded.reference.familiar(),
                    args.dir.display()
                )
            })?;
    match args.output {
        OutputFormat::Json => display::print_json(&json!({
            "reference": modelpack_store::Store::name_of(&loaded.reference),
            "digest": loaded.descriptor.digest().to_string(),
            "dir": args.dir,
            "written": report.written,
            "skipped": report.skipped,
            "bytes": report.bytes,
        }))?,
        OutputFormat::Text => {
            if !global.quiet {
                println!(
                    "Extracted {} into {}: {} files written, {} already identical, {}",
                    modelpack_store::Store::name_of(&loaded.reference),
                    args.dir.display(),
                    report.written,
                    report.skipped,
                    display::summary(report.bytes, started.elapsed())
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
