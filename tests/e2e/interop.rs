//! Interop with oras-py, a foreign OCI client: it pulls what we push, and we pull what it pushes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util;

fn python(script: &str, args: &[&str]) -> String {
    let Some(py) = util::oras_python() else {
        return String::new();
    };
    let out = util::checked_output(Command::new(py).arg("-c").arg(script).args(args), "oras-py");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PULL: &str = r#"
import sys, oras.client
c = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)
for f in c.pull(target=sys.argv[2], outdir=sys.argv[3]):
    print(f)
"#;

const PUSH: &str = r#"
import os, sys, oras.client
os.chdir(sys.argv[3])
c = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)
c.push(target=sys.argv[2], files=sys.argv[4:])
"#;

/// When oras-py and a registry are here: the registry, and `files` written into the scratch
/// folder `folder`, to be named `HOST/REPO:TAG`.
fn oras_and_registry_with_files(
    repo_and_tag: &str,
    folder: &str,
    files: &[(&str, &[u8])],
) -> Option<util::ModelOnRegistry<PathBuf>> {
    util::oras_python()?;
    util::registry_and_model(repo_and_tag, |s| util::write_model_dir(s, folder, files))
}

#[test]
fn oras_py_pulls_what_we_push() {
    let files: &[(&str, &[u8])] = &[
        ("model.safetensors", &vec![3u8; 2 << 20]),
        ("config.json", br#"{"a":1}"#),
        ("README.md", b"hello\n"),
    ];
    let Some(m) = oras_and_registry_with_files("interop/model:v1", "model", files) else {
        return;
    };
    m.s.build_and_push(&m.dir, &m.reference);
    let out = m.s.path("oras-out");
    python(
        PULL,
        &[
            &m.registry.host(),
            &m.reference,
            out.to_str().expect("utf8"),
        ],
    );
    assert_eq!(
        util::tree(&out),
        util::tree(&m.dir),
        "oras-py got other files"
    );
}

#[test]
fn we_pull_what_oras_py_pushes() {
    let files: &[(&str, &[u8])] = &[
        ("weights.bin", &vec![9u8; 3 << 20]),
        ("notes.txt", b"from oras-py\n"),
    ];
    let Some(m) = oras_and_registry_with_files("interop/plain:v1", "files", files) else {
        return;
    };
    let (registry, s, dir, reference) = m.parts();
    python(
        PUSH,
        &[
            &registry.host(),
            reference,
            dir.to_str().expect("utf8"),
            "weights.bin",
            "notes.txt",
        ],
    );
    assert_eq!(util::pulled_tree(reference), util::tree(Path::new(dir)));
    // And into the store, then out again.
    s.ok(&["pull", reference, "--plain-http"]);
    assert!(s.ok(&["store", "check"]).contains("consistent"));

    // Plain files pushed by us in oras style come back through oras-py.
    let ours = format!("{}/interop/ours:v1", registry.host());
    let weights = dir.join("weights.bin");
    s.ok(&[
        "push",
        &ours,
        "--plain-http",
        "--artifact-type",
        "application/vnd.example.files",
        &format!("{}:application/vnd.example.bin", weights.display()),
    ]);
    let back = s.path("back");
    python(
        PULL,
        &[&registry.host(), &ours, back.to_str().expect("utf8")],
    );
    assert_eq!(
        fs::read(back.join("weights.bin")).expect("read"),
        fs::read(&weights).expect("read")
    );
}
