//! `modelpack pull` (into the store, or with `--extract` straight into a folder) and
//! `modelpack fetch` (only the files matching a pattern, straight into a folder); both folder
//! are the transfer engine's one walk ([`modelpack_transfer::copy`]) from the registry, into the
//! store or into a [`modelpack_transfer::Folder`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use modelpack_spec::Reference;
use modelpack_store::Store;
use modelpack_transfer::Remote;
use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat};
use crate::display;
use crate::remote::{RegistryArgs, Renderer};

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Reference to pull, e.g. localhost:5000/models/llama:8b
    pub reference: String,
    /// Write the files straight into DIR instead of the store
    #[arg(long, short = 'o', visible_alias = "extract", value_name = "DIR")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Reference to fetch from
    pub reference: String,
    /// Only files matching this glob (repeatable; `**` crosses folders)
    #[arg(long, required = true, value_name = "GLOB")]
    pub pattern: Vec<String>,
    /// Folder to write the files into
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

/// Writes an artifact's files from the registry into `dir` through the transfer engine (blobs
/// the store already holds are read from it; nothing is added to it). Returns the manifest
/// digest and what was written.
fn pull_folder(
    global: &GlobalArgs,
    registry: &RegistryArgs,
    reference: &Reference,
    dir: &std::path::Path,
    patterns: &[String],
    renderer: &Renderer,
) -> anyhow::Result<(modelpack_spec::Digest, modelpack_extract::ExtractReport)> {
    let mut p = Pulling::start(global, registry, reference, renderer)?;
    p.opts.cancel = Some(display::cancel_flag());
    let folder = modelpack_transfer::Folder::new(&p.store, dir, patterns, p.opts.cancel);
    let walked = p.rt.block_on(modelpack_transfer::copy(
        &Remote::new(&p.repo),
        &reference.tag_or_digest(),
        &folder,
        None,
        &p.opts,
    ));
    let (copied, report) = folder.finish(walked)?;
    Ok((copied.digest, report))
}

/// What every pull needs: the repository, a runtime, the store (held against `prune` while
/// unnamed blobs are in it) and the transfer options reporting to the renderer.
struct Pulling {
    repo: modelpack_registry::Repository,
    rt: tokio::runtime::Runtime,
    store: Store,
    opts: modelpack_transfer::TransferOptions,
    _gc: modelpack_store::GcGuard,
}

impl Pulling {
    fn start(
        global: &GlobalArgs,
        registry: &RegistryArgs,
        reference: &Reference,
        renderer: &Renderer,
    ) -> anyhow::Result<Pulling> {
        let client = registry.client()?;
        let store = super::open_store(global)?;
        Ok(Pulling {
            repo: crate::remote::repository(&client, reference),
            rt: crate::remote::runtime()?,
            _gc: store.gc_guard()?,
            store,
            opts: registry.transfer_options(renderer.progress()),
        })
    }
}

pub fn run(global: &GlobalArgs, args: PullArgs) -> anyhow::Result<ExitCode> {
    let reference = super::parse_reference(&args.reference)?;
    let renderer = Renderer::new(global.quiet, "pulling");
    if let Some(dir) = &args.output {
        let (digest, report) = pull_folder(global, &args.registry, &reference, dir, &[], &renderer)
            .with_context(|| {
                format!(
                    "cannot pull {} into {}",
                    reference.familiar(),
                    dir.display()
                )
            })?;
        let summary = renderer.finish();
        match args.format {
            OutputFormat::Json => display::print_json(&json!({
                "reference": reference.to_string(), "digest": digest.to_string(),
                "dir": dir, "written": report.written, "skipped": report.skipped,
            }))?,
            OutputFormat::Text if global.quiet => println!("{digest}"),
            OutputFormat::Text => println!(
                "Pulled {} {digest} into {}: {} files written, {} already identical ({summary})",
                reference.familiar(),
                dir.display(),
                report.written,
                report.skipped
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let p = Pulling::start(global, &args.registry, &reference, &renderer)?;
    let name = Store::name_of(&reference);
    let copied =
        p.rt.block_on(modelpack_transfer::copy(
            &Remote::new(&p.repo),
            &reference.tag_or_digest(),
            &p.store,
            Some(&name),
            &p.opts,
        ))
        .with_context(|| format!("cannot pull {}", reference.familiar()))?;
    let summary = renderer.finish();
    let digest = copied.digest;
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "reference": reference.to_string(), "name": name,
            "digest": digest.to_string(), "size": copied.total_bytes,
        }))?,
        OutputFormat::Text if global.quiet => println!("{digest}"),
        OutputFormat::Text => println!("Pulled {name} {digest} ({summary})"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fetch(global: &GlobalArgs, args: FetchArgs) -> anyhow::Result<ExitCode> {
    let reference = super::parse_reference(&args.reference)?;
    let renderer = Renderer::new(global.quiet, "fetching");
    let (digest, report) = pull_folder(
        global,
        &args.registry,
        &reference,
        &args.output,
        &args.pattern,
        &renderer,
    )
    .with_context(|| format!("cannot fetch from {}", reference.familiar()))?;
    let summary = renderer.finish();
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "reference": reference.to_string(), "digest": digest.to_string(),
            "dir": args.output, "written": report.written, "skipped": report.skipped,
        }))?,
        OutputFormat::Text => {
            if !global.quiet {
                println!(
                    "Fetched {} files ({} already identical) from {} into {} ({summary})",
                    report.written,
                    report.skipped,
                    reference.familiar(),
                    args.output.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
