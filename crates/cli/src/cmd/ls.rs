//! `modelpack ls`: the artifacts in the store.

use std::process::ExitCode;

use modelpack_spec::{Digest, Model, ModelManifest};
use serde_json::json;

use crate::args::{GlobalArgs, LsArgs, OutputFormat};
use crate::display;

pub fn run(global: &GlobalArgs, args: LsArgs) -> anyhow::Result<ExitCode> {
    let store = super::open_store(global)?;
    let mut rows = Vec::new();
    let mut items = Vec::new();
    for entry in store.entries()? {
        let Some(name) = entry.name else { continue };
        let (repository, tag) = match name.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_owned(), t.to_owned()),
            _ => (name.clone(), String::new()),
        };
        let digest: Digest = entry.descriptor.digest().to_string().parse()?;
        let limit = modelpack_spec::MAX_DOCUMENT_SIZE as u64;
        let manifest = store
            .read_blob(&digest, limit)
            .ok()
            .and_then(|b| ModelManifest::from_slice(&b).ok());
        let size: Option<u64> = manifest.as_ref().map(|m| {
            entry.descriptor.size()
                + m.manifest().config().size()
                + m.layers().iter().map(|l| l.size()).sum::<u64>()
        });
        let created = manifest
            .as_ref()
            .and_then(|m| store.read_blob(m.config_digest(), limit).ok())
            .and_then(|b| Model::from_slice(&b).ok())
            .and_then(|c| c.descriptor.created_at)
            .map(|t| modelpack_spec::time::format_rfc3339(&t));
        rows.push(vec![
            repository.clone(),
            tag.clone(),
            digest.encoded().chars().take(12).collect(),
            created.clone().unwrap_or_else(|| "-".into()),
            size.map_or_else(|| "-".into(), display::bytes),
        ]);
        items.push(json!({
            "reference": name,
            "repository": repository,
            "tag": tag,
            "digest": digest.to_string(),
            "created": created,
            "size": size,
        }));
    }
    match args.output {
        OutputFormat::Json => display::print_json(&json!(items))?,
        OutputFormat::Text => {
            display::print_table(&["REPOSITORY", "TAG", "DIGEST", "CREATED", "SIZE"], &rows)
        }
    }
    Ok(ExitCode::SUCCESS)
}
