//! `modelpack copy SRC DST`: between registries (mounting blobs within one registry), OCI layout
//! folders (`oci:DIR:TAG`) and the local store (`store:NAME`).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use modelpack_spec::Digest;
use modelpack_store::Store;
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
    let rt = crate::remote::runtime()?;
    let renderer = Renderer::new(global.quiet, "copying");
    let opts = args.registry.transfer_options(renderer.progress());
    let digest: Digest = match (&source, &destination) {
        (Target::Registry(src), Target::Registry(dst)) => {
            let scratch_root = super::open_store(global)?.root().join("ingest");
            let scratch_dir = tempfile::Builder::new()
                .prefix("copy-")
                .tempdir_in(&scratch_root)
                .with_context(|| {
                    format!(
                        "cannot create a scratch folder in {}",
                        scratch_root.display()
                    )
                })?;
            let scratch = Store::open(scratch_dir.path())?;
            let src_repo = crate::remote::repository(&client, src);
            let dst_repo = crate::remote::repository(&client, dst);
            rt.block_on(modelpack_transfer::copy_remote(
                &src_repo,
                src,
                &dst_repo,
                dst.tag(),
                &scratch,
                &opts,
            ))?
        }
        (Target::Registry(src), _) => {
            let (store, name) = local(global, &destination)?.context("local destination")?;
            let _gc = store.gc_guard()?;
            let repo = crate::remote::repository(&client, src);
            let outcome = rt.block_on(modelpack_transfer::pull(&repo, src, &store, &opts))?;
            store.tag_name(&name, &outcome.descriptor)?;
            outcome.descriptor.digest().as_ref().parse()?
        }
        (_, Target::Registry(dst)) => {
            let (store, name) = local(global, &source)?.context("local source")?;
            let digest: Digest = store.resolve_name(&name)?.digest().as_ref().parse()?;
            let repo = crate::remote::repository(&client, dst);
            rt.block_on(modelpack_transfer::push(
                &store,
                &digest,
                &repo,
                dst.tag(),
                &opts,
            ))?
        }
        _ => {
            let (src_store, src_name) = local(global, &source)?.context("local source")?;
            let (dst_store, dst_name) =
                local(global, &destination)?.context("local destination")?;
            let _gc = dst_store.gc_guard()?;
            let digest: Digest = src_store
                .resolve_name(&src_name)?
                .digest()
                .as_ref()
                .parse()?;
            let descriptor = modelpack_transfer::copy_local(&src_store, &digest, &dst_store)?;
            dst_store.tag_name(&dst_name, &descriptor)?;
            digest
        }
    };
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
