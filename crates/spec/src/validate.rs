//! Validation of config and manifest documents, reporting every problem with its JSON path.
//!
//! The config rules agree with the upstream schema (draft 2020-12, `format` asserted) on every
//! upstream vector; on top of it we check what the schema leaves out: diffIds in OCI digest
//! syntax, one diffId per layer, safe file paths, and `paramSize`/`precision` syntax (warnings).

use std::collections::HashSet;
use std::fmt;

use serde_json::Value;

use crate::annotations::{
    ANNOTATION_FILE_METADATA, ANNOTATION_FILEPATH, ANNOTATION_MEDIATYPE_UNTESTED, ANNOTATION_TITLE,
    FileMetadata, LEGACY_ANNOTATION_FILE_METADATA, LEGACY_ANNOTATION_FILEPATH,
    LEGACY_ANNOTATION_MEDIATYPE_UNTESTED,
};
use crate::digest::Digest;
use crate::media_type::{
    Encoding, LayerMediaType, MEDIA_TYPE_OCI_MANIFEST, is_model_artifact, is_model_config,
};
use crate::path::LayerPath;
use crate::time::is_rfc3339;

/// The largest manifest or config document we accept (4 MiB, as registries cap manifests).
pub const MAX_DOCUMENT_SIZE: usize = 4 * 1024 * 1024;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The document breaks the spec.
    Error,
    /// The document is valid but probably not what its author meant.
    Warning,
}

/// One problem, located by a JSON path such as `$.config.capabilities.languages[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// Where in the document.
    pub path: String,
    /// What is wrong, lower-case, no trailing period.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: {}: {}", self.path, self.message)
    }
}

/// Every problem found in one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Problems in document order.
    pub problems: Vec<Problem>,
}

impl Report {
    /// True when there is no error (warnings allowed).
    pub fn is_valid(&self) -> bool {
        self.errors().next().is_none()
    }

    /// The errors on one line, `; `-separated, for an error message.
    pub fn error_summary(&self) -> String {
        self.errors()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            severity: Severity::Error,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn warning(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            severity: Severity::Warning,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn extend(&mut self, other: Report) {
        self.problems.extend(other.problems);
    }
}

/// What kind of document some JSON bytes hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    /// A model config blob.
    Config,
    /// An OCI manifest.
    Manifest,
}

/// Guesses whether `doc` is a config or a manifest from its keys.
pub fn detect_kind(doc: &Value) -> Option<DocumentKind> {
    let obj = doc.as_object()?;
    if obj.contains_key("schemaVersion") || obj.contains_key("layers") {
        Some(DocumentKind::Manifest)
    } else if obj.contains_key("modelfs") || obj.contains_key("descriptor") {
        Some(DocumentKind::Config)
    } else {
        None
    }
}

/// Parses JSON bytes for validation, reporting size, UTF-8 and syntax problems at `$`.
pub fn parse_document(bytes: &[u8]) -> Result<Value, Report> {
    let mut report = Report::default();
    if bytes.len() > MAX_DOCUMENT_SIZE {
        report.error(
            "$",
            format!(
                "document is {} bytes, over the {MAX_DOCUMENT_SIZE}-byte limit",
                bytes.len()
            ),
        );
        return Err(report);
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        report.error("$", format!("not UTF-8: {e}"));
        return Err(report);
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => {
            if let Some(path) = find_duplicate_key(bytes) {
                report.error(&path, "duplicate key");
                return Err(report);
            }
            Ok(v)
        }
        Err(e) => {
            report.error("$", format!("not valid JSON: {e}"));
            Err(report)
        }
    }
}

/// Finds the first object key that appears twice in one object, as a JSON path.
fn find_duplicate_key(bytes: &[u8]) -> Option<String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Seek(String);
    impl<'de> DeserializeSeed<'de> for Seek {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Seek {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            let mut i = 0usize;
            while let Some(dup) = seq.next_element_seed(Seek(format!("{}[{i}]", self.0)))? {
                found = found.or(dup);
                i += 1;
            }
            Ok(found)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = HashSet::new();
            let mut found = None;
            while let Some(key) = map.next_key::<String>()? {
                let path = join_key(&self.0, &key);
                let dup = map.next_value_seed(Seek(path.clone()))?;
                if !seen.insert(key) && found.is_none() {
                    found = Some(path);
                }
                found = found.or(dup);
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Seek("$".to_owned()).deserialize(&mut de).ok().flatten()
}

fn join_key(path: &str, key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!("{path}.{key}")
    } else {
        format!("{path}[{key:?}]")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[derive(Clone, Copy)]
enum Rule {
    String,
    NonEmptyString,
    DateTime,
    Bool,
    StringArray,
    LanguageArray,
    ModalityArray,
    Object(&'static [(&'static str, Rule)], &'static [&'static str]),
    LayersEnum,
    DiffIds,
}

const CAPABILITIES: Rule = Rule::Object(
    &[
        ("inputTypes", Rule::ModalityArray),
        ("outputTypes", Rule::ModalityArray),
        ("knowledgeCutoff", Rule::DateTime),
        ("reasoning", Rule::Bool),
        ("toolUsage", Rule::Bool),
        ("reward", Rule::Bool),
        ("languages", Rule::LanguageArray),
    ],
    &[],
);

const CONFIG_RULE: Rule = Rule::Object(
    &[
        (
            "descriptor",
            Rule::Object(
                &[
                    ("createdAt", Rule::DateTime),
                    ("authors", Rule::StringArray),
                    ("family", Rule::String),
                    ("name", Rule::NonEmptyString),
                    ("docURL", Rule::String),
                    ("sourceURL", Rule::String),
                    ("datasetsURL", Rule::StringArray),
                    ("version", Rule::String),
                    ("revision", Rule::String),
                    ("vendor", Rule::String),
                    ("licenses", Rule::StringArray),
                    ("title", Rule::String),
                    ("description", Rule::String),
                ],
                &[],
            ),
        ),
        (
            "modelfs",
            Rule::Object(
                &[("type", Rule::LayersEnum), ("diffIds", Rule::DiffIds)],
                &["type", "diffIds"],
            ),
        ),
        (
            "config",
            Rule::Object(
                &[
                    ("architecture", Rule::String),
                    ("format", Rule::String),
                    ("paramSize", Rule::String),
                    ("precision", Rule::String),
                    ("quantization", Rule::String),
                    ("capabilities", CAPABILITIES),
                ],
                &[],
            ),
        ),
    ],
    &["descriptor", "config", "modelfs"],
);

const MODALITIES: [&str; 6] = ["text", "image", "audio", "video", "embedding", "other"];

fn check(rule: Rule, v: &Value, path: &str, report: &mut Report) {
    let expect = |want: &str, report: &mut Report| {
        report.error(path, format!("expected {want}, got {}", type_name(v)));
    };
    match rule {
        Rule::String => {
            if !v.is_string() {
                expect("string", report);
            }
        }
        Rule::NonEmptyString => match v.as_str() {
            Some("") => report.error(path, "must not be empty"),
            Some(_) => {}
            None => expect("string", report),
        },
        Rule::DateTime => match v.as_str() {
            Some(s) if !is_rfc3339(s) => {
                report.error(path, format!("{s:?} is not an RFC 3339 date-time"));
            }
            Some(_) => {}
            None => expect("string", report),
        },
        Rule::Bool => {
            if !v.is_boolean() {
                expect("boolean", report);
            }
        }
        Rule::StringArray | Rule::LanguageArray | Rule::ModalityArray => {
            let Some(items) = v.as_array() else {
                return expect("array", report);
            };
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                let Some(s) = item.as_str() else {
                    report.error(
                        &item_path,
                        format!("expected string, got {}", type_name(item)),
                    );
                    continue;
                };
                match rule {
                    Rule::LanguageArray
                        if !(s.len() == 2 && s.bytes().all(|b| b.is_ascii_lowercase())) =>
                    {
                        report.error(
                            &item_path,
                            format!("{s:?} is not a two-letter lower-case ISO 639-1 code"),
                        );
                    }
                    Rule::ModalityArray if !MODALITIES.contains(&s) => {
                        report.error(
                            &item_path,
                            format!("{s:?} is not one of {}", MODALITIES.join(", ")),
                        );
                    }
                    _ => {}
                }
            }
        }
        Rule::LayersEnum => match v.as_str() {
            Some("layers") => {}
            Some(other) => report.error(path, format!("{other:?} is not \"layers\"")),
            None => expect("string", report),
        },
        Rule::DiffIds => {
            let Some(items) = v.as_array() else {
                return expect("array", report);
            };
            if items.is_empty() {
                report.error(path, "must hold at least one diffId");
            }
            for (i, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                match item.as_str() {
                    Some(s) => {
                        if let Err(e) = s.parse::<Digest>() {
                            report.error(&item_path, e.to_string());
                        }
                    }
                    None => report.error(
                        &item_path,
                        format!("expected string, got {}", type_name(item)),
                    ),
                }
            }
        }
        Rule::Object(fields, required) => {
            let Some(obj) = v.as_object() else {
                return expect("object", report);
            };
            for name in required {
                if !obj.contains_key(*name) {
                    report.error(path, format!("missing required field {name:?}"));
                }
            }
            for (key, value) in obj {
                let child = join_key(path, key);
                match fields.iter().find(|(name, _)| name == key) {
                    Some((_, rule)) => check(*rule, value, &child, report),
                    None => report.error(&child, "unknown field"),
                }
            }
        }
    }
}

fn is_param_size(s: &str) -> bool {
    let Some((count, scale)) = s.char_indices().last().map(|(i, c)| (&s[..i], c)) else {
        return false;
    };
    if !"QqTtBbMmKk".contains(scale) {
        return false;
    }
    let (whole, frac) = match count.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (count, None),
    };
    !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| f.len() == 1 && f.bytes().all(|b| b.is_ascii_digit()))
}

/// The precisions the spec documents.
pub const PRECISIONS: [&str; 18] = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "float8_e4m3",
    "float8_e5m2",
    "complex32",
    "complex64",
    "complex128",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
];

/// Validates a parsed config document.
pub fn validate_config_value(doc: &Value) -> Report {
    let mut report = Report::default();
    check(CONFIG_RULE, doc, "$", &mut report);
    if let Some(size) = doc.pointer("/config/paramSize").and_then(Value::as_str)
        && !is_param_size(size)
    {
        report.warning(
            "$.config.paramSize",
            format!("{size:?} is not <count><K|M|B|T|Q>, e.g. 8b or 6.7B"),
        );
    }
    if let Some(precision) = doc.pointer("/config/precision").and_then(Value::as_str) {
        for p in precision.split(',') {
            if !PRECISIONS.contains(&p.trim()) {
                report.warning(
                    "$.config.precision",
                    format!(
                        "{p:?} is not a documented precision ({})",
                        PRECISIONS.join(", ")
                    ),
                );
            }
        }
    }
    report
}

/// Validates config bytes.
pub fn validate_config(bytes: &[u8]) -> Report {
    match parse_document(bytes) {
        Ok(doc) => validate_config_value(&doc),
        Err(report) => report,
    }
}

fn check_descriptor(v: &Value, path: &str, report: &mut Report) {
    let Some(obj) = v.as_object() else {
        report.error(path, format!("expected object, got {}", type_name(v)));
        return;
    };
    match obj.get("mediaType") {
        Some(Value::String(_)) => {}
        Some(other) => report.error(
            &format!("{path}.mediaType"),
            format!("expected string, got {}", type_name(other)),
        ),
        None => report.error(path, "missing required field \"mediaType\""),
    }
    match obj.get("digest") {
        Some(Value::String(s)) => {
            if let Err(e) = s.parse::<Digest>() {
                report.error(&format!("{path}.digest"), e.to_string());
            }
        }
        Some(other) => report.error(
            &format!("{path}.digest"),
            format!("expected string, got {}", type_name(other)),
        ),
        None => report.error(path, "missing required field \"digest\""),
    }
    match obj.get("size") {
        Some(Value::Number(n)) if n.is_u64() && n.as_i64().is_some() => {}
        Some(other) => report.error(
            &format!("{path}.size"),
            format!("expected a non-negative 64-bit integer, got {other}"),
        ),
        None => report.error(path, "missing required field \"size\""),
    }
    if let Some(annotations) = obj.get("annotations") {
        match annotations.as_object() {
            Some(map) => {
                for (k, val) in map {
                    if !val.is_string() {
                        report.error(
                            &join_key(&format!("{path}.annotations"), k),
                            format!("expected string, got {}", type_name(val)),
                        );
                    }
                }
            }
            None => report.error(
                &format!("{path}.annotations"),
                format!("expected object, got {}", type_name(annotations)),
            ),
        }
    }
}

fn annotation<'a>(layer: &'a Value, key: &str, legacy: &str) -> Option<(&'a str, bool)> {
    let map = layer.get("annotations")?.as_object()?;
    if let Some(v) = map.get(key).and_then(Value::as_str) {
        return Some((v, false));
    }
    map.get(legacy).and_then(Value::as_str).map(|v| (v, true))
}

/// Validates a parsed manifest document as a ModelPack manifest.
pub fn validate_manifest_value(doc: &Value) -> Report {
    let mut report = Report::default();
    let Some(obj) = doc.as_object() else {
        report.error("$", format!("expected object, got {}", type_name(doc)));
        return report;
    };
    match obj.get("schemaVersion") {
        Some(v) if v.as_u64() == Some(2) => {}
        Some(v) => report.error("$.schemaVersion", format!("must be 2, got {v}")),
        None => report.error("$", "missing required field \"schemaVersion\""),
    }
    match obj.get("mediaType").map(|v| v.as_str()) {
        Some(Some(MEDIA_TYPE_OCI_MANIFEST)) => {}
        Some(Some(other)) => report.error(
            "$.mediaType",
            format!("{other:?} is not {MEDIA_TYPE_OCI_MANIFEST:?}"),
        ),
        Some(None) => report.error("$.mediaType", "expected string"),
        None => report.warning("$", "mediaType is missing; it should be set"),
    }
    let config_media_type = obj
        .get("config")
        .and_then(|c| c.get("mediaType"))
        .and_then(Value::as_str);
    match obj.get("artifactType").map(|v| v.as_str()) {
        Some(Some(t)) if is_model_artifact(t) => {
            if t != crate::media_type::ARTIFACT_TYPE_MODEL_MANIFEST {
                report.warning("$.artifactType", "legacy vnd.cnai artifact type");
            }
        }
        Some(Some(t)) => report.error(
            "$.artifactType",
            format!("{t:?} is not a ModelPack artifact type"),
        ),
        Some(None) => report.error("$.artifactType", "expected string"),
        None => {
            if config_media_type.is_some_and(is_model_config) {
                report.warning(
                    "$",
                    "artifactType is missing; it should be the ModelPack manifest artifact type",
                );
            } else {
                report.error(
                    "$",
                    "not a ModelPack manifest: no artifactType and no model config media type",
                );
            }
        }
    }
    match obj.get("config") {
        Some(config) => {
            check_descriptor(config, "$.config", &mut report);
            if let Some(Ok(d)) = config
                .get("digest")
                .and_then(Value::as_str)
                .map(str::parse::<crate::Digest>)
                && !d.is_sha256()
            {
                report.warning(
                    "$.config.digest",
                    format!("{d}: only sha256 digests can be verified by modelpack"),
                );
            }
            match config_media_type {
                Some(t) if !is_model_config(t) => report.error(
                    "$.config.mediaType",
                    format!("{t:?} is not the model config media type"),
                ),
                Some(t) if t != crate::media_type::MEDIA_TYPE_MODEL_CONFIG => {
                    report.warning("$.config.mediaType", "legacy vnd.cnai config media type");
                }
                _ => {}
            }
        }
        None => report.error("$", "missing required field \"config\""),
    }
    let layers = match obj.get("layers") {
        Some(Value::Array(layers)) => layers.as_slice(),
        Some(other) => {
            report.error(
                "$.layers",
                format!("expected array, got {}", type_name(other)),
            );
            &[]
        }
        None => {
            report.error("$", "missing required field \"layers\"");
            &[]
        }
    };
    if layers.is_empty() && obj.get("layers").is_some_and(Value::is_array) {
        report.error("$.layers", "a model needs at least one layer");
    }
    let mut paths = HashSet::new();
    for (i, layer) in layers.iter().enumerate() {
        let path = format!("$.layers[{i}]");
        check_descriptor(layer, &path, &mut report);
        if let Some(mt) = layer.get("mediaType").and_then(Value::as_str) {
            match mt.parse::<LayerMediaType>() {
                Ok(parsed) if parsed.is_legacy() => {
                    report.warning(&format!("{path}.mediaType"), "legacy vnd.cnai media type");
                }
                Ok(_) => {}
                Err(e) => report.error(&format!("{path}.mediaType"), e.to_string()),
            }
        }
        let ann_path = format!("{path}.annotations");
        let file_path = annotation(layer, ANNOTATION_FILEPATH, LEGACY_ANNOTATION_FILEPATH);
        let title = annotation(layer, ANNOTATION_TITLE, ANNOTATION_TITLE);
        match file_path.or(title) {
            Some((p, legacy)) => {
                if legacy {
                    report.warning(&ann_path, "legacy org.cnai filepath annotation");
                }
                match LayerPath::new(p) {
                    Ok(lp) => {
                        if !paths.insert(lp.as_str().to_owned()) {
                            report.error(
                                &ann_path,
                                format!(
                                    "file path {:?} appears in more than one layer",
                                    lp.as_str()
                                ),
                            );
                        }
                    }
                    Err(e) => report.error(&ann_path, e.to_string()),
                }
                if file_path.is_none() {
                    report.warning(
                        &ann_path,
                        format!("no {ANNOTATION_FILEPATH} annotation; using the OCI title"),
                    );
                }
            }
            None => report.warning(
                &ann_path,
                format!("no {ANNOTATION_FILEPATH} annotation: the layer's file has no name"),
            ),
        }
        if let Some((meta, _)) = annotation(
            layer,
            ANNOTATION_FILE_METADATA,
            LEGACY_ANNOTATION_FILE_METADATA,
        ) {
            match FileMetadata::from_annotation(meta) {
                Err(e) => report.error(&ann_path, e.to_string()),
                Ok(meta) => {
                    let raw = layer
                        .get("mediaType")
                        .and_then(Value::as_str)
                        .and_then(|mt| mt.parse::<LayerMediaType>().ok())
                        .is_some_and(|mt| mt.encoding == crate::Encoding::Raw);
                    let size = layer.get("size").and_then(Value::as_u64);
                    if raw
                        && meta.typeflag == crate::annotations::TYPEFLAG_REGULAR
                        && size.is_some()
                        && u64::try_from(meta.size).ok() != size
                    {
                        report.warning(
                            &ann_path,
                            format!(
                                "file metadata says {} bytes but the raw layer has {}: it will not be extracted",
                                meta.size,
                                size.unwrap_or_default()
                            ),
                        );
                    }
                }
            }
        }
        if let Some(digest) = layer.get("digest").and_then(Value::as_str)
            && let Ok(d) = digest.parse::<crate::Digest>()
            && !d.is_sha256()
        {
            report.warning(
                &format!("{path}.digest"),
                format!("{d}: only sha256 digests can be verified by modelpack"),
            );
        }
        if let Some((untested, _)) = annotation(
            layer,
            ANNOTATION_MEDIATYPE_UNTESTED,
            LEGACY_ANNOTATION_MEDIATYPE_UNTESTED,
        ) && untested != "true"
            && untested != "false"
        {
            report.error(
                &ann_path,
                format!("{ANNOTATION_MEDIATYPE_UNTESTED} must be \"true\" or \"false\", got {untested:?}"),
            );
        }
    }
    report
}

/// Validates manifest bytes.
pub fn validate_manifest(bytes: &[u8]) -> Report {
    match parse_document(bytes) {
        Ok(doc) => validate_manifest_value(&doc),
        Err(report) => report,
    }
}

/// Validates a manifest and its config together: each alone, then one diffId per layer, and for
/// uncompressed layers the diffId equal to the layer digest.
pub fn validate_artifact(manifest: &[u8], config: &[u8]) -> Report {
    let mut report = Report::default();
    let (manifest_doc, config_doc) = match (parse_document(manifest), parse_document(config)) {
        (Ok(m), Ok(c)) => (m, c),
        (m, c) => {
            if let Err(r) = m {
                report.extend(prefix(r, "manifest"));
            }
            if let Err(r) = c {
                report.extend(prefix(r, "config"));
            }
            return report;
        }
    };
    report.extend(prefix(validate_manifest_value(&manifest_doc), "manifest"));
    report.extend(prefix(validate_config_value(&config_doc), "config"));
    let layers = manifest_doc
        .get("layers")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let diff_ids = config_doc
        .pointer("/modelfs/diffIds")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if layers.len() != diff_ids.len() {
        report.error(
            "config:$.modelfs.diffIds",
            format!(
                "{} diffIds for {} layers; there must be one per layer",
                diff_ids.len(),
                layers.len()
            ),
        );
    }
    for (i, (layer, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
        let encoding = layer
            .get("mediaType")
            .and_then(Value::as_str)
            .and_then(|m| m.parse::<LayerMediaType>().ok())
            .map(|m| m.encoding);
        let digest = layer.get("digest").and_then(Value::as_str);
        if matches!(encoding, Some(Encoding::Raw | Encoding::Tar))
            && digest.is_some()
            && digest != diff_id.as_str()
        {
            report.error(
                &format!("config:$.modelfs.diffIds[{i}]"),
                format!(
                    "does not match the digest of uncompressed layer {i} ({})",
                    digest.unwrap_or_default()
                ),
            );
        }
    }
    report
}

fn prefix(mut report: Report, doc: &str) -> Report {
    for p in &mut report.problems {
        p.path = format!("{doc}:{}", p.path);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_size_syntax() {
        for good in ["8b", "6.7B", "1.0t", "100m", "1k", "2Q"] {
            assert!(is_param_size(good), "{good}");
        }
        for bad in ["8", "b", "6.75B", "8 b", "8g", ".5b", "8.b"] {
            assert!(!is_param_size(bad), "{bad}");
        }
    }

    #[test]
    fn duplicate_keys_found_with_path() {
        assert_eq!(
            find_duplicate_key(br#"{"a":{"b":1,"b":2}}"#).as_deref(),
            Some("$.a.b")
        );
        assert_eq!(find_duplicate_key(br#"{"a":[{"x":1},{"x":1}]}"#), None);
    }

    #[test]
    fn reports_paths() {
        let report = validate_config(
            br#"{"descriptor":{"name":""},"config":{"capabilities":{"languages":["en","EN"]}},"modelfs":{"type":"layers","diffIds":["sha256:xyz"]}}"#,
        );
        let paths: Vec<_> = report.errors().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "$.config.capabilities.languages[1]",
                "$.descriptor.name",
                "$.modelfs.diffIds[0]"
            ]
        );
    }
}
