//! One repository on one registry: blobs (exists, ranged reads, monolithic and chunked uploads
//! with resume, cross-repository mount, delete), manifests, tags and referrers.
//!
//! Endpoints follow the OCI distribution spec v1.1:
//! <https://github.com/opencontainers/distribution-spec/blob/v1.1.0/spec.md>

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;
use modelpack_spec::media_type::{
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};
use modelpack_spec::oci_spec::image::{Descriptor, ImageIndex};
use modelpack_spec::{Digest, Reference};
use reqwest::header::{
    ACCEPT, AsHeaderName, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
};
use reqwest::{Body, Method, RequestBuilder, Response};

use crate::client::{Client, Scope, display_url};
use crate::error::{Error, Result};

/// The most bytes of a manifest we read.
pub const MAX_MANIFEST_SIZE: usize = modelpack_spec::MAX_DOCUMENT_SIZE;

/// The `Accept` header for manifests: OCI and Docker, single and multi-platform.
fn manifest_accept() -> String {
    [
        MEDIA_TYPE_OCI_MANIFEST,
        MEDIA_TYPE_OCI_INDEX,
        MEDIA_TYPE_DOCKER_MANIFEST,
        MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    ]
    .join(", ")
}

/// A manifest as fetched: its bytes, media type and verified digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The exact bytes.
    pub bytes: Bytes,
    /// `Content-Type` (or the document's own `mediaType`).
    pub media_type: String,
    /// sha256 of the bytes (checked against a digest reference).
    pub digest: Digest,
}

/// The content type of blob uploads.
const OCTET_STREAM: &str = "application/octet-stream";

/// A repository (`registry/name`) reached through a [`Client`].
#[derive(Debug, Clone)]
pub struct Repository {
    client: Client,
    registry: String,
    name: String,
}

/// What a request does to the repository, which decides the token scope it asks for.
#[derive(Debug, Clone, Copy)]
enum Access {
    Pull,
    Push,
    Delete,
}

/// Builds one attempt of a request (called again for each retry).
type Build<'a> = dyn Fn(RequestBuilder) -> Result<RequestBuilder> + Send + Sync + 'a;

/// A response header as text, when it is there and is text.
fn header(resp: &Response, name: impl AsHeaderName) -> Option<&str> {
    resp.headers().get(name).and_then(|h| h.to_str().ok())
}

fn location(resp: &Response, base: &str) -> Result<String> {
    let loc = header(resp, LOCATION)
        .ok_or_else(|| Error::Protocol("upload response has no Location header".into()))?;
    Ok(
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_owned()
        } else {
            format!("{base}{loc}")
        },
    )
}

fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={}", urlencode(value))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A body that streams `len` bytes of `path` from `offset`, opened afresh for each attempt.
fn file_body(path: &Path, offset: u64, len: u64) -> Result<Body> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::Io {
        context: format!("opening {}", path.display()),
        source: e,
    })?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| Error::Io {
        context: format!("seeking {}", path.display()),
        source: e,
    })?;
    let reader = tokio::fs::File::from_std(file);
    let limited = tokio::io::AsyncReadExt::take(reader, len);
    Ok(Body::wrap_stream(
        tokio_util::io::ReaderStream::with_capacity(limited, 1 << 20),
    ))
}

impl Repository {
    /// The repository `reference` names.
    pub fn new(client: &Client, reference: &Reference) -> Repository {
        Repository {
            client: client.clone(),
            registry: reference.registry().to_owned(),
            name: reference.repository().to_owned(),
        }
    }

    /// Registry host.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn url(&self, tail: &str) -> String {
        format!(
            "{}/v2/{}/{tail}",
            self.client.base_url(&self.registry),
            self.name
        )
    }

    /// Sends a request to this repository with the scope `access` needs; see [`Client::send`].
    async fn send(
        &self,
        access: Access,
        method: Method,
        url: &str,
        accept: &[u16],
        build: &Build<'_>,
    ) -> Result<Response> {
        let scope = match access {
            Access::Pull => Scope::pull(&self.name),
            Access::Push => Scope::push(&self.name),
            Access::Delete => Scope::delete(&self.name),
        };
        self.client
            .send(&self.registry, &scope, method, url, accept, build)
            .await
    }

    /// DELETEs `tail` (`blobs/<digest>` or `manifests/<digest>`).
    async fn delete(&self, tail: &str) -> Result<()> {
        let url = self.url(tail);
        self.send(Access::Delete, Method::DELETE, &url, &[], &Ok)
            .await
            .map(drop)
    }

    /// Size of the blob if the repository has it.
    pub async fn blob_exists(&self, digest: &Digest) -> Result<Option<u64>> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self
            .send(Access::Pull, Method::HEAD, &url, &[404], &Ok)
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        Ok(header(&resp, CONTENT_LENGTH).and_then(|s| s.parse().ok()))
    }

    /// GETs a blob from byte `start` (to `end`, exclusive, or to its end). A server that ignores
    /// `Range` answers 200 with the whole blob; [`crate::BlobBody`] skips what was not asked for.
    pub(crate) async fn get_blob(
        &self,
        digest: &Digest,
        start: u64,
        end: Option<u64>,
    ) -> Result<Response> {
        let url = self.url(&format!("blobs/{digest}"));
        let range = match end {
            Some(end) if end > start => Some(format!("bytes={start}-{}", end - 1)),
            None if start > 0 => Some(format!("bytes={start}-")),
            _ => None,
        };
        self.send(Access::Pull, Method::GET, &url, &[], &|rb| {
            Ok(match &range {
                Some(r) => rb.header(RANGE, r),
                None => rb,
            })
        })
        .await
    }

    /// Tries to mount `digest` from repository `from` of the same registry. Returns `Ok(true)`
    /// when mounted; `Ok(false)` when the registry started an upload instead (it is cancelled).
    pub async fn mount_blob(&self, digest: &Digest, from: &str) -> Result<bool> {
        let url = format!(
            "{}?mount={}&from={}",
            self.url("blobs/uploads/"),
            urlencode(digest.as_str()),
            urlencode(from)
        );
        let scope = Scope(format!(
            "repository:{}:pull,push repository:{from}:pull",
            self.name
        ));
        let resp = self
            .client
            .send(&self.registry, &scope, Method::POST, &url, &[], &Ok)
            .await?;
        if resp.status().as_u16() == 201 {
            return Ok(true);
        }
        // 202: an upload session was opened instead; close it.
        if let Ok(loc) = location(&resp, &self.client.base_url(&self.registry)) {
            let _ = self
                .send(Access::Push, Method::DELETE, &loc, &[404], &Ok)
                .await;
        }
        Ok(false)
    }

    async fn start_upload(&self) -> Result<String> {
        let url = self.url("blobs/uploads/");
        let resp = self
            .send(Access::Push, Method::POST, &url, &[], &|rb| {
                Ok(rb.header(CONTENT_LENGTH, 0))
            })
            .await?;
        location(&resp, &self.client.base_url(&self.registry))
    }

    /// Starts an upload and PUTs the whole blob in one request (POST then PUT `?digest=`).
    /// `body` is called again for each attempt.
    async fn push_blob_whole(
        &self,
        digest: &Digest,
        len: u64,
        body: &(dyn Fn() -> Result<Body> + Send + Sync),
    ) -> Result<()> {
        let loc = self.start_upload().await?;
        let url = with_query(&loc, "digest", digest.as_str());
        self.send(Access::Push, Method::PUT, &url, &[], &|rb| {
            Ok(rb
                .header(CONTENT_TYPE, OCTET_STREAM)
                .header(CONTENT_LENGTH, len)
                .body(body()?))
        })
        .await
        .map(drop)
    }

    /// Uploads small bytes in one request.
    pub async fn push_blob_bytes(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        self.push_blob_whole(digest, bytes.len() as u64, &|| {
            Ok(Body::from(bytes.clone()))
        })
        .await
    }

    /// Uploads a file in one streamed PUT (POST then PUT `?digest=`), re-streamed from disk on
    /// each retry; nothing is buffered.
    pub async fn push_blob_file(&self, digest: &Digest, path: &Path, size: u64) -> Result<()> {
        self.push_blob_whole(digest, size, &|| file_body(path, 0, size))
            .await
    }

    /// Uploads a file in PATCH chunks of `chunk_size`; after a failure it asks the registry how
    /// much it has and continues from there. Falls back to one PUT when the registry refuses
    /// chunks.
    pub async fn push_blob_chunked(
        &self,
        digest: &Digest,
        path: &Path,
        size: u64,
        chunk_size: u64,
        on_progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<()> {
        let mut loc = self.start_upload().await?;
        let mut offset = 0u64;
        let mut failures = 0u32;
        while offset < size {
            let len = chunk_size.min(size - offset);
            let range = format!("{}-{}", offset, offset + len - 1);
            let result = self
                .send(Access::Push, Method::PATCH, &loc, &[], &|rb| {
                    Ok(rb
                        .header(CONTENT_TYPE, OCTET_STREAM)
                        .header(CONTENT_RANGE, &range)
                        .header(CONTENT_LENGTH, len)
                        .body(file_body(path, offset, len)?))
                })
                .await;
            match result {
                Ok(resp) => {
                    loc = location(&resp, &self.client.base_url(&self.registry)).unwrap_or(loc);
                    offset += len;
                    on_progress(len);
                }
                Err(e)
                    if matches!(e.status(), Some(400 | 405 | 415 | 416 | 501)) && offset == 0 =>
                {
                    tracing::debug!(error = %e, "registry refuses chunked uploads; uploading in one PUT");
                    return self.push_blob_file(digest, path, size).await;
                }
                Err(e) => {
                    failures += 1;
                    if failures > self.client.options().retry.attempts {
                        return Err(e);
                    }
                    // Ask where the upload stands and resume from there.
                    let status = self.send(Access::Push, Method::GET, &loc, &[], &Ok).await?;
                    let have = header(&status, RANGE)
                        .and_then(|v| v.rsplit('-').next())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map_or(0, |end| end + 1);
                    tracing::debug!(have, "resuming chunked upload");
                    loc = location(&status, &self.client.base_url(&self.registry)).unwrap_or(loc);
                    offset = have;
                }
            }
        }
        let url = with_query(&loc, "digest", digest.as_str());
        self.send(Access::Push, Method::PUT, &url, &[], &|rb| {
            Ok(rb.header(CONTENT_LENGTH, 0))
        })
        .await
        .map(drop)
    }

    /// Deletes a blob.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<()> {
        self.delete(&format!("blobs/{digest}")).await
    }

    /// GETs a manifest by tag or digest, verifying a digest reference and capping the size.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = self
            .send(Access::Pull, Method::GET, &url, &[], &|rb| {
                Ok(rb.header(ACCEPT, manifest_accept()))
            })
            .await?;
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_SIZE as u64)
        {
            return Err(Error::Protocol(format!(
                "manifest {reference} is over {MAX_MANIFEST_SIZE} bytes"
            )));
        }
        let content_type =
            header(&resp, CONTENT_TYPE).map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let bytes = read_capped(resp, MAX_MANIFEST_SIZE).await?;
        let digest = Digest::sha256_of(&bytes);
        if let Ok(expected) = reference.parse::<Digest>()
            && expected != digest
        {
            return Err(Error::DigestMismatch {
                expected: expected.to_string(),
                actual: digest.to_string(),
            });
        }
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .or(content_type)
            .unwrap_or_else(|| MEDIA_TYPE_OCI_MANIFEST.to_owned());
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// HEADs a manifest: its digest and size, or `None`.
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<(Digest, u64)>> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = self
            .send(Access::Pull, Method::HEAD, &url, &[404], &|rb| {
                Ok(rb.header(ACCEPT, manifest_accept()))
            })
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let digest = header(&resp, "docker-content-digest").and_then(|s| s.parse().ok());
        // A HEAD response has no body, so reqwest's content_length() is 0: read the header.
        let size = header(&resp, "content-length").and_then(|s| s.parse::<u64>().ok());
        match (digest, size) {
            (Some(d), Some(size)) => Ok(Some((d, size))),
            // Without the headers we must read the manifest to know its digest and size.
            _ => Ok(Some(self.get_manifest(reference).await.map(|m| {
                let n = m.bytes.len() as u64;
                (m.digest, n)
            })?)),
        }
    }

    /// PUTs a manifest under a tag or its digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest> {
        let digest = Digest::sha256_of(&bytes);
        let url = self.url(&format!("manifests/{reference}"));
        self.send(Access::Push, Method::PUT, &url, &[], &|rb| {
            Ok(rb.header(CONTENT_TYPE, media_type).body(bytes.clone()))
        })
        .await?;
        Ok(digest)
    }

    /// Deletes a manifest by digest.
    pub async fn delete_manifest(&self, digest: &Digest) -> Result<()> {
        self.delete(&format!("manifests/{digest}")).await
    }

    /// Every tag, following `Link` pagination.
    pub async fn tags(&self) -> Result<Vec<String>> {
        let base = self.client.base_url(&self.registry);
        let mut url = self.url("tags/list?n=1000");
        let mut tags = Vec::new();
        loop {
            let resp = self
                .send(Access::Pull, Method::GET, &url, &[404], &Ok)
                .await?;
            if resp.status().as_u16() == 404 {
                break;
            }
            let next = header(&resp, "link")
                .and_then(|l| l.split(';').next())
                .map(|l| {
                    l.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                });
            let body = read_capped(resp, MAX_MANIFEST_SIZE).await?;
            let v: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| Error::Protocol(format!("tag list: {e}")))?;
            for t in v["tags"].as_array().into_iter().flatten() {
                if let Some(t) = t.as_str() {
                    tags.push(t.to_owned());
                }
            }
            match next {
                Some(n) if n.starts_with('/') => url = format!("{base}{n}"),
                Some(n) if n.starts_with("http") => url = n,
                _ => break,
            }
        }
        Ok(tags)
    }

    /// Manifests whose `subject` is `digest`: the referrers API, or the `sha256-<hex>` tag
    /// schema when the registry lacks it.
    pub async fn referrers(
        &self,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let mut url = self.url(&format!("referrers/{digest}"));
        if let Some(t) = artifact_type {
            url = with_query(&url, "artifactType", t);
        }
        let resp = self
            .send(Access::Pull, Method::GET, &url, &[404], &Ok)
            .await?;
        let is_index =
            header(&resp, CONTENT_TYPE).is_some_and(|c| c.starts_with(MEDIA_TYPE_OCI_INDEX));
        let index: ImageIndex = if resp.status().is_success() && is_index {
            let body = read_capped(resp, MAX_MANIFEST_SIZE).await?;
            serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("referrers: {e}")))?
        } else {
            match self.get_manifest(&fallback_tag(digest)).await {
                Ok(m) => serde_json::from_slice(&m.bytes)
                    .map_err(|e| Error::Protocol(format!("referrers tag: {e}")))?,
                Err(e) if e.is_not_found() => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        };
        Ok(index
            .manifests()
            .iter()
            .filter(|d| {
                artifact_type.is_none_or(|t| {
                    d.artifact_type()
                        .as_ref()
                        .is_some_and(|a| a.to_string() == t)
                })
            })
            .cloned()
            .collect())
    }

    /// Records `referrer` in the `sha256-<hex>` tag index of `subject` (for registries without
    /// the referrers API).
    pub async fn add_referrer_to_fallback(
        &self,
        subject: &Digest,
        referrer: Descriptor,
    ) -> Result<()> {
        let tag = fallback_tag(subject);
        let mut manifests = match self.get_manifest(&tag).await {
            Ok(m) => serde_json::from_slice::<ImageIndex>(&m.bytes)
                .map(|i| i.manifests().clone())
                .unwrap_or_default(),
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e),
        };
        if manifests.iter().any(|d| d.digest() == referrer.digest()) {
            return Ok(());
        }
        manifests.push(referrer);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_INDEX,
            "manifests": manifests,
        });
        let bytes = Bytes::from(modelpack_spec::to_canonical_json(&index));
        self.put_manifest(&tag, MEDIA_TYPE_OCI_INDEX, bytes)
            .await
            .map(drop)
    }

    /// True when the registry serves the referrers API.
    pub async fn supports_referrers(&self, digest: &Digest) -> Result<bool> {
        let url = self.url(&format!("referrers/{digest}"));
        let resp = self
            .send(Access::Pull, Method::GET, &url, &[404, 400, 405], &Ok)
            .await?;
        Ok(resp.status().is_success())
    }
}

/// The tag that holds referrers for `digest` when the registry lacks the API.
pub fn fallback_tag(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm(), digest.encoded())
}

/// Reads a whole (small) body, refusing more than `cap` bytes.
pub(crate) async fn read_capped(mut resp: Response, cap: usize) -> Result<Bytes> {
    let url = display_url(resp.url().as_str());
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|error| Error::Http {
        method: "GET".into(),
        url: url.clone(),
        error,
    })? {
        if out.len() + chunk.len() > cap {
            return Err(Error::Protocol(format!("{url}: response over {cap} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// Reads a local file fully if it is at most `cap` bytes (for `manifest push FILE`).
pub fn read_small_file(path: &Path, cap: usize) -> Result<Vec<u8>> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::Io {
        context: format!("opening {}", path.display()),
        source: e,
    })?;
    let mut out = Vec::new();
    file.by_ref()
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::Io {
            context: format!("reading {}", path.display()),
            source: e,
        })?;
    if out.len() > cap {
        return Err(Error::Protocol(format!(
            "{} is over {cap} bytes",
            path.display()
        )));
    }
    Ok(out)
}
