//! `BlobBody` against a small HTTP server on loopback that misbehaves on purpose: it ignores
//! `Range`, cuts bodies short, or serves too much. Every case checks the exact bytes.

use std::sync::Arc;

use modelpack_registry::{Client, ClientOptions, Error, Repository};
use modelpack_spec::Digest;
use modelpack_testkit::blob_server::{Answer, BlobServer};

fn serve(blob: Arc<Vec<u8>>, script: Vec<Answer>) -> BlobServer {
    BlobServer::start(blob, script)
}

fn blob(len: usize) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(|i| (i * 7 + i / 251) as u8).collect())
}

fn repo(port: u16) -> Repository {
    let client = Client::new(ClientOptions {
        plain_http: true,
        ..ClientOptions::new()
    })
    .expect("client");
    let reference = format!("127.0.0.1:{port}/test/blob:v1")
        .parse()
        .expect("reference");
    Repository::new(&client, &reference)
}

async fn read_all(
    repo: &Repository,
    digest: &Digest,
    range: Option<std::ops::Range<u64>>,
) -> Result<Vec<u8>, Error> {
    let mut body = repo.blob_stream(digest, range).await?;
    let mut out = Vec::new();
    while let Some(piece) = body.next_chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

#[tokio::test]
async fn a_range_is_served_exactly_when_the_server_ignores_range() {
    let data = blob(300_000);
    let server = serve(data.clone(), vec![Answer::IgnoreRange]);
    let digest = Digest::sha256_of(&data);
    let got = read_all(&repo(server.port), &digest, Some(100_000..200_123))
        .await
        .expect("read");
    assert_eq!(got, data[100_000..200_123]);
}

#[tokio::test]
async fn a_cut_body_resumes_from_the_last_byte() {
    let data = blob(1 << 20);
    let server = serve(
        data.clone(),
        vec![
            Answer::CutAfter(70_000),
            Answer::CutAfter(300_000),
            Answer::Honest,
        ],
    );
    let digest = Digest::sha256_of(&data);
    let repo = repo(server.port);
    let mut body = repo
        .blob_stream(&digest, Some(0..data.len() as u64))
        .await
        .expect("open");
    let mut got = Vec::new();
    while let Some(piece) = body.next_chunk().await.expect("read") {
        assert_eq!(body.position(), (got.len() + piece.len()) as u64);
        got.extend_from_slice(&piece);
    }
    assert_eq!(got.len(), data.len());
    assert!(got == *data, "resumed bytes differ");
    assert_eq!(body.resumes(), 2);
    assert_eq!(server.requests(), 3);
}

#[tokio::test]
async fn an_open_ended_stream_learns_its_end_and_resumes_through_an_ignored_range() {
    let data = blob(500_000);
    let server = serve(
        data.clone(),
        vec![Answer::CutAfter(123_457), Answer::IgnoreRange],
    );
    let digest = Digest::sha256_of(&data);
    let got = read_all(&repo(server.port), &digest, None)
        .await
        .expect("read");
    assert!(got == *data);
}

#[tokio::test]
async fn a_body_that_always_breaks_fails_naming_the_digest() {
    let data = blob(200_000);
    let server = serve(data.clone(), vec![Answer::CutAfter(1000)]);
    let digest = Digest::sha256_of(&data);
    let err = read_all(&repo(server.port), &digest, None)
        .await
        .expect_err("must fail");
    assert!(err.to_string().contains(digest.as_str()), "{err}");
}

#[tokio::test]
async fn the_end_can_move_earlier_while_reading() {
    let data = blob(400_000);
    let server = serve(data.clone(), vec![Answer::Honest]);
    let digest = Digest::sha256_of(&data);
    let repo = repo(server.port);
    let mut body = repo
        .blob_stream(&digest, Some(1000..400_000))
        .await
        .expect("open");
    body.set_end(150_001);
    let mut got = Vec::new();
    while let Some(piece) = body.next_chunk().await.expect("read") {
        got.extend_from_slice(&piece);
    }
    assert_eq!(got, data[1000..150_001]);
}

#[tokio::test]
async fn small_documents_are_capped_and_checked() {
    let data = blob(10_000);
    let server = serve(data.clone(), vec![Answer::Honest]);
    let repo = repo(server.port);
    let digest = Digest::sha256_of(&data);
    let got = repo.read_blob_capped(&digest, 10_000).await.expect("read");
    assert_eq!(&got[..], &data[..]);
    let err = repo
        .read_blob_capped(&digest, 9_999)
        .await
        .expect_err("over the cap");
    assert!(err.to_string().contains("over 9999 bytes"), "{err}");
    let wrong = Digest::sha256_of(b"something else");
    let err = repo
        .read_blob_capped(&wrong, 10_000)
        .await
        .expect_err("wrong digest");
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}
