//! The extraction plan: every entry of every layer, checked before anything is written.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};

use filetime::FileTime;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use modelpack_spec::{Encoding, LayerPath, ModelLayer, ModelManifest};

use crate::error::{Error, Result};
use crate::{LayerBlob, LayerSource};

/// What one entry becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryPlan {
    /// A raw layer: the whole blob is the file.
    RawFile {
        /// Size in bytes.
        size: u64,
    },
    /// A regular file inside a tar layer.
    TarFile {
        /// Size in bytes.
        size: u64,
        /// Where its bytes start in the uncompressed tar stream.
        offset: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link (target checked to stay inside the tree).
    Symlink {
        /// The link text.
        target: String,
    },
    /// A hard link to a file earlier in the same layer.
    HardLink {
        /// The linked file.
        target: LayerPath,
    },
}

/// One planned entry.
#[derive(Debug, Clone)]
pub struct PlannedEntry {
    /// Index of the layer in the manifest.
    pub layer: usize,
    /// Position of the entry in its tar (0 for raw layers).
    pub seq: usize,
    /// Where it goes, relative to the target.
    pub path: LayerPath,
    /// What it is.
    pub kind: EntryPlan,
    /// Permission bits (setuid, setgid and sticky are dropped).
    pub mode: u32,
    /// Modification time to restore.
    pub mtime: Option<FileTime>,
    /// False when `--pattern` leaves it out.
    pub selected: bool,
}

/// Every entry of a model, in layer order.
#[derive(Debug, Clone, Default)]
pub struct ExtractPlan {
    /// The layers, in manifest order.
    pub layers: Vec<LayerBlob>,
    /// Entries, selected or not.
    pub entries: Vec<PlannedEntry>,
}

impl ExtractPlan {
    /// The selected entries.
    pub fn selected(&self) -> impl Iterator<Item = &PlannedEntry> {
        self.entries.iter().filter(|e| e.selected)
    }
}

/// The `--pattern` globs, compiled once: what [`plan`] selects by.
#[derive(Debug, Clone)]
pub struct Patterns(Option<GlobSet>);

impl Patterns {
    /// Compiles `patterns` (empty: every path matches).
    pub fn new(patterns: &[String]) -> Result<Patterns> {
        Ok(Patterns(pattern_set(patterns)?))
    }

    /// True when `path` is selected.
    pub fn matches(&self, path: &str) -> bool {
        self.0.as_ref().is_none_or(|set| set.is_match(path))
    }
}

pub(crate) fn pattern_set(patterns: &[String]) -> Result<Option<GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        let glob = GlobBuilder::new(p.trim_start_matches("./"))
            .literal_separator(true)
            .build()
            .map_err(|e| Error::Pattern {
                pattern: p.clone(),
                message: e.kind().to_string(),
            })?;
        builder.add(glob);
    }
    builder.build().map(Some).map_err(|e| Error::Pattern {
        pattern: patterns.join(" "),
        message: e.to_string(),
    })
}

/// The decompressed tar stream of a tar layer, which fails once it grows past `cap` bytes (the
/// guard against decompression bombs).
pub(crate) fn tar_stream<'a>(
    encoding: Encoding,
    raw: Box<dyn Read + 'a>,
    cap: u64,
) -> io::Result<Box<dyn Read + 'a>> {
    let inner: Box<dyn Read + 'a> = match encoding {
        Encoding::Raw | Encoding::Tar => raw,
        Encoding::TarGzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        Encoding::TarZstd => Box::new(zstd::stream::read::Decoder::new(raw)?),
    };
    Ok(Box::new(Capped {
        inner,
        left: cap,
        cap,
    }))
}

/// Room a tar stream needs besides its files' bytes: headers, pax records, padding, the end
/// blocks and record rounding.
const TAR_OVERHEAD: u64 = 1 << 20;

/// The most a layer's tar stream may unpack to: for a layer whose file metadata annotation
/// describes one regular file, that file's size plus the tar overhead; otherwise no cap here
/// (extraction then checks the planned sizes against the free space of the target).
fn declared_cap(layer: &ModelLayer) -> u64 {
    match &layer.metadata {
        Some(meta)
            if meta.typeflag == modelpack_spec::annotations::TYPEFLAG_REGULAR && meta.size >= 0 =>
        {
            (meta.size as u64).saturating_add(TAR_OVERHEAD)
        }
        _ => u64::MAX,
    }
}

/// Says a decompressed stream grew past its cap.
#[derive(Debug)]
pub(crate) struct OverCap(pub u64);

impl std::fmt::Display for OverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unpacks to more than the {} bytes it declares (decompression bomb?)",
            self.0
        )
    }
}

impl std::error::Error for OverCap {}

/// A reader that fails with [`OverCap`] past `cap` bytes.
struct Capped<'a> {
    inner: Box<dyn Read + 'a>,
    left: u64,
    cap: u64,
}

impl Read for Capped<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(OverCap(self.cap)));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn blob_of(layer: &ModelLayer) -> LayerBlob {
    LayerBlob {
        digest: layer.digest.clone(),
        size: layer.size(),
        encoding: layer.media_type.encoding,
    }
}

fn refused(layer: &LayerBlob, path: &str, reason: impl Into<String>) -> Error {
    Error::Refused {
        layer: layer.digest.clone(),
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// True when `target`, read from a link at `link`, stays inside the tree and has no NUL bytes or
/// backslashes.
fn link_stays_inside(link: &LayerPath, target: &str) -> bool {
    !target.contains('\0')
        && !target.contains('\\')
        && modelpack_spec::link_stays_inside(link.as_str(), target)
}

fn file_time(meta: &modelpack_spec::FileMetadata) -> FileTime {
    FileTime::from_unix_time(meta.mtime.timestamp(), meta.mtime.timestamp_subsec_nanos())
}

fn plan_raw(idx: usize, layer: &ModelLayer) -> Result<PlannedEntry> {
    if let Some(meta) = &layer.metadata
        && meta.size >= 0
        && meta.size as u64 != layer.size()
    {
        return Err(Error::Layer {
            digest: layer.digest.clone(),
            message: format!(
                "file metadata says {} bytes but the raw layer has {}",
                meta.size,
                layer.size()
            ),
        });
    }
    Ok(PlannedEntry {
        layer: idx,
        seq: 0,
        path: layer.path.clone(),
        kind: EntryPlan::RawFile { size: layer.size() },
        mode: layer.metadata.as_ref().map_or(0o644, |m| m.mode & 0o777),
        mtime: layer.metadata.as_ref().map(file_time),
        selected: true,
    })
}

fn plan_tar(
    idx: usize,
    layer: &LayerBlob,
    cap: u64,
    source: &dyn LayerSource,
) -> Result<Vec<PlannedEntry>> {
    let io_err = |e: io::Error| Error::Layer {
        digest: layer.digest.clone(),
        message: match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<OverCap>())
        {
            Some(over) => over.to_string(),
            None => format!("reading tar: {e}"),
        },
    };
    match source.open_tar_seekable(layer)? {
        Some(seekable) => {
            let mut archive = tar::Archive::new(seekable);
            let entries = archive.entries_with_seek().map_err(io_err)?;
            plan_entries(idx, layer, cap, entries, &io_err)
        }
        None => {
            let raw = source.open_layer(layer)?;
            let mut archive =
                tar::Archive::new(tar_stream(layer.encoding, raw, cap).map_err(io_err)?);
            let entries = archive.entries().map_err(io_err)?;
            plan_entries(idx, layer, cap, entries, &io_err)
        }
    }
}

/// Plans the entries of one tar layer.
fn plan_entries<R: Read>(
    idx: usize,
    layer: &LayerBlob,
    cap: u64,
    entries: tar::Entries<'_, R>,
    io_err: &dyn Fn(io::Error) -> Error,
) -> Result<Vec<PlannedEntry>> {
    let mut file_bytes = 0u64;
    let mut out = Vec::new();
    let mut files_in_layer = HashSet::new();
    for (seq, entry) in entries.enumerate() {
        let entry = entry.map_err(io_err)?;
        let header = entry.header();
        let raw_path = entry.path_bytes();
        let Ok(name) = std::str::from_utf8(&raw_path) else {
            return Err(refused(
                layer,
                &String::from_utf8_lossy(&raw_path),
                "name is not UTF-8",
            ));
        };
        let name = name.to_owned();
        let entry_type = header.entry_type();
        if entry_type.is_pax_global_extensions() {
            continue;
        }
        let trimmed = name.trim_start_matches("./");
        if entry_type.is_dir() && (trimmed.is_empty() || trimmed == ".") {
            continue;
        }
        let path = LayerPath::new(&name).map_err(|e| refused(layer, &name, e.to_string()))?;
        let mode = header.mode().map_err(io_err)? & 0o777;
        let mtime = header
            .mtime()
            .ok()
            .map(|t| FileTime::from_unix_time(i64::try_from(t).unwrap_or(0), 0));
        let kind = if entry_type.is_file() || entry_type == tar::EntryType::Continuous {
            // Refuse from the header alone, before decompressing what it announces.
            file_bytes = file_bytes.saturating_add(entry.size());
            if file_bytes > cap {
                return Err(io_err(io::Error::other(OverCap(cap))));
            }
            files_in_layer.insert(path.clone());
            EntryPlan::TarFile {
                size: entry.size(),
                offset: entry.raw_file_position(),
            }
        } else if entry_type.is_dir() {
            EntryPlan::Dir
        } else if entry_type.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if !link_stays_inside(&path, &target) {
                return Err(refused(
                    layer,
                    &name,
                    format!("symlink to {target:?} leaves the model tree"),
                ));
            }
            EntryPlan::Symlink { target }
        } else if entry_type.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let target = LayerPath::new(&target)
                .map_err(|e| refused(layer, &name, format!("hard link target: {e}")))?;
            if !files_in_layer.contains(&target) {
                return Err(refused(
                    layer,
                    &name,
                    format!("hard link to {target} which is not an earlier file of this layer"),
                ));
            }
            EntryPlan::HardLink { target }
        } else {
            return Err(refused(
                layer,
                &name,
                format!(
                    "unsupported entry type {entry_type:?} (devices, FIFOs and sparse files are not model files)"
                ),
            ));
        };
        out.push(PlannedEntry {
            layer: idx,
            seq,
            path,
            kind,
            mode,
            mtime,
            selected: true,
        });
    }
    Ok(out)
}

/// Reads every layer's entries and checks them: safe paths, links that stay inside, no entry
/// under a symlink, no path twice, no file where a folder must be.
pub fn plan(
    manifest: &ModelManifest,
    source: &dyn LayerSource,
    patterns: &[String],
) -> Result<ExtractPlan> {
    plan_layers(manifest, source, patterns, &|_| true)
}

/// Like [`plan`], over only the layers `keep` accepts (the others are neither read nor
/// planned; entry layer numbers stay manifest positions).
pub fn plan_layers(
    manifest: &ModelManifest,
    source: &dyn LayerSource,
    patterns: &[String],
    keep: &dyn Fn(&modelpack_spec::Digest) -> bool,
) -> Result<ExtractPlan> {
    let layers: Vec<LayerBlob> = manifest.layers().iter().map(blob_of).collect();
    let mut entries = Vec::new();
    for (idx, layer) in manifest.layers().iter().enumerate() {
        if !keep(&layer.digest) {
            continue;
        }
        if layer.media_type.encoding == Encoding::Raw {
            if layer.is_unnamed_file() {
                tracing::warn!(digest = %layer.digest, path = %layer.path, "a raw layer names no file; its bytes are written under its digest");
            }
            entries.push(plan_raw(idx, layer)?);
        } else {
            entries.extend(plan_tar(idx, &layers[idx], declared_cap(layer), source)?);
        }
    }
    finish_plan(layers, entries, patterns)
}

/// Plans one tar layer on its own (no manifest): its entries, checked as [`plan`] checks them.
/// `declared` is the size its annotations give its one file, if they do (the decompressed stream
/// is capped by it).
pub fn plan_tar_layer(
    layer: LayerBlob,
    declared: Option<u64>,
    source: &dyn LayerSource,
) -> Result<ExtractPlan> {
    let cap = declared.map_or(u64::MAX, |d| d.saturating_add(TAR_OVERHEAD));
    let entries = plan_tar(0, &layer, cap, source)?;
    finish_plan(vec![layer], entries, &[])
}

/// Plans plain files, one raw blob each (artifacts pushed by `oras push`, named by their OCI
/// title).
pub fn plan_files(files: Vec<(LayerPath, LayerBlob)>, patterns: &[String]) -> Result<ExtractPlan> {
    let mut layers = Vec::new();
    let mut entries = Vec::new();
    for (idx, (path, blob)) in files.into_iter().enumerate() {
        entries.push(PlannedEntry {
            layer: idx,
            seq: 0,
            path,
            kind: EntryPlan::RawFile { size: blob.size },
            mode: 0o644,
            mtime: None,
            selected: true,
        });
        layers.push(LayerBlob {
            encoding: Encoding::Raw,
            ..blob
        });
    }
    finish_plan(layers, entries, patterns)
}

fn finish_plan(
    layers: Vec<LayerBlob>,
    mut entries: Vec<PlannedEntry>,
    patterns: &[String],
) -> Result<ExtractPlan> {
    if let Some(set) = &pattern_set(patterns)? {
        for e in &mut entries {
            e.selected = !matches!(e.kind, EntryPlan::Dir) && set.is_match(e.path.as_str());
        }
        // A selected hard link needs its target.
        let needed: HashSet<(usize, LayerPath)> = entries
            .iter()
            .filter(|e| e.selected)
            .filter_map(|e| match &e.kind {
                EntryPlan::HardLink { target } => Some((e.layer, target.clone())),
                _ => None,
            })
            .collect();
        for e in &mut entries {
            if needed.contains(&(e.layer, e.path.clone())) {
                e.selected = true;
            }
        }
    }
    let mut kinds: HashMap<&str, &EntryPlan> = HashMap::new();
    for e in entries.iter().filter(|e| e.selected) {
        let previous = kinds.insert(e.path.as_str(), &e.kind);
        if previous.is_some()
            && !(matches!(previous, Some(EntryPlan::Dir)) && e.kind == EntryPlan::Dir)
        {
            return Err(refused(
                &layers[e.layer],
                e.path.as_str(),
                "path appears more than once in the model",
            ));
        }
    }
    for e in entries.iter().filter(|e| e.selected) {
        let comps: Vec<&str> = e.path.components().collect();
        for end in 1..comps.len() {
            let ancestor = comps[..end].join("/");
            match kinds.get(ancestor.as_str()) {
                None | Some(EntryPlan::Dir) => {}
                Some(EntryPlan::Symlink { .. }) => {
                    return Err(refused(
                        &layers[e.layer],
                        e.path.as_str(),
                        format!("{ancestor} is a symlink; writing under it could leave the tree"),
                    ));
                }
                Some(_) => {
                    return Err(refused(
                        &layers[e.layer],
                        e.path.as_str(),
                        format!("{ancestor} is a file, not a folder"),
                    ));
                }
            }
        }
    }
    Ok(ExtractPlan { layers, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_inside_and_out() {
        let p = LayerPath::new("a/b/link").expect("path");
        assert!(link_stays_inside(&p, "../x"));
        assert!(link_stays_inside(&p, "c/d"));
        assert!(!link_stays_inside(&p, "../../../x"));
        assert!(!link_stays_inside(&p, "/etc/passwd"));
        assert!(!link_stays_inside(&p, "../.."));
    }
}
