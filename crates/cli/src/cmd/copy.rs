//! `modelpack copy SRC DST`: between registries (mounting blobs within one registry), OCI layout
//! folders (`oci:DIR:TAG`) and the local store (`store:NAME`).

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use modelpack_registry::Repository;
use modelpack_store::Store;
use modelpack_transfer::{Remote, copy};
use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat};
use crate::display;
use crate::remote::{RegistryArgs, Renderer, Target};

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source: a registry reference, oci:DIR[:TAG] or store:NAME[:TAG]
    pub source: String,
    /// Destination: a registry reference, oci:DIR[:TAG] or store:NAME[:TAG]
    pub destination: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

/// A registry side's repository.
fn registry_of(client: &modelpack_registry::Client, target: &Target) -> Option<Repository> {
    match target {
        Target::Registry(r) => Some(crate::remote::repository(client, r)),
        _ => None,
    }
}

/// A local side: the store or layout, and the exact name inside it.
fn local(global: &GlobalArgs, target: &Target) -> anyhow::Result<Option<(Store, String)>> {
    Ok(match target {
        Target::Registry(_) => None,
        Target::Layout(dir, name) => Some((crate::remote::open_layout(dir)?, name.clone())),
        Target::Store(reference) => Some((super::open_store(global)?, Store::name_of(reference))),
    })
}

pub fn run(global: &GlobalArgs, args: CopyArgs) -> anyhow::Result<ExitCode> {
    let source = Target::parse(&args.source)?;
    let destination = Target::parse(&args.destination)?;
    let client = args.registry.client()?;
    let renderer = Renderer::new(global.quiet, "copying");
    let opts = args.registry.transfer_options(renderer.progress());
    let rt = crate::remote::runtime()?;
    let (src_repo, dst_repo) = (
        registry_of(&client, &source),
        registry_of(&client, &destination),
    );
    let (src_local, dst_local) = (local(global, &source)?, local(global, &destination)?);
    // Between two registries blobs that cannot be mounted pass through a scratch store.
    let scratch = match (&source, &destination) {
        (Target::Registry(_), Target::Registry(_)) => {
            Some(super::open_store(global)?.scratch(&format!("copy-{}", std::process::id()))?)
        }
        _ => None,
    };
    let _gc = dst_local
        .as_ref()
        .map(|(dst, _)| dst.gc_guard())
        .transpose()?;
    let reference = match (&source, &src_local) {
        (Target::Registry(r), _) => r.tag_or_digest(),
        (_, Some((_, name))) => name.clone(),
        (_, None) => bail!("{}: no source", args.source),
    };
    let tag = match (&destination, &dst_local) {
        (Target::Registry(r), _) => r.tag().map(str::to_owned),
        (_, Some((_, name))) => Some(name.clone()),
        (_, None) => None,
    };
    let remote_dst = dst_repo.as_ref().map(|repo| {
        let remote = Remote::new(repo);
        match &scratch {
            Some(s) => remote.staging(s.store()),
            None => remote,
        }
    });
    let walk = async {
        let (tag, reference) = (tag.as_deref(), reference.as_str());
        match (&src_repo, &src_local, &remote_dst, &dst_local) {
            (Some(src), _, Some(dst), _) => {
                copy(&Remote::new(src), reference, dst, tag, &opts).await
            }
            (Some(src), _, None, Some((dst, _))) => {
                copy(&Remote::new(src), reference, dst, tag, &opts).await
            }
            (None, Some((src, _)), Some(dst), _) => copy(src, reference, dst, tag, &opts).await,
            (None, Some((src, _)), None, Some((dst, _))) => {
                copy(src, reference, dst, tag, &opts).await
            }
            _ => Err(modelpack_transfer::Error::Unsupported(
                "a source and a destination are needed".into(),
            )),
        }
    };
    let copied = rt.block_on(walk);
    if let Some(scratch) = scratch
        && let Err(e) = scratch.remove()
    {
        // The copy's own result is what the user asked for; `prune` removes what is left.
        tracing::warn!(error = %e, "cannot remove the copy's scratch store");
    }
    let digest = copied?.digest;
    let summary = renderer.finish();
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "source": args.source, "destination": args.destination, "digest": digest.to_string(),
        }))?,
        OutputFormat::Text if global.quiet => println!("{digest}"),
        OutputFormat::Text => println!(
            "Copied {} to {} {digest} ({summary})",
            args.source, args.destination
        ),
    }
    Ok(ExitCode::SUCCESS)
}
