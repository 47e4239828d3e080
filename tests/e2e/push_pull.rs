//! Transfers against a real `docker-registry`: push, pull (into the store and straight into a
//! folder), fetch, copy with cross-repository mount, resume after kill, referrers, and the
//! small oras-style commands.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use modelpack_testkit::fault::FaultProxy;
use modelpack_testkit::process::{Signal, signal_pid};

use crate::util::{self, Proxy, Registry, Scratch};

/// Writes a model with one weight of `weight_size` bytes plus small files.
fn model(s: &Scratch, weight_size: usize) -> String {
    let dir = util::model_with_weight(
        s,
        weight_size,
        0x1234_5678_9abc_def1,
        &[
            ("config.json", br#"{"model_type":"t"}"#),
            ("docs/README.md", b"# model\n"),
            ("empty.bin", b""),
        ],
    );
    dir.to_str().expect("utf8").to_owned()
}

/// A registry and [`model`] built and pushed (`-q`) as `HOST/REPO:TAG`, and the pushed digest.
fn pushed_model_and_digest(
    repo_and_tag: &str,
    weight_size: usize,
) -> Option<(util::ModelOnRegistry<String>, String)> {
    let m = util::registry_and_model(repo_and_tag, |s| model(s, weight_size))?;
    let digest = m.s.build_and_push_digest(&m.dir, &m.reference);
    Some((m, digest))
}

/// Asserts that every file in `target` (but the `user_files` and extraction scratch) is
/// complete: the same bytes as in `source`.
fn assert_no_partial_files(target: &Path, source: &Path, user_files: &[&str]) {
    for (path, (hash, _)) in util::tree(target) {
        if user_files.contains(&path.as_str()) || path.starts_with(".modelpack-extract-") {
            continue;
        }
        let want = util::sha256_file(&source.join(&path));
        assert_eq!(hash, want, "{path} visible before it was complete");
    }
}

#[test]
fn push_then_pull_into_store_folder_and_fetch() {
    let Some((m, pushed)) = pushed_model_and_digest("team/model:v1", 3 << 20) else {
        return;
    };
    let (_, s, dir, reference) = m.parts();
    let local: Value =
        serde_json::from_str(&s.ok(&["inspect", reference, "--format", "json"])).expect("json");
    assert_eq!(
        pushed.as_str(),
        local["digest"],
        "pushed digest equals the stored one"
    );
    assert_eq!(s.ok(&["resolve", reference, "--plain-http"]).trim(), pushed);

    // Into another store.
    let other = Scratch::new();
    let pulled = other.ok(&["-q", "pull", reference, "--plain-http"]);
    assert_eq!(pulled.trim(), pushed);
    assert!(other.ok(&["store", "check"]).contains("consistent"));
    let out = other.path("from-store");
    other.ok(&["extract", reference, out.to_str().expect("utf8")]);
    assert_eq!(util::tree(&out), util::tree(Path::new(dir)));

    // Straight into a folder: nothing lands in the store.
    let direct = other.path("direct");
    let third = Scratch::new();
    third.ok(&util::pull_to_args(reference, &direct));
    assert_eq!(util::tree(&direct), util::tree(Path::new(dir)));
    assert_eq!(third.ok(&["ls", "--format", "json"]).trim(), "[]");

    // Only matching files.
    let some = other.path("some");
    other.ok(&[
        "fetch",
        reference,
        "--plain-http",
        "--pattern",
        "**/*.md",
        "-o",
        some.to_str().expect("utf8"),
    ]);
    assert_eq!(
        util::tree(&some).into_keys().collect::<Vec<_>>(),
        ["docs/README.md"]
    );

    // The remote inspect agrees with the local one.
    let remote: Value = serde_json::from_str(&s.ok(&[
        "inspect",
        "--remote",
        reference,
        "--plain-http",
        "--format",
        "json",
    ]))
    .expect("json");
    assert_eq!(remote["layers"], local["layers"]);
}

#[test]
fn copy_within_a_registry_mounts_blobs() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let proxy = Proxy::start(registry.port, None);
    let s = Scratch::new();
    let dir = model(&s, 4 << 20);
    let src = format!("{}/a/model:v1", proxy.host());
    let dst = format!("{}/b/model:v2", proxy.host());
    let pushed = s.build_and_push_digest(&dir, &src);
    let before = proxy.served();
    let copied = s.ok(&["-q", "copy", &src, &dst, "--plain-http"]);
    let moved = proxy.served() - before;
    assert_eq!(copied.trim(), pushed, "manifest digest kept");
    assert!(
        moved < 64 * 1024,
        "copy moved {moved} bytes; blobs should be mounted"
    );
    assert_eq!(s.ok(&["resolve", &dst, "--plain-http"]).trim(), pushed);
    // Layout folder on either side.
    let layout = s.path("layout");
    let oci = format!("oci:{}:v1", layout.display());
    s.ok(&["copy", &dst, &oci, "--plain-http"]);
    if util::have_tool("skopeo") {
        assert_eq!(
            util::skopeo_manifest(&format!("oci:{}:v1", layout.display())).1,
            pushed
        );
    }
    let back = format!("{}/c/model:v3", registry.host());
    s.ok(&["copy", &oci, &back, "--plain-http"]);
    assert_eq!(s.ok(&["resolve", &back, "--plain-http"]).trim(), pushed);
    // Local to local through the same walk: layout to layout, layout to the store, and the
    // store back to a registry; the manifest digest stays the same all the way.
    let second = format!("oci:{}:v9", s.path("layout2").display());
    assert_eq!(s.ok(&["-q", "copy", &oci, &second]).trim(), pushed);
    assert_eq!(
        s.ok(&["-q", "copy", &second, "store:copied/model:v1"])
            .trim(),
        pushed
    );
    let last = format!("{}/d/model:v4", registry.host());
    s.ok(&["copy", "store:copied/model:v1", &last, "--plain-http"]);
    assert_eq!(s.ok(&["resolve", &last, "--plain-http"]).trim(), pushed);
}

#[test]
fn killed_pull_resumes_and_fetches_less() {
    let size = 160 << 20;
    let Some(m) = util::registry_with_pushed_model("big/model:v1", |s| model(s, size)) else {
        return;
    };

    // Slow the pull down (8 connections x 4 MiB/s) so it can be killed half way.
    let (proxy, via_proxy) = m.through_proxy(Some(4 << 20));
    let puller = Scratch::new();
    let mut child = puller.spawn_silenced(&["pull", &via_proxy, "--plain-http"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy.served() < (size as u64) / 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    let first = proxy.served();
    assert!(
        first < size as u64,
        "the pull finished before it could be killed"
    );
    assert_eq!(
        puller.ok(&["ls", "--format", "json"]).trim(),
        "[]",
        "a killed pull names nothing"
    );

    let (fast, again) = m.through_proxy(None);
    let out = puller.ok(&["pull", &again, "--plain-http"]);
    assert!(out.contains("resumed"), "{out}");
    let second = fast.served();
    assert!(
        second < size as u64 * 9 / 10,
        "second pull fetched {second} of {size} bytes"
    );
    assert!(puller.ok(&["store", "check"]).contains("consistent"));
    let tree = puller.path("tree");
    puller.ok(&["extract", &again, tree.to_str().expect("utf8")]);
    assert_eq!(util::tree(&tree), util::tree(Path::new(&m.dir)));
}

#[test]
fn attach_discover_and_small_commands() {
    let Some((m, digest)) = pushed_model_and_digest("team/model:v1", 1 << 20) else {
        return;
    };
    let (registry, s, _, reference) = m.parts();

    let sig = s.path("signature.json");
    fs::write(&sig, br#"{"signed":true}"#).expect("write");
    let attached = s.ok(&[
        "-q",
        "attach",
        "--plain-http",
        "--subject",
        reference,
        "--artifact-type",
        "application/vnd.example.signature",
        sig.to_str().expect("utf8"),
    ]);
    let found: Value =
        serde_json::from_str(&s.ok(&["discover", reference, "--plain-http", "--format", "json"]))
            .expect("json");
    let referrers = found["referrers"].as_array().expect("referrers");
    // The signature, and the chunk index the push attached so that registry GC keeps it.
    assert_eq!(referrers.len(), 2, "{found}");
    let of_type = |t: &str| {
        referrers
            .iter()
            .filter(|r| r["artifactType"] == t)
            .collect::<Vec<_>>()
    };
    let signatures = of_type("application/vnd.example.signature");
    assert_eq!(signatures.len(), 1, "{found}");
    assert_eq!(signatures[0]["digest"], attached.trim());
    assert_eq!(
        of_type("application/vnd.modelpack.chunk-index.v1+json").len(),
        1,
        "{found}"
    );

    // Tags, remote tag, manifest and blob commands.
    s.ok(&["tag", "--remote", reference, "v2", "stable", "--plain-http"]);
    let tags = s.ok(&[
        "repo",
        "tags",
        &format!("{}/team/model", registry.host()),
        "--plain-http",
    ]);
    for t in ["v1", "v2", "stable"] {
        assert!(tags.lines().any(|l| l == t), "{t} missing from {tags}");
    }
    let manifest_file = s.path("manifest.json");
    s.fetch_manifest_to(reference, &manifest_file);
    assert_eq!(
        format!("sha256:{}", util::sha256_file(&manifest_file)),
        digest
    );
    let copy_ref = format!("{}/team/model:copy", registry.host());
    s.push_manifest_from(&copy_ref, &manifest_file);
    assert_eq!(s.ok(&["resolve", &copy_ref, "--plain-http"]).trim(), digest);

    let blob_file = s.path("blob.bin");
    fs::write(&blob_file, b"some blob").expect("write");
    let blob_digest = s.ok(&[
        "blob",
        "push",
        &format!("{}/team/model", registry.host()),
        blob_file.to_str().expect("utf8"),
        "--plain-http",
    ]);
    let fetched = s.path("fetched.bin");
    let blob_ref = format!("{}/team/model@{}", registry.host(), blob_digest.trim());
    let fetch_blob = [
        "blob",
        "fetch",
        &blob_ref,
        "-o",
        fetched.to_str().expect("utf8"),
        "--plain-http",
    ];
    s.ok(&fetch_blob);
    assert_eq!(fs::read(&fetched).expect("read"), b"some blob");
    s.ok(&["blob", "delete", &blob_ref, "--plain-http"]);
    let err = s.fails(&fetch_blob);
    assert!(err.contains("404"), "{err}");
    s.ok(&["manifest", "delete", &copy_ref, "--plain-http"]);
    let err = s.fails(&[
        "resolve",
        &format!("{}/team/model@{digest}", registry.host()),
        "--plain-http",
    ]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn unreachable_registry_fails_with_one_line() {
    let s = Scratch::new();
    let port = util::free_port();
    let started = std::time::Instant::now();
    let err = s.fails(&["pull", &format!("127.0.0.1:{port}/x/y:z"), "--plain-http"]);
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "gave up too late"
    );
}

#[test]
fn build_push_keeps_no_local_copy_and_chunked_uploads_work() {
    let Some(m) = util::registry_and_model("direct/model:v1", |s| model(s, 5 << 20)) else {
        return;
    };
    let (registry, s, dir, reference) = m.parts();
    let pushed = s.ok(&[
        "-q",
        "build",
        dir,
        "-t",
        reference,
        "--push",
        "--plain-http",
    ]);
    assert_eq!(
        s.ok(&["resolve", reference, "--plain-http"]).trim(),
        pushed.trim()
    );
    assert_eq!(
        s.ok(&["ls", "--format", "json"]).trim(),
        "[]",
        "no local name"
    );
    // The weight never entered the store.
    let stored: u64 = fs::read_dir(s.store().join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    assert!(
        stored < 64 * 1024,
        "{stored} bytes stored; the weight was copied"
    );
    assert_eq!(util::pulled_tree(reference), util::tree(Path::new(dir)));

    // Chunked uploads (1 MiB PATCHes) give the same manifest.
    let local = format!("{}/chunked/model:v1", registry.host());
    s.ok(&["build", dir, "-t", &local, "--no-creation-time"]);
    let chunked = s.ok(&["-q", "push", &local, "--plain-http", "--chunk-size", "1"]);
    let other = Scratch::new();
    let pulled = other.ok(&["-q", "pull", &local, "--plain-http"]);
    assert_eq!(pulled.trim(), chunked.trim());
    assert!(other.ok(&["store", "check"]).contains("consistent"));
}

#[test]
fn interrupted_pull_into_a_folder_leaves_it_as_it_was() {
    let Some(m) = util::registry_with_pushed_model("ctrlc/model:v1", |s| model(s, 64 << 20)) else {
        return;
    };
    let (proxy, slow) = m.through_proxy(Some(4 << 20));
    let target = m.s.path("target");
    util::write_files(&target, &[("mine.txt", b"user file")]);
    // A store without the model: `pull -o` reads blobs the store already holds from it.
    let reader = Scratch::new();
    let child = reader
        .command(&util::pull_to_args(&slow, &target))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.served() < 8 << 20 && std::time::Instant::now() < deadline {
        // Never a partial file under its final name.
        assert_no_partial_files(&target, Path::new(&m.dir), &["mine.txt"]);
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_pid(child.id(), Signal::INT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<String> = util::listing(&target);
    assert_eq!(
        left,
        [target.join("mine.txt").display().to_string()],
        "Ctrl-C left files behind"
    );
}

#[test]
fn pull_into_a_folder_killed_half_way_continues_where_it_stopped() {
    let size = 64usize << 20;
    let Some(m) = util::registry_with_pushed_model("resume/folder:v1", |s| model(s, size)) else {
        return;
    };
    let dir = Path::new(&m.dir);
    let (slow, slow_ref) = m.through_proxy(Some(8 << 20));
    let reader = Scratch::new();
    let target = reader.path("target");
    let mut child = reader.spawn_silenced(&util::pull_to_args(&slow_ref, &target));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while slow.served() < 32 << 20 && std::time::Instant::now() < deadline {
        // Never a partial file under its final name (the folder appears only once every
        // blob is in).
        if !target.exists() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert_no_partial_files(&target, dir, &[]);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the pull finished before it could be killed"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    assert!(
        !target.join("model.safetensors").exists(),
        "a killed pull left the weight under its final name"
    );
    // Again, through a counting proxy: only what the first run had not saved moves.
    let (counting, counted_ref) = m.through_proxy(None);
    let out = reader.ok(&util::pull_to_args(&counted_ref, &target));
    assert!(out.contains("resumed"), "{out}");
    assert_eq!(util::tree(&target), util::tree(dir));
    let again = counting.served();
    assert!(
        again < (size as u64) - (16 << 20),
        "the second run moved {again} of {size} bytes: it started over"
    );
    // Nothing stays behind in the store: not the blobs, not the partial download.
    assert!(
        util::listing(&reader.store().join("blobs/sha256")).is_empty(),
        "pull -o left blobs in the store"
    );
    assert!(util::listing(&reader.store().join("scratch")).is_empty());
    // A third run finds every file in place: nothing fetched, nothing written.
    let before = counting.served();
    let out = reader.ok(&util::pull_to_args(&counted_ref, &target));
    assert!(out.contains("0 files written"), "{out}");
    assert!(
        counting.served() - before < 64 << 10,
        "an up-to-date folder fetched {} bytes",
        counting.served() - before
    );
    assert_eq!(util::tree(&target), util::tree(dir));
}

/// A registry, a proxy in front of it that lists every request, and [`model`] (a 4 MiB weight
/// and small files) written in a scratch store's folder.
fn registry_behind_a_proxy() -> Option<(Registry, FaultProxy, Scratch, String)> {
    let registry = Registry::start(None)?;
    let proxy = FaultProxy::start(registry.port);
    let s = Scratch::new();
    let dir = model(&s, 4 << 20);
    Some((registry, proxy, s, dir))
}

#[test]
fn pushing_what_the_registry_has_moves_no_blob() {
    let Some((registry, proxy, s, dir)) = registry_behind_a_proxy() else {
        return;
    };
    let reference = format!("{}/again/model:v1", registry.host());
    let pushed = s.build_and_push_digest(&dir, &reference);
    // Pushed again, under the same tag and under another one, through the proxy: the manifest
    // is there, so no blob is looked at or uploaded (only the chunk index a build pins may be
    // checked: the registry does not keep it with the manifest).
    let host = proxy.host();
    for tag in ["v1", "v2"] {
        let target = format!("{host}/again/model:{tag}");
        s.ok(&["tag", &reference, &target]);
        s.ok(&["push", &target, "--plain-http"]);
        assert_eq!(s.ok(&["resolve", &target, "--plain-http"]).trim(), pushed);
    }
    let requests = proxy.requests();
    let uploads: Vec<&String> = requests
        .iter()
        .filter(|r| r.contains("/blobs/uploads"))
        .collect();
    assert!(uploads.is_empty(), "blobs uploaded again: {uploads:?}");
    let checks = requests
        .iter()
        .filter(|r| r.starts_with("HEAD") && r.contains("/blobs/"))
        .count();
    // Per push: the pinned chunk index, once by the walk and once when it is kept as a referrer.
    assert!(checks <= 2 * 2, "blobs checked one by one: {requests:?}");
    // A registry without the manifest still gets every blob.
    let fresh = format!("{host}/elsewhere/model:v1");
    s.ok(&["tag", &reference, &fresh]);
    s.ok(&["push", &fresh, "--plain-http"]);
    assert_eq!(
        util::pulled_tree(&format!("{}/elsewhere/model:v1", registry.host())),
        util::tree(Path::new(&dir))
    );
}

/// Hex digests of the manifest's layers and config whose size `keep` takes (as request paths
/// carry them, escaped or not).
fn blobs_where(s: &Scratch, reference: &str, keep: impl Fn(u64) -> bool) -> Vec<String> {
    let file = s.path("manifest.json");
    s.fetch_manifest_to(reference, &file);
    let manifest: Value =
        serde_json::from_slice(&fs::read(&file).expect("manifest")).expect("json");
    let layers = manifest["layers"].as_array().expect("layers").iter();
    layers
        .chain([&manifest["config"]])
        .filter(|d| keep(d["size"].as_u64().expect("size")))
        .map(|d| {
            let digest = d["digest"].as_str().expect("digest");
            digest.trim_start_matches("sha256:").to_owned()
        })
        .collect()
}

#[test]
fn a_repository_without_tags_is_not_asked_about_small_blobs() {
    let Some((registry, proxy, s, dir)) = registry_behind_a_proxy() else {
        return;
    };
    let host = proxy.host();
    let blob_heads = |from: usize| -> Vec<String> {
        proxy.requests()[from..]
            .iter()
            .filter(|r| r.starts_with("HEAD") && r.contains("/blobs/"))
            .cloned()
            .collect()
    };
    // A first push into a new repository: the small blobs go up without a HEAD each; the
    // 4 MiB weight is still asked about (an interrupted push of a big blob resumes by it).
    let first = format!("{host}/fresh/model:v1");
    s.build_and_push_digest(&dir, &first);
    let small = blobs_where(&s, &first, |size| size <= 1 << 20);
    assert!(small.len() >= 4, "small blobs: {small:?}");
    let asked = blob_heads(0);
    for digest in &small {
        assert!(
            !asked.iter().any(|r| r.contains(digest.as_str())),
            "{digest} was asked about in a repository without tags: {asked:?}"
        );
    }
    for digest in blobs_where(&s, &first, |size| size > 1 << 20) {
        assert!(
            asked.iter().any(|r| r.contains(digest.as_str())),
            "the weight {digest} was not asked about: {asked:?}"
        );
    }
    assert_eq!(
        util::pulled_tree(&format!("{}/fresh/model:v1", registry.host())),
        util::tree(Path::new(&dir))
    );
    // A second version into the same repository (it has a tag now): every blob is asked
    // about, and the unchanged small files are not uploaded again.
    fs::write(
        Path::new(&dir).join("docs/README.md"),
        b"# model, second edition\n",
    )
    .expect("write");
    let before = proxy.requests().len();
    let second = format!("{host}/fresh/model:v2");
    s.build_and_push_digest(&dir, &second);
    let asked = blob_heads(before);
    let unchanged: Vec<String> = blobs_where(&s, &second, |size| size <= 1 << 20)
        .into_iter()
        .filter(|d| small.contains(d))
        .collect();
    assert!(
        !unchanged.is_empty(),
        "the second version shares no small blob"
    );
    let requests = proxy.requests();
    for digest in &unchanged {
        assert!(
            asked.iter().any(|r| r.contains(digest.as_str())),
            "{digest} was not asked about in a repository with tags: {asked:?}"
        );
        assert!(
            !requests[before..]
                .iter()
                .any(|r| r.starts_with("PUT") && r.contains(digest.as_str())),
            "{digest}, unchanged, was uploaded again"
        );
    }
    assert_eq!(
        util::pulled_tree(&format!("{}/fresh/model:v2", registry.host())),
        util::tree(Path::new(&dir))
    );
}
