//! Blob bytes as one positioned, resumable stream: the only place that knows how a server that
//! ignores `Range` is skipped over, how a cut connection is resumed from the last byte received,
//! and how small documents are capped. The caller verifies what it reads against its digests.
//!
//! Each answer is checked against what was asked before a byte of it is used: a `206` must say
//! (`Content-Range`) that it starts at the byte asked for, with a `Content-Length` that agrees;
//! a `200` (the whole blob: `Range` ignored or not sent) must be long enough for the range, and
//! exactly the blob's size when the caller gave it. No more than the range asked is ever
//! returned. A mirror that answers otherwise is not asked for that blob again (logged once,
//! counted in [`crate::mirror_fallbacks`]) and the request goes on to the next host; the
//! registry's server answering so is a protocol error naming it and what was wrong.

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
    /// The blob's size, when the caller knows it.
    size: Option<u64>,
    /// Where the current body's bytes end in the blob, as its headers say.
    body_end: Option<u64>,
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

/// Where a checked answer's body is in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    /// The offset of its first byte.
    start: u64,
    /// The offset just past its last byte, when its headers say.
    end: Option<u64>,
    /// The blob's size, when its headers say.
    total: Option<u64>,
}

/// `bytes A-B/TOTAL` (`TOTAL` may be `*`): first and last byte, and the size.
fn content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?;
    if !rest.starts_with(' ') {
        return None;
    }
    let (range, total) = rest.trim().split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let digits = |t: &str| {
        let t = t.trim();
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<u64>().ok())
            .flatten()
    };
    let (first, last) = (digits(first)?, digits(last)?);
    let total = match total.trim() {
        "*" => None,
        t => Some(digits(t)?),
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some((first, last, total))
}

/// Checks an answer to a GET of the blob's bytes from `pos` (to `end`, or to its end), `size`
/// the blob's size when known: where its body is, or what is wrong with it.
fn check_answer(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    pos: u64,
    end: Option<u64>,
    size: Option<u64>,
) -> std::result::Result<Bounds, String> {
    let text = |name| headers.get(name).and_then(|h| h.to_str().ok());
    let length = text(reqwest::header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    if status != 206 {
        // The whole blob from its first byte (Range ignored, or none sent).
        if let (Some(len), Some(size)) = (length, size)
            && len != size
        {
            return Err(format!(
                "{status} with Content-Length {len}, but the blob is {size} bytes"
            ));
        }
        let needed = end.unwrap_or(pos);
        if let Some(len) = length
            && len < needed
        {
            return Err(format!(
                "{status} with Content-Length {len}, too short for the bytes asked (to {needed})"
            ));
        }
        return Ok(Bounds {
            start: 0,
            end: length,
            total: length,
        });
    }
    let Some(value) = text(reqwest::header::CONTENT_RANGE) else {
        return Err("206 without a Content-Range".into());
    };
    let Some((first, last, total)) = content_range(value) else {
        return Err(format!("206 with an unusable Content-Range {value:?}"));
    };
    if first != pos {
        return Err(format!(
            "206 with Content-Range {value:?}, which does not start at byte {pos} as asked"
        ));
    }
    let Some(past) = last.checked_add(1) else {
        return Err(format!("206 with an unusable Content-Range {value:?}"));
    };
    if let Some(len) = length
        && len != past - first
    {
        return Err(format!(
            "206 with Content-Length {len}, which does not match its Content-Range {value:?}"
        ));
    }
    if let Some(size) = size
        && (total.is_some_and(|t| t != size) || past > size)
    {
        return Err(format!(
            "206 with Content-Range {value:?}, but the blob is {size} bytes"
        ));
    }
    if let (Some(total), Some(end)) = (total, end)
        && total < end
    {
        return Err(format!(
            "206 with Content-Range {value:?}, too short for the bytes asked (to {end})"
        ));
    }
    Ok(Bounds {
        start: first,
        end: Some(past),
        total,
    })
}

/// The `Range` asked for, for messages.
fn asked(pos: u64, end: Option<u64>) -> String {
    match end {
        Some(end) => format!("bytes {pos}-{}", end.saturating_sub(1)),
        None if pos > 0 => format!("bytes {pos}-"),
        None => "the whole blob".into(),
    }
}

/// Wrong answers a single open may skip (each bans a mirror, so the hosts run out first).
const MAX_WRONG_ANSWERS: usize = 64;

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
        for _ in 0..MAX_WRONG_ANSWERS {
            let (resp, host) = self.repo.get_blob(&self.digest, self.pos, self.end).await?;
            let checked = check_answer(
                resp.status().as_u16(),
                resp.headers(),
                self.pos,
                self.end,
                self.size,
            );
            let bounds = match checked {
                Ok(bounds) => bounds,
                Err(wrong) => {
                    let message = format!(
                        "{} answered a GET of {} of {} with {wrong}",
                        host.base,
                        asked(self.pos, self.end),
                        self.digest
                    );
                    // A mirror: the next host, and never this one for that blob again.
                    if self.repo.reject_blob_answer(&self.digest, &host, &message) {
                        continue;
                    }
                    return Err(Error::Protocol(message));
                }
            };
            self.url = display_url(resp.url().as_str());
            self.repo.note_served(&self.digest, &host);
            self.host = Some(host);
            if self.end.is_none() {
                self.end = self.size.or(bounds.total);
            }
            // A server that ignored Range starts earlier than asked: skip what we already have.
            self.skip = self.pos - bounds.start;
            self.body_end = bounds.end;
            self.body = Some(resp.bytes_stream().boxed());
            return Ok(());
        }
        Err(Error::Protocol(format!(
            "blob {}: no host of {} answered {} as asked",
            self.digest,
            self.repo.registry(),
            asked(self.pos, self.end)
        )))
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
            // Past what the answer said it holds, the body is over (whatever more it sends).
            let next = match self.body.as_mut() {
                _ if self.body_end.is_some_and(|e| self.pos >= e) => None,
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
                    // Never past the range asked, nor past what the answer said it holds.
                    if let Some(limit) = [self.end, self.body_end].into_iter().flatten().min() {
                        piece.truncate(
                            limit.saturating_sub(self.pos).min(piece.len() as u64) as usize
                        );
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
        self.open_blob(digest, range, None).await
    }

    /// [`Repository::blob_stream`] for a blob whose size is known (its descriptor's): an answer
    /// that says the blob has another size is a wrong answer (from a mirror, the request goes
    /// on to the next host).
    pub async fn blob_stream_sized(
        &self,
        digest: &Digest,
        size: u64,
        range: Option<Range<u64>>,
    ) -> Result<BlobBody> {
        self.open_blob(digest, range, Some(size)).await
    }

    async fn open_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
        size: Option<u64>,
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
            size,
            body_end: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, HeaderMap, HeaderValue};

    fn headers(range: Option<&str>, length: Option<u64>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(r) = range {
            h.insert(CONTENT_RANGE, HeaderValue::from_str(r).expect("header"));
        }
        if let Some(l) = length {
            h.insert(CONTENT_LENGTH, HeaderValue::from(l));
        }
        h
    }

    #[test]
    fn content_ranges_are_read_strictly() {
        assert_eq!(content_range("bytes 0-9/10"), Some((0, 9, Some(10))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(content_range(" bytes  5 - 9 / 20 "), Some((5, 9, Some(20))));
        for bad in [
            "",
            "bytes",
            "bytes 5-9",
            "bytes */10",
            "bytes 9-5/10",
            "bytes 5-10/10",
            "bytes -1-9/10",
            "bytes +5-9/10",
            "items 0-9/10",
            "bytes0-9/10",
            "bytes 0-x/10",
        ] {
            assert_eq!(content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_partial_answer_must_start_where_asked_and_agree_with_itself() {
        let ok = |range, length, end, size| {
            check_answer(206, &headers(Some(range), length), 100, end, size)
        };
        assert_eq!(
            ok("bytes 100-199/1000", Some(100), Some(200), None),
            Ok(Bounds {
                start: 100,
                end: Some(200),
                total: Some(1000)
            })
        );
        // Past the end asked, headers agreeing: cut at the end by the reader.
        assert_eq!(
            ok("bytes 100-499/1000", Some(400), Some(200), Some(1000)),
            Ok(Bounds {
                start: 100,
                end: Some(500),
                total: Some(1000)
            })
        );
        // Shorter than asked: the rest is asked for again.
        assert!(ok("bytes 100-149/1000", None, Some(200), None).is_ok());
        assert!(ok("bytes 100-199/*", None, None, None).is_ok());
        for (range, length, end, size, needle) in [
            (
                "bytes 0-199/1000",
                None,
                Some(200),
                None,
                "does not start at byte 100",
            ),
            (
                "bytes 101-199/1000",
                None,
                Some(200),
                None,
                "does not start at byte 100",
            ),
            (
                "bytes 100-199/1000",
                Some(150),
                Some(200),
                None,
                "does not match",
            ),
            (
                "bytes 100-199/1000",
                None,
                Some(200),
                Some(999),
                "the blob is 999 bytes",
            ),
            (
                "bytes 100-199/*",
                None,
                Some(200),
                Some(150),
                "the blob is 150 bytes",
            ),
            ("bytes 100-149/150", None, Some(200), None, "too short"),
            (
                "100-199/1000",
                None,
                Some(200),
                None,
                "unusable Content-Range",
            ),
        ] {
            let err = ok(range, length, end, size).expect_err(range);
            assert!(err.contains(needle), "{range}: {err}");
        }
        let err = check_answer(206, &headers(None, Some(100)), 100, Some(200), None)
            .expect_err("no range");
        assert!(err.contains("without a Content-Range"), "{err}");
    }

    #[test]
    fn a_whole_answer_must_hold_the_range_and_be_the_blob() {
        assert_eq!(
            check_answer(200, &headers(None, Some(1000)), 100, Some(200), Some(1000)),
            Ok(Bounds {
                start: 0,
                end: Some(1000),
                total: Some(1000)
            })
        );
        // Size unknown: long enough will do; no length said: the body decides.
        assert!(check_answer(200, &headers(None, Some(300)), 100, Some(200), None).is_ok());
        assert!(check_answer(200, &headers(None, None), 100, Some(200), Some(1000)).is_ok());
        // A Content-Range on a 200 means nothing.
        assert!(
            check_answer(
                200,
                &headers(Some("bytes 5-6/7"), Some(1000)),
                0,
                None,
                None
            )
            .is_ok()
        );
        for (length, pos, end, size, needle) in [
            (199, 100, Some(200), None, "too short"),
            (99, 100, None, None, "too short"),
            (1001, 100, Some(200), Some(1000), "the blob is 1000 bytes"),
            (999, 0, None, Some(1000), "the blob is 1000 bytes"),
        ] {
            let err =
                check_answer(200, &headers(None, Some(length)), pos, end, size).expect_err("wrong");
            assert!(err.contains(needle), "{length}: {err}");
        }
    }
}
