//! `modelpack tag`: another name for a stored artifact, or (`--remote`) more tags in a registry.

use std::process::ExitCode;

use modelpack_store::Store;

use crate::args::{GlobalArgs, TagArgs};

pub fn run(global: &GlobalArgs, args: TagArgs) -> anyhow::Result<ExitCode> {
    if args.remote {
        return super::remote_ops::tag_remote(global, &args.source, &args.targets, &args.registry);
    }
    let store = super::open_store(global)?;
    let source = super::parse_reference(&args.source)?;
    let targets = args
        .targets
        .iter()
        .map(|t| super::parse_reference(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(t) = targets.iter().find(|t| t.digest().is_some()) {
        anyhow::bail!("cannot tag with a digest reference: {}", t.familiar());
    }
    let descriptor = store.resolve(&source)?;
    for target in targets {
        store.tag(&target, &descriptor)?;
        if !global.quiet {
            println!(
                "Tagged {} as {}",
                Store::name_of(&source),
                Store::name_of(&target)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
