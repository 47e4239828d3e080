//! The end-to-end suite: one binary, a module per area, driving the built `modelpack`.

mod build_extract;
mod hostile;
mod store;
mod util;
