//! Conformance: our validator agrees with the upstream JSON schema (run by an independent
//! JSON-schema validator) on every upstream vector in `../shared/spec/vectors` and on our own
//! cases in `tests/data`.

use std::fs;
use std::path::{Path, PathBuf};

use modelpack_spec::{Model, ModelManifest, Report, validate_config, validate_manifest};
use serde_json::Value;

/// The upstream spec folder, or `None` (after one printed line; a failure under CI).
fn shared_spec() -> Option<PathBuf> {
    modelpack_testkit::spec::spec_dir()
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn schema_validator() -> Option<jsonschema::Validator> {
    let schema_path = shared_spec()?.join("config-schema.json");
    let schema: Value = serde_json::from_slice(&fs::read(&schema_path).expect("read schema"))
        .expect("schema is JSON");
    Some(
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("schema compiles"),
    )
}

/// Checks one config file against both validators; `expect_schema` and `expect_ours` say
/// whether each should accept it.
fn check_config(
    path: &Path,
    expect_schema: bool,
    expect_ours: bool,
    schema: &jsonschema::Validator,
) {
    let bytes = fs::read(path).expect("read vector");
    let doc: Value = serde_json::from_slice(&bytes).expect("vector is JSON");
    assert_eq!(
        schema.is_valid(&doc),
        expect_schema,
        "upstream schema on {}",
        path.display()
    );
    let report = validate_config(&bytes);
    assert_eq!(
        report.is_valid(),
        expect_ours,
        "our validator on {}: {:?}",
        path.display(),
        report.problems
    );
    if expect_ours {
        Model::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("typed parse of {}: {e}", path.display()));
    } else {
        assert!(
            report.errors().all(|p| p.path.starts_with('$')),
            "every problem names a JSON path"
        );
        assert!(
            Model::from_slice(&bytes).is_err(),
            "typed parse accepted {}",
            path.display()
        );
    }
}

#[test]
fn upstream_vectors_all_28() {
    let (Some(schema), Some(spec)) = (schema_validator(), shared_spec()) else {
        return;
    };
    let vectors = spec.join("vectors");
    let valid = json_files(&vectors.join("valid"));
    let invalid = json_files(&vectors.join("invalid"));
    assert_eq!(valid.len(), 4, "upstream valid vectors");
    assert_eq!(invalid.len(), 24, "upstream invalid vectors");
    for path in &valid {
        check_config(path, true, true, &schema);
    }
    for path in &invalid {
        check_config(path, false, false, &schema);
    }
}

#[test]
fn our_config_cases() {
    let Some(schema) = schema_validator() else {
        return;
    };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/config");
    for path in json_files(&data.join("valid")) {
        check_config(&path, true, true, &schema);
    }
    for path in json_files(&data.join("invalid")) {
        check_config(&path, false, false, &schema);
    }
    // The schema types diffIds as plain strings; we require OCI digests. Its `date-time` format
    // allows a lower-case `t`/`z` and a leap second, which the spec's Go validator (Go's
    // time.RFC3339) refuses; we agree with the Go validator.
    for path in json_files(&data.join("schema-only-valid")) {
        check_config(&path, true, false, &schema);
    }
}

#[test]
fn upstream_example_manifest_is_a_model_manifest() {
    let Some(spec) = shared_spec() else {
        return;
    };
    let path = spec.join("vectors/manifest/01-spec-md-example-manifest.json");
    let bytes = fs::read(&path).expect("read example manifest");
    let report = validate_manifest(&bytes);
    // The example has no filepath annotations: valid, with warnings that files have no names.
    assert!(report.is_valid(), "{:?}", report.problems);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("has no name"))
    );
    // And it is usable: its tar layers' entries carry their names.
    let manifest = ModelManifest::from_slice(&bytes).expect("the example is usable");
    assert!(manifest.layers().iter().all(|l| !l.named));
}

/// The warning (or error) messages of a manifest case in `tests/data/manifest/valid`.
fn valid_case(name: &str) -> (ModelManifest, Vec<String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/manifest/valid")
        .join(name);
    let (bytes, report) = check_manifest(&path, true);
    let messages = report.problems.iter().map(|p| p.message.clone()).collect();
    let manifest =
        ModelManifest::from_slice(&bytes).unwrap_or_else(|r| panic!("{name}: {:?}", r.problems));
    (manifest, messages)
}

#[test]
fn other_writers_shapes_are_usable_with_the_warnings_the_go_validator_implies() {
    // modctl: filepath and file metadata (nanoseconds, a local offset, a field we do not know),
    // no OCI title.
    let (m, _) = valid_case("modctl-raw-layer-no-title.json");
    let layer = &m.layers()[0];
    assert_eq!(layer.path.as_str(), "model.safetensors");
    let meta = layer.metadata.as_ref().expect("metadata");
    assert_eq!(meta.mtime.timestamp_subsec_nanos(), 123_456_789);
    assert_eq!(meta.mtime.offset().local_minus_utc(), 8 * 3600);
    // modctl's newest release: the legacy cnai names everywhere, warned about.
    let (m, warnings) = valid_case("cnai-legacy-names.json");
    assert_eq!(m.layers()[0].path.as_str(), "model.safetensors");
    assert!(m.layers()[0].metadata.is_some());
    for expected in [
        "legacy vnd.cnai artifact type",
        "legacy vnd.cnai config media type",
    ] {
        assert!(
            warnings.iter().any(|w| w == expected),
            "{expected}: {warnings:?}"
        );
    }
    // A model config but no artifactType: usable, with a warning.
    let (_, warnings) = valid_case("no-artifact-type-but-model-config.json");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("artifactType is missing")),
        "{warnings:?}"
    );
    // No name annotations at all: tar layers by their entries, the raw one by its digest.
    let (m, _) = valid_case("unnamed-raw-and-tar-layers.json");
    let raw = &m.layers()[0];
    assert!(raw.is_unnamed_file());
    assert_eq!(
        raw.path.as_str(),
        format!("sha256-{}", raw.digest.encoded())
    );
    assert!(
        m.layers()[1..]
            .iter()
            .all(|l| !l.named && !l.is_unnamed_file())
    );
}

/// Checks one manifest file against our validator; `expect_valid` says whether it should
/// accept it. Returns the bytes and the report for the case's further checks.
fn check_manifest(path: &Path, expect_valid: bool) -> (Vec<u8>, Report) {
    let bytes = fs::read(path).expect("read");
    let report = validate_manifest(&bytes);
    if expect_valid {
        assert!(
            report.is_valid(),
            "{}: {:?}",
            path.display(),
            report.problems
        );
    } else {
        assert!(!report.is_valid(), "{} accepted", path.display());
    }
    (bytes, report)
}

#[test]
fn our_manifest_cases() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/manifest");
    for path in json_files(&data.join("valid")) {
        let (bytes, _) = check_manifest(&path, true);
        ModelManifest::from_slice(&bytes)
            .unwrap_or_else(|r| panic!("{}: {:?}", path.display(), r.problems));
    }
    for path in json_files(&data.join("invalid")) {
        let (bytes, _) = check_manifest(&path, false);
        assert!(ModelManifest::from_slice(&bytes).is_err());
    }
    // Valid by the spec's grammar, but not usable here: another digest algorithm (nothing could
    // verify it), a raw layer whose file metadata names another size.
    for path in json_files(&data.join("unusable")) {
        let (bytes, report) = check_manifest(&path, true);
        assert!(
            !report.problems.is_empty(),
            "{}: no warning",
            path.display()
        );
        let Err(refused) = ModelManifest::from_slice(&bytes) else {
            panic!("{} parsed", path.display());
        };
        let message = &refused.problems[0].message;
        assert!(
            message.contains("only sha256") || message.contains("file metadata says"),
            "{}: {message}",
            path.display()
        );
    }
}

#[test]
fn oversize_and_non_utf8_documents() {
    let big = vec![b' '; modelpack_spec::MAX_DOCUMENT_SIZE + 1];
    let report = validate_config(&big);
    assert!(
        report.problems[0].message.contains("over the"),
        "{:?}",
        report.problems
    );
    let report = validate_manifest(b"{\"schemaVersion\":\xff}");
    assert!(
        report.problems[0].message.contains("UTF-8"),
        "{:?}",
        report.problems
    );
    let deep = "[".repeat(10_000);
    assert!(!validate_config(deep.as_bytes()).is_valid());
}
