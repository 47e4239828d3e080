//! An OCI distribution client for model-sized blobs.
//!
//! - [`Client`]: one HTTP client per process with the auth flow (anonymous, basic, bearer tokens
//!   with scopes, identity tokens) and retries (capped exponential backoff, jitter,
//!   `Retry-After`, a deadline);
//! - [`Repository`]: blobs (HEAD, ranged reads as one resumable [`BlobBody`], streamed
//!   monolithic and resumable chunked uploads, cross-repository mount, delete), manifests, tags
//!   and referrers (with the tag-schema fallback);
//! - [`credentials`]: the Docker config and credential helpers (read again when a registry
//!   refuses what was read before);
//! - registry hosts as containerd configures them (`ClientOptions::hosts_dir`: mirrors tried
//!   in order before the server, per-host TLS, capabilities, headers), with failover per
//!   request and [`mirror_fallbacks`] counting the switches.
//!
//! ```no_run
//! # async fn demo() -> modelpack_registry::Result<()> {
//! use modelpack_registry::{Client, ClientOptions, Repository};
//! let client = Client::new(ClientOptions { plain_http: true, ..ClientOptions::new() })?;
//! let reference = "localhost:5000/models/llama:8b".parse().unwrap();
//! let repo = Repository::new(&client, &reference);
//! let manifest = repo.get_manifest("8b").await?;
//! println!("{} ({} bytes)", manifest.digest, manifest.bytes.len());
//! # Ok(()) }
//! ```
//!
//! **Invariant:** credentials never appear in `Debug` output, logs or error messages; URLs in
//! errors are stripped of their query.
#![deny(missing_docs, missing_debug_implementations)]

mod blob;
mod client;
pub mod credentials;
mod endpoint;
mod error;
mod hosts;
mod repository;

pub use blob::BlobBody;
pub use client::{Client, ClientOptions, RetryPolicy, Scope};
pub use credentials::Credential;
pub use endpoint::mirror_fallbacks;
pub use error::{Error, Result};
pub use hosts::is_loopback;
pub use repository::{
    FetchedManifest, MAX_MANIFEST_SIZE, Repository, fallback_tag, read_small_file,
};
