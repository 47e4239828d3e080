//! `BlobBody` against a small HTTP server on loopback that misbehaves on purpose: it ignores
//! `Range`, cuts bodies short, or serves too much. Every case checks the exact bytes.

use std::sync::Arc;

use modelpack_registry::{Client, ClientOptions, Error, Repository, mirror_fallbacks};
use modelpack_spec::Digest;
use modelpack_testkit::blob_server::{Answer, BlobServer};

mod common;

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

/// An honest upstream, a mirror answering by `script` in front of it (named by a hosts folder,
/// kept in the returned value), and the repository of the upstream.
struct Fronted {
    upstream: BlobServer,
    mirror: BlobServer,
    _hosts: tempfile::TempDir,
    repo: Repository,
}

fn fronted(data: &Arc<Vec<u8>>, script: Vec<Answer>) -> Fronted {
    let upstream = serve(data.clone(), Vec::new());
    let mirror = serve(data.clone(), script);
    let (hosts, repo) = common::repo_through_mirror(
        &upstream.host(),
        &mirror.host(),
        "[\"pull\"]",
        "test/blob:v1",
    );
    Fronted {
        repo,
        upstream,
        mirror,
        _hosts: hosts,
    }
}

async fn read_sized(
    repo: &Repository,
    digest: &Digest,
    size: Option<u64>,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>, Error> {
    let mut body = match size {
        Some(size) => repo.blob_stream_sized(digest, size, Some(range)).await?,
        None => repo.blob_stream(digest, Some(range)).await?,
    };
    let mut out = Vec::new();
    while let Some(piece) = body.next_chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// Answers to `bytes=100000-200122` of a 300 000-byte blob that must not be used, and whether
/// the reader gives the blob's size.
fn wrong_answers() -> Vec<(Answer, bool)> {
    vec![
        // 206 from another offset, headers telling the truth about it.
        (Answer::Shift(1000), false),
        (Answer::Shift(-1000), false),
        // 206 without a Content-Range: where its bytes are is anyone's guess.
        (Answer::NoContentRange, false),
        // 206 whose Content-Length does not match its Content-Range.
        (Answer::LongerBody(5000), false),
        // 200 too short for the range asked.
        (Answer::WholeOfLength(150_000), false),
        // 200 that is not the blob's size (known to the reader).
        (Answer::WholeOfLength(310_000), true),
        (Answer::WholeOfLength(250_000), true),
    ]
}

#[tokio::test]
async fn a_mirror_that_answers_a_range_wrongly_is_left_for_the_upstream() {
    let data = blob(300_000);
    let digest = Digest::sha256_of(&data);
    let range = 100_000..200_123u64;
    let want = &data[range.start as usize..range.end as usize];
    for (answer, sized) in wrong_answers() {
        let f = fronted(&data, vec![answer]);
        let size = sized.then_some(data.len() as u64);
        let fallbacks = mirror_fallbacks();
        let got = read_sized(&f.repo, &digest, size, range.clone())
            .await
            .unwrap_or_else(|e| panic!("{answer:?}: {e}"));
        assert!(got == want, "{answer:?}: wrong bytes");
        assert_eq!(f.mirror.requests(), 1, "{answer:?}: the mirror was asked");
        assert_eq!(f.upstream.requests(), 1, "{answer:?}: then the upstream");
        assert!(mirror_fallbacks() > fallbacks, "{answer:?}: counted");
        // That mirror is not asked for that blob again.
        let again = read_sized(&f.repo, &digest, size, 5..1005)
            .await
            .expect("read again");
        assert_eq!(again, data[5..1005]);
        assert_eq!(f.mirror.requests(), 1, "{answer:?}: asked again");
        assert_eq!(f.upstream.requests(), 2);
    }
}

#[tokio::test]
async fn a_mirror_answer_past_the_end_of_the_range_is_cut_at_it() {
    let data = blob(300_000);
    let digest = Digest::sha256_of(&data);
    for (answer, sized) in [
        (Answer::PastTheEnd(7000), false),
        (Answer::PastTheEnd(7000), true),
        (Answer::IgnoreRange, true),
        (Answer::WholeOfLength(310_000), false),
    ] {
        let f = fronted(&data, vec![answer]);
        let size = sized.then_some(data.len() as u64);
        let got = read_sized(&f.repo, &digest, size, 100_000..200_123)
            .await
            .unwrap_or_else(|e| panic!("{answer:?}: {e}"));
        assert!(got == data[100_000..200_123], "{answer:?}: wrong bytes");
        assert_eq!(f.upstream.requests(), 0, "{answer:?}: the mirror served it");
    }
}

#[tokio::test]
async fn an_upstream_that_answers_a_range_wrongly_is_a_protocol_error_naming_it() {
    let data = blob(300_000);
    let digest = Digest::sha256_of(&data);
    for (answer, sized) in wrong_answers() {
        let server = serve(data.clone(), vec![answer]);
        let size = sized.then_some(data.len() as u64);
        let err = read_sized(&repo(server.port), &digest, size, 100_000..200_123)
            .await
            .expect_err("a wrong answer");
        assert!(matches!(err, Error::Protocol(_)), "{answer:?}: {err:?}");
        let text = err.to_string();
        assert!(text.contains(&server.host()), "{answer:?}: {text}");
        assert!(text.contains("bytes 100000-200122"), "{answer:?}: {text}");
        assert!(!text.contains('\n'), "{text}");
        assert_eq!(server.requests(), 1, "{answer:?}: not asked again");
    }
}
