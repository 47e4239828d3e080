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
        let (file, path) = tmp.keep().map_err(|e| Error::Io {
            path: ingest_dir.to_owned(),
            source: e.error,
        })?;
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
    sha256_reader(&mut file).at(path)
}

/// Opens `path` for writing with mode 0600, failing if it exists.
pub(crate) fn create_new_private(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .at(path)
}
