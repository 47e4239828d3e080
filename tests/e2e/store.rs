//! The store as an OCI image layout other tools read, naming, garbage collection, and concurrent
//! writers.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::Value;

use crate::util::{self, Scratch};

fn small_model(s: &Scratch) -> String {
    let model = s.path("model");
    fs::create_dir_all(&model).expect("mkdir");
    fs::write(model.join("config.json"), b"{}").expect("write");
    fs::write(model.join("weights.bin"), vec![7u8; 3 << 20]).expect("write");
    model.to_str().expect("utf8").to_owned()
}

#[test]
fn skopeo_reads_the_store_as_an_oci_layout() {
    if !util::have_tool("skopeo") {
        return;
    }
    let s = Scratch::new();
    let model = small_model(&s);
    let digest = s.ok(&["-q", "build", &model, "-t", "localhost:5000/team/model:v1"]);
    let digest = digest.trim();
    s.ok(&["tag", "localhost:5000/team/model:v1", "plain:v1"]);
    for name in ["localhost:5000/team/model:v1", "plain:v1"] {
        let (raw, raw_digest) =
            util::skopeo_manifest(&format!("oci:{}:{name}", s.store().display()));
        assert_eq!(raw_digest, digest, "skopeo printed another manifest");
        let manifest: Value = serde_json::from_slice(&raw).expect("JSON");
        assert_eq!(
            manifest["artifactType"],
            "application/vnd.cncf.model.manifest.v1+json"
        );
    }
}

#[test]
fn tag_rm_prune_and_check() {
    let s = Scratch::new();
    let model = small_model(&s);
    s.ok(&["build", &model, "-t", "a:v1"]);
    s.ok(&["tag", "a:v1", "b:v2"]);
    let ls: Value = serde_json::from_str(&s.ok(&["ls", "--format", "json"])).expect("json");
    assert_eq!(ls.as_array().expect("array").len(), 2);
    assert_eq!(ls[0]["digest"], ls[1]["digest"]);

    s.ok(&["rm", "a:v1"]);
    let pruned: Value = serde_json::from_str(&s.ok(&["prune", "--format", "json"])).expect("json");
    assert_eq!(
        pruned["blobs"].as_array().expect("blobs").len(),
        0,
        "b:v2 still holds them"
    );
    let err = s.fails(&["inspect", "a:v1"]);
    assert!(err.contains("a:v1 is not in the store"), "{err}");

    s.ok(&["rm", "b:v2"]);
    let dry: Value =
        serde_json::from_str(&s.ok(&["prune", "--dry-run", "--format", "json"])).expect("json");
    assert_eq!(
        dry["blobs"].as_array().expect("blobs").len(),
        5,
        "manifest, config, 2 layers, chunk index"
    );
    let pruned: Value = serde_json::from_str(&s.ok(&["prune", "--format", "json"])).expect("json");
    assert_eq!(pruned["blobs"], dry["blobs"]);
    assert_eq!(
        fs::read_dir(s.store().join("blobs/sha256"))
            .expect("blobs")
            .count(),
        0
    );
    assert!(s.ok(&["store", "check"]).contains("consistent"));
    let err = s.fails(&["rm", "b:v2"]);
    assert!(err.contains("not in the store"), "{err}");
}

#[test]
fn store_is_private_and_stale_temp_files_are_pruned() {
    let s = Scratch::new();
    s.ok(&["ls"]);
    let mode = fs::metadata(s.store()).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // A temporary file left by a killed writer (no lock held) is stale.
    fs::write(s.store().join("ingest/blob-leftover"), b"partial").expect("write");
    let pruned: Value = serde_json::from_str(&s.ok(&["prune", "--format", "json"])).expect("json");
    assert_eq!(pruned["staleTemporaryFiles"], 1);
    assert!(!s.store().join("ingest/blob-leftover").exists());
}

#[test]
fn concurrent_builds_into_one_store() {
    let s = Scratch::new();
    let model = small_model(&s);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let store = s.store();
            let model = model.clone();
            std::thread::spawn(move || {
                Command::new(util::bin())
                    .arg("--store")
                    .arg(store)
                    .args([
                        "-q",
                        "build",
                        &model,
                        "-t",
                        &format!("par:v{i}"),
                        "--no-creation-time",
                    ])
                    .output()
                    .expect("run")
            })
        })
        .collect();
    let digests: Vec<String> = handles
        .into_iter()
        .map(|h| {
            let out = h.join().expect("thread");
            util::assert_success(&out, &["build"]);
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    let ls: Value = serde_json::from_str(&s.ok(&["ls", "--format", "json"])).expect("json");
    assert_eq!(
        ls.as_array().expect("array").len(),
        4,
        "every name recorded: {ls}"
    );
    assert!(s.ok(&["store", "check"]).contains("consistent"));
    assert_eq!(
        fs::read_dir(s.store().join("ingest"))
            .expect("ingest")
            .count(),
        0
    );
}

#[test]
fn link_places_raw_files_without_a_second_copy() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new();
    let model = small_model(&s);
    let info: Value = {
        s.ok(&["build", &model, "-t", "linked:v1", "--link"]);
        serde_json::from_str(&s.ok(&["inspect", "linked:v1", "--format", "json"])).expect("json")
    };
    let weights = info["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .find(|l| l["path"] == "weights.bin")
        .expect("weights layer");
    let digest = weights["digest"].as_str().expect("digest");
    let blob = s
        .store()
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let source = fs::metadata(format!("{model}/weights.bin")).expect("stat source");
    let stored = fs::metadata(&blob).expect("stat blob");
    // Where the file system can clone, the blob is a reflink (its own inode, shared extents);
    // elsewhere (ext4) it is a hard link to the source.
    let can_reflink = Command::new("cp")
        .arg("--reflink=always")
        .arg(format!("{model}/weights.bin"))
        .arg(s.path("reflink-probe"))
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if can_reflink {
        assert_ne!(source.ino(), stored.ino(), "expected a reflinked copy");
    } else {
        assert_eq!(source.ino(), stored.ino(), "expected a hard link");
        assert_eq!(stored.nlink(), 2);
    }
    assert_eq!(
        util::sha256_file(&blob),
        digest.trim_start_matches("sha256:")
    );
    assert!(s.ok(&["store", "check"]).contains("consistent"));
    let err = s.fails(&[
        "build",
        &model,
        "-t",
        "x:v1",
        "--link",
        "--layer-format",
        "tar",
    ]);
    assert!(err.contains("--link works with raw layers only"), "{err}");
}
