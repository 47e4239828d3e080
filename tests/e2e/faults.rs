//! Registry faults, injected per request by [`FaultProxy`] in front of the real registry, during
//! pull, fetch, push, copy and mount. Each test asserts the outcome: transient faults end with the
//! right bytes; corruption fails naming the digest and lands nowhere, and a retry after the fault
//! clears succeeds; a permanent failure is one error line, exit 1, within the deadline.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::util::{self, ModelOnRegistry, Mount, Registry, Scratch};
use modelpack_testkit::fault::{Fault, FaultProxy, Rule};

/// A model with a `size`-byte weight; returns its folder.
fn model(s: &Scratch, size: usize) -> PathBuf {
    util::model_with_weight(
        s,
        size,
        0x0bad_cafe_f00d_1234,
        &[
            ("config.json", br#"{"model_type":"faults"}"#),
            ("docs/README.md", b"# faults\n"),
        ],
    )
}

/// A registry holding a model pushed directly, and a fault proxy in front of it.
struct Setup {
    proxy: FaultProxy,
    source: PathBuf,
    /// The weight's digest (hex).
    weight: String,
    /// The path fragment of the weight's blob requests.
    blob: String,
    /// The reference through the proxy.
    via: String,
    _pushed: ModelOnRegistry<PathBuf>,
}

fn setup(name: &str, size: usize) -> Option<Setup> {
    let pushed =
        util::registry_with_pushed_model(&format!("faults/{name}:v1"), |s| model(s, size))?;
    let proxy = FaultProxy::start(pushed.registry.port);
    let via = format!("{}/faults/{name}:v1", proxy.host());
    let weight = util::sha256_file(&pushed.dir.join("model.safetensors"));
    Some(Setup {
        proxy,
        source: pushed.dir.clone(),
        blob: format!("/blobs/sha256:{weight}"),
        weight,
        via,
        _pushed: pushed,
    })
}

impl Setup {
    /// Adds, in order, a rule per `(times, fault)` for GETs of the weight's blob.
    fn fault_weight_gets(&self, faults: impl IntoIterator<Item = (usize, Fault)>) {
        add_faults(&self.proxy, "GET", &self.blob, faults);
    }
}

/// Adds, in order, a rule per `(times, fault)` for `method` requests whose path contains `path`.
fn add_faults(
    proxy: &FaultProxy,
    method: &'static str,
    path: &str,
    faults: impl IntoIterator<Item = (usize, Fault)>,
) {
    for (times, fault) in faults {
        proxy.add(Rule::new(Some(method), path, times, fault));
    }
}

#[test]
fn transient_faults_during_pull_end_with_the_right_bytes() {
    let Some(t) = setup("transient", 6 << 20) else {
        return;
    };
    add_faults(
        &t.proxy,
        "GET",
        "/manifests/",
        [(1, Fault::Status(503)), (1, Fault::Drop)],
    );
    t.fault_weight_gets([
        (1, Fault::ResetAfter(1 << 20)),
        (1, Fault::Status(502)),
        (1, Fault::TooMany(1)),
        (1, Fault::Stall(Duration::from_secs(2))),
    ]);
    let reader = Scratch::new();
    let out = reader.path("out");
    reader.ok(&util::pull_to_args(&t.via, &out));
    assert_eq!(util::tree(&out), util::tree(&t.source));
    let weight_gets = t
        .proxy
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET") && r.contains(&t.blob))
        .count();
    assert!(
        weight_gets >= 4,
        "the weight was fetched {weight_gets} times"
    );
    assert!(
        t.proxy.pending().is_empty(),
        "not every fault was hit: {:?}",
        t.proxy.pending()
    );
    // And into the store: consistent, every blob verified.
    t.fault_weight_gets([(1, Fault::ResetAfter(300_000))]);
    reader.ok(&["pull", &t.via, "--plain-http"]);
    assert!(reader.ok(&["store", "check"]).contains("consistent"));
}

#[test]
fn corrupt_short_or_mislabelled_bodies_fail_naming_the_digest_and_land_nowhere() {
    let Some(t) = setup("corrupt", 3 << 20) else {
        return;
    };
    for (what, fault) in [
        ("flipped byte", Fault::FlipByte(4096)),
        ("truncated body", Fault::Truncate(4096)),
        ("short Content-Length", Fault::WrongLength(-7)),
    ] {
        t.proxy.clear();
        t.fault_weight_gets([(10_000, fault)]);
        let reader = Scratch::new();
        let out = reader.path("out");
        let err = reader.fails(&util::pull_to_args(&t.via, &out));
        assert!(
            err.contains(&t.weight[..12]),
            "{what}: the error names no digest: {err}"
        );
        assert!(
            !out.exists() || util::listing(&out).is_empty(),
            "{what}: the target folder changed: {:?}",
            util::listing(&out)
        );
        let fetched = reader.path("fetched");
        let err = reader.fails(&[
            "fetch",
            &t.via,
            "--pattern",
            "*.safetensors",
            "--plain-http",
            "-o",
            fetched.to_str().expect("utf8"),
        ]);
        assert!(err.contains(&t.weight[..12]), "{what}: fetch: {err}");
        assert!(
            !fetched.exists() || util::listing(&fetched).is_empty(),
            "{what}: fetch left files: {:?}",
            util::listing(&fetched)
        );
        let err = reader.fails(&["pull", &t.via, "--plain-http"]);
        assert!(err.contains(&t.weight[..12]), "{what}: {err}");
        assert!(
            !reader.store().join("blobs/sha256").join(&t.weight).exists(),
            "{what}: a corrupt blob reached the store"
        );
        assert!(reader.ok(&["store", "check"]).contains("consistent"));
        // The fault clears: the same commands succeed.
        t.proxy.clear();
        reader.ok(&util::pull_to_args(&t.via, &out));
        assert_eq!(util::tree(&out), util::tree(&t.source), "{what}");
    }
}

#[test]
fn permanent_failure_is_one_line_within_the_deadline() {
    let Some(t) = setup("permanent", 1 << 20) else {
        return;
    };
    t.proxy
        .add(Rule::new(None, "/v2/", 100_000, Fault::Status(500)));
    let reader = Scratch::new();
    let started = Instant::now();
    let err = reader.fails(&["pull", &t.via, "--plain-http"]);
    assert!(err.contains("500"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(reader.ok(&["store", "check"]).contains("consistent"));
}

#[test]
fn ignored_ranges_and_redirects_still_give_the_right_bytes() {
    let Some(t) = setup("ranges", 5 << 20) else {
        return;
    };
    t.fault_weight_gets([(1, Fault::Redirect), (10_000, Fault::IgnoreRange)]);
    let reader = Scratch::new();
    let out = reader.path("out");
    reader.ok(&[
        "fetch",
        &t.via,
        "--plain-http",
        "--pattern",
        "*.safetensors",
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(util::sha256_file(&out.join("model.safetensors")), t.weight);
    if util::can_fuse() {
        let mount = Mount::in_fresh_store(&t.via, &[]);
        let bytes = fs::read(mount.dir.join("model.safetensors")).expect("read");
        assert_eq!(util::sha256_hex(&bytes), t.weight);
    }
}

#[test]
fn transient_faults_under_a_mount_are_retried_before_a_read_fails() {
    if !util::can_fuse() {
        return;
    }
    let Some(t) = setup("mount", 6 << 20) else {
        return;
    };
    let mount = Mount::in_fresh_store(&t.via, &[]);
    t.fault_weight_gets([
        (2, Fault::Status(503)),
        (1, Fault::ResetAfter(100_000)),
        (1, Fault::Stall(Duration::from_secs(1))),
    ]);
    let bytes = fs::read(mount.dir.join("model.safetensors")).expect("read through faults");
    assert_eq!(util::sha256_hex(&bytes), t.weight);
    assert!(
        t.proxy.applied() >= 4,
        "faults applied: {}",
        t.proxy.applied()
    );
}

#[test]
fn push_survives_transient_upload_faults_and_resumes_chunked_uploads() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let proxy = FaultProxy::start(registry.port);
    for (name, chunked) in [("monolithic", false), ("chunked", true)] {
        let s = Scratch::new();
        let source = model(&s, 3 << 20);
        let via = format!("{}/faults/push-{name}:v1", proxy.host());
        s.ok(&["build", source.to_str().expect("utf8"), "-t", &via]);
        proxy.clear();
        for (method, status) in [("POST", 503), ("PUT", 502), ("PATCH", 500)] {
            add_faults(
                &proxy,
                method,
                "/blobs/uploads/",
                [(1, Fault::Status(status))],
            );
        }
        add_faults(&proxy, "PUT", "/manifests/", [(1, Fault::Drop)]);
        let mut args = vec!["push", via.as_str(), "--plain-http"];
        if chunked {
            args.extend(["--chunk-size", "1"]);
        }
        s.ok(&args);
        // Read back straight from the registry.
        let direct = format!("{}/faults/push-{name}:v1", registry.host());
        assert_eq!(util::pulled_tree(&direct), util::tree(&source), "{name}");
    }
}

#[test]
fn copy_between_registries_retries_transient_faults_and_never_lands_corrupt_blobs() {
    let Some(t) = setup("copy", 3 << 20) else {
        return;
    };
    let Some(dest) = Registry::start(None) else {
        return;
    };
    let s = Scratch::new();

    // Transient: a reset mid-body and a 503 on the source's blob; the copy completes.
    t.fault_weight_gets([(1, Fault::ResetAfter(1 << 20)), (1, Fault::Status(503))]);
    let target = format!("{}/copied/transient:v1", dest.host());
    s.ok(&["copy", &t.via, &target, "--plain-http"]);
    assert!(t.proxy.pending().is_empty(), "{:?}", t.proxy.pending());
    let out = s.path("transient");
    s.ok(&util::pull_to_args(&target, &out));
    assert_eq!(util::tree(&out), util::tree(&t.source));

    // Corrupt: a flipped byte in every response for the weight; the copy fails naming the
    // digest and the destination names nothing.
    t.proxy.clear();
    t.fault_weight_gets([(10_000, Fault::FlipByte(4096))]);
    let target = format!("{}/copied/corrupt:v1", dest.host());
    let err = s.fails(&["copy", &t.via, &target, "--plain-http"]);
    assert!(
        err.contains(&t.weight[..12]),
        "the error names no digest: {err}"
    );
    s.fails(&["resolve", &target, "--plain-http"]);
    t.proxy.clear();
    s.ok(&["copy", &t.via, &target, "--plain-http"]);
    let out = s.path("corrupt");
    s.ok(&util::pull_to_args(&target, &out));
    assert_eq!(util::tree(&out), util::tree(&t.source));
}
