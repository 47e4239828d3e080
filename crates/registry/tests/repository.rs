//! `Repository` against a real distribution registry on loopback: blob uploads (bytes, file,
//! chunked), ranged reads, cross-repository mount, manifests, tags, referrers and deletes.

use bytes::Bytes;
use modelpack_registry::{Client, ClientOptions, Repository, fallback_tag};
use modelpack_spec::Digest;
use modelpack_spec::media_type::{
    MEDIA_TYPE_CHUNK_INDEX, MEDIA_TYPE_OCI_EMPTY, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
use modelpack_testkit::registry::{Registry, RegistryOptions};

fn repo(client: &Client, registry: &Registry, name: &str) -> Repository {
    let reference = format!("{}/{name}:v1", registry.host())
        .parse()
        .expect("reference");
    Repository::new(client, &reference)
}

/// A manifest with an empty config and no layers (enough for the registry).
fn manifest(config: &Digest, config_size: usize, subject: Option<(&Digest, usize)>) -> Bytes {
    let mut doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": MEDIA_TYPE_CHUNK_INDEX,
        "config": {
            "mediaType": MEDIA_TYPE_OCI_EMPTY,
            "digest": config.as_str(),
            "size": config_size,
        },
        "layers": [],
    });
    if let Some((digest, size)) = subject {
        doc["subject"] = serde_json::json!({
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "digest": digest.as_str(),
            "size": size,
        });
    }
    Bytes::from(modelpack_spec::to_canonical_json(&doc))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_manifests_tags_and_referrers_round_trip() {
    let registry = Registry::start(RegistryOptions::default()).expect("registry");
    let client = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::new()
    })
    .expect("client");
    let repo_a = repo(&client, &registry, "test/a");

    // Blobs: in one request, streamed from a file, and in chunks (with a short last one).
    let small = Bytes::from_static(b"{}");
    let small_digest = Digest::sha256_of(&small);
    assert_eq!(repo_a.blob_exists(&small_digest).await.expect("head"), None);
    repo_a
        .push_blob_bytes(&small_digest, small.clone())
        .await
        .expect("push bytes");
    assert_eq!(
        repo_a.blob_exists(&small_digest).await.expect("head"),
        Some(2)
    );
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let path = registry.dir().join("blob");
    std::fs::write(&path, &data).expect("write blob");
    let digest = Digest::sha256_of(&data);
    let size = data.len() as u64;
    repo_a
        .push_blob_file(&digest, &path, size)
        .await
        .expect("push file");
    let chunked = data.iter().rev().copied().collect::<Vec<u8>>();
    let chunked_path = registry.dir().join("chunked");
    std::fs::write(&chunked_path, &chunked).expect("write chunked");
    let chunked_digest = Digest::sha256_of(&chunked);
    let progress = std::sync::atomic::AtomicU64::new(0);
    repo_a
        .push_blob_chunked(&chunked_digest, &chunked_path, size, 128 * 1024, &|n| {
            progress.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        })
        .await
        .expect("push chunked");
    assert_eq!(progress.into_inner(), size);
    assert_eq!(
        repo_a.blob_exists(&chunked_digest).await.expect("head"),
        Some(size)
    );

    // Ranged and whole reads.
    let mut body = repo_a
        .blob_stream(&digest, Some(1000..5000))
        .await
        .expect("ranged read");
    let mut got = Vec::new();
    while let Some(piece) = body.next_chunk().await.expect("chunk") {
        got.extend_from_slice(&piece);
    }
    assert_eq!(got, data[1000..5000]);
    let whole = repo_a
        .read_blob_capped(&chunked_digest, chunked.len())
        .await
        .expect("whole read");
    assert_eq!(whole, chunked);

    // Cross-repository mount.
    let repo_b = repo(&client, &registry, "test/b");
    assert!(
        repo_b
            .mount_blob(&digest, repo_a.name())
            .await
            .expect("mount")
    );
    assert_eq!(repo_b.blob_exists(&digest).await.expect("head"), Some(size));

    // Manifests and tags.
    let subject = manifest(&small_digest, small.len(), None);
    let subject_digest = repo_a
        .put_manifest("v1", MEDIA_TYPE_OCI_MANIFEST, subject.clone())
        .await
        .expect("put manifest");
    let fetched = repo_a.get_manifest("v1").await.expect("get by tag");
    assert_eq!(fetched.bytes, subject);
    assert_eq!(fetched.digest, subject_digest);
    assert_eq!(fetched.media_type, MEDIA_TYPE_OCI_MANIFEST);
    assert_eq!(
        repo_a
            .get_manifest(subject_digest.as_str())
            .await
            .expect("get by digest")
            .bytes,
        subject
    );
    let (head_digest, head_size) = repo_a
        .head_manifest("v1")
        .await
        .expect("head manifest")
        .expect("found");
    assert_eq!(head_digest, subject_digest);
    assert_eq!(
        head_size,
        subject.len() as u64,
        "the size from Content-Length"
    );
    assert_eq!(repo_a.head_manifest("nope").await.expect("head"), None);
    repo_a
        .put_manifest("v2", MEDIA_TYPE_OCI_MANIFEST, subject.clone())
        .await
        .expect("put v2");
    let mut tags = repo_a.tags().await.expect("tags");
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);

    // Referrers, through the API when the registry has it, else the tag schema.
    let referrer = manifest(
        &small_digest,
        small.len(),
        Some((&subject_digest, subject.len())),
    );
    let referrer_digest = repo_a
        .put_manifest(
            Digest::sha256_of(&referrer).as_str(),
            MEDIA_TYPE_OCI_MANIFEST,
            referrer.clone(),
        )
        .await
        .expect("put referrer");
    if !repo_a
        .supports_referrers(&subject_digest)
        .await
        .expect("probe")
    {
        let descriptor = modelpack_spec::descriptor(
            MEDIA_TYPE_OCI_MANIFEST,
            &referrer_digest,
            referrer.len() as u64,
            None,
        )
        .expect("descriptor");
        repo_a
            .add_referrer_to_fallback(&subject_digest, descriptor)
            .await
            .expect("fallback index");
        let index = repo_a
            .get_manifest(&fallback_tag(&subject_digest))
            .await
            .expect("fallback tag");
        assert_eq!(index.media_type, MEDIA_TYPE_OCI_INDEX);
    }
    let found = repo_a
        .referrers(&subject_digest, None)
        .await
        .expect("referrers");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].digest().to_string(), referrer_digest.as_str());

    // Deletes.
    repo_a
        .delete_manifest(&referrer_digest)
        .await
        .expect("delete manifest");
    assert_eq!(
        repo_a
            .head_manifest(referrer_digest.as_str())
            .await
            .expect("head"),
        None
    );
    repo_a
        .delete_blob(&chunked_digest)
        .await
        .expect("delete blob");
    assert_eq!(
        repo_a.blob_exists(&chunked_digest).await.expect("head"),
        None
    );
}
