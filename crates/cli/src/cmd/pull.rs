//! `modelpack pull` (into the store, or with `--extract` straight into a folder) and
//! `modelpack fetch` (only the files matching a pattern, straight into a folder).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use modelpack_extract::{ExtractOptions, LayerBlob, LayerSource};
use modelpack_registry::Repository;
use modelpack_spec::annotations::ANNOTATION_TITLE;
use modelpack_spec::{Encoding, LayerPath, ModelManifest, Reference};
use modelpack_store::Store;
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

/// Layer bytes streamed from a registry into the (blocking) extractor.
struct RemoteSource<'a> {
    repo: &'a Repository,
    handle: tokio::runtime::Handle,
    moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

struct Counting<R> {
    inner: R,
    moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.moved
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

impl LayerSource for RemoteSource<'_> {
    fn open_layer(
        &self,
        layer: &LayerBlob,
    ) -> modelpack_extract::Result<Box<dyn Read + Send + '_>> {
        // Resumes from the offset reached when a connection breaks; the extractor verifies.
        let reader = modelpack_registry::BlobReader::new(
            self.repo.clone(),
            layer.digest.clone(),
            layer.size,
            self.handle.clone(),
        );
        Ok(Box::new(Counting {
            inner: reader,
            moved: self.moved.clone(),
        }))
    }
}

/// Streams an artifact's files from the registry into `dir`: a ModelPack artifact by its
/// layers' file paths, any other artifact by its layers' OCI titles (as `oras pull`).
fn extract_remote(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    reference: &Reference,
    dir: &std::path::Path,
    patterns: &[String],
    renderer: &Renderer,
) -> anyhow::Result<(modelpack_extract::ExtractReport, modelpack_spec::Digest)> {
    let fetched = rt.block_on(repo.get_manifest(&reference.tag_or_digest()))?;
    let source = RemoteSource {
        repo,
        handle: rt.handle().clone(),
        moved: renderer.moved.clone(),
    };
    let doc: serde_json::Value = serde_json::from_slice(&fetched.bytes)?;
    let is_model = ModelManifest::from_slice(&fetched.bytes);
    let cancel = display::cancel_flag();
    let report = match is_model {
        Ok(manifest) => modelpack_extract::extract(
            &manifest,
            &source,
            dir,
            &ExtractOptions {
                patterns,
                cancel: Some(cancel),
            },
        )?,
        Err(report) => {
            if modelpack_spec::is_model_manifest(&serde_json::from_slice(&fetched.bytes)?) {
                bail!(
                    "{} is a ModelPack artifact that fails validation: {}",
                    reference.familiar(),
                    report.error_summary()
                );
            }
            let mut files = Vec::new();
            for layer in doc["layers"].as_array().into_iter().flatten() {
                let Some(title) = layer["annotations"][ANNOTATION_TITLE].as_str() else {
                    continue;
                };
                files.push((
                    LayerPath::new(title)?,
                    LayerBlob {
                        digest: layer["digest"].as_str().unwrap_or_default().parse()?,
                        size: layer["size"].as_u64().context("layer without a size")?,
                        encoding: Encoding::Raw,
                    },
                ));
            }
            if files.is_empty() {
                bail!(
                    "{} has no layers with file names (org.opencontainers.image.title)",
                    reference.familiar()
                );
            }
            let plan = modelpack_extract::plan_files(files, patterns)?;
            modelpack_extract::extract_planned(&source, &plan, dir, Some(cancel))?
        }
    };
    Ok((report, fetched.digest))
}

pub fn run(global: &GlobalArgs, args: PullArgs) -> anyhow::Result<ExitCode> {
    let reference = super::parse_reference(&args.reference)?;
    let client = args.registry.client()?;
    let repo = crate::remote::repository(&client, &reference);
    let rt = crate::remote::runtime()?;
    let renderer = Renderer::new(global.quiet, "pulling");
    if let Some(dir) = &args.output {
        let (report, digest) = extract_remote(&rt, &repo, &reference, dir, &[], &renderer)
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
    let store = super::open_store(global)?;
    let _gc = store.gc_guard()?;
    let opts = args.registry.transfer_options(renderer.progress());
    let outcome = rt
        .block_on(modelpack_transfer::pull(&repo, &reference, &store, &opts))
        .with_context(|| format!("cannot pull {}", reference.familiar()))?;
    let name = reference.clone();
    store.tag(&name, &outcome.descriptor)?;
    let summary = renderer.finish();
    let digest = outcome.descriptor.digest().to_string();
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "reference": reference.to_string(), "name": Store::name_of(&name),
            "digest": digest, "size": outcome.total_bytes,
        }))?,
        OutputFormat::Text if global.quiet => println!("{digest}"),
        OutputFormat::Text => println!("Pulled {} {digest} ({summary})", Store::name_of(&name)),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn fetch(global: &GlobalArgs, args: FetchArgs) -> anyhow::Result<ExitCode> {
    let reference = super::parse_reference(&args.reference)?;
    let client = args.registry.client()?;
    let repo = crate::remote::repository(&client, &reference);
    let rt = crate::remote::runtime()?;
    let renderer = Renderer::new(global.quiet, "fetching");
    let (report, digest) = extract_remote(
        &rt,
        &repo,
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
