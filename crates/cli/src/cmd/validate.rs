//! `modelpack validate`: check a config or manifest file, or a stored artifact.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use modelpack_spec::{DocumentKind, Report, Severity};
use serde_json::json;

use crate::args::{GlobalArgs, OutputFormat, ValidateArgs};
use crate::display;

fn validate_file(path: &Path) -> anyhow::Result<(String, Report)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report = match modelpack_spec::parse_document(&bytes) {
        Err(report) => return Ok(("document".into(), report)),
        Ok(doc) => match modelpack_spec::detect_kind(&doc) {
            Some(DocumentKind::Manifest) => {
                ("manifest", modelpack_spec::validate_manifest_value(&doc))
            }
            Some(DocumentKind::Config) => ("config", modelpack_spec::validate_config_value(&doc)),
            None => {
                // Neither shape: validate as a config, whose rules name what is missing.
                ("config", modelpack_spec::validate_config_value(&doc))
            }
        },
    };
    Ok((report.0.to_owned(), report.1))
}

pub fn run(global: &GlobalArgs, args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let path = Path::new(&args.target);
    let (kind, report) = if path.is_file() {
        validate_file(path)?
    } else {
        let store = super::open_store(global)?;
        let reference = super::parse_reference(&args.target)
            .with_context(|| format!("{} is neither a file nor a reference", args.target))?;
        let descriptor = store.resolve(&reference)?;
        let limit = modelpack_spec::MAX_DOCUMENT_SIZE as u64;
        let manifest = store.read_blob(&descriptor.digest().to_string().parse()?, limit)?;
        let doc: serde_json::Value = serde_json::from_slice(&manifest).unwrap_or_default();
        let config = doc
            .pointer("/config/digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
            .map(|d| store.read_blob(&d, limit))
            .transpose()?
            .unwrap_or_default();
        let mut report = modelpack_spec::validate_artifact(&manifest, &config);
        for (i, layer) in doc
            .get("layers")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(d) = layer
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse().ok())
                && !store.has_blob(&d)
            {
                report.problems.push(modelpack_spec::Problem {
                    severity: Severity::Error,
                    path: format!("manifest:$.layers[{i}]"),
                    message: format!("blob {d} is not in the store"),
                });
            }
        }
        ("artifact".into(), report)
    };
    let valid = report.is_valid();
    match args.output {
        OutputFormat::Json => display::print_json(&json!({
            "target": args.target,
            "kind": kind,
            "valid": valid,
            "problems": report.problems.iter().map(|p| json!({
                "severity": match p.severity { Severity::Error => "error", Severity::Warning => "warning" },
                "path": p.path,
                "message": p.message,
            })).collect::<Vec<_>>(),
        }))?,
        OutputFormat::Text => {
            for problem in &report.problems {
                if problem.severity == Severity::Error || !global.quiet {
                    println!("{problem}");
                }
            }
            if !global.quiet {
                let verdict = if valid { "valid" } else { "invalid" };
                println!("{}: {kind} is {verdict}", args.target);
            }
        }
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
