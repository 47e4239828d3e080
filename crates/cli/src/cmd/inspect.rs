//! `modelpack inspect`: an artifact's manifest, config and layers.

use std::process::ExitCode;

use serde_json::json;

use crate::args::{GlobalArgs, InspectArgs, OutputFormat};
use crate::display;

pub fn run(global: &GlobalArgs, args: InspectArgs) -> anyhow::Result<ExitCode> {
    let loaded = if args.remote {
        super::load_remote(&args.registry, &args.reference)?
    } else {
        let store = super::open_store(global)?;
        super::load(&store, &args.reference)?
    };
    let manifest = &loaded.manifest;
    let diff_ids = &loaded.config.modelfs.diff_ids;
    let layers: Vec<_> = manifest
        .layers()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "path": l.path.as_str(),
                "mediaType": l.media_type.to_string(),
                "kind": l.media_type.kind.as_str(),
                "encoding": l.media_type.encoding.as_str(),
                "size": l.size(),
                "digest": l.digest.to_string(),
                "diffId": diff_ids.get(i).map(ToString::to_string),
                "untested": l.untested,
                "mode": l.metadata.as_ref().map(|m| format!("{:o}", m.mode)),
            })
        })
        .collect();
    let total: u64 = manifest.layers().iter().map(|l| l.size()).sum();
    match args.output {
        OutputFormat::Json => {
            let manifest_json: serde_json::Value = serde_json::from_slice(&loaded.manifest_bytes)?;
            let config_json: serde_json::Value = serde_json::from_slice(&loaded.config_bytes)?;
            display::print_json(&json!({
                "reference": modelpack_store::Store::name_of(&loaded.reference),
                "digest": loaded.descriptor.digest().to_string(),
                "size": total,
                "manifest": manifest_json,
                "config": config_json,
                "layers": layers,
            }))?;
        }
        OutputFormat::Text => {
            let c = &loaded.config;
            let field = |label: &str, value: Option<&String>| {
                if let Some(v) = value {
                    println!("{label:<14}{v}");
                }
            };
            println!(
                "{:<14}{}",
                "Reference:",
                modelpack_store::Store::name_of(&loaded.reference)
            );
            println!("{:<14}{}", "Digest:", loaded.descriptor.digest());
            println!(
                "{:<14}{}",
                "Artifact:",
                manifest
                    .manifest()
                    .artifact_type()
                    .as_ref()
                    .map_or("(none)".to_owned(), ToString::to_string)
            );
            field("Name:", c.descriptor.name.as_ref());
            field("Family:", c.descriptor.family.as_ref());
            field("Architecture:", c.config.architecture.as_ref());
            field("Format:", c.config.format.as_ref());
            field("ParamSize:", c.config.param_size.as_ref());
            field("Precision:", c.config.precision.as_ref());
            field("Quantization:", c.config.quantization.as_ref());
            if let Some(t) = &c.descriptor.created_at {
                println!(
                    "{:<14}{}",
                    "Created:",
                    modelpack_spec::time::format_rfc3339(t)
                );
            }
            println!(
                "{:<14}{} in {} layers",
                "Size:",
                display::bytes(total),
                manifest.layers().len()
            );
            println!();
            let rows: Vec<Vec<String>> = manifest
                .layers()
                .iter()
                .map(|l| {
                    vec![
                        l.path.to_string(),
                        format!(
                            "{}.{}{}",
                            l.media_type.kind,
                            l.media_type.encoding,
                            if l.untested { " (untested)" } else { "" }
                        ),
                        display::bytes(l.size()),
                        l.digest.to_string(),
                    ]
                })
                .collect();
            display::print_table(&["PATH", "TYPE", "SIZE", "DIGEST"], &rows);
        }
    }
    Ok(ExitCode::SUCCESS)
}
