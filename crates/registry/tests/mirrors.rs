//! Registry hosts (containerd's `hosts.toml`) against real registries: a `docker-registry` in
//! proxy mode (a pull-through cache of the first) as the mirror, counting proxies in front of
//! both. Blobs come from the mirror, tags resolve only where allowed, and a mirror that goes
//! down, answers errors or serves wrong bytes only sends the request on to the upstream.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use modelpack_registry::{Client, ClientOptions, Repository, mirror_fallbacks};
use modelpack_spec::Digest;
use modelpack_spec::media_type::{MEDIA_TYPE_OCI_EMPTY, MEDIA_TYPE_OCI_MANIFEST};
use modelpack_testkit::fault::{Fault, FaultProxy, Rule};
use modelpack_testkit::link::Link;
use modelpack_testkit::registry::{Registry, RegistryOptions};

mod common;

/// An upstream registry with a model-like artifact, a pull-through mirror of it, and a counting
/// link in front of each.
struct Mirrored {
    upstream: Registry,
    up_link: Link,
    _mirror: Registry,
    mirror_link: Link,
    blob: Bytes,
    digest: Digest,
    manifest: Digest,
}

fn manifest_of(config: &Digest, layer: &Digest, layer_size: usize) -> Bytes {
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_OCI_EMPTY, "digest": config.as_str(), "size": 2},
        "layers": [{
            "mediaType": "application/octet-stream",
            "digest": layer.as_str(),
            "size": layer_size,
        }],
    });
    Bytes::from(modelpack_spec::to_canonical_json(&doc))
}

/// Starts both registries; `blob_size` bytes pushed as the layer of `models/m:v1` (straight to
/// the upstream, not through its link); the mirror link is capped at `mirror_rate` when given.
async fn mirrored(blob_size: usize, mirror_rate: Option<u64>) -> Mirrored {
    let upstream = Registry::start(RegistryOptions::default()).expect("upstream registry");
    let remote = format!("http://127.0.0.1:{}", upstream.port);
    let mirror = Registry::start(RegistryOptions {
        proxy_of: Some(&remote),
        ..RegistryOptions::default()
    })
    .expect("mirror registry");
    let up_link = Link::start(upstream.port, None);
    let mirror_link = Link::start(mirror.port, mirror_rate);
    let direct = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::new()
    })
    .expect("client");
    let reference = format!("{}/models/m:v1", upstream.host())
        .parse()
        .expect("reference");
    let repo = Repository::new(&direct, &reference);
    let blob = Bytes::from(modelpack_testkit::data::pseudo_random(blob_size, 7));
    let digest = Digest::sha256_of(&blob);
    repo.push_blob_bytes(&digest, blob.clone())
        .await
        .expect("push layer");
    let config = Bytes::from_static(b"{}");
    let config_digest = Digest::sha256_of(&config);
    repo.push_blob_bytes(&config_digest, config)
        .await
        .expect("push config");
    let manifest = repo
        .put_manifest(
            "v1",
            MEDIA_TYPE_OCI_MANIFEST,
            manifest_of(&config_digest, &digest, blob_size),
        )
        .await
        .expect("push manifest");
    Mirrored {
        upstream,
        up_link,
        _mirror: mirror,
        mirror_link,
        blob,
        digest,
        manifest,
    }
}

/// A client whose hosts folder (returned, to keep) names, for the upstream link, the upstream as
/// `server` and one mirror `mirror_host` with `capabilities`; and the repository `models/m`
/// named through the upstream link.
fn through_mirror(
    m: &Mirrored,
    mirror_host: &str,
    capabilities: &str,
) -> (tempfile::TempDir, Repository) {
    common::repo_through_mirror(&m.up_link.host(), mirror_host, capabilities, "models/m:v1")
}

/// What `link` served, once the bytes in flight are counted (it counts as it forwards).
fn served(link: &Link) -> u64 {
    std::thread::sleep(std::time::Duration::from_millis(150));
    link.served()
}

async fn read_all(
    repo: &Repository,
    digest: &Digest,
    range: Option<std::ops::Range<u64>>,
) -> Vec<u8> {
    let mut body = repo.blob_stream(digest, range).await.expect("open");
    let mut out = Vec::new();
    while let Some(piece) = body.next_chunk().await.expect("read") {
        out.extend_from_slice(&piece);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_come_from_the_mirror_and_tags_resolve_only_where_allowed() {
    let m = mirrored(4 << 20, None).await;
    // A public mirror: pull only. Tags resolve at the upstream, blobs come from the mirror.
    let (_hosts, repo) = through_mirror(&m, &m.mirror_link.host(), "[\"pull\"]");
    let fetched = repo.get_manifest("v1").await.expect("resolve the tag");
    assert_eq!(fetched.digest, m.manifest);
    assert_eq!(
        served(&m.mirror_link),
        0,
        "a pull-only mirror resolved a tag"
    );
    let upstream_after_resolve = served(&m.up_link);
    assert!(upstream_after_resolve > 0);
    assert_eq!(read_all(&repo, &m.digest, None).await, m.blob);
    let range = 1000..(2 << 20) + 17;
    assert_eq!(
        read_all(&repo, &m.digest, Some(range.clone())).await,
        &m.blob[range.start as usize..range.end as usize]
    );
    assert!(
        served(&m.mirror_link) >= (4 << 20) + (2 << 20) - 1000,
        "{}",
        served(&m.mirror_link)
    );
    assert_eq!(
        served(&m.up_link),
        upstream_after_resolve,
        "blob bytes came from the upstream"
    );
    // A manifest by digest may come from a pull host: it is verified by its digest.
    let by_digest = repo
        .get_manifest(m.manifest.as_str())
        .await
        .expect("by digest");
    assert_eq!(by_digest.digest, m.manifest);
    assert_eq!(served(&m.up_link), upstream_after_resolve);

    // A private mirror may resolve too: nothing from the upstream at all.
    let (_hosts, repo) = through_mirror(&m, &m.mirror_link.host(), "[\"pull\", \"resolve\"]");
    let before = served(&m.up_link);
    assert_eq!(
        repo.get_manifest("v1").await.expect("resolve").digest,
        m.manifest
    );
    assert_eq!(read_all(&repo, &m.digest, None).await, m.blob);
    assert_eq!(served(&m.up_link), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_goes_down_in_the_middle_of_a_body_is_left_for_the_upstream() {
    // 48 MiB at 16 MiB/s through the mirror: it goes down after the first 8 MiB.
    let m = mirrored(48 << 20, Some(16 << 20)).await;
    let (_hosts, repo) = through_mirror(&m, &m.mirror_link.host(), "[\"pull\", \"resolve\"]");
    let fallbacks = mirror_fallbacks();
    let mut body = repo
        .blob_stream(&m.digest, Some(4096..(48 << 20)))
        .await
        .expect("open");
    let mut out = Vec::new();
    while let Some(piece) = body
        .next_chunk()
        .await
        .expect("no error reaches the reader")
    {
        out.extend_from_slice(&piece);
        if out.len() >= 8 << 20 {
            m.mirror_link.down.store(true, Ordering::SeqCst);
        }
    }
    assert!(out == m.blob[4096..], "wrong bytes after the switch");
    assert!(served(&m.up_link) > 16 << 20, "{}", served(&m.up_link));
    assert!(mirror_fallbacks() > fallbacks);
    // The mirror is skipped at once for the next request (cooling down), with no error.
    assert_eq!(
        read_all(&repo, &m.digest, Some(0..1000)).await,
        &m.blob[..1000]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_and_errors_from_a_mirror_are_never_served() {
    let m = mirrored(1 << 20, None).await;
    let faults = FaultProxy::start(m.mirror_link.port);
    let (_hosts, repo) = through_mirror(&m, &faults.host(), "[\"pull\", \"resolve\"]");
    let fallbacks = mirror_fallbacks();

    // A corrupted manifest by digest: the next host's copy.
    faults.add(Rule::new(
        Some("GET"),
        "/manifests/",
        100,
        Fault::FlipByte(10),
    ));
    let fetched = repo
        .get_manifest(m.manifest.as_str())
        .await
        .expect("manifest");
    assert_eq!(fetched.digest, m.manifest);
    faults.clear();

    // A corrupted blob: the caller's check fails, `distrust` sends the next read elsewhere.
    faults.add(Rule::new(
        Some("GET"),
        "/blobs/",
        100,
        Fault::FlipByte(1000),
    ));
    let bad = read_all(&repo, &m.digest, None).await;
    assert_ne!(Digest::sha256_of(&bad), m.digest, "the fault applied");
    assert!(repo.distrust(&m.digest), "a mirror served it");
    assert_eq!(read_all(&repo, &m.digest, None).await, m.blob);
    assert!(!repo.distrust(&m.digest), "only the upstream served it now");

    // A small blob read whole (configs, indexes) does this by itself.
    let config = Digest::sha256_of(b"{}");
    assert_eq!(
        repo.read_blob_capped(&config, 1 << 20)
            .await
            .expect("config")
            .as_ref(),
        b"{}"
    );
    faults.clear();

    // 5xx and 404 answers: this request goes on to the upstream (the layer is not asked of
    // the mirror any more, so the config shows it).
    for status in [503, 404, 500] {
        faults.add(Rule::new(Some("GET"), "/blobs/", 1, Fault::Status(status)));
        assert_eq!(read_all(&repo, &config, Some(0..2)).await, b"{}");
        assert!(faults.pending().is_empty(), "the mirror was asked first");
    }
    assert!(mirror_fallbacks() >= fallbacks + 5);
    drop(m.upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_ignores_range_is_skipped_over() {
    let m = mirrored(3 << 20, None).await;
    let faults = FaultProxy::start(m.mirror_link.port);
    let (_hosts, repo) = through_mirror(&m, &faults.host(), "[\"pull\"]");
    faults.add(Rule::new(Some("GET"), "/blobs/", 1, Fault::IgnoreRange));
    let range = (1 << 20) + 5..(2 << 20);
    assert_eq!(
        read_all(&repo, &m.digest, Some(range.clone())).await,
        &m.blob[range.start as usize..range.end as usize]
    );
    assert_eq!(faults.applied(), 1);
}

#[test]
fn a_malformed_hosts_file_is_one_line_naming_it() {
    let hosts = tempfile::tempdir().expect("tempdir");
    let folder = hosts.path().join("reg.example:5000");
    std::fs::create_dir_all(&folder).expect("mkdir");
    std::fs::write(
        folder.join("hosts.toml"),
        "[host.\"http://m\"]\ncapabilities = [\"pul\"]\n",
    )
    .expect("write");
    let repo = common::repo_with_hosts(hosts.path(), "reg.example:5000/a/b:v1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let err = rt
        .block_on(repo.get_manifest("v1"))
        .expect_err("bad file")
        .to_string();
    assert!(
        err.contains(&folder.join("hosts.toml").display().to_string()),
        "{err}"
    );
    assert!(err.contains("unknown capability \"pul\""), "{err}");
    assert!(!err.contains('\n'));
}
