//! The local content store: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`)
//! that oras, skopeo and containerd can read as it is.
//!
//! - [`Store`] opens or creates the layout, names artifacts in `index.json`, and collects garbage;
//! - [`Ingest`] is how bytes enter it: a locked temporary file in `ingest/`, renamed into
//!   `blobs/` under its digest.
//!
//! **Invariant:** a file appears under `blobs/<alg>/<hex>` only by rename after its digest was
//! computed over exactly its bytes; `index.json` is replaced atomically under a file lock.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let store = modelpack_store::Store::open(dir.path()).unwrap();
//! let digest = store.put_bytes(b"hello").unwrap();
//! assert_eq!(store.read_blob(&digest, 1024).unwrap(), b"hello");
//! ```
#![deny(missing_docs, missing_debug_implementations)]

mod error;
mod ingest;
mod layout;

pub use error::{Error, IoContext, PathIoError, Result};
pub use ingest::{Ingest, Resumable, create_new_private, open_private, sha256_file, sha256_reader};
pub use layout::{
    CheckReport, GcGuard, LinkOutcome, PruneReport, STORE_ENV, ScratchStore, Store, StoreEntry,
    default_root,
};
