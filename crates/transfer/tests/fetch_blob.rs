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

/// A blob of `len` pseudo-random bytes on a server answering as `script` says, and an empty
/// store to fetch it into.
struct Setup {
    data: Arc<Vec<u8>>,
    server: BlobServer,
    dir: tempfile::TempDir,
    store: Store,
    b: BlobRef,
}

fn setup(len: usize, script: Vec<Answer>) -> Setup {
    let data = blob(len);
    let server = BlobServer::start(data.clone(), script);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let b = blob_ref(&data);
    Setup {
        data,
        server,
        dir,
        store,
        b,
    }
}

impl Setup {
    /// Fetches `b` into the store with four connections.
    async fn fetch(&self) -> modelpack_transfer::Result<Fetched> {
        fetch_blob(
            &repo(&self.server),
            &self.store,
            &self.b,
            &TransferOptions::new(4),
        )
        .await
    }

    fn assert_stored(&self) {
        assert!(stored(&self.store, &self.b) == *self.data);
    }
}

/// A server that cuts its first answer after `cut` bytes and ignores the next range asked: the
/// blob lands right all the same, after more than one request.
async fn lands_despite_a_cut_and_an_ignored_range(len: usize, cut: usize) {
    let t = setup(len, vec![Answer::CutAfter(cut), Answer::IgnoreRange]);
    t.fetch().await.expect("fetch");
    t.assert_stored();
    assert!(t.server.requests() >= 2);
}

/// A server that flips the byte at `at`: the fetch fails as a digest mismatch naming the blob,
/// which the store does not have. The setup, for the caller's further checks.
async fn refused_as_corrupt(len: usize, at: usize) -> Setup {
    let t = setup(len, vec![Answer::FlipAt(at)]);
    let err = t.fetch().await.expect_err("corrupt bytes accepted");
    assert!(err.is_digest_mismatch(), "{err}");
    assert!(err.to_string().contains(t.b.digest.as_str()), "{err}");
    assert!(!t.store.has_blob(&t.b.digest));
    t
}

#[tokio::test]
async fn a_blob_lands_verified_and_a_second_fetch_asks_nothing() {
    let t = setup(20 << 20, vec![]);
    assert_eq!(t.fetch().await.expect("fetch"), Fetched::Downloaded);
    t.assert_stored();
    let requests = t.server.requests();
    assert_eq!(t.fetch().await.expect("fetch again"), Fetched::Present);
    assert_eq!(t.server.requests(), requests);
}

#[tokio::test]
async fn cut_connections_and_an_ignored_range_still_give_the_right_bytes() {
    lands_despite_a_cut_and_an_ignored_range(12 << 20, 3 << 20).await;
}

#[tokio::test]
async fn corrupt_bytes_never_reach_the_store() {
    let t = refused_as_corrupt(6 << 20, 4 << 20).await;
    assert!(t.store.check().expect("check").problems.is_empty());
}

#[tokio::test]
async fn a_failed_download_is_continued_by_the_next_attempt() {
    // The setup's honest server is asked second.
    let t = setup(40 << 20, vec![]);
    let (data, b, store) = (&t.data, &t.b, &t.store);
    // Every connection breaks after 6 MiB: the attempts run out part of the way in.
    let breaking = BlobServer::start(data.clone(), vec![Answer::CutAfter(6 << 20)]);
    let err = fetch_blob(&repo(&breaking), store, b, &TransferOptions::new(1))
        .await
        .expect_err("a server that always breaks");
    assert!(err.to_string().contains(b.digest.as_str()), "{err}");
    assert!(!store.has_blob(&b.digest));
    let moved_before = breaking.served();
    assert!(moved_before >= 16 << 20, "only {moved_before} bytes moved");
    // The next attempt fetches only what the first did not save.
    let honest = &t.server;
    fetch_blob(&repo(honest), store, b, &TransferOptions::new(1))
        .await
        .expect("continue");
    t.assert_stored();
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
    let t = setup(2 << 10, vec![]);
    assert_eq!(t.fetch().await.expect("fetch"), Fetched::Downloaded);
    t.assert_stored();
    assert_eq!(t.server.requests(), 1);
    assert_eq!(ingest_leftovers(t.dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_small_blob_cut_short_or_served_whole_still_lands_right() {
    lands_despite_a_cut_and_an_ignored_range(512 << 10, 100 << 10).await;
}

#[tokio::test]
async fn a_corrupt_small_blob_never_reaches_the_store() {
    let t = refused_as_corrupt(64 << 10, 1000).await;
    assert_eq!(ingest_leftovers(t.dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_small_blob_shorter_than_its_descriptor_is_refused() {
    let mut t = setup(4 << 10, vec![]);
    // The descriptor claims more than the blob has: the server cannot send it.
    t.b.size += 10;
    let err = t.fetch().await.expect_err("a size that does not match");
    // One request: the answer says the blob ends before the bytes asked for, a protocol error
    // from the registry itself (no retrying a server that says so).
    assert!(err.to_string().contains(t.b.digest.as_str()), "{err}");
    assert!(err.to_string().contains("answered a GET of bytes"), "{err}");
    assert_eq!(t.server.requests(), 1);
    assert!(!t.store.has_blob(&t.b.digest));
}
