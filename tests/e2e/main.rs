//! The end-to-end suite: one binary, a module per area, driving the built `modelpack`.

mod auth;
mod build_extract;
mod crash;
mod faults;
mod fuzz_replay;
mod hostile;
mod interop;
mod mount;
mod push_pull;
mod reliability;
mod store;
mod util;
