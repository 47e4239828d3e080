//! `modelpack store`: the store itself.

use std::process::ExitCode;

use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat, StoreCommand};
use crate::display;

pub fn run(global: &GlobalArgs, command: StoreCommand) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    match command {
        StoreCommand::Path => {
            println!("{}", store.root().display());
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Check(args) => {
            let report = store.check()?;
            let ok = report.problems.is_empty();
            match args.output {
                OutputFormat::Json => display::print_json(&json!({
                    "blobsChecked": report.blobs_checked,
                    "consistent": ok,
                    "problems": report.problems,
                }))?,
                OutputFormat::Text => {
                    for p in &report.problems {
                        println!("{p}");
                    }
                    if !global.quiet {
                        println!(
                            "{} blobs checked: {}",
                            report.blobs_checked,
                            if ok { "consistent" } else { "PROBLEMS FOUND" }
                        );
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
