//! A blob as a blocking reader that survives broken connections: when the body fails or ends
//! early, it asks again from the offset it reached (a ranged GET, or skipping ahead when the
//! server ignores `Range`), with capped backoff. The caller verifies the digest of what it read.

use std::io::Read;
use std::time::Duration;

use futures_util::TryStreamExt as _;
use modelpack_spec::Digest;

use crate::repository::Repository;

/// Attempts per broken body before the error reaches the caller.
const MAX_RESUMES: u32 = 6;

/// A blob read from its first byte (see the module docs).
pub struct BlobReader {
    repo: Repository,
    digest: Digest,
    size: u64,
    handle: tokio::runtime::Handle,
    offset: u64,
    current: Option<Box<dyn Read + Send>>,
    resumes: u32,
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader")
            .field("digest", &self.digest)
            .field("offset", &self.offset)
            .finish()
    }
}

impl BlobReader {
    /// A reader of `digest` (`size` bytes) from `repo`, driven on `handle` (call it from a
    /// thread outside the runtime, e.g. `spawn_blocking`).
    pub fn new(
        repo: Repository,
        digest: Digest,
        size: u64,
        handle: tokio::runtime::Handle,
    ) -> BlobReader {
        BlobReader {
            repo,
            digest,
            size,
            handle,
            offset: 0,
            current: None,
            resumes: 0,
        }
    }

    /// Opens the body from `self.offset`.
    fn open(&mut self) -> std::io::Result<()> {
        let range = (self.offset > 0).then_some(self.offset..self.size);
        let stream = self
            .handle
            .block_on(self.repo.get_blob(&self.digest, range))
            .map_err(std::io::Error::other)?;
        let body = stream
            .response
            .bytes_stream()
            .map_err(std::io::Error::other);
        let reader = tokio_util::io::StreamReader::new(body);
        let mut reader: Box<dyn Read + Send> = Box::new(
            tokio_util::io::SyncIoBridge::new_with_handle(reader, self.handle.clone()),
        );
        // A server that ignored Range starts at 0: skip what we have.
        let skip = self.offset - stream.offset;
        if skip > 0 {
            let copied = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())?;
            if copied != skip {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the blob ended before the resume offset",
                ));
            }
        }
        self.current = Some(reader);
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.offset >= self.size || buf.is_empty() {
                return Ok(0);
            }
            let result = match &mut self.current {
                Some(r) => r.read(buf),
                None => self.open().map(|()| usize::MAX),
            };
            let err = match result {
                Ok(usize::MAX) => continue,
                Ok(0) => std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} ended at byte {} of {}",
                        self.digest, self.offset, self.size
                    ),
                ),
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) => e,
            };
            self.current = None;
            self.resumes += 1;
            if self.resumes > MAX_RESUMES {
                return Err(std::io::Error::new(
                    err.kind(),
                    format!(
                        "{}: gave up after {} attempts at byte {}: {err}",
                        self.digest, self.resumes, self.offset
                    ),
                ));
            }
            let backoff = Duration::from_millis(200u64 << (self.resumes - 1).min(5));
            tracing::debug!(digest = %self.digest, offset = self.offset, error = %err, ?backoff, "resuming blob read");
            std::thread::sleep(backoff);
        }
    }
}
