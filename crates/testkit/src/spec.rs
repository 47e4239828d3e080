//! The upstream ModelPack schema and test vectors, read where they are (never copied): the
//! `shared/spec` folder beside the checkout, or the folder `MODELPACK_SPEC_DIR` names.

use std::path::{Path, PathBuf};

/// The environment variable that points at the spec folder (holding `config-schema.json` and
/// `vectors/`).
pub const SPEC_DIR_ENV: &str = "MODELPACK_SPEC_DIR";

/// The spec folder, if it is there. A clone without it skips the tests that need it with one
/// printed line saying what is missing and how to point at it; under CI (`CI=true`) a missing
/// folder fails the run instead.
pub fn spec_dir() -> Option<PathBuf> {
    let dir = std::env::var_os(SPEC_DIR_ENV).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/spec"),
        PathBuf::from,
    );
    if dir.join("config-schema.json").is_file() {
        return Some(dir);
    }
    let message = format!(
        "the upstream spec folder {} (config-schema.json, vectors/) is missing; set {SPEC_DIR_ENV} to where it is",
        dir.display()
    );
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{message}"
    );
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| eprintln!("note: {message}; the tests that need it are skipped"));
    None
}
