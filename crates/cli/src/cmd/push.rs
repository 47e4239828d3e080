//! `modelpack push`: a stored artifact to a registry, or (as `oras push`) plain files.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use modelpack_spec::annotations::ANNOTATION_TITLE;
use modelpack_spec::media_type::{MEDIA_TYPE_OCI_EMPTY, MEDIA_TYPE_OCI_MANIFEST};
use modelpack_spec::{Digest, LayerPath};
use modelpack_store::Store;
use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat};
use crate::display;
use crate::remote::{RegistryArgs, Renderer};

/// Media type of a plain file pushed without one, as oras uses.
const DEFAULT_FILE_MEDIA_TYPE: &str = modelpack_spec::media_type::MEDIA_TYPE_OCI_LAYER_TAR;

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Destination reference; without FILEs, also the name in the local store to push
    pub reference: String,
    /// Plain files to push as an artifact, each as PATH[:MEDIATYPE] (oras style)
    pub files: Vec<String>,
    /// artifactType of a plain-file artifact
    #[arg(long)]
    pub artifact_type: Option<String>,
    /// Push this stored artifact instead of the one named like the destination
    #[arg(long, value_name = "NAME")]
    pub from: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output format
    #[arg(long = "format", value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Writes plain files into the store as an artifact (empty config, one titled layer each) and
/// returns the manifest digest.
fn store_plain_files(
    store: &Store,
    files: &[String],
    artifact_type: Option<&str>,
) -> anyhow::Result<Digest> {
    let mut layers = Vec::new();
    for spec in files {
        let (path, media_type, title) = super::file_spec(spec, DEFAULT_FILE_MEDIA_TYPE)?;
        LayerPath::new(title)?;
        let mut src =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut ingest = store.ingest()?;
        let (digest, size) = modelpack_build::copy_and_hash(&mut src, ingest.file(), &|_| {})
            .with_context(|| format!("cannot read {}", path.display()))?;
        ingest.commit(&digest)?;
        let annotations = HashMap::from([(ANNOTATION_TITLE.to_owned(), title.to_owned())]);
        layers.push(modelpack_spec::descriptor(
            media_type,
            &digest,
            size,
            Some(annotations),
        )?);
    }
    let empty = store.put_bytes(b"{}")?;
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": modelpack_spec::descriptor(MEDIA_TYPE_OCI_EMPTY, &empty, 2, None)?,
        "layers": layers,
    });
    if let Some(t) = artifact_type {
        manifest["artifactType"] = json!(t);
    }
    Ok(store.put_bytes(&modelpack_spec::to_canonical_json(&manifest))?)
}

pub fn run(global: &GlobalArgs, args: PushArgs) -> anyhow::Result<ExitCode> {
    let reference = super::parse_reference(&args.reference)?;
    if reference.digest().is_some() {
        bail!("push to a tag, not a digest: {}", args.reference);
    }
    let store = super::open_store(global)?;
    let _gc = store.gc_guard()?;
    let digest: Digest = if args.files.is_empty() {
        let source = super::parse_reference(args.from.as_deref().unwrap_or(&args.reference))?;
        store.resolve(&source)?.digest().as_ref().parse()?
    } else {
        store_plain_files(&store, &args.files, args.artifact_type.as_deref())?
    };
    let client = args.registry.client()?;
    let repo = crate::remote::repository(&client, &reference);
    let renderer = Renderer::new(global.quiet, "pushing");
    let opts = args.registry.transfer_options(renderer.progress());
    let pushed = crate::remote::push_artifact(&store, &digest, &repo, &reference, &opts)?;
    let summary = renderer.finish();
    match args.output {
        OutputFormat::Json => display::print_json(&json!({
            "reference": reference.to_string(),
            "digest": pushed.to_string(),
        }))?,
        OutputFormat::Text if global.quiet => println!("{pushed}"),
        OutputFormat::Text => println!("Pushed {} {pushed} ({summary})", reference.familiar()),
    }
    Ok(ExitCode::SUCCESS)
}
