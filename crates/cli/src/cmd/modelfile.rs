//! `modelpack modelfile generate`: write the Modelfile `build` would use.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};

use crate::args::{ModelfileCommand, ModelfileGenerateArgs};

pub fn run(command: ModelfileCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelfileCommand::Generate(args) => generate(args),
    }
}

fn generate(args: ModelfileGenerateArgs) -> anyhow::Result<ExitCode> {
    let excludes = modelpack_build::exclude_set(&args.exclude)?;
    let files = modelpack_build::plan_auto(&args.context, &excludes)?;
    let metadata = args
        .metadata
        .into_metadata()
        .or(modelpack_build::infer_metadata(&args.context, &files));
    let text = modelpack_build::modelfile_for(&files, metadata).to_text();
    let output = args
        .output
        .unwrap_or_else(|| args.context.join("Modelfile"));
    if output.as_os_str() == "-" {
        std::io::stdout().write_all(text.as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    if output.exists() && !args.overwrite {
        bail!(
            "{} exists; pass --overwrite to replace it",
            output.display()
        );
    }
    std::fs::write(&output, text).with_context(|| format!("cannot write {}", output.display()))?;
    println!("{}", output.display());
    Ok(ExitCode::SUCCESS)
}
