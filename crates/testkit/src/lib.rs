//! Test support for the end-to-end tests (`tests/`) and xtask's containerd checks and benchmarks:
//! one of each thing a test starts or inspects, so each behaves the same everywhere.
//!
//! - [`registry::Registry`]: a real CNCF distribution registry (`docker-registry`) on loopback;
//! - [`link::Link`]: a streaming TCP proxy that counts, throttles, delays, corrupts or goes down;
//! - [`blob_server::BlobServer`]: one blob over HTTP, misbehaving request by request, for unit
//!   tests without a registry;
//! - [`fault::FaultProxy`]: an HTTP proxy scripted per request (status codes, resets, cuts,
//!   ignored ranges, redirects);
//! - [`process::ChildGuard`]: a child process stopped by PID when dropped, also on failure;
//! - [`mounts`]: the mount table, parsed once, correctly unescaped;
//! - [`spec`]: where the upstream schema and vectors are (`../shared/spec`);
//! - [`sys`]: root check, free ports;
//! - [`data`]: incompressible test bytes;
//! - [`disk`]: a folder's disk usage, and its peak sampled while a test runs.
//!
//! Everything here panics on a broken environment: it is for tests.
#![deny(missing_docs)]

pub mod blob_server;
pub mod data;
pub mod disk;
pub mod fault;
pub mod link;
pub mod mounts;
pub mod process;
pub mod registry;
pub mod spec;
pub mod sys;
