//! Staging and committing: layers stream into a hidden folder inside the target, each verified
//! against its digest, and only then are files renamed into place.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use filetime::FileTime;
use modelpack_spec::{Digest, Encoding, LayerPath};
use modelpack_store::{IoContext, create_new_private};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::plan::{EntryPlan, ExtractPlan, OverCap, PlannedEntry, tar_stream};
use crate::{ExtractReport, LayerBlob, LayerSource};

/// The I/O error a cancelled read returns (not `Interrupted`, which readers retry).
#[derive(Debug)]
struct CancelledMarker;

impl std::fmt::Display for CancelledMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for CancelledMarker {}

/// Reads a layer blob, hashing and counting every byte, checking for cancellation.
struct Verifying<'a> {
    inner: Box<dyn Read + Send + 'a>,
    hasher: Sha256,
    count: u64,
    cancel: Option<&'a AtomicBool>,
}

impl Read for Verifying<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(io::Error::other(CancelledMarker));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl Verifying<'_> {
    fn check(mut self, layer: &LayerBlob) -> Result<()> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| layer_io(layer, e))?;
        if self.count != layer.size {
            return Err(Error::Layer {
                digest: layer.digest.clone(),
                message: format!("expected {} bytes, read {}", layer.size, self.count),
            });
        }
        let actual = Digest::from_sha256(self.hasher.finalize().into());
        if actual != layer.digest {
            return Err(Error::DigestMismatch {
                expected: layer.digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Lets the tar reader and the final digest check share one verifying stream.
struct Shared<'a>(Rc<RefCell<Verifying<'a>>>);

impl Read for Shared<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

fn layer_io(layer: &LayerBlob, e: io::Error) -> Error {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<CancelledMarker>())
    {
        return Error::Cancelled;
    }
    let message = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<OverCap>())
    {
        Some(over) => over.to_string(),
        None => e.to_string(),
    };
    Error::Layer {
        digest: layer.digest.clone(),
        message,
    }
}

/// Bytes free to an unprivileged writer on the file system holding `path`, if it can be told.
fn free_bytes(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuses a plan whose files cannot fit in the target's free space, before writing anything:
/// a tar layer that unpacks to more than the disk holds (a decompression bomb among them) fails
/// here in one line instead of filling the disk.
fn check_space(target: &Path, plan: &ExtractPlan) -> Result<()> {
    let Some(free) = free_bytes(target) else {
        return Ok(());
    };
    let mut needed = 0u64;
    let mut largest: Option<&PlannedEntry> = None;
    for e in plan.selected() {
        let size = match e.kind {
            EntryPlan::RawFile { size } | EntryPlan::TarFile { size, .. } => size,
            _ => continue,
        };
        // A file already there with the same size is probably skipped as identical.
        if existing_regular(&target.join(e.path.as_str()), size).is_some() {
            continue;
        }
        needed = needed.saturating_add(size);
        if largest.is_none_or(|l| entry_size(l) < size) {
            largest = Some(e);
        }
    }
    if needed <= free {
        return Ok(());
    }
    let layer = largest.map_or_else(
        || plan.layers[0].digest.clone(),
        |e| plan.layers[e.layer].digest.clone(),
    );
    Err(Error::Layer {
        digest: layer,
        message: format!(
            "the model unpacks to {needed} bytes but {} has {free} bytes free; nothing was written",
            target.display()
        ),
    })
}

fn entry_size(e: &PlannedEntry) -> u64 {
    match e.kind {
        EntryPlan::RawFile { size } | EntryPlan::TarFile { size, .. } => size,
        _ => 0,
    }
}

/// A staged item waiting to be renamed into place.
#[derive(Debug)]
enum Staged {
    File { staged: PathBuf, path: LayerPath },
    Dir { path: LayerPath, mode: u32 },
    HardLink { path: LayerPath, target: LayerPath },
}

fn finish_file(path: &Path, mode: u32, mtime: Option<FileTime>) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at(path)?;
    if let Some(t) = mtime {
        filetime::set_file_mtime(path, t).at(path)?;
    }
    Ok(())
}

/// True when `existing` is a regular file with exactly `size` bytes whose sha256 is `digest`.
fn identical_raw(existing: &Path, size: u64, digest: &Digest) -> bool {
    match fs::symlink_metadata(existing) {
        Ok(m) if m.is_file() && m.len() == size => {
            modelpack_store::sha256_file(existing).is_ok_and(|(d, _)| &d == digest)
        }
        _ => false,
    }
}

/// Copies `src` to `dst`, and tells whether the bytes equal those of `compare` (if given).
fn copy_comparing(
    src: &mut impl Read,
    dst: &mut File,
    mut compare: Option<File>,
) -> io::Result<(u64, bool)> {
    let mut buf = vec![0u8; 1 << 20];
    let mut other = vec![0u8; 1 << 20];
    let mut same = compare.is_some();
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])?;
        total += n as u64;
        if same
            && let Some(c) = compare.as_mut()
            && (c.read_exact(&mut other[..n]).is_err() || other[..n] != buf[..n])
        {
            same = false;
            compare = None;
        }
    }
    if same && let Some(mut c) = compare {
        same = c.read(&mut other[..1])? == 0;
    }
    Ok((total, same))
}

fn existing_regular(path: &Path, size: u64) -> Option<File> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() && m.len() == size => File::open(path).ok(),
        _ => None,
    }
}

/// Checks what already exists in the target: no ancestor of a planned path may be a symlink or a
/// file, and no planned file may land on a folder.
fn check_target(target: &Path, plan: &ExtractPlan, layers: &[LayerBlob]) -> Result<()> {
    for e in plan.selected() {
        let comps: Vec<&str> = e.path.components().collect();
        let mut dir = target.to_owned();
        for c in &comps[..comps.len() - 1] {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Refused {
                        layer: layers[e.layer].digest.clone(),
                        path: e.path.to_string(),
                        reason: format!("{} in the target is not a folder", dir.display()),
                    });
                }
                Err(_) => break,
            }
        }
        let final_path = target.join(e.path.as_str());
        if e.kind != EntryPlan::Dir && fs::symlink_metadata(&final_path).is_ok_and(|m| m.is_dir()) {
            return Err(Error::Refused {
                layer: layers[e.layer].digest.clone(),
                path: e.path.to_string(),
                reason: format!("{} is a folder in the target", final_path.display()),
            });
        }
    }
    Ok(())
}

/// Stages, verifies and commits a checked plan into `target`.
pub fn extract_planned(
    source: &dyn LayerSource,
    plan: &ExtractPlan,
    target: &Path,
    cancel: Option<&AtomicBool>,
) -> Result<ExtractReport> {
    let layers = &plan.layers;
    let created_target = !target.exists();
    fs::create_dir_all(target).at(target)?;
    let result = (|| {
        check_target(target, plan, layers)?;
        check_space(target, plan)?;
        let staging = tempfile::Builder::new()
            .prefix(".modelpack-extract-")
            .tempdir_in(target)
            .at(target)?;
        let mut report = ExtractReport::default();
        let mut staged = Vec::new();
        let mut by_layer: HashMap<usize, Vec<&PlannedEntry>> = HashMap::new();
        for e in plan.selected() {
            by_layer.entry(e.layer).or_default().push(e);
        }
        let mut counter = 0usize;
        let mut linked_once = std::collections::HashSet::new();
        for (idx, layer) in layers.iter().enumerate() {
            let Some(entries) = by_layer.get(&idx) else {
                continue;
            };
            if layer.encoding == Encoding::Raw {
                let e = entries[0];
                let final_path = target.join(e.path.as_str());
                if identical_raw(&final_path, layer.size, &layer.digest) {
                    report.skipped += 1;
                    continue;
                }
                let staged_path = staging.path().join(counter.to_string());
                counter += 1;
                // A verified file the source gives up becomes the staged file without a copy;
                // a blob that two layers share is linked once and copied for the others.
                let linked = linked_once.insert(layer.digest.clone())
                    && source
                        .verified_file(layer)
                        .is_some_and(|from| fs::hard_link(from, &staged_path).is_ok());
                if !linked {
                    let mut file = create_new_private(&staged_path).at(&staged_path)?;
                    let mut verifying = Verifying {
                        inner: source.open_layer(layer)?,
                        hasher: Sha256::new(),
                        count: 0,
                        cancel,
                    };
                    io::copy(&mut verifying, &mut file).map_err(|err| layer_io(layer, err))?;
                    verifying.check(layer)?;
                }
                finish_file(&staged_path, e.mode, e.mtime)?;
                report.bytes += layer.size;
                staged.push(Staged::File {
                    staged: staged_path,
                    path: e.path.clone(),
                });
                continue;
            }
            let verifying = Verifying {
                inner: source.open_layer(layer)?,
                hasher: Sha256::new(),
                count: 0,
                cancel,
            };
            let shared = Rc::new(RefCell::new(verifying));
            {
                // The stream may not unpack to more than the plan found in it (files, plus room
                // for headers), whatever the bytes served now hold.
                let in_layer = plan.entries.iter().filter(|e| e.layer == idx);
                let (planned, count) = in_layer.fold((0u64, 0u64), |(bytes, n), e| {
                    (bytes.saturating_add(entry_size(e)), n + 1)
                });
                let cap = planned
                    .saturating_add(count.saturating_mul(16 << 10))
                    .saturating_add(1 << 20);
                let stream = tar_stream(layer.encoding, Box::new(Shared(shared.clone())), cap)
                    .map_err(|err| layer_io(layer, err))?;
                let mut archive = tar::Archive::new(stream);
                let wanted: HashMap<usize, &PlannedEntry> =
                    entries.iter().map(|e| (e.seq, *e)).collect();
                for (seq, entry) in archive
                    .entries()
                    .map_err(|err| layer_io(layer, err))?
                    .enumerate()
                {
                    let mut entry = entry.map_err(|err| layer_io(layer, err))?;
                    let Some(e) = wanted.get(&seq) else { continue };
                    match &e.kind {
                        EntryPlan::TarFile { size, .. } => {
                            let final_path = target.join(e.path.as_str());
                            let staged_path = staging.path().join(counter.to_string());
                            counter += 1;
                            let mut file = create_new_private(&staged_path).at(&staged_path)?;
                            let (n, same) = copy_comparing(
                                &mut (&mut entry).take(size.saturating_add(1)),
                                &mut file,
                                existing_regular(&final_path, *size),
                            )
                            .map_err(|err| layer_io(layer, err))?;
                            if n != *size {
                                return Err(Error::Layer {
                                    digest: layer.digest.clone(),
                                    message: format!(
                                        "{}: tar entry holds {n} bytes, not the {size} planned",
                                        e.path
                                    ),
                                });
                            }
                            if same {
                                fs::remove_file(&staged_path).at(&staged_path)?;
                                report.skipped += 1;
                                continue;
                            }
                            finish_file(&staged_path, e.mode, e.mtime)?;
                            report.bytes += n;
                            staged.push(Staged::File {
                                staged: staged_path,
                                path: e.path.clone(),
                            });
                        }
                        EntryPlan::Symlink { target: link } => {
                            let final_path = target.join(e.path.as_str());
                            if fs::read_link(&final_path)
                                .is_ok_and(|t| t.as_os_str() == link.as_str())
                            {
                                report.skipped += 1;
                                continue;
                            }
                            let staged_path = staging.path().join(counter.to_string());
                            counter += 1;
                            std::os::unix::fs::symlink(link, &staged_path).at(&staged_path)?;
                            if let Some(t) = e.mtime {
                                filetime::set_symlink_file_times(&staged_path, t, t)
                                    .at(&staged_path)?;
                            }
                            staged.push(Staged::File {
                                staged: staged_path,
                                path: e.path.clone(),
                            });
                        }
                        EntryPlan::Dir => staged.push(Staged::Dir {
                            path: e.path.clone(),
                            mode: e.mode,
                        }),
                        EntryPlan::HardLink { target: linked } => staged.push(Staged::HardLink {
                            path: e.path.clone(),
                            target: linked.clone(),
                        }),
                        EntryPlan::RawFile { .. } => {}
                    }
                }
            }
            let verifying = Rc::try_unwrap(shared)
                .map_err(|_| Error::Layer {
                    digest: layer.digest.clone(),
                    message: "stream still in use".into(),
                })?
                .into_inner();
            verifying.check(layer)?;
        }
        // Commit: every layer verified; move staged items into place.
        for item in staged {
            match item {
                Staged::Dir { path, mode } => {
                    let dir = target.join(path.as_str());
                    fs::create_dir_all(&dir).at(&dir)?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o700)).at(&dir)?;
                }
                Staged::File { staged, path } => {
                    let final_path = target.join(path.as_str());
                    if let Some(parent) = final_path.parent() {
                        fs::create_dir_all(parent).at(parent)?;
                    }
                    fs::rename(&staged, &final_path).at(&final_path)?;
                    report.written += 1;
                }
                Staged::HardLink {
                    path,
                    target: linked,
                } => {
                    let final_path = target.join(path.as_str());
                    if let Some(parent) = final_path.parent() {
                        fs::create_dir_all(parent).at(parent)?;
                    }
                    let _ = fs::remove_file(&final_path);
                    fs::hard_link(target.join(linked.as_str()), &final_path).at(&final_path)?;
                    report.written += 1;
                }
            }
        }
        staging.close().at(target)?;
        Ok(report)
    })();
    if result.is_err() && created_target {
        let _ = fs::remove_dir_all(target);
    }
    result
}
