//! Blob bytes as one positioned, resumable stream: the only place that knows how a server that
//! ignores `Range` is skipped over, how a cut connection is resumed from the last byte received,
//! and how small documents are capped. The caller verifies what it reads against its digests.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use modelpack_spec::Digest;

use std::sync::Arc;

use crate::client::display_url;
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::repository::Repository;

/// First pause before a cut body is asked for again; it doubles up to [`RESUME_BACKOFF_CAP`].
const RESUME_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between two resumes.
const RESUME_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// The bytes `[position, end)` of a blob, read in pieces as they arrive (see the module docs).
///
/// Opened by [`Repository::blob_stream`]. Each piece returned by [`BlobBody::next_chunk`]
/// starts at [`BlobBody::position`] as it was before the call; the stream ends (`None`) exactly
/// at `end`. A body that breaks or ends early is asked for again from the byte it reached, as
/// often as the client's retry policy allows, before the error reaches the caller.
pub struct BlobBody {
    repo: Repository,
    digest: Digest,
    pos: u64,
    end: Option<u64>,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    skip: u64,
    resumes: u32,
    url: String,
    /// The host the current body comes from.
    host: Option<Arc<Endpoint>>,
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobBody")
            .field("digest", &self.digest)
            .field("pos", &self.pos)
            .field("end", &self.end)
            .field("resumes", &self.resumes)
            .finish()
    }
}

/// Where a response's body starts, and where the blob ends if the response says so.
fn body_bounds(resp: &reqwest::Response, asked_from: u64) -> (u64, Option<u64>) {
    if resp.status().as_u16() == 206 {
        let range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|h| h.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "));
        let start = range
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(asked_from);
        let total = range
            .and_then(|v| v.rsplit('/').next())
            .and_then(|v| v.parse::<u64>().ok());
        (start, total)
    } else {
        (0, resp.content_length())
    }
}

impl BlobBody {
    /// Offset in the blob of the next byte the stream yields.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Where the stream stops, if known (an open-ended stream learns it from the first response).
    pub fn end(&self) -> Option<u64> {
        self.end
    }

    /// Moves the end of the stream (only ever earlier): bytes past it are not returned, and a
    /// resume asks only for what is left. A parallel download that hands the rest of its range
    /// to another connection uses it.
    pub fn set_end(&mut self, end: u64) {
        self.end = Some(self.end.map_or(end, |e| e.min(end)));
    }

    /// How many times the body was asked for again after a break.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    async fn open(&mut self) -> Result<()> {
        let (resp, host) = self.repo.get_blob(&self.digest, self.pos, self.end).await?;
        self.url = display_url(resp.url().as_str());
        let (start, total) = body_bounds(&resp, self.pos);
        if start > self.pos {
            let message = format!(
                "asked for bytes from {} of {}, got from {start}",
                self.pos, self.digest
            );
            if !host.server {
                // A mirror that answers the wrong range: the next attempt goes elsewhere.
                self.repo.mirror_broke(&host, &message);
            }
            return Err(Error::Protocol(message));
        }
        self.repo.note_served(&self.digest, &host);
        self.host = Some(host);
        if self.end.is_none() {
            self.end = total;
        }
        // A server that ignored Range starts earlier than asked: skip what we already have.
        self.skip = self.pos - start;
        self.body = Some(resp.bytes_stream().boxed());
        Ok(())
    }

    /// The next piece of the range, or `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.end.is_some_and(|end| self.pos >= end) {
                self.body = None;
                return Ok(None);
            }
            if self.body.is_none() {
                self.open().await?;
                continue;
            }
            let next = match self.body.as_mut() {
                Some(body) => body.next().await,
                None => continue,
            };
            let broke = match next {
                Some(Ok(mut piece)) => {
                    if self.skip > 0 {
                        let k = self.skip.min(piece.len() as u64) as usize;
                        let _ = piece.split_to(k);
                        self.skip -= k as u64;
                    }
                    if let Some(end) = self.end {
                        piece.truncate(end.saturating_sub(self.pos).min(piece.len() as u64) as usize);
                    }
                    if piece.is_empty() {
                        continue;
                    }
                    self.pos += piece.len() as u64;
                    return Ok(Some(piece));
                }
                // An open-ended body whose size was never said ends where the server ends it.
                None if self.end.is_none() => {
                    self.body = None;
                    self.end = Some(self.pos);
                    return Ok(None);
                }
                None => "the body ended early".to_owned(),
                Some(Err(e)) => e.to_string(),
            };
            self.body = None;
            self.resumes += 1;
            if let Some(host) = self.host.take() {
                // A mirror that cut the body is skipped by the resume (and a while after).
                self.repo.mirror_broke(&host, &broke);
            }
            let attempts = self.repo.client().options().retry.attempts.max(1);
            if self.resumes >= attempts {
                return Err(Error::Protocol(format!(
                    "blob {}: bytes from {} failed after {} attempts: {broke}",
                    self.digest, self.pos, self.resumes
                )));
            }
            let backoff = RESUME_BACKOFF
                .saturating_mul(1 << (self.resumes - 1).min(8))
                .min(RESUME_BACKOFF_CAP);
            tracing::debug!(digest = %self.digest, pos = self.pos, url = %self.url, reason = %broke, ?backoff, "blob body broke; resuming");
            tokio::time::sleep(backoff).await;
        }
    }
}

impl Repository {
    /// The bytes of `digest` in `range` (`None`: the whole blob, its size learned from the
    /// response) as a positioned, resumable stream. The first request is made here, so a missing
    /// blob or a refused request fails this call.
    pub async fn blob_stream(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<BlobBody> {
        let (pos, end) = match range {
            Some(r) => (r.start, Some(r.end.max(r.start))),
            None => (0, None),
        };
        let mut body = BlobBody {
            repo: self.clone(),
            digest: digest.clone(),
            pos,
            end,
            body: None,
            skip: 0,
            resumes: 0,
            url: String::new(),
            host: None,
        };
        if end.is_none_or(|end| end > pos) {
            body.open().await?;
        }
        Ok(body)
    }

    /// A whole small blob (a config, an index), refusing more than `cap` bytes and bytes that do
    /// not hash to `digest`.
    /// Bytes from a mirror that do not match are fetched again from the next host.
    pub async fn read_blob_capped(&self, digest: &Digest, cap: usize) -> Result<Bytes> {
        loop {
            match self.read_blob_capped_once(digest, cap).await {
                Err(Error::DigestMismatch { .. }) if self.distrust(digest) => {}
                other => return other,
            }
        }
    }

    async fn read_blob_capped_once(&self, digest: &Digest, cap: usize) -> Result<Bytes> {
        let mut body = self.blob_stream(digest, None).await?;
        if body.end().is_some_and(|end| end > cap as u64) {
            return Err(Error::Protocol(format!(
                "blob {digest} is over {cap} bytes"
            )));
        }
        let mut out = Vec::new();
        while let Some(piece) = body.next_chunk().await? {
            if out.len() + piece.len() > cap {
                return Err(Error::Protocol(format!(
                    "blob {digest} is over {cap} bytes"
                )));
            }
            out.extend_from_slice(&piece);
        }
        let actual = Digest::sha256_of(&out);
        if &actual != digest {
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(Bytes::from(out))
    }
}
