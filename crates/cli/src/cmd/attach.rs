//! `modelpack attach` (push files as an artifact that refers to another manifest) and
//! `modelpack discover` (list what refers to a manifest).

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use modelpack_spec::annotations::ANNOTATION_TITLE;
use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat};
use crate::display;
use crate::remote::RegistryArgs;

/// Media type of an attached file without one.
const DEFAULT_ATTACH_MEDIA_TYPE: &str = "application/octet-stream";

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The manifest the files refer to (its subject)
    #[arg(long)]
    pub subject: String,
    /// artifactType of the new artifact
    #[arg(long)]
    pub artifact_type: String,
    /// Files, each PATH[:MEDIATYPE]
    #[arg(required = true)]
    pub files: Vec<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// The manifest whose referrers to list
    pub reference: String,
    /// Only referrers of this artifactType
    #[arg(long)]
    pub artifact_type: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: OutputFormat,
}

pub fn attach(global: &GlobalArgs, args: AttachArgs) -> anyhow::Result<ExitCode> {
    let (subject_ref, repo) = args.registry.open(&args.subject)?;
    let rt = crate::remote::runtime()?;
    let subject = rt.block_on(repo.get_manifest(&subject_ref.tag_or_digest()))?;
    let mut layers = Vec::new();
    for spec in &args.files {
        let (path, media_type, title) = super::file_spec(spec, DEFAULT_ATTACH_MEDIA_TYPE)?;
        let (digest, size) = crate::remote::push_file(&rt, &repo, path)?;
        layers.push(modelpack_spec::descriptor(
            media_type,
            &digest,
            size,
            Some(HashMap::from([(
                ANNOTATION_TITLE.to_owned(),
                title.to_owned(),
            )])),
        )?);
    }
    let digest = rt.block_on(modelpack_transfer::attach(
        &repo,
        &subject,
        &args.artifact_type,
        layers,
    ))?;
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "digest": digest.to_string(), "subject": subject.digest.to_string(),
            "artifactType": args.artifact_type,
        }))?,
        OutputFormat::Text if global.quiet => println!("{digest}"),
        OutputFormat::Text => println!("Attached {digest} to {}", subject_ref.familiar()),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn discover(_global: &GlobalArgs, args: DiscoverArgs) -> anyhow::Result<ExitCode> {
    let (reference, repo) = args.registry.open(&args.reference)?;
    let rt = crate::remote::runtime()?;
    let referrers = rt.block_on(async {
        let (digest, _) = repo
            .head_manifest(&reference.tag_or_digest())
            .await?
            .with_context(|| format!("{} not found", reference.familiar()))?;
        anyhow::Ok(
            repo.referrers(&digest, args.artifact_type.as_deref())
                .await?,
        )
    })?;
    match args.format {
        OutputFormat::Json => display::print_json(&json!({
            "referrers": referrers.iter().map(|d| json!({
                "digest": d.digest().to_string(),
                "artifactType": d.artifact_type().as_ref().map(ToString::to_string),
                "size": d.size(),
            })).collect::<Vec<_>>(),
        }))?,
        OutputFormat::Text => {
            let rows: Vec<Vec<String>> = referrers
                .iter()
                .map(|d| {
                    vec![
                        d.digest().to_string(),
                        d.artifact_type()
                            .as_ref()
                            .map_or("-".into(), ToString::to_string),
                        display::bytes(d.size()),
                    ]
                })
                .collect();
            display::print_table(&["DIGEST", "ARTIFACT TYPE", "SIZE"], &rows);
        }
    }
    Ok(ExitCode::SUCCESS)
}
