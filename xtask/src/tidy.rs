//! Repository rules as tests: every Rust file says why it exists, no stubs, and the crate
//! dependency arrows of ARCHITECTURE.md hold.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for top in ["crates", "plugins", "xtask", "tests"] {
        rust_files(&crate::root().join(top), &mut files);
    }
    files
}

#[test]
fn every_file_opens_with_a_doc_comment() {
    let missing: Vec<_> = all_rust_files()
        .into_iter()
        .filter(|p| !fs::read_to_string(p).is_ok_and(|t| t.starts_with("//!")))
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! header: {missing:#?}"
    );
}

#[test]
fn no_stubs_or_ignored_tests() {
    let needles = [
        concat!("todo", "!("),
        concat!("unimplemented", "!("),
        concat!("#[", "ignore"),
        concat!("#[", "should_panic"),
    ];
    let mut hits = Vec::new();
    for path in all_rust_files() {
        let text = fs::read_to_string(&path).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            // Doc examples that never run (`no_run`) may stand in a value with a stub.
            if line.trim_start().starts_with("//!") || line.trim_start().starts_with("///") {
                continue;
            }
            if needles.iter().any(|n| line.contains(n)) {
                hits.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(hits.is_empty(), "{hits:#?}");
}

#[test]
fn media_type_literals_live_in_spec() {
    let mut hits = Vec::new();
    for path in all_rust_files() {
        let rel = path
            .strip_prefix(crate::root())
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        if rel.starts_with("crates/spec/")
            || rel.starts_with("xtask/src/tidy.rs")
            || rel.starts_with("tests/")
            // builds the busybox test image (an OCI image, not a model) for the containerd checks
            || rel.starts_with("xtask/src/containerd.rs")
        {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if line.contains("\"application/vnd.") || line.contains("\"org.cncf.model") {
                hits.push(format!("{rel}:{}", i + 1));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "media types and annotation keys belong in crates/spec: {hits:#?}"
    );
}

/// Which workspace crates each crate may depend on (ARCHITECTURE.md's code map): a package, then
/// the crates it may use, both without the `modelpack-` prefix.
const ALLOWED: &[(&str, &str)] = &[
    ("spec", ""),
    ("mountinfo", ""),
    ("store", "spec"),
    ("build", "spec store"),
    ("extract", "spec store"),
    ("registry", "spec"),
    ("transfer", "spec store registry extract"),
    ("lazyfs", "mountinfo spec store registry transfer extract"),
    ("daemon", "lazyfs"),
    ("containerd", "spec"),
    ("proto", ""),
    (
        "cli",
        "spec store build extract registry transfer lazyfs containerd proto",
    ),
    ("snapshotter", "spec store registry lazyfs daemon proto"),
    ("csi", "spec store registry transfer lazyfs daemon"),
    ("testkit", "mountinfo"),
    ("e2e", ""),
    ("xtask", "testkit"),
];

#[test]
fn dependency_arrows() {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(crate::root())
        .output()
        .expect("cargo metadata runs");
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    for package in packages {
        let name = package["name"].as_str().unwrap_or_default();
        let short = name.strip_prefix("modelpack-").unwrap_or(name);
        let allowed = ALLOWED
            .iter()
            .find(|(n, _)| *n == short)
            .unwrap_or_else(|| panic!("{name} is not in tidy's allow-list; add it with its arrows"))
            .1;
        for dep in package["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            let dev = dep["kind"].as_str() == Some("dev");
            if let Some(internal) = dep_name.strip_prefix("modelpack-")
                && !dev
            {
                assert!(
                    allowed.split(' ').any(|a| a == internal),
                    "{name} must not depend on {dep_name}"
                );
            }
        }
    }
}
