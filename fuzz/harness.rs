//! What each fuzz target does with its input, shared by the cargo-fuzz targets and by the
//! corpus replay test (`tests/e2e/fuzz_replay.rs`), so every input found is checked by
//! `cargo test` too. Each function must return normally for every input: errors are fine,
//! panics, hangs and unbounded allocations are bugs.

use std::io::Read;

use modelpack_spec::{Digest, ModelManifest};

/// Manifest parsing and validation.
pub fn manifest(data: &[u8]) {
    let report = modelpack_spec::validate_manifest(data);
    let parsed = ModelManifest::from_slice(data);
    // A manifest the validator accepts without a warning must parse (a warning, e.g. a layer
    // without a file path, is valid by the spec but not extractable).
    if report.is_valid() && report.problems.is_empty() {
        assert!(
            parsed.is_ok(),
            "a clean manifest does not parse: {report:?}"
        );
    }
    // What parses was valid, and names only safe paths.
    if let Ok(manifest) = parsed {
        assert!(report.is_valid(), "parsed an invalid manifest: {report:?}");
        for layer in manifest.layers() {
            assert_safe_path(layer.path.as_str());
        }
    }
}

/// Config parsing and validation.
pub fn config(data: &[u8]) {
    let report = modelpack_spec::validate_config(data);
    let parsed = modelpack_spec::Model::from_slice(data);
    if report.is_valid() && report.problems.is_empty() {
        assert!(parsed.is_ok(), "a clean config does not parse: {report:?}");
    }
    if parsed.is_ok() {
        assert!(report.is_valid(), "parsed an invalid config: {report:?}");
    }
}

/// The Modelfile parser.
pub fn modelfile(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = modelpack_build::Modelfile::parse(text);
    }
}

/// The tar header indexer: the extract planner over one tar layer holding `data`.
pub fn tar_index(data: &[u8]) {
    let digest = Digest::sha256_of(data);
    use modelpack_spec::media_type as mt;
    let layer_type = modelpack_spec::LayerMediaType::new(
        modelpack_spec::LayerKind::Weight,
        modelpack_spec::Encoding::Tar,
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt::MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": mt::ARTIFACT_TYPE_MODEL_MANIFEST,
        "config": {
            "mediaType": mt::MEDIA_TYPE_MODEL_CONFIG,
            "digest": Digest::sha256_of(b"{}").to_string(),
            "size": 2
        },
        "layers": [{
            "mediaType": layer_type.to_string(),
            "digest": digest.to_string(),
            "size": data.len(),
            "annotations": {modelpack_spec::annotations::ANNOTATION_FILEPATH: "weights"}
        }]
    });
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let Ok(manifest) = ModelManifest::from_slice(&bytes) else {
        return;
    };
    struct Bytes<'a>(&'a [u8]);
    impl modelpack_extract::LayerSource for Bytes<'_> {
        fn open_layer(
            &self,
            _layer: &modelpack_extract::LayerBlob,
        ) -> modelpack_extract::Result<Box<dyn Read + Send + '_>> {
            Ok(Box::new(self.0))
        }
    }
    if let Ok(plan) = modelpack_extract::plan(&manifest, &Bytes(data), &[]) {
        for entry in plan.entries {
            assert_safe_path(entry.path.as_str());
        }
    }
}

/// The zstd seek-table reader.
pub fn zstd_seek_table(data: &[u8]) {
    use modelpack_spec::zstd_seek::SeekTable;
    let _ = SeekTable::table_size_from_footer(data);
    if let Ok(table) = SeekTable::decode(data) {
        let total = table.decompressed_size();
        let _ = table.compressed_size();
        for offset in [0, total / 2, total.saturating_sub(1), total] {
            if let Some(at) = table.locate(offset) {
                let _ = at;
            }
        }
        // What it encodes, it decodes to the same table.
        let again = SeekTable::decode(&table.encode()).expect("re-decode");
        assert_eq!(again.decompressed_size(), total);
    }
}

/// A path the spec lets through stays inside the target: relative, with no `..` component.
fn assert_safe_path(path: &str) {
    assert!(
        !path.starts_with('/') && !path.split('/').any(|c| c == ".."),
        "{path}"
    );
}
