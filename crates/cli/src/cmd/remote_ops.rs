//! Small remote commands in oras's shape: `resolve`, `repo tags`, `manifest fetch|push|delete`,
//! `blob fetch|push|delete`, and remote tagging.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use modelpack_registry::{MAX_MANIFEST_SIZE, read_small_file};
use modelpack_spec::Digest;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::io::Write as _;

use crate::args::{GlobalArgs, OutputFormat};
use crate::display;
use crate::remote::RegistryArgs;

#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// Reference to resolve to a digest
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// List a repository's tags
    Tags(RepoTagsArgs),
}

#[derive(Debug, Args)]
pub struct RepoTagsArgs {
    /// Repository, e.g. localhost:5000/models/llama
    pub repository: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Print a manifest (or write it to a file)
    Fetch(ManifestFetchArgs),
    /// Push a manifest file under a tag or its digest
    Push(ManifestPushArgs),
    /// Delete a manifest
    Delete(RefArgs),
}

#[derive(Debug, Args)]
pub struct ManifestFetchArgs {
    pub reference: String,
    /// Write to FILE instead of standard output
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Print only the descriptor (digest, size, media type) as JSON
    #[arg(long)]
    pub descriptor: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct ManifestPushArgs {
    pub reference: String,
    /// The manifest JSON file
    pub file: PathBuf,
    /// Media type (default: the document's mediaType, else the OCI manifest type)
    #[arg(long)]
    pub media_type: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct RefArgs {
    /// Reference with a digest (REPO@sha256:...) or tag
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Download a blob, verified, to a file (or standard output)
    Fetch(BlobFetchArgs),
    /// Upload a file as a blob; prints its digest
    Push(BlobPushArgs),
    /// Delete a blob
    Delete(RefArgs),
}

#[derive(Debug, Args)]
pub struct BlobFetchArgs {
    /// REPO@sha256:...
    pub reference: String,
    /// Output file ('-' for standard output)
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct BlobPushArgs {
    /// Repository to push into
    pub repository: String,
    /// The file
    pub file: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `text` as `REPO@DIGEST`: the reference and its digest.
fn blob_reference(text: &str) -> anyhow::Result<(modelpack_spec::Reference, Digest)> {
    let reference = super::parse_reference(text)?;
    let digest = reference
        .digest()
        .cloned()
        .with_context(|| format!("{text}: name the blob by digest (REPO@sha256:...)"))?;
    Ok((reference, digest))
}

pub fn resolve(_global: &GlobalArgs, args: ResolveArgs) -> anyhow::Result<ExitCode> {
    let (reference, repo) = args.registry.open(&args.reference)?;
    let rt = crate::remote::runtime()?;
    let found = rt
        .block_on(repo.head_manifest(&reference.tag_or_digest()))?
        .with_context(|| format!("{} not found", reference.familiar()))?;
    println!("{}", found.0);
    Ok(ExitCode::SUCCESS)
}

pub fn repo(_global: &GlobalArgs, command: RepoCommand) -> anyhow::Result<ExitCode> {
    let RepoCommand::Tags(args) = command;
    let (_, repo) = args.registry.open(&args.repository)?;
    let rt = crate::remote::runtime()?;
    let tags = rt.block_on(repo.tags())?;
    match args.format {
        OutputFormat::Json => display::print_json(&json!({ "tags": tags }))?,
        OutputFormat::Text => tags.iter().for_each(|t| println!("{t}")),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn manifest(global: &GlobalArgs, command: ManifestCommand) -> anyhow::Result<ExitCode> {
    let rt = crate::remote::runtime()?;
    match command {
        ManifestCommand::Fetch(args) => {
            let (reference, repo) = args.registry.open(&args.reference)?;
            let m = rt.block_on(repo.get_manifest(&reference.tag_or_digest()))?;
            if args.descriptor {
                display::print_json(&json!({
                    "mediaType": m.media_type, "digest": m.digest.to_string(), "size": m.bytes.len(),
                }))?;
            } else if let Some(path) = args.output {
                std::fs::write(&path, &m.bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            } else {
                std::io::stdout().write_all(&m.bytes)?;
                println!();
            }
        }
        ManifestCommand::Push(args) => {
            let reference = super::parse_reference(&args.reference)?;
            let bytes = read_small_file(&args.file, MAX_MANIFEST_SIZE)?;
            let doc: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not JSON", args.file.display()))?;
            let media_type = args
                .media_type
                .or_else(|| doc["mediaType"].as_str().map(str::to_owned))
                .unwrap_or_else(|| modelpack_spec::media_type::MEDIA_TYPE_OCI_MANIFEST.to_owned());
            let repo = crate::remote::repository(&args.registry.client()?, &reference);
            let digest = rt.block_on(repo.put_manifest(
                &reference.tag_or_digest(),
                &media_type,
                Bytes::from(bytes),
            ))?;
            if !global.quiet {
                println!("Pushed {} {digest}", reference.familiar());
            } else {
                println!("{digest}");
            }
        }
        ManifestCommand::Delete(args) => {
            let (reference, repo) = args.registry.open(&args.reference)?;
            let digest = match reference.digest() {
                Some(d) => d.clone(),
                None => {
                    rt.block_on(repo.head_manifest(&reference.tag_or_digest()))?
                        .with_context(|| format!("{} not found", reference.familiar()))?
                        .0
                }
            };
            rt.block_on(repo.delete_manifest(&digest))?;
            if !global.quiet {
                println!("Deleted {} {digest}", reference.familiar());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn blob(global: &GlobalArgs, command: BlobCommand) -> anyhow::Result<ExitCode> {
    let rt = crate::remote::runtime()?;
    match command {
        BlobCommand::Fetch(args) => {
            let (reference, digest) = blob_reference(&args.reference)?;
            let repo = crate::remote::repository(&args.registry.client()?, &reference);
            let to_stdout = args.output.as_os_str() == "-";
            // Write to a temporary file beside the target; rename only after the digest matched.
            let tmp = if to_stdout {
                None
            } else {
                let dir = args
                    .output
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                // Removed on drop, so a failed download leaves nothing behind.
                Some(
                    tempfile::Builder::new()
                        .prefix(".modelpack-blob-")
                        .tempfile_in(dir)
                        .with_context(|| format!("cannot create a file in {}", dir.display()))?,
                )
            };
            let mut hasher = Sha256::new();
            rt.block_on(async {
                let mut body = repo.blob_stream(&digest, None).await?;
                let mut out: Box<dyn std::io::Write> = match &tmp {
                    Some(file) => Box::new(file.as_file().try_clone()?),
                    None => Box::new(std::io::stdout()),
                };
                while let Some(chunk) = body.next_chunk().await? {
                    hasher.update(&chunk);
                    out.write_all(&chunk)?;
                }
                out.flush()?;
                anyhow::Ok(())
            })?;
            let actual = Digest::from_sha256(hasher.finalize().into());
            if actual != digest {
                bail!("blob {digest}: downloaded bytes hash to {actual}; nothing was written");
            }
            if let Some(file) = tmp {
                file.persist(&args.output)
                    .with_context(|| format!("cannot write {}", args.output.display()))?;
            }
        }
        BlobCommand::Push(args) => {
            let (_, repo) = args.registry.open(&args.repository)?;
            let (digest, _) = crate::remote::push_file(&rt, &repo, &args.file)?;
            println!("{digest}");
        }
        BlobCommand::Delete(args) => {
            let (reference, digest) = blob_reference(&args.reference)?;
            let repo = crate::remote::repository(&args.registry.client()?, &reference);
            rt.block_on(repo.delete_blob(&digest))?;
            if !global.quiet {
                println!("Deleted {digest}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Tags a remote manifest with more tags (as `oras tag`).
pub fn tag_remote(
    global: &GlobalArgs,
    source: &str,
    tags: &[String],
    registry: &RegistryArgs,
) -> anyhow::Result<ExitCode> {
    let (reference, repo) = registry.open(source)?;
    let rt = crate::remote::runtime()?;
    let m = rt.block_on(repo.get_manifest(&reference.tag_or_digest()))?;
    for tag in tags {
        let target = reference.with_tag(tag)?;
        rt.block_on(repo.put_manifest(tag, &m.media_type, m.bytes.clone()))?;
        if !global.quiet {
            println!("Tagged {} {}", target.familiar(), m.digest);
        }
    }
    Ok(ExitCode::SUCCESS)
}
