//! The transfer engine's blob fetch against a loopback server that misbehaves on purpose: cut
//! connections, ignored ranges, corrupted bytes, and a download killed half-way that the next
//! attempt continues. Every case checks what lands in the store.

use std::sync::Arc;

use modelpack_registry::{Client, ClientOptions, Repository};
use modelpack_spec::Digest;
use modelpack_store::Store;
use modelpack_testkit::blob_server::{Answer, BlobServer};
use modelpack_transfer::{BlobRef, Fetched, TransferOptions, fetch_blob};

fn blob(len: usize) -> Arc<Vec<u8>> {
    Arc::new(modelpack_testkit::data::pseudo_random(len, 0x5eed))
}

fn repo(server: &BlobServer) -> Repository {
    let options = ClientOptions {
        plain_http: true,
        ..ClientOptions::new()
    };
    let reference = server.reference().parse().expect("reference");
    Repository::new(&Client::new(options).expect("client"), &reference)
}

fn blob_ref(data: &[u8]) -> BlobRef {
    BlobRef {
        digest: Digest::sha256_of(data),
        size: data.len() as u64,
        media_type: String::new(),
    }
}

fn stored(store: &Store, blob: &BlobRef) -> Vec<u8> {
    std::fs::read(store.blob_path(&blob.digest)).expect("stored blob")
}

#[tokio::test]
async fn a_blob_lands_verified_and_a_second_fetch_asks_nothing() {
    let data = blob(20 << 20);
    let server = BlobServer::start(data.clone(), vec![]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let b = blob_ref(&data);
    let opts = TransferOptions::new(4);
    let got = fetch_blob(&repo(&server), &store, &b, &opts)
        .await
        .expect("fetch");
    assert_eq!(got, Fetched::Downloaded);
    assert!(stored(&store, &b) == *data);
    let requests = server.requests();
    let again = fetch_blob(&repo(&server), &store, &b, &opts)
        .await
        .expect("fetch again");
    assert_eq!(again, Fetched::Present);
    assert_eq!(server.requests(), requests);
}

#[tokio::test]
async fn cut_connections_and_an_ignored_range_still_give_the_right_bytes() {
    let data = blob(12 << 20);
    let server = BlobServer::start(
        data.clone(),
        vec![Answer::CutAfter(3 << 20), Answer::IgnoreRange],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let b = blob_ref(&data);
    fetch_blob(&repo(&server), &store, &b, &TransferOptions::new(4))
        .await
        .expect("fetch");
    assert!(stored(&store, &b) == *data);
    assert!(server.requests() >= 2);
}

#[tokio::test]
async fn corrupt_bytes_never_reach_the_store() {
    let data = blob(6 << 20);
    let server = BlobServer::start(data.clone(), vec![Answer::FlipAt(4 << 20)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let b = blob_ref(&data);
    let err = fetch_blob(&repo(&server), &store, &b, &TransferOptions::new(4))
        .await
        .expect_err("corrupt bytes accepted");
    assert!(err.is_digest_mismatch(), "{err}");
    assert!(err.to_string().contains(b.digest.as_str()), "{err}");
    assert!(!store.has_blob(&b.digest));
    assert!(store.check().expect("check").problems.is_empty());
}

#[tokio::test]
async fn a_failed_download_is_continued_by_the_next_attempt() {
    let data = blob(40 << 20);
    let b = blob_ref(&data);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    // Every connection breaks after 6 MiB: the attempts run out part of the way in.
    let breaking = BlobServer::start(data.clone(), vec![Answer::CutAfter(6 << 20)]);
    let err = fetch_blob(&repo(&breaking), &store, &b, &TransferOptions::new(1))
        .await
        .expect_err("a server that always breaks");
    assert!(err.to_string().contains(b.digest.as_str()), "{err}");
    assert!(!store.has_blob(&b.digest));
    let moved_before = breaking.served();
    assert!(moved_before >= 16 << 20, "only {moved_before} bytes moved");
    // The next attempt fetches only what the first did not save.
    let honest = BlobServer::start(data.clone(), vec![]);
    fetch_blob(&repo(&honest), &store, &b, &TransferOptions::new(1))
        .await
        .expect("continue");
    assert!(stored(&store, &b) == *data);
    assert!(
        honest.served() <= data.len() - (8 << 20),
        "the second attempt moved {} of {} bytes: it started over",
        honest.served(),
        data.len()
    );
}

/// Files left in the store's `ingest/` folder (partial data, saved progress, temporaries).
fn ingest_leftovers(root: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(root.join("ingest"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_small_blob_takes_one_request_and_leaves_no_partial_file() {
    let data = blob(2 << 10);
    let server = BlobServer::start(data.clone(), vec![]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let b = blob_ref(&data);
    let got = fetch_blob(&repo(&server), &store, &b, &TransferOptions::new(4))
        .await
        .expect("fetch");
    assert_eq!(got, Fetched::Downloaded);
    assert!(stored(&store, &b) == *data);
    assert_eq!(server.requests(), 1);
    assert_eq!(ingest_leftovers(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_small_blob_cut_short_or_served_whole_still_lands_right() {
    let data = blob(512 << 10);
    let server = BlobServer::start(
        data.clone(),
        vec![Answer::CutAfter(100 << 10), Answer::IgnoreRange],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let b = blob_ref(&data);
    fetch_blob(&repo(&server), &store, &b, &TransferOptions::new(4))
        .await
        .expect("fetch");
    assert!(stored(&store, &b) == *data);
    assert!(server.requests() >= 2);
}

#[tokio::test]
async fn a_corrupt_small_blob_never_reaches_the_store() {
    let data = blob(64 << 10);
    let server = BlobServer::start(data.clone(), vec![Answer::FlipAt(1000)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let b = blob_ref(&data);
    let err = fetch_blob(&repo(&server), &store, &b, &TransferOptions::new(4))
        .await
        .expect_err("corrupt bytes accepted");
    assert!(err.is_digest_mismatch(), "{err}");
    assert!(err.to_string().contains(b.digest.as_str()), "{err}");
    assert!(!store.has_blob(&b.digest));
    assert_eq!(ingest_leftovers(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_small_blob_shorter_than_its_descriptor_is_refused() {
    let data = blob(4 << 10);
    let server = BlobServer::start(data.clone(), vec![]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    // The descriptor claims more than the blob has: the server cannot send it.
    let b = BlobRef {
        size: data.len() as u64 + 10,
        ..blob_ref(&data)
    };
    let err = fetch_blob(&repo(&server), &store, &b, &TransferOptions::new(4))
        .await
        .expect_err("a size that does not match");
    // One request: the answer says the blob ends before the bytes asked for, a protocol error
    // from the registry itself (no retrying a server that says so).
    assert!(err.to_string().contains(b.digest.as_str()), "{err}");
    assert!(err.to_string().contains("answered a GET of bytes"), "{err}");
    assert_eq!(server.requests(), 1);
    assert!(!store.has_blob(&b.digest));
}
