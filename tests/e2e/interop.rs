//! Interop with oras-py, a foreign OCI client: it pulls what we push, and we pull what it pushes.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::util::{self, Registry, Scratch};

fn python(script: &str, args: &[&str]) -> String {
    let Some(py) = util::oras_python() else {
        return String::new();
    };
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "oras-py failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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

#[test]
fn oras_py_pulls_what_we_push() {
    if util::oras_python().is_none() {
        return;
    }
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let dir = s.path("model");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("model.safetensors"), vec![3u8; 2 << 20]).expect("write");
    fs::write(dir.join("config.json"), br#"{"a":1}"#).expect("write");
    fs::write(dir.join("README.md"), b"hello\n").expect("write");
    let reference = format!("{}/interop/model:v1", registry.host());
    s.build_and_push(dir.to_str().expect("utf8"), &reference);
    let out = s.path("oras-out");
    python(
        PULL,
        &[&registry.host(), &reference, out.to_str().expect("utf8")],
    );
    assert_eq!(
        util::tree(&out),
        util::tree(&dir),
        "oras-py got other files"
    );
}

#[test]
fn we_pull_what_oras_py_pushes() {
    if util::oras_python().is_none() {
        return;
    }
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();
    let dir = s.path("files");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("weights.bin"), vec![9u8; 3 << 20]).expect("write");
    fs::write(dir.join("notes.txt"), b"from oras-py\n").expect("write");
    let reference = format!("{}/interop/plain:v1", registry.host());
    python(
        PUSH,
        &[
            &registry.host(),
            &reference,
            dir.to_str().expect("utf8"),
            "weights.bin",
            "notes.txt",
        ],
    );
    assert_eq!(util::pulled_tree(&reference), util::tree(Path::new(&dir)));
    // And into the store, then out again.
    s.ok(&["pull", &reference, "--plain-http"]);
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
