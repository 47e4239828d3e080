//! The end-to-end suite: one binary, a module per area, driving the built `modelpack`.

mod auth;
mod build_extract;
mod cache;
mod cli_habits;
mod crash;
mod csi;
mod faults;
mod fuzz_replay;
mod hostile;
mod interop;
mod mirrors;
mod mount;
mod other_writers;
mod push_pull;
mod readahead;
mod reliability;
mod store;
mod util;
