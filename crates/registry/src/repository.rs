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

use std::sync::Arc;

use crate::client::{Client, RetryPolicy, Scope, display_url};
use crate::endpoint::{Endpoint, Failure};
use crate::error::{Error, Result};
use crate::hosts;

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

/// Asks for a manifest of any type ([`manifest_accept`]).
fn accept_manifests(rb: RequestBuilder) -> Result<RequestBuilder> {
    Ok(rb.header(ACCEPT, manifest_accept()))
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

/// What a request does to the repository, which decides the hosts it may go to (their
/// capabilities) and the token scope it asks for.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Blobs, and manifests by digest: verified by digest, so any `pull` host.
    Pull,
    /// Tags to digests, tag lists, referrers: `resolve` hosts only.
    Resolve,
    /// Uploads and tags: the first `push` host.
    Push,
    /// What the first `push` host holds (the check before an upload), with a pull scope.
    Check,
    /// Deletes: the first `push` host.
    Delete,
}

impl Access {
    fn capability(self) -> u8 {
        match self {
            Access::Pull => hosts::PULL,
            Access::Resolve => hosts::RESOLVE,
            Access::Push | Access::Check | Access::Delete => hosts::PUSH,
        }
    }

    fn scope(self, name: &str) -> Scope {
        match self {
            Access::Pull | Access::Resolve | Access::Check => Scope::pull(name),
            Access::Push => Scope::push(name),
            Access::Delete => Scope::delete(name),
        }
    }

    /// `Pull` for a digest, `Resolve` for a tag.
    fn of_reference(reference: &str) -> Access {
        if reference.parse::<Digest>().is_ok() {
            Access::Pull
        } else {
            Access::Resolve
        }
    }
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

    /// `tail` of this repository on `ep` (`ROOT/NAME/TAIL`, with containerd's `ns` query for a
    /// host other than the registry).
    fn url_on(&self, ep: &Endpoint, tail: &str) -> String {
        let url = format!("{}/{}/{tail}", ep.root, self.name);
        match &ep.ns {
            Some(ns) => with_query(&url, "ns", ns),
            None => url,
        }
    }

    /// Sends a request for `tail` to the hosts `access` may use, in order: a mirror that fails
    /// (no connection, a timeout, any status but a success) sends it on to the next host at
    /// once; the last host gets the client's retries. `digest` leaves out mirrors that served
    /// wrong bytes of it. Returns the response and the host that gave it.
    async fn send(
        &self,
        access: Access,
        method: Method,
        tail: &str,
        accept: &[u16],
        build: &Build<'_>,
        digest: Option<&Digest>,
    ) -> Result<(Response, Arc<Endpoint>)> {
        let endpoints = self.client.endpoints(&self.registry)?;
        let mut candidates = endpoints.candidates(access.capability(), digest)?;
        if matches!(access, Access::Push | Access::Check | Access::Delete) {
            // Uploads are sessions on one host: the first that may take them.
            candidates.truncate(1);
        }
        let scope = access.scope(&self.name);
        let last = candidates.len() - 1;
        for (i, ep) in candidates.into_iter().enumerate() {
            let url = self.url_on(&ep, tail);
            if i == last {
                let policy = self.client.options().retry;
                let resp = self
                    .client
                    .send_on(&ep, &scope, method, &url, accept, build, policy)
                    .await?;
                return Ok((resp, ep));
            }
            let result = self
                .client
                .send_on(
                    &ep,
                    &scope,
                    method.clone(),
                    &url,
                    &[],
                    build,
                    RetryPolicy::ONCE,
                )
                .await;
            match result {
                Ok(resp) => {
                    endpoints.succeeded(&ep);
                    return Ok((resp, ep));
                }
                Err(e) => {
                    let failure = if e.status().is_some() || e.is_unauthorized() {
                        Failure::Answer
                    } else {
                        Failure::Unreachable
                    };
                    endpoints.failed(&ep, failure, &e.to_string());
                }
            }
        }
        Err(Error::Protocol(format!(
            "no host of {} answered",
            self.registry
        )))
    }

    /// Sends a request to `url` (an upload session's location, say) on the host `ep`, with the
    /// client's retries.
    async fn send_url(
        &self,
        ep: &Endpoint,
        access: Access,
        method: Method,
        url: &str,
        accept: &[u16],
        build: &Build<'_>,
    ) -> Result<Response> {
        let policy = self.client.options().retry;
        self.client
            .send_on(
                ep,
                &access.scope(&self.name),
                method,
                url,
                accept,
                build,
                policy,
            )
            .await
    }

    /// Sends a request for manifest `reference` (accepting any manifest type) as
    /// [`Repository::send`] does.
    async fn send_manifest(
        &self,
        access: Access,
        method: Method,
        reference: &str,
        accept: &[u16],
        digest: Option<&Digest>,
    ) -> Result<(Response, Arc<Endpoint>)> {
        let tail = format!("manifests/{reference}");
        self.send(access, method, &tail, accept, &accept_manifests, digest)
            .await
    }

    /// DELETEs `tail` (`blobs/<digest>` or `manifests/<digest>`).
    async fn delete(&self, tail: &str) -> Result<()> {
        self.send(Access::Delete, Method::DELETE, tail, &[], &Ok, None)
            .await
            .map(drop)
    }

    /// Bytes of `digest` this repository served failed the caller's verification: the mirrors
    /// that served any of them are not asked for that blob again (logged, and counted in
    /// [`crate::mirror_fallbacks`]). True when one was, so a new attempt goes to other hosts;
    /// false when only the registry's own server served it (trying again cannot help).
    pub fn distrust(&self, digest: &Digest) -> bool {
        self.client
            .endpoints(&self.registry)
            .is_ok_and(|e| e.distrust(digest))
    }

    /// Notes that `ep` served bytes of `digest`, for [`Repository::distrust`].
    pub(crate) fn note_served(&self, digest: &Digest, ep: &Endpoint) {
        if let Ok(e) = self.client.endpoints(&self.registry) {
            e.note_served(digest, ep);
        }
    }

    /// A body from mirror `ep` broke or misbehaved: its next request goes elsewhere for a while.
    pub(crate) fn mirror_broke(&self, ep: &Endpoint, reason: &str) {
        if !ep.server
            && let Ok(e) = self.client.endpoints(&self.registry)
        {
            e.failed(ep, Failure::Unreachable, reason);
        }
    }

    /// Mirror `ep` gave a wrong answer to a GET of `digest` (a range it was not asked for, a
    /// size that is not the blob's): it is not asked for that blob again (logged once, counted
    /// in [`crate::mirror_fallbacks`]). True when another host may be asked; false for the
    /// registry's server, or when no other host may pull.
    pub(crate) fn reject_blob_answer(&self, digest: &Digest, ep: &Endpoint, reason: &str) -> bool {
        if ep.server {
            return false;
        }
        let Ok(endpoints) = self.client.endpoints(&self.registry) else {
            return false;
        };
        endpoints.ban(digest, ep, reason);
        endpoints.candidates(hosts::PULL, Some(digest)).is_ok()
    }

    /// Size of the blob if the repository has it, asked of the host uploads go to (a mirror's
    /// copy says nothing about what a push there needs).
    pub async fn blob_exists(&self, digest: &Digest) -> Result<Option<u64>> {
        let tail = format!("blobs/{digest}");
        let (resp, _) = self
            .send(Access::Check, Method::HEAD, &tail, &[404], &Ok, None)
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        Ok(header(&resp, CONTENT_LENGTH).and_then(|s| s.parse().ok()))
    }

    /// Whether the repository holds any tag, asked of the host uploads go to (a 404, the
    /// registry's "name unknown", is no). A push into a repository without tags finds
    /// almost no blob there, so it need not ask about each small one.
    pub async fn holds_tags(&self) -> Result<bool> {
        let (resp, _) = self
            .send(
                Access::Check,
                Method::GET,
                "tags/list?n=1",
                &[404],
                &Ok,
                None,
            )
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(false);
        }
        Ok(!tag_page(resp).await?.is_empty())
    }

    /// HEADs manifest `digest` at the host blob checks and uploads go to (the first that may
    /// push): true when it has it, false on a 404. A push that finds it there has nothing to
    /// upload but the tag.
    pub async fn manifest_exists(&self, digest: &Digest) -> Result<bool> {
        let (resp, _) = self
            .send_manifest(Access::Check, Method::HEAD, digest.as_str(), &[404], None)
            .await?;
        Ok(resp.status().as_u16() != 404)
    }

    /// GETs a blob from byte `start` (to `end`, exclusive, or to its end). A server that ignores
    /// `Range` answers 200 with the whole blob; [`crate::BlobBody`] skips what was not asked for.
    pub(crate) async fn get_blob(
        &self,
        digest: &Digest,
        start: u64,
        end: Option<u64>,
    ) -> Result<(Response, Arc<Endpoint>)> {
        let tail = format!("blobs/{digest}");
        let range = match end {
            Some(end) if end > start => Some(format!("bytes={start}-{}", end - 1)),
            None if start > 0 => Some(format!("bytes={start}-")),
            _ => None,
        };
        self.send(
            Access::Pull,
            Method::GET,
            &tail,
            &[],
            &|rb| {
                Ok(match &range {
                    Some(r) => rb.header(RANGE, r),
                    None => rb,
                })
            },
            Some(digest),
        )
        .await
    }

    /// The host uploads go to: the first that may push.
    fn push_host(&self) -> Result<Arc<Endpoint>> {
        let mut hosts = self
            .client
            .endpoints(&self.registry)?
            .candidates(hosts::PUSH, None)?;
        Ok(hosts.swap_remove(0))
    }

    /// Tries to mount `digest` from repository `from` of the same registry. Returns `Ok(true)`
    /// when mounted; `Ok(false)` when the registry started an upload instead (it is cancelled).
    pub async fn mount_blob(&self, digest: &Digest, from: &str) -> Result<bool> {
        let ep = self.push_host()?;
        let url = with_query(
            &with_query(
                &self.url_on(&ep, "blobs/uploads/"),
                "mount",
                digest.as_str(),
            ),
            "from",
            from,
        );
        let scope = Scope(format!(
            "repository:{}:pull,push repository:{from}:pull",
            self.name
        ));
        let policy = self.client.options().retry;
        let resp = self
            .client
            .send_on(&ep, &scope, Method::POST, &url, &[], &Ok, policy)
            .await?;
        if resp.status().as_u16() == 201 {
            return Ok(true);
        }
        // 202: an upload session was opened instead; close it.
        if let Ok(loc) = location(&resp, &ep.base) {
            let _ = self
                .send_url(&ep, Access::Push, Method::DELETE, &loc, &[404], &Ok)
                .await;
        }
        Ok(false)
    }

    /// Opens an upload session: its location, and the host it lives on.
    async fn start_upload(&self) -> Result<(String, Arc<Endpoint>)> {
        let (resp, ep) = self
            .send(
                Access::Push,
                Method::POST,
                "blobs/uploads/",
                &[],
                &|rb| Ok(rb.header(CONTENT_LENGTH, 0)),
                None,
            )
            .await?;
        Ok((location(&resp, &ep.base)?, ep))
    }

    /// Starts an upload and PUTs the whole blob in one request (POST then PUT `?digest=`).
    /// `body` is called again for each attempt.
    async fn push_blob_whole(
        &self,
        digest: &Digest,
        len: u64,
        body: &(dyn Fn() -> Result<Body> + Send + Sync),
    ) -> Result<()> {
        let (loc, ep) = self.start_upload().await?;
        let url = with_query(&loc, "digest", digest.as_str());
        self.send_url(&ep, Access::Push, Method::PUT, &url, &[], &|rb| {
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
        let (mut loc, ep) = self.start_upload().await?;
        let mut offset = 0u64;
        let mut failures = 0u32;
        while offset < size {
            let len = chunk_size.min(size - offset);
            let range = format!("{}-{}", offset, offset + len - 1);
            let result = self
                .send_url(&ep, Access::Push, Method::PATCH, &loc, &[], &|rb| {
                    Ok(rb
                        .header(CONTENT_TYPE, OCTET_STREAM)
                        .header(CONTENT_RANGE, &range)
                        .header(CONTENT_LENGTH, len)
                        .body(file_body(path, offset, len)?))
                })
                .await;
            match result {
                Ok(resp) => {
                    loc = location(&resp, &ep.base).unwrap_or(loc);
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
                    let status = self
                        .send_url(&ep, Access::Push, Method::GET, &loc, &[], &Ok)
                        .await?;
                    let have = header(&status, RANGE)
                        .and_then(|v| v.rsplit('-').next())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map_or(0, |end| end + 1);
                    tracing::debug!(have, "resuming chunked upload");
                    loc = location(&status, &ep.base).unwrap_or(loc);
                    offset = have;
                }
            }
        }
        let url = with_query(&loc, "digest", digest.as_str());
        self.send_url(&ep, Access::Push, Method::PUT, &url, &[], &|rb| {
            Ok(rb.header(CONTENT_LENGTH, 0))
        })
        .await
        .map(drop)
    }

    /// Deletes a blob.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<()> {
        self.delete(&format!("blobs/{digest}")).await
    }

    /// GETs a manifest by tag (at a host that may resolve) or digest (at any host that may
    /// pull: a mirror whose bytes do not match is left for the next host), verifying a digest
    /// reference and capping the size.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let access = Access::of_reference(reference);
        let expected = reference.parse::<Digest>().ok();
        let mut mirror_failures = 0;
        loop {
            let (resp, ep) = self
                .send_manifest(access, Method::GET, reference, &[], expected.as_ref())
                .await?;
            match read_manifest(reference, resp).await {
                Ok(m) => {
                    if let Some(expected) = &expected
                        && expected != &m.digest
                    {
                        if !ep.server {
                            // Wrong bytes from a mirror: never from there again; next host.
                            self.client.endpoints(&self.registry)?.ban(
                                expected,
                                &ep,
                                &format!("{expected} failed verification"),
                            );
                            continue;
                        }
                        return Err(Error::DigestMismatch {
                            expected: expected.to_string(),
                            actual: m.digest.to_string(),
                        });
                    }
                    return Ok(m);
                }
                // A mirror's body that broke: the next host (bounded: a mirror may be the last).
                Err(e) if !ep.server && mirror_failures < 8 => {
                    mirror_failures += 1;
                    self.mirror_broke(&ep, &e.to_string());
                    if let Some(d) = &expected {
                        self.client
                            .endpoints(&self.registry)?
                            .ban(d, &ep, &e.to_string());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// HEADs a manifest: its digest and size, or `None`.
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<(Digest, u64)>> {
        let access = Access::of_reference(reference);
        let (resp, _) = self
            .send_manifest(access, Method::HEAD, reference, &[404], None)
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        // By digest the answer is the digest asked for (a mirror's header vouches for nothing).
        let digest = match reference.parse::<Digest>() {
            Ok(asked) => Some(asked),
            Err(_) => header(&resp, "docker-content-digest").and_then(|s| s.parse().ok()),
        };
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

    /// HEADs manifest `digest` at the registry's server alone (the hosts file's `server`, the
    /// registry itself unless it names another), never at a mirror: an access check whose
    /// answer must come from the registry, with its credentials. True when it has it, false
    /// on a 404.
    pub async fn head_manifest_at_server(&self, digest: &Digest) -> Result<bool> {
        let ep = self.client.server(&self.registry)?;
        let url = self.url_on(&ep, &format!("manifests/{digest}"));
        let resp = self
            .send_url(
                &ep,
                Access::Pull,
                Method::HEAD,
                &url,
                &[404],
                &accept_manifests,
            )
            .await?;
        Ok(resp.status().as_u16() != 404)
    }

    /// PUTs a manifest under a tag or its digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest> {
        let digest = Digest::sha256_of(&bytes);
        let tail = format!("manifests/{reference}");
        self.send(
            Access::Push,
            Method::PUT,
            &tail,
            &[],
            &|rb| Ok(rb.header(CONTENT_TYPE, media_type).body(bytes.clone())),
            None,
        )
        .await?;
        Ok(digest)
    }

    /// Deletes a manifest by digest.
    pub async fn delete_manifest(&self, digest: &Digest) -> Result<()> {
        self.delete(&format!("manifests/{digest}")).await
    }

    /// Every tag, following `Link` pagination.
    pub async fn tags(&self) -> Result<Vec<String>> {
        let mut tags = Vec::new();
        // The first page at a host that may resolve; the next pages where it points.
        let (mut resp, ep) = self
            .send(
                Access::Resolve,
                Method::GET,
                "tags/list?n=1000",
                &[404],
                &Ok,
                None,
            )
            .await?;
        loop {
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
            tags.extend(tag_page(resp).await?);
            let url = match next {
                Some(n) if n.starts_with('/') => format!("{}{n}", ep.base),
                Some(n) if n.starts_with("http") => n,
                _ => break,
            };
            resp = self
                .send_url(&ep, Access::Resolve, Method::GET, &url, &[404], &Ok)
                .await?;
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
        let mut tail = format!("referrers/{digest}");
        if let Some(t) = artifact_type {
            tail = with_query(&tail, "artifactType", t);
        }
        let (resp, _) = self
            .send(Access::Resolve, Method::GET, &tail, &[404], &Ok, None)
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
        let tail = format!("referrers/{digest}");
        let (resp, _) = self
            .send(
                Access::Resolve,
                Method::GET,
                &tail,
                &[404, 400, 405],
                &Ok,
                None,
            )
            .await?;
        Ok(resp.status().is_success())
    }
}

/// Reads a manifest response: its bytes (capped), media type and digest.
async fn read_manifest(reference: &str, resp: Response) -> Result<FetchedManifest> {
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

/// The tag names of one page of a tag list (`{"tags": [...]}`).
async fn tag_page(resp: Response) -> Result<Vec<String>> {
    let body = read_capped(resp, MAX_MANIFEST_SIZE).await?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("tag list: {e}")))?;
    Ok(v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect())
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
