//! `modelpack tag`: another name for a stored artifact.

use std::process::ExitCode;

use modelpack_store::Store;

use crate::args::{GlobalArgs, TagArgs};

pub fn run(global: &GlobalArgs, args: TagArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    let source = super::parse_reference(&args.source)?;
    let target = super::parse_reference(&args.target)?;
    if target.digest().is_some() {
        anyhow::bail!("cannot tag with a digest reference: {}", args.target);
    }
    let descriptor = store.resolve(&source)?;
    store.tag(&target, &descriptor)?;
    if !global.quiet {
        println!(
            "Tagged {} as {}",
            Store::name_of(&source),
            Store::name_of(&target)
        );
    }
    Ok(ExitCode::SUCCESS)
}
