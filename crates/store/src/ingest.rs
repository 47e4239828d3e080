//! Ingest: a temporary file inside the store that becomes a blob only when committed under the
//! digest of exactly the bytes written to it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use modelpack_spec::Digest;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};

/// A temporary file in the store's `ingest/` folder, locked while it is open so `prune` knows it
/// is in use. Dropped without [`Ingest::commit`], it is removed.
#[derive(Debug)]
pub struct Ingest {
    file: Option<File>,
    path: PathBuf,
    blobs_dir: PathBuf,
}

impl Ingest {
    pub(crate) fn create(ingest_dir: &Path, blobs_dir: &Path) -> Result<Ingest> {
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(ingest_dir)
            .at(ingest_dir)?;
        let (file, path) = tmp.keep().map_err(|e| e.error).at(ingest_dir)?;
        file.lock().at(&path)?;
        Ok(Ingest {
            file: Some(file),
            path,
            blobs_dir: blobs_dir.to_owned(),
        })
    }

    /// The open temporary file, to write (or clone) the blob's bytes into.
    pub fn file(&mut self) -> &mut File {
        self.file
            .as_mut()
            .unwrap_or_else(|| unreachable!("file is present until commit"))
    }

    /// Where the temporary file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the file into `blobs/` under `digest`, which the caller computed over exactly the
    /// bytes it wrote. If the blob is already there, the temporary file is dropped instead.
    pub fn commit(mut self, digest: &Digest) -> Result<PathBuf> {
        let target = blob_path_in(&self.blobs_dir, digest);
        if let Some(file) = self.file.take() {
            file.unlock().at(&self.path)?;
            drop(file);
        }
        if target.exists() {
            fs::remove_file(&self.path).at(&self.path)?;
        } else {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            fs::rename(&self.path, &target).at(&target)?;
        }
        self.path = PathBuf::new();
        Ok(target)
    }

    /// Hashes the file's current contents from the start and commits it only if they match
    /// `expected`.
    pub fn commit_verified(mut self, expected: &Digest) -> Result<PathBuf> {
        let file = self.file();
        file.flush().at(&self.path)?;
        let (actual, _) =
            sha256_reader(&mut File::open(&self.path).at(&self.path)?).at(&self.path)?;
        if &actual != expected {
            return Err(Error::DigestMismatch {
                path: self.path.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        self.commit(expected)
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            drop(self.file.take());
            let _ = fs::remove_file(&self.path);
        }
    }
}

pub(crate) fn blob_path_in(blobs_dir: &Path, digest: &Digest) -> PathBuf {
    blobs_dir.join(digest.algorithm()).join(digest.encoded())
}

/// sha256 and length of everything `reader` yields, read in 1 MiB pieces.
pub fn sha256_reader(reader: &mut impl io::Read) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((Digest::from_sha256(hasher.finalize().into()), total))
}

/// sha256 and length of a file.
pub fn sha256_file(path: &Path) -> Result<(Digest, u64)> {
    let mut file = File::open(path).at(path)?;
    Ok(sha256_reader(&mut file).at(path)?)
}

/// Opens `path` for writing with mode 0600, failing if it exists.
pub fn create_new_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Opens `path` for reading and writing with mode 0600, creating it if missing and keeping
/// what it holds (partial downloads, lock files, cache files).
pub fn open_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// A partial download kept under a name derived from its digest, so an interrupted transfer
/// continues where it stopped. Locked while open: two processes fetching the same blob take
/// turns, and the second finds the blob done.
#[derive(Debug)]
pub struct Resumable {
    file: Option<File>,
    path: PathBuf,
    state_path: PathBuf,
    blobs_dir: PathBuf,
}

impl Resumable {
    pub(crate) fn open(ingest_dir: &Path, blobs_dir: &Path, digest: &Digest) -> Result<Resumable> {
        let stem = format!("{}-{}", digest.algorithm(), digest.encoded());
        let path = ingest_dir.join(format!("{stem}.partial"));
        let file = open_private(&path).at(&path)?;
        file.lock().at(&path)?;
        Ok(Resumable {
            file: Some(file),
            state_path: ingest_dir.join(format!("{stem}.state")),
            path,
            blobs_dir: blobs_dir.to_owned(),
        })
    }

    /// The partial file (read and write).
    pub fn file(&self) -> &File {
        self.file
            .as_ref()
            .unwrap_or_else(|| unreachable!("file is present until commit"))
    }

    /// Where the partial data is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved progress record of a segmented download, if any.
    pub fn load_state(&self) -> Option<Vec<u8>> {
        fs::read(&self.state_path).ok()
    }

    /// Saves the progress record atomically.
    pub fn save_state(&self, bytes: &[u8]) -> Result<()> {
        let tmp = self.state_path.with_extension("state.tmp");
        fs::write(&tmp, bytes).at(&tmp)?;
        Ok(fs::rename(&tmp, &self.state_path).at(&self.state_path)?)
    }

    /// Forgets the partial data (after a digest mismatch).
    pub fn discard(mut self) -> Result<()> {
        drop(self.file.take());
        let _ = fs::remove_file(&self.state_path);
        fs::remove_file(&self.path).at(&self.path)?;
        self.path = PathBuf::new();
        Ok(())
    }

    /// Moves the data into `blobs/` under `digest`, which the caller verified over all of it.
    pub fn commit(mut self, digest: &Digest) -> Result<PathBuf> {
        let target = blob_path_in(&self.blobs_dir, digest);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).at(parent)?;
        }
        fs::rename(&self.path, &target).at(&target)?;
        let _ = fs::remove_file(&self.state_path);
        drop(self.file.take());
        self.path = PathBuf::new();
        Ok(target)
    }
}

impl Drop for Resumable {
    fn drop(&mut self) {
        // Partial data stays for the next attempt; only the lock goes with the file handle.
        drop(self.file.take());
    }
}
