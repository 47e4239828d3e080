//! Which files of a build context become which layers: walking the context, classifying files by
//! name and content, or resolving a Modelfile's globs.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use modelpack_spec::{LayerKind, LayerPath};
use modelpack_store::{IoContext, PathIoError};

use crate::error::{Error, Result};
use crate::modelfile::{Metadata, Modelfile, Selector};

/// Files above this size with an unknown type are taken for weights, below it for code.
pub const UNKNOWN_WEIGHT_THRESHOLD: u64 = 128 * 1024 * 1024;

/// What a planned file is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A regular file.
    File,
    /// A symbolic link whose target (kept as text, never followed) stays inside the context.
    Symlink(String),
}

/// One file that becomes one layer.
#[derive(Debug, Clone)]
pub struct PlannedFile {
    /// Path inside the model.
    pub path: LayerPath,
    /// Where it is on disk.
    pub abs: PathBuf,
    /// Regular file or symlink.
    pub source: Source,
    /// Layer kind.
    pub kind: LayerKind,
    /// True when the kind was guessed.
    pub untested: bool,
}

/// An entry found walking the context.
#[derive(Debug, Clone)]
struct Entry {
    rel: String,
    abs: PathBuf,
    kind: EntryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    File,
    Symlink,
    Dir,
}

fn glob(pattern: &str) -> Result<globset::Glob> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| Error::Pattern {
            pattern: pattern.to_owned(),
            message: e.kind().to_string(),
        })
}

/// Compiles `--exclude` globs.
pub fn exclude_set(patterns: &[String]) -> Result<GlobSet> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(glob(p.trim_start_matches("./").trim_end_matches('/'))?);
    }
    builder.build().map_err(|e| Error::Pattern {
        pattern: patterns.join(" "),
        message: e.to_string(),
    })
}

fn is_hidden(rel: &str) -> bool {
    rel.split('/')
        .any(|c| c.starts_with('.') || c == "__pycache__")
}

fn always_skipped(rel: &str) -> bool {
    rel.split('/')
        .any(|c| c == ".git" || c.starts_with(".modelpack-"))
}

fn walk(context: &Path, excludes: &GlobSet) -> Result<Vec<Entry>> {
    let meta = fs::metadata(context).at(context)?;
    if !meta.is_dir() {
        return Err(Error::Unsupported {
            path: context.to_owned(),
            reason: "the build context is not a directory".into(),
        });
    }
    let mut out = Vec::new();
    let mut it = walkdir::WalkDir::new(context)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter();
    while let Some(next) = it.next() {
        let entry = next.map_err(|e| {
            let path = e.path().map_or_else(|| context.to_owned(), Path::to_owned);
            Error::Io(PathIoError {
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("walk failed")),
            })
        })?;
        let rel_path = entry.path().strip_prefix(context).unwrap_or(entry.path());
        let Some(rel) = rel_path.to_str().map(str::to_owned) else {
            return Err(Error::Unsupported {
                path: entry.path().to_owned(),
                reason: "file name is not UTF-8".into(),
            });
        };
        let ft = entry.file_type();
        if always_skipped(&rel) || excludes.is_match(&rel) {
            if ft.is_dir() {
                it.skip_current_dir();
            }
            continue;
        }
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_file() {
            EntryKind::File
        } else {
            tracing::warn!(path = %entry.path().display(), "skipping a device, socket or FIFO");
            continue;
        };
        out.push(Entry {
            rel,
            abs: entry.path().to_owned(),
            kind,
        });
    }
    Ok(out)
}

/// Checks a symlink's target stays inside the context and returns it as text.
fn symlink_target(entry: &Entry) -> Result<String> {
    let target = fs::read_link(&entry.abs).at(&entry.abs)?;
    let Some(text) = target.to_str().map(str::to_owned) else {
        return Err(Error::Unsupported {
            path: entry.abs.clone(),
            reason: "symlink target is not UTF-8".into(),
        });
    };
    if !modelpack_spec::link_stays_inside(&entry.rel, &text) {
        return Err(Error::SymlinkEscape {
            path: entry.rel.clone(),
            target: text,
        });
    }
    Ok(text)
}

fn planned(entry: &Entry, kind: LayerKind, untested: bool) -> Result<PlannedFile> {
    let source = match entry.kind {
        EntryKind::Symlink => Source::Symlink(symlink_target(entry)?),
        _ => Source::File,
    };
    Ok(PlannedFile {
        path: LayerPath::new(&entry.rel)?,
        abs: entry.abs.clone(),
        source,
        kind,
        untested,
    })
}

/// Resolves a Modelfile's selectors against the context: the first selector matching a file
/// decides its kind; a selector matching nothing is an error.
pub fn plan_from_modelfile(
    context: &Path,
    modelfile: &Modelfile,
    excludes: &GlobSet,
) -> Result<Vec<PlannedFile>> {
    let entries = walk(context, excludes)?;
    let mut chosen: Vec<Option<LayerKind>> = vec![None; entries.len()];
    for Selector {
        kind,
        pattern,
        line,
    } in &modelfile.selectors
    {
        let cleaned = pattern.trim_start_matches("./").trim_end_matches('/');
        if cleaned.starts_with('/') || cleaned.split('/').any(|c| c == "..") || cleaned.is_empty() {
            return Err(Error::Pattern {
                pattern: pattern.clone(),
                message: format!("(line {line}) escapes the build context"),
            });
        }
        let allow_hidden = cleaned.split('/').any(|c| c.starts_with('.'));
        let matcher = glob(cleaned)?.compile_matcher();
        let mut dirs: Vec<&str> = Vec::new();
        let mut any = false;
        for (idx, entry) in entries.iter().enumerate() {
            if !allow_hidden && is_hidden(&entry.rel) && entry.rel != cleaned {
                continue;
            }
            let under_dir = dirs.iter().any(|d| {
                entry.rel.len() > d.len()
                    && entry.rel.starts_with(d)
                    && entry.rel.as_bytes()[d.len()] == b'/'
            });
            let hit = entry.rel == cleaned || matcher.is_match(&entry.rel) || under_dir;
            if !hit {
                continue;
            }
            any = true;
            match entry.kind {
                EntryKind::Dir => dirs.push(&entry.rel),
                _ => {
                    if chosen[idx].is_none() {
                        chosen[idx] = Some(*kind);
                    }
                }
            }
        }
        if !any {
            return Err(Error::Pattern {
                pattern: pattern.clone(),
                message: format!("(line {line}, {}) matches no file", kind.directive()),
            });
        }
    }
    let mut out = Vec::new();
    for (entry, kind) in entries.iter().zip(chosen) {
        if let Some(kind) = kind {
            out.push(planned(entry, kind, false)?);
        }
    }
    if out.is_empty() {
        return Err(Error::NoFiles(context.to_owned()));
    }
    Ok(out)
}

/// Plans a build without a Modelfile: every file not hidden or excluded, classified by name and
/// content.
pub fn plan_auto(context: &Path, excludes: &GlobSet) -> Result<Vec<PlannedFile>> {
    let mut out = Vec::new();
    for entry in walk(context, excludes)? {
        if entry.kind == EntryKind::Dir || is_hidden(&entry.rel) || skipped_by_default(&entry.rel) {
            continue;
        }
        let (kind, untested) = match entry.kind {
            EntryKind::Symlink => {
                classify_name(&entry.rel).map_or((LayerKind::Code, true), |k| (k, false))
            }
            _ => classify(&entry.rel, &entry.abs)?,
        };
        out.push(planned(&entry, kind, untested)?);
    }
    if out.is_empty() {
        return Err(Error::NoFiles(context.to_owned()));
    }
    Ok(out)
}

fn skipped_by_default(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name == "Modelfile" || [".pyc", ".pyo", ".pyd"].iter().any(|x| name.ends_with(x))
}

const WEIGHT_EXTS: &[&str] = &[
    "safetensors",
    "gguf",
    "ggml",
    "bin",
    "pt",
    "pth",
    "onnx",
    "h5",
    "hdf5",
    "ckpt",
    "msgpack",
    "tflite",
    "pb",
    "ot",
    "npz",
    "npy",
    "mlmodel",
    "pdparams",
    "engine",
    "plan",
    "trt",
    "caffemodel",
    "params",
    "nemo",
    "keras",
    "joblib",
    "pkl",
    "pickle",
    "mar",
    "llamafile",
];
const CONFIG_NAMES: &[&str] = &[
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
];
const CONFIG_EXTS: &[&str] = &["json", "yaml", "yml", "tiktoken", "vocab", "model"];
const DOC_PREFIXES: &[&str] = &[
    "readme",
    "license",
    "licence",
    "notice",
    "copying",
    "changelog",
    "authors",
    "citation",
];
const DOC_EXTS: &[&str] = &[
    "md", "txt", "rst", "pdf", "html", "htm", "png", "jpg", "jpeg", "gif", "svg", "webp", "cff",
];
const CODE_NAMES: &[&str] = &[
    "requirements.txt",
    "Makefile",
    "Dockerfile",
    "pyproject.toml",
    "setup.cfg",
    "setup.py",
];
const CODE_EXTS: &[&str] = &[
    "py", "ipynb", "sh", "bash", "js", "ts", "c", "cc", "cpp", "h", "hpp", "cu", "cuh", "go", "rs",
    "java", "rb", "lua", "jl", "r", "pl", "swift", "kt", "scala", "cmake", "toml", "cfg", "ini",
    "proto", "mojo", "wgsl", "metal",
];
const DATASET_EXTS: &[&str] = &[
    "parquet", "arrow", "csv", "tsv", "jsonl", "avro", "tfrecord", "feather",
];

/// The kind a file's name alone says, if it says one.
pub fn classify_name(rel: &str) -> Option<LayerKind> {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    if CODE_NAMES.contains(&name) {
        return Some(LayerKind::Code);
    }
    if CONFIG_NAMES.contains(&lower.as_str()) {
        return Some(LayerKind::WeightConfig);
    }
    if DOC_PREFIXES.iter().any(|p| lower.starts_with(p)) || DOC_EXTS.contains(&ext) {
        return Some(LayerKind::Doc);
    }
    if DATASET_EXTS.contains(&ext) {
        return Some(LayerKind::Dataset);
    }
    if WEIGHT_EXTS.contains(&ext) {
        return Some(LayerKind::Weight);
    }
    if CONFIG_EXTS.contains(&ext) {
        return Some(LayerKind::WeightConfig);
    }
    if CODE_EXTS.contains(&ext) {
        return Some(LayerKind::Code);
    }
    None
}

/// The kind the first bytes of a file say (GGUF, safetensors, PyTorch zip, ONNX-less guesses).
fn classify_content(head: &[u8], size: u64) -> Option<LayerKind> {
    if head.starts_with(b"GGUF") {
        return Some(LayerKind::Weight);
    }
    if head.len() >= 9 {
        let header_len = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        if header_len > 1 && header_len < size && head[8] == b'{' {
            return Some(LayerKind::Weight);
        }
    }
    if head.starts_with(b"PK\x03\x04") && size > 1024 * 1024 {
        return Some(LayerKind::Weight);
    }
    if head.starts_with(b"PAR1") {
        return Some(LayerKind::Dataset);
    }
    None
}

/// Classifies one regular file: by name, then by content, then by size (marked untested).
pub fn classify(rel: &str, abs: &Path) -> Result<(LayerKind, bool)> {
    if let Some(kind) = classify_name(rel) {
        return Ok((kind, false));
    }
    let size = fs::metadata(abs).at(abs)?.len();
    let mut head = [0u8; 16];
    let n = File::open(abs)
        .and_then(|mut f| f.read(&mut head))
        .at(abs)?;
    if let Some(kind) = classify_content(&head[..n], size) {
        return Ok((kind, false));
    }
    if size > UNKNOWN_WEIGHT_THRESHOLD {
        Ok((LayerKind::Weight, true))
    } else {
        Ok((LayerKind::Code, true))
    }
}

/// Metadata guessed from the context: name from the folder, family/precision/architecture from a
/// Hugging Face `config.json`, format from the weights' extension.
pub fn infer_metadata(context: &Path, files: &[PlannedFile]) -> Metadata {
    let mut meta = Metadata {
        name: context
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
        ..Metadata::default()
    };
    let config_path = context.join("config.json");
    if let Ok(bytes) = fs::read(&config_path)
        && bytes.len() < 4 * 1024 * 1024
        && let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes)
    {
        let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        meta.family = text("model_type");
        meta.precision = text("torch_dtype").or_else(|| text("dtype"));
        if doc.get("transformers_version").is_some() {
            meta.arch = Some("transformer".into());
        }
    }
    meta.format = files
        .iter()
        .filter(|f| f.kind == LayerKind::Weight)
        .find_map(|f| {
            let ext = f.path.file_name().rsplit_once('.')?.1.to_ascii_lowercase();
            match ext.as_str() {
                "safetensors" | "gguf" | "onnx" | "pt" | "tflite" | "h5" | "keras" => Some(ext),
                "pth" => Some("pt".to_owned()),
                _ => None,
            }
        });
    meta
}

/// The Modelfile that selects exactly `files`, one directive per file, with `metadata`.
pub fn modelfile_for(files: &[PlannedFile], metadata: Metadata) -> Modelfile {
    Modelfile {
        metadata,
        selectors: files
            .iter()
            .map(|f| Selector {
                kind: f.kind,
                // Escape glob characters so the path matches only itself.
                pattern: f
                    .path
                    .as_str()
                    .chars()
                    .flat_map(|c| {
                        let escape = matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\');
                        escape.then_some('\\').into_iter().chain(std::iter::once(c))
                    })
                    .collect(),
                line: 0,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify() {
        for (name, kind) in [
            ("model-00001-of-00002.safetensors", LayerKind::Weight),
            ("config.json", LayerKind::WeightConfig),
            ("tokenizer.model", LayerKind::WeightConfig),
            ("vocab.txt", LayerKind::WeightConfig),
            ("README.md", LayerKind::Doc),
            ("LICENSE", LayerKind::Doc),
            ("src/modeling.py", LayerKind::Code),
            ("requirements.txt", LayerKind::Code),
            ("data/train.parquet", LayerKind::Dataset),
        ] {
            assert_eq!(classify_name(name), Some(kind), "{name}");
        }
        assert_eq!(classify_name("blob.xyz"), None);
    }

    #[test]
    fn content_classifies() {
        assert_eq!(
            classify_content(b"GGUF\x03\0\0\0", 100),
            Some(LayerKind::Weight)
        );
        let mut st = 10u64.to_le_bytes().to_vec();
        st.push(b'{');
        assert_eq!(classify_content(&st, 1000), Some(LayerKind::Weight));
        assert_eq!(classify_content(b"hello world!", 12), None);
    }

    #[test]
    fn symlink_escapes_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("sub")).expect("mkdir");
        fs::write(dir.path().join("a.bin"), b"x").expect("write");
        std::os::unix::fs::symlink("../a.bin", dir.path().join("sub/ok")).expect("link");
        std::os::unix::fs::symlink("../../etc/passwd", dir.path().join("sub/bad")).expect("link");
        let err = plan_auto(dir.path(), &exclude_set(&[]).expect("set")).expect_err("escape");
        assert!(matches!(err, Error::SymlinkEscape { .. }), "{err}");
        let plan =
            plan_auto(dir.path(), &exclude_set(&["sub/bad".into()]).expect("set")).expect("plan");
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[1].source, Source::Symlink("../a.bin".into()));
    }

    #[test]
    fn modelfile_globs() {
        let dir = tempfile::tempdir().expect("tempdir");
        for p in [
            "a/b/c.bin",
            "a/x.json",
            "top.bin",
            "docs/README.md",
            ".hidden.bin",
        ] {
            let path = dir.path().join(p);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, p).expect("write");
        }
        let mf = Modelfile::parse("MODEL **/*.bin\nCONFIG a\nDOC docs/\n").expect("parse");
        let plan =
            plan_from_modelfile(dir.path(), &mf, &exclude_set(&[]).expect("set")).expect("plan");
        let got: Vec<_> = plan.iter().map(|p| (p.path.as_str(), p.kind)).collect();
        assert_eq!(
            got,
            [
                ("a/b/c.bin", LayerKind::Weight),
                ("a/x.json", LayerKind::WeightConfig),
                ("docs/README.md", LayerKind::Doc),
                ("top.bin", LayerKind::Weight),
            ]
        );
        for bad in ["MODEL ../x\n", "MODEL /etc/passwd\n", "MODEL *.nothing\n"] {
            let mf = Modelfile::parse(bad).expect("parse");
            assert!(
                plan_from_modelfile(dir.path(), &mf, &exclude_set(&[]).expect("set")).is_err(),
                "{bad}"
            );
        }
    }
}
